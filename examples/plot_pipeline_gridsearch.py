"""
=========================================
Tuning k with a Pipeline and GridSearchCV
=========================================

:class:`~sksae.SparseAutoencoder` is a scikit-learn transformer: its
``score`` is the fraction of variance explained (FVE), so
:class:`~sklearn.model_selection.GridSearchCV` can tune the number of active
latents ``k`` directly, and the codes can feed a classifier in a
:class:`~sklearn.pipeline.Pipeline`.
"""

import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline

from sksae import SparseAutoencoder
from sksae.datasets import make_sparse_superposition

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
n_samples = 1_500 if QUICK else 8_000

X = make_sparse_superposition(n_samples, 32, 64, random_state=0)
sae = SparseAutoencoder(n_components=128, max_iter=2 if QUICK else 6, random_state=0)

# %%
# Cross-validated FVE for a few values of k.
grid = GridSearchCV(sae, {"k": [2, 4, 8, 16]}, cv=3).fit(X)
ks = grid.cv_results_["param_k"].data.astype(int)
fig, ax = plt.subplots(figsize=(5, 3))
ax.errorbar(ks, grid.cv_results_["mean_test_score"], grid.cv_results_["std_test_score"],
            marker="o")
ax.set_xscale("log", base=2)
ax.set_xlabel("k (active latents per row)")
ax.set_ylabel("held-out FVE")
print("best k:", grid.best_params_["k"])

# %%
# The codes as features: predict whether the first input dimension is positive.
y = (X[:, 0] > np.median(X[:, 0])).astype(int)
pipe = make_pipeline(SparseAutoencoder(n_components=128, k=8, max_iter=2 if QUICK else 6,
                                       random_state=0),
                     LogisticRegression(max_iter=500))
print("accuracy from SAE codes:", cross_val_score(pipe, X, y, cv=3).mean().round(3))
plt.show()
