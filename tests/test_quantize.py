"""Tests of dcformat.quantize: exact nearest, k-means fixed points, re-seeding, rounding."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dcformat import quantize

from dcformat.errors import InputError
from dcformat.quantize import (
    INITS,
    build_codebook,
    kmeans_1d,
    nearest,
    round_to_storage,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), BF16]

moderate = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def brute_nearest(values, codebook):
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    c = np.asarray(codebook, dtype=np.float64).reshape(1, -1)
    return np.argmin(np.abs(v - c), axis=1)  # argmin: first (lowest) index on ties


def outlier_tensor():
    """normal(0, 1) weights plus a few at +-300, like a BN-folded convolution."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 1, 100_000), np.full(10, 300.0), np.full(10, -300.0)])


# ---------------------------------------------------------------- nearest


@st.composite
def codebooks_and_values(draw):
    # + 0.0 folds -0.0 into 0.0 so that entries are unique
    cb = np.unique(np.array(draw(st.lists(moderate, min_size=1, max_size=40)), dtype=np.float64) + 0.0)
    mids = 0.5 * cb[:-1] + 0.5 * cb[1:]
    picks = st.one_of(moderate, st.sampled_from(list(cb)), st.sampled_from(list(mids) or [0.0]))
    values = np.array(draw(st.lists(picks, min_size=0, max_size=60)), dtype=np.float64)
    return cb, values


@settings(max_examples=300, deadline=None)
@given(data=codebooks_and_values())
def test_nearest_matches_brute_force(data):
    cb, values = data
    got = nearest(values, cb)
    assert got.dtype == np.uint16 and got.shape == values.shape
    np.testing.assert_array_equal(got, brute_nearest(values, cb))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 300), skew=st.booleans())
def test_nearest_matches_brute_force_on_many_values(seed, k, skew):
    # >= 4096 values take the bucket-table path; a skewed codebook takes its fallback
    rng = np.random.default_rng(seed)
    cb = np.unique(rng.normal(size=k))
    if skew:
        cb = np.unique(np.append(cb * 1e-4, [1e3, -2e3]))
    values = np.concatenate([rng.normal(size=6000) * rng.choice([1e-3, 1, 10]),
                             0.5 * cb[:-1] + 0.5 * cb[1:], cb, np.nextafter(cb, np.inf)])
    np.testing.assert_array_equal(nearest(values, cb), brute_nearest(values, cb))


def test_nearest_ties_go_low_also_through_float_distance_ties():
    cb = np.array([0.0, 1e-10, 1e30])
    # |1e20 - 0| and |1e20 - 1e-10| are the same float64: the lower index wins
    np.testing.assert_array_equal(nearest(np.array([1e20, 5e-11, 6e-11]), cb), [0, 0, 1])
    np.testing.assert_array_equal(nearest(np.array([1.0, 2.0, 3.0]), [1.0, 3.0]), [0, 0, 1])


def test_nearest_shapes_dtypes_and_codebook_checks():
    cb16 = np.array([-1.0, 0.0, 2.0], dtype=np.float16)
    assert nearest(np.zeros((2, 3), np.float32), cb16).shape == (2, 3)
    assert nearest(np.zeros(0), cb16).dtype == np.uint16
    assert nearest(np.zeros(0), np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(nearest(np.array([5.0, -5.0]), [1.5]), [0, 0])
    big = np.arange(70000, dtype=np.float64)
    assert nearest(np.array([69999.2]), big).dtype == np.uint32
    with pytest.raises(InputError, match="empty codebook"):
        nearest(np.ones(3), np.zeros(0))
    with pytest.raises(InputError, match="sorted"):
        nearest(np.ones(3), [1.0, 1.0])
    with pytest.raises(InputError, match="sorted"):
        nearest(np.ones(3), [2.0, 1.0])
    with pytest.raises(InputError, match="NaN"):
        nearest(np.array([np.nan]), [1.0])
    with pytest.raises(InputError, match="NaN"):
        nearest(np.ones(2), [1.0, np.inf])


# ---------------------------------------------------------------- kmeans_1d


@settings(max_examples=150, deadline=None)
@given(
    values=hnp.arrays(np.float64, st.integers(0, 200), elements=st.one_of(moderate, st.sampled_from([0.0, 1.0, 3.0]))),
    k=st.integers(1, 24),
    init=st.sampled_from(INITS),
)
def test_kmeans_output_invariants(values, k, init):
    c = kmeans_1d(values, k, init=init, seed=3)
    assert c.dtype == np.float64 and c.ndim == 1
    assert len(c) <= k
    assert np.all(np.diff(c) > 0)  # sorted, unique
    distinct = np.unique(values + 0.0)
    if len(distinct) <= k:
        np.testing.assert_array_equal(c, distinct)  # bit-exact
    elif values.size:
        assert len(c) >= 1
        assert c[0] >= values.min() and c[-1] <= values.max()
        # every centroid is the nearest one of some value
        assert len(np.unique(brute_nearest(values, c))) == len(c)
    if values.size:  # nearest() agrees with brute force on the centroids k-means produced
        np.testing.assert_array_equal(nearest(values, c), brute_nearest(values, c))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(30, 3000), k=st.integers(1, 40),
       init=st.sampled_from(INITS))
