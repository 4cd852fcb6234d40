"""`rgpt4d demo`: the main job, end to end on a CPU.

    1. make a synthetic 4D set (rgpt4d.data)                      <out>/data/
    2. train the 4D teacher on its ground truth, then freeze it    <out>/teacher/
    3. cache the teacher's latents and explicit outputs            <out>/teacher_cache/
    4. train two students, same steps and seed: SFT only, and P4D  <out>/train/<name>/ (metrics.jsonl, ...)
       (L_SFT + 0.5 L_LD + 0.1 L_ED); each inference model (no teacher, no D_4DP) is saved with
       save_pretrained in                                          <out>/students/<name>/
       then evaluate each on the held-out test split               <out>/eval/<name>.json
       On a CPU with >= 2 cores the two students train and evaluate at the same time, in two
       processes with half the threads each (a single training step does not scale past one
       core on these tiny models); `parallel=False` / `--sequential` runs them one after the other.
    5. what P4D transfers: held-out linear probes of depth and motion from each student's
       visual-token hidden states, and from the frozen vision features (the floor): fitted on val,
       scored on test (rgpt4d.train.probe)                            <out>/probe.json
    6. print the 12-column table beside chance; write <out>/report.md with the table, the probes,
       the loss curves, the teacher's held-out quality beside trivial baselines and a figure of its
       predictions.

Presets: `smoke` (4 frames of 32 px, a few steps: under 2 minutes, used by the tests) and `tiny`
(16 frames of 64 px: the README's `make demo`, sized for <= 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from rgpt4d.data import MakeConfig, make_dataset
from rgpt4d.data.evaluate import load_questions
from rgpt4d.train import TrainConfig, evaluate_student, train_config, train_student, train_teacher
from rgpt4d.train.probe import probe_student
from rgpt4d.train.report import (chance_scores, plot_loss_curves, plot_teacher_predictions, scores_table,
                                 teacher_quality_table)
from rgpt4d.train.teacher_cache import cache_teacher


@dataclass(frozen=True)
class DemoPreset:
    name: str
    model: str  # the model / training preset (rgpt4d.train.train_config)
    num_videos: int
    frames: int
    size: int
    val_fraction: float
    test_fraction: float
    teacher_steps: int
    teacher_batch_size: int
    student_steps: int
    student_batch_size: int
    lr: float
    max_objects: int = 6
    eval_batch_size: int = 16
    seed: int = 0


DEMO_PRESETS = {
    "smoke": DemoPreset("smoke", "smoke", num_videos=48, frames=4, size=32, val_fraction=0.25, test_fraction=0.25,
                        teacher_steps=6, teacher_batch_size=4, student_steps=8, student_batch_size=4, lr=2e-3,
                        max_objects=4),
    "tiny": DemoPreset("tiny", "tiny", num_videos=1000, frames=16, size=64, val_fraction=0.1, test_fraction=0.2,
                       teacher_steps=200, teacher_batch_size=4, student_steps=1500, student_batch_size=8, lr=2e-3),
}
STUDENTS = (("sft", "SFT only", "none"), ("p4d", "P4D (latent + explicit)", "both"))


class _Stages:
    """Numbered stage headers with their wall times."""

    def __init__(self, total: int, log: Optional[Callable[[str], None]]):
        self.total, self.log, self.n, self.times = total, log, 0, {}
        self._name, self._t0, self._start = None, 0.0, time.time()

    def __call__(self, name: str) -> None:
        self.done()
        self.n += 1
        self._name, self._t0 = name, time.time()
        if self.log:
            self.log(f"\n[{self.n}/{self.total}] {name}")

    def done(self) -> None:
        if self._name is not None:
            self.times[self._name] = time.time() - self._t0
            if self.log:
                self.log(f"    ({self.times[self._name]:.0f} s)")
            self._name = None

    @property
    def elapsed(self) -> float:
        return time.time() - self._start


def _student_job(job: dict) -> dict:
    """Train one student, save its inference model, evaluate it on the test split. Runs in the
    demo's process or in a worker process (then with `job["threads"]` threads)."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job.get("quiet_hf"):
        hf_logging.disable_progress_bar()
    name, out, data = job["name"], Path(job["out"]), Path(job["data"])
    t0 = time.time()
    res = train_student(TrainConfig.from_dict(job["config"]), data, out / "teacher_cache", out / "train" / name,
                        progress=job["progress"], log=None)
    if res["model_path"] is None:
        raise RuntimeError(f"student {name}: training stopped before its last step")
    dest = out / "students" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(res["model_path"], dest)
    t1 = time.time()
    (out / "eval").mkdir(exist_ok=True)
    rep = evaluate_student(dest, data, "test", batch_size=job["eval_batch_size"], progress=job["progress"],
                           predictions_out=out / "eval" / f"{name}_predictions.jsonl")
    (out / "eval" / f"{name}.json").write_text(json.dumps(rep, indent=2))
    return {"name": name, "model": str(dest), "eval": rep, "train_seconds": t1 - t0, "eval_seconds": time.time() - t1}


