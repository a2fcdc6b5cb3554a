"""Annotated byte-by-byte dump of a .dcz file, as Markdown (how spec/example.md is made).

    python tools/dump_dcz.py FILE.dcz > dump.md

Walks the file the way spec/format.md describes it, field by field, with the bytes in
hex next to what they mean. Meant for small files: every byte is listed.
"""

from __future__ import annotations

import lzma
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcformat.constants import (  # noqa: E402
    HEADER_SIZE,
    NUMPY_DTYPES,
    SECTION_ENTRY_SIZE,
    Coding,
    DType,
    Layout,
    SectionKind,
    StreamKind,
    TensorKind,
)


class _Dump:
    def __init__(self, data: bytes, label: str = ""):
        self.data = data
        self.label = label  # offsets of a decompressed section are shown as "INDEX+n"
        self.rows: list[tuple[object, bytes, str, str]] = []

    def field(self, offset: int, size: int, name: str, value: str) -> None:
        where = f"{self.label}+{offset}" if self.label else offset
        self.rows.append((where, self.data[offset : offset + size], name, value))

    def fmt(self, offset: int, fmt: str, name: str, show=lambda v: str(v)) -> tuple:
        size = struct.calcsize("<" + fmt)
        vals = struct.unpack_from("<" + fmt, self.data, offset)
        self.field(offset, size, name, show(vals[0] if len(vals) == 1 else vals))
        return vals


def _enum(e, v) -> str:
    try:
        return f"{v} = {e(v).name}"
    except ValueError:
        return f"{v} (unknown)"


