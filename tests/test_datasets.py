import numpy as np
import pytest
import scipy.sparse as sp

from sksae.datasets import firing_probabilities, make_sparse_superposition


@pytest.mark.parametrize("avg_active", [0.5, 5.0, 9.5, 40.0])
@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 1.0])
def test_firing_probabilities_sum_and_shape(avg_active, decay):
    p = firing_probabilities(40, avg_active, decay)
    assert p.shape == (40,)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) <= 1e-15)
    np.testing.assert_allclose(p.sum(), avg_active)
    # Unclipped probabilities follow the geometric profile.
    free = p < 1
    if free.sum() > 1:
        ratios = p[free][1:] / p[free][:-1]
        np.testing.assert_allclose(ratios, decay)


def test_firing_probabilities_rejects_too_many_active():
    with pytest.raises(ValueError, match="cannot exceed"):
        firing_probabilities(4, 5.0)


@pytest.mark.parametrize("correlated", [False, True, 0.9])
def test_superposition_ground_truth(correlated):
    n, d, g, k = 20000, 16, 48, 4.0
    X, features, codes = make_sparse_superposition(
        n, d, g, avg_active=k, correlated=correlated, random_state=0,
        return_features=True, return_codes=True,
    )
    assert X.shape == (n, d) and features.shape == (g, d) and codes.shape == (n, g)
    assert X.dtype == features.dtype == codes.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 1
    np.testing.assert_allclose(X, codes @ features, rtol=1e-5, atol=1e-5)

    # Mean number of active features within sampling error (5 standard errors).
    n_active = (codes > 0).sum(axis=1)
    assert abs(n_active.mean() - k) < 5 * n_active.std() / np.sqrt(n)
    # Marginal firing rates are the prescribed p_i, correlated or not.
    p = firing_probabilities(g, k, 0.99)
    rate = (codes > 0).mean(axis=0)
    np.testing.assert_array_less(np.abs(rate - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_superposition_correlation_makes_features_cofire():
    kw = dict(n_samples=20000, n_features=8, n_components=20, avg_active=5,
              random_state=0, return_codes=True)
    corr = {}
    for c in (False, 0.9):
        _, codes = make_sparse_superposition(correlated=c, **kw)
        cc = np.corrcoef((codes > 0).T)
        corr[c] = np.abs(cc[np.triu_indices(20, 1)]).mean()
    assert corr[False] < 0.03
    assert corr[0.9] > 3 * corr[False]


def test_superposition_fully_correlated_keeps_marginals():
    # rho = 1: the latents are a pure low-rank factor; marginals stay exact.
    _, codes = make_sparse_superposition(
        2000, 4, 6, avg_active=2, correlated=1.0, random_state=0, return_codes=True
    )
    active = codes > 0
    p = firing_probabilities(6, 2, 0.99)
    assert np.all(np.abs(active.mean(0) - p) < 5 * np.sqrt(p * (1 - p) / 2000))


def test_superposition_reproducible_and_options():
    a = make_sparse_superposition(50, 6, 10, random_state=3)
    b = make_sparse_superposition(50, 6, 10, random_state=3)
    c = make_sparse_superposition(50, 6, 10, random_state=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)

    X, codes = make_sparse_superposition(
        300, 6, 10, avg_active=3, magnitude=(0.5, 2.0), dtype=np.float64,
        sparse_codes=True, random_state=0, return_codes=True,
    )
    assert X.dtype == np.float64 and sp.issparse(codes) and codes.format == "csr"
    assert codes.data.min() >= 0.5 and codes.data.max() <= 2.0

    _, codes = make_sparse_superposition(
        300, 6, 10, avg_active=3, magnitude=1.0, random_state=0, return_codes=True
    )
    assert set(np.unique(codes)) == {0.0, 1.0}

    X0, F, C = make_sparse_superposition(
        500, 6, 10, random_state=0, return_features=True, return_codes=True
    )
    Xn = make_sparse_superposition(500, 6, 10, noise=0.1, random_state=0)
    resid = Xn - C @ F
    assert 0.08 < resid.std() < 0.12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(magnitude=(2.0, 1.0)), "low <= high"),
        (dict(magnitude="gamma"), "magnitude"),
        (dict(correlated=1.5), "correlated"),
        (dict(avg_active=20), "cannot exceed"),
        (dict(dtype=np.int64), "floating"),
        (dict(frequency_decay=0.0), "frequency_decay"),
    ],
)
def test_superposition_invalid_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sparse_superposition(10, 4, 8, **kwargs)


