"""The shared loop on a toy model (milliseconds): exact resume across epoch boundaries with
accumulation and dropout (data position + RNG), the data order, epochs -> steps."""

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from rgpt4d.train import train_config
from rgpt4d.train.loop import run_loop

N_ITEMS = 10


class Toy(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N_ITEMS, 6, generator=g), torch.randn(N_ITEMS, 2, generator=g)

    def __len__(self):
        return N_ITEMS

    def __getitem__(self, i):
        return {"i": i, "x": self.x[i], "y": self.y[i]}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _train(out, seen, resume=False, stop_at_step=None, model=None, **overrides):
    cfg = train_config("smoke", **{"steps": 7, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup": 2,
                                   **overrides})
    model = model or _model()

    def loss_fn(m, batch):
        seen.extend(batch["i"].tolist())
        loss = nn.functional.mse_loss(m(batch["x"]), batch["y"])
        return loss, {"mse": loss.detach()}, len(batch["i"])

    res = run_loop(model, Toy(), default_collate, loss_fn, cfg, out, lr=cfg.lr, resume=resume, progress=False,
                   stop_at_step=stop_at_step, log=None)
    return model, res


@pytest.mark.parametrize("stop", [2, 3, 5])  # 2 steps per epoch: 2 and 4 end an epoch, 3 and 5 are inside one
def test_resume_across_epochs_is_exact(tmp_path, stop):
    full_seen, part_seen = [], []
    full, res = _train(tmp_path / "full", full_seen)
    assert res.steps == 7 and len(full_seen) == 7 * 4
    _train(tmp_path / "part", part_seen, stop_at_step=stop)
    # a new process would start from a fresh model and another RNG state: both come from the checkpoint
    torch.manual_seed(1234)
    resumed, res = _train(tmp_path / "part", part_seen, resume=True, model=nn.Sequential(
        nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 2)))
    assert res.resumed_from == stop and res.steps == 7
    assert part_seen == full_seen  # the same items in the same order
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_epochs_data_order_and_steps(tmp_path):
    seen = []
    _, res = _train(tmp_path, seen, steps=0, epochs=2.0)
    assert res.steps == 4  # 10 items, global batch 4: 2 full steps per epoch (the last 2 items wait)
    first, second = seen[:8], seen[8:]
    assert len(set(first)) == 8 and len(set(second)) == 8 and first != second  # a new permutation per epoch
