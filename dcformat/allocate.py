"""Automatic per-tensor settings: the smallest file whose rebuilt model meets a fidelity target.

Stage 0 of compression (before the codec), used by ``dcz compress --target`` and ``dcz sensitivity``:

1. **Probe.** The model runs on onnxruntime with its float weights turned into graph inputs, so candidate
   weights are fed to one session instead of rebuilding and reloading the model for every trial.
2. **Candidates.** For each tensor, uniform grids (per tensor and per output channel) at a ladder of relative
   errors. Each candidate's squared weight error is exact and its size is estimated from the entropy of its
   levels (dense, or sparse when most levels are zero); both are cheap (one vectorized rounding per candidate).
3. **Sensitivity.** Each tensor alone is rounded at a probe error and the calibration outputs are compared with
   the original's: the output distortion per unit of weight error, ``s_i``. Output distortion is modelled as
   ``sum_i s_i * E_i`` (squared relative L2 summed over outputs), which is the usual additive-noise model.
4. **Allocation.** For a multiplier ``lam`` every tensor picks the candidate minimising ``bits + lam * s_i * E_i``
   (reverse water-filling: each tensor spends bits until a bit buys the same distortion everywhere). ``lam`` is
   searched by bisection with *measured* fidelity of the whole model (all tensors rounded at once), so the
   additive model only guides the search and never decides the answer.

Only numpy and onnxruntime are used; nothing here depends on a training framework.
"""

from __future__ import annotations

import collections
import functools
import glob
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import fidelity, quantize
from .constants import GRID_MAX_LEVEL
from .errors import InputError
from .onnx_ingest import Weight
from .onnx_rebuild import rebuild
from .select import LayerRule, Policy

__all__ = ["Target", "Verification", "Validation", "Held", "compress_to_target", "Allocator", "Candidate", "TensorChoice", "Allocation", "Probe", "sensitivity", "allocate",
           "SYNTHETIC_WARNING"]

#: Relative errors tried per tensor: 9e-6 (near lossless) to 0.5 (most weights zero), 48 steps of ~1.26x (a third
#: of a bit per weight each: with 17 steps of 1.59x, magika's 655k-weight conv moved 55 kB a step and the file
#: nearest a fidelity bound was 10% larger than needed). The finest are for tensors the outputs hang on: when the
#: ladder stopped at 3e-4, the next step up for such a tensor was raw float32 (basic-pitch: a 9,216-weight conv
#: went raw, 36.9 kB where its finest grid took 9.0 kB, and the --target file was 96,711 bytes; with the finer
#: steps, 48,104 with every test frame kept). Steps finer than a grid's codes allow (quantize.MAX_K levels) are
#: not tried. The steps above 3e-4 are the same as before the ladder went finer: the search's pass / fail is not
#: monotone in its multiplier, and shifting every step by a fraction moved ppocr-cls's file by 30% (106 -> 138 kB)
#: for no reason.
CANDIDATE_ERRORS: tuple[float, ...] = tuple(float(x) for x in np.concatenate([
    3e-4 * ((0.5 / 3e-4) ** (1 / 32)) ** np.arange(-15, 0), np.geomspace(3e-4, 0.5, 33)]))
#: Tensors of at least this many elements take a ladder twice as fine: a step between each two of CANDIDATE_ERRORS
#: (1.12x in error, a sixth of a bit per weight). One step of the plain ladder moves such a tensor by a third of a bit
#: per weight: on magika's 655k-weight conv, 33 kB a step, 5.5% of the file at the bench's bar, so the smallest file
#: meeting a fidelity bound overshot it by half a step on average. Coded one tensor at a time at the same squared
#: error, dcz's order-0 entropy is within 0.3-2.5% of NNCodec's with dependent quantization on that tensor
#: (and 1.3-1.9% below NNCodec without it), while the bench's matched sizes were 4-6% apart. Smaller tensors keep the
#: plain ladder: a step costs them little, and candidates cost time per step (ddddocr-common's candidates took
#: 61.4 s with the midpoints, 24.5 s without, measured beside another run).
FINE_LADDER_ELEMENTS = 1 << 16
#: Error at which each tensor's sensitivity is measured: large enough to stand above float32 noise in the
#: outputs, small enough that the output still responds linearly.
PROBE_ERROR = 1e-2
#: The sensitivity probe rounds per channel only when channels hold at least this many elements on average.
PROBE_MIN_SLICE = 8
#: Bisection steps on the multiplier (each is one full-model run on the calibration inputs).
SEARCH_STEPS = 12
#: Task and top-1 targets are pass/fail per item, so a search on a few calibration items stops exactly at the edge
#: and held-out items fall over it. Candidates are therefore judged with their weight error scaled by this factor:
#: the file keeps a margin (measured: digits-mlp held-out agreement 97.8% without it). Task checks that estimate
#: their changes on new items (CHANGE_BUDGET) search without it: the estimate is the better-founded margin, and
#: both together made files larger for nothing (centerface 1.82 MB with both, 1.49 MB with the estimate alone,
#: both keeping all 80 test images).
DISCRETE_MARGIN = 2.0
#: Discrete targets are cross-validated (:meth:`Allocator.solve`): calibration run i is held out in fold i mod
#: VALIDATION_FOLDS, so each fold's search sees (k-1)/k of the runs (nearly the search on all of them) and every run
#: is checked once by a search that did not see it. 4 rather than 2: two searches more, a less pessimistic estimate.
VALIDATION_FOLDS = 4
#: Confidence of the bound reported on the share of new items that may differ (Validation.flip_bound).
BOUND_CONFIDENCE = 0.95
#: Ops whose float inputs are weights in the numeric sense: the allocation may round small tensors (biases,
#: norm parameters) only when every consumer is one of these. Others (Resize, Pad, Range...) can take floats that
#: steer shapes or indices, where any rounding breaks the graph.
WEIGHT_CONSUMERS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "BatchNormalization", "LSTM", "GRU",
    "RNN", "InstanceNormalization", "LayerNormalization", "PRelu", "Gather", "Einsum",
})
#: Refinement: at most this many of the largest tensors, until they hold this share of the estimated bits. A model
#: of many small tensors needs many: ppocr-cls (170 tensors, 8 calibration samples, task target) came out at
#: 105.1 kB of estimated tensor bytes refining 8, 91.7 kB refining 32 (49 more runs), 88.1 kB refining until 90%
#: of the bits (94 more); a model whose few largest tensors hold 90% of the bits stops as soon as before.
REFINE_TENSORS = 32
REFINE_SHARE = 0.9
#: A layer input that is (nearly) silent on the calibration data is still weighted as if it had this share of the
#: layer's mean input energy, so inputs the calibration set rarely excites (MNIST's border pixels) keep some
#: resolution: its step is at most 1/sqrt of this (10x) the step of an average input. Of 1e-3, 1e-2 and 1e-1,
#: 1e-2 gave the smallest LeNet-300-100 and digits-MLP files at rel L2 1e-2 on held-out digits.
INPUT_ENERGY_FLOOR = 1e-2
#: Inputs of a Gemm / MatMul / pointwise Conv layer up to which the full input second-moment matrix is measured
#: (8 bytes x n^2: 128 MiB at the bound) and rounding errors are compensated across inputs
#: (quantize.compensated_levels).
COMPENSATE_MAX_INPUTS = 4096
#: Rows of one calibration feed's layer input that the second-moment matrix is measured on (evenly spaced beyond
#: this): far more than the inputs it is for (<= COMPENSATE_MAX_INPUTS), and it bounds the cost: a.T @ a on all
#: 170k rows of each of magika's feeds took 29 s of its 40 s setup in float64; float32 on 16k rows, 0.1 s.
MOMENT_MAX_ROWS = 16384
#: Bytes of model outputs the search keeps from the allocations it has run (so that the validation's folds, which
#: revisit the same allocations, do not run them again); the oldest are dropped beyond it. Unbounded, PP-OCRv4 rec
#: with 24 calibration runs grew past 16 GB (about 2.5 MB of outputs per run times every allocation tried) and was
#: killed by the kernel.
OUTPUTS_MEMO_BYTES = 1 << 30
#: Ops whose weight input is multiplied with a data input along a known axis, and so can be weighted by it.
_LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Huffman table cost per level used (2-byte symbol plus its share of the counts) and GRID header, in bits.
TABLE_BITS_PER_LEVEL = 20
#: A binned stream (format 1.3) instead: a fixed table of a few dozen bins (header, bins' rANS table and states:
#: about 64 bytes) and up to 2 % over the entropy (levels within a bin coded as equally likely; measured 0.1-2.2 %
#: on the public models' wide streams). Wide alphabets cost this, not TABLE_BITS_PER_LEVEL per level.
BINNED_TABLE_BITS = 512
BINNED_EXCESS = 0.02
GRID_HEADER_BITS = 64
#: Said whenever calibration falls back to random inputs.
SYNTHETIC_WARNING = (
    "no calibration inputs given: using random inputs from the declared shapes. Random inputs hide damage "
    "(an OCR model that outputs blanks on noise agrees 100% on noise while misreading real text); pass "
    "--calibration inputs.npz with real samples keyed by input name."
)
_METRICS = ("rel_l2", "cosine", "top1")
#: A task target also holds the estimated share of new items whose answer changes (tasks.expected_changes: the
#: calibration decisions' slack density near the edge against their moves) to at most this. The calibration items
#: alone cannot: the smallest file that keeps their answers keeps them by the width of their own decisions'
#: margins (measured, 8 calibration samples, no estimate: centerface 0 of 80 calibration images changed and 1 of 80
#: test images; silero-vad 0 of 32 and 2 of 32). The estimate errs high (a digits MLP: 6% estimated, 1% changed),
#: so 1% is a strict budget in practice. The calibration items' own changes count against the same budget (at most
#: that share of them may change): a search that must keep every one pays for the few that sit within a hair of
#: their edge, which say nothing about new items. Measured on magika (8 calibration runs, 664 files; 2,624 test
#: files): keeping all 664 gave 622,528 bytes and changed 14 test files; letting up to 1% change (4 did) gave
#: 463,032 bytes and changed 17. With fewer than 1 / CHANGE_BUDGET calibration items (a few text lines or images)
#: one change is over budget, so all must hold.
CHANGE_BUDGET = 1e-2
#: Agreement is a ratio of item counts: a share of changes exactly at the budget must count as within it.
AGREEMENT_ROUNDING = 1e-12
#: A top-1 target holds outputs without class scores (a box or embedding output beside the scores) to this rel L2.
TOP1_FALLBACK_REL_L2 = 1e-2


