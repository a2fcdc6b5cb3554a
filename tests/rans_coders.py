"""The two rANS coders (the C extension and the Python reference), for differential tests of rANS and of binned
streams, whose C path switches with rANS's."""

import importlib

from dcformat import rans
from dcformat.errors import DczError

try:
    NATIVE = importlib.import_module("dcformat._ranscode")
except ImportError:
    NATIVE = None


def both(fn):
    """fn() under each coder: [(C result or exception), (Python result or exception)]."""
    out = []
    saved = rans._native
    try:
        for module in ([NATIVE] if NATIVE is not None else []) + [None]:
            rans._native = module
            try:
                out.append(fn())
            except DczError as e:
                out.append((type(e), str(e)))
    finally:
        rans._native = saved
    return out
