"""The R4D-Bench loader on a fixture written in the release layout (mixed types, clipped/ before
videos/, images/), with real mp4 files written through PyAV."""

import json
import sys

import av  # noqa: E402  (a test dependency: the fixture writes real mp4 files)
import numpy as np
import pytest
import torch
from PIL import Image

from rgpt4d.data.dataset import collate
from rgpt4d.data.evaluate import evaluate
from rgpt4d.data.r4d_bench import R4DBench, decode_video, resolve_video


def write_mp4(path, colour, n, fps, size=(48, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.zeros((*size, 3), np.uint8)
            img[...] = colour
            img[:, : 2 + i % 8] = 255  # a moving bar so frames differ
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


ENTRIES = [
    {
        "id": 0,
        "benchmark": "stibench",
        "task": "Dimensional Measurement",
        "video": "videos/stibench/a.mp4",
        "source": "videos/stibench/a.mp4",
        "som_image": "images/stibench/0.png",
        "question": "How tall is <obj_1>?",
        "question_raw": "How tall is the car?",
        "options": [0, 1, 2, 3],
        "answer": 0,
    },
    {
        "id": "q2",
        "benchmark": "vlm4d",
        "task": "False Positives",
        "video": "clipped/vlm4d/b.mp4",
        "source": "videos/vlm4d/b.mp4",
        "som_image": "images/vlm4d/q2.png",
        "question": "Which way does <obj_1> turn?",
        "question_raw": "Which way does the dog turn?",
        "options": ["left", "right", None, "it does not turn"],
        "answer": None,
    },
    {
        "id": 7,
        "benchmark": "stibench",
        "task": "Speed & Acceleration",
        "video": "clipped/stibench/a.mp4",
        "source": "videos/stibench/a.mp4",
        "question": "How fast is <obj_2>?",
        "question_raw": "How fast is the bus?",
        "options": ["1.5 m/s", 2, "3", None],
        "answer": 2,
    },
    {
        "id": 8,
        "benchmark": "stibench",
        "task": "Counting",
        "video": "videos/stibench/a.mp4",
        "source": "videos/stibench/a.mp4",
        "question": "How many?",
        "question_raw": "How many?",
        "options": [3, 0, 1, 2],
        "answer": "0",
    },
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("r4d")
    (root / "test.json").write_text(json.dumps(ENTRIES))
    write_mp4(root / "videos/stibench/a.mp4", (0, 0, 200), n=30, fps=10)  # full video: blue, 3 s
    write_mp4(root / "clipped/stibench/a.mp4", (200, 0, 0), n=12, fps=4)  # clipped: red, 2.75 s
    write_mp4(root / "videos/vlm4d/b.mp4", (0, 200, 0), n=20, fps=25)  # only a full video
    for bench, i in (("stibench", 0), ("vlm4d", "q2"), ("stibench", 7), ("stibench", 8)):
        p = root / "images" / bench / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(p)
    return root


def test_mixed_types_and_answer_indices(release):
    ds = R4DBench(release, num_frames=8)
    assert len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert [it["id"] for it in items] == ["0", "q2", "7", "8"]
    assert [it["answer_index"] for it in items] == [0, 2, 1, 1]  # int 0; None; 2 (not "3"); "0" -> 0
    assert items[1]["options"] == ["left", "right", "None", "it does not turn"]
    assert [it["category"] for it in items] == ["DM", "FP", "SA", "C"]
    assert items[0]["prompt"].splitlines()[2] == "(A) 0"


def test_clipped_preferred_over_videos(release):
    ds = R4DBench(release, num_frames=8)
    first = ds[0]  # its `video` names videos/..., but a clipped version exists
    assert first["video_path"].endswith("clipped/stibench/a.mp4")
    red = first["frames"][:, 0, :, 20:].float().mean()
    blue = first["frames"][:, 2, :, 20:].float().mean()
    assert red > 150 and blue < 50
    second = ds[1]  # clipped/vlm4d/b.mp4 does not exist: falls back to videos/
    assert second["video_path"].endswith("videos/vlm4d/b.mp4")
    assert second["frames"][:, 1, :, 20:].float().mean() > 150


def test_timestamps_are_seconds_and_frames_sampled_uniformly(release):
    frames, ts = decode_video(release / "videos/stibench/a.mp4", num_frames=4)
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8
    assert torch.allclose(ts, torch.tensor([0.0, 1.0, 1.9, 2.9]), atol=1e-4)  # 30 frames at 10 fps
    _, ts = decode_video(release / "videos/vlm4d/b.mp4", num_frames=3)
    assert torch.allclose(ts, torch.tensor([0.0, 0.4, 0.76]), atol=1e-4)  # 20 frames at 25 fps
    small, _ = decode_video(release / "clipped/stibench/a.mp4", num_frames=2, size=(24, 32))
    assert small.shape == (2, 3, 24, 32)


def test_collate_and_evaluate_release_items(release):
    ds = R4DBench(release, num_frames=8, size=(24, 32))
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["frames"].shape == (3, 8, 3, 24, 32)
    assert batch["boxes"].shape == (3, 0, 4) and batch["region_mask"].shape == (3, 0)
    assert batch["som_image"].shape == (3, 3, 24, 32)
    rep = evaluate(ENTRIES, {0: "A", "q2": "The answer is (C)", 7: "(A)", 8: "B"})
    assert (
        rep.scores["DM"] == 100.0
        and rep.scores["FP"] == 100.0
        and rep.scores["SA"] == 0.0
        and rep.scores["C"] == 100.0
    )


def test_missing_files_and_missing_pyav_are_clear(release, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no video for entry 'x'.*clipped/stibench/zzz.mp4"):
        resolve_video(release, {"id": "x", "benchmark": "stibench", "video": "videos/stibench/zzz.mp4"})
    with pytest.raises(FileNotFoundError, match="test.json not found"):
        R4DBench(tmp_path)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match="pip install av"):
        R4DBench(release)
    with pytest.raises(ImportError, match="pip install av"):
        decode_video(release / "videos/stibench/a.mp4")
    ds = R4DBench(release, load_video=False)  # text, answers and SoM images need no decoder
    assert "frames" not in ds[0] and ds[0]["som_image"].shape == (3, 48, 64)
