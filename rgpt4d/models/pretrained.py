"""Reading pretrained weights for the student: Hugging Face SigLIP / Qwen2 towers and tokenizers,
and the NVILA folder layout. The student's `from_parts` / `from_nvila` build on these
(rgpt4d.models.loaders: the same as functions returning (model, tokenizer); docs/checkpoints.md).
`build_parts` / `build_nvila` return the student and the tokenizer it must be used with: the given one
with `<image>` and, when the student reads region tokens, `<obj_1>` ... `<obj_K>` added; the LLM's
embeddings (and LM head) grow to the tokenizer's length when they are shorter, existing rows kept.

The NVILA layout (NVlabs/VILA, the released 4D-RGPT-8B; facts in docs/checkpoints.md):

    config.json      mm_vision_select_layer (-2), mm_vision_select_feature ("cls_patch"),
                     num_video_frames, chat_template ("qwen2"), mm_hidden_size, hidden_size
    llm/             Qwen2ForCausalLM + its tokenizer (with <image>, <vila/video>, ... added)
    vision_tower/    SiglipVisionModel (keys vision_model.*, no head)
    mm_projector/    config.json {"mm_projector_type": "mlp_downsample_3x3_fix"}, model.safetensors:
                     layers.1 LayerNorm(9m), layers.2 Linear(9m, 3m), layers.4 LayerNorm(3m),
                     layers.5 Linear(3m, d), layers.7 Linear(d, d) (GELU at 3 and 6; layers.0 is the
                     parameter-free 3x3 downsample)

becomes the student with projector_type "nvila" (the fused TPE + downsample + LayerNorm prologue
holds layers.0-1), vision_select_layer -2, the "\\n" token after each frame's 121 tokens, TPE on
(sinusoidal seconds, no parameters), and region_mode "som": regions come from the SoM image shown
first, and `<obj_N>` stays plain text, as the checkpoint was trained (region_mode="tokens" adds
`<obj_N>` tokens and a new region encoder, to fine-tune).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM, SiglipVisionModel

from rgpt4d.models.attention import resolve_attn_implementation
from rgpt4d.models.configs import Preset, student_config
from rgpt4d.models.tokenizer import ASSISTANT, IMAGE, PAD, USER, obj_token, single_token_id

# NVILA's "qwen2" chat template (top-level config `chat_template`), for an llm/ tokenizer saved without one
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NVILA_PROJECTOR = "mlp_downsample_3x3_fix"
# config keys that describe a saved file rather than the architecture
_FILE_KEYS = ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
              "_attn_implementation_autoset", "auto_map")


def _dir(spec: Any, what: str, needs: tuple[str, ...] = ("config.json",)) -> Path:
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {spec} is not a directory (expected a Hugging Face folder)")
    for name in needs:
        if not (path / name).exists():
            raise FileNotFoundError(f"{what}: no {name} in {path}")
    return path


def load_vision_tower(spec, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A SiglipVisionModel from a folder (its head, unused here, is not built) or the object itself
    (its head, if any, is dropped)."""
    if isinstance(spec, SiglipVisionModel):
        model = spec
    elif isinstance(spec, torch.nn.Module):
        raise TypeError(f"vision_model: expected a SiglipVisionModel or a folder, got {type(spec).__name__}")
    else:
        path = _dir(spec, "vision_model")
        model = SiglipVisionModel.from_pretrained(path, vision_use_head=False, dtype=dtype,
                                                  attn_implementation=attn_implementation)
    if getattr(model, "head", None) is not None:
        del model.head
    model.use_head = model.config.vision_use_head = False
    return model


