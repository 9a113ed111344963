"""SparseAutoencoder: a scikit-learn transformer around the SAE trainer."""

from __future__ import annotations

import math
import os
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import (Interval, StrOptions,
                                             validate_parameter_constraints)
from sklearn.utils.validation import check_array, check_is_fitted

from . import architectures
from ._accel.device import local_rank_device, resolve_device
from ._accel.sparse import row_offsets
from ._base import (
    batched_apply,
    check_finite_output,
    inference_chunk_rows,
    make_generator,
    restore_on_failure,
    torch_dtype,
)
from ._data import (Rows, check_codes, check_input, head, iter_chunks, sample_rows,
                    sample_rows_torch, take)
from ._checkpoint import Checkpointer, read_checkpoint, write_checkpoint
from ._engine import BatchSource, EarlyStopping, LoopState, _diverged, run_minibatch_loop
from ._stream import StreamSource, as_shuffle
from ._sae_trainer import SAETrainer, init_parameters
from .distributed._group import (check_data_parallel, check_latent_sharded, plain_params,
                                 resolve_group, shared_random_state)
from .distributed._sharded import LatentShardedTrainer
from .distributed._launch import is_main_process

__all__ = ["SparseAutoencoder"]

# tensor name -> fitted attribute shared by every architecture
_BASE_PUBLIC = {
    "W_enc": "encoder_weights_",
    "b_enc": "encoder_bias_",
    "W_dec": "components_",
    "b_dec": "decoder_bias_",
}


def _fitted_names(arch):
    """{tensor name: fitted attribute} of every array the architecture exports."""
    return {**_BASE_PUBLIC, **arch.public_names}


def _inference_tensors(arch, arrays, device, dtype):
    """Inference tensors of ``arch`` from its fitted arrays (``arrays[attribute]``)."""
    return {k: torch.as_tensor(arrays[attr]).to(device, dtype)
            for k, attr in _fitted_names(arch).items()}


_SAMPLE_ROWS = 16384  # rows used for the normalisation scale, b_dec and data init
_MAX_DEAD_WINDOW = 10_000_000  # the peers' dead window, in rows


def _to_csr(codes):
    """A ``csr_array`` of a chunk of dense codes (a tensor on any device)."""
    nz = codes.nonzero()  # row-major: the CSR order
    rows, cols = nz[:, 0], nz[:, 1]
    indptr = row_offsets(rows, codes.shape[0])
    return sp.csr_array((codes[rows, cols].cpu().numpy(), cols.cpu().numpy(),
                         indptr.cpu().numpy()), shape=tuple(codes.shape))


def _sparse_decode(codes, W, b, chunk_rows):
    """``codes @ W + b`` for sparse ``codes``: a weighted sum of atoms per row, by chunks."""
    codes = sp.csr_array(codes)
    codes.sum_duplicates()
    outs = []
    with torch.inference_mode():
        for start in range(0, codes.shape[0], chunk_rows):
            part = codes[start:start + chunk_rows]
            cols = torch.from_numpy(part.indices.astype(np.int64)).to(W.device)
            offsets = torch.from_numpy(part.indptr[:-1].astype(np.int64)).to(W.device)
            weights = torch.from_numpy(part.data).to(W.device, W.dtype)
            out = torch.nn.functional.embedding_bag(cols, W, offsets, mode="sum",
                                                    per_sample_weights=weights)
            outs.append((out + b).cpu().numpy())
    if not outs:
        raise ValueError("Found array with 0 sample(s) (shape=(0, ...)).")
    return np.concatenate(outs)


