"""Student training through the real loop (smoke preset): exact resume, corrupt-checkpoint
fallback, --ops fused vs eager, gradient accumulation, clipping, outputs, p4d/tpe modes."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from rgpt4d.train import CheckpointError, CheckpointManager, train_config, train_student

STEPS = 4


def _run(out, data, cache, resume=False, stop_at_step=None, **overrides):
    cfg = train_config("smoke", **{"steps": STEPS, "batch_size": 4, "warmup": 2, **overrides})
    return train_student(cfg, data, cache, out, resume=resume, progress=False, stop_at_step=stop_at_step, log=None)


def _final_state(out):
    path = CheckpointManager(str(out / "checkpoints")).latest_valid()
    return load_file(os.path.join(path, "model.safetensors"))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(smoke_data, smoke_teacher_cache, tmp_path_factory):
    """An uninterrupted 4-step run (p4d both, global batch 4, one micro-batch)."""
    out = tmp_path_factory.mktemp("reference")
    res = _run(out, smoke_data, smoke_teacher_cache[1])
    return out, res


def test_outputs_and_loss_terms(reference):
    from rgpt4d.infer import RGPT4D
    from rgpt4d.train import TrainConfig

    out, res = reference
    assert res["steps"] == STEPS and res["model_path"] == str(out / "model")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("step", "lr", "loss", "loss_sft", "loss_ld", "loss_ed", "tokens_per_s", "seconds", "grad_norm"):
            assert key in r and math.isfinite(r[key])
        assert r["tokens_per_s"] > 0 and r["loss_ld"] > 0 and r["loss_ed"] > 0
        # the paper preset: L = L_SFT + 0.5 L_LD + 0.1 L_ED
        assert r["loss"] == pytest.approx(r["loss_sft"] + 0.5 * r["loss_ld"] + 0.1 * r["loss_ed"], rel=1e-5)
    # two warmup steps, then the cosine from lr (step 3) to 0 (after the last step)
    base = train_config("smoke").lr
    assert [r["lr"] for r in rows] == pytest.approx([base / 2, base, base, base / 2])
    cfg = TrainConfig.load(out / "config.json")
    assert cfg == train_config("smoke", steps=STEPS, batch_size=4, warmup=2)
    # the resolved config is saved with each checkpoint too
    ck = CheckpointManager(str(out / "checkpoints")).latest_valid()
    assert json.loads(open(os.path.join(ck, "trainer.json")).read())["metadata"]["config"] == cfg.to_dict()
    assert TrainConfig.load(os.path.join(ck, "config.json")) == cfg
    assert "config.json" in json.loads(open(os.path.join(ck, "manifest.json")).read())["files"]
    # the saved model is the bare student: no D_4DP, no teacher heads
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert not any("decoder" in k or "teacher" in k for k in saved)
    m = RGPT4D.from_pretrained(out / "model")
    trained = _final_state(out)
    for k, v in m.model.state_dict().items():
        assert torch.equal(v, trained["student." + k]), k


def test_exact_resume(reference, smoke_data, smoke_teacher_cache, tmp_path):
    ref_out, _ = reference
    first = _run(tmp_path, smoke_data, smoke_teacher_cache[1], stop_at_step=STEPS // 2)
    assert first["steps"] == STEPS // 2 and first["model_path"] is None
    second = _run(tmp_path, smoke_data, smoke_teacher_cache[1], resume=True)
    assert second["resumed_from"] == STEPS // 2 and second["steps"] == STEPS
    ref, got = _final_state(ref_out), _final_state(tmp_path)
    assert ref.keys() == got.keys()
    for k in ref:  # bit-for-bit on CPU
        assert torch.equal(ref[k], got[k]), k
    assert [r["loss"] for r in _metrics(tmp_path)] == [r["loss"] for r in _metrics(ref_out)]


def test_corrupt_checkpoint_falls_back_to_previous(reference, smoke_data, smoke_teacher_cache, tmp_path):
    _run(tmp_path, smoke_data, smoke_teacher_cache[1], stop_at_step=3, ckpt_every=1)
    ckpts = CheckpointManager(str(tmp_path / "checkpoints")).checkpoints()
    assert [s for s, _ in ckpts] == [1, 2, 3]
    with open(os.path.join(ckpts[-1][1], "model.safetensors"), "r+b") as f:  # a crash mid-write
        f.truncate(100)
    with pytest.warns(RuntimeWarning, match="step-00000003.*truncated"):
        res = _run(tmp_path, smoke_data, smoke_teacher_cache[1], resume=True, ckpt_every=1)
    assert res["resumed_from"] == 2 and res["steps"] == STEPS
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]  # step 3's old line was dropped
    ref = _final_state(reference[0])
    got = _final_state(tmp_path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # nothing valid left: a clear error, not a silent restart from scratch
    for _, path in CheckpointManager(str(tmp_path / "checkpoints")).checkpoints():
        os.remove(os.path.join(path, "manifest.json"))
    with pytest.warns(RuntimeWarning, match="incomplete"), pytest.raises(CheckpointError, match="no valid checkpoint"):
        _run(tmp_path, smoke_data, smoke_teacher_cache[1], resume=True)


def test_gradient_accumulation_matches_full_batch(smoke_data, smoke_teacher_cache, tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 (same samples; with the letter answer format every sample
    has the same number of answer tokens and P4D elements, so the mean of the two means is the full
    mean; with answers of different lengths it is the mean of the micro-batch token means)."""
    _run(tmp_path / "full", smoke_data, smoke_teacher_cache[1], answer_format="letter")
    _run(tmp_path / "accum", smoke_data, smoke_teacher_cache[1], answer_format="letter", grad_accum=2)
    ref_rows, rows = _metrics(tmp_path / "full"), _metrics(tmp_path / "accum")
    for a, b in zip(ref_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    ref, got = _final_state(tmp_path / "full"), _final_state(tmp_path / "accum")
    worst = max(float((ref[k].float() - got[k].float()).abs().max()) for k in ref)
    print(f"accumulation 2x2 vs 4: max |param diff| after {STEPS} steps {worst:.2e}")
    assert worst < 1e-4, worst


def test_ops_fused_and_eager_agree(reference, smoke_data, smoke_teacher_cache, tmp_path, monkeypatch):
    from rgpt4d.ops import registry

    used = []
    select = registry.Op.select

    def spy(op, device, backend=None):
        be = select(op, device, backend)
        used.append((op.api, be))
        return be

    monkeypatch.setattr(registry.Op, "select", spy)
    _run(tmp_path, smoke_data, smoke_teacher_cache[1], ops="eager")
    ops = {op for op, _ in used}
    assert {"tpe_downsample_layernorm", "p4d_loss"} <= ops, ops
    assert {be for _, be in used} == {"eager"}
    used.clear()
    _run(tmp_path / "fused", smoke_data, smoke_teacher_cache[1], ops="fused", steps=1)
    assert {be for _, be in used} == {"cpu"}  # the compiled kernels on CPU tensors
    ref_rows, rows = _metrics(reference[0]), _metrics(tmp_path)
    rel = max(abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(ref_rows, rows) for k in ("loss", "loss_ld", "loss_ed"))
    print(f"ops eager vs fused: max relative loss difference over {STEPS} steps {rel:.2e}")
    for a, b in zip(ref_rows, rows):
        for key in ("loss", "loss_sft", "loss_ld", "loss_ed"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_clipping_is_applied(smoke_data, smoke_teacher_cache, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    _run(tmp_path, smoke_data, smoke_teacher_cache[1], steps=2, max_grad_norm=0.01)
    logged = [r["grad_norm"] for r in _metrics(tmp_path)]
    assert len(seen) == 2 and all(n > 0.01 for n in logged)  # the norm before clipping
    assert all(n <= 0.01 * (1 + 1e-4) for n in seen)  # what the optimizer saw


def test_p4d_modes_and_tpe(smoke_data, smoke_teacher_cache, tmp_path):
    from rgpt4d.models.configs import RGPT4DConfig

    # no distillation needs no teacher at all
    res = train_student(train_config("smoke", steps=1, p4d="none", tpe=False), smoke_data, None, tmp_path / "none",
                        progress=False, log=None)
    assert res["loss"] == pytest.approx(res["loss_sft"]) and res["loss_ld"] == 0 and res["loss_ed"] == 0
    assert RGPT4DConfig.from_pretrained(res["model_path"]).tpe is False
    # latent only (the fused linear + loss path)
    res = _run(tmp_path / "latent", smoke_data, smoke_teacher_cache[1], steps=1, p4d="latent")
    assert res["loss_ld"] > 0 and res["loss_ed"] == 0
    assert res["loss"] == pytest.approx(res["loss_sft"] + 0.5 * res["loss_ld"], rel=1e-5)
    with pytest.raises(ValueError, match="teacher_cache"):
        train_student(train_config("smoke", p4d="explicit"), smoke_data, None, tmp_path / "x", progress=False, log=None)
    with pytest.raises(ValueError, match=r"have 4 frames but the 'tiny' student takes 16; make the data with "
                                         r"`rgpt4d data make --frames 16`"):
        train_student(train_config("tiny", p4d="none"), smoke_data, None, tmp_path / "y", progress=False, log=None)


def test_progress_bar_and_nvtx_ranges(smoke_data, smoke_teacher_cache, tmp_path, monkeypatch, capsys):
    import contextlib

    import rgpt4d.train.loop as loop

    events = []

    class Recorder:
        @staticmethod
        @contextlib.contextmanager
        def annotate(name, domain=None):
            events.append(("push", name))
            yield
            events.append(("pop", name))

        @staticmethod
        def push_range(name, domain=None):
            events.append(("push", name))

        @staticmethod
        def pop_range(domain=None):
            events.append(("pop", None))

    monkeypatch.setattr(loop, "_nvtx", Recorder)
    cfg = train_config("smoke", steps=1, batch_size=4)
    train_student(cfg, smoke_data, smoke_teacher_cache[1], tmp_path, progress=True, log=None)
    names = {n for kind, n in events if kind == "push"}
    assert {"data", "forward", "backward", "optimizer", "checkpoint", "vision", "projector", "llm", "p4d_decoder",
            "p4d_loss"} <= names, names
    depth = 0
    for kind, _ in events:  # balanced
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0
    err = capsys.readouterr().err
    assert "student" in err and "tok/s" in err and "loss_sft" in err


def test_multi_turn_sequences_with_the_option_format(smoke_data, smoke_teacher_cache, tmp_path):
    """questions_per_sequence > 1 trains on QuestionsByVideo chunks (several questions of one video in
    one sequence); answer_format="option" is saved with the model and read by likelihood."""
    from rgpt4d.data import QuestionsByVideo, Synth4DQuestions
    from rgpt4d.models.configs import RGPT4DConfig
    from rgpt4d.train import evaluate_student

    res = _run(tmp_path / "mt", smoke_data, smoke_teacher_cache[1], steps=2, batch_size=2, answer_format="option",
               questions_per_sequence=4)
    rows = _metrics(tmp_path / "mt")
    assert len(rows) == 2 and all(math.isfinite(r["loss_sft"]) and r["loss_ld"] > 0 for r in rows)
    assert RGPT4DConfig.from_pretrained(res["model_path"]).answer_format == "option"
    chunks = QuestionsByVideo(Synth4DQuestions(smoke_data, "train"), 4)
    assert max(len(c) for c in chunks.chunks) > 1  # the run really packed several questions per sequence
    rep = evaluate_student(res["model_path"], smoke_data, "test")
    assert rep["scoring"] == "likelihood" and rep["counts"]["Avg"] > 0 and rep["unparseable"] == 0
    with pytest.raises(ValueError, match="TrainConfig.questions_per_sequence: must be an integer >= 1"):
        train_config("smoke", questions_per_sequence=0)
    with pytest.raises(ValueError, match="TrainConfig.answer_format: must be one of"):
        train_config("smoke", answer_format="value")


def test_restate_option_sets_the_student_prompt():
    """TrainConfig.restate (CLI --restate): auto keeps the preset's (regions after <|assistant|> in
    the from-scratch presets), off / line / answer override it in the student's config."""
    from rgpt4d.models.tokenizer import train_tokenizer
    from rgpt4d.train.student import build_training_model

    tok = train_tokenizer()
    modes = {}
    for restate in ("auto", "off", "line", "answer"):
        model = build_training_model(train_config("smoke", p4d="none", restate=restate), tok, None)
        modes[restate] = model.student.config.restate_mode()
    assert modes == {"auto": "answer", "off": False, "line": "line", "answer": "answer"}
    with pytest.raises(ValueError, match="restate"):
        train_config("smoke", restate="after")
