"""benchmarks/gpu_check.py (make gpu-check): stops at once without a GPU; its summary tables."""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import ROOT, bench_tables, family_of_test  # noqa: E402


def test_without_a_gpu_it_stops_at_once_with_a_clear_message():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    log = os.path.join(ROOT, "build", "gpu-check", "build.log")
    before = os.path.getmtime(log) if os.path.exists(log) else None
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device is visible" in r.stderr and "make gpu-check" in r.stderr
    after = os.path.getmtime(log) if os.path.exists(log) else None
    assert after == before, "it started a build"
    assert "building" not in r.stdout
    assert time.time() - t0 < 120  # an import of torch, not a build


def test_family_of_a_test():
    assert family_of_test("tests.ops.test_gpu", "test_gpu_matches_float64_eager[roi_align-contiguous-float32-cuda]") \
        == "regional"
    assert family_of_test("tests.ops.test_gpu", "test_gpu_matches_float64_eager[rms_norm-contiguous-bfloat16-triton]") \
        == "lm"
    assert family_of_test("tests.ops.test_tpe_downsample", "test_gpu_x") == "tpe"
    assert family_of_test("tests.ops.test_p4d_linear", "test_gpu_x") == "p4d"


def test_bench_tables():
    def row(provider, metric, v, kernel="k", mode="full", x="paper-B1"):
        return dict(kernel=kernel, provider=provider, mode=mode, x=x, metric=metric, p50=str(v))
    rows = [row("eager", "time", 4.0), row("compile", "time", 2.0), row("rgpt4d-cuda", "time", 1.0),
            row("rgpt4d-cuda", "bandwidth", 100.0), row("rgpt4d-cuda", "copy_fraction", 0.5),
            row("rgpt4d-cuda", "nominal_floor_fraction", 0.25), row("rgpt4d-cuda", "check_vs_eager", 1.0),
            row("compile", "check_vs_eager", 0.0)]
    speed, roof, checks = bench_tables({"tpe": rows})
    assert "| tpe | k | full | paper-B1 | rgpt4d-cuda | 1 | 4.00x | 2.00x |" in speed
    assert any("rgpt4d-cuda | 1 | 100.0 | 0.00 | 100 | 50% | 25% |" in line for line in roof)
    assert checks == {"tpe": (1, 2)}
