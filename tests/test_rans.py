"""Static rANS streams (spec section 7): round trips, the spec's example, every reader check, and the writer's
choice between Huffman and rANS.

Tests using the ``rans_coder`` fixture (conftest.py) run twice, with the C extension coder and with the Python
reference coder; differential tests check that the two give the same bytes, symbols and errors.
"""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dcformat import codec, huffman, rans
from dcformat.constants import RANS_MAX_SCALE, RANS_STATE_LOW, Coding, DType, Layout, StreamKind
from dcformat.container import DczWriter, StreamEntry, TensorEntry, crc32, open_dcz
from dcformat.errors import CorruptError, InputError, TruncatedError

from rans_coders import NATIVE, both


FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def test_native_coder_is_built():
    # The editable install builds the extension; without it everything still works, only slower.
    assert NATIVE is not None


@st.composite
def symbol_streams(draw):
    alphabet = draw(st.sampled_from([1, 2, 3, 5, 16, 256, 257, 1000, 65536]))
    n = draw(st.integers(0, 3000))
    used = draw(st.integers(1, min(alphabet, 60)))
    pool = np.array(draw(st.lists(st.integers(0, alphabet - 1), min_size=used, max_size=used)))
    skew = draw(st.floats(0.0, 4.0))  # 0: flat over the pool; 4: almost all the first symbol
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    p = np.exp(-skew * np.arange(pool.size, dtype=float))
    return rng.choice(pool, size=n, p=p / p.sum()), alphabet


@given(symbol_streams())
@settings(max_examples=150, deadline=None)
def test_round_trip_and_coders_agree(case):
    symbols, alphabet = case
    encoded = both(lambda: rans.encode_stream(symbols, alphabet))
    assert len(set(encoded)) == 1, "C and Python coders wrote different bytes"
    data = encoded[0]
    for out in both(lambda: rans.decode_stream(data, symbols.size, alphabet, "t")):
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, symbols)


@given(symbol_streams(), st.integers(RANS_MAX_SCALE - 15, RANS_MAX_SCALE))
@settings(max_examples=60, deadline=None)
def test_round_trip_at_any_scale(case, scale):
    symbols, alphabet = case
    freq = huffman.histogram(symbols, alphabet)
    present = np.flatnonzero(freq)
    if present.size > 1 << scale:
        return  # this scale cannot give every present symbol a frequency
    if present.size == 0:
        present = np.array([0])
        freq = np.ones(alphabet, dtype=np.int64)[:1]
    q = rans.quantize_frequencies(freq[present], scale)
    freqs = np.zeros(present[-1] - present[0] + 1, dtype=np.uint32)
    freqs[present - present[0]] = q
    model = rans.RansModel(scale, int(present[0]), freqs)
    encoded = both(lambda: rans.encode_stream(symbols, alphabet, model))
    assert len(set(encoded)) == 1
    for out in both(lambda: rans.decode_stream(encoded[0], symbols.size, alphabet, "t")):
        np.testing.assert_array_equal(out, symbols)


@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=300), st.integers(1, RANS_MAX_SCALE))
@settings(max_examples=200, deadline=None)
def test_quantized_frequencies_are_a_valid_table(counts, scale):
    counts = np.array(counts, dtype=np.int64)
    if counts.size > 1 << scale:
        with pytest.raises(InputError, match="frequencies >= 1"):
            rans.quantize_frequencies(counts, scale)
        return
    q = rans.quantize_frequencies(counts, scale)
    assert q.sum() == 1 << scale and q.min() >= 1
    # Proportional to within the forced floor of 1 and the rounding: no symbol gets more than 1 + its share.
    assert np.all(q <= np.floor(counts * (1 << scale) / counts.sum()) + 1)


def test_long_stream_both_coders():
    rng = np.random.default_rng(5)
    symbols = np.clip(np.round(rng.normal(40, 6, 300_000)), 0, 99).astype(np.uint16)
    encoded = both(lambda: rans.encode_stream(symbols, 100))
    assert encoded[0] == encoded[-1]
    for out in both(lambda: rans.decode_stream(encoded[0], symbols.size, 100, "t")):
        np.testing.assert_array_equal(out, symbols)
    freq = huffman.histogram(symbols, 100)
    # Within 0.2% of the entropy bound plus the table.
    assert len(encoded[0]) < huffman.entropy_bits(freq) / 8 * 1.002 + rans.table_nbytes(rans.build_model(freq, 100)[0], 100) + 16


