"""Stage 5: relative-index positions of the stored elements of a sparse tensor.

Each stored element's flat position is written as its gap to the previous stored
element (the first one's gap is counted from position -1) in a field of
``index_bits`` bits. With ``M = 2**index_bits - 1``, an entry ``e`` in ``1..M``
means "the next stored element is ``e`` positions further on"; the filler entry
``0`` means "advance ``M`` positions, nothing stored here". A gap ``G`` is thus
``(G - 1) // M`` fillers followed by ``G - (G - 1) // M * M``. Unlike the paper,
fillers carry no code, so the code stream holds exactly one code per stored element
(spec section "Relative-index positions").
"""

from __future__ import annotations

import numpy as np

from .constants import MAX_INDEX_BITS
from .errors import CorruptError, InputError

__all__ = ["encode_positions", "decode_positions", "count_entries"]


def _check_bits(index_bits: int) -> int:
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise InputError(f"index_bits {index_bits} is outside 1..{MAX_INDEX_BITS}")
    return (1 << index_bits) - 1


def _gaps(positions: np.ndarray) -> np.ndarray:
    return np.diff(np.asarray(positions, dtype=np.int64), prepend=np.int64(-1))


def count_entries(positions: np.ndarray, index_bits: int) -> int:
    """Number of entries (stored elements plus fillers) the positions take."""
    m = _check_bits(index_bits)
    gaps = _gaps(positions)
    return int(gaps.size + ((gaps - 1) // m).sum())


def encode_positions(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Entries (uint16) for strictly increasing flat positions >= 0."""
    m = _check_bits(index_bits)
    gaps = _gaps(positions)
    if gaps.size and gaps.min() < 1:
        raise InputError("positions must be strictly increasing and non-negative")
    fillers = (gaps - 1) // m
    ends = np.cumsum(fillers + 1) - 1  # where each stored element's entry lands
    entries = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint16)
    entries[ends] = gaps - fillers * m
    return entries


def decode_positions(entries: np.ndarray, index_bits: int, numel: int, what: str) -> np.ndarray:
    """Flat positions (int64) of the stored elements; validates them against the tensor.

    Raises CorruptError when the positions run past ``numel`` or the stream ends in fillers.
    """
    m = _check_bits(index_bits)
    entries = np.asarray(entries)
    if entries.size and int(entries.max()) > m:
        raise CorruptError(f"{what}: position entry {int(entries.max())} does not fit in {index_bits} bits")
    if entries.size and entries[-1] == 0:
        raise CorruptError(f"{what}: position stream ends with a filler entry (no stored element follows it)")
    advance = np.where(entries == 0, np.int64(m), entries.astype(np.int64))
    cursor = np.cumsum(advance) - 1
    positions = cursor[entries != 0]
    if positions.size and int(positions[-1]) >= numel:
        raise CorruptError(
            f"{what}: relative-index positions run to element {int(positions[-1])}, past the tensor's {numel} elements"
        )
    return positions
