"""Tests of dcformat.prune: exact counts, zeros stay pruned, naive references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dcformat.errors import InputError
from dcformat.prune import global_threshold, prune_by_sparsity, prune_by_std, prune_by_threshold

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


@st.composite
def tensors(draw, max_side: int = 6, max_dims: int = 3, bound: float | None = None):
    """Float tensors of any shape (0-d and empty too), rich in zeros, -0.0 and ties."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    width = np.dtype(dtype).itemsize * 8
    if bound is not None:
        bound = min(bound, float(np.finfo(dtype).max))
    finite = st.floats(-bound if bound else None, bound, allow_nan=False, allow_infinity=False, width=width)
    pool = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
    return draw(hnp.arrays(dtype, shape, elements=st.one_of(pool, finite)))


def reference_prune_order(x: np.ndarray) -> np.ndarray:
    """Flat indices in pruning order: by |x| ascending, then flat index ascending."""
    flat = np.abs(x.reshape(-1).astype(np.float64))
    return np.lexsort((np.arange(flat.size), flat))


# ---------------------------------------------------------------- prune_by_sparsity


@settings(max_examples=300, deadline=None)
@given(x=tensors(), sparsity=st.floats(0.0, 1.0))
def test_sparsity_matches_reference_order(x, sparsity):
    keep = prune_by_sparsity(x, sparsity)
    assert keep.shape == x.shape and keep.dtype == bool
    n_zero = int(np.count_nonzero(x == 0))
    n_pruned = max(round(sparsity * x.size), n_zero)
    expected = np.ones(x.size, dtype=bool)
    expected[reference_prune_order(x)[:n_pruned]] = False
    np.testing.assert_array_equal(keep.reshape(-1), expected)


@settings(max_examples=200, deadline=None)
@given(x=tensors(), sparsity=st.floats(0.0, 1.0))
def test_sparsity_prunes_exact_count_and_never_unzeros(x, sparsity):
    keep = prune_by_sparsity(x, sparsity)
    n_zero = int(np.count_nonzero(x == 0))
    assert x.size - int(np.count_nonzero(keep)) == max(round(sparsity * x.size), n_zero)
    assert not keep[x == 0].any()
    a = np.abs(x.astype(np.float64))
    if keep.any() and (~keep).any():
        assert a[keep].min() >= a[~keep].max()


@settings(max_examples=200, deadline=None)
@given(x=tensors(), s1=st.floats(0.0, 1.0), s2=st.floats(0.0, 1.0))
def test_sparsity_is_monotone(x, s1, s2):
    lo, hi = min(s1, s2), max(s1, s2)
    keep_lo = prune_by_sparsity(x, lo)
    keep_hi = prune_by_sparsity(x, hi)
    assert not (keep_hi & ~keep_lo).any()  # what is pruned at lo stays pruned at hi


def test_sparsity_ties_prune_lower_index_first():
    x = np.array([3.0, -1.0, 1.0, 1.0, -1.0, 2.0], dtype=np.float32)
    keep = prune_by_sparsity(x, 0.5)  # 3 of the four |x| == 1 (and none else) pruned
    np.testing.assert_array_equal(keep, [True, False, False, False, True, True])


def test_sparsity_rounds_half_to_even():
    x = np.arange(1, 6, dtype=np.float64)  # 5 weights, 2.5 -> 2 pruned
    assert np.count_nonzero(~prune_by_sparsity(x, 0.5)) == 2
    x = np.arange(1, 4, dtype=np.float64)  # 3 weights, 1.5 -> 2 pruned
    assert np.count_nonzero(~prune_by_sparsity(x, 0.5)) == 2


def test_sparsity_more_zeros_than_requested_prunes_just_the_zeros():
    x = np.array([0.0, -0.0, 0.0, 5.0, 1e-30], dtype=np.float64)
    np.testing.assert_array_equal(prune_by_sparsity(x, 0.2), [False, False, False, True, True])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sparsity_small_shapes(dtype):
    assert prune_by_sparsity(np.zeros((0, 3), dtype), 0.5).shape == (0, 3)
    scalar = np.array(2.0, dtype=dtype)
    assert prune_by_sparsity(scalar, 0.4).shape == ()
    assert bool(prune_by_sparsity(scalar, 0.4)) is True  # round(0.4) == 0
    assert bool(prune_by_sparsity(scalar, 0.6)) is False
    assert bool(prune_by_sparsity(np.array(-0.0, dtype=dtype), 0.0)) is False
    np.testing.assert_array_equal(prune_by_sparsity(np.array([7.0], dtype), 1.0), [False])


def test_sparsity_large_tensor_is_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 700)).astype(np.float16)  # many ties in float16
    keep = prune_by_sparsity(x, 0.9)
    assert np.count_nonzero(~keep) == round(0.9 * x.size)


# ---------------------------------------------------------------- std and threshold rules