def test_kmeans_centroids_are_cluster_means_at_convergence(seed, n, k, init):
    rng = np.random.default_rng(seed)
    values = rng.standard_t(df=3, size=n) * rng.uniform(1e-3, 1e3) + rng.uniform(-10, 10)
    c = kmeans_1d(values, k, init=init, max_iter=2000, tol=0.0)
    labels = brute_nearest(values, c)
    span = values.max() - values.min()
    for j, cj in enumerate(c):
        members = values[labels == j]
        assert members.size > 0
        assert abs(members.mean() - cj) <= 1e-9 * span


def test_kmeans_no_empty_centroid_on_outlier_tensor():
    x = outlier_tensor()
    c = kmeans_1d(x, 256, init="linear")
    assert len(c) == 256
    assert len(np.unique(nearest(x, c))) == 256


def test_kmeans_reseeding_at_least_halves_mse_on_outlier_tensor():
    x = outlier_tensor()
    mse = {}
    for reseed in (True, False):
        c = kmeans_1d(x, 256, init="linear", _reseed=reseed)
        mse[reseed] = float(np.mean((x - c[nearest(x, c)]) ** 2))
    assert mse[True] <= 0.5 * mse[False], mse
    # plain Lloyd from linear init leaves most of the 256 centroids empty here
    assert len(kmeans_1d(x, 256, init="linear", _reseed=False)) < 128


@pytest.mark.parametrize("init", INITS)
def test_each_init_gives_a_good_quantizer(init):
    rng = np.random.default_rng(5)
    x = rng.normal(size=20_000)
    c = kmeans_1d(x, 16, init=init, seed=7)
    assert len(c) == 16
    mse = float(np.mean((x - c[nearest(x, c)]) ** 2))
    assert mse < 0.015  # Lloyd-Max optimum for 16 levels of N(0, 1) is 0.0095
    np.testing.assert_array_equal(c, kmeans_1d(x, 16, init=init, seed=7))  # deterministic


def test_random_init_follows_the_seed():
    x = np.random.default_rng(6).normal(size=5000)
    a = kmeans_1d(x, 8, init="random", seed=1, max_iter=0)
    b = kmeans_1d(x, 8, init="random", seed=2, max_iter=0)
    assert not np.array_equal(a, b)
    # max_iter=0: the drawn values themselves (up to rounding of the internal centering)
    assert all(np.min(np.abs(x - c)) <= 1e-15 for c in a)