@dataclass(frozen=True)
class Target:
    """A fidelity target on every output: ``rel_l2 <= v``, ``cosine >= v`` or ``top1 >= v`` (top-1
    agreement; outputs without class scores are held to rel_l2 <= 1e-2 instead); or ``task=CHECK``: the same
    task-level answers (dcformat.tasks: a model id such as ``ddddocr-common`` or a kind such as ``ctc``) on
    every calibration item; for checks with decisions, at most :data:`CHANGE_BUDGET` (``task=CHECK,changes=V``: V)
    of new items expected to change (tasks.expected_changes) and at most that share of the calibration items
    changed (:meth:`agreement_floor`)."""

    metric: str
    value: float
    task: str | None = None
    changes: float | None = None  # task targets: the budget of expected changes on new items (None: CHANGE_BUDGET)

    @classmethod
    def parse(cls, text: str) -> "Target":
        metric, eq, value = text.partition("=")
        metric = metric.strip().replace("-", "_")
        if metric == "task" and eq:
            from . import tasks

            check, comma, rest = value.partition(",")
            check = check.strip()
            if check not in tasks.MODEL_TASKS and check not in tasks.KINDS:
                raise InputError(f"target {text!r}: no task check {check!r}; models: {', '.join(tasks.MODEL_TASKS)}; "
                                 f"kinds: {', '.join(tasks.KINDS)}")
            changes = None
            if comma:
                key, eq2, budget = rest.partition("=")
                if key.strip() != "changes" or not eq2:
                    raise InputError(f"target {text!r}: after the check, expected ',changes=V' (the share of new "
                                     "items allowed to change, e.g. 0.01)")
                try:
                    changes = float(budget)
                except ValueError:
                    raise InputError(f"target {text!r}: {budget!r} is not a number") from None
                if not 0 < changes < 1:
                    raise InputError(f"target {text!r}: changes must be in (0, 1)")
            return cls("task", 1.0, check, changes)
        if not eq or metric not in _METRICS:
            raise InputError(f"target {text!r}: expected one of {', '.join(m + '=VALUE' for m in _METRICS)}, or task=CHECK")
        try:
            v = float(value)
        except ValueError:
            raise InputError(f"target {text!r}: {value!r} is not a number") from None
        if metric == "rel_l2" and not 0 < v < 1 or metric != "rel_l2" and not 0 < v <= 1:
            raise InputError(f"target {text!r}: {metric} must be in {'(0, 1)' if metric == 'rel_l2' else '(0, 1]'}")
        return cls(metric, v)

    def met(self, fids: Sequence[fidelity.OutputFidelity], reference: Sequence[Feeds] | None = None,
            outputs: Sequence[Feeds] | None = None) -> bool:
        """Whether the outputs meet the target (task targets need the reference and candidate outputs)."""
        if self.metric == "task":
            if reference is None or outputs is None:
                raise InputError(f"target {self}: a task check needs the model outputs")
            agree, _, _, changes = _task_measures(self.task, reference, outputs)
            return self.answers_met(agree, changes)
        for f in fids:
            if self.metric == "rel_l2" and not f.rel_l2 <= self.value:
                return False
            if self.metric == "cosine" and not f.cosine >= self.value:
                return False
            if self.metric == "top1":
                if f.top1_agreement is None:
                    if not f.rel_l2 <= TOP1_FALLBACK_REL_L2:
                        return False
                elif f.top1_agreement < self.value:
                    return False
        return True

    @property
    def budget(self) -> float:
        """Task targets: the expected share of new items allowed to change (tasks.expected_changes)."""
        return CHANGE_BUDGET if self.changes is None else self.changes

    def agreement_floor(self, estimates: bool) -> float:
        """Task targets: the least item-weighted agreement that passes. A check without an estimate of changes on
        new items (``estimates`` False) keeps every answer; with one, up to :attr:`budget` of the items may change
        (see :data:`CHANGE_BUDGET`)."""
        return self.value - (self.budget + AGREEMENT_ROUNDING if estimates else 0.0)

    def answers_met(self, agree: float, changes: float | None) -> bool:
        """Task targets, from the item-weighted agreement and the estimate of changes on new items (None: the
        check has no decisions to estimate it from): the agreement at least :meth:`agreement_floor`, and the
        estimate within :attr:`budget`."""
        return agree >= self.agreement_floor(changes is not None) and (changes is None or changes <= self.budget)

    def __str__(self) -> str:
        if self.metric == "task":
            return f"task={self.task}" + (f",changes={self.changes:g}" if self.changes is not None else "")
        return f"{self.metric}={self.value:g}"


Feeds = Mapping[str, np.ndarray]
#: One feed dict (a batch), or several (e.g. text lines of different widths, run one at a time).
Inputs = Feeds | Sequence[Feeds]


def _feeds_list(inputs: Inputs) -> list[dict[str, np.ndarray]]:
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    out = [dict(f) for f in inputs]
    if not out:
        raise InputError("no calibration inputs")
    return out


def task_agreement(check: str, reference: Sequence[Feeds], outputs: Sequence[Feeds]) -> tuple[float, str]:
    """Task-level agreement over several runs, weighted by the items each compares; and the first run's detail
    that disagrees (or the first run's)."""
    agree, n, worst, changes = _task_measures(check, reference, outputs)
    return agree, _agreement_detail(agree, n, worst, changes)


def _agreement_detail(agree: float, n: int, worst: str, changes: float | None) -> str:
    estimate = "" if changes is None else f"; expected share of new items that change: {changes:.2%}"
    return f"{agree:.2%} of {n} items agree{estimate}; {worst}"


def _task_measures(check: str, reference: Sequence[Feeds],
                   outputs: Sequence[Feeds]) -> tuple[float, int, str, float | None]:
    """Item-weighted task agreement over runs, the items counted, the least agreeing run's detail, and the
    expected share of new items whose answer changes (:func:`dcformat.tasks.expected_changes`; None for a check
    without decisions)."""
    from . import tasks

    pairs = [tasks.check_and_decisions(check, r, o) for r, o in zip(reference, outputs)]
    results = [r for r, _ in pairs]
    n = sum(max(r.n, 1) for r in results)
    agree = sum(r.agree * max(r.n, 1) for r in results) / n
    parts = [d for _, d in pairs if d is not None]
    changes = tasks.expected_changes(parts) if parts else None
    return agree, n, min(results, key=lambda r: r.agree).detail, changes


def _subset(runs: Sequence, items: Sequence[int] | None) -> list:
    """The calibration runs ``items`` of ``runs`` (all of them for None)."""
    return list(runs) if items is None else [runs[i] for i in items]


