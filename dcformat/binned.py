"""Stage 6, the third coder: binned streams for wide alphabets (spec section "Binned streams", format 1.3).

Fine grids with long tails have tens of thousands of levels, most of them used once or twice. Huffman and rANS
must list every level in their table, which costs more than coding the symbols themselves (PP-OCRv4 det: 181 kB
of tables on 1.6 MB of entropy). A binned stream codes each symbol as its offset ``v = symbol - center``: the
offset's *bin* (its sign and the leading ``k + 1`` bits of its magnitude: an exponent-mantissa class, as DEFLATE's
length codes or JPEG's magnitude categories) goes into a rANS stream over a few hundred bins at most, and the
magnitude's remaining low bits follow as raw bits. Within a bin the levels are taken as equally likely, which a
smooth distribution nearly is, and the table shrinks to the bins.

The writer's work (choosing ``k`` and the center, sizing the stream) is per distinct symbol and vectorized; the
per-symbol work is numpy gathers and one bincount per chunk, and the bins use rANS's C coder.
"""

from __future__ import annotations

import itertools
import math
import struct
from typing import NamedTuple

import numpy as np

from . import rans
from .constants import BINNED_MAX_MANTISSA
from .errors import CorruptError, InputError, TruncatedError
from .huffman import histogram

__all__ = ["BinnedPlan", "plan", "encode_stream", "decode_stream", "bin_alphabet", "min_stream_bytes"]

#: u8 mantissa bits k, u8 reserved; then the center (u8 or u16, as rANS's symbols) and the u32 bins length.
_HEADER = struct.Struct("<BB")
_BINS_LENGTH = struct.Struct("<I")
#: Symbols turned into bins and raw bits at a time: about ten int64 temporaries of 2 MiB each (a 32 MiB weight
#: peaked 81 MiB above its symbols at 2**20, 20 MiB at 2**18, at the same speed).
CHUNK = 1 << 18
#: Raw bits of one symbol at most: offsets are below 2**16, and a bin holds their top bit at least.
_MAX_EXTRA_BITS = 15
#: Bytes a raw-bit field may touch: 15 bits starting anywhere in a byte span at most 3 bytes.
_WORD_BYTES = 3


class BinnedPlan(NamedTuple):
    """How a stream will be coded: ``k`` mantissa bits, the ``center`` symbol, the bins' rANS table and the
    estimated bytes of the whole stream."""

    k: int
    center: int
    model: rans.RansModel
    size: int


def _header_bytes(alphabet_size: int) -> int:
    return _HEADER.size + rans._symbol_width(alphabet_size) + _BINS_LENGTH.size


