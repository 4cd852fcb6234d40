"""Backend selection for every rgpt4d op.

Four backends implement each op behind one public function:

- ``eager``  plain PyTorch (rgpt4d/ops/<family>.py, the ``*_eager`` functions): the oracle;
- ``cpu``    C++ kernels in csrc/ (the CPU dispatch key of ``torch.ops.rgpt4d.*``);
- ``cuda``   CUDA kernels in csrc/ (the CUDA dispatch key of the same ops);
- ``triton`` Triton kernels in kernels/ (``torch.ops.rgpt4d.*_triton`` custom ops). On a CPU
  machine they run under the Triton interpreter when ``TRITON_INTERPRET=1`` is set before the
  first kernel is defined.

Choice: ``backend=`` per call, else ``RGPT4D_BACKEND`` (or :func:`set_backend`), else automatic by
device: CPU tensors -> ``cpu``; CUDA tensors -> the op's preference among ``cuda``/``triton``.
Asking for a backend that is not available raises :class:`BackendUnavailableError` saying what
is missing. The automatic path falls back to ``eager`` with one warning when the extension did
not build.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("eager", "cpu", "triton", "cuda")

# Preference on CUDA tensors, per op family. Not yet measured on a GPU (no GPU in CI):
# revisit with benchmarks/ on one.
_CUDA_PREFERENCE = {
    "tpe": ("cuda", "triton"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


_EXT: dict = {"loaded": None, "error": None, "module": None}
_GLOBAL = {"backend": None}
_WARNED: set = set()


def _load_extension() -> bool:
    if _EXT["loaded"] is None:
        if os.environ.get("RGPT4D_DISABLE_EXT", "0") == "1":
            _EXT["loaded"], _EXT["error"] = False, "disabled by RGPT4D_DISABLE_EXT=1"
        else:
            try:
                from rgpt4d import _C  # noqa: F401  (loading it registers torch.ops.rgpt4d.*)

                _EXT["loaded"], _EXT["module"] = True, _C
            except ImportError as e:  # not built, or built against another torch
                if importlib.util.find_spec("rgpt4d._C") is None:
                    _EXT["loaded"], _EXT["error"] = False, "rgpt4d._C is not built"
                else:
                    _EXT["loaded"], _EXT["error"] = False, f"{type(e).__name__}: {e}"
    return bool(_EXT["loaded"])


def extension_loaded() -> bool:
    return _load_extension()


def extension_built_with_cuda() -> bool:
    return _load_extension() and bool(getattr(_EXT["module"], "built_with_cuda", 0))


def _triton_status() -> str | None:
    """None when Triton can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    if torch.cuda.is_available():
        return None
    return "no GPU, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton kernels on CPU tensors)"


_REASONS: dict = {}


def refresh() -> None:
    """Forget cached availability and RGPT4D_BACKEND (after changing the environment)."""
    _REASONS.clear()
    _GLOBAL.pop("env", None)


def unavailable_reasons() -> dict[str, str]:
    """For each backend this install cannot run, why. Computed once (see :func:`refresh`)."""
    if not _REASONS:
        _REASONS["value"] = _compute_unavailable_reasons()
    return dict(_REASONS["value"])


def _compute_unavailable_reasons() -> dict[str, str]:
    why: dict[str, str] = {}
    build_hint = "build it with `make setup` (or `pip install --no-build-isolation -e .`)"
    if not _load_extension():
        why["cpu"] = f"the compiled extension rgpt4d._C did not load ({_EXT['error']}); {build_hint}"
        why["cuda"] = why["cpu"]
    else:
        if not extension_built_with_cuda():
            why["cuda"] = "rgpt4d._C was built without CUDA kernels; rebuild with FORCE_CUDA=1 (needs nvcc)"
        elif not torch.cuda.is_available():
            why["cuda"] = "no CUDA device is visible to torch"
    t = _triton_status()
    if t is not None:
        why["triton"] = t
    return why


def available_backends() -> list[str]:
    """Backends this install can run, in the order eager, cpu, triton, cuda."""
    why = unavailable_reasons()
    return [b for b in BACKENDS if b not in why]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None: automatic). Same as RGPT4D_BACKEND."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _GLOBAL["backend"] = name


def _global_backend() -> str | None:
    if _GLOBAL["backend"] is not None:
        return _GLOBAL["backend"]
    if "env" not in _GLOBAL:
        _GLOBAL["env"] = os.environ.get("RGPT4D_BACKEND") or None
    env = _GLOBAL["env"]
    if env is not None and env not in BACKENDS and env != "auto":
        raise ValueError(f"RGPT4D_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
    return None if env == "auto" else env


def _check_device(op: str, backend: str, device: torch.device) -> None:
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"{op}: backend 'cpu' runs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"{op}: backend 'cuda' runs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise BackendUnavailableError(
            f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before rgpt4d's Triton "
            "kernels are first used"
        )


def resolve(op: str, family: str, device: torch.device, backend: str | None) -> str:
    """The backend that runs `op` (of op family `family`) on tensors on `device`."""
    requested = backend if backend is not None else _global_backend()
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {requested!r}")
        if requested != "eager":
            why = (_REASONS.get("value") or unavailable_reasons()).get(requested)
            if why is not None:
                raise BackendUnavailableError(f"{op}: backend {requested!r} is not available: {why}")
            _check_device(op, requested, device)
        return requested
    if device.type == "cpu":
        candidates: tuple = ("cpu",)
    elif device.type == "cuda":
        candidates = _CUDA_PREFERENCE.get(family, ("cuda", "triton"))
    else:
        candidates = ()
    why = _REASONS.get("value") or unavailable_reasons()
    for c in candidates:
        if c not in why:
            return c
    if candidates and family not in _WARNED:
        _WARNED.add(family)
        reasons = "; ".join(f"{c}: {why[c]}" for c in candidates)
        warnings.warn(f"rgpt4d: no compiled backend for {family} ops on {device.type} ({reasons}); using eager",
                      RuntimeWarning, stacklevel=3)
    return "eager"


# ---- the CPU output cache of the compiled kernels (csrc/common/cpu_pool.cpp) ------------------

def cpu_cache_stats() -> dict:
    """Bytes and blocks held (not in use) by the compiled CPU kernels' cache of large outputs.

    Outputs of at least 1 MiB are returned to this cache when freed and reused by the next output
    of the same size, so a training loop's steady-state outputs land in warm pages instead of
    page-faulting fresh memory every step (the CPU analogue of the CUDA caching allocator). It
    holds at most RGPT4D_CPU_POOL_MB MiB (default 1024; 0 turns it off)."""
    if not _load_extension():
        return {"bytes": 0, "blocks": 0}
    nbytes, blocks = torch.ops.rgpt4d.cpu_pool_stats()
    return {"bytes": int(nbytes), "blocks": int(blocks)}


def empty_cpu_cache() -> int:
    """Give the CPU output cache's memory back to the system; returns the bytes released."""
    if not _load_extension():
        return 0
    return int(torch.ops.rgpt4d.cpu_pool_empty())
