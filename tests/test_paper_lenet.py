"""tools/paper_lenet.py's numpy / onnx parts: trained-grid levels, their exact GRID coding, the lean export, the
entropy-table count. (The torch training itself is exercised by running the tool, not here.)"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import paper_lenet as pl

import dcformat
from dcformat.codec import TensorInput, decode_tensor, encode_tensor
from dcformat.constants import Coding
from dcformat.demo import bundled

LENET5 = pl.PAPER["lenet5"]


def _pruned(rng, n, density):
    w = rng.standard_normal(n).astype(np.float32) * 0.05
    keep = pl.magnitude_mask(w, round(n * density))
    return w, keep


@pytest.mark.parametrize("bits, density", [(8, 0.66), (8, 0.12), (5, 0.08), (2, 0.5)])
def test_grid_levels_fit_the_bits_and_keep_every_kept_weight(bits, density):
    rng = np.random.default_rng(bits)
    w, keep = _pruned(rng, 4000, density)
    kept = w[keep]
    q, step = pl.grid_levels(kept, bits)
    assert np.array_equal(q, np.rint(q)) and (q != 0).all()  # integers; no kept weight becomes a pruned zero
    span = max(q.max(), 0) - min(q.min(), 0) + 1  # the levels a GRID codebook spans, zero included
    assert span <= 1 << bits
    moved = np.abs(kept - q * step)
    forced = np.abs(kept) < step / 2  # these were lifted to level +-1
    assert (moved[~forced] <= step / 2 * (1 + 1e-6)).all()


def test_grid_trained_layer_is_coded_exactly_under_a_grid_codebook():
    rng = np.random.default_rng(1)
    w, keep = _pruned(rng, 25000, 0.12)
    q, step = pl.grid_levels(w[keep], 8)
    step32 = np.float32(step * 1.013)  # a trained step is any float32, not the initial one
    levels = np.zeros(w.shape, np.float32)
    levels[keep] = q
    trained = (levels * step32).reshape(50, 20, 5, 5)  # float32 q * step, as torch computes it
    policy = pl.paper_policy(LENET5, steps={"conv2.weight": float(step32)})
    s = policy.settings_for("conv2.weight", "conv", trained.size)
    enc = encode_tensor(TensorInput("conv2.weight", trained, s))
    assert enc.entry.streams[0].coding == Coding.GRID and enc.entry.streams[0].length == 12
    assert s.index_bits == LENET5.layers[1].index_bits and enc.entry.code_bits == LENET5.layers[1].bits
    out = decode_tensor(enc.entry, list(enc.payloads))
    np.testing.assert_array_equal(out.view(np.uint32), trained.view(np.uint32))


def test_bias_steps_override_the_bias_rel_error_rule():
    policy = pl.paper_policy(LENET5, biases=True, steps={"ip1.bias": 0.0125})
    assert policy.settings_for("ip1.bias", "fc", 500).step == 0.0125
    assert policy.settings_for("conv2.bias", "conv", 50).rel_error == pl.BIAS_REL_ERROR
    assert policy.settings_for("conv2.bias", "conv", 50).step is None


def test_lean_graph_computes_the_same_with_fewer_bytes():
    import onnxruntime as ort

    m = onnx.load(str(bundled("lenet5.onnx")))
    lean = pl.lean_graph(m)
    assert all(n.name == "" for n in lean.graph.node)
    assert [i.name for i in lean.graph.initializer] == [i.name for i in m.graph.initializer]
    assert sum(len(a.SerializeToString()) for n in lean.graph.node for a in n.attribute) < sum(
        len(a.SerializeToString()) for n in m.graph.node for a in n.attribute)
    assert len(lean.SerializeToString()) < len(m.SerializeToString())
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    outs = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for g in (m, lean)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_entropy_table_bytes_are_part_of_each_coded_tensor(tmp_path):
    out = tmp_path / "lenet5.dcz"
    dcformat.compress(bundled("lenet5.onnx"), out, pl.paper_policy(LENET5, biases=True))
    tables = pl.huffman_table_bytes(out)
    rows = {r.name: r for r in dcformat.report.breakdown(out).rows if r.layout != "raw"}
    assert set(tables) == set(rows) and len(rows) >= 4
    for name, r in rows.items():
        assert 2 <= tables[name] < r.codes_bytes + r.positions_bytes, name
