"""`rgpt4d demo --preset smoke` end to end, the saved inference students, the report helpers, and
`rgpt4d study` on the demo's data, teacher and cache (a few steps)."""

import json
import time

import pytest
import torch

from rgpt4d.data.schema import REPORT_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rgpt4d.cli import main

    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    # --parallel: the two students train and evaluate in two spawned worker processes (the default on
    # a CPU with >= 2 threads; the test session runs with one thread, which would pick --sequential)
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--quiet", "--parallel"]) == 0
    seconds = time.time() - t0
    print(f"\nrgpt4d demo --preset smoke: {seconds:.0f} s")
    return out, json.loads((out / "results.json").read_text()), seconds


def test_demo_report_and_table(demo):
    out, res, seconds = demo
    report = (out / "report.md").read_text()
    header = "| | " + " | ".join(REPORT_COLUMNS) + " |"
    assert header in report
    for row in ("| chance |", "| SFT only |", "| P4D (latent + explicit) |", "| questions |"):
        assert row in report
    for name in ("student_losses.png", "teacher_losses.png", "teacher_test_video.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
        assert f"figures/{name}" in report
    # the teacher's quality, each metric beside its baseline
    for key in ("depth_absrel", "depth_absrel_mean_baseline", "flow_epe", "flow_epe_zero_baseline", "motion_iou"):
        assert res["teacher"][key] >= 0
    assert f"{res['teacher']['flow_epe']:.3f}" in report and f"{res['teacher']['flow_epe_zero_baseline']:.3f}" in report
    # the camray head's error beside the identity camera
    for key in ("camray_deg", "camray_deg_identity_baseline", "camray_moment", "camray_moment_identity_baseline"):
        assert res["teacher"][key] >= 0
    assert "| camera ray direction error, degrees (lower is better) |" in report
    assert f"{res['teacher']['camray_deg_identity_baseline']:.3f}" in report
    # the probes: the floor and both students, fitted on val and scored on test, in the report
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe) == {"vision", "sft", "p4d"} and probe == res["probe"]
    for feats in probe.values():
        for target in ("depth", "motion"):
            p = feats[target]
            assert p["r2"] <= 1.0 and p["n_fit"] > 0 and p["n_eval"] > 0
    assert probe["vision"]["depth"]["r2"] > 0.2  # depth is linear enough in the window's patch features
    assert f"| P4D (latent + explicit): LLM hidden states | {probe['p4d']['depth']['r2']:.3f} |" in report
    assert "frozen vision features (the floor)" in report
    # both students scored on every test question; chance is 1/options averaged, from test.json
    questions = json.loads((out / "data" / "test.json").read_text())
    assert res["counts"]["Avg"] == len(questions) > 0
    assert res["chance"]["Avg"] == pytest.approx(100 * sum(1 / len(q["options"]) for q in questions) / len(questions))
    for name in ("sft", "p4d"):
        scores = res["scores"][name]
        assert set(scores) == set(REPORT_COLUMNS) and 0 <= scores["Avg"] <= 100
    assert res["seconds"] <= seconds
    # both students ran in worker processes, and the report gives each one's training and evaluation time
    assert res["parallel"] is True
    for name, label in (("sft", "SFT only"), ("p4d", "P4D (latent + explicit)")):
        t = res["student_seconds"][name]
        assert 0 < t["train"] and 0 < t["eval"] and t["train"] + t["eval"] <= res["seconds"]
        assert f"| {label}: training / evaluation | {t['train']:.0f} / {t['eval']:.0f} |" in report
        assert (out / "eval" / f"{name}.json").exists() and (out / "eval" / f"{name}_predictions.jsonl").exists()
    assert "at the same time, in two processes" in report
    # the smoke students answer in the option format, read by likelihood, and the report says so
    assert res["scoring"] == {"sft": "likelihood", "p4d": "likelihood"}
    assert "scored by the likelihood of each option's answer text" in report


def test_demo_students_trained_as_named(demo):
    out, res, _ = demo
    sft = [json.loads(line) for line in (out / "train" / "sft" / "metrics.jsonl").read_text().splitlines()]
    p4d = [json.loads(line) for line in (out / "train" / "p4d" / "metrics.jsonl").read_text().splitlines()]
    assert len(sft) == len(p4d) == res["preset"]["student_steps"]  # same steps
    assert all(r["loss_ld"] == 0 and r["loss_ed"] == 0 for r in sft)
    assert all(r["loss_ld"] > 0 and r["loss_ed"] > 0 for r in p4d)
    # same seed: the first step's L_SFT is the same (same init, same first batch)
    assert sft[0]["loss_sft"] == pytest.approx(p4d[0]["loss_sft"], rel=1e-5)


def test_demo_inference_students_hold_no_teacher_and_no_p4d(demo):
    from safetensors import safe_open

    from rgpt4d.infer import RGPT4D
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    out, _, _ = demo
    weights = {}
    for name in ("sft", "p4d"):
        path = out / "students" / name
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            weights[name] = {k: f.get_tensor(k) for k in keys}
        for k in keys:
            assert not any(bad in k for bad in ("teacher", "decoder", "heads", "p4d")), k
        # exactly the parameters of a bare student built from the saved config
        model = RGPT4D.from_pretrained(path)
        bare = RGPT4DForConditionalGeneration(model.model.config)
        assert keys == set(bare.state_dict().keys())
        assert not any(hasattr(model.model, a) for a in ("decoder", "teacher_heads", "loss_fn"))
    # and they are two different trained models
    assert any(not torch.equal(weights["sft"][k], weights["p4d"][k]) for k in weights["sft"])


