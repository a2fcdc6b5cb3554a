"""Canonical Huffman streams: round trips, size against entropy, and every table check.

Tests taking the ``coder`` fixture run twice, with the C extension coder and with the bitarray
fallback, and differential tests check that the two give the same bytes, symbols and errors.
"""

import importlib
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dcformat import huffman
from dcformat.constants import MAX_CODE_LENGTH
from dcformat.errors import CorruptError, DczError, TruncatedError

try:
    NATIVE = importlib.import_module("dcformat._huffcode")
except ImportError:
    NATIVE = None


@pytest.fixture(params=["native", "bitarray"])
def coder(request, monkeypatch):
    """Runs the test with one coder in dcformat.huffman; yields that coder's module (None for bitarray)."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("dcformat._huffcode is not built (see test_native_coder_is_built)")
    module = NATIVE if request.param == "native" else None
    monkeypatch.setattr(huffman, "_native", module)
    return module


# The coder fixture is function-scoped but constant across Hypothesis examples.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


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
@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
def test_round_trip_any_distribution(coder, case):
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


def test_single_symbol_costs_no_bits(coder):
    data, table, nbits = huffman.encode_stream(np.full(10_000, 7), 16)
    assert table.max_length == 0 and nbits == 0
    assert len(data) == 3  # 2-byte header + one 1-byte symbol
    np.testing.assert_array_equal(huffman.decode_stream(data, 10_000, 16, "t"), np.full(10_000, 7))


def test_empty_stream(coder):
    data, _, _ = huffman.encode_stream(np.zeros(0, dtype=np.int64), 16)
    assert data == b"\0\0"
    assert huffman.decode_stream(data, 0, 16, "t").size == 0


def test_code_length_is_capped(coder):
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
def test_hostile_tables(coder, stream, count, alphabet, error, match):
    with pytest.raises(error, match=match):
        huffman.decode_stream(stream, count, alphabet, "tensor 'w' codes")


def test_native_coder_is_built():
    # A machine with a C compiler builds the extension on `pip install -e .`; only DCZ_PURE_PYTHON=1 goes without.
    if os.environ.get("DCZ_PURE_PYTHON", "") not in ("", "0"):
        assert not huffman.native_coder()
        pytest.skip("DCZ_PURE_PYTHON is set: the bitarray coder is the default")
    assert NATIVE is not None, "dcformat._huffcode is missing: run `pip install -e .` or `python setup.py build_ext --inplace`"
    assert huffman.native_coder()


def test_native_limit_matches_spec_constant():
    if NATIVE is None:
        pytest.skip("dcformat._huffcode is not built")
    assert NATIVE.MAX_CODE_LENGTH == MAX_CODE_LENGTH
    assert NATIVE.LUT_BITS < MAX_CODE_LENGTH  # so long codewords take the slow path and are tested below


def _outcome(stream, count, alphabet):
    """What decode_stream gives: ("ok", symbols) or (error class name, message)."""
    try:
        return "ok", huffman.decode_stream(stream, count, alphabet, "t").tolist()
    except DczError as exc:
        return type(exc).__name__, str(exc)


def _both(monkeypatch, fn):
    """fn() with the C coder and with the bitarray coder."""
    if NATIVE is None:
        pytest.skip("dcformat._huffcode is not built")
    monkeypatch.setattr(huffman, "_native", NATIVE)
    native = fn()
    monkeypatch.setattr(huffman, "_native", None)
    return native, fn()


@st.composite
def tables(draw):
    """A valid table from a random histogram; Fibonacci-like counts give codewords up to the 24-bit cap."""
    alphabet = draw(st.sampled_from([2, 3, 16, 256, 300, 65536]))
    used = draw(st.integers(2, min(alphabet, 60)))
    present = draw(st.lists(st.integers(0, alphabet - 1), min_size=used, max_size=used, unique=True))
    if draw(st.booleans()):
        counts = [int(1.7**i) + 1 for i in range(used)]
    else:
        counts = draw(st.lists(st.integers(1, 1000), min_size=used, max_size=used))
    freq = np.zeros(alphabet, dtype=np.int64)
    freq[present] = counts
    return huffman.build_table(freq), freq, alphabet


@given(tables(), st.data())
@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURE_OK)
def test_coders_agree_on_round_trips(monkeypatch, case, data):
    table, freq, alphabet = case
    present = np.flatnonzero(freq)
    n = data.draw(st.integers(0, 2000))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    symbols = rng.choice(present, size=n, p=freq[present] / freq[present].sum())
    native, fallback = _both(monkeypatch, lambda: huffman.encode_stream(symbols, alphabet, table))
    assert native[0] == fallback[0] and native[2] == fallback[2]  # same bytes, same bit count
    assert _both(monkeypatch, lambda: _outcome(native[0], n, alphabet)) == (("ok", symbols.tolist()),) * 2


@given(tables(), st.binary(max_size=40), st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
def test_coders_agree_on_random_bitstreams(monkeypatch, case, payload, data):
    # Any bytes after a valid table: both coders decode the same symbols or raise the same error and message.
    table, _, alphabet = case
    prefix = huffman.encode_stream(table.symbols[:1], alphabet, table)[0][: huffman.table_nbytes(table, alphabet)]
    count = data.draw(st.integers(0, 8 * len(payload) + 2))
    native, fallback = _both(monkeypatch, lambda: _outcome(prefix + payload, count, alphabet))
    assert native == fallback


def test_truncation_at_every_byte(monkeypatch):
    rng = np.random.default_rng(1)
    symbols = rng.geometric(0.3, 400).clip(0, 40)  # long codewords for the rare symbols
    stream, table, _ = huffman.encode_stream(symbols, 41)
    start = huffman.table_nbytes(table, 41)
    for cut in range(start, len(stream)):
        native, fallback = _both(monkeypatch, lambda: _outcome(stream[:cut], symbols.size, 41))
        assert native == fallback and native[0] == "TruncatedError", (cut, native)


def test_truncated_message_counts_whole_codewords(coder):
    # Codes 0, 10, 11 (symbols 0, 1, 2); the byte 1010_1010 holds four codewords "10", then ends.
    stream = _table([1, 2], [0, 1, 2], b"\xaa")
    with pytest.raises(TruncatedError, match=r"ends before its 5 symbols \(4 whole codewords in 8 bits\)"):
        huffman.decode_stream(stream, 5, 4, "t")


@pytest.mark.parametrize(
    "dtype", ["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", ">i4", "<u2", ">u8"]
)
def test_encode_accepts_integer_dtypes(monkeypatch, dtype):
    symbols = np.random.default_rng(2).integers(0, 100, 1000).astype(dtype)
    native, fallback = _both(monkeypatch, lambda: huffman.encode_stream(symbols, 100)[0])
    assert native == fallback
    strided = np.repeat(symbols, 2)[::2]  # a non-contiguous view
    assert _both(monkeypatch, lambda: huffman.encode_stream(strided, 100)[0]) == (native, native)


@pytest.mark.parametrize("bad", [-1, 5, 99])
def test_encode_refuses_symbols_outside_the_table(coder, bad):
    table = huffman.build_table(np.array([5, 3, 0, 1, 0]))  # symbols 0, 1, 3 coded; 2 and 4 are not
    for symbols in (np.array([0, 1, bad]), np.array([0, 2])):
        with pytest.raises(ValueError):
            huffman.encode_stream(symbols, 5, table)


def test_native_refuses_bad_arguments():
    if NATIVE is None:
        pytest.skip("dcformat._huffcode is not built")
    syms = np.array([0, 1, 2], dtype=np.uint16)
    out = np.empty(4, dtype=np.uint16)
    with pytest.raises(ValueError, match="complete"):
        NATIVE.decode(b"\0", (1, 1), syms[:2], out)  # incomplete code
    with pytest.raises(ValueError, match="complete"):
        NATIVE.decode(b"\0", (2, 1), syms, out)  # over-subscribed
    with pytest.raises(ValueError, match="outside"):
        NATIVE.decode(b"\0", (0,) * (MAX_CODE_LENGTH + 1), syms, out)
    with pytest.raises(ValueError, match="3 symbols"):
        NATIVE.decode(b"\0", (0, 4), syms, out)  # counts disagree with the symbol list
    with pytest.raises(TypeError, match="uint16"):
        NATIVE.decode(b"\0", (1, 2), syms, np.empty(4, dtype=np.int32))
    with pytest.raises(TypeError, match="uint16"):
        NATIVE.decode(b"\0", (1, 2), syms.astype(np.uint8), out)
    with pytest.raises(BufferError):  # the output buffer must be writable
        NATIVE.decode(b"\0", (1, 2), syms, bytes(8))
    with pytest.raises(ValueError, match="whole number"):
        NATIVE.encode(b"\0\0\0", 2, False, (1, 2), syms, 4)
    with pytest.raises(ValueError, match="repeated"):
        NATIVE.encode(b"\0", 1, False, (1, 2), np.array([0, 1, 1], dtype=np.uint16), 4)


def test_native_decode_stops_at_the_output_size():
    # The C decoder writes exactly len(out) symbols whatever the payload holds.
    if NATIVE is None:
        pytest.skip("dcformat._huffcode is not built")
    stream, table, _ = huffman.encode_stream(np.arange(4).repeat(100), 4)
    payload = stream[huffman.table_nbytes(table, 4):]
    guard = np.full(60, 7, dtype=np.uint16)
    decoded, used = NATIVE.decode(payload, table.counts, table.symbols, guard[:50])
    assert (decoded, used) == (50, 100) and guard[50:].tolist() == [7] * 10


def test_every_codeword_before_zeros_and_at_the_end(coder):
    # Each codeword followed by all-zero bits (padding, or the all-zero first codeword repeated) sits exactly on
    # a length boundary of the canonical code; long codewords (past the C lookup table) included.
    freq = np.array([int(1.6**i) + 1 for i in range(60)], dtype=np.int64)
    table = huffman.build_table(freq)
    assert table.max_length > 16
    zero_word = int(table.symbols[0])
    for s in table.symbols.tolist():
        for symbols in ([s], [s, *[zero_word] * 40], [zero_word] * 3 + [s]):
            data, _, _ = huffman.encode_stream(np.array(symbols), 60, table)
            np.testing.assert_array_equal(huffman.decode_stream(data, len(symbols), 60, "t"), symbols)
