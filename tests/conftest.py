"""Test configuration. Without a CUDA device, TRITON_INTERPRET=1 is set before any @triton.jit is
defined, so that the Triton backend runs on CPU tensors under the interpreter. With one it is not
set (and an inherited TRITON_INTERPRET=1 is removed): the GPU tests must run the compiled kernels,
and tests/ops/test_gpu.py fails if a Triton kernel on CUDA tensors runs interpreted."""

import os


def _cuda_device_present() -> bool:
    # torch.cuda.is_available() initialises nothing (it asks the driver for a device count)
    import torch

    return torch.cuda.is_available()


def interpret_setting(cuda_present: bool, env) -> None:
    """TRITON_INTERPRET in `env` for a machine with / without a CUDA device."""
    if cuda_present:
        env.pop("TRITON_INTERPRET", None)
    else:
        env.setdefault("TRITON_INTERPRET", "1")


interpret_setting(_cuda_device_present(), os.environ)

import pytest  # noqa: E402
import torch  # noqa: E402

import rgpt4d.ops  # noqa: E402,F401  (declares every op)
from rgpt4d.ops import registry  # noqa: E402

registry.refresh()

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = "no CUDA GPU on this machine: the CUDA/Triton-on-GPU checks need one (CI compiles the CUDA code only)"

# Backends that run CPU tensors here. They are required, not optional: a missing one fails the
# tests (see test_backends.py) rather than skipping them. Triton runs CPU tensors only under the
# interpreter, which is off on a GPU machine (there the GPU tests run the compiled kernels).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["eager", "cpu"] + (["triton"] if INTERPRETED else [])
GPU_BACKENDS = ["eager", "cuda", "triton"]


def op_backends(*ops: str, device: str = "cpu") -> list[str]:
    """The backends to test `ops` on `device` with: those every one of them declares
    (rgpt4d/ops/registry.py) among the ones that run `device` tensors on this machine."""
    runnable = CPU_BACKENDS if device == "cpu" else GPU_BACKENDS
    return [b for b in runnable if all(b in registry.get(op).backends for op in ops)]


@pytest.fixture(autouse=True, scope="session")
def _bench_results_in_tmp(tmp_path_factory):
    """Benchmark scripts run by a test (and their subprocesses) write their results under a temporary
    folder, not into benchmarks/results/ of the source tree (benchmarks/harness.default_results_dir)."""
    old = os.environ.get("RGPT4D_BENCH_OUT")
    os.environ["RGPT4D_BENCH_OUT"] = str(tmp_path_factory.mktemp("bench-results"))
    yield
    if old is None:
        os.environ.pop("RGPT4D_BENCH_OUT", None)
    else:
        os.environ["RGPT4D_BENCH_OUT"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def requires_gpu(obj):
    """Skip without a CUDA device (printing why); mark `gpu`, which `make gpu-check` selects (-m gpu)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)(obj))


def _model_stack_missing():
    """Why rgpt4d's own model stack (rgpt4d.models, rgpt4d.train: transformers 5 names and internals such
    as PreTrainedConfig and AttentionInterface) cannot run here, or None. The drop-in integration
    (rgpt4d.integrations.transformers) and the ops need less (docs/compat.md)."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "transformers is not installed (pip install 'rgpt4d[models]')"
    if int(version.split(".")[0]) < MODEL_STACK_TRANSFORMERS[0]:
        return (f"rgpt4d's model stack needs transformers >= {'.'.join(map(str, MODEL_STACK_TRANSFORMERS))}, "
                f"this is {version}")
    return None


MODEL_STACK_TRANSFORMERS = (5, 0)
MODEL_STACK_MISSING = _model_stack_missing()
requires_model_stack = pytest.mark.skipif(MODEL_STACK_MISSING is not None, reason=str(MODEL_STACK_MISSING))


class ModelStackSkipped(pytest.Module):
    """A test module collected as one skip, with the reason, where the model stack cannot run (its
    import would fail). Returned by the pytest_pycollect_makemodule hooks of tests/models and
    tests/train."""

    def collect(self):
        pytest.skip(MODEL_STACK_MISSING)


def op_memory(op: str, backend: str, fn) -> int:
    """Bytes allocated inside the calls of the rgpt4d op `op` (its `_triton` variant for backend
    "triton") while fn runs, from the torch profiler's memory events."""
    name = f"rgpt4d::{op}" + ("_triton" if backend == "triton" else "")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = [e for e in prof.events() if e.name == name]
    assert ev, f"{name} did not run"
    return sum(e.cpu_memory_usage for e in ev)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skips without one); `make gpu-check` runs these")
