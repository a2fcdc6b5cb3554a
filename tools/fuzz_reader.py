"""Coverage-guided fuzzing (atheris / libFuzzer) of the .dcz reader: ``read_dcz`` and ``load``.

The property: for any input bytes, ``dcformat.read_dcz`` and ``dcformat.load`` either return or raise
``dcformat.DczError``. Any other exception is a crash (libFuzzer saves the input as ``crash-<sha1>``);
a run past ``-timeout`` seconds is a hang; a process above ``-rss_limit_mb`` is an OOM: a file made the
reader allocate far beyond what it could describe within the reader limits the harness sets (``LIMITS``,
much lower than the defaults so that a legitimate decompression bomb within the limits stays small).

Setup and running (Python 3.11; atheris is not a dependency of dcformat)::

    pip install atheris
    python tools/fuzz_reader.py --make-corpus /tmp/dcz_corpus      # a few small valid files as seeds
    python tools/fuzz_reader.py -max_total_time=300 -rss_limit_mb=2048 -timeout=20 -dict=/tmp/dcz_corpus.dict \
        /tmp/dcz_corpus
    python tools/fuzz_reader.py -fork=2 -max_total_time=600 -rss_limit_mb=2048 /tmp/dcz_corpus  # both cores
    python tools/fuzz_reader.py crash-1234abcd                      # replay one input (shows the traceback)
    python tools/fuzz_reader.py --to-dcz crash-1234abcd bad.dcz     # the .dcz file it stands for (for a test)

Arguments after the options are libFuzzer's (``-runs=N``, ``-max_len=N``, ``-dict=...``); the corpus folder
is written to as new coverage is found. The seed corpus is made automatically when the corpus folder is
missing or empty. The corpus is scratch data: do not commit it.

Input format. Nearly every byte of a .dcz file is covered by a CRC-32, so blind byte mutations stop at the
first checksum. The first input byte is therefore a mode byte, the rest is the file:

* bit 0 clear: the file is read as it is (checksums, truncations, bit flips);
* bit 0 set: the harness first re-derives every CRC it can find (section CRCs, stream CRCs in the index,
  the header CRC), so mutations reach index parsing, Huffman tables, positions, codebooks, zero counts and
  the graph rebuild;
* bit 1 set (with bit 0): sections flagged XZ are held *decompressed* in the input and compressed by the
  harness, so the fuzzer mutates the index, metadata and graph themselves rather than xz bytes.

The fix-up is lenient: where the structure no longer parses it stops and leaves the rest as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

try:
    import atheris
except ImportError:  # --make-corpus and replay work without it
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["dcformat"]):
        import dcformat
        from dcformat import codec, container, huffman, onnx_rebuild, sparse  # noqa: F401
else:
    import dcformat

from dcformat import CompressSettings, DczError, ReadLimits, TensorInput  # noqa: E402
from dcformat.onnx_ingest import extract_weights  # noqa: E402

#: Reader limits for fuzzing: far below the defaults so that a legal "bomb" (a ~100-byte DENSE tensor whose
#: single-symbol code stands for 2**34 elements) stays within -rss_limit_mb; anything above it is a bug.
LIMITS = ReadLimits(
    max_tensor_elements=1 << 22,
    max_total_bytes=1 << 25,
    max_index_bytes=1 << 20,
    max_meta_bytes=1 << 20,
    max_graph_bytes=1 << 22,
    max_tensors=1 << 12,
)
#: Mode byte bits (see the module docstring).
MODE_FIX_CRC = 1
MODE_INFLATED_XZ = 2

_HEADER = 32
_ENTRY = 32
_XZ_FLAG = 2
_DATA = 4
_INDEX = 3


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


# --- seed files -------------------------------------------------------------------------------------


def _tiny_model() -> onnx.ModelProto:
    """A small graph with weights of each float type and both storage fields (raw_data, typed data)."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(24, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 8)).astype(np.float32)
    w3 = rng.normal(size=(8, 8)).astype(np.float16)
    w4 = rng.normal(size=(6,)).astype(np.float64)
    bf = (rng.normal(size=(4, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    inits = [
        onnx.numpy_helper.from_array(w1, "w1"),
        helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel().tolist()),  # float_data
        onnx.numpy_helper.from_array(w3, "w3"),
        onnx.numpy_helper.from_array(w4, "w4"),
        helper.make_tensor("bf", TensorProto.BFLOAT16, bf.shape, bf.tobytes(), raw=True),
        onnx.numpy_helper.from_array(np.arange(5, dtype=np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ] + [helper.make_node("Identity", [n], [n + "_out"]) for n in ("w3", "w4", "bf", "b")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)] + [
        helper.make_tensor_value_info(n + "_out", t, None)
        for n, t in (("w3", TensorProto.FLOAT16), ("w4", TensorProto.DOUBLE), ("bf", TensorProto.BFLOAT16),
                     ("b", TensorProto.FLOAT))
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 24])],
                              outs, inits)
    return helper.make_model(graph)