@pytest.mark.parametrize("correlated", [False, True])
def test_superposition_memory_is_the_output_plus_a_chunk(correlated):
    # Rows are generated in chunks: the peak is the output plus a bounded
    # chunk workspace (tens of MiB), not a multiple of n_samples x n_components.
    import tracemalloc

    n, d, g = 200_000, 64, 256
    out_bytes = n * d * 4
    tracemalloc.start()
    try:
        X = make_sparse_superposition(n, d, g, correlated=correlated, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert X.nbytes == out_bytes
    assert peak < out_bytes + 64 * 2**20
    assert peak < n * g * 4  # less than one dense float32 code matrix


@pytest.mark.parametrize(
    "kwargs, checksum",
    [
        (dict(), 626.8680419921875),
        (dict(correlated=True), 607.7603149414062),
        (dict(magnitude=(0.5, 2.0), noise=0.1), 1496.8465576171875),
        (dict(magnitude=1.0, correlated=0.3), 1125.749755859375),
    ],
)
def test_superposition_defaults_unchanged_by_the_variants(kwargs, checksum):
    # Sums of |X| from the generator before the variants were added: the same
    # seed still gives the same data for the settings that existed then.
    X = make_sparse_superposition(300, 8, 20, avg_active=3, random_state=0, **kwargs)
    assert float(np.abs(X).sum()) == pytest.approx(checksum, rel=1e-6)


@pytest.mark.parametrize(
    "magnitude, check",
    [
        ("exponential", lambda v: abs(v.mean() - 1.0) < 0.05 and v.min() > 0),
        ("lognormal", lambda v: abs(np.median(v) - 1.0) < 0.05 and v.max() > 5),
        (1.0, lambda v: np.all(v == 1.0)),
        ("uniform", lambda v: v.min() >= 0 and v.max() <= 1 and abs(v.mean() - 0.5) < 0.02),
    ],
)
def test_superposition_magnitude_laws(magnitude, check):
    X, F, codes = make_sparse_superposition(
        4000, 8, 20, avg_active=3, magnitude=magnitude, random_state=0,
        return_features=True, return_codes=True, sparse_codes=True,
    )
    assert check(codes.data)
    np.testing.assert_allclose(X, codes @ F, rtol=1e-4, atol=1e-4)


def test_superposition_dense_correlation_keeps_marginals_and_cofires():
    n, g = 20000, 30
    p = firing_probabilities(g, 5, 0.99)
    corr = {}
    for structure in ("low_rank", "dense"):
        _, codes = make_sparse_superposition(
            n, 8, g, avg_active=5, correlated=0.9, correlation=structure,
            random_state=0, return_codes=True,
        )
        active = codes > 0
        np.testing.assert_array_less(np.abs(active.mean(0) - p),
                                     5 * np.sqrt(p * (1 - p) / n))
        cc = np.corrcoef(active.T)
        corr[structure] = np.abs(cc[np.triu_indices(g, 1)]).mean()
    _, codes = make_sparse_superposition(n, 8, g, avg_active=5, random_state=0,
                                         return_codes=True)
    cc = np.corrcoef((codes > 0).T)
    independent = np.abs(cc[np.triu_indices(g, 1)]).mean()
    assert corr["dense"] > 2 * independent
    assert corr["low_rank"] > 2 * independent


def test_superposition_feature_norms():
    X, F, codes = make_sparse_superposition(
        500, 16, 40, feature_norms=(0.5, 2.0), random_state=0,
        return_features=True, return_codes=True,
    )
    norms = np.linalg.norm(F, axis=1)
    assert norms.min() >= 0.5 - 1e-5 and norms.max() <= 2.0 + 1e-5
    assert norms.max() / norms.min() > 2  # log-uniform, spread over the range
    np.testing.assert_allclose(X, codes @ F, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_norms=(0.0, 1.0)), "feature_norms"),
        (dict(feature_norms=(2.0, 1.0)), "feature_norms"),
        (dict(correlation="full"), "correlation"),
        (dict(magnitude="gamma"), "magnitude"),
    ],
)
def test_superposition_variant_params_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sparse_superposition(10, 4, 8, **kwargs)
