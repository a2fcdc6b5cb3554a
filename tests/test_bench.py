"""tools/bench.py: the matched-fidelity search, the task scores, and one real bench run on the bundled LeNet-300-100."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench  # noqa: E402
from bench import Bound, DczPoint, Fidelity, Task  # noqa: E402


def test_ctc_strings_merge_repeats_and_drop_blanks():
    # classes per step: 0 is blank. [3, 3, 0, 3, 5, 5, 0] -> (3, 3, 5); [0, 0, 0, ...] -> ()
    seq = np.array([[3, 3, 0, 3, 5, 5, 0], [0, 0, 0, 0, 0, 0, 0]])
    scores = np.eye(6, dtype=np.float32)[seq]  # [N=2, T=7, C=6]
    assert bench._ctc_strings(scores, time_major=False) == [(3, 3, 5), ()]
    assert bench._ctc_strings(scores.transpose(1, 0, 2), time_major=True) == [(3, 3, 5), ()]


def test_task_scores():
    seq = np.array([[1, 0, 2], [2, 2, 0]])
    ref = {"y": np.eye(3, dtype=np.float32)[seq]}
    other = np.array([[1, 1, 2], [2, 0, 1]])  # the first decodes the same (1, 2), the second does not
    out = {"y": np.eye(3, dtype=np.float32)[other]}
    assert bench._task_score(Task("ctc"), ref, out, None, None) == 0.5
    p_ref, p_out = {"p": np.array([[0.9], [0.2], [0.6]])}, {"p": np.array([[0.8], [0.3], [0.4]])}
    assert bench._task_score(Task("threshold"), p_ref, p_out, None, None) == pytest.approx(2 / 3)
    logits = {"l": np.array([[0.1, 0.9], [0.8, 0.2]])}
    assert bench._task_score(Task("accuracy"), logits, logits, np.array([1, 1]), None) == 0.5
    assert bench._task_score(None, logits, logits, None, 1.0) is None


def test_bound_met_by():
    b = Bound(1e-2, 1.0, "x")
    assert b.met_by(Fidelity(1e-2, None, 1.0))
    assert not b.met_by(Fidelity(1.1e-2, None, 1.0))
    assert not b.met_by(Fidelity(1e-3, None, 0.99))
    assert not b.met_by(Fidelity(float("nan"), None, 1.0))
    assert not b.met_by(Fidelity(1e-3, None, None))  # a bound with a task needs a task score
    assert Bound(1e-2, None, "y").met_by(Fidelity(1e-3, 0.5, None))


class _Synthetic(bench.ModelUnderTest):
    """A model whose rel L2 is 2 * rel_error and whose size falls with rel_error; counts evaluations."""

    def __init__(self):  # no model, no inputs
        self.points, self.search_s, self.calls = {}, 0.0, 0
        self.reference = Fidelity(0.0, None, 1.0)

    def allocator(self):  # no calibration inputs: the search runs on the default policy's rel_error
        return None

    def dcz_point(self, rel_error):
        key = float(f"{rel_error:.6g}")
        if key not in self.points:
            self.calls += 1
            self.points[key] = DczPoint(key, int(1e6 / (1 + 100 * key)), Fidelity(2 * key, None, 1.0))
        return self.points[key]


@pytest.mark.parametrize("target", [1e-4, 3e-3, 2e-2, 0.3])
def test_dcz_at_fidelity_finds_the_largest_rel_error_meeting_the_bound(target):
    m = _Synthetic()
    p = bench.dcz_at_fidelity(m, Bound(2 * target, 1.0, "t"))
    assert p is not None and p.fidelity.rel_l2 <= 2 * target
    # bisection leaves it within BRACKET_FACTOR ** (1 / 2 ** BISECT_STEPS) of the true answer
    assert p.rel_error >= target / bench.BRACKET_FACTOR ** (1 / 2 ** bench.BISECT_STEPS) * (1 - 1e-9)
    assert p.dcz_bytes == min(q.dcz_bytes for q in m.points.values() if q.fidelity.rel_l2 <= 2 * target)
    assert m.calls <= 12
    calls = m.calls  # asking again costs nothing: everything is memoized
    assert bench.dcz_at_fidelity(m, Bound(2 * target, 1.0, "t")) == p and m.calls <= calls + 1


def test_dcz_at_fidelity_unreachable_and_edges():
    m = _Synthetic()
    assert bench.dcz_at_fidelity(m, Bound(1e-6, 1.0, "t")) is None  # below 2 * REL_ERROR_MIN
    p = bench.dcz_at_fidelity(m, Bound(10.0, 1.0, "t"))  # everything passes: the coarsest allowed
    assert p.rel_error == bench.REL_ERROR_MAX
    assert bench.dcz_at_fidelity(m, Bound(1.0, 1.01, "t")) is None  # the task score can never be reached


def test_matching_bound_caps_task_at_the_original_and_treats_lossless_as_the_bar():
    m = _Synthetic()
    m.reference = Fidelity(0.0, None, 0.976)
    assert m.matching(Fidelity(5e-3, None, 0.98), "alt") == Bound(5e-3, 0.976, "alt")
    assert m.matching(Fidelity(5e-3, None, 0.95), "alt").task == 0.95
    lossless = m.matching(Fidelity(0.0, None, 0.976), "alt")
    assert (lossless.rel_l2, lossless.task) == (bench.BAR_REL_L2, 0.976)


def test_bench_lenet300_end_to_end(tmp_path):
    from dcformat.demo import bundled

    r = bench.bench_model("lenet300", bundled("lenet300.onnx"), ["default"], tmp_path)
    r = json.loads(json.dumps(r))  # JSON-ready
    (s,) = r["settings"]
    assert r["original_bytes"] == bundled("lenet300.onnx").stat().st_size
    assert 0 < s["dcz_bytes"] < r["original_bytes"] and s["ratio"] == pytest.approx(r["original_bytes"] / s["dcz_bytes"])
    parts = s["codes_bits"] + s["positions_bits"] + s["codebook_raw_bits"] + s["overhead_bits"]
    assert s["bits_per_weight"] == pytest.approx(parts, rel=0.05)
    assert 0 <= s["huffman_over_entropy"] < 0.5
    f = s["fidelity"]
    assert 0 <= f["rel_l2"] <= bench.BAR_REL_L2 and f["task"] == f["accuracy"] >= 0.9
    assert f["accuracy"] >= f["accuracy_original"] - 0.01
    for k in ("compress_s", "decompress_s", "compress_peak_rss", "decompress_peak_rss"):
        assert s[k] > 0
    assert s["compress_peak_rss"] > 20e6  # a Python process with numpy and onnx
    a = r["alternatives"]
    assert r["original_bytes"] * 0.8 < a["xz9"] < r["original_bytes"]  # float weights barely compress losslessly
    assert 0 < a["int8"] < r["original_bytes"] / 3 and 0 < a["int8_fidelity"]["rel_l2"] < 0.1
    names = [p["alternative"] for p in r["matched"]]
    assert names == ["zstd -19", "xz -9", "int8", "int8 + zstd -19"] if a["zstd19"] else names[1:3] == ["xz -9", "int8"]
    for p in r["matched"]:
        d = p["dcz"]
        assert d is not None, p
        assert Bound(**p["bound"]).met_by(Fidelity(**d["fidelity"]))
        assert d["dcz_bytes"] in [q["dcz_bytes"] for q in r["search_points"]]
    bar = r["dcz_at_bar"]
    assert bar["fidelity"]["rel_l2"] <= bench.BAR_REL_L2 and bar["dcz_bytes"] <= s["dcz_bytes"]
    md = bench.markdown([r], "# header")
    assert "| lenet300 | int8 |" in md and "## Matched fidelity" in md and "## At the bar" in md


NNCODEC_PY = bench.NNCODEC_VENV / "bin" / "python"


@pytest.mark.skipif(not NNCODEC_PY.exists(), reason="NNCodec not installed (bash tools/install_nncodec.sh)")
def test_nncodec_peer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    w = {"a": (rng.standard_normal((64, 80)) * 0.05).astype(np.float32), "s": np.float32(2.5),
         "b": rng.standard_normal(80).astype(np.float32)}
    np.savez(tmp_path / "w.npz", **w)
    reqs = "".join(json.dumps({"qp": qp, "out": str(tmp_path / f"d{qp}.npz")}) + "\n" for qp in (-36, -24))
    out = subprocess.run([str(NNCODEC_PY), str(Path(bench.__file__).with_name("nncodec_peer.py")), str(tmp_path / "w.npz")],
                         input=reqs, capture_output=True, text=True, check=True, timeout=120)
    fine, coarse = (json.loads(line) for line in out.stdout.splitlines())
    assert coarse["bitstream_bytes"] < fine["bitstream_bytes"] < w["a"].nbytes
    for qp, res in ((-36, fine), (-24, coarse)):
        with np.load(tmp_path / f"d{qp}.npz") as d:
            step = 2 ** (qp / 4)
            rms = float(np.sqrt(np.mean((d["a"] - w["a"]) ** 2)))
            assert 0.1 * step < rms < step  # a quantizer with this step (uniform rounding: step / sqrt(12))
            assert np.abs(d["a"] - w["a"]).max() <= 2 * step  # dependent quantization: up to about one step
            assert d["s"].shape == () and math.isclose(float(d["s"]), 2.5, abs_tol=1e-5)
            assert np.abs(d["b"] - w["b"]).max() < 1e-4  # rank-1 tensors: near-lossless


# --- the allocation's probe (dcformat.allocate.Probe), which dcz_at_fidelity's allocation runs on every tensor ---


def _conv_bn_model():
    """Conv whose weight is a Constant node, then BatchNormalization (onnxruntime fuses the two when both are
    constant), Relu, and a Gemm on an initializer: the shapes of the PP-OCR graphs in miniature."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32))
    bn = {k: numpy_helper.from_array(v.astype(np.float32), k) for k, v in (
        ("scale", 1 + 0.1 * rng.standard_normal(4)), ("shift", 0.1 * rng.standard_normal(4)),
        ("mean", 0.1 * rng.standard_normal(4)), ("var", 1 + rng.random(4)))}
    fc = numpy_helper.from_array((rng.standard_normal((64, 5)) * 0.2).astype(np.float32), "fc")
    nodes = [helper.make_node("Constant", [], ["conv_w"], value=w),
             helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], [*bn.values(), fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_probe_modes_compute_the_same_outputs():
    from dcformat import allocate
    from dcformat.onnx_ingest import extract_weights

    graph, weights = extract_weights(_conv_bn_model())
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)},
             {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}]  # two feed dicts of different batch
    fed = allocate.Probe(graph, weights, calib, mode="inputs")
    init = allocate.Probe(graph, weights, calib, mode="initializers")
    assert (fed.mode, init.mode) == ("inputs", "initializers")
    assert fed.lifted == init.lifted == {"conv_w", "scale", "shift", "mean", "var", "fc"}
    arrays = {w.name: np.asarray(w.array) for w in weights}
    trials = [{}, {"conv_w": arrays["conv_w"] * 1.05}, {"var": arrays["var"] * 2.0},
              {n: a + 0.01 * rng.standard_normal(a.shape).astype(a.dtype) for n, a in arrays.items()}]
    for replaced in trials:
        a, b = fed._run(replaced), init._run(replaced)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x["y"], y["y"], rtol=1e-5, atol=1e-6)
        if replaced:  # the trial weights are used (an override that a fused graph ignored would leave y as it was)
            assert all(not np.allclose(x["y"], r["y"], rtol=1e-4) for x, r in zip(b, init.reference))
            ra, rb = fed.compare(replaced), init.compare(replaced)
            assert rb[0].rel_l2 == pytest.approx(ra[0].rel_l2, rel=1e-3) and ra[0].rel_l2 > 1e-3
    # the default measures both and keeps one; its reference is that mode's own
    auto = allocate.Probe(graph, weights, calib)
    assert auto.mode in allocate.PROBE_MODES and auto.runs == 1
    assert auto.compare({})[0].rel_l2 == 0.0