def test_demo_cli_picks_parallel_or_sequential(monkeypatch):
    import rgpt4d.demo
    from rgpt4d.cli import main

    seen = []
    monkeypatch.setattr(rgpt4d.demo, "run_demo", lambda preset, out, **kw: seen.append(kw["parallel"]))
    for flags in ([], ["--parallel"], ["--sequential"]):
        assert main(["demo", "--preset", "smoke", "--quiet", *flags]) == 0
    assert seen == [None, True, False]  # None: the default (parallel on a CPU with >= 2 threads)
    with pytest.raises(SystemExit):
        main(["demo", "--parallel", "--sequential"])


def test_demo_bad_arguments(tmp_path, capsys):
    from rgpt4d.cli import main
    from rgpt4d.demo import run_demo

    with pytest.raises(ValueError, match="preset: must be one of"):
        run_demo("huge", tmp_path, progress=False, log=None)
    with pytest.raises(SystemExit):
        main(["demo", "--preset", "huge"])
    assert "--preset" in capsys.readouterr().err


def test_chance_mean_std_and_tables():
    from rgpt4d.train.report import chance_scores, mean_std, scores_table

    qs = [{"id": 1, "task": "Counting", "options": [0, 1, 2, 3]},
          {"id": 2, "task": "False Positives", "options": list("abcde")},
          {"id": 3, "task": "Dimensional Measurement", "options": ["1 m", "2 m", "3 m", "4 m"]}]
    ch = chance_scores(qs)
    assert ch["C"] == 25.0 and ch["FP"] == 20.0 and ch["DM"] == 25.0 and ch["VG"] is None
    assert ch["Dyn"] == pytest.approx(22.5) and ch["Avg"] == pytest.approx(70 / 3)
    with pytest.raises(ValueError, match="no options"):
        chance_scores([{"id": 4, "task": "Counting", "options": []}])
    runs = [{c: 40.0 for c in REPORT_COLUMNS}, {c: 50.0 for c in REPORT_COLUMNS}]
    runs[1]["VG"] = None
    mean, std = mean_std(runs)
    assert mean["Avg"] == 45.0 and std["Avg"] == pytest.approx(7.0711, abs=1e-4)
    assert mean["VG"] == 40.0 and std["VG"] == 0.0
    table = scores_table({"x": mean, "chance": ch}, {"x": std})
    assert "| x | 45.0 ± 7.1 |" in table and "| chance | 23.3 |" in table and " - |" in table


def test_loss_curves_and_flow_colours(tmp_path):
    from rgpt4d.train.report import flow_to_rgb, plot_loss_curves, read_metrics

    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": i, "loss_sft": 5.0 / i, "loss_ld": 0.0}) + "\n" for i in range(1, 20)))
    png = plot_loss_curves({"a": m}, tmp_path / "c.png", keys=("loss_sft", "loss_ld"))
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert len(read_metrics(m)) == 19
    with pytest.raises(FileNotFoundError, match="metrics"):
        read_metrics(tmp_path / "missing.jsonl")
    rgb = flow_to_rgb(torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]]).numpy())  # zero flow, then 1 px right
    assert rgb.shape == (1, 2, 3) and rgb[0, 0].max() == 0 and rgb[0, 1].max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="flow"):
        flow_to_rgb(torch.zeros(3, 4, 4).numpy())


def test_study_on_the_demo_artifacts(demo, tmp_path):
    from rgpt4d.cli import build_parser, main

    out, _, _ = demo
    argv = ["study", "--preset", "smoke", "--out", str(tmp_path / "study"), "--seeds", "0", "1", "--steps", "2",
            "--batch-size", "2", "--p4d", "none", "both", "--tpe", "on", "--data", str(out / "data"),
            "--teacher", str(out / "teacher"), "--cache", str(out / "teacher_cache"), "--quiet",
            "--report", str(tmp_path / "study.md")]
    assert main(argv) == 0
    recs = [json.loads(line) for line in (tmp_path / "study" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["p4d"], r["seed"]) for r in recs) == [("both", 0), ("both", 1), ("none", 0), ("none", 1)]
    report = (tmp_path / "study.md").read_text()
    assert "rgpt4d study " in report and "--seeds 0 1" in report
    assert "| SFT only, TPE on (n=2) |" in report and "| latent + explicit, TPE on (n=2) |" in report
    assert "| latent + explicit - SFT only, TPE on (n=2) |" in report
    assert "| latent + explicit | on | 1 |" in report  # the per-run table
    # a second call finds every run done and only rewrites the report
    assert main(argv) == 0
    assert len((tmp_path / "study" / "results.jsonl").read_text().splitlines()) == 4
    # bad input names the argument
    assert main(argv[:-2] + ["--steps", "0"]) == 2
    args = build_parser().parse_args(["study", "--teacher", str(out / "teacher")])
    from rgpt4d.train.study import run_study

    with pytest.raises(ValueError, match="--teacher and --cache"):
        run_study(args)


def test_study_skips_runs_claimed_by_another_process(demo, tmp_path):
    from rgpt4d.cli import main

    out, _, _ = demo
    (tmp_path / "study" / "runs" / "none_tpeoff_seed0").mkdir(parents=True)
    (tmp_path / "study" / "runs" / "none_tpeoff_seed0" / ".claimed").touch()
    assert main(["study", "--preset", "smoke", "--out", str(tmp_path / "study"), "--seeds", "0", "--steps", "1",
                 "--batch-size", "2", "--p4d", "none", "--tpe", "on", "off", "--data", str(out / "data"),
                 "--teacher", str(out / "teacher"), "--cache", str(out / "teacher_cache"), "--quiet"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "study" / "results.jsonl").read_text().splitlines()]
    assert [(r["p4d"], r["tpe"]) for r in recs] == [("none", True)]
    assert "| SFT only, TPE on (n=1) |" in (tmp_path / "study" / "study.md").read_text()
