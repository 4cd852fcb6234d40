"""Answers of every category on hand-built scenes where they are known by construction, and the
properties of assembled questions (options, spacing, balance, SoM)."""

import collections
import math
import re

import numpy as np
import pytest

from rgpt4d.data.generate import simulate_candidates
from rgpt4d.data.questions import (
    NEVER_STOPS,
    TEMPLATES,
    assemble_questions,
    enumerate_answers,
    format_value,
)
from rgpt4d.data.render import render
from rgpt4d.data.schema import CATEGORIES, answer_index
from rgpt4d.data.som import _GLYPHS, BOX_COLOURS, draw_som
from rgpt4d.data.world import Camera, Motion, Scene, SceneObject, WorldConfig, make_timestamps

PITCH = math.radians(40.0)


def box(x, y, size=(0.6, 0.6, 1.0), motion=None, shape="cuboid", yaw=0.0, colour="red"):
    return SceneObject(shape, size, colour, (1, 0, 0), position=(x, y), yaw=yaw, motion=motion or Motion())


def scene(objects, fps=5.0, native=11, frames=11, camera=None):
    """Default: 11 frames at 5 fps, so the video lasts exactly 2 s."""
    return Scene(
        camera or Camera(pitch=PITCH), objects, make_timestamps(fps, native, frames), fps, native, 64, 64
    )


def answers(sc, numbers=None):
    return enumerate_answers(sc, numbers or list(range(1, len(sc.objects) + 1)))


def cam_coords(x, y, z, h=1.6, pitch=PITCH):
    """Independent trigonometry: the camera at (0, 0, h) faces +Y, tilted down by `pitch`."""
    dy, dz = y, z - h
    return (x, -dy * math.sin(pitch) - dz * math.cos(pitch), dy * math.cos(pitch) - dz * math.sin(pitch))


def test_vg_positions_and_distance():
    mover = box(1.0, 5.0, motion=Motion("constant", speed=0.5, heading=0.0))
    a = answers(scene([mover]))
    expected = cam_coords(1.0, 5.0, 0.5)
    assert a[("VG.position_start", (0,))] == pytest.approx(expected, abs=1e-9)
    assert a[("VG.distance", (0,))] == pytest.approx(math.dist(expected, (0, 0, 0)))
    assert a[("VG.position_end", (0,))] == pytest.approx(
        cam_coords(2.0, 5.0, 0.5), abs=1e-9
    )  # 0.5 m/s for 2 s
    assert ("VG.position_end", (0,)) not in answers(
        scene([box(1.0, 5.0)])
    )  # a static object has no "end" question


def test_dm_height_and_width():
    a = answers(scene([box(0, 4, size=(0.4, 0.9, 1.3)), box(1, 6, size=(0.7, 0.7, 0.7), shape="sphere")]))
    assert a[("DM.height", (0,))] == pytest.approx(1.3)
    assert a[("DM.width", (0,))] == pytest.approx(0.9)
    assert a[("DM.height", (1,))] == a[("DM.width", (1,))] == pytest.approx(0.7)


def test_sr_relation_and_distance():
    a = answers(scene([box(-1.5, 3.0), box(1.0, 6.0)]))
    assert a[("SR.relation", (0, 1))] == "left of it and closer to the camera"
    assert a[("SR.relation", (1, 0))] == "right of it and farther from the camera"
    assert a[("SR.distance", (0, 1))] == pytest.approx(math.hypot(2.5, 3.0))
    # too close sideways for a clear left/right: no relation question
    assert ("SR.relation", (0, 1)) not in answers(scene([box(0.0, 3.0), box(0.1, 6.0)]))


def test_r_turns():
    T = 2.0
    objs = [
        box(-1, 4, motion=Motion(spin=math.radians(250) / T)),
        box(0, 6, motion=Motion(spin=-math.radians(90) / T)),
        box(1, 4),
        box(2, 7, motion=Motion(spin=math.radians(170) / T)),
    ]
    a = answers(scene(objs))
    assert a[("R.turn", (0,))] == "counter-clockwise, more than half a turn"
    assert a[("R.turn", (1,))] == "clockwise, less than half a turn"
    assert a[("R.turn", (2,))] == "it does not turn"
    assert ("R.turn", (3,)) not in a  # 170 degrees is too close to half a turn
    assert a[("R.angle", (0,))] == pytest.approx(250.0)
    assert a[("R.rate", (1,))] == pytest.approx(45.0)  # 90 degrees in 2 s
    assert a[("R.angle", (3,))] == pytest.approx(170.0)
    # an arc turns the object with its heading: a quarter circle to the left
    arc = box(0, 5, motion=Motion("constant", speed=math.pi / 2, heading=0.0, curvature=0.5))
    assert answers(scene([arc]))[("R.angle", (0,))] == pytest.approx(90.0)
    pan = answers(scene([box(0, 5)], camera=Camera(pitch=PITCH, yaw_rate=math.radians(15))))
    assert pan[("R.camera_pan", ())] == pytest.approx(30.0)


