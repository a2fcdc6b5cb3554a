"""Relative-index positions: the identity on any mask, fillers included, and every check."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dcformat import sparse
from dcformat.errors import CorruptError, InputError


@st.composite
def masks(draw):
    n = draw(st.integers(1, 5000))
    kind = draw(st.sampled_from(["random", "empty", "full", "single", "edges"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "random":
        mask = rng.random(n) < draw(st.floats(0.0, 1.0))
    elif kind == "empty":
        mask = np.zeros(n, bool)
    elif kind == "full":
        mask = np.ones(n, bool)
    elif kind == "single":
        mask = np.zeros(n, bool)
        mask[draw(st.integers(0, n - 1))] = True
    else:  # gaps exactly at and around the filler boundaries
        bits = draw(st.integers(1, 6))
        m = (1 << bits) - 1
        pos = np.cumsum(rng.choice([m - 1, m, m + 1, 2 * m, 2 * m + 1, 1], size=50))
        mask = np.zeros(int(pos[-1]) + 1, bool)
        mask[pos] = True
    return mask


@given(masks(), st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_round_trip(mask, bits):
    positions = np.flatnonzero(mask)
    entries = sparse.encode_positions(positions, bits)
    assert entries.size == sparse.count_entries(positions, bits)
    assert int(entries.max(initial=0)) < 1 << bits
    back = sparse.decode_positions(entries, bits, mask.size, "t")
    np.testing.assert_array_equal(back, positions)


def test_spec_example():
    # spec section 5: b = 2, positions 1, 2, 9 -> entries 2, 1, 0, 0, 1
    entries = sparse.encode_positions(np.array([1, 2, 9]), 2)
    assert entries.tolist() == [2, 1, 0, 0, 1]


def test_first_gap_counts_from_minus_one():
    assert sparse.encode_positions(np.array([0]), 3).tolist() == [1]
    assert sparse.encode_positions(np.array([7]), 3).tolist() == [0, 1]  # M = 7: one filler then 1


def test_runs_past_tensor():
    with pytest.raises(CorruptError, match="past the tensor"):
        sparse.decode_positions(np.array([3, 3], dtype=np.uint16), 2, 5, "tensor 'w' positions")


def test_trailing_filler():
    with pytest.raises(CorruptError, match="ends with a filler"):
        sparse.decode_positions(np.array([1, 0], dtype=np.uint16), 2, 50, "t")


def test_entry_too_wide():
    with pytest.raises(CorruptError, match="does not fit in 2 bits"):
        sparse.decode_positions(np.array([4], dtype=np.uint16), 2, 50, "t")


def test_bad_input():
    with pytest.raises(InputError):
        sparse.encode_positions(np.array([3, 3]), 4)
    with pytest.raises(InputError):
        sparse.encode_positions(np.array([1]), 0)


def test_positions_beyond_two_to_the_31():
    # Tensors of over 2**31 elements: positions are int64 end to end (fillers make the big gaps cheap).
    positions = np.array([5, 2**31 - 1, 2**31, 2**31 + 70_000, 2**33 + 3], dtype=np.int64)
    entries = sparse.encode_positions(positions, 16)
    assert entries.size == sparse.count_entries(positions, 16) < 200_000
    np.testing.assert_array_equal(sparse.decode_positions(entries, 16, 2**33 + 4, "t"), positions)
