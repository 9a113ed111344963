"""
============================
Choosing the dictionary size
============================

:func:`~sksae.model_selection.dictionary_size_sweep` fits one model per
dictionary size and reports reconstruction (FVE), sparsity (L0), dead and
duplicate atoms, the stability of the atoms from one size to the next and,
on toy data, their recovery of the true features.
"""

import os

import matplotlib.pyplot as plt

from sksae import SparseAutoencoder
from sksae.datasets import make_sparse_superposition
from sksae.model_selection import dictionary_size_sweep
from sksae.plotting import plot_dictionary_size_sweep

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
n_samples = 2_000 if QUICK else 12_000

X, features = make_sparse_superposition(n_samples, 32, 64, random_state=0,
                                        return_features=True)
sae = SparseAutoencoder(k=4, max_iter=2 if QUICK else 8, random_state=0)
sizes = [16, 64] if QUICK else [16, 32, 64, 128, 256]
result = dictionary_size_sweep(sae, X, sizes, true_features=features)

# %%
# With 64 true features, recovery saturates around 64 atoms; larger
# dictionaries keep improving the FVE by splitting features.
plot_dictionary_size_sweep(result, keys=("fve", "dead_fraction", "mmcs_to_previous",
                                         "mmcs_to_truth"))
plt.show()
