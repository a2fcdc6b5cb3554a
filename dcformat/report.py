"""Where every byte of a .dcz file went: per-tensor rows and totals, read from the index only."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .constants import Layout, SectionKind, StreamKind
from .container import DczFile, TensorEntry, open_dcz

__all__ = ["LayerRow", "Breakdown", "breakdown", "format_table", "format_paper_table", "to_json"]


@dataclass(frozen=True)
class LayerRow:
    """One tensor's share of the file."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    nonzeros: int
    sparsity: float
    bits: int  # nominal code bit width (0 for raw)
    codebook_size: int
    index_bits: int
    layout: str
    coding: str  # how the CODES stream (then, for SPARSE, the POSITIONS stream) is coded: huffman, rans, binned
    original_bytes: int
    codes_bytes: int
    positions_bytes: int
    codebook_bytes: int
    raw_bytes: int
    codes_entropy_bytes: float  # the entropy bound of the code stream
    positions_entropy_bytes: float
    stored_bytes: int
    codes_bits_per_nonzero: float
    positions_bits_per_nonzero: float
    ratio: float  # original / stored
    share: float  # of the whole file
    kept: float  # nonzeros / params: the paper's "weights% (P)" (1.0 for raw tensors)
    fixed_bytes: int  # the same codes and indices at their nominal widths, no Huffman (paper: "P+Q"), plus codebook
    rate: float  # stored / original: the paper's "compress rate (P+Q+H)"
    fixed_rate: float  # fixed_bytes / original: the paper's "compress rate (P+Q)"


@dataclass(frozen=True)
class Breakdown:
    """Per-tensor rows plus the totals and the non-tensor overhead of a file."""

    path: str
    file_bytes: int
    version: str
    rows: list[LayerRow]
    original_bytes: int  # all tensors as stored in the original (uncompressed) model
    tensor_bytes: int
    graph_bytes: int
    overhead_bytes: int  # header, section table, index, metadata
    metadata: dict[str, str]

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.tensor_bytes if self.tensor_bytes else float("inf")


def _row(t: TensorEntry, file_bytes: int) -> LayerRow:
    def stream_len(kind: StreamKind) -> int:
        s = t.stream(kind)
        return s.length if s else 0

    def entropy(kind: StreamKind) -> float:
        s = t.stream(kind)
        return s.entropy_bits / 8 if s else 0.0

    numel = t.numel
    nonzeros = numel - t.zeros if t.layout != Layout.RAW else numel
    stored = t.stored_bytes
    per_nz = max(nonzeros, 1)
    fixed = stored if t.layout == Layout.RAW else (
        stream_len(StreamKind.CODEBOOK) + _ceil_bytes(t.nnz * t.code_bits) + _ceil_bytes(t.position_entries * t.index_bits)
    )
    return LayerRow(
        name=t.name,
        kind=t.kind_name,
        shape=t.shape,
        dtype=t.dtype.name.lower(),
        params=numel,
        nonzeros=nonzeros,
        sparsity=(t.zeros / numel) if numel and t.layout != Layout.RAW else 0.0,
        bits=t.code_bits,
        codebook_size=t.codebook_size,
        index_bits=t.index_bits,
        layout=t.layout.name.lower(),
        coding="+".join(s.coding.name.lower() for s in t.streams if s.kind in (StreamKind.CODES, StreamKind.POSITIONS)),
        original_bytes=t.nbytes,
        codes_bytes=stream_len(StreamKind.CODES),
        positions_bytes=stream_len(StreamKind.POSITIONS),
        codebook_bytes=stream_len(StreamKind.CODEBOOK),
        raw_bytes=stream_len(StreamKind.RAW),
        codes_entropy_bytes=entropy(StreamKind.CODES),
        positions_entropy_bytes=entropy(StreamKind.POSITIONS),
        stored_bytes=stored,
        codes_bits_per_nonzero=8 * stream_len(StreamKind.CODES) / per_nz,
        positions_bits_per_nonzero=8 * stream_len(StreamKind.POSITIONS) / per_nz,
        ratio=t.nbytes / stored if stored else float("inf"),
        share=stored / file_bytes if file_bytes else 0.0,
        kept=nonzeros / numel if numel else 0.0,
        fixed_bytes=fixed,
        rate=stored / t.nbytes if t.nbytes else 0.0,
        fixed_rate=fixed / t.nbytes if t.nbytes else 0.0,
    )


def _coding_counts(rows: list[LayerRow]) -> list[tuple[str, int]]:
    """(coding, number of CODES and POSITIONS streams coded with it), in the spec's order."""
    names = [c for r in rows for c in r.coding.split("+") if c]
    return [(c, names.count(c)) for c in ("huffman", "rans", "binned") if c in names]


