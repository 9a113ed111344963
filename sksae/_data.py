"""Inputs the estimators read without loading: activation stores, memory maps, zarr, h5py.

:func:`check_input` is the estimators' one entry for ``X``. In-memory arrays
go through scikit-learn's ``validate_data`` as before (with its full NaN/inf
scan). Out-of-core inputs, float16 arrays, and in-memory arrays larger than
``FULL_SCAN_BYTES``, come back as :class:`Rows`: their shape and features are
checked, their values are not read, and every batch or chunk read later is
checked for NaN/inf instead (the error names the row).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import _check_feature_names, _check_n_features, validate_data

from .activations._store import ActivationStore

__all__ = ["Rows", "is_out_of_core", "streamed", "check_input", "check_codes", "take",
           "take_tensor", "head",
           "FULL_SCAN_BYTES", "NonFiniteRowError", "sample_rows", "sample_rows_torch"]

#: in-memory arrays larger than this are checked batch by batch, not scanned whole
FULL_SCAN_BYTES = 2 * 2**30

_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
          np.dtype(np.float64): torch.float64}


class NonFiniteRowError(ValueError):
    """NaN or infinity found in a row of an input read batch by batch."""


def is_out_of_core(X):
    """Whether ``X`` is read row range by row range rather than taken as an array.

    Activation stores, numpy memory maps, and zarr and h5py arrays.
    """
    if isinstance(X, (ActivationStore, np.memmap)):
        return True
    if isinstance(X, (np.ndarray, torch.Tensor, list, tuple)) or sp.issparse(X):
        return False
    root = type(X).__module__.split(".")[0]
    return root in ("zarr", "h5py") and len(getattr(X, "shape", ())) == 2


class Rows:
    """Row access to a 2-D input that is not loaded: reads and gathers as host tensors.

    Parameters
    ----------
    X : ActivationStore, np.memmap, ndarray, torch.Tensor, zarr or h5py array
        A tensor is a bfloat16 one on the CPU, or any floating tensor on an
        accelerator, read where it is (see :func:`_host`).

    Attributes
    ----------
    shape : tuple
    raw_dtype : torch.dtype
        The dtype reads return (the storage dtype).
    dtype : numpy.dtype
        The dtype computations and outputs use: float64 for float64 data,
        float32 otherwise.
    blocks : bool
        Whether random row reads are slow here (stores, zarr, h5py), so that
        shuffling should read contiguous blocks.
    device : torch.device
        Where reads return their rows: the accelerator of a tensor that is
        on one, else the CPU.
    on_device : bool
        Whether ``X`` is a tensor read where it is (:func:`_stays_on_device`):
        no pinned staging, no reading ahead in another thread.
    """

    def __init__(self, X):
        self.X = X
        self.shape = tuple(int(s) for s in X.shape)
        if isinstance(X, ActivationStore):
            self.raw_dtype = X._torch_dtype
        elif isinstance(X, torch.Tensor):
            self.raw_dtype = X.dtype
        else:
            self.raw_dtype = _TORCH[np.dtype(X.dtype)]
        self.dtype = np.dtype(np.float64 if self.raw_dtype == torch.float64 else np.float32)
        self.blocks = not isinstance(X, (np.ndarray, torch.Tensor))
        self.device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
        self.on_device = isinstance(X, torch.Tensor) and _stays_on_device(X)
        self.nbytes = self.shape[0] * self.shape[1] * torch.empty(
            (), dtype=self.raw_dtype).element_size()

    @property
    def n_samples(self):
        return self.shape[0]

    def read(self, start, stop):
        """Rows ``start:stop`` (a tensor of ``raw_dtype`` on :attr:`device`, a copy)."""
        if isinstance(self.X, ActivationStore):
            return self.X.read_raw(start, stop)
        if isinstance(self.X, torch.Tensor):
            return self.X[start:stop].clone(memory_format=torch.contiguous_format)
        return torch.from_numpy(np.array(self.X[start:stop], order="C"))

    def read_into(self, out, start, stop):
        """Copy rows ``start:stop`` into ``out``, a host tensor of ``raw_dtype`` (one copy)."""
        if isinstance(self.X, torch.Tensor):
            out.copy_(self.X[start:stop])
            return
        target = out.view(torch.int16).numpy() if out.dtype == torch.bfloat16 else out.numpy()
        if isinstance(self.X, ActivationStore):
            self.X.read_into(target.view(self.X._file_dtype), start, stop)
        else:
            target[...] = self.X[start:stop]

    def take(self, rows):
        """Rows ``rows`` (int array, any order, repeats allowed) on :attr:`device` (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.X, ActivationStore):
            return self.X.take_raw(rows)
        if isinstance(self.X, torch.Tensor):
            return self.X.index_select(0, torch.from_numpy(rows).to(self.device))
        if isinstance(self.X, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.X[rows]))
        # zarr and h5py read sorted, distinct rows
        unique, inverse = np.unique(rows, return_inverse=True)
        if hasattr(self.X, "get_orthogonal_selection"):
            got = self.X.get_orthogonal_selection((unique, slice(None)))
        else:
            got = self.X[unique]
        return torch.from_numpy(np.ascontiguousarray(np.asarray(got)[inverse]))

    def where(self, row):
        """The place of ``row`` in the input, for messages."""
        if isinstance(self.X, ActivationStore):
            return self.X._where(row)
        return f"row {row}"

    def check_finite(self, batch, row_ids):
        """Raise :class:`NonFiniteRowError` naming the first non-finite row of ``batch``.

        ``row_ids``: the rows of the input the batch's rows are (a host tensor
        or array, or a start offset for contiguous rows).
        """
        bad = ~torch.isfinite(batch).all(dim=1)
        if bool(bad.any()):
            self.raise_row(int(bad.to(torch.int8).argmax()), row_ids)

    def raise_row(self, j, row_ids):
        """Raise :class:`NonFiniteRowError` for row ``j`` of a batch of rows ``row_ids``."""
        row = int(row_ids + j) if isinstance(row_ids, int) else int(row_ids[j])
        raise NonFiniteRowError(
            f"Input X contains NaN or infinity in {self.where(row)}. Every batch is checked "
            "as it is read; the estimator is left as it was before this call.")


