"""A GPU compiler's verdict without a GPU: every Triton kernel of kernels/ compiles for an H100 (sm_90)
with the installed Triton at the configurations its launcher picks for the paper's shapes, in fp32,
bf16 and fp64, with no register spill (ptxas -v), and its fp64 specialisation gets its float
arguments (eps, log(base), 1/n, beta) as fp64. The interpreter sees none of this.

The work is in tests/ops/triton_sm90.py (run it directly for a table of registers and spills), one
process per kernel family without TRITON_INTERPRET: 107 launch configurations of 26 kernels. On 2
loaded CPU cores it takes minutes with a cold Triton cache (TRITON_CACHE_DIR, default ~/.triton/cache;
its rgpt4d-ptxas/ holds the ptxas -v reports) and about 7x less warm
(`TRITON_CACHE_DIR=<empty dir> pytest tests/ops/test_triton_compile.py`, then again)."""

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.ops.triton_sm90 import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def _results(family: str) -> list:
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "tests.ops.triton_sm90", "--family", family, "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available: " + r.stderr[-300:])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fmt(rows) -> str:
    return "\n".join(f"  {r['kernel']} [{r['case']}] {r.get('config', '')}: "
                     + (r["error"][-600:] if r.get("error") else
                        f"{r['registers']} registers, {r['spill_stores']} B spill stores, "
                        f"{r['spill_loads']} B spill loads")
                     for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernels_compile_for_sm90_without_spills(family):
    rows = _results(family)
    assert rows, f"no launch of the {family} kernels was recorded"
    errors = [r for r in rows if r.get("error")]
    assert not errors, f"{family}: compile errors for sm_90:\n" + _fmt(errors)
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["registers"] is None]
    assert not spills, f"{family}: register spills on sm_90 (ptxas -v):\n" + _fmt(spills)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fp64_kernels_take_float_arguments_as_fp64(family):
    # The GPU compiler types a Python float argument fp32 unless the parameter is annotated: an fp64
    # kernel would then see eps = 1e-5 as 1.0000000000000000818e-05 and be ~1e-7 accurate.
    rows = [r for r in _results(family) if "float64" in r["case"] and not r.get("error")]
    assert rows, f"no fp64 launch of the {family} kernels compiled"
    bad = [f"{r['kernel']}: {r['float_args']}, TTIR scalar arguments {r['ttir_scalar_types']}" for r in rows
           if any(t != "fp64" for t in r["float_args"].values()) or "f32" in r["ttir_scalar_types"]]
    assert not bad, "float arguments typed fp32 in fp64 kernels:\n" + "\n".join(bad)
