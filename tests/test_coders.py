"""Parity of the torch coders with scikit-learn's sparse_encode."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode as sk_sparse_encode
from sklearn.exceptions import ConvergenceWarning

from sksae import sparse_encode
from sksae.coders import CODERS, encode, lasso_objective


def _problem(rng, n=40, n_features=30, n_components=20, dtype=np.float64):
    D = rng.randn(n_components, n_features)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.randn(n, n_features)
    return X.astype(dtype), D.astype(dtype)


@pytest.mark.parametrize("algorithm", ["omp", "lars", "threshold"])
def test_greedy_and_threshold_match_sklearn(algorithm, rng, device):
    X, D = _problem(rng)
    ref = sk_sparse_encode(X, D, algorithm=algorithm, alpha=0.3, n_nonzero_coefs=6)
    got = sparse_encode(X, D, algorithm=algorithm, alpha=0.3, n_nonzero_coefs=6, device=device)
    np.testing.assert_allclose(got, ref, atol=1e-10)


def test_omp_default_n_nonzero_and_zero_rows(rng, device):
    X, D = _problem(rng)
    X[3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sk_sparse_encode(X, D, algorithm="omp")
    got = sparse_encode(X, D, algorithm="omp", device=device)
    np.testing.assert_allclose(got, ref, atol=1e-10)
    assert (got[3] == 0).all()


@pytest.mark.parametrize("algorithm", ["lasso_lars", "lasso_cd"])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_lasso_reaches_sklearn_objective(algorithm, positive, alpha, rng, device):
    X, D = _problem(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = sk_sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    got = sparse_encode(X, D, algorithm=algorithm, alpha=alpha, positive=positive, device=device)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    obj_ref = float(lasso_objective(Xt, Dt, torch.from_numpy(ref), alpha).sum())
    obj = float(lasso_objective(Xt, Dt, torch.from_numpy(got), alpha).sum())
    assert obj <= obj_ref * (1 + 1e-4)
    if positive:
        assert (got >= 0).all()


def test_lasso_float32_objective(rng):
    X, D = _problem(rng, dtype=np.float32)
    ref = sk_sparse_encode(X.astype(np.float64), D.astype(np.float64), alpha=0.5)
    got = sparse_encode(X, D, alpha=0.5, device="cpu")
    assert got.dtype == np.float32
    Xt, Dt = torch.from_numpy(X).double(), torch.from_numpy(D).double()
    obj_ref = float(lasso_objective(Xt, Dt, torch.from_numpy(ref), 0.5).sum())
    obj = float(lasso_objective(Xt, Dt, torch.from_numpy(got).double(), 0.5).sum())
    assert obj <= obj_ref * (1 + 1e-4)


def test_lasso_warm_start_is_used(rng):
    X, D = _problem(rng)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    code, ok = encode(Xt, Dt, "lasso_cd", alpha=0.5)
    assert ok
    # Started at the optimum, no sweep is needed.
    again, ok = encode(Xt, Dt, "lasso_cd", alpha=0.5, init=code, max_iter=0)
    assert ok
    torch.testing.assert_close(again, code)


def test_max_iter_convergence_warning(rng):
    X, D = _problem(rng)
    with pytest.warns(ConvergenceWarning, match=r"lasso_cd did not converge in max_iter=1 "):
        sparse_encode(X, D, algorithm="lasso_cd", alpha=0.05, max_iter=1, device="cpu")


def test_dtypes(rng):
    X, D = _problem(rng)
    assert sparse_encode(X.astype(np.float32), D, device="cpu").dtype == np.float32
    Xi = (X * 10).astype(np.int64)
    assert sparse_encode(Xi, D, algorithm="omp", device="cpu").dtype == np.float64


@pytest.mark.parametrize("algorithm", ["omp", "lars"])
def test_positive_refused_for_greedy(algorithm, rng):
    X, D = _problem(rng)
    with pytest.raises(ValueError, match="Positive constraint not supported"):
        sparse_encode(X, D, algorithm=algorithm, positive=True)


def test_errors(rng):
    X, D = _problem(rng)
    with pytest.raises(ValueError, match="different numbers of features"):
        sparse_encode(X[:, :5], D)
    with pytest.raises(ValueError, match="cannot be more than"):
        sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=D.shape[0] + 1)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="Input contains NaN"):
        sparse_encode(X, D)


def test_registry_names():
    assert set(CODERS) == {"lasso_lars", "lasso_cd", "lars", "omp", "threshold"}


@pytest.mark.parametrize("positive", [False, True])
def test_lasso_lars_large_supports_match_sklearn(positive, rng):
    # Supports beyond 16 atoms (several chunks of the homotopy's projected Gram rows,
    # with atoms leaving the path) and more atoms than features.
    X, D = _problem(rng, n=30, n_features=40, n_components=80)
    alpha = 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = sk_sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive)
    got = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, positive=positive,
                        device="cpu")
    assert (ref != 0).sum(axis=1).max() > 16
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    obj_ref = float(lasso_objective(Xt, Dt, torch.from_numpy(ref), alpha).sum())
    obj = float(lasso_objective(Xt, Dt, torch.from_numpy(got), alpha).sum())
    assert obj <= obj_ref * (1 + 1e-6)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_omp_many_atoms_matches_sklearn(rng):
    X, D = _problem(rng, n=25, n_features=40, n_components=90)
    ref = sk_sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=20)
    got = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=20, device="cpu")
    np.testing.assert_allclose(got, ref, atol=1e-9)


@pytest.mark.parametrize("engine", ["torch", "numba"])
@pytest.mark.parametrize("positive", [False, True])
def test_lasso_lars_engines_match_sklearn(engine, positive, rng):
    # Both implementations of the path (numba is the CPU default, torch runs on
    # other devices), float32 scan included.
    from sksae.coders._lasso_lars import lasso_lars as path

    for dtype in (np.float64, np.float32):
        X, D = _problem(rng, n=30, n_features=40, n_components=80, dtype=dtype)
        alpha = 0.05
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = sk_sparse_encode(X.astype(np.float64), D.astype(np.float64),
                                   algorithm="lasso_lars", alpha=alpha, positive=positive)
        got, ok = path(torch.from_numpy(X), torch.from_numpy(D), alpha=alpha,
                       positive=positive, engine=engine)
        assert ok and got.dtype == torch.from_numpy(X).dtype
        Xt, Dt = torch.from_numpy(X).double(), torch.from_numpy(D).double()
        obj_ref = float(lasso_objective(Xt, Dt, torch.from_numpy(ref), alpha).sum())
        obj = float(lasso_objective(Xt, Dt, got.double(), alpha).sum())
        assert obj <= obj_ref * (1 + (1e-9 if dtype == np.float64 else 1e-5))
        if positive:
            assert (got >= 0).all()


@pytest.mark.parametrize("engine", ["torch", "numba"])
def test_omp_engines_and_panels_match_sklearn(engine, rng):
    # More atoms than one Gram panel (128 columns), rows stopping early (zero row).
    from sksae.coders._omp import omp

    X, D = _problem(rng, n=20, n_features=30, n_components=300)
    X[2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sk_sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=12)
    got, _ = omp(torch.from_numpy(X), torch.from_numpy(D), n_nonzero_coefs=12, engine=engine)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-9)
