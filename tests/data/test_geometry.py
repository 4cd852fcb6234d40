"""Geometry of the renderer, checked against independent computations.

Tolerances (stated here and in docs/data.md):
- boxes: every instance-mask pixel centre lies inside its object's box (to 1e-3 px); for an
  unoccluded object the box is within 1.5 px of the mask's extent on every side (pixel centres
  sample a curved silhouette; its extreme point can fall between two rows).
- depth: equals the camera z of the first surface found by an independent sphere tracer on signed
  distance functions, to 1e-3 m + 1e-3 * depth, on every pixel whose label both agree on, and the
  labels agree on >= 99 % of pixels (disagreement only on silhouettes, where grazing rays differ).
- flow: warping frame t-1 by the backward flow of frame t (bilinear) reproduces frame t on
  non-occluded pixels (same instance at all four bilinear neighbours, inside the image) with a mean
  absolute error <= 0.01 and a 95th percentile <= 0.03 (colours in [0, 1]), and at most 30 % of the
  error of not warping at all.
"""

import math

import numpy as np
import pytest

from rgpt4d.data.render import render
from rgpt4d.data.world import Camera, Motion, Scene, SceneObject, WorldConfig, make_timestamps, sample_scene

SEEDS = range(6)


def _scene(seed, size=48, frames=8):
    return sample_scene(
        np.random.default_rng([123, seed]), WorldConfig(frames=frames, height=size, width=size)
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_enclose_instance_masks(seed):
    scene = _scene(seed)
    r = render(scene)
    H, W = scene.height, scene.width
    ii, jj = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    checked = 0
    for t in range(scene.frames):
        for k in range(len(scene.objects)):
            mask = r.instance[t] == k + 1
            assert mask.sum() == r.visible_pixels[t, k]
            if not mask.any():
                continue
            box = r.boxes[t, k]
            assert np.isfinite(box).all(), "a visible object must have a box"
            tol = 1e-3
            assert jj[mask].min() >= box[0] - tol and jj[mask].max() <= box[2] + tol
            assert ii[mask].min() >= box[1] - tol and ii[mask].max() <= box[3] + tol
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "shape,size", [("cuboid", (0.8, 0.5, 1.0)), ("cylinder", (0.6, 0.6, 1.2)), ("sphere", (0.9, 0.9, 0.9))]
)
def test_box_is_tight_for_an_unoccluded_object(shape, size):
    obj = SceneObject(
        shape,
        size,
        "red",
        (1, 0, 0),
        position=(0.3, 4.0),
        yaw=0.4,
        motion=Motion("constant", speed=0.5, heading=0.3, spin=0.6),
    )
    scene = Scene(Camera(), [obj], make_timestamps(10.0, 6, 6), 10.0, 6, 64, 64)
    r = render(scene)
    for t in range(scene.frames):
        ys, xs = np.nonzero(r.instance[t] == 1)
        box = r.boxes[t, 0]
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
        assert np.all(np.abs(box - extent) <= 1.5), (box, extent)


# ---- an independent reference: sphere tracing on signed distance functions --------------------


def _sdf(obj, p_local):
    sx, sy, sz = obj.size
    if obj.shape == "cuboid":
        q = np.abs(p_local - np.array([0, 0, sz / 2])) - np.array([sx / 2, sy / 2, sz / 2])
        return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)
    if obj.shape == "cylinder":
        r = sx / 2
        d = np.stack(
            [np.hypot(p_local[..., 0], p_local[..., 1]) - r, np.abs(p_local[..., 2] - sz / 2) - sz / 2], -1
        )
        return np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
    return np.linalg.norm(p_local - np.array([0, 0, sz / 2]), axis=-1) - sz / 2


def _reference(scene, t_index):
    """Depth and label per pixel by sphere tracing every SDF (ground = plane z = 0)."""
    t = scene.timestamps[t_index : t_index + 1]
    cam = scene.camera
    H, W = scene.height, scene.width
    f = cam.focal(W)
    R = cam.rotations(t)[0]
    C = cam.centres(t)[0]
    ii, jj = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    d_cam = np.stack([(jj - W / 2) / f, (ii - H / 2) / f, np.ones_like(ii)], -1).reshape(-1, 3)
    d = d_cam @ R.T
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    poses = [o.pose(t) for o in scene.objects]

    def scene_sdf(p):
        dists = [p[:, 2]]  # ground plane
        for o, (pos, yaw) in zip(scene.objects, poses):
            c, s = math.cos(yaw[0]), math.sin(yaw[0])
            rel = p - np.array([pos[0, 0], pos[0, 1], 0.0])
            local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)
            dists.append(_sdf(o, local))
        return np.stack(dists, 0)

    s = np.zeros(len(unit))
    for _ in range(400):
        dist = scene_sdf(C + s[:, None] * unit).min(0)
        s += np.maximum(dist, 0)
    p = C + s[:, None] * unit
    all_d = scene_sdf(p)
    label = all_d.argmin(0)
    converged = all_d.min(0) < 1e-5
    depth = (p - C) @ R[:, 2]
    return depth.reshape(H, W), label.reshape(H, W), converged.reshape(H, W)


