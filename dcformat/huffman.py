"""Stage 6: canonical Huffman coding of symbol streams (codes and relative-index gaps).

A Huffman stream is a canonical table (count of codewords per length, then the
symbols in canonical order) followed by an MSB-first bitstream padded with zero
bits to a whole byte (spec section "Huffman streams"). Code lengths are capped at
:data:`~dcformat.constants.MAX_CODE_LENGTH`. Encoding and decoding run in C: the
table-driven coder of the optional extension ``dcformat._huffcode`` when it is built,
else bitarray's canonical coder (also forced by the environment variable
``DCZ_PURE_PYTHON=1``). Both give the same bytes, symbols and errors; table work is
per distinct symbol, never per symbol occurrence.
"""

from __future__ import annotations

import collections
import itertools
import os
import struct
from typing import NamedTuple

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

from .constants import MAX_CODE_LENGTH
from .errors import CorruptError, TruncatedError

try:
    from . import _huffcode as _native
except ImportError:  # built without a C compiler: the bitarray coder does the work
    _native = None
if os.environ.get("DCZ_PURE_PYTHON", "") not in ("", "0"):
    _native = None

__all__ = [
    "HuffmanTable",
    "build_table",
    "encoded_size",
    "entropy_bits",
    "histogram",
    "encode_stream",
    "decode_stream",
    "table_nbytes",
    "native_coder",
]

#: Bytes of the table header: u8 max_length, u8 reserved.
_TABLE_HEADER = struct.Struct("<BB")
#: Alphabets up to this size store each table symbol in one byte, larger ones in two.
_BYTE_SYMBOL_ALPHABET = 256


class HuffmanTable(NamedTuple):
    """A canonical Huffman code.

    ``counts[l - 1]`` is the number of codewords of length ``l`` for ``l = 1..L``;
    ``symbols`` lists the coded symbols by increasing length and, within a length,
    increasing value. An empty ``counts`` with one symbol is the single-symbol code,
    whose codewords are zero bits long.
    """

    counts: tuple[int, ...]
    symbols: np.ndarray  # uint16, canonical order

    @property
    def max_length(self) -> int:
        return len(self.counts)

    def lengths(self, alphabet_size: int) -> np.ndarray:
        """Code length of each symbol of the alphabet (0 for symbols not in the code)."""
        out = np.zeros(alphabet_size, dtype=np.int64)
        if not self.counts:
            return out  # single-symbol code: zero-length codewords
        out[self.symbols.astype(np.int64)] = np.repeat(
            np.arange(1, len(self.counts) + 1, dtype=np.int64), self.counts
        )
        return out


def native_coder() -> bool:
    """Whether streams are coded by the C extension (False: the bitarray fallback)."""
    return _native is not None


def _symbol_width(alphabet_size: int) -> int:
    return 1 if alphabet_size <= _BYTE_SYMBOL_ALPHABET else 2


def table_nbytes(table: HuffmanTable, alphabet_size: int) -> int:
    """Bytes the serialized table takes in a stream."""
    return _TABLE_HEADER.size + 4 * len(table.counts) + _symbol_width(alphabet_size) * len(table.symbols)


def entropy_bits(freq: np.ndarray) -> float:
    """Empirical entropy of a symbol histogram in bits (n * H), the bound for any prefix code."""
    f = np.asarray(freq, dtype=np.float64)
    f = f[f > 0]
    if f.size <= 1:
        return 0.0
    n = f.sum()
    return float(np.sum(f * np.log2(n / f)))


