"""4D-RGPT models: the frozen 4D teacher, the student MLLM, P4D heads, tokenizer and presets.

Modules, lowest first: tokenizer (BPE trained offline), configs (dataclasses, RGPT4DConfig, presets
smoke/tiny/small/paper), frames (frame preprocessing), attention (backend checks), l4p (L4P's
checkpoint layout), teacher (VideoMAE + DPT-like heads; the L4P teacher), regional_encoder
(RegionalEncoder4D), pretrained (SigLIP / Qwen2 towers, tokenizers, the NVILA layout), student
(SigLIP -> fused TPE prologue -> projector -> Qwen2, region tokens), p4d (D_4DP and the training
model), loaders (students from pretrained parts or an NVILA folder; docs/checkpoints.md).
Training, the teacher cache and batch collation are in rgpt4d.train.

Names are imported lazily so that `import rgpt4d.models` does not import transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegionalEncoder4D": "regional_encoder",
    "RegionalEncoderConfig": "regional_encoder",
    "TeacherConfig": "configs",
    "P4DConfig": "configs",
    "RGPT4DConfig": "configs",
    "get_preset": "configs",
    "student_config": "configs",
    "PRESETS": "configs",
    "train_tokenizer": "tokenizer",
    "encode_batch": "tokenizer",
    "Teacher4D": "teacher",
    "DPTHead": "teacher",
    "RGPT4DForConditionalGeneration": "student",
    "build_student": "student",
    "P4DDecoder": "p4d",
    "RGPT4DForP4DTraining": "p4d",
    "resample_to_teacher_grid": "p4d",
    "load_parts": "loaders",
    "load_nvila": "loaders",
    "prepare_tokenizer": "pretrained",
    "AttentionBackendError": "attention",
    "check_attn_implementation": "attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rgpt4d.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rgpt4d.models' has no attribute {name!r}")
