"""Rate against task-level fidelity on the public models: dcz --target next to the paper's plain recipe and the
default, each checked on held-out natural test inputs with the model's task check (dcformat.tasks).

    python tools/target_table.py                       # every public model with natural inputs
    python tools/target_table.py ddddocr-common --target task   # one model; target 'task' (default) or rel_l2=1e-2 ...
    python tools/target_table.py --nncodec --json out.json      # also NNCodec at the same test answers
    python tools/target_table.py ddddocr-common --nncodec --test-samples 32   # a larger test split

With ``--nncodec`` (``bash tools/install_nncodec.sh`` first), each row also has NNCodec's smallest file whose answers
on the same test inputs agree at least as well as the dcz --target file's, over NNCodec's one global qp. The qp is
picked by looking at the test answers, which dcz never sees: an oracle that favours NNCodec.

Calibration inputs (allocation) and test inputs (the table's fidelity) come from tools/natural_inputs.py and are
disjoint; each split is up to SAMPLES runs (seeds), so one-item models (a text line, a stream) get several items. Prints a Markdown table; --json writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402
import dcformat  # noqa: E402
from dcformat import allocate, fidelity, tasks  # noqa: E402
from dcformat.onnx_ingest import load_model  # noqa: E402
import fetch_models  # noqa: E402
from natural_inputs import natural_inputs  # noqa: E402


def _model(name: str) -> Path:
    if name in fetch_models.MODELS:
        return fetch_models.fetch(name, None)
    from dcformat.demo import bundled

    return Path(bundled(f"{name.replace('-', '_')}.onnx"))


def _check(name: str, ref: list[dict], dcz: Path, test: list[dict]) -> tuple[float, float, str]:
    """Task agreement, worst rel L2 and detail of ``dcz`` on ``test`` against the original's outputs ``ref``."""
    new = allocate.run_all(dcformat.load(dcz), test)
    fids = allocate.merge_fidelity([fidelity.compare(r, o) for r, o in zip(ref, new)])
    agree, detail = allocate.task_agreement(name, ref, new)
    return agree, max((f.rel_l2 for f in fids), default=0.0), detail


#: Natural samples per split: models that take one item per run (a text line, an audio stream) get several runs.
SAMPLES = 8


def samples(name: str, src: Path, split: str, n: int = SAMPLES) -> list[dict]:
    """Up to ``n`` distinct natural feed dicts of ``split`` (seeds 0..n-1; duplicates dropped)."""
    out, seen = [], set()
    for seed in range(n):
        feeds = natural_inputs(name, src, split=split, seed=seed)
        key = tuple((k, v.shape, hash(v.tobytes())) for k, v in sorted(feeds.items()))
        if key not in seen:
            seen.add(key)
            out.append(feeds)
    return out


#: Labelled test splits (bundled): accuracy is reported next to agreement.
LABELS = {"digits-mlp": "digits_test.npz"}


def accuracy(name: str, model) -> float | None:
    if name not in LABELS:
        return None
    import numpy as np
    from dcformat.demo import bundled

    with np.load(bundled(LABELS[name])) as z:
        x, y = z["x"], z["y"]
    out = fidelity.run(model, {"input": x})
    return float(np.mean(next(iter(out.values())).argmax(-1) == y))


#: NNCodec's qp search on the test answers: the first qp tried, the stride while bracketing (a factor 2.8 in step
#: size), then bisection to one qp. The range is tools/bench.py's.
NNCODEC_START = -40
NNCODEC_STRIDE = 6


def coarsest_qp(ok: Callable[[int], bool]) -> int | None:
    """The largest qp with ``ok(qp)``, the next qp up failing: from NNCODEC_START, finer by NNCODEC_STRIDE until
    one passes, coarser by it until one fails, then bisection. None if even bench.NNCODEC_QP_MIN fails. Exact
    where pass / fail is monotone in qp; otherwise a pass above a failing qp is not looked for."""
    lo = NNCODEC_START
    while not ok(lo):
        if lo <= bench.NNCODEC_QP_MIN:
            return None
        lo = max(lo - NNCODEC_STRIDE, bench.NNCODEC_QP_MIN)
    hi = None
    while hi is None and lo < bench.NNCODEC_QP_MAX:
        q = min(lo + NNCODEC_STRIDE, bench.NNCODEC_QP_MAX)
        lo, hi = (q, None) if ok(q) else (lo, q)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def nncodec_match(name: str, src: Path, tmp: Path, test: list[dict], ref: list[dict], need: float,
                  python: Path) -> dict:
    """NNCodec's smallest file whose item-weighted task agreement on ``test`` is at least ``need``, at the qp
    :func:`coarsest_qp` finds (``ref``: the original's outputs on ``test``). If even the finest qp fails, its
    numbers with ``met`` False."""
    from types import SimpleNamespace

    peer = bench.NNCodecPeer(SimpleNamespace(name=name, path=src, tmp=tmp), python)
    tried: dict[int, dict] = {}

    def ok(qp: int) -> bool:
        if qp not in tried:
            res, model = peer.rebuilt(qp)
            agree, detail = allocate.task_agreement(name, ref, allocate.run_all(model, test))
            tried[qp] = {"qp": qp, "bytes": res["file_bytes"], "bitstream": res["bitstream_bytes"], "task": agree,
                         "accuracy": accuracy(name, model), "detail": detail}
        return tried[qp]["task"] >= need - allocate.AGREEMENT_ROUNDING

    t0 = time.perf_counter()
    try:
        best = coarsest_qp(ok)
    finally:
        peer.close()
    if best is None:  # even the finest qp fails: its numbers
        return {**tried[min(tried)], "met": False, "seconds": time.perf_counter() - t0, "tried": sorted(tried)}
    return {**tried[best], "met": True, "seconds": time.perf_counter() - t0, "tried": sorted(tried)}


