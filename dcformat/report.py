"""Where every byte of a .dcz file went: per-tensor rows and totals, read from the index only."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .constants import Layout, SectionKind, StreamKind
from .container import DczFile, TensorEntry, open_dcz

__all__ = ["LayerRow", "Breakdown", "breakdown", "format_table", "to_json"]


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
    )


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


def _shorten(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def format_table(b: Breakdown, *, top: int | None = None, name_width: int = 36) -> str:
    """A human-readable table: one line per tensor (largest first if ``top`` is given), then totals."""
    rows = b.rows
    if top is not None and top < len(rows):
        rows = sorted(rows, key=lambda r: r.stored_bytes, reverse=True)[:top]
    head = (
        f"{'tensor':<{name_width}} {'kind':<9} {'shape':<16} {'params':>9} {'sparse':>6} {'bits':>4} {'layout':<6} "
        f"{'codes':>9} {'(bound)':>9} {'pos':>8} {'(bound)':>8} {'cbook':>6} {'raw':>8} "
        f"{'b/nz':>5} {'pb/nz':>5} {'ratio':>6} {'share':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape)) or "scalar"
        coded = r.layout != "raw"
        lines.append(
            f"{_shorten(r.name, name_width):<{name_width}} {r.kind[:9]:<9} {shape[:16]:<16} {r.params:>9} "
            f"{r.sparsity:>6.1%} {r.bits if coded else '-':>4} {r.layout:<6} "
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
        f"  codes+pos  {_size(huff)} Huffman vs {_size(bound)} entropy bound"
        + (f" (+{(huff / bound - 1):.1%})" if bound else ""),
        f"  codebooks  {_size(sum(r.codebook_bytes for r in coded))}    raw tensors {_size(sum(r.raw_bytes for r in all_rows))}",
        f"graph        {_size(b.graph_bytes)}",
        f"overhead     {_size(b.overhead_bytes)} (header, index, metadata) = {b.overhead_bytes / b.file_bytes:.2%} of the file",
        f"file         {_size(b.file_bytes)}  (format {b.version})",
    ]
    original = b.metadata.get("dcz.original_bytes")
    if original and original.isdigit() and int(original):
        lines.append(f"original     {_size(int(original))} model file -> {int(original) / b.file_bytes:.1f}x smaller")
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
