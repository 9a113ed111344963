"""The on-disk activation store: ``.npy`` shards per layer, shard records and a manifest.

Layout of a store folder::

    manifest.json               what is in the store (below)
    shards.jsonl                one line per shard: its rows and files (below)
    layer-000/shard-000000.npy     rows of the first layer, one file per shard
    layer-000/shard-000000.sha256  the SHA-256 of each 1 MiB block of that file
    positions/shard-000000.npy     (harvest) each row's (sequence, position), and its .sha256
    layer-001/shard-000000.npy     the same rows (positions) of the second layer
    ...

Shards are plain ``.npy`` files (read as memory maps, never with pickle);
bfloat16, which numpy lacks, is stored as its raw 16-bit words (``<u2``) and
named in the manifest. The manifest records the storage dtype, the layers
(name, folder, number of features), how many input batches the shards cover
(for resuming a harvest), a free-form description of the source, and how many
lines of ``shards.jsonl`` are the store's shards with the SHA-256 digest of
those lines. Each line records a shard's rows and, per layer, its file and
the file of its block digests with that file's SHA-256 (older stores: the
shard file's own SHA-256), so that a lazily checked store hashes the blocks
it reads, not whole shards. A store is written shard by shard: the shard's files are
written under a temporary name and renamed into place, its line is appended,
and then the manifest is renamed into place, so an interruption leaves the
completed shards and a manifest that counts exactly them (a line past its
count is ignored, and removed when the store is resumed). The manifest stays
a few hundred bytes however many shards there are: appending a shard writes
its line and the manifest, not a list of every shard (version 1 of the format,
still read, rewrote that list after every shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._io import MALFORMED, _loads_bounded, read_json_bounded

__all__ = ["ActivationStore", "open_store", "save_store", "StoreWriter", "STORAGE_DTYPES"]

FORMAT = "sksae-activations"
VERSION = 2  # 1 listed the shards inside manifest.json; still read (and resumed as 2)
MANIFEST = "manifest.json"
RECORDS = "shards.jsonl"  # version 2: a line per shard
_MAX_RECORD_BYTES = 1 << 20  # one shard's line: a few hundred bytes per layer
POSITIONS = "positions"  # folder of the optional (sequence, position) of every row
_MAX_MANIFEST_BYTES = 64 * 2**20
#: At most this many shards of one store (its subsets included) are memory-mapped at a time:
#: each map keeps a file descriptor (CPython's mmap holds a duplicate), and a store of 10^9
#: rows has thousands of shards, past the usual limit of 1024 open files per process.
_MAX_OPEN_SHARDS = 64
#: :func:`save_store`'s default shard size, in bytes of stored values: about a thousand
#: files per TiB, each small enough to copy, rewrite or hash on its own.
_SHARD_BYTES = 1 << 30

#: storage dtype name -> (numpy dtype of the shard files, torch dtype of the values)
STORAGE_DTYPES = {
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float32": (np.dtype("<f4"), torch.float32),
    "float64": (np.dtype("<f8"), torch.float64),
}
_LAYER_DIR = re.compile(r"layer-\d{3,6}")
_SHARD_FILE = re.compile(r"shard-\d{6,9}\.npy")
#: A shard file's values are checked in blocks of this many bytes, each with its SHA-256
#: in the file beside it (``shard-000000.sha256``): a lazily checked store reads and hashes
#: only the blocks it reads (a fit's 16,384 starting rows touch about that many blocks, one
#: or two per row, not every shard of the store). 1 MiB: 32 bytes of digest per MiB, 256 MB
#: per 8 TB store.
_BLOCK_BYTES = 1 << 20
_MAX_BLOCK_BYTES = 64 << 20  # what a reader accepts (it holds a block in memory)
_KEPT_BLOCK_DIGESTS = 256  # shards whose block digests a store keeps read: 8 MiB at 1 GiB


class _Whole(NamedTuple):
    """A file checked whole: a store's files written before the block digests."""

    target: Path  # the file checked
    sha256: str  # its digest


class _Blocks(NamedTuple):
    """Where a file's block digests are, and how its rows lie in its blocks."""

    target: Path  # the file checked
    file: Path  # its block digests, 32 bytes per block
    sha256: str  # of that file
    size: int  # bytes per block (the last may be shorter)
    n_blocks: int
    data_offset: int  # where the rows start in the target file
    row_bytes: int


class StoreError(ValueError):
    """A store folder that cannot be read (missing, malformed, truncated or tampered with).

    A :class:`ValueError`: catching that catches it too.
    """


def _sha256(path, chunk=16 * 2**20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


class _BlockDigests:
    """The SHA-256 of each ``size``-byte block of a byte stream fed in pieces of any length."""

    def __init__(self, size):
        self.size = size
        self._digests = []
        self._h = hashlib.sha256()
        self._filled = 0

    def update(self, data):
        data = memoryview(data).cast("B")
        while len(data):
            take = min(self.size - self._filled, len(data))
            self._h.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.size:
                self._digests.append(self._h.digest())
                self._h, self._filled = hashlib.sha256(), 0

    def finish(self):
        """The digests, 32 bytes each, in order (the last block may be shorter)."""
        if self._filled:
            self._digests.append(self._h.digest())
            self._h, self._filled = hashlib.sha256(), 0
        return b"".join(self._digests)


def _sidecar(rel):
    """The block digests' file of shard file ``rel`` (``.npy`` -> ``.sha256``)."""
    return rel[:-len(".npy")] + ".sha256"


def _write_atomic(path, chunks):
    """Write the byte strings ``chunks`` to ``path`` through a synced temporary file and a
    rename: a reader sees the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(f, data):
    """Write all of ``data`` to the unbuffered file ``f`` (a raw write may take part of it)."""
    view = memoryview(data)
    while len(view):
        view = view[f.write(view):]


def _read_full(f, buffer):
    """Read into ``buffer`` until it is full or the file ends (a read may return less,
    on network file systems or when a signal interrupts it); returns the bytes read."""
    n = 0
    while n < len(buffer):
        got = f.readinto(buffer[n:])
        if not got:
            break
        n += got
    return n


def _entry_like(folder):
    """A shard file's record as long as any (to bound a shard's line before writing one)."""
    digest = "0" * 64
    return {"file": f"{folder}/shard-999999999.npy", "sha256": digest,
            "blocks": {"file": f"{folder}/shard-999999999.sha256", "bytes": _MAX_BLOCK_BYTES,
                       "sha256": digest}}


def _write_json_atomic(path, obj, max_bytes=None):
    """Write ``obj`` as JSON to ``path`` through a synced temporary file and a rename.

    With ``max_bytes``, refuse (ValueError, nothing written) a document larger
    than that: what readers would refuse to open.
    """
    data = json.dumps(obj, indent=1).encode()
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path.name} would be larger than {max_bytes} bytes")
    _write_atomic(path, [data])


def _record(shard):
    """A shard's line of :data:`RECORDS`, as bytes."""
    return (json.dumps(shard, separators=(",", ":")) + "\n").encode()


def _header(manifest, n_shards, digest):
    """What ``manifest.json`` holds of ``manifest``: everything but the shards' list."""
    head = {key: value for key, value in manifest.items() if key != "shards"}
    return dict(head, version=VERSION, n_shards=int(n_shards), shards_sha256=digest)


