"""Stage 7: the .dcz container — header, section table, tensor index, streams.

Layout (spec/format.md): a 32-byte header, a table of 32-byte section entries, then
the sections, which tile the rest of the file with no gaps and no overlaps. The
writer streams tensor payloads to a temporary file beside the target and renames it
into place only when the whole file is written. The reader works in two phases:
:func:`open_dcz` reads and validates the header, section table, metadata and tensor
index (everything ``dcz inspect`` needs); payloads are read per tensor afterwards.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping

from .constants import (
    DEFAULT_EXPANSION_FLOOR,
    DEFAULT_MAX_EXPANSION,
    DEFAULT_MAX_GRAPH_BYTES,
    DEFAULT_MAX_INDEX_BYTES,
    DEFAULT_MAX_META_BYTES,
    DEFAULT_MAX_TENSOR_ELEMENTS,
    DEFAULT_MAX_TENSORS,
    DEFAULT_MAX_TOTAL_BYTES,
    GRID_HEADER_SIZE,
    HEADER_SIZE,
    LAYOUT_STREAMS,
    MAGIC,
    MAX_CODE_BITS,
    MAX_CODEBOOK_SIZE,
    MAX_INDEX_BITS,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_SECTIONS,
    NUMPY_DTYPES,
    REQUIRED_SECTIONS,
    SECTION_ENTRY_SIZE,
    SECTION_FLAG_REQUIRED,
    SECTION_FLAG_XZ,
    SECTION_FLAGS_KNOWN,
    STREAM_CODINGS,
    VERSION_MAJOR,
    VERSION_MINOR,
    Coding,
    DType,
    Layout,
    SectionKind,
    StreamKind,
    TensorKind,
)
from .errors import ChecksumError, CorruptError, InputError, LimitError, TruncatedError, UnsupportedError
from .binned import min_stream_bytes as binned_min_stream_bytes
from .rans import min_stream_bytes as rans_min_stream_bytes

__all__ = [
    "ReadLimits",
    "StreamEntry",
    "TensorEntry",
    "SectionEntry",
    "DczFile",
    "DczWriter",
    "open_dcz",
]

_HEADER = struct.Struct("<8sHHIIII")  # magic, major, minor, section_count, flags, reserved, reserved; CRC follows
_HEADER_CRC = struct.Struct("<I")
_SECTION = struct.Struct("<HHIQQQ")  # kind, flags, crc32, offset, length, reserved
_INDEX_HEAD = struct.Struct("<II")  # tensor_count, reserved
_TENSOR_HEAD = struct.Struct("<BBBB")  # dtype, layout, kind, ndim
_QUANT = struct.Struct("<IBBHQQQ")  # codebook_size, code_bits, index_bits, flags, nnz, position_entries, zeros
_STREAM = struct.Struct("<BBHIQQ")  # kind, coding, reserved, crc32, length, entropy_bits
assert _HEADER.size + _HEADER_CRC.size == HEADER_SIZE and _SECTION.size == SECTION_ENTRY_SIZE

_KNOWN_SECTIONS = frozenset(int(k) for k in SectionKind)

def crc32(data: bytes | memoryview, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


@dataclass(frozen=True)
class ReadLimits:
    """Reader limits (spec section "Limits"); raise them for files you trust that need more."""

    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_expansion: int = DEFAULT_MAX_EXPANSION  # decoded bytes per file byte, above DEFAULT_EXPANSION_FLOOR
    max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES
    max_meta_bytes: int = DEFAULT_MAX_META_BYTES
    max_graph_bytes: int = DEFAULT_MAX_GRAPH_BYTES
    max_tensors: int = DEFAULT_MAX_TENSORS


@dataclass(frozen=True)
class SectionEntry:
    """One entry of the section table."""

    kind: int
    flags: int
    crc32: int
    offset: int
    length: int


@dataclass(frozen=True)
class StreamEntry:
    """One stream of a tensor: where it lies and how it is coded."""

    kind: StreamKind
    coding: Coding
    length: int
    crc32: int
    entropy_bits: int  # informational: the empirical entropy bound of its symbols (8 x length for plain streams)
    offset: int = 0  # absolute file offset, derived by the reader (streams are contiguous in index order)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's record in the index: everything about it but its payload bytes."""

    name: str
    dtype: DType
    layout: Layout
    kind: int
    shape: tuple[int, ...]
    streams: tuple[StreamEntry, ...]
    codebook_size: int = 0
    code_bits: int = 0
    index_bits: int = 0
    nnz: int = 0
    position_entries: int = 0
    zeros: int = 0  # elements that decode to zero (codebook layouts)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        return self.numel * NUMPY_DTYPES[self.dtype].itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.streams)

    def stream(self, kind: StreamKind) -> StreamEntry | None:
        for s in self.streams:
            if s.kind == kind:
                return s
        return None

    @property
    def kind_name(self) -> str:
        try:
            return TensorKind(self.kind).name.lower()
        except ValueError:
            return f"kind {self.kind}"


