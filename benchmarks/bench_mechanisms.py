"""What each speed mechanism of the CPU training step is worth: the step with it and without it.

Each mechanism of :mod:`sksae._accel` that the TopK training step uses is
switched off in turn, in a fresh process, by patching it from outside (the
library has no switches for this). Runs alternate between the unpatched step
and each patched one, for several rounds, and the script prints every run's
samples/s, the medians, and per mechanism ``worth = baseline / without`` (1.10
means the step is 10% faster with it). Issue 16's rule: a mechanism stays
where it is worth at least 5% at a benchmarked shape on some device. Two were
removed that way (a per-call-site choice of 1 or n threads, and a cache of
the codes' transposed pattern); their runs are in ``results/mechanisms_*.txt``.
A third was measured and not kept: AuxK's picks by a compiled selection over
the dead columns, each row gathered in the kernel's own buffer instead of a
(B, n_dead) ``index_select`` (worth 1.00 and 1.01 at ``--shape wide`` with dead
windows of 2048 and 4096 rows; ``results/mechanisms_auxk.txt``).

Usage::

    python benchmarks/bench_mechanisms.py --shape small --rounds 3
    python benchmarks/bench_mechanisms.py --shape large --rounds 2 --only scratch lending
    python benchmarks/bench_mechanisms.py --shape wide --dead-window 4096 --only compiled

The shapes are bench_ab.py's (TopK k=32, the throughput benchmark's loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_ab import SHAPES

#: mechanism -> (what it is, code run in the child before the fit)
MECHANISMS = {
    "scratch": ("reused CPU buffers for the step's (B, F) temporaries (StepWorkspace.scratch); "
                "without them a fresh buffer each call",
                "from sksae._accel.workspace import StepWorkspace\n"
                "def _fresh(self, name, shape, like, dtype=None, init=None):\n"
                "    buf = like.new_empty(shape, dtype=dtype or like.dtype)\n"
                "    if init is not None:\n"
                "        init(buf)\n"
                "    return buf\n"
                "StepWorkspace.scratch = _fresh"),
    "lending": ("last step's gradients lent to this step's (F, D) results (StepWorkspace.lending)",
                "import contextlib\n"
                "from sksae._accel.workspace import StepWorkspace\n"
                "StepWorkspace.lending = contextlib.contextmanager(lambda self, t: (yield self))"),
    "threads": ("a second thread at all; without it every operation of the step runs on one",
                "import contextlib\n"
                "import sksae._accel.threads as t, sksae._accel.select as s\n"
                "import sksae._accel.sparse as sp, sksae._accel.adam as a\n"
                "one = contextlib.contextmanager(lambda x, own=False: (yield))\n"
                "for m in (t, s, sp, a):\n"
                "    m.parallel = one"),
    "norm-notes": ("gradient norms noted by the compiled backward passes (StepWorkspace.note_norm)",
                   "from sksae._accel.workspace import StepWorkspace\n"
                   "StepWorkspace.note_norm = lambda self, t, r: None"),
    "kernel-projection": ("the decoder's radial gradient removed inside the sparse decode "
                          "(StepWorkspace.projecting); without it the trainer's own pass",
                          "import contextlib\n"
                          "from sksae._accel.workspace import StepWorkspace\n"
                          "StepWorkspace.projecting = contextlib.contextmanager("
                          "lambda self, W: (yield None))"),
    "dead-bound": ("AuxK skipped while no latent can be dead (DeadLatentBound)",
                   "from sksae._sae_trainer import DeadLatentBound\n"
                   "DeadLatentBound.may_be_dead = lambda self, step, n: True"),
    "compiled": ("numba-compiled top-k and sparse passes; without them torch's primitives",
                 "from sksae._accel import compiled\n"
                 "compiled.kernel = lambda name, required=False: None\n"
                 "import sksae._accel.select as s, sksae._accel.sparse as sp\n"
                 "s.kernel = compiled.kernel"),
    "fused-adam": ("Adam on torch's fused CPU kernel without importing torch.optim (FusedAdam); "
                   "without it torch.optim.Adam(fused=True), whose first use imports "
                   "torch._dynamo (see the first-fit column)",
                   "import sksae._accel.adam as a\na.fused_cpu_kernel = lambda: False"),
    "bf16-selection": ("bf16 selection product (precision='auto' on a bf16 CPU)",
                       "PRECISION = 'float32'"),
    "sparse-kernels": ("the sparse kernels (use_sparse); without them dense products",
                       "from sksae.architectures.topk import TopK\nTopK.kernels = 'dense'"),
}

_CHILD = """
import json, sys
root, patch, shape, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
dead_window = json.loads(sys.argv[5])
sys.path[:0] = [root, root + "/benchmarks"]
import torch
PRECISION = "auto"
exec(patch)
from bench_throughput import make_data, run_sksae
D, F, k, B, epochs = shape
X = make_data(16 * B, D, k)
import time
start = time.perf_counter()
run_sksae(X[:B], F, k, B, 1, torch.device("cpu"), precision=PRECISION,
          dead_window=dead_window)  # first-call costs
