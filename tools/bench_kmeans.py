"""Time dcformat.quantize.kmeans_1d + nearest on a large normal float32 tensor.

Usage: python tools/bench_kmeans.py [--n 13500000] [--k 256 32] [--repeat 3] [--init linear]

Prints, for each k, the best-of-``repeat`` wall time of ``kmeans_1d`` and of
``nearest``, the number of centroids and the quantization SNR, plus the command line
and the load average (other processes on the machine inflate the times).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcformat.quantize import INITS, kmeans_1d, nearest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=13_500_000, help="number of weights")
    ap.add_argument("--k", type=int, nargs="+", default=[256, 32], help="codebook sizes")
    ap.add_argument("--repeat", type=int, default=3, help="runs per k; the best is reported")
    ap.add_argument("--init", choices=INITS, default="linear")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print("command:", "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpu(s), "
          f"load average {os.getloadavg()[0]:.2f}")
    values = np.random.default_rng(args.seed).normal(size=args.n).astype(np.float32)
    print(f"values: {args.n:,} normal float32, init={args.init}")
    for k in args.k:
        t_km, t_nn = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            c = kmeans_1d(values, k, init=args.init, seed=args.seed)
            t1 = time.perf_counter()
            codes = nearest(values, c)
            t2 = time.perf_counter()
            t_km.append(t1 - t0)
            t_nn.append(t2 - t1)
        err = values.astype(np.float64) - c[codes]
        snr = 10 * np.log10(np.mean(values.astype(np.float64) ** 2) / np.mean(err**2))
        print(f"k={k:5d}: kmeans_1d {min(t_km):6.3f} s, nearest {min(t_nn):6.3f} s, "
              f"total {min(t_km) + min(t_nn):6.3f} s (best of {args.repeat}); "
              f"{len(c)} centroids, SNR {snr:.2f} dB")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
