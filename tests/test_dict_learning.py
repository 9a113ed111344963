"""DictionaryLearnerGPU against scikit-learn's MiniBatchDictionaryLearning."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.decomposition import sparse_encode as sk_sparse_encode
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from sksae import DictionaryLearnerGPU
from sksae.coders import lasso_objective


def _sparse_data(rng, n=400, n_features=12, n_atoms=16):
    atoms = rng.randn(n_atoms, n_features)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = rng.rand(n, n_atoms) * (rng.rand(n, n_atoms) < 0.15)
    return codes @ atoms + 0.01 * rng.randn(n, n_features)


def _held_out_objective(X, D, alpha):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        code = sk_sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha)
    return float(lasso_objective(torch.from_numpy(X), torch.from_numpy(D),
                                 torch.from_numpy(code), alpha).mean())


def test_get_params_of_sklearn_are_accepted():
    params = MiniBatchDictionaryLearning(n_components=7, alpha=0.3).get_params()
    est = DictionaryLearnerGPU(**params)
    assert est.get_params()["n_components"] == 7
    assert set(params) <= set(est.get_params())
    assert est.get_params()["device"] == "auto"


@pytest.mark.parametrize("fit_algorithm", ["lars", "cd"])
def test_held_out_objective_close_to_sklearn(fit_algorithm, rng, device):
    X = _sparse_data(rng)
    train, test = X[:300], X[300:]
    params = dict(n_components=10, alpha=0.2, max_iter=10, batch_size=32,
                  fit_algorithm=fit_algorithm, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = MiniBatchDictionaryLearning(**params).fit(train)
    ours = DictionaryLearnerGPU(**params, device=device).fit(train)
    obj_ref = _held_out_objective(test, ref.components_, 0.2)
    obj = _held_out_objective(test, ours.components_, 0.2)
    assert obj <= 1.02 * obj_ref
    assert np.all(np.linalg.norm(ours.components_, axis=1) <= 1 + 1e-10)


def test_partial_fit_matches_fit(rng):
    X = _sparse_data(rng, n=30, n_features=8, n_atoms=10)
    V = rng.randn(6, 8)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    full = DictionaryLearnerGPU(6, alpha=0.1, max_iter=10, batch_size=1, shuffle=False,
                                dict_init=V, tol=0, max_no_improvement=None,
                                random_state=0, device="cpu").fit(X)
    online = DictionaryLearnerGPU(6, alpha=0.1, dict_init=V, random_state=0, device="cpu")
    for _ in range(10):
        for row in X:
            online.partial_fit(row[None])
    assert full.n_steps_ == online.n_steps_ == 300
    np.testing.assert_allclose(online.components_, full.components_, atol=1e-8)


def test_max_iter_zero_keeps_dict_init(rng):
    X = rng.randn(20, 5)
    V = rng.randn(3, 5)
    est = DictionaryLearnerGPU(3, max_iter=0, dict_init=V, device="cpu").fit(X)
    np.testing.assert_array_equal(est.components_, V)
    assert est.n_steps_ == 0 and est.n_iter_ == 0


def test_dtypes_and_positive(rng, device):
    X = np.abs(rng.randn(60, 6))
    est = DictionaryLearnerGPU(4, alpha=0.1, max_iter=2, positive_code=True, positive_dict=True,
                               fit_algorithm="cd",
                               transform_algorithm="lasso_cd", random_state=0, device=device)
    est.fit(X.astype(np.float32))
    assert est.components_.dtype == np.float32
    code = est.transform(X.astype(np.float32))
    assert code.dtype == np.float32
    assert (code >= 0).all() and (est.components_ >= 0).all()
    est.fit((X * 10).astype(np.int64))
    assert est.components_.dtype == np.float64


def test_transform_algorithms_match_sklearn_coders(rng):
    X = _sparse_data(rng, n=50)
    est = DictionaryLearnerGPU(8, alpha=0.2, max_iter=2, random_state=0, device="cpu").fit(X)
    for algo in ["omp", "lars", "threshold"]:
        est.set_params(transform_algorithm=algo, transform_n_nonzero_coefs=3)
        ref = sk_sparse_encode(X, est.components_, algorithm=algo, alpha=0.2, n_nonzero_coefs=3)
        np.testing.assert_allclose(est.transform(X), ref, atol=1e-10)


def test_split_sign_and_inverse_transform(rng):
    X = rng.randn(30, 6)
    est = DictionaryLearnerGPU(4, alpha=0.1, max_iter=2, split_sign=True,
                               transform_algorithm="lasso_lars", random_state=0,
                               device="cpu").fit(X)
    code = est.transform(X)
    assert code.shape == (30, 8) and (code >= 0).all()
    plain = est.set_params(split_sign=False).transform(X)
    np.testing.assert_allclose(code[:, :4] - code[:, 4:], plain)
    np.testing.assert_allclose(est.inverse_transform(plain), plain @ est.components_)
    assert list(est.get_feature_names_out()) == [f"dictionarylearnergpu{i}" for i in range(4)]


def test_errors_do_not_corrupt_fitted_model(rng):
    X = rng.randn(30, 6)
    est = DictionaryLearnerGPU(4, alpha=0.1, max_iter=2, random_state=0, device="cpu").fit(X)
    before = est.components_.copy()
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input X contains infinity"):
        est.fit(bad)
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :5])
    from scipy import sparse

    with pytest.raises(TypeError, match="Sparse data was passed for X, but dense data is "
                                        "required"):
        est.fit(sparse.csr_matrix(X))
    with pytest.raises(ValueError, match="dict_init"):
        est.set_params(dict_init=np.ones((4, 5))).fit(X)
    with pytest.raises(ValueError, match="Positive constraint"):
        est.set_params(dict_init=None, positive_code=True, fit_algorithm="lars")
        est.set_params(fit_algorithm="lars").fit(X)
    np.testing.assert_array_equal(est.components_, before)
    assert est.n_features_in_ == 6


def test_pickle_clone_and_state_is_numpy(rng):
    X = rng.randn(40, 5)
    est = DictionaryLearnerGPU(3, alpha=0.1, max_iter=2, random_state=0, device="cpu").fit(X)
    assert isinstance(est.components_, np.ndarray)
    assert not any(isinstance(v, torch.Tensor) for v in vars(est).values())
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.transform(X), est.transform(X))
    fresh = clone(est)
    assert not hasattr(fresh, "components_")


def test_callback_and_early_stopping(rng):
    X = _sparse_data(rng, n=200)
    seen = []
    est = DictionaryLearnerGPU(6, alpha=0.2, max_iter=50, batch_size=20, tol=0,
                               max_no_improvement=2, callback=lambda loc: seen.append(1),
                               random_state=0, device="cpu").fit(X)
    # 10 steps an epoch: steps 1-10 are ignored (min(100, n_samples / batch_size)), step
    # 11 sets the EWA's first minimum, step 12 improves on it, 13 and 14 do not
    assert est.n_steps_ == 14 and est.n_iter_ == 2
    assert len(seen) == est.n_steps_


def test_grid_search_smoke(rng):
    X = _sparse_data(rng, n=80)
    est = DictionaryLearnerGPU(4, max_iter=2, transform_algorithm="lasso_cd", random_state=0,
                               device="cpu")

    def neg_objective(estimator, X, y=None):
        return -_held_out_objective(X, estimator.components_, estimator.alpha)

    search = GridSearchCV(est, {"alpha": [0.1, 0.5]}, cv=2, scoring=neg_objective).fit(X)
    # the search's scores are the folds' held-out objectives, recomputed by hand
    from sklearn.model_selection import KFold

    by_hand = []
    for alpha in (0.1, 0.5):
        folds = [neg_objective(clone(est).set_params(alpha=alpha).fit(X[train]), X[test])
                 for train, test in KFold(2).split(X)]
        by_hand.append(np.mean(folds))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], by_hand, rtol=1e-12)
    # the smaller penalty costs less on held-out rows (-0.23 against -0.39 here)
    assert search.best_params_ == {"alpha": 0.1}
    assert by_hand[0] > by_hand[1] + 0.1


def test_initial_dictionary_exact_and_randomized_svd_agree(rng):
    # 5 atoms of 40 features: randomized SVD; 40 atoms: the exact one (the sketch
    # would cover every feature). On rank-5 data both give the same top atoms.
    from sksae._online import init_dictionary

    X = torch.from_numpy(rng.randn(200, 5) @ rng.randn(5, 40))
    gen = torch.Generator().manual_seed(0)
    small = init_dictionary(X, 5, gen)
    full = init_dictionary(X, 40, gen)
    torch.testing.assert_close(full[:5], small, rtol=1e-6, atol=1e-6)
    assert full[5:].abs().max() < 1e-6 * full[0].norm()