def _default_parallel() -> bool:
    return not torch.cuda.is_available() and torch.get_num_threads() >= 2


def _run_students(jobs: list[dict], parallel: bool, steps: int, progress: bool,
                  log: Optional[Callable[[str], None]]) -> dict[str, dict]:
    """The student jobs, one after the other or in worker processes (spawned: no forked OpenMP
    state) with a progress bar fed from their metrics.jsonl."""
    if not parallel:
        return {job["name"]: _student_job(dict(job, progress=progress)) for job in jobs}
    threads = max(1, torch.get_num_threads() // len(jobs))
    bar = None
    if progress:
        bar = tqdm(total=steps * len(jobs), desc="students", unit="step", dynamic_ncols=True)
    results: dict[str, dict] = {}
    shown: dict = {}
    with cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_student_job, dict(job, progress=False, threads=threads, quiet_hf=True)): job["name"]
                   for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=1.0)
            for f in done:
                r = f.result()  # a worker's exception is raised here
                results[r["name"]] = r
                if log:
                    log(f"    {r['name']}: trained in {r['train_seconds']:.0f} s, evaluated in {r['eval_seconds']:.0f} s")
            if bar is not None:
                counts = {job["name"]: _logged_steps(Path(job["out"]) / "train" / job["name"] / "metrics.jsonl")
                          for job in jobs}
                state = {n: ("evaluated" if n in results else "evaluating" if c >= steps else f"{c}/{steps}")
                         for n, c in counts.items()}
                if state != shown:  # redraw on a change only (a log file gets one line per redraw)
                    bar.n = sum(counts.values())
                    bar.set_postfix(state)
                    shown = state
    if bar is not None:
        bar.close()
    return results


def _logged_steps(metrics: Path) -> int:
    try:
        with open(metrics) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_demo(preset: str = "tiny", out: str | Path = "runs/demo", *, progress: bool = True,
             log: Optional[Callable[[str], None]] = print, parallel: Optional[bool] = None) -> dict:
    """Run the whole pipeline; returns {"preset", "scores" {name: 12 columns}, "chance", "counts",
    "teacher" (held-out metrics), "probe" {features: {target: ridge_probe's result}}, "stage_seconds",
    "student_seconds" {name: {train, eval}}, "seconds", "report", "students" {name: path}, "parallel"}. `parallel`: train and evaluate the two students in
    two processes at once (default: on a CPU with >= 2 threads)."""
    if preset not in DEMO_PRESETS:
        raise ValueError(f"preset: must be one of {sorted(DEMO_PRESETS)}, got {preset!r}")
    p = DEMO_PRESETS[preset]
    if not progress:  # also transformers' own bars (loading and writing weights)
        hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parallel = _default_parallel() if parallel is None else bool(parallel)
    stage = _Stages(6, log)
    data = out / "data"

    stage(f"synthetic data: {p.num_videos} videos of {p.frames} frames at {p.size}x{p.size}")
    summary = make_dataset(MakeConfig(out=str(data), num_videos=p.num_videos, seed=p.seed, frames=p.frames, size=p.size,
                                      workers=2, max_objects=p.max_objects, val_fraction=p.val_fraction,
                                      test_fraction=p.test_fraction, overwrite=True, progress=progress))
    if log:
        log("    questions: " + ", ".join(f"{k} {v['questions']} ({v['videos']} videos)"
                                          for k, v in summary["splits"].items()))

    cfg = train_config(p.model, seed=p.seed, teacher_steps=p.teacher_steps, teacher_batch_size=p.teacher_batch_size,
                       steps=p.student_steps, batch_size=p.student_batch_size, lr=p.lr,
                       log_every=1, device="cpu")
    stage(f"teacher: {p.teacher_steps} steps of {p.teacher_batch_size} videos")
    teacher = train_teacher(cfg, data, out / "teacher", progress=progress, log=log)

    stage("teacher cache: latents and explicit outputs of every video")
    cache_teacher(out / "teacher", data, out / "teacher_cache", progress=progress)

    how = "two processes at once" if parallel else "one after the other"
    stage(f"students: {p.student_steps} steps of {p.student_batch_size} questions each, seed {p.seed}, then the "
          f"held-out test split ({how})")
    if log:
        log("    " + "; ".join(f"{label} (--p4d {p4d})" for _, label, p4d in STUDENTS))
    jobs = [dict(name=name, config=cfg.replace(p4d=p4d).to_dict(), out=str(out), data=str(data),
                 eval_batch_size=p.eval_batch_size) for name, _, p4d in STUDENTS]
    done = _run_students(jobs, parallel, p.student_steps, progress, log)
    students = {name: done[name]["model"] for name, _, _ in STUDENTS}
    evals = {name: done[name]["eval"] for name, _, _ in STUDENTS}
    questions = load_questions(data / "test.json")
    chance = chance_scores(questions)

    stage("probes: depth and motion from each student's visual tokens (fitted on val, scored on test)")
    probe = run_probes(students, data)
    (out / "probe.json").write_text(json.dumps(probe, indent=2))
    if log:
        log(probe_table(probe))

    stage("report")
    result = {
        "preset": asdict(p), "scores": {name: evals[name]["scores"] for name in evals}, "chance": chance,
        "counts": evals[STUDENTS[0][0]]["counts"], "teacher": teacher["metrics"], "students": students,
        "scoring": {name: evals[name]["scoring"] for name in evals}, "probe": probe,
        "data": summary["splits"], "parallel": parallel,
        "student_seconds": {name: {"train": done[name]["train_seconds"], "eval": done[name]["eval_seconds"]}
                            for name in evals},
    }
    result["stage_seconds"] = stage.times  # the report's own time is filled in after it is written
    result["seconds"] = stage.elapsed
    result["report"] = str(write_demo_report(out, result))
    stage.done()
    result["seconds"] = stage.elapsed
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if log:
        log("\n" + results_table(result))
        log(f"\n{margin_sentence(result)}")
        log(f"\nwrote {result['report']} ({result['seconds']:.0f} s in all)")
    return result


