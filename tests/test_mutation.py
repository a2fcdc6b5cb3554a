"""Mutation tests over real .dcz files: any damage is either harmless or a DczError.

Valid files are built at test time (LeNet-300-100 with the default policy and with the paper's policy at 80 %
fc sparsity, which gives SPARSE layouts; and a codec-level file holding float16 / bfloat16 / float64 / int64 /
bool / scalar / empty tensors in every layout). Hypothesis then damages them in two ways:

* blind damage, CRCs left as they are: truncation, 1..8 bit flips, a span overwritten with random bytes,
  spans inserted, deleted, duplicated or pasted from another valid file. ``read_dcz`` and ``load`` must
  raise DczError or return exactly the original contents: damage must never silently change a weight.
* damage behind valid CRCs: a structure's content is changed (index fields set to edge values, index / META /
  GRAPH bytes, ONNX slots, Huffman tables and bitstreams, streams swapped between tensors, xz flags) and
  every CRC re-derived, xz sections recompressed, so the deeper checks run. ``read_dcz`` and ``load`` must
  return or raise DczError, never another exception.

The default run takes about 20 seconds; ``python -m pytest -m slow tests/test_mutation.py`` runs ten
times as many examples.
"""

from __future__ import annotations

import json
import warnings
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcformat
from dcformat import CompressSettings, DczError, TensorInput
from dcformat.constants import DType, Layout

HEADER = 32
ENTRY = 32
XZ = 2
META, GRAPH, INDEX, DATA = 1, 2, 3, 4
LENET = Path(dcformat.__file__).parent / "data" / "lenet300.onnx"

#: Examples per property in the default run (about 20 s on 2 cores together), and under -m slow (ten times more).
BLIND, DEEP = 1000, 2000
SLOW = 10


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


# --- the valid files --------------------------------------------------------------------------------


@dataclass(repr=False)
class Sample:
    name: str
    data: bytes
    tensors: dict[str, np.ndarray]
    graph: bytes
    metadata: dict[str, str]
    model: bytes | None  # load(): the rebuilt ModelProto serialized, for files holding an ONNX graph

    def __repr__(self) -> str:
        return f"<sample {self.name}: {len(self.data)} bytes>"

    def _repr_pretty_(self, p, cycle) -> None:  # Hypothesis' failure report: not megabytes of arrays
        p.text(repr(self))


