"""Sparse coders on torch, batched over rows.

Each coder maps a batch of rows ``X`` (n_samples, n_features) and a dictionary
``D`` (n_components, n_features), both tensors on the same device, to codes
``U`` (n_samples, n_components) with ``X ~ U D``, and reports whether it
converged. :data:`CODERS` maps scikit-learn's algorithm names to them;
:func:`encode` is the one dispatch point the estimator and
:func:`sksae.sparse_encode` use.
"""

from __future__ import annotations

from ._lars import lars
from ._lasso import lasso, lasso_objective
from ._omp import omp
from ._threshold import threshold

__all__ = ["CODERS", "encode", "check_positive_coding", "default_n_nonzero_coefs",
           "lasso", "lasso_objective", "lars", "omp", "threshold"]

#: scikit-learn's algorithm names; ``lasso_lars`` and ``lasso_cd`` solve the same
#: problem, so both use the fastest solver here.
CODERS = {
    "lasso_lars": lasso,
    "lasso_cd": lasso,
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
        return CODERS[algorithm](X, D, gram=gram, cov=cov, n_nonzero_coefs=int(k))
    alpha = 1.0 if alpha is None else float(alpha)
    return CODERS[algorithm](X, D, gram=gram, cov=cov, alpha=alpha, positive=positive,
                             max_iter=max_iter, init=init, tol=tol)
