"""Time per TopK training step as the dictionary widens: sksae beside sparsify, in one run.

    python benchmarks/bench_scaling.py [--device cuda] [--widths 24576,98304,393216]
                                       [--ks 32,128] [--features 768] [--batch 4096]
    python benchmarks/bench_scaling.py --quick   # small shapes: checks the script on a CPU

For each width F and k, on random Gaussian batches (the time of a step does not
depend on the data's structure, only its shape):

- ``sksae``: ``SAETrainer`` steps (AuxK on, the fit's default recipe) with its
  kernels as a fit chooses them ("auto": on CUDA the faster of the sparse Triton
  step and the dense one, timed at the first batch; the column ``kernels`` says
  which, with both timings of that choice);
- ``sparsify`` (EleutherAI, ``pip install eai-sparsify``): its ``SparseCoder``
  step as its trainer runs it (bf16 autocast on CUDA, its Triton decoder,
  compiled before timing), AuxK on, Adam, the decoder's gradient projection
  and renormalisation;
- ``floor``: the dense encoder product in the step's precision plus the faster
  top-k (``torch.topk`` or sksae's), the work no TopK step can avoid.

It prints ms per step, ``sparsify/sksae`` (> 1: sksae is faster) and
``floor/sksae`` (the share of the floor reached), and how the step grows
from the narrowest width (a step linear in F grows as F does).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sksae._accel.device import synchronize
from sksae._sae_trainer import SAETrainer, init_parameters, product_dtype
from sksae.architectures import REGISTRY, Schedule


def _ms_per_step(step, batches, device, warm=3, steps=12):
    for i in range(warm):
        step(batches[i % len(batches)])
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[(warm + i) % len(batches)])
    synchronize(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def sksae_ms(D, F, k, B, device, batches):
    g = torch.Generator().manual_seed(0)
    arch = REGISTRY["topk"]({"k": k, "auxk_alpha": 1 / 32}, F, D)
    params = init_parameters(batches[0].cpu().double(), F, "random", g, torch.float32, device)
    trainer = SAETrainer(arch, params, {}, lr=2e-4 / (F / 2**14) ** 0.5,
                         schedule=Schedule(None, 1), warmup_steps=10, dead_window=4 * B)
    ms = _ms_per_step(trainer.step, batches, device)
    timings = trainer.kernel_timings or {}
    note = arch.kernels + "".join(f" {m}={1e3 * s:.2f}" for m, s in sorted(timings.items()))
    return ms, note


def sparsify_ms(D, F, k, B, device, batches):
    from bench_throughput import sparsify_step  # benchmarks/ is the script's folder
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=k), device=device,
                      dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (F / 2**14) ** 0.5)
    since_fired = torch.zeros(F, dtype=torch.long, device=device)
    step = sparsify_step(sae, opt, since_fired, 4 * B, device.type == "cuda")
    return _ms_per_step(step, batches, device), ""  # the warm-up compiles its kernels


def floor_ms(D, F, k, B, device):
    """ms of the floor: bench_throughput's roofline (encoder product + the faster top-k)."""
    from bench_throughput import roofline  # benchmarks/ is the script's folder

    dtype = product_dtype("auto", device, torch.float32) or torch.float32
    return 1e3 * B / roofline(D, F, k, B, device, dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", default="24576,98304,393216")
    ap.add_argument("--ks", default="32,128")
    ap.add_argument("--features", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--peers", default="sparsify", help="'sparsify' or '' (none)")
    ap.add_argument("--quick", action="store_true", help="small shapes (a CPU check)")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.ks, args.features, args.batch = "1024,4096", "8,32", 64, 256
    device = torch.device(args.device)
    D, B = args.features, args.batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), d={D}, batch {B}")
    runners = {"sksae": sksae_ms}
    if device.type != "cuda":  # sparsify's Triton decoder (taken whenever Triton imports) needs CUDA
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if "sparsify" in args.peers.split(","):
        try:
            import sparsify  # noqa: F401
            runners["sparsify"] = sparsify_ms
        except Exception as exc:  # noqa: BLE001 - not installed, or broken
            print(f"# sparsify skipped: {type(exc).__name__}: {exc}")
    print(f"{'F':>8} {'k':>4} {'floor ms':>9} " + " ".join(f"{n + ' ms':>12}" for n in runners)
          + f" {'sparsify/sksae':>14} {'floor/sksae':>11} {'x narrowest':>11}  kernels")
    first = {}
    for k in (int(v) for v in args.ks.split(",")):
        for F in (int(v) for v in args.widths.split(",")):
            g = torch.Generator().manual_seed(1)
            batches = [torch.randn(B, D, generator=g).to(device) for _ in range(4)]
            floor = floor_ms(D, F, k, B, device)
            ms, notes = {}, {}
            for n, run in runners.items():
                try:
                    ms[n], notes[n] = run(D, F, k, B, device, batches)
                except torch.OutOfMemoryError:
                    ms[n], notes[n] = float("nan"), "out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ours = ms["sksae"]
            first.setdefault(k, (F, ours))
            grow = ours / first[k][1]
            ratio = ms["sparsify"] / ours if "sparsify" in ms else float("nan")
            print(f"{F:>8} {k:>4} {floor:9.3f} " + " ".join(f"{ms[n]:12.3f}" for n in runners)
                  + f" {ratio:14.2f} {floor / ours:11.2f} {grow:11.2f}  {notes['sksae']}",
                  flush=True)


if __name__ == "__main__":
    main()
