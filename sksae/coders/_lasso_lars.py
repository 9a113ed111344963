"""Exact lasso codes batched over rows: the LARS-lasso homotopy on the Gram matrix.

Solves, for every row ``x`` of ``X`` at once,

    min_u 0.5 ||x - D^T u||^2 + alpha ||u||_1      (optionally u >= 0),

by following the solution path from ``lambda = max_j |c_j|`` (``c = D x``)
down to ``lambda = alpha``, as scikit-learn's ``lars_path(method="lasso")``
does (Efron, Hastie, Johnstone & Tibshirani 2004; Osborne, Presnell & Turlach
2000), but for a whole batch of rows together. Each row follows its own path
with its own active set; one iteration moves every row to its next event:

* the direction on the active set ``A`` is ``w = G_AA^{-1} s_A`` (``s`` the
  signs), from a per-row inverse Cholesky factor ``L^{-1}`` of ``G_AA`` that
  gains one row when an atom enters (``O(|A|^2)`` per row, batched matmuls,
  no LAPACK call in the loop) and is refactorised only for rows that drop one;
* the correlations of the inactive atoms change at rates ``a = G[:, A] w``
  (one batched product, ``(w D_A) D^T`` when the active sets are large);
* the step is the smallest of: an inactive atom's correlation catching up
  with ``lambda`` (it enters), an active coefficient crossing zero (it
  leaves: the lasso modification of LARS), ``lambda`` reaching ``alpha``
  (the row is done). Finished rows leave the batch.

At the end each row's code is re-solved exactly on its final support and
signs, ``u_A = G_AA^{-1} (c_A - alpha s_A)``, which removes the rounding drift
accumulated along the path. The result is the exact lasso solution (up to
rounding), whatever the conditioning of the dictionary, in at most about
``max support`` iterations of batched work.
"""

from __future__ import annotations

import torch

__all__ = ["lasso_lars"]

# Atoms whose squared norm is below this never enter (zero atoms of a padded
# dictionary): they carry no signal and would make the active Gram singular.
_NULL_ATOM = 1e-12
# Slots per chunk of the per-row projected Gram rows V.
_CHUNK = 16


def _eye_batch(n, m, dtype, device):
    return torch.eye(m, dtype=dtype, device=device).expand(n, m, m).clone()


