"""R4D-style multiple-choice questions in the nine R4D-Bench categories, from the 3D ground truth.

Two stages:

1. Per video (`candidates_for_video`): every template lists the objects it can be asked about and
   the exact answer (`enumerate_answers`), then keeps one at random. Objects are referred to by
   their Set-of-Marks number `<obj_N>`; numbers are a random permutation of the objects visible in
   the first frame, so a number says nothing about position or motion.
2. Per split (`assemble_questions`): candidates of the same template (and the same object shapes,
   which `question_raw` names) are put in *groups* whose members share one option set, and each
   option of the set is the correct answer of exactly one question in the group. Numeric groups
   take values a quarter of the sorted pool apart (then checked for spacing, so exactly one option
   is right); categorical groups take one question per answer class. Hence, for any option set a
   text-only model sees, every option is right equally often: options cannot reveal the answer by
   their values, form, length or order, and distractors are real answers of other videos, so they
   are plausible. Answer positions are dealt out evenly per template.

Questions that need time in seconds: average speed, acceleration, turning rate and stop time. The
distances and angles behind them are drawn independently of a video's duration, so the same
picture sequence can mean any speed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rgpt4d.data.render import Render
from rgpt4d.data.schema import BENCHMARK_NAME, CATEGORIES
from rgpt4d.data.world import Scene, SceneObject

NEVER_STOPS = "It never stops."


@dataclass(frozen=True)
class Template:
    name: str  # "<category>.<what>"
    text: str  # with {A} and {B} for objects
    kind: str  # "choice" | "count" | "number" | "vector" | "fraction"
    choices: tuple[str, ...] = ()  # "choice": the options, one per answer class
    unit: str = ""  # "number" / "vector" / "fraction": unit shown after the value
    objects: int = 1  # how many objects the text refers to

    @property
    def category(self) -> str:
        return self.name.split(".")[0]

    @property
    def num_options(self) -> int:
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "fraction":
            return 5  # four times and NEVER_STOPS
        return 4


DIRECTIONS = ("to the left", "to the right", "toward the camera", "away from the camera")
TURNS = (
    "clockwise, less than half a turn",
    "clockwise, more than half a turn",
    "counter-clockwise, less than half a turn",
    "counter-clockwise, more than half a turn",
    "it does not turn",
)
RELATIONS = (
    "left of it and closer to the camera",
    "left of it and farther from the camera",
    "right of it and closer to the camera",
    "right of it and farther from the camera",
)
PROFILES = ("it speeds up", "it slows down", "it keeps a steady speed", "it stops, then moves again")
CAMERA_MOVES = ("forward", "backward", "to the left", "to the right")
COUNT_CLASSES = (0, 1, 2, 3)
CAM_AXES = "(x to the right, y down, z forward, in metres)"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # static
        Template(
            "VG.position_start",
            "In the first frame, where is the centre of {A} in the camera's coordinates " + CAM_AXES + "?",
            "vector",
            unit="m",
        ),
        Template(
            "VG.position_end",
            "Where is the centre of {A} at the end of the video, "
            "in the coordinates of the first frame's camera " + CAM_AXES + "?",
            "vector",
            unit="m",
        ),
        Template(
            "VG.distance",
            "In the first frame, how far is the centre of {A} from the camera?",
            "number",
            unit="m",
        ),
        Template("DM.height", "How tall is {A}?", "number", unit="m"),
        Template(
            "DM.width",
            "What is the larger horizontal dimension of {A} (its width or its length)?",
            "number",
            unit="m",
        ),
        Template(
            "SR.relation",
            "In the first frame, where is {A} relative to {B}, as seen by the camera?",
            "choice",
            choices=RELATIONS,
            objects=2,
        ),
        Template(
            "SR.distance",
            "In the first frame, how far apart are the centres of {A} and {B}?",
            "number",
            unit="m",
            objects=2,
        ),
        # dynamic
        Template(
            "R.turn",
            "Seen from above, how does {A} turn about its vertical axis during the video?",
            "choice",
            choices=TURNS,
        ),
        Template(
            "R.angle",
            "By how many degrees does {A} turn about its vertical axis during the video?",
            "number",
            unit="°",
        ),
        Template(
            "R.rate",
            "At what average rate does {A} turn about its vertical axis, in degrees per second?",
            "number",
            unit="°/s",
        ),
        Template(
            "R.camera_pan",
            "By how many degrees does the camera pan during the video?",
            "number",
            unit="°",
            objects=0,
        ),
        Template(
            "C.moving", "How many of the marked objects change position during the video?", "count", objects=0
        ),
        Template(
            "C.turning",
            "How many of the marked objects turn about their vertical axis during the video?",
            "count",
            objects=0,
        ),
        Template(
            "T.direction",
            "Over the whole video, which way does {A} move across the ground, "
            "as seen from where the camera starts?",
            "choice",
            choices=DIRECTIONS,
        ),
        Template(
            "T.camera",
            "Which way does the camera travel during the video, "
            "relative to the direction it faces at the start?",
            "choice",
            choices=CAMERA_MOVES,
            objects=0,
        ),
        Template(
            "FP.direction",
            "{A} moves across the ground during the video. "
            "In which direction, as seen from where the camera starts?",
            "choice",
            choices=DIRECTIONS + ("it stays in place",),
        ),
        Template(
            "FP.stop_time",
            "{A} is moving when the video starts. At what time does it stop?",
            "fraction",
            unit="s",
        ),
        Template(
            "SA.avg_speed",
            "What is the average speed of {A} over the video "
            "(distance travelled divided by the video's duration)?",
            "number",
            unit="m/s",
        ),
        Template(
            "SA.acceleration",
            "{A} changes speed at a steady rate. What is the size of its acceleration?",
            "number",
            unit="m/s²",
        ),
        Template(
            "SA.profile", "How does the speed of {A} change during the video?", "choice", choices=PROFILES
        ),
        Template(
            "DP.displacement",
            "At the end of the video, how far is {A} from where it started (in a straight line)?",
            "number",
            unit="m",
        ),
        Template(
            "DP.path_length",
            "What distance does {A} travel along its path during the video?",
            "number",
            unit="m",
        ),
        Template(
            "DP.camera", "How far does the camera travel during the video?", "number", unit="m", objects=0
        ),
    ]
}

# the tolerances that make an answer unambiguous
MIN_RATIO = 1.25  # numeric options differ by at least 25 %
MIN_VECTOR_GAP = (0.6, 0.15)  # position options differ by >= max(0.6 m, 15 % of the larger norm)
MIN_FRACTION_GAP = 0.1  # stop-time options differ by >= 10 % of the video's duration
MIN_DIRECTION_DISPLACEMENT = 0.5  # metres: shorter moves have no clear direction
DIRECTION_CONE = 30.0  # degrees either side of an axis for a direction question
RELATION_MARGIN = 0.3  # metres of lateral / distance difference for a spatial relation
TURN_MARGIN = (30.0, 150.0, 210.0)  # degrees: "less than half a turn" in [30, 150], "more" >= 210
MIN_MARK_PIXELS_FRACTION = 0.003  # of the image (12 px at 64x64) for an object to be marked
MIN_MARK_VISIBLE_FRACTION = 0.35  # visible / unoccluded pixels


@dataclass
class Candidate:
    """One askable question of one video, before its options are built."""

    video_id: str
    template: str
    objects: tuple[int, ...]  # SoM numbers (1-based) of the objects the text refers to
    names: tuple[str, ...]  # their names for question_raw ("red box")
    shapes: tuple[str, ...]
    answer: Any  # choice text | count | float | (x, y, z) | stop fraction or None
    scale: float = 1.0  # "fraction": shown value = fraction * scale (the duration)
    extra: dict = field(default_factory=dict)  # copied into the entry

    @property
    def group_key(self) -> str:
        return "|".join((self.template,) + self.shapes)


# ---------------------------------------------------------------------------------------------
# marking and facts
# ---------------------------------------------------------------------------------------------


def mark_objects(scene: Scene, first: Render, rng: np.random.Generator) -> list[int | None]:
    """SoM numbers for the objects clearly visible in the first frame (None for the rest).

    `first` is a render whose frame 0 is the video's first frame. Numbers are a random permutation.
    """
    min_px = max(6, int(round(MIN_MARK_PIXELS_FRACTION * scene.height * scene.width)))
    vis = first.visible_pixels[0]
    sil = np.maximum(first.silhouette_pixels[0], 1)
    ok = [
        bool(
            vis[k] >= min_px
            and vis[k] >= MIN_MARK_VISIBLE_FRACTION * sil[k]
            and np.isfinite(first.boxes[0, k]).all()
        )
        for k in range(len(scene.objects))
    ]
    order = rng.permutation(int(sum(ok)))
    numbers: list[int | None] = [None] * len(ok)
    for rank, k in enumerate(i for i, good in enumerate(ok) if good):
        numbers[k] = int(order[rank]) + 1
    return numbers


def camera_coords_first_frame(scene: Scene, points: np.ndarray) -> np.ndarray:
    """World points [N, 3] in the first frame's camera coordinates (x right, y down, z forward)."""
    t0 = scene.timestamps[:1]
    c, r = scene.camera.centres(t0)[0], scene.camera.rotations(t0)[0]
    return (np.asarray(points, dtype=np.float64) - c) @ r


