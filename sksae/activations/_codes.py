"""Sparse codes on disk: ``transform`` of an input too large for its dense codes.

A code store folder holds ``manifest.json`` and, per shard, the three arrays of
a CSR matrix as ``.npy`` files (``shard-000000.indptr.npy``, ``.indices.npy``,
``.data.npy``), each with its SHA-256 digest in the manifest. It is written in
a temporary folder renamed into place at the end: an interrupted run leaves
nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._base import n_latents, sparse_coder
from .._io import MALFORMED, read_json_bounded
from ._store import _sha256, _write_json_atomic

__all__ = ["transform_to_store", "open_codes", "CodeStore"]

FORMAT = "sksae-codes"
VERSION = 1
_PARTS = ("indptr", "indices", "data")


def _csr_chunk(codes):
    """A ``csr_array`` of a chunk of codes (dense ndarray or sparse)."""
    return sp.csr_array(codes) if not sp.issparse(codes) else sp.csr_array(codes)


def _encode_sparse(encoder, chunk, dense_rows):
    """The codes of ``chunk`` as CSR.

    An encoder without sparse codes (DictionaryLearnerGPU, a pipeline)
    encodes ``dense_rows`` rows at a time, each piece made sparse at once, so
    that no dense block of codes is larger than about 256 MiB.
    """
    step = len(chunk) if getattr(encoder, "sparse_output", False) is True else dense_rows
    parts = [_csr_chunk(encoder.transform(chunk[i:i + step]))
             for i in range(0, len(chunk), step)]
    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _dense_rows(estimator):
    """Rows whose dense codes take about 256 MiB (float64), or 65,536 when unknown."""
    from .._base import inference_chunk_rows  # looked up at the call (tests lower it)

    try:
        return inference_chunk_rows(n_latents(estimator), 8)
    except AttributeError:  # a transformer that does not say how many latents it has
        return 65536


def transform_to_store(estimator, X, path, *, chunk_rows=65536, shard_rows=1 << 20,
                       overwrite=False):
    """Write ``estimator.transform(X)`` to a sparse code store, chunk by chunk.

    Neither ``X`` nor its codes are ever whole in memory: ``chunk_rows`` rows
    are read, encoded and kept as a sparse matrix until a shard of
    ``shard_rows`` rows is written. The codes are never dense beyond about
    256 MiB: a :class:`~sksae.SparseAutoencoder` encodes sparse (as with
    ``sparse_output=True``, whatever its setting), other estimators in
    pieces made sparse one by one.

    Parameters
    ----------
    estimator : fitted SparseAutoencoder or DictionaryLearnerGPU
        Any fitted transformer whose codes are mostly zeros.
    X : array-like, ActivationStore, np.memmap, zarr or h5py array
    path : path-like
        The code store folder to create.
    chunk_rows : int, default=65536
    shard_rows : int, default=1048576
    overwrite : bool, default=False
        Replace a code store already at ``path``.

    Returns
    -------
    codes : CodeStore
        The written store, opened.
    """
    from .._data import Rows, check_input, is_out_of_core

    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        if not (path / "manifest.json").is_file():
            raise FileExistsError(f"{path} exists and is not a code store; refusing to "
                                  "replace it.")
    n_rows = X.shape[0] if is_out_of_core(X) else len(X)
    rows = Rows(X) if is_out_of_core(X) else None
    if rows is None:
        X = check_input(estimator, X, reset=False)
        if isinstance(X, Rows):
            rows = X
    encoder, dense_rows = sparse_coder(estimator), _dense_rows(estimator)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        shards, pending, pending_rows = [], [], 0
        n_components, dtype = None, None

        def write(parts):
            nonlocal n_components, dtype
            m = sp.vstack(parts, format="csr")
            m.sort_indices()
            n_components, dtype = m.shape[1], m.dtype
            files = {}
            for name in _PARTS:
                file = f"shard-{len(shards):06d}.{name}.npy"
                arr = getattr(m, name)
                if name != "data":
                    arr = arr.astype(np.int64, copy=False)
                np.save(tmp / file, np.ascontiguousarray(arr), allow_pickle=False)
                files[name] = {"file": file, "sha256": _sha256(tmp / file)}
            shards.append({"rows": int(m.shape[0]), "nnz": int(m.nnz), "files": files})

        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            if rows is not None:
                chunk = rows.read(start, stop).cpu()  # a tensor on a GPU: its chunk, here
                chunk = chunk.float().numpy() if rows.dtype == np.float32 else chunk.numpy()
                if not np.isfinite(chunk).all():
                    rows.raise_row(int(np.argmax(~np.isfinite(chunk).all(axis=1))), start)
            else:
                chunk = X[start:stop]
            pending.append(_encode_sparse(encoder, chunk, dense_rows))
            pending_rows += stop - start
            if pending_rows >= shard_rows:
                write(pending)
                pending, pending_rows = [], 0
        if pending:
            write(pending)
        manifest = {"format": FORMAT, "version": VERSION, "n_rows": int(n_rows),
                    "n_components": int(n_components), "dtype": str(np.dtype(dtype)),
                    "estimator": type(estimator).__name__, "shards": shards}
        _write_json_atomic(tmp / "manifest.json", manifest)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CodeStore(path)


class CodeStore:
    """Read-only sparse codes on disk, written by :func:`transform_to_store`.

    Row slicing returns a :class:`scipy.sparse.csr_array` and reads only the
    shards it needs; each shard's digests are checked the first time it is
    read.

    Parameters
    ----------
    path : path-like

    Attributes
    ----------
    shape : tuple of int
        ``(n_rows, n_components)``.
    dtype : numpy.dtype
    nnz : int
        Number of stored non-zeros.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            manifest = read_json_bounded(self.path / "manifest.json", 64 * 2**20)
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a code store ({exc}).") from None
        try:
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise ValueError(f"{self.path} is not an sksae code store (version {VERSION}).")
            self.shape = (int(manifest["n_rows"]), int(manifest["n_components"]))
            self.dtype = np.dtype(manifest["dtype"])
            self._shards = manifest["shards"]
            rows = [int(s["rows"]) for s in self._shards]
            self.nnz = sum(int(s["nnz"]) for s in self._shards)
            for s in self._shards:
                for name in _PARTS:
                    file = s["files"][name]["file"]
                    if "/" in file or "\\" in file or not file.startswith("shard-"):
                        raise ValueError(f"{self.path}: bad shard file name {file!r}.")
        except MALFORMED as exc:
            raise ValueError(f"{self.path}/manifest.json is malformed ({exc}).") from None
        self._offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        if self._offsets[-1] != self.shape[0]:
            raise ValueError(f"{self.path}: the shards hold {self._offsets[-1]} rows, the "
                             f"manifest says {self.shape[0]}.")
        self._cache = {}

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"CodeStore({str(self.path)!r}, shape={self.shape}, nnz={self.nnz})"

    def _shard(self, i):
        if i not in self._cache:
            s = self._shards[i]
            parts = {}
            for name in _PARTS:
                info = s["files"][name]
                file = self.path / info["file"]
                if not file.is_file() or _sha256(file) != info["sha256"]:
                    raise ValueError(f"{self.path}: {info['file']} is missing or does not "
                                     "match its SHA-256 digest.")
                parts[name] = np.load(file, allow_pickle=False)
            m = sp.csr_array((parts["data"], parts["indices"], parts["indptr"]),
                             shape=(int(s["rows"]), self.shape[1]))
            self._cache = {i: m}  # one shard at a time: memory stays bounded
        return self._cache[i]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError("a CodeStore takes row slices with step 1.")
        start, stop, _ = key.indices(self.shape[0])
        parts = []
        pos = start
        while pos < stop:
            i = int(np.searchsorted(self._offsets, pos, side="right") - 1)
            hi = min(stop, self._offsets[i + 1])
            parts.append(self._shard(i)[pos - self._offsets[i]: hi - self._offsets[i]])
            pos = hi
        if not parts:
            return sp.csr_array((0, self.shape[1]), dtype=self.dtype)
        return sp.vstack(parts, format="csr")

    def to_csr(self):
        """All the codes as one ``csr_array``."""
        return self[:]


def open_codes(path):
    """Open a code store written by :func:`transform_to_store`.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    codes : CodeStore
    """
    return CodeStore(path)
