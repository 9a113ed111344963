"""
============================
Choosing the dictionary size
============================

:func:`~sksae.model_selection.dictionary_size_sweep` fits one model per
dictionary size and reports reconstruction (FVE), sparsity (L0), dead and
duplicate atoms, the stability of the atoms from one size to the next and,
on toy data, their recovery of the true features. It also estimates the
number of features: ``n_features_estimate``, the level of ``n_shared`` (the
number of distinct atoms that dictionaries of neighbouring sizes share at
cosine > 0.9) once it stops growing.

The estimate needs a learner that recovers the features it has room for.
Here that is the recovery recipe of the user guide
(:class:`~sksae.SparseAutoencoder` followed by dictionary refinement,
:class:`sksae.RefinedAutoencoder`); a plain TopK SAE trained briefly
finds too few of the rare features for its dictionaries to agree.
"""

import os

import matplotlib.pyplot as plt

from sksae import RefinedAutoencoder, SparseAutoencoder
from sksae.datasets import make_sparse_superposition
from sksae.model_selection import dictionary_size_sweep
from sksae.plotting import plot_dictionary_size_sweep

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
n_samples = 8_000 if QUICK else 20_000

# %%
# 128 correlated true features in 64 dimensions, about five active per row.
X, features = make_sparse_superposition(n_samples, 64, 128, correlated=True,
                                        random_state=0, return_features=True)
# Six refinement rounds instead of the recipe's eight, as the benchmark's sweeps.
recipe = RefinedAutoencoder(SparseAutoencoder(k=6, max_iter=1, random_state=0), n_iter=6)
sizes = [64, 192, 256] if QUICK else [32, 64, 128, 192, 256]
result = dictionary_size_sweep(recipe, X, sizes, true_features=features,
                               param_name="estimator__n_components")
print(f"estimated number of features: {result.n_features_estimate} (true: 128)")
print(f"rule: {result.estimate_rule}")

# %%
# ``n_shared`` grows while the dictionaries are smaller than the feature count
# and levels off at it: the estimate (dashed) against the truth (dotted).
# Recovery of the truth (``mmcs_to_truth``) saturates from the true count on.
axes = plot_dictionary_size_sweep(
    result, keys=("n_shared", "mmcs_to_truth", "dead_fraction", "fve"))
for ax in axes:
    ax.axvline(result.n_features_estimate, ls="--", color="C3", label="estimate")
    ax.axvline(features.shape[0], ls=":", color="k", label="true count")
axes[0].axhline(features.shape[0], ls=":", color="k")
axes[0].legend(fontsize=8)
plt.show()
