"""Attention backends (clear errors where they cannot run), the inference API and the infer CLI,
configs and presets."""

import sys
import types

import numpy as np
import pytest
import torch

from rgpt4d.models.attention import AttentionBackendError, check_attn_implementation
from tests.models.conftest import T, make_batch, make_student


def test_sdpa_is_the_default(student):
    assert student.config.attn_implementation_name == "sdpa"
    assert student.language_model.config._attn_implementation == "sdpa"
    check_attn_implementation("sdpa")
    check_attn_implementation("eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize("name,package", [("flash_attention_2", "flash_attn"), ("xformers", "xformers")])
def test_gpu_backends_not_installed(name, package, monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as when it is not installed
    with pytest.raises(AttentionBackendError, match=f"needs the '{package}' package, which is not installed"):
        check_attn_implementation(name)
    with pytest.raises(AttentionBackendError, match=name):
        make_student(tokenizer, attn_implementation_name=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize("name,package", [("flash_attention_2", "flash_attn"), ("xformers", "xformers")])
def test_gpu_backends_installed_on_cpu(name, package, monkeypatch, tokenizer):
    # an importable package (a stand-in where the real one is absent: the check never calls it on CPU)
    try:
        __import__(package)
    except ImportError:
        monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    with pytest.raises(AttentionBackendError, match=f"{package} is installed but has no kernel on CPU"):
        check_attn_implementation(name)
    with pytest.raises(AttentionBackendError, match="no kernel on CPU"):
        make_student(tokenizer, attn_implementation_name=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_real_xformers_on_cpu_has_no_kernel_and_we_say_so(tokenizer):
    """xformers is installed by requirements.txt (a real install, not a stand-in): its own CPU call
    fails, and asking the student for it fails earlier with our error."""
    xops = pytest.importorskip("xformers.ops", reason="xformers is not installed (requirements.txt installs it)")
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(NotImplementedError, match="device=cpu"):
        xops.memory_efficient_attention(q, q, q)
    with pytest.raises(AttentionBackendError, match="xformers is installed but has no kernel on CPU"):
        make_student(tokenizer, attn_implementation_name="xformers")


def test_unknown_backend():
    with pytest.raises(AttentionBackendError, match="unknown 'flash3'"):
        check_attn_implementation("flash3")


def test_presets_configs_only():
    from rgpt4d.models.configs import get_preset, student_config

    paper = student_config("paper")
    assert paper.vision_config["hidden_size"] == 1152 and paper.text_config["hidden_size"] == 3584
    assert paper.downsample_window == 3 and paper.projector_hidden_size == 3456  # NVILA's (test_loaders)
    assert paper.patch_grid == 32 and paper.tokens_per_image == 121 and paper.num_frames == 16
    assert get_preset("paper").p4d.hidden_size == 2560
    tiny = student_config("tiny")
    assert tiny.tokens_per_image == 9 and tiny.region_mode == "tokens"
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("huge")
    with pytest.raises(ValueError, match="region_mode"):
        student_config("tiny", region_mode="boxes")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    from rgpt4d.infer import save_inference_model

    path = tmp_path_factory.mktemp("student")
    save_inference_model(make_student(tokenizer), tokenizer, path)
    return path


def test_answer_returns_a_letter(saved, tokenizer):
    from rgpt4d.infer import RGPT4D

    model = RGPT4D.from_pretrained(saved)
    video = np.random.default_rng(0).integers(0, 255, (T, 40, 40, 3), dtype=np.uint8)  # [T, H, W, 3]
    letter = model.answer(video, [0.0, 0.5, 1.0, 2.0], [[1, 1, 20, 20], [5, 5, 30, 39]],
                          "Which is taller, <obj_1> or <obj_2>?", ["<obj_1>", "<obj_2>", "same"])
    assert letter in ("A", "B", "C")
    many = model.answer_batch([dict(video=video, timestamps=[0.0, 0.5, 1.0, 2.0], regions=[[1, 1, 20, 20]],
                                    question=f"How tall is <obj_1>? {i}", options=["1 m", "2 m", "3 m", "4 m"])
                               for i in range(5)], batch_size=2, progress=False)
    assert len(many) == 5 and set(many) <= set("ABCD")
    with pytest.raises(ValueError, match="timestamps: must be strictly increasing"):
        model.answer(video, [0.0, 0.5, 0.5, 2.0], [], "q", ["a", "b"])
    with pytest.raises(ValueError, match="input_ids: sample 0 refers to <obj_2>"):
        model.answer(video, [0.0, 0.5, 1.0, 2.0], [[1, 1, 20, 20]], "Is <obj_2> here?", ["a", "b"])


def test_infer_cli(saved, tmp_path, capsys):
    from rgpt4d.cli import main

    video = np.random.default_rng(0).integers(0, 255, (T, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", video)
    rc = main(["infer", "--model", str(saved), "--video", str(tmp_path / "v.npy"), "--timestamps", "0,0.1,0.2,0.4",
               "--boxes", "1,1,10,10;2,2,30,30", "--question", "How tall is <obj_2>?", "--options", "1 m", "2 m"])
    assert rc == 0
    assert capsys.readouterr().out.strip() in ("A", "B")
    rc = main(["infer", "--model", str(saved), "--video", str(tmp_path / "v.npy"), "--boxes", "1,1,10,10",
               "--question", "q", "--options", "a", "b"])
    assert rc == 2 and "--timestamps" in capsys.readouterr().err
    rc = main(["infer", "--model", str(saved), "--video", str(tmp_path / "v.npy"), "--fps", "4",
               "--boxes", "1,1,99,10", "--question", "q <obj_1>", "--options", "a", "b"])
    assert rc == 2 and "boxes: region 1 of sample 0" in capsys.readouterr().err


def test_infer_cli_over_a_split(saved, tmp_path_factory, capsys):
    import json

    from rgpt4d.cli import main
    from rgpt4d.data import MakeConfig, make_dataset

    data = tmp_path_factory.mktemp("qs")
    make_dataset(MakeConfig(out=str(data), num_videos=20, frames=T, size=32, workers=1, progress=False, overwrite=True))
    out = tmp_path_factory.mktemp("preds") / "preds.jsonl"
    assert main(["infer", "--model", str(saved), "--data", str(data), "--split", "train", "--limit", "5",
                 "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 5 and all(p["prediction"] in "ABCDE" for p in preds)
    entries = {e["id"]: e for e in json.loads((data / "train.json").read_text())}
    assert all(p["id"] in entries for p in preds)
