"""Helpers of test_distributed_sharded: the problem, the unsharded run, and one rank's run.

:func:`worker` runs in processes spawned by ``torch.multiprocessing`` (gloo on
the CPU); each case's results go to ``<folder>/<case>-rank<r>.pt``.
"""

from __future__ import annotations

import torch

from sksae import architectures
from sksae._sae_trainer import SAETrainer, init_parameters

N_SAMPLES, N_FEATURES, BATCH = 2000, 16, 32


def problem(case):
    """``(arch, params, batches, trainer kwargs)`` of a case, the same in every process."""
    g = torch.Generator().manual_seed(case["seed"])
    # sparse combinations of 40 directions: structure for the latents to find
    atoms = torch.randn(40, N_FEATURES, generator=g, dtype=torch.float64)
    mask = torch.rand(N_SAMPLES, 40, generator=g, dtype=torch.float64) < 0.1
    X = (mask * torch.rand(N_SAMPLES, 40, generator=g, dtype=torch.float64)) @ atoms
    X = (X + 0.05 * torch.randn(N_SAMPLES, N_FEATURES, generator=g, dtype=torch.float64))
    X = X.to(torch.float32)
    arch = architectures.get("topk")(
        {"k": case["k"], "auxk_alpha": case["auxk_alpha"]}, case["n_components"], N_FEATURES)
    arch.check()
    arch.kernels = case.get("kernels", "auto")
    params = init_parameters(X[:512].double(), case["n_components"], "data", g,
                             torch.float32, torch.device("cpu"))
    params["b_enc"] = arch.init_encoder_bias(params)
    order = torch.cat([torch.randperm(N_SAMPLES, generator=g) for _ in range(5)])
    batches = [X[order[i:i + BATCH]] for i in range(0, case["steps"] * BATCH, BATCH)]
    kwargs = {"lr": case["lr"],
              "schedule": architectures.Schedule(case["steps"], N_SAMPLES // BATCH),
              "warmup_steps": 10, "dead_window": case["dead_window"], "precision": "float32"}
    return arch, params, batches, X[:256], kwargs


def train(trainer, batches, calibration):
    """Calibrate, then step through ``batches``; returns the metrics of every step."""
    trainer.calibrate_encoder_scale(calibration)
    history = []
    for batch in batches:
        out = trainer.step(batch, batch.shape[0])
        history.append({k: float(v) for k, v in out.as_dict().items()})
    return history


def unsharded(case):
    """The single-process SAETrainer's final tensors and metrics."""
    arch, params, batches, calibration, kwargs = problem(case)
    trainer = SAETrainer(arch, params, {}, **kwargs)
    history = train(trainer, batches, calibration)
    return {k: v.detach().clone() for k, v in trainer.params.items()}, history


def worker(rank, world_size, rdv, folder, cases):
    """One rank: every case's sharded run, saved with the full tensors gathered."""
    import torch.distributed as dist

    from sksae.distributed import Group
    from sksae.distributed._sharded import LatentShardedTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rdv, rank=rank, world_size=world_size)
    try:
        group = Group()
        for name, case in cases.items():
            arch, params, batches, calibration, kwargs = problem(case)
            trainer = LatentShardedTrainer(arch, params, {}, group=group, **kwargs)
            half = len(batches) // 2
            history = train(trainer, batches[:half], calibration)
            # a checkpoint round trip half-way: a fresh trainer resumes from this rank's state
            state = trainer.state_dict()
            resumed = LatentShardedTrainer(arch, params, {}, group=group, **kwargs)
            resumed.load_state_dict(state)
            for batch in batches[half:]:
                out = resumed.step(batch, batch.shape[0])
                history.append({k: float(v) for k, v in out.as_dict().items()})
            torch.save({"full": resumed.full_params(), "history": history,
                        "slice": (resumed.start, resumed.stop)},
                       f"{folder}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()