# --- writing ------------------------------------------------------------------------------------


def _pack_record(t: TensorEntry) -> bytes:
    name = t.name.encode("utf-8")
    parts = [struct.pack("<H", len(name)), name, _TENSOR_HEAD.pack(t.dtype, t.layout, t.kind, len(t.shape))]
    parts.append(struct.pack(f"<{len(t.shape)}Q", *t.shape))
    if t.layout != Layout.RAW:
        parts.append(_QUANT.pack(t.codebook_size, t.code_bits, t.index_bits, 0, t.nnz, t.position_entries, t.zeros))
    parts.append(struct.pack("<B", len(t.streams)))
    for s in t.streams:
        parts.append(_STREAM.pack(s.kind, s.coding, 0, s.crc32, s.length, s.entropy_bits))
    return b"".join(parts)


class DczWriter:
    """Writes a .dcz file: ``add_tensor`` per tensor (payloads streamed to disk), then ``finish``.

    The file appears at ``path`` only when ``finish`` succeeds; on any error, or if
    the writer is closed without finishing, the temporary file is removed and
    nothing at ``path`` is touched. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self._path))
        fd, self._tmp = tempfile.mkstemp(prefix=".dcz-", suffix=".tmp", dir=folder)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")
        self._records: list[bytes] = []
        self._names: set[str] = set()
        self._data_start = HEADER_SIZE + len(REQUIRED_SECTIONS) * SECTION_ENTRY_SIZE
        self._f.write(b"\0" * self._data_start)
        self._data_length = 0

    def add_tensor(self, entry: TensorEntry, payloads: Iterable[bytes | memoryview]) -> None:
        """Append one tensor: its index record and its streams' bytes, in ``entry.streams`` order."""
        if self._f is None:
            raise InputError("writer is closed")
        if entry.name in self._names:
            raise InputError(f"tensor name {entry.name!r} is used twice")
        name_bytes = entry.name.encode("utf-8")
        if not 1 <= len(name_bytes) <= MAX_NAME_BYTES:
            raise InputError(f"tensor name {entry.name[:80]!r} is {len(name_bytes)} UTF-8 bytes, must be 1..{MAX_NAME_BYTES}")
        payloads = list(payloads)
        if len(payloads) != len(entry.streams) or any(len(p) != s.length for p, s in zip(payloads, entry.streams)):
            raise InputError(f"tensor {entry.name!r}: payloads do not match the stream entries")
        self._names.add(entry.name)
        self._records.append(_pack_record(entry))
        for p in payloads:
            self._f.write(p)
            self._data_length += len(p)

    def finish(self, graph: bytes, metadata: Mapping[str, str]) -> int:
        """Write index, graph, metadata and header; move the file into place. Returns the file size."""
        if self._f is None:
            raise InputError("writer is closed")
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in metadata.items()):
            raise InputError("metadata keys and values must be strings")
        f = self._f
        try:
            index = _INDEX_HEAD.pack(len(self._records), 0) + b"".join(self._records)
            meta = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            sections = []
            offset = self._data_start
            sections.append(SectionEntry(SectionKind.DATA, SECTION_FLAG_REQUIRED, 0, offset, self._data_length))
            offset += self._data_length
            for kind, content in ((SectionKind.INDEX, index), (SectionKind.GRAPH, bytes(graph)), (SectionKind.META, meta)):
                payload, flags = _maybe_xz(content)
                f.write(payload)
                sections.append(SectionEntry(kind, flags, crc32(payload), offset, len(payload)))
                offset += len(payload)
            head = _HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, len(sections), 0, 0, 0)
            table = b"".join(_SECTION.pack(s.kind, s.flags, s.crc32, s.offset, s.length, 0) for s in sections)
            f.seek(0)
            f.write(head + _HEADER_CRC.pack(crc32(table, crc32(head))) + table)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._f = None
            os.replace(self._tmp, self._path)
            return offset
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; nothing is written at the target."""
        if self._f is not None:
            self._f.close()
            self._f = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "DczWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self.abort()


def _maybe_xz(content: bytes) -> tuple[bytes, int]:
    """The section's stored bytes and flags: xz-compressed when that is smaller."""
    packed = lzma.compress(content, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=9 | lzma.PRESET_EXTREME)
    if len(packed) < len(content):
        return packed, SECTION_FLAG_REQUIRED | SECTION_FLAG_XZ
    return content, SECTION_FLAG_REQUIRED


