"""Sparse kernels for the TopK family: only the active latents are touched.

A TopK-family training step needs one dense product, the encoder's
pre-activations ``pre_BF = (x - b_dec) W_enc^T + b_enc`` (2 B D F flops), and a
selection. Everything after it (decoding, the decoder's and the encoder's
weight gradients, the AuxK loss) involves only the ``N`` selected entries
(``N = B k`` for TopK), so it costs O(N D) instead of O(B F D).

The selected entries form a :class:`Pattern`: a CSR matrix of shape (B, F)
given by ``indices`` (the latent of each entry, rows in order) and ``crow``
(the B + 1 row offsets). A (B, k) index matrix is the CSR pattern with
``crow = k * arange(B + 1)``; patterns with a variable count per row
(BatchTopK) are given by their ``crow``. Three primitives do all the work,
with no dense (B, F) or (F, B) product, no atomics and no host
synchronisation:

- ``S @ W`` (decode, (B, D)): :func:`torch.nn.functional.embedding_bag` with
  per-entry weights over the bags given by ``crow``;
- ``S^T @ Y`` (weight gradients, (F, D)): the pattern is transposed once by
  sorting its ``N`` indices, then MKL's CSR-dense product (``embedding_bag``
  without MKL) sums the rows of ``Y`` into the latents' rows (instead of
  ``index_add_`` over an (N, D) temporary or the sort inside
  ``embedding_bag``'s own backward), into a buffer of the previous step
  (:class:`sksae._accel.workspace.StepWorkspace`);
- ``<a_b, W_f>`` for the entries (gradient of the values): the sampled dense
  product :func:`torch.sparse.sampled_addmm` on the CSR pattern.

With the ``numba`` extra, the CPU work after the decode runs as compiled
passes instead (:mod:`sksae._accel._sparse_nb`): the transpose as a counting sort,
the values as sampled dots that also add the bias, and each backward as one
pass by latent that produces every gradient of its function together (the
decoder's: the values' gradients, the weight gradient and its radial part;
the encoder's: the weight and bias gradients), noting the gradients' norms
for clipping on the way.

:func:`use_sparse` is the documented rule that picks these kernels or plain
dense autograd; the tests check that both give the same outputs and
gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import fused
from .compiled import kernel
from .device import is_accelerator
from .threads import even_bounds, parallel, range_count, run_ranges
from .threads import serial as _serial

__all__ = ["Pattern", "as_pattern", "row_offsets", "use_sparse", "sparse_decode", "gather_pre", "quiet_csr",
           "unit_rows_", "SPARSE_MIN_COMPONENTS", "SPARSE_MAX_DENSITY"]

#: the sparse kernels have a fixed cost (a sort of the N indices, a CSR
#: header); below this many latents the dense products are as cheap
SPARSE_MIN_COMPONENTS = 512
#: largest k / n_components for which the sparse kernels win: they do ~1/density
#: less arithmetic than dense matmuls but run at a small fraction of their
#: flop rate (gathers are memory bound); a conservative guess, not yet measured
SPARSE_MAX_DENSITY = 1 / 16

# torch's notes that CSR tensors are beta and that we skip their invariant checks
_BETA_WARNINGS = ".*Sparse (CSR tensor support|invariant checks).*"


@contextlib.contextmanager
def quiet_csr():
    """Silence torch's notes that sparse CSR support is beta inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNINGS)
        yield


def _csr(crow, col, values, size):
    """A CSR tensor from trusted parts (no invariant checks, no beta notes)."""
    with quiet_csr():
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def use_sparse(n_components, k, mode="auto", device=None):
    """Whether to run the sparse kernels for ``k`` active latents out of ``n_components``.

    Parameters
    ----------
    n_components : int
    k : int or float
        Active latents per row (the mean for patterns with variable counts).
    mode : {"auto", "sparse", "dense"}
        ``"auto"`` applies the rule ``n_components >= SPARSE_MIN_COMPONENTS``
        and ``k <= SPARSE_MAX_DENSITY * n_components`` on the CPU, and picks the
        dense path on accelerators (where the trainer first times both steps
        and sets the architecture's ``kernels`` to the faster:
        :meth:`sksae._sae_trainer.SAETrainer._choose_kernels`).
    device : torch.device or str, default=None
        Where the step runs (None: the CPU rule).
    """
    if mode == "sparse":
        return True
    if mode == "dense":
        return False
    if mode != "auto":
        raise ValueError(f"kernels must be 'auto', 'sparse' or 'dense', got {mode!r}.")
    if device is not None and is_accelerator(device):
        # benchmarks/results/kernel_rule.txt: on a GPU the dense step was faster at every
        # measured shape with torch's sparse primitives (many small launches); the Triton
        # kernels' step is chosen by timing it (SAETrainer._choose_kernels), not here
        return False
    return n_components >= SPARSE_MIN_COMPONENTS and k <= SPARSE_MAX_DENSITY * n_components


