"""Builds the golden file tests/data/tiny.dcz from tests/data/tiny_source.npz, and spec/example.md.

    python tests/make_golden.py            # rewrite the golden file and the worked example
    python tests/make_golden.py --check    # exit 1 if either would change

Only rerun it for a deliberate format change; tests/test_golden.py pins the bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcformat.codec import CompressSettings, TensorInput, write_dcz  # noqa: E402
from dcformat.constants import TensorKind  # noqa: E402

DATA = ROOT / "tests" / "data"
SOURCE = DATA / "tiny_source.npz"
GOLDEN = DATA / "tiny.dcz"
EXAMPLE = ROOT / "spec" / "example.md"


def source_tensors() -> dict[str, np.ndarray]:
    """The tiny source tensors (made once, then read from the committed .npz)."""
    if SOURCE.exists():
        with np.load(SOURCE) as z:
            return {k: z[k] for k in z.files}
    # A dense 4x8 conv-like weight with four distinct levels of distinct frequencies,
    # a 64-element fc weight that is 90% zeros, and a raw int64 shape tensor.
    dense = np.repeat(np.array([-0.5, 0.25, 0.75, 1.5], dtype=np.float32), [4, 16, 8, 4]).reshape(4, 8)
    fc = np.zeros(64, dtype=np.float32)
    fc[[3, 10, 11, 40, 41, 63]] = [0.5, -0.5, 0.5, 0.5, 1.0, 0.5]
    return {"conv.w": dense, "fc.w": fc, "shape": np.array([1, 4, 8], dtype=np.int64)}


#: A 3x16 weight whose rows lie on grids of steps 0.5, 0.125 and 2 (added with format 1.1's GRID codebooks).
GRID_W = np.tile(np.array([[0.5, -1.0, 0.0, 0.5], [0.125, 0.25, -0.125, 0.0], [2.0, 4.0, -2.0, 2.0]], dtype=np.float32), 4)


#: A 3x16 weight for a two-axis grid (format 1.2): a step per row times the step of each column, GRID2_IN.
GRID2_W = np.tile(np.array([[0.5, -1.0, 0.25, 3.0], [0.125, 0.25, -0.0625, 0.0], [2.0, 4.0, -1.0, 12.0]],
                           dtype=np.float32), 4)
GRID2_IN = (1.0, 1.0, 0.5, 4.0) * 4

#: A 4x8 weight on a grid of step 1/64 whose 32 levels are spread over -182..188, nearly all used once (format 1.3):
#: a wide alphabet, which a BINNED stream codes in fewer bytes than a table of every level.
WIDE_W = np.array([12, 63, 32, -32, -20, 55, -182, 41, 36, -3, -20, -23, -27, -5, 0, 5,
                   188, 35, 11, 153, -34, -46, 10, -97, -106, 1, -3, 72, 12, 1, 0, -28], dtype=np.float32).reshape(4, 8) / 64


def inputs(src: dict[str, np.ndarray]) -> list[TensorInput]:
    grid = CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True)
    return [
        TensorInput("conv.w", src["conv.w"], CompressSettings(bits=2), kind=TensorKind.CONV),
        TensorInput("fc.w", src["fc.w"], CompressSettings(bits=2, index_bits=3, layout="sparse"), kind=TensorKind.FC),
        TensorInput("grid.w", GRID_W, grid, kind=TensorKind.FC),
        TensorInput("grid2.w", GRID2_W, CompressSettings(quantizer="uniform", rel_error=0.01, per_channel=True,
                                                         input_axis=1, input_steps=GRID2_IN), kind=TensorKind.FC),
        TensorInput("wide.w", WIDE_W, CompressSettings(quantizer="uniform", step=1 / 64), kind=TensorKind.FC),
        TensorInput("shape", src["shape"], None),
    ]


def build(path: Path) -> None:
    write_dcz(path, inputs(source_tensors()), graph=b"", metadata={"dcz.graph_format": "", "example": "tiny"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    if not SOURCE.exists():
        np.savez(SOURCE, **source_tensors())
    tmp = DATA / "tiny.dcz.new"
    build(tmp)
    sys.path.insert(0, str(ROOT / "tools"))
    from dump_dcz import annotate  # noqa: E402

    example = annotate(tmp.read_bytes(), title="tests/data/tiny.dcz")
    if args.check:
        same = GOLDEN.exists() and GOLDEN.read_bytes() == tmp.read_bytes() and EXAMPLE.read_text() == example
        tmp.unlink()
        return 0 if same else 1
    tmp.replace(GOLDEN)
    EXAMPLE.write_text(example)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes, sha256 {hashlib.sha256(GOLDEN.read_bytes()).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
