"""The procedural 4D world: a camera, a textured ground plane and 1-6 moving objects.

Coordinates. The world is metric with Z up and the ground at Z = 0. At t = 0 the camera stands
above the origin looking along +Y, so the world X axis is "to the right" and +Y is "away from the
camera" as seen from where the camera starts; questions about directions use this frame. Yaw angles
are measured counter-clockwise from +X seen from above, so a positive yaw rate is a
counter-clockwise rotation. Camera coordinates follow OpenCV: x right, y down, z forward, and the
depth of a pixel is the z of the visible surface point in the camera frame.

Time. A video has its own native frame rate (2-30 fps) and length; the F stored frames are sampled
uniformly from its native frames, so the timestamps (seconds) differ between videos. Motion
parameters (distances, turn angles) are drawn independently of the duration, so speeds and
accelerations can only be read off a video together with its timestamps.

Everything here is plain numpy and deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("cuboid", "cylinder", "sphere")
SHAPE_NOUNS = {"cuboid": "box", "cylinder": "cylinder", "sphere": "ball"}
MOTION_KINDS = ("static", "constant", "accelerate", "decelerate", "stop", "start", "stop_start")

# colour name -> linear RGB in [0, 1]; names must be unique within a scene
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.55, 0.20, 0.75),
    "white": (0.92, 0.92, 0.92),
    "cyan": (0.10, 0.80, 0.85),
    "pink": (0.95, 0.45, 0.70),
    "black": (0.12, 0.12, 0.12),
}


@dataclass
class WorldConfig:
    """What `sample_scene` draws from. Defaults give the project's 16-frame 64x64 videos."""

    frames: int = 16
    height: int = 64
    width: int = 64
    min_objects: int = 1
    max_objects: int = 6
    fps_range: tuple[float, float] = (2.0, 30.0)  # native frame rate, log-uniform
    native_frames_factor: tuple[int, int] = (1, 3)  # native length between 1x and 3x F frames
    object_height_range: tuple[float, float] = (0.3, 1.6)  # metres, log-uniform (all shapes)
    object_width_range: tuple[float, float] = (0.3, 1.6)  # metres, log-uniform (all shapes)
    path_length_range: tuple[float, float] = (0.6, 3.5)  # metres travelled by a moving object, log-uniform
    # probabilities of MOTION_KINDS, in that order
    motion_weights: tuple[float, ...] = (0.25, 0.15, 0.1, 0.1, 0.15, 0.1, 0.15)
    spin_probability: float = 0.35
    spin_angle_range: tuple[float, float] = (45.0, 360.0)  # degrees over the whole video
    arc_probability: float = 0.3
    arc_turn_range: tuple[float, float] = (40.0, 120.0)  # degrees of heading change along an arc
    # camera: static / translating / panning / both
    camera_motion_weights: tuple[float, float, float, float] = (0.4, 0.25, 0.2, 0.15)
    camera_travel_range: tuple[float, float] = (0.4, 2.5)  # metres over the video, log-uniform
    camera_pan_range: tuple[float, float] = (8.0, 50.0)  # degrees over the video, log-uniform
    object_distance_range: tuple[float, float] = (1.8, 12.0)  # metres ahead at t = 0, log-uniform

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"image size must be >= 16 pixels, got {self.height}x{self.width}")
        if not 1 <= self.min_objects <= self.max_objects <= len(PALETTE):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(PALETTE)}, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        lo, hi = self.fps_range
        if not 0 < lo <= hi:
            raise ValueError(f"fps_range must be positive and ordered, got {self.fps_range}")
        if len(self.motion_weights) != len(MOTION_KINDS):
            raise ValueError(f"motion_weights needs {len(MOTION_KINDS)} entries")


