"""`--strategy fsdp` (FSDP2, rgpt4d.train.fsdp) with 2 CPU processes (gloo) under torchrun.

- The same run as DDP: the same data order, the same gradients (FSDP's reduce-scatter averages what
  DDP's all-reduce averages; only the order of float additions differs), so the logged losses agree
  to fp32 rounding (rel 1e-5) and the trained weights to 1e-5. Two micro-batches per step exercise the
  gradient accumulation without synchronisation on both sides.
- Kill and resume: a run killed (SIGKILL to the launcher and both workers) after its step-2 sharded
  checkpoint and resumed with --resume ends with bitwise the weights and losses of the uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rgpt4d.train import CheckpointManager
from rgpt4d.train.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _cmd(data, cache, out, strategy, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "rgpt4d.train", "student", "--data", str(data), "--teacher-cache", str(cache), "--out", str(out),
            "--preset", "smoke", "--steps", str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--warmup", "1",
            "--device", "cpu", "--answer-format", "letter", "--ckpt-every", "2", "--keep-last", "5",
            "--strategy", strategy, "--quiet", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _children(pid):
    """The ids of the processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def fsdp_run(smoke_data, smoke_teacher_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _run(_cmd(smoke_data, smoke_teacher_cache[1], out, "fsdp"))
    return out


def test_fsdp_matches_ddp(fsdp_run, smoke_data, smoke_teacher_cache, tmp_path):
    ddp = tmp_path / "ddp"
    _run(_cmd(smoke_data, smoke_teacher_cache[1], ddp, "ddp"))
    rows, ref = _rows(fsdp_run), _rows(ddp)
    assert len(rows) == len(ref) == STEPS
    for a, b in zip(ref, rows):
        for key in ("loss", "loss_sft", "loss_ld", "loss_ed", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # the inference model: one save_pretrained folder gathered from the shards
    res = json.loads((fsdp_run / "results.json").read_text())
    assert res["steps"] == STEPS and Path(res["model_path"]).name == "model"
    got = load_file(str(fsdp_run / "model" / "model.safetensors"))
    want = load_file(str(ddp / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    first = _rows(ddp)[0]
    print(f"FSDP vs DDP: max |weight diff| {worst:.2e}; step-1 loss {first['loss']:.6f}")
    assert worst < 1e-5
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    loaded = RGPT4DForConditionalGeneration.from_pretrained(fsdp_run / "model")
    for k, v in loaded.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k]), k


def test_sharded_checkpoint_layout(fsdp_run):
    ckpts = CheckpointManager(str(fsdp_run / "checkpoints"))
    path = ckpts.latest_valid()
    assert path.endswith(f"step-{STEPS:08d}")
    manifest = CheckpointManager.verify(path)
    files = set(manifest["files"])
    # each process wrote its own shard file and RNG state; rank 0 the DCP metadata and trainer.json
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng-0.safetensors", "rng-1.safetensors",
            "trainer.json", "config.json"} <= files
    assert "model.safetensors" not in files
    trainer = json.loads(Path(path, "trainer.json").read_text())
    assert trainer["sharded"] and trainer["world"] == 2
    # a sharded checkpoint is not loaded as an unsharded one: the error says which strategy wrote it
    with pytest.raises(CheckpointError, match="sharded .*--strategy fsdp"):
        ckpts.load(path, torch.nn.Linear(1, 1))


def test_fsdp_kill_and_resume_exact(fsdp_run, smoke_data, smoke_teacher_cache, tmp_path):
    out = tmp_path / "killed"
    cmd = _cmd(smoke_data, smoke_teacher_cache[1], out, "fsdp")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "checkpoints" / "step-00000002" / "manifest.json"
    try:
        deadline = time.time() + 400
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        # the workers first (torchrun starts each in a session of its own), then the launcher
        for pid in _children(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (out / "results.json").exists(), "the run finished before it was killed"
    _run(cmd + ["--resume"])
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] is not None and res["resumed_from"] < STEPS and res["steps"] == STEPS
    print(f"killed after step {res['resumed_from']}'s checkpoint; resumed to step {STEPS}")
    rows, ref = _rows(out), _rows(fsdp_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref, rows):
        for key in ("loss", "loss_sft", "loss_ld", "loss_ed", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    got = load_file(str(out / "model" / "model.safetensors"))
    want = load_file(str(fsdp_run / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_strategy_option():
    from rgpt4d.train import train_config

    assert train_config("smoke").strategy == "ddp"
    assert train_config("smoke", strategy="fsdp").strategy == "fsdp"
    with pytest.raises(ValueError, match="TrainConfig.strategy: must be one of"):
        train_config("smoke", strategy="zero3")
