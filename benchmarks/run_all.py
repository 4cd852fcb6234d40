"""Run every benchmark (what `make bench` does) and print / write the summary.

    python benchmarks/run_all.py [--quick] [--no-compile] [--device cpu|cuda] [--only tpe,e2e]

Each script runs in its own process (so one's compiled graphs and allocator state do not touch
the next one's timings and peak memory) with the arguments given here, writes its CSV, markdown
and PNGs to benchmarks/results/<device>/, and this script then collects the ratio tables and the
target lines of every family into results/<device>/summary.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (name, script, arguments): sized so that `make bench` takes about 10 minutes on a 2-core CPU
# machine; --full runs every size
SCRIPTS = [
    ("tpe", "bench_tpe.py", ["--batches", "1"]),  # small + the paper shape at B=1
    ("regional", "bench_regional.py", ["--sizes", "small"]),
    ("p4d_loss", "bench_p4d_loss.py", ["--batches", "1", "--linear-n", "4096"]),  # small + paper-B1
    ("attention", "bench_attention.py", []),  # the student's SigLIP and Qwen2 calls
    # the training step takes ~1 s a call: a longer budget for more paired rounds; --profile writes
    # e2e_profile.txt (where the time goes in one step of each provider)
    ("e2e", "bench_e2e.py", ["--batch", "2", "--max-seconds", "15", "--profile"]),
    # every MLLM family's training step with apply_kernels, eager only: its compiled providers compile two
    # language models per family (16 compilations), well past this budget on 2 cores (--full runs them)
    ("integrations", "bench_integrations.py", ["--no-compile"]),
]
# the timing budget of every case (interleaved rounds at most; no new round after this many seconds)
BUDGET = ["--rounds", "11", "--max-seconds", "6"]
FULL = {"tpe": ["--batches", "1,2,4"], "regional": ["--sizes", "small,full"],
        "p4d_loss": ["--batches", "1,2,3,4", "--linear-n", "16384"], "integrations": []}


def sections(md: str, keep=("## rgpt4d", "## Target")) -> str:
    """The sections of a script's markdown whose heading starts with one of `keep`."""
    out, on = [], False
    for line in md.splitlines():
        if line.startswith("## "):
            on = line.startswith(keep)
        if on:
            out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    import torch

    from benchmarks.harness import _fmt_load, _loadavg, default_results_dir, device_name, git_sha

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every script (default on CPU: 1, see benchmarks/README.md; "
                        "0: torch's default)")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(s[0] for s in SCRIPTS))
    p.add_argument("--out", default=None)
    p.add_argument("--full", action="store_true",
                   help="every size of every script (the paper's batch sweep; well over 10 minutes on 2 cores)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_dir = args.out or default_results_dir(device)
    common = ["--device", args.device, "--out", out_dir]
    common += [f for f, on in (("--quick", args.quick), ("--no-compile", args.no_compile),
                               ("--no-plots", args.no_plots)) if on]
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        common += ["--threads", str(threads)]
    only = set(args.only.split(",")) if args.only else None
    load0 = _loadavg()
    t_all = time.perf_counter()
    walls, failed = {}, []
    for name, script, extra in SCRIPTS:
        if only and name not in only:
            continue
        print(f"\n===== {script} =====", flush=True)
        t0 = time.perf_counter()
        if args.full:
            extra = FULL.get(name, extra)
        rc = subprocess.call([sys.executable, os.path.join(HERE, script), *common, *BUDGET, *extra])
        walls[name] = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
    total = time.perf_counter() - t_all
    suffix = "-quick" if args.quick else ""
    parts = [f"# Benchmark summary: {device_name(device)}", "",
             f"torch {torch.__version__}, git {git_sha()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"load average (1/5/15 min) at start {_fmt_load(load0)}, at end {_fmt_load(_loadavg())}; "
             f"wall time {total:.0f} s (" + ", ".join(f"{n} {w:.0f} s" for n, w in walls.items()) + "); "
             f"torch threads: {threads or 'default'}", "",
             "Speed-ups are medians of interleaved rounds in one run (providers side by side); peak memory is "
             "the extra memory a call touches at its peak (benchmarks/README.md).", ""]
    for name in walls:
        path = os.path.join(out_dir, f"{name}{suffix}.md")
        if name in failed or not os.path.exists(path):
            parts += [f"## {name}: FAILED (see the output above)", ""]
            continue
        with open(path) as f:
            body = sections(f.read())
        parts += [f"# {name}", "", re.sub(r"^## ", "### ", body, flags=re.M), ""]
    summary = "\n".join(parts)
    with open(os.path.join(out_dir, f"summary{suffix}.md"), "w") as f:
        f.write(summary + "\n")
    print("\n" + summary)
    print(f"wrote {os.path.join(out_dir, f'summary{suffix}.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
