"""Benchmark the regional pooling ops: roi_align, region_pool (fused TPE), mask_pool.

    python benchmarks/bench_regional.py [--quick] [--sizes small,full] [--device cpu|cuda] [--modes forward,full]

Providers (same inputs, same outputs):
  torchvision          torchvision.ops.roi_align (roi_align), or per frame + tpe_add (region_pool)
  eager                rgpt4d's plain-PyTorch references (*_eager): the composition the op replaces
  compile              torch.compile of the eager reference
  rgpt4d-<backend>     the op (cpu on CPU tensors; cuda and triton on GPU)
  rgpt4d-per-frame     region_pool only: rgpt4d roi_align on each frame + rgpt4d tpe_add (unfused)
  rgpt4d-flat          region_pool only: one rgpt4d roi_align over all B*T frames + tpe_add (unfused)

Cases: the detector case (1, 256, 200, 200) with 512 boxes to 7x7 (sampling_ratio 2, and adaptive),
and the 4D-RGPT case (B=2, T=16, C=1152, 27x27, R=8 regions, 1x1 and 2x2; masks at 384x384).
Writes benchmarks/results/<device>/regional.{csv,md} and regional_<kernel>.png; prints the summary
(ratios, times, roofline lines) and the issue's target ratios.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Bench, base_parser, make_bench, mode_fn, results_dir  # noqa: E402
from rgpt4d.ops import available_backends, mask_pool, region_pool, roi_align, tpe_add  # noqa: E402
from rgpt4d.ops.regional import mask_pool_eager, region_pool_eager, roi_align_eager  # noqa: E402
from rgpt4d.ops.tpe import tpe_add_eager  # noqa: E402

try:
    from torchvision.ops import roi_align as tv_roi_align
except ImportError:  # the torchvision provider is optional
    tv_roi_align = None


def rgpt4d_backends(device):
    bes = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    return [b for b in bes if b in available_backends()]


def run(bench: Bench, kernel: str, mode: str, x: str, fns: dict, **kw) -> dict:
    """Time the providers of one (kernel, mode, shape) side by side (Bench.compare: interleaved)."""
    return bench.compare(kernel, mode, x, fns, **kw)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def min_bytes(mode: str, read_fwd: int, out: int, grad_in: int) -> int:
    """The byte model of a pooling op: forward reads its inputs once (read_fwd) and writes its
    output (out); backward reads grad_out (out) and writes the input gradients (grad_in)."""
    return {"forward": read_fwd + out, "nograd": read_fwd + out, "backward": out + grad_in,
            "full": read_fwd + 2 * out + grad_in}[mode]


# ---- inputs -----------------------------------------------------------------------------------

def detector_case(device, quick):
    N, C, H, W, K = (1, 64, 100, 100, 128) if quick else (1, 256, 200, 200, 512)
    img = 4 * H  # boxes in image pixels, feature stride 4 (spatial_scale 0.25)
    g = torch.Generator().manual_seed(0)
    wh = 16 + torch.rand(K, 2, generator=g) * (img * 0.28)
    xy = torch.rand(K, 2, generator=g) * (img - wh)
    rois = torch.cat([torch.zeros(K, 1), xy, xy + wh], 1).to(device)
    x = torch.randn(N, C, H, W, generator=g).to(device)
    return x, rois, f"N{N}-C{C}-{H}x{W}-K{K}"


def rgpt_case(device, quick):
    B, T, C, S, R, img = (2, 4, 256, 27, 8, 384) if quick else (2, 16, 1152, 27, 8, 384)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, T, C, S, S, generator=g).to(device)
    wh = 24 + torch.rand(B, T, R, 2, generator=g) * 232  # objects 24..256 px of a 384-px frame
    xy = torch.rand(B, T, R, 2, generator=g) * (img - wh)
    boxes = torch.cat([xy, xy + wh], -1).to(device)
    table = (0.02 * torch.randn(500, C, generator=g)).to(device)
    ts = torch.randint(0, 500, (B, T), generator=g).to(device)
    return f, boxes, table, ts, img, f"B{B}-T{T}-C{C}-{S}x{S}-R{R}"


def box_masks(boxes, size, device):
    """Soft masks [B, T, R, size, size] of the boxes (1 inside, 0.5 on the border pixels)."""
    yy = torch.arange(size, device=device, dtype=torch.float32).view(1, 1, 1, size, 1) + 0.5
    xx = torch.arange(size, device=device, dtype=torch.float32).view(1, 1, 1, 1, size) + 0.5
    b = boxes.unsqueeze(-1).unsqueeze(-1)
    inside_y = ((yy >= b[..., 1, :, :]) & (yy <= b[..., 3, :, :])).float()
    inside_x = ((xx >= b[..., 0, :, :]) & (xx <= b[..., 2, :, :])).float()
    return inside_y * inside_x


# ---- benchmarks --------------------------------------------------------------------------------

def bench_roi_align(bench, device, modes, quick, use_compile):
    x0, rois, shape = detector_case(device, quick)
    for sr, aligned, tag in ((2, False, "sr2"), (0, True, "adaptive")):
        x_desc = f"{shape}-{tag}"
        args = ((7, 7), 0.25, sr, aligned)
        fns = {}
        if tv_roi_align is not None:
            fns["torchvision"] = lambda x: tv_roi_align(x, rois, *args)
        if tag == "sr2":  # the adaptive grids of large boxes make the eager gather impractically big
            fns["eager"] = lambda x: roi_align_eager(x, rois, *args)
            if use_compile:
                fns["compile"] = torch.compile(lambda x: roi_align_eager(x, rois, *args), dynamic=False)
        for be in rgpt4d_backends(device):
            fns[f"rgpt4d-{be}"] = lambda x, _be=be: roi_align(x, rois, *args, backend=_be, validate=False)
        out = nbytes(x0) // (x0.shape[2] * x0.shape[3]) * rois.shape[0] * 49 // x0.shape[0]
        for mode in modes:
            x = x0.clone().requires_grad_(mode != "nograd")
            calls = {name: mode_fn(mode, (lambda f=f: f(x)), [x]) for name, f in fns.items()}
            if mode in ("backward", "full") and device.type == "cuda":  # the sorted, deterministic backward
                for be in rgpt4d_backends(device):
                    calls[f"rgpt4d-{be}-deterministic"] = deterministic(calls[f"rgpt4d-{be}"])
            run(bench, "roi_align", mode, x_desc, calls, config=f"sampling_ratio={sr} aligned={aligned}",
                min_bytes=min_bytes(mode, nbytes(x0, rois), out, nbytes(x0)))


def deterministic(call):
    """call under torch.use_deterministic_algorithms(True): the GPU RoI backward sorts instead of atomics."""
    def run():
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return call()
        finally:
            torch.use_deterministic_algorithms(prev)
    return run


def region_pool_per_frame(f, boxes, table, ts, output_size, scale, pool):
    """The unfused composition: roi_align on each frame's boxes, then tpe_add (pool: an roi_align)."""
    B, T, C, H, W = f.shape
    R = boxes.shape[2]
    ph, pw = output_size
    idx = torch.arange(B, device=f.device, dtype=boxes.dtype).repeat_interleave(R)[:, None]
    frames = [pool(f[:, t], torch.cat([idx, boxes[:, t].reshape(B * R, 4)], 1), output_size, scale, -1, True)
              .view(B, R, C, ph * pw) for t in range(T)]
    tokens = torch.stack(frames, 1).transpose(3, 4).reshape(B, T, R * ph * pw, C)
    return _region_layout(tpe_add(tokens, ts, table, backend="cpu" if f.device.type == "cpu" else None,
                                  validate=False), B, T, R, C, ph, pw)