def _codec_file(path: Path) -> None:
    rng = np.random.default_rng(0)
    bf16 = (rng.normal(size=(16, 12)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    sparse = CompressSettings(bits=3, sparsity=0.85, index_bits=2, layout="sparse")  # index_bits 2: fillers
    dcformat.write_dcz(
        path,
        [
            TensorInput("f16", rng.normal(size=(20, 30)).astype(np.float16), CompressSettings(bits=3)),
            TensorInput("bf16", bf16, sparse, dtype=DType.BFLOAT16),
            TensorInput("f64", rng.normal(size=(200,)), sparse),
            TensorInput("f64_raw", rng.normal(size=(3, 2))),
            TensorInput("i64", np.arange(-5, 5, dtype=np.int64).reshape(2, 5)),
            TensorInput("scalar", np.array(1.5, dtype=np.float32)),
            TensorInput("empty", np.zeros((0, 4), dtype=np.float32), CompressSettings(bits=2)),
            TensorInput("bool", np.array([True, False, True])),
            TensorInput("ones", np.ones((64,), dtype=np.float32), CompressSettings(bits=2)),  # 1-symbol code
        ],
        graph=b"opaque graph bytes",
        metadata={"user": "value", "dcz.graph_format": ""},
    )


def _sample(name: str, path: Path, onnx_graph: bool) -> Sample:
    c = dcformat.read_dcz(path)
    model = dcformat.load(path).SerializeToString() if onnx_graph else None
    return Sample(name, path.read_bytes(), c.tensors, c.graph, c.metadata, model)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Sample]:
    folder = tmp_path_factory.mktemp("valid")
    out = {}
    dcformat.compress(LENET, folder / "default.dcz")
    out["default"] = _sample("default", folder / "default.dcz", True)
    dcformat.compress(LENET, folder / "paper.dcz", dcformat.Policy.paper(sparsity={"fc": 0.8}))
    out["paper"] = _sample("paper", folder / "paper.dcz", True)
    _codec_file(folder / "codec.dcz")
    out["codec"] = _sample("codec", folder / "codec.dcz", False)
    layouts = {t.layout for name in out for t in dcformat.open_dcz(folder / f"{name}.dcz").tensors}
    assert layouts == set(Layout)  # every layout is exercised
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutated") / "m.dcz"


# --- a file as editable parts ----------------------------------------------------------------------------


@dataclass
class Field:
    """A fixed-width integer field inside the INDEX content."""

    offset: int
    size: int
    label: str


class Parts:
    """A valid file split into header, section table and section contents (xz sections decompressed).

    ``bytes()`` lays the sections out again, recompresses xz sections and re-derives every CRC:
    section CRCs, each stream's CRC in the index (walking the index leniently) and the header CRC.
    """

    def __init__(self, data: bytes):
        self.head = bytearray(data[:HEADER])
        count = struct.unpack_from("<I", data, 12)[0]
        self.table = [list(struct.unpack_from("<HHIQQQ", data, HEADER + i * ENTRY)) for i in range(count)]
        self.kinds = [e[0] for e in self.table]  # the content each entry holds, even if its kind is changed
        self.content: dict[int, bytearray] = {}
        for e in self.table:
            raw = data[e[3] : e[3] + e[4]]
            self.content[e[0]] = bytearray(lzma.decompress(raw) if e[1] & XZ else raw)
        self.fields, self.streams = _index_layout(bytes(self.content[INDEX]))

    def stream_bytes(self, i: int) -> bytes:
        start = sum(length for _, length in self.streams[:i])
        return bytes(self.content[DATA][start : start + self.streams[i][1]])

    def replace_stream(self, i: int, payload: bytes) -> None:
        """Put ``payload`` in place of stream ``i`` and update its length in the index."""
        start = sum(length for _, length in self.streams[:i])
        at, length = self.streams[i]
        self.content[DATA][start : start + length] = payload
        struct.pack_into("<Q", self.content[INDEX], at + 8, len(payload))
        self.streams[i] = (at, len(payload))

    def bytes(self, relayout: bool = True) -> bytes:
        index = self.content[INDEX]
        _, streams = _index_layout(bytes(index))
        pos = 0
        for at, length in streams:  # stream CRCs, as far as the (possibly damaged) index still parses
            struct.pack_into("<I", index, at + 4, _crc(bytes(self.content[DATA][pos : pos + length])))
            pos += length
        stored = []
        for e, kind in zip(self.table, self.kinds):
            content = bytes(self.content[kind])
            stored.append(lzma.compress(content, check=lzma.CHECK_NONE, preset=0) if e[1] & XZ else content)
        pos = HEADER + ENTRY * len(self.table)
        for e, kind, b in zip(self.table, self.kinds, stored):
            if relayout:
                e[3], e[4] = pos, len(b)
                pos += e[4]
            if kind != DATA:
                e[2] = _crc(b)
        table = b"".join(struct.pack("<HHIQQQ", *e) for e in self.table)
        head = bytes(self.head[:28])
        order = sorted(range(len(self.table)), key=lambda i: self.table[i][3])
        return head + struct.pack("<I", _crc(head + table)) + table + b"".join(stored[i] for i in order)


def _index_layout(index: bytes) -> tuple[list[Field], list[tuple[int, int]]]:
    """Every integer field of the index, and (entry offset, length) of every stream; stops where parsing fails."""
    fields = [Field(0, 4, "tensor_count"), Field(4, 4, "index reserved")]
    streams: list[tuple[int, int]] = []
    try:
        count = struct.unpack_from("<I", index, 0)[0]
        pos = 8
        for _ in range(min(count, 1000)):
            fields.append(Field(pos, 2, "name_length"))
            pos += 2 + struct.unpack_from("<H", index, pos)[0]
            fields += [Field(pos + i, 1, label) for i, label in enumerate(("dtype", "layout", "kind", "ndim"))]
            layout, ndim = index[pos + 1], index[pos + 3]
            pos += 4
            fields += [Field(pos + 8 * i, 8, "dim") for i in range(ndim)]
            pos += 8 * ndim
            if layout:
                for size, label in ((4, "codebook_size"), (1, "code_bits"), (1, "index_bits"), (2, "flags"),
                                    (8, "nnz"), (8, "position_entries"), (8, "zeros")):
                    fields.append(Field(pos, size, label))
                    pos += size
            fields.append(Field(pos, 1, "stream_count"))
            n = index[pos]
            pos += 1
            for _ in range(n):
                fields += [Field(pos, 1, "stream kind"), Field(pos + 1, 1, "coding"), Field(pos + 2, 2, "reserved"),
                           Field(pos + 8, 8, "stream length"), Field(pos + 16, 8, "entropy_bits")]
                streams.append((pos, struct.unpack_from("<Q", index, pos + 8)[0]))
                pos += 24
    except (struct.error, IndexError):
        pass
    return [f for f in fields if f.offset + f.size <= len(index)], streams


# --- strategies -------------------------------------------------------------------------------------


def _span(draw, size: int) -> tuple[int, int]:
    """A span [a, b) inside a buffer of ``size`` bytes, short spans more likely."""
    a = draw(st.integers(0, max(size - 1, 0)))
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, max(size - a, 1))))
    return a, min(a + n, size)


