"""
================================================
Recovering features in superposition with an SAE
================================================

Toy data in the style of Sharkey, Braun & Millidge (2022): rows are sparse
combinations of more ground-truth directions than there are dimensions. A
TopK sparse autoencoder should find atoms aligned with the true features;
we measure that with the mean max cosine similarity (MMCS) and the fraction
of true features recovered at cosine > 0.9, and compare with scikit-learn's
:class:`~sklearn.decomposition.MiniBatchDictionaryLearning`.

The third model is the recovery recipe of the user guide ("Recovering the
ground truth"): one pass of a TopK SAE, then its dictionary refined by
alternating non-negative OMP codes and least-squares updates over all the
rows (:class:`sksae.RefinedAutoencoder`). The SAE's encoder finds the
frequent features; the rare ones, seen in a few hundred rows, need the
refinement.
"""

import os

import matplotlib.pyplot as plt
from sklearn.decomposition import MiniBatchDictionaryLearning

from sksae import RefinedAutoencoder, SparseAutoencoder
from sksae.datasets import make_sparse_superposition
from sksae.metrics import mean_max_cosine_similarity
from sksae.plotting import plot_recovery, plot_training_curves

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
n_samples = 1_000 if QUICK else 20_000

# %%
# 128 true features in 64 dimensions, about five active per row, correlated,
# frequencies decaying by 0.99 per feature (the rarest fires in 0.3% of rows).
X, features = make_sparse_superposition(n_samples, 64, 128, correlated=True,
                                        random_state=0, return_features=True)

sae = SparseAutoencoder(n_components=256, k=8, max_iter=2 if QUICK else 10,
                        random_state=0).fit(X)
mbdl = MiniBatchDictionaryLearning(n_components=256, alpha=0.1, batch_size=256,
                                   max_iter=1 if QUICK else 3,
                                   transform_algorithm="lasso_lars", random_state=0).fit(X)
recipe = RefinedAutoencoder(SparseAutoencoder(n_components=256, k=6, max_iter=1,
                                              random_state=0)).fit(X)
for name, model in [("SAE", sae), ("MiniBatchDictionaryLearning", mbdl),
                    ("recipe (SAE + refinement)", recipe)]:
    mmcs, recovered = mean_max_cosine_similarity(
        features, model.components_, threshold=0.9, absolute=model is mbdl)
    print(f"{name}: MMCS {mmcs:.3f}, {recovered:.0%} of the features recovered")

# %%
# The training history: loss, fraction of variance explained, L0, dead latents.
plot_training_curves(sae, smooth=20)

# %%
# How well each true feature is matched by its closest atom.
fig, ax = plt.subplots(figsize=(6, 3.5))
plot_recovery(features, sae, ax=ax, label="SAE")
plot_recovery(features, mbdl, ax=ax, label="MBDL")
plot_recovery(features, recipe, ax=ax, label="recipe")
plt.show()