def _region_layout(tokens, B, T, R, C, ph, pw):
    """[B, T, R * ph * pw, C] tokens in region_pool's layout ([B, T, R, C] or [B, T, R, C, ph, pw]), so
    that the benchmark's output check compares like with like."""
    if (ph, pw) == (1, 1):
        return tokens
    return tokens.view(B, T, R, ph * pw, C).transpose(3, 4).reshape(B, T, R, C, ph, pw)


def region_pool_flat(f, boxes, table, ts, output_size, scale, pool):
    """The unfused composition with all B*T frames in one roi_align call."""
    B, T, C, H, W = f.shape
    R = boxes.shape[2]
    ph, pw = output_size
    idx = torch.arange(B * T, device=f.device, dtype=boxes.dtype).repeat_interleave(R)[:, None]
    pooled = pool(f.reshape(B * T, C, H, W), torch.cat([idx, boxes.reshape(-1, 4)], 1), output_size, scale, -1, True)
    tokens = pooled.view(B, T, R, C, ph * pw).transpose(3, 4).reshape(B, T, R * ph * pw, C)
    return _region_layout(tpe_add(tokens, ts, table, backend="cpu" if f.device.type == "cpu" else None,
                                  validate=False), B, T, R, C, ph, pw)


def bench_region_pool(bench, device, modes, quick, use_compile):
    f0, boxes, table0, ts, img, shape = rgpt_case(device, quick)
    scale = f0.shape[-1] / img
    be0 = rgpt4d_backends(device)[0] if rgpt4d_backends(device) else None
    for output_size in ((1, 1), (2, 2)):
        x_desc = f"{shape}-{output_size[0]}x{output_size[1]}"

        def eager(f, table, _os=output_size):
            return region_pool_eager(f, boxes, output_size=_os, spatial_scale=scale, timestamps=ts, table=table)

        fns = {"eager": eager}
        if use_compile:
            fns["compile"] = torch.compile(eager, dynamic=False)
        if tv_roi_align is not None:
            fns["torchvision-per-frame"] = lambda f, table, _os=output_size: region_pool_per_frame(
                f, boxes, table, ts, _os, scale, tv_roi_align)
        if be0 is not None:
            def rg_pool(x, rois, os_, sc, sr, al, _be=be0):
                return roi_align(x, rois, os_, sc, sr, al, backend=_be, validate=False)
            fns["rgpt4d-per-frame"] = lambda f, table, _os=output_size: region_pool_per_frame(
                f, boxes, table, ts, _os, scale, rg_pool)
            fns["rgpt4d-flat"] = lambda f, table, _os=output_size: region_pool_flat(
                f, boxes, table, ts, _os, scale, rg_pool)
        for be in rgpt4d_backends(device):
            fns[f"rgpt4d-{be}"] = lambda f, table, _os=output_size, _be=be: region_pool(
                f, boxes, output_size=_os, spatial_scale=scale, timestamps=ts, table=table, backend=_be,
                validate=False)
        B, T, C = f0.shape[:3]
        out = B * T * boxes.shape[2] * output_size[0] * output_size[1] * C * f0.element_size()
        for mode in modes:
            f = f0.clone().requires_grad_(mode != "nograd")
            table = table0.clone().requires_grad_(mode != "nograd")
            calls = {name: mode_fn(mode, (lambda fn=fn: fn(f, table)), [f, table]) for name, fn in fns.items()}
            run(bench, "region_pool", mode, x_desc, calls, config="learned TPE, adaptive sampling, aligned",
                min_bytes=min_bytes(mode, nbytes(f0, boxes, ts) + B * T * C * 4, out, nbytes(f0, table0)))


