"""The elementwise end of a training step, fused three ways, side by side in one run.

    python benchmarks/bench_step_fusion.py [--device cuda] [--widths 24576,98304]
                                           [--features 768] [--no-compile]

After the backward pass a TopK step clips the gradients' total norm at 1,
takes an Adam step on every parameter and renormalises the decoder's rows.
At d x F (W_enc and W_dec of F x d, b_enc, b_dec; float32, as the trainer
keeps them) it times, on the same tensors:

- ``clip pass``: the gradients scaled by their own pass (torch's
  ``clip_grads_with_norm_``), then torch's fused Adam, then the row norms
  (the trainer's step off the CPU before this benchmark);
- ``scale in Adam``: the clipping factor given to fused Adam as its gradient
  scale, decided on the device (:func:`sksae._accel.adam.clip_and_step` off the
  CPU now): the kernel writes the scaled gradients back, so one read of
  every gradient fewer;
- ``compiled``: the whole end (norm, clip, Adam written in torch operations,
  row norms) through ``torch.compile``, which fuses what it can; its first
  call's compile time is printed apart;
- on the CPU, ``sksae cpu``: the trainer's CPU path (the fused CPU kernel on
  sksae's threads, the factor folded in, one compiled pass per row).

The gradient norm is computed in every variant (the Triton step notes it for
free; here it is a pass in all of them alike). It prints ms, each variant's
ratio to ``clip pass`` (> 1: faster) and the bytes the eager passes move
(norm: read; clip: read and write; Adam: read 4, write 3, plus the gradient's
write when scaled; row norms: read twice, write once).
"""

from __future__ import annotations

import argparse
import time

import torch

from sksae._accel import adam
from sksae._accel.device import time_call
from sksae._accel.sparse import unit_rows_


def make_state(D, F, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
    params = {k: (torch.randn(s, generator=g) * 0.05).to(device).requires_grad_()
              for k, s in shapes.items()}
    with torch.no_grad():
        unit_rows_(params["W_dec"])
    grads = {k: torch.randn(p.shape, generator=g).to(device) for k, p in params.items()}
    return params, grads


def set_grads(params, grads):
    for k, p in params.items():
        p.grad = grads[k].clone()


def clip_pass(params, opt):
    ps = list(params.values())
    norm = adam.total_norm([p.grad for p in ps])
    adam._clip_with_norm(ps, 1.0, norm)
    opt.step()
    with torch.no_grad():
        unit_rows_(params["W_dec"])


def scale_in_adam(params, opt):
    ps = list(params.values())
    adam._step_scaled(opt, 1.0, adam.total_norm([p.grad for p in ps]))
    with torch.no_grad():
        unit_rows_(params["W_dec"])


def sksae_cpu(params, opt):
    adam.clip_and_step(opt, params.values(), 1.0)
    with torch.no_grad():
        unit_rows_(params["W_dec"])


def compiled_end(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """The step's end in torch operations, for torch.compile to fuse."""

    @torch.no_grad()
    def end(ps, gs, ms, vs, step, W_dec):
        step += 1
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        coef = (1.0 / (norm + 1e-6)).clamp(max=1.0)
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step
        for p, g, m, v in zip(ps, gs, ms, vs):
            g = g * coef
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(lr / c1 * m / ((v / c2).sqrt() + eps))
        W_dec.div_(torch.linalg.vector_norm(W_dec, dim=-1, keepdim=True).clamp_min(1e-12))
        return norm

    return torch.compile(end, dynamic=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", default="24576,98304")
    ap.add_argument("--features", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    D = args.features
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | d={D}, float32, clip at 1, lr 1e-3")
    print(f"{'F':>8} {'variant':>14} {'ms':>9} {'clip pass/it':>13} {'eager GB':>9}")
    for F in (int(w) for w in args.widths.split(",")):
        run_width(D, F, device, args)


def run_width(D, F, device, args):
    """Time every variant at d x F and print a row each."""
    params, grads = make_state(D, F, device)
    gb = 4 * sum(p.numel() for p in params.values()) / 1e9
    wdec = 4 * F * D / 1e9
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, fused=True)
    variants = {"clip pass": (lambda: clip_pass(params, opt), gb + 2 * gb + 7 * gb + 3 * wdec),
                "scale in Adam": (lambda: scale_in_adam(params, opt), gb + 8 * gb + 3 * wdec)}
    if device.type == "cpu":
        cpu_opt = adam.make_adam(list(params.values()), 1e-3, device)
        variants["sksae cpu"] = (lambda: sksae_cpu(params, cpu_opt), None)
    if not args.no_compile:
        end = compiled_end()
        ps = [p.detach() for p in params.values()]
        state = ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                 torch.zeros((), device=device))

        def compiled():
            end(ps, [p.grad for p in params.values()], *state, params["W_dec"].detach())

        t0 = time.perf_counter()
        try:
            set_grads(params, grads)
            compiled()
        except Exception as exc:  # noqa: BLE001 - no compiler for this device here
            print(f"{F:>8} {'compiled':>14}   unavailable: {type(exc).__name__}: {exc}"[:200])
        else:
            print(f"{F:>8} {'compiled':>14}   first call (compiles): "
                  f"{time.perf_counter() - t0:.1f} s")
            variants["compiled"] = (compiled, None)
    # the gradients' copy is timed apart and taken off
    copy_s = time_call(lambda: set_grads(params, grads), device, args.repeats)
    times = {}
    for label, (fn, moved) in variants.items():
        def run(fn=fn):
            set_grads(params, grads)
            fn()
        times[label] = max(time_call(run, device, args.repeats) - copy_s, 1e-9)
        ratio = times["clip pass"] / times[label]
        moved = f"{moved:9.2f}" if moved else f"{'':>9}"
        print(f"{F:>8} {label:>14} {1e3 * times[label]:9.2f} {ratio:13.2f} {moved}")

if __name__ == "__main__":
    main()
