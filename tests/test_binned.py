"""Binned streams (spec section 8, format 1.3): the spec's example, round trips, every reader check, and the
writer's choice among Huffman, rANS and binned.

Tests using the ``rans_coder`` fixture (conftest.py) run twice: with the C extension (rANS and the raw bits in C)
and with the numpy / Python reference paths; differential tests check that the two give the same bytes, symbols
and errors.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dcformat import binned, codec, huffman, rans
from dcformat.constants import BINNED_MAX_MANTISSA, Coding, StreamKind
from dcformat.errors import CorruptError, InputError, TruncatedError

from rans_coders import NATIVE, both


# spec section 8, "Example": alphabet 0..7, k = 0, center 3, bins at scale 2 with frequency 1 each.
SPEC_SYMBOLS = [3, 4, 1, 7]
SPEC_BYTES = bytes.fromhex("00 00 03 12 00 00 00" "02 00 00 05 01 01 00 02 01 01 08 00 10 00 0d 00 10 00" "00")


def _spec_plan() -> binned.BinnedPlan:
    model = rans.RansModel(2, 0, np.array([1, 1, 0, 0, 1, 1], dtype=np.uint32))
    return binned.BinnedPlan(0, 3, model, 0)


@pytest.mark.usefixtures("rans_coder")
def test_spec_example():
    assert binned.bin_alphabet(8, 0) == 7
    assert binned.encode_stream(np.array(SPEC_SYMBOLS), 8, _spec_plan()) == SPEC_BYTES
    assert binned.decode_stream(SPEC_BYTES, 4, 8, "t").tolist() == SPEC_SYMBOLS


@pytest.mark.parametrize("k", range(BINNED_MAX_MANTISSA + 1))
def test_every_magnitude_decodes_from_its_bin_and_raw_bits(k):
    # Exhaustive over the 16-bit magnitudes: the spec's decoding formula inverts the bin and the raw bits.
    a = np.arange(1 << 16, dtype=np.int64)
    m, t = binned.magnitude_bins(a, k)
    assert np.array_equal(t, np.maximum(np.floor(np.log2(np.maximum(a, 1))).astype(np.int64) - k, 0))
    t_back = np.maximum((m >> k) - 1, 0)
    top = m - (t_back << k)
    low = a & ((1 << t) - 1)
    assert np.array_equal(t_back, t)
    assert np.array_equal((top << t) | low, a)
    assert np.all(np.diff(m) >= 0) and m.max() == (binned.bin_alphabet(1 << 16, k) - 1) // 2


@st.composite
def streams(draw):
    alphabet = draw(st.sampled_from([1, 2, 5, 256, 257, 3000, 1 << 16]))
    n = draw(st.integers(0, 400))
    center = draw(st.integers(0, alphabet - 1))
    spread = draw(st.floats(0.0, alphabet))
    seed = draw(st.integers(0, 2**32 - 1))
    v = np.random.default_rng(seed).laplace(center, spread / 4 + 1e-9, n)
    return np.clip(np.rint(v), 0, alphabet - 1).astype(np.uint16), alphabet


@given(streams(), st.integers(0, BINNED_MAX_MANTISSA), st.booleans())
@settings(max_examples=300, deadline=None)
def test_round_trip_at_any_mantissa_and_center(stream, k, at_edge):
    symbols, alphabet = stream
    center = (alphabet - 1 if at_edge else 0) if symbols.size == 0 else int(symbols[0])
    bins, _, _ = binned._bins_of(symbols.astype(np.int64) - center, k)
    n_bins = binned.bin_alphabet(alphabet, k)
    model = rans.build_model(np.bincount(bins, minlength=n_bins), n_bins)[0] if symbols.size else \
        rans.build_model(np.array([1]), 1)[0]
    plan = binned.BinnedPlan(k, center, model, 0)
    datas = both(lambda: bytes(binned.encode_stream(symbols, alphabet, plan)))
    assert all(d == datas[0] for d in datas), "coders give different bytes"
    for out in both(lambda: binned.decode_stream(datas[0], symbols.size, alphabet, "t")):
        assert np.array_equal(out, symbols)


@given(streams())
@settings(max_examples=200, deadline=None)
def test_planned_stream_round_trips_and_its_estimate_is_close(stream):
    symbols, alphabet = stream
    plan = binned.plan(huffman.histogram(symbols, alphabet), alphabet)
    assert (plan is None) == (symbols.size == 0)
    data = binned.encode_stream(symbols, alphabet, plan)
    assert np.array_equal(binned.decode_stream(data, symbols.size, alphabet, "t"), symbols)
    if plan is not None:
        assert abs(plan.size - len(data)) <= rans.ESTIMATE_SLACK


@given(st.sampled_from([256, 3000, 1 << 16]), st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1),
       st.integers(0, 1 << 12))
@settings(max_examples=200, deadline=None)
def test_plan_skips_only_widths_that_cannot_win(alphabet, n, spread, seed, slack):
    # The plan rejects a (center, width) from its bins' entropy before sizing every rANS precision; that must not
    # change the plan: it is the one found by sizing every try in full, and None when that is not under the bound.
    # (Streams of thousands of symbols over wide alphabets: there the widths' sizes come within bytes of each other.)
    rng = np.random.default_rng(seed)
    v = rng.laplace(rng.integers(0, alphabet), spread * alphabet / 4 + 1e-9, n)
    freq = huffman.histogram(np.clip(np.rint(v), 0, alphabet - 1).astype(np.uint16), alphabet)
    present = np.flatnonzero(freq)
    counts = freq[present]
    centers = {int(present[np.argmax(counts)]),
               int(present[np.searchsorted(np.cumsum(counts), (int(counts.sum()) + 1) // 2)])}
    full = []
    for center in sorted(centers):
        for k in range(BINNED_MAX_MANTISSA + 1):
            b, t, _ = binned._bins_of(present - center, k)
            n_bins = binned.bin_alphabet(alphabet, k)
            model, size = rans.build_model(np.bincount(b, weights=counts, minlength=n_bins).astype(np.int64), n_bins)
            full.append((binned._header_bytes(alphabet) + size + -(-int(np.dot(counts, t)) // 8), center, k))
    size, center, k = min(full, key=lambda f: f[0])  # min keeps the first of equals, as the plan does
    bound = size + slack - (1 << 11)  # above and below the best size
    got = binned.plan(freq, alphabet, bound=bound)
    if size >= bound:
        assert got is None
    else:
        assert (got.size, got.center, got.k) == (size, center, k)


def test_chunks_give_the_same_bytes(monkeypatch):
    monkeypatch.setattr(rans, "_native", None)  # chunks are the numpy path's; C packs in one pass
    rng = np.random.default_rng(5)
    symbols = np.clip(np.rint(rng.laplace(30000, 3000, 5000)), 0, 65535).astype(np.uint16)
    whole = binned.encode_stream(symbols, 1 << 16)
    monkeypatch.setattr(binned, "CHUNK", 7)  # chunk edges fall inside bytes of the raw bits
    assert binned.encode_stream(symbols, 1 << 16) == whole
    assert np.array_equal(binned.decode_stream(whole, symbols.size, 1 << 16, "t"), symbols)


def test_wide_alphabet_costs_near_its_source_entropy_where_tables_of_every_level_do_not():
    # 20k draws from a normal of sigma 3000 levels: most levels occur a few times, and listing them all costs.
    # (The empirical entropy of so few draws is below what any coder reaches; the normal's own entropy is not.)
    rng = np.random.default_rng(0)
    sigma, n = 3000.0, 20_000
    symbols = np.clip(np.rint(rng.normal(32768, sigma, n)), 0, 65535).astype(np.uint16)
    freq = huffman.histogram(symbols, 1 << 16)
    plan = binned.plan(freq, 1 << 16)
    huff = huffman.encoded_size(freq, huffman.build_table(freq), 1 << 16)
    ranssize = rans.build_model(freq, 1 << 16)[1]
    source_entropy = n * np.log2(sigma * np.sqrt(2 * np.pi * np.e)) / 8
    assert plan.size < 0.9 * min(huff, ranssize)
    assert plan.size < 1.02 * source_entropy
    assert binned.plan(freq, 1 << 16, bound=plan.size) is None  # not smaller than the bound: not planned


@pytest.mark.usefixtures("rans_coder")
def test_encoder_refuses_symbols_outside_the_alphabet_or_table():
    with pytest.raises(InputError, match="integers in 0..7"):
        binned.encode_stream(np.array([8]), 8)
    with pytest.raises(InputError, match="has no frequency in the rANS table"):  # bin 2 (offset -1) is absent
        binned.encode_stream(np.array([2]), 8, _spec_plan())
    with pytest.raises(InputError, match="does not fit an alphabet of 8"):
        binned.encode_stream(np.array([3]), 8, _spec_plan()._replace(center=8))


# --- hostile streams: one per reader check, matched on the message ----------------------------------------


def _patched(offset: int, new: bytes, base: bytes = SPEC_BYTES) -> bytes:
    b = bytearray(base)
    b[offset:offset + len(new)] = new
    return bytes(b)


HOSTILE = [
    # (name, stream, count, error, message)
    ("header truncated", SPEC_BYTES[:6], 4, TruncatedError, "shorter than its 7-byte header"),
    ("reserved byte", _patched(1, b"\x01"), 4, CorruptError, "reserved byte is 1, must be 0"),
    ("mantissa bits above the limit", _patched(0, b"\x05"), 4, CorruptError, "has 5 mantissa bits, at most 4"),
    ("center outside the alphabet", _patched(2, b"\x08"), 4, CorruptError, "center 8 is outside the alphabet of 8"),
    ("bins past the end", _patched(3, b"\x14"), 4, TruncatedError, "bins need 20 bytes, 19 remain"),
    ("bins stream corrupt", _patched(7, b"\x03"), 4, CorruptError, "(bins): rANS frequencies sum to 4"),
    ("raw bits missing", SPEC_BYTES[:-1], 4, TruncatedError, "raw bits need 1 bytes, 0 remain"),
    ("bytes left over", SPEC_BYTES + b"\x00", 4, CorruptError, "1 bytes left over after its raw bits"),
    ("padding bits set", _patched(25, b"\x01"), 4, CorruptError, "padding bits are not zero"),
    ("symbol past the alphabet's end", _patched(25, b"\x20"), 4, CorruptError,
     "symbol 3 decodes to 8, outside the alphabet of 8"),
]


@pytest.mark.parametrize("name,data,count,error,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_stream(name, data, count, error, message):
    results = both(lambda: binned.decode_stream(data, count, 8, "tensor 'w' codes"))
    assert len(set(results)) == 1, f"coders disagree: {results}"
    kind, text = results[0]
    assert kind is error, text
    assert message in text and text.startswith("tensor 'w' codes")


@pytest.mark.usefixtures("rans_coder")
def test_truncated_at_every_byte():
    rng = np.random.default_rng(3)
    symbols = np.clip(np.rint(rng.laplace(500, 60, 300)), 0, 999).astype(np.uint16)
    data = binned.encode_stream(symbols, 1000)
    assert len(data) > 100
    for cut in range(len(data)):
        with pytest.raises(TruncatedError):
            binned.decode_stream(data[:cut], symbols.size, 1000, "t")


@given(st.binary(max_size=48), st.integers(0, 40), st.sampled_from([1, 8, 300, 1 << 16]))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_decode_or_raise_a_format_error(data, count, alphabet):
    results = both(lambda: binned.decode_stream(data, count, alphabet, "t"))
    if isinstance(results[0], np.ndarray):
        assert all(isinstance(r, np.ndarray) and np.array_equal(r, results[0]) for r in results)
        assert results[0].shape == (count,) and (count == 0 or int(results[0].max()) < alphabet)
    else:
        assert len(set(results)) == 1, results


# --- the writer's choice and the file level -------------------------------------------------------------


def test_writer_picks_binned_for_a_fine_grid_and_rebuilds_it_exactly(tmp_path):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 300)) * np.geomspace(0.01, 10, 64)[:, None]).astype(np.float32)
    s = codec.CompressSettings(quantizer="uniform", rel_error=1e-4)  # one step for channels 1000x apart
    enc = codec.encode_tensor(codec.TensorInput("w", w, s))
    codes = enc.entry.stream(StreamKind.CODES)
    assert codes.coding == Coding.BINNED and enc.entry.codebook_size > 10_000
    symbols = binned.decode_stream(enc.payloads[1], enc.entry.nnz, enc.entry.codebook_size, "t")
    sym = codec._Symbols.of(symbols, enc.entry.codebook_size)  # the same symbols in the other codings are larger
    assert codes.length < sym.huffman_size and (sym.rans_model is None or codes.length < sym.rans_model[1])
    codec.write_dcz(tmp_path / "m.dcz", [codec.TensorInput("w", w, s)])
    got = codec.read_dcz(tmp_path / "m.dcz").tensors["w"]
    assert np.array_equal(got, enc.reference)


def test_writer_keeps_huffman_or_rans_for_narrow_alphabets():
    rng = np.random.default_rng(2)
    for p0 in (0.3, 0.9):
        symbols = np.where(rng.random(5000) < p0, 0, rng.integers(1, 16, 5000)).astype(np.uint16)
        entry, payload = codec._coded_stream(StreamKind.CODES, codec._Symbols.of(symbols, 16))
        assert entry.coding in (Coding.HUFFMAN, Coding.RANS)


def test_native_raw_bit_coders_stay_inside_their_buffers():
    if NATIVE is None:
        pytest.skip("no extension")
    widths, values = np.array([0, 3, 16], np.uint8), np.array([0, 5, 0xFFFF], np.uint16)
    out = np.zeros(1, np.uint8)
    # Symbol 3 is past the tables, and the 16-bit field after 3 bits does not fit one byte: both stop early.
    assert NATIVE.pack_bits(np.array([1, 3], np.uint16), widths, values, out) == 3 and out[0] == 0b10100000
    assert NATIVE.pack_bits(np.array([1, 2], np.uint16), widths, values, out) == 3
    bins = np.array([1, 1, 9], np.uint16)
    done, bits = NATIVE.unpack_binned(bins, widths, np.array([0, 1, 1], np.uint16), np.zeros(3, np.uint8), 0, 100,
                                      np.array([0b10100000], np.uint8))
    assert (done, bits) == (2, 6) and bins[:2].tolist() == [0b1101, 0b1000]  # bin 9 is past the tables
    done, bits = NATIVE.unpack_binned(np.array([1], np.uint16), widths, np.array([0, 1, 1], np.uint16),
                                      np.zeros(3, np.uint8), 0, 100, np.zeros(0, np.uint8))
    assert (done, bits) == (0, 0)  # its 3 raw bits are not in the buffer
    with pytest.raises(TypeError):
        NATIVE.pack_bits(np.array([1], np.int32), widths, values, out)