def merge_fidelity(per_run: Sequence[Sequence[fidelity.OutputFidelity]]) -> list[fidelity.OutputFidelity]:
    """Per output, the worst over runs (rel L2, max abs, cosine) and the item-weighted top-1 agreement."""
    out = []
    for rows in zip(*per_run):
        tops = [(r.top1_agreement, r.n_samples) for r in rows if r.top1_agreement is not None]
        n = sum(k for _, k in tops)
        top1 = sum(a * k for a, k in tops) / n if n else (tops[0][0] if tops else None)
        out.append(fidelity.OutputFidelity(rows[0].name, max(r.rel_l2 for r in rows), max(r.max_abs for r in rows),
                                           min(r.cosine for r in rows), top1, sum(r.n_samples for r in rows)))
    return out


def run_all(model, inputs: Inputs) -> list[dict[str, np.ndarray]]:
    """:func:`fidelity.run` on each feed dict, in one session (:func:`fidelity.run_each`)."""
    return list(fidelity.run_each(model, _feeds_list(inputs)))


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor, with its exact squared weight error and its estimated size: raw (``rel_error``
    0), or a grid at ``rel_error`` with one scale per slice along ``axis`` (None: one ``step`` for the tensor,
    ``rel_error`` of its RMS), and with ``weighted``, a relative step per layer input from its
    :class:`Importance`. The error is weighted by the importance of each element's input when the tensor has
    one."""

    axis: int | None
    rel_error: float
    sq_error: float
    bits: float
    weighted: bool = False
    step: float | None = None  # per-tensor grids: the step (rel_error of the tensor's RMS, not of its weakest channel)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class TensorChoice:
    name: str
    numel: int
    sensitivity: float  # output distortion per unit of (importance-weighted) squared weight error
    candidate: Candidate
    importance: "Importance | None" = None

    def settings(self) -> dict:
        """The layer-rule settings that store this tensor as chosen."""
        c = self.candidate
        if c.rel_error == 0:
            return {"raw": True}
        out = {"quantizer": "uniform", "rel_error": c.rel_error, "per_channel": c.per_channel}
        if c.step is not None:
            out["step"] = c.step
        if c.weighted:
            out.update(input_axis=self.importance.axis, input_steps=tuple(float(v) for v in self.importance.steps))
        return out


class Held(NamedTuple):
    """One validation fold: the allocation searched on some of the calibration runs, run on the others."""

    margin: float
    fitted: int  # calibration runs searched on
    held_out: int  # calibration runs it was checked on (never seen by its search)
    items: int  # items in those held-out runs (samples, text lines, streams...)
    agreement: float  # task agreement (task targets) or worst top-1 agreement on the held-out runs
    met: bool  # the target held on the held-out runs
    bytes: int  # estimated size of that fold's allocation


@dataclass(frozen=True)
class Validation:
    """The held-out checks of a discrete target: an estimate of how the file does on inputs it was not fitted to."""

    margin: float  # the margin the final allocation (on all calibration runs) was searched with
    folds: tuple[Held, ...]  # every fold run, in order (VALIDATION_FOLDS per margin tried)
    passed: bool  # every fold held at ``margin``

    @property
    def final(self) -> tuple[Held, ...]:
        """The folds at :attr:`margin` (each calibration run held out once there)."""
        return tuple(f for f in self.folds if f.margin == self.margin)

    @property
    def agreement(self) -> float:
        """Pooled agreement of the held-out runs at :attr:`margin` (each run is held out once there)."""
        last = self.final
        return sum(f.agreement * f.items for f in last) / max(sum(f.items for f in last), 1)

    @property
    def flip_bound(self) -> float | None:
        """When every fold held at :attr:`margin`: the largest share of new items that could differ with
        :data:`BOUND_CONFIDENCE`, given that none of the held-out items did (exact binomial bound, about 3/n)."""
        last = self.final
        if not self.passed or not last:
            return None
        return 1.0 - (1.0 - BOUND_CONFIDENCE) ** (1.0 / sum(f.items for f in last))

    def __str__(self) -> str:
        last = self.final
        tried = sorted({f.margin for f in self.folds})
        out = (f"cross-validated at margin {self.margin:g}: {self.agreement:.2%} of {sum(f.items for f in last)} "
               f"held-out items agree, {sum(f.met for f in last)} of {len(last)} folds meet the target")
        if len(tried) > 1:
            out += f" (margins tried: {', '.join(f'{m:g}' for m in tried)})"
        if self.passed:
            return out + f"; new items that differ: at most {self.flip_bound:.1%} ({BOUND_CONFIDENCE:.0%} upper bound)"
        return out + "; expect some new items to differ (more calibration items let the search see them)"


@dataclass
class Allocation:
    """What ``allocate`` chose and what it measured."""

    target: Target
    choices: list[TensorChoice]
    fixed: list[str]  # compressible tensors the probe could not feed: left at the policy's settings
    fidelity: list[fidelity.OutputFidelity]
    met: bool
    estimated_bytes: int
    evaluations: int
    seconds: float
    log: list[str] = field(default_factory=list)
    validation: Validation | None = None  # what held-out calibration runs said (discrete targets)

    def policy(self, base: Policy) -> Policy:
        """``base`` with one rule per chosen tensor (exact-name patterns)."""
        rules = tuple(LayerRule(glob.escape(c.name), c.settings()) for c in self.choices)
        return Policy(**{**_policy_fields(base), "layers": base.layers + rules})


def _policy_fields(p: Policy) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


# --- the probe ------------------------------------------------------------------------------------------------

_LIFTABLE = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
#: Probe modes: trial weights fed as graph inputs to one session, or set as initializers of a session built per trial
#: (onnxruntime pre-packs and fuses constant weights, which makes conv-heavy models several times faster per run).
PROBE_MODES = ("inputs", "initializers")
def _lift(model: onnx.ModelProto, names: set[str], *, as_initializers: bool = False) -> set[str]:
    """Turn the initializers and Constant nodes named in ``names`` (at any graph depth) into main-graph inputs, or
    with ``as_initializers`` into main-graph initializers (that a session can override by name). Subgraphs see them
    as outer-scope values. Returns the names lifted."""
    lifted: set[str] = set()
    main = model.graph
    inputs = {i.name for i in main.input}
    hoisted: list[TensorProto] = []

    def add(name: str, t: TensorProto) -> None:
        if as_initializers:
            if name not in lifted:
                h = TensorProto()
                h.CopyFrom(t)
                h.name = name
                hoisted.append(h)
            lifted.add(name)
            return
        lifted.add(name)
        if name not in inputs:
            main.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
            inputs.add(name)

    def visit(graph: onnx.GraphProto) -> None:
        keep = [t for t in graph.initializer if not (t.name in names and t.data_type in _LIFTABLE)]
        for t in graph.initializer:
            if t.name in names and t.data_type in _LIFTABLE:
                add(t.name, t)
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = []
        for n in graph.node:
            value = [a for a in n.attribute if a.name == "value" and a.HasField("t")]
            if (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1 and len(n.attribute) == 1
                    and value and n.output[0] in names and value[0].t.data_type in _LIFTABLE):
                add(n.output[0], value[0].t)
                continue
            for a in n.attribute:
                if a.HasField("g"):
                    visit(a.g)
                for g in a.graphs:
                    visit(g)
            nodes.append(n)
        del graph.node[:]
        graph.node.extend(nodes)

    visit(main)
    if as_initializers:
        main.initializer.extend(hoisted)
        # an initializer that is also a graph input is overridable, which onnxruntime treats as not constant
        graph_inputs = [i for i in main.input if i.name not in lifted]
        del main.input[:]
        main.input.extend(graph_inputs)
    return lifted


def _raw_bytes(values: np.ndarray, data_type: int) -> bytes:
    """``values`` as a TensorProto's raw_data of ``data_type`` (little-endian)."""
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


