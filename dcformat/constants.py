"""Type codes and limits of the .dcz format, mirroring ``spec/format.md``.

Every enum here has a table of the same name in the spec, and ``tests/test_spec.py``
checks that the two agree. Limits are what a conforming reader enforces; each has a
one-line reason. Readers take overrides for the ones a user could need to raise
(see :class:`dcformat.container.ReadLimits`).
"""

from __future__ import annotations

import enum

import numpy as np

# --- File identity ---------------------------------------------------------------------------

#: 8 magic bytes. The high byte and the CR LF / ^Z / LF pattern catch 7-bit and
#: text-mode transfers that mangle binary files (the trick PNG uses).
MAGIC = b"\x89DCZ\r\n\x1a\n"
#: A reader refuses files of another major version.
VERSION_MAJOR = 1
#: Minor versions only add codes and optional sections; a reader accepts a newer
#: minor and refuses, by name, any unknown code it meets.
VERSION_MINOR = 3

HEADER_SIZE = 32
SECTION_ENTRY_SIZE = 32
#: Byte order of every multi-byte field and stored value.
BYTE_ORDER = "<"


class SectionKind(enum.IntEnum):
    """Section type codes (spec table "Section kinds")."""

    META = 1
    GRAPH = 2
    INDEX = 3
    DATA = 4


#: Section flag bit: a reader that does not know this section kind must refuse the file.
SECTION_FLAG_REQUIRED = 0x0001
#: Section flag bit: the section's bytes are an .xz stream (LZMA2) of its content. Graph protobufs
#: and tensor names compress 4-14x; DATA is already entropy-coded and never has this flag.
SECTION_FLAG_XZ = 0x0002
SECTION_FLAGS_KNOWN = SECTION_FLAG_REQUIRED | SECTION_FLAG_XZ
#: Sections a version-1.0 file must contain, each exactly once.
REQUIRED_SECTIONS = (SectionKind.META, SectionKind.GRAPH, SectionKind.INDEX, SectionKind.DATA)


class DType(enum.IntEnum):
    """Element type codes of stored tensors (spec table "Element types")."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    FLOAT64 = 4
    INT8 = 5
    UINT8 = 6
    INT16 = 7
    UINT16 = 8
    INT32 = 9
    UINT32 = 10
    INT64 = 11
    UINT64 = 12
    BOOL = 13
    COMPLEX64 = 14
    COMPLEX128 = 15


#: Element types that may carry a codebook (all other types are stored raw).
FLOAT_DTYPES = frozenset({DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64})

#: numpy dtype that holds each element type's bytes (little-endian). BFLOAT16 is
#: held as its uint16 bit patterns, which is how callers pass it in.
NUMPY_DTYPES: dict[DType, np.dtype] = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.BFLOAT16: np.dtype("<u2"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.INT8: np.dtype("i1"),
    DType.UINT8: np.dtype("u1"),
    DType.INT16: np.dtype("<i2"),
    DType.UINT16: np.dtype("<u2"),
    DType.INT32: np.dtype("<i4"),
    DType.UINT32: np.dtype("<u4"),
    DType.INT64: np.dtype("<i8"),
    DType.UINT64: np.dtype("<u8"),
    DType.BOOL: np.dtype("?"),
    DType.COMPLEX64: np.dtype("<c8"),
    DType.COMPLEX128: np.dtype("<c16"),
}


class Layout(enum.IntEnum):
    """How a tensor's elements are stored (spec table "Layouts")."""

    RAW = 0  # the element bytes as they are
    DENSE = 1  # one code per element into a codebook
    SPARSE = 2  # one code per stored element, plus relative-index positions


class StreamKind(enum.IntEnum):
    """What a stream holds (spec table "Stream kinds")."""

    RAW = 1
    CODEBOOK = 2
    CODES = 3
    POSITIONS = 4


class Coding(enum.IntEnum):
    """How a stream's symbols are coded (spec table "Codings")."""

    PLAIN = 0  # little-endian values of the stream's natural width
    HUFFMAN = 1  # canonical Huffman table + MSB-first bitstream
    GRID = 2  # (1.1) a codebook given as integer levels times per-tensor or per-channel scales
    RANS = 3  # (1.1) a quantized frequency table + two interleaved rANS states and 16-bit words
    BINNED = 4  # (1.3) each symbol's offset from a center: its bin rANS-coded, its low bits raw


class TensorKind(enum.IntEnum):
    """What consumes a tensor, as the writer saw it (spec table "Tensor kinds").

    Informational only: a reader accepts any value and shows unknown ones as numbers.
    """

    OTHER = 0
    CONV = 1
    FC = 2
    RNN = 3
    EMBEDDING = 4
    NORM = 5


