"""Teacher training on the shared loop: outputs, and exact resume (1 + resume + 1 == 2 steps)."""

import json

import torch
from safetensors.torch import load_file

from rgpt4d.train import train_config, train_teacher


def test_teacher_outputs_and_exact_resume(smoke_data, smoke_teacher_cache, tmp_path):
    ref_dir = smoke_teacher_cache[0]  # 2 steps of batch 2 (conftest)
    res = json.loads((ref_dir / "teacher_metrics.json").read_text())
    assert res["steps"] == 2 and res["teacher_path"] == str(ref_dir)
    for key in ("depth_absrel", "depth_absrel_mean_baseline", "flow_epe", "flow_epe_zero_baseline", "motion_iou"):
        assert res["metrics"][key] >= 0
    rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 and "depth" in r for r in rows)

    cfg = train_config("smoke", teacher_steps=2, teacher_batch_size=2)
    first = train_teacher(cfg, smoke_data, tmp_path, stop_at_step=1, progress=False, log=None)
    assert first["steps"] == 1 and first["teacher_path"] is None and first["metrics"] is None
    second = train_teacher(cfg, smoke_data, tmp_path, resume=True, progress=False, log=None)
    assert second["resumed_from"] == 1 and second["steps"] == 2
    ref, got = load_file(str(ref_dir / "teacher.safetensors")), load_file(str(tmp_path / "teacher.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
