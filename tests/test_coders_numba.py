"""The CPU coders, numba-compiled per row, against the torch implementation and scikit-learn.

numba is a core dependency: the compiled kernels are the CPU's coders. The
batched torch implementation (the one of other devices, and the CPU's fallback
when numba is broken) is independent of them, so each compiled path is
compared with it and with scikit-learn's ``sparse_encode``.
"""

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode as sk_sparse_encode
from sklearn.exceptions import ConvergenceWarning

from sksae import sparse_encode
from sksae._accel import compiled as _compiled
from sksae.coders import lasso_objective
from sksae.coders._omp import omp

# The package re-exports a function under this module's name.
LL = importlib.import_module("sksae.coders._lasso_lars")


def _problem(rng, n=30, n_features=40, n_components=80, dtype=np.float64):
    D = rng.randn(n_components, n_features)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = rng.randn(n, n_features)
    return X.astype(dtype), D.astype(dtype)


def _reference(X, D, alpha, positive):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return sk_sparse_encode(X.astype(np.float64), D.astype(np.float64),
                                algorithm="lasso_lars", alpha=alpha, positive=positive)


def _objective(X, D, code, alpha):
    Xt, Dt = torch.from_numpy(X).double(), torch.from_numpy(D).double()
    return float(lasso_objective(Xt, Dt, torch.as_tensor(code).double(), alpha).sum())


def _path(X, D, engine, **kwargs):
    code, ok = LL.lasso_lars(torch.from_numpy(X), torch.from_numpy(D), engine=engine,
                             **kwargs)
    return code.numpy(), ok


@pytest.fixture
def numba_path():
    assert _compiled.compiled_backend()
    return "numba"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("positive", [False, True])
def test_compiled_matches_torch_and_sklearn(numba_path, dtype, positive, rng):
    X, D = _problem(rng, dtype=dtype)
    alpha = 0.05
    ref = _reference(X, D, alpha, positive)
    got, ok = _path(X, D, numba_path, alpha=alpha, positive=positive)
    tor, ok_t = _path(X, D, "torch", alpha=alpha, positive=positive)
    assert ok and ok_t and got.dtype == dtype
    # Same events and the same final solve as the torch path.
    np.testing.assert_allclose(got, tor, atol=1e-10 if dtype == np.float64 else 1e-5)
    obj, obj_ref = _objective(X, D, got, alpha), _objective(X, D, ref, alpha)
    assert obj <= obj_ref * (1 + (1e-9 if dtype == np.float64 else 1e-5))
    if dtype == np.float64:
        np.testing.assert_allclose(got, ref, atol=1e-8)
    if positive:
        assert (got >= 0).all()


def test_compiled_large_supports_and_degenerate_atoms(numba_path, rng):
    # Supports wider than the kernel's first slot allocation (32), atoms leaving
    # the path, a duplicated atom (numerically dependent: dropped) and a zero
    # atom (never enters).
    X, D = _problem(rng, n=8, n_features=45, n_components=90)
    D[1] = D[0]
    D[2] = 0.0
    alpha = 0.005
    ref = _reference(X, D, alpha, False)
    got, ok = _path(X, D, numba_path, alpha=alpha)
    tor, _ = _path(X, D, "torch", alpha=alpha)
    assert ok
    assert (got != 0).sum(axis=1).max() > 32
    assert (got[:, 2] == 0).all()
    np.testing.assert_allclose(got, tor, atol=1e-9)
    assert _objective(X, D, got, alpha) <= _objective(X, D, ref, alpha) * (1 + 1e-9)


@pytest.mark.parametrize("use_numba", [True, False])
def test_public_api_uses_switch(use_numba, rng, monkeypatch):
    # Off, the switch leaves the CPU to the torch implementation.
    monkeypatch.setattr(_compiled, "_USE_NUMBA", use_numba)
    assert _compiled.compiled_backend() is use_numba
    calls = _count_torch_calls(monkeypatch)
    X, D = _problem(rng, n=20)
    X[3] = 0.0  # an all-zero row: zero code
    alpha = 0.1
    got = sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, device="cpu")
    ref = _reference(X, D, alpha, False)
    assert (got[3] == 0).all()
    np.testing.assert_allclose(got, ref, atol=1e-8)
    got32 = sparse_encode(X.astype(np.float32), D.astype(np.float32), alpha=alpha,
                          device="cpu")
    assert got32.dtype == np.float32
    obj = _objective(X, D, got32, alpha)
    assert obj <= _objective(X, D, ref, alpha) * (1 + 1e-5)
    assert (calls["homotopy"] > 0) is not use_numba


