"""End-to-end benchmark: one P4D training step and the inference step of the student.

    python benchmarks/bench_e2e.py [--quick] [--device cpu|cuda] [--preset tiny] [--batch 2] [--no-compile]

The model is the preset's student (SigLIP -> fused TPE prologue -> projector -> Qwen2, region tokens
from region_pool) with the P4D parts (D_4DP decoder, the frozen teacher's heads, P4DLoss): every
project op family is on the path (tpe_downsample_layernorm, region_pool, p4d_loss; in the LLM rms_norm,
swiglu and rope, and L_SFT from fused_linear_cross_entropy on the LM head). Inputs are
random frames, boxes, timestamps and a prompt of the real template; the teacher targets come from
a randomly initialised frozen teacher, computed once. The same inputs and the same initial weights
(a deep copy per provider) for every provider.

Providers, side by side (interleaved rounds, benchmarks/harness.py):
  rgpt4d-<backend>  every project op on the device's compiled backend (rgpt4d.ops.set_backend):
                    the `--ops fused` configuration (cpu on CPU; cuda and triton on GPU), the frozen
                    teacher heads horizontally fused (rgpt4d.models.teacher.dpt_heads_fused)
  eager             every project op on its plain-PyTorch reference (`--ops eager`), the heads one
                    after the other
  compile           torch.compile of the model with the eager references (dynamo traces them)

Kernels (rows of the CSV):
  train_step      mode full:   forward with the SFT + P4D losses, backward, AdamW step;
                  metrics time, peak memory, throughput (tokens/s: the sequence tokens of the batch)
  infer_forward   mode nograd: the bare student's forward under no_grad (the prompt's logits)
  infer_generate  mode nograd: generate one answer token with the KV cache (no compile provider:
                  transformers' generate loop is not a torch.compile target here)
Writes benchmarks/results/<device>/e2e.{csv,md} and e2e_<kernel>.png; prints the summary.
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
from rgpt4d.ops import available_backends, set_backend  # noqa: E402

PROMPT = ("Between the first and the last frame, how far did <obj_1> move relative to <obj_2>?\n"
          "(A) 0.5 m\n(B) 1.0 m\n(C) 2.0 m\n(D) 4.0 m")
TARGET_SPEEDUP = 1.15  # issue 8: fused >= 1.15x eager tokens/s, with lower peak memory


def build(preset: str, batch: int, device: torch.device, seed: int = 0, regions: int = 6):
    """(P4D training model, tokenizer, student inputs with labels, prompt-only inputs, teacher targets)."""
    from rgpt4d.models.configs import get_preset, student_config
    from rgpt4d.models.p4d import RGPT4DForP4DTraining
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.teacher import Teacher4D
    from rgpt4d.models.tokenizer import encode_batch, train_tokenizer

    p = get_preset(preset)
    tok = train_tokenizer(vocab_size=p.tokenizer_vocab_size)
    torch.manual_seed(seed)
    student = RGPT4DForConditionalGeneration(student_config(p, tok))
    teacher = Teacher4D(p.teacher).freeze()
    model = RGPT4DForP4DTraining(student, teacher, p.p4d).to(device)
    cfg = student.config
    g = torch.Generator().manual_seed(seed + 1)
    B, T, S, R = batch, cfg.num_frames, cfg.image_size, regions
    frames = torch.randint(0, 256, (B, T, 3, S, S), dtype=torch.uint8, generator=g)
    ts = torch.cumsum(torch.rand(B, T, generator=g) + 0.05, 1)  # seconds, variable frame rate
    wh = 4 + torch.rand(B, R, 2, generator=g) * (S / 2)
    xy = torch.rand(B, R, 2, generator=g) * (S - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    extra = dict(frames=frames, timestamps=ts, boxes=boxes, region_mask=torch.ones(B, R, dtype=torch.bool))
    train = dict(encode_batch(tok, [PROMPT] * B, cfg.num_visual_tokens, ["B"] * B), **extra)
    prompt = dict(encode_batch(tok, [PROMPT] * B, cfg.num_visual_tokens, None), **extra)
    train = {k: v.to(device) for k, v in train.items()}
    prompt = {k: v.to(device) for k, v in prompt.items()}
    with torch.no_grad():
        o = teacher.to(device)(train["frames"])
    targets = {"latent": o.latent, "layers": torch.stack(o.layers, 1), "depth": o.depth, "flow": o.flow,
               "motion": o.motion, "camray": o.camray}
    return model, tok, train, prompt, targets


def write_profile(path: str, steps: dict) -> None:
    """torch.profiler (CPU) of two training steps per provider: where the time goes, and which
    project ops (rgpt4d::*) are on the path."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    parts = []
    for name, step in steps.items():
        step()
        with profile(activities=acts) as prof:
            for _ in range(2):
                step()
        ev = prof.key_averages()
        ours = sorted((e for e in ev if "rgpt4d" in e.key), key=lambda e: -e.cpu_time_total)
        parts += [f"===== {name}: two training steps, top ops by total CPU time =====",
                  ev.table(sort_by="cpu_time_total", row_limit=30), "",
                  f"project ops (rgpt4d::*) in {name}: " + (", ".join(
                      f"{e.key} {e.cpu_time_total / 1e3:.1f} ms" for e in ours[:10]) or "none"), ""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny | small | paper)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--regions", type=int, default=6,
                   help="boxes per sample (all valid): the data generator's default max_objects is 6")
    p.add_argument("--profile", action="store_true",
                   help="also write e2e_profile.txt: torch.profiler tables of one training step per provider")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = 1 if args.quick else args.batch
    base, tok, train, prompt, targets = build(args.preset, batch, device, regions=args.regions)
    tokens = int(train["attention_mask"].sum())
    from rgpt4d.train.config import TrainConfig
    from rgpt4d.train.loop import make_optimizer

    backends = [b for b in (["cpu"] if device.type == "cpu" else ["cuda", "triton"]) if b in available_backends()]
    names = [f"rgpt4d-{b}" for b in backends] + ["eager"] + ([] if args.no_compile else ["compile"])
    op_backend = {f"rgpt4d-{b}": b for b in backends}
    op_backend.update(eager="eager", compile="eager")

    # one model + optimizer per provider, same initial weights
    models, opts = {}, {}
    for name in names:
        m = copy.deepcopy(base).train()
        models[name] = m
        opts[name] = make_optimizer(m, TrainConfig(), lr=1e-5)  # the training loop's AdamW
    fwd = {name: (torch.compile(m) if name == "compile" else m) for name, m in models.items()}
    students = {name: models[name].inference_model() for name in names}
    infer = {name: (torch.compile(s) if name == "compile" else s) for name, s in students.items()}

    def train_step(name):
        def run():
            set_backend(op_backend[name])
            opts[name].zero_grad(set_to_none=True)
            out = fwd[name](**train, teacher_targets=targets)
            out.loss.backward()
            opts[name].step()
            return out.loss
        return run

    def infer_forward(name):
        def run():
            set_backend(op_backend[name])
            with torch.no_grad():
                return infer[name](**prompt).logits
        return run

    def infer_generate(name):
        def run():
            set_backend(op_backend[name])
            return students[name].generate(**prompt, max_new_tokens=1)
        return run

    bench = make_bench(args, device)
    x = f"{args.preset}-B{batch}"
    cfg = f"{args.preset} preset, batch {batch}, {args.regions} regions, {tokens} tokens/step, fp32, fused AdamW (the training loop's)"
    rounds = min(args.rounds, 4) if args.quick else args.rounds
    print(f"[bench_e2e] train_step {x}: {', '.join(names)} (the first calls compile) ...", flush=True)
    for m in models.values():
        m.train()
    t = bench.compare("train_step", "full", x, {n: train_step(n) for n in names}, config=cfg, rounds=rounds,
                      max_seconds=3 * args.max_seconds)
    for n, ms in t.items():
        bench.add_row("train_step", n, "full", "throughput", "tokens/s", x, tokens / (ms * 1e-3), config=cfg)
    for m in models.values():
        m.eval()
    print(f"[bench_e2e] infer_forward {x} ...", flush=True)
    bench.compare("infer_forward", "nograd", x, {n: infer_forward(n) for n in names}, config=cfg,
                  rounds=rounds, max_seconds=args.max_seconds)
    print(f"[bench_e2e] infer_generate {x} ...", flush=True)
    bench.compare("infer_generate", "nograd", x, {n: infer_generate(n) for n in names if n != "compile"},
                  config=cfg + ", 1 new token", rounds=rounds, max_seconds=args.max_seconds)

    if args.profile:
        write_profile(os.path.join(results_dir(args, device), "e2e_profile.txt"),
                      {n: train_step(n) for n in names if n != "compile"})
    set_backend(None)

    ours = names[0] if backends else None
    lines = ["## Target (issue 8): fused >= 1.15x eager tokens/s with lower peak memory", ""]
    if ours:
        tp = {n: bench.value("train_step", n, "full", x, "throughput") for n in names}
        mem = {n: bench.value("train_step", n, "full", x, "peak_memory") for n in names}
        sp = bench.value("train_step", ours, "full", x, "speedup_vs_eager")  # paired, per round
        lower = mem[ours] is not None and mem["eager"] is not None and mem[ours] < mem["eager"]
        lines.append(f"- train_step {x}: {ours} {tp[ours]:.1f} tokens/s (median), eager {tp['eager']:.1f} tokens/s; "
                     f"paired speed-up {sp:.2f}x ({'meets' if sp >= TARGET_SPEEDUP else 'MISSES'} >= "
                     f"{TARGET_SPEEDUP}x)")
        if "compile" in tp:
            spc = bench.value("train_step", ours, "full", x, "speedup_vs_compile")
            lines.append(f"- vs torch.compile of the eager model: {tp['compile']:.1f} tokens/s; paired speed-up "
                         f"{spc:.2f}x")
        if mem[ours] is not None:
            lines.append(f"- peak memory: {ours} {mem[ours]:.0f} MB, eager {mem['eager']:.0f} MB"
                         + (f", compile {mem['compile']:.0f} MB" if "compile" in mem else "")
                         + f" ({'lower' if lower else 'NOT lower'} than eager)")
    out_dir = results_dir(args, device)
    bench.finish(out_dir, "e2e" if not args.quick else "e2e-quick", "End-to-end student step", ours=[ours] if ours else [],
                 plots=not args.no_plots, extra="\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