def test_c_counts_marked_objects_only():
    objs = [
        box(-2, 5, motion=Motion("constant", speed=0.5, heading=0.0)),
        box(0, 7, motion=Motion("start", speed=1.0, t_start=1.0, heading=1.0)),
        box(2, 5, motion=Motion(spin=1.0)),
        box(1, 9, motion=Motion("constant", speed=0.5, heading=2.0)),
    ]
    a = enumerate_answers(scene(objs), [1, 2, 3, None])  # the last one is not marked
    assert a[("C.moving", ())] == 2
    assert a[("C.turning", ())] == 1
    assert all(objs != (3,) for (_, objs) in a)


def test_t_directions():
    objs = [
        box(-1, 5, motion=Motion("constant", speed=1.0, heading=math.pi)),
        box(1, 7, motion=Motion("constant", speed=1.0, heading=-math.pi / 2)),
        box(2, 5, motion=Motion("constant", speed=1.0, heading=math.pi / 4)),  # diagonal: no clear answer
        box(0, 8, motion=Motion("constant", speed=0.1, heading=0.0)),  # 0.2 m: too short
    ]
    a = answers(scene(objs, camera=Camera(pitch=PITCH, velocity=(0.0, 0.4))))
    assert a[("T.direction", (0,))] == "to the left"
    assert a[("T.direction", (1,))] == "toward the camera"
    assert ("T.direction", (2,)) not in a and ("T.direction", (3,)) not in a
    assert a[("T.camera", ())] == "forward"
    assert a[("DP.camera", ())] == pytest.approx(0.8)


def test_fp_direction_and_stop_time():
    objs = [
        box(-1, 5),
        box(1, 5, motion=Motion("stop", speed=1.0, t_stop=1.2, heading=math.pi / 2)),
        box(2, 8, motion=Motion("constant", speed=1.0, heading=0.0)),
        box(0, 9, motion=Motion("start", speed=1.0, t_start=0.5, heading=0.0)),
    ]
    a = answers(scene(objs))
    assert a[("FP.direction", (0,))] == "it stays in place"
    assert a[("FP.direction", (1,))] == "away from the camera"
    assert a[("FP.stop_time", (1,))] == pytest.approx(0.6)  # 1.2 s of 2 s
    assert a[("FP.stop_time", (2,))] is None  # never stops
    assert ("FP.stop_time", (3,)) not in a  # not moving at the start: the premise does not apply
    assert format_value(0.6 * 2.0, "s") == "1.2 s"


def test_sa_speed_acceleration_profile():
    objs = [
        box(-1, 5, motion=Motion("constant", speed=1.5, heading=0.0)),
        box(1, 7, motion=Motion("accelerate", v0=0.5, accel=0.5, heading=math.pi / 2)),
        box(2, 9, motion=Motion("stop_start", speed=1.0, t_stop=0.5, t_start=1.5, heading=0.0)),
    ]
    a = answers(scene(objs))
    assert a[("SA.avg_speed", (0,))] == pytest.approx(1.5)
    assert a[("SA.avg_speed", (1,))] == pytest.approx(1.0)  # 0.5 * 2 + 0.25 * 4 = 2 m in 2 s
    assert a[("SA.acceleration", (1,))] == pytest.approx(0.5)
    assert a[("SA.avg_speed", (2,))] == pytest.approx(0.5)  # moves 1 s of 2 s at 1 m/s
    assert a[("SA.profile", (0,))] == "it keeps a steady speed"
    assert a[("SA.profile", (1,))] == "it speeds up"
    assert a[("SA.profile", (2,))] == "it stops, then moves again"
    assert ("SA.acceleration", (0,)) not in a


def test_dp_displacement_and_path_length_on_an_arc():
    # a quarter circle of radius 2 m: path pi m, chord 2 * sqrt(2) m
    arc = box(0, 5, motion=Motion("constant", speed=math.pi / 2, heading=0.0, curvature=0.5))
    a = answers(scene([arc]))
    assert a[("DP.path_length", (0,))] == pytest.approx(math.pi)
    assert a[("DP.displacement", (0,))] == pytest.approx(2 * math.sqrt(2))


def test_speed_questions_need_the_timestamps():
    """The same frames at another frame rate: identical pictures, different speed answers."""
    slow = scene([box(0, 5, motion=Motion("constant", speed=0.5, heading=0.0))], fps=5.0)
    fast = scene([box(0, 5, motion=Motion("constant", speed=1.0, heading=0.0))], fps=10.0)
    assert np.array_equal(render(slow).rgb, render(fast).rgb)
    assert answers(slow)[("SA.avg_speed", (0,))] == pytest.approx(0.5)
    assert answers(fast)[("SA.avg_speed", (0,))] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def entries():
    cands = simulate_candidates(240, seed=11, cfg=WorldConfig(frames=16, height=48, width=48))
    return assemble_questions(cands, seed=11, split="train")


def _number(text):
    return float(re.match(r"-?[\d.]+", text).group(0))