def _count_torch_calls(monkeypatch):
    """Count the calls of the torch implementations of the homotopy and OMP."""
    omp_module = importlib.import_module("sksae.coders._omp")
    calls = {"homotopy": 0, "omp": 0}

    def counted(module, attr, key):
        inner = getattr(module, attr)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    counted(LL, "homotopy", "homotopy")
    counted(omp_module, "_omp_block", "omp")
    return calls


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("positive", [False, True])
def test_alpha_above_every_correlation(engine, positive, rng):
    X, D = _problem(rng, n=10)
    X[4] = 0.0
    # Rows whose every (positive) correlation is at most alpha get zero codes:
    # about half of them here.
    C = X @ D.T
    top = (np.maximum(C, 0) if positive else np.abs(C)).max(axis=1)
    alpha = float(np.median(top))
    got, ok = _path(X, D, engine, alpha=alpha, positive=positive)
    assert ok
    small = top <= alpha
    assert small.any() and (~small).any()
    assert (got[small] == 0).all() and (got[~small] != 0).any(axis=1).all()
    np.testing.assert_allclose(got, _reference(X, D, alpha, positive), atol=1e-8)
    # alpha above every row's correlations: all zero, converged.
    got, ok = _path(X, D, engine, alpha=float(top.max()) * 1.01, positive=positive)
    assert ok and (got == 0).all()


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_max_iter_not_converged(engine, rng, monkeypatch):
    X, D = _problem(rng, n=12)
    alpha = 0.01
    _, ok = _path(X, D, engine, alpha=alpha)
    assert ok
    for max_iter in (0, 2):
        got, ok = _path(X, D, engine, alpha=alpha, max_iter=max_iter)
        assert not ok
        # The support reached: the first atom plus at most one per step.
        assert ((got != 0).sum(axis=1) <= max_iter + 1).all()
    if engine == "numba":
        tor, _ = _path(X, D, "torch", alpha=alpha, max_iter=2)
        np.testing.assert_allclose(got, tor, atol=1e-10)
    monkeypatch.setattr(_compiled, "_USE_NUMBA", engine == "numba")
    with pytest.warns(ConvergenceWarning, match=r"lasso_lars did not converge in max_iter=2 "):
        sparse_encode(X, D, algorithm="lasso_lars", alpha=alpha, max_iter=2, device="cpu")


def test_fallback_without_numba(rng, monkeypatch):
    # What a machine with a broken numba runs: the import fails, the torch
    # implementations code on the CPU.
    calls = _count_torch_calls(monkeypatch)
    monkeypatch.setattr(_compiled, "_KERNELS", {})
    monkeypatch.setitem(sys.modules, "numba", None)
    for name in ("sksae._accel._homotopy_nb", "sksae._accel._omp_nb"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert not _compiled.compiled_backend()
    assert _compiled.kernel("omp") is None
    with pytest.raises(ImportError, match="import of numba halted"):
        _compiled.kernel("omp", required=True)
    X, D = _problem(rng, n=10)
    got, ok = _path(X, D, None, alpha=0.05)
    assert ok
    np.testing.assert_allclose(got, _reference(X, D, 0.05, False), atol=1e-8)
    got = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=5, device="cpu")
    ref = sk_sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=5)
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert calls["homotopy"] > 0 and calls["omp"] > 0


@pytest.mark.parametrize("coder", ["lasso_lars", "omp"])
def test_unknown_engine_is_refused(coder, rng):
    X, D = map(torch.from_numpy, _problem(rng, n=4))
    fn = LL.lasso_lars if coder == "lasso_lars" else omp
    with pytest.raises(ValueError, match="engine must be one of"):
        fn(X, D, engine="numpy")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_omp_matches_torch_and_sklearn(numba_path, dtype, rng):
    # A zero row (stops at once), a duplicated atom (picked twice or dependent:
    # the row stops), more atoms per row than some rows can take.
    X, D = _problem(rng, n=25, n_features=30, n_components=60, dtype=dtype)
    X[2] = 0
    D[1] = D[0]
    X[5] = 3 * D[0] + D[7]
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    got, ok = omp(Xt, Dt, n_nonzero_coefs=12, engine=numba_path)
    tor, _ = omp(Xt, Dt, n_nonzero_coefs=12, engine="torch")
    assert ok and got.dtype == Xt.dtype
    tol = 1e-9 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(got.numpy(), tor.numpy(), atol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sk_sparse_encode(X.astype(np.float64), D.astype(np.float64), algorithm="omp",
                               n_nonzero_coefs=12)
    # Which of the two equal atoms wins a tie is up to rounding: compare their sum.
    merge = lambda c: np.column_stack([c[:, 0] + c[:, 1], c[:, 2:]])  # noqa: E731
    np.testing.assert_allclose(merge(got.numpy()), merge(ref), atol=tol)
    assert (got[2] == 0).all()
