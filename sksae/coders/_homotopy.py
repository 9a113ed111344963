"""The batched LARS-lasso homotopy on an inverse active Gram matrix.

Every row of a batch follows its own lasso path (scikit-learn's
``lars_path(method="lasso")``; Efron et al. 2004, Osborne et al. 2000) from
``lambda = max_j |c_j|`` down to ``alpha``, all rows advancing together, one
event per row per iteration (an atom enters, an active coefficient crosses
zero and leaves, or ``lambda`` reaches ``alpha``).

State per row, in ``cap`` slots (active slots first, ``0..n_act-1``):

* ``H``, the inverse of the active Gram block. An atom entering is a rank-one
  update and an atom leaving a rank-one downdate of ``H`` (O(|A|^2) per row;
  no refactorisation, no LAPACK call in the loop);
* the direction ``w = H s`` (``s`` the signs) and the rates ``a = G[:, A] w``
  of the correlations: a weighted sum of Gram rows per row (one
  ``embedding_bag`` on the shared Gram matrix, no per-row copy of Gram rows).

A step costs a few passes over the (rows, n_components) correlations plus
~60 small ops, so the code avoids boolean masks over that block (masked
selects cost many times the arithmetic), finds every row's event with one
``min`` over three candidates, and does the row reductions through
:mod:`sksae._accel.ops`. Finished rows are flushed and leave the batch once
they are half of it. The caller re-solves each final support exactly
(:func:`resolve_on_support`), which removes the drift of ``H``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._accel.ops import argmin_rows

__all__ = ["homotopy", "resolve_on_support"]

_INF = float("inf")
# Slots are added in chunks of this many.
_CHUNK = 8


class _State:
    """Path state of the rows still running; active slots are ``0..n_act-1``."""

    def __init__(self, C, G, Gs, lam, alpha, positive, usable):
        n, K = C.shape
        self.G, self.alpha, self.positive = G, alpha, positive
        self.K = G.shape[0]
        self.Gdiag, self.Gflat = G.diagonal(), G.reshape(-1)
        dt, dev, scan_dtype = G.dtype, C.device, C.dtype
        self.dtype, self.device = dt, dev
        self.lam = lam
        # The scan over all atoms (correlations r, rates a, entering steps) runs in
        # scan_dtype; the active-set algebra (H, u, lambda, steps) in C's dtype.
        self.sdt = scan_dtype
        self.Gs = Gs
        self.r = C.clone()
        self.tiny = torch.finfo(scan_dtype).tiny
        self.scratch = [torch.empty(n, K, dtype=scan_dtype, device=dev) for _ in range(3)]
        self.cap = _CHUNK
        self.idx = torch.zeros(n, self.cap, dtype=torch.long, device=dev)
        self.sg = torch.zeros(n, self.cap, dtype=dt, device=dev)
        self.u = torch.zeros(n, self.cap, dtype=dt, device=dev)
        self.H = torch.zeros(n, self.cap, self.cap, dtype=dt, device=dev)
        pen = torch.where(usable, 0.0, _INF).to(scan_dtype)
        self.pen = pen.expand(n, K).clone()
        self.n_act = torch.zeros(n, dtype=torch.long, device=dev)
        self.blocked = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.any_blocked = False
        self.max_act = 0

    def _grow(self):
        pad = lambda t: F.pad(t, (0, _CHUNK))  # noqa: E731
        self.idx, self.sg, self.u = pad(self.idx), pad(self.sg), pad(self.u)
        self.H = F.pad(self.H, (0, _CHUNK, 0, _CHUNK))
        self.cap += _CHUNK

    def keep(self, mask):
        for name in ("r", "lam", "idx", "sg", "u", "H", "pen", "n_act", "blocked"):
            setattr(self, name, getattr(self, name)[mask])

    # -- linear algebra on the active set ------------------------------------------
    def rates(self, w):
        """``a = G[:, A] w`` for every row, (rows, K)."""
        # Slots past the active set have w = 0 (zero rows of H, zero signs).
        return F.embedding_bag(self.idx, self.Gs, per_sample_weights=w.to(self.sdt),
                               mode="sum")

    def append(self, e, j):
        """Atom ``j[k]`` enters the active set of row ``e[k]``."""
        if self.max_act >= self.cap:
            self._grow()
        slot = self.n_act[e]
        gjj = self.Gdiag[j]
        # g = G[A, j]; entries past the active set meet zero rows of H.
        g = self.Gflat.take(self.idx[e] * self.K + j[:, None])
        y = torch.bmm(g.unsqueeze(1), self.H[e]).squeeze(1)
        lkk2 = gjj - (g * y).sum(dim=1)
        self.pen[e, j] = _INF
        # A (numerically) dependent atom is dropped for good, as lars_path does.
        ok = lkk2 > 1e-9 * gjj
        if not bool(ok.all()):
            e, j, slot, y, lkk2 = e[ok], j[ok], slot[ok], y[ok], lkk2[ok]
            if e.numel() == 0:
                return
        inv = 1.0 / lkk2
        yi = y * inv[:, None]
        # H += y y^T / l, then the new row and column -y / l and corner 1 / l.
        self.H.index_put_((e,), yi.unsqueeze(2) * y.unsqueeze(1), accumulate=True)
        yi.neg_()
        self.H[e, slot] = yi
        self.H[e, :, slot] = yi
        self.H[e, slot, slot] = inv
        sj = self.r[e, j].to(self.dtype)
        self.sg[e, slot] = torch.ones_like(sj) if self.positive else torch.sign(sj)
        self.idx[e, slot] = j
        self.u[e, slot] = 0.0
        self.n_act[e] = slot + 1
        self.max_act = max(self.max_act, int(slot.max()) + 1)

    def remove(self, d, q):
        """Drop slot ``q[k]`` of row ``d[k]``: downdate ``H``, move the last slot into q."""
        m, cap = d.numel(), self.cap
        ar = torch.arange(m, device=self.device)
        Hd = self.H[d]
        hq = Hd[ar, q]  # row q (= column q)
        Hd.addcmul_(hq.unsqueeze(2), (hq / hq[ar, q][:, None]).unsqueeze(1), value=-1.0)
        last = self.n_act[d] - 1
        perm = torch.arange(cap, device=self.device).repeat(m, 1)
        perm[ar, q] = last
        perm[ar, last] = q
        Hd = Hd[ar[:, None, None], perm[:, :, None], perm[:, None, :]]
        Hd[ar, last] = 0.0
        Hd[ar, :, last] = 0.0
        self.H[d] = Hd
        atom = self.idx[d, q]
        self.idx[d] = self.idx[d].gather(1, perm)
        sg, u = self.sg[d], self.u[d]
        sg[ar, q] = 0.0
        u[ar, q] = 0.0
        self.sg[d], self.u[d] = sg.gather(1, perm), u.gather(1, perm)
        self.pen[d, atom] = 0.0
        self.blocked[d] = atom
        self.any_blocked = True
        self.n_act[d] = last


def _one(t):
    """A (1, 1) tensor holding 1, broadcast as the first operand of addcmul."""
    return torch.ones(1, 1, dtype=t.dtype, device=t.device)


def homotopy(C, G, Gs, alpha, positive, max_iter, usable):
    """Run the batched path; return the final active sets and signs per row.

    Parameters
    ----------
    C : Tensor (n, K)
        Correlations ``D x`` of each row with the atoms, in the scan dtype.
    G : Tensor (K, K)
        Gram matrix of the atoms in the precision of the active-set algebra.
    Gs : Tensor (K, K)
        The same in the scan dtype: the per-atom scan (correlations, rates,
        entering steps) runs in the input's precision. float32 halves the
        memory traffic of the passes over (rows, K); the events it finds are
        those of the path of the float32 data, as scikit-learn's on float32.
    usable : Tensor (K,) bool
        Atoms allowed to enter.

    Returns
    -------
    results : list of (pos, idx, sg, u, lam)
        Chunks of finished rows: their positions in ``C``, global atom, sign
        (0: empty) and path coefficient per slot, and the penalty reached.
    empty : Tensor
        Rows whose largest correlation is at most alpha (zero code).
    converged : bool
    """
    n = C.shape[0]
    dev = C.device
    score = C.clamp(min=0) if positive else C.abs()
    score = torch.where(usable, score, -1.0)
    lam0, j0 = score.max(dim=1)
    lam0 = lam0.to(G.dtype)
    live = lam0 > alpha
    empty = (~live).nonzero().flatten()
    results = []
    if empty.numel() == n:
        return results, empty, True
    pos = live.nonzero().flatten()
    P = _State(C[pos], G, Gs, lam0[pos], alpha, positive, usable)
    P.append(torch.arange(pos.numel(), device=dev), j0[pos])
    converged = True
    done = torch.zeros(pos.numel(), dtype=torch.bool, device=dev)

    def flush(mask):
        rows = mask.nonzero().flatten()
        if rows.numel():
            results.append((pos[rows], P.idx[rows], P.sg[rows], P.u[rows],
                            P.lam[rows]))

    for _ in range(max_iter):
        w = torch.bmm(P.sg.unsqueeze(1), P.H).squeeze(1)
        a = P.rates(w)
        lam_ = P.lam[:, None].to(P.sdt)
        nr = lam_.shape[0]
        b1, b2, b3 = (b[:nr] for b in P.scratch)
        if positive:
            # Step at which each candidate's correlation reaches lambda from below:
            # (lam - r) / (1 - a) over the positive denominators, else +inf (lars_path's
            # min_pos): a negative denominator is clamped to 0 and the numerator is
            # positive, so the quotient is +inf there (no boolean mask: masked
            # selects over the (rows, K) block cost many times the arithmetic).
            d_in = torch.sub(lam_, P.r, out=b1).clamp_(min=P.tiny)
            d_in.div_(torch.sub(_one(a), a, out=b2).clamp_(min=0.0))
        else:
            # The first of (lam - r) / (1 - a) and (lam + r) / (1 + a) over the positive
            # denominators is (lam - s r) / (1 - s a) with s = sign(r - a lam): one
            # formula, no mask (fewer passes over the (rows, K) block, which dominate
            # a step).
            # Clamping the numerator to the smallest normal number and the
            # denominator to 0 keeps the active atoms (|r| = lam, a = s) at +inf
            # rather than 0 / 0.
            sgn = torch.addcmul(P.r, a, lam_, value=-1.0, out=b1).sign_()
            d_in = torch.addcmul(lam_, sgn, P.r, value=-1.0, out=b2).clamp_(min=P.tiny)
            d_in.div_(torch.addcmul(_one(a), sgn, a, value=-1.0, out=b3).clamp_(min=0.0))
        d_in.add_(P.pen)
        if P.any_blocked:
            # An atom that just left may not re-enter at the very next event.
            br = (P.blocked >= 0).nonzero().flatten()
            d_in[br, P.blocked[br]] = _INF
            P.blocked.fill_(-1)
            P.any_blocked = False
        din, j_in = argmin_rows(d_in)
        # Leaving: an active coefficient crossing zero, at -u / w > 0.
        ratio = torch.div(P.u, w).neg_()
        dout, i_out = torch.where(ratio > 0, ratio, _INF).min(dim=1)
        d_fin = torch.where(done, 0.0, P.lam - alpha)
        # The event of each row: the first to happen; ties go to finishing, then to
        # an atom entering. A row with no event left (all inf) finishes.
        step, kind = torch.stack([d_fin, din.to(dev, P.dtype), dout], dim=1).min(dim=1)
        P.u.addcmul_(step[:, None], w)
        P.lam = P.lam - step
        P.r.addcmul_(step[:, None].to(P.sdt), a, value=-1.0)
        fin = kind == 0
        new_done = fin & ~done
        done = fin
        d = (kind == 2).nonzero().flatten()
        if d.numel():
            q = i_out[d]
            P.u[d, q] = 0.0
            P.remove(d, q)
        e = (kind == 1).nonzero().flatten()
        if e.numel():
            P.append(e, j_in.to(dev)[e])
        n_done = int(done.sum())
        nr = done.numel()
        if n_done == nr:
            flush(done)
            return results, empty, converged
        if n_done * 2 >= nr and bool(new_done.any()):
            flush(done)
            keep = ~done
            P.keep(keep)
            pos, done = pos[keep], done[keep]
    flush(~done)
    if int(done.sum()):
        flush(done)
    return results, empty, False


def resolve_on_support(idx, sg, u, lam, G, C_full):
    """Exact codes on each row's final support: ``G_AA^{-1} (c_A - lam s_A)``.

    Keeps the path point where the exact solve flips a sign (degenerate rows)
    or the block is singular. Returns per-slot coefficients.
    """
    on = sg != 0
    cap = idx.shape[1]
    eye = torch.eye(cap, dtype=G.dtype, device=G.device)
    both = on.unsqueeze(-1) & on.unsqueeze(1)
    GAA = torch.where(both, G[idx.unsqueeze(-1), idx.unsqueeze(1)], eye)
    rhs = torch.where(on, C_full.gather(1, idx).to(G.dtype) - lam[:, None] * sg, 0.0)
    L, info = torch.linalg.cholesky_ex(GAA)
    sol = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    good = (info == 0) & ((sol * sg > 0) | ~on).all(dim=1) & torch.isfinite(sol).all(dim=1)
    return torch.where(good[:, None], torch.where(on, sol, 0.0), u)