def annotate(data: bytes, title: str = "file") -> str:
    d = _Dump(data)
    d.field(0, 8, "magic", repr(data[:8]))
    d.fmt(8, "H", "version_major")
    d.fmt(10, "H", "version_minor")
    (count,) = d.fmt(12, "I", "section_count")
    d.fmt(16, "I", "flags")
    d.fmt(20, "I", "reserved")
    d.fmt(24, "I", "reserved")
    d.fmt(28, "I", "header_crc32", lambda v: f"0x{v:08x}")
    sections = {}
    flags_of = {}
    for i in range(count):
        o = HEADER_SIZE + i * SECTION_ENTRY_SIZE
        kind, flags, crc, off, length, _ = struct.unpack_from("<HHIQQQ", data, o)
        sections[kind] = (off, length)
        flags_of[kind] = flags
        d.fmt(o, "H", f"section[{i}].kind", lambda v: _enum(SectionKind, v))
        d.fmt(o + 2, "H", f"section[{i}].flags",
              lambda v: f"0x{v:04x}" + (" REQUIRED" if v & 1 else "") + (" XZ" if v & 2 else ""))
        d.fmt(o + 4, "I", f"section[{i}].crc32", lambda v: f"0x{v:08x}")
        d.fmt(o + 8, "Q", f"section[{i}].offset")
        d.fmt(o + 16, "Q", f"section[{i}].length")
        d.fmt(o + 24, "Q", f"section[{i}].reserved")

    subdumps: list[_Dump] = []

    def content(kind: SectionKind) -> tuple[_Dump, int, int]:
        """A dump over the section's content (decompressed if XZ), its start offset and its length."""
        off, length = sections[kind]
        if flags_of[kind] & 2:
            d.field(off, length, f"{kind.name} (xz stream)", f"{length} bytes; its content is listed as {kind.name}+n")
            sub = _Dump(lzma.decompress(data[off : off + length]), kind.name)
            subdumps.append(sub)
            return sub, 0, len(sub.data)
        return d, off, length

    # INDEX first (it says what DATA holds); rows are sorted by offset at the end.
    records = []
    main, (d, p, _) = d, content(SectionKind.INDEX)
    data = d.data
    (n,) = d.fmt(p, "I", "INDEX tensor_count")
    d.fmt(p + 4, "I", "INDEX reserved")
    p += 8
    for _ in range(n):
        (nl,) = d.fmt(p, "H", "name_length")
        name = data[p + 2 : p + 2 + nl].decode()
        d.field(p + 2, nl, "name", repr(name))
        p += 2 + nl
        d.fmt(p, "B", f"{name}: dtype", lambda v: _enum(DType, v))
        d.fmt(p + 1, "B", f"{name}: layout", lambda v: _enum(Layout, v))
        d.fmt(p + 2, "B", f"{name}: kind", lambda v: _enum(TensorKind, v))
        dtype, layout, _, ndim = struct.unpack_from("<BBBB", data, p)
        d.fmt(p + 3, "B", f"{name}: ndim")
        p += 4
        dims = struct.unpack_from(f"<{ndim}Q", data, p)
        for j in range(ndim):
            d.fmt(p + 8 * j, "Q", f"{name}: dims[{j}]")
        p += 8 * ndim
        quant = None
        if layout != Layout.RAW:
            quant = struct.unpack_from("<IBBHQQQ", data, p)
            for off, f, label in ((0, "I", "codebook_size"), (4, "B", "code_bits"), (5, "B", "index_bits"),
                                  (6, "H", "flags"), (8, "Q", "nnz"), (16, "Q", "position_entries"),
                                  (24, "Q", "zeros")):
                d.fmt(p + off, f, f"{name}: {label}")
            p += 32
        (ns,) = d.fmt(p, "B", f"{name}: stream_count")
        p += 1
        streams = []
        for j in range(ns):
            kind, coding, _, crc, length, ent = struct.unpack_from("<BBHIQQ", data, p)
            d.fmt(p, "B", f"{name}: stream[{j}].kind", lambda v: _enum(StreamKind, v))
            d.fmt(p + 1, "B", f"{name}: stream[{j}].coding", lambda v: _enum(Coding, v))
            d.fmt(p + 2, "H", f"{name}: stream[{j}].reserved")
            d.fmt(p + 4, "I", f"{name}: stream[{j}].crc32", lambda v: f"0x{v:08x}")
            d.fmt(p + 8, "Q", f"{name}: stream[{j}].length")
            d.fmt(p + 16, "Q", f"{name}: stream[{j}].entropy_bits")
            streams.append((kind, coding, length))
            p += 24
        records.append((name, DType(dtype), Layout(layout), dims, quant, streams))

    d, data = main, main.data
    p, _ = sections[SectionKind.DATA]
    for name, dtype, layout, dims, quant, streams in records:
        np_dtype = NUMPY_DTYPES[dtype]
        for kind, coding, length in streams:
            label = f"{name}: {StreamKind(kind).name}"
            if coding == Coding.GRID:
                (axis,) = d.fmt(p, "B", f"{label} axis", lambda v: "one scale" if v == 0xFF else f"axis {v}")
                (axis2,) = d.fmt(p + 1, "B", f"{label} second axis + 1", lambda v: "none" if v == 0 else f"axis {v - 1}")
                d.field(p + 2, 2, f"{label} reserved", "0")
                d.fmt(p + 4, "i", f"{label} q_min")
                n1 = 1 if axis == 0xFF else dims[axis]
                for j in range(8, length, 4):
                    k = (j - 8) // 4
                    d.fmt(p + j, "f", f"{label} scale[{k}]" if k < n1 else f"{label} scale2[{k - n1}]")
            elif coding == Coding.PLAIN:
                step = np_dtype.itemsize
                for j in range(0, length, step):
                    value = struct.unpack_from("<" + np_dtype.char, data, p + j)[0]
                    d.field(p + j, step, f"{label}[{j // step}]", repr(value))
            elif coding == Coding.RANS:
                alphabet = quant[0] if kind == StreamKind.CODES else 1 << quant[2]
                _annotate_rans(d, data, p, length, 1 if alphabet <= 256 else 2, label)
            elif coding == Coding.BINNED:
                alphabet = quant[0] if kind == StreamKind.CODES else 1 << quant[2]
                _annotate_binned(d, data, p, length, alphabet, label)
            else:
                alphabet = quant[0] if kind == StreamKind.CODES else 1 << quant[2]
                width = 1 if alphabet <= 256 else 2
                (L,) = d.fmt(p, "B", f"{label} max_length")
                d.fmt(p + 1, "B", f"{label} reserved")
                counts = struct.unpack_from(f"<{L}I", data, p + 2)
                for j in range(L):
                    d.fmt(p + 2 + 4 * j, "I", f"{label} count of length {j + 1}")
                q = p + 2 + 4 * L
                nsym = sum(counts) if L else (1 if length > 2 else 0)
                syms = [int.from_bytes(data[q + width * j : q + width * (j + 1)], "little") for j in range(nsym)]
                d.field(q, width * nsym, f"{label} symbols (canonical order)", str(syms))
                q += width * nsym
                bits = "".join(f"{b:08b}" for b in data[q : p + length])
                d.field(q, p + length - q, f"{label} bitstream", bits or "(empty)")
            p += length
    g, go, gl = content(SectionKind.GRAPH)
    g.field(go, gl, "GRAPH content", f"{gl} bytes" if gl else "(empty)")
    m, mo, ml = content(SectionKind.META)
    m.field(mo, ml, "META content", m.data[mo : mo + ml].decode())

    d.rows.sort(key=lambda r: r[0])
    out = [
        f"# Worked example: `{title}`",
        "",
        "Generated by `python tests/make_golden.py` with `tools/dump_dcz.py`; every byte of the file, in order.",
        "The source tensors are in `tests/data/tiny_source.npz`: `conv.w` (4x8 float32, four distinct values,",
        "2-bit codebook, DENSE), `fc.w` (64 float32, 58 zeros, 2-bit codebook, 3-bit relative indices, SPARSE) and",
        "`grid.w` (3x16 float32 on a per-row grid, GRID codebook, DENSE), `grid2.w` (3x16 float32 on a two-axis grid:",
        "a step per row times a step per column, format 1.2), `wide.w` (4x8 float32 on a grid of step 1/64 whose 32",
        "levels spread over -182..188, format 1.3) and",
        "`shape` (int64, RAW). Each CODES and POSITIONS stream is HUFFMAN, RANS or BINNED, whichever the writer found",
        "smaller.",
        "Multi-byte values are little-endian; Huffman bitstreams are shown MSB first, rANS words as u16 values.",
        "",
        f"File size: {len(data)} bytes.",
        "",
        "| offset | bytes | field | value |",
        "|---|---|---|---|",
    ]
    for off, raw, name, value in d.rows + [r for sub in subdumps for r in sub.rows]:
        hexs = raw.hex(" ") if len(raw) <= 16 else raw[:16].hex(" ") + f" … ({len(raw)} bytes)"
        out.append(f"| {off} | `{hexs}` | {name} | {value.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def _annotate_rans(d, data: bytes, p: int, length: int, width: int, label: str) -> None:
    """Rows of one rANS stream (spec section 7): header, symbol range, frequency varints, states, words."""
    (scale,) = d.fmt(p, "B", f"{label} scale", lambda v: f"{v} (frequencies sum to {1 << v})")
    d.fmt(p + 1, "B", f"{label} reserved")
    sym = "B" if width == 1 else "H"
    (first,) = d.fmt(p + 2, sym, f"{label} first symbol")
    (last,) = d.fmt(p + 2 + width, sym, f"{label} last symbol")
    q = p + 2 + 2 * width
    shown, symbol, marker = [], first, False
    while symbol <= last:  # unsigned LEB128 varints: a frequency, or 0 then the length of a run of absent symbols
        value, shift = 0, 0
        while True:
            byte = data[q]
            value |= (byte & 0x7F) << shift
            shift += 7
            q += 1
            if byte < 0x80:
                break
        if marker:
            shown.append(f"{symbol}..{symbol + value - 1}: absent")
            symbol += value
        elif value:
            shown.append(f"{symbol}: {value}")
            symbol += 1
        marker = not marker and value == 0
    d.field(p + 2 + 2 * width, q - (p + 2 + 2 * width), f"{label} frequencies (varints)", ", ".join(shown))
    d.fmt(q, "I", f"{label} state x0")
    d.fmt(q + 4, "I", f"{label} state x1")
    q += 8
    words = [int.from_bytes(data[j : j + 2], "little") for j in range(q, p + length - 1, 2)]
    d.field(q, p + length - q, f"{label} words (u16, decoder order)",
            " ".join(f"0x{w:04x}" for w in words) or "(none)")


def _annotate_binned(d, data: bytes, p: int, length: int, alphabet: int, label: str) -> None:
    """Rows of one binned stream (spec section 8): header, center, the bins' rANS stream, the raw bits."""
    from dcformat.binned import bin_alphabet

    (k,) = d.fmt(p, "B", f"{label} mantissa bits k")
    d.fmt(p + 1, "B", f"{label} reserved")
    width = 1 if alphabet <= 256 else 2
    d.fmt(p + 2, "B" if width == 1 else "H", f"{label} center symbol")
    (bins,) = d.fmt(p + 2 + width, "I", f"{label} bins length")
    q = p + 6 + width
    n_bins = bin_alphabet(alphabet, k)
    _annotate_rans(d, data, q, bins, 1 if n_bins <= 256 else 2, f"{label} bins (alphabet {n_bins}):")
    q += bins
    bits = "".join(f"{b:08b}" for b in data[q : p + length])
    d.field(q, p + length - q, f"{label} raw bits (MSB first)", bits or "(empty)")


def main() -> None:
    path = Path(sys.argv[1])
    print(annotate(path.read_bytes(), title=path.name))


if __name__ == "__main__":
    main()