def mutate_bytes(draw, buf: bytes, others: list[bytes], region: tuple[int, int] | None = None) -> bytes:
    """One blind mutation of ``buf``, located inside ``region`` (default: anywhere)."""
    if not buf:
        return draw(st.binary(max_size=16))
    lo, hi = region or (0, len(buf))
    lo = min(lo, len(buf) - 1)
    hi = min(max(hi, lo + 1), len(buf))
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "duplicate", "paste"]))
    at = draw(st.integers(lo, hi - 1))
    if kind == "truncate":
        return buf[:at]
    if kind == "flip":
        out = bytearray(buf)
        for bit in draw(st.lists(st.integers(0, 8 * (hi - lo) - 1), min_size=1, max_size=8, unique=True)):
            i = min(lo + bit // 8, len(out) - 1)
            out[i] ^= 1 << (bit % 8)
        return bytes(out)
    if kind == "overwrite":
        a, b = at, min(at + draw(st.integers(1, 16)), len(buf))
        return buf[:a] + draw(st.binary(min_size=b - a, max_size=b - a)) + buf[b:]
    if kind == "insert":
        return buf[:at] + draw(st.binary(min_size=1, max_size=16)) + buf[at:]
    if kind == "delete":
        return buf[:at] + buf[at + draw(st.integers(1, 64)):]
    if kind == "duplicate":
        a, b = _span(draw, len(buf))
        return buf[:at] + buf[a:b] + buf[at:]
    other = draw(st.sampled_from(others))
    a, b = _span(draw, len(other))
    end = at + draw(st.integers(0, b - a)) if draw(st.booleans()) else at + (b - a)  # replace or insert
    return buf[:at] + other[a:b] + buf[min(end, len(buf)):]


_EDGE = [0, 1, 2, 3, 7, 8, 15, 16, 17, 24, 25, 31, 32, 33, 255, 256, 65535, 65536, 2**31, 2**32 - 1, 2**32,
         2**34, 2**34 + 1, 2**63, 2**64 - 1]


def set_field(draw, buf: bytearray, f: Field) -> None:
    """Set an integer field to an edge value, a value next to its own, or a random one."""
    cur = int.from_bytes(buf[f.offset : f.offset + f.size], "little")
    top = (1 << (8 * f.size)) - 1
    value = draw(st.one_of(
        st.sampled_from([v for v in _EDGE if v <= top]),
        st.integers(-3, 3).map(lambda d: cur + d),
        st.integers(0, top),
    ))
    buf[f.offset : f.offset + f.size] = (value & top).to_bytes(f.size, "little")


# --- what must hold -------------------------------------------------------------------------------------


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check(path: Path, data: bytes, expected: Sample | None) -> None:
    """read_dcz and load raise DczError or succeed (without warnings: a numpy overflow warning on hostile
    input is a check done wrong); with ``expected``, success must give exactly its contents."""
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(path, expected)


def _check(path: Path, expected: Sample | None) -> None:
    try:
        c = dcformat.read_dcz(path)
    except DczError:
        pass
    else:
        for name, arr in c.tensors.items():
            assert isinstance(arr, np.ndarray), name
        if expected is not None:
            assert c.tensors.keys() == expected.tensors.keys()
            for name, arr in c.tensors.items():
                assert _same(arr, expected.tensors[name]), f"tensor {name!r} changed silently"
            assert c.graph == expected.graph and c.metadata == expected.metadata
    try:
        model = dcformat.load(path)
    except DczError:
        pass
    else:
        assert isinstance(model, onnx.ModelProto)
        if expected is not None:
            assert model.SerializeToString() == expected.model


def _expected_for(data: bytes, samples: dict[str, Sample]) -> Sample | None:
    """What a file with damaged but not re-checksummed bytes may decode to: the sample it equals, if any."""
    for s in samples.values():
        if s.data == data:
            return s
    return None


# --- blind damage ----------------------------------------------------------------------------------------


def _regions(data: bytes) -> list[tuple[int, int]]:
    """Header, section table and each section: damage is spread over structures, not just over bytes."""
    count = struct.unpack_from("<I", data, 12)[0]
    out = [(0, HEADER), (HEADER, HEADER + ENTRY * count)]
    for i in range(count):
        _, _, _, off, length, _ = struct.unpack_from("<HHIQQQ", data, HEADER + i * ENTRY)
        out.append((off, off + max(length, 1)))
    return out


def _blind(samples, scratch, data):
    sample = samples[data.draw(st.sampled_from(sorted(samples)))]
    others = [s.data for s in samples.values()]
    buf = sample.data
    for _ in range(data.draw(st.integers(1, 3))):
        region = data.draw(st.sampled_from(_regions(sample.data) + [None]))
        buf = mutate_bytes(data.draw, buf, others, region)
    if buf == sample.data:
        return
    expected = _expected_for(buf, samples)
    # Damaged bytes that match no valid file: success is allowed only if it changes nothing.
    check(scratch, buf, expected or sample)


@settings(max_examples=BLIND, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_blind_damage_is_refused_or_harmless(samples, scratch, data):
    _blind(samples, scratch, data)


@pytest.mark.slow
@settings(max_examples=SLOW * BLIND, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_blind_damage_is_refused_or_harmless_long(samples, scratch, data):
    _blind(samples, scratch, data)


def test_every_truncation_of_a_sparse_file_is_refused(samples, scratch):
    data = samples["codec"].data
    for n in range(0, len(data), 7):
        scratch.write_bytes(data[:n])
        with pytest.raises(DczError):
            dcformat.read_dcz(scratch)


# --- damage behind valid checksums ----------------------------------------------------------------------


def _deep(samples, scratch, data):
    sample = samples[data.draw(st.sampled_from(sorted(samples)))]
    others = [s.data for s in samples.values()]
    p = Parts(sample.data)
    target = data.draw(st.sampled_from(
        ["index field"] * 4 + ["index bytes"] * 2 + ["stream"] * 4 + ["stream swap", "meta", "graph", "graph onnx", "graph onnx",
                                                                       "table", "header", "xz flag"]
    ))
    draw = data.draw
    if target == "index field":
        for _ in range(draw(st.integers(1, 3))):
            set_field(draw, p.content[INDEX], draw(st.sampled_from(p.fields)))
    elif target == "index bytes":
        p.content[INDEX] = bytearray(mutate_bytes(draw, bytes(p.content[INDEX]), others))
    elif target == "stream":
        i = draw(st.integers(0, len(p.streams) - 1))
        payload = p.stream_bytes(i)
        # Huffman tables sit at the start of their stream: aim there half the time.
        region = (0, min(len(payload), 2 + 4 * payload[0] + 16)) if payload and draw(st.booleans()) else None
        p.replace_stream(i, mutate_bytes(draw, payload, [payload, *others], region))
    elif target == "stream swap":
        i, j = draw(st.integers(0, len(p.streams) - 1)), draw(st.integers(0, len(p.streams) - 1))
        p.replace_stream(i, p.stream_bytes(j))
    elif target == "meta":
        if draw(st.booleans()):
            p.content[META] = bytearray(mutate_bytes(draw, bytes(p.content[META]), others))
        else:
            value = draw(st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                | st.sampled_from(["onnx.ModelProto", "", "\ud800", _BIG]),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                max_leaves=6,
            ))
            if draw(st.booleans()):
                value = {**sample.metadata, draw(st.sampled_from(["dcz.graph_format", "k"])): value}
            text = _dumps(value)
            p.content[META] = bytearray(text.encode("utf-8", "surrogatepass"))
    elif target == "graph":
        p.content[GRAPH] = bytearray(mutate_bytes(draw, bytes(p.content[GRAPH]), others))
    elif target == "graph onnx":
        p.content[GRAPH] = bytearray(_mutate_model(draw, bytes(p.content[GRAPH])))
    elif target == "table":
        e = draw(st.sampled_from(p.table))
        slot = draw(st.sampled_from([0, 1, 3, 4, 5]))
        e[slot] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x8001, e[slot] + 1, e[slot] - 1 if e[slot] else 0]))
        check(scratch, p.bytes(relayout=slot not in (3, 4)), None)
        return
    elif target == "header":
        at = draw(st.integers(8, 27))
        p.head[at] ^= 1 << draw(st.integers(0, 7))
    else:  # xz flag toggled: the content is stored the other way round from what the flag says
        e = draw(st.sampled_from([e for e in p.table if e[0] != DATA]))
        e[1] ^= XZ
        if draw(st.booleans()):
            stored = lzma.compress(bytes(p.content[e[0]])) if not e[1] & XZ else bytes(p.content[e[0]])
            p.content[e[0]] = bytearray(stored)
    check(scratch, p.bytes(), None)