def _write_manifest(path, manifest):
    """Write ``manifest`` whole: every shard's line, then the manifest that counts them.

    Each file goes through a synced temporary file and a rename; a reader between
    the two renames sees the old manifest, whose lines are a prefix of the new
    ones. Returns the running SHA-256 of the lines (to append to).
    """
    path = Path(path)
    digest = hashlib.sha256()

    def lines():
        for shard in manifest["shards"]:
            line = _record(shard)
            digest.update(line)
            yield line

    _write_atomic(path / RECORDS, lines())
    _write_json_atomic(path / MANIFEST, _header(manifest, len(manifest["shards"]),
                                                digest.hexdigest()), _MAX_MANIFEST_BYTES)
    return digest


def _counted_shards(path):
    """How many shards the manifest in ``path`` counts now; None when it cannot be read."""
    try:
        return int(read_json_bounded(Path(path) / MANIFEST, _MAX_MANIFEST_BYTES)["n_shards"])
    except Exception:  # noqa: BLE001 - asked while handling another error
        return None


def _read_records(path, n_shards, expected):
    """The first ``n_shards`` lines of a store's :data:`RECORDS`, checked against their digest."""
    digest = hashlib.sha256()
    shards = []
    if (path / RECORDS).is_symlink() or not (path / RECORDS).is_file():
        raise StoreError(f"{path}/{RECORDS} is missing (or not a plain file).")
    try:
        with open(path / RECORDS, "rb") as f:
            for i in range(n_shards):
                line = f.readline(_MAX_RECORD_BYTES + 1)
                if not line.endswith(b"\n"):
                    what = (f"holds {i} lines" if not line else
                            f"has line {i + 1} cut short (or longer than {_MAX_RECORD_BYTES} "
                            "bytes)")
                    raise StoreError(f"{path}/{RECORDS}: the manifest counts {n_shards} "
                                     f"shards, but the file {what}: it was truncated or "
                                     "altered.")
                digest.update(line)
                shards.append(line)
    except OSError as exc:
        raise StoreError(f"{path}/{RECORDS} cannot be read ({exc}).") from None
    if digest.hexdigest() != expected:
        raise StoreError(f"{path}/{RECORDS} does not match its SHA-256 digest in the "
                         "manifest: it was altered or damaged.")
    try:  # digest first: only lines that sksae wrote are parsed
        return [_loads_bounded(line.decode("utf-8")) for line in shards]
    except ValueError as exc:
        raise StoreError(f"{path}/{RECORDS} is not valid JSON lines ({exc}).") from None


def _npy_header(path):
    """(shape, dtype, fortran_order, data offset) of a ``.npy`` file, without reading its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, dtype, fortran, f.tell()


def to_storage(values, storage_dtype):
    """Host numpy array of ``values`` (a tensor, any device) in the shard files' dtype."""
    file_dtype, torch_dtype = STORAGE_DTYPES[storage_dtype]
    t = values.detach().to(torch_dtype)
    if storage_dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.cpu().numpy().view(file_dtype)


