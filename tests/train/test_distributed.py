"""DDP: `torchrun --nproc_per_node=2 -m rgpt4d.train student ...` (gloo on CPU) gives the same model
as one process on the same global batch.

Why they agree: DistributedSampler hands rank r the items r, r+2, ... of the same epoch
permutation, so one step of the two ranks (2 items each) reads exactly the 4 items the single
process reads; DDP averages the two ranks' gradients, and since every question has the same
number of answer tokens (the letter answer format: one letter and `</s>`) and P4D elements, the
mean of the two per-rank means is the full-batch mean. (With answers of different lengths, the
option format, DDP gives the mean of the per-rank token means, as token-mean losses do under
data parallelism; docs/training.md.) What differs is only the order of float additions. Tolerance: losses rel 1e-5; parameters
after two AdamW steps (lr 2e-3) within 1e-4 absolute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rgpt4d.train import CheckpointManager, train_config, train_student

ROOT = Path(__file__).resolve().parents[2]


def _final(out):
    return load_file(os.path.join(CheckpointManager(str(out / "checkpoints")).latest_valid(), "model.safetensors"))


def test_ddp_two_processes_match_one(smoke_data, smoke_teacher_cache, tmp_path):
    cache = smoke_teacher_cache[1]
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rgpt4d.train", "student", "--data", str(smoke_data), "--teacher-cache", str(cache),
           "--out", str(ddp_out), "--preset", "smoke", "--steps", "2", "--batch-size", "4", "--warmup", "1",
           "--device", "cpu", "--answer-format", "letter", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((ddp_out / "results.json").read_text())
    assert res["steps"] == 2 and res["model_path"]

    single = train_student(train_config("smoke", steps=2, batch_size=4, warmup=1, device="cpu", answer_format="letter"),
                           smoke_data, cache,
                           tmp_path / "single", progress=False, log=None)
    rows = [json.loads(x) for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref_rows) == 2
    for a, b in zip(ref_rows, rows):
        for key in ("loss", "loss_sft", "loss_ld", "loss_ed"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    ref, got = _final(tmp_path / "single"), _final(ddp_out)
    assert ref.keys() == got.keys()
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    # the comparison is between trained models: the updates are far larger than the difference
    from transformers import PreTrainedTokenizerFast

    from rgpt4d.train.student import build_training_model

    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "single" / "tokenizer")
    init = build_training_model(train_config("smoke", answer_format="letter"), tok, cache).state_dict()
    moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
    print(f"DDP vs single process: max |param diff| {worst:.2e}; max |update| {moved:.2e}")
    assert worst < 1e-4 and moved > 100 * worst, (worst, moved)
