"""Sparse coders on torch, batched over rows.

Each coder maps a batch of rows ``X`` (n_samples, n_features) and a dictionary
``D`` (n_components, n_features), both tensors on the same device, to codes
``U`` (n_samples, n_components) with ``X ~ U D``, and reports whether it
converged. :data:`CODERS` maps scikit-learn's algorithm names to them;
:func:`encode` is the one dispatch point the estimator and
:func:`sksae.sparse_encode` use.
"""

from __future__ import annotations

import torch

from .._accel.placement import run_faster
from .._accel.threads import parallel, serial
from ._lars import lars
from ._lasso import lasso, lasso_objective
from ._lasso_lars import lasso_lars as _lasso_lars
from ._omp import omp
from ._threshold import threshold

__all__ = ["CODERS", "encode", "check_positive_coding", "default_n_nonzero_coefs",
           "lasso", "lasso_cd", "lasso_lars", "lasso_objective", "lars", "omp", "threshold"]


def lasso_lars(X, D, *, gram=None, cov=None, alpha=1.0, positive=False, max_iter=1000,
               init=None, tol=None, **_):
    """Exact lasso codes: the batched LARS-lasso homotopy.

    With orthogonal atoms (to rounding) the problem separates: soft
    thresholding. Otherwise the homotopy
    (:func:`sksae.coders._lasso_lars.lasso_lars`, on working sets of atoms)
    solves ``0.5 ||x - D^T u||^2 + alpha ||u||_1`` exactly, whatever the
    conditioning. ``init`` and ``tol`` are accepted for a common signature and
    not needed by an exact solver.
    """
    G = D @ D.T if gram is None else gram
    C = X @ D.T if cov is None else cov
    K = G.shape[0]
    if K > 1 and _orthogonal(G):
        # Orthogonal atoms (to rounding), e.g. the SVD initialisation of fit: the
        # lasso is separable and soft thresholding divided by ||d_j||^2 solves it.
        diag = G.diagonal()
        start = C.clamp(min=0) if positive else C
        start = torch.sign(start) * (start.abs() - alpha).clamp(min=0)
        start = torch.where(diag > 0, start / diag.clamp(min=1e-30), 0.0)
        return start, True
    return _lasso_lars(X, D, gram=G, cov=C, alpha=alpha, positive=positive,
                       max_iter=max_iter)


def _orthogonal(G):
    """Whether the atoms are orthogonal to rounding (off-diagonal Gram ~ 0)."""
    G = G.detach()
    tol = 1e-6 * float(G.diagonal().max().clamp(min=1e-30))
    # The first column settles the usual case (not orthogonal) in O(K).
    if float(G[1:, 0].abs().max()) > tol:
        return False
    off = G - torch.diag_embed(G.diagonal())
    return float(off.abs().max()) <= tol


def lasso_cd(X, D, *, init=None, **kwargs):
    """Lasso codes for scikit-learn's ``lasso_cd`` name.

    ``lasso_cd`` and ``lasso_lars`` solve the same problem
    ``0.5 ||x - D^T u||^2 + alpha ||u||_1``; the batched LARS-lasso homotopy
    (:func:`lasso_lars`) solves it exactly and is the faster of the two here,
    so it is used, except with a warm start ``init``, which only coordinate
    descent (:func:`lasso`) can use. ``max_iter`` then counts path steps
    (homotopy) or sweeps (coordinate descent).
    """
    if init is not None:
        return lasso(X, D, init=init, **kwargs)
    return lasso_lars(X, D, **kwargs)

#: scikit-learn's algorithm names; ``lasso_lars`` and ``lasso_cd`` solve the same
#: problem, so both use the exact batched homotopy (``lasso_cd`` falls back to
#: coordinate descent for warm starts).
CODERS = {
    "lasso_lars": lasso_lars,
    "lasso_cd": lasso_cd,
    "lars": lars,
    "omp": omp,
    "threshold": threshold,
}

_GREEDY = ("lars", "omp")


def check_positive_coding(algorithm, positive):
    """scikit-learn's refusal of ``positive=True`` for the greedy coders."""
    if positive and algorithm in _GREEDY:
        raise ValueError(f"Positive constraint not supported for '{algorithm}' coding method.")


def default_n_nonzero_coefs(n_features, n_components):
    """scikit-learn's default: ``min(max(n_features / 10, 1), n_components)``, as int."""
    return int(min(max(n_features / 10, 1), n_components))


def encode(X, D, algorithm, *, n_nonzero_coefs=None, alpha=None, gram=None, cov=None,
           max_iter=1000, positive=False, init=None, tol=None):
    """Codes of the rows of ``X`` by ``algorithm`` (no input validation).

    Parameters follow :func:`sklearn.decomposition.sparse_encode` (``cov`` is
    here laid out as ``X @ D.T``, one row per sample).

    ``tol`` is the lasso coders' relative duality-gap tolerance (None: tight).

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
    """
    n_features, n_components = D.shape[1], D.shape[0]
    if algorithm in _GREEDY:
        k = n_nonzero_coefs
        if k is None:
            k = default_n_nonzero_coefs(n_features, n_components)
        if algorithm == "omp" and k > n_components:
            raise ValueError("The number of atoms cannot be more than the number of features")
        kwargs = dict(n_nonzero_coefs=int(k))
    else:
        alpha = 1.0 if alpha is None else float(alpha)
        kwargs = dict(alpha=alpha, positive=positive, max_iter=max_iter, init=init, tol=tol)
    site = f"sparse coding ({algorithm})"

    def run(X, D, gram, cov, kwargs):
        # On the CPU the coder runs on the fit's threads (sksae._accel.threads); the
        # codes do not depend on the thread count.
        with serial(X), parallel(X):
            return CODERS[algorithm](X, D, gram=gram, cov=cov, **kwargs)

    if algorithm == "threshold":  # one product: no sequential work to move
        return run(X, D, gram, cov, kwargs)

    def on_host():
        def cpu(t):
            return t.cpu() if isinstance(t, torch.Tensor) else t

        code, converged = run(cpu(X), cpu(D), cpu(gram), cpu(cov),
                              {k: cpu(v) for k, v in kwargs.items()})
        return code.to(X.device), converged

    # On an accelerator the per-row paths (tens of events of small operations) are
    # launch-bound at minibatch sizes: they run on the device or on host copies,
    # whichever has measured faster for this call site and size (sksae._accel.placement).
    return run_faster(site, X, lambda: run(X, D, gram, cov, kwargs), on_host)
