"""Training across processes on ``torch.distributed``.

Inside an initialised process group (as under ``torchrun``), the estimators'
``fit`` and ``partial_fit`` train data-parallel with ``distributed="auto"``:
each rank reads its own rows of every global batch and every rank ends with
the same model; with ``distributed="latent"`` each rank holds a slice of the
latents (:class:`LatentShardedTrainer`). See the user guide's "Training
across processes".
"""

from ._group import BatchInfo, Group, resolve_group
from ._launch import init_from_environment, is_main_process

__all__ = ["BatchInfo", "Group", "resolve_group", "init_from_environment", "is_main_process",
           "LatentShardedTrainer"]


def __getattr__(name):
    # imported on first use: the trainer module imports sksae._sae_trainer, which imports
    # this package
    if name == "LatentShardedTrainer":
        from ._sharded import LatentShardedTrainer

        return LatentShardedTrainer
    raise AttributeError(f"module 'sksae.distributed' has no attribute {name!r}")
