"""Stage 4: weight sharing with a per-tensor 1-D k-means codebook (Deep Compression section 3).

:func:`build_codebook` is the one call the codec makes: it clusters a tensor's kept
weights with :func:`kmeans_1d`, rounds the centroids to the tensor's storage dtype
with :func:`round_to_storage` and maps every weight to its nearest entry with
:func:`nearest`.

k-means runs on the values sorted once: because clusters of 1-D data under nearest-
centroid assignment are contiguous runs of the sorted values, each Lloyd iteration
only finds the ``k - 1`` run boundaries (``searchsorted`` of the centroid midpoints)
and reads cluster sums from prefix sums, so an iteration costs ``O(k log n)``, not
``O(n)``. Clusters that end up empty are re-seeded by splitting the cluster with the
largest squared error, so outliers cannot waste centroids.

Distances are compared in float64, ties going to the lower codebook index. Signed
zeros are not distinguished: ``-0.0`` is treated, and returned, as ``0.0``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .constants import GRID_MAX_LEVEL
from .errors import InputError

__all__ = ["INITS", "MAX_K", "kmeans_1d", "nearest", "round_to_storage", "build_codebook"]

INITS = ("linear", "density", "random")

MAX_K = 65536  # codes are stored as uint16, so a codebook has at most 2**16 entries
MAX_ABS_VALUE = 1e100  # k-means sums squares of values in float64; beyond this they could overflow
_BOUNDARY_FIX_ROUNDS = 64  # a float midpoint is off by at most a few ulps; more rounds means a bug
_LOOKUP_BUCKETS = 65536  # bucket table of nearest(): 512 KiB, fine enough for k-means codebooks
_LOOKUP_MAX_PER_BUCKET = 4  # more codebook midpoints in one bucket: plain searchsorted is faster
_LOOKUP_MIN_VALUES = 4096  # below this, building the bucket table costs more than it saves

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
STORAGE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), _BFLOAT16)


def _as_float64(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a float64 array (bfloat16 and integers widened exactly); finite, bounded."""
    v = np.asarray(values)
    if v.dtype.kind not in "fiu" and v.dtype != _BFLOAT16:
        raise InputError(f"{what} has dtype {v.dtype}; a float or integer array is needed")
    v = v.astype(np.float64, copy=False)
    if v.size:
        lo, hi = float(v.min()), float(v.max())  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(f"{what} holds NaN or Inf")
        big = max(-lo, hi)
        if big > MAX_ABS_VALUE:
            raise InputError(f"{what} holds |value| {big:g} above the limit {MAX_ABS_VALUE:g}")
    return v


def _sorted_copy(values: np.ndarray) -> np.ndarray:
    """Sorted copy of 1-D ``values``: float32 for float16/bfloat16/float32 (sorting the
    narrow type is faster, and widening to float64 later is exact), float64 otherwise."""
    v = np.asarray(values)
    narrow = (v.dtype.kind == "f" and v.dtype.itemsize <= 4) or v.dtype == _BFLOAT16
    s = v.astype(np.float32 if narrow else np.float64)  # astype always copies
    s.sort()
    return s


