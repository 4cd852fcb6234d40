"""Training: the shared loop (loop.py), teacher and student training, evaluation, checkpoints.

    from rgpt4d.train import TrainConfig, train_config, train_teacher, train_student, evaluate_student

See docs/training.md for the API, the CLI (`rgpt4d train teacher|student`, `rgpt4d eval`) and
distributed runs (`torchrun --nproc_per_node=K -m rgpt4d.train ...`).
"""

from rgpt4d.train.checkpoint import CheckpointError, CheckpointManager, TrainState
from rgpt4d.train.config import P4D_MODES, TRAIN_PRESETS, TrainConfig, train_config
from rgpt4d.train.student import evaluate_student, train_student
from rgpt4d.train.teacher import train_teacher

__all__ = ["CheckpointError", "CheckpointManager", "TrainState", "TrainConfig", "train_config", "TRAIN_PRESETS",
           "P4D_MODES", "train_teacher", "train_student", "evaluate_student"]