def _centre(obj: SceneObject, t: float) -> np.ndarray:
    pos, _ = obj.pose(np.array([t]))
    return np.array([pos[0, 0], pos[0, 1], obj.centre_height])


def _direction_class(dx: float, dy: float) -> str | None:
    """Direction of a ground displacement in the initial camera frame (x right, y away)."""
    if math.hypot(dx, dy) < MIN_DIRECTION_DISPLACEMENT:
        return None
    ang = math.degrees(math.atan2(dy, dx))
    for axis, name in (
        (0.0, "to the right"),
        (90.0, "away from the camera"),
        (180.0, "to the left"),
        (-90.0, "toward the camera"),
    ):
        if abs((ang - axis + 180.0) % 360.0 - 180.0) <= DIRECTION_CONE:
            return name
    return None


def _turn_class(delta_deg: float) -> str | None:
    a = abs(delta_deg)
    if a < 1e-6:
        return "it does not turn"
    lo, hi, more = TURN_MARGIN
    sense = "counter-clockwise" if delta_deg > 0 else "clockwise"
    if lo <= a <= hi:
        return f"{sense}, less than half a turn"
    if a >= more:
        return f"{sense}, more than half a turn"
    return None


def enumerate_answers(scene: Scene, numbers: list[int | None]) -> dict[tuple[str, tuple[int, ...]], Any]:
    """Every askable (template, object indices) with its exact answer.

    Object indices are positions in `scene.objects`; only marked objects (numbers[k] not None) are
    asked about. Numeric answers are raw floats (metres, m/s, m/s^2, degrees, deg/s); "fraction"
    answers are the stop time divided by the duration, or None when the object never stops.
    """
    T = scene.duration
    t0, t1 = float(scene.timestamps[0]), float(scene.timestamps[-1])
    objs = scene.objects
    marked = [k for k, n in enumerate(numbers) if n is not None]
    out: dict[tuple[str, tuple[int, ...]], Any] = {}

    start = {k: camera_coords_first_frame(scene, _centre(objs[k], t0)[None])[0] for k in marked}
    for k in marked:
        o, m = objs[k], objs[k].motion
        end = camera_coords_first_frame(scene, _centre(o, t1)[None])[0]
        p = o.pose(np.array([t0, t1]))
        disp = p[0][1] - p[0][0]
        turn = math.degrees(float(p[1][1] - p[1][0]))
        path = float(m.distance(np.array([t1]))[0] - m.distance(np.array([t0]))[0])

        out[("VG.position_start", (k,))] = tuple(float(v) for v in start[k])
        if m.translates:
            out[("VG.position_end", (k,))] = tuple(float(v) for v in end)
        out[("VG.distance", (k,))] = float(np.linalg.norm(start[k]))
        out[("DM.height", (k,))] = float(o.size[2])
        out[("DM.width", (k,))] = float(max(o.size[0], o.size[1]))

        turn_class = _turn_class(turn)
        if turn_class is not None:
            out[("R.turn", (k,))] = turn_class
        if abs(turn) >= TURN_MARGIN[0]:
            out[("R.angle", (k,))] = abs(turn)
            out[("R.rate", (k,))] = abs(turn) / T

        direction = _direction_class(float(disp[0]), float(disp[1])) if m.translates else None
        if direction is not None:
            out[("T.direction", (k,))] = direction
        if not m.translates:
            out[("FP.direction", (k,))] = "it stays in place"
        elif direction is not None:
            out[("FP.direction", (k,))] = direction

        if m.kind in ("constant", "accelerate", "decelerate", "stop", "stop_start"):
            out[("FP.stop_time", (k,))] = (m.t_stop - t0) / T if m.kind in ("stop", "stop_start") else None
        if m.translates:
            out[("SA.avg_speed", (k,))] = path / T
            out[("DP.displacement", (k,))] = float(np.hypot(disp[0], disp[1]))
            out[("DP.path_length", (k,))] = path
        if m.kind in ("accelerate", "decelerate"):
            out[("SA.acceleration", (k,))] = abs(m.accel)
        profile = {
            "accelerate": PROFILES[0],
            "decelerate": PROFILES[1],
            "constant": PROFILES[2],
            "stop_start": PROFILES[3],
        }
        if m.kind in profile:
            out[("SA.profile", (k,))] = profile[m.kind]

    for a in marked:
        for b in marked:
            if a == b:
                continue
            pa, pb = start[a], start[b]
            lateral = pa[0] - pb[0]
            nearer = np.linalg.norm(pa) - np.linalg.norm(pb)
            if abs(lateral) >= RELATION_MARGIN and abs(nearer) >= RELATION_MARGIN:
                side = "left" if lateral < 0 else "right"
                depth = "closer to the camera" if nearer < 0 else "farther from the camera"
                out[("SR.relation", (a, b))] = f"{side} of it and {depth}"
            if a < b:
                out[("SR.distance", (a, b))] = float(np.linalg.norm(pa - pb))

    moving = sum(1 for k in marked if objs[k].motion.translates)
    turning = sum(1 for k in marked if float(np.ptp(objs[k].pose(np.array([t0, t1]))[1])) > 1e-6)
    out[("C.moving", ())] = moving
    out[("C.turning", ())] = turning

    cam = scene.camera
    vx, vy = cam.velocity
    if math.hypot(vx, vy) > 1e-9:
        out[("DP.camera", ())] = math.hypot(vx, vy) * T
        ang = math.degrees(math.atan2(vy, vx))
        for axis, name in (
            (90.0, "forward"),
            (-90.0, "backward"),
            (180.0, "to the left"),
            (0.0, "to the right"),
        ):
            if abs((ang - axis + 180.0) % 360.0 - 180.0) <= DIRECTION_CONE:
                out[("T.camera", ())] = name
    if abs(cam.yaw_rate) > 1e-9:
        out[("R.camera_pan", ())] = abs(math.degrees(cam.yaw_rate * T))
    return out