def run(name: str, target_text: str, tmp: Path, n: int = SAMPLES, nncodec: Path | None = None,
        n_test: int = SAMPLES) -> dict:
    src = _model(name)
    calib = samples(name, src, "calibration", n)
    test = samples(name, src, "test", n_test)
    ref = allocate.run_all(load_model(src), test)  # the original's answers, once for every file checked
    row: dict = {"model": name, "original": src.stat().st_size, "calibration_runs": len(calib), "test_runs": len(test)}
    for label, policy in (("paper", dcformat.Policy(quantizer="kmeans", bits={"*": 8})), ("default", dcformat.Policy())):
        r = dcformat.compress(src, tmp / f"{name}.{label}.dcz", policy, overwrite=True)
        agree, rel, _ = _check(name, ref, r.output, test)
        row[label] = {"bytes": r.dcz_bytes, "ratio": r.ratio, "task": agree, "rel_l2": rel}
    goal = allocate.Target.parse(f"task={name}{target_text[4:]}" if target_text.startswith("task") else target_text)
    t0 = time.perf_counter()
    r, alloc, final = allocate.compress_to_target(src, tmp / f"{name}.target.dcz", dcformat.Policy(), goal, calib,
                                                  check_inputs=test, overwrite=True)
    secs = time.perf_counter() - t0
    agree, rel, detail = _check(name, ref, r.output, test)
    row["accuracy"] = {"original": accuracy(name, load_model(src)), "target": accuracy(name, dcformat.load(r.output))}
    row["target"] = {"goal": str(goal), "bytes": r.dcz_bytes, "ratio": r.ratio, "task": agree, "rel_l2": rel,
                     "met_calibration": alloc.met, "met_test": final.met, "seconds": secs, "runs": alloc.evaluations,
                     "detail": detail, "validation": str(alloc.validation) if alloc.validation else None}
    if nncodec is not None:
        row["nncodec"] = nncodec_match(name, src, tmp, test, ref, agree, nncodec)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--target", default="task", help="'task' (each model's own check), 'task,changes=V', or METRIC=V")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calibration-samples", type=int, default=SAMPLES,
                    help=f"calibration runs (seeds) per model (default {SAMPLES})")
    ap.add_argument("--test-samples", type=int, default=SAMPLES,
                    help=f"test runs (seeds) per model (default {SAMPLES}): more makes the NNCodec oracle less lucky")
    ap.add_argument("--nncodec", action="store_true",
                    help="also NNCodec's smallest file with the same test answers "
                         "(bash tools/install_nncodec.sh first)")
    args = ap.parse_args()
    nncodec = bench.NNCODEC_VENV / "bin" / "python" if args.nncodec else None
    if nncodec is not None and not nncodec.exists():
        ap.error(f"--nncodec: {nncodec} not found; run: bash tools/install_nncodec.sh")
    names = args.names or [n for n in tasks.MODEL_TASKS if n not in ("lenet300", "lenet5", "logreg-iris", "light-resnet50")]
    print(f"# command: python tools/target_table.py {' '.join(sys.argv[1:])}")
    print("| model | original | paper 8-bit k-means | default grid | dcz --target | target met (calib / test) | task agree (test) | rel L2 (test) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            try:
                row = run(name, args.target, Path(d), args.calibration_samples, nncodec, args.test_samples)
            except Exception as e:  # one model's failure must not hide the others' numbers
                print(f"| {name} | failed: {str(e)[:120]} |")
                continue
            rows.append(row)
            p, de, t = row["paper"], row["default"], row["target"]

            def cell(x):
                return f"{x['bytes']:,} ({x['ratio']:.2f}x, task {x['task']:.0%})"

            print(f"| {name} | {row['original']:,} | {cell(p)} | {cell(de)} | {t['bytes']:,} ({t['ratio']:.2f}x) | "
                  f"{'yes' if t['met_calibration'] else 'no'} / {'yes' if t['met_test'] else 'no'} | {t['task']:.2%} | "
                  f"{t['rel_l2']:.1e} | {t['seconds']:.0f} |", flush=True)
            if t["validation"]:
                print(f"|  | {t['validation']} |", flush=True)
            if "nncodec" in row:
                nn = row["nncodec"]
                numbers = (f"{nn['bytes']:,} ({row['original'] / nn['bytes']:.2f}x, qp {nn['qp']}, "
                           f"task {nn['task']:.2%}"
                           + (f", accuracy {nn['accuracy']:.2%}" if nn["accuracy"] is not None else "") + ")")
                print("|  | NNCodec at the same test answers: " + (
                    f"{numbers}; dcz / NNCodec {t['bytes'] / nn['bytes']:.2f} |" if nn["met"] else
                    f"none: its finest qp changes more of them, {numbers} |"), flush=True)
            if row["accuracy"]["original"] is not None:
                print(f"|  | test accuracy {row['accuracy']['original']:.2%} -> {row['accuracy']['target']:.2%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
