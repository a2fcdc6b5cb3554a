"""Stage 6, the other coder: static rANS coding of symbol streams (codes and relative-index gaps).

A rANS stream is a frequency table quantized to a power-of-two total (the symbols ``first..last`` with one
varint frequency each, 0 for an absent symbol), the two final states of the encoder, and the 16-bit words
it pushed, in the order the decoder reads them (spec section "rANS streams"). Unlike Huffman, a symbol can
cost a fraction of a bit, which is what peaked code distributions (mostly-zero grid levels) need.

Encoding and decoding run in C when the optional extension ``dcformat._ranscode`` is built; otherwise (or
with ``DCZ_PURE_PYTHON=1``) the reference coders below run a Python loop per symbol: the one place in dcz
where that is allowed, because it is only the fallback and the spec's executable reference. Both give the
same bytes, symbols and errors: every check and message is made here, in Python, around either coder. The
writer's work (quantizing a histogram, choosing the precision, sizing the stream) is per distinct symbol
and vectorized.
"""

from __future__ import annotations

import math
import os
import struct
from typing import NamedTuple

import numpy as np

from .constants import RANS_MAX_SCALE, RANS_MAX_VARINT_BYTES, RANS_MIN_SCALE, RANS_STATE_LOW, RANS_STATES
from .errors import CorruptError, InputError, TruncatedError
from .huffman import histogram

try:
    from . import _ranscode as _native
except ImportError:  # built without a C compiler: the Python reference coder does the work
    _native = None
if os.environ.get("DCZ_PURE_PYTHON", "") not in ("", "0"):
    _native = None

__all__ = [
    "RansModel",
    "build_model",
    "quantize_frequencies",
    "table_nbytes",
    "min_stream_bytes",
    "estimated_size",
    "encode_stream",
    "decode_stream",
    "native_coder",
]

#: Bytes of the table header: u8 scale, u8 reserved.
_TABLE_HEADER = struct.Struct("<BB")
#: Alphabets up to this size store the first and last symbol in one byte each, larger ones in two (as Huffman).
_BYTE_SYMBOL_ALPHABET = 256
#: rANS's own coding loss at scale 16, in bits per symbol; it halves with each step down the scale (the
#: 2^16 state floor leaves less room above the frequencies). Measured: 0.0024 at 2^16, 0.0007 at 2^15 and
#: 0.0003 at 2^14 for frequencies 3/4, 1/4 (exact, so no quantization loss); 0.0047 at 2^16 for a
#: 32-level normal. The writer adds it to its estimate, so it picks 2^15..2^16 only when precision pays.
PRECISION_LOSS_AT_16 = 0.005
#: The two final states, u32 little-endian each.
_STATES = struct.Struct(f"<{RANS_STATES}I")
#: The writer's size estimate adds this many bytes to table + ceil(estimated bits / 8): the states' 16-bit
#: floors and their unused top bits, and the rounding of the last word. Measured on 400 random streams
#: (2..20000 symbols, alphabets 4..65536), twice: the coded size is the estimate -5..+2 bytes, mostly -1..+1.
ESTIMATE_SLACK = 2 * RANS_STATES + 1
#: Bytes any rANS stream takes beyond its table and ceil(entropy / 8): the two 32-bit states hold at most
#: 2 x 16 bits of the message above their floors, so 8 - 4. Lets the writer skip streams rANS cannot win.
_MIN_OVERHEAD = _STATES.size - 2 * RANS_STATES


class RansModel(NamedTuple):
    """A quantized frequency table: symbol ``first + k`` has frequency ``freqs[k]`` out of ``2**scale``.

    ``freqs[0]`` and ``freqs[-1]`` are at least 1 (the range is as short as possible); zeros inside it are
    symbols that do not occur.
    """

    scale: int
    first: int
    freqs: np.ndarray  # uint32

    @property
    def last(self) -> int:
        return self.first + len(self.freqs) - 1


def native_coder() -> bool:
    """Whether streams are coded by the C extension (False: the Python reference coder)."""
    return _native is not None