class _Path:
    """State of the batched homotopy for the rows still on their path."""

    def __init__(self, C, G, D, usable, alpha, positive, dense_route):
        self.G, self.D, self.alpha, self.positive = G, D, alpha, positive
        self.dense_route = dense_route
        nw, K = C.shape
        dt, dev = C.dtype, C.device
        self.C = C
        self.r = C.clone()
        self.cap = _CHUNK
        self.idx = torch.zeros(nw, self.cap, dtype=torch.long, device=dev)
        self.sgn = torch.zeros(nw, self.cap, dtype=dt, device=dev)
        self.u = torch.zeros(nw, self.cap, dtype=dt, device=dev)
        self.t = torch.zeros(nw, self.cap, dtype=dt, device=dev)
        self.Linv = _eye_batch(nw, self.cap, dt, dev)
        # V = L^{-1} G[A, :] (zero rows past the active set) and a = V^T t = G[:, A] w,
        # the rates of change of the correlations, kept up to date by append/remove.
        # V is stored in chunks of _CHUNK slots, so growing it copies nothing.
        self.Vc = [torch.zeros(nw, _CHUNK, K, dtype=dt, device=dev)]
        self.a = torch.zeros(nw, K, dtype=dt, device=dev)
        self.n_act = torch.zeros(nw, dtype=torch.long, device=dev)
        # 0 for the candidates to enter, +inf otherwise (added to the step lengths:
        # cheaper than a masked select over the (rows, K) block on the CPU).
        self.pen = torch.where(usable, 0.0, float("inf")).to(dt).expand(nw, K).clone()
        self.blocked = torch.full((nw,), -1, dtype=torch.long, device=dev)
        self.dtype, self.device = dt, dev

    # -- bookkeeping -------------------------------------------------------------
    def _grow(self, need):
        if need <= self.cap:
            return
        new = self.cap + _CHUNK
        nw, pad = self.idx.shape[0], new - self.cap
        z = lambda t: torch.cat([t, t.new_zeros(nw, pad)], dim=1)  # noqa: E731
        self.idx, self.sgn, self.u, self.t = z(self.idx), z(self.sgn), z(self.u), z(self.t)
        Linv = _eye_batch(nw, new, self.dtype, self.device)
        Linv[:, : self.cap, : self.cap] = self.Linv
        self.Linv = Linv
        self.Vc.append(self.Vc[0].new_zeros(nw, _CHUNK, self.Vc[0].shape[2]))
        self.cap = new

    def keep(self, mask):
        for name in ("C", "r", "idx", "sgn", "u", "t", "Linv", "a", "n_act", "pen", "blocked"):
            setattr(self, name, getattr(self, name)[mask])
        self.Vc = [c[mask] for c in self.Vc]

    # -- V in chunks -------------------------------------------------------------
    def _v_col(self, rows, j, m):
        """``V[rows, :m, j]``."""
        n_c = -(-m // _CHUNK)
        jj = j[:, None, None].expand(j.shape[0], _CHUNK, 1)
        return torch.cat([c.gather(2, jj) for c in self.Vc[:n_c]], dim=1)[:, :m, 0]

    def _v_left(self, base, l, m):
        """``base - l^T V[:, :m]`` (one batched product per chunk)."""
        out = base.unsqueeze(1)
        for ci in range(-(-m // _CHUNK)):
            lo, hi = ci * _CHUNK, min(m, (ci + 1) * _CHUNK)
            out = torch.baddbmm(out, l[:, None, lo:hi], self.Vc[ci][:, : hi - lo], alpha=-1.0)
        return out.squeeze(1)

    def _v_set_rows(self, d, V):
        """``V[d] = V`` for rows ``d`` (V of shape (len(d), cap, K))."""
        for ci, c in enumerate(self.Vc):
            c[d] = V[:, ci * _CHUNK:(ci + 1) * _CHUNK]

    def append(self, ent, j, m):
        """Add atom ``j[i]`` to the active set of every row ``i`` with ``ent[i]``.

        Works on all rows at once (rows not entering write the identity
        padding they already hold), so no per-row gather of the factors.
        ``m`` is the current largest active set.
        """
        self._grow(m + 1)
        G, dev = self.G, self.device
        nw = ent.shape[0]
        rows = torch.arange(nw, device=dev)
        slot = self.n_act
        gjj = G[j, j]
        if m > 0:
            # l = L^{-1} G[A, j] is column j of V (zero past the active set).
            l = torch.where(ent[:, None], self._v_col(rows, j, m), 0.0)
            Lm = self.Linv[:, :m, :m]
            lkk2 = gjj - l.square().sum(dim=1)
        else:
            lkk2 = gjj
        # A (numerically) dependent atom is dropped for good, as lars_path does.
        ok = ent & (lkk2 > 1e-9 * gjj)
        self.pen[rows, j] = torch.where(ent, float("inf"), self.pen[rows, j])
        inv_lkk = torch.where(ok, lkk2.clamp(min=1e-300).rsqrt(), 1.0)
        row = torch.zeros(nw, self.cap, dtype=self.dtype, device=dev)
        sj = self.r[rows, j]
        sj = torch.where(ok, torch.ones_like(sj) if self.positive else torch.sign(sj), 0.0)
        if m > 0:
            head = torch.bmm(l.unsqueeze(1), Lm).squeeze(1)
            head = torch.where(ok[:, None], head * -inv_lkk[:, None], 0.0)
            row[:, :m] = head
            t_new = (head * self.sgn[:, :m]).sum(dim=1) + inv_lkk * sj
        else:
            t_new = inv_lkk * sj
        row[rows, slot] = inv_lkk
        self.Linv[rows, slot] = row
        # New row of V: (G[j] - l^T V) / l_kk; a gains it times the new entry of t.
        vrow = G.index_select(0, j)
        if m > 0:
            vrow = self._v_left(vrow, l, m)
        vrow = vrow * torch.where(ok, inv_lkk, 0.0)[:, None]
        ci = slot // _CHUNK
        for c in range(int(ci.min()), int(ci.max()) + 1):
            sel = (ci == c).nonzero().flatten()
            self.Vc[c][sel, slot[sel] - c * _CHUNK] = vrow[sel]
        self.a.addcmul_(vrow, torch.where(ok, t_new, 0.0)[:, None])
        self.idx[rows, slot] = torch.where(ok, j, 0)
        self.sgn[rows, slot] = sj
        self.t[rows, slot] = t_new
        self.n_act += ok.long()

    def remove(self, d, i, m):
        """Drop slot ``i[k]`` of row ``d[k]`` and refactorise those rows."""
        if d.numel() == 0:
            return
        dev = self.device
        self.pen[d, self.idx[d, i]] = 0.0
        self.blocked[d] = self.idx[d, i]
        pos = torch.arange(self.cap, device=dev)[None, :]
        src = (pos + (pos >= i[:, None]).long()).clamp(max=self.cap - 1)
        n_new = self.n_act[d] - 1
        valid = pos < n_new[:, None]
        self.idx[d] = torch.where(valid, self.idx[d].gather(1, src), 0)
        self.sgn[d] = torch.where(valid, self.sgn[d].gather(1, src), 0.0)
        self.u[d] = torch.where(valid, self.u[d].gather(1, src), 0.0)
        self.n_act[d] = n_new
        Linv = self._factor(self.idx[d], n_new)
        self.Linv[d] = Linv
        t = torch.bmm(Linv, self.sgn[d].unsqueeze(-1)).squeeze(-1)
        self.t[d] = t
        V = torch.bmm(Linv, self.G[self.idx[d]])
        V = torch.where(valid[:, :, None], V, 0.0)
        self._v_set_rows(d, V)
        self.a[d] = torch.bmm(t.unsqueeze(1), V).squeeze(1)

    def _factor(self, idx, n_act):
        """Inverse Cholesky factors of the active Gram blocks (identity-padded)."""
        cap = idx.shape[1]
        valid = torch.arange(cap, device=self.device)[None, :] < n_act[:, None]
        both = valid.unsqueeze(-1) & valid.unsqueeze(1)
        eye = torch.eye(cap, dtype=self.dtype, device=self.device)
        A = torch.where(both, self.G[idx.unsqueeze(-1), idx.unsqueeze(1)], eye)
        L, _ = torch.linalg.cholesky_ex(A)
        return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)

    # -- the path ----------------------------------------------------------------
    def direction(self, m):
        # w = L^{-T} t with t = L^{-1} s kept up to date by append/remove.
        w = torch.bmm(self.t[:, None, :m], self.Linv[:, :m, :m]).squeeze(1)
        return w, self.a

    def solve_exact(self, lam):
        """``G_AA^{-1} (c_A - lam s_A)`` per row, slots layout."""
        c = torch.where(self.sgn != 0, self.C.gather(1, self.idx) - lam[:, None] * self.sgn, 0.0)
        t = torch.bmm(self.Linv, c.unsqueeze(-1))
        return torch.bmm(self.Linv.transpose(1, 2), t).squeeze(-1)


def lasso_lars(X, D, *, gram=None, cov=None, alpha=1.0, positive=False, max_iter=1000,
               max_active=None, **_):
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
    max_active : int, default=None
        Rows whose active set grows beyond this leave the path early (their
        code is the exact solution for the ``lambda`` reached, a warm start);
        see ``handoff`` below. None: no limit.

    Returns
    -------
    code : Tensor of shape (n_samples, n_components)
    converged : bool
        False when some row had not reached ``alpha`` after ``max_iter`` steps
        (its code is then the path point reached).
    handoff : Tensor of row indices (only with ``max_active``)
        Rows that left the path at ``max_active`` atoms, not at ``alpha``.
    """
    n, K = X.shape[0], D.shape[0]
    F = D.shape[1]
    dev = X.device
    # The path is computed in float64: its events compare small differences of
    # correlations, which float32 resolves poorly on ill-conditioned atoms.
    wd = torch.float64
    Dw = D.to(wd)
    G = Dw @ Dw.T if gram is None else gram.to(wd)
    C = X.to(wd) @ Dw.T if cov is None else cov.to(wd)
    out = torch.zeros(n, K, dtype=X.dtype, device=dev)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    if n == 0 or K == 0:
        return (out, True, none) if max_active else (out, True)
    alpha = float(alpha)
    usable = G.diagonal() > _NULL_ATOM
    score = C.clamp(min=0) if positive else C.abs()
    score = torch.where(usable, score, -1.0)
    lam, j0 = score.max(dim=1)
    live = lam > alpha
    pos = live.nonzero().flatten()
    if pos.numel() == 0:
        return (out, True, none) if max_active else (out, True)

    # Gathering G[:, A] costs |A| K per row; the dense route (w D_A) D^T costs
    # about 2 F K at matmul speed: switch once the active sets are large.
    def dense_route(m):
        return m * 16 > min(F, K)

    P = _Path(C[pos], G, Dw, usable, alpha, positive, dense_route)
    lam, j0 = lam[pos], j0[pos]
    P.append(torch.ones(pos.numel(), dtype=torch.bool, device=dev), j0, 0)
    done = torch.zeros(pos.numel(), dtype=torch.bool, device=dev)
    inf = float("inf")
    converged = True
    finished_pos, finished_code, handed = [], [], []

    def flush(mask, exact):
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return
        u = P.u[rows]
        if exact:
            sol = P.solve_exact(lam)[rows]
            # Keep the path point where re-solving would flip a sign (degenerate rows).
            good = ((sol * P.sgn[rows] > 0) | (P.sgn[rows] == 0)).all(dim=1)
            u = torch.where(good[:, None], sol, u)
        code = torch.zeros(rows.numel(), K, dtype=wd, device=dev)
        code.scatter_add_(1, P.idx[rows], u)
        finished_pos.append(pos[rows])
        finished_code.append(code)

    it = 0
    while True:
        m = int(P.n_act.max())
        if it >= max_iter:
            flush(~done, exact=False)
            converged = False
            break
        it += 1
        w, a = P.direction(m)
        r = P.r
        lam_ = lam[:, None]
        # Step at which each candidate's correlation reaches lambda: (lam -+ r) / (1 -+ a)
        # where 1 -+ a > 1e-12, else +inf. Written without boolean masks (masked
        # selects over the (rows, K) block are ~10x slower than arithmetic on the CPU):
        # a denominator at or below 1e-12 is set to 0 and the numerator is at least
        # 1e-300 (a zero step stays zero to 1e-300), so the quotient is +inf there.
        d_in = (lam_ - r).clamp_(min=1e-300).div_(
            torch.nn.functional.threshold(1.0 - a, 1e-12, 0.0))
        if not positive:
            d2 = (lam_ + r).clamp_(min=1e-300).div_(
                torch.nn.functional.threshold(1.0 + a, 1e-12, 0.0))
            d_in = torch.minimum(d_in, d2)
        d_in = d_in.add_(P.pen)
        blk = P.blocked >= 0
        if bool(blk.any()):
            br = blk.nonzero().flatten()
            d_in[br, P.blocked[br]] = inf
            P.blocked.fill_(-1)
        din, j_in = d_in.min(dim=1)
        u = P.u[:, :m]
        crossing = u * w < 0
        d_out = torch.where(crossing, -u / torch.where(crossing, w, 1.0), inf)
        dout, i_out = d_out.min(dim=1)
        d_fin = lam - alpha
        fin = (d_fin <= torch.minimum(din, dout)) | done
        drop = ~fin & (dout < din)
        enter = ~fin & ~drop & torch.isfinite(din)
        # A row with no event left (all atoms in, none crossing) also finishes.
        fin = fin | (~drop & ~enter)
        step = torch.where(done, 0.0, torch.minimum(torch.minimum(din, dout), d_fin))
        step = torch.where(fin, torch.where(done, 0.0, d_fin), step)
        P.u[:, :m] += step[:, None] * w
        lam = lam - step
        P.r = torch.addcmul(r, step[:, None], a, value=-1.0)
        if max_active:
            big = (P.n_act >= max_active) & ~fin & (enter & ~drop)
            if bool(big.any()):
                # Leave the path before the expensive part: exact at lambda, a warm start.
                handed.append(pos[big])
                fin = fin | big
        new_done = fin & ~done
        done = fin
        # Events.
        d = drop.nonzero().flatten()
        if d.numel():
            P.u[d, i_out[d]] = 0.0
        P.append(enter, j_in, m)
        P.remove(d, i_out[d], max(m, 1))
        n_done = int(done.sum())
        if n_done == done.numel():
            flush(done, exact=True)
            break
        if n_done * 2 >= done.numel() and bool(new_done.any()):
            flush(done, exact=True)
            keep = ~done
            P.keep(keep)
            pos, lam, done = pos[keep], lam[keep], done[keep]
    if finished_pos:
        allpos = torch.cat(finished_pos)
        out[allpos] = torch.cat(finished_code).to(X.dtype)
    if max_active:
        return out, converged, torch.cat(handed) if handed else none
    return out, converged