def _distinct_sorted(s: np.ndarray) -> np.ndarray:
    """The distinct values of sorted ``s`` (``-0.0`` folded into ``0.0``)."""
    first = np.empty(s.size, dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    return s[first].astype(np.float64) + 0.0


def _count_distinct_sorted(s: np.ndarray) -> int:
    return 1 + int(np.count_nonzero(s[1:] != s[:-1])) if s.size else 0


def _goes_upper(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether ``v`` is strictly nearer ``hi`` than ``lo`` in float64 (``lo < hi``)."""
    return (hi - v) < (v - lo)


def _edges(s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cluster boundaries of sorted ``s`` under sorted centroids ``c``.

    Returns ``len(c) + 1`` nondecreasing positions: cluster ``j`` is
    ``s[edges[j]:edges[j + 1]]``. A value goes to the nearer of two neighbouring
    centroids, ties to the lower. The float midpoint gives the boundary up to rounding;
    each boundary is then moved until the values on both sides are on the right side.
    """
    n, m = s.size, c.size
    lo, hi = c[:-1], c[1:]
    b = np.searchsorted(s, 0.5 * lo + 0.5 * hi, side="right")
    for _ in range(_BOUNDARY_FIX_ROUNDS):
        last_lower = s[np.maximum(b - 1, 0)]
        first_upper = s[np.minimum(b, n - 1)]
        left = (b > 0) & _goes_upper(last_lower, lo, hi)
        right = (b < n) & ~_goes_upper(first_upper, lo, hi)
        if not (left.any() or right.any()):
            break
        b[left] = np.searchsorted(s, last_lower[left], side="left")
        b[right] = np.searchsorted(s, first_upper[right], side="right")
    else:  # pragma: no cover - the predicate is monotone in v, so this cannot happen
        raise AssertionError("cluster boundaries did not settle")
    edges = np.empty(m + 1, dtype=np.int64)
    edges[0], edges[-1] = 0, n
    edges[1:-1] = b
    return np.maximum.accumulate(edges)


class _Prefix:
    """Prefix sums of centered sorted values, for O(1) cluster sums, means and SSE."""

    def __init__(self, sc: np.ndarray) -> None:
        self.sc = sc
        self.p1 = np.empty(sc.size + 1, dtype=np.float64)
        self.p1[0] = 0.0
        np.cumsum(sc, out=self.p1[1:])
        self.p2 = np.empty(sc.size + 1, dtype=np.float64)
        self.p2[0] = 0.0
        np.square(sc, out=self.p2[1:])
        np.cumsum(self.p2[1:], out=self.p2[1:])

    def means(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Means of the nonempty runs ``sc[a:b]``, clamped into ``[sc[a], sc[b-1]]``.

        The clamp makes a constant run's mean exact and keeps means strictly ordered
        despite rounding in the prefix sums.
        """
        mu = (self.p1[b] - self.p1[a]) / (b - a)
        return np.clip(mu, self.sc[a], self.sc[b - 1])

    def sse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Sum of squared deviations from the mean of each nonempty run ``sc[a:b]`` (>= 0)."""
        s1 = self.p1[b] - self.p1[a]
        sse = (self.p2[b] - self.p2[a]) - s1 * s1 / (b - a)
        return np.maximum(sse, 0.0)


def _split(pre: _Prefix, a: np.ndarray, b: np.ndarray, mu: np.ndarray, n_new: int) -> np.ndarray:
    """Centroids after splitting up to ``n_new`` of the runs ``[a, b)`` (means ``mu``).

    The runs with the largest squared error that hold at least two distinct values are
    split at their mean, and each half's mean replaces the run's centroid.
    """
    sc = pre.sc
    splittable = np.flatnonzero(sc[a] != sc[b - 1])
    if splittable.size == 0 or n_new <= 0:
        return mu
    sse = pre.sse(a[splittable], b[splittable])
    order = np.argsort(-sse, kind="stable")[:n_new]
    pick = np.sort(splittable[order])
    pa, pb = a[pick], b[pick]
    cut = np.searchsorted(sc, mu[pick], side="right")
    cut = np.clip(cut, pa + 1, pb - 1)
    out = np.concatenate([np.delete(mu, pick), pre.means(pa, cut), pre.means(cut, pb)])
    out.sort()
    return np.unique(out)


def _initial_centroids(
    s: np.ndarray, sc: np.ndarray, k: int, init: str, seed: int, mean: float
) -> np.ndarray:
    """Sorted, unique initial centroids in centered coordinates (possibly fewer than k)."""
    n = sc.size
    if init == "linear":
        c = np.linspace(sc[0], sc[-1], k)
    elif init == "density":
        c = sc[((np.arange(k) + 0.5) * (n / k)).astype(np.int64)]
    else:
        distinct = _distinct_sorted(s)
        rng = np.random.default_rng(seed)
        c = rng.choice(distinct, size=k, replace=False) - mean
    return np.unique(c)


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: str = "linear",
    max_iter: int = 50,
    tol: float = 1e-7,
    seed: int = 0,
    _reseed: bool = True,
) -> np.ndarray:
    """Centroids of a 1-D k-means (Lloyd's algorithm) on ``values``.

    Args:
        values: 1-D array of any float (or integer) dtype; computed in float64.
        k: number of clusters, 1..``MAX_K``.
        init: ``"linear"`` (k points evenly spaced over [min, max], the paper's choice),
            ``"density"`` (evenly spaced in the empirical CDF) or ``"random"`` (k distinct
            values drawn with ``np.random.default_rng(seed)``).
        max_iter: maximum number of Lloyd iterations (>= 0).
        tol: stop when no centroid moves more than ``tol * (max - min)``.
        seed: seed of the ``"random"`` init.
        _reseed: private; False disables re-seeding of empty clusters (for tests).

    Returns:
        float64 centroids, sorted ascending and unique, at most ``k`` of them; every
        centroid is nearest to at least one value. If ``values`` holds at most ``k``
        distinct values, exactly those values. Empty ``values`` give an empty array.

    Raises:
        InputError: ``values`` not 1-D, non-numeric, NaN/Inf or beyond ``MAX_ABS_VALUE``;
            ``k``, ``init``, ``max_iter`` or ``tol`` out of range.
    """
    v = np.asarray(values)
    if v.ndim != 1:
        raise InputError(f"k-means values must be 1-D, got shape {v.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise InputError(f"k-means k {k!r} is outside 1..{MAX_K}")
    k = int(k)
    if init not in INITS:
        raise InputError(f"k-means init {init!r} is not one of {INITS}")
    if max_iter < 0:
        raise InputError(f"k-means max_iter {max_iter} is negative")
    if not (math.isfinite(tol) and tol >= 0):
        raise InputError(f"k-means tol {tol!r} must be finite and >= 0")
    if v.dtype.kind not in "fiu" and v.dtype != _BFLOAT16:
        raise InputError(f"k-means values have dtype {v.dtype}; a float or integer array is needed")
    if v.size == 0:
        return np.empty(0, dtype=np.float64)
    s = _sorted_copy(v)
    if not (np.isfinite(s[0]) and np.isfinite(s[-1])):  # NaN sorts last
        raise InputError("k-means values hold NaN or Inf")
    big = float(max(-s[0], s[-1]))
    if big > MAX_ABS_VALUE:
        raise InputError(f"k-means values hold |value| {big:g} above the limit {MAX_ABS_VALUE:g}")
    if _count_distinct_sorted(s) <= k:
        return _distinct_sorted(s)

    mean = float(np.mean(s, dtype=np.float64))
    sc = np.subtract(s, mean, dtype=np.float64)
    pre = _Prefix(sc)
    eps = tol * (sc[-1] - sc[0])
    c = _initial_centroids(s, sc, k, init, seed, mean)
    lo, hi = float(s[0]), float(s[-1])
    del s
    for _ in range(max_iter):
        edges = _edges(sc, c)
        a, b = edges[:-1], edges[1:]
        nonempty = b > a
        a, b = a[nonempty], b[nonempty]
        new = pre.means(a, b)
        if _reseed and new.size < k:
            split = _split(pre, a, b, new, k - new.size)
            if split.size > new.size:
                c = split
                continue
        converged = new.size == c.size and float(np.max(np.abs(new - c))) <= eps
        c = new
        if converged:
            break
    edges = _edges(sc, c)
    c = c[edges[1:] > edges[:-1]]  # drop centroids no value is nearest to
    # Adding the mean back can round a centroid a hair outside the data's range: clip it in.
    return np.unique(np.clip(c + mean, lo, hi)) + 0.0


def _check_codebook(codebook: np.ndarray) -> np.ndarray:
    cb = np.asarray(codebook)
    if cb.ndim != 1:
        raise InputError(f"codebook must be 1-D, got shape {cb.shape}")
    if cb.dtype.kind != "f" and cb.dtype != _BFLOAT16:
        raise InputError(f"codebook has dtype {cb.dtype}; a float dtype is needed")
    cb = cb.astype(np.float64)
    if cb.size and not np.isfinite(cb).all():
        raise InputError("codebook holds NaN or Inf")
    if cb.size > 1 and not (cb[1:] > cb[:-1]).all():
        raise InputError("codebook is not sorted ascending with unique entries")
    return cb


def _count_below(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.searchsorted(m, v, side="left")`` (as intp) for sorted ``m``, faster for many ``v``.

    A table over ``_LOOKUP_BUCKETS`` equal-width buckets of ``[m[0], m[-1]]`` gives each
    value a starting count; a few vectorized rounds then step it up while
    ``m[i] < v`` and down while ``m[i - 1] >= v``, so the result is exact. Falls back to
    ``searchsorted`` for few values or when some bucket holds too many entries of ``m``.
    """
    n_m = m.size
    if v.size < _LOOKUP_MIN_VALUES or n_m < 2:
        return np.searchsorted(m, v, side="left").astype(np.intp, copy=False)
    lo = float(m[0])
    scale = _LOOKUP_BUCKETS / (float(m[-1]) - lo) if m[-1] > m[0] else math.inf
    if not math.isfinite(scale):
        return np.searchsorted(m, v, side="left").astype(np.intp, copy=False)
    table = np.searchsorted(m, lo + np.arange(_LOOKUP_BUCKETS + 1) / scale, side="left")
    if int(np.diff(table).max()) > _LOOKUP_MAX_PER_BUCKET:
        return np.searchsorted(m, v, side="left").astype(np.intp, copy=False)
    g = v - lo
    g *= scale
    np.clip(g, 0, _LOOKUP_BUCKETS - 1, out=g)
    idx = table[g.astype(np.intp)]
    del g
    sel = np.flatnonzero(np.take(m, idx, mode="clip") < v)  # m[idx] < v: count too low
    sel = sel[idx[sel] < n_m]
    while sel.size:
        idx[sel] += 1
        i = idx[sel]
        ok = i < n_m
        ok[ok] = m[i[ok]] < v[sel[ok]]
        sel = sel[ok]
    sel = np.flatnonzero(np.take(m, idx - 1, mode="clip") >= v)  # m[idx-1] >= v: too high
    sel = sel[idx[sel] > 0]
    while sel.size:
        idx[sel] -= 1
        i = idx[sel]
        ok = i > 0
        ok[ok] = m[i[ok] - 1] >= v[sel[ok]]
        sel = sel[ok]
    return idx


def nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry for each value.

    Distances ``|v - c|`` are compared in float64 and exact ties go to the lower index,
    i.e. the result equals ``np.argmin(np.abs(v[..., None] - codebook), axis=-1)``.

    Args:
        values: array of any shape and float (or integer) dtype.
        codebook: 1-D, sorted ascending, unique, finite, any float dtype.

    Returns:
        Array of ``values.shape``: uint16 if ``len(codebook) <= 65536``, else uint32.

    Raises:
        InputError: NaN/Inf or ``|value| > MAX_ABS_VALUE`` in ``values``; a codebook that
            is empty (for nonempty ``values``), unsorted, not unique or not finite.
    """
    cb = _check_codebook(codebook)
    v = np.asarray(values)
    shape = v.shape
    v = _as_float64(v, "values to quantize").reshape(-1)
    out_dtype = np.uint16 if cb.size <= 65536 else np.uint32
    if v.size == 0 or cb.size == 1:
        return np.zeros(shape, dtype=out_dtype)
    if cb.size == 0:
        raise InputError(f"cannot quantize {v.size} value(s) with an empty codebook")
    # i = number of float midpoints below v. Since each float midpoint lies within its
    # two entries, cb[i - 1] < v <= cb[i + 1], so the nearest entry is i - 1, i or i + 1,
    # or lower through float ties of distance (only when codebook gaps vanish next to
    # |v - c| in float64).
    idx = _count_below(0.5 * cb[:-1] + 0.5 * cb[1:], v)
    d = np.subtract(v, np.take(cb, idx))
    np.abs(d, out=d)
    du = np.subtract(v, np.take(cb, idx + 1, mode="clip"))  # at the top: du == d, no move
    np.abs(du, out=du)
    idx += du < d
    np.minimum(d, du, out=d)
    dn = du  # reuse the buffer
    np.subtract(v, np.take(cb, idx - 1, mode="clip"), out=dn)
    np.abs(dn, out=dn)
    sel = np.flatnonzero((dn <= d) & (idx > 0))
    del dn, du
    while sel.size:
        idx[sel] -= 1
        i = idx[sel]
        dn = np.abs(v[sel] - cb[np.maximum(i - 1, 0)])
        sel = sel[(i > 0) & (dn <= d[sel])]
    return idx.astype(out_dtype).reshape(shape)


def _check_storage(storage: np.dtype) -> np.dtype:
    try:
        dt = np.dtype(storage)
    except TypeError as exc:
        raise InputError(f"storage dtype {storage!r} is not a numpy dtype") from exc
    if dt not in STORAGE_DTYPES:
        raise InputError(
            f"storage dtype {dt} is not one of float16, float32, float64, bfloat16"
        )
    return dt


def _float64_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round finite float64 (|x| <= bfloat16 max) to bfloat16, to nearest, ties to even.

    A direct cast rounds twice (float64 -> float32 -> bfloat16), which is wrong near
    ties; rounding to float32 *to odd* first makes the second rounding exact.
    """
    f = x.astype(np.float32)
    back = f.astype(np.float64)
    bits = f.view(np.uint32).copy()
    inexact = back != x
    bits[inexact & (np.abs(back) > np.abs(x))] -= 1  # truncate toward zero ...
    bits[inexact] |= 1  # ... and set the sticky bit: round to odd
    bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even on the top 16 bits
    return (bits >> 16).astype(np.uint16).view(_BFLOAT16)


def round_to_storage(centroids: np.ndarray, storage: np.dtype) -> np.ndarray:
    """Round float64 centroids to ``storage``, then sort and drop duplicates.

    Rounding is to nearest, ties to even; values beyond the dtype's finite range are
    clipped to its largest finite value (never inf); ``-0.0`` becomes ``0.0``.

    Args:
        centroids: 1-D finite values (any float dtype; read as float64).
        storage: float16, float32, float64 or ``ml_dtypes.bfloat16``.

    Returns:
        1-D array of dtype ``storage``, sorted ascending and unique.

    Raises:
        InputError: unknown storage dtype, or centroids not 1-D or not finite.
    """
    dt = _check_storage(storage)
    c = np.asarray(centroids)
    if c.ndim != 1:
        raise InputError(f"centroids must be 1-D, got shape {c.shape}")
    if c.dtype.kind not in "fiu" and c.dtype != _BFLOAT16:
        raise InputError(f"centroids have dtype {c.dtype}; a float dtype is needed")
    c = c.astype(np.float64)
    if not np.isfinite(c).all():
        raise InputError("centroids hold NaN or Inf")
    fmax = float(ml_dtypes.finfo(dt).max)
    c = np.clip(c, -fmax, fmax) + 0.0
    r = _float64_to_bfloat16(c) if dt == _BFLOAT16 else c.astype(dt)
    return np.unique(r.astype(np.float64) + 0.0).astype(dt)


def build_codebook(
    values: np.ndarray,
    k: int,
    *,
    storage: np.dtype,
    include_zero: bool,
    init: str = "linear",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Codebook of at most ``k`` entries for a tensor's kept weights, and their codes.

    Args:
        values: the kept (normally nonzero) weights, 1-D.
        k: codebook size, 1..``MAX_K``.
        storage: the tensor's storage dtype (see :func:`round_to_storage`).
        include_zero: the codebook must hold exactly ``0.0``; ``k - 1`` clusters are
            then fitted to the nonzero values. With ``k == 1`` this leaves only zero,
            which is refused if any value is nonzero.
        init, seed: as in :func:`kmeans_1d`.

    Returns:
        ``(codebook, codes)``: the codebook in ``storage`` dtype, sorted ascending,
        unique, ``len <= k``; ``codes = nearest(values, codebook)`` as uint16. If the
        values hold at most ``k`` (``k - 1`` nonzero with ``include_zero``) distinct
        values, all representable in ``storage``, each value maps to itself.

    Raises:
        InputError: as :func:`kmeans_1d` and :func:`round_to_storage`.
    """
    dt = _check_storage(storage)
    v = np.asarray(values)
    if v.ndim != 1:
        raise InputError(f"values must be 1-D, got shape {v.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise InputError(f"codebook size k {k!r} is outside 1..{MAX_K}")
    k = int(k)
    if include_zero:
        nz = v[v != 0]
        if k == 1:
            if nz.size:
                raise InputError(
                    f"k=1 with include_zero leaves no codebook entry for {nz.size} nonzero value(s)"
                )
            cents = np.zeros(1)
        else:
            cents = np.append(kmeans_1d(nz, k - 1, init=init, seed=seed), 0.0)
    else:
        cents = kmeans_1d(v, k, init=init, seed=seed)
    codebook = round_to_storage(cents, dt)
    return codebook, nearest(v, codebook).astype(np.uint16)


#: Uniform grids keep their levels within the 16-bit code space; a finer step than this allows is widened.
_MAX_UNIFORM_LEVELS = MAX_K - 2  # rint() at both ends can add one level each


def uniform_step(values: np.ndarray, rel_error: float, total_sq: float | None = None) -> float:
    """Grid step whose rounding error is ``rel_error`` times the tensor's L2 norm.

    Rounding to a grid of step ``d`` adds an error of variance ``d**2 / 12`` per value, so
    ``d = rel_error * sqrt(12 * total_sq / n)`` where ``total_sq`` is the tensor's sum of squares
    (default: that of ``values``) and ``n`` the number of values rounded.
    """
    v = _as_float64(np.asarray(values).ravel(), "values")
    if not rel_error > 0:
        raise InputError(f"relative error {rel_error} must be > 0")
    if v.size == 0:
        return 1.0
    ss = float(np.dot(v, v)) if total_sq is None else float(total_sq)
    return rel_error * float(np.sqrt(12.0 * ss / v.size)) or 1.0


#: A channel whose RMS is below this fraction of the tensor's RMS does not set the grid step: its rounding
#: error still counts in the tensor's total, but a dead or near-dead channel must not demand a grid of
#: millions of levels.
CHANNEL_RMS_FLOOR = 1.0 / 1024


def channel_rms_floor(x: np.ndarray) -> float:
    """The smallest RMS among the tensor's slices along its first and its last axis (ignoring slices
    below CHANNEL_RMS_FLOOR of the tensor's RMS): the scale a grid must resolve so that every output
    channel, whichever axis holds them (Conv and Gemm: first, MatMul: last), keeps its relative error."""
    x = np.asarray(x)
    total = _rms(x)
    if x.ndim < 2 or total == 0:
        return total
    out = total
    for axis in (0, x.ndim - 1):
        rms = slice_rms(x, axis)
        rms = rms[rms >= CHANNEL_RMS_FLOOR * total]
        if rms.size:
            out = min(out, float(rms.min()))
    return out


def uniform_codebook(values: np.ndarray, step: float, *, storage: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Round values to the grid ``k * step`` (zero is a level; no clipping) and keep the levels used.

    The step is widened if the values span more than 2**16 levels. Returns (codebook in ``storage``
    dtype, ascending and unique, holding exactly the levels used; codes as uint16). Linear time: no sort.
    """
    dt = _check_storage(storage)
    v = _as_float64(np.asarray(values), "values")
    if v.ndim != 1:
        raise InputError(f"values must be 1-D, got shape {v.shape}")
    if not step > 0 or not np.isfinite(step):
        raise InputError(f"grid step {step} must be a positive finite number")
    if v.size == 0:
        return np.zeros(1, dtype=dt), np.zeros(0, dtype=np.uint16)
    lo, hi = float(v.min()), float(v.max())
    step = max(float(step), (hi - lo) / _MAX_UNIFORM_LEVELS)
    q = np.rint(v / step).astype(np.int64)
    qmin = int(q.min())
    q -= qmin
    used = np.bincount(q) > 0
    index = np.cumsum(used) - 1  # level -> code
    levels = (np.flatnonzero(used) + qmin) * step
    codebook = round_to_storage(levels, dt)
    if codebook.size == levels.size:
        return codebook, index[q].astype(np.uint16)
    # Storage rounding merged some levels (a step near the dtype's resolution): assign to the nearest kept one.
    return codebook, nearest(v, codebook).astype(np.uint16)


# --- Grids with per-tensor or per-channel scales (GRID codebooks, format 1.1) ----------------------------


class Grid(NamedTuple):
    """Integer levels ``q`` (same shape as the tensor) and the float32 scale of each slice along ``axis``
    (one scale when ``axis`` is None): element = q * scale of its slice (see :func:`grid_values`). A two-axis
    grid (format 1.2) multiplies in a second float32 scale per slice along ``axis2``."""

    q: np.ndarray  # integer values, held in the working float type (exact: |q| <= GRID_MAX_LEVEL)
    scales: np.ndarray  # float32, 1-D
    axis: int | None
    scales2: np.ndarray | None = None  # float32, 1-D, one per slice along axis2
    axis2: int | None = None


def _rms(x: np.ndarray) -> float:
    """RMS of all elements, without a squared or widened copy of the tensor."""
    flat = np.asarray(x).reshape(-1)
    if not flat.size:
        return 0.0
    return math.sqrt(sum(float(np.dot(c, c)) for c in _chunks(flat)) / flat.size)


#: Elements widened to float64 at a time by the RMS helpers (8 MiB).
RMS_CHUNK = 1 << 20


def _chunks(flat: np.ndarray):
    for start in range(0, flat.size, RMS_CHUNK):
        yield flat[start:start + RMS_CHUNK].astype(np.float64)


def slice_rms(x: np.ndarray, axis: int) -> np.ndarray:
    """RMS of each slice of ``x`` along ``axis`` (float64), without a squared or widened copy of the tensor."""
    x = np.asarray(x)
    if x.ndim == 1:
        return np.abs(x.astype(np.float64))
    if axis == 0:
        m = x.reshape(x.shape[0], -1)
        sq = np.array([float(np.dot(r, r)) for r in (m[i].astype(np.float64) for i in range(m.shape[0]))]) \
            if m.shape[0] <= 64 else np.einsum("ij,ij->i", m, m, dtype=np.float64)
        return np.sqrt(sq / m.shape[1])
    m = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    return np.sqrt(np.einsum("ij,ij->j", m, m, dtype=np.float64) / m.shape[0])


def channel_axis(x: np.ndarray, exclude: int | None = None) -> int | None:
    """The axis for per-channel scales: of the first and last axes (except ``exclude``, the axis of a layer's
    inputs when the grid also has input steps), the one whose slices differ most in RMS (Conv and Gemm keep
    output channels first, MatMul last); None for 1-D tensors or equal scales."""
    if x.ndim < 2:
        return None
    total = _rms(x)
    if total == 0:
        return None
    best, best_spread = None, 1.0
    for axis in (0, x.ndim - 1):
        if axis == exclude:
            continue
        rms = slice_rms(x, axis)
        rms = rms[rms >= CHANNEL_RMS_FLOOR * total]
        spread = float(rms.max() / rms.min()) if rms.size > 1 else 1.0
        if spread > best_spread:
            best, best_spread = axis, spread
    return best


def grid_steps(x: np.ndarray, rel_error: float, axis: int | None) -> np.ndarray:
    """Per-slice grid steps whose rounding error is ``rel_error`` of each slice's RMS (``axis`` None: one
    step resolving the weakest channel, :func:`channel_rms_floor`). Dead slices (below SLICE_RMS_FLOOR of
    the tensor's RMS) get the step of the floor."""
    if not 0 < rel_error < 1:
        raise InputError(f"relative error {rel_error} is outside (0, 1)")
    if axis is None:
        return np.array([rel_error * np.sqrt(12.0) * channel_rms_floor(x) or 1.0])
    total = _rms(x)
    rms = np.maximum(slice_rms(x, axis), SLICE_RMS_FLOOR * total)
    steps = rel_error * np.sqrt(12.0) * rms
    steps[steps == 0] = 1.0
    return steps


#: With a scale per slice, a weak channel costs no more bits than a strong one, so only slices that are
#: numerically dead (rounding noise of a float32 sum) are floored, to a step that still represents them.
SLICE_RMS_FLOOR = 1e-6


def _grid_shape(ndim: int, axis: int | None, n: int) -> tuple[int, ...]:
    return (1,) * ndim if axis is None else tuple(n if a == axis else 1 for a in range(ndim))


def grid_quantize(x: np.ndarray, steps: np.ndarray, axis: int | None, keep: np.ndarray | None = None,
                  steps2: np.ndarray | None = None, axis2: int | None = None) -> Grid:
    """Round ``x`` to the grid ``q * step`` of its slice (``keep`` False: q = 0, i.e. pruned). With ``steps2``
    (a two-axis grid) the step of an element is its ``axis`` slice's step times its ``axis2`` slice's.

    Steps become float32 scales. They are widened (all by one factor) when the levels would span more
    than 2**16 codes or exceed GRID_MAX_LEVEL; zero is always a level and nothing is clipped.
    """
    x = np.asarray(x)
    work = np.float64 if x.dtype == np.float64 else np.float32
    scales = np.asarray(steps, dtype=np.float64).reshape(-1)
    if scales.size != (1 if axis is None else x.shape[axis]):
        raise InputError(f"{scales.size} grid steps for axis {axis} of shape {x.shape}")
    second = None
    if steps2 is not None:
        second = np.asarray(steps2, dtype=np.float32).reshape(-1)
        if axis is None or axis2 is None or axis2 == axis or second.size != x.shape[axis2]:
            raise InputError(f"{second.size} second grid steps for axes {axis}, {axis2} of shape {x.shape}")
        if not (np.isfinite(second).all() and (second > 0).all()):
            raise InputError("grid steps must be positive and finite")
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise InputError("grid steps must be positive and finite")
    bshape = _grid_shape(x.ndim, axis, scales.size)
    for _ in range(8):
        s32 = scales.astype(np.float32)
        s32[s32 == 0] = np.float32(np.finfo(np.float32).tiny)
        q = x.astype(work, copy=True)  # one working copy, rounded in place
        q /= s32.reshape(bshape).astype(work)
        if second is not None:
            q /= second.reshape(_grid_shape(x.ndim, axis2, second.size)).astype(work)
        np.rint(q, out=q)
        q += 0.0  # -0.0 (a small negative rounded to zero) becomes +0.0, as the integer level 0 decodes
        if keep is not None:
            q[~keep.reshape(x.shape)] = 0
        lo, hi = (float(q.min()), float(q.max())) if q.size else (0.0, 0.0)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        widen = max((hi - lo + 1) / MAX_K, max(-lo, hi) / GRID_MAX_LEVEL)
        if widen <= 1:
            return Grid(q, s32, axis, second, None if second is None else axis2)
        scales = scales * (widen * 1.01)
    raise InputError("values cannot be placed on a grid of 2**16 levels")  # unreachable for finite values


def make_grid(x: np.ndarray, rel_error: float | None, axis: int | None, *, step: float | None = None,
              input_axis: int | None = None, input_steps: np.ndarray | None = None,
              keep: np.ndarray | None = None) -> Grid:
    """The uniform quantizer's grid for ``x``: one ``step``; or steps giving ``rel_error`` per tensor (``axis``
    None) or per slice along ``axis`` (output channels, :func:`channel_axis`). With ``input_steps`` (relative
    steps along ``input_axis``) ``step`` is multiplied by them, or ``rel_error`` applies to ``x`` divided by them;
    they become the grid's second scale vector, or fold into its one axis when ``axis`` is None or the same
    axis."""
    x = np.asarray(x)
    if input_steps is None:
        if step is not None:
            return grid_quantize(x, np.array([step]), None, keep)
        return grid_quantize(x, grid_steps(x, rel_error, axis), axis, keep)
    t = np.asarray(input_steps, dtype=np.float32).reshape(-1)
    if input_axis is None or not 0 <= input_axis < x.ndim or t.size != x.shape[input_axis]:
        raise InputError(f"{t.size} input steps for axis {input_axis} of shape {list(x.shape)}")
    if step is not None:  # one step for the tensor, times each input's
        return grid_quantize(x, step * t.astype(np.float64), input_axis, keep)
    rel = x / t.reshape(_grid_shape(x.ndim, input_axis, t.size)).astype(x.dtype)
    steps = grid_steps(rel, rel_error, axis)
    del rel
    if axis is None or axis == input_axis:
        return grid_quantize(x, steps * t.astype(np.float64), input_axis, keep)
    return grid_quantize(x, steps, axis, keep, t, input_axis)


#: Columns rounded one by one before their errors are pushed to the rest with one matrix product (GPTQ's lazy
#: batch): the loop runs per column on a block, and the big update is BLAS. 32 was fastest on an 8210 x 1024
#: matrix (0.7 s in float32, against 1.9 s for 128 in the untransposed layout).
COMPENSATE_BLOCK = 32


def compensation_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H = U^T U inverted): row j of U spreads column j's rounding error
    over the later columns in :func:`compensated_levels`."""
    try:
        return np.linalg.cholesky(np.linalg.inv(hessian)).T
    except np.linalg.LinAlgError:
        raise InputError("the input second-moment matrix is not positive definite") from None


def compensated_levels(w: np.ndarray, steps: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Levels for ``w`` [rows, cols] on the grid ``steps`` (broadcastable to w), rounding one column (input) at a
    time and spreading each column's rounding error over the columns not yet rounded so that the layer's output
    on inputs of second moment H changes least (``factor``: :func:`compensation_factor` of H, [cols, cols]):
    Optimal Brain Surgeon's compensation, done column-wise as in GPTQ (Frantar et al. 2022). Works in float32
    (the decisions are rounding choices; the stored values are computed from the levels exactly as always).
    Returns float64 integers, shaped like w."""
    wt = np.array(np.asarray(w).T, dtype=np.float32, order="C")  # one row per column of w: contiguous
    cols, rows = wt.shape
    st = np.ascontiguousarray(np.broadcast_to(np.asarray(steps, dtype=np.float32), np.shape(w)).T)
    u = np.asarray(factor, dtype=np.float32)
    q = np.empty_like(wt)
    for b0 in range(0, cols, COMPENSATE_BLOCK):
        b1 = min(b0 + COMPENSATE_BLOCK, cols)
        errs = np.empty((b1 - b0, rows), dtype=np.float32)
        for j in range(b0, b1):
            np.rint(wt[j] / st[j], out=q[j])
            e = (wt[j] - q[j] * st[j]) / u[j, j]
            errs[j - b0] = e
            wt[j + 1:b1] -= np.outer(u[j, j + 1:b1], e)
        wt[b1:] -= u[b0:b1, b1:].T @ errs
    out = q.T.astype(np.float64)
    out += 0.0  # -0.0 becomes +0.0, as in grid_quantize
    return out


def grid_values(q: np.ndarray, scales: np.ndarray, axis: int | None, storage: np.dtype,
                scales2: np.ndarray | None = None, axis2: int | None = None) -> np.ndarray:
    """Decoded elements: ``q * scale`` computed in binary32 (binary64 for float64 storage), then (two-axis
    grids) times ``scales2`` of the element's ``axis2`` slice, again in binary32, then rounded to ``storage``
    (round to nearest even). Shared by the writer (reference values) and the reader."""
    dt = _check_storage(storage)
    work = np.float64 if dt == np.float64 else np.float32
    s = np.asarray(scales, dtype=np.float32).astype(work).reshape(_grid_shape(q.ndim, axis, len(scales)))
    out = q.astype(work)
    out *= s
    if scales2 is not None:
        out *= np.asarray(scales2, dtype=np.float32).astype(work).reshape(_grid_shape(q.ndim, axis2, len(scales2)))
    return out if out.dtype == dt else out.astype(dt)


# --- Entropy-constrained k-means (Chou, Lookabaugh and Gray 1989; Choi et al. 2017 for networks) -------------

#: Lloyd iterations of the entropy-constrained k-means; the cost stops moving after a handful.
ECK_ITERS = 8


def _lower_envelope(c: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decision thresholds of ``argmin_j (w - c_j)**2 + cost_j`` for sorted ``c``: the lower envelope of the
    lines ``-2 c_j w + c_j**2 + cost_j``. Returns (indices of the centroids that win somewhere, thresholds
    between consecutive winners). A loop over centroids (at most 2**16), never over weights."""
    b = c * c + cost
    hull: list[int] = []
    xs: list[float] = []  # xs[i]: where hull[i+1] starts to win over hull[i]
    for j in range(len(c) - 1, -1, -1):  # decreasing slope -2c: iterate from the largest centroid down
        while hull:
            i = hull[-1]
            x = (b[i] - b[j]) / (2.0 * (c[i] - c[j]))  # where lines i and j cross
            if xs and x >= xs[-1]:  # j takes over before the last winner even starts: drop it
                hull.pop()
                xs.pop()
                continue
            xs.append(x)
            break
        hull.append(j)
    order = np.array(hull[::-1])
    return order, np.array(xs[::-1], dtype=np.float64)


def ec_kmeans(values: np.ndarray, init: np.ndarray, lam: float, *, iters: int = ECK_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Entropy-constrained k-means of 1-D ``values``: centroids and assignments minimising
    ``sum (w - c)**2 + lam * sum(code length in bits)``, the length being ``-log2`` of the centroid's share.

    Starts from the sorted centroids ``init`` (e.g. a uniform grid); centroids that lose every weight are
    dropped, so the codebook shrinks as ``lam`` grows. Returns (codebook float64 ascending, codes int64).
    """
    v = _as_float64(np.asarray(values).ravel(), "values")
    c = np.unique(np.asarray(init, dtype=np.float64))
    if v.size == 0 or c.size == 0:
        return c[:1] if c.size else np.zeros(1), np.zeros(v.size, dtype=np.int64)
    if not lam >= 0:
        raise InputError(f"lambda {lam} must be >= 0")
    codes = np.searchsorted((c[1:] + c[:-1]) / 2, v)
    for _ in range(iters):
        counts = np.bincount(codes, minlength=c.size)
        keep = counts > 0
        sums = np.bincount(codes, weights=v, minlength=c.size)
        c = sums[keep] / counts[keep]
        p = counts[keep] / v.size
        winners, cuts = _lower_envelope(c, lam * -np.log2(p))
        c = c[winners]
        new = np.searchsorted(cuts, v)
        if np.array_equal(new, codes) and c.size == winners.size:
            codes = new
            break
        codes = new
    counts = np.bincount(codes, minlength=c.size)
    keep = counts > 0
    remap = np.cumsum(keep) - 1
    means = np.bincount(codes, weights=v, minlength=c.size)[keep] / counts[keep]  # a last centroid update
    return means, remap[codes]