def bench_mask_pool(bench, device, modes, quick, use_compile):
    f0, boxes, table0, ts, img, shape = rgpt_case(device, quick)
    size = 96 if quick else img
    masks = box_masks(boxes * (size / img), size, device)  # the boxes are in img pixels: scale them to the masks
    x_desc = f"{shape}-masks{masks.shape[-1]}"

    def eager(f, table):
        return mask_pool_eager(f, masks, timestamps=ts, table=table)

    fns = {"eager": eager}
    if use_compile:
        fns["compile"] = torch.compile(eager, dynamic=False)
    for be in rgpt4d_backends(device):
        fns[f"rgpt4d-{be}"] = lambda f, table, _be=be: mask_pool(f, masks, timestamps=ts, table=table, backend=_be,
                                                                 validate=False)
    B, T, C, H, W = f0.shape
    R = masks.shape[2]
    out = B * T * R * C * f0.element_size()
    gemm = 2.0 * B * T * R * C * H * W  # the masked sums: [R, HW] x [HW, C] per frame
    for mode in modes:
        f = f0.clone().requires_grad_(mode != "nograd")
        table = table0.clone().requires_grad_(mode != "nograd")
        calls = {name: mode_fn(mode, (lambda fn=fn: fn(f, table)), [f, table]) for name, fn in fns.items()}
        run(bench, "mask_pool", mode, x_desc, calls, config="learned TPE, masks frozen",
            min_bytes=min_bytes(mode, nbytes(f0, masks) + B * T * C * 4, out, nbytes(f0, table0)),
            flops=gemm * (2 if mode == "full" else 1))


