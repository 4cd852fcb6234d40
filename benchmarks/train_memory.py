"""Memory per GPU of a student training step at the paper's shapes, DDP vs FSDP (docs/training.md).

    python benchmarks/train_memory.py [--gpus 8,16,64] [--seq 2048] [--vocab 151651] [--tokens 256]

Parameters are counted on the meta device (nothing allocated): the `paper` student (with the
released tokenizer's vocabulary, --vocab), D_4DP, and L4P's three frozen dense heads (depth, flow,
motion) at 16 x 224 x 224. Optimizer: AdamW, fp32 master weights, gradients and two moments.

Activations (what autograd keeps for the backward of one sample, micro-batch 1) are measured here on
the CPU in fp32 by counting the bytes of every tensor saved for backward (saved_tensors_hooks; the
parameters themselves not counted) in pieces small enough for this machine, and scaled:
- one Qwen2 decoder layer at the paper's widths (3584, MLP 18944, 28/4 heads), measured at --tokens
  and 2x --tokens tokens (the two must scale linearly: no sequence^2 term), times 28 layers times
  --seq tokens / the measured tokens;
- the LM head with the fused cross-entropy at the full vocabulary, at --tokens and 2x --tokens
  labelled tokens: a fixed part (the op computes the weight's gradient in the forward and keeps it,
  [vocab, 3584]) plus a per-token slope taken to --seq tokens (an upper bound: only the answer
  tokens carry labels);
- D_4DP on the 8 x 16 x 16 teacher grid and the three frozen L4P heads that L_ED back-propagates
  through, measured at 4 frames of 56 px (a 2 x 4 x 4 grid) and scaled by the number of output
  pixels and frames (x64: every saved map of the heads is proportional to T x H x W);
- the projector on 16 frames of 32 x 32 SigLIP patches at its widths.
The frozen vision tower keeps nothing for backward. The measured fp32 bytes are halved for the bf16
run (the matmul inputs autocast saves are bf16; an estimate, not a GPU measurement).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GB = 1024 ** 3


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs (storages of `exclude`, the
    parameters, not counted)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _paper_text_config(vocab: int, layers: int) -> dict:
    from rgpt4d.models.configs import get_preset

    cfg = dict(get_preset("paper").student["text_config"])
    cfg.update(num_hidden_layers=layers, vocab_size=vocab)
    return cfg


def _l4p_head(out_channels: int, activation: str = "none"):
    """One of L4P's dense heads at its real widths: act_postprocess resamplers ConvTranspose3d (2, 4, 4)
    and (2, 2, 2), nothing, Conv3d (3, 3, 3); fusion width 256, last width 128."""
    from rgpt4d.models.l4p import L4PDenseHead

    dims = (256, 512, 1024, 1024)
    kernels = [(2, 4, 4), (2, 2, 2), None, (3, 3, 3)]
    shapes = [None if k is None else (c, c, *k) for c, k in zip(dims, kernels)]
    return L4PDenseHead(1408, dims, shapes, 256, 128, out_channels, 14, 2, activation)


def count_params(vocab: int) -> dict:
    """Parameter counts (meta device) of the paper student, D_4DP and L4P's three dense heads."""
    from rgpt4d.models.configs import P4DConfig, get_preset, student_config
    from rgpt4d.models.p4d import P4DDecoder
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.tokenizer import train_tokenizer

    tok = train_tokenizer(vocab_size=1000)
    cfg = student_config("paper", tok)
    if isinstance(cfg.text_config, dict):  # the tokenizer trained here is small: the released vocabulary
        cfg.text_config["vocab_size"] = vocab
    else:
        cfg.text_config.vocab_size = vocab
    with torch.device("meta"):
        student = RGPT4DForConditionalGeneration(cfg)
        decoder = P4DDecoder(3584, 1408, P4DConfig(hidden_size=get_preset("paper").p4d.hidden_size))
        heads = [_l4p_head(out) for out in (1, 2, 1)]
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    layers = [*student.vision_tower.encoder.layers, *student.language_model.model.layers]
    in_layers = {id(p) for m in layers for p in m.parameters()}
    root = [p for p in [*student.parameters(), *decoder.parameters()]
            if id(p) not in in_layers and p.requires_grad]
    return {
        "student": n(student.parameters()),
        "trainable": n(p for p in student.parameters() if p.requires_grad) + n(decoder.parameters()),
        "vision": n(student.vision_tower.parameters()), "decoder": n(decoder.parameters()),
        "heads": sum(n(h.parameters()) for h in heads),
        "llm_layer": n(student.language_model.model.layers[0].parameters()),
        "root": n(root), "llm_layers": len(student.language_model.model.layers), "vocab": vocab,
    }


def llm_layer_bytes(tokens: int) -> tuple[int, int]:
    """Saved bytes of one paper-width Qwen2 decoder layer at `tokens` and 2 * `tokens` tokens."""
    from transformers import Qwen2Config, Qwen2Model

    from rgpt4d.models.student import use_rgpt4d_llm_ops

    torch.manual_seed(0)
    model = use_rgpt4d_llm_ops(Qwen2Model(Qwen2Config(**_paper_text_config(256, 1))))
    out = []
    for s in (tokens, 2 * tokens):
        x = torch.randn(1, s, model.config.hidden_size, requires_grad=True)
        layer_and_norm = saved_bytes(lambda: model(inputs_embeds=x, use_cache=False).last_hidden_state,
                                     list(model.parameters()))
        out.append(layer_and_norm)
    del model
    return out[0], out[1]