def test_assembled_questions_are_well_formed(entries):
    assert len({e["id"] for e in entries}) == len(entries)
    cats = collections.Counter(e["category"] for e in entries)
    assert set(cats) == set(CATEGORIES), cats
    for e in entries:
        t = TEMPLATES[e["template"]]
        assert e["task"] == CATEGORIES[t.category]
        assert 4 <= len(e["options"]) <= 5
        assert len(set(map(str, e["options"]))) == len(e["options"])
        assert sum(o == e["answer"] and type(o) is type(e["answer"]) for o in e["options"]) == 1
        for n in e["objects"]:
            assert f"<obj_{n}>" in e["question"]
        assert "<obj_" not in e["question_raw"]
        if t.kind == "number":
            vals = sorted(_number(o) for o in e["options"])
            assert all(b / a >= 1.2 for a, b in zip(vals, vals[1:])), e["options"]  # 25 % before rounding
        if t.kind == "fraction":
            assert NEVER_STOPS in e["options"]


def test_every_option_set_is_shared_and_each_option_is_right_once(entries):
    """The no-shortcut construction: questions sharing an option set have different answers, one
    per option, so no text-only rule can prefer one option over another."""
    groups = collections.defaultdict(list)
    for e in entries:
        kind = TEMPLATES[e["template"]].kind
        if kind in ("number", "vector"):
            groups[(e["template"], tuple(sorted(e["options"])))].append(e["answer"])
    assert len(groups) > 20
    for key, answers_ in groups.items():
        # (two groups may show the same set; then each option is right once per group)
        counts = collections.Counter(answers_)
        assert set(counts) == set(key[1]) and len(set(counts.values())) == 1, (key, counts)


def test_answer_positions_and_classes_are_balanced(entries):
    by_template = collections.defaultdict(collections.Counter)
    classes = collections.defaultdict(collections.Counter)
    for e in entries:
        by_template[e["template"]][answer_index(e["options"], e["answer"])] += 1
        if TEMPLATES[e["template"]].kind in ("choice", "count"):
            classes[e["template"]][e["answer"]] += 1
    for name, counts in by_template.items():
        n_opt = TEMPLATES[name].num_options
        assert len(counts) == n_opt and max(counts.values()) - min(counts.values()) <= 1, (name, counts)
    for name, counts in classes.items():
        assert len(set(counts.values())) == 1, (name, counts)  # every class equally often


def test_som_image_draws_legible_numbers():
    frame = np.full((64, 64, 3), 90, np.uint8)
    out = draw_som(frame, {3: (20.0, 30.0, 40.0, 50.0), 12: (2.0, 2.0, 30.0, 28.0)})
    # tag of box 3: black 5x7 block at its top-left corner with the glyph of '3' inside
    tag = out[30:37, 20:25]
    assert (tag[0] == 0).all() and (tag[-1] == 0).all()
    glyph = tag[1:6, 1:4].max(-1) > 0
    assert np.array_equal(glyph, _GLYPHS["3"])
    # two digits side by side for 12
    both = out[3:8, 3:10].max(-1) > 0
    assert np.array_equal(both[:, :3], _GLYPHS["1"]) and np.array_equal(both[:, 4:7], _GLYPHS["2"])
    assert (out[49, 20:40] != 90).all() and (out[30:50, 39] != 90).all()  # box outline drawn
    big = draw_som(np.zeros((128, 128, 3), np.uint8), {1: (10.0, 10.0, 60.0, 60.0)})
    assert big[10:24, 10:20].any()  # scaled x2 at 128 px
    with pytest.raises(ValueError, match="frame must be uint8"):
        draw_som(np.zeros((8, 8)), {})


def test_som_tag_of_a_small_box_stays_outside_it():
    out = draw_som(np.full((64, 64, 3), 90, np.uint8), {5: (30.0, 30.0, 36.0, 34.0)})
    inner = out[31:33, 31:35]  # inside the outline
    assert (inner == 90).all()
    assert (out == 0).all(-1).sum() >= 5 * 7 - _GLYPHS["5"].sum()  # the tag is drawn somewhere else


def test_som_tags_never_touch():
    """Neighbouring tags would read as one number ("2" next to "4" looks like 24)."""
    from rgpt4d.data.som import _tag_position

    boxes = {1: (12.0, 11.0, 20.0, 20.0), 2: (10.0, 10.0, 14.0, 14.0), 4: (14.0, 10.0, 30.0, 30.0)}
    taken = []
    for _, (x0, y0, x1, y1) in sorted(boxes.items()):
        box = (int(y0), int(x0), int(np.ceil(y1)) - 1, int(np.ceil(x1)) - 1)
        r, c = _tag_position(box, (7, 5), taken, (64, 64))
        for tr, tc, h, w in taken:  # a one-pixel gap at least
            assert r + 7 + 1 <= tr or tr + h + 1 <= r or c + 5 + 1 <= tc or tc + w + 1 <= c
        taken.append((r, c, 7, 5))
    out = draw_som(np.zeros((64, 64, 3), np.uint8), boxes)
    for n in boxes:  # every number's glyph is drawn in its box colour
        colour = np.array(BOX_COLOURS[n - 1])
        assert (out == colour).all(-1).sum() >= _GLYPHS[str(n)].sum()
