import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from sksae.datasets import make_sparse_superposition
from sksae.metrics import (
    dead_fraction,
    duplicate_fraction,
    feature_density,
    fraction_variance_explained,
    fve_scorer,
    l0,
    make_mmcs_scorer,
    make_sparsity_scorer,
    match_dictionaries,
    max_cosine_similarity,
    mean_max_cosine_similarity,
    relative_reconstruction_bias,
)

# MiniBatchDictionaryLearning is run with tiny budgets to keep the tests fast.
pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning"
)


def test_fve_equals_variance_weighted_r2(rng):
    X = rng.randn(200, 7) * rng.rand(7) * 3 + rng.randn(7)
    X_hat = X + 0.5 * rng.randn(200, 7)
    expected = r2_score(X, X_hat, multioutput="variance_weighted")
    assert fraction_variance_explained(X, X_hat) == pytest.approx(expected, rel=1e-12)
    # Hand formula: centred per input feature, summed over everything.
    num = ((X - X_hat) ** 2).sum()
    den = ((X - X.mean(0)) ** 2).sum()
    assert fraction_variance_explained(X, X_hat) == pytest.approx(1 - num / den)
    # float32 and torch inputs give the same value.
    assert fraction_variance_explained(
        torch.from_numpy(X.astype(np.float32)), X_hat.astype(np.float32)
    ) == pytest.approx(expected, rel=1e-5)


def test_fve_is_centred_and_not_per_row(rng):
    X = rng.randn(100, 4) + 100.0  # a large offset
    assert fraction_variance_explained(X, np.tile(X.mean(0), (100, 1))) == 0.0
    assert fraction_variance_explained(X, X) == 1.0


def test_fve_degenerate_and_shape_errors():
    X = np.ones((5, 3))
    assert fraction_variance_explained(X, X) == 1.0
    assert fraction_variance_explained(X, X + 1) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        fraction_variance_explained(X, X[:, :2])


def test_l0_density_dead_of_known_codes():
    codes = np.array(
        [[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 4.0, 0.0, 5.0]]
    )
    assert l0(codes) == pytest.approx(5 / 3)
    np.testing.assert_allclose(feature_density(codes), [0, 2 / 3, 0, 1])
    assert dead_fraction(codes) == 0.5
    csr = sp.csr_matrix(codes)
    csr.data[0] = 0.0  # an explicit zero is not active
    assert l0(csr) == pytest.approx(4 / 3)
    np.testing.assert_allclose(feature_density(csr), [0, 1 / 3, 0, 1])
    assert l0(torch.from_numpy(codes)) == pytest.approx(5 / 3)


def test_l0_of_generated_codes_matches_avg_active():
    _, codes = make_sparse_superposition(
        5000, 8, 30, avg_active=3, random_state=0, return_codes=True
    )
    assert l0(codes) == pytest.approx(3, abs=0.1)


def test_mmcs_of_dictionary_with_itself_permuted_and_rescaled(rng):
    D = rng.randn(20, 10)
    perm = rng.permutation(20)
    scaled = D[perm] * rng.uniform(0.1, 10, size=(20, 1))
    assert mean_max_cosine_similarity(D, scaled) == pytest.approx(1.0)
    mmcs, rate = mean_max_cosine_similarity(D, scaled, threshold=0.99)
    assert mmcs == pytest.approx(1.0) and rate == 1.0
    # Sign flips count only with absolute=True.
    assert mean_max_cosine_similarity(D, -D) < 0.9
    assert mean_max_cosine_similarity(D, -D, absolute=True) == pytest.approx(1.0)
    # Extra learned atoms never lower MMCS; missing ones do.
    assert mean_max_cosine_similarity(D, np.vstack([D, rng.randn(5, 10)])) == (
        pytest.approx(1.0)
    )
    mmcs, rate = mean_max_cosine_similarity(np.eye(4), np.eye(4)[:3], threshold=0.9)
    assert (mmcs, rate) == (0.75, 0.75)
    np.testing.assert_allclose(max_cosine_similarity(np.eye(4), np.eye(4)[:3]),
                               [1, 1, 1, 0])


