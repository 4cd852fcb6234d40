"""A vectorised analytic ray caster for `world.Scene`.

One ray per pixel centre, for all frames at once ([F, H*W] arrays): each ray is intersected with the
ground plane and with every object in the object's own frame (slabs for boxes, quadratics for
cylinders and balls), and the nearest hit wins. Because camera rays are scaled to unit camera-z,
the ray parameter of a hit *is* the depth of the visible surface.

Backward optical flow is exact, not estimated: the surface point seen at pixel p in frame t is
carried with its object (or left in place on the ground) to the time of frame t-1 and projected with
that frame's camera; flow[t, p] = its position there minus p. Frame 0 has zero flow.

Boxes are amodal: the projection of the whole object (box corners; a polygon circumscribing each
cylinder cap; the exact tangent planes of a ball), clipped to the image, so they enclose the instance
mask however much of the object is hidden. Pixel coordinates are continuous: pixel (i, j) covers
[j, j+1] x [i, i+1] and its centre is (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rgpt4d.data.world import Scene, SceneObject

_EPS = 1e-4  # smallest accepted ray parameter (metres of depth)
SKY_COLOUR = (0.6, 0.75, 0.95)
_CAP_SIDES = 64  # polygon sides circumscribing a cylinder cap for its box


@dataclass
class Render:
    rgb: np.ndarray  # uint8 [F, H, W, 3]
    depth: np.ndarray  # float32 [F, H, W] metres (z of the visible surface in camera coordinates)
    flow: np.ndarray  # float32 [F, H, W, 2] backward flow in pixels (x, y); frame 0 is zero
    instance: np.ndarray  # uint8 [F, H, W]: 0 ground, k + 1 object k
    motion: np.ndarray  # bool [F, H, W]: pixels of objects that move in the world at that frame
    boxes: np.ndarray  # float32 [F, K, 4] amodal (x0, y0, x1, y1) clipped to the image; NaN if out of view
    visible_pixels: np.ndarray  # int32 [F, K]
    silhouette_pixels: np.ndarray  # int32 [F, K]: pixels the object would cover if nothing hid it
    dynamic: np.ndarray  # bool [F, K]: object k moves (translates or turns) at frame t


def _to_local(d: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rotate world directions [N, 3] by -yaw about z (cos c, sin s per row)."""
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], -1)


