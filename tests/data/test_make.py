"""`data make` / `show` / `stats`: files, determinism, the datasets and collate, clear errors."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from rgpt4d.data.cli import main, register
from rgpt4d.data.dataset import Synth4DQuestions, Synth4DVideos, collate
from rgpt4d.data.generate import MakeConfig, make_dataset, make_video
from rgpt4d.data.schema import CATEGORIES, LETTERS
from rgpt4d.data.storage import load_manifest
from rgpt4d.data.world import WorldConfig

ARGS = [
    "--num-videos",
    "40",
    "--seed",
    "5",
    "--frames",
    "6",
    "--size",
    "32",
    "--shard-size",
    "8",
    "--test-fraction",
    "0.4",
    "--quiet",
]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    assert main(["data", "make", "--out", str(out), "--workers", "2"] + ARGS) == 0
    return out


def test_layout_and_schema(dataset):
    names = {p.name for p in dataset.iterdir()}
    assert {"manifest.json", "train.json", "val.json", "test.json", "shards", "images"} <= names
    manifest = load_manifest(dataset)
    assert manifest["schema_version"] == 1 and len(manifest["videos"]) == 40
    assert len(list((dataset / "shards").iterdir())) == 5
    assert len(list((dataset / "images").iterdir())) == 40
    videos = {v["id"]: v for v in manifest["videos"]}
    split_of = {}
    for split in ("train", "val", "test"):
        for e in json.loads((dataset / f"{split}.json").read_text()):
            for key in (
                "id",
                "benchmark",
                "task",
                "video",
                "som_image",
                "question",
                "question_raw",
                "options",
                "answer",
            ):
                assert key in e
            assert e["task"] in CATEGORIES.values()
            assert e["answer"] in e["options"]
            assert (dataset / e["som_image"]).is_file()
            assert videos[e["video"]]["split"] == split
            assert split_of.setdefault(e["video"], split) == split  # split by video
    assert [sum(1 for v in videos.values() if v["split"] == s) for s in ("train", "val", "test")] == [
        20,
        4,
        16,
    ]
    v = manifest["videos"][0]
    assert len(v["timestamps"]) == 6 and set(v["arrays"]) == {
        "rgb",
        "depth",
        "flow",
        "instance",
        "motion",
        "boxes",
        "visible_pixels",
    }
    obj = v["objects"][0]
    assert (
        len(obj["position"]) == 6
        and len(obj["velocity"]) == 6
        and len(obj["yaw"]) == 6
        and len(obj["size"]) == 3
    )


def test_same_seed_gives_identical_bytes_whatever_the_workers(dataset, tmp_path):
    again = tmp_path / "again"
    assert main(["data", "make", "--out", str(again), "--workers", "1"] + ARGS) == 0
    assert _digest(again) == _digest(dataset)
    other = tmp_path / "other"
    args = list(ARGS)
    args[args.index("--seed") + 1] = "6"
    assert main(["data", "make", "--out", str(other), "--workers", "1"] + args) == 0
    assert _digest(other)["train.json"] != _digest(dataset)["train.json"]


def test_stored_arrays_match_the_renderer(dataset):
    ds = Synth4DVideos(dataset)
    item = ds[3]
    v = make_video(3, 5, WorldConfig(frames=6, height=32, width=32))
    assert item["video_id"] == "v000003"
    assert torch.equal(item["frames"], torch.from_numpy(v.render.rgb).permute(0, 3, 1, 2))
    assert torch.allclose(item["depth"], torch.from_numpy(v.render.depth), rtol=1e-3)
    assert torch.allclose(item["flow"], torch.from_numpy(v.render.flow), atol=2e-2)
    assert torch.equal(item["instance"], torch.from_numpy(v.render.instance).long())
    assert torch.equal(item["motion"], torch.from_numpy(v.render.motion))
    assert torch.allclose(item["timestamps"], torch.tensor(v.scene.timestamps, dtype=torch.float32))


def test_collate_mixes_frame_rates_region_counts_and_lengths(dataset):
    qs = Synth4DQuestions(dataset, split="train")
    counts = {}
    for i, e in enumerate(qs.entries):
        counts.setdefault(len(e["regions"]), i)
    assert len(counts) >= 2, "need questions with different region counts"
    items = [qs[i] for i in counts.values()]
    assert len({float(it["timestamps"][-1]) for it in items}) == len(items)  # different durations / rates
    batch = collate(items)
    B, R = len(items), max(counts)
    assert batch["frames"].shape == (B, 6, 3, 32, 32) and batch["frames"].dtype == torch.uint8
    assert batch["boxes"].shape == (B, R, 4)
    assert batch["region_mask"].sum(1).tolist() == [len(it["region_ids"]) for it in items]
    assert batch["answer_index"].tolist() == [it["answer_index"] for it in items]
    assert batch["prompt"][0].endswith("Answer with only the letter of the correct option.")
    assert "(A) " in batch["prompt"][0]
    # different lengths: cut one item's frames and pad back
    short = dict(items[0])
    short["frames"], short["timestamps"] = items[0]["frames"][:4], items[0]["timestamps"][:4]
    batch = collate([short, items[1]])
    assert batch["frame_mask"].tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert batch["frames"][0, 4:].eq(0).all()
    # videos with different object counts
    vids = Synth4DVideos(dataset, split="train")
    vb = collate([vids[i] for i in range(4)])
    K = max(len(vids.videos[i]["objects"]) for i in range(4))
    assert vb["object_boxes"].shape == (4, 6, K, 4) and vb["flow"].shape == (4, 6, 32, 32, 2)
    with pytest.raises(ValueError, match="'frames' has shapes"):
        other = dict(items[1])
        other["frames"] = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
        collate([items[0], other])


def test_register_adds_commands_with_int_returning_funcs(dataset, capsys):
    parser = argparse.ArgumentParser(prog="rgpt4d")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "stats", str(dataset)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "answer positions" in out and "videos per fps" in out
    for split_counts in load_manifest(dataset)["splits"].values():
        assert split_counts["videos"] > 0
    args = parser.parse_args(["eval-answers", "--questions", "q.json", "--predictions", "p.jsonl"])
    assert callable(args.func)


def test_show_writes_a_contact_sheet(dataset, tmp_path):
    out = tmp_path / "sheet.png"
    assert main(["data", "show", str(dataset), "--index", "1", "--out", str(out)]) == 0
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 600 and img.size[1] > 600


def test_stats_json_counts(dataset, capsys):
    assert main(["data", "stats", str(dataset), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    total = sum(stats["questions"].values())
    assert sum(stats["answer_positions"]["All"].values()) == total
    assert set(stats["answer_positions"]["All"]) <= set(LETTERS[:5])
    assert sum(stats["fps"].values()) == 40


@pytest.mark.parametrize(
    "argv,message",
    [
        (["data", "make", "--out", "X", "--num-videos", "0"], "--num-videos must be >= 1"),
        (["data", "make", "--out", "X", "--num-videos", "two"], "--num-videos must be an integer"),
        (["data", "make", "--out", "X", "--num-videos", "2", "--workers", "0"], "--workers must be >= 1"),
        (["data", "make", "--out", "X", "--num-videos", "2", "--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_and_paths_are_clear_errors(dataset, tmp_path, capsys):
    assert (
        main(["data", "make", "--out", str(tmp_path / "a"), "--num-videos", "2", "--frames", "1", "--quiet"])
        == 2
    )
    assert "--frames must be an integer in [2, 256]" in capsys.readouterr().err
    assert (
        main(["data", "make", "--out", str(tmp_path / "a"), "--num-videos", "2", "--size", "8", "--quiet"])
        == 2
    )
    assert "--size must be an integer in [16, 1024]" in capsys.readouterr().err
    assert main(["data", "make", "--out", str(dataset), "--num-videos", "2", "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["data", "show", str(dataset), "--index", "99", "--out", str(tmp_path / "x.png")]) == 2
    assert "--index must be in [0, 40)" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--shard-size must be"):
        make_dataset(MakeConfig(out=str(tmp_path / "b"), num_videos=3, shard_size=0))
    with pytest.raises(ValueError, match="fields: unknown"):
        Synth4DVideos(dataset, fields=("rgb", "normals"))
    with pytest.raises(ValueError, match="split must be one of"):
        Synth4DQuestions(dataset, split="dev")


def test_stats_baseline_gate(dataset, capsys):
    assert main(["data", "stats", str(dataset), "--baseline"]) == 0
    assert "not judged" in capsys.readouterr().err  # 40 videos: too few test questions to judge
    assert (
        main(["data", "stats", str(dataset), "--baseline", "--min-questions", "1", "--max-margin", "100"])
        == 0
    )
    assert "text-only baseline" in capsys.readouterr().out
    assert (
        main(["data", "stats", str(dataset), "--baseline", "--min-questions", "1", "--max-margin", "-100"])
        == 1
    )
    assert "beats chance by more than -100.0 points" in capsys.readouterr().err


def test_split_fractions_are_validated(tmp_path, capsys):
    out = str(tmp_path / "a")
    assert main(["data", "make", "--out", out, "--num-videos", "4", "--test-fraction", "0.7", "--quiet"]) == 2
    assert "--test-fraction must be in [0, 0.5)" in capsys.readouterr().err
