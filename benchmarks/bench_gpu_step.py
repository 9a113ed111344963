"""Milliseconds per TopK training step, eager against recorded (CUDA graph), side by side.

    python benchmarks/bench_gpu_step.py [--device cuda] [--profile]

For each shape (n_features, n_components, k, batch): the toy-recovery shape of
``bench_toy_recovery.py`` and the two shapes of ``bench_throughput.py``, the
same trainer (``sksae._sae_trainer.SAETrainer``) runs ``--steps`` steps with
``SAETrainer.cuda_graphs`` off, then on, on the same batches, and the script
prints ms per step, the ratio and the final loss of both. ``--profile`` adds
the GPU kernels of a few eager steps of the largest shape, by total GPU time
(torch.profiler). On the CPU only the eager step runs (graphs are CUDA-only).
"""

from __future__ import annotations

import argparse
import time

import torch

from sksae._accel.device import synchronize
from sksae._sae_trainer import SAETrainer, init_parameters
from sksae.architectures import REGISTRY, Schedule

SHAPES = [(256, 1024, 32, 256), (384, 3072, 32, 1024), (768, 24576, 32, 4096)]


def make_trainer(shape, device, graphs, steps, architecture="topk"):
    D, F, k, B = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * B, D, generator=g)
    arch = REGISTRY[architecture]({"k": k, "auxk_alpha": 1 / 32}, F, D)
    params = init_parameters(x[:4096], F, "data", g, torch.float32, device)
    SAETrainer.cuda_graphs = graphs
    trainer = SAETrainer(arch, params, {}, lr=2e-4, schedule=Schedule(steps, len(x) // B),
                         warmup_steps=10, dead_window=4 * B)
    return trainer, x.to(device).split(B)


def time_steps(shape, device, graphs, steps):
    trainer, batches = make_trainer(shape, device, graphs, steps)
    warm = 5
    for i in range(warm):
        trainer.step(batches[i % len(batches)])
    synchronize(device)
    start = time.perf_counter()
    for i in range(warm, steps):
        out = trainer.step(batches[i % len(batches)])
    loss = float(out.loss)
    synchronize(device)
    seconds = (time.perf_counter() - start) / (steps - warm)
    return 1e3 * seconds, loss, trainer.graph_error


def profile(shape, device):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    trainer, batches = make_trainer(shape, device, False, 20)
    for i in range(3):
        trainer.step(batches[i % len(batches)])
    synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            trainer.step(batches[i % len(batches)])
        synchronize(device)
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:  # the sort key's name changed across torch versions
            print(events.table(sort_by=key, row_limit=18, max_name_column_width=60))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="first N shapes only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), {args.steps} steps per run")
    print(f"{'shape (D, F, k, B)':>26} {'eager ms':>9} {'graph ms':>9} {'ratio':>6}"
          f" {'eager loss':>11} {'graph loss':>11}")
    for shape in SHAPES[:args.shapes]:
        steps = args.steps if shape[3] <= 1024 else max(20, args.steps // 5)
        eager_ms, eager_loss, _ = time_steps(shape, device, False, steps)
        if device.type == "cuda":
            graph_ms, graph_loss, error = time_steps(shape, device, True, steps)
            ratio = f"{eager_ms / graph_ms:6.1f}"
        else:
            graph_ms = graph_loss = float("nan")
            ratio, error = "   n/a", None
        print(f"{str(shape):>26} {eager_ms:9.3f} {graph_ms:9.3f} {ratio}"
              f" {eager_loss:11.5f} {graph_loss:11.5f}")
        if error:
            print(f"    graph not recorded: {error}")
    SAETrainer.cuda_graphs = True
    if args.profile:
        profile(SHAPES[-1] if device.type == "cuda" else SHAPES[0], device)


if __name__ == "__main__":
    main()
