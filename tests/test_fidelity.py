"""Tests of dcformat.fidelity: metrics on hand-made arrays, random inputs on hand-built graphs, the bundled LeNets."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dcformat import fidelity as F
from dcformat.errors import InputError

DATA = Path(F.__file__).resolve().parent / "data"
LENET300 = DATA / "lenet300.onnx"
LENET5 = DATA / "lenet5.onnx"
MNIST = DATA / "mnist_test.npz"


# ---------------------------------------------------------------------------------------------------------- compare
def test_compare_identical_outputs():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    (f,) = F.compare({"y": a}, {"y": a.copy()})
    assert f == F.OutputFidelity("y", 0.0, 0.0, pytest.approx(1.0), 1.0, 3)


def test_compare_known_values():
    ref = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)  # ||ref|| = 5
    cand = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)  # diff has norm 1, max 1
    (f,) = F.compare({"s": ref}, {"s": cand})
    assert f.rel_l2 == pytest.approx(0.2)
    assert f.max_abs == 1.0
    assert f.cosine == pytest.approx(25.0 / (5.0 * math.sqrt(26.0)))
    # row 0: argmax 1 vs 1; row 1: argmax 0 (tie, first) vs 1
    assert f.top1_agreement == 0.5
    assert f.n_samples == 2


def test_compare_top1_over_all_leading_axes():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2, 5, 7)).astype(np.float32)  # [N, T, C]
    cand = ref.copy()
    cand[0, 3] = -cand[0, 3]  # flips the argmax of one row out of 10 (a negated row's max becomes its min)
    (f,) = F.compare({"p": ref}, {"p": cand})
    assert f.n_samples == 10
    assert f.top1_agreement == pytest.approx(0.9)
    assert f.max_abs == pytest.approx(2 * np.abs(ref[0, 3]).max())


def test_compare_no_top1_for_vectors_ints_and_single_column():
    fids = F.compare(
        {"v": np.ones(5, np.float32), "i": np.ones((2, 3), np.int64), "c": np.ones((4, 1), np.float32)},
        {"v": np.ones(5, np.float32), "i": np.ones((2, 3), np.int64), "c": np.ones((4, 1), np.float32)},
    )
    assert [f.name for f in fids] == ["v", "i", "c"]
    assert all(f.top1_agreement is None and f.n_samples == 0 for f in fids)
    assert all(f.rel_l2 == 0.0 for f in fids)


def test_compare_zero_reference_and_nan():
    (z,) = F.compare({"z": np.zeros(3)}, {"z": np.zeros(3)})
    assert (z.rel_l2, z.max_abs, z.cosine) == (0.0, 0.0, 1.0)
    (nz,) = F.compare({"z": np.zeros(3)}, {"z": np.array([0.0, 1e-3, 0.0])})
    assert nz.rel_l2 > 1e100 and nz.max_abs == pytest.approx(1e-3) and nz.cosine == 0.0
    (n,) = F.compare({"n": np.array([1.0, 2.0])}, {"n": np.array([1.0, np.nan])})
    assert math.isnan(n.rel_l2) and math.isnan(n.max_abs)
    (inf,) = F.compare({"i": np.array([np.inf, 1.0])}, {"i": np.array([np.inf, 1.0])})
    assert inf.max_abs == 0.0


def test_compare_strings_only_identical_or_not():
    s = np.array(["a", "b"])
    (same,) = F.compare({"l": s}, {"l": s.copy()})
    (diff,) = F.compare({"l": s}, {"l": np.array(["a", "c"])})
    assert (same.rel_l2, same.cosine) == (0.0, 1.0)
    assert diff.rel_l2 == math.inf and diff.cosine == 0.0


def test_compare_errors_name_the_output():
    with pytest.raises(InputError, match="no output 'y'"):
        F.compare({"y": np.zeros(2)}, {"z": np.zeros(2)})
    with pytest.raises(InputError, match=re.escape("output 'y': reference shape (2,), candidate shape (3,)")):
        F.compare({"y": np.zeros(2)}, {"y": np.zeros(3)})


# ---------------------------------------------------------------------------------------------------- random_inputs
def _model(inputs, outputs, nodes, initializers=(), ir_version=8, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


def _dynamic_model() -> onnx.ModelProto:
    """x float [batch, 3, H, W], ids int64 [batch, L], mask bool [L], w an initializer also listed as input (IR 3)."""
    w = numpy_helper.from_array(np.full((1,), 2.0, np.float32), "w")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "H", None]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "L"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["L"]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("ids2", TensorProto.INT64, None),
        helper.make_tensor_value_info("nmask", TensorProto.BOOL, None),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["y"]),
        helper.make_node("Add", ["ids", "ids"], ["ids2"]),
        helper.make_node("Not", ["mask"], ["nmask"]),
    ]
    return _model(inputs, outputs, nodes, [w], ir_version=3, opset=9)


def test_random_inputs_shapes_dtypes_and_ranges():
    m = _dynamic_model()
    x = F.random_inputs(m, batch=4, seed=3)
    assert list(x) == ["x", "ids", "mask"]  # the initializer "w" is not fed
    assert x["x"].dtype == np.float32 and x["x"].shape == (4, 3, F.DEFAULT_DIM, F.DEFAULT_DIM)
    assert 0.0 <= x["x"].min() and x["x"].max() < 1.0
    assert x["ids"].dtype == np.int64 and x["ids"].shape == (4, F.DEFAULT_DIM)
    assert 0 <= x["ids"].min() and x["ids"].max() < F.INT_HIGH
    assert x["mask"].dtype == np.bool_ and x["mask"].shape == (F.DEFAULT_DIM,)
    assert x["mask"].any() and not x["mask"].all()
    out = F.run(m, x)
    np.testing.assert_array_equal(out["y"], 2 * x["x"])
    np.testing.assert_array_equal(out["nmask"], ~x["mask"])


def test_random_inputs_seeded():
    m = _dynamic_model()
    a, b, c = F.random_inputs(m, seed=5), F.random_inputs(m, seed=5), F.random_inputs(m, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x"], c["x"])


def test_random_inputs_overrides():
    m = _dynamic_model()
    x = F.random_inputs(m, dim_overrides={"H": 7, "L": 5}, shape_overrides={"x": (2, 3, 4, 4)},
                        value_overrides={"mask": [True, False]})
    assert x["x"].shape == (2, 3, 4, 4)
    assert x["ids"].shape == (1, 5)
    assert x["mask"].tolist() == [True, False] and x["mask"].dtype == np.bool_
    with pytest.raises(InputError, match=r"value_overrides names \['nope'\]"):
        F.random_inputs(m, value_overrides={"nope": 1})


def test_random_inputs_batch_name_follows_to_other_axes():
    """A dim named like the batch on axis 0 of one input is the batch on any axis (silero's state [2, batch, 128])."""
    m = _model(
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, "batch", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [helper.make_node("Identity", ["s"], ["o"])],
    )
    x = F.random_inputs(m, batch=3, value_overrides={"sr": 16000})
    assert x["a"].shape == (3, F.DEFAULT_DIM) and x["s"].shape == (2, 3, 8)
    assert x["sr"].shape == () and x["sr"].dtype == np.int64 and int(x["sr"]) == 16000


def test_random_inputs_ir4_initializer_listed_as_input_is_not_fed():
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    m = _model(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_node("MatMul", ["x", "W"], ["y"])], [w], ir_version=4, opset=11,
    )
    x = F.random_inputs(m.SerializeToString(), batch=2)
    assert list(x) == ["x"] and x["x"].shape == (2, 2)
    np.testing.assert_allclose(F.run(m, x)["y"], x["x"] @ np.ones((2, 2), np.float32), rtol=1e-6)


