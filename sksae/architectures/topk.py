"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)); no sparsity penalty, k sets L0.
Dead latents are revived by the AuxK loss the trainer adds for ``auxk = True``.
"""

from __future__ import annotations

import numpy as np
import torch

from .._accel.sparse import use_sparse
from .._accel.threads import even_bounds, parallel, row_probe, run_ranges
from ._base import Architecture, EncodeOutput, SparseCodes


def _topk(pre_BF, k):
    probe = row_probe(lambda m: torch.topk(pre_BF[:m], k, dim=-1, sorted=False),
                      pre_BF.shape[0])
    with parallel(pre_BF, "top-k", *probe):
        return torch.topk(pre_BF, k, dim=-1, sorted=False)


#: magnitude-bit masks of the float formats the compiled selection reads as integers
_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}


def select_topk(pre_BF, k):
    """Indices (B, k) of each row's ``k`` largest entries, in no particular order.

    The training step's selection. On the CPU with the optional numba extra it
    runs the compiled kernel of :mod:`sksae._accel._topk_nb` where ``16 k <= F``
    (about 2x faster than ``torch.topk`` there; among equal entries it keeps
    the lower indices), split by rows over the threads
    :func:`sksae._accel.threads.parallel` grants it; otherwise ``torch.topk``.
    """
    from .._accel.compiled import kernel

    B, F = pre_BF.shape
    # the kernel wins when the k largest are a small share of a row (its sample's
    # threshold then leaves ~2k candidates); for larger shares torch.topk is faster
    fits = pre_BF.device.type == "cpu" and pre_BF.dtype in _BITS and 0 < 16 * k <= F and B > 0
    rows = kernel("topk") if fits else None
    if rows is None:
        return _topk(pre_BF, k).indices
    int_dtype, magnitude = _BITS[pre_BF.dtype]
    bits = pre_BF.contiguous().view(int_dtype).numpy()
    out = np.empty((B, k), dtype=np.int64)

    def run(m):
        run_ranges(lambda a, b: rows(bits, k, magnitude, a, b, out), even_bounds(m))

    with parallel(pre_BF, "compiled top-k", *row_probe(run, B), own=True):
        run(B)
    return torch.from_numpy(out)


def topk_codes(pre_BF, k):
    """Top-k of ReLU(pre) per row as :class:`SparseCodes`.

    Taking the top-k before the ReLU selects the same support (the ReLU is
    monotone) and touches a (B, k) tensor instead of (B, F).
    """
    values, indices = _topk(pre_BF, k)
    return SparseCodes(values.clamp_min(0), indices)


class TopK(Architecture):
    """TopK activation: keep the ``k`` largest positive pre-activations of each row."""

    name = "topk"
    auxk = True

    def encode(self, p, x_BD, training=False):
        k = self.hparams["k"]
        if training and use_sparse(self.n_components, k, self.kernels, x_BD.device):
            return self.encode_selected(p, x_BD, lambda pre: select_topk(pre, k))
        pre = self.pre_activation(p, x_BD)
        codes = topk_codes(pre, k)
        if training:
            return EncodeOutput(codes, pre)
        return codes.to_dense(pre.shape[-1])
