"""The one exception root of dcformat, and its few subclasses.

Every error dcformat raises on bad input is a :class:`DczError` (a ``ValueError``),
so ``except dcformat.DczError`` catches them all. Messages name the tensor or
section, the value found and the bound it broke.
"""

from __future__ import annotations

__all__ = [
    "DczError",
    "TruncatedError",
    "CorruptError",
    "ChecksumError",
    "UnsupportedError",
    "LimitError",
    "InputError",
]


class DczError(ValueError):
    """Root of every error dcformat raises about its inputs or files."""


class TruncatedError(DczError):
    """The file or a structure in it ends before the bytes it declares."""


class CorruptError(DczError):
    """The bytes are present but do not follow the specification."""


class ChecksumError(CorruptError):
    """A section or stream does not match its CRC-32: the bytes were damaged."""


class UnsupportedError(DczError):
    """A valid file that uses a version, feature or code this reader does not know."""


class LimitError(DczError):
    """A declared size exceeds a reader limit (see ``dcformat.constants``)."""


class InputError(DczError):
    """An argument or input model the caller gave cannot be processed."""