def _onnx_seed(path: Path, settings: dict[str, CompressSettings | None]) -> None:
    graph, weights = extract_weights(_tiny_model())
    tensors = [TensorInput(w.name, w.array, settings.get(w.name),
                           dcformat.codec.DType.BFLOAT16 if w.onnx_dtype == TensorProto.BFLOAT16 else None)
               for w in weights]
    dcformat.write_dcz(path, tensors, graph=graph, metadata={"dcz.graph_format": "onnx.ModelProto", "k": "v"})


def seed_files(folder: Path) -> list[Path]:
    """Write a few small valid .dcz files (RAW, DENSE and SPARSE layouts, every float type) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    p = folder / "onnx_dense.dcz"
    _onnx_seed(p, {"w1": CompressSettings(bits=3), "w2": CompressSettings(bits=2),
                   "w3": CompressSettings(bits=2), "bf": CompressSettings(bits=2)})
    out.append(p)
    p = folder / "onnx_sparse.dcz"
    sp = CompressSettings(bits=2, sparsity=0.8, index_bits=3, layout="sparse")
    _onnx_seed(p, {"w1": sp, "w2": sp, "w3": CompressSettings(bits=2, sparsity=0.9, index_bits=2, layout="sparse"),
                   "w4": CompressSettings(bits=1, layout="dense"), "bf": sp})
    out.append(p)
    rng = np.random.default_rng(2)
    p = folder / "codec.dcz"
    dcformat.write_dcz(p, [
        TensorInput("f16", rng.normal(size=(12, 10)).astype(np.float16), CompressSettings(bits=2)),
        TensorInput("f64", rng.normal(size=(40,)), CompressSettings(bits=2, sparsity=0.9, index_bits=2,
                                                                    layout="sparse")),
        TensorInput("i64", np.arange(-3, 3, dtype=np.int64)),
        TensorInput("scalar", np.array(2.5, dtype=np.float32)),
        TensorInput("empty", np.zeros((0, 3), dtype=np.float32), CompressSettings(bits=2)),
        TensorInput("bool", np.array([True, False])),
    ], graph=b"opaque", metadata={})
    out.append(p)
    # Format 1.1: GRID codebooks (one scale, per channel, sparse) and peaked streams that pick rANS.
    p = folder / "grid_rans.dcz"
    peaked = (rng.laplace(size=(16, 24)) ** 3).astype(np.float32)
    dcformat.write_dcz(p, [
        TensorInput("g_tensor", rng.normal(size=(8, 16)).astype(np.float32),
                    CompressSettings(quantizer="uniform", rel_error=0.05)),
        TensorInput("g_channel", (rng.normal(size=(6, 20)) * np.logspace(-2, 1, 6)[:, None]).astype(np.float16),
                    CompressSettings(quantizer="uniform", rel_error=0.05, per_channel=True)),
        TensorInput("g_sparse", peaked, CompressSettings(quantizer="uniform", step=4.0, layout="sparse", index_bits=3)),
        TensorInput("g_dense", peaked, CompressSettings(quantizer="uniform", step=2.0, layout="dense")),
    ], graph=b"", metadata={})
    out.append(p)
    # Format 1.3: wide alphabets that pick BINNED streams (a fine grid on heavy tails, dense and sparse).
    p = folder / "binned.dcz"
    wide = (rng.laplace(size=(24, 40)) * 50).astype(np.float32)
    dcformat.write_dcz(p, [
        TensorInput("b_dense", wide, CompressSettings(quantizer="uniform", step=0.05)),
        TensorInput("b_sparse", np.where(rng.random(wide.shape) < 0.3, wide, 0).astype(np.float32),
                    CompressSettings(quantizer="uniform", step=0.05, layout="sparse", index_bits=4)),
    ], graph=b"", metadata={})
    out.append(p)
    return out


#: libFuzzer dictionary entries: tokens of the ONNX slot markers and the metadata, which byte mutations
#: rarely invent (written next to the corpus by make_corpus, used with -dict=CORPUS.dict).
DICTIONARY = ["dcz:", "dcz_tensor", "dcz_field", "dcz_location", "location", "raw_data", "float_data",
              "int32_data", "double_data", "none", "set", "unset", "dcz.graph_format", "onnx.ModelProto"]


def make_corpus(folder: Path) -> None:
    """Seeds for every mode: the files as they are, with CRC fix-up, and with inflated xz sections; and the
    dictionary ``<folder>.dict``."""
    folder.with_name(folder.name + ".dict").write_text("".join(f'"{w}"\n' for w in DICTIONARY))
    tmp = Path(tempfile.mkdtemp(prefix="dcz-seeds-"))
    for f in seed_files(tmp):
        data = f.read_bytes()
        for mode, body in ((0, data), (MODE_FIX_CRC, data), (MODE_FIX_CRC | MODE_INFLATED_XZ, inflate_xz(data))):
            blob = bytes([mode]) + body
            (folder / hashlib.sha1(blob).hexdigest()).write_bytes(blob)
        f.unlink()
    tmp.rmdir()


# --- the fix-up ----------------------------------------------------------------------------------------


def _table(data: bytes) -> list[list[int]] | None:
    if len(data) < _HEADER:
        return None
    count = struct.unpack_from("<I", data, 12)[0]
    if not 1 <= count <= 64 or len(data) < _HEADER + _ENTRY * count:
        return None
    return [list(struct.unpack_from("<HHIQQQ", data, _HEADER + i * _ENTRY)) for i in range(count)]


def inflate_xz(data: bytes) -> bytes:
    """A valid file with its xz sections stored decompressed (the MODE_INFLATED_XZ form of the input)."""
    table = _table(data)
    parts = []
    pos = _HEADER + _ENTRY * len(table)
    for e in sorted(table, key=lambda e: e[3]):
        raw = data[e[3]: e[3] + e[4]]
        if e[1] & _XZ_FLAG:
            raw = lzma.decompress(raw)
        e[3], e[4] = pos, len(raw)
        pos += len(raw)
        parts.append(raw)
    return data[:_HEADER] + b"".join(struct.pack("<HHIQQQ", *e) for e in table) + b"".join(parts)


def _stream_crc_fields(index: bytes) -> list[tuple[int, int]] | None:
    """(offset in INDEX of the stream entry, its length) for every stream; None where the index stops parsing."""
    out = []
    try:
        count = struct.unpack_from("<I", index, 0)[0]
        pos = 8
        for _ in range(min(count, 1 << 12)):
            (n,) = struct.unpack_from("<H", index, pos)
            pos += 2 + n
            layout, ndim = index[pos + 1], index[pos + 3]
            pos += 4 + 8 * ndim + (32 if layout else 0)
            streams = index[pos]
            pos += 1
            for _ in range(streams):
                out.append((pos, struct.unpack_from("<Q", index, pos + 8)[0]))
                pos += 24
    except (struct.error, IndexError):
        pass
    return out


def fix_up(data: bytes, inflated: bool) -> bytes:
    """Re-derive section layout, section CRCs, stream CRCs and the header CRC (leniently)."""
    table = _table(data)
    if table is None:
        return data
    body_start = _HEADER + _ENTRY * len(table)
    # Sections in file order, cut from the input by their declared lengths (clipped to what is there).
    contents: dict[int, bytes] = {}
    pos = body_start
    for i, e in sorted(enumerate(table), key=lambda ie: ie[1][3]):
        contents[i] = data[pos: pos + e[4]]
        pos += e[4]
    order = sorted(range(len(table)), key=lambda i: table[i][3])
    data_i = next((i for i in order if table[i][0] == _DATA), None)
    index_i = next((i for i in order if table[i][0] == _INDEX), None)
    if data_i is not None and index_i is not None:
        index = contents[index_i]
        packed = not inflated and table[index_i][1] & _XZ_FLAG
        if packed:
            try:
                index = lzma.decompress(index)
            except lzma.LZMAError:
                index = None
        if index is not None:
            index = bytearray(index)
            section = contents[data_i]
            offset = 0
            for at, length in _stream_crc_fields(bytes(index)):
                struct.pack_into("<I", index, at + 4, _crc(section[offset: offset + length]))
                offset += length
            contents[index_i] = lzma.compress(bytes(index), check=lzma.CHECK_NONE, preset=0) if packed else bytes(index)
    stored = {}
    for i in order:
        b = contents[i]
        if inflated and table[i][1] & _XZ_FLAG:
            b = lzma.compress(b, check=lzma.CHECK_NONE, preset=0)
        stored[i] = b
    pos = body_start
    for i in order:
        table[i][3], table[i][4] = pos, len(stored[i])
        if table[i][0] != _DATA:
            table[i][2] = _crc(stored[i])
        pos += len(stored[i])
    packed = b"".join(struct.pack("<HHIQQQ", *e) for e in table)
    head = data[:28]
    return head + struct.pack("<I", _crc(head + packed)) + packed + b"".join(stored[i] for i in order)


# --- the target --------------------------------------------------------------------------------------

_SCRATCH = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / f"dcz-fuzz-{os.getpid()}.dcz"


def file_bytes(data: bytes) -> bytes:
    """The .dcz bytes a fuzz input stands for."""
    if not data:
        return b""
    mode, body = data[0], data[1:]
    if mode & MODE_FIX_CRC:
        body = fix_up(body, inflated=bool(mode & MODE_INFLATED_XZ))
    return body


def test_one_input(data: bytes) -> None:
    """The fuzz target: read_dcz and load on the file ``data`` stands for; anything but DczError escapes."""
    _SCRATCH.write_bytes(file_bytes(data))
    try:
        try:
            dcformat.read_dcz(_SCRATCH, LIMITS)
        except DczError:
            pass
        try:
            dcformat.load(_SCRATCH, limits=LIMITS)
        except DczError:
            pass
    finally:
        _SCRATCH.unlink(missing_ok=True)  # libFuzzer leaves without running atexit handlers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--make-corpus", metavar="DIR", help="write the seed corpus into DIR and exit")
    parser.add_argument("--to-dcz", nargs=2, metavar=("INPUT", "OUT"), help="write the .dcz file a fuzz input stands for")
    args, rest = parser.parse_known_args()
    if args.make_corpus:
        folder = Path(args.make_corpus)
        folder.mkdir(parents=True, exist_ok=True)
        make_corpus(folder)
        print(f"wrote {len(list(folder.iterdir()))} seeds to {folder}")
        return
    if args.to_dcz:
        src, dst = args.to_dcz
        Path(dst).write_bytes(file_bytes(Path(src).read_bytes()))
        print(f"wrote {dst}")
        return
    for a in rest:
        if not a.startswith("-") and (not os.path.exists(a) or os.path.isdir(a) and not any(Path(a).iterdir())):
            Path(a).mkdir(parents=True, exist_ok=True)
            make_corpus(Path(a))
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    atheris.Setup([sys.argv[0], *rest], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
