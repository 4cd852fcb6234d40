"""The backend architecture: what is available, how a backend is chosen, and the fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

import rgpt4d
from rgpt4d.ops import BackendUnavailableError, available_backends, registry, set_backend, tpe_add


def test_cpu_machine_has_eager_cpu_and_interpreted_triton():
    # `make test` builds the extension and conftest sets TRITON_INTERPRET=1: all three must run.
    assert registry.extension_loaded(), registry.unavailable_reasons()
    backends = available_backends()
    for b in ("eager", "cpu", "triton"):
        assert b in backends, registry.unavailable_reasons()
    if not torch.cuda.is_available():
        assert "cuda" not in backends
        assert "cuda" in registry.unavailable_reasons()


def test_auto_dispatch_picks_cpu_for_cpu_tensors():
    assert registry.resolve("tpe_add", torch.device("cpu")) == "cpu"


def test_explicit_backend_errors_name_what_is_missing():
    x, ts = torch.randn(1, 2, 3, 4), torch.rand(1, 2)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
            tpe_add(x, ts, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        tpe_add(x, ts, backend="tpu")


def test_set_backend_and_env_override():
    x, ts = torch.randn(1, 2, 3, 4), torch.rand(1, 2)
    try:
        set_backend("eager")
        assert registry.resolve("tpe_add", x.device) == "eager"
        assert registry.resolve("tpe_add", x.device, "cpu") == "cpu"  # per call wins
        torch.testing.assert_close(tpe_add(x, ts), rgpt4d.ops.tpe_add_eager(x, ts))
    finally:
        set_backend(None)
    with pytest.raises(ValueError):
        set_backend("nope")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_missing_extension_falls_back_to_eager_with_one_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import rgpt4d\n"
        "from rgpt4d.ops import tpe_add, available_backends, BackendUnavailableError\n"
        "print('backends', available_backends())\n"
        "x, ts = torch.randn(1, 2, 3, 4), torch.rand(1, 2)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = tpe_add(x, ts); b = tpe_add(x, ts)\n"
        "print('warnings', len([i for i in w if 'using eager' in str(i.message)]))\n"
        "try:\n"
        "    tpe_add(x, ts, backend='cpu')\n"
        "except BackendUnavailableError as e:\n"
        "    print('error', e)\n"
    )
    r = _run(code, RGPT4D_DISABLE_EXT="1", TRITON_INTERPRET="0")
    assert r.returncode == 0, r.stderr
    assert "backends ['eager']" in r.stdout
    assert "warnings 1" in r.stdout
    assert "error" in r.stdout and "make setup" in r.stdout


def test_env_var_selects_backend():
    r = _run("from rgpt4d.ops import registry; import torch;"
             "print(registry.resolve('tpe_add', torch.device('cpu')))", RGPT4D_BACKEND="eager")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eager"


def test_env_report_lists_backends_and_reasons():
    r = subprocess.run([sys.executable, "-m", "rgpt4d.env"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    assert "backends      eager, cpu, triton" in r.stdout
    assert "rgpt4d._C     loaded" in r.stdout
    if not torch.cuda.is_available():
        assert "cuda    unavailable" in r.stdout


def test_cpu_schedules_give_the_same_bits(monkeypatch):
    """The dynamically scheduled CPU kernels (csrc/cpu/parallel.h) run on torch's OpenMP
    team by default and on at::launch helpers with RGPT4D_CPU_SCHEDULE=elastic: every chunk writes
    its own slot, so outputs and gradients are bitwise the same under either schedule and any
    thread count. Shapes big enough for several chunks per op (and tpe_add's streaming stores)."""
    from rgpt4d.ops import p4d_loss

    torch.manual_seed(0)
    x = torch.randn(1, 4, 1000, 1100)  # 4.4M elements: 35 MB moved, past the streaming threshold
    rows = torch.randint(0, 50, (1, 4))
    table = torch.randn(50, 1100, requires_grad=True)
    lat, lat_t = torch.randn(2, 512, 640, requires_grad=True), torch.randn(2, 512, 640)
    depth, depth_t = torch.rand(2, 4, 1, 96, 96).add(0.1).requires_grad_(True), torch.rand(2, 4, 1, 96, 96).add(0.1)
    mask = torch.rand(2, 4, 1, 96, 96) > 0.2

    def run():
        out = tpe_add(x, rows, table, backend="cpu")
        (g_table,) = torch.autograd.grad(out, [table], torch.ones_like(out))
        total, _ = p4d_loss(lat, lat_t, {"depth": depth}, {"depth": depth_t}, masks={"depth": mask}, backend="cpu")
        g_lat, g_depth = torch.autograd.grad(total, [lat, depth])
        return out, g_table, total, g_lat, g_depth

    threads = torch.get_num_threads()
    results = []
    try:
        for schedule, n in (("omp", 2), ("elastic", 2), ("", 1), ("elastic", 1)):
            monkeypatch.setenv("RGPT4D_CPU_SCHEDULE", schedule)
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))
    monkeypatch.setenv("RGPT4D_CPU_SCHEDULE", "fast")
    with pytest.raises(RuntimeError, match="RGPT4D_CPU_SCHEDULE must be 'omp' or 'elastic'"):
        torch.set_num_threads(2)
        try:
            tpe_add(x, rows, table.detach(), backend="cpu")
        finally:
            torch.set_num_threads(threads)


def test_extension_parallel_for_uses_torch_threads():
    """at::parallel_for in rgpt4d._C is an OpenMP region compiled into the extension: it only runs
    on more than one thread when the extension is built with -fopenmp (setup.py). Without the flag
    every at::parallel_for kernel silently ran on one thread."""
    assert registry.extension_loaded(), registry.unavailable_reasons()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.rgpt4d.parallel_for_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.rgpt4d.parallel_for_threads() == 1
    finally:
        torch.set_num_threads(before)