@settings(max_examples=200, deadline=None)
@given(x=tensors(bound=1e100), quality=st.floats(0.0, 3.0))
def test_std_rule_matches_naive(x, quality):
    keep = prune_by_std(x, quality)
    flat = [float(v) for v in x.reshape(-1)]
    mean = math.fsum(flat) / len(flat) if flat else 0.0
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in flat) / len(flat)) if flat else 0.0
    t = quality * std
    assert keep.shape == x.shape
    for got, v in zip(keep.reshape(-1).tolist(), flat):
        if abs(abs(v) - t) > 1e-9 * t:  # away from the edge, where float64 std rounding matters
            assert got == (abs(v) >= t and v != 0), (v, t)


def test_std_rule_does_not_overflow_on_huge_float64():
    x = np.array([1e300, -1e300, 0.0, 1e299], dtype=np.float64)
    np.testing.assert_array_equal(prune_by_std(x, 0.5), [True, True, False, False])


def test_std_rule_uses_population_std_over_all_elements():
    x = np.array([0.0, 0.0, 1.0, -1.0, 3.0, -3.0], dtype=np.float32)
    std = np.sqrt((1 + 1 + 9 + 9) / 6)  # 1.826, zeros included, ddof=0
    np.testing.assert_array_equal(prune_by_std(x, 1.0), np.abs(x) >= std)
    np.testing.assert_array_equal(prune_by_std(x, 0.0), x != 0)


@settings(max_examples=200, deadline=None)
@given(x=tensors(), threshold=st.floats(0.0, 4.0))
def test_threshold_rule_matches_naive(x, threshold):
    keep = prune_by_threshold(x, threshold)
    expected = [abs(float(v)) > threshold for v in x.reshape(-1)]
    assert keep.shape == x.shape
    assert keep.reshape(-1).tolist() == expected


def test_threshold_zero_prunes_exactly_the_zeros():
    x = np.array([0.0, -0.0, 1e-45, -1e-45, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(prune_by_threshold(x, 0.0), [False, False, True, True, True])


def test_threshold_is_compared_in_float64_not_in_tensor_dtype():
    x = np.array([0.1], dtype=np.float32)  # float32(0.1) = 0.10000000149 > 0.1
    assert prune_by_threshold(x, 0.1)[0]
    assert not prune_by_threshold(x, float(np.float32(0.1)))[0]


# ---------------------------------------------------------------- global threshold


def naive_global_threshold(xs, sparsity):
    mags = sorted(abs(float(v)) for x in xs for v in x.reshape(-1))
    n = round(sparsity * len(mags))
    best = None
    for t in sorted(set([0.0] + mags)):
        count = sum(1 for m in mags if m <= t)
        key = (abs(count - n), -t)  # nearest count; on a tie the larger threshold
        if best is None or key < best[0]:
            best = (key, t)
    return best[1]


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(tensors(max_side=5, max_dims=2), min_size=0, max_size=4), sparsity=st.floats(0, 1))
def test_global_threshold_matches_naive(xs, sparsity):
    t = global_threshold(iter(xs), sparsity)  # an iterator: consumed once
    assert t == naive_global_threshold(xs, sparsity)
    assert t >= 0.0


def test_global_threshold_prunes_requested_count_without_ties():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=s).astype(np.float32) for s in [(50, 20), (333,), (7, 7, 7)]]
    total = sum(x.size for x in xs)
    for sparsity in [0.0, 0.1, 0.5, 0.93, 1.0]:
        t = global_threshold(xs, sparsity)
        pruned = sum(int(np.count_nonzero(~prune_by_threshold(x, t))) for x in xs)
        assert pruned == round(sparsity * total)


def test_global_threshold_mixed_dtypes_keep_float64_precision():
    a = np.array([1.0, 1.0 + 2**-40], dtype=np.float64)  # would merge in float32
    b = np.array([0.5], dtype=np.float16)
    assert global_threshold([a, b], 2 / 3) == 1.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn, arg",
    [(prune_by_sparsity, 0.5), (prune_by_std, 1.0), (prune_by_threshold, 0.1)],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_tensor_is_refused_by_name(fn, arg, bad):
    x = np.array([1.0, bad, 2.0], dtype=np.float32)
    with pytest.raises(InputError, match="conv1.weight"):
        fn(x, arg, name="conv1.weight")


def test_global_threshold_refuses_nonfinite():
    with pytest.raises(InputError, match="#1"):
        global_threshold([np.ones(3), np.array([np.nan])], 0.5)


@pytest.mark.parametrize("sparsity", [-0.01, 1.01, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        prune_by_sparsity(np.ones(4), sparsity, name="w")
    with pytest.raises(InputError, match="sparsity"):
        global_threshold([np.ones(4)], sparsity)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_quality_and_threshold_out_of_range(value):
    with pytest.raises(InputError, match="quality"):
        prune_by_std(np.ones(4), value)
    with pytest.raises(InputError, match="threshold"):
        prune_by_threshold(np.ones(4), value)


def test_non_float_dtype_is_refused():
    with pytest.raises(InputError, match="int32"):
        prune_by_sparsity(np.ones(4, dtype=np.int32), 0.5, name="w")
