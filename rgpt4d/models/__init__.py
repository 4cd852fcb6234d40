"""4D-RGPT models: the frozen 4D teacher, the student MLLM, P4D heads, tokenizer and presets.

Modules: configs (dataclasses, RGPT4DConfig, presets tiny/small/paper), tokenizer (BPE trained
offline), teacher (VideoMAE + DPT-like heads), teacher_train (train / evaluate / cache), student
(SigLIP -> fused TPE prologue -> projector -> Qwen2, region tokens), p4d (D_4DP and the training
model), attention (backend checks), regional_encoder (RegionalEncoder4D, issue 3), loaders (students from
pretrained SigLIP / Qwen2 parts or an NVILA folder; docs/checkpoints.md), cli (`rgpt4d teacher ...`, `rgpt4d infer`).

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
    "train_teacher": "teacher_train",
    "evaluate_teacher": "teacher_train",
    "cache_teacher": "teacher_train",
    "load_cached": "teacher_train",
    "RGPT4DForConditionalGeneration": "student",
    "build_student": "student",
    "batch_to_inputs": "student",
    "P4DDecoder": "p4d",
    "RGPT4DForP4DTraining": "p4d",
    "resample_to_teacher_grid": "p4d",
    "load_parts": "loaders",
    "load_nvila": "loaders",
    "prepare_tokenizer": "loaders",
    "AttentionBackendError": "attention",
    "check_attn_implementation": "attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rgpt4d.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rgpt4d.models' has no attribute {name!r}")