def test_match_dictionaries_recovers_permutation(rng):
    D = rng.randn(12, 6)
    perm = rng.permutation(12)
    ind_a, ind_b, cos = match_dictionaries(D, 3.0 * D[perm])
    np.testing.assert_array_equal(ind_a, np.arange(12))
    np.testing.assert_array_equal(perm[ind_b], ind_a)
    np.testing.assert_allclose(cos, 1.0)
    # One-to-one: two copies of one atom cannot both be matched to it.
    A = np.array([[1.0, 0.0], [1.0, 0.01]])
    B = np.array([[1.0, 0.0], [0.0, 1.0]])
    _, ind_b, cos = match_dictionaries(A, B)
    assert sorted(ind_b) == [0, 1] and cos.min() < 0.1
    assert mean_max_cosine_similarity(A, B) > 0.99
    # Rectangular: as many pairs as the smaller dictionary has atoms.
    ind_a, ind_b, cos = match_dictionaries(D[:5], D)
    np.testing.assert_array_equal(ind_b, np.arange(5))
    _, _, cos = match_dictionaries(D, -D[perm], absolute=True)
    np.testing.assert_allclose(cos, 1.0)


def test_duplicate_fraction():
    D = np.eye(3)
    assert duplicate_fraction(D) == 0.0
    assert duplicate_fraction(np.vstack([D, 2 * D[:1]])) == 0.5
    assert duplicate_fraction(np.vstack([D, -D[:1]])) == 0.0
    assert duplicate_fraction(np.vstack([D, -D[:1]]), absolute=True) == 0.5
    assert duplicate_fraction(D[:1]) == 0.0


def test_relative_reconstruction_bias(rng):
    X = rng.randn(300, 5) + 2.0
    mean = X.mean(0)
    assert relative_reconstruction_bias(X, X) == pytest.approx(1.0)
    # Shrinking towards the mean by 1/2 gives gamma = 2 (codes undershoot).
    assert relative_reconstruction_bias(X, mean + 0.5 * (X - mean)) == pytest.approx(2)
    # Independent noise on X_hat does not bias gamma much; on the mean it is 1.
    X_hat = X + 0.01 * rng.randn(300, 5)
    assert relative_reconstruction_bias(X, X_hat) == pytest.approx(1.0, abs=1e-2)
    assert np.isnan(relative_reconstruction_bias(X, np.tile(mean, (300, 1))))


@pytest.fixture(scope="module")
def toy():
    X, F = make_sparse_superposition(
        600, 8, 12, avg_active=2, random_state=0, return_features=True
    )
    return X, F


def _mbdl(**kw):
    return MiniBatchDictionaryLearning(
        n_components=12, alpha=0.1, max_iter=3, batch_size=64, fit_algorithm="cd",
        transform_algorithm="lasso_lars", transform_alpha=0.05, random_state=0, **kw
    )


def test_scorers_on_fitted_estimator(toy):
    X, F = toy
    est = _mbdl(positive_code=True).fit(X)
    codes = est.transform(X)
    X_hat = est.inverse_transform(codes)
    assert fve_scorer(est, X) == pytest.approx(fraction_variance_explained(X, X_hat))
    budget_ok = make_sparsity_scorer(l0(codes) + 1)
    assert budget_ok(est, X) == pytest.approx(fve_scorer(est, X))
    tight = make_sparsity_scorer(l0(codes) / 2, penalty=0.5)
    assert tight(est, X) == pytest.approx(fve_scorer(est, X) - 0.5)
    assert make_sparsity_scorer(l0(codes) / 2, penalty=np.inf)(est, X) == -np.inf
    mmcs = make_mmcs_scorer(F)(est, X)
    assert mmcs == pytest.approx(mean_max_cosine_similarity(F, est.components_))
    rate = make_mmcs_scorer(F, threshold=0.9)(est, X)
    assert rate == pytest.approx(
        mean_max_cosine_similarity(F, est.components_, threshold=0.9)[1]
    )
    # A Pipeline ending in the dictionary learner works too.
    pipe = make_pipeline(FunctionTransformer(), _mbdl()).fit(X)
    assert make_mmcs_scorer(F, absolute=True)(pipe, X) == pytest.approx(
        mean_max_cosine_similarity(F, pipe[-1].components_, absolute=True)
    )
    X_hat = pipe.inverse_transform(pipe.transform(X)).astype(np.float64)
    assert fve_scorer(pipe, X) == pytest.approx(
        r2_score(X.astype(np.float64), X_hat, multioutput="variance_weighted"), rel=1e-12)