@pytest.mark.usefixtures("rans_coder")
def test_peaked_stream_costs_fractions_of_a_bit():
    # 90% zeros: Huffman spends at least 1 bit per symbol, rANS about the entropy (0.57 bits here).
    rng = np.random.default_rng(1)
    symbols = np.where(rng.random(100_000) < 0.9, 0, rng.integers(1, 8, 100_000)).astype(np.uint16)
    freq = huffman.histogram(symbols, 8)
    data = rans.encode_stream(symbols, 8)
    huff = huffman.encoded_size(freq, huffman.build_table(freq), 8)
    assert len(data) * 8 < huffman.entropy_bits(freq) * 1.003 + 200
    assert len(data) < 0.75 * huff


@pytest.mark.usefixtures("rans_coder")
def test_empty_and_one_symbol_streams():
    for symbols, alphabet in ((np.zeros(0, np.uint16), 4), (np.full(1000, 3, np.uint16), 4), (np.zeros(0, np.uint16), 1)):
        data = rans.encode_stream(symbols, alphabet)
        # Table, then both states at their initial value and no words.
        assert data[-8:] == struct.pack("<II", RANS_STATE_LOW, RANS_STATE_LOW)
        np.testing.assert_array_equal(rans.decode_stream(data, symbols.size, alphabet, "t"), symbols)


SPEC_SYMBOLS = [0, 1, 0, 0, 2, 0, 1, 0, 0, 0, 2, 1, 0, 0, 1, 0, 2, 0, 0, 1, 0, 0, 0, 2]
SPEC_BYTES = bytes.fromhex("02 00 00 02 02 01 01 00 00 02 00 02 00 01 00 20 2c 5b 0e")


@pytest.mark.usefixtures("rans_coder")
def test_spec_example():
    # spec section 7, "Example": scale 2, frequencies 2, 1, 1 for symbols 0, 1, 2.
    model = rans.RansModel(2, 0, np.array([2, 1, 1], dtype=np.uint32))
    assert rans.encode_stream(np.array(SPEC_SYMBOLS), 4, model) == SPEC_BYTES
    assert rans.decode_stream(SPEC_BYTES, len(SPEC_SYMBOLS), 4, "t").tolist() == SPEC_SYMBOLS


def test_table_is_compact():
    # A contiguous range costs one varint per symbol; frequencies below 128 take one byte.
    model = rans.RansModel(7, 10, np.array([100, 20, 8], dtype=np.uint32))
    assert rans.table_nbytes(model, 256) == 2 + 2 + 3
    assert rans.table_nbytes(model, 257) == 2 + 4 + 3
    model = rans.RansModel(14, 0, np.array([16000, 300, 84], dtype=np.uint32))
    assert rans.table_nbytes(model, 3) == 2 + 2 + 2 + 2 + 1


@pytest.mark.usefixtures("rans_coder")
def test_runs_of_absent_symbols_cost_a_marker_and_a_length():
    # Symbols 0, 5 and 300 of 1000: varints 60 | 0 4 | 2 | 0 294 | 2 (294 takes two bytes).
    freqs = np.zeros(301, dtype=np.uint32)
    freqs[[0, 5, 300]] = [60, 2, 2]
    model = rans.RansModel(6, 0, freqs)
    symbols = np.array([0, 5, 0, 300, 0], dtype=np.uint16)
    data = rans.encode_stream(symbols, 1000, model)
    # scale 6, reserved, first 0 (u16), last 300 (u16), then the varints; 294 = 0xA6 0x02 in LEB128.
    assert data[:14] == bytes([6, 0, 0, 0, 44, 1, 60, 0, 4, 2, 0, 0xA6, 0x02, 2])
    assert rans.table_nbytes(model, 1000) == 14
    np.testing.assert_array_equal(rans.decode_stream(data, 5, 1000, "t"), symbols)


def test_build_model_skips_streams_it_cannot_win():
    freq = np.array([500, 500, 0, 0], dtype=np.int64)  # one bit per symbol: Huffman's 2 + 12 + 125 bytes is optimal
    assert rans.build_model(freq, 4, bound=huffman.encoded_size(freq, huffman.build_table(freq), 4)) is None
    assert rans.build_model(freq, 4) is not None
    model, estimate = rans.build_model(np.array([900, 50, 50], dtype=np.int64), 3, bound=10**6)
    assert 2 <= model.scale <= RANS_MAX_SCALE
    symbols = np.repeat(np.arange(3), [900, 50, 50]).astype(np.uint16)
    assert abs(len(rans.encode_stream(symbols, 3, model)) - estimate) <= 5  # rans.ESTIMATE_SLACK


