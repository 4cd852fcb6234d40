"""Training utilities: checkpoints that never lose work (checkpoint.py)."""

from rgpt4d.train.checkpoint import CheckpointError, CheckpointManager, TrainState

__all__ = ["CheckpointError", "CheckpointManager", "TrainState"]
