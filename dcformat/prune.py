"""Stage 3: magnitude pruning (Deep Compression section 2).

Every function here takes a float tensor (float16, float32 or float64; the caller
converts bfloat16 to float32 first) and returns a boolean *keep mask* of the same
shape: True where the weight is kept. Common rules:

* A weight that is already exactly zero (``0.0`` or ``-0.0``) is never kept, so a
  model pruned elsewhere keeps its sparsity pattern.
* NaN or Inf anywhere in the tensor raises :class:`~dcformat.errors.InputError`
  (the caller routes such tensors to raw storage before pruning).
* Magnitudes are compared exactly: ``|x|`` of a float is exact in its own dtype, and
  thresholds are compared in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .errors import InputError

__all__ = [
    "prune_by_sparsity",
    "prune_by_std",
    "prune_by_threshold",
    "global_threshold",
]


def _label(name: str) -> str:
    return f"tensor {name!r}" if name else "tensor"


def _check_tensor(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as an ndarray after checking its dtype and that it is finite."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise InputError(
            f"{_label(name)} has dtype {x.dtype}; pruning needs float16, float32 or float64 "
            "(convert bfloat16 to float32 first)"
        )
    if x.size and not np.isfinite(x).all():
        n_nan = int(np.count_nonzero(np.isnan(x)))
        n_inf = int(np.count_nonzero(np.isinf(x)))
        raise InputError(
            f"{_label(name)} holds {n_nan} NaN and {n_inf} Inf value(s); such a tensor cannot be "
            "pruned by magnitude (store it raw)"
        )
    return x


def _check_fraction(value: float, what: str, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise InputError(f"{what} {value!r} for {_label(name)} is outside [0, 1]")
    return value


def _check_nonnegative(value: float, what: str, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise InputError(f"{what} {value!r} for {_label(name)} must be finite and >= 0")
    return value


def _magnitudes(x: np.ndarray) -> np.ndarray:
    """Flat ``|x|``; float16 is widened to float32 (exactly) for faster partitioning."""
    flat = x.reshape(-1)
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)
    return np.abs(flat)


def prune_by_sparsity(x: np.ndarray, sparsity: float, *, name: str = "") -> np.ndarray:
    """Keep mask that prunes exactly ``round(sparsity * x.size)`` weights, smallest ``|x|`` first.

    Order of pruning is by ``|x|`` and, among equal magnitudes, by flat (C-order) index,
    lower first; so the result is deterministic and the pruned set grows monotonically
    with ``sparsity``. ``round`` is Python's round-half-to-even (``round(0.5 * 5) == 2``).
    If the tensor already holds more zeros than that, exactly its zeros are pruned.

    Args:
        x: float16/32/64 tensor of any shape (0-d and empty included).
        sparsity: fraction of weights to prune, in [0, 1].
        name: tensor name used in error messages.

    Returns:
        Boolean array of ``x.shape``, True where the weight is kept.

    Raises:
        InputError: non-float dtype, NaN/Inf in ``x``, or ``sparsity`` outside [0, 1].
    """
    x = _check_tensor(x, name)
    sparsity = _check_fraction(sparsity, "sparsity", name)
    a = _magnitudes(x)
    n = a.size
    n_prune = min(n, round(sparsity * n))
    keep = a != 0
    n_zero = n - int(np.count_nonzero(keep))
    if n_prune <= n_zero:
        return keep.reshape(x.shape)
    t = np.partition(a, n_prune - 1)[n_prune - 1]  # the n_prune-th smallest magnitude (> 0)
    keep = a > t
    below = a < t
    n_tied = n_prune - int(np.count_nonzero(below))  # how many of the |x| == t to prune
    tied = np.flatnonzero(~keep & ~below)  # ascending flat indices of |x| == t
    keep[tied[n_tied:]] = True
    return keep.reshape(x.shape)


def prune_by_std(x: np.ndarray, quality: float, *, name: str = "") -> np.ndarray:
    """Keep mask of Han et al.'s rule: prune ``|x| < quality * std(x)``.

    The standard deviation is the population one (``ddof=0``) over all elements,
    zeros included, computed in float64. Zeros are pruned whatever ``quality`` is.

    Raises:
        InputError: non-float dtype, NaN/Inf in ``x``, or ``quality`` negative or not finite.
    """
    x = _check_tensor(x, name)
    quality = _check_nonnegative(quality, "quality", name)
    if x.size == 0:
        return np.zeros(x.shape, dtype=bool)
    with np.errstate(over="ignore"):
        std = float(np.std(x, dtype=np.float64))
    if not math.isfinite(std):  # squares overflowed (|x| beyond ~1e154): scale down first
        scale = float(np.abs(x).max())
        std = scale * float(np.std(np.divide(x, scale, dtype=np.float64)))
    a = np.abs(x.reshape(-1))
    keep = a >= np.float64(quality * std)  # np.float64 so float16/32 are compared in float64
    keep &= a != 0
    return keep.reshape(x.shape)


def prune_by_threshold(x: np.ndarray, threshold: float, *, name: str = "") -> np.ndarray:
    """Keep mask that prunes ``|x| <= threshold`` (``threshold=0`` prunes exactly the zeros).

    Raises:
        InputError: non-float dtype, NaN/Inf in ``x``, or ``threshold`` negative or not finite.
    """
    x = _check_tensor(x, name)
    threshold = _check_nonnegative(threshold, "threshold", name)
    keep = np.abs(x.reshape(-1)) > np.float64(threshold)  # compared in float64, not x.dtype
    return keep.reshape(x.shape)


def global_threshold(tensors: Iterable[np.ndarray], sparsity: float) -> float:
    """Magnitude ``t`` such that ``prune_by_threshold(x, t)`` over all ``tensors`` prunes
    as close as possible to ``round(sparsity * total)`` weights.

    With ``n = round(sparsity * total)`` and ``m`` the n-th smallest magnitude, the
    candidates are ``m`` itself (prunes every ``|x| <= m``: at least ``n``) and the
    largest magnitude below ``m`` (prunes fewer than ``n``), or ``0.0`` when none is.
    The one whose pruned count is nearer ``n`` wins; on a tie, ``m``. Zeros are always
    pruned, so ``0.0`` is returned when ``n`` does not exceed the number of zeros.

    All magnitudes are gathered once into one float32 array (float64 if any tensor is
    float64) and partitioned in linear time.

    Raises:
        InputError: a tensor of non-float dtype or holding NaN/Inf, or ``sparsity``
            outside [0, 1].
    """
    sparsity = _check_fraction(sparsity, "sparsity", "global")
    parts = []
    for i, x in enumerate(tensors):
        x = _check_tensor(x, f"#{i}")
        parts.append(x.reshape(-1))
    if not parts:
        return 0.0
    dtype = np.float64 if any(p.dtype == np.float64 for p in parts) else np.float32
    a = np.concatenate(parts, dtype=dtype)
    del parts
    np.abs(a, out=a)
    total = a.size
    n_prune = min(total, round(sparsity * total))
    if n_prune == 0:
        return 0.0
    a.partition(n_prune - 1)  # a[:n_prune-1] <= m <= a[n_prune:]
    m = float(a[n_prune - 1])
    if m == 0.0:
        return 0.0
    n_at_or_below = n_prune + int(np.count_nonzero(a[n_prune:] == m))
    head = a[: n_prune - 1]
    below = head[head < m]
    n_below = below.size
    lower = float(below.max()) if n_below else 0.0
    if n_prune - n_below < n_at_or_below - n_prune:
        return lower
    return m