def _symbol_width(alphabet_size: int) -> int:
    return 1 if alphabet_size <= _BYTE_SYMBOL_ALPHABET else 2


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value as an unsigned LEB128 varint (values < 2**21)."""
    v = np.asarray(values, dtype=np.int64)
    return 1 + (v >= 1 << 7).astype(np.int64) + (v >= 1 << 14).astype(np.int64)


def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value (< 2**21): 7 bits per byte, low group first, high bit = more follows."""
    v = np.asarray(values, dtype=np.int64)
    n = _varint_lengths(v)
    groups = np.stack([v & 0x7F, (v >> 7) & 0x7F, v >> 14], axis=1)
    groups |= (np.arange(3)[None, :] < (n[:, None] - 1)) * 0x80  # continuation bit on all but the last byte
    keep = np.arange(3)[None, :] < n[:, None]
    return groups[keep].astype(np.uint8).tobytes()


def min_stream_bytes(alphabet_size: int) -> int:
    """Bytes of the shortest valid stream: table header, symbol range, one 1-byte frequency, the states."""
    return _TABLE_HEADER.size + 2 * _symbol_width(alphabet_size) + 1 + _STATES.size


def _runs(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of absent symbols between the ascending ``present`` ones: (index in present they precede, length)."""
    gaps = np.diff(np.asarray(present, dtype=np.int64)) - 1
    at = np.flatnonzero(gaps > 0)
    return at + 1, gaps[at]


def _runs_nbytes(present: np.ndarray) -> int:
    """Table bytes of the runs of absent symbols: a 0 marker and a varint length each."""
    _, lengths = _runs(present)
    return int(lengths.size + _varint_lengths(lengths).sum())


def table_nbytes(model: RansModel, alphabet_size: int) -> int:
    """Bytes the serialized table takes in a stream."""
    present = np.flatnonzero(model.freqs)
    return (_TABLE_HEADER.size + 2 * _symbol_width(alphabet_size) + _runs_nbytes(present)
            + int(_varint_lengths(model.freqs[present]).sum()))


def quantize_frequencies(counts: np.ndarray, scale: int) -> np.ndarray:
    """Frequencies >= 1 summing to ``2**scale`` for positive symbol ``counts`` (``len(counts) <= 2**scale``).

    Proportional shares rounded down (at least 1), then the remaining units one each to the symbols whose
    code length they shorten most (``count * log2((q + 1) / q)``, ties to the lower index). When the
    floor of 1 leaves too little for the others, their shares are rescaled until everything fits.
    """
    f = np.asarray(counts, dtype=np.int64)
    total = 1 << scale
    if f.size == 0 or f.size > total or f.min() < 1:
        raise InputError(f"cannot give {f.size} symbols frequencies >= 1 out of 2^{scale}")
    q = np.maximum(1, (f * total) // int(f.sum()))
    while int(q.sum()) > total:  # symbols lifted to 1 overdraw: share what is left among the others
        big = q > 1
        budget = total - int(np.count_nonzero(~big))
        q[big] = np.maximum(1, (f[big] * budget) // int(f[big].sum()))
    rest = total - int(q.sum())  # < number of symbols: each share lost less than one unit
    if rest:
        gain = f * np.log2((q + 1) / q)
        q[np.argsort(-gain, kind="stable")[:rest]] += 1
    return q


def _cost_bits(counts: np.ndarray, q: np.ndarray, scale: int) -> float:
    """Cross-entropy of the counts under the frequencies, plus rANS's own loss at this scale."""
    c = np.asarray(counts, dtype=np.float64)  # np.dot of int64 with float64 takes a slow non-BLAS path
    return float(np.dot(c, scale - np.log2(q))) + float(c.sum()) * PRECISION_LOSS_AT_16 * 2.0 ** (scale - RANS_MAX_SCALE)


def estimated_size(counts: np.ndarray, q: np.ndarray, scale: int, table_bytes: int) -> int:
    """Bytes of the whole stream for present-symbol ``counts`` coded with frequencies ``q``, without coding it.

    The coded size is within a few bytes of it (see ``ESTIMATE_SLACK``).
    """
    return table_bytes + math.ceil(_cost_bits(counts, q, scale) / 8) + ESTIMATE_SLACK


def build_model(freq: np.ndarray, alphabet_size: int, bound: int | None = None) -> tuple[RansModel, int] | None:
    """The table (and its estimated stream size) for a histogram of symbol counts (index = symbol).

    Tries every precision from the smallest that holds all present symbols up to ``RANS_MAX_SCALE`` and
    keeps the one with the smallest estimated stream. With ``bound`` (the bytes of the alternative coding),
    returns None at once when even the entropy bound plus the smallest table cannot beat it.
    """
    freq = np.asarray(freq, dtype=np.int64)
    present = np.flatnonzero(freq)
    width = _symbol_width(alphabet_size)
    if present.size <= 1:  # empty or one symbol: the states alone code it; it never beats Huffman's 0 bits
        sym = int(present[0]) if present.size else 0
        model = RansModel(RANS_MIN_SCALE, sym, np.array([1 << RANS_MIN_SCALE], dtype=np.uint32))
        size = table_nbytes(model, alphabet_size) + _STATES.size
        return None if bound is not None and size >= bound else (model, size)
    counts = freq[present]
    first, last = int(present[0]), int(present[-1])
    fixed = _TABLE_HEADER.size + 2 * width + _runs_nbytes(present)
    if bound is not None:
        c = counts.astype(np.float64)
        entropy = float(np.dot(c, np.log2(c.sum() / c)))
        if fixed + present.size + math.ceil(entropy / 8) + _MIN_OVERHEAD >= bound:
            return None
    lowest = max(RANS_MIN_SCALE, (present.size - 1).bit_length())
    best = None
    for scale in range(lowest, RANS_MAX_SCALE + 1):
        q = quantize_frequencies(counts, scale)
        size = estimated_size(counts, q, scale, fixed + int(_varint_lengths(q).sum()))
        if best is None or size < best[0]:
            best = (size, scale, q)
    size, scale, q = best
    freqs = np.zeros(last - first + 1, dtype=np.uint32)
    freqs[present - first] = q
    return RansModel(scale, first, freqs), size


def _table_bytes(model: RansModel, alphabet_size: int) -> bytes:
    fmt = "<B" if _symbol_width(alphabet_size) == 1 else "<H"
    present = np.flatnonzero(model.freqs)
    at, lengths = _runs(present)
    # Tokens in symbol order: each present symbol's frequency, each run as (0, length) before the symbol after it.
    values = np.concatenate((model.freqs[present].astype(np.int64), np.zeros(at.size, np.int64), lengths))
    keys = np.concatenate((3 * np.arange(present.size), 3 * at - 2, 3 * at - 1))
    return b"".join((
        _TABLE_HEADER.pack(model.scale, 0),
        struct.pack(fmt, model.first),
        struct.pack(fmt, model.last),
        _varints(values[np.argsort(keys, kind="stable")]),
    ))


def encode_stream(symbols: np.ndarray, alphabet_size: int, model: RansModel | None = None,
                  lut: np.ndarray | None = None, room: tuple[int, int] | None = None) -> bytes | bytearray:
    """rANS-code a 1-D array of symbols in ``[0, alphabet_size)``; returns the whole stream (table included).

    ``model`` may be given when the caller built it from the symbols' histogram; every symbol must have a
    nonzero frequency in it (InputError naming the first that does not). With ``lut`` (one symbol per input
    value), the stream codes ``lut[v]`` for each value v of ``symbols``, without a mapped copy of them. With
    ``room`` = (before, after), returns a bytearray with that many zero bytes around the stream, for the caller
    to fill in place (binned streams do both: no copy of their largest part is ever made).
    """
    symbols = np.asarray(symbols).reshape(-1)
    if lut is not None:
        lut = np.ascontiguousarray(lut, dtype=np.uint16)
        if symbols.size:
            _check_mapped(symbols, lut)
    if model is None:
        if lut is not None:
            raise InputError("a rANS stream coded through a lookup table needs its model")
        model = build_model(histogram(symbols, alphabet_size), alphabet_size)[0]
    if model.last >= alphabet_size or model.first < 0:
        raise InputError(f"rANS table symbols {model.first}..{model.last} are outside the alphabet of {alphabet_size}")
    freqs = np.ascontiguousarray(model.freqs, dtype=np.uint32)
    if symbols.size:
        _check_symbols(symbols if lut is None else lut[np.flatnonzero(histogram(symbols, lut.size))],
                       alphabet_size, model, mapped=lut is not None)
    values = np.ascontiguousarray(symbols, dtype=np.uint16)
    table = _table_bytes(model, alphabet_size)
    if room is not None:
        before, after = room
        if _native is None:
            body = _encode_python(values if lut is None else lut[values], model.scale, model.first, freqs)
            return bytearray(before) + table + body + bytearray(after)
        out = _native.encode(values, model.scale, model.first, freqs, lut, before + len(table), after)
        out[before:before + len(table)] = table
        return out
    if _native is not None:
        body = _native.encode(values, model.scale, model.first, freqs, lut)
    else:
        body = _encode_python(values if lut is None else lut[values], model.scale, model.first, freqs)
    return table + body


def _check_mapped(values: np.ndarray, lut: np.ndarray) -> None:
    """InputError naming the first value that is not an integer index into ``lut``."""
    if values.dtype.kind not in "iu":
        raise InputError(f"rANS symbols must be integers, not {values.dtype}")
    if int(values.min()) < 0 or int(values.max()) >= lut.size:
        i = int(np.argmax((values < 0) | (values >= lut.size)))
        raise InputError(f"value {int(values[i])} at index {i} is outside the lookup table of {lut.size}")


def _check_symbols(symbols: np.ndarray, alphabet_size: int, model: RansModel, mapped: bool = False) -> None:
    """InputError naming the first symbol that is outside the alphabet or has no frequency in ``model``.
    With ``mapped`` (a lookup-coded stream), ``symbols`` are the distinct mapped symbols, and the one without a
    frequency is named by value only."""
    if symbols.dtype.kind not in "iu":
        raise InputError(f"rANS symbols must be integers, not {symbols.dtype}")
    lo, hi = int(symbols.min()), int(symbols.max())
    if lo < 0 or hi >= alphabet_size:
        i = int(np.argmax((symbols < 0) | (symbols >= alphabet_size)))
        raise InputError(f"symbol {int(symbols[i])} at index {i} is outside the alphabet of {alphabet_size}")
    full = np.zeros(alphabet_size, dtype=np.int64)
    full[model.first:model.last + 1] = model.freqs
    missing = np.flatnonzero((histogram(symbols, alphabet_size) > 0) & (full == 0))
    if missing.size:
        if not mapped:
            i = int(np.argmax(np.isin(symbols, missing)))
            raise InputError(f"symbol {int(symbols[i])} at index {i} has no frequency in the rANS table")
        raise InputError(f"symbol {int(missing[0])} (a mapped value) has no frequency in the rANS table")


def _encode_python(symbols: np.ndarray, scale: int, first: int, freqs: np.ndarray) -> bytes:
    """Reference encoder (fallback only: a Python loop per symbol, about 1-2 M symbols/s)."""
    f = freqs.astype(np.int64).tolist()
    cum = (np.cumsum(freqs, dtype=np.int64) - freqs).tolist()
    x = [RANS_STATE_LOW] * RANS_STATES
    words: list[int] = []
    s = symbols.tolist()
    for i in range(len(s) - 1, -1, -1):
        k = s[i] - first
        fk, j = f[k], i % RANS_STATES
        xi = x[j]
        if xi >= fk << (32 - scale):
            words.append(xi & 0xFFFF)
            xi >>= 16
        x[j] = ((xi // fk) << scale) + xi % fk + cum[k]
    words.reverse()
    return _STATES.pack(*x) + np.array(words, dtype="<u2").tobytes()


def _parse_table(buf: memoryview, alphabet_size: int, what: str) -> tuple[RansModel, int]:
    """Read and validate a table at the start of ``buf``; returns (model, bytes used)."""
    if len(buf) < _TABLE_HEADER.size:
        raise TruncatedError(f"{what}: rANS stream of {len(buf)} bytes is shorter than its 2-byte table header")
    scale, reserved = _TABLE_HEADER.unpack_from(buf, 0)
    if reserved != 0:
        raise CorruptError(f"{what}: rANS table reserved byte is {reserved}, must be 0")
    if not RANS_MIN_SCALE <= scale <= RANS_MAX_SCALE:
        raise CorruptError(f"{what}: rANS scale {scale} is outside {RANS_MIN_SCALE}..{RANS_MAX_SCALE}")
    width = _symbol_width(alphabet_size)
    pos = _TABLE_HEADER.size
    if len(buf) < pos + 2 * width:
        raise TruncatedError(f"{what}: rANS symbol range needs {2 * width} bytes, {len(buf) - pos} remain")
    first, last = struct.unpack_from("<BB" if width == 1 else "<HH", buf, pos)
    pos += 2 * width
    if last >= alphabet_size:
        raise CorruptError(f"{what}: rANS table symbol {last} is outside the alphabet of {alphabet_size}")
    if first > last:
        raise CorruptError(f"{what}: rANS table range {first}..{last} does not ascend")
    span = last - first + 1
    # Each symbol takes at most 3 table bytes (a frequency varint, or its share of a marker and run length);
    # one more byte lets a table that stops at a marker still show its next varint is too long, not truncated.
    limit = RANS_MAX_VARINT_BYTES * span + 1
    window = np.frombuffer(buf, dtype=np.uint8, count=min(len(buf) - pos, limit), offset=pos)
    ends = np.flatnonzero(window < 0x80)  # the last byte of each varint (past the table: whatever follows)
    starts = np.concatenate(([0], ends + 1))[:ends.size].astype(np.int64)
    lengths = ends - starts + 1
    w = window.astype(np.int64)
    values = w[starts] & 0x7F
    for t in range(1, RANS_MAX_VARINT_BYTES):  # the t-th byte of the varints that have one
        has = lengths > t
        values[has] |= (w[starts[has] + t] & 0x7F) << (7 * t)
    # Frequencies and run lengths are >= 1, so a 0 is always a marker and the varint after it a run length.
    marker = values == 0
    run = np.concatenate(([False], marker))[:marker.size]
    covers = np.where(marker, 0, np.where(run, values, 1))
    covered = np.cumsum(covers)
    done = np.flatnonzero(covered >= span)
    n_tokens = int(done[0]) + 1 if done.size else ends.size  # varints that belong to the table
    bad = np.flatnonzero(((lengths > RANS_MAX_VARINT_BYTES) | ((lengths > 1) & (window[ends] == 0))
                          | (run & (values == 0)))[:n_tokens])
    if bad.size:
        k = int(bad[0])
        where = f"{what}: rANS table varint {k}"
        if lengths[k] > RANS_MAX_VARINT_BYTES:
            raise CorruptError(f"{where} is longer than {RANS_MAX_VARINT_BYTES} bytes")
        if lengths[k] > 1 and window[ends[k]] == 0:
            raise CorruptError(f"{where} is not minimal (ends in a zero byte)")
        raise CorruptError(f"{where} is a run of 0 absent symbols")
    if not done.size:
        nxt = int(ends[-1]) + 1 if ends.size else 0
        if window.size - nxt >= RANS_MAX_VARINT_BYTES:
            raise CorruptError(f"{what}: rANS table varint {ends.size} is longer than {RANS_MAX_VARINT_BYTES} bytes")
        raise TruncatedError(
            f"{what}: rANS table ends after {int(covered[-1]) if covered.size else 0} of its {span} symbols"
        )
    last_token = n_tokens - 1
    if covered[last_token] > span:
        raise CorruptError(f"{what}: rANS table run of absent symbols goes past the last symbol {last}")
    if marker[0] or run[last_token]:
        raise CorruptError(f"{what}: rANS table range {first}..{last} starts or ends with an absent symbol")
    freq_tokens = np.flatnonzero(~marker[:n_tokens] & ~run[:n_tokens])
    freqs = np.zeros(span, dtype=np.int64)
    freqs[covered[freq_tokens] - 1] = values[freq_tokens]
    pos += int(ends[last_token]) + 1
    total = int(freqs.sum())
    if total != 1 << scale:
        raise CorruptError(f"{what}: rANS frequencies sum to {total}, the scale says 2^{scale} = {1 << scale}")
    return RansModel(scale, first, freqs.astype(np.uint32)), pos


def decode_stream(buf: bytes | memoryview, count: int, alphabet_size: int, what: str) -> np.ndarray:
    """Decode exactly ``count`` symbols from a rANS stream; the stream must be consumed exactly.

    Raises CorruptError / TruncatedError naming ``what`` for a bad table or states, a stream that ends
    early, bytes left over, or final states other than the initial value.
    """
    buf = memoryview(buf)
    model, pos = _parse_table(buf, alphabet_size, what)
    if len(buf) < pos + _STATES.size:
        raise TruncatedError(f"{what}: rANS states need {_STATES.size} bytes, {len(buf) - pos} remain")
    states = _STATES.unpack_from(buf, pos)
    for j, x in enumerate(states):
        if x < RANS_STATE_LOW:
            raise CorruptError(f"{what}: rANS state {j} is {x}, below the lower bound {RANS_STATE_LOW}")
    words = buf[pos + _STATES.size:]
    out = np.empty(count, dtype=np.uint16)
    if _native is not None:
        decoded, used, *final = _native.decode(words, model.scale, model.first, model.freqs, *states, out)
    else:
        decoded, used, *final = _decode_python(words, model, states, out)
    if decoded < count:
        raise TruncatedError(
            f"{what}: rANS stream ends after {decoded} of its {count} symbols ({len(words) // 2} words)"
        )
    if 2 * used != len(words):
        raise CorruptError(
            f"{what}: rANS stream has {len(words) - 2 * used} bytes left over after its {count} symbols"
        )
    if any(x != RANS_STATE_LOW for x in final):
        raise CorruptError(
            f"{what}: rANS final states are {', '.join(map(str, final))}, not the initial {RANS_STATE_LOW}"
        )
    return out


def _decode_python(
    words_buf: memoryview, model: RansModel, states: tuple[int, ...], out: np.ndarray
) -> tuple[int, ...]:
    """Reference decoder (fallback only: a Python loop per symbol, about 1-2 M symbols/s).

    Returns (symbols decoded before a word was needed past the end, words used, final states...).
    """
    scale, mask = model.scale, (1 << model.scale) - 1
    f = model.freqs.astype(np.int64)
    slot_symbol = np.repeat(np.arange(f.size), f).tolist()  # slot -> index k of its symbol
    cum = (np.cumsum(f) - f).tolist()
    f = f.tolist()
    words = np.frombuffer(words_buf, dtype="<u2", count=len(words_buf) // 2).tolist()
    x = list(states)
    n_words, used, first = len(words), 0, model.first
    count = out.size
    result = [0] * count
    i = 0
    while i < count:
        j = i % RANS_STATES
        xi = x[j]
        slot = xi & mask
        k = slot_symbol[slot]
        xi = f[k] * (xi >> scale) + slot - cum[k]
        if xi < RANS_STATE_LOW:
            if used == n_words:
                break
            xi = (xi << 16) | words[used]
            used += 1
        x[j] = xi
        result[i] = first + k
        i += 1
    out[:i] = result[:i]
    return (i, used, *x)