def _unxz(data: bytes, limit: int, what: str) -> bytes:
    """Decompress an .xz section, refusing output beyond ``limit`` bytes (decompression bombs) and
    anything but exactly one complete stream."""
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = d.decompress(data, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise CorruptError(f"{what}: xz stream is invalid ({exc})") from None
    if len(out) > limit:
        raise LimitError(f"{what}: decompresses to more than the limit of {limit} bytes")
    if not d.eof:
        raise TruncatedError(f"{what}: xz stream ends early")
    if d.unused_data:
        raise CorruptError(f"{what}: {len(d.unused_data)} bytes after the end of the xz stream")
    return out


# --- reading ------------------------------------------------------------------------------------


class _Cursor:
    """Bounds-checked reads from a buffer; every read names what it was reading."""

    def __init__(self, buf: bytes | memoryview, where: str):
        self.buf = memoryview(buf)
        self.pos = 0
        self.where = where

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise TruncatedError(
                f"{self.where}: {what} needs {n} bytes at offset {self.pos}, only {len(self.buf) - self.pos} remain"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct, what: str) -> tuple:
        return s.unpack(self.take(s.size, what))


def _parse_record(cur: _Cursor, limits: ReadLimits) -> TensorEntry:
    (name_len,) = cur.unpack(struct.Struct("<H"), "tensor name length")
    if name_len == 0:
        raise CorruptError(f"{cur.where}: tensor record at offset {cur.pos - 2} has an empty name")
    raw_name = bytes(cur.take(name_len, "tensor name"))
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptError(f"{cur.where}: tensor name {raw_name[:40]!r} is not valid UTF-8") from None
    if "\0" in name:
        raise CorruptError(f"tensor {name!r}: name contains a NUL character")
    dtype_code, layout_code, kind, ndim = cur.unpack(_TENSOR_HEAD, f"tensor {name!r} header")
    try:
        dtype = DType(dtype_code)
    except ValueError:
        raise UnsupportedError(f"tensor {name!r}: unknown element type code {dtype_code}") from None
    try:
        layout = Layout(layout_code)
    except ValueError:
        raise UnsupportedError(
            f"tensor {name!r}: unknown layout code {layout_code} (written by a newer dcz?)"
        ) from None
    if ndim > MAX_NDIM:
        raise LimitError(f"tensor {name!r}: rank {ndim} exceeds the limit {MAX_NDIM}")
    shape = cur.unpack(struct.Struct(f"<{ndim}Q"), f"tensor {name!r} dims")
    numel = 1
    span = 1  # the element count with zero dims taken as 1: numpy cannot even shape an empty array past intp
    for d in shape:
        numel *= d  # Python int: cannot wrap
        span *= max(d, 1)
    if numel > limits.max_tensor_elements:
        raise LimitError(
            f"tensor {name!r}: shape {list(shape)} has {numel} elements, above the limit {limits.max_tensor_elements}"
        )
    if span > limits.max_tensor_elements:
        raise LimitError(
            f"tensor {name!r}: empty shape {list(shape)}: its nonzero dims multiply to {span}, "
            f"above the limit {limits.max_tensor_elements}"
        )
    quant = dict(codebook_size=0, code_bits=0, index_bits=0, nnz=0, position_entries=0, zeros=0)
    if layout != Layout.RAW:
        cb, code_bits, index_bits, flags, nnz, entries, zeros = cur.unpack(_QUANT, f"tensor {name!r} codebook fields")
        if dtype not in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64):
            raise CorruptError(f"tensor {name!r}: layout {layout.name} needs a float type, not {dtype.name}")
        if flags:
            raise UnsupportedError(f"tensor {name!r}: unknown feature flags 0x{flags:04x} (written by a newer dcz?)")
        if not 1 <= code_bits <= MAX_CODE_BITS:
            raise CorruptError(f"tensor {name!r}: code bit width {code_bits} is outside 1..{MAX_CODE_BITS}")
        if not 1 <= cb <= min(1 << code_bits, MAX_CODEBOOK_SIZE):
            raise CorruptError(
                f"tensor {name!r}: codebook size {cb} does not fit {code_bits}-bit codes (1..{1 << code_bits})"
            )
        if layout == Layout.DENSE:
            if index_bits or entries:
                raise CorruptError(f"tensor {name!r}: dense layout has index bits {index_bits}, entries {entries}; both must be 0")
            if nnz != numel:
                raise CorruptError(f"tensor {name!r}: dense layout stores {nnz} codes for {numel} elements")
        else:
            if not 1 <= index_bits <= MAX_INDEX_BITS:
                raise CorruptError(f"tensor {name!r}: index bit width {index_bits} is outside 1..{MAX_INDEX_BITS}")
            if nnz > numel:
                raise CorruptError(f"tensor {name!r}: {nnz} stored elements exceed its {numel} elements")
            if entries < nnz or (nnz == 0 and entries):
                raise CorruptError(f"tensor {name!r}: {entries} position entries cannot place {nnz} stored elements")
            # Each filler advances 2**index_bits - 1 positions; more fillers than that would run past the tensor.
            max_entries = nnz + numel // ((1 << index_bits) - 1)
            if entries > max_entries:
                raise CorruptError(
                    f"tensor {name!r}: {entries} position entries would run past its {numel} elements (at most {max_entries})"
                )
        if zeros > numel or (layout == Layout.SPARSE and zeros < numel - nnz):
            raise CorruptError(f"tensor {name!r}: zero count {zeros} is impossible for {numel} elements and {nnz} stored")
        quant = dict(
            codebook_size=cb, code_bits=code_bits, index_bits=index_bits, nnz=nnz, position_entries=entries, zeros=zeros
        )
    (n_streams,) = cur.unpack(struct.Struct("<B"), f"tensor {name!r} stream count")
    expected = LAYOUT_STREAMS[layout]
    if n_streams != len(expected):
        raise CorruptError(f"tensor {name!r}: layout {layout.name} has {len(expected)} streams, the record says {n_streams}")
    streams = []
    for want in expected:
        kind_code, coding_code, reserved, crc, length, ent = cur.unpack(_STREAM, f"tensor {name!r} stream entry")
        if kind_code != want:
            raise CorruptError(f"tensor {name!r}: stream kind {kind_code} where layout {layout.name} needs {want.name}")
        try:
            coding = Coding(coding_code)
        except ValueError:
            raise UnsupportedError(
                f"tensor {name!r}: {want.name} stream uses unknown coding {coding_code} (written by a newer dcz?)"
            ) from None
        if coding not in STREAM_CODINGS[want]:
            raise UnsupportedError(f"tensor {name!r}: {want.name} stream cannot use coding {coding.name}")
        if reserved:
            raise CorruptError(f"tensor {name!r}: {want.name} stream entry reserved field is {reserved}, must be 0")
        streams.append(StreamEntry(want, coding, length, crc, ent))
    entry = TensorEntry(name, dtype, layout, kind, tuple(shape), tuple(streams), **quant)
    _check_plain_lengths(entry)
    return entry