def candidates_for_video(
    video_id: str, scene: Scene, numbers: list[int | None], rng: np.random.Generator
) -> list[Candidate]:
    """At most one candidate per template: a uniformly chosen askable object (or pair)."""
    answers = enumerate_answers(scene, numbers)
    by_template: dict[str, list[tuple[tuple[int, ...], Any]]] = {}
    for (name, objs), ans in answers.items():
        by_template.setdefault(name, []).append((objs, ans))
    out = []
    for name in TEMPLATES:  # fixed order: rng draws do not depend on dict order
        options = by_template.get(name)
        if not options:
            continue
        t = TEMPLATES[name]
        if t.kind == "count" and options[0][1] not in COUNT_CLASSES:
            continue
        objs, ans = options[int(rng.integers(len(options)))]
        out.append(
            Candidate(
                video_id=video_id,
                template=name,
                objects=tuple(int(numbers[k]) for k in objs),
                names=tuple(scene.objects[k].name for k in objs),
                shapes=tuple(scene.objects[k].shape for k in objs),
                answer=ans,
                scale=scene.duration if t.kind == "fraction" else 1.0,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# option text
# ---------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Two significant digits below 10, whole numbers above."""
    a = abs(value)
    if a >= 10:
        return f"{value:.0f}"
    if a >= 1:
        return f"{value:.1f}"
    if a >= 0.1:
        return f"{value:.2f}"
    return np.format_float_positional(value, precision=2, fractional=False, trim="-")


def format_value(value: float, unit: str) -> str:
    if unit in ("°", "°/s"):
        return f"{format_number(value)}{unit}"
    return f"{format_number(value)} {unit}"


def format_vector(v: tuple[float, float, float], unit: str = "m") -> str:
    return "(" + ", ".join(f"{round(c, 1) + 0.0:.1f}" for c in v) + f") {unit}"  # + 0.0: no "-0.0"


def _numbers_spaced(values: list[float], unit: str) -> bool:
    v = sorted(values)
    if v[0] <= 0:
        return False
    if any(b / a < MIN_RATIO for a, b in zip(v, v[1:])):
        return False
    return len({format_value(x, unit) for x in v}) == len(v)


def _vectors_spaced(values: list[tuple[float, float, float]]) -> bool:
    arr = np.asarray(values, dtype=np.float64)
    norms = np.linalg.norm(arr, axis=1)
    for i in range(len(arr)):
        for j in range(i + 1, len(arr)):
            need = max(MIN_VECTOR_GAP[0], MIN_VECTOR_GAP[1] * max(norms[i], norms[j]))
            if np.linalg.norm(arr[i] - arr[j]) < need:
                return False
    return len({format_vector(tuple(x)) for x in values}) == len(values)


def _fractions_spaced(fracs: list[float], scales: list[float]) -> bool:
    f = sorted(fracs)
    if any(b - a < MIN_FRACTION_GAP for a, b in zip(f, f[1:])):
        return False
    # every question of the group shows the fractions times its own duration: all must differ
    return all(len({format_value(x * s, "s") for x in f}) == len(f) for s in scales)


# ---------------------------------------------------------------------------------------------
# grouping into option sets
# ---------------------------------------------------------------------------------------------


def _stable_rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(p.encode()) for p in parts])


