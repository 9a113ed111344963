"""Least angle regression (LAR) codes batched over rows.

scikit-learn's ``Lars(n_nonzero_coefs=k, fit_path=False)`` on the Gram matrix
(Efron, Hastie, Johnstone & Tibshirani 2004, "Least angle regression"). Plain
LAR never drops a variable, so after step ``s`` every row has exactly ``s``
active atoms: the active sets fit in fixed-size tensors and all rows advance
together. Each step adds the most correlated inactive atom, solves the
equiangular direction on the active Gram block and moves along it until an
inactive atom's correlation catches up (``gamma`` as in ``lars_path``).
"""

from __future__ import annotations

import torch

__all__ = ["lars"]


def _min_pos(values):
    """Row-wise minimum over strictly positive entries (inf where none)."""
    inf = torch.full_like(values, float("inf"))
    return torch.where(values > 0, values, inf).amin(dim=1)


def lars(X, D, *, gram=None, cov=None, n_nonzero_coefs=1, **_):
    """LAR codes with ``n_nonzero_coefs`` active atoms per row.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    D : Tensor of shape (n_components, n_features)
    gram : Tensor of shape (n_components, n_components), default=None
        Precomputed ``D @ D.T``.
    cov : Tensor of shape (n_samples, n_components), default=None
        Precomputed ``X @ D.T``.
    n_nonzero_coefs : int, default=1

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        Always True (a fixed number of steps).
    """
    n, K = X.shape[0], D.shape[0]
    G = D @ D.T if gram is None else gram
    corr = (X @ D.T if cov is None else cov).clone()
    dtype, device = G.dtype, X.device
    eps = torch.finfo(dtype).eps
    tiny32 = torch.finfo(torch.float32).tiny
    n_features = X.shape[1]
    rows = torch.arange(n, device=device)
    steps = min(int(n_nonzero_coefs), K)
    idx = torch.zeros(n, steps, dtype=torch.long, device=device)
    signs = torch.zeros(n, steps, dtype=dtype, device=device)
    coef = torch.zeros(n, steps, dtype=dtype, device=device)
    inactive = torch.ones(n, K, dtype=torch.bool, device=device)
    live = torch.ones(n, dtype=torch.bool, device=device)
    for s in range(steps):
        masked = torch.where(inactive, corr.abs(), torch.full_like(corr, -1.0))
        j = masked.argmax(dim=1)
        c_max = masked[rows, j]
        # lars_path stops once alpha = C / n_samples reaches machine precision.
        live = live & (c_max / n_features > eps)
        if not bool(live.any()):
            break
        idx[:, s] = j
        signs[:, s] = torch.where(live, torch.sign(corr[rows, j]), torch.zeros_like(c_max))
        inactive[rows, j] = inactive[rows, j] & ~live
        a = idx[:, : s + 1]
        Gaa = G[a.unsqueeze(-1), a.unsqueeze(1)]
        sg = signs[:, : s + 1]
        # Rows that stopped get an identity block so the batched solve stays finite.
        eye = torch.eye(s + 1, dtype=dtype, device=device)
        Gaa = torch.where(live[:, None, None], Gaa, eye)
        ls = torch.linalg.solve(Gaa, torch.where(live[:, None], sg, torch.ones_like(sg)))
        AA = 1.0 / torch.sqrt((ls * torch.where(live[:, None], sg, torch.ones_like(sg))).sum(dim=1))
        ls = ls * AA[:, None]
        eq_dir = torch.bmm(ls.unsqueeze(1), G[a]).squeeze(1)  # (n, K)
        C = c_max
        g1 = _min_pos(torch.where(inactive, (C[:, None] - corr) / (AA[:, None] - eq_dir + tiny32), -1.0))
        g2 = _min_pos(torch.where(inactive, (C[:, None] + corr) / (AA[:, None] + eq_dir + tiny32), -1.0))
        gamma = torch.minimum(torch.minimum(g1, g2), C / AA)
        gamma = torch.where(live, gamma, torch.zeros_like(gamma))
        coef[:, : s + 1] += gamma[:, None] * ls
        corr = corr - gamma[:, None] * eq_dir
    code = torch.zeros(n, K, dtype=dtype, device=device)
    code.scatter_add_(1, idx, coef * (signs != 0))
    return code, True