def test_kmeans_small_cases():
    assert kmeans_1d(np.zeros(0, np.float32), 4).shape == (0,)
    np.testing.assert_array_equal(kmeans_1d(np.array([2.5]), 1), [2.5])
    np.testing.assert_array_equal(kmeans_1d(np.array([-0.0, 0.0, 0.0]), 1), [0.0])
    assert not np.signbit(kmeans_1d(np.array([-0.0]), 1)[0])
    x = np.random.default_rng(7).normal(size=1000)
    np.testing.assert_allclose(kmeans_1d(x, 1), [x.mean()], rtol=0, atol=1e-12)
    v = np.array([3.0, 1.0, 3.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(kmeans_1d(v, 3), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(kmeans_1d(v, 2), [1.5, 3.0])


def test_kmeans_accepts_narrow_float_dtypes():
    x = np.random.default_rng(8).normal(size=3000)
    for dt in (np.float16, np.float32, BF16):
        c = kmeans_1d(x.astype(dt), 8)
        assert len(c) == 8 and c.dtype == np.float64


def test_kmeans_far_from_zero():
    # Weights near 1e6 with spread 1e-3 plus a far group (linear init leaves empty
    # clusters here, so re-seeding runs). Note: this passes even without the internal
    # centering; it guards the result, not the cancellation argument.
    rng = np.random.default_rng(9)
    bulk = 1e6 + rng.normal(size=5000) * 1e-3
    x = np.concatenate([bulk, 1e6 + 1.0 + rng.normal(size=50) * 1e-3])
    c = kmeans_1d(x, 16, init="linear")
    assert len(c) == 16
    mse_bulk = float(np.mean((bulk - c[nearest(bulk, c)]) ** 2))
    assert mse_bulk < 0.05 * np.var(bulk)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k"),
        (dict(k=65537), "k"),
        (dict(k=True), "k"),
        (dict(k=2.0), "k"),
        (dict(k=4, init="kmeans++"), "init"),
        (dict(k=4, max_iter=-1), "max_iter"),
        (dict(k=4, tol=float("nan")), "tol"),
    ],
)
def test_kmeans_argument_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        kmeans_1d(np.arange(10.0), **kwargs)


def test_kmeans_value_errors():
    with pytest.raises(InputError, match="1-D"):
        kmeans_1d(np.ones((2, 2)), 2)
    with pytest.raises(InputError, match="NaN"):
        kmeans_1d(np.array([1.0, np.nan]), 2)
    with pytest.raises(InputError, match="NaN"):
        kmeans_1d(np.array([1.0, -np.inf]), 2)
    with pytest.raises(InputError, match="limit"):
        kmeans_1d(np.array([1.0, 1e200]), 2)


# ---------------------------------------------------------------- round_to_storage


def representable(dtype):
    """All finite values of a 16-bit float dtype, ascending, with their bit patterns."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    vals = bits.view(dtype).astype(np.float64)
    ok = np.isfinite(vals) & ~((vals == 0) & np.signbit(vals))
    order = np.argsort(vals[ok], kind="stable")
    return vals[ok][order], bits[ok][order]


def reference_round(x, dtype):
    """Round to nearest, ties to even (even significand bits), with exact fractions."""
    vals, bits = representable(dtype)
    if x >= vals[-1]:
        return vals[-1]
    if x <= vals[0]:
        return vals[0]
    i = int(np.searchsorted(vals, x))
    lo, hi = vals[i - 1], vals[i]
    if hi == x:
        return hi
    dlo, dhi = Fraction(x) - Fraction(lo), Fraction(hi) - Fraction(x)
    if dlo != dhi:
        return lo if dlo < dhi else hi
    return lo if bits[i - 1] % 2 == 0 else hi


@settings(max_examples=300, deadline=None)
@given(
    x=st.one_of(
        st.floats(-1e40, 1e40, allow_nan=False, allow_infinity=False),
        st.floats(-1e-3, 1e-3, allow_nan=False),
        st.integers(-(2**20), 2**20).map(lambda i: 1.0 + i * 2.0**-20),  # near-ties
    ),
    dtype=st.sampled_from([np.dtype(np.float16), BF16]),
)
def test_round_to_storage_is_nearest_even_and_clipped(x, dtype):
    got = round_to_storage(np.array([x]), dtype)
    assert got.dtype == dtype
    g = float(got.astype(np.float64)[0])
    assert g == reference_round(x, dtype)
    assert not np.signbit(g) or g != 0


def test_round_to_storage_bfloat16_avoids_double_rounding():
    x = 1 + 2.0**-8 + 2.0**-30  # just above a bfloat16 tie; float32 first would round to the tie
    assert float(round_to_storage(np.array([x]), BF16)[0]) == 1 + 2.0**-7


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32), BF16])
def test_round_to_storage_clips_never_inf(dtype):
    fmax = float(ml_dtypes.finfo(dtype).max)
    got = round_to_storage(np.array([1e300, -1e300, fmax, 0.5]), dtype).astype(np.float64)
    np.testing.assert_array_equal(got, [-fmax, 0.5, fmax])
    assert np.isfinite(got).all()


def test_round_to_storage_float64_is_exact():
    x = np.array([1e300, -1e-300, 0.1, 1 + 2.0**-52])
    np.testing.assert_array_equal(round_to_storage(x, np.float64), np.sort(x))


def test_round_to_storage_sorts_dedups_and_folds_negative_zero():
    got = round_to_storage(np.array([3.0, 1.0, 1.0 + 1e-9, -0.0, 0.0, -1e-30]), np.float16)
    np.testing.assert_array_equal(got, np.array([0.0, 1.0, 3.0], dtype=np.float16))
    assert not np.signbit(got[0])
    with pytest.raises(InputError, match="storage dtype"):
        round_to_storage(np.ones(2), np.int8)
    with pytest.raises(InputError, match="NaN"):
        round_to_storage(np.array([np.nan]), np.float32)


# ---------------------------------------------------------------- build_codebook


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("include_zero", [False, True])
def test_build_codebook_contract(storage, include_zero):
    rng = np.random.default_rng(11)
    w = rng.normal(size=20_000).astype(np.float32) * 0.05
    w = w[w != 0]
    cb, codes = build_codebook(w, 32, storage=storage, include_zero=include_zero)
    assert cb.dtype == storage and codes.dtype == np.uint16
    assert 2 <= len(cb) <= 32
    cbf = cb.astype(np.float64)
    assert np.all(np.diff(cbf) > 0)
    assert np.count_nonzero(cbf == 0) == (1 if include_zero else 0)
    np.testing.assert_array_equal(codes, nearest(w, cb))
    if storage == BF16 or storage == np.float16:
        # values are representable: a round trip through the storage dtype is the identity
        np.testing.assert_array_equal(cbf.astype(storage).astype(np.float64), cbf)
    err = np.sqrt(np.mean((w - cbf[codes]) ** 2))
    assert err < 0.1 * w.std()


@settings(max_examples=100, deadline=None)
@given(
    pool=st.lists(moderate.filter(lambda v: v != 0), min_size=1, max_size=8, unique=True),
    idx=st.lists(st.integers(0, 7), min_size=0, max_size=50),
    include_zero=st.booleans(),
)
def test_build_codebook_few_distinct_values_map_to_themselves(pool, idx, include_zero):
    pool = np.array(pool, dtype=np.float32)
    pool = np.unique(pool)
    values = pool[np.array([i % len(pool) for i in idx], dtype=np.int64)]
    k = len(pool) + (1 if include_zero else 0)
    cb, codes = build_codebook(values, k, storage=np.float32, include_zero=include_zero)
    np.testing.assert_array_equal(cb[codes], values)
    if include_zero:
        assert 0.0 in cb


def test_build_codebook_include_zero_k1():
    cb, codes = build_codebook(np.zeros(0, np.float32), 1, storage=np.float32, include_zero=True)
    np.testing.assert_array_equal(cb, [0.0])
    assert codes.shape == (0,)
    with pytest.raises(InputError, match="include_zero"):
        build_codebook(np.ones(3, np.float32), 1, storage=np.float32, include_zero=True)
    cb, codes = build_codebook(np.array([1.0, 3.0], np.float32), 1, storage=np.float16,
                               include_zero=False)
    np.testing.assert_array_equal(cb, np.array([2.0], np.float16))
    np.testing.assert_array_equal(codes, [0, 0])


@pytest.mark.parametrize("lo, hi, n_mids", [(0.1, 0.9, 300), (-3.3, 7.1, 997), (1e-3, 1e-3 + 1e-7, 50)])
def test_count_below_bucket_table_is_exact_at_bucket_edges(lo, hi, n_mids):
    # Midpoints placed on the lookup table's bucket edges, probed one ulp either side:
    # where float rounding puts a value in the wrong bucket, the refinement must fix it.
    from dcformat.quantize import _LOOKUP_BUCKETS, _count_below

    g = np.unique(np.linspace(0, _LOOKUP_BUCKETS, n_mids).round())
    m = lo + g / (_LOOKUP_BUCKETS / (hi - lo))
    probes = np.concatenate([m, np.nextafter(m, -np.inf), np.nextafter(m, np.inf),
                             np.nextafter(np.nextafter(m, -np.inf), -np.inf),
                             np.linspace(lo - 1, hi + 1, 5000)])
    np.testing.assert_array_equal(_count_below(m, probes), np.searchsorted(m, probes, side="left"))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 30))
def test_lloyd_cluster_edges_match_brute_force_nearest(seed, k):
    # Values on and one ulp around the float midpoints of awkward centroids, where
    # searchsorted of the rounded midpoint alone can put a value in the wrong cluster.
    from dcformat.quantize import _edges

    rng = np.random.default_rng(seed)
    c = np.unique(rng.normal(size=k) * 10.0 ** rng.integers(-3, 4, size=k))
    mids = 0.5 * c[:-1] + 0.5 * c[1:]
    exact_mids = np.array([float((Fraction(a) + Fraction(b)) / 2) for a, b in zip(c[:-1], c[1:])])
    s = np.sort(np.concatenate([rng.normal(size=200) * 100, mids, exact_mids, c,
                                np.nextafter(mids, -np.inf), np.nextafter(mids, np.inf)]))
    labels = brute_nearest(s, c)
    expected = np.searchsorted(labels, np.arange(len(c) + 1), side="left")
    np.testing.assert_array_equal(_edges(s, c), expected)


# --- uniform grid -------------------------------------------------------------------------------


@given(st.integers(0, 2**31), st.floats(1e-4, 0.2), st.sampled_from([np.float32, np.float16, np.float64]))
@settings(max_examples=60, deadline=None)
def test_uniform_grid_meets_error_and_uses_only_levels_it_needs(seed, rel, dtype):
    x = np.random.default_rng(seed).normal(0, 0.3, 5000).astype(dtype).astype(np.float64)
    step = quantize.uniform_step(x, rel)
    codebook, codes = quantize.uniform_codebook(x, step, storage=np.dtype(dtype))
    assert codebook.dtype == np.dtype(dtype) and np.all(np.diff(codebook.astype(np.float64)) > 0)
    assert codes.dtype == np.uint16 and np.unique(codes).size == codebook.size  # every level is used
    err = np.linalg.norm(codebook.astype(np.float64)[codes] - x) / np.linalg.norm(x)
    if dtype is not np.float16:  # float16 storage rounding adds its own error at fine steps
        assert err <= rel * 1.1
    # each value sits on its nearest grid level (up to the storage dtype's rounding of the level)
    ulp = np.spacing(np.abs(x).astype(dtype)).astype(np.float64)
    if dtype is not np.float16:
        assert np.all(np.abs(codebook.astype(np.float64)[codes] - x) <= step / 2 * (1 + 1e-9) + 2 * ulp)


def test_uniform_grid_keeps_zero_and_widens_for_huge_ranges():
    x = np.concatenate([np.random.default_rng(0).normal(0, 1e-3, 10000), [1e3, -1e3]])
    codebook, codes = quantize.uniform_codebook(x, 1e-6, storage=np.dtype(np.float64))
    assert codebook.size <= quantize.MAX_K and 0.0 in codebook
    assert codebook[codes].max() == pytest.approx(1e3, rel=1e-4)  # nothing clipped


def test_channel_rms_floor_picks_the_weakest_channel():
    x = np.ones((4, 8))
    x[2] *= 0.01  # a quiet output channel (row)
    assert quantize.channel_rms_floor(x) == pytest.approx(0.01)
    x[1] = 0  # a dead channel does not set the step
    assert quantize.channel_rms_floor(x) == pytest.approx(0.01)
    assert quantize.channel_rms_floor(np.full(7, 2.0)) == pytest.approx(2.0)


# --- error-compensating rounding (OBS / GPTQ style) --------------------------------------------------------------


def test_compensated_rounding_is_nearest_rounding_for_uncorrelated_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 300))
    steps = rng.uniform(0.05, 0.5, size=(1, 300))
    q = quantize.compensated_levels(w, steps, quantize.compensation_factor(np.eye(300)))
    np.testing.assert_array_equal(q, np.rint(w / steps))


def test_compensated_rounding_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 200))  # 200 inputs driven by 8 factors
    h = x.T @ x / len(x) + 1e-2 * np.eye(200)
    w = rng.standard_normal((16, 200))
    step = 0.5
    near = np.rint(w / step) * step - w
    comp = quantize.compensated_levels(w, np.full(w.shape, step), quantize.compensation_factor(h)) * step - w
    out = lambda d: float(np.einsum("ij,ij->", d @ h, d))  # noqa: E731
    assert out(comp) < 0.2 * out(near)
    q = quantize.compensated_levels(w, np.full(w.shape, step), quantize.compensation_factor(h))
    assert np.array_equal(q, np.rint(q))


def test_compensation_needs_a_positive_definite_matrix():
    with pytest.raises(InputError, match="not positive definite"):
        quantize.compensation_factor(np.zeros((3, 3)))
