"""
=======================================================
Image patches: DictionaryLearnerGPU versus scikit-learn
=======================================================

Dictionary learning on 7x7 patches of a photograph, the setting of
scikit-learn's image-denoising example: learn atoms on the clean left half,
then reconstruct the noisy right half from sparse (OMP) codes.
:class:`~sksae.DictionaryLearnerGPU` solves scikit-learn's problem with the
same parameters, on torch (and on a GPU when there is one).
"""

import os
from time import perf_counter

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_sample_image
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

from sksae import DictionaryLearnerGPU
from sksae.plotting import plot_atoms

QUICK = os.environ.get("SKSAE_EXAMPLE_QUICK") == "1"  # small sizes for the test suite
step = 8 if QUICK else 4

# %%
# A grey, downsampled china.jpg (shipped with scikit-learn), noise on the right half.
face = load_sample_image("china.jpg").mean(axis=2)[::step, ::step] / 255.0
height, width = face.shape
rng = np.random.RandomState(0)
noisy = face.copy()
noisy[:, width // 2:] += 0.075 * rng.randn(height, width - width // 2)

patch = (7, 7)
data = extract_patches_2d(face[:, :width // 2], patch, max_patches=500 if QUICK else 10_000,
                          random_state=0).reshape(-1, 49)
mean, std = data.mean(axis=0), data.std(axis=0)
data = (data - mean) / std

# %%
# The same parameters for both learners.
params = dict(n_components=64 if QUICK else 100, alpha=1.0, batch_size=200, max_iter=1,
              transform_algorithm="omp", transform_n_nonzero_coefs=2, random_state=0)
models = {"DictionaryLearnerGPU": DictionaryLearnerGPU(**params),
          "MiniBatchDictionaryLearning": MiniBatchDictionaryLearning(**params)}
noisy_patches = extract_patches_2d(noisy[:, width // 2:], patch)
flat = noisy_patches.reshape(len(noisy_patches), -1)
fig, axes = plt.subplots(2, 2, figsize=(8, 8))
for row, (name, model) in zip(axes, models.items()):
    start = perf_counter()
    model.fit(data)
    seconds = perf_counter() - start
    codes = model.transform((flat - mean) / std)
    restored = (codes @ model.components_) * std + mean
    image = reconstruct_from_patches_2d(restored.reshape(noisy_patches.shape),
                                        (height, width - width // 2))
    error = np.sqrt(np.mean((image - face[:, width // 2:]) ** 2))
    print(f"{name}: fit {seconds:.1f} s, RMS error of the denoised half {error:.4f}")
    plot_atoms(model, patch, n_atoms=49, ax=row[0])
    row[0].set_title(name, fontsize=9)
    row[1].imshow(image, cmap="gray", vmin=0, vmax=1)
    row[1].set_title(f"denoised, RMS error {error:.3f}", fontsize=9)
    row[1].set_axis_off()
fig.tight_layout()
plt.show()
