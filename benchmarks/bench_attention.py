"""Benchmark rgpt4d.ops.attention against torch's F.scaled_dot_product_attention and torch.compile of it.

    python benchmarks/bench_attention.py [--quick] [--device cpu|cuda] [--modes forward,full]

Shapes: the student's own attention calls, from the tiny preset the end-to-end benchmark trains
(SigLIP over 2 x 16 frames of 8 x 8 patches: [32, 4, 64, 16], forward only since the tower is frozen;
Qwen2 over a 211-token prompt with 4 query / 2 key-value heads of 32: causal, grouped-query) and
the LLM with a padding mask (bool [B, 1, L, L], causal folded in). q, k, v are transposed views of
[B, L, H, D] tensors, as a transformer hands them over. On CUDA the op runs SDPA itself (no rgpt4d
kernel): the script then only times the eager and compile providers.
Writes benchmarks/results/<device>/attention.{csv,md} and attention_attention.png.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import base_parser, grad_modes, make_bench, mode_fn, results_dir  # noqa: E402
from rgpt4d.ops import attention, attention_eager, available_backends  # noqa: E402


def shapes(quick: bool):
    # label, B, Hq, Hkv, L, D, causal, padding mask
    tiny = [("siglip-tiny", 32, 4, 4, 64, 16, False, False), ("llm-tiny", 2, 4, 2, 211, 32, True, False),
            ("llm-tiny-padded", 2, 4, 2, 211, 32, True, True)]
    return tiny[:2] if quick else tiny + [("llm-B8", 8, 4, 2, 211, 32, True, False)]


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    modes = grad_modes(args)
    bench = make_bench(args, device)
    prov = {"eager": lambda q, k, v, m, c: attention_eager(q, k, v, m, causal=c)}
    if not args.no_compile:
        prov["compile"] = torch.compile(lambda q, k, v, m, c: attention_eager(q, k, v, m, causal=c), dynamic=False)
    if device.type == "cpu" and "cpu" in available_backends():
        prov["rgpt4d-cpu"] = lambda q, k, v, m, c: attention(q, k, v, m, causal=c, backend="cpu", validate=False)
    g = torch.Generator().manual_seed(0)
    for label, B, Hq, Hkv, L, D, causal, padded in shapes(args.quick):
        q, k, v = (torch.randn(B, L, H, D, generator=g).to(device).transpose(1, 2) for H in (Hq, Hkv, Hkv))
        mask = None
        if padded:  # left padding of a few tokens in every other sample
            keep = torch.ones(B, L, dtype=torch.bool)
            keep[1::2, :13] = False
            mask = (keep[:, None, None, :] & keep[:, None, :, None]).to(device)
        cfg = f"B={B} Hq={Hq} Hkv={Hkv} L={L} D={D} causal={causal} mask={'padding' if padded else 'none'}"
        frac = 0.5 if causal else 1.0
        fwd_flops = 2.0 * B * Hq * L * L * 2 * D * frac  # two GEMMs, causal half
        esize = q.element_size()
        io = (q.numel() + k.numel() + v.numel() + q.numel()) * esize
        for mode in modes:
            if label.startswith("siglip") and mode in ("backward", "full"):
                continue  # the vision tower is frozen: forward only
            grad = mode in ("backward", "full")
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
            flops = fwd_flops * {"forward": 1, "nograd": 1, "backward": 2.5, "full": 3.5}[mode]
            bench.compare("attention", mode, label,
                          {n: mode_fn(mode, lambda f=f: f(qs, ks, vs, mask, causal), [qs, ks, vs] if grad else [])
                           for n, f in prov.items()},
                          config=cfg, flops=flops, min_bytes=io * (2 if grad else 1))
    bench.finish(results_dir(args, device), "attention" if not args.quick else "attention-quick",
                 "Attention (the student's SigLIP and Qwen2 calls)", plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