first = time.perf_counter() - start
out = []
for _ in range(repeats):
    seconds, setup, _ = run_sksae(X, F, k, B, epochs, torch.device("cpu"), precision=PRECISION,
                                  dead_window=dead_window)
    out.append([16 * epochs * B / seconds, setup, first])
print("RESULT", json.dumps(out))
"""


def run(patch, shape, repeats, dead_window="auto"):
    """[(samples/s, setup s), ...] of ``repeats`` fits with ``patch`` applied."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _CHILD, root, patch, json.dumps(shape),
                           str(repeats), json.dumps(dead_window)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="fits per process")
    parser.add_argument("--only", nargs="*", choices=sorted(MECHANISMS), default=None)
    parser.add_argument("--dead-window", type=int, default=None,
                        help="rows without firing after which a latent is dead (default: "
                             "the fit's 'auto'); a small one makes AuxK run from the start")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy-loop processes running alongside (a machine shared with "
                             "other work, what the thread chooser is for)")
    args = parser.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        _compare(args)
    finally:
        for proc in busy:
            proc.kill()


def _compare(args):
    D, F, k, B, epochs = SHAPES[args.shape]
    names = args.only or list(MECHANISMS)
    print(f"TopK {D}x{F} k={k} batch={B}, {epochs} epoch(s) of 16 batches; {args.rounds} "
          f"rounds x {args.repeats} fits, the baseline before each variant; "
          f"{args.busy} busy process(es) alongside; dead window "
          f"{args.dead_window or 'auto'}", flush=True)
    runs = {name: [] for name in ["baseline", *names]}
    for r in range(args.rounds):
        for name in names:
            for which, patch in (("baseline", ""), (name, MECHANISMS[name][1])):
                got = run(patch, (D, F, k, B, epochs), args.repeats,
                          args.dead_window or "auto")
                runs[which].extend(got)
                print(f"  round {r + 1} {which:18s} " + "  ".join(
                    f"{s:8.0f} samples/s (setup {t:.2f} s)" for s, t, _ in got)
                    + f"  first fit {got[0][2]:.2f} s", flush=True)
    base = statistics.median(s for s, _, _ in runs["baseline"])
    base_first = statistics.median(f for _, _, f in runs["baseline"])
    print(f"\nbaseline median: {base:.0f} samples/s, first fit in a fresh process "
          f"{base_first:.2f} s")
    print(f"{'mechanism':18s} {'without it':>12s} {'worth':>6s} {'first fit':>9s}  what")
    for name in names:
        without = statistics.median(s for s, _, _ in runs[name])
        first = statistics.median(f for _, _, f in runs[name])
        print(f"{name:18s} {without:12.0f} {base / without:6.2f} {first:8.2f}s  "
              f"{MECHANISMS[name][0]}")


if __name__ == "__main__":
    main()