def _check_dtype(X):
    if isinstance(X, (ActivationStore, torch.Tensor)):  # tensors: float16 or bfloat16 here
        return
    dtype = np.dtype(X.dtype)
    if dtype not in _TORCH:
        raise ValueError(
            f"sksae reads out-of-core inputs (stores, memory maps, zarr and h5py arrays) of "
            f"dtype float16, bfloat16 (stores), float32 or float64; got {dtype}. Convert it, "
            "e.g. with sksae.activations.save_store(X, path, dtype='float32').")


def check_input(estimator, X, *, reset, order=None):
    """``X`` validated for ``estimator``: an ndarray, or :class:`Rows` read batch by batch.

    Parameters
    ----------
    estimator : BaseEstimator
    X : array-like or out-of-core input
    reset : bool
        Whether to set ``n_features_in_`` (``fit``), or check it.
    order : {"C", None}
        Memory order for in-memory arrays (scikit-learn's ``order``).

    Returns
    -------
    X : ndarray or Rows
    """
    if isinstance(X, torch.Tensor):
        X = _host(X)
    if not is_out_of_core(X) and not _in_batches(X):
        big = getattr(X, "nbytes", 0) > FULL_SCAN_BYTES
        X = validate_data(estimator, X, dtype=[np.float64, np.float32], order=order,
                          reset=reset, ensure_all_finite=not big)
        return Rows(X) if big else X
    shape = tuple(X.shape)
    if len(shape) != 2:
        raise ValueError(f"Expected a 2D array, got an input of shape {shape}.")
    if shape[0] < 1:
        raise ValueError(f"Found array with 0 sample(s) (shape={shape}) while a minimum of 1 "
                         "is required.")
    if shape[1] < 1:
        raise ValueError(f"Found array with 0 feature(s) (shape={shape}) while a minimum of 1 "
                         "is required.")
    _check_dtype(X)
    _check_feature_names(estimator, X, reset=reset)
    _check_n_features(estimator, X, reset=reset)
    return Rows(X)


def _in_batches(X):
    """Whether ``X`` (after :func:`_host`) is in memory but read batch by batch as :class:`Rows`.

    float16 or bfloat16 values are read batch by batch and converted to
    float32 on the device, as from a memory map or a store: ``validate_data``
    would first copy them whole into float64 (4x their size), the dtype
    scikit-learn picks for float16 (and numpy has no bfloat16). A tensor on an
    accelerator is read there, batch by batch, instead of being copied to the
    host and back.
    """
    return isinstance(X, np.ndarray) and X.dtype == np.float16 or isinstance(X, torch.Tensor)


def streamed(X):
    """``X`` as :class:`Rows` when the estimators read it batch by batch, else None.

    Out-of-core inputs, float16 or bfloat16 values in memory (arrays or
    tensors), and floating tensors on an accelerator; a float32 or float64
    tensor on the CPU is an array (None).
    """
    if isinstance(X, torch.Tensor):
        X = _host(X)
    return Rows(X) if is_out_of_core(X) or _in_batches(X) else None


def _host(X):
    """A torch tensor as what :func:`check_input` takes: numpy where numpy has its dtype.

    A tensor on the CPU is not copied (a float32 or float64 one becomes an
    ndarray view, so validate_data keeps its dtype instead of picking float64);
    bfloat16 stays a tensor (numpy lacks it), read batch by batch as
    :class:`Rows`. A floating tensor on an accelerator stays there, also read
    batch by batch as :class:`Rows` (:func:`_stays_on_device`); other tensors
    there are copied to the host once.
    """
    X = X.detach()
    if X.dtype.is_complex:
        raise ValueError("Complex data not supported; got a complex torch tensor.")
    if X.dtype.is_floating_point and _stays_on_device(X):
        return X
    if X.device.type != "cpu":
        X = X.cpu()
    if X.dtype == torch.bfloat16:
        return X
    return X.numpy()