class SparseAutoencoder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse autoencoder (SAE) dictionary learning, trained by minibatch Adam.

    Learns an overcomplete dictionary of unit-norm atoms (``components_``) and an
    amortised encoder such that ``X ~ transform(X) @ components_ + decoder_bias_``
    with few non-zero, non-negative codes per row. The encoder is
    ``z = f(W_enc (x - b_dec) + b_enc)`` where ``f`` is set by ``architecture``;
    the decoder is linear. Training follows the recipe of the strong SAE
    libraries (Gao et al. 2024; Bricken et al. 2023; EleutherAI sparsify):
    Adam with warm-up and final decay, gradient clipping, unit-norm decoder rows,
    geometric-median decoder bias, data-initialised atoms and the AuxK loss for
    dead latents.

    Parameters
    ----------
    n_components : int, default=None
        Number of dictionary atoms (latents). None means ``8 * n_features``.
    architecture : str, default="topk"
        Encoder nonlinearity and sparsity mechanism: the name of a registered
        architecture (:func:`sksae.architectures.available`; more can be added
        with :func:`sksae.architectures.register`). The built-in ones:

        - ``"topk"``: keep the ``k`` largest activations per row (Gao et al. 2024).
        - ``"batchtopk"``: keep the ``k * batch_size`` largest activations of a
          training batch (Bussmann et al. 2024); ``transform`` keeps the
          activations above the learned ``threshold_``, row by row.
        - ``"jumprelu"``: ``z = a * 1[a > threshold]`` with learned per-latent
          thresholds and an L0 penalty ``l0_coefficient``, trained with
          straight-through estimators (Rajamanoharan et al. 2024b).
        - ``"gated"``: a gate with an L1 penalty ``alpha`` decides which latents
          fire, an unpenalised magnitude path with shared weights how much
          (Rajamanoharan et al. 2024a).
        - ``"relu"``: ReLU with an L1 penalty of weight ``alpha`` on the
          decoder-norm-weighted codes (shrinks the codes).
        - ``"matryoshka"``: BatchTopK codes trained so that nested prefixes of
          the dictionary each reconstruct the input (Bussmann et al. 2025),
          which reduces feature absorption; prefix sizes in
          ``architecture_params["prefix_sizes"]``.
    architecture_params : dict, default=None
        Hyperparameters of the architecture that are not parameters of this
        estimator (e.g. ``{"prefix_sizes": [64, 256]}`` for ``"matryoshka"``),
        checked against the constraints the architecture declares. None means
        its defaults.
    k : int, default=32
        Number of active latents per row (L0; on average over a batch for
        ``"batchtopk"`` and ``"matryoshka"``). Only used by the TopK family
        (``"topk"``, ``"batchtopk"``, ``"matryoshka"``). Must not exceed the
        number of components.
    alpha : float, default=5.0
        L1 coefficient. Only used when ``architecture="relu"`` or ``"gated"``
        (on the gate activations). In normalised units (``normalize=True``:
        E||x||^2 = n_features); warmed up linearly over the first 5% of steps.
    l0_coefficient : float, default=1.0
        Weight of the L0 penalty (the price of one active latent, in squared
        normalised units). Only used when ``architecture="jumprelu"``; warmed up
        linearly over the first 5% of steps.
    bandwidth : float, default=0.05
        Width of the rectangle kernel of the straight-through estimators. Only
        used when ``architecture="jumprelu"``. In normalised units, where a
        typical activation is of order 1 (the peers' 0.001 is for inputs
        normalised to E||x||^2 = 1, i.e. ``sqrt(n_features)`` times smaller).
    threshold_init : float, default=0.5
        Initial threshold of every latent. Only used when
        ``architecture="jumprelu"``. In normalised units.
    threshold_momentum : float, default=0.999
        Momentum of the moving average of the smallest kept activation that
        becomes the inference threshold. Only used by ``"batchtopk"`` and
        ``"matryoshka"``. Early on the momentum is lower
        (``n / (n + 10)`` after ``n`` steps: about the last 10% of the steps),
        so that short fits forget the first batches.
    learning_rate : "auto" or float, default="auto"
        Adam learning rate. ``"auto"`` is ``2e-4 / sqrt(n_components / 2**14)``
        (Gao et al. 2024's scaling law) for the TopK family, and ``1e-3``
        for the penalty-based architectures (each architecture's
        ``default_learning_rate``).
    batch_size : int, default=256
        Rows per optimizer step. Small batches take more steps per pass, which
        recovers features from a few passes over small data sets faster; on a
        GPU with millions of rows, 4096 is the peers' choice.
    shuffle : {"auto", "rows", "blocks"} or bool, default="auto"
        How each epoch orders the rows. ``"rows"`` (or True): a random
        permutation of all rows. ``"blocks"``: contiguous blocks of
        ``shuffle_buffer // 16`` rows in a random order, read 16 at a time into
        a buffer whose rows are shuffled, so that reads from disk stay
        sequential. False: the rows in order. ``"auto"``: ``"blocks"`` for
        activation stores (:mod:`sksae.activations`), zarr and h5py arrays,
        ``"rows"`` for arrays and memory maps (the same batches as before).
    shuffle_buffer : int, default=None
        Rows per read of an out-of-core input (the shuffle buffer of
        ``"blocks"``); None means about 128 MiB of stored values. Larger
        buffers mix rows from more places of the input and take more memory.
    sparse_output : bool, default=False
        When True, :meth:`transform` returns a ``scipy.sparse.csr_array``,
        built chunk by chunk without ever holding the dense codes (1M rows of
        24,576 latents are 98 GB dense in float32, a few hundred MB sparse at
        ``k=32``).
    max_iter : int, default=20
        Maximum number of epochs (passes over the training data). The learning
        rate decays to zero over the last 20% of the ``max_iter`` epochs.
    tol : float, default=0.0
        Stop when the Frobenius norm of the change of the decoder in one step,
        divided by ``n_components``, is at most ``tol`` (scikit-learn's minibatch
        dictionary learning rule). 0 disables this criterion.
    max_no_improvement : int or None, default=None
        Stop after this many consecutive steps without a new minimum of the
        exponentially weighted average of the batch loss (weight
        ``batch_size / (n_samples + 1)``, the first epoch or 100 steps ignored),
        as scikit-learn's ``MiniBatchDictionaryLearning``. None (the default)
        disables it: SGD losses are noisy, and stopping early also skips the
        final learning-rate decay, so by default training runs ``max_iter``
        epochs. Values of 100 or more suit SAEs.
    init : {"data", "random"} or array-like of shape (n_components, n_features), default="data"
        Initial decoder atoms. ``"data"`` takes random centred training rows
        (Sharkey et al. 2022: faster early feature recovery); ``"random"`` draws
        Gaussian directions. The encoder starts as the decoder's transpose.
    normalize : bool, default=True
        Train on ``x * s`` with ``s`` chosen so that E||x s||^2 = n_features,
        then fold ``s`` back into the weights: every public array and every
        output is in the units of ``X``.
    auxk_alpha : float, default=1/32
        Weight of the AuxK loss that revives dead latents (TopK family only).
        A latent is dead when it has not fired for ``dead_window`` rows.
    resample_dead : int or None, default=None
        Every ``resample_dead`` steps, re-initialise the dead latents (any
        architecture; Bricken et al. 2023): inputs are drawn with probability
        proportional to their squared reconstruction error, the decoder row
        becomes the unit direction of ``x - b_dec``, the encoder row that
        direction times 0.2 times the mean norm of the alive encoder rows, the
        biases (and architecture-specific per-latent parameters) their initial
        values, and their Adam state is reset. None disables it.
    dead_window : int or "auto", default="auto"
        Rows without firing after which a latent is dead. ``"auto"`` is
        ``min(10_000_000, n_samples)``: one pass over a small data set, the
        peers' 10M rows for a large one.
    device : {"auto", "cpu", "cuda"} or str or torch.device, default="auto"
        Where to train and infer. ``"auto"`` uses CUDA when available.
    precision : {"auto", "float32", "bfloat16"}, default="auto"
        Precision of the training step's matrix products; parameters, their
        gradients and Adam's moments are always float32. ``"bfloat16"``: on
        CUDA the forward runs in bf16 autocast; on the CPU the TopK family's
        sparse path computes the encoder product that *selects* the active
        latents in bf16 (about twice as fast on CPUs with AVX512-BF16 or AMX), then
        their values and all gradients in float32, so bf16 rounding can only
        swap latents whose pre-activations tie to 3 significant digits.
        ``"auto"`` means ``"bfloat16"`` where the device computes it natively
        (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX) and
        ``"float32"`` elsewhere. ``transform`` is always float32. Use
        ``"float32"`` for results that do not depend on the CPU model.
    distributed : {"auto", "data", "latent"} or False, default="auto"
        Training across processes (user guide: "Training across
        processes"). ``"auto"``: data-parallel when ``fit`` runs inside an
        initialised ``torch.distributed`` process group of more than one
        process (as under ``torchrun``), otherwise one process. ``"data"``:
        data-parallel, a process group required (one process included).
        False: one process even inside a group. Data-parallel training cuts
        every batch of ``batch_size`` rows into one part per rank; each rank
        reads only its rows (of an array, memory map or activation store),
        the gradients and every statistic over the batch are summed across
        ranks, and every rank ends with the same model: the one a single
        process fits with the same ``batch_size`` and ``random_state`` (up
        to the order of floating-point sums). ``"latent"``: latent-sharded
        (``architecture="topk"`` only, no ``resample_dead``): each rank holds
        a slice of the latents (encoder and decoder rows, Adam moments, dead
        counters), steps on the whole batch, and the ranks merge their
        top-k candidates and sum their partial reconstructions; for
        dictionaries too wide for one device (1-D: not combined with data
        parallelism).
    checkpoint_dir : str or path-like, default=None
        Folder for the checkpoints of a long ``fit`` (created if need be).
        When it holds the checkpoint of an unfinished fit of the same
        parameters and data shape, ``fit`` resumes from it and ends with
        the model the uninterrupted fit would have given (for any number of
        data-parallel processes); a checkpoint of other parameters is an
        error, and one of a finished fit is replaced by a new fit. Each
        checkpoint (one ``checkpoint.safetensors`` file, replaced
        atomically) holds the parameters, optimizer moments, schedules,
        counters, random states, the data position and the metrics so far;
        the last one, written at the end, is marked finished. Only rank 0
        writes. ``partial_fit`` ignores it.
    checkpoint_every : int or str, default=None
        Steps between checkpoints (an int), or a wall-clock interval such as
        ``"90s"``, ``"15min"`` or ``"2h"``. None with a ``checkpoint_dir``:
        every 1000 steps. Across processes a duration is checked every 50
        steps (rank 0's clock), so a checkpoint may come up to 50 steps late.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation and shuffling. The same seed on the CPU gives the
        same model.
    verbose : int, default=0
        0 is silent; 1 shows a progress bar with the live loss, FVU and L0.
    warm_start : bool, default=False
        When True, ``fit`` continues from the previous solution (parameters,
        optimizer state and normalisation) instead of starting afresh.
    callback : callable, default=None
        Called after every step with the local variables of the training loop;
        returning False stops training.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Decoder atoms, unit-norm rows.
    encoder_weights_ : ndarray of shape (n_components, n_features)
        Encoder weights ``W_enc``.
    encoder_bias_ : ndarray of shape (n_components,)
        Encoder bias ``b_enc`` (user units).
    decoder_bias_ : ndarray of shape (n_features,)
        Decoder bias ``b_dec``, subtracted before encoding and added after decoding.
    threshold_ : ndarray of shape (n_components,) or float ndarray of shape ()
        Activation thresholds (user units): per latent for ``"jumprelu"``, one
        shared value for ``"batchtopk"``. Only set for those architectures.
    mag_scale_ : ndarray of shape (n_components,)
        ``exp(r_mag)``, the magnitude path's rescaling of the gate's weights.
        Only set when ``architecture="gated"``.
    mag_bias_ : ndarray of shape (n_components,)
        Bias of the magnitude path (user units). Only set when
        ``architecture="gated"``.
    n_components_ : int
        The resolved number of atoms.
    input_scale_ : float
        The normalisation factor ``s`` (1.0 when ``normalize=False``).
    n_iter_ : int
        Number of epochs run (rounded up), cumulated over ``partial_fit`` calls.
    n_steps_ : int
        Number of optimizer steps run.
    loss_curve_ : ndarray of shape (n_steps_,)
        Training loss at every step (normalised units).
    history_ : dict
        ``history_["step"]``: dict of per-step arrays (``loss``, ``mse``,
        ``fvu``, ``l0``, ``dead_fraction``, ``grad_norm`` (the gradients'
        norm before clipping), ``lr`` and architecture terms);
        ``history_["epoch"]``: their means per epoch.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when ``X`` has string feature names.

    See Also
    --------
    sksae.DictionaryLearnerGPU : scikit-learn's dictionary learning objective on torch.
    sklearn.decomposition.MiniBatchDictionaryLearning : the classical CPU solver.

    References
    ----------
    L. Gao et al. (2024), "Scaling and evaluating sparse autoencoders".
    T. Bricken et al. (2023), "Towards monosemanticity".
    L. Sharkey, D. Braun, B. Millidge (2022), "Taking features out of superposition
    with sparse autoencoders".

    Examples
    --------
    >>> from sksae import SparseAutoencoder
    >>> from sksae.datasets import make_sparse_superposition
    >>> X = make_sparse_superposition(n_samples=2000, n_features=16, n_components=32,
    ...                               random_state=0)
    >>> sae = SparseAutoencoder(n_components=64, k=4, max_iter=5, random_state=0)
    >>> codes = sae.fit_transform(X)
    >>> codes.shape
    (2000, 64)
    >>> bool((codes > 0).sum(axis=1).max() <= 4)
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "architecture": [StrOptions(architectures.NAMES)],
        "architecture_params": [dict, None],
        "k": [Interval(Integral, 1, None, closed="left")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "l0_coefficient": [Interval(Real, 0, None, closed="left")],
        "bandwidth": [Interval(Real, 0, None, closed="neither")],
        "threshold_init": [Interval(Real, 0, None, closed="neither")],
        "threshold_momentum": [Interval(Real, 0, 1, closed="left")],
        "learning_rate": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "shuffle": [StrOptions({"auto", "rows", "blocks"}), "boolean"],
        "shuffle_buffer": [Interval(Integral, 1, None, closed="left"), None],
        "sparse_output": ["boolean"],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_no_improvement": [Interval(Integral, 0, None, closed="left"), None],
        "init": [StrOptions({"data", "random"}), "array-like"],
        "normalize": ["boolean"],
        "auxk_alpha": [Interval(Real, 0, None, closed="left")],
        "resample_dead": [Interval(Integral, 1, None, closed="left"), None],
        "dead_window": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "precision": [StrOptions({"auto", "float32", "bfloat16"})],
        "distributed": [StrOptions({"auto", "data", "latent"}), "boolean"],
        "checkpoint_dir": [None, str, os.PathLike],
        "checkpoint_every": [None, Interval(Integral, 1, None, closed="left"), str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "callback": [None, callable],
    }

    def __init__(
        self,
        n_components=None,
        *,
        architecture="topk",
        architecture_params=None,
        k=32,
        alpha=5.0,
        l0_coefficient=1.0,
        bandwidth=0.05,
        threshold_init=0.5,
        threshold_momentum=0.999,
        learning_rate="auto",
        batch_size=256,
        shuffle="auto",
        shuffle_buffer=None,
        sparse_output=False,
        max_iter=20,
        tol=0.0,
        max_no_improvement=None,
        init="data",
        normalize=True,
        auxk_alpha=1 / 32,
        resample_dead=None,
        dead_window="auto",
        device="auto",
        precision="auto",
        distributed="auto",
        checkpoint_dir=None,
        checkpoint_every=None,
        random_state=None,
        verbose=0,
        warm_start=False,
        callback=None,
    ):
        self.n_components = n_components
        self.architecture = architecture
        self.architecture_params = architecture_params
        self.k = k
        self.alpha = alpha
        self.l0_coefficient = l0_coefficient
        self.bandwidth = bandwidth
        self.threshold_init = threshold_init
        self.threshold_momentum = threshold_momentum
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.sparse_output = sparse_output
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init = init
        self.normalize = normalize
        self.auxk_alpha = auxk_alpha
        self.resample_dead = resample_dead
        self.dead_window = dead_window
        self.device = device
        self.precision = precision
        self.distributed = distributed
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callback = callback

    # ------------------------------------------------------------------ setup
    def _architecture(self, n_components, n_features):
        """The architecture object with its hyperparameters, validated.

        Each hyperparameter the architecture declares is this estimator's
        parameter of that name, or else a key of ``architecture_params``.
        """
        cls = architectures.get(self.architecture)
        params = self.get_params(deep=False)
        extra = dict(self.architecture_params or {})
        unknown = sorted(set(extra) - (set(cls.hyperparameters) - set(params)))
        if unknown:
            accepted = sorted(set(cls.hyperparameters) - set(params))
            raise ValueError(
                f"architecture_params has {unknown}, which architecture="
                f"{self.architecture!r} does not take (it takes {accepted}).")
        missing = sorted(name for name in cls.hyperparameters
                         if name not in params and name not in extra and name not in cls.defaults)
        if missing:
            raise ValueError(f"architecture={self.architecture!r} needs {missing} in "
                             "architecture_params (they have no default).")
        hparams = {name: params[name] if name in params
                   else extra[name] if name in extra else cls.defaults[name]
                   for name in cls.hyperparameters}
        validate_parameter_constraints(cls.hyperparameters, hparams,
                                       caller_name=f"{type(self).__name__}({self.architecture})")
        arch = cls(hparams, n_components, n_features)
        arch.check()
        return arch

    def _resolve(self, n_features):
        """Resolved sizes and learning rate; raises before any state changes."""
        n_components = self.n_components if self.n_components is not None else 8 * n_features
        arch = self._architecture(n_components, n_features)
        if not isinstance(self.init, str):
            init = check_array(self.init, dtype=np.float64)
            if init.shape != (n_components, n_features):
                raise ValueError(
                    f"init has shape {init.shape}; expected (n_components, n_features) "
                    f"= ({n_components}, {n_features})."
                )
        if self.learning_rate == "auto":
            lr = arch.default_learning_rate()
        else:
            lr = float(self.learning_rate)
        return arch, n_components, lr

    def _validate(self, X, reset):
        """``X`` as an ndarray, or as :class:`~sksae._data.Rows` read batch by batch."""
        return check_input(self, X, reset=reset)

    # ---------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the autoencoder on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (dense; float32 data trains without a copy on the CPU).
            A torch tensor, a float16 or bfloat16 input (read batch by batch as
            float32), or an out-of-core input (:mod:`sksae.activations`).
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted estimator.

        Raises
        ------
        sksae.TrainingDivergedError
            When training diverges: a step's loss or gradient norm, or the
            trained parameters, are not finite (too large a
            ``learning_rate``, or data too large for ``normalize=False``).
            The message names the step. Checked when the training loop reads
            its metrics, without extra synchronisation (every 32 steps on
            accelerators); on the CPU a step whose gradient norm is not
            finite is never applied.

        Notes
        -----
        Whatever the exception, :class:`KeyboardInterrupt` included, the
        estimator is left exactly as it was before the call: fitted
        attributes, training state and random state (a first fit that fails
        leaves it unfitted).
        A ``RandomState`` instance given as ``random_state`` is rewound too;
        numpy's global one (used with ``random_state=None``) is not.
        """
        with restore_on_failure(self):
            resume = self.warm_start and hasattr(self, "_train_state")
            X = self._validate(X, reset=not resume)
            self._train(X, max_epochs=self.max_iter, resume=resume, partial=False)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Run one epoch of minibatch steps over ``X``, continuing previous training.

        The first call initialises the model (normalisation scale, decoder bias,
        atoms) from ``X``. The learning-rate (and sparsity-penalty) warm-up lasts
        the steps of the first call, at most 1000; there is no final decay, since
        the total length of training is unknown.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A chunk of training data.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            Fitted estimator.

        Raises
        ------
        sksae.TrainingDivergedError
            When training diverges: a step's loss or gradient norm, or the
            trained parameters, are not finite (too large a
            ``learning_rate``, or data too large for ``normalize=False``).
            The message names the step. Checked when the training loop reads
            its metrics, without extra synchronisation (every 32 steps on
            accelerators); on the CPU a step whose gradient norm is not
            finite is never applied.

        Notes
        -----
        Whatever the exception, :class:`KeyboardInterrupt` included, the
        estimator is left exactly as it was before the call: fitted
        attributes, training state and random state (a first fit that fails
        leaves it unfitted).
        A ``RandomState`` instance given as ``random_state`` is rewound too;
        numpy's global one (used with ``random_state=None``) is not.
        """
        with restore_on_failure(self):
            resume = hasattr(self, "_train_state")
            if not resume and hasattr(self, "components_"):
                warnings.warn(
                    "This model has no training state (it was loaded with sksae.load or "
                    "imported); partial_fit starts a new training run. Pass "
                    "init=model.components_ to start from its atoms.", UserWarning)
            X = self._validate(X, reset=not resume)
            self._train(X, max_epochs=1, resume=resume, partial=True)
        return self

    def _train(self, X, *, max_epochs, resume, partial):
        n_samples, n_features = X.shape
        arch, n_components, lr = self._resolve(n_features)
        group = resolve_group(self.distributed)
        device = resolve_device(self.device) if group is None else local_rank_device(self.device)
        latent = group is not None and self.distributed == "latent"
        if latent:
            check_latent_sharded(group, self, n_samples, n_features, resume or partial, device)
        elif group is not None:
            check_data_parallel(group, self, n_samples, n_features, device)
        dtype = torch.float32
        saved = None if partial else self._saved_checkpoint(n_samples, n_features, group)
        # a checkpoint of this fit, or the state of the previous one (warm_start, partial_fit)
        previous = saved if saved is not None else self._train_state if resume else None
        if previous is not None:
            # a private generator: with random_state=None, check_random_state returns
            # numpy's global one, whose state must not be rewound
            rng = np.random.RandomState()
            rng.set_state(previous["rng"])
            scale, dead_window = previous["scale"], previous["dead_window"]
            # copies: the trainer updates its tensors in place, and the state must stay
            # as it is should this call fail (restore_on_failure puts it back)
            params = {k: v.to(device, dtype, copy=True)
                      for k, v in previous["trainer"]["params"].items()}
            buffers = {k: v.to(device, dtype, copy=True)
                       for k, v in previous["trainer"]["buffers"].items()}
            generator = make_generator(rng)
        else:
            rng = shared_random_state(group, self.random_state)
            generator = make_generator(rng)
            params, buffers, scale, calibration = self._initial_parameters(
                X, arch, n_components, rng, generator, device, dtype)
            if group is not None:  # the same draws on every rank: rank 0's, to the bit
                for t in (*params.values(), *buffers.values()):
                    group.broadcast_(t)
            dead_window = (min(_MAX_DEAD_WINDOW, n_samples) if self.dead_window == "auto"
                           else self.dead_window)
        steps_per_epoch = math.ceil(n_samples / min(self.batch_size, n_samples))

        total_steps = None if partial else max_epochs * steps_per_epoch
        schedule = architectures.Schedule(total_steps, steps_per_epoch)
        if latent and saved is not None:  # the trainer takes full shapes, the state its slice
            params = {"W_enc": params["W_dec"].new_zeros(n_components, n_features),
                      "b_enc": params["W_dec"].new_zeros(n_components),
                      "W_dec": params["W_dec"].new_zeros(n_components, n_features),
                      "b_dec": params["b_dec"]}
        trainer = (LatentShardedTrainer if latent else SAETrainer)(
            arch, params, buffers, lr=lr, schedule=schedule,
            warmup_steps=min(1000, steps_per_epoch if partial else math.ceil(0.05 * total_steps)),
            dead_window=dead_window, precision=self.precision, group=group,
        )
        if previous is not None:
            trainer.load_state_dict(previous["trainer"] if latent else
                                    {**previous["trainer"], "params": {}, "buffers": {}})
        else:
            trainer.calibrate_encoder_scale(calibration)

        # the batches come normalised (multiplied by scale in the gather)
        source = self._batch_source(X, device, dtype, generator, scale,
                                    None if latent else group)
        stopper = None if partial else EarlyStopping(
            n_samples, source.batch_size, self.tol, self.max_no_improvement)
        prev = {}

        def param_change():
            W = (trainer.full_params() if latent else trainer.params)["W_dec"].detach()
            change = (W - prev["W"]).norm().item() / n_components if "W" in prev else None
            prev["W"] = W.clone()
            return change

        def step(batch, i, total):
            out = trainer.step(batch, batch.shape[0] if latent
                               else source.rows_in_step(i)).as_dict()
            out["lr"] = trainer.current_lr
            if self.resample_dead is not None:
                out["resampled"] = float(
                    trainer.step_count % self.resample_dead == 0
                    and self._resample(trainer, X, scale, device, dtype, generator))
            return out

        def checkpoint_state(loop_state, complete=False):
            return {"fingerprint": self._fingerprint(n_samples, n_features),
                    "complete": complete, "trainer": trainer.state_dict(), "scale": scale,
                    "dead_window": dead_window, "rng": rng.get_state(),
                    "loop": loop_state._asdict()}

        checkpointer = None
        folder = self._checkpoint_folder(group)
        if folder is not None and not partial:
            checkpointer = Checkpointer(
                folder, 1000 if self.checkpoint_every is None
                else self.checkpoint_every, checkpoint_state,
                write=latent or is_main_process(), group=group, device=device)
        hint = self._divergence_hint(lr, resume, scale)
        result = run_minibatch_loop(
            step, source, max_epochs=max_epochs, stopper=stopper, callback=self.callback,
            verbose=self.verbose if group is None or group.rank == 0 else 0,  # one bar
            desc=f"{type(self).__name__}({self.architecture})",
            param_change=param_change if self.tol > 0 else None,
            postfix_keys=("loss", "fvu", "l0", "dead_fraction"),
            finite=("loss", "grad_norm"), divergence_hint=hint,
            start=None if saved is None else LoopState(**saved["loop"]),
            checkpoint=checkpointer,
        )
        exported = self._exported(arch, trainer, scale, X.dtype)
        if not self._usable(arch, exported, X, device):
            # finite losses and gradients can still step to an overflow at the last step,
            # or to weights so large that the user's units or a forward pass overflow
            raise _diverged(type(self).__name__ + f"({self.architecture})", result.n_steps,
                            steps_per_epoch, "parameters", None, hint)
        if checkpointer is not None and checkpointer.write_files:
            write_checkpoint(folder, checkpoint_state(LoopState(
                result.n_steps, result.records, None, generator.get_state(),
                generator.get_state()), complete=True))
        for attr, value in exported.items():
            setattr(self, attr, value)
        self._record(result, steps_per_epoch, resume)
        self.n_components_ = n_components
        self.input_scale_ = float(scale)
        self._train_state = {
            "trainer": trainer.state_dict(),
            "scale": scale,
            "dead_window": dead_window,
            "rng": rng.get_state(),
        }

    def _fingerprint(self, n_samples, n_features):
        """What a checkpoint must match to resume this fit: the data's shape and parameters."""
        skip = ("callback", "verbose", "device", "checkpoint_dir", "checkpoint_every",
                "distributed", "warm_start")
        return {"n_samples": n_samples, "n_features": n_features,
                **plain_params(self, skip)}

    def _checkpoint_folder(self, group):
        """Where this process's checkpoints go: ``checkpoint_dir``, a folder per rank if sharded."""
        if self.checkpoint_dir is None:
            return None
        if group is not None and self.distributed == "latent":
            return os.path.join(self.checkpoint_dir, f"rank-{group.rank}-of-{group.world_size}")
        return self.checkpoint_dir

    def _saved_checkpoint(self, n_samples, n_features, group=None):
        """The state of ``checkpoint_dir``'s unfinished checkpoint of this fit, or None."""
        folder = self._checkpoint_folder(group)
        if folder is None:
            return None
        saved = read_checkpoint(folder)
        if saved is None or saved["complete"]:
            return None
        expected = self._fingerprint(n_samples, n_features)
        if saved["fingerprint"] != expected:
            diff = sorted(k for k in set(expected) | set(saved["fingerprint"])
                          if expected.get(k) != saved["fingerprint"].get(k))
            raise ValueError(
                f"checkpoint_dir {str(self.checkpoint_dir)!r} holds the checkpoint of an "
                f"unfinished fit with other {', '.join(diff)}; resume it with the same "
                "parameters and data, or choose another checkpoint_dir.")
        return saved

    def _batch_source(self, X, device, dtype, generator, scale, group=None):
        """Minibatches of ``X``: in memory as before, else read by a background thread."""
        shuffle = self.shuffle
        if not isinstance(X, Rows) and shuffle in ("auto", "rows", True):
            return BatchSource(X, self.batch_size, device, dtype, generator, shuffle="epoch",
                               scale=scale, group=group)
        if not isinstance(X, Rows) and shuffle is False:
            return BatchSource(X, self.batch_size, device, dtype, generator, shuffle="none",
                               scale=scale, group=group)
        rows = X if isinstance(X, Rows) else Rows(X)
        return StreamSource(rows, self.batch_size, device, dtype, generator,
                            shuffle=as_shuffle(shuffle, rows), buffer_rows=self.shuffle_buffer,
                            scale=scale, group=group)

    def _divergence_hint(self, lr, resume, scale):
        """The advice of a :class:`TrainingDivergedError`."""
        advice = f"Lower learning_rate (it is {lr:.3g})"
        if not self.normalize:
            advice += " or set normalize=True"
        elif resume:
            advice += (", or train on data of the scale of the first fit's (normalize=True "
                       f"fixed input_scale_={scale:.3g} then)")
        return advice + ". The model is left as it was before this call."

    def _initial_parameters(self, X, arch, n_components, rng, generator, device, dtype):
        """Normalisation scale, initial tensors (training units) and the calibration sample.

        The sample (up to 4096 normalised rows) calibrates the encoder's scale
        once the trainer exists (:meth:`SAETrainer.calibrate_encoder_scale`).
        """
        n_samples, n_features = X.shape
        sample = take(X, sample_rows(rng, n_samples, _SAMPLE_ROWS))
        sample = torch.as_tensor(sample, dtype=torch.float64)
        scale = 1.0
        if self.normalize:
            sq = sample.pow(2).sum(-1).mean().item()
            scale = math.sqrt(n_features / sq) if sq > 0 else 1.0
        sample = sample * scale
        params = init_parameters(sample, n_components, self.init, generator, dtype, device)
        params.update(arch.extra_parameters(params))
        buffers = arch.extra_buffers(params)
        params["b_enc"] = arch.init_encoder_bias(params)
        return params, buffers, scale, sample[:4096]

    @staticmethod
    def _resample(trainer, X, scale, device, dtype, generator):
        """Resample dead latents from up to ``_SAMPLE_ROWS`` random rows of ``X``."""
        rows = sample_rows_torch(generator, X.shape[0], _SAMPLE_ROWS)
        sample = torch.as_tensor(take(X, np.sort(rows))).to(device, dtype) * scale
        return trainer.resample_dead_latents(sample, generator)

    @staticmethod
    def _exported(arch, trainer, scale, dtype):
        """{attribute: array}: the fitted attributes in the user's units, of ``dtype``."""
        full = (trainer.full_params() if isinstance(trainer, LatentShardedTrainer)
                else {**trainer.params, **trainer.buffers})
        p = {k: v.detach() for k, v in full.items()}
        p = arch.fold_scale(p, scale)
        with np.errstate(over="ignore"):  # an overflow is refused by _usable
            return {attr: p[tensor_name].to("cpu", torch.float64).numpy().astype(dtype)
                    for tensor_name, attr in _fitted_names(arch).items()}

    @staticmethod
    def _usable(arch, exported, X, device, n_rows=256):
        """Whether the fitted arrays are finite and encode and decode rows of ``X`` finitely."""
        if not all(np.isfinite(a).all() for a in exported.values()):
            return False
        dtype = torch_dtype(exported["components_"].dtype)
        p = _inference_tensors(arch, exported, device, dtype)
        rows = np.asarray(head(X, n_rows))
        if not np.isfinite(rows).all():
            return True  # the input itself is not finite: nothing to learn from it
        with torch.inference_mode():
            x = torch.as_tensor(rows).to(device, dtype)
            codes = arch.encode(p, x)
            recon = codes @ p["W_dec"] + p["b_dec"]
            return bool(torch.isfinite(codes).all() and torch.isfinite(recon).all())

    def _record(self, result, steps_per_epoch, resume):
        """Per-step records and their per-epoch means, appended when resuming."""
        prev = self.history_["step"] if resume and hasattr(self, "history_") else None
        first_epoch = prev["epoch"][-1] + 1 if prev is not None and len(prev["epoch"]) else 0
        records = dict(result.records)
        n_new = result.n_steps
        records["epoch"] = first_epoch + np.arange(n_new) // steps_per_epoch
        if prev is not None:
            records = {k: np.concatenate([prev.get(k, np.full(len(prev["epoch"]), np.nan)), v])
                       for k, v in records.items()}
        epochs, starts = np.unique(records["epoch"], return_index=True)
        ends = np.append(starts[1:], len(records["epoch"]))
        epoch_hist = {k: np.array([v[a:b].mean() for a, b in zip(starts, ends)])
                      for k, v in records.items() if k != "epoch"}
        epoch_hist["epoch"] = epochs
        self.history_ = {"step": records, "epoch": epoch_hist}
        self.loss_curve_ = records.get("loss", np.zeros(0))
        self.n_steps_ = (self.n_steps_ if resume else 0) + n_new
        self.n_iter_ = (self.n_iter_ if resume else 0) + math.ceil(result.n_epochs)

    # -------------------------------------------------------------- inference
    def _inference_params(self, device, dtype):
        arch = self._architecture(self.n_components_, self.n_features_in_)
        return arch, _inference_tensors(arch, vars(self), device, dtype)

    def transform(self, X):
        """Encode ``X`` into sparse non-negative codes.

        Rows are encoded independently, in memory-bounded chunks. An activation
        store, memory map, zarr or h5py array is read chunk by chunk, each
        chunk checked for NaN/inf; to write the codes of an input too large
        for them to disk, use :func:`sksae.activations.transform_to_store`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Or an out-of-core input (:mod:`sksae.activations`).

        Returns
        -------
        codes : ndarray or scipy.sparse.csr_array of shape (n_samples, n_components)
            Same floating dtype as ``X`` (integers become float64; float16 and
            bfloat16 inputs give float32). A ``csr_array`` when
            ``sparse_output=True``.

        Raises
        ------
        ValueError
            When finite ``X`` overflows the codes' dtype with this model, or
            a row of an ``X`` read in chunks (out of core, half precision, or
            a tensor on a GPU) is not finite (the message names it).
        """
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        device = resolve_device(self.device)
        dtype = torch_dtype(X.dtype)
        arch, p = self._inference_params(device, dtype)
        chunk = inference_chunk_rows(self.n_components_, X.dtype.itemsize)
        if not self.sparse_output and not isinstance(X, Rows):
            codes = batched_apply(lambda xb: arch.encode(p, xb), X, device=device,
                                  dtype=dtype, chunk_rows=chunk)
            return check_finite_output(codes, X, self)
        parts = []
        with torch.inference_mode():
            for _, xb in iter_chunks(X, chunk, device, dtype):
                codes = arch.encode(p, xb)
                if not torch.isfinite(codes).all():
                    check_finite_output(codes.cpu().numpy(), xb.cpu().numpy(), self)
                parts.append(_to_csr(codes) if self.sparse_output else codes.cpu().numpy())
        if self.sparse_output:
            return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        return np.concatenate(parts)

    def inverse_transform(self, X):
        """Reconstruct data from codes: ``codes @ components_ + decoder_bias_``.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_components)
            Codes, e.g. from :meth:`transform` (dense, or sparse with
            ``sparse_output=True``).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        codes = check_codes(X, accept_sparse=["csr"])
        if codes.shape[1] != self.n_components_:
            raise ValueError(
                f"X has {codes.shape[1]} features (codes), but {type(self).__name__} "
                f"has {self.n_components_} components."
            )
        device = resolve_device(self.device)
        dtype = torch_dtype(codes.dtype)
        W = torch.as_tensor(self.components_).to(device, dtype)
        b = torch.as_tensor(self.decoder_bias_).to(device, dtype)
        chunk = inference_chunk_rows(max(self.n_components_, self.n_features_in_),
                                     codes.itemsize if not sp.issparse(codes)
                                     else codes.dtype.itemsize)
        if sp.issparse(codes):
            return _sparse_decode(codes, W, b, chunk)
        return batched_apply(lambda zb: zb @ W + b, codes, device=device, dtype=dtype,
                             chunk_rows=chunk)

    def score(self, X, y=None):
        """Fraction of variance explained (FVE) of the reconstruction of ``X``.

        ``FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, the mean taken
        per input feature over the rows of ``X``; equal to
        ``r2_score(X, X_hat, multioutput="variance_weighted")``. ``X`` is
        encoded and scored chunk by chunk, in bounded memory whatever its size
        (float64 sums, the chunks' means and variances merged as Chan et al.).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Or an out-of-core input (:mod:`sksae.activations`).
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        device = resolve_device(self.device)
        dtype = torch_dtype(X.dtype)
        arch, p = self._inference_params(device, dtype)
        # chunk by chunk for every X: the codes of all rows at once are n_samples x
        # n_components (800 GB for 100k rows of 1M latents)
        chunk = inference_chunk_rows(self.n_components_, X.dtype.itemsize)
        n, mean, m2, sse = 0, None, None, 0.0
        with torch.inference_mode():
            for _, xb in iter_chunks(X, chunk, device, dtype):
                codes = arch.encode(p, xb)
                recon = codes @ p["W_dec"] + p["b_dec"]
                x64 = xb.double()
                chunk_sse = float((x64 - recon.double()).square().sum())
                if not math.isfinite(chunk_sse):  # an overflow in the codes propagates here
                    check_finite_output(codes.cpu().numpy(), xb.cpu().numpy(), self)
                sse += chunk_sse
                nb, mb = len(xb), x64.mean(0)
                m2b = (x64 - mb).square().sum(0)
                if mean is None:
                    n, mean, m2 = nb, mb, m2b
                else:
                    delta = mb - mean
                    total = n + nb
                    mean = mean + delta * (nb / total)
                    m2 = m2 + m2b + delta.square() * (n * nb / total)
                    n = total
        sst = float(m2.sum())
        return 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)

    @property
    def _n_features_out(self):
        return self.n_components_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