def _intersect(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray parameter of the first hit with `obj` (inf where the ray misses).

    o: [F, 1, 3] ray origins and d: [F, P, 3] directions, both in the object's local frame
    (base centre at the origin, height along +z).
    """
    sx, sy, sz = obj.size
    ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    inf = np.float32(np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if obj.shape == "cuboid":
            tmin = np.full(d.shape[:2], -inf, dtype=np.float32)
            tmax = np.full(d.shape[:2], inf, dtype=np.float32)
            for oc, dc, lo, hi in ((ox, dx, -sx / 2, sx / 2), (oy, dy, -sy / 2, sy / 2), (oz, dz, 0.0, sz)):
                inv = 1.0 / np.where(np.abs(dc) < 1e-12, 1e-12, dc)
                t1 = (lo - oc) * inv
                t2 = (hi - oc) * inv
                tmin = np.maximum(tmin, np.minimum(t1, t2))
                tmax = np.minimum(tmax, np.maximum(t1, t2))
            return np.where((tmax >= tmin) & (tmin > _EPS), tmin, inf)
        if obj.shape == "cylinder":
            r = 0.5 * sx
            a = dx * dx + dy * dy
            b = 2 * (ox * dx + oy * dy)
            c = ox * ox + oy * oy - r * r
            disc = b * b - 4 * a * c
            t_side = (-b - np.sqrt(disc)) / (2 * a)
            z_side = oz + t_side * dz
            side_ok = (disc >= 0) & (t_side > _EPS) & (z_side >= 0) & (z_side <= sz)
            t_side = np.where(side_ok, t_side, inf)
            # the top cap; the bottom one lies on the ground and is never seen from above it
            t_top = (sz - oz) / dz
            xt, yt = ox + t_top * dx, oy + t_top * dy
            top_ok = (t_top > _EPS) & (xt * xt + yt * yt <= r * r)
            t_top = np.where(top_ok, t_top, inf)
            return np.minimum(t_side, t_top).astype(np.float32)
        # sphere resting on the ground
        r = 0.5 * sz
        ocz = oz - r
        a = dx * dx + dy * dy + dz * dz
        b = 2 * (ox * dx + oy * dy + ocz * dz)
        c = ox * ox + oy * oy + ocz * ocz - r * r
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(disc)) / (2 * a)
        return np.where((disc >= 0) & (t > _EPS), t, inf).astype(np.float32)


def _local_normal(obj: SceneObject, p: np.ndarray) -> np.ndarray:
    """Outward normals [N, 3] at local surface points p [N, 3]."""
    sx, sy, sz = obj.size
    if obj.shape == "cuboid":
        q = np.stack([p[:, 0] / (sx / 2), p[:, 1] / (sy / 2), (p[:, 2] - sz / 2) / (sz / 2)], -1)
        axis = np.argmax(np.abs(q), axis=1)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.sign(q[np.arange(len(p)), axis])
        return n
    if obj.shape == "cylinder":
        r = 0.5 * sx
        top = p[:, 2] > sz - 1e-4
        n = np.stack([p[:, 0] / r, p[:, 1] / r, np.zeros(len(p), p.dtype)], -1)
        n[top] = (0.0, 0.0, 1.0)
        return n
    r = 0.5 * sz
    return np.stack([p[:, 0], p[:, 1], p[:, 2] - r], -1) / r


def _object_pattern(obj: SceneObject, p: np.ndarray) -> np.ndarray:
    """Stripe pattern in [0, 1] at local surface points; it turns with the object."""
    if obj.shape == "cuboid":
        sx, sy, sz = obj.size
        period = max(sx, sy, sz) / obj.stripes * 2.0
        return 0.5 + 0.5 * np.sin(
            2 * math.pi * (p[:, 0] + p[:, 1] + 0.5 * p[:, 2]) / period + obj.stripe_phase
        )
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    return 0.5 + 0.5 * np.sin(obj.stripes * azimuth + obj.stripe_phase)


def _ground_colour(scene: Scene, xy: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Smooth ground texture; the fine sinusoid fades where a pixel covers most of its wavelength
    (a box-filtered sinusoid), which keeps far ground free of aliasing."""
    g = scene.ground
    ca, sa = math.cos(g.angle), math.sin(g.angle)
    u = ca * xy[:, 0] + sa * xy[:, 1]
    v = -sa * xy[:, 0] + ca * xy[:, 1]
    l1, l2, l3 = g.wavelengths
    fade = np.clip(1.0 - 2.0 * footprint / l3, 0.0, 1.0)
    w = (
        0.5
        + 0.25 * np.sin(2 * math.pi * u / l1) * np.cos(2 * math.pi * v / l2)
        + 0.2 * fade * np.sin(2 * math.pi * (u + v) / l3)
    )
    w = np.clip(w, 0.0, 1.0)[:, None]
    return (1 - w) * np.asarray(g.color_a, np.float32) + w * np.asarray(g.color_b, np.float32)


def _camera_coords(points: np.ndarray, centre: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Camera coordinates of world points [..., N, 3] for cameras broadcast over the leading dims:
    centre [..., 1, 3] and world-from-camera rotations rot [..., 1, 3, 3]."""
    diff = points - centre
    # written out: for 3-vectors this is much faster than einsum / matmul on small batches
    return diff[..., 0:1] * rot[..., 0, :] + diff[..., 1:2] * rot[..., 1, :] + diff[..., 2:3] * rot[..., 2, :]


def object_boxes(scene: Scene, times: np.ndarray | None = None) -> np.ndarray:
    """Amodal boxes [F, K, 4] (x0, y0, x1, y1), clipped to the image; NaN rows are out of view."""
    times = scene.timestamps if times is None else np.asarray(times, dtype=np.float64)
    cam = scene.camera
    W, H = scene.width, scene.height
    f = cam.focal(W)
    F = len(times)
    centres, rots = cam.centres(times)[:, None, :], cam.rotations(times)[:, None]
    boxes = np.full((F, len(scene.objects), 4), np.nan, dtype=np.float64)
    ang = 2 * math.pi * np.arange(_CAP_SIDES) / _CAP_SIDES
    for k, obj in enumerate(scene.objects):
        pos, yaw = obj.pose(times)
        sx, sy, sz = obj.size
        if obj.shape == "sphere":
            r = 0.5 * sz
            c = np.concatenate([pos, np.full((F, 1), r)], axis=1)[:, None, :]
            pc = _camera_coords(c, centres, rots)[:, 0]  # [F, 3]
            z = pc[:, 2]
            behind = z <= r  # not entirely in front of the camera
            a = np.where(behind, 1.0, z * z - r * r)
            ext = []
            for comp in (pc[:, 0], pc[:, 1]):
                # the two tangent planes through the camera centre containing an image column (row):
                # (comp - s z)^2 = r^2 (1 + s^2), solved for the normalised coordinate s
                root = np.sqrt(np.maximum(r * r * (comp * comp + z * z - r * r), 0.0))
                ext.append(((comp * z - root) / a, (comp * z + root) / a))
            (xa, xb), (ya, yb) = ext
            box = np.stack([f * xa + W / 2, f * ya + H / 2, f * xb + W / 2, f * yb + H / 2], -1)
        else:
            if obj.shape == "cuboid":
                lx = np.array([-sx, sx, sx, -sx]) / 2
                ly = np.array([-sy, -sy, sy, sy]) / 2
            else:
                rc = 0.5 * sx / math.cos(math.pi / _CAP_SIDES)  # polygon circumscribing the cap
                lx, ly = rc * np.cos(ang), rc * np.sin(ang)
            c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
            wx = pos[:, 0:1] + c * lx - s * ly  # [F, n]
            wy = pos[:, 1:2] + s * lx + c * ly
            n = len(lx)
            pts = np.concatenate(
                [np.stack([wx, wy, np.zeros((F, n))], -1), np.stack([wx, wy, np.full((F, n), sz)], -1)],
                axis=1,
            )
            pc = _camera_coords(pts, centres, rots)
            z = pc[..., 2]
            behind = np.any(z <= 1e-6, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                u = f * pc[..., 0] / z + W / 2
                v = f * pc[..., 1] / z + H / 2
            box = np.stack([u.min(1), v.min(1), u.max(1), v.max(1)], -1)
        box[behind] = (0, 0, W, H)  # cannot project: cover the whole image
        inside = (box[:, 2] > 0) & (box[:, 3] > 0) & (box[:, 0] < W) & (box[:, 1] < H)
        clipped = np.stack(
            [
                np.maximum(box[:, 0], 0.0),
                np.maximum(box[:, 1], 0.0),
                np.minimum(box[:, 2], W),
                np.minimum(box[:, 3], H),
            ],
            -1,
        )
        boxes[inside, k] = clipped[inside]
    return boxes.astype(np.float32)


def dynamic_flags(
    scene: Scene, times: np.ndarray | None = None, prev_times: np.ndarray | None = None
) -> np.ndarray:
    """[F, K]: whether object k's pose changes between the previous frame and frame t
    (for the first frame: between it and the next one)."""
    times = scene.timestamps if times is None else times
    if prev_times is None:
        prev_times = _previous_times(scene, times)
    flags = np.zeros((len(times), len(scene.objects)), dtype=bool)
    for k, obj in enumerate(scene.objects):
        p1, y1 = obj.pose(times)
        p0, y0 = obj.pose(prev_times)
        flags[:, k] = (np.abs(p1 - p0).max(axis=1) > 1e-6) | (np.abs(y1 - y0) > 1e-6)
    return flags


def _previous_times(scene: Scene, times: np.ndarray) -> np.ndarray:
    """For each rendered time, the time of the frame before it (the next one for the first frame)."""
    ts = scene.timestamps
    prev = np.empty(len(times))
    for i, t in enumerate(times):
        j = int(np.argmin(np.abs(ts - t)))
        prev[i] = ts[j - 1] if j > 0 else (ts[1] if len(ts) > 1 else ts[0])
    return prev


def render(scene: Scene, frames: list[int] | np.ndarray | None = None) -> Render:
    """Render the given frame indices (all by default)."""
    idx = np.arange(scene.frames) if frames is None else np.asarray(frames, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= scene.frames):
        raise ValueError(f"frames must lie in [0, {scene.frames}), got {idx.tolist()}")
    times = scene.timestamps[idx]
    # flow goes back to the previous frame; frame 0 has no previous frame and gets zero flow
    prev_times = np.where(idx > 0, scene.timestamps[np.maximum(idx - 1, 0)], scene.timestamps[idx])
    H, W, F, K = scene.height, scene.width, len(idx), len(scene.objects)
    cam = scene.camera
    f = cam.focal(W)

    jj, ii = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    d_cam = np.stack(
        [(jj.ravel() + 0.5 - W / 2) / f, (ii.ravel() + 0.5 - H / 2) / f, np.ones(H * W, np.float32)], -1
    )
    centres = cam.centres(times)
    rots = cam.rotations(times)
    d_world = np.matmul(
        d_cam[None], rots.astype(np.float32).transpose(0, 2, 1)
    )  # [F, P, 3]: rots[f] @ d_cam[p]
    centres32 = centres.astype(np.float32)
    P = H * W

    # candidates: ground + objects
    t_all = np.empty((K + 1, F, P), dtype=np.float32)
    with np.errstate(divide="ignore"):
        t_ground = (-centres[:, 2:3] / d_world[..., 2]).astype(np.float32)
    t_all[0] = np.where(t_ground > _EPS, t_ground, np.inf)
    poses = [obj.pose(times) for obj in scene.objects]
    boxes = object_boxes(scene, times)
    px, py = jj.ravel() + 0.5, ii.ravel() + 0.5
    local_rays = []
    for k, obj in enumerate(scene.objects):
        pos, yaw = poses[k]
        # world -> local is a rotation by -yaw about z
        c = np.cos(yaw).astype(np.float32)[:, None]
        s = np.sin(yaw).astype(np.float32)[:, None]
        rel = (centres - np.concatenate([pos, np.zeros((F, 1))], axis=1)).astype(np.float32)
        o_l = np.stack(
            [
                c[:, 0] * rel[:, 0] + s[:, 0] * rel[:, 1],
                -s[:, 0] * rel[:, 0] + c[:, 0] * rel[:, 1],
                rel[:, 2],
            ],
            -1,
        )[:, None, :]
        local_rays.append((o_l, c[:, 0], s[:, 0]))
        # only rays through the object's (conservative, amodal) box can hit it
        bx = np.nan_to_num(boxes[:, k], nan=-1.0)
        inside = (
            (px[None] >= bx[:, 0:1])
            & (px[None] <= bx[:, 2:3])
            & (py[None] >= bx[:, 1:2])
            & (py[None] <= bx[:, 3:4])
        )
        n = np.flatnonzero(inside)
        t_k = np.full(F * P, np.inf, dtype=np.float32)
        if n.size:
            t_k[n] = _intersect(
                obj,
                o_l[n // P],
                _to_local(d_world.reshape(F * P, 3)[n], c[n // P, 0], s[n // P, 0])[:, None, :],
            )[:, 0]
        t_all[k + 1] = t_k.reshape(F, P)

    winner = np.argmin(t_all, axis=0)  # [F, P]
    depth = np.take_along_axis(t_all, winner[None], axis=0)[0]
    silhouette = np.isfinite(t_all[1:]).sum(axis=2).T.astype(np.int32)  # [F, K]

    # the ground, on full [F, P] arrays (it covers most pixels; objects overwrite theirs below)
    light = np.asarray(scene.light, dtype=np.float32)
    t_ground = t_all[0]
    sky = ~np.isfinite(t_ground)  # rays that meet nothing: never in sampled scenes (horizon out of view)
    t_safe = np.where(sky, 0.0, t_ground)
    ground = centres32[:, None, :] + t_safe[..., None] * d_world  # [F, P, 3]; the ground does not move
    # metres of ground under one pixel, stretched by the grazing angle
    grazing = np.maximum(np.abs(d_world[..., 2]) / np.sqrt((d_world * d_world).sum(-1)), 0.05)
    rgb = _ground_colour(scene, ground[..., :2].reshape(F * P, 2), (t_safe / (f * grazing)).reshape(F * P))
    rgb *= 0.45 + 0.55 * max(float(light[2]), 0.0)
    rgb[sky.ravel()] = SKY_COLOUR
    world_prev_all = ground.reshape(F * P, 3)  # each visible point at the previous frame's time

    # objects: shade, texture and carry back on flat [F*P] arrays
    prev_centres = cam.centres(prev_times).astype(np.float32)
    prev_rots = cam.rotations(prev_times).astype(np.float32)
    pix = np.stack([jj.ravel() + 0.5, ii.ravel() + 0.5], -1)  # [P, 2]
    winner_flat = winner.ravel()
    depth_flat = depth.ravel()
    d_flat = d_world.reshape(F * P, 3)

    for label in range(1, K + 1):
        n = np.flatnonzero(winner_flat == label)
        if n.size == 0:
            continue
        fi = n // P
        t = depth_flat[n][:, None]
        d = d_flat[n]
        k = label - 1
        obj = scene.objects[k]
        o_l, c_k, s_k = local_rays[k]
        local = o_l[fi, 0] + t * _to_local(d, c_k[fi], s_k[fi])
        c_now = np.cos(poses[k][1]).astype(np.float32)[fi]
        s_now = np.sin(poses[k][1]).astype(np.float32)[fi]
        nl = _local_normal(obj, local)
        n_world = np.stack(
            [c_now * nl[:, 0] - s_now * nl[:, 1], s_now * nl[:, 0] + c_now * nl[:, 1], nl[:, 2]], -1
        )
        lambert = np.clip(n_world @ light, 0.0, None)
        pattern = _object_pattern(obj, local)
        colour = np.asarray(obj.color, np.float32) * (0.65 + 0.35 * pattern)[:, None]
        colour *= (0.45 + 0.55 * lambert)[:, None]
        # carry the surface point with the object back to the previous frame's time
        ppos, pyaw = obj.pose(prev_times)
        cp = np.cos(pyaw).astype(np.float32)[fi]
        sp = np.sin(pyaw).astype(np.float32)[fi]
        world_prev = np.stack(
            [
                cp * local[:, 0] - sp * local[:, 1] + ppos[fi, 0],
                sp * local[:, 0] + cp * local[:, 1] + ppos[fi, 1],
                local[:, 2],
            ],
            -1,
        ).astype(np.float32)
        rgb[n] = colour
        world_prev_all[n] = world_prev
    # project every point with the previous frame's camera (batched matmul over frames)
    pc = np.matmul(world_prev_all.reshape(F, P, 3) - prev_centres[:, None, :], prev_rots)
    flow = np.empty((F, P, 2), dtype=np.float32)
    flow[..., 0] = f * pc[..., 0] / pc[..., 2] + 0.5 * W - pix[None, :, 0]
    flow[..., 1] = f * pc[..., 1] / pc[..., 2] + 0.5 * H - pix[None, :, 1]
    flow[idx == 0] = 0.0
    flow[sky] = 0.0
    rgb = rgb.reshape(F, P, 3)

    instance = winner.astype(np.uint8)
    dyn = dynamic_flags(scene, times, _previous_times(scene, times))
    lut = np.concatenate([np.zeros((F, 1), bool), dyn], axis=1)  # ground never moves
    motion = np.take_along_axis(lut, winner.astype(np.int64), axis=1)
    visible = (
        np.stack([(instance == k + 1).sum(axis=1) for k in range(K)], axis=1).astype(np.int32)
        if K
        else np.zeros((F, 0), np.int32)
    )

    return Render(
        rgb=(np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(F, H, W, 3),
        depth=depth.reshape(F, H, W),
        flow=flow.reshape(F, H, W, 2),
        instance=instance.reshape(F, H, W),
        motion=motion.reshape(F, H, W),
        boxes=boxes,
        visible_pixels=visible,
        silhouette_pixels=silhouette,
        dynamic=dyn,
    )


def plucker_rays(intrinsics, centres, rotations, height: int, width: int,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """Per-frame camera rays as 6-channel Plücker maps [F, 6, h, w] (float32), in the first frame's
    camera coordinates: channels 0-2 the unit direction d of the ray through each pixel centre,
    channels 3-5 its moment m = o x d, o the frame's camera centre (metres; zero in frame 0).

    intrinsics (fx, fy, cx, cy) in pixels of the rendered `height` x `width` image; centres [F, 3]
    and world-from-camera rotations [F, 3, 3] (columns: the camera's x right, y down, z forward), as
    the manifest's `camera` records them. `size` (h, w): the map's resolution (default the rendered
    one); the pinhole is rescaled to it, so the rays are exact at any resolution (the teacher's).
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    centres = np.asarray(centres, dtype=np.float64)
    rots = np.asarray(rotations, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3 or rots.shape != (len(centres), 3, 3):
        raise ValueError(f"plucker_rays: centres must be [F, 3] and rotations [F, 3, 3], got "
                         f"{centres.shape} and {rots.shape}")
    h, w = (height, width) if size is None else (int(size[0]), int(size[1]))
    sx, sy = w / width, h / height
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d_cam = np.stack([(jj + 0.5 - cx * sx) / (fx * sx), (ii + 0.5 - cy * sy) / (fy * sy), np.ones_like(jj)], -1)
    d_cam /= np.linalg.norm(d_cam, axis=-1, keepdims=True)  # [h, w, 3]
    first = rots[0].T  # first camera from world
    rel = np.einsum("ij,fjk->fik", first, rots)  # first camera from frame f's camera
    d = np.einsum("fik,hwk->fhwi", rel, d_cam)  # [F, h, w, 3]
    o = (centres - centres[0]) @ first.T  # [F, 3] camera centres in the first camera's coordinates
    m = np.cross(np.broadcast_to(o[:, None, None, :], d.shape), d)
    return np.concatenate([d, m], -1).transpose(0, 3, 1, 2).astype(np.float32)


def scene_rays(scene: Scene, frames: list[int] | np.ndarray | None = None,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """plucker_rays of a scene's camera at the given frame indices (all by default); the first of
    them is the reference camera."""
    idx = np.arange(scene.frames) if frames is None else np.asarray(frames, dtype=np.int64)
    times = scene.timestamps[idx]
    f = scene.camera.focal(scene.width)
    return plucker_rays((f, f, scene.width / 2, scene.height / 2), scene.camera.centres(times),
                        scene.camera.rotations(times), scene.height, scene.width, size)
