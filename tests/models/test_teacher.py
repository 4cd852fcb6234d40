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

    from rgpt4d.train.teacher import train_teacher_from_preset
    from rgpt4d.train.teacher_cache import cache_teacher, load_cached

    res = train_teacher_from_preset(data_dir, tmp_path / "teacher", config=teacher_config(), steps=2, batch_size=2,
                        progress=False, log=None)
    m = res["metrics"]
    for key in ("depth_absrel", "depth_absrel_mean_baseline", "flow_epe", "flow_epe_zero_baseline", "motion_iou",
                "motion_iou_static_baseline", "flow_epe_moving", "flow_epe_moving_zero_baseline",
                "flow_epe_cue_baseline", "flow_epe_moving_cue_baseline"):
        assert key in m and m[key] >= 0
    from rgpt4d.train.report import teacher_quality_table

    table = teacher_quality_table(m)
    assert "moving objects" in table and f"{m['flow_epe_moving_zero_baseline']:.3f}" in table
    assert f"{m['flow_epe_cue_baseline']:.3f}" in table
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
    import rgpt4d.train.teacher as tt
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
    for diff, cue in ((True, True), (True, False), (False, True), (False, False)):
        for scales in ((2.0, 1.0, 0.5, 0.25), (4.0, 2.0, 1.0, 0.5)):
            cfg = replace(teacher_config(), difference_channels=diff, flow_cue=cue, head_scales=scales)
            teacher = Teacher4D(cfg).freeze()
            assert teacher.encoder.config.num_channels == 3 + 3 * diff + 2 * cue
            with torch.no_grad():
                out = teacher(frames)
            assert out.flow.shape == (1, T, 2, S, S) and out.depth.shape == (1, T, S, S)


def _warp_back(prev, flow):
    """prev [N, C, H, W] sampled at p + flow(p) (backward flow [N, 2, H, W], pixels): frame t's prediction."""
    N, _, H, W = prev.shape
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    grid = torch.stack([(xs + flow[:, 0]) / W * 2 - 1, (ys + flow[:, 1]) / H * 2 - 1], -1)
    return torch.nn.functional.grid_sample(prev, grid, align_corners=False, padding_mode="border")


@pytest.mark.parametrize("size", [S, S // 2])
def test_flow_targets_are_backward_flow_of_the_frames_the_teacher_sees(data_dir, size):
    """targets_at's flow at frame t carries frame t-1 onto frame t at the teacher's resolution (the
    resized path rescales the vectors): warping with it beats zero flow, the flow of the next frame
    (a one-frame shift) and the forward direction (a sign error)."""
    from rgpt4d.data import Synth4DVideos, collate
    from rgpt4d.models.frames import normalize_frames
    from rgpt4d.models.teacher import targets_at

    ds = Synth4DVideos(data_dir, None, fields=("rgb", "depth", "flow", "motion"))
    batch = collate([ds[i] for i in range(len(ds))])
    x = normalize_frames(batch["frames"], size)
    flow = targets_at(batch, size)["flow"]
    assert flow.shape == (len(ds), T, 2, size, size) and flow[:, 0].abs().max() == 0  # frame 0: no previous frame
    prev, cur = x[:, 1:-1].flatten(0, 1), x[:, 2:].flatten(0, 1)  # frames 2..T-1 (frame 1's "next" is frame 2)

    def err(f):
        return float((_warp_back(prev, f.flatten(0, 1)) - cur).abs().mean())

    right = err(flow[:, 2:])
    assert right < 0.8 * err(torch.zeros_like(flow[:, 2:]))
    assert right < err(flow[:, 1:-1]) and right < err(-flow[:, 2:])


def test_head_outputs_follow_the_tubelet_frames():
    """Head output frame t is made from the token grid of tubelet t // 2 only (no time shift)."""
    cfg = teacher_config()
    teacher = Teacher4D(cfg)
    Tp, h, w = cfg.grid
    layers = [torch.randn(1, Tp, h, w, cfg.hidden_size, requires_grad=True) for _ in range(4)]
    flow = teacher.predict_heads(layers)["flow"]
    for t in range(T):
        grads = torch.autograd.grad(flow[:, t].sum(), layers, retain_graph=True)
        touched = {k for g in grads for k in range(Tp) if g[:, k].abs().sum() > 0}
        assert touched == {t // cfg.tubelet_size}


def test_flow_cue_estimates_a_known_shift():
    """flow_cue on a smooth pattern translated by a known sub-pixel amount recovers it (backward flow:
    content moving right by d has flow -d), and frame 0 gets zero."""
    from rgpt4d.models.teacher import flow_cue

    size, d = 48, (0.6, -0.4)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    def pattern(shift):  # content moved by `shift` pixels
        x, y = xs - shift[0], ys - shift[1]
        return torch.sin(x / 3.1) + torch.cos(y / 2.3) + 0.5 * torch.sin((x + y) / 4.7)

    frames = torch.stack([pattern((0.0, 0.0)), pattern(d)])[None, :, None].expand(1, 2, 3, size, size)
    u = flow_cue(frames, window=9)
    assert u.shape == (1, 2, 2, size, size) and u[:, 0].abs().max() == 0
    inner = u[0, 1, :, 8:-8, 8:-8]
    assert torch.allclose(inner[0].median(), torch.tensor(-d[0]), atol=0.05)
    assert torch.allclose(inner[1].median(), torch.tensor(-d[1]), atol=0.05)


def test_config_saved_before_the_flow_cue_loads_without_it():
    from rgpt4d.models.configs import TeacherConfig

    d = teacher_config().to_dict()
    assert d["flow_cue"] is True and TeacherConfig.from_dict(d).flow_cue
    del d["flow_cue"], d["flow_cue_window"]
    old = TeacherConfig.from_dict(d)
    assert not old.flow_cue and Teacher4D(old).encoder.config.num_channels == 6
    with pytest.raises(ValueError, match="flow_cue_window"):
        TeacherConfig(flow_cue_window=8)


def test_metrics_moving_pixels():
    """The moving-object EPE counts only ground-truth moving pixels of frames 1.. (frame 0 has no flow)."""
    from rgpt4d.models.teacher import TeacherMetrics, TeacherOutput

    B, n, H = 1, 3, 4
    gt = torch.zeros(B, n, 2, H, H)
    gt[:, :, 0] = 1.0  # 1 px everywhere
    moving = torch.zeros(B, n, H, H, dtype=torch.bool)
    moving[:, :, :2] = True  # half the pixels
    pred = torch.zeros_like(gt)
    pred[:, :, 0, :2] = 1.0  # exact on the moving half, zero elsewhere
    tgt = {"depth": torch.ones(B, n, H, H), "flow": gt, "motion": moving}
    m = TeacherMetrics(1.0)
    m.update(TeacherOutput(latent=None, layers=[], depth=torch.ones(B, n, H, H), flow=pred,
                           motion=torch.zeros(B, n, H, H)), tgt, cue=torch.zeros_like(gt))
    r = m.result()
    assert r["flow_epe_moving"] == 0.0 and r["flow_epe_moving_zero_baseline"] == 1.0
    assert r["flow_epe"] == 0.5 and r["flow_epe_zero_baseline"] == 1.0 and r["flow_epe_cue_baseline"] == 1.0
