"""Soft-thresholding coder: ``sign(c) * max(|c| - alpha, 0)`` with ``c = D x``."""

from __future__ import annotations

import torch

__all__ = ["threshold"]


def threshold(X, D, *, cov=None, alpha=1.0, positive=False, **_):
    """Soft-threshold the correlations of the rows of ``X`` with the atoms.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    D : Tensor of shape (n_components, n_features)
    cov : Tensor of shape (n_samples, n_components), default=None
        Precomputed ``X @ D.T``.
    alpha : float, default=1.0
        Threshold.
    positive : bool, default=False
        Clip negative codes to zero (scikit-learn's ``positive=True``).

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        Always True (closed form).
    """
    c = X @ D.T if cov is None else cov
    code = torch.sign(c) * torch.clamp(c.abs() - alpha, min=0)
    if positive:
        code.clamp_(min=0)
    return code, True
