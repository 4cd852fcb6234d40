"""A/B benchmark: two source trees of this repository, side by side in one run.

    python benchmarks/ab.py --base /path/to/tree-A --new /path/to/tree-B [--rounds 3] [--quick]
                            [--only tpe,e2e] [--scripts new|base|own|PATH] [--out DIR]

Answers "did a change make anything slower?". Each tree must hold its own built extension
(rgpt4d/_C*.so) and its rgpt4d/kernels; every benchmark run is a fresh process with
PYTHONPATH=<tree>, so it imports that tree's rgpt4d (checked before the first run). Per round, every
benchmark runs on base and then on new (A B A B ...), so a change in machine load over the run
hits both trees alike. The benchmarks are the CPU op scripts (bench_tpe, bench_regional,
bench_p4d_loss, bench_lm_heads, bench_attention) and the end-to-end training and inference step
(bench_e2e), with their small sizes (BENCHES, QUICK), one torch thread, eager against the compiled
`rgpt4d-cpu` backend, no torch.compile provider, time only (--no-memory where the scripts' harness
has it).

--scripts picks whose benchmark code runs: `new` (default: the same scripts time both trees, so
only the library differs), `base`, `own` (each tree its own scripts; needed when one tree's
scripts call names the other's rgpt4d lacks) or the path of a checkout whose scripts time both.
The chosen benchmarks/ folder is copied under --out first, so the copy imports rgpt4d from
PYTHONPATH and not from the tree it came from.

Every run writes its CSV (benchmarks/harness.py's columns) into its own folder, --out/runs/
<benchmark>/<tree>-r<round>/ (RGPT4D_BENCH_OUT points there too). For each (benchmark, kernel,
mode, size, provider) the summary reports the median over rounds of each tree's per-run median
time, the ratio new/base, the paired ratio (median over rounds of new/base within a round) and the
noise: the spread of one tree against itself across rounds, max |log(t_i / t_j)| = log(max / min)
over base's runs and over new's runs, the larger of the two and at least the median of that over the
benchmark's rows, given as a factor. A ratio beyond that factor is flagged "slower" / "faster";
within it, "same". The same columns for the time relative to eager in the same process (1 / the
harness's paired speed-up over eager) cancel a change in load between processes: on the loaded
2-core VM their noise was about 1.25x against 1.8x for the times (medians over the rows). Running
a tree against itself (--base T --new T) measures that noise alone (nearly every row then reads
"same": 0 of 161 times and 3 of 88 relative times beyond their noise in one such run).
Written to --out/ab.md and --out/ab.csv (default benchmarks/results/<device>/ab/); --report-only
writes them again from the runs already in --out (e.g. after a change to this report).

Duration on the 2-core CPU VM at load average 7-10 (other jobs running): 715 s for the default 3
rounds (per tree and round: tpe ~50 s, regional ~30 s, e2e ~17 s, p4d_loss ~15 s, attention ~10 s,
lm_heads ~8 s, each including ~3 s of imports); less on an idle machine. --quick (every script's
--quick shapes, a shorter timing budget per case) takes about half as long.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (script, its arguments): the small cases of each family, sized for the budget above
BENCHES = {
    # small + the paper shape at batch 1; full covers the backward kernels (backward alone is not timed)
    "tpe": ("bench_tpe.py", ["--batches", "1", "--modes", "forward,full,nograd"]),
    "regional": ("bench_regional.py", ["--sizes", "small", "--modes", "forward,full"]),
    "p4d_loss": ("bench_p4d_loss.py", ["--batches", "1", "--linear-n", "512"]),
    "lm_heads": ("bench_lm_heads.py", ["--quick"]),  # the paper's shapes need a 151936-entry vocabulary
    "attention": ("bench_attention.py", []),
    "e2e": ("bench_e2e.py", ["--quick"]),  # tiny preset, batch 1: one training step ~0.15 s
}
# --quick: every script's --quick shapes (p4d_loss without its 1 s fused-linear case)
QUICK = {"p4d_loss": ["--quick", "--skip-linear"]}
# every run: CPU, one thread (benchmarks/README.md, "Threads"), no torch.compile provider, no plots
COMMON = ["--device", "cpu", "--threads", "1", "--no-compile", "--no-plots"]
BUDGET = ["--rounds", "7", "--max-seconds", "2"]  # per case: interleaved rounds at most, seconds
QUICK_BUDGET = ["--rounds", "5", "--max-seconds", "0.5"]
FIELDS = ["benchmark", "kernel", "mode", "x", "provider", "base_ms", "new_ms", "ratio", "paired_ratio",
          "noise", "base_noise", "new_noise", "verdict", "rel_ratio", "rel_noise", "rel_verdict", "rounds"]


# ---- reading results and the ratio logic (no timing here: tests/test_bench_ab.py) ---------------

def read_times(folder: str, benchmark: str) -> tuple[dict, dict]:
    """From every CSV in `folder`: ({key: median ms}, {key: time relative to eager}), key =
    (benchmark, kernel, mode, x, provider). The relative time is 1 / the harness's paired
    speedup_vs_eager (the median over rounds of provider / eager within a round of the same process),
    so a load change between processes cancels; eager's own rows have none."""
    times, rel = {}, {}
    if not os.path.isdir(folder):
        return times, rel
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(folder, name), newline="") as f:
            for r in csv.DictReader(f):
                key = (benchmark, r["kernel"], r["mode"], r["x"], r["provider"])
                if r.get("metric") == "time":
                    times[key] = float(r["p50"])
                elif r.get("metric") == "speedup_vs_eager" and float(r["p50"]) > 0:
                    rel[key] = 1.0 / float(r["p50"])
    return times, rel


