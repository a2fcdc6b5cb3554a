"""Hand-built hostile files: each check of spec/format.md "Reader checks" has a case, matched on its message."""

import json
import lzma
import struct
import zlib

import numpy as np
import pytest

from dcformat.codec import CompressSettings, TensorInput, read_dcz, write_dcz
from dcformat.container import ReadLimits, open_dcz
from dcformat.errors import ChecksumError, CorruptError, DczError, LimitError, TruncatedError, UnsupportedError

HEADER = 32
ENTRY = 32


def _crc(b):
    return zlib.crc32(b) & 0xFFFFFFFF


class File:
    """A valid small .dcz file as editable parts; ``bytes()`` re-derives every CRC unless told not to."""

    def __init__(self, tmp_path):
        rng = np.random.default_rng(0)
        fc = rng.normal(size=(40, 50)).astype(np.float32)
        path = tmp_path / "ok.dcz"
        write_dcz(
            path,
            [
                TensorInput("conv", rng.normal(size=(16, 8, 3, 3)).astype(np.float32), CompressSettings(bits=4)),
                TensorInput("fc", fc, CompressSettings(bits=3, sparsity=0.8, index_bits=4, layout="sparse")),
                TensorInput("bias", np.arange(6, dtype=np.float32)),
            ],
            graph=b"graph-bytes",
            metadata={"a": "b"},
        )
        self.tmp = tmp_path
        data = path.read_bytes()
        self.head = bytearray(data[:HEADER])
        count = struct.unpack_from("<I", data, 12)[0]
        self.table = [list(struct.unpack_from("<HHIQQQ", data, HEADER + i * ENTRY)) for i in range(count)]
        # Sections as their content: xz-compressed ones are decompressed here and recompressed by bytes().
        self.sections = {}
        for e in self.table:
            raw = data[e[3] : e[3] + e[4]]
            self.sections[e[0]] = bytearray(lzma.decompress(raw) if e[1] & 2 else raw)

    def stored(self, e):
        content = bytes(self.sections[e[0]])
        return lzma.compress(content, check=lzma.CHECK_NONE) if e[1] & 2 else content

    def bytes(self, fix_crc=True, fix_layout=True):
        order = [e[0] for e in self.table]
        stored = {e[0]: self.stored(e) for e in self.table}
        if fix_layout:
            pos = HEADER + len(self.table) * ENTRY
            for e in self.table:
                e[3], e[4] = pos, len(stored[e[0]])
                if fix_crc and e[0] != 4:
                    e[2] = _crc(stored[e[0]])
                pos += e[4]
        table = b"".join(struct.pack("<HHIQQQ", *e) for e in self.table)
        head = bytearray(self.head)
        head[12:16] = struct.pack("<I", len(self.table))
        if fix_crc:
            head[28:32] = struct.pack("<I", _crc(bytes(head[:28]) + table))
        return bytes(head) + table + b"".join(stored[k] for k in order)

    def write(self, data=None, **kw):
        p = self.tmp / "bad.dcz"
        p.write_bytes(self.bytes(**kw) if data is None else data)
        return p


def _read_all(path, limits=None):
    return read_dcz(path, limits)


INDEX, DATA, GRAPH, META = 3, 4, 2, 1


def _first_record_offsets(f):
    """Offsets inside INDEX of the first record's fields ('conv', 4-D, DENSE)."""
    base = 8
    name_len = struct.unpack_from("<H", f.sections[INDEX], base)[0]
    head = base + 2 + name_len
    return {"name": base, "dtype": head, "layout": head + 1, "ndim": head + 3, "dims": head + 4,
            "quant": head + 4 + 8 * 4, "streams": head + 4 + 32 + 32}


def test_valid_file_reads(tmp_path):
    f = File(tmp_path)
    c = _read_all(f.write())
    assert set(c.tensors) == {"conv", "fc", "bias"} and c.graph == b"graph-bytes"


CASES = []


