"""Training: the shared loop (loop.py), teacher and student training, the teacher cache, evaluation,
checkpoints.

    from rgpt4d.train import TrainConfig, train_config, train_teacher, train_student, evaluate_student

See docs/training.md for the API, the CLI (`rgpt4d train teacher|student`, `rgpt4d eval`) and
distributed runs (`torchrun --nproc_per_node=K -m rgpt4d.train ...`).

Names are imported lazily so that the `rgpt4d` command's parser, which reads rgpt4d.train.cli,
does not import the model stack (transformers' model classes take seconds to import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "CheckpointManager": "checkpoint",
    "TrainState": "checkpoint",
    "TrainConfig": "config",
    "train_config": "config",
    "TRAIN_PRESETS": "config",
    "P4D_MODES": "config",
    "train_student": "student",
    "evaluate_student": "student",
    "train_teacher": "teacher",
    "train_teacher_from_preset": "teacher",
    "evaluate_teacher": "teacher",
    "cache_teacher": "teacher_cache",
    "load_cached": "teacher_cache",
    "batch_to_inputs": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rgpt4d.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rgpt4d.train' has no attribute {name!r}")
