"""`make gpu-check`: build, test and time every CUDA and Triton kernel on this GPU in one short run.

    make gpu-check PY=python3            # or: python3 benchmarks/gpu_check.py [--budget 480]

1. build rgpt4d._C in place with the CUDA kernels: FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = this GPU's
   compute capability, MAX_JOBS = the cores (ninja, incremental in build/);
2. the GPU tests (pytest -m gpu: tests/ops/test_gpu.py and every test_gpu_* of tests/), in parallel
   pytest processes so the Triton compiles of first use spread over the cores;
3. the benchmarks at the paper shapes (eager, torch.compile, rgpt4d-cuda, rgpt4d-triton; each
   provider's output checked against eager before it is timed), one script after another;
4. benchmarks/results/<gpu-name>/: each script's CSV and markdown, and gpu_check.md (pass/fail per
   family, speed-ups, the roofline fraction of each op: its minimal bytes and FLOPs against the
   copy_ bandwidth measured in the same run and the GPU's nominal peak); the one-screen summary.

With $OUT set (the device tool returns only files under it) the results also go to
$OUT/<gpu-name>/: summary.md, results.md, results.csv, tests.txt, build.log (5 files, one folder).
Without a CUDA device it stops at once (exit status 2). Each stage stops at its share of --budget
(docs/gpu.md: how the 8 minutes were sized); what did not run is reported, not hidden.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Benchmarks: (family, script, arguments). The paper-shaped cases only (--only-x), the forward and
# forward + backward modes; torch.compile's compile time dominates (docs/gpu.md).
BENCHES = [
    ("tpe", "bench_tpe.py", ["--batches", "1", "--modes", "forward,full", "--only-x", "paper"]),
    ("regional", "bench_regional.py", ["--sizes", "full", "--modes", "forward,full"]),
    ("p4d", "bench_p4d_loss.py", ["--batches", "1", "--linear-n", "16384", "--modes", "full",
                                  "--only-x", "paper|linear"]),
    ("lm", "bench_lm_heads.py", ["--modes", "forward,full"]),  # lm and heads
]
# (attention has no rgpt4d GPU kernel: SDPA / flash-attn there; bench_e2e's model compile takes minutes)
RESULTS = {"p4d": "p4d_loss", "lm": "lm_heads"}  # family -> the script's results name


# Test families: a test's family from its file (test_<family>*.py) or, in test_gpu.py, its case name.
_CASE_FAMILY = [("tpe", "tpe"), ("roi_align", "regional"), ("region_pool", "regional"), ("mask_pool", "regional"),
                ("p4d_loss", "p4d"), ("fused_linear_latent_loss", "p4d"), ("fused_linear_cross_entropy", "lm"),
                ("rms_norm", "lm"), ("swiglu", "lm"), ("rope", "lm"), ("pixel_shuffle", "heads")]
# pytest shards run side by side: test_gpu.py by dtype (each dtype compiles its own Triton kernels),
# the other GPU tests in one more
SHARDS = [("gpu-float32", ["tests/ops/test_gpu.py", "-k", "float32 or not (bfloat16 or float16 or float64)"]),
          ("gpu-bfloat16", ["tests/ops/test_gpu.py", "-k", "bfloat16"]),
          ("gpu-float16", ["tests/ops/test_gpu.py", "-k", "float16 and not bfloat16"]),
          ("gpu-float64", ["tests/ops/test_gpu.py", "-k", "float64"]),
          ("others", ["tests", "--ignore", "tests/ops/test_gpu.py"])]


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def family_of_test(classname: str, name: str) -> str:
    if classname.endswith("test_gpu"):
        for key, fam in _CASE_FAMILY:
            if key in name:
                return fam
        return "cross-family"
    base = classname.rsplit(".", 1)[-1].removeprefix("test_")
    for fam in ("tpe", "regional", "p4d", "lm", "heads", "attention"):
        if base.startswith(fam):
            return fam
    return base


def run_logged(cmd, env, timeout, path) -> tuple[int, float]:
    """(exit status, seconds); 124 when it ran past `timeout` (then killed). Output to `path`."""
    t0 = time.perf_counter()
    with open(path, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            rc = 124
    return rc, time.perf_counter() - t0


# ---- stages -----------------------------------------------------------------------------------

def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                        "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.exists(cand):
            return cand
    return None


def build(env, arch: str, jobs: int, timeout: float, logdir: str) -> dict:
    cuda = _nvcc() is not None
    benv = {**env, "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs)}
    if cuda:
        benv["FORCE_CUDA"] = "1"
    else:  # the Triton kernels and the CPU ones still get checked; the cuda backend's tests fail
        log("no nvcc (CUDA_HOME, PATH, /usr/local/cuda): building the CPU kernels only, the cuda backend is NOT "
            "checked")
    log(f"building rgpt4d._C {'with' if cuda else 'WITHOUT'} the CUDA kernels (arch {arch}, MAX_JOBS={jobs}) -> "
        f"{logdir}/build.log")
    rc, secs = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], benv, timeout,
                          os.path.join(logdir, "build.log"))
    ok = rc == 0
    if ok:  # the fresh library loads and has the CUDA kernels
        r = subprocess.run([sys.executable, "-c", "from rgpt4d.ops import registry as b; import sys; "
                            "sys.exit(0 if b.extension_built_with_cuda() else 1)"], env=env, cwd=ROOT)
        ok = r.returncode == 0
    log(f"build {'ok' if ok else 'FAILED' if rc != 124 else 'TIMED OUT'} in {secs:.0f} s")
    return {"ok": ok, "seconds": secs, "rc": rc, "cuda": cuda}


def run_tests(env, timeout: float, logdir: str) -> dict:
    log(f"GPU tests: {len(SHARDS)} pytest processes side by side (-m gpu), at most {timeout:.0f} s")
    procs, t0 = [], time.perf_counter()
    for name, args in SHARDS:
        xml = os.path.join(logdir, f"junit-{name}.xml")
        out = open(os.path.join(logdir, f"pytest-{name}.log"), "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "-o", "junit_family=xunit1", *args]
        procs.append((name, xml, out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                                       start_new_session=True)))
    timed_out = []
    for name, xml, out, p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            timed_out.append(name)
        out.close()
    secs = time.perf_counter() - t0
    fams: dict = {}
    failures = []
    for name, xml, _, _ in procs:
        if not os.path.exists(xml):
            continue
        for tc in ET.parse(xml).getroot().iter("testcase"):
            fam = family_of_test(tc.get("classname", ""), tc.get("name", ""))
            d = fams.setdefault(fam, {"passed": 0, "failed": 0, "skipped": 0})
            if tc.find("failure") is not None or tc.find("error") is not None:
                d["failed"] += 1
                el = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
                failures.append(f"{tc.get('classname')}::{tc.get('name')}: {(el.get('message') or '')[:300]}")
            elif tc.find("skipped") is not None:
                d["skipped"] += 1
            else:
                d["passed"] += 1
    log(f"GPU tests done in {secs:.0f} s" + (f"; TIMED OUT: {', '.join(timed_out)}" if timed_out else ""))
    return {"families": fams, "failures": failures, "timed_out": timed_out, "seconds": secs}


def run_benches(env, out_dir: str, deadline: float, logdir: str, device: str = "cuda") -> dict:
    res = {}
    for fam, script, extra in BENCHES:
        left = deadline - time.perf_counter()
        if left < 20:
            res[fam] = {"status": "not run (budget spent)", "seconds": 0.0}
            log(f"benchmark {script}: not run, {left:.0f} s left")
            continue
        log(f"benchmark {script} (at most {left:.0f} s)")
        cmd = [sys.executable, os.path.join(HERE, script), "--device", device, "--out", out_dir, "--no-plots", *extra]
        if device == "cpu":  # --dry-run-cpu: the orchestration only
            cmd += ["--quick", "--no-compile", "--rounds", "3", "--max-seconds", "1", "--threads", "1", "--only-x", "."]
        rc, secs = run_logged(cmd, env, left, os.path.join(logdir, f"bench-{fam}.log"))
        res[fam] = {"status": "ok" if rc == 0 else ("TIMED OUT" if rc == 124 else f"FAILED (exit {rc})"),
                    "seconds": secs}
        log(f"benchmark {script}: {res[fam]['status']} in {secs:.0f} s")
    return res


# ---- the summary --------------------------------------------------------------------------------

def _result_path(out_dir: str, fam: str, ext: str) -> str:
    """The family's results file (<name>-quick.<ext> in a dry run's --quick benchmarks)."""
    path = os.path.join(out_dir, f"{RESULTS.get(fam, fam)}.{ext}")
    quick = os.path.join(out_dir, f"{RESULTS.get(fam, fam)}-quick.{ext}")
    return path if os.path.exists(path) or not os.path.exists(quick) else quick


def _bench_rows(out_dir: str) -> dict:
    rows = {}
    for fam, script, _ in BENCHES:
        path = _result_path(out_dir, fam, "csv")
        if os.path.exists(path):
            with open(path) as f:
                rows[fam] = list(csv.DictReader(f))
    return rows


def _val(rows, kernel, provider, mode, x, metric):
    for r in rows:
        if (r["kernel"], r["provider"], r["mode"], r["x"], r["metric"]) == (kernel, provider, mode, x, metric):
            return float(r["p50"])
    return None


def bench_tables(rows_by_fam: dict) -> tuple[list, list, dict]:
    """(speed-up lines, roofline table lines, {family: (checks passed, checks total)})."""
    speed = ["| family | kernel | mode | size | provider | ms | vs eager | vs compile |",
             "|---|---|---|---|---|---:|---:|---:|"]
    roof = ["| kernel | mode | size | provider | ms | min MB | GFLOP | GB/s | of copy_ bandwidth | of nominal peak |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    checks = {}
    for fam, rows in rows_by_fam.items():
        ck = [r for r in rows if r["metric"] == "check_vs_eager"]
        checks[fam] = (sum(float(r["p50"]) == 1.0 for r in ck), len(ck))
        seen = set()
        for r in rows:
            if r["metric"] != "time" or not r["provider"].startswith("rgpt4d"):
                continue
            key = (r["kernel"], r["mode"], r["x"], r["provider"])
            if key in seen:
                continue
            seen.add(key)
            t = float(r["p50"])
            te = _val(rows, r["kernel"], "eager", r["mode"], r["x"], "time")
            tc = _val(rows, r["kernel"], "compile", r["mode"], r["x"], "time")
            speed.append(f"| {fam} | {key[0]} | {key[1]} | {key[2]} | {key[3]} | {t:.4g} | "
                         f"{f'{te / t:.2f}x' if te else '-'} | {f'{tc / t:.2f}x' if tc else '-'} |")
        for r in rows:
            if r["metric"] != "time":
                continue
            k = (r["kernel"], r["provider"], r["mode"], r["x"])
            bw = _val(rows, *k, "bandwidth")
            cf = _val(rows, *k, "copy_fraction")
            nf = _val(rows, *k, "nominal_floor_fraction")
            gf = _val(rows, *k, "gflops")
            if bw is None and nf is None:
                continue
            t = float(r["p50"])
            mb = bw * 1e9 * t * 1e-3 / 1e6 if bw else None
            gfl = gf * t * 1e-3 if gf else 0.0
            roof.append(f"| {k[0]} | {k[2]} | {k[3]} | {k[1]} | {t:.4g} | {'-' if mb is None else f'{mb:.1f}'} | "
                        f"{gfl:.2f} | {'-' if bw is None else f'{bw:.0f}'} | {'-' if cf is None else f'{cf:.0%}'} | "
                        f"{'-' if nf is None else f'{nf:.0%}'} |")
    return speed, roof, checks


def summarize(gpu, arch, b, t, benches, out_dir, total, budget, dry=False) -> tuple[str, bool]:
    import torch

    from benchmarks.harness import nominal_peak

    rows = _bench_rows(out_dir)
    speed, roof, checks = bench_tables(rows)
    peak, bw, fl = nominal_peak(torch.device("cpu" if dry else "cuda"))
    fams = sorted(set(t.get("families", {})) | set(checks) | {f for f, _, _ in BENCHES})
    ok = (b.get("ok", False) or not b) and not t.get("failures") and not t.get("timed_out")
    lines = [f"# gpu-check: {gpu} (sm_{arch.replace('.', '')})", "",
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"wall {total:.0f} s of a "
             f"{budget:.0f} s budget (build {b.get('seconds', 0):.0f} s, tests {t.get('seconds', 0):.0f} s, benchmarks "
             f"{sum(v['seconds'] for v in benches.values()):.0f} s); nominal peak ({peak}) {bw / 1e12:.2f} TB/s, "
             f"{fl / 1e12:.0f} bf16 TFLOP/s", "",
             f"build: {'skipped' if not b else 'FAILED (build.log)' if not b['ok'] else 'ok'}"
             + ("" if not b or b.get("cuda") else " (no nvcc: CPU kernels only, the cuda backend unchecked)"), "",
             "| family | GPU tests passed | failed | skipped | benchmark | outputs vs eager |",
             "|---|---:|---:|---:|---|---|"]
    for fam in fams:
        d = t.get("families", {}).get(fam, {"passed": 0, "failed": 0, "skipped": 0})
        bs = benches.get(fam, {}).get("status", "-")
        c = checks.get(fam)
        cs = "-" if not c or not c[1] else (f"{c[0]}/{c[1]} ok" if c[0] == c[1] else f"{c[1] - c[0]} of {c[1]} FAIL")
        if c and c[0] != c[1] or (bs not in ("ok", "-")):
            ok = False
        lines.append(f"| {fam} | {d['passed']} | {d['failed']} | {d['skipped']} | {bs} | {cs} |")
    if t.get("timed_out"):
        lines += ["", f"test shards TIMED OUT (their unfinished tests are not counted): {', '.join(t['timed_out'])}"]
    if t.get("failures"):
        lines += ["", "## Failed tests", ""] + [f"- {f}" for f in t["failures"][:40]]
    lines += ["", "## Speed-ups of rgpt4d (same run, medians of do_bench)", "", *speed, "",
              "## Roofline: each op's minimal bytes and FLOPs against this run's copy_ bandwidth and the nominal peak",
              "", *roof, ""]
    lines += ["", f"**gpu-check {'PASSED' if ok else 'FAILED'}**"]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 8 minutes)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu-name>)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="check this script's stages without a GPU: no build, the GPU tests (they skip), quick CPU "
                        "benchmarks, the summary")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    dry = args.dry_run_cpu
    if dry:
        args.skip_build = True
    elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("gpu-check: no CUDA device is visible to torch (torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}): nothing to check here. Run it on a "
              "machine with an NVIDIA GPU: make gpu-check PY=python3 (docs/gpu.md).", file=sys.stderr)
        return 2
    gpu = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    cap = (0, 0) if dry else torch.cuda.get_device_capability(0)
    arch = f"{cap[0]}.{cap[1]}"
    from benchmarks.harness import device_name

    out_dir = args.out or os.path.join(HERE, "results", device_name(torch.device("cpu" if dry else "cuda")))
    logdir = os.path.join(ROOT, "build", "gpu-check")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(logdir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under torch.use_deterministic_algorithms
    cores = os.cpu_count() or 1
    log(f"{gpu} (sm_{arch.replace('.', '')}), {torch.cuda.device_count()} GPU(s), {cores} cores, torch "
        f"{torch.__version__}, budget {args.budget:.0f} s")
    deadline = t_start + args.budget
    b = {} if args.skip_build else build(env, arch, cores, 0.45 * args.budget, logdir)
    t: dict = {}
    benches: dict = {}
    if b and not b["ok"]:  # the Triton kernels still run: their tests and timings are still worth having
        log("the build FAILED (build/gpu-check/build.log); the tests and benchmarks run on what loads")
    if not args.skip_tests:
        left = deadline - time.perf_counter()
        t = run_tests(env, min(0.5 * left, 200.0) if not args.skip_bench else left - 10, logdir)
    if not args.skip_bench:
        benches = run_benches(env, out_dir, deadline - 10, logdir, "cpu" if dry else "cuda")
    total = time.perf_counter() - t_start
    md, ok = summarize(gpu, arch, b, t, benches, out_dir, total, args.budget, dry)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(md + "\n")
    tests_txt = []
    for path in sorted(glob.glob(os.path.join(logdir, "pytest-*.log"))):
        with open(path) as f:
            tail = f.read().splitlines()[-60:]
        tests_txt += [f"==== {os.path.basename(path)} (last lines)", *tail, ""]
    with open(os.path.join(out_dir, "gpu_check_tests.txt"), "w") as f:
        f.write("\n".join(tests_txt) + "\n")
    if os.environ.get("OUT"):
        dest = os.path.join(os.environ["OUT"], os.path.basename(out_dir))
        os.makedirs(dest, exist_ok=True)
        shutil.copy(os.path.join(out_dir, "gpu_check.md"), os.path.join(dest, "summary.md"))
        shutil.copy(os.path.join(out_dir, "gpu_check_tests.txt"), os.path.join(dest, "tests.txt"))
        with open(os.path.join(dest, "results.md"), "w") as fo, open(os.path.join(dest, "results.csv"), "w") as fc:
            header = False
            for fam, _, _ in BENCHES:
                for ext, fh in (("md", fo), ("csv", fc)):
                    path = _result_path(out_dir, fam, ext)
                    if not os.path.exists(path):
                        continue
                    with open(path) as f:
                        text = f.read()
                    if ext == "csv" and header:
                        text = text.split("\n", 1)[1] if "\n" in text else ""
                    header = header or ext == "csv"
                    fh.write(text if ext == "csv" else text + "\n\n")
        blog = os.path.join(logdir, "build.log")
        if os.path.exists(blog):
            with open(blog) as f:
                lines = f.read().splitlines()
            with open(os.path.join(dest, "build.log"), "w") as f:
                f.write("\n".join([ln for ln in lines if re.search(r"error|warning: .*spill|bytes spill", ln,
                                                                     re.I)][:200] + lines[-100:]) + "\n")
        log(f"results also in {dest}")
    print("\n" + md.split("## Roofline")[0] + f"**gpu-check {'PASSED' if ok else 'FAILED'}** "
          f"(the roofline table: {out_dir}/gpu_check.md)")
    log(f"wrote {out_dir}/ (gpu_check.md, gpu_check_tests.txt and each benchmark's CSV and markdown)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
