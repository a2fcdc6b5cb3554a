"""Peak memory and wall time of ``dcz compress`` and ``dcz decompress`` on one model.

Each step runs in a fresh Python process. That process first imports what the step needs (the baseline),
reads its resident set, resets its peak (``/proc/self/clear_refs`` 5), runs the step, and reads
``VmHWM`` (the peak resident set since the reset). So the figures are:

    baseline   RSS after the imports (the interpreter, numpy, onnx, dcformat)
    peak       highest RSS of the whole process (``VmHWM`` before the reset, or after it if higher)
    above      peak during the step minus baseline: the memory the step itself needs

With ``--tracemalloc`` a second run of each step reports tracemalloc's peak of Python and numpy
allocations (protobuf's C++ buffers are not seen by it) and the biggest allocation sites at that peak.

    python tools/bench_memory.py .cache/models/common.onnx
    python tools/bench_memory.py .cache/models/common.onnx --tracemalloc --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run in the child. argv: step, source, destination, tracemalloc flag.
_CHILD = r"""
import os, sys, time, json
step, src, dst, trace = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

from dcformat import api  # what `dcz compress` / `dcz decompress` import before they start
baseline = status("VmRSS")
import_peak = status("VmHWM")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM so the peak below is the step's own
    reset = True
except OSError:
    reset = False
if trace:
    import tracemalloc
    tracemalloc.start(8)
t0 = time.perf_counter()
if step == "compress":
    api.set_malloc_threshold()  # as the dcz command does
    api.compress(src, dst, overwrite=True)
else:
    api.decompress(src, dst, overwrite=True)
seconds = time.perf_counter() - t0
out = {"seconds": seconds, "baseline": baseline, "step_peak": status("VmHWM"), "import_peak": import_peak,
       "reset": reset}
if trace:
    out["traced_peak"] = tracemalloc.get_traced_memory()[1]
print("RESULT " + json.dumps(out))
"""


def run_step(step: str, src: Path, dst: Path, trace: bool = False) -> dict:
    """One step in a fresh interpreter; returns its measurements (bytes, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, step, str(src), str(dst), "1" if trace else "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} of {src} failed:\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    r["peak"] = max(r["step_peak"], r["import_peak"]) if r["reset"] else r["step_peak"]
    r["above"] = r["step_peak"] - r["baseline"]
    return r


def _model_bytes(path: Path) -> int:
    """The .onnx file plus the external data files beside it that it names."""
    sys.path.insert(0, str(ROOT))
    import onnx

    from dcformat.api import model_bytes_on_disk

    return model_bytes_on_disk(onnx.load(str(path), load_external_data=False), path)


def bench(model: Path, trace: bool = False, keep: Path | None = None) -> dict:
    """Compress then decompress ``model``; measurements of both steps."""
    size = _model_bytes(model)
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        dcz = Path(tmp) / (model.stem + ".dcz")
        rebuilt = Path(tmp) / (model.stem + ".rebuilt.onnx")
        result = {"model": str(model), "model_bytes": size}
        for step, src, dst in (("compress", model, dcz), ("decompress", dcz, rebuilt)):
            r = run_step(step, src, dst)
            if trace:
                r["traced_peak"] = run_step(step, src, dst, trace=True)["traced_peak"]
            r["mb_per_s"] = size / 1e6 / r["seconds"]
            result[step] = r
        result["dcz_bytes"] = dcz.stat().st_size
    return result


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--tracemalloc", action="store_true", help="also report tracemalloc's peak (a second run)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--tmp", type=Path, help="folder for the temporary .dcz and rebuilt model")
    args = ap.parse_args(argv)
    results = [bench(m, args.tracemalloc, args.tmp) for m in args.models]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"# {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")
    head = (f"{'model':<28} {'step':<10} {'MB':>7} {'s':>6} {'MB/s':>7} {'base MiB':>8} {'peak MiB':>8} "
            f"{'above MiB':>9} {'x model':>7}")
    if args.tracemalloc:
        head += f" {'traced MiB':>10}"
    print(head)
    for r in results:
        for step in ("compress", "decompress"):
            s = r[step]
            line = (f"{Path(r['model']).name[:28]:<28} {step:<10} {r['model_bytes'] / 1e6:>7.1f} {s['seconds']:>6.2f} "
                    f"{s['mb_per_s']:>7.1f} {_mb(s['baseline']):>8} {_mb(s['peak']):>8} {_mb(s['above']):>9} "
                    f"{s['peak'] / r['model_bytes']:>7.2f}")
            if args.tracemalloc:
                line += f" {_mb(s['traced_peak']):>10}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