def spread(values: list) -> Optional[float]:
    """max |log(a / b)| over pairs of `values` (= log(max / min)); None with fewer than two."""
    v = [x for x in values if x > 0]
    return math.log(max(v) / min(v)) if len(v) >= 2 else None


def _ratio(key, base_runs: list, new_runs: list):
    """(median base, median new, new/base, paired new/base, noise, base noise, new noise) of one key,
    or None when a tree never has it."""
    b = [run[key] for run in base_runs if key in run]
    n = [run[key] for run in new_runs if key in run]
    if not b or not n:
        return None
    mb, mn = statistics.median(b), statistics.median(n)
    ratio = mn / mb if mb > 0 else float("inf")
    pairs = [nr[key] / br[key] for br, nr in zip(base_runs, new_runs) if key in br and key in nr and br[key] > 0]
    sb, sn = spread(b), spread(n)
    noise = None if sb is None and sn is None else math.exp(max(x for x in (sb, sn) if x is not None))
    return (mb, mn, ratio, statistics.median(pairs) if pairs else None, noise,
            None if sb is None else math.exp(sb), None if sn is None else math.exp(sn))


def verdict(ratio: Optional[float], noise: Optional[float]) -> str:
    """slower / faster when the ratio is beyond the noise factor, else same (n/a without one)."""
    if ratio is None:
        return ""
    if noise is None:
        return "n/a"
    return "slower" if ratio > noise else ("faster" if ratio < 1 / noise else "same")


def compare(base_runs: list, new_runs: list, base_rel: Optional[list] = None,
            new_rel: Optional[list] = None) -> list:
    """One row per key timed in both trees. base_runs / new_runs: one {key: ms} per round, in round
    order (a failed run is an empty dict). ratio = median(new) / median(base); paired_ratio = median
    over rounds where both ran of new / base; base_noise / new_noise = exp(spread of that tree's runs)
    (1.0 = none seen; None with one run); noise = the larger of the two: the run-to-run variation of
    one tree against itself, at least the median of that over the rows (with three runs a row's own
    range can be narrow by chance; the rows of one benchmark share a machine and a process); verdict:
    slower / faster when the ratio is beyond the noise factor, else same (n/a without a noise
    estimate). base_rel / new_rel (optional, the same shape: time relative to eager in the same
    process) give rel_ratio, rel_noise and rel_verdict the same way."""
    keys = [k for k in dict.fromkeys(k for run in base_runs for k in run)
            if any(k in run for run in new_runs)]
    rows = []
    for key in keys:
        mb, mn, ratio, paired, noise, nb, nn = _ratio(key, base_runs, new_runs)
        rel = _ratio(key, base_rel, new_rel) if base_rel and new_rel else None
        rows.append(dict(zip(FIELDS, [*key, mb, mn, ratio, paired, noise, nb, nn, "",
                                      *((rel[2], rel[4]) if rel else (None, None)), "",
                                      f"{sum(key in r for r in base_runs)}/{sum(key in r for r in new_runs)}"])))
    for ratio, noise, out in (("ratio", "noise", "verdict"), ("rel_ratio", "rel_noise", "rel_verdict")):
        seen = [r[noise] for r in rows if r[noise] is not None]
        floor = statistics.median(seen) if seen else None
        for r in rows:
            if r[noise] is not None:
                r[noise] = max(r[noise], floor)
            r[out] = verdict(r[ratio], r[noise])
    return rows