class Pattern(NamedTuple):
    """The support of sparse codes as a CSR matrix of shape (B, F).

    Attributes
    ----------
    indices : Tensor of shape (N,), int64
        Latent of each entry; the entries of row b are ``crow[b]:crow[b + 1]``.
    crow : Tensor of shape (B + 1,), int64
    n_components : int
    """

    indices: torch.Tensor
    crow: torch.Tensor
    n_components: int

    @property
    def n_rows(self):
        return self.crow.shape[0] - 1

    def rows(self):
        """Row of each entry, shape (N,)."""
        counts = self.crow.diff()
        return torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.crow.device), counts,
            output_size=self.indices.shape[0])

    def flat(self):
        """Position of each entry in the row-major (B, F) array, shape (N,)."""
        return self.rows() * self.n_components + self.indices

    def csr(self, values):
        """A sparse CSR tensor with this pattern and ``values``."""
        return _csr(self.crow, self.indices, values, (self.n_rows, self.n_components))


def as_pattern(indices, n_components):
    """A :class:`Pattern` from a (B, k) index matrix (or a pattern, returned as is)."""
    if isinstance(indices, Pattern):
        return indices
    B, k = indices.shape
    crow = torch.arange(0, (B + 1) * k, k, device=indices.device)
    return Pattern(indices.reshape(-1), crow, n_components)


def row_offsets(rows, n_rows):
    """CSR row offsets, shape (n_rows + 1,), of entries whose rows are ``rows`` (any order).

    Counted on ``rows``' device with ``index_add_``, not ``bincount``, which
    reads the largest row on the host (a CUDA graph could not record it).
    """
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:].index_add_(0, rows, torch.ones_like(rows, dtype=torch.int64))
    return crow.cumsum_(0)


def unit_rows_(W):
    """Divide each row of ``W`` by its norm (at least 1e-12), in place; returns ``W``.

    On the CPU it is one compiled pass per row (the norm
    while the row is in cache, then the division) instead of two passes over
    ``W``; the same values up to rounding.
    """
    compiled = _compiled("unit_rows", W) if W.is_contiguous() else None
    if compiled is None:
        return W.div_(torch.linalg.vector_norm(W, dim=-1, keepdim=True).clamp_min_(1e-12))
    rows = W.detach().numpy()
    eps = rows.dtype.type(1e-12)
    with parallel(W, own=True):
        run_ranges(lambda a, b: compiled(rows, eps, a, b), even_bounds(rows.shape[0]))
    return W


def _buffer(ws, shape, like, owner=None):
    return ws.take_buffer(shape, like, owner) if ws is not None else like.new_empty(shape)


