"""Data-parallel training: 1 process against 2 gloo ranks at the same global batch.

Side by side in one run (each configuration a fresh ``torchrun`` launch, one
intra-op thread per process, so that 2 ranks use the 2 cores one process
cannot):

- samples/s of one epoch of TopK training (the steps after the first 20);
- the scaling efficiency ``(samples/s on 2 ranks) / (2 x samples/s on 1)``;
- the communication share of a step on 2 ranks: the time inside the
  collectives (the gradient + fired-count all-reduce and the metrics'
  all-reduce, timed around each call) over the step time;
- the bytes all-reduced per step, from which the user guide extrapolates to
  8 GPUs and several nodes;
- with ``--sharded``, the same for 2 gloo ranks that shard the latents
  (``distributed="latent"``; its communication: the all-gathers of the top-k
  candidates and the sums of the partial reconstructions).

On a GPU machine (``--device cuda``) a 1-rank NCCL group is timed beside the
non-distributed fit (this project's GPU machines have one GPU each).

Usage::

    python benchmarks/bench_distributed.py [--features 256 --latents 4096 --k 32
                                            --batch 1024 --rows 61440]

Results are printed and written to ``benchmarks/results/distributed.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distributed.txt"


def worker(args):
    import numpy as np
    import torch
    import torch.distributed as dist

    from sksae import SparseAutoencoder
    from sksae.distributed import Group, init_from_environment

    torch.set_num_threads(1)
    launched = init_from_environment()
    comm = {"s": 0.0, "bytes": 0, "calls": 0}
    original = Group.sum_

    def timed(self, t):
        start = time.perf_counter()
        out = original(self, t)
        comm["s"] += time.perf_counter() - start
        comm["bytes"] += t.numel() * t.element_size()
        comm["calls"] += 1
        return out

    Group.sum_ = timed
    gather = Group.all_gather

    def timed_gather(self, t):
        start = time.perf_counter()
        out = gather(self, t)
        comm["s"] += time.perf_counter() - start
        comm["bytes"] += t.numel() * t.element_size() * self.world_size
        comm["calls"] += 1
        return out

    Group.all_gather = timed_gather
    rng = np.random.RandomState(0)
    X = rng.randn(args.rows, args.features).astype(np.float32)
    stamps = []

    def clock(loc):
        stamps.append(time.perf_counter())

    mode = args.mode if launched else False
    model = SparseAutoencoder(args.latents, k=args.k, batch_size=args.batch, max_iter=1,
                              random_state=0, device=args.device, distributed=mode,
                              callback=clock)
    model.fit(X)
    warm = 20
    steps = len(stamps) - warm - 1
    seconds = stamps[-1] - stamps[warm]
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    if rank == 0:
        calls_per_step = comm["calls"] / max(1, len(stamps))
        print("RESULT " + json.dumps({
            "world": world, "mode": mode, "steps": steps,
            "samples_per_s": steps * args.batch / seconds,
            "step_ms": 1e3 * seconds / steps,
            "comm_share": comm["s"] / (stamps[-1] - stamps[0]) if comm["calls"] else 0.0,
            "bytes_per_step": comm["bytes"] / max(1, len(stamps)),
            "collectives_per_step": calls_per_step}))
    if launched:
        dist.barrier()
        dist.destroy_process_group()


def launch(nproc, args, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", __file__, "--worker", "--mode", mode]
    for key in ("features", "latents", "k", "batch", "rows", "device"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if nproc == 1 and mode == "none":
        cmd = [sys.executable, __file__, "--worker", "--mode", mode] + cmd[7:]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="data")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=61440)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sharded", action="store_true",
                        help="also 2 gloo ranks latent-sharded (distributed='latent')")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one = launch(1, args, "none")
    two = launch(2, args, "data")
    rows = [("1 process", one), ("2 gloo ranks, data-parallel", two)]
    if args.sharded:
        rows.append(("2 gloo ranks, latent-sharded", launch(2, args, "latent")))
    if args.device == "cuda":
        rows.append(("1-rank NCCL group, data-parallel", launch(1, args, "data")))
    what = "Data-parallel" + (" and latent-sharded" if args.sharded else "")
    lines = [f"{what} TopK training, d={args.features}, F={args.latents}, k={args.k}, "
             f"global batch {args.batch}, {args.rows} rows, device {args.device}, one thread "
             "per process", ""]
    lines.append(f"{'configuration':32s} {'samples/s':>10s} {'step ms':>8s} {'comm share':>10s} "
                 f"{'MB/step':>8s} {'collectives':>11s}")
    for label, r in rows:
        lines.append(f"{label:32s} {r['samples_per_s']:10.0f} {r['step_ms']:8.1f} "
                     f"{r['comm_share']:10.3f} {r['bytes_per_step'] / 2**20:8.2f} "
                     f"{r['collectives_per_step']:11.1f}")
    lines.append("")
    for label, r in rows[1:]:
        if "gloo" in label:
            speed = r["samples_per_s"] / one["samples_per_s"]
            lines.append(f"{label} / 1 process: {speed:.2f}x; scaling efficiency "
                         f"{speed / 2:.2f}")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} CPUs)\n{text}\n\n")


if __name__ == "__main__":
    main()