def test_probe_initializer_mode_lifts_constants_inside_subgraphs():
    from models import if_with_constant_weight

    from dcformat import allocate
    from dcformat.onnx_ingest import extract_weights

    graph, weights = extract_weights(if_with_constant_weight())
    inputs = {"x": np.ones(4, np.float32), "c": np.array(True)}
    probe = allocate.Probe(graph, weights, inputs, mode="initializers")
    assert probe.lifted == {"w_c"}  # both branches hold the same name: one initializer the branches see
    np.testing.assert_array_equal(probe.reference[0]["y"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(probe._run({"w_c": np.full(4, 2.0, np.float32)})[0]["y"], np.full(4, 2.0))
    with pytest.raises(bench.DczError, match="probe mode"):
        allocate.Probe(graph, weights, inputs, mode="fast")


class _SyntheticPeer(bench.NNCodecPeer):
    """NNCodec without NNCodec: rel L2 = scale * 2 ** (qp / 4) * wobble(qp), task lost above ``task_qp``."""

    def __init__(self, scale, wobble=0.0, task_qp=100):
        self.results, self.calls, self.scale, self.wobble, self.task_qp = {}, 0, scale, wobble, task_qp

    def rel(self, qp):
        return self.scale * 2 ** (qp / 4) * (1 + self.wobble * math.sin(qp * 1.7))

    def at(self, qp):
        assert bench.NNCODEC_QP_MIN <= qp <= bench.NNCODEC_QP_MAX
        if qp not in self.results:
            self.calls += 1
            self.results[qp] = {"qp": qp, "file_bytes": 10**6 - 1000 * qp,
                                "fidelity": Fidelity(self.rel(qp), None, 1.0 if qp <= self.task_qp else 0.5)}
        return self.results[qp]


@pytest.mark.parametrize("scale", [1e-2 * 2 ** (k / 3) for k in range(-60, 40, 7)])
@pytest.mark.parametrize("wobble, task_qp", [(0.0, 100), (0.1, 100), (0.0, -41), (0.1, -30)])
def test_nncodec_best_at_finds_the_coarsest_qp_meeting_the_bound(scale, wobble, task_qp):
    peer = _SyntheticPeer(scale, wobble, task_qp)
    for qp in bench.NNCODEC_QPS:
        peer.at(qp)
    sweep = peer.calls
    bound = Bound(1e-2, 1.0, "bar")
    best = peer.best_at(bound)
    meets = [q for q in range(bench.NNCODEC_QP_MIN, bench.NNCODEC_QP_MAX + 1)
             if peer.rel(q) <= 1e-2 and q <= task_qp]
    if not meets:
        assert best is None
        return
    # monotone here (the wobble keeps rel L2 increasing in qp): the answer is the last qp that meets the bound
    assert best["qp"] == max(meets)
    assert peer.calls - sweep <= (4 if task_qp == 100 else 8)


def test_run_models_in_parallel_gives_the_serial_results_in_the_given_order(tmp_path):
    """--jobs 2: each model in its own process, largest first; the results come back in the caller's order and
    equal the serial run's (dcz's sizes and fidelity are deterministic; only the times differ)."""
    import onnx

    small, large = tmp_path / "small.onnx", tmp_path / "large.onnx"
    onnx.save(_conv_bn_model(), small)
    model = _conv_bn_model()
    fc = next(t for t in model.graph.initializer if t.name == "fc")
    fc.raw_data = np.tile(np.frombuffer(fc.raw_data, np.float32), 4).tobytes()  # same graph, 4x the weights
    fc.dims[:] = [256, 5]
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 16
    onnx.save(model, large)
    targets = [("small", small), ("large", large)]  # the large one is submitted first
    serial = bench.run_models(targets, ["default"], tmp_path, None, (), 1, 0.0)
    parallel = bench.run_models(targets, ["default"], tmp_path, None, (), 2, 0.0)
    assert [r["model"] for r in parallel] == ["small", "large"]
    for s, p in zip(serial, parallel):
        assert p["settings"][0]["dcz_bytes"] == s["settings"][0]["dcz_bytes"]
        assert p["settings"][0]["fidelity"] == s["settings"][0]["fidelity"]
        assert p["dcz_at_bar"] == s["dcz_at_bar"]


@pytest.mark.parametrize("edge", [bench.NNCODEC_QP_MIN - 1, bench.NNCODEC_QP_MIN, -53, -41, -40, -39, -34, -13, -5,
                                  bench.NNCODEC_QP_MAX])
def test_target_table_coarsest_qp_is_the_last_qp_that_passes(edge):
    import target_table

    calls = []

    def ok(qp):
        assert bench.NNCODEC_QP_MIN <= qp <= bench.NNCODEC_QP_MAX
        calls.append(qp)
        return qp <= edge

    got = target_table.coarsest_qp(ok)
    assert got == (edge if edge >= bench.NNCODEC_QP_MIN else None)
    assert len(calls) <= 14  # strides over the 60-qp range, then a bisection of one stride


def _blas_threads() -> list[int]:
    import threadpoolctl

    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


def test_workers_run_blas_on_their_share_of_the_cores(monkeypatch):
    # numpy's BLAS sizes its pool when numpy is imported, which a spawned worker does before its initializer runs:
    # the share must be in the environment the worker starts with (two workers each on every core oversubscribed
    # the machine), and the parent's environment is left as it was.
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)  # two workers on two cores: one thread each
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with bench._workers(2) as pool:
        threads = pool.submit(_blas_threads).result()
    assert threads and all(t == 1 for t in threads)
    assert "OPENBLAS_NUM_THREADS" not in bench.os.environ
