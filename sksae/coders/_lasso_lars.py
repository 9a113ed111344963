"""Exact lasso codes batched over rows: the LARS-lasso homotopy.

Solves, for every row ``x`` of ``X`` at once,

    min_u 0.5 ||x - D^T u||^2 + alpha ||u||_1      (optionally u >= 0),

by following each row's solution path from ``lambda = max_j |c_j|``
(``c = D x``) down to ``alpha``, as scikit-learn's
``lars_path(method="lasso")`` does. The result is the exact lasso solution
(to rounding), whatever the conditioning of the dictionary.

Two implementations of the same path: on the CPU each row compiled with numba
(:mod:`sksae._accel._homotopy_nb`: no per-step dispatch), on other devices
batched over rows in torch (:mod:`._homotopy`). The torch path also runs on the
CPU when the compiled kernel cannot be loaded (a broken numba install).
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.compiled import kernel as compiled_kernel
from .._accel.ops import coder_engine
from .._accel.placement import row_block
from ._homotopy import homotopy, resolve_on_support

__all__ = ["lasso_lars"]

# Atoms whose squared norm is below this never enter (zero atoms of a padded
# dictionary): they carry no signal and would make the active Gram singular.
_NULL_ATOM = 1e-12


def lasso_lars(X, D, *, gram=None, cov=None, alpha=1.0, positive=False, max_iter=1000,
               engine=None, **_):
    """Exact lasso codes of the rows of ``X`` by the batched LARS-lasso homotopy.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    D : Tensor of shape (n_components, n_features)
    gram : Tensor of shape (n_components, n_components), default=None
        Precomputed ``D @ D.T``.
    cov : Tensor of shape (n_samples, n_components), default=None
        Precomputed ``X @ D.T``.
    alpha : float, default=1.0
        L1 penalty.
    positive : bool, default=False
        Constrain the codes to be non-negative.
    max_iter : int, default=1000
        Maximum number of path steps (events) per row, as ``LassoLars``.
    engine : {"torch", "numba"}, default=None
        Implementation of the path: None picks, for CPU tensors, the
        numba-compiled per-row path (:mod:`sksae._accel._homotopy_nb`; torch
        when it cannot be loaded), and torch on other devices. ``"numba"``
        takes CPU tensors only.

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        False when some row had not reached ``alpha`` after ``max_iter`` steps
        (its code is then the path point reached).
    """
    engine = coder_engine(engine, X.device, "homotopy")
    n, K = X.shape[0], D.shape[0]
    G = D @ D.T if gram is None else gram
    C = X @ D.T if cov is None else cov
    # The active-set algebra runs in float64: events compare small differences
    # of correlations, which float32 resolves poorly on ill-conditioned atoms.
    # The scan over all atoms stays in the input's precision (see homotopy).
    G64 = G.to(torch.float64)
    out = torch.zeros(n, K, dtype=torch.float64, device=X.device)
    if n == 0 or K == 0:
        return out.to(X.dtype), True
    alpha = float(alpha)
    usable = G64.diagonal() > _NULL_ATOM
    if engine == "numba":
        return _lasso_lars_compiled(C, G64, G, alpha, positive, max_iter, usable, X.dtype)
    converged = True
    # A path step makes ~10 passes over the block's (rows, n_components)
    # correlations: on the CPU blocks of rows keep them cache-sized.
    block = row_block(C, 8 * K)
    for start in range(0, n, block):
        Cb = C[start:start + block]
        results, _, ok = homotopy(Cb, G64, G, alpha, positive, max_iter, usable)
        converged &= ok
        if not results:
            continue
        # One exact solve for all finished chunks (padded to the widest).
        cap = max(r[1].shape[1] for r in results)
        pad = lambda x: torch.nn.functional.pad(x, (0, cap - x.shape[1]))  # noqa: E731
        pos, idx, sg, u = (torch.cat([pad(r[i]) if i else r[i] for r in results])
                           for i in range(4))
        lam = torch.cat([r[4] for r in results])
        coef = resolve_on_support(idx, sg, u, lam, G64, Cb[pos])
        _scatter(out, pos + start, idx, coef)
    return out.to(X.dtype), converged


def _lasso_lars_compiled(C, G64, G, alpha, positive, max_iter, usable, dtype):
    """All rows through the compiled per-row path (:mod:`sksae._accel._homotopy_nb`)."""
    kernel = compiled_kernel("homotopy", required=True)
    Cn = np.ascontiguousarray(C.detach().numpy())
    Gs = np.ascontiguousarray(G.detach().to(C.dtype).numpy())
    fi = np.finfo(Cn.dtype)
    consts = np.array([fi.tiny, 1.0, 0.0], dtype=Cn.dtype)
    out = np.zeros(Cn.shape, dtype=np.float64)
    # Per row the working set is a few K-vectors, so no blocking over rows is
    # needed (unlike the batched torch path).
    bad = kernel(Cn, np.ascontiguousarray(G64.detach().numpy()), Gs, alpha, bool(positive),
                 int(max_iter), np.ascontiguousarray(usable.numpy()),
                 bool(Cn.dtype == np.float64), consts, out)
    return torch.from_numpy(out).to(dtype), bad == 0


def _scatter(out, rows, idx, coef):
    # Unused slots hold zero coefficients, so accumulating them is harmless.
    out.index_put_((rows[:, None].expand_as(idx), idx), coef, accumulate=True)
