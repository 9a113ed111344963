"""Seconds of SparseAutoencoder.score and fve_scorer on rows in memory, for an A/B of two checkouts.

    python benchmarks/bench_scoring.py                          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_scoring.py --label old

20,000 rows of 256 features, a TopK SAE of 4,096 latents (k=32), median of 5
calls each. Both score in chunks of rows (bounded memory); the scorers take
the SparseAutoencoder's codes sparse. Run the two checkouts alternately and
compare the medians: the machine is shared and noisy.
"""

import argparse
import time

import numpy as np

import sksae
from sksae import SparseAutoencoder
from sksae.metrics import fve_scorer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.RandomState(0)
    X = (rng.randn(20000, 256) @ rng.randn(256, 256) / 16).astype(np.float32)
    sae = SparseAutoencoder(n_components=4096, k=32, max_iter=0, random_state=0).fit(X[:2000])
    fve_scorer(sae, X[:1000]), sae.score(X[:1000])  # warm-up
    for name, call in (("fve_scorer", lambda: fve_scorer(sae, X)),
                       ("score", lambda: sae.score(X))):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            value = call()
            times.append(time.perf_counter() - start)
        print(f"{args.label:6s} {name:11s} {np.median(times):7.3f} s  value {value:.6f}  "
              f"({sksae.__file__})", flush=True)


if __name__ == "__main__":
    main()
