"""Benchmark: size, fidelity and speed of dcz against what a user would pick instead.

    python tools/bench.py                      # the public models + bundled LeNets, default settings
    python tools/bench.py --models lenet300 ppocr-cls --settings default error=1e-2 paper
    python tools/bench.py path/to/model.onnx   # any .onnx files
    python tools/bench.py --out bench-out      # where the Markdown table and JSON go (default: bench-out/)

Per model and setting it measures: original bytes, .dcz bytes, ratio, bits per weight (codes, positions,
overhead) against the entropy bound, fidelity on natural inputs (tools/natural_inputs.py; relative L2 and
top-1 agreement; accuracy on the bundled MNIST test digits for the LeNets), compress and decompress wall
time and MB/s of weights, and the peak RSS of each step (each step runs in a fresh subprocess so its peak
is its own). Side by side, on the same files: zstd -19 and xz -9 of the .onnx file, and onnxruntime's
quantize_dynamic (int8 weights), raw and zstd-compressed, with its fidelity.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import dcformat  # noqa: E402
from dcformat import fidelity  # noqa: E402
from dcformat.demo import bundled  # noqa: E402
from dcformat.report import breakdown  # noqa: E402

#: Named settings: a Policy factory each. "error=X" is also accepted on the command line.
SETTINGS = {
    "default": lambda: dcformat.Policy(),
    "paper": lambda: dcformat.Policy.paper(),
}
ZSTD_LEVEL = 19
XZ_PRESET = 9

# One step of work, run in a subprocess so that its peak RSS (ru_maxrss) is its own.
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
    return {"default": "dcformat.Policy()", "paper": "dcformat.Policy.paper()"}[name]


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


def _fid(ref: dict, out: dict, labels) -> dict:
    rows = fidelity.compare(ref, out)
    tops = [r.top1_agreement for r in rows if r.top1_agreement is not None]
    res = {"rel_l2": max((r.rel_l2 for r in rows), default=0.0), "top1": min(tops) if tops else None}
    if labels is not None:
        first = next(iter(out.values()))
        res["accuracy"] = float(np.mean(np.argmax(first, axis=-1) == labels))
        res["accuracy_original"] = float(np.mean(np.argmax(next(iter(ref.values())), axis=-1) == labels))
    return res


def _zstd(data: bytes) -> int | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))


def _alternatives(name: str, path: Path, feeds, labels, ref, tmp: Path) -> dict:
    data = path.read_bytes()
    out = {"zstd19": _zstd(data), "xz9": len(lzma.compress(data, preset=XZ_PRESET))}
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = tmp / f"{name}.int8.onnx"
        quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
        qdata = q.read_bytes()
        out["int8"] = len(qdata)
        out["int8_zstd19"] = _zstd(qdata)
        out["int8_fidelity"] = _fid(ref, fidelity.run(q, feeds), labels)
    except Exception as exc:  # quantize_dynamic does not support every graph
        out["int8_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return out


def bench_model(name: str, path: Path, settings: list[str], tmp: Path) -> dict:
    feeds, labels = _inputs(name, path)
    ref = fidelity.run(path, feeds)
    original = dcformat.api.model_bytes_on_disk(onnx.load(str(path), load_external_data=False), path)
    rows = []
    for setting in settings:
        dcz, back = tmp / f"{name}.{setting}.dcz", tmp / f"{name}.{setting}.onnx"
        c = _step("compress", path, dcz, _policy_expr(setting))
        d = _step("decompress", dcz, back)
        b = breakdown(dcz)
        weights = sum(r.params for r in b.rows)
        coded = [r for r in b.rows if r.layout != "raw"]
        rows.append({
            "setting": setting,
            "dcz_bytes": b.file_bytes,
            "ratio": original / b.file_bytes,
            "bits_per_weight": 8 * b.file_bytes / max(weights, 1),
            "codes_bits": 8 * sum(r.codes_bytes for r in b.rows) / max(weights, 1),
            "positions_bits": 8 * sum(r.positions_bytes for r in b.rows) / max(weights, 1),
            "codebook_raw_bits": 8 * sum(r.codebook_bytes + r.raw_bytes for r in b.rows) / max(weights, 1),
            "overhead_bits": 8 * (b.graph_bytes + b.overhead_bytes) / max(weights, 1),
            "huffman_over_entropy": (sum(r.codes_bytes + r.positions_bytes for r in coded)
                                     / max(sum(r.codes_entropy_bytes + r.positions_entropy_bytes for r in coded), 1e-9) - 1)
            if coded else 0.0,
            "container_overhead_share": b.overhead_bytes / b.file_bytes,
            "fidelity": _fid(ref, fidelity.run(back, feeds), labels),
            "compress_s": c["seconds"], "compress_MBps": b.original_bytes / 1e6 / c["seconds"],
            "compress_peak_rss": c["peak_rss"],
            "decompress_s": d["seconds"], "decompress_MBps": b.original_bytes / 1e6 / d["seconds"],
            "decompress_peak_rss": d["peak_rss"],
        })
    return {"model": name, "original_bytes": original, "weights_bytes": breakdown(tmp / f"{name}.{settings[0]}.dcz").original_bytes,
            "settings": rows, "alternatives": _alternatives(name, path, feeds, labels, ref, tmp)}


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | setting | original MB | .dcz MB | ratio | bits/weight (codes+pos+cb/raw+overhead) | Huffman vs entropy |"
             " rel L2 | top-1 / accuracy | compress s (MB/s, peak RSS MB) | decompress s (MB/s, peak RSS MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["settings"]:
            f = s["fidelity"]
            acc = (f"{f['accuracy']:.1%} (was {f['accuracy_original']:.1%})" if "accuracy" in f
                   else (f"{f['top1']:.2%}" if f["top1"] is not None else "-"))
            lines.append(
                f"| {r['model']} | {s['setting']} | {_mb(r['original_bytes'])} | {_mb(s['dcz_bytes'])} | {s['ratio']:.2f}x | "
                f"{s['bits_per_weight']:.2f} ({s['codes_bits']:.2f}+{s['positions_bits']:.2f}+{s['codebook_raw_bits']:.2f}"
                f"+{s['overhead_bits']:.2f}) | +{s['huffman_over_entropy']:.1%} | {f['rel_l2']:.1e} | {acc} | "
                f"{s['compress_s']:.2f} ({s['compress_MBps']:.0f}, {s['compress_peak_rss'] / 1e6:.0f}) | "
                f"{s['decompress_s']:.2f} ({s['decompress_MBps']:.0f}, {s['decompress_peak_rss'] / 1e6:.0f}) |")
    lines += ["", "Alternatives on the same files (bytes; ratio against the original):", "",
              "| model | zstd -19 | xz -9 | int8 dynamic | int8 + zstd -19 | int8 rel L2 | int8 top-1 / accuracy |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        a, o = r["alternatives"], r["original_bytes"]

        def cell(n):
            return "-" if n is None else f"{_mb(n)} MB ({o / n:.2f}x)"

        f = a.get("int8_fidelity") or {}
        acc = (f"{f['accuracy']:.1%}" if "accuracy" in f else (f"{f['top1']:.2%}" if f.get("top1") is not None else "-"))
        lines.append(f"| {r['model']} | {cell(a['zstd19'])} | {cell(a['xz9'])} | {cell(a.get('int8'))} | "
                     f"{cell(a.get('int8_zstd19'))} | {f['rel_l2']:.1e} | {acc} |" if f else
                     f"| {r['model']} | {cell(a['zstd19'])} | {cell(a['xz9'])} | {a.get('int8_error', '-')} | - | - | - |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import fetch_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help=".onnx files (default: --models)")
    ap.add_argument("--models", nargs="*", default=["lenet300", "lenet5", *fetch_models.MODELS])
    ap.add_argument("--settings", nargs="*", default=["default"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    if args.paths:
        targets = [(p.stem, p) for p in args.paths]
    else:
        targets = [(m, bundled(f"{m}.onnx") if m.startswith("lenet") else fetch_models.fetch(m)) for m in args.models]
    import onnxruntime

    header = (f"# dcz benchmark\n\ncommand: `python tools/bench.py {' '.join(sys.argv[1:])}`  \n"
              f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}  \n"
              f"versions: dcz {dcformat.__version__}, python {platform.python_version()}, numpy {np.__version__}, "
              f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in targets:
            print(f"[{time.perf_counter() - t0:6.1f} s] {name}", file=sys.stderr, flush=True)
            results.append(bench_model(name, Path(path), args.settings, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, header) + f"\ntotal time: {time.perf_counter() - t0:.0f} s\n"
    (args.out / "bench.md").write_text(md)
    (args.out / "bench.json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
