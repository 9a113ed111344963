"""Lasso codes batched over rows: working-set coordinate descent on the Gram.

Solves, for every row ``x`` of ``X`` at once,

    min_u 0.5 ||x - D^T u||^2 + alpha ||u||_1      (optionally u >= 0),

the problem scikit-learn's ``lasso_lars`` and ``lasso_cd`` coders solve
(``sklearn.decomposition.sparse_encode`` rescales ``alpha`` by ``n_features``
for ``LassoLars``/``Lasso``, which puts both on exactly this objective).

Why a working set: codes are sparse, so a full coordinate-descent sweep over
all ``n_components`` atoms wastes almost all its work. Each outer iteration
computes the correlations ``q = D (x - D^T u)`` of every row with its residual
(two matmuls), the duality gap (stopping rule, as in scikit-learn's
``cd_fast``), and a per-row working set: the current support plus the atoms
that violate the optimality conditions most. Coordinate descent then runs on
the gathered ``(n_rows, W, W)`` Gram blocks, every row in parallel, one
coordinate at a time. Rows whose gap is small leave the batch. This is the
working-set strategy of Blitz / celer (Johnson & Guestrin 2015; Massias et al.
2018) with the gap-safe dual point of Fercoq et al. (2015).
"""

from __future__ import annotations

import torch

__all__ = ["lasso", "lasso_objective"]


def lasso_objective(X, D, code, alpha):
    """Per-row objective ``0.5 ||x - D^T u||^2 + alpha ||u||_1``."""
    resid = X - code @ D
    return 0.5 * resid.square().sum(dim=1) + alpha * code.abs().sum(dim=1)


def _default_tol(dtype):
    # Relative duality gap; float32 cannot resolve much below ~1e-6.
    return 1e-9 if dtype == torch.float64 else 1e-6


def _duality_gap(X, D, code, alpha, positive):
    """Gap, primal value and residual correlations ``D (x - D^T u)`` per row."""
    resid = X - code @ D
    corr = resid @ D.T
    wide = torch.float64
    r2 = resid.to(wide).square().sum(dim=1)
    l1 = code.to(wide).abs().sum(dim=1)
    primal = 0.5 * r2 + alpha * l1
    viol = corr.clamp(min=0) if positive else corr.abs()
    if alpha > 0:
        scale = torch.clamp(viol.amax(dim=1).to(wide) / alpha, min=1.0)
    else:
        scale = torch.full_like(r2, float("inf"))
    xr = (X.to(wide) * resid.to(wide)).sum(dim=1)
    # Dual point theta = r / scale: D(theta) = <x, theta> - 0.5 ||theta||^2.
    dual = xr / scale - 0.5 * r2 / scale.square()
    return primal - dual, primal, corr


def _cd_working_set(Gw, cw, uw, diag_inv, alpha, positive, n_sweeps, tol):
    """Coordinate descent on gathered blocks; every row is a separate problem.

    ``Gw`` (m, W, W), ``cw`` (m, W) = D_w x, ``uw`` (m, W) start point.
    Returns the codes and the number of sweeps run.
    """
    q = cw - torch.bmm(Gw, uw.unsqueeze(-1)).squeeze(-1)
    thr = alpha * diag_inv
    lo = torch.zeros_like(thr) if positive else -thr
    W = uw.shape[1]
    sweeps = 0
    for sweeps in range(1, n_sweeps + 1):
        before = uw.clone()
        for j in range(W):
            uj = uw[:, j]
            z = torch.addcmul(uj, q[:, j], diag_inv[:, j])
            if positive:
                new = (z - thr[:, j]).clamp(min=0)
            else:
                new = z - z.clamp(lo[:, j], thr[:, j])
            delta = new - uj
            uw[:, j] = new
            q.addcmul_(delta.unsqueeze(1), Gw[:, :, j], value=-1.0)
        change = (uw - before).abs().amax()
        scale = uw.abs().amax()
        if float(change) <= tol * float(scale.clamp(min=1e-30)):
            break
    return uw, sweeps


