"""Activations at scale: harvest a model's activations to disk, read them as arrays.

- :func:`harvest` runs any ``torch.nn.Module`` over input batches and writes
  the outputs of named submodules to an on-disk store (sharded ``.npy`` files,
  a line per shard with its digests, and a small JSON manifest), resuming
  after an interruption.
- :func:`open_store` opens a store as an :class:`ActivationStore`, an
  array-like object that :class:`~sksae.SparseAutoencoder` and
  :class:`~sksae.DictionaryLearnerGPU` fit, transform and score without
  loading it; :func:`save_store` writes any array to one.
- :func:`transform_to_store` writes a fitted estimator's codes of such an
  input to a sparse code store, read back with :func:`open_codes`.
"""

from ._codes import CodeStore, open_codes, transform_to_store
from ._harvest import harvest
from ._splice import Splice, loss_recovered, splice
from ._store import ActivationStore, StoreError, open_store, save_store

__all__ = ["harvest", "open_store", "save_store", "ActivationStore", "StoreError",
           "transform_to_store", "open_codes", "CodeStore", "splice", "Splice",
           "loss_recovered"]