def case(error, match):
    def deco(fn):
        CASES.append(pytest.param(fn, error, match, id=fn.__name__))
        return fn
    return deco


@case(CorruptError, "not a .dcz file")
def bad_magic(f):
    f.head[0:8] = b"PK\x03\x04\0\0\0\0"


@case(UnsupportedError, r"version 2\.\d+ is not supported")
def newer_major(f):
    f.head[8:10] = struct.pack("<H", 2)


@case(UnsupportedError, "unknown file flags")
def header_flags(f):
    f.head[16:20] = struct.pack("<I", 1)


@case(CorruptError, "reserved fields")
def header_reserved(f):
    f.head[20:24] = struct.pack("<I", 7)


@case(CorruptError, "section count 0")
def zero_sections(f):
    f.table = []


@case(CorruptError, "section META is missing")
def missing_meta(f):
    f.table = [e for e in f.table if e[0] != META]


@case(CorruptError, "appears twice")
def duplicate_section(f):
    f.table.append(list(f.table[-1]))
    f.sections[99] = bytearray()  # keeps tiling valid; the duplicate kind is the fault


@case(UnsupportedError, "marked required but unknown")
def unknown_required_section(f):
    f.table.append([77, 1, 0, 0, 0, 0])
    f.sections[77] = bytearray(b"future")


@case(CorruptError, "reserved bits")
def section_flag_bits(f):
    f.table[0][1] |= 0x8000


@case(CorruptError, "CRC field must be 0")
def data_crc_nonzero(f):
    next(e for e in f.table if e[0] == DATA)[2] = 5


@case(CorruptError, "not valid UTF-8 JSON")
def meta_not_json(f):
    f.sections[META] = bytearray(b"{not json")


@case(CorruptError, "JSON object of string values")
def meta_not_strings(f):
    f.sections[META] = bytearray(json.dumps({"a": 1}).encode())


@case(CorruptError, "appears twice in the index")
def duplicate_tensor_name(f):
    idx = f.sections[INDEX]
    # rename 'fc' to 'co' is not enough; rename 'bias' record name to 'conv' needs equal length: use 'fc' -> clash
    i = idx.find(b"\x02\x00fc")
    idx[i + 2 : i + 4] = b"fc"
    j = idx.find(b"\x04\x00conv")
    idx[j + 2 : j + 6] = b"bias"


@case(UnsupportedError, "unknown layout code 9")
def unknown_layout(f):
    o = _first_record_offsets(f)
    f.sections[INDEX][o["layout"]] = 9


@case(UnsupportedError, "unknown element type code 99")
def unknown_dtype(f):
    f.sections[INDEX][_first_record_offsets(f)["dtype"]] = 99


@case(UnsupportedError, "unknown coding 7")
def unknown_coding(f):
    o = _first_record_offsets(f)
    f.sections[INDEX][o["streams"] + 1 + 24 + 1] = 7  # CODES stream's coding


@case(UnsupportedError, "unknown feature flags")
def unknown_feature_flag(f):
    o = _first_record_offsets(f)
    f.sections[INDEX][o["quant"] + 6] = 1


@case(CorruptError, "does not fit 4-bit codes")
def codebook_too_big_for_bits(f):
    o = _first_record_offsets(f)
    struct.pack_into("<I", f.sections[INDEX], o["quant"], 17)


@case(LimitError, "above the limit")
def shape_overflow(f):
    o = _first_record_offsets(f)
    struct.pack_into("<Q", f.sections[INDEX], o["dims"], 2**63)


@case(CorruptError, "dense layout stores")
def shape_lies_about_codes(f):
    o = _first_record_offsets(f)
    struct.pack_into("<Q", f.sections[INDEX], o["dims"], 17)


@case(CorruptError, "records")
def trailing_index_bytes(f):
    f.sections[INDEX] += b"\0"


@case(TruncatedError, "needs")
def index_cut_short(f):
    del f.sections[INDEX][-5:]


