"""Checkpoints: exact resume, atomic writes, keep-last-k, corrupt/truncated fallbacks."""

import math
import os

import pytest
import torch
from torch import nn

from rgpt4d.train import CheckpointError, CheckpointManager, TrainState

DATA = torch.randn(64, 8)
TARGET = torch.randn(64, 3)
BATCH = 4


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    warmup, total = 3, 40
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / total)))
    return model, opt, sched


def batches(pos):
    """Deterministic data order from the position alone: (epoch, index) -> batch."""
    epoch, index = pos["epoch"], pos["index"]
    while True:
        order = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(1000 + epoch))
        while index + BATCH <= len(DATA):
            idx = order[index:index + BATCH]
            index += BATCH
            yield idx, {"epoch": epoch, "index": index}
        epoch, index = epoch + 1, 0


def train(model, opt, sched, steps, pos):
    it = batches(pos)
    for _ in range(steps):
        idx, pos = next(it)
        loss = nn.functional.mse_loss(model(DATA[idx]), TARGET[idx])  # dropout draws from the torch RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return pos


def test_n_steps_resume_n_steps_equals_2n_steps(tmp_path):
    n = 11  # crosses an epoch boundary (16 batches per epoch) after the resume
    torch.manual_seed(123)
    ref_model, ref_opt, ref_sched = make()
    torch.manual_seed(7)
    train(ref_model, ref_opt, ref_sched, 2 * n, {"epoch": 0, "index": 0})

    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    model, opt, sched = make()
    torch.manual_seed(7)
    pos = train(model, opt, sched, n, {"epoch": 0, "index": 0})
    mgr.save(model, opt, sched, TrainState(step=n, data_position=pos, metadata={"preset": "toy"}))
    torch.manual_seed(999)  # whatever happens in between must not matter
    torch.randn(100)

    model2, opt2, sched2 = make(seed=5)  # different init: the checkpoint must overwrite it
    state = mgr.load_latest(model2, opt2, sched2)
    assert state.step == n and state.metadata == {"preset": "toy"}
    train(model2, opt2, sched2, n, state.data_position)
    for (name, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert sched2.get_last_lr() == ref_sched.get_last_lr()


def test_keep_last_k(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    model, opt, sched = make()
    for step in (1, 2, 3, 4, 5):
        mgr.save(model, opt, sched, TrainState(step=step))
    assert [s for s, _ in mgr.checkpoints()] == [4, 5]


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import rgpt4d.train.checkpoint as ck

    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    model, opt, sched = make()
    mgr.save(model, opt, sched, TrainState(step=1))
    real = ck.save_file

    def crash(tensors, path, *a, **k):
        if path.endswith("optimizer.safetensors"):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("simulated crash mid-write")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(model, opt, sched, TrainState(step=2))
    monkeypatch.setattr(ck, "save_file", real)
    assert [s for s, _ in mgr.checkpoints()] == [1]  # the partial write is not a checkpoint
    assert any(".tmp-" in n for n in os.listdir(tmp_path))
    assert mgr.load_latest(*make(seed=3)).step == 1
    mgr.save(model, opt, sched, TrainState(step=2))
    assert not any(".tmp-" in n for n in os.listdir(tmp_path))  # cleaned by the next save


@pytest.mark.parametrize("damage,message", [("truncate", "truncated"), ("flip", "sha256 mismatch"),
                                            ("manifest", "no manifest.json")])
def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, damage, message):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    model, opt, sched = make()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.save(model, opt, sched, TrainState(step=1))
    train(model, opt, sched, 3, {"epoch": 0, "index": 0})
    newest = mgr.save(model, opt, sched, TrainState(step=2))
    target = os.path.join(newest, "model.safetensors")
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    elif damage == "flip":
        with open(target, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            b = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.remove(os.path.join(newest, "manifest.json"))
    with pytest.raises(CheckpointError, match=message):
        mgr.load(newest, *make(seed=3))
    fresh = make(seed=3)
    with pytest.warns(RuntimeWarning, match=message):
        state = mgr.load_latest(*fresh)
    assert state.step == 1
    for k, v in fresh[0].state_dict().items():
        assert torch.equal(v, first[k])


def test_checkpoint_for_another_model_is_a_clear_error(tmp_path):
    mgr = CheckpointManager(str(tmp_path))
    model, opt, sched = make()
    path = mgr.save(model, opt, sched, TrainState(step=1))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        mgr.load(path, nn.Linear(8, 3))


def test_no_checkpoint_yet(tmp_path):
    assert CheckpointManager(str(tmp_path / "none")).load_latest(*make()) is None
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(str(tmp_path), keep_last=0)
