"""The 4D teacher: shapes of latent() and the heads, freezing, train / evaluate / cache on a tiny set."""

import json

import pytest
import torch

from rgpt4d.models.teacher import Teacher4D
from tests.models.conftest import S, T, teacher_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from rgpt4d.data import MakeConfig, make_dataset

    out = tmp_path_factory.mktemp("synth")
    make_dataset(MakeConfig(out=str(out), num_videos=6, frames=T, size=S, workers=1, val_fraction=0.2,
                            test_fraction=0.2, progress=False, overwrite=True))
    return out


def test_latent_and_heads_shapes():
    cfg = teacher_config()
    teacher = Teacher4D(cfg).freeze()
    frames = torch.randint(0, 256, (2, T, 3, 48, 48), dtype=torch.uint8)  # resized to the teacher's size
    with torch.no_grad():
        lat = teacher.latent(frames)
        out = teacher(frames)
    Tp, h, w = cfg.grid
    assert lat.shape == (2, Tp, h, w, cfg.hidden_size) == (2, T // 2, S // 8, S // 8, 32)
    assert torch.equal(lat, out.latent) and len(out.layers) == 4
    assert out.depth.shape == (2, T, S, S) and (out.depth > 0).all()  # exp activation
    assert out.flow.shape == (2, T, 2, S, S)
    assert out.motion.shape == (2, T, S, S)
    # one latent grid feeds all four head inputs (the paper's single decoded latent)
    assert teacher.predict_heads(lat)["depth"].shape == (2, T, S, S)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match=f"frames: the teacher takes {T} frames"):
        teacher.latent(frames[:, :3])


def test_paper_teacher_config_is_the_papers():
    from rgpt4d.models.configs import get_preset

    cfg = get_preset("paper").teacher
    assert cfg.grid == (8, 16, 16) and cfg.hidden_size == 1408 and cfg.head_layers == (14, 21, 28, 36)
    assert cfg.num_hidden_layers == 40 and cfg.tubelet_size == 2 and cfg.patch_size == 14


def test_train_evaluate_cache(data_dir, tmp_path):
    from safetensors.torch import load_file

    from rgpt4d.models.teacher_train import cache_teacher, load_cached, train_teacher

    res = train_teacher(data_dir, tmp_path / "teacher", config=teacher_config(), steps=2, batch_size=2,
                        progress=False, log=None)
    m = res["metrics"]
    for key in ("depth_absrel", "depth_absrel_mean_baseline", "flow_epe", "flow_epe_zero_baseline", "motion_iou",
                "motion_iou_static_baseline"):
        assert key in m and m[key] >= 0
    assert json.loads((tmp_path / "teacher" / "teacher_metrics.json").read_text())["steps"] == 2
    loaded = Teacher4D.load(tmp_path / "teacher")
    assert not any(p.requires_grad for p in loaded.parameters())
    n = cache_teacher(tmp_path / "teacher", data_dir, tmp_path / "cache", progress=False)
    assert n == 6
    index = json.loads((tmp_path / "cache" / "cache_index.json").read_text())
    vid = sorted(index["videos"])[0]
    entry = load_file(str(tmp_path / "cache" / f"{vid}.safetensors"))
    Tp, h, w = teacher_config().grid
    assert entry["latent"].shape == (Tp, h, w, 32) and entry["layers"].shape == (4, Tp, h, w, 32)
    assert entry["depth"].shape == (T, S, S) and entry["flow"].shape == (T, 2, S, S)
    # the cache holds what the frozen teacher computes
    from rgpt4d.data import Synth4DVideos

    ds = Synth4DVideos(data_dir, None, fields=("rgb",))
    i = [v["id"] for v in ds.videos].index(vid)
    with torch.no_grad():
        lat = loaded.latent(ds[i]["frames"][None])[0]
    assert torch.allclose(entry["latent"].float(), lat, atol=1e-2, rtol=1e-2)
    batch = load_cached(tmp_path / "cache", [vid, vid])
    assert batch["latent"].shape == (2, Tp, h, w, 32) and batch["latent"].dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="teacher cache: no entry"):
        load_cached(tmp_path / "cache", ["nope"])


def test_cli_teacher_train_and_cache(data_dir, tmp_path, monkeypatch):
    import rgpt4d.models.teacher_train as tt
    from rgpt4d.cli import main

    monkeypatch.setattr(tt, "get_preset", lambda name: type("P", (), {"teacher": teacher_config()})())
    assert main(["teacher", "train", "--data", str(data_dir), "--out", str(tmp_path / "t"), "--steps", "1",
                 "--batch-size", "2", "--quiet"]) == 0
    assert main(["teacher", "cache", "--teacher", str(tmp_path / "t"), "--data", str(data_dir), "--out",
                 str(tmp_path / "c"), "--splits", "val", "--quiet"]) == 0
    assert len(list((tmp_path / "c").glob("*.safetensors"))) >= 1
    assert main(["teacher", "cache", "--teacher", str(tmp_path / "missing"), "--data", str(data_dir), "--out",
                 str(tmp_path / "c2"), "--quiet"]) == 2


def test_head_scales_and_difference_channels():
    from dataclasses import replace

    from rgpt4d.models.configs import TeacherConfig

    with pytest.raises(ValueError, match="head_scales"):
        TeacherConfig(patch_size=8, head_scales=(3.0, 1.0, 0.5, 0.25))  # 8 / 3 px per token side
    frames = torch.randint(0, 256, (1, T, 3, S, S), dtype=torch.uint8)
    for diff in (True, False):
        for scales in ((2.0, 1.0, 0.5, 0.25), (4.0, 2.0, 1.0, 0.5)):
            cfg = replace(teacher_config(), difference_channels=diff, head_scales=scales)
            teacher = Teacher4D(cfg).freeze()
            assert teacher.encoder.config.num_channels == (6 if diff else 3)
            with torch.no_grad():
                out = teacher(frames)
            assert out.flow.shape == (1, T, 2, S, S) and out.depth.shape == (1, T, S, S)
