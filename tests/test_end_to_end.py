"""Real models end to end: ONNX -> .dcz -> ONNX, checker-valid, weights bit-exact, run in onnxruntime."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import dcformat
from dcformat import fidelity
from dcformat.demo import accuracy, bundled
from dcformat.onnx_ingest import extract_weights, load_model
from models import model_path

# Which real-model layouts each case covers: Constant-node weights (ppocr-cls), weights inside If subgraphs
# (silero-vad), external data (silero-vad-op15 re-saved with save_as_external_data), BN-folded convs
# (centerface), plain initializers (the bundled LeNets).
CASES = {
    "ppocr-cls": {},
    "silero-vad": {"shape_overrides": {"input": (1, 576), "state": (2, 1, 128)}, "value_overrides": {"sr": 16000}},
    "silero-vad-op15": {"dim_overrides": {"sequence": 576}, "value_overrides": {"sr": 16000}},
    "centerface": {},
    "basic-pitch": {},
}


def _round_trip(src, tmp_path, policy=None, **inputs_kw):
    result = dcformat.compress(src, tmp_path / "m.dcz", policy, keep_references=True)
    out = dcformat.decompress(result.output, tmp_path / "rebuilt.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    _, rebuilt_weights = extract_weights(load_model(out))
    assert {w.name for w in rebuilt_weights} == set(result.references)
    for w in rebuilt_weights:  # bit for bit what the compressor chose
        ref = result.references[w.name]
        assert w.array.dtype == ref.dtype and w.array.tobytes() == ref.tobytes(), w.name
    feeds = fidelity.random_inputs(onnx.load(str(src), load_external_data=False), **inputs_kw)
    a, b = fidelity.run(src, feeds), fidelity.run(out, feeds)
    assert a.keys() == b.keys() and all(np.all(np.isfinite(v)) for v in b.values() if v.dtype.kind == "f")
    return result, out


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(CASES))
def test_public_model_round_trip(name, tmp_path):
    src = model_path(name)
    if name == "silero-vad-op15":  # make an external-data copy of it
        m = onnx.load(str(src))
        onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="ext.onnx.data", size_threshold=256)
        assert (tmp_path / "ext.onnx.data").stat().st_size > 1_000_000
        src = tmp_path / "ext.onnx"
    result, out = _round_trip(src, tmp_path, **CASES[name])
    assert result.ratio > 1.5  # ppocr-cls: 258 of its 285 tensors are BN parameters and tiny convs, kept raw
    coded = [t for t in result.tensors if t.layout != "raw"]
    assert coded, "nothing was compressed"


@pytest.mark.realmodel
def test_constant_and_subgraph_weights_are_compressed(tmp_path):
    # PaddleOCR keeps every weight in Constant nodes; silero-vad inside If branches.
    r1 = dcformat.compress(model_path("ppocr-cls"), tmp_path / "a.dcz")
    r2 = dcformat.compress(model_path("silero-vad"), tmp_path / "b.dcz")
    assert sum(t.layout != "raw" for t in r1.tensors) >= 20
    assert sum(t.layout != "raw" for t in r2.tensors) >= 10


@pytest.mark.realmodel
def test_passthrough_model_without_float_weights(tmp_path):
    src = model_path("logreg-iris")
    result = dcformat.compress(src, tmp_path / "m.dcz")
    out = dcformat.decompress(result.output, tmp_path / "m.onnx")
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(src)).SerializeToString()


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_bundled_lenet_keeps_accuracy(model, tmp_path):
    src = tmp_path / f"{model}.onnx"
    shutil.copyfile(bundled(f"{model}.onnx"), src)
    with np.load(bundled("mnist_test.npz")) as z:
        x, y = z["x"], z["y"]
    result, out = _round_trip(src, tmp_path, dcformat.Policy.paper())
    before, after = accuracy(src, x, y), accuracy(out, x, y)
    assert before > 0.95
    assert after >= before - 0.004  # at most 2 of 500 digits change
    assert result.ratio > 6


def test_float16_and_bfloat16_models(tmp_path):
    # Half-precision weights are compressed in their own dtype and come back as it.
    from onnx import TensorProto, helper, numpy_helper
    import ml_dtypes

    rng = np.random.default_rng(0)
    for dtype, np_dtype in ((TensorProto.FLOAT16, np.float16), (TensorProto.BFLOAT16, ml_dtypes.bfloat16)):
        w = rng.normal(size=(64, 64)).astype(np_dtype)
        init = numpy_helper.from_array(w.view(np.uint16) if dtype == TensorProto.BFLOAT16 else w, "W")
        if dtype == TensorProto.BFLOAT16:
            init = helper.make_tensor("W", dtype, [64, 64], w.view(np.uint16).tobytes(), raw=True)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
            [helper.make_tensor_value_info("X", dtype, [1, 64])], [helper.make_tensor_value_info("Y", dtype, [1, 64])],
            [init])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        src = tmp_path / f"m{dtype}.onnx"
        onnx.save(model, str(src))
        result = dcformat.compress(src, tmp_path / f"m{dtype}.dcz", keep_references=True)
        assert result.tensors[0].layout == "dense" and result.references["W"].dtype.itemsize == 2
        out = dcformat.decompress(result.output, tmp_path / f"r{dtype}.onnx")
        t = onnx.load(str(out)).graph.initializer[0]
        assert t.data_type == dtype and t.raw_data == result.references["W"].tobytes()