def _spread_groups(
    items: list[Candidate], size: int, sort_key: Callable[[Candidate], float], rng
) -> list[list[Candidate]]:
    """Groups of `size` whose members lie a 1/size quantile apart in sort order."""
    items = list(items)
    rng.shuffle(items)
    m = len(items) // size
    items = sorted(items[: m * size], key=sort_key)
    return [[items[g + j * m] for j in range(size)] for g in range(m)]


def _class_groups(items: list[Candidate], classes: tuple, rng) -> list[list[Candidate]]:
    """Groups holding one candidate of each answer class."""
    pools = {c: [x for x in items if x.answer == c and type(x.answer) is type(c)] for c in classes}
    for c in classes:
        rng.shuffle(pools[c])
    m = min(len(p) for p in pools.values())
    return [[pools[c][g] for c in classes] for g in range(m)]


@dataclass
class Question:
    """A candidate with its option values (correct one included) and the correct value."""

    candidate: Candidate
    options: list[Any]
    answer: Any


def _build_group(t: Template, group: list[Candidate]) -> list[Question] | None:
    if t.kind == "choice":
        return [Question(c, list(t.choices), c.answer) for c in group]
    if t.kind == "count":
        return [Question(c, list(COUNT_CLASSES), c.answer) for c in group]
    if t.kind == "number":
        values = [c.answer for c in group]
        if not _numbers_spaced(values, t.unit):
            return None
        texts = [format_value(v, t.unit) for v in values]
        return [Question(c, list(texts), format_value(c.answer, t.unit)) for c in group]
    if t.kind == "vector":
        values = [c.answer for c in group]
        if not _vectors_spaced(values):
            return None
        texts = [format_vector(v, t.unit) for v in values]
        return [Question(c, list(texts), format_vector(c.answer, t.unit)) for c in group]
    if t.kind == "fraction":
        stoppers = [c for c in group if c.answer is not None]
        fracs = [c.answer for c in stoppers]
        if not _fractions_spaced(fracs, [c.scale for c in group]):
            return None
        out = []
        for c in group:
            texts = [format_value(f * c.scale, t.unit) for f in fracs] + [NEVER_STOPS]
            ans = NEVER_STOPS if c.answer is None else format_value(c.answer * c.scale, t.unit)
            out.append(Question(c, texts, ans))
        return out
    raise ValueError(f"unknown template kind {t.kind!r}")