def _ceil_bytes(bits: int) -> int:
    return (bits + 7) // 8


def breakdown(source: str | os.PathLike | DczFile) -> Breakdown:
    """The size breakdown of a file; reads only its header, section table, index and metadata."""
    if isinstance(source, DczFile):
        return _breakdown(source)
    with open_dcz(source) as f:
        return _breakdown(f)


def _breakdown(f: DczFile) -> Breakdown:
    rows = [_row(t, f.file_size) for t in f.tensors]
    return Breakdown(
        path=f.path,
        file_bytes=f.file_size,
        version=f"{f.version[0]}.{f.version[1]}",
        rows=rows,
        original_bytes=sum(r.original_bytes for r in rows),
        tensor_bytes=sum(r.stored_bytes for r in rows),
        graph_bytes=f.sections[SectionKind.GRAPH].length,
        overhead_bytes=f.overhead_bytes,
        metadata=dict(f.metadata),
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


#: Short names of the stream codings for the table (the JSON keeps the full names).
_CODING_SHORT = {"huffman": "huf", "rans": "rans", "binned": "bin"}


def _codings(coding: str) -> str:
    return "/".join(_CODING_SHORT.get(c, c) for c in coding.split("+")) if coding else "-"


def _shorten(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def format_table(b: Breakdown, *, top: int | None = None, name_width: int = 36) -> str:
    """A human-readable table: one line per tensor (largest first if ``top`` is given), then totals."""
    rows = b.rows
    if top is not None and top < len(rows):
        rows = sorted(rows, key=lambda r: r.stored_bytes, reverse=True)[:top]
    head = (
        f"{'tensor':<{name_width}} {'kind':<9} {'shape':<16} {'params':>9} {'sparse':>6} {'bits':>4} {'layout':<6} "
        f"{'coding':<9} "
        f"{'codes':>9} {'(bound)':>9} {'pos':>8} {'(bound)':>8} {'cbook':>6} {'raw':>8} "
        f"{'b/nz':>5} {'pb/nz':>5} {'ratio':>6} {'share':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape)) or "scalar"
        coded = r.layout != "raw"
        lines.append(
            f"{_shorten(r.name, name_width):<{name_width}} {r.kind[:9]:<9} {shape[:16]:<16} {r.params:>9} "
            f"{r.sparsity:>6.1%} {r.bits if coded else '-':>4} {r.layout:<6} {_codings(r.coding):<9} "
            f"{_size(r.codes_bytes) if coded else '-':>9} {_size(r.codes_entropy_bytes) if coded else '-':>9} "
            f"{_size(r.positions_bytes) if r.positions_bytes else '-':>8} "
            f"{_size(r.positions_entropy_bytes) if r.positions_bytes else '-':>8} "
            f"{_size(r.codebook_bytes) if coded else '-':>6} {_size(r.raw_bytes) if r.raw_bytes else '-':>8} "
            f"{r.codes_bits_per_nonzero if coded else 0:>5.2f} {r.positions_bits_per_nonzero:>5.2f} "
            f"{r.ratio:>5.1f}x {r.share:>6.1%}"
        )
    if len(rows) < len(b.rows):
        lines.append(f"... {len(b.rows) - len(rows)} smaller tensors not shown (use --all)")
    lines.append("-" * len(head))
    all_rows = b.rows
    coded = [r for r in all_rows if r.layout != "raw"]
    bound = sum(r.codes_entropy_bytes + r.positions_entropy_bytes for r in coded)
    huff = sum(r.codes_bytes + r.positions_bytes for r in coded)
    lines += [
        f"tensors      {len(all_rows)} ({len(coded)} coded, {len(all_rows) - len(coded)} raw), "
        f"{sum(r.params for r in all_rows):,} parameters, {sum(r.nonzeros for r in all_rows):,} nonzero",
        f"weights      {_size(b.original_bytes)} -> {_size(b.tensor_bytes)}  ({b.ratio:.1f}x)",
        f"  codes+pos  {_size(huff)} coded vs {_size(bound)} entropy bound"
        + (f" (+{(huff / bound - 1):.1%})" if bound else "")
        + (f"; streams: {', '.join(f'{n} {c}' for c, n in _coding_counts(coded))}" if coded else ""),
        f"  codebooks  {_size(sum(r.codebook_bytes for r in coded))}    raw tensors {_size(sum(r.raw_bytes for r in all_rows))}",
        f"graph        {_size(b.graph_bytes)}",
        f"overhead     {_size(b.overhead_bytes)} (header, index, metadata) = {b.overhead_bytes / b.file_bytes:.2%} of the file",
        f"file         {_size(b.file_bytes)}  (format {b.version})",
    ]
    original = b.metadata.get("dcz.original_bytes")
    if original and original.isdigit() and int(original):
        lines.append(f"original     {_size(int(original))} model file -> {int(original) / b.file_bytes:.1f}x smaller")
    return "\n".join(lines)


def format_paper_table(b: Breakdown, *, include_raw: bool = False, name_width: int = 24) -> str:
    """Deep Compression's per-layer columns (Han et al. 2016, Tables 2-5), one line per coded tensor in file order.

    Columns: weights; weights% kept (P); weight bits (P+Q), the nominal code width; weight bits (P+Q+H), stored
    code-stream bits per kept weight; index bits (P+Q), the relative-index width; index bits (P+Q+H), stored
    position-stream bits per kept weight; compress rate (P+Q) at the nominal widths and (P+Q+H) as stored, both
    stored / original and both counting the codebook. Stored stream bits include each stream's Huffman table.
    Raw tensors are summed in one line unless ``include_raw``.
    """
    head = (
        f"{'layer':<{name_width}} {'weights':>10} {'kept':>6} {'w bits':>6} {'(+H)':>6} {'idx bits':>8} {'(+H)':>6} "
        f"{'rate P+Q':>9} {'P+Q+H':>8}"
    )
    lines = [head, "-" * len(head)]
    coded = [r for r in b.rows if r.layout != "raw"]
    raw = [r for r in b.rows if r.layout == "raw"]
    for r in b.rows if include_raw else coded:
        if r.layout == "raw":
            lines.append(f"{_shorten(r.name, name_width):<{name_width}} {r.params:>10,} {r.kept:>6.1%} "
                         f"{'raw':>6} {'-':>6} {'-':>8} {'-':>6} {r.fixed_rate:>9.2%} {r.rate:>8.2%}")
            continue
        sparse = r.layout == "sparse"
        lines.append(
            f"{_shorten(r.name, name_width):<{name_width}} {r.params:>10,} {r.kept:>6.1%} {r.bits:>6} "
            f"{r.codes_bits_per_nonzero:>6.2f} {r.index_bits if sparse else '-':>8} "
            f"{f'{r.positions_bits_per_nonzero:.2f}' if sparse else '-':>6} {r.fixed_rate:>9.2%} {r.rate:>8.2%}"
        )
    lines.append("-" * len(head))
    if coded:
        params = sum(r.params for r in coded)
        orig = sum(r.original_bytes for r in coded)
        fixed = sum(r.fixed_bytes for r in coded)
        stored = sum(r.stored_bytes for r in coded)
        lines.append(
            f"{'total (coded)':<{name_width}} {params:>10,} {sum(r.nonzeros for r in coded) / params:>6.1%} "
            f"{'':>6} {'':>6} {'':>8} {'':>6} {fixed / orig:>9.2%} {stored / orig:>8.2%}  "
            f"({orig / stored:.1f}x: {_size(orig)} -> {_size(stored)})"
        )
    if raw and not include_raw:
        lines.append(f"{'raw tensors':<{name_width}} {sum(r.params for r in raw):>10,}  "
                     f"{len(raw)} stored as is: {_size(sum(r.stored_bytes for r in raw))}")
    lines += [
        f"{'all tensors':<{name_width}} {_size(b.original_bytes)} -> {_size(b.tensor_bytes)} ({b.ratio:.1f}x)",
        (f"{'file':<{name_width}} {b.file_bytes:,} B = tensors {b.tensor_bytes:,} + graph {b.graph_bytes:,} "
         f"+ header/index/metadata {b.overhead_bytes:,}"),
    ]
    original = b.metadata.get("dcz.original_bytes")
    if original and original.isdigit() and int(original):
        lines.append(f"{'original model file':<{name_width}} {int(original):,} B -> {int(original) / b.file_bytes:.1f}x smaller")
    lines.append("bits (+H) are stored stream bits per kept weight, Huffman table included; rates are stored / original "
                 "bytes, codebook included")
    return "\n".join(lines)


def to_json(b: Breakdown) -> str:
    """The breakdown as JSON (all sizes in bytes)."""
    doc = {
        "path": b.path,
        "file_bytes": b.file_bytes,
        "format_version": b.version,
        "original_tensor_bytes": b.original_bytes,
        "tensor_bytes": b.tensor_bytes,
        "graph_bytes": b.graph_bytes,
        "overhead_bytes": b.overhead_bytes,
        "weights_ratio": b.ratio,
        "metadata": b.metadata,
        "tensors": [asdict(r) for r in b.rows],
    }
    return json.dumps(doc, indent=2, default=lambda x: list(x) if isinstance(x, tuple) else str(x))