def results_table(result: dict) -> str:
    labels = dict((name, label) for name, label, _ in STUDENTS)
    rows = {"chance": result["chance"], **{labels[n]: s for n, s in result["scores"].items()}}
    return scores_table(rows, counts=result["counts"])


def margin_sentence(result: dict) -> str:
    labels = dict((name, label) for name, label, _ in STUDENTS)
    ch = result["chance"]["Avg"]
    parts = [f"{labels[n]} {s['Avg']:.1f} ({s['Avg'] - ch:+.1f} points)" for n, s in result["scores"].items()]
    return f"Test accuracy (Avg) vs chance {ch:.1f}: " + "; ".join(parts) + "."


def scoring_sentence(result: dict) -> str:
    """How the students' answers were read (rgpt4d.infer.RGPT4D.answer_batch)."""
    ways = set(result.get("scoring", {}).values())
    if ways == {"likelihood"}:
        return ("The students write an answer text, the option's text or, when all options are plain numbers in "
                "one unit, the value's rank among them (\"second smallest\"; the option and rank answer formats), "
                "and are scored by the likelihood of each option's answer text after the prompt (docs/models.md).")
    if ways == {"letter"}:
        return "The students' answers are the letters they generate."
    return f"Answers read by: {', '.join(sorted(ways)) or 'unknown'}."


def run_probes(students: dict[str, str], data: Path) -> dict[str, dict]:
    """{"vision": floor, <student name>: probes of its LLM hidden states}, each {target: ridge_probe
    result}. The vision tower is frozen and both students start from one seed, so the floor is
    measured once, on the first student."""
    probes: dict[str, dict] = {}
    for i, (name, path) in enumerate(students.items()):
        res = probe_student(path, data, "val", "test", kinds=("vision", "hidden") if i == 0 else ("hidden",))
        if "vision" in res:
            probes["vision"] = res["vision"]
        probes[name] = res["hidden"]
    return probes


def probe_table(probe: dict[str, dict]) -> str:
    """Markdown: held-out R^2 of the depth and motion probes, per feature set."""
    labels = dict((name, label) for name, label, _ in STUDENTS)
    rows = [("frozen vision features (the floor)", probe["vision"])]
    rows += [(f"{labels.get(n, n)}: LLM hidden states", p) for n, p in probe.items() if n != "vision"]
    lines = ["| visual-token features | depth R² | motion R² |", "|---|---:|---:|"]
    lines += [f"| {label} | {p['depth']['r2']:.3f} | {p['motion']['r2']:.3f} |" for label, p in rows]
    return "\n".join(lines)