def magnitude_bins(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(magnitude bin, raw bits) of each magnitude ``a`` >= 0: ``t = max(floor(log2 a) - k, 0)`` low bits are raw,
    and the bin is ``(t << k) + (a >> t)``, so bins 0 .. 2^(k+1) - 1 are the magnitudes themselves."""
    a = np.asarray(a, dtype=np.int64)
    e = np.frexp(np.maximum(a, 1).astype(np.float64))[1].astype(np.int64) - 1  # floor(log2 a), exact for ints
    t = np.maximum(e - k, 0)
    return (t << k) + (a >> t), t


def bin_alphabet(alphabet_size: int, k: int) -> int:
    """Bins of a stream over ``alphabet_size`` symbols: 0 (offset zero), then 2m - 1 (offset +a) and 2m (offset -a)
    for each magnitude bin m up to the bin of the largest offset, alphabet_size - 1."""
    top, _ = magnitude_bins(np.array([max(alphabet_size - 1, 0)]), k)
    return 2 * int(top[0]) + 1


def min_stream_bytes(alphabet_size: int) -> int:
    """Bytes of the shortest valid stream: its header and the smallest rANS stream of bins."""
    return _header_bytes(alphabet_size) + rans.min_stream_bytes(2)


def _bins_of(offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin, raw bit count, raw bits) of each signed offset."""
    v = np.asarray(offsets, dtype=np.int64)
    a = np.abs(v)
    m, t = magnitude_bins(a, k)
    b = np.where(v > 0, 2 * m - 1, 2 * m)  # v == 0: m == 0, bin 0
    return b, t, a & ((np.int64(1) << t) - 1)


def plan(freq: np.ndarray, alphabet_size: int, bound: int | None = None) -> BinnedPlan | None:
    """The smallest binned coding of a histogram of symbol counts (index = symbol), over every mantissa width
    0..BINNED_MAX_MANTISSA, centered on the most frequent or the median symbol. None when no symbol occurs, or when it is not
    smaller than ``bound`` (the bytes of the alternative coding)."""
    freq = np.asarray(freq, dtype=np.int64)
    present = np.flatnonzero(freq)
    if not present.size:
        return None
    counts = freq[present]
    mode = int(present[int(np.argmax(counts))])
    median = int(present[int(np.searchsorted(np.cumsum(counts), (int(counts.sum()) + 1) // 2))])
    best = None
    for center, k in itertools.product(sorted({mode, median}), range(BINNED_MAX_MANTISSA + 1)):
        b, t, _ = _bins_of(present - center, k)
        n_bins = bin_alphabet(alphabet_size, k)
        bin_counts = np.bincount(b, weights=counts, minlength=n_bins).astype(np.int64)
        rest = _header_bytes(alphabet_size) + math.ceil(float(np.dot(counts, t)) / 8)
        # The bins must beat both the alternative and the best plan so far: rANS rejects them from their entropy
        # alone when they cannot (most tries), before sizing every precision.
        beat = [x - rest for x in (bound, None if best is None else best.size) if x is not None]
        built = rans.build_model(bin_counts, n_bins, bound=min(beat) if beat else None)
        if built is None:
            continue
        model, bins_size = built
        size = rest + bins_size
        if best is None or size < best.size:
            best = BinnedPlan(k, center, model, size)
    if best is None or (bound is not None and best.size >= bound):
        return None
    return best


def _pack_bits(values: np.ndarray, widths: np.ndarray, start: int, out: np.ndarray) -> None:
    """Add each value's ``width`` low bits into ``out`` (bytes), most significant bit first, the first at bit
    ``start`` and each after the one before. The fields do not overlap, so adding bytes is OR."""
    ends = start + np.cumsum(widths)
    starts = ends - widths
    has = widths > 0
    starts, widths, values = starts[has], widths[has], values[has]
    if not starts.size:
        return
    word = values << (8 * _WORD_BYTES - (starts & 7) - widths)  # the field placed in a 24-bit big-endian word
    first = starts >> 3
    heads = np.flatnonzero(np.diff(first, prepend=-1))  # first ascends: one run of fields per starting byte
    words = np.add.reduceat(word, heads)
    at = first[heads]  # distinct, so each fancy-indexed add below touches a byte once
    for j in range(_WORD_BYTES):
        out[at + j] += ((words >> (8 * (_WORD_BYTES - 1 - j))) & 0xFF).astype(np.uint8)


def encode_stream(symbols: np.ndarray, alphabet_size: int, chosen: BinnedPlan | None = None) -> bytearray:
    """Code a 1-D array of symbols in ``[0, alphabet_size)`` as a binned stream; returns the whole stream.

    ``chosen`` may be given when the caller planned it from the symbols' histogram (every symbol's bin must then
    have a frequency in its table: InputError naming the first that does not)."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.dtype.kind not in "iu" or int(symbols.min()) < 0 or int(symbols.max()) >= alphabet_size):
        raise InputError(f"binned stream symbols must be integers in 0..{alphabet_size - 1}")
    if chosen is None:
        chosen = plan(histogram(symbols, alphabet_size), alphabet_size)
        if chosen is None:  # no symbols: any table of one bin codes the empty stream
            chosen = BinnedPlan(0, 0, rans.build_model(np.array([1]), 1)[0], 0)
    if not 0 <= chosen.center < alphabet_size or not 0 <= chosen.k <= BINNED_MAX_MANTISSA:
        raise InputError(f"binned plan k={chosen.k}, center={chosen.center} does not fit an alphabet of {alphabet_size}")
    # Per distinct symbol once, then per symbol by lookup.
    bins_lut, t_lut, raw_lut = _bins_of(np.arange(alphabet_size) - chosen.center, chosen.k)
    bins_lut = bins_lut.astype(np.uint16)
    total_bits = int(np.dot(histogram(symbols, alphabet_size), t_lut)) if symbols.size else 0
    # One buffer for the whole stream: rANS writes the bins into it with room for the header before and the raw
    # bits after, which are then filled in place (no copy of the stream is ever made; ddddocr's compress peak is
    # set by its largest stream).
    width = rans._symbol_width(alphabet_size)
    head = _header_bytes(alphabet_size)
    raw_bytes = (total_bits + 7) // 8
    out = rans.encode_stream(symbols, bin_alphabet(alphabet_size, chosen.k), chosen.model, lut=bins_lut,
                             room=(head, raw_bytes))
    raw_at = len(out) - raw_bytes
    out[:head] = b"".join((_HEADER.pack(chosen.k, 0), struct.pack("<B" if width == 1 else "<H", chosen.center),
                           _BINS_LENGTH.pack(raw_at - head)))
    if rans._native is not None:  # the C path of the loop below
        symbols = np.ascontiguousarray(symbols, dtype=np.uint16)
        done = rans._native.pack_bits(symbols, t_lut.astype(np.uint8), raw_lut.astype(np.uint16),
                                      np.frombuffer(out, dtype=np.uint8, offset=raw_at))
        assert done == total_bits, (done, total_bits)  # the tables cover the alphabet and out was sized by them
    else:
        extra = np.zeros((total_bits + 7) // 8 + _WORD_BYTES, dtype=np.uint8)  # room for the last 24-bit word
        at = 0
        for lo in range(0, symbols.size, CHUNK):
            s = symbols[lo:lo + CHUNK].astype(np.intp)
            t = t_lut[s]
            _pack_bits(raw_lut[s], t, at, extra)
            at += int(t.sum())
        out[raw_at:] = extra[:len(out) - raw_at].tobytes()
    return out


def decode_stream(buf: bytes | memoryview, count: int, alphabet_size: int, what: str) -> np.ndarray:
    """Decode exactly ``count`` symbols from a binned stream; the stream must be consumed exactly.

    Raises CorruptError / TruncatedError naming ``what`` for a bad header, a bad bins stream (the checks of rANS),
    a symbol outside the alphabet, raw bits that end early or leave bytes over, or nonzero padding bits."""
    buf = memoryview(buf)
    head = _header_bytes(alphabet_size)
    if len(buf) < head:
        raise TruncatedError(f"{what}: binned stream of {len(buf)} bytes is shorter than its {head}-byte header")
    k, reserved = _HEADER.unpack_from(buf, 0)
    if reserved != 0:
        raise CorruptError(f"{what}: binned stream reserved byte is {reserved}, must be 0")
    if k > BINNED_MAX_MANTISSA:
        raise CorruptError(f"{what}: binned stream has {k} mantissa bits, at most {BINNED_MAX_MANTISSA}")
    width = rans._symbol_width(alphabet_size)
    (center,) = struct.unpack_from("<B" if width == 1 else "<H", buf, _HEADER.size)
    if center >= alphabet_size:
        raise CorruptError(f"{what}: binned stream center {center} is outside the alphabet of {alphabet_size}")
    (bins_length,) = _BINS_LENGTH.unpack_from(buf, _HEADER.size + width)
    if bins_length > len(buf) - head:
        raise TruncatedError(f"{what}: binned stream's bins need {bins_length} bytes, {len(buf) - head} remain")
    n_bins = bin_alphabet(alphabet_size, k)
    bins = rans.decode_stream(buf[head:head + bins_length], count, n_bins, f"{what} (bins)")
    # Per bin once: its raw bit count, the magnitude's top bits, and the sign.
    b = np.arange(n_bins, dtype=np.int64)
    m = (b + 1) >> 1
    t_lut = np.maximum((m >> k) - 1, 0)
    top_lut = m - (t_lut << k)
    sign_lut = np.where((b & 1) == 1, 1, -1)
    extra = np.frombuffer(buf, dtype=np.uint8, offset=head + bins_length)
    total_bits = int(np.dot(histogram(bins, n_bins), t_lut)) if count else 0
    need = (total_bits + 7) // 8
    if extra.size < need:
        raise TruncatedError(f"{what}: binned stream's raw bits need {need} bytes, {extra.size} remain")
    if extra.size > need:
        raise CorruptError(f"{what}: binned stream has {extra.size - need} bytes left over after its raw bits")
    if total_bits % 8 and int(extra[-1]) & ((1 << (8 - total_bits % 8)) - 1):
        raise CorruptError(f"{what}: binned stream's padding bits are not zero")
    if rans._native is not None:  # the C path of the loop below
        done, at = rans._native.unpack_binned(bins, t_lut.astype(np.uint8), top_lut.astype(np.uint16),
                                              (sign_lut < 0).astype(np.uint8), center, alphabet_size, extra)
        if done < count:  # the raw bits were sized above, so only a symbol outside the alphabet stops it
            b_bad = int(bins[done])
            t_bad = int(t_lut[b_bad])
            field = extra[at // 8:(at + t_bad + 7) // 8].tobytes()  # the bytes holding its t_bad raw bits
            low = (int.from_bytes(field, "big") >> (8 * len(field) - at % 8 - t_bad)) & ((1 << t_bad) - 1)
            value = center + int(sign_lut[b_bad]) * ((int(top_lut[b_bad]) << t_bad) | low)
            raise CorruptError(
                f"{what}: binned stream symbol {done} decodes to {value}, outside the alphabet of {alphabet_size}"
            )
        return bins
    padded = np.concatenate((extra, np.zeros(_WORD_BYTES, dtype=np.uint8)))
    out = bins  # each chunk of bins is read before its symbols overwrite it
    at = 0
    for lo in range(0, count, CHUNK):
        bb = bins[lo:lo + CHUNK].astype(np.intp)
        t = t_lut[bb]
        ends = at + np.cumsum(t)
        starts = ends - t
        first = starts >> 3
        word = (padded[first].astype(np.int64) << 16) | (padded[first + 1].astype(np.int64) << 8) | padded[first + 2]
        low = (word >> (8 * _WORD_BYTES - (starts & 7) - t)) & ((np.int64(1) << t) - 1)
        sym = center + sign_lut[bb] * ((top_lut[bb] << t) | low)
        bad = np.flatnonzero((sym < 0) | (sym >= alphabet_size))
        if bad.size:
            i = int(bad[0])
            raise CorruptError(
                f"{what}: binned stream symbol {lo + i} decodes to {int(sym[i])}, outside the alphabet of {alphabet_size}"
            )
        out[lo:lo + bb.size] = sym
        at = int(ends[-1]) if bb.size else at
    return out