#: Stands for a JSON number too long for Python's int parser (see test_meta_with_a_huge_number).
_BIG = "<big number>"


def _dumps(value) -> str:
    return json.dumps(value).replace(json.dumps(_BIG), "9" * 5000)


def _mutate_model(draw, blob: bytes) -> bytes:
    """Change one slot (or tensor) of the ONNX graph skeleton the way a hostile file could."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(blob)
    except Exception:  # the codec file's graph is opaque bytes
        return blob
    inits = model.graph.initializer
    if not inits:
        return blob
    t = inits[draw(st.integers(0, len(inits) - 1))]
    how = draw(st.sampled_from(["dims", "dtype", "key", "value", "drop entry", "add entry", "drop tensor",
                                "copy tensor", "raw_data", "float_data", "location", "not utf8"]))
    if how == "dims":
        t.dims[:] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
    elif how == "dtype":
        t.data_type = draw(st.integers(0, 25))
    elif how in ("key", "value") and t.external_data:
        e = t.external_data[draw(st.integers(0, len(t.external_data) - 1))]
        new = draw(st.sampled_from(["location", "dcz_tensor", "dcz_field", "dcz_location", "dcz:", "raw_data",
                                    "float_data", "int32_data", "none", "set", "unset", "ip1.weight", "", "x"]))
        setattr(e, how, new)
    elif how == "drop entry" and t.external_data:
        del t.external_data[draw(st.integers(0, len(t.external_data) - 1))]
    elif how == "add entry":
        e = t.external_data.add()
        e.key, e.value = draw(st.sampled_from([("location", "x.bin"), ("dcz_tensor", "b"), ("offset", "0")]))
    elif how == "drop tensor":
        del inits[draw(st.integers(0, len(inits) - 1))]
    elif how == "copy tensor":
        inits.add().CopyFrom(t)
    elif how == "raw_data":
        t.raw_data = b"\0" * draw(st.integers(0, 8))
    elif how == "float_data":
        t.float_data.extend([1.0])
    elif how == "not utf8":  # protobuf returns bytes, not str, for a string field holding invalid UTF-8
        fields = [(t, "name")] + [(e, k) for e in t.external_data for k in ("key", "value")]
        obj, attr = draw(st.sampled_from(fields))
        setattr(obj, attr, _NOT_UTF8_MARK)
        return model.SerializeToString().replace(_NOT_UTF8_MARK.encode(), b"dcz_\xff\xfe")
    else:
        t.data_location = draw(st.integers(0, 1))
    return model.SerializeToString()


_NOT_UTF8_MARK = "MARK@@"  # as long as its replacement, so the protobuf length prefixes stay right


@settings(max_examples=DEEP, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damage_behind_valid_checksums_is_refused_or_read(samples, scratch, data):
    _deep(samples, scratch, data)


@pytest.mark.slow
@settings(max_examples=SLOW * DEEP, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damage_behind_valid_checksums_is_refused_or_read_long(samples, scratch, data):
    _deep(samples, scratch, data)


def test_parts_round_trip(samples, tmp_path):
    """The editing helper rebuilds each valid file (xz recompressed, CRCs re-derived) and it reads back the same."""
    for s in samples.values():
        path = tmp_path / f"{s.name}.dcz"
        path.write_bytes(s.data)
        p = Parts(s.data)
        assert len(p.streams) == sum(len(t.streams) for t in dcformat.open_dcz(path).tensors)
        path.write_bytes(p.bytes())
        check(path, p.bytes(), s)


# --- regressions: inputs the fuzzer or the tests above found, as hand-built cases ----------------------------


def _with(sample: Sample, kind: int, content: bytes) -> bytes:
    p = Parts(sample.data)
    p.content[kind] = bytearray(content)
    return p.bytes()


def test_meta_with_a_huge_number(samples, scratch):
    """json.loads raises a plain ValueError for integers over 4300 digits (CPython's int parsing limit)."""
    scratch.write_bytes(_with(samples["codec"], META, b'{"a": ' + b"9" * 5000 + b"}"))
    with pytest.raises(dcformat.CorruptError, match=r"section META: not valid UTF-8 JSON \(Exceeds the limit"):
        dcformat.read_dcz(scratch)


def _stream_index(sample: Sample, tensor: str, stream: int) -> int:
    """Position of a tensor's stream among all streams in file order (what Parts.streams counts)."""
    index = bytes(Parts(sample.data).content[INDEX])
    counts = [index[f.offset] for f in _index_layout(index)[0] if f.label == "stream_count"]
    k = list(sample.tensors).index(tensor)  # read_dcz keeps index order
    assert stream < counts[k]
    return sum(counts[:k]) + stream


def test_bool_bytes_other_than_0_and_1_are_refused(samples, scratch):
    p = Parts(samples["codec"].data)
    p.replace_stream(_stream_index(samples["codec"], "bool", 0), b"\x01\x00\x02")
    scratch.write_bytes(p.bytes())
    with pytest.raises(dcformat.CorruptError, match=r"tensor 'bool': BOOL element byte 2 is not 0 or 1"):
        dcformat.read_dcz(scratch)


def test_float16_codebook_spanning_the_whole_range_reads_without_warnings(samples, scratch):
    """np.diff of float16 -65504, 65504 overflows; the increasing check must not warn (or fail) on finite values."""
    s = samples["codec"]
    p = Parts(s.data)
    i = _stream_index(s, "f16", 0)
    n = len(p.stream_bytes(i)) // 2
    half = np.linspace(40000, 65504, n - n // 2)
    codebook = np.concatenate([-half[::-1][: n // 2], half]).astype("<f2")  # -40000 next to 40000: the difference overflows
    assert np.all(codebook[1:] > codebook[:-1]) and np.all(codebook != 0)
    p.replace_stream(i, codebook.tobytes())
    scratch.write_bytes(p.bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dcformat.read_dcz(scratch).tensors["f16"]
    assert out.min() == -65504 and out.max() == 65504


def test_a_tiny_file_can_declare_a_huge_tensor_and_the_limit_stops_it(samples, scratch):
    """A single-symbol code takes zero bits per element, so a ~1 KB file can legitimately describe 2**26
    float32 ones (256 MiB); ReadLimits, checked in phase one before any payload is read, is the defence:
    the absolute total, and by default the expansion over the file's size."""
    s = samples["codec"]
    p = Parts(s.data)
    at: dict[str, Field] = {}
    for f in p.fields:  # the first field of each name in the record of "ones" (a 1-D tensor)
        if f.offset > _record_offset(p, "ones"):
            at.setdefault(f.label, f)
    for label in ("dim", "nnz"):
        struct.pack_into("<Q", p.content[INDEX], at[label].offset, 1 << 26)
    scratch.write_bytes(p.bytes())
    assert scratch.stat().st_size < 2000
    with pytest.raises(dcformat.LimitError, match=r"tensor 'ones': decoded tensors would total \d+ bytes, above"):
        dcformat.open_dcz(scratch, dcformat.ReadLimits(max_total_bytes=1 << 24))
    with pytest.raises(dcformat.LimitError, match=r"more than 4096x the file"):
        dcformat.open_dcz(scratch)  # default limits: 256 MiB from a ~1 KB file is refused
    trusted = dcformat.ReadLimits(max_expansion=1 << 20)
    assert dcformat.open_dcz(scratch, trusted).entry("ones").nbytes == 4 << 26  # a user who trusts it can open it


def _record_offset(p: Parts, name: str) -> int:
    return bytes(p.content[INDEX]).index(struct.pack("<H", len(name)) + name.encode())


def test_slot_key_that_is_not_utf8_is_refused(samples, scratch):
    """protobuf hands back bytes, not str, for a string field holding invalid UTF-8 (found by the slow run:
    sorting the slot's keys then raised TypeError)."""
    s = samples["paper"]
    model = onnx.ModelProto()
    model.ParseFromString(s.graph)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "dcz_field")
    entry.key = "KEYKEYKEY"
    blob = model.SerializeToString().replace(b"KEYKEYKEY", b"dcz_fi\xecld")
    scratch.write_bytes(_with(s, GRAPH, blob))
    with pytest.raises(dcformat.CorruptError, match=r"external_data entry b'dcz_fi\\xecld': 'raw_data' is not valid UTF-8"):
        dcformat.load(scratch)


def test_empty_tensor_with_an_absurd_dim_is_refused(samples, scratch):
    """Shape [0, 2**63]: no elements, so the element limit passed, but numpy cannot shape even an empty array
    with a dim past 2**63 - 1 (found by the slow run: ValueError from reshape)."""
    s = samples["codec"]
    p = Parts(s.data)
    dims = [f for f in p.fields if f.label == "dim" and f.offset > _record_offset(p, "empty")][:2]
    struct.pack_into("<Q", p.content[INDEX], dims[1].offset, 1 << 63)
    scratch.write_bytes(p.bytes())
    with pytest.raises(dcformat.LimitError,
                       match=r"tensor 'empty': empty shape \[0, 9223372036854775808\]: its nonzero dims multiply to"):
        dcformat.read_dcz(scratch)
