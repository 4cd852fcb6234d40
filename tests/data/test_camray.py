"""Camera-ray ground truth (Plücker rays in the first frame's camera), the teacher's camray head and
its P4D term."""

import math

import numpy as np
import pytest
import torch

from rgpt4d.data.render import plucker_rays, render, scene_rays
from rgpt4d.data.world import WorldConfig, sample_scene


@pytest.fixture(scope="module")
def moving_scene():
    """A scene whose camera both translates and pans."""
    for i in range(200):
        s = sample_scene(np.random.default_rng([7, i]), WorldConfig(height=24, width=32, frames=5))
        if np.hypot(*s.camera.velocity) > 0.1 and abs(s.camera.yaw_rate) > 0.05:
            return s
    raise AssertionError("no scene with a translating and panning camera in 200 draws")


def test_rays_are_unit_and_moment_is_origin_cross_direction(moving_scene):
    s = moving_scene
    r = scene_rays(s)
    assert r.shape == (s.frames, 6, s.height, s.width) and r.dtype == np.float32
    d, m = r[:, :3], r[:, 3:]
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # the origin: the frame's camera centre in the first camera's coordinates
    c = s.camera.centres(s.timestamps)
    o = (c - c[0]) @ s.camera.rotations(s.timestamps)[0]
    assert np.abs(o[-1]).max() > 0.05  # the camera did move
    expect = np.cross(np.broadcast_to(o[:, None, None], d.transpose(0, 2, 3, 1).shape), d.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(m, expect.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_allclose((d * m).sum(1), 0.0, atol=1e-5)  # a moment is orthogonal to its direction


def test_first_frame_is_the_pinhole(moving_scene):
    s = moving_scene
    r = scene_rays(s)[0]
    f = s.camera.focal(s.width)
    jj, ii = np.meshgrid(np.arange(s.width) + 0.5, np.arange(s.height) + 0.5)
    d = np.stack([(jj - s.width / 2) / f, (ii - s.height / 2) / f, np.ones_like(jj)])
    np.testing.assert_allclose(r[:3], d / np.linalg.norm(d, axis=0), atol=1e-6)
    np.testing.assert_array_equal(r[3:], 0.0)
    # a later frame's rays differ from the identity camera's
    assert np.abs(scene_rays(s)[-1] - r).max() > 1e-2


def test_rays_meet_the_rendered_surface(moving_scene):
    """Along the ray of each ground pixel, at the rendered depth, lies a point of the ground (z = 0)."""
    s = moving_scene
    r, rend = scene_rays(s), render(s)
    R0, c0 = s.camera.rotations(s.timestamps)[0], s.camera.centres(s.timestamps)[0]
    d, m = r[:, :3].transpose(0, 2, 3, 1), r[:, 3:].transpose(0, 2, 3, 1)
    o = np.cross(d, m)  # the point of each ray nearest the first camera: o_perp = d x m for unit d
    # depth is the z of the surface in the frame's own camera: t along d = depth / (d . z_t)
    R = np.einsum("ij,fjk->fik", R0.T, s.camera.rotations(s.timestamps))  # first from frame
    z_t = R[:, :, 2]  # frame t's optical axis in first-camera coordinates
    t = rend.depth / np.einsum("fhwi,fi->fhw", d, z_t)
    c = s.camera.centres(s.timestamps)
    o_t = (c - c[0]) @ R0
    along = np.einsum("fhwi,fi->fhw", d, o_t)  # the origin's offset along the ray from o_perp
    p_first = o + (along + t)[..., None] * d
    world = p_first @ R0.T + c0
    ground = rend.instance == 0
    assert ground.mean() > 0.3
    np.testing.assert_allclose(world[..., 2][ground], 0.0, atol=2e-3 * float(rend.depth.max()))


def test_targets_at_resamples_rays():
    """targets_at's area resample of the rays at twice the size stays unit and is close to the rays
    computed at the size itself (plucker_rays rescales the pinhole exactly)."""
    from rgpt4d.models.teacher import targets_at

    s = sample_scene(np.random.default_rng(11), WorldConfig(height=32, width=32, frames=3))
    big, small = scene_rays(s, size=(64, 64)), scene_rays(s, size=(16, 16))
    T = s.frames
    batch = {"depth": torch.ones(1, T, 64, 64), "flow": torch.zeros(1, T, 64, 64, 2),
             "motion": torch.zeros(1, T, 64, 64, dtype=torch.bool), "camray": torch.from_numpy(big)[None]}
    got = targets_at(batch, 16)["camray"][0].numpy()
    np.testing.assert_allclose(np.linalg.norm(got[:, :3], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, small, atol=2e-3)


def test_plucker_rays_rejects_bad_shapes():
    with pytest.raises(ValueError, match="centres must be"):
        plucker_rays((10, 10, 8, 8), np.zeros((3, 3)), np.zeros((2, 3, 3)), 16, 16)


def test_dataset_camray_field(tmp_path):
    """The dataset's camray field: the rays of the video's scene, from the manifest's camera."""
    from rgpt4d.data import MakeConfig, Synth4DVideos, collate, make_dataset
    from rgpt4d.data.generate import make_video

    cfg = MakeConfig(out=str(tmp_path), num_videos=2, seed=0, frames=4, size=32, workers=1, max_objects=2,
                     val_fraction=0.0, test_fraction=0.0, overwrite=True, progress=False)
    make_dataset(cfg)
    ds = Synth4DVideos(tmp_path, None, fields=("rgb", "camray"))
    batch = collate([ds[0], ds[1]])
    assert batch["camray"].shape == (2, 4, 6, 32, 32)
    for i in range(2):
        scene = make_video(i, 0, cfg.world()).scene
        np.testing.assert_allclose(batch["camray"][i].numpy(), scene_rays(scene), atol=1e-5)


def _teacher_cfg():
    from rgpt4d.models.configs import TeacherConfig

    return TeacherConfig(image_size=32, patch_size=8, num_frames=4, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, head_layers=(1, 1, 2, 2), head_features=16,
                         heads=("depth", "flow", "motion", "camray"))


def test_camray_head_trains():
    """A few steps of the teacher loss on one video bring the camray term down well below its start."""
    from rgpt4d.models.teacher import Teacher4D, teacher_loss

    torch.manual_seed(0)
    s = sample_scene(np.random.default_rng(3), WorldConfig(height=32, width=32, frames=4))
    rend = render(s)
    batch = {"frames": torch.from_numpy(rend.rgb).permute(0, 3, 1, 2)[None],
             "depth": torch.from_numpy(rend.depth)[None], "flow": torch.from_numpy(rend.flow).permute(0, 3, 1, 2)[None],
             "motion": torch.from_numpy(rend.motion)[None], "camray": torch.from_numpy(scene_rays(s))[None]}
    teacher = Teacher4D(_teacher_cfg()).train()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = teacher(batch["frames"])
        assert out.camray.shape == (1, 4, 6, 32, 32)
        loss, terms = teacher_loss(out, batch)
        first = terms["camray"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert terms["camray"] < 0.5 * first, (first, terms["camray"])


def test_teacher_metrics_camray_against_identity():
    from rgpt4d.models.teacher import TeacherMetrics, TeacherOutput, camray_errors

    s = sample_scene(np.random.default_rng(5), WorldConfig(height=16, width=16, frames=4))
    rays = torch.from_numpy(scene_rays(s))[None]
    z = torch.zeros(1, 4, 16, 16)
    tgt = {"depth": z + 1, "flow": torch.zeros(1, 4, 2, 16, 16), "motion": z.bool(), "camray": rays}
    m = TeacherMetrics(1.0)
    m.update(TeacherOutput(latent=z, layers=[], depth=z + 1, flow=tgt["flow"], motion=z - 1, camray=rays), tgt)
    r = m.result()
    assert r["camray_deg"] < 1e-2 and r["camray_moment"] < 1e-6
    deg, mom = camray_errors(rays[:, :1].expand_as(rays[:, 1:]), rays[:, 1:])
    assert r["camray_deg_identity_baseline"] == pytest.approx(float(deg.mean()), rel=1e-5)
    assert r["camray_moment_identity_baseline"] == pytest.approx(float(mom.mean()), rel=1e-5)
    # a rotation of 90 degrees about the optical axis: the angle error of a known map
    d = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    e = torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1)
    deg, _ = camray_errors(torch.cat([d, d], 1), torch.cat([e, e], 1))
    assert float(deg) == pytest.approx(90.0, abs=1e-3) and math.isfinite(float(deg))
