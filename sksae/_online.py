"""Kernels of the online dictionary learning algorithm (Mairal et al. 2009/2010).

Torch versions of the pieces of scikit-learn's ``MiniBatchDictionaryLearning``:
the randomized-SVD initialisation, the forgetting-factor update of the
sufficient statistics ``A`` and ``B`` and the block-coordinate dictionary
update with dead-atom resampling. J. Mairal, F. Bach, J. Ponce, G. Sapiro,
"Online dictionary learning for sparse coding" (ICML 2009) and "Online learning
for matrix factorization and sparse coding" (JMLR 2010), Algorithms 1 and 2.
"""

from __future__ import annotations

import torch

from ._accel.placement import array_views, run_faster, unit_ball

__all__ = ["init_dictionary", "update_stats", "update_dictionary"]

# Atoms whose A[k, k] is below this are treated as unused (the SPAMS threshold
# scikit-learn uses).
_DEAD = 1e-6


def _randomized_range(X, size, n_iter, generator):
    """Orthonormal basis of the range of ``X`` (Halko et al. 2011, Alg. 4.4)."""
    omega = torch.randn(X.shape[1], size, generator=generator, dtype=X.dtype).to(X.device)
    Q = X @ omega
    for _ in range(n_iter):
        Q, _ = torch.linalg.qr(Q)
        Q, _ = torch.linalg.qr(X.T @ Q)
        Q = X @ Q
    Q, _ = torch.linalg.qr(Q)
    return Q


def init_dictionary(X, n_components, generator, dict_init=None):
    """Initial dictionary: ``dict_init`` or the top ``S V^T`` of the SVD of ``X``.

    The SVD is randomized (Halko et al. 2011, as scikit-learn) unless its sketch
    would cover every feature, where the exact one is computed instead.

    As scikit-learn: rows beyond the rank (``min(n_samples, n_features)``) are
    zeros; ``dict_init`` is truncated or zero-padded to ``n_components`` rows.
    """
    n_samples, n_features = X.shape
    if dict_init is not None:
        D = dict_init.to(X.dtype)
    else:
        k = min(n_components, n_samples, n_features)
        size = min(k + 10, n_samples, n_features)
        # scikit-learn's n_iter="auto": more power iterations for few components.
        n_iter = 7 if n_components < 0.1 * min(X.shape) else 4
        if size >= n_features and n_samples >= n_features:
            # The sketch would span every feature: the exact SVD is cheaper, from
            # the (n_features, n_features) Gram matrix (one GEMM and a small eigh
            # instead of ~10 QR factorisations of an (n_samples, size) block).
            evals, V = torch.linalg.eigh((X.T @ X).to(torch.float64))
            S = evals.flip(0).clamp(min=0).sqrt().to(X.dtype)
            Vt = V.flip(1).T.to(X.dtype)[:k]
        else:
            Q = _randomized_range(X, size, n_iter, generator)
            _, S, Vt = torch.linalg.svd(Q.T @ X, full_matrices=False)
            Vt = Vt[:k]
        # Deterministic signs (the largest entry of each atom positive), as svd_flip.
        pivot = Vt.abs().argmax(dim=1)
        flip = torch.sign(Vt[torch.arange(k, device=X.device), pivot])
        D = S[:k, None] * Vt * flip[:, None]
    if D.shape[0] >= n_components:
        return D[:n_components].clone()
    pad = torch.zeros(n_components - D.shape[0], n_features, dtype=X.dtype, device=X.device)
    return torch.cat([D, pad])


def update_stats(A, B, X, code, step):
    """scikit-learn's forgetting-factor update of ``A`` (K, K) and ``B`` (F, K), in place.

    ``theta = (t + 1) bs`` for ``t < bs - 1`` else ``bs^2 + t + 1 - bs`` and
    ``beta = (theta + 1 - bs) / (theta + 1)`` (Mairal et al. 2010, Sec. 3.4.2).
    """
    bs = X.shape[0]
    beta = forgetting_factor(step, bs)
    A.mul_(beta).addmm_(code.T, code, alpha=1.0 / bs)
    B.mul_(beta).addmm_(X.T, code, alpha=1.0 / bs)