class StoreWriter:
    """Appends shards to a store folder; the manifest always counts exactly the completed ones.

    Parameters
    ----------
    path : path-like
        The store folder (created when missing).
    layers : dict
        ``{layer name: number of features}``, in order.
    storage_dtype : {"float16", "bfloat16", "float32", "float64"}
    source : dict
        Free-form description of where the rows come from (JSON-serialisable).
    resume : bool
        Keep the shards of an unfinished store with the same layers, dtype and
        source instead of refusing it. Its records' digest, and every listed
        shard file's presence, header and size, are checked first; the
        shards' contents are not hashed here (a resumed harvest of terabytes
        would read them all again at every resumption), but by whoever reads
        them (``verify``), as for any store.
    overwrite : bool
        Replace whatever store is there.
    """

    def __init__(self, path, layers, storage_dtype, source, *, resume=False, overwrite=False):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}; "
                             f"got {storage_dtype!r}.")
        self.path = Path(path)
        self.layers = dict(layers)
        self.storage_dtype = storage_dtype
        self.source = source
        spec = {"storage_dtype": storage_dtype,
                "layers": [{"name": name, "dir": f"layer-{i:03d}", "n_features": int(d)}
                           for i, (name, d) in enumerate(self.layers.items())],
                "source": source}
        json.dumps(spec)  # refuse what JSON cannot hold now, not after the first shard
        longest = _record({"rows": 2**62, "batches": 2**62, "files": {
            entry["name"]: _entry_like(entry["dir"]) for entry in spec["layers"]},
            "positions": _entry_like(POSITIONS)})
        if len(longest) > _MAX_RECORD_BYTES:
            raise ValueError(f"A shard's record of these {len(self.layers)} layers would take "
                             f"{len(longest)} bytes, more than the {_MAX_RECORD_BYTES} a store "
                             "reads: harvest fewer layers per store, or name them shorter.")
        self.manifest = {"format": FORMAT, "version": VERSION, **spec, "n_rows": 0,
                         "n_batches": 0, "complete": False, "shards": []}
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and not overwrite:
            old = _read_manifest(self.path)
            if old.get("complete"):
                raise FileExistsError(f"{self.path} already holds a complete store; pass "
                                      "overwrite=True to replace it.")
            if not resume:
                raise FileExistsError(f"{self.path} holds an unfinished store (an interrupted "
                                      "run); pass resume=True to continue it or "
                                      "overwrite=True to start again.")
            mismatch = [key for key in ("storage_dtype", "layers", "source")
                        if old.get(key) != json.loads(json.dumps(spec[key]))]
            if mismatch:
                raise ValueError(f"Cannot resume {self.path}: its {', '.join(mismatch)} "
                                 "differ from this run's. Pass overwrite=True to start again.")
            for name in self.layers:  # every listed shard is there, whole in size
                ActivationStore(self.path, layer=name, verify="none", _manifest=old)
            self.manifest = old
        elif self.path.exists() and any(self.path.iterdir()) and not overwrite \
                and not manifest_path.exists():
            raise FileExistsError(f"{self.path} exists and is not an sksae store; refusing "
                                  "to write into it.")
        elif overwrite and self.path.exists():
            self._clear()
        for entry in self.manifest["layers"]:
            (self.path / entry["dir"]).mkdir(parents=True, exist_ok=True)
        self._remove_strays()
        # whole, once: drops a line past the manifest's count (a run stopped between the
        # two writes) and resumes a version-1 store as version 2
        self._records_digest = _write_manifest(self.path, self.manifest)

    @property
    def n_rows(self):
        return self.manifest["n_rows"]

    @property
    def n_batches(self):
        """Input batches the completed shards cover."""
        return self.manifest["n_batches"]

    def _clear(self):
        """Remove a previous store's files (only what a store holds)."""
        for entry in self.path.iterdir():
            if entry.is_dir() and (_LAYER_DIR.fullmatch(entry.name) or entry.name == POSITIONS):
                for f in entry.iterdir():
                    if f.name.startswith("shard-"):
                        f.unlink()
                if not any(entry.iterdir()):
                    entry.rmdir()
            elif entry.name.startswith((MANIFEST, RECORDS)):
                entry.unlink()

    def _remove_strays(self):
        """Shard files that no manifest entry lists (a shard written when the run stopped)."""
        listed = {rel for shard in self.manifest["shards"] for rel in _files_of(shard)}
        for entry in [*self.manifest["layers"], {"dir": POSITIONS}]:
            folder = self.path / entry["dir"]
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                rel = f"{entry['dir']}/{f.name}"
                if f.name.startswith("shard-") and rel not in listed:
                    f.unlink()

    def _write_chunks(self, rel, shape, dtype, chunks):
        """Write the ``.npy`` file ``rel`` of ``shape`` and ``dtype`` from ``chunks``.

        Parameters
        ----------
        rel : str
            The file, relative to the store folder.
        shape : tuple of (int, int)
        dtype : numpy.dtype
        chunks : iterable of ndarray
            Blocks of consecutive rows, in order, of ``dtype`` and ``shape[1]``
            columns, ``shape[0]`` rows in all; only one is held at a time.

        Returns
        -------
        entry : dict
            The file's manifest entry: ``{"file": rel, "blocks": {"file":
            digests' file, "sha256": its digest, "bytes": block size}}``, its
            block digests (of :data:`_BLOCK_BYTES`) written beside it
            (:func:`_sidecar`).
        """
        target = self.path / rel
        tmp = target.with_name(target.name + ".tmp")
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": tuple(int(k) for k in shape)})
        # of the bytes written: no reading back
        digest = _BlockDigests(_BLOCK_BYTES)
        digest.update(header.getvalue())
        try:
            with open(tmp, "wb") as f:
                f.write(header.getvalue())
                written = 0
                for chunk in chunks:
                    data = _raw_bytes(chunk, dtype, shape[1], rel)
                    f.write(data)
                    digest.update(data)
                    written += len(chunk)
                if written != shape[0]:
                    raise ValueError(f"{rel}: {written} rows were given for a shard of "
                                     f"{shape[0]}.")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a later run would remove it as a stray anyway
            raise
        digests = digest.finish()
        _write_atomic(self.path / _sidecar(rel), [digests])
        return {"file": rel, "blocks": {"file": _sidecar(rel), "bytes": _BLOCK_BYTES,
                                        "sha256": hashlib.sha256(digests).hexdigest()}}

    def write_shard(self, arrays, n_batches, positions=None):
        """Append one shard: ``arrays[layer]`` of shape (rows, n_features), in storage dtype.

        ``arrays[layer]`` may also be a list of blocks of consecutive rows (a
        harvest's batches), written one after the other: never joined into
        one array, which would hold every layer's shard twice. ``n_batches``
        is the number of input batches the shard completes; ``positions``
        (rows, 2) int64 (or a list of blocks), optional: each row's
        (sequence, position).
        """
        index = len(self.manifest["shards"])
        dtype = STORAGE_DTYPES[self.storage_dtype][0]
        blocks = {}
        rows = None
        for entry in self.manifest["layers"]:
            parts = _blocks_of(arrays[entry["name"]])
            for a in parts:  # all checked before anything is written
                if a.dtype != dtype or a.ndim != 2 or a.shape[1] != entry["n_features"]:
                    raise ValueError(f"layer {entry['name']!r}: expected rows of "
                                     f"{entry['n_features']} {self.storage_dtype} values; "
                                     f"got {a.shape} {a.dtype}.")
            n = sum(len(a) for a in parts)
            if rows is not None and n != rows:
                raise ValueError("Every layer of a shard must have the same number of rows.")
            rows, blocks[entry["name"]] = n, parts
        if positions is not None:
            positions = [np.ascontiguousarray(p, dtype="<i8") for p in _blocks_of(positions)]
            if any(p.ndim != 2 or p.shape[1] != 2 for p in positions) \
                    or sum(len(p) for p in positions) != rows:
                raise ValueError(f"positions must have shape ({rows}, 2); got "
                                 f"{[p.shape for p in positions]}.")
        files = {}
        for entry in self.manifest["layers"]:
            files[entry["name"]] = self._write_chunks(
                f"{entry['dir']}/shard-{index:06d}.npy", (rows, entry["n_features"]), dtype,
                blocks[entry["name"]])
        shard = {"rows": int(rows), "batches": int(n_batches), "files": files}
        if positions is not None:
            (self.path / POSITIONS).mkdir(exist_ok=True)
            shard["positions"] = self._write_chunks(f"{POSITIONS}/shard-{index:06d}.npy",
                                                    (rows, 2), np.dtype("<i8"), positions)
        self._append(shard)

    def _write_shard_chunks(self, rows, chunks, n_batches=0):
        """Append one shard of a one-layer store, ``rows`` rows written from ``chunks``.

        ``chunks`` are blocks of consecutive rows in storage dtype (see
        :meth:`_write_chunks`): the shard is never whole in memory.
        """
        (entry,) = self.manifest["layers"]
        index = len(self.manifest["shards"])
        info = self._write_chunks(f"{entry['dir']}/shard-{index:06d}.npy",
                                  (rows, entry["n_features"]),
                                  STORAGE_DTYPES[self.storage_dtype][0], chunks)
        self._append({"rows": int(rows), "batches": int(n_batches),
                      "files": {entry["name"]: info}})

    def _append(self, shard):
        """List a shard whose files are in place: its line, then the manifest counting it.

        Writes a line and a manifest of constant size, whatever the number of
        shards. A failure before the manifest's rename cuts the line off
        again: the store lists what it listed, and this shard's files are
        strays that a resumed run removes. One after it (Ctrl-C inside the
        rename's call) keeps the line, which the manifest then counts.
        """
        line = _record(shard)
        if len(line) > _MAX_RECORD_BYTES:
            self._remove_files(shard)
            raise StoreError(f"{self.path}: a shard's record of {len(line)} bytes is longer than "
                             f"the {_MAX_RECORD_BYTES} a store reads (too many layers, or names "
                             "too long); the store keeps the shards it lists.")
        if self._records_digest is None:
            raise StoreError(f"{self.path}: an earlier shard's listing failed part-way; open "
                             "the store again with resume=True to continue it.")
        digest = self._records_digest.copy()
        digest.update(line)
        manifest = dict(self.manifest, n_rows=self.manifest["n_rows"] + shard["rows"],
                        n_batches=self.manifest["n_batches"] + shard["batches"])
        n_shards = len(self.manifest["shards"]) + 1
        # unbuffered: nothing left in a buffer to flush (and fail again) when cutting off
        with open(self.path / RECORDS, "ab", buffering=0) as f:
            end = f.tell()
            previous, self._records_digest = self._records_digest, None  # until it is known
            try:
                _write_all(f, line)
                os.fsync(f.fileno())
                _write_json_atomic(self.path / MANIFEST,
                                   _header(manifest, n_shards, digest.hexdigest()))
            except BaseException:
                counted = _counted_shards(self.path)
                if counted == n_shards:  # renamed: the shard is listed
                    manifest["shards"].append(shard)
                    self.manifest, self._records_digest = manifest, digest
                elif counted == n_shards - 1:
                    os.ftruncate(f.fileno(), end)
                    self._records_digest = previous
                # else unknown: later appends refuse, and a resumed run sorts the files out
                raise
        manifest["shards"].append(shard)  # the list is shared: appended, never copied
        self.manifest, self._records_digest = manifest, digest

    def _remove_files(self, shard):
        for rel in _files_of(shard):
            (self.path / rel).unlink(missing_ok=True)

    def close(self, n_batches=0):
        """Mark the store complete (``n_batches`` more input batches gave no rows)."""
        if self._records_digest is None:
            raise StoreError(f"{self.path}: a shard's listing failed part-way; open the store "
                             "again with resume=True to finish it.")
        manifest = dict(self.manifest, complete=True,
                        n_batches=self.manifest["n_batches"] + int(n_batches))
        _write_json_atomic(self.path / MANIFEST, _header(
            manifest, len(manifest["shards"]), self._records_digest.hexdigest()))
        self.manifest = manifest


