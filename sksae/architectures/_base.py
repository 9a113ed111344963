"""What every SAE architecture shares: parameters, decoding, unit folding.

An architecture is a small object that knows its encoder nonlinearity and its
extra losses; the trainer (``sksae._sae_trainer``) owns the optimizer,
schedules and dead-latent statistics. Parameters live in a plain dict of
tensors so that the same ``encode`` serves training (``nn.Parameter`` values
in normalised units) and inference (tensors rebuilt from the estimator's
device-free fitted arrays, in the user's units).

Tensor names follow the field's shape-suffix habit in comments:
B rows, D input features (``n_features``), F latents (``n_components``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._accel import sparse as _kernels
from .._accel.threads import even_bounds, parallel, row_probe, run_ranges


def _encoder_product(bias, centred, W, out=None):
    """``bias + centred W^T`` (into ``out``, whose first rows probe the thread choice).

    ``bias=None``: ``centred W^T`` alone. With ``out`` on the CPU the rows are
    split into ranges run on sksae's threads (:func:`sksae._accel.threads.run_ranges`),
    each a product on one torch thread: as fast as torch's own two threads
    (6.3 against 6.2 ms at 1024 x 386 x 3072 in bf16, 379 against 389 ms at
    4096 x 770 x 24576) without waking torch's OpenMP team (see
    :mod:`sksae._accel.threads`).
    """
    def product(rows, into):
        if bias is None:
            return torch.mm(rows, W.T, out=into)
        return torch.addmm(bias, rows, W.T, out=into)

    if out is None:
        with parallel(centred, "encoder product"):
            return product(centred, None)

    def split(m):  # the first m rows; a range of a few rows would take GEMV's other path
        run_ranges(lambda a, b: product(centred[a:b], out[a:b]), even_bounds(m, min_size=16))

    with parallel(centred, "encoder product", *row_probe(split, centred.shape[0]), own=True):
        split(centred.shape[0])
    return out


class SparseCodes(NamedTuple):
    """Sparse codes: the same number of active latents per row, or a CSR pattern.

    Attributes
    ----------
    values : Tensor of shape (B, k), or (N,) with a pattern
    indices : Tensor of shape (B, k), int64, or :class:`sksae._accel.sparse.Pattern`
        A pattern gives a variable number of entries per row (BatchTopK).
    """

    values: torch.Tensor
    indices: object

    @property
    def n_rows(self):
        """Rows of the batch the codes belong to."""
        return (self.indices.n_rows if isinstance(self.indices, _kernels.Pattern)
                else self.values.shape[0])

    @property
    def mean_active(self):
        """Entries per row (their mean for a pattern)."""
        if isinstance(self.indices, _kernels.Pattern):
            return self.values.shape[0] / max(1, self.n_rows)
        return self.indices.shape[-1]

    def to_dense(self, n_components):
        out = self.values.new_zeros(self.n_rows, n_components)
        if isinstance(self.indices, _kernels.Pattern):
            return out.view(-1).index_put_((self.indices.flat(),), self.values).view(out.shape)
        return out.scatter_(1, self.indices, self.values)


class EncodeOutput(NamedTuple):
    """What an architecture's training encode returns.

    Attributes
    ----------
    codes : Tensor (B, F) or SparseCodes
        The latents fed to the decoder.
    pre : Tensor (B, F)
        Encoder pre-activations (for AuxK and statistics).
    active : Tensor (B, F) bool or None
        Which latents fired, when cheaper to give than to recompute.
    centred : Tensor (B, D) or None
        ``x - b_dec`` without a graph, when the encoder computed it (the sparse
        path), for the trainer's AuxK loss and statistics to reuse.
    """

    codes: object
    pre: torch.Tensor
    active: object = None
    centred: object = None


def decode(codes, W_dec_FD, b_dec_D=None, kernels="auto"):
    """x_hat = codes @ W_dec + b_dec; sparse codes may touch only the active atoms.

    ``kernels`` ("auto", "sparse" or "dense") picks, for :class:`SparseCodes`,
    between the sparse kernels of :mod:`sksae._accel.sparse` (O(B k D) forward and
    backward) and a dense matmul, by :func:`sksae._accel.sparse.use_sparse`.
    ``b_dec_D=None`` adds no bias (the AuxK reconstruction).
    """
    if isinstance(codes, SparseCodes):
        n_components = W_dec_FD.shape[0]
        if _kernels.use_sparse(n_components, codes.mean_active, kernels, W_dec_FD.device):
            return _kernels.sparse_decode(codes.values, codes.indices, W_dec_FD, b_dec_D)
        codes = codes.to_dense(n_components)
    _kernels.note_dense_use(W_dec_FD)
    out = codes @ W_dec_FD
    return out if b_dec_D is None else out + b_dec_D


class Architecture:
    """Base class of SAE encoders.

    Subclasses set ``name`` and implement :meth:`encode`; they may add
    parameters (:meth:`extra_parameters`), buffers (:meth:`extra_buffers`),
    losses (:meth:`losses`) and fitted attributes (``public_names``).

    Parameters
    ----------
    hparams : dict
        The estimator's hyperparameters (``k``, ``alpha``, ...), already validated.
    n_components : int
    n_features : int
    """

    name = None
    #: whether the sparsity coefficient is warmed up (penalty-based architectures)
    penalty = False
    #: whether the AuxK dead-latent loss applies (TopK family)
    auxk = False
    #: whether :meth:`losses` uses ``W_dec`` (then the trainer always projects
    #: the decoder's summed gradient itself, see sksae._accel.sparse.TangentRows)
    decoder_in_losses = False
    #: extra tensors exported as fitted attributes: {tensor name: attribute name}
    public_names = {}
    #: tensors measured in input units (divided by the normalisation scale on export)
    input_scaled = ("b_enc", "b_dec")
    #: "auto", "sparse" or "dense": kernels for sparse codes (see sksae._accel.sparse.use_sparse)
    kernels = "auto"
    #: dtype of the CPU product that selects the sparse kernels' active latents
    #: (None: the parameters' dtype); the trainer sets it from ``precision``
    selection_dtype = None

    def __init__(self, hparams, n_components, n_features):
        self.hparams = hparams
        self.n_components = n_components
        self.n_features = n_features

    # -- parameters ---------------------------------------------------------
    def extra_parameters(self, params):
        """Extra trainable tensors, given the initialised base ``params``."""
        return {}

    def extra_buffers(self, params):
        """Extra non-trainable state (e.g. an EMA threshold)."""
        return {}

    # -- forward ------------------------------------------------------------
    @staticmethod
    def pre_activation(p, x_BD, out=None, centred=None):
        """``(x - b_dec) W_enc^T + b_enc``; ``centred`` gives ``x - b_dec`` already computed."""
        centred = x_BD - p["b_dec"] if centred is None else centred
        return _encoder_product(p["b_enc"], centred, p["W_enc"], out)

    def encode_selected(self, p, x_BD, select):
        """Training codes on the sparse kernels: ReLU of the entries ``select(pre)`` picks.

        The dense product runs without an autograd graph (into a reused buffer
        on the CPU); ``select`` returns a (B, k) index matrix or a
        :class:`sksae._accel.sparse.Pattern`, and the gradients flow from the
        selected entries only (:func:`sksae._accel.sparse.gather_pre`).
        ``x - b_dec`` is computed once, for all of them and for the trainer.
        """
        with torch.no_grad():
            centred = x_BD - p["b_dec"]
            pre = self.selection_pre_activation(p, x_BD, centred)
            support = select(pre)
        values = _kernels.gather_pre(pre, support, x_BD, p, centred=centred)
        return EncodeOutput(SparseCodes(values.clamp_min(0), support), pre, centred=centred)

    def selection_pre_activation(self, p, x_BD, centred=None):
        """The pre-activations a training step selects from, without a graph.

        With ``selection_dtype`` lower than the parameters' on the CPU (bf16),
        the product runs on bf16 copies of ``x - b_dec`` and ``W_enc``: 2-2.4x
        faster where the CPU has bf16 instructions. Only the choice of the
        active latents reads these; their values and every gradient are then
        computed in the parameters' precision (:func:`sksae._accel.sparse.gather_pre`),
        so a rounding error can only swap latents whose pre-activations tie to
        within bf16's 3 significant digits. ``centred`` is ``x - b_dec`` when
        already computed.
        """
        W = p["W_enc"]
        shape = (x_BD.shape[0], self.n_components)
        low = self.selection_dtype
        if low is None or low == W.dtype or W.device.type != "cpu":
            return self.pre_activation(p, x_BD, out=self.scratch("pre", shape, W),
                                       centred=centred)
        centred = x_BD - p["b_dec"] if centred is None else centred
        # the bias rides in the product: a column of ones in x meets b_enc in W
        # (one more pair of the K dimension, 4-7% faster than addmm's bias pass)
        B, D = centred.shape
        W_low = self.scratch("W_enc low", (W.shape[0], D + 2), W, dtype=low,
                             init=lambda t: t[:, D + 1].zero_())
        x_low = self.scratch("x low", (B, D + 2), W, dtype=low,
                             init=lambda t: t[:, D:].copy_(t.new_tensor([1, 0])))
        with parallel(W, "cast", own=True):
            run_ranges(lambda a, b: W_low[a:b, :D].copy_(W[a:b]), even_bounds(W.shape[0]))
        W_low[:, D].copy_(p["b_enc"])
        x_low[:, :D].copy_(centred)
        return _encoder_product(None, x_low, W_low, self.scratch("pre low", shape, W, dtype=low))

    def scratch(self, name, shape, like, dtype=None, init=None):
        """A CPU tensor of ``shape`` reused by every training step, or None off the CPU.

        For the step's large temporaries, such as the (B, F) pre-activations:
        on the CPU a fresh allocation of many MiB is returned to the system
        when freed, so each step paid its page faults again (measured: ~100k
        faults and 8% of a step at 4096 x 24576; a product over (F, D) took
        54 ms fresh and 15 ms in a reused buffer). Accelerators' caching
        allocators already reuse memory (and autocast outputs need not match
        ``like``'s dtype), so callers allocate afresh there (``out=None``).
        Architecture objects live for one fit and are not pickled, so neither
        are these buffers. ``init(buffer)``, when given, fills the parts that
        no step overwrites, once, when the buffer is created.
        """
        if like.device.type != "cpu":
            return None
        dtype = like.dtype if dtype is None else dtype
        bufs = self.__dict__.setdefault("_scratch", {})
        buf = bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = bufs[name] = like.new_empty(shape, dtype=dtype)
            if init is not None:  # the parts every step leaves as they are
                init(buf)
        return buf

    def encode(self, p, x_BD, training=False):
        """Codes of ``x``: an :class:`EncodeOutput` when training, a dense (B, F) tensor otherwise."""
        raise NotImplementedError

    def losses(self, p, x_BD, enc, x_hat_BD, coef):
        """Architecture-specific loss terms, as a dict of scalar tensors.

        ``coef`` is the warm-up factor in [0, 1] of the sparsity coefficient.
        """
        return {}

    def after_step(self, p, enc):
        """Update buffers after an optimizer step (no gradients)."""

    # -- units --------------------------------------------------------------
    def fold_scale(self, p, scale):
        """Tensors in the user's units from tensors trained on ``scale * x``."""
        return {k: (v / scale if k in self.input_scaled else v) for k, v in p.items()}

    def unfold_scale(self, p, scale):
        """Inverse of :meth:`fold_scale`."""
        return {k: (v * scale if k in self.input_scaled else v) for k, v in p.items()}

    @staticmethod
    def init_encoder_bias(p):
        """Initial encoder bias (zeros); architectures may override."""
        return torch.zeros_like(p["W_enc"][:, 0])
