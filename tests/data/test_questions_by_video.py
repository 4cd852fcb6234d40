"""QuestionsByVideo: a split's questions grouped by video for multi-turn training."""

import copy
import json

import pytest

from rgpt4d.data import QuestionsByVideo, Synth4DQuestions, collate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rgpt4d.cli import main

    out = tmp_path_factory.mktemp("qbv")
    assert main(["data", "make", "--out", str(out), "--num-videos", "24", "--frames", "4", "--size", "32", "--min-objects", "2", "--max-objects", "4",
                 "--workers", "1", "--val-fraction", "0", "--test-fraction", "0", "--overwrite", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("k", [1, 3, 100])
def test_every_question_once_in_chunks_of_one_video(data, k):
    qs = Synth4DQuestions(data, "train")
    ds = QuestionsByVideo(qs, k)
    seen = sorted(i for c in ds.chunks for i in c)
    assert len(qs) > 50 and seen == list(range(len(qs)))
    for c in ds.chunks:
        assert 1 <= len(c) <= k and len({qs.entries[i]["video"] for i in c}) == 1
    per_video = {}
    for c in ds.chunks:
        per_video.setdefault(qs.entries[c[0]]["video"], []).append(len(c))
    assert all(max(v) - min(v) <= 1 for v in per_video.values())  # near-equal chunks
    if k == 100:
        assert len(ds) == len(per_video)
    assert [c for c in QuestionsByVideo(qs, k).chunks] == ds.chunks  # deterministic


def test_items_hold_the_chunk_and_collate(data):
    qs = Synth4DQuestions(data, "train")
    ds = QuestionsByVideo(qs, 4)
    item = ds[0]
    c = ds.chunks[0]
    assert item["turn_prompts"] == [qs[i]["prompt"] for i in c]
    assert item["turn_answers"] == [qs[i]["answer_index"] for i in c]
    assert item["turn_options"] == [qs[i]["options"] for i in c]
    assert item["video_id"] == qs.entries[c[0]]["video"] and item["frames"].shape[0] == 4
    batch = collate([ds[0], ds[1]])
    assert len(batch["turn_prompts"]) == 2 and batch["frames"].shape[0] == 2


def test_errors(data, tmp_path):
    qs = Synth4DQuestions(data, "train")
    with pytest.raises(ValueError, match="max_questions: must be an integer >= 1"):
        QuestionsByVideo(qs, 0)
    bad = copy.copy(qs)
    bad.entries = copy.deepcopy(qs.entries)
    video = bad.entries[0]["video"]
    other = next(e for e in bad.entries[1:] if e["video"] == video)
    other["regions"] = other["regions"][:-1] if len(other["regions"]) > 1 else []
    with pytest.raises(ValueError, match=f"marks other regions than .* of the same video {video}"):
        QuestionsByVideo(bad, 4)
    json.dumps(qs.entries[0])  # entries untouched
