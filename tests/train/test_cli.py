"""The CLI end to end on the smoke preset: train teacher -> cache -> train student -> eval, a
resume through the CLI, and clear errors for bad input."""

import json

import pytest

from rgpt4d.cli import main
from rgpt4d.data.schema import REPORT_COLUMNS


def test_teacher_cache_student_eval(smoke_data, tmp_path, capsys):
    t, c, s = tmp_path / "teacher", tmp_path / "cache", tmp_path / "student"
    assert main(["train", "teacher", "--data", str(smoke_data), "--out", str(t), "--preset", "smoke", "--steps", "2",
                 "--batch-size", "2", "--quiet"]) == 0
    assert (t / "teacher.safetensors").exists() and (t / "teacher_config.json").exists()
    assert len((t / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["teacher", "cache", "--teacher", str(t), "--data", str(smoke_data), "--out", str(c), "--quiet"]) == 0
    assert main(["train", "student", "--data", str(smoke_data), "--teacher-cache", str(c), "--out", str(s),
                 "--preset", "smoke", "--steps", "2", "--p4d", "explicit", "--tpe", "off", "--ops", "eager",
                 "--eval-split", "test", "--quiet"]) == 0
    cfg = json.loads((s / "config.json").read_text())
    assert (cfg["p4d"], cfg["tpe"], cfg["ops"], cfg["steps"]) == ("explicit", False, "eager", 2)
    assert json.loads((s / "model" / "config.json").read_text())["tpe"] is False
    rows = [json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_ld"] for r in rows] == [0.0, 0.0] and all(r["loss_ed"] > 0 for r in rows)
    capsys.readouterr()

    report_path = tmp_path / "report.json"
    assert main(["eval", "--model", str(s / "model"), "--data", str(smoke_data), "--json", str(report_path),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| " + " | ".join(REPORT_COLUMNS) + " |" in printed
    report = json.loads(report_path.read_text())
    n_test = len(json.loads((smoke_data / "test.json").read_text()))
    assert list(report["scores"]) == list(REPORT_COLUMNS) and report["counts"]["Avg"] == n_test > 0
    assert 0 <= report["scores"]["Avg"] <= 100
    assert report == {**json.loads((s / "eval_test.json").read_text()), "markdown": report["markdown"]}

    # resume through the CLI: the run's saved config is the base, --steps extends it
    assert main(["train", "student", "--data", str(smoke_data), "--teacher-cache", str(c), "--out", str(s),
                 "--resume", "--steps", "3", "--quiet"]) == 0
    res = json.loads((s / "results.json").read_text())
    assert res["resumed_from"] == 2 and res["steps"] == 3
    cfg = json.loads((s / "config.json").read_text())
    assert (cfg["p4d"], cfg["tpe"], cfg["steps"]) == ("explicit", False, 3)
    assert len((s / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_errors(smoke_data, tmp_path, capsys):
    assert main(["train", "student", "--data", str(smoke_data), "--out", str(tmp_path / "x"), "--p4d", "both",
                 "--quiet"]) == 2
    assert "teacher_cache" in capsys.readouterr().err
    for bad in (["--p4d", "some"], ["--tpe", "maybe"], ["--ops", "fast"], ["--preset", "huge"], ["--steps", "-1"]):
        with pytest.raises(SystemExit):
            main(["train", "student", "--data", str(smoke_data), "--out", str(tmp_path / "y"), *bad])
        err = capsys.readouterr().err
        assert bad[0] in err, err
    assert main(["train", "student", "--data", str(smoke_data), "--out", str(tmp_path / "z"), "--p4d", "none",
                 "--batch-size", "4", "--grad-accum", "3", "--quiet"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--data", str(smoke_data), "--quiet"]) == 2
    assert "config.json" in capsys.readouterr().err