def load_language_model(spec, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A Qwen2ForCausalLM from a folder or the object itself."""
    if isinstance(spec, Qwen2ForCausalLM):
        return spec
    if isinstance(spec, torch.nn.Module):
        raise TypeError(f"language_model: expected a Qwen2ForCausalLM or a folder, got {type(spec).__name__}")
    return Qwen2ForCausalLM.from_pretrained(_dir(spec, "language_model"), dtype=dtype,
                                            attn_implementation=attn_implementation)


def prepare_tokenizer(spec, *, regions: int = 8, chat_template: str | None = None, replace_template: bool = False):
    """The tokenizer the student uses: a fast tokenizer (a folder with tokenizer.json, or the
    object, copied) with `chat_template` set when it has none, `<image>` and `<obj_1>` ...
    `<obj_{regions}>` added as special tokens when missing (and `<|user|>`, `<|assistant|>` when it
    has no chat template), and a pad token when it has none (its `[PAD]`, else `<pad>`).
    `replace_template`: `chat_template` replaces the tokenizer's own (what VILA does with its config's)."""
    if isinstance(spec, PreTrainedTokenizerBase):
        tok = copy.deepcopy(spec)
    else:
        path = _dir(spec, "tokenizer", needs=())
        if not any((path / n).exists() for n in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json (nor vocab.json + merges.txt) in {path}")
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"tokenizer: expected a fast tokenizer (tokenizers' tokenizer.json), got {type(tok).__name__}")
    if chat_template and (replace_template or not getattr(tok, "chat_template", None)):
        tok.chat_template = chat_template
    vocab = tok.get_vocab()
    # without a chat template, prompts are written with <|user|> ... <|assistant|> (rgpt4d.models.tokenizer)
    turns = [] if getattr(tok, "chat_template", None) else [USER, ASSISTANT]
    new = [t for t in [IMAGE, *turns] + [obj_token(n) for n in range(1, regions + 1)] if t not in vocab]
    if new:
        tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "[PAD]" if "[PAD]" in vocab else PAD})
    return tok


def _config_dict(config) -> dict:
    d = config.to_dict()
    for k in _FILE_KEYS:
        d.pop(k, None)
    return d


def _uses_regions(overrides: dict) -> bool:
    return overrides.get("region_mode", "tokens") in ("tokens", "both")


def build_from_towers(model_class, vision, llm, tokenizer, *, dtype: torch.dtype = torch.float32,
                      **config_overrides):
    """The student (`model_class`: RGPT4DForConditionalGeneration or a subclass) around loaded towers
    and a prepared tokenizer: the config comes from the towers' own configs (then
    `config_overrides`), the embeddings grow to the tokenizer when shorter."""
    vcfg, tcfg = _config_dict(vision.config), _config_dict(llm.config)
    rows = llm.get_input_embeddings().weight.shape[0]
    defaults = dict(vision_config=vcfg, text_config=tcfg, num_frames=16, projector_type="mlp",
                    projector_hidden_size=4 * vcfg["hidden_size"],  # the paper's E_P: 4608 for SigLIP's 1152
                    region_hidden_size=tcfg["hidden_size"])
    config = student_config(Preset("pretrained", student=defaults), tokenizer, **config_overrides)
    if len(tokenizer) > rows:
        llm.resize_token_embeddings(len(tokenizer))  # the old rows stay; the new ones start at their mean
    config.text_config["vocab_size"] = llm.get_input_embeddings().weight.shape[0]
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(llm.config, key, config.text_config[key])
    llm.config.vocab_size = config.text_config["vocab_size"]
    model = model_class(config, vision_tower=vision, language_model=llm)
    return model.to(dtype)


def build_parts(model_class, vision_model, language_model, tokenizer, *, dtype: torch.dtype = torch.float32,
                **config_overrides):
    """(student, tokenizer) from a SiglipVisionModel, a Qwen2ForCausalLM and a fast tokenizer (each
    a folder or an object); see the module docstring."""
    attn = resolve_attn_implementation(config_overrides.get("attn_implementation_name", "sdpa"))
    vision = load_vision_tower(vision_model, dtype=dtype, attn_implementation=attn)
    llm = load_language_model(language_model, dtype=dtype, attn_implementation=attn)
    regions = config_overrides.get("max_regions", 8) if _uses_regions(config_overrides) else 0
    tok = prepare_tokenizer(tokenizer, regions=regions)
    return build_from_towers(model_class, vision, llm, tok, dtype=dtype, **config_overrides), tok


# ---------------------------------------------------------------------------------------------
# NVILA
# ---------------------------------------------------------------------------------------------


def is_nvila_folder(path) -> bool:
    """Whether `path` is in the NVILA layout (llm/, vision_tower/ and mm_projector/ subfolders)."""
    p = Path(path)
    return all((p / sub).is_dir() for sub in ("llm", "vision_tower", "mm_projector"))


def _nvila_projector_weights(path: Path) -> dict:
    cfg_path = path / "config.json"
    kind = json.loads(cfg_path.read_text()).get("mm_projector_type") if cfg_path.exists() else None
    if kind != NVILA_PROJECTOR:
        raise ValueError(f"mm_projector: {path} has mm_projector_type {kind!r}; only {NVILA_PROJECTOR!r} "
                         "(NVILA-Lite, 4D-RGPT) is supported")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"mm_projector: no *.safetensors in {path}")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def build_nvila(model_class, path, *, dtype: torch.dtype = torch.float32, **config_overrides):
    """(student, tokenizer) from an NVILA folder; see the module docstring. `config_overrides`: any
    RGPT4DConfig field (e.g. num_frames, region_mode="tokens", tpe=False)."""
    path = _dir(path, "model")
    if not is_nvila_folder(path):
        missing = [s for s in ("llm", "vision_tower", "mm_projector") if not (path / s).is_dir()]
        raise FileNotFoundError(f"model: {path} is not an NVILA folder (missing {', '.join(s + '/' for s in missing)})")
    top = json.loads((path / "config.json").read_text())
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature != "cls_patch":
        raise ValueError(f"config.json: mm_vision_select_feature {feature!r} is not supported (SigLIP has no CLS "
                         "token: NVILA uses 'cls_patch', every token)")
    weights = _nvila_projector_weights(path / "mm_projector")
    need = [f"layers.{i}.{w}" for i in (1, 2, 4, 5, 7) for w in ("weight", "bias")]
    absent = [k for k in need if k not in weights]
    if absent:
        raise ValueError(f"mm_projector: missing {absent} (expected {NVILA_PROJECTOR}'s layers 1, 2, 4, 5, 7)")

    attn = resolve_attn_implementation(config_overrides.get("attn_implementation_name", "sdpa"))
    vision = load_vision_tower(path / "vision_tower", dtype=dtype, attn_implementation=attn)
    llm = load_language_model(path / "llm", dtype=dtype, attn_implementation=attn)
    overrides = dict(projector_type="nvila", projector_hidden_size=weights["layers.2.weight"].shape[0],
                     vision_select_layer=int(top.get("mm_vision_select_layer", -2)), downsample_window=3,
                     tpe=True, tpe_kind="sinusoidal", num_frames=int(top.get("num_video_frames") or 16),
                     region_mode="som")
    overrides.update(config_overrides)
    regions = overrides.get("max_regions", 8) if _uses_regions(overrides) else 0
    # VILA replaces the tokenizer's template with the one its config names (NVILA: "qwen2")
    named = top.get("chat_template")
    template = QWEN2_CHAT_TEMPLATE if named in ("qwen2", None) else None
    tok = prepare_tokenizer(path / "llm", regions=regions, chat_template=template, replace_template=named == "qwen2")
    overrides.setdefault("frame_separator_id", single_token_id(tok, "\n", "frame_separator"))

    m, d = vision.config.hidden_size, llm.config.hidden_size
    for key, want in (("mm_hidden_size", m), ("hidden_size", d)):
        if key in top and int(top[key]) != want:
            raise ValueError(f"config.json: {key} {top[key]} does not match the towers' width {want}")
    shapes = {"layers.1.weight": (9 * m,), "layers.2.weight": (overrides["projector_hidden_size"], 9 * m),
              "layers.5.weight": (d, overrides["projector_hidden_size"]), "layers.7.weight": (d, d)}
    for key, shape in shapes.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"mm_projector: {key} is {tuple(weights[key].shape)}, expected {shape} for vision "
                             f"width {m} and LLM width {d}")
    model = build_from_towers(model_class, vision, llm, tok, dtype=dtype, **overrides)
    p = model.projector
    targets = {"layers.1.weight": p.norm_weight, "layers.1.bias": p.norm_bias,
               "layers.2.weight": p.linear_1.weight, "layers.2.bias": p.linear_1.bias,
               "layers.4.weight": p.norm_2.weight, "layers.4.bias": p.norm_2.bias,
               "layers.5.weight": p.linear_2.weight, "layers.5.bias": p.linear_2.bias,
               "layers.7.weight": p.linear_3.weight, "layers.7.bias": p.linear_3.bias}
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(weights[key])
    return model, tok
