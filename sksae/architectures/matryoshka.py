"""Matryoshka BatchTopK sparse autoencoder (Bussmann, Nabeshima, Karvonen & Nanda 2025,
"Learning Multi-Level Features with Matryoshka Sparse Autoencoders").

The dictionary is read as nested prefixes ``m_1 < m_2 < ... < m_n = F``, and each
prefix alone must reconstruct the input:
``loss = sum_i ||x - (z[:m_i] W_dec[:m_i] + b_dec)||^2`` (each term per row, as the
reconstruction loss), with the codes ``z`` selected by BatchTopK over the whole
dictionary. Early latents must then carry the general features on their own,
so a general feature is not absorbed into more specific later ones (the
"feature absorption" of a plain SAE, where a latent for "starts with S" stops
firing on "short" because a "short" latent already covers it). Inference is
BatchTopK's: one learned threshold, rows encoded independently.

The prefix sizes are ``architecture_params={"prefix_sizes": [m_1, ..., m_{n-1}]}``
(increasing, below ``n_components``; the whole dictionary is the last prefix);
by default ``n_components // 8``, ``// 4`` and ``// 2``.
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.sparse import Pattern, as_pattern, row_offsets
from ._base import SparseCodes, decode
from .batchtopk import BatchTopK


def prefix_reconstructions(codes, W_dec_FD, sizes, kernels="auto", ws=None):
    """``z[:, :m] @ W_dec[:m]`` for each inner prefix size ``m``, shape (len(sizes), B, D).

    The prefixes nest, so each is the running sum of disjoint blocks of
    latents ``[m_{j-1}, m_j)``. Sparse codes are decoded once: their entries,
    grouped by block, form the rows of one pattern over ``len(sizes) * B``
    virtual rows (one sparse decode and one decoder gradient for all the
    prefixes); dense codes take one product per block.
    """
    n, B = len(sizes), codes.n_rows if isinstance(codes, SparseCodes) else codes.shape[0]
    if isinstance(codes, SparseCodes):
        pat = as_pattern(codes.indices, W_dec_FD.shape[0])
        bounds = torch.as_tensor(sizes, device=pat.indices.device)
        block = torch.bucketize(pat.indices, bounds, right=True)  # n: beyond every prefix
        keep = block < n
        key = block[keep] * B + pat.rows()[keep]  # virtual row: (block, row)
        order = torch.argsort(key, stable=True)
        grouped = SparseCodes(codes.values.reshape(-1)[keep][order],
                              Pattern(pat.indices[keep][order], row_offsets(key, n * B),
                                      pat.n_components))
        blocks = decode(grouped, W_dec_FD, kernels=kernels, ws=ws).view(n, B, -1)
    else:
        if ws is not None:
            ws.note_other_use(W_dec_FD)
        edges = [0, *sizes]
        blocks = torch.stack([codes[:, a:b] @ W_dec_FD[a:b] for a, b in zip(edges, edges[1:])])
    return blocks.cumsum(0)


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK codes trained so that every prefix of the dictionary reconstructs the input."""

    name = "matryoshka"
    hyperparameters = {**BatchTopK.hyperparameters, "prefix_sizes": ["array-like", None]}
    defaults = {"prefix_sizes": None}

    @property
    def prefix_sizes(self):
        """The inner prefix sizes, increasing and below ``n_components``."""
        sizes = self.hparams["prefix_sizes"]
        if sizes is None:
            sizes = sorted({self.n_components // d for d in (8, 4, 2)} - {0})
        return [int(m) for m in sizes]

    def check(self):
        super().check()
        given = self.hparams["prefix_sizes"]
        sizes = np.asarray(self.prefix_sizes if given is None else given)
        ok = sizes.size == 0 or (
            sizes.ndim == 1 and np.issubdtype(sizes.dtype, np.integer)
            and not np.issubdtype(sizes.dtype, np.bool_)
            and bool(np.all(sizes >= 1)) and bool(np.all(np.diff(sizes) > 0))
            and bool(np.all(sizes < self.n_components)))
        if not ok:
            raise ValueError(
                f"prefix_sizes must be increasing integers in [1, n_components="
                f"{self.n_components}), got {self.hparams['prefix_sizes']!r}.")

    def losses(self, inp):
        terms = super().losses(inp)  # AuxK
        sizes = self.prefix_sizes
        if not sizes:
            return terms
        partial = prefix_reconstructions(inp.enc.codes, inp.p["W_dec"], sizes,
                                         kernels=self.kernels, ws=inp.ws)
        n_rows = inp.n_rows
        for m, x_hat in zip(sizes, (partial + inp.p["b_dec"]).to(inp.x.dtype)):
            terms[f"mse_{m}"] = (x_hat - inp.x).pow(2).sum() / n_rows
        return terms
