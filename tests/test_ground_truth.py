"""Ground-truth recovery (issue 22): the refinement recipe and the size sweep's estimate."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sksae import RefinedAutoencoder, SparseAutoencoder
from sksae._accel import compiled as compiled_module
from sksae._refine import nonnegative_omp, refine_dictionary
from sksae.datasets import make_sparse_superposition
from sksae.metrics import max_cosine_similarity
from sksae.model_selection import dictionary_size_sweep, shared_atom_count


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _codes_problem(n=300, d=32, K=64, k=3, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, d)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    U = np.zeros((n, K), np.float32)
    for i in range(n):
        U[i, rng.choice(K, k, replace=False)] = rng.uniform(0.5, 1.5, k)
    return U @ D, D, U


def test_nonnegative_omp_recovers_exact_sparse_codes():
    X, D, U = _codes_problem()
    codes = nonnegative_omp(X, D, 6)
    assert codes.shape == U.shape and codes.data.min() > 0
    # Incoherent atoms, 3 of 64 in 32 dims: the greedy picks are the true ones
    # for nearly every row, and the least squares then solves them exactly.
    exact = np.all(np.abs(codes.toarray() - U) < 1e-3, axis=1)
    assert exact.mean() > 0.95
    # The residual tolerance stops rows once they are explained: no extra atoms.
    assert (codes.toarray() > 1e-3).sum(axis=1)[exact].max() == 3


@pytest.mark.parametrize("min_gain", [0.0, 0.05])
def test_nonnegative_omp_compiled_and_torch_paths_agree(monkeypatch, min_gain):
    X, D, _ = _codes_problem(n=200, seed=1)
    X = X + 0.05 * np.random.default_rng(1).standard_normal(X.shape).astype(np.float32)
    compiled = nonnegative_omp(X, D, 5, min_gain=min_gain).toarray()
    monkeypatch.setattr(compiled_module, "_USE_NUMBA", False)  # as without numba
    batched = nonnegative_omp(X, D, 5, min_gain=min_gain).toarray()
    np.testing.assert_allclose(compiled, batched, atol=1e-4)


def test_nonnegative_omp_min_gain_leaves_out_atoms_that_explain_little():
    # Each row: two atoms at 1.0 and a third at 0.1 (about 0.5% of the energy).
    rng = np.random.default_rng(0)
    D = np.linalg.qr(rng.standard_normal((16, 16)))[0][:8].astype(np.float32)
    U = np.zeros((50, 8), np.float32)
    for i in range(50):
        a, b, c = rng.choice(8, 3, replace=False)
        U[i, [a, b]], U[i, c] = 1.0, 0.1
    X = U @ D
    full = nonnegative_omp(X, D, 8).toarray()
    np.testing.assert_allclose(full, U, atol=1e-5)  # orthonormal atoms: exact codes
    cut = nonnegative_omp(X, D, 8, min_gain=0.01).toarray()
    np.testing.assert_allclose(cut, np.where(U == 1.0, U, 0), atol=1e-5)
    kept = nonnegative_omp(X, D, 8, min_gain=0.004).toarray()  # 0.1^2 / 2.01 = 0.005
    np.testing.assert_allclose(kept, U, atol=1e-5)


def test_refine_dictionary_recovers_perturbed_atoms():
    X, F = make_sparse_superposition(20000, 32, 48, avg_active=3, random_state=0,
                                     return_features=True)
    rng = np.random.default_rng(0)
    D0 = F + 0.5 * rng.standard_normal(F.shape).astype(np.float32) / np.sqrt(32)
    D0 = np.vstack([D0[:40], rng.standard_normal((24, 32)).astype(np.float32)])
    before = np.mean(max_cosine_similarity(F, D0) > 0.95)
    D = refine_dictionary(X, D0, n_nonzero_coefs=5, n_iter=5, min_usage=5)
    after = np.mean(max_cosine_similarity(F, D) > 0.95)
    assert D.shape == D0.shape and D.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0, rtol=1e-5)
    assert before < 0.5 and after > 0.95  # the 8 missing atoms are re-seeded too


def test_refined_autoencoder_estimator_api():
    X = make_sparse_superposition(2000, 16, 32, avg_active=3, random_state=0)
    est = RefinedAutoencoder(SparseAutoencoder(n_components=48, k=4, max_iter=1,
                                               random_state=0), n_iter=2)
    codes = est.fit(X).transform(X)
    assert codes.shape == (2000, 48) and codes.dtype == np.float32
    assert codes.min() >= 0 and (codes > 0).sum(1).max() <= 8  # 2 k
    X_hat = est.inverse_transform(codes)
    fve = 1 - ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    # min_gain leaves out atoms that add less than 2% of a row's energy each;
    # without it the same atoms reconstruct more.
    exact = est.set_params(min_gain=0.0).inverse_transform(est.transform(X))
    fve_all = 1 - ((X - exact) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert 0.9 < fve < fve_all and fve_all > 0.97
    est.set_params(min_gain=0.02)
    assert est.get_feature_names_out()[0] == "refinedautoencoder0"
    assert clone(est).get_params()["n_iter"] == 2
    with pytest.raises(ValueError, match="n_iter"):
        RefinedAutoencoder(n_iter=-1).fit(X)


def test_shared_atom_count_counts_distinct_common_atoms():
    A = np.eye(6)
    assert shared_atom_count(A[:4], A) == 4
    # Duplicates count once; a sign flip is a different direction unless absolute.
    B = np.vstack([A[:3], A[0], -A[3]])
    assert shared_atom_count(A, B) == 3
    assert shared_atom_count(A, B, absolute=True) == 4
    assert shared_atom_count(A, np.zeros((0, 6))) == 0


def test_size_sweep_estimates_the_feature_count():
    # 128 true features in 64 dims. Refined dictionaries of 192 and 256 atoms
    # both hold (nearly) every true feature, so they share ~128 distinct atoms;
    # smaller ones share far fewer.
    X, F = make_sparse_superposition(20000, 64, 128, correlated=True, random_state=0,
                                     return_features=True)
    est = RefinedAutoencoder(SparseAutoencoder(k=6, max_iter=1, random_state=0), n_iter=6)
    res = dictionary_size_sweep(est, X, [64, 128, 192, 256], true_features=F,
                                param_name="estimator__n_components")
    assert np.isnan(res.n_shared[0])
    assert abs(res.n_features_estimate - 128) <= 0.1 * 128
    assert "maximum of n_shared" in res.estimate_rule
    assert "lower bound" not in res.estimate_rule


def test_size_sweep_says_when_the_grid_is_too_small():
    X = make_sparse_superposition(3000, 16, 64, avg_active=3, random_state=0)
    est = RefinedAutoencoder(SparseAutoencoder(k=4, max_iter=1, random_state=0), n_iter=3)
    res = dictionary_size_sweep(est, X, [8, 16], param_name="estimator__n_components")
    assert res.n_features_estimate <= 16
    assert "lower bound" in res.estimate_rule or res.n_features_estimate < 0.9 * 8


@pytest.mark.slow
def test_recipe_recovers_95_percent_of_a_small_variant():
    # 128 correlated features in 64 dims, frequencies decaying by 0.99 (the
    # rarest fires in ~0.3% of rows), 30k rows: the SAE alone finds about half
    # of them at cosine > 0.9, the refined dictionary at least 95%.
    X, F = make_sparse_superposition(30000, 64, 128, correlated=True, random_state=0,
                                     return_features=True)
    est = RefinedAutoencoder(SparseAutoencoder(n_components=256, k=6, max_iter=1,
                                               random_state=0)).fit(X)
    recovered = np.mean(max_cosine_similarity(F, est.components_) > 0.9)
    sae_only = np.mean(max_cosine_similarity(F, est.estimator_.components_) > 0.9)
    assert recovered >= 0.95
    assert sae_only < recovered


def test_refined_autoencoder_refines_a_classical_dictionary():
    # Any learner of components_ can start the refinement; without a decoder
    # bias the rows are coded uncentred.
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.preprocessing import StandardScaler

    X = make_sparse_superposition(2000, 16, 32, avg_active=3, random_state=0)
    start = MiniBatchDictionaryLearning(n_components=40, alpha=0.1, max_iter=1,
                                        random_state=0)
    est = RefinedAutoencoder(start, n_iter=2, n_nonzero_coefs=5).fit(X)
    np.testing.assert_array_equal(est.decoder_bias_, np.zeros(16, np.float32))
    codes = est.transform(X)
    assert codes.min() >= 0 and (codes > 0).sum(1).max() <= 5
    X_hat = est.inverse_transform(codes)
    assert 1 - ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum() > 0.9
    with pytest.raises(TypeError, match="StandardScaler has no components_"):
        RefinedAutoencoder(StandardScaler()).fit(X)


def test_refined_autoencoder_failed_fit_leaves_it_as_it_was(monkeypatch):
    from sksae import _refine

    X = make_sparse_superposition(1000, 16, 32, avg_active=3, random_state=0)
    est = RefinedAutoencoder(SparseAutoencoder(n_components=40, k=4, max_iter=1,
                                               random_state=0), n_iter=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_refine, "refine_dictionary", interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.fit(X)
    assert not hasattr(est, "components_") and not hasattr(est, "estimator_")
    assert not hasattr(est, "n_features_in_")  # an interrupted first fit: unfitted
    monkeypatch.undo()
    est.fit(X)
    before = dict(vars(est))
    monkeypatch.setattr(_refine, "refine_dictionary", interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.fit(X[:, :12])  # a refit on other data, interrupted after its SAE fit
    assert vars(est).keys() == before.keys()
    assert all(vars(est)[k] is v for k, v in before.items())
    assert est.n_features_in_ == 16
    np.testing.assert_array_equal(est.transform(X[:5]).shape, (5, 40))


def _co_firing_data(n=6000, d=32, seed=0):
    """Features 0 and 1 fire together in most rows; feature 0 alone in a few."""
    rng = np.random.RandomState(seed)
    F = rng.randn(6, d).astype(np.float32)
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    F[1] -= (F[1] @ F[0]) * F[0]
    F[1] /= np.linalg.norm(F[1])
    codes = np.zeros((n, 6), np.float32)
    both = rng.rand(n) < 0.3
    alone = ~both & (rng.rand(n) < 0.05)
    codes[both, 0] = rng.uniform(1, 2, both.sum())
    codes[both, 1] = rng.uniform(1, 2, both.sum())
    codes[alone, 0] = rng.uniform(1, 2, alone.sum())
    others = rng.rand(n, 4) < 0.2
    codes[:, 2:] = others * rng.uniform(1, 2, (n, 4))
    return codes @ F, F


def test_refinement_repairs_an_atom_leaning_on_a_co_firing_one():
    """An atom ``f0 - 0.5 f1``, coded beside ``f1``, spans the same rows as ``f0``: repaired."""
    X, F = _co_firing_data()
    mixed = F[0] - 0.5 * F[1]
    start = np.vstack([mixed / np.linalg.norm(mixed), F[1:]])
    # one round codes and updates (and repairs); the second re-fits the atoms
    D = refine_dictionary(X, start, n_nonzero_coefs=4, n_iter=3, min_usage=1)
    assert D[0] @ F[0] > 0.99  # without the repair it stays at 0.88, drifting away
    assert (np.abs(D[1:] @ F[1:].T).max(1) > 0.99).all()


def test_refinement_keeps_atoms_that_merely_point_apart():
    """Two true atoms with a cosine of -0.5 that never code the same rows stay as they are."""
    rng = np.random.RandomState(1)
    F = rng.randn(4, 16).astype(np.float32)
    F[1] = -0.5 * F[0] / np.linalg.norm(F[0]) + 0.866 * F[1] / np.linalg.norm(F[1])
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    codes = np.zeros((4000, 4), np.float32)
    which = rng.randint(0, 4, 4000)
    codes[np.arange(4000), which] = rng.uniform(1, 2, 4000)
    D = refine_dictionary(codes @ F, F, n_nonzero_coefs=2, n_iter=3, min_usage=1)
    np.testing.assert_allclose(np.einsum("ij,ij->i", D, F), 1, atol=1e-4)