def _files_of(shard):
    """The files of a shard's record (relative to the store): values, positions, and the
    block digests of each."""
    for info in [*shard["files"].values(), shard.get("positions")]:
        if info is not None:
            yield info["file"]
            if "blocks" in info:
                yield info["blocks"]["file"]


def _blocks_of(value):
    """An array, or a list of blocks of consecutive rows, as a list of contiguous arrays."""
    if isinstance(value, (list, tuple)):
        return [np.ascontiguousarray(a) for a in value]
    return [np.ascontiguousarray(value)]


def _raw_bytes(chunk, dtype, n_features, rel):
    """The bytes of ``chunk``, rows of ``n_features`` ``dtype`` values, as a flat buffer."""
    chunk = np.ascontiguousarray(chunk)
    if chunk.dtype != dtype or chunk.ndim != 2 or chunk.shape[1] != n_features:
        raise ValueError(f"{rel}: expected rows of {n_features} {dtype} values; got "
                         f"{chunk.shape} {chunk.dtype}.")
    return memoryview(chunk.reshape(-1).view(np.uint8))


def _one_layer(manifest, layer):
    """``manifest`` with the shards' records of ``layer``'s file only (the same when it is one)."""
    if len(manifest["layers"]) == 1:
        return manifest
    shards = [dict(shard, files={layer: shard["files"][layer]}) for shard in manifest["shards"]]
    return dict(manifest, shards=shards)


