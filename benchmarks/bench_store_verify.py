"""A lazily checked store's first random rows: what reading them hashes, for an A/B of two checkouts.

    python benchmarks/bench_store_verify.py                          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_store_verify.py --label old

A fit on a store begins by reading 16,384 random rows (normalisation and
initialisation). With ``verify="lazy"`` each shard was checked against one
digest of the whole file on its first read, so those rows hashed nearly every
shard of the store; with block digests only the 1 MiB blocks that hold them
are hashed. The store here is virtual: shards of float16 rows whose values are
holes in sparse files (no disk, no page cache to warm), so the time is the
hashing and reading of what is checked. Its digests are computed once, since
every shard file is the same. Printed: seconds to open the store and to take
the rows, and the gigabytes hashed.
"""

import argparse
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import sksae
from sksae.activations import _store, open_store


def build(folder, n_shards, rows, features):
    """A store of ``n_shards`` identical all-zero float16 shards; returns bytes per shard."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f2", "fortran_order": False, "shape": (rows, features)})
    size = len(header.getvalue()) + 2 * rows * features
    (folder / "layer-000").mkdir(parents=True)
    first = folder / "layer-000" / "shard-000000.npy"
    with open(first, "wb") as f:
        f.write(header.getvalue())
        f.truncate(size)
    block = getattr(_store, "_BLOCK_BYTES", None)
    if block is None:  # a whole-file digest (format 1)
        entry = {"sha256": _store._sha256(first)}
    else:
        digests = _store._BlockDigests(block)
        with open(first, "rb") as f:
            while data := f.read(64 << 20):
                digests.update(data)
        digests = digests.finish()
    shards = []
    for i in range(n_shards):
        rel = f"layer-000/shard-{i:06d}.npy"
        if i:
            with open(folder / rel, "wb") as f:
                f.write(header.getvalue())
                f.truncate(size)
        if block is not None:
            (folder / _store._sidecar(rel)).write_bytes(digests)
            entry = {"blocks": {"file": _store._sidecar(rel), "bytes": block,
                                "sha256": hashlib.sha256(digests).hexdigest()}}
        shards.append({"rows": rows, "batches": 0, "files": {"activations": {"file": rel,
                                                                            **entry}}})
    manifest = {"format": _store.FORMAT, "version": _store.VERSION, "storage_dtype": "float16",
                "layers": [{"name": "activations", "dir": "layer-000",
                            "n_features": features}],
                "source": {}, "n_rows": rows * n_shards, "n_batches": 0, "complete": True,
                "shards": shards}
    if hasattr(_store, "_write_manifest"):
        _store._write_manifest(folder, manifest)
    else:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this")
    ap.add_argument("--shards", type=int, default=48)
    ap.add_argument("--rows", type=int, default=131072, help="rows per shard")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--sample", type=int, default=16384)
    args = ap.parse_args(argv)
    hashed = [0]
    real = hashlib.sha256

    def counting(data=b"", *a, **k):
        hashed[0] += len(data)
        h = real(data, *a, **k)
        return _Counted(h, hashed)

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp) / "s"
        size = build(folder, args.shards, args.rows, args.features)
        _store.hashlib.sha256 = counting
        try:
            start = time.perf_counter()
            store = open_store(folder)  # verify="lazy"
            opened = time.perf_counter() - start
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(store.shape[0], args.sample, replace=False))
            start = time.perf_counter()
            store.take_raw(rows)
            took = time.perf_counter() - start
        finally:
            _store.hashlib.sha256 = real
    print(f"{args.label:6s} store {args.shards} shards x {size / 2**30:.2f} GiB "
          f"({args.shards * size / 2**30:.0f} GiB): open {opened:6.2f} s, "
          f"{args.sample} random rows {took:7.2f} s, hashed {hashed[0] / 2**30:7.2f} GiB  "
          f"({sksae.__file__})", flush=True)


class _Counted:
    """A hash object that counts the bytes it is fed."""

    def __init__(self, h, counter):
        self._h, self._counter = h, counter

    def update(self, data):
        self._counter[0] += len(data)
        self._h.update(data)

    def __getattr__(self, name):
        return getattr(self._h, name)


if __name__ == "__main__":
    main()