def _lengths_from_freq(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths (0 for absent symbols), at most MAX_CODE_LENGTH long.

    When the optimal code would be too long, the histogram is flattened (halved,
    keeping every present symbol at least 1) until it fits; this only happens for
    extremely skewed histograms and costs a negligible fraction of a bit.
    """
    present = np.flatnonzero(freq)
    lengths = np.zeros(freq.shape[0], dtype=np.int64)
    if present.size == 1:
        return lengths  # single-symbol code: zero-length codewords
    f = freq[present].astype(np.int64)
    while True:
        lens = _huffman_lengths(f)
        if lens.max() <= MAX_CODE_LENGTH:
            lengths[present] = lens
            return lengths
        f = (f >> 1) | 1


def _huffman_lengths(f: np.ndarray) -> np.ndarray:
    """Optimal prefix-code lengths for counts ``f`` (two or more, all positive).

    Huffman's algorithm in its two-queue form: leaves sorted once by count, merged nodes come out in
    non-decreasing order, so each step takes the two smallest heads of the two queues. Node depths are
    then found for all nodes at once by pointer doubling. Ties go to the leaf, then the lower index,
    so the result is deterministic.
    """
    n = f.size
    order = np.argsort(f, kind="stable")
    leaf = f[order].tolist()
    inner: list[int] = []  # counts of merged nodes, ids n, n+1, ...
    merged = [0] * (2 * n - 2)  # the two children of each merged node
    i = j = 0
    for k in range(n - 1):
        total = 0
        for side in (0, 1):
            if j >= len(inner) or (i < n and leaf[i] <= inner[j]):
                total += leaf[i]
                merged[2 * k + side] = i
                i += 1
            else:
                total += inner[j]
                merged[2 * k + side] = n + j
                j += 1
        inner.append(total)
    root = 2 * n - 2
    parent = np.full(2 * n - 1, root, dtype=np.int64)
    parent[np.array(merged, dtype=np.int64)] = np.repeat(np.arange(n, 2 * n - 1, dtype=np.int64), 2)
    depth = (np.arange(2 * n - 1) != root).astype(np.int64)
    up = parent
    while np.any(up != root):  # depth(v) = hops to the root: sum along pointers, doubling each round
        depth = depth + np.where(up != root, depth[up], 0)
        up = up[up]
    out = np.empty(n, dtype=np.int64)
    out[order] = depth[:n]
    return out


def build_table(freq: np.ndarray) -> HuffmanTable:
    """The canonical Huffman table for a histogram of symbol counts (index = symbol)."""
    freq = np.asarray(freq, dtype=np.int64)
    present = np.flatnonzero(freq)
    if present.size == 0:
        return HuffmanTable((), np.zeros(0, dtype=np.uint16))
    lengths = _lengths_from_freq(freq)
    if present.size == 1:
        return HuffmanTable((), present.astype(np.uint16))
    lens = lengths[present]
    order = np.lexsort((present, lens))  # by length, then symbol value
    counts = np.bincount(lens, minlength=int(lens.max()) + 1)[1:]
    return HuffmanTable(tuple(int(c) for c in counts), present[order].astype(np.uint16))


def encoded_size(freq: np.ndarray, table: HuffmanTable, alphabet_size: int) -> int:
    """Bytes of the whole stream (table + padded bitstream) for this histogram, without encoding it."""
    freq = np.asarray(freq, dtype=np.int64)
    bits = int(np.dot(freq, table.lengths(freq.shape[0])))
    return table_nbytes(table, alphabet_size) + (bits + 7) // 8


def _codewords(table: HuffmanTable) -> dict[int, bitarray]:
    """Canonical codeword of each symbol: lengths ascending, the first codeword of a length all zeros."""
    out: dict[int, bitarray] = {}
    code = 0
    symbols = table.symbols.tolist()
    i = 0
    for length, count in enumerate(table.counts, start=1):
        for _ in range(count):
            word = bitarray(endian="big")
            word.frombytes(code.to_bytes(4, "big"))
            out[symbols[i]] = word[32 - length :]
            code += 1
            i += 1
        code <<= 1
    return out


#: Symbols counted per bincount call: its int64 copy is 2 MiB instead of 8 bytes per symbol of the stream (at 8 MiB,
#: the two histograms of a binned stream's encode raised ddddocr's compress peak by 6 MiB; no slower at 2 MiB).
HISTOGRAM_CHUNK = 1 << 18


def histogram(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """Count of each symbol of the alphabet in ``symbols``."""
    symbols = np.asarray(symbols)
    if not symbols.size:
        return np.zeros(alphabet_size, dtype=np.int64)
    flat = symbols.reshape(-1)
    counts = np.zeros(alphabet_size, dtype=np.int64)
    for start in range(0, flat.size, HISTOGRAM_CHUNK):  # bincount widens to int64: chunks bound that copy
        counts += np.bincount(flat[start:start + HISTOGRAM_CHUNK].astype(np.int64, copy=False), minlength=alphabet_size)
    return counts


def encode_stream(
    symbols: np.ndarray, alphabet_size: int, table: HuffmanTable | None = None
) -> tuple[bytes, HuffmanTable, int]:
    """Huffman-code a 1-D array of symbols in ``[0, alphabet_size)``.

    ``table`` may be given when the caller already built it from the symbols' histogram.
    Returns (stream bytes, table, number of bits in the bitstream before padding).
    """
    symbols = np.asarray(symbols)
    if table is None:
        table = build_table(histogram(symbols, alphabet_size))
    width = _symbol_width(alphabet_size)
    header = _TABLE_HEADER.pack(table.max_length, 0)
    counts = struct.pack(f"<{len(table.counts)}I", *table.counts)
    syms = table.symbols.astype("<u1" if width == 1 else "<u2").tobytes()
    if table.max_length == 0:
        return header + counts + syms, table, 0
    if _native is not None and symbols.dtype.kind in "iu":  # other dtypes: the bitarray coder's lookup rules
        values = np.ascontiguousarray(symbols, dtype=symbols.dtype.newbyteorder("="))
        payload, nbits = _native.encode(
            values, values.dtype.itemsize, values.dtype.kind == "i", table.counts,
            np.ascontiguousarray(table.symbols, dtype=np.uint16), alphabet_size,
        )
        return b"".join((header, counts, syms, payload)), table, nbits
    bits = bitarray(endian="big")
    bits.encode(_codewords(table), symbols.tolist())
    nbits = len(bits)
    return header + counts + syms + bits.tobytes(), table, nbits


def _parse_table(buf: memoryview, alphabet_size: int, count: int, what: str) -> tuple[HuffmanTable, int]:
    """Read and validate a table at the start of ``buf``; returns (table, bytes used).

    ``count`` is the number of symbols the stream must hold: a stream of zero symbols
    has max length 0 and lists no symbol.
    """
    if len(buf) < _TABLE_HEADER.size:
        raise TruncatedError(f"{what}: Huffman stream of {len(buf)} bytes is shorter than its 2-byte table header")
    max_length, reserved = _TABLE_HEADER.unpack_from(buf, 0)
    if reserved != 0:
        raise CorruptError(f"{what}: Huffman table reserved byte is {reserved}, must be 0")
    if max_length > MAX_CODE_LENGTH:
        raise CorruptError(f"{what}: Huffman max code length {max_length} exceeds the limit {MAX_CODE_LENGTH}")
    pos = _TABLE_HEADER.size
    if len(buf) < pos + 4 * max_length:
        raise TruncatedError(f"{what}: Huffman table counts need {4 * max_length} bytes, {len(buf) - pos} remain")
    counts = struct.unpack_from(f"<{max_length}I", buf, pos)
    pos += 4 * max_length
    if max_length == 0:
        n_symbols = 1 if count else 0
    else:
        if counts[-1] == 0:
            raise CorruptError(f"{what}: Huffman table declares max length {max_length} but has no code of that length")
        # Kraft sum in integers: a complete prefix code has sum(count_l * 2^(L-l)) == 2^L.
        kraft = sum(c << (max_length - l) for l, c in enumerate(counts, start=1))
        if kraft > 1 << max_length:
            raise CorruptError(f"{what}: Huffman table is over-subscribed (Kraft sum {kraft}/{1 << max_length} > 1)")
        if kraft < 1 << max_length:
            raise CorruptError(
                f"{what}: Huffman table is incomplete (Kraft sum {kraft}/{1 << max_length} < 1); "
                "a single-symbol stream must use max length 0"
            )
        n_symbols = sum(counts)
    if n_symbols > alphabet_size:
        raise CorruptError(f"{what}: Huffman table has {n_symbols} symbols, the alphabet only {alphabet_size}")
    width = _symbol_width(alphabet_size)
    if len(buf) < pos + width * n_symbols:
        raise TruncatedError(
            f"{what}: Huffman table symbols need {width * n_symbols} bytes, {len(buf) - pos} remain"
        )
    symbols = np.frombuffer(buf, dtype="<u1" if width == 1 else "<u2", count=n_symbols, offset=pos).astype(np.uint16)
    pos += width * n_symbols
    if symbols.size and int(symbols.max()) >= alphabet_size:
        raise CorruptError(
            f"{what}: Huffman table symbol {int(symbols.max())} is outside the alphabet of {alphabet_size}"
        )
    if np.unique(symbols).size != symbols.size:
        raise CorruptError(f"{what}: Huffman table lists a symbol twice")
    if max_length:
        starts = np.cumsum((0,) + counts[:-1])
        same_length = np.ones(symbols.size, dtype=bool)
        same_length[starts[np.asarray(counts) > 0]] = False  # first symbol of each length
        if np.any((np.diff(symbols.astype(np.int64)) <= 0) & same_length[1:]):
            raise CorruptError(f"{what}: Huffman table symbols are not in canonical (ascending) order within a length")
    return HuffmanTable(tuple(counts), symbols), pos


def decode_stream(buf: bytes | memoryview, count: int, alphabet_size: int, what: str) -> np.ndarray:
    """Decode exactly ``count`` symbols from a Huffman stream; the stream must be consumed exactly.

    Raises CorruptError / TruncatedError naming ``what`` for a bad table, a bitstream
    that ends early, trailing bytes, or nonzero padding bits.
    """
    buf = memoryview(buf)
    table, pos = _parse_table(buf, alphabet_size, count, what)
    payload = buf[pos:]
    if table.max_length == 0:
        if len(payload):
            raise CorruptError(f"{what}: single-symbol Huffman stream has {len(payload)} trailing bytes, expected 0")
        return np.full(count, table.symbols[0] if count else 0, dtype=np.uint16)
    min_length = next(l for l, c in enumerate(table.counts, start=1) if c)
    if count * min_length > 8 * len(payload):
        raise TruncatedError(
            f"{what}: {count} symbols need at least {count * min_length} bits, the bitstream has {8 * len(payload)}"
        )
    if _native is not None:
        out = np.empty(count, dtype=np.uint16)
        decoded, used = _native.decode(payload, table.counts, table.symbols, out)
    else:
        out, decoded, used = _decode_bitarray(payload, count, table, alphabet_size)
    if decoded < count:
        raise TruncatedError(
            f"{what}: bitstream ends before its {count} symbols ({decoded} whole codewords in {8 * len(payload)} bits)"
        )
    if (used + 7) // 8 != len(payload):
        raise CorruptError(
            f"{what}: bitstream has {len(payload)} bytes but its {count} symbols use {used} bits "
            f"({(used + 7) // 8} bytes)"
        )
    if used % 8 and payload[-1] & ((1 << (8 - used % 8)) - 1):
        raise CorruptError(f"{what}: padding bits after the last symbol are not zero")
    return out


def _decode_bitarray(
    payload: memoryview, count: int, table: HuffmanTable, alphabet_size: int
) -> tuple[np.ndarray, int, int]:
    """The fallback decoder: (symbols, how many decoded before the bitstream ran out, bits used)."""
    bits = bitarray(endian="big")
    bits.frombytes(payload)
    args = ([0, *table.counts], table.symbols.tolist())
    try:
        out = np.fromiter(canonical_decode(bits, *args), dtype=np.uint16, count=count)
    except ValueError:  # ran out mid-codeword, or after fewer than count codewords
        # Count the whole codewords for the message: the deque keeps the last (index, symbol) seen.
        last: collections.deque = collections.deque(maxlen=1)
        try:
            last.extend(enumerate(itertools.islice(canonical_decode(bits, *args), count)))
        except ValueError:
            pass
        return np.zeros(0, dtype=np.uint16), last[0][0] + 1 if last else 0, 0
    used = int(table.lengths(alphabet_size)[out].sum()) if count else 0
    return out, count, used