def _read_manifest(path):
    """A store's manifest, with its ``"shards"`` list (version 2: read from :data:`RECORDS`)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise StoreError(f"{path} is not an activation store (no {MANIFEST}).")
    try:
        manifest = read_json_bounded(path / MANIFEST, _MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise StoreError(f"{path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}/{MANIFEST} is not an sksae activation store's manifest.")
    version = manifest.get("version")
    if version == 1:
        return manifest  # the shards are listed inside
    if version != VERSION:
        raise StoreError(f"{path}: store version {version!r} is not supported (this sksae "
                         f"reads versions 1 and {VERSION}).")
    n_shards, digest = manifest.get("n_shards"), manifest.get("shards_sha256")
    if type(n_shards) is not int or n_shards < 0 or not isinstance(digest, str):
        raise StoreError(f"{path}/{MANIFEST} is malformed (n_shards {n_shards!r}, "
                         f"shards_sha256 {digest!r}).")
    manifest["shards"] = _read_records(path, n_shards, digest)
    return manifest


class ActivationStore:
    """A read-only, array-like view of one layer of an activation store.

    It has ``shape``, ``dtype``, ``len`` and numpy-style row indexing (an
    integer, a slice, an integer or boolean array; a second index selects
    columns), and reads only the rows asked for: shards are memory-mapped,
    at most 64 at a time (the least recently used are closed), so that a
    store of thousands of shards stays within the open-file limit.
    :class:`~sksae.SparseAutoencoder` and :class:`~sksae.DictionaryLearnerGPU`
    take it in ``fit``, ``partial_fit``, ``transform`` and ``score`` without
    loading it; ``np.asarray(store)`` loads it whole.

    Open stores with :func:`open_store`.

    Parameters
    ----------
    path : path-like
        The store folder.
    layer : str, default=None
        Which layer; may be left out when the store holds one.
    verify : {"lazy", "full", "none"}, default="lazy"
        When to check the shards' SHA-256 digests (shapes, dtypes and file
        sizes are always checked at opening): ``"lazy"`` checks each 1 MiB
        block of a shard file the first time any row in it is read through
        this object (a shard of a store written before block digests: the
        whole shard, on its first read), ``"full"`` checks every shard now,
        ``"none"`` never.
    indexing : {"numpy", "lazy"}, default="numpy"
        What indexing rows returns: ``"numpy"`` reads them into an ndarray;
        ``"lazy"`` returns a :meth:`subset` view for a slice or an index
        array of rows (with every column), reading nothing, so that
        scikit-learn's ``GridSearchCV`` and ``cross_validate``, which split
        ``X`` with ``X[train]``, hand the estimator a fold it streams.
        A single row, column selections and ``np.asarray`` read either way.

    Attributes
    ----------
    path : pathlib.Path
    layer : str
    indexing : str
    layers : list of str
        Every layer of the store.
    shape : tuple of int
        ``(n_rows, n_features)``; for a :meth:`subset`, its rows.
    dtype : numpy.dtype
        Dtype of the arrays indexing returns: ``float16``, ``float32`` or
        ``float64``; ``float32`` for a bfloat16 store (numpy has no bfloat16).
    storage_dtype : str
        ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
    manifest : dict
        The store's manifest (its ``"source"`` describes where the rows came
        from), with each shard's record of this layer's file only: a store of
        many layers and shards is held, and sent to workers, at the size of
        one layer's records.
    complete : bool
        False for the store of a harvest that was interrupted (its completed
        shards are readable).
    """

    def __init__(self, path, layer=None, *, verify="lazy", indexing="numpy", _manifest=None):
        if verify not in ("lazy", "full", "none"):
            raise ValueError(f"verify must be 'lazy', 'full' or 'none'; got {verify!r}.")
        if indexing not in ("numpy", "lazy"):
            raise ValueError(f"indexing must be 'numpy' or 'lazy'; got {indexing!r}.")
        self.indexing = indexing
        # A subset's rows of the whole layer: a range (a slice's evenly spaced rows, never
        # materialised) or a read-only int64 array; None: all of them.
        self._rows = None
        self.path = Path(path)
        manifest = _manifest if _manifest is not None else _read_manifest(self.path)
        try:
            self._parse(manifest, layer)
        except MALFORMED as exc:
            raise StoreError(f"{self.path}/{MANIFEST} is malformed ({type(exc).__name__}: "
                             f"{exc}).") from None
        self.manifest = _one_layer(manifest, self.layer)
        self._verify = verify
        self._verified = set()
        self._blocks_checked = {}  # file key -> its blocks checked so far (partly checked)
        self._position_specs = {}  # shard -> how its positions file is checked (on first use)
        # shard -> its block digests, read and checked: a read of scattered rows (a random
        # batch) touches many partly checked shards at every call
        self._digests_read = OrderedDict()
        self._lock = threading.Lock()
        # shard index -> its memory map, least recently used first (see _MAX_OPEN_SHARDS)
        self._maps = OrderedDict()
        self._maps_lock = threading.Lock()  # not _lock: a read need not wait for a digest
        if verify == "full":
            for i in range(len(self._files)):
                self._check_digest(i)

    def _parse(self, manifest, layer):
        storage = manifest["storage_dtype"]
        if storage not in STORAGE_DTYPES:
            raise StoreError(f"{self.path}: unknown storage dtype {storage!r}.")
        self.storage_dtype = storage
        self._file_dtype, self._torch_dtype = STORAGE_DTYPES[storage]
        layers = manifest["layers"]
        self.layers = [entry["name"] for entry in layers]
        if layer is None:
            if len(layers) != 1:
                raise ValueError(f"{self.path} holds {len(layers)} layers "
                                 f"({self.layers}); pass layer= one of them.")
            entry = layers[0]
        else:
            matches = [e for e in layers if e["name"] == layer]
            if not matches:
                raise ValueError(f"{self.path} has no layer {layer!r}; it has {self.layers}.")
            entry = matches[0]
        self.layer = entry["name"]
        if not _LAYER_DIR.fullmatch(entry["dir"]):
            raise StoreError(f"{self.path}: bad layer folder name {entry['dir']!r}.")
        n_features = int(entry["n_features"])
        if n_features < 1:
            raise StoreError(f"{self.path}: layer {self.layer!r} has {n_features} features.")
        self._row_bytes = n_features * self._file_dtype.itemsize
        self._files, self._digests, rows = [], [], []
        for i, shard in enumerate(manifest["shards"]):
            info = shard["files"][self.layer]
            rel = info["file"]
            folder, _, name = rel.partition("/")
            if folder != entry["dir"] or not _SHARD_FILE.fullmatch(name):
                raise StoreError(f"{self.path}: shard {i} names {rel!r}, not a shard of "
                                 f"{entry['dir']}/.")
            n = int(shard["rows"])
            file = self.path / folder / name
            offset, size = self._check_file(i, file, n, n_features)
            self._files.append(file)
            self._digests.append(self._digest_of(i, info, file, offset, size, self._row_bytes))
            rows.append(n)
        self._offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        n_rows = int(self._offsets[-1])
        if n_rows != int(manifest["n_rows"]):
            raise StoreError(f"{self.path}: the shards hold {n_rows} rows, the manifest says "
                             f"{manifest['n_rows']}.")
        self.shape = (n_rows, n_features)
        self.complete = bool(manifest.get("complete", False))

    def _digest_of(self, i, info, target, offset, size, row_bytes):
        """How file ``target`` of shard ``i`` (record ``info``) is checked: :class:`_Blocks`,
        or :class:`_Whole` for files written before the block digests."""
        if "blocks" not in info:
            return _Whole(target, str(info["sha256"]))
        blocks = info["blocks"]
        rel, block_bytes = str(blocks["file"]), int(blocks["bytes"])
        if rel != _sidecar(str(info["file"])) or not 1 <= block_bytes <= _MAX_BLOCK_BYTES:
            raise StoreError(f"{self.path}: shard {i}'s block digests are {rel!r} in blocks "
                             f"of {block_bytes} bytes; expected {_sidecar(str(info['file']))!r}.")
        file = self.path / rel
        n_blocks = -(-size // block_bytes)
        if file.is_symlink() or not file.is_file() or file.stat().st_size != 32 * n_blocks:
            raise StoreError(f"{self.path}: shard {i}'s block digests ({rel}) are missing, or "
                             f"not the {n_blocks} digests of its blocks.")
        return _Blocks(target, file, str(blocks["sha256"]), block_bytes, n_blocks, offset,
                       row_bytes)

    def _check_file(self, i, file, n, n_features):
        """A shard file that is there, an .npy of the stated shape and dtype, whole."""
        what = f"{self.path}: shard {i} ({file.relative_to(self.path)})"
        if file.is_symlink() or not file.is_file():
            raise StoreError(f"{what} is missing.")
        try:
            shape, dtype, fortran, offset = _npy_header(file)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{what} is not a readable .npy file ({exc}).") from None
        if shape != (n, n_features) or dtype != self._file_dtype or fortran:
            raise StoreError(f"{what} holds {shape} {dtype}; the manifest says "
                             f"({n}, {n_features}) {self.storage_dtype}.")
        expected = offset + n * n_features * self._file_dtype.itemsize
        size = file.stat().st_size
        if size != expected:
            raise StoreError(f"{what} is {size} bytes, expected {expected}: truncated or "
                             "altered.")
        return offset, size

    # A file is checked under a key: ``i`` for shard ``i``'s values, ("positions", i) for
    # its positions; a key in ``_verified`` is checked whole.
    def _spec(self, key):
        return self._digests[key] if isinstance(key, int) else self._positions_spec(key[1])

    def _check_digest(self, key):
        """Check a file whole (every block of it), once."""
        spec = self._spec(key)
        with self._lock:
            if key in self._verified:
                return
            if isinstance(spec, _Whole):
                if _sha256(spec.target) != spec.sha256:
                    raise self._altered(key)
            else:
                self._check_blocks(key, spec, range(spec.n_blocks))
            self._checked_whole(key)

    def _checked_whole(self, key):
        """A file found whole (under ``_lock``): its partial state is dropped."""
        self._verified.add(key)
        self._blocks_checked.pop(key, None)
        self._digests_read.pop(key, None)

    def _check_rows(self, key, rows):
        """Lazily, before rows ``rows`` of a file are read: check the blocks they lie in.

        ``rows``: a slice, or sorted row ids within the shard. A file without
        block digests (of an older store) is checked whole.
        """
        if self._verify != "lazy" or key in self._verified:
            return
        spec = self._spec(key)
        if isinstance(spec, _Whole):
            self._check_digest(key)
            return
        blocks = self._blocks_holding(spec, rows)
        with self._lock:
            if key in self._verified:
                return
            checked = self._blocks_checked.setdefault(key, np.zeros(spec.n_blocks, dtype=bool))
            todo = blocks[~checked[blocks]]
            if todo.size:
                self._check_blocks(key, spec, todo)
                checked[todo] = True
                if checked.all():
                    self._checked_whole(key)

    @staticmethod
    def _blocks_holding(spec, rows):
        """The blocks (sorted, unique) that rows ``rows`` of a file lie in."""
        if isinstance(rows, slice):
            lo, hi = int(rows.start), int(rows.stop)
            if hi <= lo:
                return np.empty(0, dtype=np.int64)
            first = (spec.data_offset + lo * spec.row_bytes) // spec.size
            return np.arange(first, (spec.data_offset + hi * spec.row_bytes - 1) // spec.size
                             + 1, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        first = (spec.data_offset + rows * spec.row_bytes) // spec.size
        counts = (spec.data_offset + (rows + 1) * spec.row_bytes - 1) // spec.size - first + 1
        starts = np.cumsum(counts) - counts  # each row's blocks: first, first + 1, ...
        return np.unique(np.repeat(first - starts, counts) + np.arange(counts.sum()))

    def _block_digests(self, key, spec):
        """A file's block digests, checked (under ``_lock``; the last few kept)."""
        digests = self._digests_read.get(key)
        if digests is None:
            digests = spec.file.read_bytes()
            if len(digests) != 32 * spec.n_blocks or \
                    hashlib.sha256(digests).hexdigest() != spec.sha256:
                whose = f"shard {key}'s" if isinstance(key, int) else \
                    f"shard {key[1]}'s positions'"
                raise StoreError(f"{self.path}: {whose} block digests "
                                 f"({spec.file.relative_to(self.path)}) do not match their "
                                 "SHA-256 digest in the manifest: they were altered or "
                                 "corrupted.")
            self._digests_read[key] = digests
            while len(self._digests_read) > _KEPT_BLOCK_DIGESTS:
                self._digests_read.popitem(last=False)
        self._digests_read.move_to_end(key)
        return digests

    def _check_blocks(self, key, spec, blocks):
        """Hash blocks ``blocks`` of a file against its block digests (under ``_lock``)."""
        digests = self._block_digests(key, spec)
        # every block into one buffer, not a fresh 1 MiB object each
        buffer = memoryview(bytearray(spec.size))
        with open(spec.target, "rb", buffering=0) as f:
            for j in blocks:
                j = int(j)
                f.seek(j * spec.size)
                n = _read_full(f, buffer)
                if hashlib.sha256(buffer[:n]).digest() != digests[32 * j: 32 * j + 32]:
                    raise self._altered(key, f" (bytes {j * spec.size} to "
                                             f"{(j + 1) * spec.size} of the file)")

    def _altered(self, key, where=""):
        if isinstance(key, int):
            return StoreError(f"{self.path}: shard {key} "
                              f"({self._files[key].relative_to(self.path)}) does not match its "
                              f"SHA-256 digest in the manifest{where}: it was altered or "
                              "corrupted.")
        rel = self._spec(key).target.relative_to(self.path)
        return StoreError(f"{self.path}: shard {key[1]}'s positions ({rel}) do not match their "
                          f"SHA-256 digest in the manifest{where}: they were altered or "
                          "corrupted.")

    def _shard_rows(self, i, rows):
        """Rows ``rows`` (a slice or sorted ids) of shard ``i``, checked lazily."""
        self._check_rows(i, rows)
        return self._map(i)[rows]

    def positions(self, start=0, stop=None):
        """``(sequence, position)`` of rows ``start:stop``, as an int64 array of shape (n, 2).

        ``sequence`` counts the input sequences (the leading dimension of
        every batch) from 0 in the order they were harvested, ``position`` is
        the index within the sequence: where each row's token came from.
        Only stores written by :func:`harvest` have them.
        """
        shards = self.manifest["shards"]
        if not shards or any("positions" not in sh for sh in shards):
            raise ValueError(f"{self.path} has no row positions (only harvest writes them).")
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        if self._rows is not None:
            rows = self._rows[start:stop]
            run = _run(rows)
            if run is None:
                out = np.empty((len(rows), 2), dtype=np.int64)
                return self._gather(_ids(rows), self._positions_rows, out)
            start, stop = run
        # copied shard by shard, so that only one positions file is mapped at a time
        out = np.empty((max(0, stop - start), 2), dtype=np.int64)
        pos = start
        while pos < stop:
            i = self._shard_of_base(pos)
            hi = min(stop, int(self._offsets[i + 1]))
            out[pos - start: hi - start] = \
                self._positions_rows(i, slice(pos - self._offsets[i], hi - self._offsets[i]))
            pos = hi
        return out

    def _positions_spec(self, i):
        """Shard ``i``'s positions file, checked as a shard file is at opening, and how its
        digests are (:meth:`_digest_of`); on first use."""
        spec = self._position_specs.get(i)
        if spec is not None:
            return spec
        info = self.manifest["shards"][i]["positions"]
        folder, _, name = str(info["file"]).partition("/")
        file = self.path / POSITIONS / name
        if folder != POSITIONS or not _SHARD_FILE.fullmatch(name) or file.is_symlink() \
                or not file.is_file():
            raise StoreError(f"{self.path}: shard {i}'s positions file is missing or "
                             "misnamed.")
        try:
            shape, dtype, fortran, offset = _npy_header(file)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.path}: shard {i}'s positions file is not a readable "
                             f".npy file ({exc}).") from None
        n = int(self._offsets[i + 1] - self._offsets[i])
        size = file.stat().st_size
        if shape != (n, 2) or dtype != np.dtype("<i8") or fortran or size != offset + 16 * n:
            raise StoreError(f"{self.path}: shard {i}'s positions have shape {shape} "
                             f"{dtype} in {size} bytes; expected ({n}, 2) int64.")
        spec = self._position_specs[i] = self._digest_of(i, info, file, offset, size, 16)
        return spec

    def _positions_rows(self, i, rows):
        """Positions ``rows`` (a slice or sorted ids) of shard ``i``: checked lazily by
        block, or (``verify="full"``) whole on first use."""
        spec = self._positions_spec(i)
        if self._verify == "full":
            self._check_digest(("positions", i))
        else:
            self._check_rows(("positions", i), rows)
        return np.load(spec.target, mmap_mode="r", allow_pickle=False)[rows]

    def verify(self):
        """Check every shard's SHA-256 digest; raise ``ValueError`` naming the first bad one."""
        for i in range(len(self._files)):
            self._check_digest(i)
        return self

    # ------------------------------------------------------------ array protocol
    @property
    def dtype(self):
        return np.dtype(np.float32) if self.storage_dtype == "bfloat16" else self._file_dtype

    @property
    def ndim(self):
        return 2

    @property
    def nbytes(self):
        """Bytes on disk of this layer's values (what loading it in storage dtype takes)."""
        return self.shape[0] * self.shape[1] * self._file_dtype.itemsize

    @property
    def n_shards(self):
        return len(self._files)

    def __reduce__(self):
        # A store travels (to a joblib or dask worker) as its path, layer, verification,
        # manifest and, for a subset, its rows: the receiving process reopens the files,
        # which must be reachable there, and checks them against the sender's manifest
        # (its own memory maps, its own lazy digest checks); the memory maps and the lock
        # stay in this process.
        return (_reopen, (str(self.path), self.layer, self._verify, self.manifest,
                          self.indexing, _as_runs(self._rows)))

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        part = "" if self._rows is None else f", subset of {self._n_base_rows} rows"
        return (f"ActivationStore({str(self.path)!r}, layer={self.layer!r}, shape={self.shape}, "
                f"storage_dtype={self.storage_dtype!r}{part})")

    # ------------------------------------------------------------ subsets
    @property
    def _n_base_rows(self):
        return int(self._offsets[-1])

    def _row_ids(self, key):
        """The rows ``key`` (slice, integer or boolean array) picks: a range for a slice,
        else an int64 array."""
        n = self.shape[0]
        if isinstance(key, slice):
            return range(*key.indices(n))
        idx = np.asarray(key)
        if idx.size == 0 and not isinstance(key, np.ndarray):  # [] is float64 to numpy
            return np.zeros(idx.shape, dtype=np.int64)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean row index must have one entry per row ({n}); "
                                 f"got shape {idx.shape}.")
            return np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"cannot index rows with {idx.dtype} values.")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for a store of {n} rows.")
        return np.where(idx < 0, idx + n, idx)

    def subset(self, rows):
        """A lazy view of some of these rows: an :class:`ActivationStore` that reads only them.

        Nothing is read now. The view has the same array protocol, travels to
        worker processes as the store's path and its row numbers, and is
        taken by the estimators' ``fit``, ``partial_fit``, ``transform`` and
        ``score`` like the whole store: what scikit-learn's searches and
        ``cross_validate`` need to train on folds of a store without loading
        them (see ``indexing="lazy"`` in :func:`open_store`).

        Parameters
        ----------
        rows : slice, int array or bool array
            Rows of this store (or of this view): any order, repeats allowed;
            a boolean mask has one entry per row.

        Returns
        -------
        view : ActivationStore
            Its ``indexing`` is this store's.
        """
        picked = self._row_ids(rows)
        if not isinstance(picked, range) and picked.ndim != 1:
            raise IndexError(f"a subset takes a 1-D row index; got shape {picked.shape}.")
        return self._view(_pick(self._rows, picked))

    def _view(self, rows):
        """A view of ``rows`` of the whole layer (a range or a 1-D int64 array)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)  # shares the memory maps and the digest checks
        if isinstance(rows, np.ndarray):
            rows.setflags(write=False)
        view._rows = rows
        view.shape = (len(rows), self.shape[1])
        return view

    # ------------------------------------------------------------ reads
    def _map(self, i):
        """Shard ``i``'s memory map, opened when not among the ``_MAX_OPEN_SHARDS`` most
        recently used; the least recently used beyond that are let go (a reader still
        holding one keeps it open until it is done with it). Read through
        :meth:`_shard_rows`, which checks what it reads."""
        with self._maps_lock:
            m = self._maps.get(i)
            if m is not None:
                self._maps.move_to_end(i)
                return m
            m = np.load(self._files[i], mmap_mode="r", allow_pickle=False)
            self._maps[i] = m
            while len(self._maps) > max(1, _MAX_OPEN_SHARDS):
                self._maps.popitem(last=False)
            return m

    def _shard_of_base(self, row):
        return int(np.searchsorted(self._offsets, row, side="right") - 1)

    def _base_row(self, row):
        return int(row) if self._rows is None else int(self._rows[row])

    def shard_of(self, row):
        """Index of the shard that holds ``row``."""
        return self._shard_of_base(self._base_row(row))

    def _where(self, row):
        """Where ``row`` is on disk, for messages."""
        base = self._base_row(row)
        i = self._shard_of_base(base)
        whole = "" if self._rows is None else f"row {base} of the whole layer, "
        return f"row {row} ({whole}shard {i}, {self._files[i].relative_to(self.path)}, of " \
               f"{self.path})"

    def _gather(self, rows, source, out):
        """``out[j] = row rows[j]`` of the whole layer; ``source(i, ids)``: rows of shard ``i``."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard = np.searchsorted(self._offsets, sorted_rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, rows.size]):
            if a == b:
                continue
            i = int(shard[a])
            out[order[a:b]] = source(i, sorted_rows[a:b] - self._offsets[i])
        return out

    def read_raw(self, start, stop):
        """Rows ``start:stop`` as a host tensor of the storage's torch dtype (a copy)."""
        start, stop = max(0, start), min(stop, self.shape[0])
        out = np.empty((max(0, stop - start), self.shape[1]), dtype=self._file_dtype)
        self.read_into(out, start, stop)
        return self._as_torch(out)

    def read_into(self, out, start, stop):
        """Copy rows ``start:stop`` into ``out``, a numpy array of the shard files' dtype."""
        if self._rows is not None:
            rows = self._rows[start:stop]
            run = _run(rows)
            if run is None:
                self._gather(_ids(rows), self._shard_rows, out)
                return
            start, stop = run  # a run: read it as one
        pos = start
        while pos < stop:
            i = self._shard_of_base(pos)
            lo = pos - self._offsets[i]
            hi = min(stop, self._offsets[i + 1]) - self._offsets[i]
            out[pos - start: pos - start + hi - lo] = self._shard_rows(i, slice(lo, hi))
            pos += hi - lo

    def take_raw(self, rows):
        """Rows ``rows`` (integers, any order, repeats allowed) as a host tensor (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for a store of {self.shape[0]} rows.")
        if self._rows is not None:
            rows = _pick(self._rows, rows)
        out = np.empty((rows.size, self.shape[1]), dtype=self._file_dtype)
        return self._as_torch(self._gather(rows, self._shard_rows, out))

    def _as_torch(self, out):
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if self.storage_dtype == "bfloat16" else t

    def _values(self, t):
        """Numpy values of a raw tensor (bfloat16 becomes float32)."""
        if t.dtype == torch.bfloat16:
            return t.float().numpy()
        return t.numpy()

    def __getitem__(self, key):
        cols = None
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("an ActivationStore is 2-dimensional.")
            key, cols = key
        if isinstance(key, (int, np.integer)):
            n = self.shape[0]
            row = int(key) + n if key < 0 else int(key)
            if not 0 <= row < n:
                raise IndexError(f"row {key} is out of range for {n} rows.")
            out = self._load(row, row + 1)[0]
            return out if cols is None or cols is Ellipsis else out[cols]
        every_column = cols is None or cols is Ellipsis or (
            isinstance(cols, slice) and cols == slice(None))
        if self.indexing == "lazy" and every_column:
            return self.subset(key)
        if isinstance(key, slice) and key.step in (None, 1):
            out = self._load(*key.indices(self.shape[0])[:2])
        elif isinstance(key, slice):  # evenly spaced rows: ids only for the rows read
            out = self.subset(key)._load()
        else:
            idx = self._row_ids(key)
            out = self._values(self.take_raw(idx.ravel())).reshape(*idx.shape, self.shape[1])
        return out if every_column else out[:, cols]

    def _load(self, start=0, stop=None):
        """Rows ``start:stop`` as a numpy array, whatever ``indexing`` is."""
        stop = self.shape[0] if stop is None else stop
        return self._values(self.read_raw(start, stop))

    def __array__(self, dtype=None, copy=None):
        out = self._load()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self):
        for start in range(0, self.shape[0], 4096):
            yield from self._load(start, start + 4096)


def _pick(rows, picked):
    """``rows[picked]`` where each is a range or a 1-D int64 array (``rows`` None: all
    rows; ``picked`` already in range, no negatives), without materialising a range: a
    range of a range is a range."""
    if rows is None:
        return picked
    if isinstance(picked, range):
        if isinstance(rows, range):
            return range(rows.start + rows.step * picked.start,
                         rows.start + rows.step * picked.stop, rows.step * picked.step)
        return rows[_as_slice(picked)]
    if isinstance(rows, range):
        return rows.start + rows.step * picked
    return rows[picked]


def _as_slice(r):
    """The slice that picks what the range ``r`` (of indices ``>= 0``) picks."""
    if len(r) == 0:
        return slice(0, 0)
    last = r[-1]
    if r.step > 0:
        return slice(r[0], last + 1, r.step)
    return slice(r[0], last - 1 if last > 0 else None, r.step)


def _ids(rows):
    """``rows`` (a range or an int64 array) as an int64 array."""
    if isinstance(rows, range):
        return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    return rows


def _run(rows):
    """``(start, stop)`` when ``rows`` (a range or an int64 array) are consecutive
    increasing rows, else None."""
    if isinstance(rows, range):
        if rows.step == 1 or len(rows) == 1:
            return rows.start, rows.start + len(rows)
        return (0, 0) if len(rows) == 0 else None
    if rows.size and bool((np.diff(rows) == 1).all()):
        return int(rows[0]), int(rows[-1]) + 1
    return None


def _as_runs(rows):
    """Rows to pickle: a range as it is; else ``(starts, lengths)`` of their runs of
    consecutive rows where that is smaller (a fold of ``KFold`` is one or two runs), else
    the rows themselves."""
    if rows is None or isinstance(rows, range) or rows.size == 0:
        return rows
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    if 2 * (cut.size + 1) >= rows.size:
        return rows
    return rows[np.r_[0, cut]], np.diff(np.r_[0, cut, rows.size])


def _from_runs(runs):
    if not isinstance(runs, tuple):
        return runs
    starts, lengths = runs
    first = np.cumsum(lengths) - lengths  # where each run begins in the output
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _reopen(path, layer, verify, manifest, indexing="numpy", rows=None):
    """An :class:`ActivationStore` unpickled: the same files, reopened here."""
    store = ActivationStore(path, layer, verify=verify, indexing=indexing, _manifest=manifest)
    if isinstance(rows, range):  # as a slice: nothing materialised
        view = store.subset(_as_slice(rows))
        if view._rows != rows:  # a slice is clipped to the rows there are
            raise StoreError(f"{path}: a subset of rows {rows} of a layer of "
                             f"{store.shape[0]} rows.")
        return view
    return store if rows is None else store.subset(_from_runs(rows))


def open_store(path, layer=None, *, verify="lazy", indexing="numpy"):
    """Open one layer of an activation store as an array-like :class:`ActivationStore`.

    Parameters
    ----------
    path : path-like
        A store folder, written by :func:`harvest` or :func:`save_store`.
    layer : str, default=None
        The layer to read; may be left out when the store holds one.
    verify : {"lazy", "full", "none"}, default="lazy"
        When to check the shards' SHA-256 digests: each 1 MiB block of a
        shard the first time a row in it is read (``"lazy"``), all now
        (``"full"``), or never (``"none"``).
        Missing, truncated or resized shards are refused at opening whatever
        ``verify`` is.
    indexing : {"numpy", "lazy"}, default="numpy"
        ``"numpy"``: ``store[rows]`` reads the rows into an ndarray.
        ``"lazy"``: ``store[rows]`` (a slice or an index array, every column)
        is a :meth:`~ActivationStore.subset` view that reads nothing until
        used, which lets scikit-learn's searches and ``cross_validate`` train
        and score on folds of a store larger than memory.

    Returns
    -------
    store : ActivationStore

    Raises
    ------
    ValueError
        When the folder is not a store, the layer is not in it, or a shard is
        missing, truncated or (when checked) does not match its digest.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from sksae.activations import save_store, open_store
    >>> X = np.random.RandomState(0).randn(1000, 8).astype(np.float32)
    >>> folder = os.path.join(tempfile.mkdtemp(), "store")
    >>> _ = save_store(X, folder, dtype="float16", shard_rows=300)
    >>> store = open_store(folder)
    >>> store.shape, store.dtype, store.n_shards
    ((1000, 8), dtype('float16'), 4)
    >>> bool(np.allclose(store[10:12], X[10:12], atol=1e-2))
    True
    >>> fold = open_store(folder, indexing="lazy")[np.arange(200, 700)]
    >>> fold.shape, bool(np.allclose(fold[0], X[200], atol=1e-2))
    ((500, 8), True)
    """
    return ActivationStore(path, layer, verify=verify, indexing=indexing)


def save_store(X, path, *, dtype="float16", shard_rows=None, layer="activations",
               source=None, overwrite=False, chunk_rows=65536):
    """Write a 2-D array (or any array-like with row slicing) to an activation store.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Read and written ``chunk_rows`` rows at a time (a memory map or
        another store is never loaded whole, nor is a shard held whole).
    path : path-like
        The store folder to create.
    dtype : {"float16", "bfloat16", "float32", "float64"}, default="float16"
        Storage dtype.
    shard_rows : int, default=None
        Rows per shard file; by default as many as take about 1 GiB in the
        storage dtype (at least one): 131072 rows of 4096 float16 values.
    layer : str, default="activations"
        The name of the one layer.
    source : dict, default=None
        Description of the data, kept in the manifest.
    overwrite : bool, default=False
        Replace a store already at ``path``.
    chunk_rows : int, default=65536
        Rows read at a time.

    Returns
    -------
    store : ActivationStore
        The written store, opened.
    """
    if len(getattr(X, "shape", ())) != 2:
        X = np.asarray(X)
    if len(X.shape) != 2:
        raise ValueError(f"X must be 2-dimensional; got shape {X.shape}.")
    n, d = X.shape
    writer = StoreWriter(path, {layer: d}, dtype,
                         source if source is not None else {"kind": "array"},
                         overwrite=overwrite)
    if writer.n_rows:
        raise FileExistsError(f"{path} already holds rows; pass overwrite=True.")
    per_shard = _default_shard_rows(d, dtype) if shard_rows is None else int(shard_rows)
    if per_shard < 1:
        raise ValueError(f"shard_rows must be at least 1; got {shard_rows!r}.")
    step = max(1, min(per_shard, int(chunk_rows)))
    for start in range(0, n, per_shard):
        stop = min(n, start + per_shard)
        writer._write_shard_chunks(stop - start, _stored_chunks(X, start, stop, step, dtype))
    writer.close()
    return ActivationStore(path, layer, verify="none")


def _default_shard_rows(n_features, storage_dtype):
    """Rows of ``n_features`` values of ``storage_dtype`` in about ``_SHARD_BYTES`` (at least 1)."""
    row_bytes = n_features * STORAGE_DTYPES[storage_dtype][0].itemsize
    return max(1, _SHARD_BYTES // max(1, row_bytes))


def _stored_chunks(X, start, stop, step, storage_dtype):
    """Rows ``start:stop`` of ``X`` in the shard files' dtype, ``step`` rows at a time."""
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        part = np.asarray(X[lo:hi])
        if part.shape != (hi - lo, X.shape[1]):
            raise ValueError(f"X[{lo}:{hi}] has shape {part.shape}; expected "
                             f"{(hi - lo, X.shape[1])}.")
        if storage_dtype != "bfloat16" and part.dtype == STORAGE_DTYPES[storage_dtype][0]:
            yield np.ascontiguousarray(part)  # nothing to convert
            continue
        with warnings.catch_warnings():  # a read-only memory map's rows: only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            values = torch.from_numpy(np.ascontiguousarray(part))
        # torch's rounding, not numpy's: float64 goes to float16 through float32 in torch,
        # and a store holds the same values whichever way its rows came in
        yield to_storage(values, storage_dtype)
