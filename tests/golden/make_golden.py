"""Golden outputs of fixed small CPU fits, recorded before the redesign of issue 16.

``python tests/golden/make_golden.py`` rewrites ``golden.npz``; only do so when a
change of results is intended and explained in the commit message.
``tests/test_golden.py`` compares the current code with the file.
"""

from pathlib import Path

import numpy as np

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "gated", "relu")
#: the TopK family at a width that takes the sparse kernels, with AuxK at work
SPARSE_ARCHITECTURES = ("topk", "batchtopk")
FIT_ALGORITHMS = ("lars", "cd")
TRANSFORM_ALGORITHMS = ("lasso_lars", "lasso_cd", "lars", "omp", "threshold")
PATH = Path(__file__).with_name("golden.npz")


def data():
    from sksae.datasets import make_sparse_superposition

    X = make_sparse_superposition(n_samples=600, n_features=16, n_components=48,
                                  random_state=0)
    return np.asarray(X, dtype=np.float32)


def sae(architecture):
    from sksae import SparseAutoencoder

    return SparseAutoencoder(n_components=48, architecture=architecture, k=4, max_iter=3,
                             batch_size=64, precision="float32", device="cpu",
                             random_state=0)


def sae_sparse(architecture):
    from sksae import SparseAutoencoder

    return SparseAutoencoder(n_components=512, architecture=architecture, k=8, max_iter=2,
                             batch_size=128, dead_window=300, precision="float32",
                             device="cpu", random_state=0)


def dl(fit_algorithm, transform_algorithm):
    from sksae import DictionaryLearnerGPU

    return DictionaryLearnerGPU(n_components=24, alpha=0.5, batch_size=64, max_iter=2,
                                fit_algorithm=fit_algorithm,
                                transform_algorithm=transform_algorithm,
                                transform_alpha=0.3, transform_n_nonzero_coefs=3,
                                device="cpu", random_state=0)


def outputs():
    """{name: array} for every case."""
    X = data()
    out = {}
    for arch in ARCHITECTURES:
        model = sae(arch).fit(X)
        out[f"sae/{arch}/components"] = model.components_
        out[f"sae/{arch}/transform"] = model.transform(X[:100])
    for arch in SPARSE_ARCHITECTURES:
        model = sae_sparse(arch).fit(X)
        out[f"sae_sparse/{arch}/components"] = model.components_
        out[f"sae_sparse/{arch}/transform"] = model.transform(X[:100])
    for fit_alg in FIT_ALGORITHMS:
        for tr_alg in TRANSFORM_ALGORITHMS:
            model = dl(fit_alg, tr_alg).fit(X)
            out[f"dl/{fit_alg}/{tr_alg}/components"] = model.components_
            out[f"dl/{fit_alg}/{tr_alg}/transform"] = model.transform(X[:100])
    return out


if __name__ == "__main__":
    np.savez_compressed(PATH, **outputs())
    print(f"wrote {PATH}")