def test_random_inputs_refuses_what_it_cannot_make():
    no_shape = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                      [helper.make_node("Identity", ["x"], ["y"])])
    with pytest.raises(InputError, match="input 'x' declares no shape"):
        F.random_inputs(no_shape)
    assert F.random_inputs(no_shape, shape_overrides={"x": (2,)})["x"].shape == (2,)
    strings = _model([helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
                     [helper.make_tensor_value_info("u", TensorProto.STRING, None)],
                     [helper.make_node("Identity", ["t"], ["u"])])
    with pytest.raises(InputError, match="input 't' has element type STRING"):
        F.random_inputs(strings)
    with pytest.raises(InputError, match="batch must be >= 1"):
        F.random_inputs(no_shape, batch=0)
    with pytest.raises(InputError, match="cannot parse"):
        F.random_inputs(b"not an onnx model at all \xff\xff")


# ----------------------------------------------------------------------------------------------- load_inputs / run
def test_load_inputs_roundtrip_and_errors(tmp_path):
    p = tmp_path / "in.npz"
    np.savez(p, input=np.zeros((2, 1, 28, 28), np.float32))
    x = F.load_inputs(p)
    assert list(x) == ["input"] and x["input"].shape == (2, 1, 28, 28)
    with pytest.raises(InputError, match="does not exist"):
        F.load_inputs(tmp_path / "missing.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match="single .npy array"):
        F.load_inputs(tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 this is no zip")
    with pytest.raises(InputError, match="cannot read"):
        F.load_inputs(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="cannot read"):
        F.load_inputs(tmp_path / "obj.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(InputError, match="holds no arrays"):
        F.load_inputs(tmp_path / "empty.npz")


def test_run_validates_inputs_by_name():
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(InputError, match=r"needs input\(s\) \['input'\], which are missing"):
        F.run(LENET300, {"image": x})
    with pytest.raises(InputError, match=r"no input\(s\) named \['extra'\]"):
        F.run(LENET300, {"input": x, "extra": x})
    with pytest.raises(InputError, match="input 'input' .*dtype float64, but the model declares float32"):
        F.run(LENET300, {"input": x.astype(np.float64)})
    with pytest.raises(InputError, match=r"input 'input' .*rank 3, but the model declares rank 4"):
        F.run(LENET300, {"input": x[0]})
    with pytest.raises(InputError, match=r"input 'input' .*has 2 on axis 2, but the model declares 28"):
        F.run(LENET300, {"input": np.zeros((2, 1, 2, 28), np.float32)})
    with pytest.raises(InputError, match="does not exist"):
        F.run(DATA / "no_such_model.onnx", {"input": x})
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        F.run(b"garbage", {"input": x})


def test_run_accepts_path_bytes_and_proto_alike():
    x = F.random_inputs(LENET300, batch=3)
    assert x["input"].shape == (3, 1, 28, 28)
    by_path = F.run(str(LENET300), x)["logits"]
    assert by_path.shape == (3, 10)
    np.testing.assert_array_equal(by_path, F.run(LENET300.read_bytes(), x)["logits"])
    np.testing.assert_array_equal(by_path, F.run(onnx.load(LENET300), x)["logits"])


def test_run_converts_sequence_of_maps():
    """A ZipMap output (ai.onnx.ml) becomes rows of values in sorted-key order."""
    m = _model(
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])],
        [helper.make_value_info("z", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))],
        [helper.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[2, 0, 1])],
    )
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    p = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], np.float32)
    z = F.run(m, {"p": p})["z"]
    np.testing.assert_allclose(z, p[:, [1, 2, 0]])  # keys sorted: 0, 1, 2 are columns 1, 2, 0 of p


