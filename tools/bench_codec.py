"""Codec throughput: Huffman coder, tensor codec and whole-model decompress, in MB/s of float32 weights.

    python tools/bench_codec.py [--weights 50000000] [--huffman-symbols 13500000] [--repeat 3]
                                [--model .cache/models/common.onnx] [--skip-codec] [--skip-huffman]
                                [--skip-rans] [--rans-python-symbols 1000000]
    DCZ_PURE_PYTHON=1 python tools/bench_codec.py ...      # the fallback coders only
    taskset -c 0 python tools/bench_codec.py ...           # one core

Sections:

* Huffman: encode_stream / decode_stream of a symbol stream alone, with each available coder
  (the C extension dcformat._huffcode and the bitarray fallback); MB/s counts 4 bytes per symbol,
  the float32 weight each code stands for.
* rANS: the same streams plus a peaked one (85% zeros), with dcformat.rans.encode_stream /
  decode_stream: the C extension dcformat._ranscode and the Python reference coder (on the first
  --rans-python-symbols symbols only: it runs a Python loop per symbol). Shows bits/symbol against
  the entropy and Huffman's, the table scale the writer chose, and M symbols/s.
* Codec: encode_tensor (prune + quantize + positions + Huffman) and decode_tensor of one normally
  distributed float32 tensor at (sparsity 0.9, 5 bits), (sparsity 0, 8 bits) and the uniform grid.
* Model (with --model): dcz compress and dcz decompress of a real ONNX model at default settings
  through the Python API, with the time spent in Huffman decoding and in decode_tensor; MB/s is
  the ONNX file's size over the time.

Times are the best of --repeat runs, wall clock, with the process CPU time beside them because
the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcformat import api, codec, huffman, rans  # noqa: E402


def _best(fn, repeat: int):
    """(result, best wall seconds, CPU seconds of that run) over ``repeat`` calls of fn()."""
    best = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[1]:
            best = (result, wall, cpu)
    return best


def bench_huffman(n: int, repeat: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    streams = {
        "5-bit codes (normal)": (np.clip(np.round(rng.normal(16, 4, n)), 0, 31).astype(np.uint16), 32),
        "8-bit codes (normal)": (np.clip(np.round(rng.normal(128, 30, n)), 0, 255).astype(np.uint16), 256),
        "4-bit gaps (geometric)": ((rng.geometric(0.3, n) - 1).clip(0, 15).astype(np.uint16), 16),
    }
    coders = [("native", huffman._native)] if huffman._native is not None else []
    coders.append(("bitarray", None))
    saved = huffman._native
    print(f"\n## Huffman coder alone: {n:,} symbols; MB/s = 4 bytes (one float32 weight) per symbol")
    print(f"{'stream':<24} {'coder':<9} {'bits/sym':>8} {'enc s':>7} {'MB/s':>7} {'dec s':>7} {'MB/s':>7} "
          f"{'Msym/s':>7} {'dec cpu s':>9}")
    try:
        for label, (symbols, alphabet) in streams.items():
            table = huffman.build_table(huffman.histogram(symbols, alphabet))
            for name, module in coders:
                huffman._native = module
                (data, _, nbits), enc, _ = _best(lambda: huffman.encode_stream(symbols, alphabet, table), repeat)
                out, dec, dec_cpu = _best(lambda: huffman.decode_stream(data, n, alphabet, "bench"), repeat)
                assert np.array_equal(out, symbols)
                mb = 4 * n / 1e6
                print(f"{label:<24} {name:<9} {nbits / n:>8.2f} {enc:>7.3f} {mb / enc:>7.0f} {dec:>7.3f} "
                      f"{mb / dec:>7.0f} {n / dec / 1e6:>7.0f} {dec_cpu:>9.3f}")
    finally:
        huffman._native = saved


def _streams(n: int, seed: int) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return {
        "5-bit codes (normal)": (np.clip(np.round(rng.normal(16, 4, n)), 0, 31).astype(np.uint16), 32),
        "8-bit codes (normal)": (np.clip(np.round(rng.normal(128, 30, n)), 0, 255).astype(np.uint16), 256),
        "4-bit gaps (geometric)": ((rng.geometric(0.3, n) - 1).clip(0, 15).astype(np.uint16), 16),
        "grid, 85% zeros": (np.clip(np.round(rng.normal(8, 0.35, n)), 0, 16).astype(np.uint16), 17),
    }


def bench_rans(n: int, n_python: int, repeat: int, seed: int) -> None:
    coders = [("native", rans._native, n)] if rans._native is not None else []
    coders.append(("python", None, min(n, n_python)))
    saved = rans._native
    print(f"\n## rANS coder alone: {n:,} symbols (Python coder: {min(n, n_python):,}); Msym/s = million symbols/s")
    print(f"{'stream':<24} {'coder':<7} {'H bits':>7} {'Huff':>7} {'rANS':>7} {'scale':>5} {'enc s':>7} {'Msym/s':>7} "
          f"{'dec s':>7} {'Msym/s':>7} {'dec cpu s':>9}")
    try:
        for label, (symbols, alphabet) in _streams(n, seed).items():
            for name, module, m in coders:
                rans._native = module
                part = symbols[:m]
                freq = huffman.histogram(part, alphabet)
                model, _ = rans.build_model(freq, alphabet)
                huff = huffman.encoded_size(freq, huffman.build_table(freq), alphabet)
                data, enc, _ = _best(lambda: rans.encode_stream(part, alphabet, model), repeat)
                out, dec, dec_cpu = _best(lambda: rans.decode_stream(data, m, alphabet, "bench"), repeat)
                assert np.array_equal(out, part)
                print(f"{label:<24} {name:<7} {huffman.entropy_bits(freq) / m:>7.3f} {8 * huff / m:>7.3f} "
                      f"{8 * len(data) / m:>7.3f} {model.scale:>5} {enc:>7.3f} {m / enc / 1e6:>7.1f} {dec:>7.3f} "
                      f"{m / dec / 1e6:>7.1f} {dec_cpu:>9.3f}")
    finally:
        rans._native = saved


def bench_codec(n: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"\n## Codec: one tensor of {n:,} float32 weights")
    print(f"{'setting':<26} {'encode s':>9} {'MB/s':>7} {'decode s':>9} {'MB/s':>7} {'ratio':>7} {'layout':>7}")
    for label, settings in (
        ("sparsity 0.9, 5 bits", codec.CompressSettings(bits=5, sparsity=0.9, index_bits=5)),
        ("sparsity 0,   8 bits", codec.CompressSettings(bits=8)),
        ("uniform, error 2e-3", codec.CompressSettings(quantizer="uniform", rel_error=2e-3)),
    ):
        t0 = time.perf_counter()
        enc = codec.encode_tensor(codec.TensorInput("w", x, settings))
        t1 = time.perf_counter()
        out = codec.decode_tensor(enc.entry, list(enc.payloads))
        t2 = time.perf_counter()
        assert out.tobytes() == enc.reference.tobytes()
        stored = sum(len(p) for p in enc.payloads)
        print(f"{label:<26} {t1 - t0:>9.2f} {mb / (t1 - t0):>7.1f} {t2 - t1:>9.2f} {mb / (t2 - t1):>7.1f} "
              f"{x.nbytes / stored:>6.1f}x {enc.entry.layout.name.lower():>7}")


class _Timed:
    """Wraps a function wherever the dcformat modules refer to it and adds up the wall time spent in it."""

    def __init__(self, module, name: str):
        self.name, self.inner, self.seconds = name, getattr(module, name), 0.0
        self.modules = [m for m in sys.modules.values()
                        if getattr(m, "__name__", "").startswith("dcformat") and getattr(m, name, None) is self.inner]

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    def __enter__(self):
        for m in self.modules:
            setattr(m, self.name, self)
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            setattr(m, self.name, self.inner)


def bench_model(model: Path, repeat: int) -> None:
    mb = model.stat().st_size / 1e6
    print(f"\n## Model: {model} ({mb:.1f} MB), default settings, through dcformat.api")
    with tempfile.TemporaryDirectory() as tmp:
        dcz, onnx_out = Path(tmp) / "m.dcz", Path(tmp) / "m.onnx"
        res, comp, comp_cpu = _best(lambda: api.compress(model, dcz, overwrite=True), repeat)
        print(f"compress   {comp:>6.2f} s ({comp_cpu:.2f} s CPU)  {mb / comp:>6.1f} MB/s   "
              f"{dcz.stat().st_size:,} bytes")
        runs = []
        for _ in range(repeat):
            with _Timed(huffman, "decode_stream") as huff, _Timed(rans, "decode_stream") as ra, \
                    _Timed(codec, "decode_tensor") as tensors:
                w0, c0 = time.perf_counter(), time.process_time()
                api.decompress(dcz, onnx_out, overwrite=True)
                runs.append((time.perf_counter() - w0, time.process_time() - c0, huff.seconds, ra.seconds,
                             tensors.seconds))
        wall, cpu, huff_s, rans_s, tensor_s = min(runs)
        print(f"decompress {wall:>6.2f} s ({cpu:.2f} s CPU)  {mb / wall:>6.1f} MB/s   "
              f"of which Huffman decode {huff_s:.3f} s, rANS decode {rans_s:.3f} s, decode_tensor in all {tensor_s:.3f} s, "
              f"the rest (read, rebuild, save) {wall - tensor_s:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=int, default=50_000_000, help="weights of the codec tensor")
    ap.add_argument("--huffman-symbols", type=int, default=13_500_000, help="symbols of each Huffman stream")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is shown")
    ap.add_argument("--model", type=Path, help="also time compress/decompress of this ONNX model")
    ap.add_argument("--skip-codec", action="store_true")
    ap.add_argument("--skip-huffman", action="store_true")
    ap.add_argument("--skip-rans", action="store_true")
    ap.add_argument("--rans-python-symbols", type=int, default=1_000_000,
                    help="symbols the Python rANS coder is timed on (it loops per symbol)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"# command: {'DCZ_PURE_PYTHON=1 ' if os.environ.get('DCZ_PURE_PYTHON') else ''}"
          f"python tools/bench_codec.py {' '.join(sys.argv[1:])}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cpus ({affinity} usable), load average {os.getloadavg()[0]:.1f}, "
          f"Huffman coder: {'C extension' if huffman.native_coder() else 'bitarray fallback'}, "
          f"rANS coder: {'C extension' if rans.native_coder() else 'Python fallback'}")
    if not args.skip_huffman:
        bench_huffman(args.huffman_symbols, args.repeat, args.seed)
    if not args.skip_rans:
        bench_rans(args.huffman_symbols, args.rans_python_symbols, args.repeat, args.seed)
    if not args.skip_codec:
        bench_codec(args.weights, args.seed)
    if args.model is not None:
        bench_model(args.model, args.repeat)


if __name__ == "__main__":
    main()
