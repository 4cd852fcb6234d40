"""Training step of a transformers MLLM with rgpt4d's kernels patched in (rgpt4d.integrations.kernels)
against the same model unpatched, one row per family, eager and torch.compile, in one run.

    python benchmarks/bench_integrations.py [--families llava,qwen2_vl] [--no-compile] [--threads 1] [--quick]

Models: rgpt4d.integrations.tiny's build() at size "bench" (randomly initialised, float32): a 4-layer
language model of hidden size 256 (8 heads, 2 KV heads, MLP 704, vocabulary 4096) behind a one- or
two-layer vision tower, batch 2, 4 frames per sample (images; one video for LLaVA-OneVision and
LLaVA-NeXT-Video) as the family's placeholder tokens, then 192 text tokens with labels on the last 96
of them (an SFT batch). Same weights and inputs for every provider (a deep copy each).

Providers, side by side (interleaved rounds, benchmarks/harness.py):
  eager           the unpatched model
  rgpt4d          apply_kernels(model): RMSNorm, SwiGLU, rotary (M-RoPE for Qwen-VL) and the LM head +
                  loss as rgpt4d ops on the device's compiled backend (cpu here)
  compile         the unpatched model, torch.compile'd (--compile-scope: its language model, default,
                  or the whole model)
  rgpt4d-compile  the patched model, compiled the same way

Why the language model by default: it is where the patch acts, and it compiles to one clean graph;
the whole model also compiles the vision tower, whose data-dependent placeholder checks break the graph
into many pieces, minutes per family on 2 CPU cores (`--compile-scope model` does it:
`python benchmarks/bench_integrations.py --compile-scope model` shows the time).

Kernel train_step, mode full: forward with labels (train mode) and backward of the loss (no optimizer
step: only the model's own work). Metrics: time, peak memory, throughput (tokens/s: the sequence tokens
of the batch). Writes benchmarks/results/<device>/integrations.{csv,md} (integrations-quick.* with --quick:
the "tiny" size); prints the summary.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import base_parser, make_bench, results_dir  # noqa: E402
from rgpt4d.integrations.kernels import apply_kernels  # noqa: E402
from rgpt4d.integrations.tiny import FAMILIES, SIZES, available, build  # noqa: E402


def step_fn(model, inputs):
    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss
    return run


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--size", default="bench", choices=tuple(SIZES), help="rgpt4d.integrations.tiny size")
    p.add_argument("--compile-scope", default="lm", choices=("lm", "model"),
                   help="what the compile providers compile: the language model (default) or the whole model")
    args = p.parse_args(argv)
    if args.quick:  # a smoke run: the test size, written apart from the full results
        args.size = "tiny"
    device = torch.device(args.device)
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise SystemExit(f"--families: unknown {bad}; choose from {FAMILIES}")
    bench = make_bench(args, device)
    names = ["eager", "rgpt4d"] + ([] if args.no_compile else ["compile", "rgpt4d-compile"])
    summary = ["## Per family: training-step tokens/s (median) and the paired speed-up of the patched model", "",
               "| family | LM | tokens/step | eager | rgpt4d | speed-up | compile | rgpt4d-compile | speed-up |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fam in families:
        if not available(fam):
            print(f"[bench_integrations] {fam}: skipped, this transformers has no such model", flush=True)
            continue
        base, inputs = build(fam, size=args.size)
        base, inputs = base.to(device), {k: v.to(device) for k, v in inputs.items()}
        models = {n: copy.deepcopy(base) for n in names}
        for n in names:
            if n.startswith("rgpt4d"):
                apply_kernels(models[n])
            if n.endswith("compile"):
                if args.compile_scope == "lm":
                    models[n].model.language_model.compile(dynamic=False)  # in place
                else:
                    models[n] = torch.compile(models[n], dynamic=False)
        fns = {n: step_fn(m, inputs) for n, m in models.items()}
        tokens = int(inputs["input_ids"].numel())
        lm = type(base.model.language_model).__name__
        cfg = (f"{type(base).__name__} ({lm}), size {args.size}, batch {inputs['input_ids'].shape[0]}, "
               f"{tokens} tokens/step, fp32, forward with labels + backward, compile scope {args.compile_scope}")
        print(f"[bench_integrations] {fam}: {', '.join(fns)} (the first calls compile) ...", flush=True)
        t = bench.compare("train_step", "full", fam, fns, config=cfg)
        for n, ms in t.items():
            bench.add_row("train_step", n, "full", "throughput", "tokens/s", fam, tokens / (ms * 1e-3), config=cfg)
        tp = {n: tokens / (ms * 1e-3) for n, ms in t.items()}
        sp = bench.value("train_step", "rgpt4d", "full", fam, "speedup_vs_eager")
        row = f"| {fam} | {lm} | {tokens} | {tp['eager']:.0f} | {tp['rgpt4d']:.0f} | {sp:.2f}x |"
        if not args.no_compile:
            spc = bench.value("train_step", "rgpt4d-compile", "full", fam, "speedup_vs_compile")
            row += f" {tp['compile']:.0f} | {tp['rgpt4d-compile']:.0f} | {spc:.2f}x |"
        else:
            row += " - | - | - |"
        summary.append(row)
    summary += ["", "speed-up: the median over interleaved rounds of the unpatched time over the patched time "
                "(rgpt4d vs eager; rgpt4d-compile vs compile)."]
    name = "integrations" + ("-quick" if args.quick else "" if args.size == "bench" else f"-{args.size}")
    bench.finish(results_dir(args, device), name, "rgpt4d kernels patched into transformers MLLMs (apply_kernels)",
                 ours=["rgpt4d"] + ([] if args.no_compile else ["rgpt4d-compile"]), plots=not args.no_plots,
                 extra="\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
