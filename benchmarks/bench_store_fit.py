"""Seconds of one epoch of SAE training from a lazily checked store, for an A/B of two checkouts.

    python benchmarks/bench_store_fit.py new /tmp/store_new
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_store_fit.py old /tmp/store_old

Writes (once per folder: each checkout reads its own format) a store of 1M
float16 rows of 256 features in 8 shards, then times two fits of one epoch
(TopK, 1,024 latents, k=16, batches of 4,096) on it opened with
``verify="lazy"``: every shard is hashed as it is read, whole shards before
block digests, 1 MiB blocks after. Run the checkouts alternately: the machine
is shared and noisy.
"""

import os
import sys
import time

import numpy as np

import sksae
from sksae import SparseAutoencoder
from sksae.activations import open_store, save_store


def main():
    label, folder = sys.argv[1], sys.argv[2]
    if not os.path.exists(folder):
        rng = np.random.RandomState(0)
        X = rng.randn(1_000_000, 256).astype(np.float32) @ (
            rng.randn(256, 256).astype(np.float32) / 16)
        save_store(X, folder, dtype="float16", shard_rows=125_000)
    times = []
    for _ in range(2):
        store = open_store(folder)
        start = time.perf_counter()
        SparseAutoencoder(n_components=1024, k=16, max_iter=1, batch_size=4096,
                          random_state=0).fit(store)
        times.append(time.perf_counter() - start)
    print(f"{label:4s} one epoch of 1M float16 rows (d=256, F=1024, k=16) from a lazily "
          f"checked store: {times[0]:.2f} s, {times[1]:.2f} s  ({sksae.__file__})", flush=True)


if __name__ == "__main__":
    main()
