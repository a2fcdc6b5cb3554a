"""Fixtures shared by test modules."""

import pytest

from dcformat import rans
from rans_coders import NATIVE


@pytest.fixture(params=["native", "python"])
def rans_coder(request, monkeypatch):
    """Runs the test with one coder in dcformat.rans (binned streams switch their C path with it); yields that
    coder's module (None for the Python reference)."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("dcformat._ranscode is not built (see test_rans.py::test_native_coder_is_built)")
    module = NATIVE if request.param == "native" else None
    monkeypatch.setattr(rans, "_native", module)
    return module
