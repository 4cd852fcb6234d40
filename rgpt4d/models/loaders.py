"""Students from pretrained weights: Hugging Face parts, or an NVILA folder (docs/checkpoints.md).

    model, tokenizer = load_parts("siglip-so400m/", "qwen2-7b/", "qwen2-7b/")      # new projector
    model, tokenizer = load_nvila("NVILA-Lite-8B/")                                 # every weight loaded

The same as `RGPT4DForConditionalGeneration.from_parts` / `.from_nvila` (which keep the tokenizer as
`model.tokenizer`); reading the towers, tokenizers and the NVILA layout: rgpt4d.models.pretrained.
"""

from __future__ import annotations

import torch

from rgpt4d.models.pretrained import build_nvila, build_parts
from rgpt4d.models.student import RGPT4DForConditionalGeneration


def load_parts(vision_model, language_model, tokenizer, *, dtype: torch.dtype = torch.float32, **config_overrides):
    """(student, tokenizer) from a SiglipVisionModel, a Qwen2ForCausalLM and a fast tokenizer (each
    a folder or an object); rgpt4d.models.pretrained.build_parts."""
    return build_parts(RGPT4DForConditionalGeneration, vision_model, language_model, tokenizer, dtype=dtype,
                       **config_overrides)


def load_nvila(path, *, dtype: torch.dtype = torch.float32, **config_overrides):
    """(student, tokenizer) from an NVILA folder; rgpt4d.models.pretrained.build_nvila.
    `config_overrides`: any RGPT4DConfig field (e.g. num_frames, region_mode="tokens", tpe=False)."""
    return build_nvila(RGPT4DForConditionalGeneration, path, dtype=dtype, **config_overrides)