#: The streams each layout has, in file order.
LAYOUT_STREAMS: dict[Layout, tuple[StreamKind, ...]] = {
    Layout.RAW: (StreamKind.RAW,),
    Layout.DENSE: (StreamKind.CODEBOOK, StreamKind.CODES),
    Layout.SPARSE: (StreamKind.CODEBOOK, StreamKind.CODES, StreamKind.POSITIONS),
}
#: The codings each stream kind may use (GRID and RANS since 1.1, BINNED since 1.3).
STREAM_CODINGS: dict[StreamKind, frozenset[Coding]] = {
    StreamKind.RAW: frozenset({Coding.PLAIN}),
    StreamKind.CODEBOOK: frozenset({Coding.PLAIN, Coding.GRID}),
    StreamKind.CODES: frozenset({Coding.HUFFMAN, Coding.RANS, Coding.BINNED}),
    StreamKind.POSITIONS: frozenset({Coding.HUFFMAN, Coding.RANS, Coding.BINNED}),
}

# --- Limits -----------------------------------------------------------------------------------

#: Codebook entries: codes are 16-bit symbols; fine uniform grids need hundreds of levels.
MAX_CODEBOOK_SIZE = 1 << 16
#: Nominal code bit width b (codebook size <= 2**b); 16 because codes are 16-bit symbols.
MAX_CODE_BITS = 16
#: Relative-index field width; gap symbols are 16-bit like codes.
MAX_INDEX_BITS = 16
#: Longest Huffman codeword. Bounds the decoder's work per symbol and the table size;
#: 24 bits lose nothing measurable against unlimited Huffman on 2**16 symbols.
MAX_CODE_LENGTH = 24
#: rANS frequency-table precision (total = 2**scale), smallest: a two-symbol table needs one bit.
RANS_MIN_SCALE = 1
#: rANS precision, largest: the renormalisation bound freq << (32 - scale) must fit the 32-bit state with
#: 16-bit words, and the decoder's table of 2**scale slots (8 bytes each) stays at 512 KiB.
RANS_MAX_SCALE = 16
#: rANS states interleaved in one stream (symbol i uses state i mod 2): two dependency chains per decode loop.
RANS_STATES = 2
#: Lower bound of every rANS state, its initial and final value: 32-bit states, renormalised by 16-bit words.
RANS_STATE_LOW = 1 << 16
#: Bytes of a rANS frequency varint: values up to 2**RANS_MAX_SCALE need 17 bits, three 7-bit groups.
RANS_MAX_VARINT_BYTES = 3
#: Mantissa bits of a binned stream's bins (1.3): bins keep the top k+1 bits of an offset's magnitude. Each bit
#: doubles the bins; on the public models' wide streams k = 1..2 was smallest and k = 4 within 0.5 % of it.
BINNED_MAX_MANTISSA = 4
#: Largest |level| of a GRID codebook: integers up to 2**24 are exact in binary32, where levels are multiplied.
GRID_MAX_LEVEL = 1 << 24
#: GRID codebook payload: u8 axis, u8 second axis + 1 (0: none; format 1.2), 2 reserved bytes, i32 q_min, then one
#: f32 scale per slice along the axis and, for a two-axis grid, one per slice along the second axis.
GRID_HEADER_SIZE = 8
#: GRID axis value meaning "one scale for the whole tensor".
GRID_AXIS_NONE = 0xFF
#: Tensor rank; ONNX runtimes support far fewer, and dims are 8 bytes each.
MAX_NDIM = 32
#: Tensor name length in UTF-8 bytes (u16 length field).
MAX_NAME_BYTES = 0xFFFF
#: Sections in one file; version 1.0 writes 4, the rest is room for optional ones.
MAX_SECTIONS = 64

#: Reader defaults, overridable through ``ReadLimits``.
#: Elements of one decoded tensor: 2**34 (a 64 GiB float32 tensor) is beyond any model we know.
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 34
#: Bytes of all decoded tensors together: 64 GiB; raise it for bigger models.
DEFAULT_MAX_TOTAL_BYTES = 1 << 36
#: The index section: 256 MiB holds about a million tensor records.
DEFAULT_MAX_INDEX_BYTES = 1 << 28
#: The metadata section: JSON of strings, 64 MiB is generous.
DEFAULT_MAX_META_BYTES = 1 << 26
#: The graph section: ONNX protobufs stop at 2 GiB.
DEFAULT_MAX_GRAPH_BYTES = 1 << 31
#: Tensors in one file.
DEFAULT_MAX_TENSORS = 1 << 20
#: Decoded bytes per byte of file. A zero-bit single-symbol stream lets a tiny file describe a huge tensor;
#: real files expand 2-100x (the paper's LeNets: 40x), so 4096x is generous and stops a 2 KB file from
#: demanding gigabytes. Files below DEFAULT_EXPANSION_FLOOR bytes of output are never refused for it.
DEFAULT_MAX_EXPANSION = 4096
DEFAULT_EXPANSION_FLOOR = 1 << 28
