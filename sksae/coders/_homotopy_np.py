"""The batched LARS-lasso homotopy of :mod:`._homotopy`, step for step, in numpy.

Same state, same arithmetic, same events: for CPU tensors only. A path step
is ~60 small operations on arrays of a few hundred rows; a torch call costs
3-7 us of dispatch on CPU and a numpy call about 1 us, which takes a third
off the time of a fit minibatch (256 rows, ~20 steps) where those operations
dominate. The passes over the (rows, n_components) block and the weighted
sums of Gram rows stay torch ops, on zero-copy views.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["homotopy_np"]



class _State:
    """Path state of the rows still running; active slots are ``0..n_act-1``.

    The slot arrays are as wide as the widest active set so far plus one
    (``cap``), so the per-row algebra works on contiguous arrays.
    """

    def __init__(self, C, G, Gs, lam, positive, usable):
        n, K = C.shape
        self.G, self.Gs, self.positive = G, Gs, positive
        self.Gdiag = np.ascontiguousarray(G.diagonal())
        self.lam = lam
        self.r = C.copy()
        self.sdt = C.dtype
        self.tiny = np.finfo(C.dtype).tiny
        self.cap = 1
        self.idx = np.zeros((n, self.cap), dtype=np.int64)
        self.sg = np.zeros((n, self.cap))
        self.u = np.zeros((n, self.cap))
        self.H = np.zeros((n, self.cap, self.cap))
        self.pen = np.broadcast_to(np.where(usable, 0.0, np.inf).astype(C.dtype), (n, K)).copy()
        self.n_act = np.zeros(n, dtype=np.int64)
        self.blocked = np.full(n, -1, dtype=np.int64)
        self.any_blocked = False
        self.scratch = [np.empty((n, K), dtype=C.dtype) for _ in range(3)]
        self.one = torch.ones(1, 1, dtype=Gs.dtype)
        self._views()

    def _grow(self, cap):
        n, old = self.idx.shape[0], self.cap
        for name in ("idx", "sg", "u"):
            x = getattr(self, name)
            new = np.zeros((n, cap), dtype=x.dtype)
            new[:, :old] = x
            setattr(self, name, new)
        H = np.zeros((n, cap, cap))
        H[:, :old, :old] = self.H
        self.H, self.cap = H, cap

    def keep(self, mask):
        for name in ("r", "lam", "idx", "sg", "u", "H", "pen", "n_act", "blocked"):
            setattr(self, name, getattr(self, name)[mask])
        self._views()

    def _views(self):
        """Torch views of the (rows, K) arrays the scan works on (no copies)."""
        nr = self.r.shape[0]
        self.rt, self.pt = torch.from_numpy(self.r), torch.from_numpy(self.pen)
        self.bt = [torch.from_numpy(b[:nr]) for b in self.scratch]
        self.offsets = torch.arange(nr, dtype=torch.long)
        self.ar = np.arange(nr)

    def rates(self, w):
        """``a = G[:, A] w`` for every row, (rows, K)."""
        # torch.embedding_bag itself (mode 0 = sum) skips the checks of the
        # functional wrapper, ~10 us a call here.
        return torch.embedding_bag(self.Gs, torch.from_numpy(self.idx.reshape(-1)),
                                   self.offsets * self.cap, False, 0, False,
                                   torch.from_numpy(w.astype(self.sdt).reshape(-1)))[0]

    def append(self, e, j):
        """Atom ``j[k]`` enters the active set of row ``e[k]``."""
        slot = self.n_act[e]
        need = int(slot.max()) + 1
        if need > self.cap:
            self._grow(need + 1)  # one spare slot: half as many reallocations
        # Every row entering (common early on): work on H in place, no gather.
        full = e.size == self.idx.shape[0]
        gjj = self.Gdiag[j]
        # g = G[A, j]; entries past the active set meet zero rows of H.
        g = self.G[self.idx if full else self.idx[e], j[:, None]]
        He = self.H if full else self.H[e]
        y = np.matmul(g[:, None, :], He)[:, 0]
        lkk2 = gjj - np.einsum("ij,ij->i", g, y)
        self.pen[e, j] = np.inf
        # A (numerically) dependent atom is dropped for good, as lars_path does.
        ok = lkk2 > 1e-9 * gjj
        if not ok.all():
            e, j, slot, y, lkk2 = e[ok], j[ok], slot[ok], y[ok], lkk2[ok]
            He, full = He[ok], False
            if e.size == 0:
                return
        inv = 1.0 / lkk2
        yi = y * inv[:, None]
        # H += y y^T / l, then the new row and column -y / l with corner 1 / l
        # (y is 0 at the new slot: H's row and column there were 0).
        He += yi[:, :, None] * y[:, None, :]
        ar = self.ar if full else np.arange(e.size)
        yi = np.negative(yi, out=yi)
        yi[ar, slot] = inv
        He[ar, slot, :] = yi
        He[ar, :, slot] = yi
        if not full:
            self.H[e] = He
        self.sg[e, slot] = 1.0 if self.positive else np.sign(self.r[e, j])
        self.idx[e, slot] = j
        # u is already 0 at the new slot (fresh or cleared by remove).
        self.n_act[e] = slot + 1

    def remove(self, d, q):
        """Drop slot ``q[k]`` of row ``d[k]``: downdate ``H``, move the last slot into q."""
        ar = np.arange(d.size)
        Hd = self.H[d]
        hq = Hd[ar, q].copy()  # row q (= column q)
        Hd -= hq[:, :, None] * (hq / hq[ar, q][:, None])[:, None, :]
        # Row and column q are now zero: move the last active slot into q.
        last = self.n_act[d] - 1
        Hd[ar, q, :] = Hd[ar, last, :]
        Hd[ar, :, q] = Hd[ar, :, last]
        Hd[ar, last, :] = 0.0
        Hd[ar, :, last] = 0.0
        self.H[d] = Hd
        atom = self.idx[d, q]
        for x in (self.idx, self.sg, self.u):
            x[d, q] = x[d, last]
        self.sg[d, last] = 0.0
        self.u[d, last] = 0.0
        self.pen[d, atom] = 0.0
        self.blocked[d] = atom
        self.any_blocked = True
        self.n_act[d] = last


def _exact(G, C, pos, idx, sg, u, H, lam):
    """``G_AA^{-1} (c_A - lam s_A)`` per row, by ``H`` (and one refinement step).

    ``C[pos]`` holds the rows' correlations with all atoms. For float64 data a
    refinement step with the Gram block removes the drift of ``H`` (updates and
    downdates along the path). Rows where the exact point flips a sign
    (degenerate) keep their path point ``u``.
    """
    on = sg != 0
    b = np.where(on, C[pos[:, None], idx] - lam[:, None] * sg, 0.0)
    x = np.matmul(H, b[:, :, None])[:, :, 0]
    if C.dtype == np.float64:
        # The drift of H is ~1e-10 relative on ill-conditioned atoms: below
        # float32's resolution, not below float64's.
        GAA = G[idx[:, :, None], idx[:, None, :]] * (on[:, :, None] & on[:, None, :])
        x += np.matmul(H, (b - np.matmul(GAA, x[:, :, None])[:, :, 0])[:, :, None])[:, :, 0]
    good = ((x * sg > 0) | ~on).all(axis=1) & np.isfinite(x).all(axis=1)
    return np.where(good[:, None], x, u)


def _solve_flushed(G, C, chunks):
    """Exact codes of all flushed chunks at once (padded to the widest)."""
    cap = max(c[1].shape[1] for c in chunks)

    def cat(i, pad):
        parts = [c[i] for c in chunks]
        if len(parts) == 1:
            return parts[0]
        if not pad:
            return np.concatenate(parts)
        # Zero padding: free slots (sign 0, zero rows and columns of H).
        out = np.zeros((sum(len(x) for x in parts),) + (cap,) * pad, dtype=parts[0].dtype)
        start = 0
        for x in parts:
            m, w = x.shape[:2]
            out[(slice(start, start + m),) + (slice(0, w),) * pad] = x
            start += m
        return out

    pos, idx, sg, u, H, lam = cat(0, 0), cat(1, 1), cat(2, 1), cat(3, 1), cat(4, 2), cat(5, 0)
    t = torch.from_numpy
    return [(t(pos), t(idx), t(_exact(G, C, pos, idx, sg, u, H, lam)))]


def homotopy_np(C, G, Gs, alpha, positive, max_iter, usable):
    """:func:`sksae.coders._homotopy.homotopy` for CPU tensors.

    Same arguments; the results are chunks ``(pos, idx, coef)`` of finished rows
    with their exact codes per slot (the re-solve on the final support is done
    here, from the maintained inverse Gram blocks).
    """
    # Divisions by zero give the +inf steps the path relies on.
    with np.errstate(divide="ignore", invalid="ignore"):
        return _path(C, G, Gs, alpha, positive, max_iter, usable)


def _path(C, G, Gs, alpha, positive, max_iter, usable):
    C, G, Gs = C.detach(), G.detach(), Gs.detach()
    Cn, Gn, us = C.numpy(), G.numpy(), usable.numpy()
    n = Cn.shape[0]
    score = np.maximum(Cn, 0) if positive else np.abs(Cn)
    score = np.where(us, score, -1)
    j0 = score.argmax(axis=1)
    lam0 = score[np.arange(n), j0].astype(np.float64)
    live = lam0 > alpha
    empty = torch.from_numpy(np.flatnonzero(~live))
    results = []
    if not live.any():
        return results, empty, True
    pos = np.flatnonzero(live)
    P = _State(Cn[pos], Gn, Gs, lam0[pos], positive, us)
    P.append(np.arange(pos.size), j0[pos])
    done = np.zeros(pos.size, dtype=bool)
    t = torch.from_numpy
    flushed = []

    def flush(mask):
        # Finished rows leave with their state; their exact codes are solved at
        # the end, all together.
        rows = np.flatnonzero(mask)
        if rows.size:
            flushed.append((pos[rows], P.idx[rows], P.sg[rows], P.u[rows], P.H[rows],
                            P.lam[rows]))

    for _ in range(max_iter):
        nr, ar, u = done.size, P.ar, P.u
        w = np.matmul(P.sg[:, None, :], P.H)[:, 0]
        at = P.rates(w)
        # The entering step of each candidate, as in _homotopy (see there): the
        # passes over (rows, K) run as torch ops on zero-copy views (numpy's sign
        # and maximum are up to 40x slower on float32 here).
        rt, pt = P.rt, P.pt
        b1, b2, b3 = P.bt
        lam_ = t(P.lam[:, None].astype(P.sdt))
        if positive:
            d_in = torch.sub(lam_, rt, out=b1).clamp_(min=P.tiny)
            d_in.div_(torch.sub(P.one, at, out=b2).clamp_(min=0.0))
        else:
            sgn = torch.addcmul(rt, at, lam_, value=-1.0, out=b1).sign_()
            d_in = torch.addcmul(lam_, sgn, rt, value=-1.0, out=b2).clamp_(min=P.tiny)
            d_in.div_(torch.addcmul(P.one, sgn, at, value=-1.0, out=b3).clamp_(min=0.0))
        d_in = d_in.add_(pt).numpy()
        if P.any_blocked:
            # An atom that just left may not re-enter at the very next event.
            br = np.flatnonzero(P.blocked >= 0)
            d_in[br, P.blocked[br]] = np.inf
            P.blocked[:] = -1
            P.any_blocked = False
        j_in = d_in.argmin(axis=1)
        din = d_in[ar, j_in]
        # Leaving: an active coefficient crossing zero, at -u / w > 0.
        ratio = -u / w
        ratio = np.where(ratio > 0, ratio, np.inf)
        i_out = ratio.argmin(axis=1)
        ev = np.stack([np.where(done, 0.0, P.lam - alpha), din, ratio[ar, i_out]], axis=1)
        kind = ev.argmin(axis=1)
        step = ev[ar, kind]
        u += step[:, None] * w
        P.lam = P.lam - step
        rt.addcmul_(t(step.astype(P.sdt))[:, None], at, value=-1.0)
        fin = kind == 0
        new_done = fin & ~done
        done = fin
        d = np.flatnonzero(kind == 2)
        if d.size:
            q = i_out[d]
            P.u[d, q] = 0.0
            P.remove(d, q)
        e = np.flatnonzero(kind == 1)
        if e.size:
            P.append(e, j_in[e])
        n_done = int(done.sum())
        if n_done == nr:
            flush(done)
            return _solve_flushed(Gn, Cn, flushed), empty, True
        # Compaction costs a copy of the state; below 16 rows carrying finished
        # rows along is cheaper (fit timings: 16 < 64 < 128 < never).
        if n_done * 2 >= nr and nr >= 16 and new_done.any():
            flush(done)
            keep = ~done
            P.keep(keep)
            pos, done = pos[keep], done[keep]
    flush(~done)
    flush(done)
    return _solve_flushed(Gn, Cn, flushed), empty, False