def _check_plain_lengths(t: TensorEntry) -> None:
    """Plain streams have an exact length; coded ones must at least hold their symbols."""
    item = NUMPY_DTYPES[t.dtype].itemsize
    for s in t.streams:
        if s.kind == StreamKind.RAW and s.length != t.numel * item:
            raise CorruptError(
                f"tensor {t.name!r}: raw stream is {s.length} bytes, shape {list(t.shape)} of {t.dtype.name} needs {t.numel * item}"
            )
        if s.kind == StreamKind.CODEBOOK and s.coding == Coding.GRID:
            slices = {1, *t.shape, *(a + b for i, a in enumerate(t.shape) for b in t.shape[i + 1:])}  # 1 or 2 axes
            if s.length < GRID_HEADER_SIZE or (s.length - GRID_HEADER_SIZE) % 4 or (s.length - GRID_HEADER_SIZE) // 4 not in slices:
                raise CorruptError(
                    f"tensor {t.name!r}: GRID codebook stream of {s.length} bytes holds no whole scale per slice along one or two axes of shape {list(t.shape)}"
                )
        elif s.kind == StreamKind.CODEBOOK and s.length != t.codebook_size * item:
            raise CorruptError(
                f"tensor {t.name!r}: codebook stream is {s.length} bytes, {t.codebook_size} {t.dtype.name} entries need {t.codebook_size * item}"
            )
        if s.kind in (StreamKind.CODES, StreamKind.POSITIONS) and s.length < 2:
            raise CorruptError(f"tensor {t.name!r}: {s.kind.name} stream of {s.length} bytes has no room for its table header")
        if s.kind in (StreamKind.CODES, StreamKind.POSITIONS) and s.coding in (Coding.RANS, Coding.BINNED):
            alphabet = t.codebook_size if s.kind == StreamKind.CODES else 1 << t.index_bits
            rans_coded = s.coding == Coding.RANS
            least = (rans_min_stream_bytes if rans_coded else binned_min_stream_bytes)(alphabet)
            if s.length < least:
                raise CorruptError(
                    f"tensor {t.name!r}: {'rANS' if rans_coded else 'binned'} {s.kind.name} stream of {s.length} bytes "
                    f"is shorter than the {least} bytes of its smallest {'table and states' if rans_coded else 'header and bins'}"
                )