def _stays_on_device(X):
    """Whether a floating tensor is read where it is rather than through a host copy.

    On an accelerator: its batches are gathered there (no copy of the whole
    to the host and back, no pinned staging). Tests make it true for CPU
    tensors to run this path without a GPU.
    """
    return X.device.type != "cpu"


def check_codes(X, **kwargs):
    """``check_array`` of codes given to ``inverse_transform``, half precision as float32.

    A torch tensor is taken as its values (see :func:`_host`); float16 and
    bfloat16 codes become float32, where ``check_array`` alone would make
    float16 float64 and refuse bfloat16.
    """
    from sklearn.utils import check_array

    if isinstance(X, torch.Tensor):
        X = _host(X)
        if isinstance(X, torch.Tensor):  # bfloat16, or on an accelerator
            X = X.cpu()
            X = (X.float() if X.dtype in (torch.float16, torch.bfloat16) else X).numpy()
    if isinstance(X, np.ndarray) and X.dtype == np.float16:
        X = X.astype(np.float32)
    return check_array(X, dtype=[np.float64, np.float32], **kwargs)


def sample_rows(random_state, n, m):
    """``m`` distinct row indices of ``range(n)`` drawn from a numpy ``RandomState``.

    ``random_state.choice(n, m, replace=False)`` (what sksae has always drawn)
    up to 2**22 rows; beyond, where that permutes all ``n`` indices (160 MB at
    20M rows), distinct draws of ``randint`` in the order drawn, so that the
    memory stays ``O(m)`` whatever ``n``.
    """
    m = min(m, n)
    if n <= 2**22:
        return random_state.choice(n, m, replace=False)
    picked = np.zeros(0, dtype=np.int64)
    while len(picked) < m:
        draw = random_state.randint(0, n, size=2 * (m - len(picked)) + 16)
        both = np.concatenate([picked, draw])
        _, first = np.unique(both, return_index=True)
        picked = both[np.sort(first)]
    return picked[:m]


def sample_rows_torch(generator, n, m):
    """:func:`sample_rows` drawn from a torch ``Generator`` (``randperm(n)[:m]`` up to 2**22)."""
    m = min(m, n)
    if n <= 2**22:
        return torch.randperm(n, generator=generator)[:m].numpy()
    picked = np.zeros(0, dtype=np.int64)
    while len(picked) < m:
        draw = torch.randint(0, n, (2 * (m - len(picked)) + 16,), generator=generator).numpy()
        both = np.concatenate([picked, draw])
        _, first = np.unique(both, return_index=True)
        picked = both[np.sort(first)]
    return picked[:m]


def take(X, rows):
    """Rows ``rows`` of an ndarray or :class:`Rows`, as a numpy array of its compute dtype.

    Rows of :class:`Rows` are checked for NaN/inf (the error names the row).
    """
    if isinstance(X, Rows):
        return take_tensor(X, rows, "cpu", torch_dtype_of(X.dtype)).numpy()
    return X[rows]


def take_tensor(X, rows, device, dtype):
    """Rows ``rows`` of an ndarray or :class:`Rows` as a ``dtype`` tensor on ``device``.

    As :func:`take`, without a trip through the host for rows already on
    ``device`` (a tensor on the GPU).
    """
    from ._base import as_tensor

    if isinstance(X, Rows):
        t = X.take(rows).to(device).to(dtype)
        X.check_finite(t, np.asarray(rows))
        return t
    return as_tensor(X[rows], device, dtype)


def head(X, n):
    """The first ``n`` rows, as :func:`take`."""
    if isinstance(X, Rows):
        return X.read(0, min(n, X.n_samples)).to(torch_dtype_of(X.dtype)).cpu().numpy()
    return X[:n]


def torch_dtype_of(dtype):
    return _TORCH[np.dtype(dtype)]


def iter_chunks(X, chunk_rows, device, dtype):
    """``(start, chunk)`` over ``X``'s rows, chunks as ``dtype`` tensors on ``device``.

    Chunks of :class:`Rows` are checked for NaN/inf (the error names the row).
    """
    from ._base import as_tensor

    for start in range(0, X.shape[0], chunk_rows):
        stop = min(start + chunk_rows, X.shape[0])
        if isinstance(X, Rows):
            chunk = X.read(start, stop)
            # non-blocking only from the host: a device-to-host copy that did not wait
            # would be read (checked, converted) before its values arrive
            chunk = chunk.to(device, non_blocking=chunk.device.type == "cpu").to(dtype)
            X.check_finite(chunk, start)
        else:
            chunk = as_tensor(X[start:stop], device, dtype)
        yield start, chunk
