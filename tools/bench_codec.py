"""Codec throughput: encode and decode MB/s of float32 weights for one large tensor.

    python tools/bench_codec.py [--weights 50000000] [--repeat 1]

Times encode_tensor (prune + k-means + positions + Huffman) and decode_tensor for a
normally distributed float32 tensor at (sparsity 0.9, 5 bits) and (sparsity 0, 8 bits) with k-means,
and with the default uniform grid (relative error 2e-3),
and prints MB/s of float32 input (4 bytes per weight) with the stage split.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from dcformat import codec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=int, default=50_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"# command: python tools/bench_codec.py --weights {args.weights}")
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{__import__('os').cpu_count()} cpus")
    x = np.random.default_rng(args.seed).normal(0, 0.05, args.weights).astype(np.float32)
    mb = x.nbytes / 1e6
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


if __name__ == "__main__":
    main()