def lm_head_bytes(tokens: int, vocab: int) -> tuple[int, int]:
    """Saved bytes of the LM head + fused cross-entropy at `tokens` and 2 * `tokens` labelled tokens
    (it keeps the weight's gradient, computed in the forward: a [vocab, 3584] term whatever the length)."""
    from rgpt4d.ops import fused_linear_cross_entropy

    w = torch.nn.Parameter(torch.randn(vocab, 3584) * 0.02)
    out = []
    for s in (tokens, 2 * tokens):
        h = torch.randn(1, s, 3584, requires_grad=True)
        target = torch.randint(0, vocab, (1, s))
        out.append(saved_bytes(lambda: fused_linear_cross_entropy(h, w, target), [w]))
    return out[0], out[1]


def p4d_bytes() -> int:
    """D_4DP on 2 x 4 x 4 grid tokens and the three L4P heads to 4 frames of 56 px (x64 for 16 x 224)."""
    from rgpt4d.models.configs import P4DConfig
    from rgpt4d.models.p4d import P4DDecoder

    torch.manual_seed(0)
    decoder = P4DDecoder(3584, 1408, P4DConfig(hidden_size=2560))
    heads = [_l4p_head(out, "exp" if i == 0 else "none") for i, out in enumerate((1, 2, 1))]
    params = [*decoder.parameters(), *(p for h in heads for p in h.parameters())]
    for h in heads:
        h.requires_grad_(False)
    x = torch.randn(1, 2, 4, 4, 3584, requires_grad=True)

    def run():
        grids = decoder(x)
        return sum(h(grids).float().square().mean() for h in heads)

    return saved_bytes(run, params)


def projector_bytes() -> int:
    from rgpt4d.models.student import Projector

    proj = Projector(1152, 3, 4608, 3584, tpe=True)
    x = torch.randn(1, 16, 32 * 32, 1152, requires_grad=True)
    ts = torch.arange(16, dtype=torch.float32)[None]
    return saved_bytes(lambda: proj(x, ts, (32, 32)), list(proj.parameters()))


def table(counts: dict, act: float, gpus: list[int]) -> str:
    """GiB per GPU. DDP: fp32 weights, gradients and AdamW moments whole on every GPU; the reducer's
    buckets hold a second copy of the gradients; autocast keeps a bf16 copy of every trainable weight
    from its first use in the forward until the backward. FSDP: weights, gradients and moments / N
    (the frozen L4P heads whole); the working bf16 copies are the gathered units: the root unit
    (embeddings, LM head, projector, region encoder, D_4DP) for the whole step, two layers at a time
    (the one running and the one prefetched) and one layer's unsharded fp32 gradient before its
    reduce-scatter."""
    P, T, heads = counts["student"] + counts["decoder"], counts["trainable"], counts["heads"]
    rows = ["| GPUs | strategy | weights | gradients | AdamW moments | bf16 working copies | activations (1 sample) "
            "| total |", "|---|---|---|---|---|---|---|---|"]
    for n in gpus:
        ddp = [4 * (P + heads), 2 * 4 * T, 8 * T, 2 * T, act]
        layer = counts["llm_layer"]
        fsdp = [4 * P / n + 4 * heads, 4 * T / n, 8 * T / n, 2 * counts["root"] + 2 * 2 * layer + 4 * layer, act]
        for name, v in (("DDP", ddp), ("FSDP", fsdp)):
            rows.append(f"| {n} | {name} | " + " | ".join(f"{x / GB:.1f}" for x in v) + f" | **{sum(v) / GB:.1f}** |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="8,16,64")
    ap.add_argument("--seq", type=int, default=2048, help="tokens of one training sequence")
    ap.add_argument("--vocab", type=int, default=151651)
    ap.add_argument("--tokens", type=int, default=256, help="tokens the LLM layer is measured at")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    counts = count_params(args.vocab)
    print("parameters:", {k: (f"{v / 1e9:.3f}B" if v > 1e6 else v) for k, v in counts.items()})
    a1, a2 = llm_layer_bytes(args.tokens)
    print(f"one LLM layer (+ final norm): {a1 / 2 ** 20:.1f} MiB at {args.tokens} tokens, "
          f"{a2 / 2 ** 20:.1f} MiB at {2 * args.tokens} (ratio {a2 / a1:.3f})")
    per_token = (a2 - a1) / args.tokens  # the slope: what a token adds, the final norm included once
    llm = per_token * args.seq * counts["llm_layers"]
    h1, h2 = lm_head_bytes(args.tokens, args.vocab)
    head = h1 + (h2 - h1) / args.tokens * (args.seq - args.tokens)  # fixed part + slope x tokens
    print(f"LM head + fused cross-entropy: {h1 / 2 ** 20:.1f} MiB at {args.tokens} tokens, {h2 / 2 ** 20:.1f} MiB "
          f"at {2 * args.tokens}")
    p4d = p4d_bytes() * 64
    print(f"D_4DP + three L4P heads: {p4d / GB:.2f} GiB at 16 x 224 x 224 (x64 of the measured)")
    proj = projector_bytes()
    print(f"projector: {proj / 2 ** 20:.1f} MiB")
    act_fp32 = llm + head + p4d + proj
    act = act_fp32 / 2
    print(f"activations per sample: {act_fp32 / GB:.1f} GiB fp32 -> {act / GB:.1f} GiB bf16 "
          f"(LLM layers {llm / GB:.1f}, LM head {head / GB:.2f}, P4D {p4d / GB:.1f}, "
          f"projector {proj / GB:.2f}; GiB fp32)")
    print()
    print(table(counts, act, [int(g) for g in args.gpus.split(",")]))


if __name__ == "__main__":
    main()