def forgetting_factor(step, bs):
    """:func:`update_stats`' ``beta`` at step ``step`` with batches of ``bs`` rows."""
    theta = (step + 1) * bs if step < bs - 1 else bs**2 + step + 1 - bs
    return (theta + 1 - bs) / (theta + 1)


def update_dictionary(D, A, B, X, random_state, positive=False, block=64):
    """One block-coordinate pass over the atoms, in place (Mairal et al. 2010, Alg. 2).

    For each atom in order: ``d_k += (B[:, k] - D^T A[:, k]) / A[k, k]``, clip at 0
    if ``positive``, project onto the unit ball; an atom with ``A[k, k] <= 1e-6``
    is replaced by a random row of ``X`` plus 1% noise (scikit-learn's rule).

    The pass is the exact sequential Gauss-Seidel sweep, organised in blocks of
    atoms so that most of the work is matrix products: the part of
    ``D^T A[:, k]`` due to atoms outside the current block is one matmul per
    block, and only the corrections from atoms already updated inside the block
    are applied one atom at a time.

    On an accelerator the sweep runs there or on host copies, whichever has
    measured faster (:mod:`sksae._accel.placement`): its ~8 small operations per
    atom are launch-bound on a GPU.

    Returns
    -------
    n_dead : int
        Number of resampled atoms.
    """
    diag = A.diagonal()
    dead = (diag <= _DEAD).nonzero().flatten().tolist()
    replacement = {}
    for k in dead:
        # Drawn up front, in atom order: the same stream of draws as scikit-learn.
        newd = X[int(random_state.choice(X.shape[0]))]
        level = 0.01 * (float(newd.std(correction=0)) or 1.0)
        noise = random_state.normal(0, level, size=X.shape[1])
        replacement[k] = newd + torch.as_tensor(noise, dtype=D.dtype, device=D.device)

    def on_host():  # the sweep on host copies; D is updated in place after
        host = D.cpu()
        _sweep(host, A.cpu(), B.cpu(), {k: v.cpu() for k, v in replacement.items()},
               positive, block)
        D.copy_(host)

    run_faster("dictionary update", D,
               lambda: _sweep(D, A, B, replacement, positive, block), on_host)
    return len(replacement)


def _sweep(D, A, B, replacement, positive, block):
    """The blocked Gauss-Seidel sweep of :func:`update_dictionary`, in place."""
    K = D.shape[0]
    diag = A.diagonal()
    inv = torch.where(diag > _DEAD, 1.0 / diag.clamp(min=_DEAD), torch.zeros_like(diag))
    for start in range(0, K, block):
        stop = min(start + block, K)
        # Residual B_k - sum_j A[k, j] d_j with every atom as it stands now,
        # scaled once per block: d_k + (t_k - A[k, :i] delta) / A[k, k].
        target = torch.addmm(B[:, start:stop].T, A[start:stop], D, alpha=-1.0)
        scale = inv[start:stop, None]
        new_atoms = {k - start: v for k, v in replacement.items() if start <= k < stop}
        Dv, work, A_blk, *new = array_views(
            D, target * scale, A[start:stop, start:stop] * scale, *new_atoms.values())
        _sweep_block(Dv, work, A_blk, dict(zip(new_atoms, new)), start, positive)


def _sweep_block(D, work, A_blk, replacement, start, positive):
    """The sequential part of one block: each atom sees the ones updated before it.

    ``D``, ``work`` (the block's scaled targets) and ``A_blk`` (its scaled Gram
    block) come from :func:`sksae._accel.placement.array_views`: numpy views on
    the CPU, the tensors on an accelerator, one code for both. Row ``i`` of
    ``work`` becomes atom ``start + i``'s new value, then its change, which the
    atoms after it subtract. ``replacement`` maps positions in the block to
    resampled atoms.
    """
    for i in range(work.shape[0]):
        k = start + i
        new = work[i]
        if i in replacement:
            new[:] = replacement[i]
        else:
            if i:
                new -= A_blk[i, :i] @ work[:i]
            new += D[k]
        new = unit_ball(new, positive)
        change = new - D[k]
        D[k] = new
        work[i] = change
