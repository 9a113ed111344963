"""Top-k selection on a GPU: torch.topk against sksae's Triton radix selection.

    python benchmarks/bench_topk_gpu.py [--device cuda] [--tune] [--quick]

At the training step's shapes (B=4096 rows, F from 24,576 to 393,216 latents,
k=32 and 128, bf16 and float32) it prints ms per call of ``torch.topk`` and of
the radix selection of :mod:`sksae._accel.fused` (``radix``), their ratio, and
whether both select the same sets (up to ties); then AuxK's picks among the
dead latents (an eighth of them dead, k_aux=384): ``torch.topk`` of the masked
row against the radix selection over the dead columns only. ``--tune`` adds
the radix selection's other launch settings (columns per iteration, warps).
The training step picks between the two by timing them once per shape
(:func:`sksae._accel.fused.selection_kernels`); this shows the margins.
On a CPU (``--quick``) the kernel runs in Triton's interpreter: a check of
the script, not a timing.
"""
import argparse
import os
import sys

import torch


def timed(fn, device, reps=20):
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def same_sets(pre, a, b):
    """Whether index sets a and b pick the same values in every row (ties either way)."""
    va = pre.float().gather(1, a).sort(-1).values
    vb = pre.float().gather(1, b).sort(-1).values
    return bool(torch.equal(va, vb))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from sksae._accel import fused

    with fused.forced():
        kernels = fused.kernels_for(torch.zeros(1, device=device))
    if kernels is None:
        sys.exit("the Triton kernels do not run here (Triton missing?)")
    print("torch", torch.__version__, "device", device,
          torch.cuda.get_device_name() if device.type == "cuda" else "(interpreted)")
    shapes = ([(8, 3000, 8), (8, 3000, 32)] if args.quick else
              [(B, F, k) for k in (32, 128) for B, F in
               ((4096, 24576), (4096, 98304), (4096, 393216))])
    settings = [(None, 4)] + ([(b, w) for b in (1024, 2048, 4096) for w in (4, 8)
                               if (b, w) != (1024, 4)] if args.tune else [])
    reps = 1 if args.quick else 20
    print(f"{'B':>6} {'F':>7} {'k':>4} {'dtype':>9} {'what':>16} {'ms':>8} {'topk/this':>9} same")
    for B, F, k in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            pre = torch.randn(B, F, device=device).to(dtype)
            base = timed(lambda: torch.topk(pre, k, dim=-1, sorted=False), device, reps)
            ref = torch.topk(pre, k, dim=-1, sorted=False).indices
            row = f"{B:>6} {F:>7} {k:>4} {str(dtype)[6:]:>9}"
            print(f"{row} {'torch.topk':>16} {base:8.3f} {1:9.2f}")
            for block, warps in settings:
                label = "radix" + ("" if block is None else f" {block}/{warps}w")
                ms = timed(lambda: kernels.radix_topk(pre, k, block=block, num_warps=warps),
                           device, reps)
                got = kernels.radix_topk(pre, k, block=block, num_warps=warps)[0]
                print(f"{row} {label:>16} {ms:8.3f} {base / ms:9.2f} {same_sets(pre, got, ref)}")
            # AuxK: k_aux = d/2 = 384 picks among the dead eighth of the latents
            k_aux = min(384, F // 8) if not args.quick else 4
            dead = torch.zeros(F, dtype=torch.bool, device=device)
            dead[torch.randperm(F, device=device)[:F // 8]] = True
            masked = lambda: torch.topk(pre.masked_fill(~dead, float("-inf")), k_aux,  # noqa: E731
                                        dim=-1, sorted=False)
            base = timed(masked, device, reps)
            cols = fused.dead_columns(dead)
            ms = timed(lambda: kernels.radix_topk(pre, k_aux, cols), device, reps)
            got = kernels.radix_topk(pre, k_aux, cols)[0]
            ok = same_sets(pre.masked_fill(~dead, float("-inf")), got, masked().indices)
            print(f"{row} {'auxk masked topk':>16} {base:8.3f} {1:9.2f}")
            print(f"{row} {'auxk radix dead':>16} {ms:8.3f} {base / ms:9.2f} {ok}")


if __name__ == "__main__":
    main()
