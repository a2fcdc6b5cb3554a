"""Canonical Huffman streams: round trips, size against entropy, and every table check."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dcformat import huffman
from dcformat.constants import MAX_CODE_LENGTH
from dcformat.errors import CorruptError, TruncatedError


@st.composite
def symbol_streams(draw):
    alphabet = draw(st.sampled_from([1, 2, 3, 5, 16, 256, 257, 1000, 65536]))
    n = draw(st.integers(0, 3000))
    used = draw(st.integers(1, min(alphabet, 40)))
    pool = np.array(draw(st.lists(st.integers(0, alphabet - 1), min_size=used, max_size=used)))
    skew = draw(st.floats(0.0, 3.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    p = np.exp(-skew * np.arange(pool.size, dtype=float))
    return rng.choice(pool, size=n, p=p / p.sum()), alphabet


@given(symbol_streams())
@settings(max_examples=150, deadline=None)
def test_round_trip_any_distribution(case):
    symbols, alphabet = case
    data, table, nbits = huffman.encode_stream(symbols, alphabet)
    out = huffman.decode_stream(data, symbols.size, alphabet, "t")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, symbols)
    if symbols.size:
        freq = np.bincount(symbols, minlength=alphabet)
        # Huffman is within one bit per symbol of the entropy, and never below it.
        assert huffman.entropy_bits(freq) - 1e-6 <= nbits <= huffman.entropy_bits(freq) + symbols.size
        assert len(data) == huffman.encoded_size(freq, table, alphabet)


def test_single_symbol_costs_no_bits():
    data, table, nbits = huffman.encode_stream(np.full(10_000, 7), 16)
    assert table.max_length == 0 and nbits == 0
    assert len(data) == 3  # 2-byte header + one 1-byte symbol
    np.testing.assert_array_equal(huffman.decode_stream(data, 10_000, 16, "t"), np.full(10_000, 7))


def test_empty_stream():
    data, _, _ = huffman.encode_stream(np.zeros(0, dtype=np.int64), 16)
    assert data == b"\0\0"
    assert huffman.decode_stream(data, 0, 16, "t").size == 0


def test_code_length_is_capped():
    # Fibonacci-like counts force an optimal code far longer than the cap.
    freq = np.array([int(1.6**i) + 1 for i in range(60)], dtype=np.int64)
    table = huffman.build_table(freq)
    assert table.max_length <= MAX_CODE_LENGTH
    symbols = np.repeat(np.arange(60), np.minimum(freq, 50))
    data, _, _ = huffman.encode_stream(symbols, 60)
    np.testing.assert_array_equal(huffman.decode_stream(data, symbols.size, 60, "t"), symbols)


def test_canonical_codewords_match_spec():
    # Spec section 6: lengths (1, 2, 3, 3) for symbols (2, 0, 1, 3) give 0, 10, 110, 111.
    table = huffman.HuffmanTable((1, 1, 2), np.array([2, 0, 1, 3], dtype=np.uint16))
    words = {s: w.to01() for s, w in huffman._codewords(table).items()}
    assert words == {2: "0", 0: "10", 1: "110", 3: "111"}


def _table(counts, symbols, bits=b"", width=1):
    fmt = "<u1" if width == 1 else "<u2"
    return struct.pack(f"<BB{len(counts)}I", len(counts), 0, *counts) + np.array(symbols, fmt).tobytes() + bits


@pytest.mark.parametrize(
    "stream, count, alphabet, error, match",
    [
        (b"\x01", 1, 4, TruncatedError, "table header"),
        (b"\x00\x01\x00", 1, 4, CorruptError, "reserved byte"),
        (bytes([MAX_CODE_LENGTH + 1, 0]), 1, 4, CorruptError, "exceeds the limit"),
        (_table([2, 1], [0, 1, 2]), 1, 4, CorruptError, "over-subscribed"),
        (_table([1, 1], [0, 1]), 1, 4, CorruptError, "incomplete"),
        (_table([1], [0]), 1, 4, CorruptError, "incomplete"),
        (_table([2, 0], [0, 1]), 1, 4, CorruptError, "no code of that length"),
        (_table([2], [0, 9], b"\x00"), 1, 4, CorruptError, "outside the alphabet"),
        (_table([2], [1, 1], b"\x00"), 1, 4, CorruptError, "twice"),
        (_table([2], [1, 0], b"\x00"), 1, 4, CorruptError, "canonical"),
        (_table([2], [0]), 1, 4, TruncatedError, "symbols need"),
        (_table([2], [0, 1], b"\x00"), 9, 4, TruncatedError, "at least 9 bits"),
        (_table([1, 1, 2], [0, 1, 2, 3], b"\xff"), 8, 4, TruncatedError, "ends before"),
        (_table([2], [0, 1], b"\x00\x00"), 8, 4, CorruptError, "use 8 bits"),
        (_table([2], [0, 1], b"\x01"), 7, 4, CorruptError, "padding"),
        (_table([], [3], b"\x00"), 4, 4, CorruptError, "trailing"),
    ],
)
def test_hostile_tables(stream, count, alphabet, error, match):
    with pytest.raises(error, match=match):
        huffman.decode_stream(stream, count, alphabet, "tensor 'w' codes")
