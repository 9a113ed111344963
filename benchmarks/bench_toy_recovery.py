"""Ground-truth recovery on Sharkey-style toy data: SparseAutoencoder vs MiniBatchDictionaryLearning.

Set-up (RESEARCH.md §2): 256 input dimensions, 512 true features in superposition,
~5 active per row, correlated, 50k training rows and 5k held-out rows. Both models
get 1024 atoms and are fitted side by side in one run:

- sksae.SparseAutoencoder(n_components=1024) with every other parameter at its default
  (TopK, k=32);
- sklearn MiniBatchDictionaryLearning(n_components=1024, alpha=0.1, batch_size=256),
  the rest at scikit-learn's defaults.

Printed: fit seconds, mean max cosine similarity (MMCS) to the true features, the
fraction recovered above 0.9, held-out FVE and L0 (each model's own transform), and
the ratios the target is stated in (MMCS higher, fit time under a fifth).

Run: ``python benchmarks/bench_toy_recovery.py`` (``--quick`` for a smaller run;
``--sae-only --sae-fits 2`` times the SAE alone, twice in one process: the first
fit on a GPU also pays the process's one-off CUDA start-up).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from sklearn.decomposition import MiniBatchDictionaryLearning

from sksae import SparseAutoencoder
from sksae._demo import evaluate_recovery, format_table
from sksae.datasets import make_sparse_superposition


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k rows instead of 50k")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--sae-only", action="store_true", help="skip scikit-learn")
    parser.add_argument("--sae-fits", type=int, default=1,
                        help="fit the SAE this many times (each one printed)")
    args = parser.parse_args(argv)

    n_train = 10_000 if args.quick else 50_000
    X, features = make_sparse_superposition(
        n_train + 5_000, 256, 512, avg_active=5, correlated=True,
        random_state=args.random_state, return_features=True)
    X_train, X_test = X[:n_train], X[n_train:]
    print(f"toy data: {n_train} train / 5000 test rows, 256 dims, 512 true features, "
          f"~5 active, correlated | torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}")

    rows = []
    models = [
        ("sksae SparseAutoencoder(n_components=1024)",
         SparseAutoencoder(n_components=1024, device=args.device,
                           random_state=args.random_state)),
        ("sklearn MiniBatchDictionaryLearning(1024, alpha=0.1, batch_size=256)",
         MiniBatchDictionaryLearning(n_components=1024, alpha=0.1, batch_size=256,
                                     random_state=args.random_state)),
    ]
    for _ in range(args.sae_fits - 1):
        models.insert(0, models[0])
    if args.sae_only:
        models = [m for m in models if m[0].startswith("sksae")]
    for name, model in models:
        start = time.perf_counter()
        model.fit(X_train)
        rows.append(evaluate_recovery(name, model, X_test, features,
                                     time.perf_counter() - start))
    print(format_table(rows))
    if args.sae_only:
        return rows
    rows = [rows[-2], rows[-1]]  # the last SAE fit and scikit-learn's
    sae, mbdl = rows
    time_ratio = mbdl["fit s"] / sae["fit s"]
    print(f"\nfit time: SAE is {time_ratio:.1f}x faster (target >= 5x: "
          f"{'met' if time_ratio >= 5 else 'NOT met'})")
    print(f"MMCS: SAE {sae['MMCS']:.3f} vs sklearn {mbdl['MMCS']:.3f} (target higher: "
          f"{'met' if sae['MMCS'] > mbdl['MMCS'] else 'NOT met'})")
    return rows


if __name__ == "__main__":
    main()