def group_candidates(candidates: list[Candidate], seed: int, split: str) -> list[Question]:
    """Turn one split's candidates into questions whose option sets give text nothing to go on."""
    by_key: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_key.setdefault(c.group_key, []).append(c)
    questions: list[Question] = []
    for key in sorted(by_key):
        items = sorted(by_key[key], key=lambda c: c.video_id)
        t = TEMPLATES[items[0].template]
        rng = _stable_rng(seed, "groups", split, key)
        if t.kind == "choice":
            groups = _class_groups(items, t.choices, rng)
        elif t.kind == "count":
            groups = _class_groups(items, COUNT_CLASSES, rng)
        elif t.kind == "number":
            groups = _spread_groups(items, t.num_options, lambda c: c.answer, rng)
        elif t.kind == "vector":
            groups = _spread_groups(items, t.num_options, lambda c: float(np.linalg.norm(c.answer)), rng)
        else:  # fraction: four stoppers a quarter apart plus one that never stops
            stoppers = [c for c in items if c.answer is not None]
            never = [c for c in items if c.answer is None]
            rng.shuffle(never)
            spread = _spread_groups(stoppers, 4, lambda c: c.answer, rng)
            groups = [g + [n] for g, n in zip(spread, never)]
        for g in groups:
            built = _build_group(t, g)
            if built is not None:
                questions.extend(built)
    return questions


