"""Two checkouts of sksae side by side: TopK training samples/s, alternating runs.

On a shared machine the load drifts by 15-25% between minutes, so numbers from
two separate benchmark runs cannot tell a 10% change from noise. This script
runs the training loop of :mod:`bench_throughput` (``run_sksae``, same data,
batch size and epochs) for each checkout in turn, in fresh processes, for
several rounds, and prints every run, the medians and their ratio.

``--shape omp`` times the CPU's OMP coder instead (``sksae.sparse_encode``
with ``algorithm="omp"``, the compiled per-row kernel): rows/s of 20,000 rows
of 256 features against 1024 unit atoms, 12 atoms per row.

Usage::

    git worktree add /tmp/old <commit>
    python benchmarks/bench_ab.py /tmp/old . --shape small --rounds 3

Each process imports sksae and ``benchmarks/bench_throughput.py`` from its
checkout; the numba kernels of each checkout are compiled (and cached) on its
first run, outside the timed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = {"small": (384, 3072, 32, 1024, 3), "large": (768, 24576, 32, 4096, 1),
          "wide": (768, 98304, 32, 1024, 1),
          "omp": (256, 1024, 12, 20_000, 1)}

_CHILD = """
import json, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/benchmarks"]
import torch
import sksae
from bench_throughput import make_data, run_sksae
assert sksae.__file__.startswith(root), sksae.__file__
D, F, k, B, epochs, repeats = json.loads(sys.argv[2])
X = make_data(16 * B, D, k)
run_sksae(X[:B], F, k, B, 1, torch.device("cpu"))  # first-call costs, untimed
out = []
for _ in range(repeats):
    seconds, setup, _ = run_sksae(X, F, k, B, epochs, torch.device("cpu"))
    out.append([16 * epochs * B / seconds, setup])
print("RESULT", json.dumps(out))
"""

_CHILD_OMP = """
import json, sys, time
root = sys.argv[1]
sys.path[:0] = [root]
import numpy as np
import sksae
assert sksae.__file__.startswith(root), sksae.__file__
D, F, k, n, _, repeats = json.loads(sys.argv[2])
rng = np.random.default_rng(0)
atoms = rng.standard_normal((F, D)).astype(np.float32)
atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
X = rng.standard_normal((n, D)).astype(np.float32)
sksae.sparse_encode(X[:100], atoms, algorithm="omp", n_nonzero_coefs=k, device="cpu")  # compile
out = []
for _ in range(repeats):
    start = time.perf_counter()
    sksae.sparse_encode(X, atoms, algorithm="omp", n_nonzero_coefs=k, device="cpu")
    out.append([n / (time.perf_counter() - start), 0.0])
print("RESULT", json.dumps(out))
"""


def run(root, shape, repeats):
    """[(samples/s, setup s), ...] of ``repeats`` fits with the checkout at ``root``."""
    child = _CHILD_OMP if shape == SHAPES["omp"] else _CHILD
    proc = subprocess.run([sys.executable, "-c", child, os.path.abspath(root),
                           json.dumps([*shape, repeats])],
                          capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="checkout A (e.g. a git worktree of the old commit)")
    parser.add_argument("second", help="checkout B")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="fits per process")
    args = parser.parse_args(argv)
    D, F, k, B, epochs = SHAPES[args.shape]
    unit = "rows/s" if args.shape == "omp" else "samples/s"
    what = (f"OMP coder, {B} rows x {D} features, {F} atoms, {k} per row"
            if args.shape == "omp" else
            f"TopK {D}x{F} k={k} batch={B}, {epochs} epoch(s) of 16 batches")
    print(f"{what}; {args.rounds} rounds x {args.repeats} runs per checkout, alternating")
    runs = {args.first: [], args.second: []}
    for r in range(args.rounds):
        for root in runs:
            got = run(root, (D, F, k, B, epochs), args.repeats)
            runs[root].extend(got)
            print(f"  round {r + 1} {root}: " + "  ".join(
                f"{s:.0f} {unit} (setup {t:.2f} s)" for s, t in got), flush=True)
    medians = {root: statistics.median(s for s, _ in got) for root, got in runs.items()}
    for root, m in medians.items():
        print(f"median {root}: {m:.0f} {unit}")
    print(f"B / A: {medians[args.second] / medians[args.first]:.2f}")


if __name__ == "__main__":
    main()
