"""Kernel swaps for a transformers MLLM's language model (placeholder: the implementation lives on
its own branch)."""

from torch import nn


def apply_kernels(model: nn.Module) -> None:
    raise NotImplementedError("rgpt4d.integrations.kernels.apply_kernels is not in this build")


def remove_kernels(model: nn.Module) -> None:
    raise NotImplementedError("rgpt4d.integrations.kernels.remove_kernels is not in this build")
