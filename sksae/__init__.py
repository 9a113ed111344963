"""sksae: sparse autoencoders and GPU dictionary learning as scikit-learn estimators.

Public names are imported lazily so that ``import sksae`` stays cheap and the
submodules (``sksae.architectures``, ``sksae.datasets``, ``sksae.metrics``,
``sksae.model_selection``, ``sksae.plotting``, ``sksae.interop``) load only when used.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SparseAutoencoder": "sksae._sae",
    "DictionaryLearnerGPU": "sksae._dict_learning",
    "RefinedAutoencoder": "sksae._refine",
    "refine_dictionary": "sksae._refine",
    "sparse_encode": "sksae._dict_learning",
    "save": "sksae._io",
    "load": "sksae._io",
    "TrainingDivergedError": "sksae._base",
}
_SUBMODULES = ("architectures", "datasets", "metrics", "model_selection", "plotting", "interop",
               "distributed")

__all__ = sorted(_LAZY) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"sksae.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sksae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