@case(CorruptError, "belong to no tensor stream")
def data_longer_than_streams(f):
    f.sections[DATA] += b"\0\0"


@case(CorruptError, "runs past the end of section DATA")
def data_shorter_than_streams(f):
    del f.sections[DATA][-3:]


@case(ChecksumError, "CODES stream CRC-32")
def payload_bit_flip(f):
    f.sections[DATA][64 + 16] ^= 0x10  # conv: 16-entry float32 codebook (64 bytes), then its code stream


def _apply(f, mutate):
    mutate(f)
    return f.bytes()


@pytest.mark.parametrize("kind, name", [(INDEX, "INDEX"), (GRAPH, "GRAPH"), (META, "META")])
def test_section_damage_is_caught_by_its_crc(tmp_path, kind, name):
    f = File(tmp_path)
    data = bytearray(f.bytes())
    e = next(e for e in f.table if e[0] == kind)
    data[e[3] + e[4] // 2] ^= 0x04
    p = f.write(bytes(data))
    with pytest.raises(ChecksumError, match=f"section {name}: CRC-32"):
        with open_dcz(p) as d:
            d.graph()


@pytest.mark.parametrize(
    "payload, error, match",
    [
        (b"\xfd7zXZ\x00garbage", CorruptError, "xz stream is invalid"),
        (lzma.compress(b"{}" * 100)[:-12], TruncatedError, "ends early"),
        (lzma.compress(b'{"a":"b"}') + b"\0", CorruptError, "after the end of the xz stream"),
    ],
)
def test_bad_xz_sections(tmp_path, payload, error, match):
    f = File(tmp_path)
    meta = next(e for e in f.table if e[0] == META)
    f.table.remove(meta)
    f.table.append([META, 3, 0, 0, 0, 0])
    f.sections[META] = bytearray(payload)
    f.stored = lambda e, _s=f.stored: bytes(f.sections[META]) if e[0] == META else _s(e)
    with pytest.raises(error, match=match):
        _read_all(f.write())


def test_xz_bomb_is_refused(tmp_path):
    f = File(tmp_path)
    f.sections[GRAPH] = bytearray(b"\0" * 5_000_000)
    for e in f.table:
        if e[0] == GRAPH:
            e[1] |= 2
    p = f.write()
    with open_dcz(p, ReadLimits(max_graph_bytes=1_000_000)) as d:
        with pytest.raises(LimitError, match="decompresses to more than"):
            d.graph()


@case(CorruptError, "must not be xz-compressed")
def data_compressed(f):
    next(e for e in f.table if e[0] == DATA)[1] |= 2


@pytest.mark.parametrize("mutate, error, match", CASES)
def test_hostile_file(tmp_path, mutate, error, match):
    f = File(tmp_path)
    path = f.write(_apply(f, mutate))
    with pytest.raises(error, match=match):
        _read_all(path)


def test_header_crc_catches_table_damage(tmp_path):
    f = File(tmp_path)
    data = bytearray(f.bytes())
    data[HEADER + 8] ^= 1  # first section's offset, CRC not fixed
    with pytest.raises(ChecksumError, match="header: CRC-32"):
        _read_all(f.write(bytes(data)))


@pytest.mark.parametrize("delta, match", [(-1, "overlaps"), (1, "hole")])
def test_sections_must_tile(tmp_path, delta, match):
    f = File(tmp_path)
    f.bytes()
    f.table[1][3] += delta
    data = f.bytes(fix_layout=False)
    with pytest.raises(CorruptError, match=match):
        _read_all(f.write(data))


def test_trailing_bytes_after_sections(tmp_path):
    f = File(tmp_path)
    with pytest.raises(CorruptError, match="belong to no section"):
        _read_all(f.write(f.bytes() + b"\0"))


def test_unknown_optional_section_is_skipped(tmp_path):
    f = File(tmp_path)
    f.table.append([77, 0, 0, 0, 0, 0])
    f.sections[77] = bytearray(b"optional future data")
    assert set(_read_all(f.write()).tensors) == {"conv", "fc", "bias"}


def test_newer_minor_version_is_read(tmp_path):
    f = File(tmp_path)
    f.head[10:12] = struct.pack("<H", 7)
    assert set(_read_all(f.write()).tensors) == {"conv", "fc", "bias"}


def test_every_truncation_is_a_clean_error(tmp_path):
    f = File(tmp_path)
    data = f.bytes()
    for n in range(len(data)):
        p = tmp_path / "cut.dcz"
        p.write_bytes(data[:n])
        with pytest.raises(DczError):
            _read_all(p)


def test_every_single_bit_flip_is_caught(tmp_path):
    # Each byte of the file, one bit flipped: a clean error, never a wrong result.
    f = File(tmp_path)
    data = f.bytes()
    good = _read_all(f.write(data)).tensors
    p = tmp_path / "flip.dcz"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        p.write_bytes(bytes(flipped))
        try:
            out = _read_all(p).tensors
        except DczError:
            continue
        # Only informational fields may be flipped harmlessly; the tensors must be unchanged.
        assert all(out[k].tobytes() == good[k].tobytes() for k in good), f"byte {i} changed a tensor silently"


def test_limits_are_enforced_and_overridable(tmp_path):
    f = File(tmp_path)
    p = f.write()
    with pytest.raises(LimitError, match="elements, above the limit 100"):
        _read_all(p, ReadLimits(max_tensor_elements=100))
    with pytest.raises(LimitError, match="total"):
        _read_all(p, ReadLimits(max_total_bytes=1000))
    with pytest.raises(LimitError, match="tensors exceed"):
        _read_all(p, ReadLimits(max_tensors=2))
    with open_dcz(p, ReadLimits(max_graph_bytes=3)) as d:
        with pytest.raises(LimitError, match="GRAPH"):
            d.graph()


def test_not_a_file(tmp_path):
    with pytest.raises(DczError, match="no such file"):
        _read_all(tmp_path / "missing.dcz")
    with pytest.raises(DczError, match="directory"):
        _read_all(tmp_path)


def test_huge_declared_shape_is_parsed_exactly_then_limited(tmp_path):
    # dims whose product overflows 64 bits are multiplied as Python ints and refused by the limit, not wrapped.
    f = File(tmp_path)
    o = _first_record_offsets(f)
    for j, d in enumerate((2**40, 2**40, 1, 1)):
        struct.pack_into("<Q", f.sections[INDEX], o["dims"] + 8 * j, d)
    with pytest.raises(LimitError, match=str(2**80)):
        _read_all(f.write())


def test_tiny_file_cannot_demand_gigabytes(tmp_path):
    # A single-symbol code costs zero bits, so a file of a few hundred bytes could describe 2**30 floats.
    from dcformat.codec import write_dcz as _w

    p = tmp_path / "const.dcz"
    _w(p, [TensorInput("c", np.full(1 << 20, 0.5, np.float32), CompressSettings(bits=1))])
    f = File.__new__(File)
    data = p.read_bytes()
    assert len(data) < 1000
    f.tmp, f.head = tmp_path, bytearray(data[:HEADER])
    f.table = [list(struct.unpack_from("<HHIQQQ", data, HEADER + i * ENTRY)) for i in range(4)]
    f.sections = {e[0]: bytearray(lzma.decompress(data[e[3]:e[3] + e[4]]) if e[1] & 2 else data[e[3]:e[3] + e[4]])
                  for e in f.table}
    o = _first_record_offsets(f)
    struct.pack_into("<Q", f.sections[INDEX], o["dims"], 1 << 30)  # 1-D: 4 GiB of float32
    struct.pack_into("<Q", f.sections[INDEX], o["dims"] + 8 + 8, 1 << 30)  # nnz = elements (dense)
    bad = f.write()
    with pytest.raises(LimitError, match="more than 4096x the file"):
        _read_all(bad)
    assert read_dcz(p).tensors["c"].size == 1 << 20  # the honest file reads