@pytest.mark.usefixtures("rans_coder")
def test_encoder_refuses_symbols_outside_the_table():
    model = rans.RansModel(2, 1, np.array([2, 0, 2], dtype=np.uint32))  # symbols 1 and 3; 2 absent
    with pytest.raises(InputError, match="symbol 2 at index 1 has no frequency"):
        rans.encode_stream(np.array([1, 2, 3]), 4, model)
    with pytest.raises(InputError, match="symbol 0 at index 2 has no frequency"):
        rans.encode_stream(np.array([1, 3, 0]), 4, model)
    with pytest.raises(InputError, match="symbol 4 at index 0 is outside the alphabet of 4"):
        rans.encode_stream(np.array([4]), 4, model)
    with pytest.raises(InputError, match="outside the alphabet of 3"):
        rans.encode_stream(np.array([1]), 3, model)


# --- hostile streams: one per reader check, matched on the message, the same from both coders ------------

# A valid stream to break: alphabet 4, scale 2, symbols 0..2 with frequencies 2, 1, 1 (the spec example).
STATES_AT = 7  # header 2 + range 2 + varints 3


def _patched(offset: int, new: bytes, base: bytes = SPEC_BYTES) -> bytes:
    b = bytearray(base)
    b[offset:offset + len(new)] = new
    return bytes(b)


def _table(scale: int, first: int, last: int, varints: bytes, reserved: int = 0) -> bytes:
    return bytes([scale, reserved, first, last]) + varints


STATES = struct.pack("<II", RANS_STATE_LOW, RANS_STATE_LOW)

HOSTILE = [
    # (name, stream, count, error, message)
    ("header truncated", b"\x02", 0, TruncatedError, "shorter than its 2-byte table header"),
    ("reserved byte", _patched(1, b"\x01"), 24, CorruptError, "reserved byte is 1, must be 0"),
    ("scale 0", _table(0, 0, 0, b"\x01") + STATES, 0, CorruptError, "scale 0 is outside 1..16"),
    ("scale 17", _table(17, 0, 0, b"\x80\x80\x08") + STATES, 0, CorruptError, "scale 17 is outside 1..16"),
    ("range truncated", b"\x02\x00\x00", 0, TruncatedError, "symbol range needs 2 bytes, 1 remain"),
    ("symbol outside alphabet", _patched(3, b"\x04"), 24, CorruptError, "symbol 4 is outside the alphabet of 4"),
    ("range descends", _table(1, 2, 1, b"\x01\x01") + STATES, 0, CorruptError, "range 2..1 does not ascend"),
    ("varint truncated", _table(2, 0, 2, b"\x02\x01"), 0, TruncatedError, "table ends after 2 of its 3 symbols"),
    ("varint cut mid-byte", _table(2, 0, 1, b"\x03\x81"), 0, TruncatedError, "table ends after 1 of its 2 symbols"),
    ("varint too long", _table(2, 0, 1, b"\x03\x81\x80\x80\x00") + STATES, 0, CorruptError,
     "table varint 1 is longer than 3 bytes"),
    ("varint not minimal", _table(2, 0, 1, b"\x83\x00\x01") + STATES, 0, CorruptError,
     "table varint 0 is not minimal"),
    ("first symbol absent", _table(2, 0, 2, b"\x00\x01\x02\x02") + STATES, 0, CorruptError,
     "range 0..2 starts or ends with an absent symbol"),
    ("last symbol absent", _table(2, 0, 2, b"\x02\x02\x00\x01") + STATES, 0, CorruptError,
     "range 0..2 starts or ends with an absent symbol"),
    ("run of zero symbols", _table(2, 0, 2, b"\x02\x00\x00\x02") + STATES, 0, CorruptError,
     "table varint 2 is a run of 0 absent symbols"),
    ("run past the last symbol", _table(2, 0, 2, b"\x02\x00\x05") + STATES, 0, CorruptError,
     "run of absent symbols goes past the last symbol 2"),
    ("marker then too-long run", _table(2, 0, 0, b"\x00\x80\x80\x80\x01") + STATES, 0, CorruptError,
     "table varint 1 is longer than 3 bytes"),
    ("sum too small", _patched(4, b"\x01"), 24, CorruptError, "frequencies sum to 3, the scale says 2^2 = 4"),
    ("sum too large", _table(2, 0, 1, b"\x04\x01") + STATES, 0, CorruptError, "frequencies sum to 5"),
    ("single frequency above 2^scale", _table(1, 0, 0, b"\x80\x80\x04") + STATES, 0, CorruptError,
     "frequencies sum to 65536, the scale says 2^1 = 2"),
    ("states truncated", SPEC_BYTES[:STATES_AT + 5], 24, TruncatedError, "states need 8 bytes, 5 remain"),
    ("state below floor", _patched(STATES_AT + 4, struct.pack("<I", RANS_STATE_LOW - 1)), 24, CorruptError,
     "state 1 is 65535, below the lower bound 65536"),
    ("words run out", SPEC_BYTES[:-2], 24, TruncatedError, "stream ends after 2 of its 24 symbols (1 words)"),
    ("count larger than coded", SPEC_BYTES, 40, TruncatedError, "of its 40 symbols"),
    ("odd byte left over", SPEC_BYTES + b"\x00", 24, CorruptError, "1 bytes left over after its 24 symbols"),
    ("word left over", SPEC_BYTES + b"\x00\x00", 24, CorruptError, "2 bytes left over after its 24 symbols"),
    ("final state wrong", _patched(STATES_AT, struct.pack("<I", 131073)), 24, CorruptError, "final states are"),
    ("count smaller than coded", SPEC_BYTES, 20, CorruptError, "final states are"),
    ("empty stream with a word", _table(1, 0, 0, b"\x02") + STATES + b"\x00\x00", 0, CorruptError,
     "2 bytes left over after its 0 symbols"),
]