def _polish(Gw, cw, uw, alpha):
    """Move each row towards the exact optimum on its current support and signs.

    On the orthant of the current signs s and support S the objective is a
    quadratic minimised by G_SS u_S = c_S - alpha s_S (the stationarity
    condition the homotopy/LARS path tracks). Each row moves along the segment
    to that point as far as its signs allow and drops the coordinate that hits
    zero first (an active-set step): the objective never increases, and once
    coordinate descent has found the right support the step lands exactly on
    the optimum, which coordinate descent only approaches linearly.
    """
    W = uw.shape[1]
    sign = torch.sign(uw)
    on = sign != 0
    eye = torch.eye(W, dtype=uw.dtype, device=uw.device)
    M = torch.where(on.unsqueeze(-1) & on.unsqueeze(1), Gw, eye)
    rhs = torch.where(on, cw - alpha * sign, torch.zeros_like(cw))
    # Cholesky: the block is a Gram (SPD unless atoms are dependent, which
    # the factorisation reports and the row then keeps its iterate).
    chol, info = torch.linalg.cholesky_ex(M)
    sol = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    sol = torch.where(on, sol, torch.zeros_like(sol))
    ok = (info == 0) & torch.isfinite(sol).all(dim=1)
    cross = on & (sol * sign <= 0)
    t_hit = torch.where(cross, uw / (uw - sol).where(cross, torch.ones_like(uw)),
                        torch.full_like(uw, float("inf")))
    t = t_hit.amin(dim=1).clamp(max=1.0)
    moved = uw + t[:, None] * (sol - uw)
    moved = torch.where(cross & (t_hit <= t[:, None]), torch.zeros_like(moved), moved)
    return torch.where(ok[:, None], moved, uw)


def lasso(X, D, *, gram=None, cov=None, alpha=1.0, positive=False, max_iter=1000,
          init=None, tol=None, **_):
    """Lasso codes of the rows of ``X`` on the dictionary ``D``.

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
        Maximum number of coordinate-descent sweeps (over the working sets).
    init : Tensor of shape (n_samples, n_components), default=None
        Warm start.
    tol : float, default=None
        Stop a row when its duality gap is at most ``tol`` times its
        objective; None picks 1e-9 (float64) or 1e-6 (float32).

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        False when ``max_iter`` sweeps did not bring every row's gap below
        the tolerance.
    """
    n, K = X.shape[0], D.shape[0]
    tol = _default_tol(X.dtype) if tol is None else tol
    G = D @ D.T if gram is None else gram
    C = X @ D.T if cov is None else cov
    code = torch.zeros(n, K, dtype=X.dtype, device=X.device) if init is None else init.clone()
    if positive:
        code.clamp_(min=0)
    diag = G.diagonal()
    diag_inv = torch.where(diag > 0, 1.0 / diag.clamp(min=1e-30), torch.zeros_like(diag))
    eps = torch.finfo(X.dtype).eps
    x2 = X.to(torch.float64).square().sum(dim=1)
    rows = torch.arange(n, device=X.device)
    sweeps_left = int(max_iter)
    converged = True
    ref_gap = torch.full((n,), float("inf"), dtype=torch.float64, device=X.device)
    outer = 0
    while True:
        gap, primal, corr = _duality_gap(X[rows], D, code[rows], alpha, positive)
        # The floor keeps float32 from chasing rounding noise.
        done = gap <= torch.maximum(tol * primal, 10 * eps * x2[rows])
        # Nearly dependent atoms make coordinate descent crawl; a row whose gap
        # has not halved in 20 outer iterations is given up (reported as not
        # converged) rather than holding the whole batch back.
        stalled = torch.zeros_like(done)
        if outer % 20 == 0:
            stalled = ~done & (gap > 0.5 * ref_gap[rows])
            ref_gap[rows] = gap
        outer += 1
        if bool(stalled.any()):
            converged = False
        keep = ~done & ~stalled
        rows = rows[keep]
        if rows.numel() == 0:
            break
        if sweeps_left <= 0:
            converged = False
            break
        corr = corr[keep]
        sub = code[rows]
        viol = (corr.clamp(min=0) if positive else corr.abs()) - alpha
        support = sub != 0
        score = torch.where(support, torch.full_like(viol, float("inf")), viol)
        n_support = int(support.sum(dim=1).max())
        # Doubling the support (celer's rule) keeps the blocks small while
        # letting the set grow geometrically from a cold start.
        W = min(K, max(2 * n_support, 16))
        ws = score.topk(W, dim=1).indices
        Gw = G[ws.unsqueeze(-1), ws.unsqueeze(1)]
        uw, used = _cd_working_set(
            Gw, C[rows].gather(1, ws), sub.gather(1, ws), diag_inv[ws], alpha,
            positive, min(sweeps_left, 100), tol=1e-4,
        )
        sweeps_left -= used
        uw = _polish(Gw, C[rows].gather(1, ws), uw, alpha)
        sub.zero_()
        sub.scatter_(1, ws, uw)
        code[rows] = sub
    return code, converged
