"""`dcz compress` / `dcz decompress` on hostile or broken input: one clean line, exit 1, nothing written.

Each case goes through the command line (click's runner) and checks that the exit code is 1, stderr is one
line naming the problem (no traceback), and the folder holds exactly what it held before: no output file
and no temporary file. The ingest-level checks themselves are in tests/test_onnx_io.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dcformat import codec
from dcformat.cli import EXIT_ERROR, EXIT_INTERRUPTED, main

N = 600  # floats per weight: large enough to be compressed and to be read from the file on demand


def _model(weights: list[TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])
    nodes, prev = [], "x"
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("Add", [prev, w.name], [f"h{i}" if i < len(weights) - 1 else "y"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [x], [y], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(N).astype(np.float32) for _ in range(n)]


def _inline_model(folder: Path) -> Path:
    path = folder / "m.onnx"
    ws = [onnx.numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(_weights())]
    path.write_bytes(_model(ws).SerializeToString())
    return path


def _external_model(folder: Path, location: str, *, length: int = 4 * N) -> Path:
    """A model in ``folder`` whose weight w1 lives at ``location`` (w0 inline)."""
    w0, w1 = _weights()
    t = TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[N], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    path = folder / "m.onnx"
    path.write_bytes(_model([onnx.numpy_helper.from_array(w0, "w0"), t]).SerializeToString())
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path):
    """A file outside the model's folder, of the right size to be read as w1: it must never be."""
    p = tmp_path / "secret.bin"
    p.write_bytes(np.ones(N, dtype=np.float32).tobytes())
    return p


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.lstat().st_size for p in folder.iterdir()}


def _refused(args: list, folder: Path, *needles: str, code: int = EXIT_ERROR) -> str:
    """Run dcz; check exit code, one clean line naming the problem, and an unchanged folder."""
    before = _listing(folder)
    r = CliRunner().invoke(main, [str(a) for a in args])
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dcz: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _listing(folder) == before, "files appeared, vanished or changed in the folder"
    return lines[0]


def test_truncated_protobuf(folder):
    good = _inline_model(folder).read_bytes()
    (folder / "m.onnx").write_bytes(good[: len(good) // 2])
    _refused(["compress", folder / "m.onnx"], folder, "m.onnx", "not an ONNX model")


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89",
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(40)),
    b"just some text, not a model\n" * 10,
], ids=["png", "zip", "text"])
def test_not_onnx(folder, content):
    (folder / "m.onnx").write_bytes(content)
    _refused(["compress", folder / "m.onnx"], folder, "m.onnx", "not an ONNX model")


def test_empty_file(folder):
    (folder / "m.onnx").write_bytes(b"")
    _refused(["compress", folder / "m.onnx"], folder, "m.onnx", "empty")


def test_missing_model(folder):
    _refused(["compress", folder / "nope.onnx"], folder, "nope.onnx", "not found")


def test_missing_external_data(folder):
    _external_model(folder, "w1.bin")
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", "w1.bin", "not found")


def test_short_external_data(folder):
    _external_model(folder, "w1.bin")
    (folder / "w1.bin").write_bytes(b"\0" * (4 * N - 4))
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", "shorter")


def test_external_length_disagrees_with_dims(folder):
    _external_model(folder, "w1.bin", length=4 * N - 4)
    (folder / "w1.bin").write_bytes(b"\0" * (4 * N))
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", f"need {4 * N}")


def test_external_dotdot(folder, outside):
    _external_model(folder, "../secret.bin")
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", "'..'")


def test_external_absolute(folder, outside):
    _external_model(folder, str(outside))
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", "absolute path")


def test_external_symlink_outside(folder, outside):
    os.symlink(outside, folder / "w1.bin")
    _external_model(folder, "w1.bin")
    _refused(["compress", folder / "m.onnx"], folder, "'w1'", "outside the model's folder")


def test_external_in_attribute_with_a_lying_type(folder, outside):
    """A Constant-like tensor hidden in an attribute declared INT: onnx.load would follow its reference."""
    path = _inline_model(folder)
    model = onnx.load(str(path))
    t = TensorProto(name="hidden", data_type=TensorProto.FLOAT, dims=[N], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(4 * N))):
        e = t.external_data.add()
        e.key, e.value = key, value
    a = model.graph.node[0].attribute.add()
    a.name, a.type, a.i = "lie", onnx.AttributeProto.INT, 3
    a.t.CopyFrom(t)
    path.write_bytes(model.SerializeToString())
    _refused(["compress", path], folder, "'hidden'", "'..'")


def test_output_is_the_input(folder):
    path = _inline_model(folder)
    _refused(["compress", path, "-o", path, "--force"], folder, "is the input file")


def test_output_is_the_external_data(folder):
    path = _external_model(folder, "w1.bin")
    (folder / "w1.bin").write_bytes(np.ones(N, dtype=np.float32).tobytes())
    _refused(["compress", path, "-o", folder / "w1.bin", "--force"], folder, "w1.bin", "input file")


def test_decompress_output_is_the_input(folder):
    path = _inline_model(folder)
    r = CliRunner().invoke(main, ["compress", "-q", str(path)])
    assert r.exit_code == 0, r.output
    _refused(["decompress", folder / "m.dcz", "-o", folder / "m.dcz", "--force"], folder, "is the input file")


def _failing_on_second(monkeypatch, module, name: str, exc: BaseException):
    real = getattr(module, name)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fail)
    return calls


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), EXIT_INTERRUPTED),
                                       (OSError(28, "No space left on device"), EXIT_ERROR)],
                         ids=["ctrl-c", "disk-full"])
def test_compress_interrupted_mid_write(folder, monkeypatch, exc, code):
    path = _inline_model(folder)
    calls = _failing_on_second(monkeypatch, codec, "encode_tensor", exc)
    _refused(["compress", path], folder, code=code)
    assert len(calls) == 2  # the first tensor was already in the temporary file


@pytest.mark.parametrize("exc, code", [(KeyboardInterrupt(), EXIT_INTERRUPTED),
                                       (OSError(28, "No space left on device"), EXIT_ERROR)],
                         ids=["ctrl-c", "disk-full"])
def test_decompress_interrupted_mid_write(folder, monkeypatch, exc, code):
    import dcformat.api

    path = _inline_model(folder)
    assert CliRunner().invoke(main, ["compress", "-q", str(path), "--min-elements", "1"]).exit_code == 0
    calls = _failing_on_second(monkeypatch, dcformat.api, "decode_tensor", exc)
    _refused(["decompress", folder / "m.dcz", "-o", folder / "back.onnx"], folder, code=code)
    assert len(calls) == 2


def test_compress_failure_keeps_an_existing_output(folder, monkeypatch):
    """--force over an existing file: a failed run leaves the old file as it was."""
    path = _inline_model(folder)
    (folder / "m.dcz").write_bytes(b"old contents")
    _failing_on_second(monkeypatch, codec, "encode_tensor", OSError(28, "No space left on device"))
    _refused(["compress", path, "--force"], folder)
    assert (folder / "m.dcz").read_bytes() == b"old contents"