def geomean(values: list) -> Optional[float]:
    v = [x for x in values if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def _f(v, fmt=".3g") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list, header: list, failures: list) -> str:
    """The summary: header lines, per-benchmark geometric means, then one table row per key."""
    out = ["# A/B benchmark", "", *header, ""]
    if failures:
        out += ["**Failed runs** (no rows from them): " + "; ".join(failures), ""]
    out += ["## Per benchmark", "",
            "Geometric mean of new/base over the rows; the worst row with its noise factor (one tree against "
            "itself across rounds); rows slower beyond their noise, in time and in time relative to eager in "
            "the same process.", "",
            "| benchmark | rows | geomean new/base | median noise | worst row | worst new/base | its noise "
            "| slower beyond noise | vs eager: geomean new/base | median noise | slower beyond noise |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        rs = [r for r in rows if r["benchmark"] == bench]
        worst = max(rs, key=lambda r: r["ratio"])
        slower = sum(r["verdict"] == "slower" for r in rs)
        rel_slower = sum(r["rel_verdict"] == "slower" for r in rs)
        rel_noises = [r["rel_noise"] for r in rs if r["rel_noise"] is not None]
        noises = [r["noise"] for r in rs if r["noise"] is not None]
        out.append(f"| {bench} | {len(rs)} | {_f(geomean([r['ratio'] for r in rs]))} | "
                   f"{_f(statistics.median(noises) if noises else None)} | "
                   f"{worst['kernel']} {worst['mode']} {worst['x']} {worst['provider']} | {_f(worst['ratio'])} | "
                   f"{_f(worst['noise'])} | {slower} | {_f(geomean([r['rel_ratio'] for r in rs]))} | "
                   f"{_f(statistics.median(rel_noises) if rel_noises else None)} | {rel_slower} |")
    out += ["", "## Every row", "",
            "Times: median over rounds of each run's median (ms). noise: max/min of one tree's runs "
            "(base vs base, new vs new: the larger). vs eager: the same for the time relative to eager in "
            "the same process (1 / the paired speed-up over eager), which cancels a load change between "
            "processes.", "",
            "| benchmark | kernel | mode | x | provider | base ms | new ms | new/base | paired | noise | verdict "
            "| vs eager: new/base | noise | verdict |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['benchmark']} | {r['kernel']} | {r['mode']} | {r['x']} | {r['provider']} | "
                   f"{_f(r['base_ms'], '.4g')} | {_f(r['new_ms'], '.4g')} | {_f(r['ratio'])} | "
                   f"{_f(r['paired_ratio'])} | {_f(r['noise'])} | {r['verdict']} | {_f(r['rel_ratio'])} | "
                   f"{_f(r['rel_noise'])} | {r['rel_verdict'] or '-'} |")
    return "\n".join(out) + "\n"


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})


# ---- running the trees ------------------------------------------------------------------------

