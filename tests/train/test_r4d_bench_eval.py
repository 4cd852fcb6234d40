"""`rgpt4d eval r4d-bench` end to end on a fake release with real mp4 files, its resumable
predictions, and every kind of bad release input (and `rgpt4d eval-answers` on bad questions files)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av", reason="PyAV (`pip install av`) decodes the release's mp4 files")

from rgpt4d.cli import main  # noqa: E402
from rgpt4d.data.som import boxes_from_som, draw_som  # noqa: E402

TASKS = ["Dimensional Measurement", "Spatial Relation", "Counting", "Speed & Acceleration", "False Positives",
         "Translational", "Rotational", "3D Video Grounding"]
SIZE = (48, 64)  # H, W of the videos and SoM images
BOXES = {1: (4.0, 6.0, 30.0, 40.0), 2: (34.0, 8.0, 60.0, 30.0)}


def write_mp4(path, n=12, fps=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.height, s.width = SIZE
        s.pix_fmt = "yuv420p"
        base = (rng.random((*SIZE, 3)) * 200).astype(np.uint8)
        for i in range(n):
            img = base.copy()
            img[:, (3 * i) % 60: (3 * i) % 60 + 4] = 255  # a moving bar
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return base


def make_release(root, n=6):
    """n entries over two videos; SoM images with two numbered boxes; mixed id and option types."""
    entries = []
    for v in range(2):
        base = write_mp4(root / "videos" / "stibench" / f"v{v}.mp4", seed=v)
    for i in range(n):
        eid = i if i % 2 else f"q{i}"
        som = draw_som(np.asarray(Image.new("RGB", SIZE[::-1], (40, 40, 40))) if i % 3 == 0 else base, BOXES)
        (root / "images" / "stibench").mkdir(parents=True, exist_ok=True)
        Image.fromarray(som).save(root / "images" / "stibench" / f"{eid}.png")
        entries.append({"id": eid, "benchmark": "stibench", "task": TASKS[i % len(TASKS)],
                        "video": f"videos/stibench/v{i % 2}.mp4", "som_image": f"images/stibench/{eid}.png",
                        "question": "Is <obj_1> taller than <obj_2>?" if i % 2 else "How far does <obj_1> move?",
                        "options": ["yes", "no", 3, "1.5 m"], "answer": ["yes", "no", 3, "1.5 m"][i % 4]})
    (root / "test.json").write_text(json.dumps(entries))
    return entries


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """An untrained smoke student (4 frames of 32 px, region tokens: the paper's default region mode)."""
    import torch

    from rgpt4d.infer import save_inference_model
    from rgpt4d.models.configs import student_config
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.tokenizer import train_tokenizer

    tok = train_tokenizer(vocab_size=600)
    torch.manual_seed(0)
    model = RGPT4DForConditionalGeneration(student_config("smoke", tok))
    assert model.config.region_mode == "tokens"
    return save_inference_model(model, tok, tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    return root, make_release(root)


def run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_boxes_from_som_reads_the_drawn_boxes():
    rng = np.random.default_rng(1)
    frame = (rng.random((48, 64, 3)) * 160).astype(np.uint8)
    boxes = {1: (4.0, 6.0, 30.0, 40.0), 2: (34.0, 8.0, 60.0, 30.0), 3: (20.0, 30.0, 50.0, 47.0), 10: (0.0, 0.0, 64.0, 48.0)}
    got = boxes_from_som(draw_som(frame, boxes), [1, 2, 3, 4, 10])
    assert set(got) == {1, 2, 3, 10}  # 4 is not drawn
    for n in (1, 2, 3, 10):
        assert got[n] == pytest.approx(boxes[n]), n


def test_eval_r4d_bench_end_to_end_and_resume(release, student, tmp_path, capsys):
    root, entries = release
    out = tmp_path / "out"
    rc, stdout, err = run(["eval", "r4d-bench", "--root", str(root), "--model", str(student), "--out", str(out),
                           "--limit", "4", "--quiet"], capsys)
    assert rc == 0, err
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [str(e["id"]) for e in entries[:4]]
    assert all(p["prediction"] in "ABCD" for p in preds)
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["Avg"] == 4 and rep["answered_now"] == 4 and rep["skipped"] == 0 and rep["missing"] == 0
    # every <obj_N> of the questions was found in its SoM image (the student reads region tokens)
    assert rep["regions_referenced"] == 6 and rep["regions_found"] == 6
    md = (out / "report.md").read_text()
    assert "| Avg | Sta | Dyn | VG | DM | SR | R | C | T | FP | SA | DP |" in md and "| Avg |" in stdout
    # the score is the predictions' accuracy
    letters = "ABCD"
    right = sum(p["prediction"] == letters[e["options"].index(e["answer"])] for p, e in zip(preds, entries))
    assert rep["scores"]["Avg"] == pytest.approx(100 * right / 4)
    # a rerun answers only the rest; a third run nothing
    rc, _, err = run(["eval", "r4d-bench", "--root", str(root), "--model", str(student), "--out", str(out),
                      "--quiet"], capsys)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["answered_now"] == len(entries) - 4 and rep["counts"]["Avg"] == len(entries)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(str(e["id"]) for e in entries)
    rc, _, _ = run(["eval", "r4d-bench", "--root", str(root), "--model", str(student), "--out", str(out),
                    "--quiet"], capsys)
    assert rc == 0 and json.loads((out / "report.json").read_text())["answered_now"] == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(entries)


def test_som_region_mode_reads_the_som_image(release, tmp_path, capsys):
    """A student whose region mode is "som" gets the SoM image as its first image."""
    import torch

    from rgpt4d.infer import save_inference_model
    from rgpt4d.models.configs import student_config
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.tokenizer import train_tokenizer

    tok = train_tokenizer(vocab_size=600)
    torch.manual_seed(0)
    path = save_inference_model(RGPT4DForConditionalGeneration(student_config("smoke", tok, region_mode="som")), tok,
                                tmp_path / "som_model")
    root, entries = release
    rc, _, err = run(["eval", "r4d-bench", "--root", str(root), "--model", str(path), "--out", str(tmp_path / "o"),
                      "--limit", "2", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["counts"]["Avg"] == 2


def _break(root, case, entries):
    """Damage a copy of the release; returns (the file the error must name, the bad entry's id)."""
    e = entries[2]
    if case == "missing field":
        data = json.loads((root / "test.json").read_text())
        del data[2]["options"]
        (root / "test.json").write_text(json.dumps(data))
        return root / "test.json", e["id"]
    if case == "answer not among options":
        data = json.loads((root / "test.json").read_text())
        data[2]["answer"] = "maybe"
        (root / "test.json").write_text(json.dumps(data))
        return root / "test.json", e["id"]
    if case == "missing video":
        data = json.loads((root / "test.json").read_text())
        data[2]["video"] = "videos/stibench/gone.mp4"
        (root / "test.json").write_text(json.dumps(data))
        return "gone.mp4", e["id"]
    if case == "undecodable video":
        data = json.loads((root / "test.json").read_text())
        data[2]["video"] = "videos/stibench/broken.mp4"
        (root / "test.json").write_text(json.dumps(data))
        (root / "videos" / "stibench" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 20)
        return root / "videos" / "stibench" / "broken.mp4", e["id"]
    if case == "missing SoM image":
        (root / "images" / "stibench" / f"{e['id']}.png").unlink()
        return f"{e['id']}.png", e["id"]
    raise AssertionError(case)


CASES = ["missing field", "answer not among options", "missing video", "undecodable video", "missing SoM image"]


@pytest.mark.parametrize("case", CASES)
def test_bad_release_input_is_one_clear_error_or_skipped(release, student, tmp_path, capsys, case):
    src, entries = release
    root = tmp_path / "release"
    shutil.copytree(src, root)
    named, eid = _break(root, case, entries)
    args = ["eval", "r4d-bench", "--root", str(root), "--model", str(student), "--quiet"]
    rc, _, err = run(args + ["--out", str(tmp_path / "a")], capsys)
    assert rc == 2
    assert err.count("rgpt4d eval r4d-bench: error:") == 1 and "Traceback" not in err
    assert str(named) in err and repr(eid) in err, err
    rc, _, err = run(args + ["--out", str(tmp_path / "b"), "--skip-bad"], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["skipped"] == 1 and rep["skipped_entries"][0]["id"] == eid and rep["skipped_entries"][0]["index"] == 2
    assert rep["counts"]["Avg"] == len(entries) - 1
    assert "1 bad entries skipped" in (tmp_path / "b" / "report.md").read_text()
    assert f"entry 2 (id {eid!r})" in err  # the skipped entry is reported


def test_malformed_json_and_other_usage_errors(release, student, tmp_path, capsys):
    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    (root / "test.json").write_text('[{"id": 0, "task": "Counting",,}]')
    for extra in ([], ["--skip-bad"]):  # a file that does not parse cannot be skipped around
        rc, _, err = run(["eval", "r4d-bench", "--root", str(root), "--model", str(student), "--out",
                          str(tmp_path / "o"), "--quiet", *extra], capsys)
        assert rc == 2 and str(root / "test.json") in err and "not valid JSON" in err and "line 1" in err
    rc, _, err = run(["eval", "r4d-bench", "--root", str(release[0]), "--model", str(student), "--out",
                      str(tmp_path / "o"), "--num-frames", "16"], capsys)
    assert rc == 2 and "--num-frames 16" in err and "takes 4 frames" in err
    rc, _, err = run(["eval", "r4d-bench", "--root", str(release[0]), "--model", str(student)], capsys)
    assert rc == 2 and "--out" in err


def test_eval_answers_bad_questions_name_the_file_and_entry(tmp_path, capsys):
    qs = [{"id": "a", "task": "Counting", "question": "How many?", "options": [1, 2], "answer": 1},
          {"id": "b", "task": "Counting", "question": "How many?", "answer": 2}]
    q, p = tmp_path / "test.json", tmp_path / "pred.jsonl"
    q.write_text(json.dumps(qs))
    p.write_text('{"id": "a", "prediction": "A"}\n{"id": "b", "prediction": "B"}\n')
    rc, _, err = run(["eval-answers", "--questions", str(q), "--predictions", str(p)], capsys)
    assert rc == 2 and str(q) in err and "entry 1 (id 'b')" in err and "'options'" in err and "Traceback" not in err
    rc, out, err = run(["eval-answers", "--questions", str(q), "--predictions", str(p), "--skip-bad",
                        "--json", str(tmp_path / "r.json")], capsys)
    assert rc == 0 and "entry 1 (id 'b')" in err and "1 bad entries skipped" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["counts"]["Avg"] == 1 and rep["scores"]["Avg"] == 100.0 and rep["skipped"] == 1
    q.write_text('[{"id": "a",')
    rc, _, err = run(["eval-answers", "--questions", str(q), "--predictions", str(p)], capsys)
    assert rc == 2 and str(q) in err and "not valid JSON" in err
