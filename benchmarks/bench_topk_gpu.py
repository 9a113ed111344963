"""Top-k selection on a GPU: torch.topk against a two-stage (chunked) selection.

The two-stage selection takes each chunk's k largest (``torch.topk`` over short
rows), then the k largest of those candidates: the same set as one top-k over
the row (up to ties). Prints ms per call at the throughput benchmark's shapes.
Usage: python benchmarks/bench_topk_gpu.py [--device cuda]
"""
import argparse

import torch


def two_stage(pre, k, chunk):
    B, F = pre.shape
    n = F // chunk
    v1, i1 = torch.topk(pre.view(B, n, chunk), k, dim=-1, sorted=False)
    i1 = i1 + torch.arange(0, F, chunk, device=pre.device)[:, None]
    v2, j = torch.topk(v1.view(B, n * k), k, dim=-1, sorted=False)
    return v2, i1.view(B, n * k).gather(1, j)


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print("torch", torch.__version__, "device", device,
          torch.cuda.get_device_name() if device.type == "cuda" else "")
    print(f"{'B':>6} {'F':>6} {'k':>3} {'dtype':>9} {'chunk':>6} {'ms':>8} {'vs topk':>8} same")
    for B, F, k in [(1024, 3072, 32), (4096, 24576, 32), (4096, 24576, 384)]:
        for dtype in (torch.bfloat16, torch.float32):
            pre = torch.randn(B, F, device=device).to(dtype)
            base = timed(lambda: torch.topk(pre, k, dim=-1, sorted=False), device)
            ref = torch.topk(pre, k, dim=-1, sorted=False).indices.sort(-1).values
            print(f"{B:>6} {F:>6} {k:>3} {str(dtype)[6:]:>9} {'-':>6} {base:8.3f} {1:8.2f}")
            for chunk in (256, 512, 1024, 2048, 4096):
                if F % chunk or chunk <= k or F // chunk < 2:
                    continue
                ms = timed(lambda: two_stage(pre, k, chunk), device)
                same = torch.equal(two_stage(pre, k, chunk)[1].sort(-1).values, ref)
                print(f"{B:>6} {F:>6} {k:>3} {str(dtype)[6:]:>9} {chunk:>6} {ms:8.3f} "
                      f"{base / ms:8.2f} {same}")


if __name__ == "__main__":
    main()