@pytest.mark.parametrize("name,data,count,error,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_stream(name, data, count, error, message):
    results = both(lambda: rans.decode_stream(data, count, 4, "tensor 'w' codes"))
    assert len(set(results)) == 1, f"coders disagree: {results}"
    kind, text = results[0]
    assert kind is error, text
    assert message in text and text.startswith("tensor 'w' codes: rANS")


def test_final_state_message_names_both_states():
    data = _patched(STATES_AT, struct.pack("<I", 131073))
    with pytest.raises(CorruptError, match=r"final states are \d+, \d+, not the initial 65536"):
        rans.decode_stream(data, 24, 4, "t")


def test_truncated_at_every_byte():
    rng = np.random.default_rng(3)
    symbols = rng.choice(6, size=300, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).astype(np.uint16)
    data = rans.encode_stream(symbols, 6)
    assert len(data) > 60
    for cut in range(len(data)):
        results = both(lambda: rans.decode_stream(data[:cut], symbols.size, 6, "t"))
        assert len(set(results)) == 1, (cut, results)
        assert results[0][0] is TruncatedError, (cut, results[0])


@given(st.binary(max_size=40), st.integers(0, 50), st.sampled_from([1, 4, 300]))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_the_same_answer_from_both_coders(data, count, alphabet):
    results = both(lambda: rans.decode_stream(data, count, alphabet, "t"))
    if isinstance(results[0], np.ndarray):
        assert all(np.array_equal(r, results[0]) for r in results)
    else:
        assert len(set(results)) == 1, results


def test_native_module_checks_what_it_relies_on():
    if NATIVE is None:
        pytest.skip("no extension")
    out = np.empty(4, dtype=np.uint16)
    freqs = np.array([2, 1, 1], dtype=np.uint32)
    with pytest.raises(ValueError, match="sum to 5"):
        NATIVE.decode(b"", 2, 0, np.array([2, 2, 1], dtype=np.uint32), RANS_STATE_LOW, RANS_STATE_LOW, out)
    with pytest.raises(ValueError, match="scale 17"):
        NATIVE.decode(b"", 17, 0, freqs, RANS_STATE_LOW, RANS_STATE_LOW, out)
    with pytest.raises(ValueError, match="outside"):
        NATIVE.decode(b"", 2, 65534, freqs, RANS_STATE_LOW, RANS_STATE_LOW, out)
    with pytest.raises(ValueError, match="states"):
        NATIVE.decode(b"", 2, 0, freqs, 5, RANS_STATE_LOW, out)
    with pytest.raises(ValueError, match="index 1 is not in the table"):
        NATIVE.encode(np.array([0, 3], dtype=np.uint16), 2, 0, freqs)
    with pytest.raises(TypeError):
        NATIVE.encode(np.array([0, 1], dtype=np.int32), 2, 0, freqs)


# --- the writer's choice and the file level -------------------------------------------------------------


def test_writer_picks_rans_for_peaked_codes_and_huffman_where_it_is_optimal():
    rng = np.random.default_rng(0)
    peaked = (rng.standard_normal(20_000) * 0.02).astype(np.float32)
    enc = codec.encode_tensor(codec.TensorInput("w", peaked, codec.CompressSettings(quantizer="uniform", step=0.05)))
    codes = enc.entry.stream(StreamKind.CODES)
    assert codes.coding == Coding.RANS
    np.testing.assert_array_equal(codec.decode_tensor(enc.entry, list(enc.payloads)), enc.reference)
    # Two equally frequent levels: Huffman's one bit per symbol is the entropy, and rANS adds its states.
    dyadic = rng.permutation(np.repeat(np.array([0, 1], dtype=np.float32), [8000, 8000]))
    enc = codec.encode_tensor(codec.TensorInput("w", dyadic, codec.CompressSettings(quantizer="uniform", step=1.0)))
    assert enc.entry.stream(StreamKind.CODES).coding == Coding.HUFFMAN
    np.testing.assert_array_equal(codec.decode_tensor(enc.entry, list(enc.payloads)), dyadic)


def test_writer_stream_is_the_smaller_coding():
    rng = np.random.default_rng(2)
    for p0 in (0.3, 0.6, 0.9, 0.99):
        symbols = np.where(rng.random(5000) < p0, 0, rng.integers(1, 16, 5000)).astype(np.uint16)
        sym = codec._Symbols.of(symbols, 16)
        entry, payload = codec._coded_stream(StreamKind.CODES, sym)
        huff = len(huffman.encode_stream(symbols, 16)[0])
        assert len(payload) == min(huff, len(rans.encode_stream(symbols, 16, sym.rans_model[0])) if sym.rans_model else huff)
        assert (entry.coding == Coding.RANS) == (len(payload) < huff)
        assert abs(sym.size - len(payload)) <= 5


def test_sparse_tensor_with_rans_streams_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    w = np.where(rng.random(30_000) < 0.05, rng.standard_normal(30_000), 0).astype(np.float32)
    s = codec.CompressSettings(quantizer="uniform", step=0.5, layout="sparse", index_bits=8)
    codec.write_dcz(tmp_path / "m.dcz", [codec.TensorInput("w", w, s)])
    with open_dcz(tmp_path / "m.dcz") as f:
        (entry,) = f.tensors
        assert entry.layout == Layout.SPARSE
        codings = {st.kind: st.coding for st in entry.streams}
    assert Coding.RANS in codings.values()
    got = codec.read_dcz(tmp_path / "m.dcz").tensors["w"]
    assert np.count_nonzero(got) <= np.count_nonzero(w)
    assert np.max(np.abs(got - w)) <= 0.25 + 1e-6


@pytest.mark.parametrize("coding,length,message", [
    # rANS: header + range + one varint + states (2 + 2 + 1 + 8).
    (Coding.RANS, 12, "rANS CODES stream of 12 bytes is shorter than the 13 bytes"),
    # binned (spec 8): its header (2 + 1 + 4) and the smallest rANS stream of bins (13).
    (Coding.BINNED, 19, "binned CODES stream of 19 bytes is shorter than the 20 bytes"),
])
def test_reader_refuses_a_coded_stream_too_short_for_its_tables(tmp_path, coding, length, message):
    # Phase one, before any payload is read.
    payload = bytes(length)
    cb = np.array([0.0, 1.0], dtype=np.float32).tobytes()
    entry = TensorEntry(
        "w", DType.FLOAT32, Layout.DENSE, 0, (8,),
        (StreamEntry(StreamKind.CODEBOOK, Coding.PLAIN, len(cb), crc32(cb), 64),
         StreamEntry(StreamKind.CODES, coding, len(payload), crc32(payload), 0)),
        codebook_size=2, code_bits=1, nnz=8, zeros=8,
    )
    with DczWriter(tmp_path / "m.dcz") as w:
        w.add_tensor(entry, [cb, payload])
        w.finish(b"", {})
    with pytest.raises(CorruptError, match=message):
        open_dcz(tmp_path / "m.dcz")