class Probe:
    """Runs the model on fixed inputs with some weights replaced; counts its runs.

    ``mode`` (one of PROBE_MODES) picks how trial weights reach onnxruntime; None measures one run each way and
    keeps the faster (:attr:`mode` says which). Both compute the same outputs (to float32 rounding: onnxruntime
    fuses constant weights in the second)."""

    def __init__(self, graph: bytes, weights: Sequence[Weight], inputs: Inputs, *, mode: str | None = None):
        if mode is not None and mode not in PROBE_MODES:
            raise InputError(f"probe mode {mode!r}: expected one of {', '.join(PROBE_MODES)}")
        self.weights = {w.name: w for w in weights}
        self.inputs = _feeds_list(inputs)
        self.runs = 0
        self._graph = graph
        self._hoisted: onnx.ModelProto | None = None
        self._slots: dict[str, TensorProto] = {}  # hoisted initializer per lifted weight, its data in raw_data
        model = rebuild(graph, {w.name: w.array for w in weights})
        wanted = {w.name for w in weights if "#" not in w.name and w.onnx_dtype in _LIFTABLE}
        fed = onnx.ModelProto()
        fed.CopyFrom(model)
        lifted = _lift(fed, wanted)
        self._tmp: list[str] = []
        try:
            self._sess = fidelity._session(fed, self._tmp)
            self.lifted = lifted
        except InputError:  # an op insists on a constant input: fall back to one session per evaluation
            self._sess = None
            self.lifted = set()
            self.mode = "rebuild"
            self.reference = self._run({})
            return
        del fed
        self.mode = "inputs"
        # The first run of a session pays one-off costs; the runs after it time a trial in this mode.
        self.reference = self._run({}, [0])
        t0 = time.perf_counter()
        self.reference += self._run_feeding({}, range(1, len(self.inputs)))
        t_inputs = (time.perf_counter() - t0) * len(self.inputs) / max(len(self.inputs) - 1, 1)
        if mode == "inputs" or not self.lifted:
            return
        if model.ByteSize() > fidelity.PROTO_LIMIT:  # serialized per trial: must fit one message
            return
        _lift(model, self.lifted, as_initializers=True)
        self._hoisted = model
        self._slots = {t.name: t for t in model.graph.initializer if t.name in self.lifted}
        for n, t in self._slots.items():  # one data field to swap per trial
            for f in ("float_data", "double_data", "int32_data"):
                t.ClearField(f)
            t.raw_data = _raw_bytes(self.weights[n].array, t.data_type)
        del model
        if len(self.inputs) == 1:  # no run after the first to time
            t0 = time.perf_counter()
            self._run_feeding({})
            t_inputs = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            reference = self._run_initializers({})
        except InputError:  # onnxruntime refuses the hoisted graph: keep feeding inputs
            if mode == "initializers":
                raise
            self._hoisted, self._slots = None, {}
            return
        if mode == "initializers" or time.perf_counter() - t0 < t_inputs:
            self.mode, self.reference = "initializers", reference
            self._sess = None  # frees the input-fed session's memory
        else:
            self._hoisted, self._slots = None, {}

    def _run(self, replaced: Mapping[str, np.ndarray],
             items: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """The outputs with ``replaced`` weights, on the calibration runs ``items`` (default: all)."""
        self.runs += 1
        if self.mode == "rebuild":
            model = rebuild(self._graph, {n: replaced.get(n, w.array) for n, w in self.weights.items()})
            return run_all(model, _subset(self.inputs, items))
        if self.mode == "initializers":
            return self._run_initializers(replaced, items)
        return self._run_feeding(replaced, items)

    def _outputs(self, sess, extra: Mapping[str, np.ndarray],
                 items: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        names = [o.name for o in sess.get_outputs()]
        outs = []
        for feeds in _subset(self.inputs, items):
            try:
                values = sess.run(names, {**feeds, **extra})
            except Exception as e:  # onnxruntime's own exception types
                raise InputError(f"onnxruntime failed on the calibration inputs: {e}") from e
            outs.append({n: fidelity._as_array(v, n) for n, v in zip(names, values)})
        return outs

    def _run_feeding(self, replaced: Mapping[str, np.ndarray],
                     items: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """One run of the session whose lifted weights are graph inputs."""
        weights = {n: np.asarray(replaced.get(n, self.weights[n].array)) for n in self.lifted}
        return self._outputs(self._sess, weights, items)

    def _run_initializers(self, replaced: Mapping[str, np.ndarray],
                          items: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """One run of a new session on the hoisted model, its initializers holding the replaced weights.

        The weights go into a copy of the model, dropped after: protobuf (upb) keeps every bytes value ever
        assigned to a message until the message is freed, so swapping them in and out of the kept model grew the
        process by twice the replaced weights per run (measured: PP-OCRv4 rec, 20 MB a run, past 16 GB in a
        --target search)."""
        if any(n in self._slots for n in replaced):
            model = onnx.ModelProto()
            model.CopyFrom(self._hoisted)
            for t in model.graph.initializer:
                if t.name in self._slots and t.name in replaced:
                    t.raw_data = _raw_bytes(replaced[t.name], t.data_type)
            data = model.SerializeToString()
            del model
        else:
            data = self._hoisted.SerializeToString()
        # fidelity's session options, bytes in memory
        return self._outputs(fidelity._session(data, self._tmp), {}, items)

    def compare(self, replaced: Mapping[str, np.ndarray],
                items: Sequence[int] | None = None) -> list[fidelity.OutputFidelity]:
        """Fidelity with ``replaced`` weights on the calibration runs ``items`` (default: all), merged."""
        return merge_fidelity([fidelity.compare(r, o)
                               for r, o in zip(_subset(self.reference, items), self._run(replaced, items))])

    def meets(self, replaced: Mapping[str, np.ndarray], target: Target) -> tuple[bool, list[fidelity.OutputFidelity]]:
        outputs = self._run(replaced)
        fids = merge_fidelity([fidelity.compare(r, o) for r, o in zip(self.reference, outputs)])
        return target.met(fids, self.reference, outputs), fids


def _outputs_nbytes(outputs: Sequence[Mapping[str, np.ndarray]]) -> int:
    return sum(int(np.asarray(v).nbytes) for run in outputs for v in run.values())


def _distortion(fids: Sequence[fidelity.OutputFidelity]) -> float:
    return float(sum(f.rel_l2 ** 2 for f in fids if math.isfinite(f.rel_l2)))


# --- candidates ------------------------------------------------------------------------------------------------


def _rate_bits(q: np.ndarray) -> float:
    """Estimated coded size of integer levels: entropy of the levels, dense (>= 1 bit each once two levels are
    used) or sparse (the nonzero levels plus ideal gap coding), plus the Huffman table or a binned stream's
    overhead, whichever is smaller."""
    # Levels (integers, or integral floats) are at most GRID_MAX_LEVEL in magnitude: int32 holds them and their
    # offsets from the lowest. One histogram serves both codings.
    flat = q.astype(np.int32).ravel()
    n = flat.size
    lo = int(flat.min())
    flat -= np.int32(lo)
    histogram = np.bincount(flat)
    counts = histogram[histogram > 0]
    used = counts.size
    p = counts / n
    h = float(-(p * np.log2(p)).sum())
    dense = n * (max(h, 1.0) if used > 1 else 0.0)
    zeros = int(histogram[-lo]) if 0 <= -lo < histogram.size else 0
    nz = n - zeros
    sparse = math.inf
    if 0 < nz < n:
        nz_counts = np.delete(histogram, -lo)
        nz_counts = nz_counts[nz_counts > 0]
        pn = nz_counts / nz
        hn = float(-(pn * np.log2(pn)).sum())
        d = nz / n
        gaps = n * float(-(d * math.log2(d) + (1 - d) * math.log2(1 - d)))
        sparse = nz * max(hn, 1.0 if nz_counts.size > 1 else 0.0) + max(gaps, nz)
    coded = min(dense, sparse)
    return coded + min(TABLE_BITS_PER_LEVEL * used, BINNED_EXCESS * coded + BINNED_TABLE_BITS)


def _grid(x: np.ndarray, axis: int | None, rel_error: float, imp: "Importance | None" = None,
          step: float | None = None, *, compensate: bool = True) -> tuple[quantize.Grid, np.ndarray]:
    """The codec's grid for these settings (``imp``: with its input steps, and error-compensating rounding where
    it has a hessian) and the values it decodes to."""
    g = quantize.make_grid(x, rel_error, axis, step=step, input_axis=None if imp is None else imp.axis,
                           input_steps=None if imp is None else imp.steps)
    if compensate and imp is not None and imp.hessian is not None:
        g = _compensated(x, g, imp)
    return g, quantize.grid_values(g.q, g.scales, g.axis, np.dtype(x.dtype), g.scales2, g.axis2)


def _compensated(x: np.ndarray, g: quantize.Grid, imp: Importance) -> quantize.Grid:
    """``g`` with its levels rounded by error compensation across the layer's inputs (same scales), unless the
    levels would then span more codes than a grid may hold."""
    steps = quantize.grid_values(np.ones(x.shape, dtype=np.float32), g.scales, g.axis, np.dtype(np.float32),
                                 g.scales2, g.axis2)
    q = quantize.compensated_levels(imp.rows(x), imp.rows(steps), imp.factor)
    q = q.reshape(x.shape) if imp.axis == 1 else q.T
    lo, hi = min(float(q.min()), 0.0), max(float(q.max()), 0.0)
    if hi - lo + 1 > quantize.MAX_K or max(-lo, hi) > GRID_MAX_LEVEL:
        return g
    return g._replace(q=q.astype(g.q.dtype))


def _grid_bits(g: quantize.Grid) -> float:
    """Estimated coded size of a grid: its levels, the GRID header and one float32 scale per slice."""
    return _rate_bits(g.q) + GRID_HEADER_BITS + 32 * (g.scales.size + (0 if g.scales2 is None else g.scales2.size))


def _ladder(size: int) -> tuple[float, ...]:
    """The relative errors tried for a tensor of ``size`` elements: CANDIDATE_ERRORS, and for tensors of at least
    FINE_LADDER_ELEMENTS the geometric midpoints between them too."""
    if size < FINE_LADDER_ELEMENTS:
        return CANDIDATE_ERRORS
    e = np.asarray(CANDIDATE_ERRORS)
    return tuple(float(r) for r in np.sort(np.concatenate([e, np.sqrt(e[1:] * e[:-1])])))


def candidates(x: np.ndarray, imp: Importance | None = None) -> list[Candidate]:
    """Every candidate setting of one float tensor, with exact error and estimated bits. With an importance,
    the grids take its input steps (the plain grids are not offered: at the same weighted error they cost more
    bits) and errors are importance-weighted."""
    out = []
    channels = quantize.channel_axis(x, None if imp is None else imp.axis)
    axes = (None,) if channels is None else (None, channels)
    x64 = x.astype(np.float64)
    out.append(Candidate(None, 0.0, 0.0, 8.0 * x.nbytes))  # raw: exact
    # Per tensor: steps relative to the RMS of the tensor (divided by its input steps), so the ladder reaches
    # coarse grids too (the policy's rel_error is relative to the weakest channel, which can be 1000x finer).
    rms = quantize._rms(x64 if imp is None else x64 / imp.steps.astype(np.float64).reshape(
        tuple(-1 if a == imp.axis else 1 for a in range(x.ndim))))
    for axis in axes:
        ladder: list[Candidate] = []
        for r in reversed(_ladder(x.size)):  # coarse to fine, until the grid runs out of codes and stops refining
            step = None if axis is not None else float(r * math.sqrt(12.0) * rms) or 1.0
            g, values = _grid(x, axis, r, imp, step)
            c = Candidate(axis, r, _sq_error(x64, values, imp), _grid_bits(g), imp is not None, step)
            if ladder and c.sq_error >= ladder[-1].sq_error:
                break
            ladder.append(c)
        out += ladder[::-1]
    return out


# --- importance of each layer input --------------------------------------------------------------------------


@dataclass(frozen=True)
class Importance:
    """How much each input of a linear layer matters: ``weight[j]`` is the mean square of input j on the
    calibration data over the mean over inputs (floored at INPUT_ENERGY_FLOOR), indexed along the weight tensor's
    ``axis``. The output error of the layer is then ``sum_j weight[j] * err[..j..]**2`` up to a factor, and the
    grid's relative step for input j is ``1 / sqrt(weight[j])`` (:attr:`steps`)."""

    axis: int
    weight: np.ndarray  # float64, one per slice along axis, mean about 1
    #: Matrices and pointwise convs with at most COMPENSATE_MAX_INPUTS inputs: the inputs' second-moment matrix
    #: over the mean energy, plus INPUT_ENERGY_FLOOR on the diagonal (damping, as ``weight`` is floored), from the
    #: even rows of the calibration activations. Rounding then compensates errors across inputs with it.
    hessian: np.ndarray | None = None
    #: The same from the odd rows: the output error of the layer for a weight change d (rows: outputs) is
    #: ``sum over rows of d H d^T`` with this one, which the rounding has not seen (rounding that fits the
    #: calibration inputs looks better on them than on any other input).
    check: np.ndarray | None = None

    @property
    def steps(self) -> np.ndarray:
        return (1.0 / np.sqrt(self.weight)).astype(np.float32)

    def broadcast(self, ndim: int) -> np.ndarray:
        return self.weight.reshape(tuple(-1 if a == self.axis else 1 for a in range(ndim)))

    @functools.cached_property
    def factor(self) -> np.ndarray:
        """quantize.compensation_factor of the hessian (computed once per tensor)."""
        return quantize.compensation_factor(self.hessian)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The weight as [outputs, inputs]: a Gemm / MatMul matrix, or a pointwise (1x1) conv's [O, I, 1, 1]."""
        return x.reshape(x.shape[0], x.shape[1]) if self.axis == 1 else x.T


def _weight_slots(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[str, int, int]]:
    """For each of ``names`` used by exactly one node of the main graph, and as the weight of a Conv (not grouped:
    a depthwise conv's inputs are its output channels, which keep their own scales), ConvTranspose, Gemm or
    MatMul: (data input, its channel axis, the weight's input axis)."""
    uses: dict[str, list] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in names:
                uses.setdefault(name, []).append((node, k))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes.update({n.output[0]: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value" and a.HasField("t")})
    out = {}
    for name, slots in uses.items():
        if len(slots) != 1 or slots[0][0].op_type not in _LINEAR_OPS or slots[0][1] != 1 or name not in shapes:
            continue
        node, _ = slots[0]
        dims = shapes[name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and len(dims) >= 3:
            group = int(attrs.get("group", 1))
            if group == 1:
                out[name] = (node.input[0], 1, 1)
        elif node.op_type == "ConvTranspose" and len(dims) >= 3 and int(attrs.get("group", 1)) == 1:
            out[name] = (node.input[0], 1, 0)
        elif node.op_type == "Gemm" and len(dims) == 2:
            out[name] = (node.input[0], 0 if attrs.get("transA", 0) else 1, 1 if attrs.get("transB", 0) else 0)
        elif node.op_type == "MatMul" and len(dims) == 2:
            out[name] = (node.input[0], -1, 0)
    return out


def _matrix_like(shape: tuple[int, ...]) -> bool:
    """A Gemm / MatMul matrix, or a pointwise conv (every kernel dim 1), whose inputs are exactly its data
    input's channels, so that their second moments say everything about the layer's output error."""
    return len(shape) == 2 or (len(shape) >= 3 and all(d == 1 for d in shape[2:]))


def input_importance(graph: bytes, weights: Sequence[Weight], inputs: Inputs,
                     names: set[str] | None = None) -> dict[str, Importance]:
    """The :class:`Importance` of each weight (of ``names``, default all) of a linear layer, from the energy of
    the layer's data input per channel over ``inputs`` (one onnxruntime run per feed, with those inputs added as
    graph outputs). ``weights`` are all the model's. Weights whose layer input cannot be observed, or whose shape
    does not match it, get none."""
    model = rebuild(graph, {w.name: w.array for w in weights})
    wanted = {w.name for w in weights if "#" not in w.name} if names is None else set(names)
    slots = _weight_slots(model, wanted)
    graph_inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    for act in sorted({a for a, *_ in slots.values()} - graph_inputs - outputs):
        model.graph.output.append(onnx.ValueInfoProto(name=act))
    acts = {act: ch for act, ch, _ in slots.values()}
    sizes = {w.name: w.array.shape for w in weights}
    full = {slots[n][0] for n in slots if _matrix_like(sizes[n]) and sizes[n][slots[n][2]] <= COMPENSATE_MAX_INPUTS}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    feeds_list = _feeds_list(inputs)
    runs = fidelity.run_each(model, feeds_list)  # one session for all feed dicts (see fidelity.run_each)
    for feeds in feeds_list:
        try:
            got = {**feeds, **next(runs)}
        except InputError:
            return {}
        for act, ch in acts.items():
            a = np.asarray(got.get(act, np.empty(0)))
            if a.dtype.kind != "f" or a.ndim == 0 or not a.size:
                continue
            a = np.moveaxis(a, ch, -1).reshape(-1, a.shape[ch])
            if act in full and a.shape[1] <= COMPENSATE_MAX_INPUTS:
                a = a[::-(-a.shape[0] // MOMENT_MAX_ROWS)]  # evenly spaced rows, at most MOMENT_MAX_ROWS
                m = np.stack([_gram(a[0::2]), _gram(a[1::2])])  # fit and check halves
            else:
                a = a.astype(np.float64)
                m = np.einsum("ij,ij->j", a, a)
            if act in sums and sums[act].shape != m.shape:
                continue
            sums[act] = sums.get(act, 0.0) + m
            counts[act] = counts.get(act, 0) + a.shape[0]
    del model
    out = {}
    for name, (act, _, axis) in slots.items():
        if act not in sums:
            continue
        m = sums[act] / counts[act]
        e = (np.diag(m[0]) + np.diag(m[1])) if m.ndim == 3 else m
        shape = sizes[name]
        if not (len(shape) > axis and shape[axis] == e.size and np.isfinite(m).all() and e.mean() > 0):
            continue
        scale = e.mean()
        w = np.maximum(e / scale, INPUT_ENERGY_FLOOR)
        h = c = None
        # Compensation needs at least as many fitting rows as inputs: with fewer, the second-moment matrix is
        # singular and the rounding pushes errors into directions the calibration data never excites.
        if (m.ndim == 3 and _matrix_like(shape) and counts[act] // 2 >= e.size
                and all(np.trace(part) > 0 for part in m)):
            h, c = (part / np.trace(part) * e.size for part in m)  # each half over its own mean energy
            for part in (h, c):
                part[np.diag_indices(e.size)] += INPUT_ENERGY_FLOOR  # damping: few samples leave x^T x singular
        out[name] = Importance(axis, w, h, c)
    return out


def _gram(rows: np.ndarray) -> np.ndarray:
    """rows.T @ rows in float64, from a float32 product (BLAS sgemm on a contiguous copy: several times faster than
    float64 on strided rows; its relative error, ~1e-6, is far below the damping the matrix gets)."""
    r = np.ascontiguousarray(rows, dtype=np.float32)
    return (r.T @ r).astype(np.float64)


def _sq_error(x64: np.ndarray, values: np.ndarray, imp: Importance | None) -> float:
    """Squared error of ``values`` against ``x64``, weighted by the importance of each input (with a hessian: the
    layer's output error on the calibration inputs, over their mean energy)."""
    d = values.astype(np.float64)
    d -= x64
    if imp is not None and imp.check is not None:
        r = imp.rows(d)
        return float(np.einsum("ij,ij->", r @ imp.check, r))
    d *= d
    if imp is not None:
        d *= imp.broadcast(d.ndim)
    return float(d.sum())


def _values(x: np.ndarray, c: Candidate, imp: Importance | None = None) -> np.ndarray:
    if c.rel_error == 0:
        return x
    return _grid(x, c.axis, c.rel_error, imp if c.weighted else None, c.step)[1]


# --- sensitivity and allocation -----------------------------------------------------------------------------


Log = Callable[[str], None]


#: Tensors smaller than this (scalars of activation functions, tiny vectors) are left to the policy (raw by
#: default): keeping them exact costs at most 60 bytes each, while probing each costs a model run (PP-OCRv4 rec has
#: 243 scalars among its 365 tensors).
ALLOCATE_MIN_ELEMENTS = 16


def _compressible(weights: Sequence[Weight], policy: Policy, *, all_sizes: bool = True) -> list[Weight]:
    """Float tensors the allocation may code: all finite ones except those the user keeps raw by name. Small
    tensors and normalisation parameters are candidates too (``all_sizes``): the allocation keeps them raw when
    that is best."""
    base = policy
    if all_sizes:
        policy = Policy(**{**_policy_fields(policy), "min_elements": 0, "compress_norm": True})
    out = []
    for w in weights:
        if all_sizes and w.array.size < ALLOCATE_MIN_ELEMENTS:
            continue
        small = base.settings_for(w.name, w.kind, w.array.size) is None
        if small and not (w.consumers and set(w.consumers) <= WEIGHT_CONSUMERS):
            continue  # a small float feeding shape logic (Resize scales, Pad values...) must stay exact
        s = policy.settings_for(w.name, w.kind, w.array.size)
        if s is not None and w.array.dtype.kind == "f" and w.array.size and np.isfinite(w.array).all():
            out.append(w)
    return out


def sensitivity(probe: Probe, weights: Sequence[Weight], *, error: float = PROBE_ERROR,
                progress: Callable[[int, int, str], None] | None = None,
                importance: Mapping[str, Importance] | None = None) -> dict[str, tuple[float, float]]:
    """For each weight the probe can feed: (output distortion, squared weight error) when only that weight is
    rounded to a per-channel grid at ``error`` (with its input steps and importance-weighted error where
    ``importance`` has it). Distortion is the sum over outputs of squared relative L2."""
    out = {}
    todo = [w for w in weights if w.name in probe.lifted]
    n = len(probe.inputs)
    items = None if n <= SENSITIVITY_RUNS else sorted({round(k * (n - 1) / (SENSITIVITY_RUNS - 1))
                                                        for k in range(SENSITIVITY_RUNS)})
    for i, w in enumerate(todo, 1):
        x = np.asarray(w.array)
        imp = (importance or {}).get(w.name)
        # Plain rounding (no compensation, which fits the calibration inputs and so looks too good on them).
        axis = quantize.channel_axis(x, None if imp is None else imp.axis)
        step = None
        if axis is not None and x.size < PROBE_MIN_SLICE * x.shape[axis]:
            # Channels of a few elements each (a [309, 1, 1] scale vector) round to nearly one relative error
            # each: a common scale factor, which a normalisation downstream hides. One step for the tensor.
            axis = None
            step = float(error * math.sqrt(12.0) * quantize._rms(
                x if imp is None else x / imp.steps.reshape(imp.broadcast(x.ndim).shape))) or 1.0
        values = _grid(x, axis, error, imp, step, compensate=False)[1]
        sq = _sq_error(x.astype(np.float64), values, imp)
        try:
            out[w.name] = (_distortion(probe.compare({w.name: values}, items)), sq)
        except InputError:  # the graph cannot run with it rounded (e.g. a float that sets a shape): leave it alone
            pass
        if progress is not None:
            progress(i, len(todo), w.name)
    return out


#: Calibration runs each tensor's probe runs on (evenly spaced when there are more): a sensitivity only ranks
#: tensors against each other, which a few runs do about as well as all of them, and the probe is one run per
#: tensor (most of --target's and the benchmark's time on PP-OCR); whole allocations are checked on every run.
SENSITIVITY_RUNS = 4
#: A tensor whose rounding did not move the outputs at the probe error (a squeeze-excitation branch saturated on
#: the calibration inputs) still counts this share of the median tensor's distortion per unit of relative error:
#: with none, PP-OCRv4 det's SE convs went to the coarsest grid and broke the model on other inputs.
SENSITIVITY_FLOOR = 1e-2


def _energy(x: np.ndarray, imp: Importance | None) -> float:
    """The tensor's squared norm in the units of its errors (importance-weighted where it has an importance)."""
    x = np.asarray(x, dtype=np.float64)
    return _sq_error(np.zeros_like(x), x, imp)


def _floored(s: dict[str, float], energy: Mapping[str, float]) -> dict[str, float]:
    """Sensitivities with SENSITIVITY_FLOOR applied per unit of relative squared error."""
    rel = [v * energy[n] for n, v in s.items() if v > 0 and energy[n] > 0]
    if not rel:
        return s
    floor = SENSITIVITY_FLOOR * float(np.median(rel))
    return {n: (max(v, floor / energy[n]) if energy[n] > 0 else v) for n, v in s.items()}


class Allocator:
    """The measurements that do not depend on the target (probe, candidates, sensitivities), made once; then
    :meth:`solve` for any number of targets. Evaluations of a choice are memoized, so targets share them."""

    def __init__(self, graph: bytes, weights: Sequence[Weight], policy: Policy, inputs: Inputs, *,
                 log: Log | None = None, progress: Callable[[int, int, str], None] | None = None,
                 weighted: bool = True):
        t0 = time.perf_counter()
        self.say = say = log or (lambda _m: None)
        self.probe = probe = Probe(graph, weights, inputs)
        comp = _compressible(weights, policy)
        self.fixed = [w.name for w in comp if w.name not in probe.lifted]
        self.tensors = [w for w in comp if w.name in probe.lifted]
        say(f"probe: {len(self.tensors)} tensors fed as inputs, {len(self.fixed)} kept at the policy's settings")
        self.importance = input_importance(graph, weights, inputs, {w.name for w in self.tensors}) if weighted else {}
        say(f"importance: {len(self.importance)} tensors weighted by their layer's input energy")
        self.cands = {w.name: candidates(np.asarray(w.array), self.importance.get(w.name)) for w in self.tensors}
        say(f"candidates: {sum(len(c) for c in self.cands.values())} in {time.perf_counter() - t0:.1f} s")
        sens = sensitivity(probe, self.tensors, progress=progress, importance=self.importance)
        self.fixed += [w.name for w in self.tensors if w.name not in sens]
        self.tensors = [w for w in self.tensors if w.name in sens]
        self.cands = {w.name: self.cands[w.name] for w in self.tensors}
        self.s = _floored({n: (d / sq if sq > 0 else 0.0) for n, (d, sq) in sens.items()},
                          {w.name: _energy(w.array, self.importance.get(w.name)) for w in self.tensors})
        say(f"sensitivity: {len(sens)} runs, {time.perf_counter() - t0:.1f} s")
        self.arrays = {w.name: w.array for w in self.tensors}
        self.setup_seconds = time.perf_counter() - t0
        self._outputs: collections.OrderedDict[tuple, list[dict[str, np.ndarray]]] = collections.OrderedDict()
        self._outputs_bytes = 0

    def policy_for(self, choice: Mapping[str, Candidate], base: Policy) -> Policy:
        """``base`` with ``choice`` as per-tensor rules (what :meth:`Allocation.policy` gives for a solved one)."""
        chosen = [TensorChoice(w.name, int(w.array.size), self.s[w.name], choice[w.name], self.importance.get(w.name))
                  for w in self.tensors]
        return Allocation(Target("rel_l2", 0.5), chosen, self.fixed, [], False, 0, 0, 0.0).policy(base)

    def grids_for(self, choice: Mapping[str, Candidate]) -> dict[str, quantize.Grid]:
        """The grids of the chosen candidates whose levels come from error-compensating rounding (which the codec
        cannot redo from settings alone): pass them to ``api.compress(grids=...)`` with :meth:`policy_for`."""
        out = {}
        for n, c in choice.items():
            imp = self.importance.get(n)
            if c.rel_error and c.weighted and imp is not None and imp.hessian is not None:
                out[n] = _grid(np.asarray(self.arrays[n]), c.axis, c.rel_error, imp, c.step)[0]
        return out

    def choose(self, lam: float) -> dict[str, Candidate]:
        return {n: min(cs, key=lambda c: c.bits + lam * self.s[n] * c.sq_error) for n, cs in self.cands.items()}

    def _outputs_of(self, choice: Mapping[str, Candidate], margin: float) -> list[dict[str, np.ndarray]]:
        key = (margin, tuple(sorted((n, c.per_channel, c.weighted, c.rel_error) for n, c in choice.items())))
        if key in self._outputs:
            self._outputs.move_to_end(key)
            return self._outputs[key]
        replaced = {}
        for n, c in choice.items():
            x = np.asarray(self.arrays[n])
            v = _values(x, c, self.importance.get(n))
            replaced[n] = v if margin == 1.0 else (x + margin * (v.astype(x.dtype) - x)).astype(x.dtype)
        outputs = self.probe._run(replaced)
        self._outputs[key] = outputs
        self._outputs_bytes += _outputs_nbytes(outputs)
        while self._outputs_bytes > OUTPUTS_MEMO_BYTES and len(self._outputs) > 1:  # drop the least recently used
            _, old = self._outputs.popitem(last=False)
            self._outputs_bytes -= _outputs_nbytes(old)
        return outputs

    def measure(self, choice: Mapping[str, Candidate], target: Target, margin: float,
                items: Sequence[int] | None = None) -> tuple[bool, list]:
        """Whether ``choice`` (its weight error scaled by ``margin``) meets ``target`` on the calibration runs
        ``items`` (default: all), and the merged fidelity there. The model always runs on every calibration run
        (memoized), so searches on different folds share their runs."""
        outputs = self._outputs_of(choice, margin)
        reference, outputs = _subset(self.probe.reference, items), _subset(outputs, items)
        fids = merge_fidelity([fidelity.compare(r, o) for r, o in zip(reference, outputs)])
        return target.met(fids, reference, outputs), fids

    def _agreement(self, choice: Mapping[str, Candidate], target: Target, items: Sequence[int]) -> tuple[float, int]:
        """Task agreement (task targets) or the worst output's top-1 agreement of ``choice`` as written (margin 1)
        on the calibration runs ``items``, and the number of items (samples, lines, streams...) it counts."""
        reference, outputs = _subset(self.probe.reference, items), _subset(self._outputs_of(choice, 1.0), items)
        if target.metric == "task":
            return _task_measures(target.task, reference, outputs)[:2]

        def score(f: fidelity.OutputFidelity) -> float:  # Target.met's rule for outputs without class scores
            return f.top1_agreement if f.top1_agreement is not None else float(f.rel_l2 <= TOP1_FALLBACK_REL_L2)

        worst = min(merge_fidelity([fidelity.compare(r, o) for r, o in zip(reference, outputs)]), key=score)
        return score(worst), worst.n_samples

    def _estimates(self, target: Target) -> bool:
        """Whether ``target`` is a task target whose check estimates its changes on new items (which then
        replaces the weight-error margin: see :data:`CHANGE_BUDGET`)."""
        ref = self.probe.reference
        return target.metric == "task" and _task_measures(target.task, ref, ref)[3] is not None

    def _search(self, target: Target, margin: float, items: Sequence[int] | None,
                say: Log) -> tuple[dict[str, Candidate], list, bool]:
        """Bisection on the multiplier, then :func:`_refine`: the smallest choice found that meets ``target`` on
        ``items`` with ``margin``; the finest candidates (and False) when no multiplier meets it."""
        def measure(choice):
            return self.measure(choice, target, margin, items)

        # Bisection on log(lam): larger lam = more bits, less distortion. Bracket from 1 to 1e16 bits per unit.
        lo, hi = 0.0, 16.0
        best: tuple[dict[str, Candidate], list] | None = None
        for _ in range(SEARCH_STEPS):
            mid = round((lo + hi) / 2, 3)
            choice = self.choose(10.0 ** mid)
            ok, fids = measure(choice)
            size = sum(c.bits for c in choice.values()) / 8
            say(f"  lam=1e{mid:.2f}: {size / 1e6:.3f} MB estimated, worst rel L2 "
                f"{max((f.rel_l2 for f in fids), default=0):.2e}, {'meets' if ok else 'misses'} {target}")
            if ok:
                hi, best = mid, (choice, fids)
            else:
                lo = mid
        if best is None:
            finest = {n: min(cs, key=lambda c: c.sq_error) for n, cs in self.cands.items()}
            say(f"  no multiplier met {target}; using the finest candidates")
            return finest, measure(finest)[1], False
        choice, fids = _refine(dict(best[0]), best[1], self.cands, measure, target, say)
        return choice, fids, True

    def solve(self, target: Target, *, margin: float | None = None, validate: bool = True,
              margins: Sequence[float] = ()) -> Allocation:
        """The smallest allocation found that meets ``target`` on the calibration inputs.

        Task and top-1 targets are pass/fail per item, so the smallest file that passes the calibration items
        sits at the edge for unseen ones. With ``validate`` (and at least two calibration runs) they are
        cross-validated (:data:`VALIDATION_FOLDS` folds): each fold searches an allocation without some of the
        runs, which then check it as written. :attr:`Allocation.validation` keeps what the held-out runs said: an
        estimate of how the file does on new inputs. ``margins`` (increasing) lets the validation choose the
        margin: the first at which every fold holds on its held-out runs is used to search all runs (the last one
        when none does); by default the validation only reports, at ``margin``."""
        t0 = time.perf_counter()
        runs0 = self.probe.runs
        say = self.say
        discrete = target.metric in ("task", "top1")
        estimates = self._estimates(target)
        n = len(self.probe.inputs)
        if margin is None:
            margin = DISCRETE_MARGIN if discrete and not estimates else 1.0
        validation = None
        if discrete and validate and n >= 2:
            k = min(VALIDATION_FOLDS, n)
            parts = [tuple(range(i, n, k)) for i in range(k)]
            folds: list[Held] = []
            for margin in tuple(margins) or (margin,):
                for held in parts:
                    fit = tuple(i for i in range(n) if i not in held)
                    say(f"validation: margin {margin:g}, searching without calibration runs {list(held)}")
                    choice, _, found = self._search(target, margin, fit, say)
                    agree, items = self._agreement(choice, target, held)
                    # a fold holds when its held-out items keep their answers, up to the share of them the target
                    # lets change (a task target's estimate on a quarter of the runs is the search's business, not
                    # what the fold is asked)
                    ok = found and (agree >= target.agreement_floor(estimates) if target.metric == "task"
                                    else self.measure(choice, target, 1.0, held)[0])
                    folds.append(Held(margin, len(fit), len(held), items, agree, ok,
                                      int(sum(c.bits for c in choice.values()) / 8)))
                    say(f"validation: margin {margin:g}: runs {list(held)}, unseen by that search, agree "
                        f"{agree:.2%} ({'meets' if ok else 'misses'} {target})")
                if all(f.met for f in folds[-k:]):
                    break
            validation = Validation(margin, tuple(folds), all(f.met for f in folds[-k:]))
        choice, fids, met = self._search(target, margin, None, say)
        chosen = [TensorChoice(w.name, int(w.array.size), self.s[w.name], choice[w.name], self.importance.get(w.name))
                  for w in self.tensors]
        log = [] if validation is None else [f"validation: {validation}"]
        for line in log:
            say(line)
        return Allocation(target, chosen, self.fixed, fids, met, int(sum(c.bits for c in choice.values()) / 8),
                          self.probe.runs - runs0, time.perf_counter() - t0, log, validation)


def validation_runs(graph: bytes, inputs: Inputs) -> list[dict[str, np.ndarray]]:
    """The calibration runs, with one batched run split into up to :data:`VALIDATION_FOLDS` runs (row i goes to run
    i mod k) so that a discrete target can be validated on rows its search did not see. A run is split only when
    every fed input of rank >= 1 declares a free leading dim (a batch) and all have the same size there, at least 2;
    otherwise the runs are unchanged."""
    runs = _feeds_list(inputs)
    if len(runs) != 1:
        return runs
    feeds = runs[0]
    declared = {v.name: v for v in onnx.load_model_from_string(graph).graph.input}
    batched = {k: v for k, v in feeds.items() if np.ndim(v) >= 1}
    sizes = {np.shape(v)[0] for v in batched.values()}
    if not batched or len(sizes) != 1 or min(sizes) < 2:
        return runs
    for name in batched:
        v = declared.get(name)
        dims = v.type.tensor_type.shape.dim if v is not None and v.type.HasField("tensor_type") else ()
        if not dims or dims[0].HasField("dim_value"):  # unknown to the graph, or a fixed leading dim
            return runs
    k = min(VALIDATION_FOLDS, min(sizes))
    return [{name: (np.asarray(v)[i::k] if name in batched else v) for name, v in feeds.items()} for i in range(k)]


def allocate(graph: bytes, weights: Sequence[Weight], policy: Policy, inputs: Inputs,
             target: Target, *, log: Log | None = None, margin: float | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> Allocation:
    """Choose per-tensor grid settings for the smallest file meeting ``target`` on ``inputs``."""
    if target.metric in ("task", "top1"):
        inputs = validation_runs(graph, inputs)
    a = Allocator(graph, weights, policy, inputs, log=log, progress=progress)
    result = a.solve(target, margin=margin)
    result.evaluations = a.probe.runs
    result.seconds += a.setup_seconds
    return result


def _refine(choice: dict[str, Candidate], fids, cands: Mapping[str, list[Candidate]], measure, target: Target,
            say: Log) -> tuple[dict[str, Candidate], list]:
    """Greedy refinement on the measured target: the largest tensors, one at a time, take the coarsest candidate
    of their grid kind that keeps the whole model within the target (binary search over the ladder). The
    additive model ranks tensors by output distortion; a target like top-1 agreement tolerates much more on
    some layers (a classifier's output layer) than their share of the distortion says."""
    ranked = sorted(choice, key=lambda n: -choice[n].bits)
    total = sum(c.bits for c in choice.values())
    covered = 0.0
    for n in ranked[:REFINE_TENSORS]:
        if covered >= REFINE_SHARE * total:
            break
        covered += choice[n].bits
        ladder = sorted((c for c in cands[n] if c.per_channel == choice[n].per_channel and c.weighted == choice[n].weighted
                         and c.rel_error > choice[n].rel_error),
                        key=lambda c: c.rel_error)
        lo, hi = -1, len(ladder)  # ladder[lo] is known good (-1: the current choice), ladder[hi] known bad
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, f = measure({**choice, n: ladder[mid]})
            if ok:
                lo, fids = mid, f
            else:
                hi = mid
        if lo >= 0:
            say(f"  refine {n}: rel error {choice[n].rel_error:.1e} -> {ladder[lo].rel_error:.1e}, "
                f"{choice[n].bits / 8e6:.3f} -> {ladder[lo].bits / 8e6:.3f} MB")
            choice[n] = ladder[lo]
    return choice, fids


def calibration_inputs(model: onnx.ModelProto | str, path: str | None, *, seed: int = 0,
                       warn: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Calibration inputs from an .npz keyed by input name, or random ones (with :data:`SYNTHETIC_WARNING`)."""
    if path is not None:
        return fidelity.load_inputs(path)
    (warn or (lambda m: warnings.warn(m, stacklevel=2)))(SYNTHETIC_WARNING)
    return fidelity.random_inputs(model, seed=seed)


@dataclass(frozen=True)
class Verification:
    """The final full run: the written file decoded, rebuilt and run beside the original."""

    met: bool
    fidelity: list[fidelity.OutputFidelity]
    detail: str  # the task check's one-line detail, or the worst metric
    on: str  # "calibration" or "check inputs"
    expected_changes: float | None = None  # task targets with decisions: the estimate on those inputs


def compress_to_target(model_path, output, policy: Policy, target: Target,
                       calibration: Inputs | None, *, check_inputs: Inputs | None = None,
                       overwrite: bool = False, log: Log | None = None,
                       progress: Callable[[int, int, str], None] | None = None):
    """Allocate settings on ``calibration`` (random inputs, with a warning, when None), compress with them, then
    verify: decode the written file, rebuild the model and run it beside the original on ``check_inputs``
    (default: the calibration inputs); a task target is verified on its answers there, its estimate of changes on
    new items reported in the detail. Task and top-1 targets are cross-validated on the calibration runs (one
    batched run is split, :func:`validation_runs`): :attr:`Allocation.validation`, also in the file's metadata as
    ``dcz.target_validation``.

    Returns (CompressResult, Allocation, Verification).
    """
    from . import api
    from .onnx_ingest import extract_weights, load_model

    model = load_model(model_path)
    if calibration is None:
        calibration = calibration_inputs(model, None, warn=log)
    graph, weights = extract_weights(model)
    del model
    runs = validation_runs(graph, calibration) if target.metric in ("task", "top1") else calibration
    a = Allocator(graph, weights, policy, runs, log=log)
    alloc = a.solve(target)
    alloc.evaluations = a.probe.runs
    alloc.seconds += a.setup_seconds
    grids = a.grids_for({c.name: c.candidate for c in alloc.choices})
    del graph, weights, a
    result = api.compress(model_path, output, alloc.policy(policy), overwrite=overwrite, progress=progress, grids=grids,
                          metadata={"dcz.target": str(target), "dcz.target_met_on_calibration": str(alloc.met).lower(),
                                    **({"dcz.target_validation": str(alloc.validation)} if alloc.validation else {})})
    inputs = check_inputs if check_inputs is not None else calibration
    reference = run_all(load_model(model_path), inputs)
    outputs = run_all(api.load(result.output), inputs)
    fids = merge_fidelity([fidelity.compare(r, o) for r, o in zip(reference, outputs)])
    changes = None
    if target.metric == "task":
        # the final check judges the answers; the estimate of changes steered the search and is reported (it
        # varies from sample to sample: a LeNet-300 file at 1.0% on its calibration digits read 1.8% on held-out
        # ones, all 250 of which kept their answers)
        agree, n, worst, changes = _task_measures(target.task, reference, outputs)
        met, detail = agree >= target.agreement_floor(changes is not None), _agreement_detail(agree, n, worst, changes)
    else:
        met = target.met(fids)
        detail = f"worst rel L2 {max((f.rel_l2 for f in fids), default=0.0):.2e}"
    return result, alloc, Verification(met, fids, detail, "check inputs" if check_inputs is not None else "calibration",
                                       changes)


@dataclass(frozen=True)
class SensitivityRow:
    """One tensor's response: output worst rel L2 when only it is rounded at each error, and estimated bytes."""

    name: str
    kind: str
    numel: int
    per_channel: bool
    errors: tuple[float, ...]
    rel_l2: tuple[float, ...]
    est_bytes: tuple[int, ...]


def sensitivity_table(model_path, policy: Policy, calibration: Inputs | None,
                      errors: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), *, log: Log | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> list[SensitivityRow]:
    """For each compressible tensor the probe can feed: worst output rel L2 with only that tensor rounded to a
    grid at each error (per channel where the tensor has channels), and the estimated coded size."""
    from .onnx_ingest import extract_weights, load_model

    model = load_model(model_path)
    if calibration is None:
        calibration = calibration_inputs(model, None, warn=log)
    graph, weights = extract_weights(model)
    del model
    probe = Probe(graph, weights, calibration)
    todo = [w for w in _compressible(weights, policy, all_sizes=False) if w.name in probe.lifted]
    rows = []
    for i, w in enumerate(todo, 1):
        x = np.asarray(w.array)
        axis = quantize.channel_axis(x)
        rel, size = [], []
        for e in errors:
            g, values = _grid(x, axis, e)
            fids = probe.compare({w.name: values})
            rel.append(max((f.rel_l2 for f in fids), default=0.0))
            size.append(int(_grid_bits(g) / 8))
        rows.append(SensitivityRow(w.name, w.kind, int(x.size), axis is not None, tuple(errors), tuple(rel),
                                   tuple(size)))
        if progress is not None:
            progress(i, len(todo), w.name)
    return rows


def plot_sensitivity(rows: Sequence[SensitivityRow], path) -> None:
    """Output error against weight error, one line per tensor (the most sensitive labelled). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'dcz[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ranked = sorted(rows, key=lambda r: -max(r.rel_l2))
    for i, r in enumerate(ranked):
        ax.loglog(r.errors, np.maximum(r.rel_l2, 1e-9), marker="o", ms=3, lw=1, alpha=0.8,
                  label=f"{r.name[-28:]} ({r.numel:,})" if i < 8 else None)
    ax.set_xlabel("weight rounding error (fraction of channel RMS)")
    ax.set_ylabel("worst output relative L2 (only this tensor rounded)")
    ax.set_title("dcz sensitivity: output error per tensor")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
