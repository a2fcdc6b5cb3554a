"""Entropy-constrained k-means: exact assignments, shrinking codebooks, and the codec's eckmeans quantizer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dcformat import quantize
from dcformat.codec import CompressSettings, TensorInput, decode_tensor, encode_tensor


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**20), k=st.integers(1, 40))
def test_envelope_thresholds_give_the_cheapest_centroid(seed, k):
    rng = np.random.default_rng(seed)
    c = np.sort(rng.normal(size=k) * 3)
    c = np.unique(c)
    cost = rng.uniform(0, 4, size=c.size)
    w = rng.normal(size=500) * 4
    winners, cuts = quantize._lower_envelope(c, cost)
    got = winners[np.searchsorted(cuts, w)]
    brute = np.argmin((w[:, None] - c[None, :]) ** 2 + cost[None, :], axis=1)
    total = lambda idx: ((w - c[idx]) ** 2 + cost[idx]).sum()  # noqa: E731
    assert np.isclose(total(got), total(brute))  # ties may pick either centroid, at equal cost


def test_zero_lambda_is_lloyd_and_large_lambda_collapses():
    rng = np.random.default_rng(1)
    w = rng.laplace(size=20_000)
    grid = np.arange(-10, 11) * 0.5
    c0, codes0 = quantize.ec_kmeans(w, grid, 0.0)
    # lambda 0: plain Lloyd; every centroid is the mean of its cell.
    for j in range(c0.size):
        assert np.isclose(c0[j], w[codes0 == j].mean())
    c1, codes1 = quantize.ec_kmeans(w, grid, 1e6)
    assert c1.size == 1 and np.isclose(c1[0], w.mean())
    # A moderate price on bits: fewer levels, lower entropy, more error.
    c2, codes2 = quantize.ec_kmeans(w, grid, 0.5)

    def entropy(codes):
        p = np.bincount(codes) / codes.size
        p = p[p > 0]
        return -(p * np.log2(p)).sum()

    assert c2.size < c0.size and entropy(codes2) < entropy(codes0)
    assert np.mean((w - c2[codes2]) ** 2) > np.mean((w - c0[codes0]) ** 2)


def test_codec_eckmeans_round_trip_and_pruning():
    x = np.random.default_rng(2).laplace(size=(64, 48)).astype(np.float32)
    for sparsity in (None, 0.6):
        s = CompressSettings(quantizer="eckmeans", rel_error=0.05, ec_lambda=0.2, sparsity=sparsity)
        enc = encode_tensor(TensorInput("w", x, s))
        out = decode_tensor(enc.entry, list(enc.payloads))
        np.testing.assert_array_equal(out, enc.reference)
        assert np.linalg.norm(out - x) / np.linalg.norm(x) < (0.2 if sparsity is None else 0.7)
        if sparsity:
            assert np.count_nonzero(out) <= 0.4 * x.size + 1