# ---------------------------------------------------------------------------------------------
# entries in the R4D-Bench schema
# ---------------------------------------------------------------------------------------------


def _fill(text: str, refs: list[str]) -> str:
    out = text
    for slot, ref in zip("AB", refs):
        out = out.replace("{" + slot + "}", ref)
    return out[0].upper() + out[1:]


def assemble_questions(
    candidates: list[Candidate], seed: int, split: str, video_info: dict[str, dict] | None = None
) -> list[dict]:
    """R4D-Bench entries for one split, ordered by video id then template.

    `video_info[video_id]` may add fields to every entry of that video (timestamps, regions, ...).
    """
    questions = group_candidates(candidates, seed, split)
    by_template: dict[str, list[Question]] = {}
    for q in questions:
        by_template.setdefault(q.candidate.template, []).append(q)
    entries = []
    for name in sorted(by_template):
        t = TEMPLATES[name]
        qs = sorted(by_template[name], key=lambda q: q.candidate.video_id)
        rng = _stable_rng(seed, "positions", split, name)
        n_opt = t.num_options
        # deal answer positions evenly, then shuffle the deal
        positions = np.tile(np.arange(n_opt), len(qs) // n_opt + 1)[: len(qs)]
        positions = positions[rng.permutation(len(qs))]
        for q, pos in zip(qs, positions):
            c = q.candidate
            distractors = [v for v in q.options if v != q.answer or type(v) is not type(q.answer)]
            if len(distractors) != len(q.options) - 1:
                raise AssertionError(
                    f"{c.video_id} {name}: answer {q.answer!r} must appear once in {q.options!r}"
                )
            distractors = [distractors[i] for i in rng.permutation(len(distractors))]
            options = distractors[:pos] + [q.answer] + distractors[pos:]
            marks = [f"<obj_{n}>" for n in c.objects]
            names = [f"the {n}" for n in c.names]
            entry = {
                "id": f"{c.video_id}-{name}",
                "benchmark": BENCHMARK_NAME,
                "task": CATEGORIES[t.category],
                "category": t.category,
                "template": name,
                "video": c.video_id,
                "source": c.video_id,
                "som_image": f"images/{c.video_id}.png",
                "question": _fill(t.text, marks),
                "question_raw": _fill(t.text, names),
                "options": options,
                "answer": q.answer,
                "objects": list(c.objects),
            }
            if video_info and c.video_id in video_info:
                entry.update(video_info[c.video_id])
            entries.append(entry)
    entries.sort(key=lambda e: (e["video"], e["template"]))
    return entries