def probe_section(result: dict) -> str:
    """The probe table with what it measures, or a line saying the run has none."""
    probe = result.get("probe")
    if not probe:
        return "No probes in this run."
    v = probe["vision"]
    n_fit, n_eval = v["depth"]["n_fit"], v["depth"]["n_eval"]
    return f"""{probe_table(probe)}

A ridge regression (strength chosen by 2-fold cross-validation on val, rgpt4d.train.probe) from each
visual token's features to the mean log depth of the pixels its cell covers, and to the fraction of
them on moving objects; fitted on the {n_fit} visual tokens of the val videos, R² on the {n_eval} of the
test videos (0: no better than a constant). The LLM hidden states are the last layer's at the visual
tokens, which D_4DP reads in P4D; the frozen vision features (the window of patch features the
projector reads) are the floor both students start from."""


def write_demo_report(out: Path, result: dict) -> Path:
    """<out>/report.md with the table, the loss curves, the teacher's quality and its figure."""
    out = Path(out)
    fig = out / "figures"
    labels = dict((name, label) for name, label, _ in STUDENTS)
    runs = {labels[n]: out / "train" / n / "metrics.jsonl" for n in result["scores"]}
    plot_loss_curves(runs, fig / "student_losses.png", keys=("loss_sft", "loss_ld", "loss_ed"),
                     title="students: L_SFT, and P4D's unweighted L_LD and L_ED")
    plot_loss_curves({"teacher": out / "teacher" / "metrics.jsonl"}, fig / "teacher_losses.png",
                     keys=("loss", "depth", "flow", "motion"), title="teacher training losses")
    plot_teacher_predictions(out / "teacher", out / "data", "test", fig / "teacher_test_video.png")
    p = result["preset"]
    stages = "\n".join(f"| {k} | {v:.0f} |" for k, v in result["stage_seconds"].items())
    per = result.get("student_seconds", {})
    stages += "".join(f"\n| {labels[n]}: training / evaluation | {t['train']:.0f} / {t['eval']:.0f} |"
                      for n, t in per.items())
    text = f"""# rgpt4d demo ({p['name']})

`rgpt4d demo --preset {p['name']} --out {out}`: a synthetic 4D set, a 4D teacher trained on its ground
truth, and two students trained with the same steps and seed, one with SFT only and one with P4D
(L = L_SFT + 0.5 L_LD + 0.1 L_ED, the paper's weights), evaluated on the held-out test split.

Data: {p['num_videos']} videos of {p['frames']} frames at {p['size']}x{p['size']}; questions per split:
{", ".join(f"{k} {v['questions']} ({v['videos']} videos)" for k, v in result['data'].items())}.
Teacher: {p['teacher_steps']} steps of {p['teacher_batch_size']} videos. Students: {p['student_steps']} steps of
{p['student_batch_size']} questions, lr {p['lr']}, seed {p['seed']}.

## Test accuracy (%)

{results_table(result)}

{margin_sentence(result)} Chance is the expected accuracy of a uniformly random letter (1 / number
of options, averaged over the questions of each column). {scoring_sentence(result)}

## What P4D transfers: linear probes of the visual tokens (held-out R²)

{probe_section(result)}

## Loss curves

![student losses](figures/student_losses.png)

![teacher losses](figures/teacher_losses.png)

## The teacher (held-out val split)

{teacher_quality_table(result['teacher'])}

Teacher predictions vs ground truth on a test video:

![teacher on a test video](figures/teacher_test_video.png)

## Wall time

| stage | seconds |
|---|---:|
{stages}
| total (before writing this report) | {result["seconds"]:.0f} |

{"The two students trained and were evaluated at the same time, in two processes." if result.get("parallel")
 else "The two students trained and were evaluated one after the other."}

The inference students are in `students/sft/` and `students/p4d/` (save_pretrained: the bare
student, no teacher and no D_4DP); load one with `rgpt4d.infer.RGPT4D.from_pretrained(path)`.
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def main(args=None) -> int:
    preset = getattr(args, "preset", "tiny")
    out = getattr(args, "out", "runs/demo")
    try:
        run_demo(preset, out, progress=not getattr(args, "quiet", False),
                 parallel=getattr(args, "parallel", None))
    except (ValueError, FileNotFoundError) as e:
        print(f"rgpt4d demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