def _unit(A):
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def _dl_gpu():
    from sksae import DictionaryLearnerGPU

    return DictionaryLearnerGPU(
        n_components=12, alpha=0.1, max_iter=3, batch_size=64, fit_algorithm="cd",
        transform_algorithm="lasso_lars", transform_alpha=0.05, positive_code=True,
        device="cpu", random_state=0,
    )


def _sae():
    from sksae import SparseAutoencoder

    return SparseAutoencoder(
        n_components=12, architecture="relu", alpha=0.1, max_iter=3,
        batch_size=64, device="cpu", random_state=0, precision="float32",
    )


@pytest.fixture
def one_torch_thread():
    # Tiny torch models: a second intra-op thread only adds synchronisation.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "make_estimator, n_jobs",
    [(_mbdl, 1), (_mbdl, 2), (_dl_gpu, 1), (_sae, 1)],
    ids=["MiniBatchDictionaryLearning", "MiniBatchDictionaryLearning-n_jobs2",
         "DictionaryLearnerGPU", "SparseAutoencoder"],
)
def test_scorers_in_grid_search(toy, make_estimator, n_jobs, one_torch_thread):
    X, F = toy
    for scorer in (make_mmcs_scorer(F), make_sparsity_scorer(3.0), fve_scorer):
        assert pickle.loads(pickle.dumps(scorer)) is not None
    scoring = {
        "fve": fve_scorer,
        "sparse": make_sparsity_scorer(3.0),
        "mmcs": make_mmcs_scorer(F, absolute=True),
    }
    search = GridSearchCV(
        make_estimator(), {"alpha": [0.05, 0.5]}, scoring=scoring, refit="mmcs",
        cv=2, n_jobs=n_jobs,
    ).fit(X)
    # the best candidate's fold scores, recomputed by hand from the metrics' definitions
    from sklearn.base import clone
    from sklearn.model_selection import KFold

    best = search.best_index_
    params = search.cv_results_["params"][best]
    for i, (train, test) in enumerate(KFold(2).split(X)):
        est = clone(make_estimator()).set_params(**params).fit(X[train])
        codes = est.transform(X[test])
        X_hat = est.inverse_transform(codes)
        fve = r2_score(X[test], X_hat, multioutput="variance_weighted")
        over = max(0.0, (codes != 0).sum(1).mean() - 3.0) / 3.0
        cos = np.abs(_unit(F) @ _unit(est.components_).T).max(1).mean()
        for name, want in (("fve", fve), ("sparse", fve - over), ("mmcs", cos)):
            assert search.cv_results_[f"split{i}_test_{name}"][best] == pytest.approx(
                want, rel=1e-6, abs=1e-9), name
    assert search.best_index_ == np.argmax(search.cv_results_["mean_test_mmcs"])


