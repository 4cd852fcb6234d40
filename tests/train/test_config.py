"""TrainConfig: presets, JSON round-trip, clear errors, the schedule and the data split."""

import math

import pytest

from rgpt4d.train import TrainConfig, train_config
from rgpt4d.train.loop import cosine_schedule, micro_batch_size, steps_per_epoch, total_steps


def test_json_round_trip(tmp_path):
    cfg = train_config("tiny", p4d="latent", tpe=False, ops="eager", grad_accum=2)
    path = cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(path) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['nope'\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "nope": 1})


def test_paper_preset_is_the_papers_recipe():
    cfg = train_config("paper")
    assert (cfg.lr, cfg.warmup, cfg.batch_size, cfg.epochs, cfg.p4d, cfg.loss_preset) == (1e-5, 0.03, 1024, 5.0,
                                                                                           "both", "paper")
    # 5 epochs of 10000 items at global batch 1024 over 8 processes x 16 micro-batches of 8
    assert micro_batch_size(cfg, 8) == 8
    assert total_steps(10000, cfg, 8) == 5 * (math.ceil(10000 / 8) // (8 * 16))


@pytest.mark.parametrize("field, value, match", [
    ("p4d", "all", r"TrainConfig.p4d: must be one of \['none', 'latent', 'explicit', 'both'\], got 'all'"),
    ("ops", "fast", r"TrainConfig.ops: must be one of \['fused', 'eager'\]"),
    ("preset", "huge", r"TrainConfig.preset"),
    ("batch_size", 0, r"TrainConfig.batch_size: must be an integer >= 1, got 0"),
    ("grad_accum", 3, r"TrainConfig.batch_size: 4 is not divisible by grad_accum 3"),
    ("lr", 0.0, r"TrainConfig.lr: must be > 0"),
    ("warmup", -1, r"TrainConfig.warmup"),
    ("steps", 0, r"TrainConfig.steps: 0 means 'derive from epochs'"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"batch_size": 4, field: value})


def test_batch_split_errors():
    cfg = train_config("smoke", batch_size=4)
    with pytest.raises(ValueError, match=r"global batch 4 must be divisible by grad_accum \(1\) x processes \(3\)"):
        micro_batch_size(cfg, 3)
    with pytest.raises(ValueError, match="larger than the 3 training items"):
        steps_per_epoch(3, cfg, 1)


def test_warmup_then_cosine():
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=4, min_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
