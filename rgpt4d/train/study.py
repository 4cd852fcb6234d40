"""`rgpt4d study`: the paper's P4D ablations (Table 5) and the TPE ablation (Table 6) at our scale.

Conditions: p4d in {none (SFT only), latent, explicit, both} x TPE {on, off}, each trained with
several seeds (the seed sets the student's initialisation and the order of the data) on one dataset,
with one trained teacher and one cache shared by every run. Every run is evaluated on the held-out
test split; the report gives mean ± std (over seeds) of the 12 R4D columns per condition, chance,
and the paired differences to SFT only (same seed, same TPE setting).

    rgpt4d study --out runs/study --seeds 0 1 2 --steps 300 --report docs/results/study.md
    rgpt4d study --data runs/demo/data --teacher runs/demo/teacher --cache runs/demo/teacher_cache ...

Results are appended to `<out>/results.jsonl` as runs finish; a second call with the same `--out`
skips the runs already there and rewrites the report. Each run is claimed (`runs/<name>/.claimed`)
before it starts, so two processes on one --out share the work (e.g. `--seeds 0 1 2` and
`--seeds 2 1 0` side by side on two cores); an interrupted run's folder must be removed to redo it.

The functions import the model stack when they run it (`# start-up`): the `rgpt4d` command's parser
imports this module for `add_arguments`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from rgpt4d.data import MakeConfig, make_dataset
from rgpt4d.data.evaluate import load_questions
from rgpt4d.data.schema import REPORT_COLUMNS
from rgpt4d.train.config import train_config

P4D_CONDITIONS = (("none", "SFT only"), ("latent", "latent only"), ("explicit", "explicit only"),
                  ("both", "latent + explicit"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study", help="runs, results.jsonl (default runs/study)")
    p.add_argument("--report", default=None, help="the markdown report (default <out>/study.md)")
    p.add_argument("--preset", default="tiny", choices=("smoke", "tiny"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per student")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p4d", nargs="+", default=[c for c, _ in P4D_CONDITIONS],
                   choices=[c for c, _ in P4D_CONDITIONS], help="conditions to run (default all four)")
    p.add_argument("--tpe", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--loss-preset", default="paper", choices=("paper", "code"))
    p.add_argument("--data", help="reuse this dataset (else one is made in <out>/data)")
    p.add_argument("--teacher", help="reuse this trained teacher (else one is trained in <out>/teacher)")
    p.add_argument("--cache", help="reuse this teacher cache (else written to <out>/teacher_cache)")
    p.add_argument("--num-videos", type=int, default=1000, help="when making the data")
    p.add_argument("--teacher-steps", type=int, default=200, help="when training the teacher")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test questions")
    p.add_argument("--quiet", action="store_true")


def _check(args) -> None:
    for name in ("steps", "batch_size", "num_videos", "teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit: must be >= 1, got {args.eval_limit}")
    if not args.lr > 0:
        raise ValueError(f"--lr: must be > 0, got {args.lr}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds: must be distinct integers >= 0, got {args.seeds}")
    if (args.teacher is None) != (args.cache is None):
        raise ValueError("--teacher and --cache go together (the cache must be that teacher's)")
    for name in ("data", "teacher", "cache"):
        v = getattr(args, name)
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"--{name}: {v} is not a directory")


def _prepare(args, out: Path, log) -> tuple[Path, Path, Path, Optional[dict]]:
    """The dataset, teacher and cache every run shares (made here unless given)."""
    from rgpt4d.train.teacher import train_teacher  # start-up: the model stack
    from rgpt4d.train.teacher_cache import cache_teacher  # start-up: the model stack

    progress = not args.quiet
    frames, size = (4, 32) if args.preset == "smoke" else (16, 64)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "manifest.json").exists():
        log(f"[study] data: {args.num_videos} videos -> {data}")
        make_dataset(MakeConfig(out=str(data), num_videos=args.num_videos, frames=frames, size=size, workers=2,
                                val_fraction=0.1, test_fraction=0.2, overwrite=True, progress=progress))
    teacher_metrics = None
    if args.teacher:
        teacher, cache = Path(args.teacher), Path(args.cache)
    else:
        teacher, cache = out / "teacher", out / "teacher_cache"
        if not (teacher / "teacher.safetensors").exists():
            log(f"[study] teacher: {args.teacher_steps} steps -> {teacher}")
            train_teacher(train_config(args.preset, teacher_steps=args.teacher_steps, device="cpu"), data, teacher,
                          progress=progress, log=log)
        if not (cache / "cache_index.json").exists():
            log(f"[study] teacher cache -> {cache}")
            cache_teacher(teacher, data, cache, progress=progress)
    mpath = teacher / "teacher_metrics.json"
    if mpath.exists():
        teacher_metrics = json.loads(mpath.read_text()).get("metrics")
    return data, teacher, cache, teacher_metrics


def _done(results_path: Path) -> dict[tuple, dict]:
    if not results_path.exists():
        return {}
    recs = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    return {(r["p4d"], r["tpe"], r["seed"]): r for r in recs}


def _claim(run_dir: Path) -> bool:
    """Mark a run as taken (atomically), so several `rgpt4d study` processes can share one --out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(run_dir / ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_study(args, log: Callable[[str], None] = print) -> dict:
    """Run every (seed, TPE, p4d) condition not yet in <out>/results.jsonl; write the report."""
    from rgpt4d.train.report import chance_scores  # start-up: the model stack
    from rgpt4d.train.student import evaluate_student, train_student  # start-up: the model stack

    _check(args)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, teacher, cache, teacher_metrics = _prepare(args, out, log)
    results_path = out / "results.jsonl"
    done = _done(results_path)
    plan = [(p4d, tpe == "on", seed) for seed in args.seeds for tpe in args.tpe for p4d in args.p4d]
    todo = [c for c in plan if c not in done]
    log(f"[study] {len(plan)} runs ({len(plan) - len(todo)} already done), {args.steps} steps of {args.batch_size}")
    for i, (p4d, tpe, seed) in enumerate(todo, 1):
        name = f"{p4d}_tpe{'on' if tpe else 'off'}_seed{seed}"
        if not _claim(out / "runs" / name):
            log(f"[study] {i}/{len(todo)} {name}: taken by another process on this --out")
            continue
        t_run = time.time()
        cfg = train_config(args.preset, p4d=p4d, tpe=tpe, seed=seed, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, loss_preset=args.loss_preset, log_every=5, device="cpu")
        res = train_student(cfg, data, None if p4d == "none" else cache, out / "runs" / name,
                            progress=not args.quiet, teacher=None if p4d == "none" else teacher, log=None)
        rep = evaluate_student(res["model_path"], data, "test", batch_size=16, limit=args.eval_limit,
                               progress=not args.quiet)
        rec = {"p4d": p4d, "tpe": tpe, "seed": seed, "steps": args.steps, "scores": rep["scores"],
               "counts": rep["counts"], "loss_sft": res["loss_sft"], "loss_ld": res["loss_ld"],
               "loss_ed": res["loss_ed"], "train_seconds": res["seconds"], "seconds": time.time() - t_run}
        with results_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[(p4d, tpe, seed)] = rec
        log(f"[study] {i}/{len(todo)} {name}: Avg {rep['scores']['Avg']:.1f} ({rec['seconds']:.0f} s, "
            f"{time.time() - t0:.0f} s so far)")
    done = _done(results_path)  # also the runs other processes on this --out finished
    plan = [c for c in plan if c in done]
    questions = load_questions(Path(data) / "test.json")
    if args.eval_limit is not None:
        questions = questions[: args.eval_limit]
    summary = {"records": [done[c] for c in plan], "chance": chance_scores(questions),
               "teacher": teacher_metrics, "seconds": time.time() - t0}
    report = Path(args.report) if args.report else out / "study.md"
    write_study_report(report, summary, args)
    log(f"[study] wrote {report}")
    return summary


def _difference(a: dict, b: dict) -> dict:
    """Column-wise a - b of two score rows (None where either has no questions)."""
    return {c: None if a[c] is None or b[c] is None else a[c] - b[c] for c in REPORT_COLUMNS}


def study_tables(records: list[dict], chance: dict) -> tuple[str, str]:
    """(mean ± std table per condition, paired-difference-to-SFT table)."""
    from rgpt4d.train.report import mean_std, scores_table  # start-up: the model stack

    rows, stds, diff_rows, diff_stds = {"chance": chance}, {}, {}, {}
    labels = dict(P4D_CONDITIONS)
    by = {(r["p4d"], r["tpe"], r["seed"]): r for r in records}
    for tpe in (True, False):
        for p4d, label in P4D_CONDITIONS:
            runs = [r for r in records if r["p4d"] == p4d and r["tpe"] == tpe]
            if not runs:
                continue
            name = f"{label}, TPE {'on' if tpe else 'off'} (n={len(runs)})"
            rows[name], stds[name] = mean_std([r["scores"] for r in runs])
            if p4d == "none":
                continue
            diffs = []
            for r in runs:
                base = by.get(("none", tpe, r["seed"]))
                if base is not None:
                    diffs.append(_difference(r["scores"], base["scores"]))
            if diffs:
                dname = f"{labels[p4d]} - SFT only, TPE {'on' if tpe else 'off'} (n={len(diffs)})"
                diff_rows[dname], diff_stds[dname] = mean_std(diffs)
    for p4d, label in P4D_CONDITIONS:  # TPE on - off, same p4d and seed
        diffs = []
        for r in records:
            if r["p4d"] == p4d and r["tpe"]:
                off = by.get((p4d, False, r["seed"]))
                if off is not None:
                    diffs.append(_difference(r["scores"], off["scores"]))
        if diffs:
            dname = f"TPE on - off, {label} (n={len(diffs)})"
            diff_rows[dname], diff_stds[dname] = mean_std(diffs)
    counts = records[0]["counts"] if records else None
    return scores_table(rows, stds, counts), scores_table(diff_rows, diff_stds) if diff_rows else ""


def runs_table(records: list[dict]) -> str:
    """One line per run: condition, seed, Avg, and the last logged loss terms (unweighted)."""
    labels = dict(P4D_CONDITIONS)
    lines = ["| p4d | TPE | seed | Avg | L_SFT | L_LD | L_ED | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        def f(v):
            return "-" if not v else f"{v:.3f}"
        lines.append(f"| {labels[r['p4d']]} | {'on' if r['tpe'] else 'off'} | {r['seed']} | {r['scores']['Avg']:.1f} | "
                     f"{f(r['loss_sft'])} | {f(r['loss_ld'])} | {f(r['loss_ed'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_study_report(path: Path, summary: dict, args) -> Path:
    from rgpt4d.train.report import teacher_quality_table  # start-up: the model stack

    main_table, diff_table = study_tables(summary["records"], summary["chance"])
    command = "rgpt4d study " + " ".join(shlex.quote(a) for a in _argv(args))
    teacher = teacher_quality_table(summary["teacher"]) if summary.get("teacher") else "(teacher metrics not found)"
    n_q = summary["records"][0]["counts"]["Avg"] if summary["records"] else 0
    text = f"""# Study: P4D signals and TPE at our scale

Command (from the repository root):

```bash
{command}
```

Preset `{args.preset}`: every student trains {args.steps} steps of {args.batch_size} questions (lr {args.lr},
P4D loss weights `{args.loss_preset}`), seeds {args.seeds}, on one dataset with one frozen teacher and one
cache shared by all runs; scored on {n_q} held-out test questions. Accuracy in percent, mean ± sample
std over seeds. {len(summary['records'])} runs, {sum(r['seconds'] for r in summary['records']) / 60:.0f} min of
training + evaluation in all (each run's wall time, summed).

## Accuracy per condition

{main_table}

## Paired differences (same seed): each P4D variant minus SFT only, and TPE on minus off

{diff_table}

## Every run

{runs_table(summary['records'])}

## The teacher (held-out val)

{teacher}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _argv(args) -> list[str]:
    """The flags that reproduce `args` (every option, written out)."""
    out = []
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def main(args) -> int:
    try:
        run_study(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"rgpt4d study: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="rgpt4d study")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
