"""A model past protobuf's 2 GiB limit: weights in external data, compressed and decompressed with bounded memory.

The model is written streamed (one tensor at a time to its external data file). Each step runs in a fresh
subprocess that reports its peak resident set (VmHWM, reset after the imports) and, for compress, a digest
of the exact values the codec promises to decode (each tensor's reference). The decompressed model must
hold those values bit for bit, in external data (protobuf cannot hold it in one file), and pass
onnx.checker. The slow test does this at full size; the fast one lowers the single-file threshold
(``onnx_rebuild.MAX_SINGLE_FILE_BYTES``) so that the same code path runs on a few megabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]

#: The full-size model: 36 weights of 4096 x 4096 float32 (64 MiB each), 2.25 GiB in all.
BIG_TENSORS, BIG_ROWS, COLS = 36, 4096, 4096
#: Rows generated at a time while writing: memory for the test itself stays small.
CHUNK_ROWS = 256

_CHILD = r"""
import hashlib, json, sys
step, src, dst, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
from dcformat import api, codec, onnx_rebuild
from dcformat.container import ReadLimits
if limit:
    onnx_rebuild.MAX_SINGLE_FILE_BYTES = limit
digests = {}
real_encode = codec.encode_tensor
def encode(t):
    enc = real_encode(t)
    digests[enc.entry.name] = hashlib.sha256(memoryview(enc.reference).cast("B")).hexdigest()
    return enc
codec.encode_tensor = encode
baseline = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
if step == "compress":
    api.compress(src, dst, overwrite=True)
else:
    api.decompress(src, dst, overwrite=True)
print("RESULT " + json.dumps({"peak": status("VmHWM"), "baseline": baseline, "digests": digests}))
"""


def _step(step: str, src: Path, dst: Path, limit: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, step, str(src), str(dst), str(limit)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _block(rows: int, cols: int, seed: int) -> np.ndarray:
    """Compressible weights: mostly zero, the rest a few levels (about 1 bit per weight once coded)."""
    rng = np.random.default_rng(seed)
    levels = np.array([-0.5, -0.25, 0.25, 0.5], dtype=np.float32)
    out = levels[rng.integers(0, 4, size=(rows, cols))] * (rng.random((rows, cols)) < 0.15)
    return out.astype(np.float32)


def write_model(folder: Path, n: int, rows: int, cols: int) -> Path:
    """A MatMul chain whose ``n`` weights of ``rows x cols`` float32 live in ``weights.bin``, written in chunks."""
    data = folder / "weights.bin"
    inits = []
    with open(data, "wb") as f:
        for i in range(n):
            offset = f.tell()
            for r in range(0, rows, CHUNK_ROWS):
                f.write(_block(min(CHUNK_ROWS, rows - r), cols, seed=i * 100_003 + r).tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                e = t.external_data.add()
                e.key, e.value = key, value
            inits.append(t)
    nodes, prev = [], "x"
    for i in range(n):  # x [1, rows] @ w0 [rows, cols] ...; square weights chain, others add up
        out = f"h{i}" if i < n - 1 else "y"
        nodes.append(helper.make_node("MatMul", [prev if rows == cols or i == 0 else "x", f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _check_rebuilt(path: Path, digests: dict[str, str]) -> None:
    """The rebuilt model keeps every weight in external data, bit-exact to the codec's references."""
    onnx.checker.check_model(str(path))  # by path: the checker reads the external data itself
    model = onnx.load(str(path), load_external_data=False)
    seen = {}
    for t in model.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL, t.name
        entries = {e.key: e.value for e in t.external_data}
        data = path.parent / entries["location"]
        arr = np.memmap(data, dtype="<f4", mode="r", offset=int(entries["offset"]), shape=tuple(t.dims))
        h = hashlib.sha256()
        for r in range(0, arr.shape[0], CHUNK_ROWS):
            h.update(np.ascontiguousarray(arr[r:r + CHUNK_ROWS]).tobytes())
        seen[t.name] = h.hexdigest()
        del arr
    assert seen == digests


def test_external_data_path_on_a_small_model(tmp_path):
    """The >2 GiB code path, with the single-file threshold lowered to 1 MiB."""
    src = write_model(tmp_path, 4, 512, 512)  # 4 MiB of weights
    dcz, out = tmp_path / "big.dcz", tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    c = _step("compress", src, dcz, limit=1 << 20)
    assert len(c["digests"]) == 4
    _step("decompress", dcz, out, limit=1 << 20)
    assert (out.parent / "big.onnx.data").stat().st_size >= 4 * 512 * 512 * 4
    _check_rebuilt(out, c["digests"])


@pytest.mark.slow
def test_model_over_2gb(tmp_path):
    need = 3 * BIG_TENSORS * BIG_ROWS * COLS * 4
    if shutil.disk_usage(tmp_path).free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free in {tmp_path}")
    src = write_model(tmp_path, BIG_TENSORS, BIG_ROWS, COLS)
    size = (tmp_path / "weights.bin").stat().st_size
    assert size > 2**31
    dcz, out = tmp_path / "big.dcz", tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    c = _step("compress", src, dcz)
    (tmp_path / "weights.bin").unlink()  # room on the disk for the rebuilt copy
    d = _step("decompress", dcz, out)
    # A bound that loading the weights would break by far: a few tensors' working memory, not the model.
    tensor = BIG_ROWS * COLS * 4
    for name, r in (("compress", c), ("decompress", d)):
        above = r["peak"] - r["baseline"]
        print(f"{name}: peak {r['peak'] / 2**20:.0f} MiB, {above / 2**20:.0f} MiB above the imports; "
              f"model {size / 2**20:.0f} MiB")
        assert above < size / 4, (name, above)
    assert d["peak"] - d["baseline"] < 4 * tensor
    _check_rebuilt(out, c["digests"])