# -- compiled passes (numba) ---------------------------------------------------
def _compiled(name, *tensors):
    """The compiled pass ``name`` of :mod:`sksae._accel._sparse_nb` for these tensors, or None.

    Only for CPU tensors of one float dtype (float32 or float64), with numba
    installed and the compiled paths enabled (:mod:`sksae._accel.compiled`).
    """
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(
            t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return None
    return kernel(name)


def _np(t):
    """The numpy view of a contiguous CPU tensor (no copy, no graph)."""
    return t.detach().contiguous().numpy()


def _by_latent(like, kernel, pat, *args):
    """Run a compiled pass over every latent of ``pat``, split over the threads :func:`parallel` grants.

    The kernel is called as ``kernel(crow_T, rows_T, order, *args, f0, f1)``
    with the transposed pattern (:func:`_transpose`); the latents are split
    into ranges of about equal numbers of entries.
    """
    order, crow_T, rows = (_np(t) for t in _transpose(pat))
    n_components = crow_T.shape[0] - 1
    n = range_count(n_components)
    with parallel(like, own=True):
        total = int(crow_T[-1])
        bounds = ([0] + [int(np.searchsorted(crow_T, i * total // n)) for i in range(1, n)]
                  + [n_components])
        run_ranges(lambda f0, f1: kernel(crow_T, rows, order, *args, f0, f1), bounds)


# -- primitives ----------------------------------------------------------------
def _gather_rows(pat, W_FD, weights_N, bias_D=None):
    """``S @ W (+ bias)`` (B, D) where S has ``weights`` on the pattern (bias added in place).

    On the CPU the rows are split into ranges run on sksae's threads (each
    bag's sum does not depend on the split).
    """
    weights = weights_N.to(W_FD.dtype)
    triton = fused.kernels_for(W_FD, weights, pat.indices)
    if triton is not None:
        out = triton.decode(pat, weights, W_FD)
    elif W_FD.device.type != "cpu" or pat.n_rows < 128:
        # whole (no slicing bounds read back from an accelerator, which would synchronise)
        out = F.embedding_bag(pat.indices, W_FD, pat.crow, mode="sum",
                              per_sample_weights=weights, include_last_offset=True)
    else:
        crow = pat.crow.numpy()
        bounds = even_bounds(pat.n_rows, min_size=64)
        parts = [None] * (len(bounds) - 1)

        def part(a, b):
            lo, hi = int(crow[a]), int(crow[b])
            parts[bounds.index(a)] = F.embedding_bag(
                pat.indices[lo:hi], W_FD, pat.crow[a:b + 1] - lo, mode="sum",
                per_sample_weights=weights[lo:hi], include_last_offset=True)

        with parallel(weights, own=True):
            run_ranges(part, bounds)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if bias_D is None else out.add_(bias_D.to(out.dtype))


def _scatter_rows(pat, Y_BD, weights_N, ws=None, owner=None):
    """``S^T @ Y`` (F, D) where S has ``weights`` on the pattern.

    The pattern is transposed by a stable sort of its indices (O(N log N) on
    N = B k integers, cheap next to the O(N D) sums); each latent's entries then
    form one CSR row of ``S^T`` (or one bag of rows of ``Y``). On the CPU with
    MKL the product is MKL's sparse-dense product into a buffer handed back
    by the previous step (:class:`sksae._accel.workspace.StepWorkspace`): a
    fresh (F, D) result costs its page faults every step.
    """
    transposed = order, crow_T, rows = _transpose(pat)
    Y = Y_BD.contiguous()
    F_, D = pat.n_components, Y.shape[1]
    triton = fused.kernels_for(Y, weights_N, pat.indices)
    if triton is not None:
        out = _buffer(ws, (F_, D), Y, owner)
        triton.by_latent(transposed, weights_N.to(Y.dtype), Y, out)
        return out
    weights = weights_N.index_select(0, order).to(Y.dtype)
    if Y.device.type == "cpu" and torch.backends.mkl.is_available() and Y.dtype in (
            torch.float32, torch.float64):
        S_T = _csr(crow_T, rows, weights, (F_, Y.shape[0]))
        out = _buffer(ws, (F_, D), Y, owner)
        with parallel(Y):
            # beta=0: the buffer's old contents are ignored, NaN included
            return torch.addmm(out, S_T, Y, beta=0, out=out)
    with parallel(Y):
        return F.embedding_bag(rows, Y, crow_T, mode="sum", per_sample_weights=weights,
                               include_last_offset=True)


def _transpose(pat):
    """``(order, crow_T, rows)`` of the transposed pattern.

    ``order`` sorts the entries by latent, ``crow_T`` (F + 1) delimits each
    latent's entries in that order, ``rows`` gives their rows. On the CPU a
    compiled counting sort (one O(N + F) pass, the same result as the sort).
    """
    idx = pat.indices
    count_sort = kernel("transpose") if idx.device.type == "cpu" else None
    if count_sort is not None:
        N = idx.shape[0]
        order, rows = (idx.new_empty(N, dtype=torch.int64) for _ in range(2))
        crow_T = idx.new_empty(pat.n_components + 1, dtype=torch.int64)
        count_sort(_np(idx.to(torch.int64)), _np(pat.crow.to(torch.int64)), pat.n_components,
                   crow_T.numpy(), rows.numpy(), order.numpy())
        return order, crow_T, rows
    order = _stable_argsort(idx, pat.n_components)
    sorted_idx = idx.index_select(0, order)
    latents = torch.arange(pat.n_components + 1, device=sorted_idx.device)
    crow_T = torch.searchsorted(sorted_idx, latents)
    return order, crow_T, pat.rows().index_select(0, order)


def _stable_argsort(idx, n_components):
    """Stable sorting permutation of latent indices in [0, n_components).

    On the CPU numpy's stable argsort of 16-bit keys is a radix sort, much
    faster than ``torch.sort`` for a training step's indices.
    """
    if idx.device.type != "cpu":
        return torch.sort(idx, stable=True).indices
    keys = idx.numpy().astype(np.int16 if n_components <= 2**15 else np.int32)
    return torch.from_numpy(np.argsort(keys, kind="stable"))


def _sampled_dots(pat, A_BD, W_FD, bias_F=None):
    """``<A[b], W[f]> (+ bias[f])`` for every entry (b, f) of the pattern, shape (N,).

    On the CPU the entries are visited in the transposed pattern's order
    (by latent, :func:`_transpose`), so each row of ``W`` is read once and
    in order while the rows of ``A`` (B x D, small) are gathered from cache:
    the same bits, faster for large ``W`` and as fast for small ones. The
    compiled pass also adds the bias and writes in the pattern's order.
    """
    A = A_BD.to(W_FD.dtype)
    triton = fused.kernels_for(A, W_FD, pat.indices)
    if triton is not None:
        return triton.dots(pat, A, W_FD, None if bias_F is None else bias_F.to(W_FD.dtype))
    compiled = _compiled("dots", A, W_FD)
    if compiled is not None:
        out = A.new_empty(pat.indices.shape[0])
        bias = W_FD.new_zeros(1) if bias_F is None else bias_F.to(W_FD.dtype)
        _by_latent(A, compiled, pat, _np(A), _np(W_FD), _np(bias),
                   bias_F is not None, out.numpy())
        return out
    out = _sampled_dot_products(pat, A, W_FD)
    return out if bias_F is None else out.add_(bias_F.to(out.dtype).index_select(0, pat.indices))


def _sampled_dot_products(pat, A, W_FD):
    """:func:`_sampled_dots` without the bias, on torch's primitives."""
    if A.dtype in (torch.float32, torch.float64):
        zeros = A.new_zeros(pat.indices.shape[0])
        if A.device.type != "cpu":
            with quiet_csr(), parallel(A):
                return torch.sparse.sampled_addmm(pat.csr(zeros), A, W_FD.T, beta=0.0).values()
        order, crow_T, rows = _transpose(pat)
        S_T = _csr(crow_T, rows, zeros, (pat.n_components, pat.n_rows))
        with quiet_csr(), parallel(A):
            by_latent = torch.sparse.sampled_addmm(S_T, W_FD, A.T, beta=0.0).values()
        return torch.empty_like(by_latent).index_copy_(0, order, by_latent)
    # half precision: gather in chunks that stay in cache
    rows = pat.rows()
    out = A.new_empty(pat.indices.shape[0])
    step = 1 << 14
    for s in range(0, out.shape[0], step):
        r, i = rows[s:s + step], pat.indices[s:s + step]
        out[s:s + step] = (A[r] * W_FD[i]).sum(-1)
    return out


# -- autograd functions -----------------------------------------------------
class _SparseDecode(torch.autograd.Function):
    """``S @ W_dec (+ b_dec)`` with S the pattern carrying ``values``."""

    @staticmethod
    def forward(ctx, values_N, W_FD, pat, bias_D, ws):
        ctx.pat, ctx.ws = pat, ws
        ctx.bias_dtype = None if bias_D is None else bias_D.dtype
        ctx.save_for_backward(values_N, W_FD)
        with _serial(W_FD):
            return _gather_rows(pat, W_FD, values_N, bias_D)

    @staticmethod
    def backward(ctx, grad_BD):
        values, W = ctx.saved_tensors
        grad = grad_BD.to(W.dtype)
        need = ctx.needs_input_grad
        g_bias = grad_BD.sum(0).to(ctx.bias_dtype) if need[3] else None
        ws = ctx.ws
        tangent = ws.tangent_for(W) if need[1] and ws is not None else None
        dots = g_values = g_W = None
        triton = fused.kernels_for(grad, W, values) if need[1] else None
        if triton is not None:
            # the value gradients, then the weight gradient with its radial part removed
            # and its rows' norms, one program per latent
            dots = triton.dots(ctx.pat, grad, W) if need[0] or tangent is not None else None
            g_W = _buffer(ws, tuple(W.shape), W, owner=W)
            _, row_sq = triton.by_latent(_transpose(ctx.pat), values.to(W.dtype), grad, g_W,
                                         dots_N=dots if tangent is not None else None, W_FD=W)
            if ws is not None:
                ws.note_norm(g_W, row_sq, owner=W)
            if tangent is not None:
                tangent.projected += 1
            return (dots.to(values.dtype) if need[0] else None), g_W, None, g_bias, None
        compiled = _compiled("decode_backward", grad, W, values) if need[1] else None
        with _serial(W):
            if compiled is not None:
                # the value gradients, the weight gradient and its radial part in one pass
                dots = grad.new_empty(values.shape[0])
                g_W = _buffer(ws, tuple(W.shape), W, owner=W)
                row_sq = grad.new_empty(W.shape[0])
                _by_latent(grad, compiled, ctx.pat, _np(values), _np(grad),
                           _np(W), dots.numpy(), g_W.numpy(), row_sq.numpy(), tangent is not None)
                if ws is not None:
                    ws.note_norm(g_W, row_sq, owner=W)
                if tangent is not None:
                    tangent.projected += 1
                return (dots if need[0] else None), g_W, None, g_bias, None
            if need[0] or tangent is not None:
                dots = _sampled_dots(ctx.pat, grad, W)
                g_values = dots.to(values.dtype) if need[0] else None
            if need[1]:
                g_W = _scatter_rows(ctx.pat, grad, values, ws, owner=W)
            if tangent is not None:
                # each row's radial part sum_e v_e <grad_b, w_f>, from the entries
                radial = g_W.new_zeros(W.shape[0]).index_add_(
                    0, ctx.pat.indices, values.to(dots.dtype) * dots)
                g_W.addcmul_(radial.unsqueeze(1), W, value=-1)
                tangent.projected += 1
        return g_values, g_W, None, g_bias, None


class _GatherPre(torch.autograd.Function):
    """Entries of ``pre = (x - b_dec) W_enc^T + b_enc`` on the pattern, sparse backward.

    The forward reads the already computed ``pre`` (the one dense product of the
    step), or recomputes the entries when ``pre`` is in a lower precision than
    ``W_enc`` (a bf16 product that only selected them); the backward needs
    only the entries' gradients g (a sparse S):
    dW_enc = S^T (x - b_dec), db_enc = S^T 1, db_dec = -(S^T 1) W_enc, dx = S W_enc.
    """

    @staticmethod
    def forward(ctx, pre_BF, x_BD, W_enc_FD, b_enc_F, b_dec_D, pat, centred_BD, ws):
        ctx.pat, ctx.ws = pat, ws
        if centred_BD is None:
            centred_BD = x_BD.to(W_enc_FD.dtype) - b_dec_D.to(W_enc_FD.dtype)
        ctx.save_for_backward(x_BD, W_enc_FD, b_dec_D, centred_BD.to(W_enc_FD.dtype))
        with _serial(pre_BF):
            if pre_BF.dtype == W_enc_FD.dtype:
                return torch.take(pre_BF, pat.flat())
            # pre was computed in a lower precision to select the entries: their
            # values in the parameters' (N D flops, against B F D for all of pre)
            return _sampled_dots(pat, centred_BD, W_enc_FD, b_enc_F)

    @staticmethod
    def backward(ctx, grad_N):
        x, W, b_dec, centred = ctx.saved_tensors
        pat, ws = ctx.pat, ctx.ws
        g = grad_N.to(W.dtype)
        need = ctx.needs_input_grad
        g_x = g_W = g_benc = g_bdec = None
        with _serial(W):
            if need[1]:
                g_x = _gather_rows(pat, W, g).to(x.dtype)
            triton = fused.kernels_for(g, centred) if need[2] else None
            if triton is not None:
                # the weight gradient and the bias gradient h, one program per latent
                g_W = _buffer(ws, tuple(W.shape), W, owner=W)
                h, row_sq = triton.by_latent(_transpose(pat), g, centred, g_W, sums=True)
                if ws is not None:
                    ws.note_norm(g_W, row_sq, owner=W)
                g_benc = h if need[3] else None
                g_bdec = -(h @ W).to(b_dec.dtype) if need[4] else None
                return None, g_x, g_W, g_benc, g_bdec, None, None, None
            compiled = _compiled("gather_backward", g, centred) if need[2] else None
            if compiled is not None:
                # the weight gradient and the bias gradient h in one pass
                g_W = _buffer(ws, tuple(W.shape), W, owner=W)
                h = g.new_empty(pat.n_components)
                row_sq = g.new_empty(pat.n_components)
                _by_latent(g, compiled, pat, _np(g), _np(centred), g_W.numpy(),
                           h.numpy(), row_sq.numpy())
                if ws is not None:
                    ws.note_norm(g_W, row_sq, owner=W)
                g_benc = h if need[3] else None
                g_bdec = -(h @ W).to(b_dec.dtype) if need[4] else None
                return None, g_x, g_W, g_benc, g_bdec, None, None, None
            if need[2]:
                g_W = _scatter_rows(pat, centred, g, ws, owner=W)
            if need[3] or need[4]:
                h = g.new_zeros(pat.n_components).index_add_(0, pat.indices, g)
                g_benc = h if need[3] else None
                g_bdec = -(h @ W).to(b_dec.dtype) if need[4] else None
        return None, g_x, g_W, g_benc, g_bdec, None, None, None


# -- public entry points ------------------------------------------------------
def sparse_decode(values, indices, W_dec_FD, b_dec_D=None, ws=None):
    """``x_hat = S @ W_dec (+ b_dec)`` over the active atoms only.

    Parameters
    ----------
    values : Tensor of shape (B, k), or (N,) with a :class:`Pattern`
    indices : Tensor of shape (B, k), int64, or Pattern
    W_dec_FD : Tensor of shape (F, D)
    b_dec_D : Tensor of shape (D,) or None
    ws : StepWorkspace or None, default=None
        The training step's workspace (buffers, decoder projection, noted norms).

    Returns
    -------
    x_hat : Tensor of shape (B, D), in ``W_dec``'s dtype
    """
    pat = as_pattern(indices, W_dec_FD.shape[0])
    return _SparseDecode.apply(values.reshape(-1), W_dec_FD, pat, b_dec_D, ws)


def gather_pre(pre_BF, indices, x_BD, p, centred=None, ws=None):
    """Pre-activations at ``indices`` with gradients to the encoder's parameters.

    When ``pre_BF`` carries an autograd graph this is a plain ``gather`` (the
    dense path: autograd goes back through the dense product). When it does not
    (computed under ``torch.no_grad()`` by an architecture taking the sparse
    path) the gradients to ``W_enc``, ``b_enc``, ``b_dec`` (and ``x``) are
    computed from the selected entries only, assuming the base
    pre-activation ``(x - b_dec) @ W_enc.T + b_enc``.

    Parameters
    ----------
    pre_BF : Tensor of shape (B, F)
    indices : Tensor of shape (B, k), int64, or Pattern
    x_BD : Tensor of shape (B, D)
    p : dict with ``W_enc``, ``b_enc``, ``b_dec``
    centred : Tensor of shape (B, D), optional
        ``x - b_dec`` (without a graph) when the caller already computed it.
    ws : StepWorkspace or None, default=None
        The training step's workspace.

    Returns
    -------
    values : Tensor of shape (B, k) (or (N,) for a Pattern)
    """
    if pre_BF.requires_grad:
        if isinstance(indices, Pattern):
            return pre_BF.reshape(-1)[indices.flat()]
        return pre_BF.gather(1, indices)
    pat = as_pattern(indices, pre_BF.shape[1])
    out = _GatherPre.apply(pre_BF, x_BD, p["W_enc"], p["b_enc"], p["b_dec"], pat, centred, ws)
    return out if isinstance(indices, Pattern) else out.view(indices.shape)
