"""Benchmark of the P4D loss kernels: p4d_loss and fused_linear_latent_loss.

    python benchmarks/bench_p4d_loss.py [--quick] [--device cpu|cuda] [--modes full,nograd] [--no-compile]
                                        [--batches 1,2,3,4] [--linear-n 16384]

Providers (side by side in one run, on the shared harness):
  eager    rgpt4d's eager reference: plain PyTorch, F.smooth_l1_loss per term with a masked mean
           (torch.where, no host sync) / F.linear then the loss;
  compile  torch.compile of that same eager function;
  rgpt4d   the op on the device's default backend (cpu on CPU; on CUDA also rgpt4d-triton and
           rgpt4d-cuda).
Modes: full (forward + backward: the fair comparison for ops that produce gradients in their
forward pass) and nograd (forward under torch.no_grad()).

Shapes:
  paper-B{1..4}  the paper's teacher grid: latent 8x16x16 tokens x 1408, depth / flow / motion
                 at 16 x 224 x 224 (1 / 2 / 1 channels) with a depth valid mask, fp32, "paper"
                 preset (SmoothL1; alpha 0.5, beta 0.1, lambda 1.0 / 0.1 / 0.05).
  small          a laptop-scale grid: B 2, latent 4x8x8 tokens x 384, explicit maps 8 x 112 x 112.
  linear-N{N}    fused_linear_latent_loss: N tokens, D_in 2560 (the decoder's hidden), D_out 1408,
                 SmoothL1, mean (the issue's N = 16384).
--quick: small, paper-B1 and linear-N2048 only.

Time: median of per-call wall times (p20/p80 in the CSV). Peak memory on CPU: the tensor memory
the call holds at once, from the torch profiler's memory events (benchmarks/harness.py), returned
gradients included; the process's peak resident set is reported too, as peak_rss.
Bandwidth: the bytes p4d_loss must move at least (read every prediction, target and mask once;
write each prediction's gradient in full mode) over the median time, as a fraction of a
same-size Tensor.copy_ measured in the same run.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Bench, base_parser, make_bench, grad_modes, mode_fn, results_dir  # noqa: E402
from rgpt4d.ops import fused_linear_latent_loss, p4d_loss  # noqa: E402
from rgpt4d.ops import available_backends  # noqa: E402

TARGETS = {"p4d_vs_eager": 5.0, "p4d_vs_compile": 3.0, "p4d_peak_vs_eager": 0.5, "p4d_copy_fraction": 0.5,
           "linear_peak_vs_eager": 0.6, "linear_speed_vs_eager": 0.9}


def p4d_inputs(B, tokens, C, T, H, W, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, positive=False, grad=False):
        x = torch.randn(*shape, generator=g)
        x = (x.abs() + 0.1) if positive else x
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    lat, lat_t = rnd(B, tokens, C, grad=True), rnd(B, tokens, C)
    chans = {"depth": 1, "flow": 2, "motion": 1}
    preds = {k: rnd(B, T, c, H, W, positive=k == "depth", grad=True) for k, c in chans.items()}
    targets = {k: rnd(B, T, c, H, W, positive=k == "depth") for k, c in chans.items()}
    mask = (torch.rand(B, T, 1, H, W, generator=g) > 0.2).to(device)  # ~80% valid depth
    return lat, lat_t, preds, targets, {"depth": mask}


def grad_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def add_peak_beyond_grads(bench: Bench, kernel, x, providers, nbytes, config):
    """Peak memory minus the gradients the call returns (which every provider must produce):
    the working memory of the loss itself."""
    for prov in providers:
        peak = bench.value(kernel, prov, "full", x, "peak_memory")
        if peak is not None:
            bench.add_row(kernel, prov, "full", "peak_beyond_grads", "MB", x, max(0.0, peak - nbytes / 2**20),
                       config=config)


def p4d_bytes(lat, lat_t, preds, targets, masks, with_grads: bool) -> int:
    tensors = [lat, lat_t, *preds.values(), *targets.values()]
    n = sum(t.numel() * t.element_size() for t in tensors) + sum(m.numel() for m in masks.values())
    if with_grads:
        n += sum(t.numel() * t.element_size() for t in [lat, *preds.values()])
    return n


def bench_p4d(bench: Bench, args, device, name, shape, providers):
    lat, lat_t, preds, targets, masks = p4d_inputs(*shape, device=device, dtype=args.dtype)
    inputs = [lat, *preds.values()]

    def make(backend):
        def forward():
            return p4d_loss(lat, lat_t, preds, targets, preset="paper", masks=masks, backend=backend).total
        return forward

    fns = {"eager": make("eager")}
    if not args.no_compile:
        fns["compile"] = torch.compile(make("eager"))
    for prov, be in providers:
        fns[prov] = make(be)
    config = f"paper preset, masked depth, {str(args.dtype).replace('torch.', '')}"
    for mode in grad_modes(args):
        bench.compare("p4d_loss", mode, name, {prov: mode_fn(mode, fwd, inputs) for prov, fwd in fns.items()},
                      config=config,
                      min_bytes=p4d_bytes(lat, lat_t, preds, targets, masks, mode in ("full", "backward")))
    add_peak_beyond_grads(bench, "p4d_loss", name, fns, grad_bytes(inputs), config)


def bench_linear(bench: Bench, args, device, N, providers, D_in=2560, D_out=1408):
    g = torch.Generator().manual_seed(0)
    dt = args.dtype
    h = torch.randn(N, D_in, generator=g).to(device, dt).requires_grad_(True)
    w = (torch.randn(D_out, D_in, generator=g) / D_in ** 0.5).to(device, dt).requires_grad_(True)
    b = (0.01 * torch.randn(D_out, generator=g)).to(device, dt).requires_grad_(True)
    t = torch.randn(N, D_out, generator=g).to(device, dt)
    inputs = [h, w, b]

    def make(backend):
        def forward():
            return fused_linear_latent_loss(h, w, b, t, backend=backend)
        return forward

    fns = {"eager": make("eager")}
    if not args.no_compile:
        fns["compile"] = torch.compile(make("eager"))
    for prov, be in providers:
        fns[prov] = make(be)
    flops_fwd = 2.0 * N * D_in * D_out
    config = f"D_in {D_in}, D_out {D_out}, smooth_l1 mean, {str(dt).replace('torch.', '')}"
    # bytes: read h, W, b, target once (and write their gradients in full mode); the [N, D_out]
    # projection need never exist whole
    io = grad_bytes([h, w, b, t])
    for mode in grad_modes(args):
        bench.compare("fused_linear_latent_loss", mode, f"linear-N{N}",
                      {prov: mode_fn(mode, fwd, inputs) for prov, fwd in fns.items()}, config=config,
                      min_bytes=io + (grad_bytes(inputs) if mode in ("full", "backward") else 0),
                      flops=flops_fwd * (3 if mode in ("full", "backward") else 1))
    add_peak_beyond_grads(bench, "fused_linear_latent_loss", f"linear-N{N}", fns, grad_bytes(inputs), config)


def summary(bench: Bench, p4d_cases, linear_cases, modes) -> str:
    out = ["", "## Targets (issue 4), measured in this run"]

    def ratio(kernel, x, mode, a, b, metric="time"):
        # the paired (per-round) speed-up when the providers were interleaved, as in the tables
        paired = bench.value(kernel, a, mode, x, f"speedup_vs_{b}")
        if paired is not None:
            return paired
        va, vb = bench.value(kernel, a, mode, x, metric), bench.value(kernel, b, mode, x, metric)
        return None if (va is None or vb is None or va == 0) else vb / va

    def fmt(v, target, higher=True):
        if v is None:
            return "n/a"
        ok = v >= target if higher else v <= target
        return f"{v:.2f} ({'meets' if ok else 'MISSES'} {'>=' if higher else '<='} {target})"

    if "full" in modes:
        for x in p4d_cases:
            sp_e = ratio("p4d_loss", x, "full", "rgpt4d", "eager")
            sp_c = ratio("p4d_loss", x, "full", "rgpt4d", "compile")
            mem = bench.value("p4d_loss", "rgpt4d", "full", x, "peak_memory")
            mem_e = bench.value("p4d_loss", "eager", "full", x, "peak_memory")
            frac = bench.value("p4d_loss", "rgpt4d", "full", x, "copy_fraction")
            ex = bench.value("p4d_loss", "rgpt4d", "full", x, "peak_beyond_grads")
            ex_e = bench.value("p4d_loss", "eager", "full", x, "peak_beyond_grads")
            out.append(f"- p4d_loss full {x}: speed vs eager {fmt(sp_e, TARGETS['p4d_vs_eager'])}; vs compile "
                       f"{fmt(sp_c, TARGETS['p4d_vs_compile'])}; peak memory vs eager "
                       f"{fmt(None if not mem_e else mem / mem_e, TARGETS['p4d_peak_vs_eager'], higher=False)} "
                       f"[beyond the returned gradients: rgpt4d {ex if ex is None else round(ex, 1)} MB, eager "
                       f"{ex_e if ex_e is None else round(ex_e, 1)} MB]; "
                       f"copy-bandwidth fraction {fmt(frac, TARGETS['p4d_copy_fraction'])}")
        for x in linear_cases:
            sp = ratio("fused_linear_latent_loss", x, "full", "rgpt4d", "eager")
            mem = bench.value("fused_linear_latent_loss", "rgpt4d", "full", x, "peak_memory")
            mem_e = bench.value("fused_linear_latent_loss", "eager", "full", x, "peak_memory")
            out.append(f"- fused_linear_latent_loss full {x}: peak memory vs eager "
                       f"{fmt(None if not mem_e else mem / mem_e, TARGETS['linear_peak_vs_eager'], higher=False)}; "
                       f"speed vs eager {fmt(sp, TARGETS['linear_speed_vs_eager'])}")
    return "\n".join(out)


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,3,4", help="paper teacher-grid batch sizes")
    p.add_argument("--linear-n", type=int, default=16384, help="tokens of the fused linear case")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="inputs' dtype")
    p.add_argument("--skip-linear", action="store_true", help="p4d_loss cases only")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.modes is None:
        args.modes = "full,nograd"
    modes = grad_modes(args)
    torch.manual_seed(0)
    providers = [("rgpt4d", None)]
    if device.type == "cuda":
        providers += [(f"rgpt4d-{b}", b) for b in ("triton", "cuda") if b in available_backends()]
    bench = make_bench(args, device)

    p4d_cases = {"small": (2, 4 * 8 * 8, 384, 8, 112, 112)}
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",") if b]
    for B in batches:
        p4d_cases[f"paper-B{B}"] = (B, 8 * 16 * 16, 1408, 16, 224, 224)
    linear_n = 2048 if args.quick else args.linear_n
    for name, shape in p4d_cases.items():
        print(f"p4d_loss {name} ...", flush=True)
        bench_p4d(bench, args, device, name, shape, providers)
    if not args.skip_linear:
        print(f"fused_linear_latent_loss N={linear_n} ...", flush=True)
        bench_linear(bench, args, device, linear_n, providers)

    out_dir = results_dir(args, device)
    extra = ("## Peak memory beyond the returned gradients (full, MB)\n\n" + bench.table("peak_beyond_grads") + "\n"
             + summary(bench, [x for x in p4d_cases if x.startswith("paper")],
                       [] if args.skip_linear else [f"linear-N{linear_n}"], modes))
    bench.finish(out_dir, "p4d_loss" if not args.quick else "p4d_loss-quick", "P4D loss ops",
                 ours=[prov for prov, _ in providers], plots=not args.no_plots, extra=extra)


if __name__ == "__main__":
    main()