class DczFile:
    """An open .dcz file whose header, sections and index have been validated (phase one).

    ``tensors`` lists the index records in file order; ``metadata`` is the metadata
    map; :meth:`graph` and :meth:`read_streams` read payloads (phase two), each
    checked against its CRC-32 before it is returned. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, limits: ReadLimits | None = None):
        self.path = os.fspath(path)
        self.limits = limits or ReadLimits()
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, not a .dcz file") from None
        try:
            self._f.seek(0, os.SEEK_END)
            self.file_size = self._f.tell()
            self._read_header()
            self.metadata = self._read_meta()
            self.tensors = self._read_index()
        except BaseException:
            self._f.close()
            raise
        self._by_name = {t.name: t for t in self.tensors}

    # phase one
    def _pread(self, offset: int, n: int, what: str) -> bytes:
        self._f.seek(offset)
        data = self._f.read(n)
        if len(data) != n:
            raise TruncatedError(f"{what}: needs {n} bytes at offset {offset}, the file ends after {len(data)}")
        return data

    def _read_header(self) -> None:
        if self.file_size < HEADER_SIZE:
            raise TruncatedError(f"header: the file is {self.file_size} bytes, a .dcz header alone is {HEADER_SIZE}")
        head = self._pread(0, HEADER_SIZE, "header")
        magic, major, minor, count, flags, r1, r2 = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise CorruptError(f"header: magic bytes {magic!r} are not {MAGIC!r}; this is not a .dcz file")
        if major != VERSION_MAJOR:
            raise UnsupportedError(
                f"header: format version {major}.{minor} is not supported (this reader reads {VERSION_MAJOR}.x)"
            )
        if not 1 <= count <= MAX_SECTIONS:
            raise CorruptError(f"header: section count {count} is outside 1..{MAX_SECTIONS}")
        table_end = HEADER_SIZE + count * SECTION_ENTRY_SIZE
        table = self._pread(HEADER_SIZE, count * SECTION_ENTRY_SIZE, "section table")
        (stored_crc,) = _HEADER_CRC.unpack_from(head, _HEADER.size)
        actual = crc32(table, crc32(head[: _HEADER.size]))
        if stored_crc != actual:
            raise ChecksumError(f"header: CRC-32 0x{actual:08x} does not match the stored 0x{stored_crc:08x}")
        if flags:
            raise UnsupportedError(f"header: unknown file flags 0x{flags:08x} (written by a newer dcz?)")
        if r1 or r2:
            raise CorruptError("header: reserved fields are not zero")
        self.version = (major, minor)
        sections = []
        for i in range(count):
            kind, sflags, crc, offset, length, reserved = _SECTION.unpack_from(table, i * SECTION_ENTRY_SIZE)
            if reserved or sflags & ~SECTION_FLAGS_KNOWN:
                raise CorruptError(f"section {i} (kind {kind}): reserved bits are not zero")
            sections.append(SectionEntry(kind, sflags, crc, offset, length))
        # The sections tile [table_end, file_size) exactly: no holes, no overlaps, nothing past the end.
        pos = table_end
        for s in sorted(sections, key=lambda s: s.offset):
            name = _section_name(s.kind)
            if s.offset != pos:
                problem = "overlaps the previous one" if s.offset < pos else "leaves a hole before it"
                raise CorruptError(f"section {name}: offset {s.offset} {problem} (expected {pos})")
            pos = s.offset + s.length
            if pos > self.file_size:
                raise TruncatedError(
                    f"section {name}: bytes {s.offset}..{pos} run past the end of the file ({self.file_size} bytes)"
                )
        if pos != self.file_size:
            raise CorruptError(f"file: {self.file_size - pos} bytes after the last section belong to no section")
        known: dict[int, SectionEntry] = {}
        for s in sections:
            if s.kind in known:
                raise CorruptError(f"section {_section_name(s.kind)} appears twice")
            if s.kind not in _KNOWN_SECTIONS:
                if s.flags & SECTION_FLAG_REQUIRED:
                    raise UnsupportedError(
                        f"section kind {s.kind} is marked required but unknown to this reader (written by a newer dcz?)"
                    )
                continue  # unknown optional section: skipped
            known[s.kind] = s
        for kind in REQUIRED_SECTIONS:
            if kind not in known:
                raise CorruptError(f"section {kind.name} is missing")
        if known[SectionKind.DATA].crc32 != 0:
            raise CorruptError("section DATA: its CRC field must be 0 (streams carry their own CRCs)")
        if known[SectionKind.DATA].flags & SECTION_FLAG_XZ:
            raise CorruptError("section DATA: must not be xz-compressed")
        self.sections = known

    def _section_bytes(self, kind: SectionKind, limit: int) -> bytes:
        """A section's content: CRC checked, xz-decompressed if flagged, within ``limit`` bytes."""
        s = self.sections[kind]
        if s.length > limit:
            raise LimitError(f"section {kind.name}: {s.length} bytes exceed the limit {limit}")
        data = self._pread(s.offset, s.length, f"section {kind.name}")
        actual = crc32(data)
        if actual != s.crc32:
            raise ChecksumError(
                f"section {kind.name}: CRC-32 0x{actual:08x} does not match the stored 0x{s.crc32:08x}; the file is damaged"
            )
        if s.flags & SECTION_FLAG_XZ:
            data = _unxz(data, limit, f"section {kind.name}")
        return data

    def _read_meta(self) -> dict[str, str]:
        raw = self._section_bytes(SectionKind.META, self.limits.max_meta_bytes)
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, or a number over 4300 digits
            raise CorruptError(f"section META: not valid UTF-8 JSON ({exc})") from None
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CorruptError("section META: must be a JSON object of string values")
        return meta

    def _read_index(self) -> list[TensorEntry]:
        cur = _Cursor(self._section_bytes(SectionKind.INDEX, self.limits.max_index_bytes), "section INDEX")
        count, reserved = cur.unpack(_INDEX_HEAD, "index header")
        if reserved:
            raise CorruptError(f"section INDEX: reserved field is {reserved}, must be 0")
        if count > self.limits.max_tensors:
            raise LimitError(f"section INDEX: {count} tensors exceed the limit {self.limits.max_tensors}")
        tensors: list[TensorEntry] = []
        names: set[str] = set()
        offset = self.sections[SectionKind.DATA].offset
        data_end = offset + self.sections[SectionKind.DATA].length
        total = 0
        for _ in range(count):
            t = _parse_record(cur, self.limits)
            if t.name in names:
                raise CorruptError(f"tensor {t.name!r} appears twice in the index")
            names.add(t.name)
            total += t.nbytes
            if total > self.limits.max_total_bytes:
                raise LimitError(
                    f"tensor {t.name!r}: decoded tensors would total {total} bytes, above the limit {self.limits.max_total_bytes}"
                )
            if total > max(DEFAULT_EXPANSION_FLOOR, self.limits.max_expansion * self.file_size):
                raise LimitError(
                    f"tensor {t.name!r}: decoded tensors would total {total} bytes, more than {self.limits.max_expansion}x "
                    f"the file's {self.file_size} bytes (raise ReadLimits.max_expansion for a file you trust)"
                )
            placed = []
            for s in t.streams:
                if offset + s.length > data_end:
                    raise CorruptError(
                        f"tensor {t.name!r}: {s.kind.name} stream of {s.length} bytes runs past the end of section DATA"
                    )
                placed.append(StreamEntry(s.kind, s.coding, s.length, s.crc32, s.entropy_bits, offset))
                offset += s.length
            tensors.append(TensorEntry(**{**t.__dict__, "streams": tuple(placed)}))
        if cur.pos != len(cur.buf):
            raise CorruptError(f"section INDEX: {len(cur.buf) - cur.pos} bytes after the last of {count} records")
        if offset != data_end:
            raise CorruptError(f"section DATA: {data_end - offset} bytes belong to no tensor stream")
        return tensors

    # phase two
    def graph(self) -> bytes:
        """The graph blob, checked against its CRC."""
        return self._section_bytes(SectionKind.GRAPH, self.limits.max_graph_bytes)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise InputError(f"no tensor named {name!r} in {self.path}") from None

    def read_streams(self, entry: TensorEntry) -> list[bytes]:
        """The payload of each of the tensor's streams, each checked against its CRC."""
        out = []
        for s in entry.streams:
            data = self._pread(s.offset, s.length, f"tensor {entry.name!r} {s.kind.name} stream")
            actual = crc32(data)
            if actual != s.crc32:
                raise ChecksumError(
                    f"tensor {entry.name!r}: {s.kind.name} stream CRC-32 0x{actual:08x} does not match the stored "
                    f"0x{s.crc32:08x}; the file is damaged"
                )
            out.append(data)
        return out

    @property
    def overhead_bytes(self) -> int:
        """Bytes that are not tensor streams or graph: header, section table, index, metadata."""
        return self.file_size - self.sections[SectionKind.DATA].length - self.sections[SectionKind.GRAPH].length

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "DczFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _section_name(kind: int) -> str:
    try:
        return SectionKind(kind).name
    except ValueError:
        return f"kind {kind}"


def open_dcz(path: str | os.PathLike, limits: ReadLimits | None = None) -> DczFile:
    """Open a .dcz file and validate everything but the payloads (phase one)."""
    return DczFile(path, limits)
