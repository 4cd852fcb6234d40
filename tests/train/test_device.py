"""resolve_device makes the rank's GPU current (torchrun: LOCAL_RANK)."""

import torch

from rgpt4d.train.config import TrainConfig
from rgpt4d.train.loop import resolve_device


def test_cuda_device_of_the_local_rank_is_made_current(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(TrainConfig(device="cuda")) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]


def test_cpu_leaves_the_current_device_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: (_ for _ in ()).throw(AssertionError("set_device")))
    assert resolve_device(TrainConfig(device="cpu")) == torch.device("cpu")