# ------------------------------------------------------------------------------------------- bundled models + data
def _readme_accuracies() -> dict[str, float]:
    text = (DATA / "README.md").read_text()
    acc = {}
    for label, key in (("LeNet-300-100", "lenet300"), ("LeNet-5", "lenet5")):
        m = re.search(rf"^\| {re.escape(label)} \| [\d.]+ % \(\d+/\d+\) \| ([\d.]+) % \((\d+)/(\d+)\)", text, re.M)
        assert m, f"README has no accuracy row for {label}"
        acc[key] = int(m.group(2)) / int(m.group(3))
        assert acc[key] == pytest.approx(float(m.group(1)) / 100, abs=5e-4)
    return acc


def test_bundled_test_digits():
    with np.load(MNIST) as z:
        assert sorted(z.files) == ["x", "y"]
        x, y = z["x"], z["y"]
    assert x.dtype == np.float32 and x.shape == (500, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (500,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.99
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 50))


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_bundled_model_accuracy_matches_readme(name):
    with np.load(MNIST) as z:
        x, y = z["x"], z["y"]
    logits = F.run(DATA / f"{name}.onnx", {"input": x})["logits"]
    assert logits.shape == (500, 10) and logits.dtype == np.float32
    acc = float((logits.argmax(1) == y).mean())
    assert acc == pytest.approx(_readme_accuracies()[name], abs=0.002)
    assert acc > 0.95


