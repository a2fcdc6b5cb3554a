"""Golden bytes: the committed tiny.dcz decodes to its committed sources, and re-encoding them gives the same bytes."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

from dcformat.codec import read_dcz

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GOLDEN_SHA256 = "b1cabf0ab1266997d16944c4a6683c8cc249fccd8400b79fe00f55db6d8da3fc"


def test_golden_bytes_are_pinned():
    assert hashlib.sha256((DATA / "tiny.dcz").read_bytes()).hexdigest() == GOLDEN_SHA256


def test_golden_decodes_to_sources():
    contents = read_dcz(DATA / "tiny.dcz")
    with np.load(DATA / "tiny_source.npz") as src:
        # Every source tensor has <= 2**bits distinct values, so it must come back exactly.
        assert set(contents.tensors) == set(src.files) | {"grid.w", "grid2.w", "wide.w"}
        for name in src.files:
            assert contents.tensors[name].dtype == src[name].dtype
            np.testing.assert_array_equal(contents.tensors[name], src[name])
    assert contents.metadata == {"dcz.graph_format": "", "example": "tiny"}
    # grid.w is rounded to a per-row grid at 1% rounding error of each row's RMS.
    sys.path.insert(0, str(ROOT / "tests"))
    from make_golden import GRID2_IN, GRID2_W, GRID_W, WIDE_W

    got = contents.tensors["grid.w"]
    rms = np.sqrt(np.mean(GRID_W**2, axis=1, keepdims=True))
    assert np.all(np.abs(got - GRID_W) <= 0.01 * np.sqrt(3) * rms * 1.001)
    assert not np.array_equal(got, GRID_W)  # really rounded, so the check above means something
    # grid2.w: the same, for the tensor divided by its column steps (a two-axis grid, format 1.2).
    got2, t = contents.tensors["grid2.w"], np.array(GRID2_IN, dtype=np.float32)
    rms2 = np.sqrt(np.mean((GRID2_W / t) ** 2, axis=1, keepdims=True))
    assert np.all(np.abs(got2 - GRID2_W) <= 0.01 * np.sqrt(3) * rms2 * t * 1.001)
    assert not np.array_equal(got2, GRID2_W)
    # wide.w lies on its grid of step 1/64, so it comes back exactly (its codes are a BINNED stream, format 1.3).
    np.testing.assert_array_equal(contents.tensors["wide.w"], WIDE_W)


def test_encoder_reproduces_golden_and_example():
    # Rebuilds the file and spec/example.md from the sources and compares byte for byte.
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "make_golden.py"), "--check"], capture_output=True)
    assert result.returncode == 0, "encoder output or spec/example.md drifted from the golden file"
