"""Training students loaded from pretrained weights: P4D on an NVILA student, and `rgpt4d train student`
with `--vision/--llm/--tokenizer` and `--init-from nvila:PATH` (tiny checkpoints from test_loaders)."""

import json

import pytest
import torch

from tests.models.conftest import teacher_config
from tests.models.test_loaders import QUESTION, _tokenizer, _towers, write_nvila


@pytest.fixture(scope="module")
def nvila_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila_train")
    write_nvila(root, frames=4)
    return root


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts_train")
    tok = _tokenizer()
    vision, llm = _towers(len(tok))
    vision.save_pretrained(root / "vision")
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")  # the tokenizer next to the LLM, as Qwen2's folders have it
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rgpt4d.cli import main

    out = tmp_path_factory.mktemp("data")
    assert main(["data", "make", "--out", str(out), "--num-videos", "12", "--frames", "4", "--size", "32",
                 "--workers", "1", "--min-objects", "2", "--max-objects", "4", "--overwrite", "--quiet"]) == 0
    return out


def test_p4d_trains_an_nvila_student(nvila_dir):
    from rgpt4d.models.configs import P4DConfig
    from rgpt4d.models.p4d import RGPT4DForP4DTraining
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.teacher import Teacher4D
    from rgpt4d.models.tokenizer import encode_batch

    student = RGPT4DForConditionalGeneration.from_nvila(nvila_dir)
    tok = student.tokenizer
    torch.manual_seed(0)
    teacher = Teacher4D(teacher_config()).freeze()
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(hidden_size=32))
    letter = tok.encode("B", add_special_tokens=False) + [tok.eos_token_id]
    enc = encode_batch(tok, [QUESTION] * 2, student.config.prompt_visual(), [letter, letter])
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        o = teacher(frames)
    targets = {"latent": o.latent, "layers": torch.stack(o.layers, 1), "depth": o.depth, "flow": o.flow,
               "motion": o.motion}
    out = model(**enc, frames=frames, timestamps=torch.tensor([[0.0, 0.3, 0.6, 0.9]] * 2), som_image=frames[:, 0],
                teacher_targets=targets)
    assert torch.isfinite(out.loss) and out.p4d_loss > 0
    out.loss.backward()
    assert student.projector.linear_3.weight.grad.abs().sum() > 0  # NVILA's last Linear trains
    assert student.language_model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.vision_tower.parameters())


@pytest.mark.parametrize("init", ["parts", "nvila"])
def test_train_student_cli_from_pretrained(init, data, parts_dir, nvila_dir, tmp_path):
    from rgpt4d.cli import main
    from rgpt4d.infer import RGPT4D

    flags = (["--vision", str(parts_dir / "vision"), "--llm", str(parts_dir / "llm")] if init == "parts"
             else ["--init-from", f"nvila:{nvila_dir}"])
    out = tmp_path / "run"
    rc = main(["train", "student", "--data", str(data), "--out", str(out), "--preset", "smoke", "--p4d", "none",
               "--steps", "2", "--batch-size", "2", "--answer-format", "letter", "--restate", "off", "--quiet",
               *flags])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["init_from"] == ("parts" if init == "parts" else f"nvila:{nvila_dir}")
    model = RGPT4D.from_pretrained(out / "model")
    cfg = model.model.config
    assert cfg.num_frames == 4 and cfg.projector_type == ("mlp" if init == "parts" else "nvila")
    assert model.tokenizer.chat_template  # the pretrained tokenizer, saved with the model
    assert model.answer(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), [0, 0.1, 0.2, 0.3], [[1, 1, 9, 9]],
                        "Is <obj_1> moving?", ["yes", "no"]) in "AB"


def test_init_from_is_checked():
    from rgpt4d.train import train_config

    with pytest.raises(ValueError, match="init_from: must be"):
        train_config("smoke", init_from="hf:x")
    with pytest.raises(ValueError, match="'parts' needs init_vision and init_llm"):
        train_config("smoke", init_from="parts", init_vision="v")
