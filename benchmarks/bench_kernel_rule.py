"""Sparse vs dense TopK kernels: the step time of each, side by side, per shape and device.

Calibrates the automatic rule of :func:`sksae._accel.sparse.use_sparse`. Each row times
``steps`` SAETrainer steps (after warm-up) with the architecture's kernels forced
to "sparse" and to "dense", and prints the ratio dense/sparse (> 1: sparse wins).
On CUDA with Triton the sparse step runs the Triton kernels of
:mod:`sksae._accel.fused` (a fit picks between the two by timing them at its
first batch; this shows the margins at several shapes).

Run: ``python benchmarks/bench_kernel_rule.py [--device cuda] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from sksae import architectures
from sksae._accel.device import resolve_device, synchronize
from sksae._sae_trainer import SAETrainer, init_parameters

SHAPES = [  # n_features, n_components, k, batch
    (256, 1024, 32, 256),
    (256, 1024, 32, 1024),
    (384, 3072, 32, 1024),
    (768, 8192, 32, 4096),
    (768, 24576, 32, 4096),
]


def step_time(device, D, F, k, B, mode, steps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B * 4, D, generator=gen).to(device)
    arch = architectures.get("topk")({"k": k, "auxk_alpha": 1 / 32}, F, D)
    arch.kernels = mode
    p = init_parameters(x[:2048].cpu(), F, "random", gen, torch.float32, device)
    tr = SAETrainer(arch, p, {}, lr=1e-4, schedule=architectures.Schedule(None, 1),
                    warmup_steps=1, dead_window=B)
    batches = [x[i * B:(i + 1) * B] for i in range(4)]
    for i in range(3):
        tr.step(batches[i % 4])
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        tr.step(batches[i % 4])
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-shapes", type=int, default=len(SHAPES))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'D':>5} {'F':>6} {'k':>3} {'B':>5}  {'sparse ms':>9} {'dense ms':>9}  dense/sparse")
    for D, F, k, B in SHAPES[: args.max_shapes]:
        s = step_time(device, D, F, k, B, "sparse", args.steps)
        d = step_time(device, D, F, k, B, "dense", args.steps)
        print(f"{D:>5} {F:>6} {k:>3} {B:>5}  {1e3 * s:9.2f} {1e3 * d:9.2f}  {d / s:10.2f}")


if __name__ == "__main__":
    main()