@pytest.mark.parametrize("path", [LENET300, LENET5])
def test_bundled_models_are_plain_initializers(path):
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert not any(n.op_type == "Constant" for n in m.graph.node)
    weights = {n.input[1] for n in m.graph.node if n.op_type in ("Gemm", "Conv")}
    assert weights <= {t.name for t in m.graph.initializer} and weights
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_check_models_lenet300_with_itself_and_perturbed():
    with np.load(MNIST) as z:
        inputs = {"input": z["x"][:200]}
    same = F.check_models(LENET300, LENET300, inputs)
    assert len(same) == 1
    assert same[0].name == "logits" and same[0].rel_l2 == 0.0 and same[0].max_abs == 0.0
    assert same[0].top1_agreement == 1.0 and same[0].n_samples == 200
    assert same[0].cosine == pytest.approx(1.0)

    m = onnx.load(LENET300)
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        if t.name.endswith(".weight"):
            w = numpy_helper.to_array(t)
            noisy = w + rng.normal(scale=0.5 * w.std(), size=w.shape).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(noisy, t.name))
    worse = F.check_models(LENET300, m, inputs)[0]
    assert worse.rel_l2 > 0.05 and worse.max_abs > 0.1
    assert worse.cosine < same[0].cosine
    assert worse.top1_agreement < 1.0

    rand = F.check_models(LENET300, m, seed=1)  # random inputs: batch 1
    assert rand[0].n_samples == 1 and rand[0].rel_l2 > 0.0


# ---------------------------------------------------------------------------------------------------- real models
# What random_inputs needs to run each public model; None: the defaults run it.
_REAL_OVERRIDES = {
    "silero-vad": dict(shape_overrides={"input": (1, 576), "state": (2, 1, 128)}, value_overrides={"sr": 16000}),
    "silero-vad-op15": dict(dim_overrides={"sequence": 576}, value_overrides={"sr": 16000}),
}


def _real_params():
    import models

    out = []
    for name in models.MODEL_NAMES:
        marks = [pytest.mark.realmodel]
        if name in models.BIG_MODELS:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _real_params())
def test_random_inputs_run_public_model(name):
    import models

    path = models.model_path(name)
    x = F.random_inputs(path, **_REAL_OVERRIDES.get(name, {}))
    fids = F.check_models(path, path, x)
    assert fids and all(f.rel_l2 == 0.0 for f in fids)


def test_silero_needs_its_sample_rate():
    """Documented weakness: a random value for a meaningful input (silero's sample rate ``sr``) does not run."""
    import models

    path = models.model_path("silero-vad")
    shapes = _REAL_OVERRIDES["silero-vad"]["shape_overrides"]
    x = F.random_inputs(path, shape_overrides=shapes)
    assert 0 <= int(x["sr"]) < F.INT_HIGH
    with pytest.raises(InputError, match="onnxruntime failed to run"):
        F.check_models(path, path, x)
    x["sr"] = np.array(16000, np.int64)
    assert F.check_models(path, path, x)[0].rel_l2 == 0.0


def test_run_refuses_inputs_that_are_not_a_mapping():
    from dcformat.demo import bundled

    with pytest.raises(InputError, match="mapping of input name to array, not list"):
        F.run(str(bundled("lenet300.onnx")), [{"input": np.zeros((1, 1, 28, 28), np.float32)}])


def test_run_each_runs_every_feed_in_one_session(monkeypatch):
    """onnxruntime keeps the memory of a destroyed session's runs (microsoft/onnxruntime#26831): a session per feed
    dict grew magika's process by 300 MB a run. run_each (and allocate.run_all) open one session for all."""
    from dcformat import allocate

    opened = []
    real = F._session
    monkeypatch.setattr(F, "_session", lambda *a: opened.append(1) or real(*a))
    feeds = [F.random_inputs(LENET300, batch=b, seed=b) for b in (1, 2, 3)]
    outs = list(F.run_each(LENET300, feeds))
    assert len(opened) == 1 and [o["logits"].shape for o in outs] == [(1, 10), (2, 10), (3, 10)]
    for f, o in zip(feeds, outs):
        np.testing.assert_array_equal(o["logits"], F.run(LENET300, f)["logits"])
    opened.clear()
    allocate.run_all(onnx.load(LENET300), feeds)
    assert len(opened) == 1
    from dcformat.onnx_ingest import extract_weights

    opened.clear()
    graph, weights = extract_weights(onnx.load(LENET300))
    assert allocate.input_importance(graph, weights, feeds)  # the layer-input energies, one session for 3 runs
    assert len(opened) == 1
    with pytest.raises(InputError, match=r"input 'input' .*rank 3"):  # a bad feed dict anywhere is named
        list(F.run_each(LENET300, [feeds[0], {"input": feeds[1]["input"][0]}]))
    with pytest.raises(InputError, match="mapping of input name to array, not list"):
        list(F.run_each(LENET300, [feeds[0], [feeds[1]]]))
