"""Cost of listing one more shard in a store of many layers, for an A/B of two checkouts.

    python benchmarks/bench_store_records.py                          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_store_records.py --label old

A harvest of 32 layers writes a shard of 32 files, then lists it (``StoreWriter._append``).
The shard files here are one row each (their writing is not what is measured); the
seconds spent listing the shard and the bytes of ``manifest.json`` are printed at
several shard counts. Version 1 of the store format rewrote a manifest listing every
shard after each one, so the cost grew with the store; version 2 appends a line and
writes a manifest of constant size.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import sksae
from sksae.activations import open_store
from sksae.activations._store import StoreWriter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--window", type=int, default=50, help="appends timed at each mark")
    args = ap.parse_args(argv)
    marks = {args.shards // 4, args.shards // 2, args.shards}
    layers = {f"blocks.{i}": 1 for i in range(args.layers)}
    row = {name: np.zeros((1, 1), np.float16) for name in layers}
    with tempfile.TemporaryDirectory() as tmp:
        writer = StoreWriter(Path(tmp) / "s", layers, "float16", {"bench": True})
        listed = writer._append
        spent = []

        def timed(shard):
            start = time.perf_counter()
            listed(shard)
            spent.append(time.perf_counter() - start)

        writer._append = timed
        for i in range(1, args.shards + 1):
            writer.write_shard(row, n_batches=1)
            if i in marks:
                window = spent[-args.window:]
                size = (Path(tmp) / "s" / "manifest.json").stat().st_size
                print(f"{args.label:6s} shards {i:6d}  list one: {1e3 * np.median(window):8.3f} ms"
                      f"  manifest.json {size:10d} bytes  ({sksae.__file__})", flush=True)
        print(f"{args.label:6s} total seconds listing {args.shards} shards: {sum(spent):.2f}")
        writer.close()
        opens = []
        for _ in range(3):
            start = time.perf_counter()
            open_store(Path(tmp) / "s", layer="blocks.0", verify="none")
            opens.append(time.perf_counter() - start)
        print(f"{args.label:6s} opening one layer of the store: {np.median(opens):.3f} s")


if __name__ == "__main__":
    main()