def tree_env(tree: str, out_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, RGPT4D_BENCH_OUT=out_dir, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # no interpreted Triton: the CPU providers only
    return env


def check_tree(tree: str, python: str) -> str:
    """Fails unless PYTHONPATH=tree imports that tree's rgpt4d with its compiled CPU backend; returns
    a one-line description (path, git commit)."""
    probe = ("import os, rgpt4d, rgpt4d.ops as o; print(os.path.realpath(rgpt4d.__file__)); "
             "print('cpu' in o.available_backends())")
    r = subprocess.run([python, "-c", probe], env=tree_env(tree, "/tmp"), cwd="/", capture_output=True,
                       text=True, timeout=300)
    lines = r.stdout.split()
    if r.returncode != 0 or len(lines) < 2:
        sys.exit(f"--base/--new {tree}: importing rgpt4d failed:\n{r.stderr[-2000:]}")
    if not lines[0].startswith(os.path.realpath(tree) + os.sep):
        sys.exit(f"--base/--new {tree}: PYTHONPATH={tree} imported rgpt4d from {lines[0]}")
    if lines[1] != "True":
        sys.exit(f"--base/--new {tree}: the compiled cpu backend is not available (build rgpt4d/_C*.so there)")
    sha = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return f"{tree} (git {sha.strip()[:70] or 'unknown'}{', uncommitted changes' if dirty else ''})"


def copy_scripts(src_tree: str, dest: str) -> str:
    """Copy src_tree/benchmarks (no results) to dest/benchmarks; returns dest/benchmarks."""
    target = os.path.join(dest, "benchmarks")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(os.path.join(src_tree, "benchmarks"), target,
                    ignore=shutil.ignore_patterns("results", "__pycache__", ".benchmarks", "*.png"))
    return target


def script_args(bench_dir: str, name: str, quick: bool) -> list:
    script, extra = BENCHES[name]
    if quick:
        extra = QUICK.get(name, ["--quick"])
    args = [*COMMON, *(QUICK_BUDGET if quick else BUDGET), *extra]
    with open(os.path.join(bench_dir, "harness.py")) as f:
        if "--no-memory" in f.read():
            args.append("--no-memory")
    return [os.path.join(bench_dir, script), *args]


def load_runs(out: str, name: str, label: str) -> tuple[list, list]:
    """The per-round results of one benchmark and tree from out/runs/<name>/<label>-r<round>/."""
    times, rels, r = [], [], 0
    while os.path.isdir(os.path.join(out, "runs", name, f"{label}-r{r}")):
        t, rel = read_times(os.path.join(out, "runs", name, f"{label}-r{r}"), name)
        times.append(t)
        rels.append(rel)
        r += 1
    return times, rels


def write_report(out: str, rows: list, header: list, failures: list) -> None:
    md = markdown(rows, header, failures)
    with open(os.path.join(out, "ab.md"), "w") as f:
        f.write(md)
    write_csv(os.path.join(out, "ab.csv"), rows)
    print(md)
    print(f"wrote {os.path.join(out, 'ab.md')} and ab.csv")


def report_only(out: str, names: list, argv: list) -> int:
    rows = []
    for name in names:
        (bt, br), (nt, nr) = load_runs(out, name, "base"), load_runs(out, name, "new")
        rows += compare(bt, nt, br, nr)
    header = [f"`python benchmarks/ab.py {' '.join(argv)}`: the report of the runs in {out}/runs"]
    if os.path.exists(os.path.join(out, "header.md")):  # the run's own header (trees, wall time, load)
        with open(os.path.join(out, "header.md")) as f:
            header += ["", "The run:", "", f.read().rstrip()]
    write_report(out, rows, header, [])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="the reference tree (a checkout with its extension built)")
    p.add_argument("--new", help="the changed tree")
    p.add_argument("--rounds", type=int, default=3, help="runs of every benchmark per tree (A B A B ...)")
    p.add_argument("--quick", action="store_true", help="every script's --quick shapes and a shorter budget")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--scripts", default="new",
                   help="whose benchmarks/ scripts run: new (default: the same code times both trees), base, "
                        "own (each tree its own), or the path of another checkout")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>/ab)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of the runs")
    p.add_argument("--timeout", type=float, default=600, help="seconds one benchmark run may take")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write ab.md / ab.csv again from the runs already in --out/runs")
    args = p.parse_args(argv)
    if args.report_only:
        if not args.out:
            p.error("--report-only needs --out (the folder of an earlier run)")
        return report_only(os.path.abspath(args.out), args.only.split(",") if args.only else list(BENCHES),
                           argv if argv is not None else sys.argv[1:])
    if not args.base or not args.new:
        p.error("--base and --new are required (unless --report-only)")
    if args.rounds < 1:
        p.error("--rounds: expected at least 1")
    names = args.only.split(",") if args.only else list(BENCHES)
    bad = [n for n in names if n not in BENCHES]
    if bad:
        p.error(f"--only: unknown benchmarks {bad}; choose from {list(BENCHES)}")
    trees = {"base": os.path.abspath(args.base), "new": os.path.abspath(args.new)}
    for label, tree in trees.items():
        if not os.path.isdir(os.path.join(tree, "rgpt4d")):
            p.error(f"--{label} {tree}: not a checkout of this repository (no rgpt4d/ folder)")
    if args.out:
        out = os.path.abspath(args.out)
    else:
        out = os.path.join(HERE, "results", f"cpu-{os.cpu_count()}cores", "ab")
    os.makedirs(out, exist_ok=True)
    described = {label: check_tree(tree, args.python) for label, tree in trees.items()}
    if args.scripts in ("base", "new"):
        sources = {label: trees[args.scripts] for label in trees}
    elif args.scripts == "own":
        sources = dict(trees)
    elif os.path.isdir(os.path.join(args.scripts, "benchmarks")):
        sources = {label: os.path.abspath(args.scripts) for label in trees}
    else:
        p.error(f"--scripts {args.scripts}: expected new, base, own or a checkout with a benchmarks/ folder")
    bench_dirs = {label: copy_scripts(src, os.path.join(out, "scripts", label)) for label, src in sources.items()}
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    runs: dict = {(n, label): [] for n in names for label in trees}
    rels: dict = {(n, label): [] for n in names for label in trees}
    failures, walls = [], {label: 0.0 for label in trees}
    for r in range(args.rounds):
        for name in names:
            for label in ("base", "new"):
                folder = os.path.join(out, "runs", name, f"{label}-r{r}")
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
                cmd = [args.python, *script_args(bench_dirs[label], name, args.quick), "--out", folder]
                t0 = time.perf_counter()
                with open(os.path.join(folder, "log.txt"), "w") as log:
                    try:
                        rc = subprocess.run(cmd, env=tree_env(trees[label], folder), cwd=folder, stdout=log,
                                            stderr=subprocess.STDOUT, timeout=args.timeout).returncode
                    except subprocess.TimeoutExpired:
                        rc = "timeout"
                wall = time.perf_counter() - t0
                walls[label] += wall
                times, rel = read_times(folder, name) if rc == 0 else ({}, {})
                if rc != 0:
                    failures.append(f"{name} {label} round {r} (exit {rc}, {os.path.relpath(folder, out)}/log.txt)")
                runs[(name, label)].append(times)
                rels[(name, label)].append(rel)
                print(f"[ab] round {r + 1}/{args.rounds} {name:9s} {label:4s} {wall:6.1f} s "
                      f"{'ok' if rc == 0 else f'FAILED ({rc})'}, {len(times)} timings", flush=True)
    rows = []
    for name in names:
        rows += compare(runs[(name, "base")], runs[(name, "new")], rels[(name, "base")], rels[(name, "new")])
    total = time.perf_counter() - t_all
    cmdline = " ".join(["python benchmarks/ab.py", *(argv if argv is not None else sys.argv[1:])])
    header = [f"`{cmdline}`", "",
              f"- base: {described['base']}", f"- new: {described['new']}",
              "- benchmark scripts: "
              + ", ".join(f"{label}'s from {src}/benchmarks" for label, src in sources.items()) + "; "
              f"per run: `{' '.join(COMMON + (QUICK_BUDGET if args.quick else BUDGET))}` and each benchmark's sizes "
              f"({'--quick' if args.quick else 'BENCHES in benchmarks/ab.py'})",
              f"- {args.rounds} rounds, base then new per benchmark; wall time {total:.0f} s "
              f"(base {walls['base']:.0f} s, new {walls['new']:.0f} s); load average (1/5/15 min) at start "
              + "/".join(f"{v:.2f}" for v in load0) + ", at end " + "/".join(f"{v:.2f}" for v in os.getloadavg())]
    with open(os.path.join(out, "header.md"), "w") as f:
        f.write("\n".join(header) + "\n")
    write_report(out, rows, header, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