def test_metrics_over_several_chunks_of_rows(monkeypatch):
    """More rows than two of the metrics' 65,536-row chunks, against whole-array numpy."""
    from sksae import metrics

    rng = np.random.default_rng(0)
    n = 2 * metrics._CHUNK_ROWS + 1000
    X = rng.standard_normal((n, 3))
    X[n // 2:] += 5.0  # chunks with other means: centring must use the global mean
    X_hat = 0.8 * X + 0.3 * rng.standard_normal((n, 3)) + 0.1
    assert fraction_variance_explained(X, X_hat) == pytest.approx(
        r2_score(X, X_hat, multioutput="variance_weighted"), rel=1e-10)
    mean = X.mean(0)
    gamma = ((X_hat - mean) * (X - mean)).sum() / ((X_hat - mean) ** 2).sum()
    assert relative_reconstruction_bias(X, X_hat) == pytest.approx(gamma, rel=1e-10)

    codes = np.where(rng.random((n, 5)) < 0.2, rng.random((n, 5)), 0.0)
    codes[:, 3] = 0
    codes[-1, 3] = 2.0  # alive in the last chunk only
    codes[:, 4] = 0
    assert l0(codes) == pytest.approx((codes != 0).sum() / n, rel=1e-12)
    np.testing.assert_allclose(feature_density(codes), (codes != 0).mean(0), rtol=1e-12)
    assert dead_fraction(codes) == 0.2

    learned = rng.standard_normal((4, 3))
    cos = _unit(X) @ _unit(learned).T
    np.testing.assert_allclose(max_cosine_similarity(X, learned), cos.max(1), rtol=1e-12)
    np.testing.assert_allclose(max_cosine_similarity(X, learned, absolute=True),
                               np.abs(cos).max(1), rtol=1e-12)
    mmcs, rate = mean_max_cosine_similarity(X, learned, threshold=0.9)
    assert mmcs == pytest.approx(cos.max(1).mean(), rel=1e-10)
    assert rate == pytest.approx((cos.max(1) > 0.9).mean(), rel=1e-12)

    # duplicate_fraction compares every atom with every other: chunks of 7 atoms here
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 7)
    atoms = rng.standard_normal((30, 16))
    atoms[[5, 13, 29]] = 2 * atoms[[12, 2, 0]] + 0.01  # across chunk boundaries
    cos = _unit(atoms) @ _unit(atoms).T
    np.fill_diagonal(cos, -np.inf)
    want = (cos.max(1) > 0.9).mean()
    assert want == pytest.approx(6 / 30)
    assert duplicate_fraction(atoms) == pytest.approx(want, rel=1e-12)


def test_scores_encode_rows_in_memory_chunk_by_chunk(monkeypatch):
    # the codes of a whole fold at once are n_samples x n_components (800 GB for 100k rows
    # of 1M latents): score and the scorers encode in-memory rows chunk by chunk too
    import sksae._base
    import sksae._sae
    from sksae import SparseAutoencoder
    from sksae.metrics import fve_scorer, make_sparsity_scorer

    rng = np.random.RandomState(0)
    X = (rng.randn(300, 8) @ rng.randn(8, 8)).astype(np.float32)
    sae = SparseAutoencoder(n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    codes = sae.transform(X)
    fve = fraction_variance_explained(X, sae.inverse_transform(codes))
    penalised = fve - 2.0 * (l0(codes) / 2.0 - 1.0)
    chunks, encoded = [], []
    iter_chunks = sksae._sae.iter_chunks
    monkeypatch.setattr(sksae._sae, "iter_chunks", lambda X, rows, *a: chunks.append(rows)
                        or iter_chunks(X, rows, *a))
    monkeypatch.setattr(sksae._sae, "inference_chunk_rows", lambda *a: 64)
    monkeypatch.setattr(sksae._base, "inference_chunk_rows", lambda *a: 64)
    transform = SparseAutoencoder.transform
    monkeypatch.setattr(SparseAutoencoder, "transform",
                        lambda self, Z: encoded.append(len(Z)) or transform(self, Z))
    assert sae.score(X) == pytest.approx(fve, rel=1e-9)
    assert chunks == [64] and encoded == []  # no whole transform
    # (decoded over the active latents: float32 sums in another order)
    assert fve_scorer(sae, X) == pytest.approx(fve, rel=1e-6)
    assert make_sparsity_scorer(2.0, penalty=2.0)(sae, X) == pytest.approx(penalised, rel=1e-6)
    assert max(encoded) == 64 and sum(encoded) == 2 * len(X)
