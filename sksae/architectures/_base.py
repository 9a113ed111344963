"""The architecture contract: everything one SAE architecture is, in one class.

An architecture declares

- its **hyperparameters** (:attr:`Architecture.hyperparameters`): which
  estimator parameters it reads (``k``, ``alpha``, ...) or which keys of the
  estimator's ``architecture_params`` dict, with their scikit-learn
  constraints and (for the latter) their defaults;
- its **forward** (:meth:`Architecture.encode`): training codes as an
  :class:`EncodeOutput`, inference codes as a dense (B, F) tensor;
- its **losses** (:meth:`Architecture.losses`), auxiliary ones included, from a
  typed :class:`LossInputs`;
- its **coefficient schedules** (:meth:`Architecture.coefficients`): values that
  depend on training progress (penalty warm-ups); the trainer keeps each as
  a device scalar refreshed before every step, so a recorded CUDA graph
  replays the current value;
- its **constraints after a step** (:meth:`Architecture.after_step`);
- its **fitted arrays** (:attr:`Architecture.public_names`,
  :attr:`Architecture.input_scaled`, :meth:`Architecture.fold_scale`,
  :meth:`Architecture.fitted_shapes`), which :mod:`sksae._io` saves and checks;
- its **peer mappings** (:meth:`Architecture.to_saelens`,
  :meth:`Architecture.from_saelens`, :attr:`Architecture.sparsify_activation`).

The estimator, the trainer, :mod:`sksae._io`, :mod:`sksae.interop` and the CLI
ask the registry (:mod:`sksae.architectures`) and these methods; none of them
names an architecture.

Parameters live in a plain dict of tensors so that the same ``encode`` serves
training (``nn.Parameter`` values in normalised units) and inference (tensors
rebuilt from the estimator's device-free fitted arrays, in the user's units).
Tensor names follow the field's shape-suffix habit: B rows, D input features
(``n_features``), F latents (``n_components``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._accel.select import encoder_product
from .._accel.sparse import Pattern, sparse_decode, use_sparse
from ..distributed._group import BatchInfo

__all__ = ["Architecture", "PenaltyWarmup", "EncodeOutput", "LossInputs", "Schedule",
           "SparseCodes", "decode"]


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
        return (self.indices.n_rows if isinstance(self.indices, Pattern)
                else self.values.shape[0])

    @property
    def mean_active(self):
        """Entries per row (their mean for a pattern)."""
        if isinstance(self.indices, Pattern):
            return self.values.shape[0] / max(1, self.n_rows)
        return self.indices.shape[-1]

    def to_dense(self, n_components):
        """The codes as a dense (B, n_components) tensor."""
        out = self.values.new_zeros(self.n_rows, n_components)
        if isinstance(self.indices, Pattern):
            return out.view(-1).index_put_((self.indices.flat(),), self.values).view(out.shape)
        return out.scatter_(1, self.indices, self.values)


class EncodeOutput(NamedTuple):
    """What an architecture's training encode returns.

    Attributes
    ----------
    codes : Tensor (B, F) or SparseCodes
        The latents fed to the decoder.
    pre : Tensor (B, F)
        Encoder pre-activations (for auxiliary losses).
    centred : Tensor (B, D) or None
        ``x - b_dec`` without a graph, when the encoder computed it (the sparse
        path), for the losses and statistics to reuse.
    """

    codes: object
    pre: torch.Tensor
    centred: object = None


class LossInputs(NamedTuple):
    """What :meth:`Architecture.losses` is given at every training step.

    Attributes
    ----------
    p : dict of Tensor
        Parameters and buffers (normalised units).
    x : Tensor of shape (B, D)
        The normalised batch.
    enc : EncodeOutput
        The training encode of ``x``.
    x_hat : Tensor of shape (B, D)
        The reconstruction from ``enc.codes``.
    coef : dict of float or Tensor
        The current values of :meth:`Architecture.coefficients`.
    dead : Tensor of shape (F,), bool, or None
        Latents that have not fired for the dead window; None when the trainer
        knows that none can be (architectures that declare
        ``uses_dead_latents`` only).
    ws : StepWorkspace or None
        The step's workspace, for the sparse kernels.
    batch : sksae.distributed.BatchInfo or None
        The global batch when training data-parallel (``x`` is this rank's
        part of it); None for one process. Losses are this rank's shares of
        the global batch's (:meth:`row_mean`, :attr:`n_rows`): the shares of
        every rank sum to the loss of the global batch.
    """

    p: dict
    x: torch.Tensor
    enc: EncodeOutput
    x_hat: torch.Tensor
    coef: dict
    dead: object
    ws: object
    batch: object = None

    @property
    def _global(self):
        return BatchInfo(self.x.shape[0]) if self.batch is None else self.batch

    @property
    def n_rows(self):
        """Rows of the global batch (``x``'s rows for one process)."""
        return self._global.n_rows

    def row_mean(self, t):
        """Mean over the global batch's rows of per-row values ``t`` (this rank's share)."""
        return self._global.row_mean(t)

    def total_variance(self, e_BD):
        """``sum ||e_b - mean(e)||^2`` over the global batch (at least 1e-12)."""
        return self._global.total_variance(e_BD)


class Schedule(NamedTuple):
    """How long training runs, for :meth:`Architecture.coefficients`.

    Attributes
    ----------
    total_steps : int or None
        Steps of the whole ``fit`` (None for ``partial_fit``).
    steps_per_epoch : int
    """

    total_steps: object
    steps_per_epoch: int

    @property
    def warmup_steps(self):
        """Steps of a penalty warm-up: 5% of a fit, the first epoch of a ``partial_fit``."""
        if self.total_steps is None:
            return self.steps_per_epoch
        return math.ceil(0.05 * self.total_steps)


def decode(codes, W_dec_FD, b_dec_D=None, kernels="auto", ws=None):
    """x_hat = codes @ W_dec + b_dec; sparse codes may touch only the active atoms.

    ``kernels`` ("auto", "sparse" or "dense") picks, for :class:`SparseCodes`,
    between the sparse kernels of :mod:`sksae._accel.sparse` (O(B k D)
    forward and backward) and a dense matmul, by
    :func:`sksae._accel.sparse.use_sparse`. ``b_dec_D=None`` adds no bias.
    ``ws``: the training step's workspace (a dense use of a decoder is noted
    there, so that the trainer projects its gradient itself).
    """
    if isinstance(codes, SparseCodes):
        n_components = W_dec_FD.shape[0]
        if use_sparse(n_components, codes.mean_active, kernels, W_dec_FD.device):
            return sparse_decode(codes.values, codes.indices, W_dec_FD, b_dec_D, ws=ws)
        codes = codes.to_dense(n_components)
    if ws is not None:
        ws.note_other_use(W_dec_FD)
    out = codes @ W_dec_FD
    return out if b_dec_D is None else out + b_dec_D


class Architecture:
    """Base class of SAE architectures (see the module docstring for the contract).

    Subclasses set :attr:`name` and implement :meth:`encode`; everything else
    has a default that fits a plain linear-encoder SAE.

    Parameters
    ----------
    hparams : dict
        Values of :attr:`hyperparameters`, already validated.
    n_components : int
    n_features : int
    """

    #: registry name (the estimator's ``architecture`` parameter)
    name = None
    #: {name: list of scikit-learn constraints}: the hyperparameters read,
    #: estimator parameters or keys of ``architecture_params``
    hyperparameters = {}
    #: defaults of the hyperparameters that are not estimator parameters
    defaults = {}
    #: whether :meth:`losses` reads ``LossInputs.dead`` (the trainer then
    #: tracks when a latent may be dead and records a step for each case)
    uses_dead_latents = False
    #: the global batch of the training step in progress
    #: (:class:`sksae.distributed.BatchInfo`, set by the trainer; None outside training)
    batch = None
    #: whether :meth:`losses` reads ``W_dec`` other than through :func:`decode`
    #: (the trainer then projects the decoder's summed gradient itself)
    decoder_in_losses = False
    #: extra tensors exported as fitted attributes: {tensor name: attribute name}
    public_names = {}
    #: tensors measured in input units (divided by the normalisation scale on export)
    input_scaled = ("b_enc", "b_dec")
    #: "auto", "sparse" or "dense": kernels for sparse codes (see ``use_sparse``)
    kernels = "auto"
    #: SAELens ``architecture`` this one exports to (None: no export)
    saelens_architecture = None
    #: sparsify ``activation`` this architecture exports to and imports (None: none)
    sparsify_activation = None

    def __init__(self, hparams, n_components, n_features):
        self.hparams = hparams
        self.n_components = n_components
        self.n_features = n_features

    # -- hyperparameters --------------------------------------------------------
    def check(self):
        """Raise ValueError when the hyperparameters do not fit the sizes."""

    def default_learning_rate(self):
        """The learning rate of ``learning_rate="auto"``."""
        return 1e-3

    def coefficients(self, step, schedule):
        """Coefficients of the losses at ``step`` ({name: float}), given a :class:`Schedule`."""
        return {}

    # -- parameters ---------------------------------------------------------
    def extra_parameters(self, params):
        """Extra trainable tensors, given the initialised base ``params``.

        Per-latent tensors (first dimension ``n_components``) are reset to
        these values when a dead latent is resampled.
        """
        return {}

    def extra_buffers(self, params):
        """Extra non-trainable state (e.g. an EMA threshold)."""
        return {}

    @staticmethod
    def init_encoder_bias(p):
        """Initial encoder bias (zeros); architectures may override."""
        return torch.zeros_like(p["W_enc"][:, 0])

    # -- forward ------------------------------------------------------------
    @staticmethod
    def pre_activation(p, x_BD):
        """``(x - b_dec) W_enc^T + b_enc``."""
        return encoder_product(p["b_enc"], x_BD - p["b_dec"], p["W_enc"])

    def encode(self, p, x_BD, training=False, ws=None):
        """Codes of ``x``: an :class:`EncodeOutput` when training, a dense (B, F) tensor otherwise.

        ``ws`` is the training step's workspace (None at inference).
        """
        raise NotImplementedError

    def losses(self, inp):
        """Architecture-specific loss terms from :class:`LossInputs`, as {name: scalar tensor}."""
        return {}

    def after_step(self, p, enc):
        """Update buffers after an optimizer step (no gradients)."""

    # -- fitted arrays --------------------------------------------------------
    def fold_scale(self, p, scale):
        """Tensors in the user's units from tensors trained on ``scale * x``."""
        return {k: (v / scale if k in self.input_scaled else v) for k, v in p.items()}

    @classmethod
    def fitted_shapes(cls, n_components):
        """{attribute: allowed shapes} of the fitted arrays of :attr:`public_names`."""
        return {attr: [(n_components,)] for attr in cls.public_names.values()}

    # -- peers ------------------------------------------------------------------
    def to_saelens(self, model):
        """``(tensors, cfg)`` of a SAELens folder for the fitted estimator ``model``.

        ``tensors`` holds the architecture's own SAELens tensors (the shared
        ``W_enc``, ``W_dec``, ``b_dec`` are written by :func:`sksae.interop.to_saelens`);
        ``cfg`` the config fields beyond the shared ones.
        """
        raise ValueError(f"architecture {self.name!r} has no SAELens equivalent.")

    @classmethod
    def from_saelens(cls, cfg, tensors, expect, shift_F):
        """Fitted attributes from a SAELens folder this architecture reads, or None.

        Parameters
        ----------
        cfg : dict
            The folder's ``cfg.json``.
        tensors : dict of ndarray
        expect : callable
            ``expect(name, shape)``: the tensor ``name``, checked to have ``shape``.
        shift_F : ndarray of shape (d_sae,)
            Added to the encoder's biases (folds ``apply_b_dec_to_input=False``).

        Returns
        -------
        None when the folder is not of this architecture, else ``(attrs, hparams)``:
        the fitted attributes beyond the shared ones (``encoder_bias_`` included)
        and the estimator parameters to set.
        """
        return None


class PenaltyWarmup:
    """Mixin: a sparsity penalty whose coefficient ramps up over :attr:`Schedule.warmup_steps`."""

    def coefficients(self, step, schedule):
        return {"sparsity": min(1.0, (step + 1) / max(1, schedule.warmup_steps))}