@dataclass
class Motion:
    """Movement over the ground along a straight line or an arc, plus a spin about the vertical axis.

    `distance(t)` is the arc length travelled by time t; the speed profile depends on `kind`:
    static (never moves), constant, accelerate / decelerate (constant acceleration along the path),
    stop (moves then stops at t_stop), start (rests until t_start), stop_start (stops at t_stop and
    moves again from t_start). The heading turns by `curvature` radians per metre travelled (positive
    = to the left) and the object's yaw follows it, plus `spin` rad/s on its own.
    """

    kind: str = "static"
    speed: float = 0.0  # m/s while moving (constant, stop, start, stop_start)
    v0: float = 0.0  # initial speed (accelerate, decelerate)
    accel: float = 0.0  # m/s^2 along the path (accelerate, decelerate)
    t_stop: float = 0.0  # seconds
    t_start: float = 0.0  # seconds
    heading: float = 0.0  # initial direction of travel, radians counter-clockwise from +X
    curvature: float = 0.0  # 1/m
    spin: float = 0.0  # rad/s, positive = counter-clockwise seen from above

    def __post_init__(self) -> None:
        if self.kind not in MOTION_KINDS:
            raise ValueError(f"unknown motion kind {self.kind!r}; expected one of {MOTION_KINDS}")

    def distance(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        k = self.kind
        if k == "static":
            return np.zeros_like(t)
        if k == "constant":
            return self.speed * t
        if k in ("accelerate", "decelerate"):
            return self.v0 * t + 0.5 * self.accel * t * t
        if k == "stop":
            return self.speed * np.minimum(t, self.t_stop)
        if k == "start":
            return self.speed * np.maximum(t - self.t_start, 0.0)
        # stop_start
        return self.speed * (np.minimum(t, self.t_stop) + np.maximum(t - self.t_start, 0.0))

    def speed_at(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        k = self.kind
        if k == "static":
            return np.zeros_like(t)
        if k == "constant":
            return np.full_like(t, self.speed)
        if k in ("accelerate", "decelerate"):
            return self.v0 + self.accel * t
        if k == "stop":
            return np.where(t < self.t_stop, self.speed, 0.0)
        if k == "start":
            return np.where(t >= self.t_start, self.speed, 0.0)
        moving = (t < self.t_stop) | (t >= self.t_start)
        return np.where(moving, self.speed, 0.0)

    @property
    def translates(self) -> bool:
        return self.kind != "static"


@dataclass
class SceneObject:
    shape: str  # "cuboid" | "cylinder" | "sphere"
    size: tuple[float, float, float]  # extent along local x, local y, and height (metres)
    color_name: str
    color: tuple[float, float, float]
    position: tuple[float, float]  # ground position of the base centre at t = 0
    yaw: float  # radians at t = 0
    motion: Motion = field(default_factory=Motion)
    stripes: int = 4  # texture: stripes around the vertical axis (or along a box's faces)
    stripe_phase: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if min(self.size) <= 0:
            raise ValueError(f"object size must be positive, got {self.size}")

    @property
    def name(self) -> str:
        return f"{self.color_name} {SHAPE_NOUNS[self.shape]}"

    @property
    def footprint_radius(self) -> float:
        """Radius of a vertical cylinder that contains the object."""
        sx, sy, _ = self.size
        if self.shape == "cuboid":
            return 0.5 * math.hypot(sx, sy)
        return 0.5 * max(sx, sy)

    @property
    def centre_height(self) -> float:
        return 0.5 * self.size[2]

    def pose(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground position [T, 2] of the base centre and yaw [T] at times t (seconds)."""
        t = np.asarray(t, dtype=np.float64)
        m = self.motion
        s = m.distance(t)
        x0, y0 = self.position
        if abs(m.curvature) < 1e-9:
            x = x0 + s * math.cos(m.heading)
            y = y0 + s * math.sin(m.heading)
        else:
            h = m.heading + m.curvature * s
            x = x0 + (np.sin(h) - math.sin(m.heading)) / m.curvature
            y = y0 + (math.cos(m.heading) - np.cos(h)) / m.curvature
        yaw = self.yaw + m.curvature * s + m.spin * t
        return np.stack([x, y], axis=-1), yaw

    def velocity(self, t: np.ndarray) -> np.ndarray:
        """Ground velocity [T, 2] in m/s."""
        t = np.asarray(t, dtype=np.float64)
        m = self.motion
        h = m.heading + m.curvature * m.distance(t)
        v = m.speed_at(t)
        return np.stack([v * np.cos(h), v * np.sin(h)], axis=-1)


@dataclass
class Camera:
    """A pinhole camera at a fixed height and pitch that may translate and pan at constant rates."""

    height: float = 1.6  # metres above the ground
    pitch: float = math.radians(40.0)  # radians below the horizon
    hfov: float = math.radians(60.0)  # horizontal field of view
    velocity: tuple[float, float] = (0.0, 0.0)  # ground velocity, m/s
    yaw_rate: float = 0.0  # rad/s, positive pans to the left

    def focal(self, width: int) -> float:
        return 0.5 * width / math.tan(0.5 * self.hfov)

    def yaw(self, t: np.ndarray) -> np.ndarray:
        return math.pi / 2 + self.yaw_rate * np.asarray(t, dtype=np.float64)

    def centres(self, t: np.ndarray) -> np.ndarray:
        """Camera centres [T, 3] in world coordinates."""
        t = np.asarray(t, dtype=np.float64)
        vx, vy = self.velocity
        return np.stack([vx * t, vy * t, np.full_like(t, self.height)], axis=-1)

    def rotations(self, t: np.ndarray) -> np.ndarray:
        """World-from-camera rotations [T, 3, 3]; columns are the camera's x (right), y (down), z."""
        psi = self.yaw(t)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        forward = np.stack([cp * np.cos(psi), cp * np.sin(psi), np.full_like(psi, -sp)], axis=-1)
        right = np.stack([np.sin(psi), -np.cos(psi), np.zeros_like(psi)], axis=-1)
        down = np.stack(
            [-sp * np.cos(psi), -sp * np.sin(psi), np.full_like(psi, -cp)], axis=-1
        )  # forward x right
        return np.stack([right, down, forward], axis=-1)


@dataclass
class Ground:
    color_a: tuple[float, float, float] = (0.45, 0.40, 0.32)
    color_b: tuple[float, float, float] = (0.30, 0.45, 0.28)
    wavelengths: tuple[float, float, float] = (2.5, 3.5, 0.6)  # metres: two coarse, one fine
    angle: float = 0.3  # orientation of the pattern, radians


@dataclass
class Scene:
    camera: Camera
    objects: list[SceneObject]
    timestamps: np.ndarray  # [F] seconds
    fps: float  # native frame rate
    native_frames: int
    height: int
    width: int
    ground: Ground = field(default_factory=Ground)
    light: tuple[float, float, float] = (0.4, -0.3, 0.87)  # unit vector towards the sun

    @property
    def frames(self) -> int:
        return len(self.timestamps)

    @property
    def duration(self) -> float:
        return float(self.timestamps[-1] - self.timestamps[0])


def make_timestamps(fps: float, native_frames: int, frames: int) -> np.ndarray:
    """Timestamps (s) of `frames` frames sampled uniformly from a video of `native_frames` frames."""
    if native_frames < frames:
        raise ValueError(f"native_frames ({native_frames}) must be >= frames ({frames})")
    idx = np.round(np.linspace(0, native_frames - 1, frames)).astype(np.int64)
    return idx / float(fps)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _sample_motion(rng: np.random.Generator, cfg: WorldConfig, duration: float) -> Motion:
    weights = np.asarray(cfg.motion_weights, dtype=np.float64)
    kind = MOTION_KINDS[int(rng.choice(len(MOTION_KINDS), p=weights / weights.sum()))]
    T = duration
    m = Motion(kind=kind)
    if kind != "static":
        length = _log_uniform(rng, *cfg.path_length_range)
        m.heading = float(rng.uniform(0.0, 2 * math.pi))
        if rng.random() < cfg.arc_probability:
            turn = math.radians(float(rng.uniform(*cfg.arc_turn_range)))
            m.curvature = float(rng.choice([-1.0, 1.0])) * turn / length
        if kind == "constant":
            m.speed = length / T
        elif kind == "accelerate" or kind == "decelerate":
            ratio = float(rng.uniform(2.5, 5.0)) if kind == "accelerate" else float(rng.uniform(0.1, 0.4))
            m.v0 = 2.0 * length / (T * (1.0 + ratio))
            m.accel = (ratio - 1.0) * m.v0 / T
        elif kind == "stop":
            m.t_stop = float(rng.uniform(0.15, 0.85)) * T
            m.speed = length / m.t_stop
        elif kind == "start":
            m.t_start = float(rng.uniform(0.25, 0.75)) * T
            m.speed = length / (T - m.t_start)
        else:  # stop_start
            f1 = float(rng.uniform(0.1, 0.55))
            f2 = min(f1 + float(rng.uniform(0.2, 0.4)), 0.9)
            m.t_stop, m.t_start = f1 * T, f2 * T
            m.speed = length / (m.t_stop + T - m.t_start)
    # a spin on top of an arc could cancel the arc's turn; arcs get none
    if rng.random() < cfg.spin_probability and m.curvature == 0.0:
        angle = math.radians(float(rng.uniform(*cfg.spin_angle_range)))
        m.spin = float(rng.choice([-1.0, 1.0])) * angle / T
    return m


def _sample_camera(rng: np.random.Generator, cfg: WorldConfig, duration: float) -> Camera:
    hfov = math.radians(float(rng.uniform(50.0, 70.0)))
    vfov = 2 * math.atan(math.tan(0.5 * hfov) * cfg.height / cfg.width)
    # keep the horizon above the top of the image: every pixel sees the ground or an object
    pitch = 0.5 * vfov + math.radians(float(rng.uniform(3.0, 12.0)))
    cam = Camera(height=float(rng.uniform(1.2, 2.0)), pitch=pitch, hfov=hfov)
    w = np.asarray(cfg.camera_motion_weights, dtype=np.float64)
    mode = int(rng.choice(4, p=w / w.sum()))
    if mode in (1, 3):
        travel = _log_uniform(rng, *cfg.camera_travel_range)
        direction = float(rng.uniform(0.0, 2 * math.pi))
        cam.velocity = (travel / duration * math.cos(direction), travel / duration * math.sin(direction))
    if mode in (2, 3):
        pan = math.radians(_log_uniform(rng, *cfg.camera_pan_range))
        cam.yaw_rate = float(rng.choice([-1.0, 1.0])) * pan / duration
    return cam


def _sample_object_shape(
    rng: np.random.Generator, cfg: WorldConfig
) -> tuple[str, tuple[float, float, float]]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    h = _log_uniform(rng, *cfg.object_height_range)
    if shape == "cuboid":
        size = (_log_uniform(rng, *cfg.object_width_range), _log_uniform(rng, *cfg.object_width_range), h)
    elif shape == "cylinder":
        d = _log_uniform(rng, *cfg.object_width_range)
        size = (d, d, h)
    else:
        size = (h, h, h)  # a ball's diameter follows the same law as every height
    return shape, size


def _ground_point(cam: Camera, cfg: WorldConfig, u: float, ahead: float) -> np.ndarray | None:
    """The ground point `ahead` metres in front of the camera (at t = 0) that appears in pixel
    column u, or None when it falls outside the image vertically."""
    f = cam.focal(cfg.width)
    cp, sp = math.cos(cam.pitch), math.sin(cam.pitch)
    # camera coordinates of the ground point (x, ahead, 0) seen from (0, 0, height), facing +Y
    z_cam = ahead * cp + cam.height * sp
    y_cam = -ahead * sp + cam.height * cp
    v = f * y_cam / z_cam + 0.5 * cfg.height
    if not 0.05 * cfg.height <= v <= cfg.height:
        return None
    x = (u - 0.5 * cfg.width) / f * z_cam
    return np.array([x, ahead])


@dataclass
class _CameraTrack:
    """The camera at the collision-check times, computed once per scene."""

    times: np.ndarray
    centres: np.ndarray  # [T, 3]
    forward: np.ndarray  # [T, 3]
    height: float


def _trajectory_ok(
    obj: SceneObject, others: list[tuple[SceneObject, np.ndarray]], track: _CameraTrack
) -> bool:
    pos, _ = obj.pose(track.times)
    r = obj.footprint_radius
    rel_xy = pos - track.centres[:, :2]
    # stay in front of the camera: the nearest point of the bounding cylinder is at most r closer
    # along the view direction than its axis
    along = rel_xy[:, 0] * track.forward[:, 0] + rel_xy[:, 1] * track.forward[:, 1]
    for dz in (0.0, obj.size[2]):
        z = along + (dz - track.height) * track.forward[:, 2]
        if np.any(z - r < 0.5):
            return False
    if np.any(np.hypot(rel_xy[:, 0], rel_xy[:, 1]) < r + 0.5):
        return False
    for other, other_pos in others:
        gap = np.hypot(pos[:, 0] - other_pos[:, 0], pos[:, 1] - other_pos[:, 1])
        if np.any(gap < r + other.footprint_radius + 0.1):
            return False
    return True


def sample_scene(rng: np.random.Generator, cfg: WorldConfig | None = None) -> Scene:
    """Draw one scene: timing, camera, ground, light and objects that never collide.

    Objects are placed by drawing how far ahead they stand and in which image column their base
    appears in the first frame, so every object starts in view; the renderer then decides how much
    of it is visible.
    """
    cfg = cfg or WorldConfig()
    for _ in range(100):
        fps = round(_log_uniform(rng, *cfg.fps_range), 2)
        lo, hi = cfg.native_frames_factor
        native = int(rng.integers(lo * cfg.frames, hi * cfg.frames + 1))
        timestamps = make_timestamps(fps, native, cfg.frames)
        T = float(timestamps[-1])
        cam = _sample_camera(rng, cfg, T)
        # dense times for collision checks: objects must not pass through each other between frames
        check_times = np.linspace(0.0, T, 4 * cfg.frames)
        track = _CameraTrack(
            check_times, cam.centres(check_times), cam.rotations(check_times)[:, :, 2], cam.height
        )
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        colours = rng.permutation(len(PALETTE))[:count]
        objects: list[SceneObject] = []
        placed: list[tuple[SceneObject, np.ndarray]] = []
        for ci in colours:
            name = list(PALETTE)[int(ci)]
            for _try in range(25):
                shape, size = _sample_object_shape(rng, cfg)
                u = float(rng.uniform(0.1, 0.9)) * cfg.width
                base = _ground_point(cam, cfg, u, _log_uniform(rng, *cfg.object_distance_range))
                if base is None:
                    continue
                obj = SceneObject(
                    shape=shape,
                    size=size,
                    color_name=name,
                    color=PALETTE[name],
                    position=(float(base[0]), float(base[1])),
                    yaw=float(rng.uniform(0.0, 2 * math.pi)),
                    motion=_sample_motion(rng, cfg, T),
                    stripes=int(rng.integers(3, 6)),
                    stripe_phase=float(rng.uniform(0.0, 2 * math.pi)),
                )
                if _trajectory_ok(obj, placed, track):
                    objects.append(obj)
                    placed.append((obj, obj.pose(check_times)[0]))
                    break
        if len(objects) < cfg.min_objects:
            continue
        ground = Ground(
            color_a=tuple(float(c) for c in rng.uniform(0.3, 0.6, 3)),
            color_b=tuple(float(c) for c in rng.uniform(0.2, 0.5, 3)),
            wavelengths=(
                float(rng.uniform(1.5, 4.0)),
                float(rng.uniform(1.5, 4.0)),
                float(rng.uniform(0.4, 0.8)),
            ),
            angle=float(rng.uniform(0.0, math.pi)),
        )
        az = float(rng.uniform(0.0, 2 * math.pi))
        el = math.radians(float(rng.uniform(30.0, 70.0)))
        light = (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
        return Scene(
            camera=cam,
            objects=objects,
            timestamps=timestamps,
            fps=fps,
            native_frames=native,
            height=cfg.height,
            width=cfg.width,
            ground=ground,
            light=light,
        )
    raise RuntimeError("could not place any object after 100 scene draws; check the WorldConfig ranges")
