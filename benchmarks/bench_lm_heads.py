"""Benchmark the language-model ops and the teacher heads' output stage against eager PyTorch and
torch.compile of the same eager code.

    python benchmarks/bench_lm_heads.py [--quick] [--device cpu|cuda] [--modes forward,full]

Kernels: rms_norm, swiglu, rope, fused_linear_cross_entropy (the LLM at hidden 2560, the paper's
size, 2048 tokens, a 151936-entry vocabulary as Qwen2's) and pixel_shuffle_act (the depth head's
shuffle + exp: 16 frames, 256 channels, 16x16 -> 64x64). --quick: small shapes. Writes
benchmarks/results/<device>/lm_heads.{csv,md}; prints the summary.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import base_parser, grad_modes, make_bench, mode_fn, results_dir  # noqa: E402
from rgpt4d.ops import (available_backends, fused_linear_cross_entropy, fused_linear_cross_entropy_eager,  # noqa: E402
                        pixel_shuffle_act, pixel_shuffle_act_eager, rms_norm, rms_norm_eager, rope, rope_eager,
                        swiglu, swiglu_eager)


def cases(quick: bool):
    """label -> (tokens, hidden, heads, kv heads, head dim, vocab, (frames, channels, grid, upscale))."""
    if quick:
        return {"small": (64, 128, 4, 2, 32, 1000, (2, 8, 8, 4))}
    return {"paper": (2048, 2560, 20, 4, 128, 151936, (16, 256, 16, 4))}


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = [m for m in grad_modes(args) if m in ("forward", "full")]
    bench = make_bench(args, device)
    backends = [b for b in (["cpu"] if device.type == "cpu" else ["cuda", "triton"]) if b in available_backends()]
    g = torch.Generator().manual_seed(0)

    def providers(eager, op):
        prov = {"eager": eager}
        if not args.no_compile:
            prov["compile"] = torch.compile(eager, dynamic=False)
        for be in backends:
            prov[f"rgpt4d-{be}"] = lambda *a, _be=be, **k: op(*a, backend=_be, validate=False, **k)
        return prov

    for label, (N, D, H, Hk, hd, V, (F, C, S, r)) in cases(args.quick).items():
        esize = 4
        x = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(D, generator=g)).to(device).requires_grad_(True)
        gate, up = (torch.randn(N, 4 * D, generator=g).to(device).requires_grad_(True) for _ in range(2))
        q = torch.randn(1, N, H, hd, generator=g).to(device).transpose(1, 2).requires_grad_(True)
        k = torch.randn(1, N, Hk, hd, generator=g).to(device).transpose(1, 2).requires_grad_(True)
        ang = torch.randn(1, N, hd // 2, generator=g)
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(device), torch.cat([ang.sin()] * 2, -1).to(device)
        lm_w = (torch.randn(V, D, generator=g) / D ** 0.5).to(device).requires_grad_(True)
        tgt = torch.randint(0, V, (N,), generator=g).to(device)
        feat = torch.randn(F, C * r * r, S, S, generator=g).to(device).requires_grad_(True)
        specs = [
            ("rms_norm", providers(rms_norm_eager, rms_norm), lambda f: f(x, w), [x, w], 2 * N * D * esize),
            ("swiglu", providers(swiglu_eager, swiglu), lambda f: f(gate, up), [gate, up], 3 * N * 4 * D * esize),
            ("rope", providers(lambda a, b, c, s: torch.cat([t.flatten() for t in rope_eager(a, b, c, s)]),
                               lambda a, b, c, s, **kw: torch.cat([t.flatten() for t in rope(a, b, c, s, **kw)])),
             lambda f: f(q, k, cos, sin), [q, k], 2 * (q.numel() + k.numel()) * esize),
            ("fused_linear_cross_entropy", providers(fused_linear_cross_entropy_eager, fused_linear_cross_entropy),
             lambda f: f(x, lm_w, tgt), [x, lm_w], (N * D + V * D) * esize),
            ("pixel_shuffle_act", providers(lambda t: pixel_shuffle_act_eager(t, r, "exp"),
                                            lambda t, **kw: pixel_shuffle_act(t, r, "exp", **kw)),
             lambda f: f(feat), [feat], 2 * feat.numel() * esize),
        ]
        for kernel, prov, call, inputs, nbytes in specs:
            flops = 2.0 * N * D * V if kernel == "fused_linear_cross_entropy" else None
            for mode in modes:
                grad = mode == "full"
                fns = {n: mode_fn(mode, lambda f=f: call(f), inputs if grad else []) for n, f in prov.items()}
                bench.compare(kernel, mode, label, fns, config=f"N={N} D={D} V={V} fp32",
                              min_bytes=nbytes * (2 if grad else 1), flops=flops and flops * (3 if grad else 1),
                              copy_bytes=nbytes)
    name = "lm_heads" if not args.quick else "lm_heads-quick"
    bench.finish(results_dir(args, device), name, "LM ops and head output stage", plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