@pytest.mark.parametrize("seed", SEEDS)
def test_depth_is_the_z_of_the_visible_surface(seed):
    scene = _scene(seed, size=32, frames=4)
    r = render(scene)
    for t in (0, scene.frames - 1):
        ref_depth, ref_label, converged = _reference(scene, t)
        agree = (ref_label == r.instance[t]) & converged
        assert agree.mean() >= 0.99, f"labels agree on only {agree.mean():.3f} of pixels"
        err = np.abs(r.depth[t] - ref_depth)[agree]
        assert np.all(err <= 1e-3 + 1e-3 * ref_depth[agree]), err.max()
        # disagreements sit on silhouettes: a neighbour has another label
        lab = r.instance[t].astype(int)
        pad = np.pad(lab, 1, mode="edge")
        edge = np.zeros_like(lab, dtype=bool)
        for di, dj in ((0, 1), (2, 1), (1, 0), (1, 2)):
            edge |= pad[di : di + lab.shape[0], dj : dj + lab.shape[1]] != lab
        assert np.all(edge[~agree]), "label disagreement away from any silhouette"


def _bilinear(img, x, y):
    H, W = img.shape[:2]
    x0 = np.clip(np.floor(x).astype(int), 0, W - 1)
    y0 = np.clip(np.floor(y).astype(int), 0, H - 1)
    x1, y1 = np.clip(x0 + 1, 0, W - 1), np.clip(y0 + 1, 0, H - 1)
    ax, ay = (x - x0)[..., None], (y - y0)[..., None]
    return (
        img[y0, x0] * (1 - ax) * (1 - ay)
        + img[y0, x1] * ax * (1 - ay)
        + img[y1, x0] * (1 - ax) * ay
        + img[y1, x1] * ax * ay
    )


def test_backward_flow_warps_previous_frame_onto_current():
    errors, baseline, fractions = [], [], []
    for seed in SEEDS:
        scene = _scene(seed, size=64, frames=8)
        r = render(scene)
        H, W = scene.height, scene.width
        jj, ii = np.meshgrid(np.arange(W), np.arange(H))
        assert np.all(r.flow[0] == 0)
        for t in range(1, scene.frames):
            x, y = jj + r.flow[t, ..., 0], ii + r.flow[t, ..., 1]
            inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
            x0 = np.clip(np.floor(x).astype(int), 0, W - 1)
            y0 = np.clip(np.floor(y).astype(int), 0, H - 1)
            x1, y1 = np.clip(x0 + 1, 0, W - 1), np.clip(y0 + 1, 0, H - 1)
            prev, lab = r.instance[t - 1], r.instance[t]
            same = (
                (prev[y0, x0] == lab) & (prev[y0, x1] == lab) & (prev[y1, x0] == lab) & (prev[y1, x1] == lab)
            )
            valid = inside & same
            fractions.append(valid.mean())
            cur = r.rgb[t] / 255.0
            warped = _bilinear(r.rgb[t - 1] / 255.0, x, y)
            errors.append(np.abs(warped - cur).max(-1)[valid])
            baseline.append(np.abs(r.rgb[t - 1] / 255.0 - cur).max(-1)[valid])
    e, b = np.concatenate(errors), np.concatenate(baseline)
    assert np.mean(fractions) > 0.5
    assert e.mean() <= 0.01, e.mean()
    assert np.quantile(e, 0.95) <= 0.03, np.quantile(e, 0.95)
    assert e.mean() <= 0.3 * b.mean(), (e.mean(), b.mean())


def test_motion_mask_marks_only_moving_objects():
    cam = Camera(velocity=(0.3, 0.0), yaw_rate=0.1)  # a moving camera does not make the ground "moving"
    still = SceneObject("cuboid", (0.8, 0.8, 0.8), "red", (1, 0, 0), position=(-1.0, 4.0), yaw=0.0)
    mover = SceneObject(
        "sphere",
        (0.8, 0.8, 0.8),
        "blue",
        (0, 0, 1),
        position=(1.0, 4.0),
        yaw=0.0,
        motion=Motion("stop", speed=1.0, t_stop=0.35, heading=math.pi / 2),
    )
    scene = Scene(cam, [still, mover], make_timestamps(10.0, 8, 8), 10.0, 8, 48, 48)
    r = render(scene)
    for t in range(scene.frames):
        assert not r.motion[t][r.instance[t] != 2].any()
        moving = scene.timestamps[t] <= 0.4 + 1e-9  # moved since the previous frame (stops at 0.35 s)
        assert r.motion[t][r.instance[t] == 2].all() == moving
        assert r.dynamic[t].tolist() == [False, moving]


def test_timestamps_are_seconds_at_each_videos_own_rate():
    ts = make_timestamps(fps=4.0, native_frames=31, frames=16)
    assert ts[0] == 0 and ts[-1] == pytest.approx(7.5)
    assert np.allclose(np.diff(ts), 0.5)
    rates = {round(_scene(s).fps, 2) for s in range(20)}
    assert len(rates) > 10 and min(rates) >= 2.0 and max(rates) <= 30.0
    durations = {round(_scene(s).duration, 3) for s in range(20)}
    assert len(durations) > 10