# ---- report ------------------------------------------------------------------------------------

TARGETS = [  # kernel, mode, provider vs baseline, target ratio
    ("roi_align", "forward", "torchvision", 3.0),
    ("roi_align", "backward", "torchvision", 2.0),
    ("region_pool", "forward", "rgpt4d-per-frame", 1.5),
    ("region_pool", "backward", "rgpt4d-per-frame", 1.5),
    ("region_pool", "full", "rgpt4d-per-frame", 1.5),
    ("region_pool", "full", "rgpt4d-flat", None),
    ("region_pool", "forward", "eager", 5.0),
    ("region_pool", "full", "eager", 5.0),
    ("mask_pool", "full", "eager", 1.5),
    ("mask_pool", "forward", "eager", None),
]


def target_report(bench: Bench, device) -> str:
    ours = f"rgpt4d-{rgpt4d_backends(device)[0]}" if rgpt4d_backends(device) else None
    lines = ["| kernel | mode | x | rgpt4d ms | baseline | baseline ms | ratio | target |",
             "|---|---|---|---:|---|---:|---:|---|"]
    # issue 19: the deterministic (sorted) RoI backward within 3x of the atomic one
    for be in rgpt4d_backends(device) if device.type == "cuda" else []:
        for k, x in sorted({(r["kernel"], r["x"]) for r in bench.rows}):
            t = bench.value(k, f"rgpt4d-{be}-deterministic", "backward", x)
            ta = bench.value(k, f"rgpt4d-{be}", "backward", x)
            if k == "roi_align" and t is not None and ta is not None:
                lines.append(f"| roi_align | backward deterministic | {x} | {t:.4g} | rgpt4d-{be} (atomics) | "
                             f"{ta:.4g} | {ta / t:.2f}x | >= 0.33x: {'met' if ta / t >= 1 / 3 else 'NOT met'} |")
    xs = sorted({(r["kernel"], r["x"]) for r in bench.rows})
    for kernel, mode, base, target in TARGETS:
        for k, x in xs:
            if k != kernel:
                continue
            t = bench.value(kernel, ours, mode, x)
            tb = bench.value(kernel, base, mode, x)
            if t is None or tb is None:
                continue
            ratio = tb / t
            verdict = "-" if target is None else (f">= {target}x: {'met' if ratio >= target else 'NOT met'}")
            lines.append(f"| {kernel} | {mode} | {x} | {t:.4g} | {base} | {tb:.4g} | {ratio:.2f}x | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--kernels", default="roi_align,region_pool,mask_pool")
    p.add_argument("--sizes", default="small,full",
                   help="small: detector N1-C64-100x100-K128, 4D-RGPT B2-T4-C256 (masks 96); full: detector "
                        "N1-C256-200x200-K512, 4D-RGPT B2-T16-C1152 (masks 384)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes.split(",") if args.modes else ["forward", "backward", "full"]
    torch.manual_seed(0)
    bench = make_bench(args, device)
    kernels = args.kernels.split(",")
    use_compile = not args.no_compile
    sizes = ["small"] if args.quick else args.sizes.split(",")
    with torch.enable_grad():
        for size in sizes:
            small = size == "small"
            if "roi_align" in kernels:
                bench_roi_align(bench, device, modes, small, use_compile)
            if "region_pool" in kernels:
                bench_region_pool(bench, device, modes, small, use_compile)
            if "mask_pool" in kernels:
                bench_mask_pool(bench, device, modes, small, use_compile)
    out_dir = results_dir(args, device)
    bench.finish(out_dir, "regional" if not args.quick else "regional-quick", "Regional pooling ops",
                 plots=not args.no_plots,
                 extra="## Targets (issue 3), measured in this run\n\n" + target_report(bench, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
