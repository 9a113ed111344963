"""Two checkouts side by side on bench_dictionary_learning.py's quick problems, alternating runs.

Each run is the checkout's own ``benchmarks/bench_dictionary_learning.py --quick
--n-samples N --skip-sklearn`` in a fresh process with that checkout first on
the path; the script prints every run's fit and transform times, the medians
per checkout and ``speed B / A = time A / time B`` per measure.

Usage::

    git worktree add /tmp/old <commit>
    python benchmarks/bench_ab_dl.py /tmp/old . --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

_ROW = re.compile(r"^sksae\s+([\d.]+)\s+\d+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")


def run(root, n_samples, repeat):
    """{"toy fit": s, "toy omp": s, ..., "china ...": ...} of one run of ``root``'s benchmark."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks",
                                                        "bench_dictionary_learning.py"),
                           "--quick", "--n-samples", str(n_samples), "--skip-sklearn",
                           "--repeat", str(repeat)],
                          capture_output=True, text=True, check=True, env=env)
    out, problems = {}, iter(("toy", "china"))
    for line in proc.stdout.splitlines():
        m = _ROW.match(line)
        if m:
            name = next(problems)
            out[f"{name} fit"], out[f"{name} omp"], out[f"{name} lasso"] = map(
                float, m.groups()[:3])
            out[f"{name} objective"] = float(m.group(4))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n-samples", type=int, default=40000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    runs = {args.first: [], args.second: []}
    for r in range(args.rounds):
        order = (args.first, args.second) if r % 2 == 0 else (args.second, args.first)
        for root in order:
            got = run(root, args.n_samples, args.repeat)
            runs[root].append(got)
            print(f"  round {r + 1} {root}: " + "  ".join(
                f"{k} {v:.4g}" for k, v in got.items()), flush=True)
    keys = list(runs[args.first][0])
    print(f"\n{'measure':18s} {'A median':>10s} {'B median':>10s} {'speed B/A':>10s}")
    for key in keys:
        a = statistics.median(g[key] for g in runs[args.first])
        b = statistics.median(g[key] for g in runs[args.second])
        ratio = "" if key.endswith("objective") else f"{a / b:10.3f}"
        print(f"{key:18s} {a:10.4g} {b:10.4g} {ratio}")


if __name__ == "__main__":
    main()
