"""The op registry: every rgpt4d op is declared here once, and its backends follow from the declaration.

Backends of an op, behind its one public function (rgpt4d/ops/<family>.py):

- ``eager``  plain PyTorch, the ``*_eager`` reference functions: the oracle of the tests;
- ``cpu``    C++ kernels in csrc/<family>/, registered under the CPU dispatch key of ``torch.ops.rgpt4d.<op>``;
- ``cuda``   CUDA kernels in csrc/<family>/, under the CUDA dispatch key of the same op, so
  ``torch.ops.rgpt4d.<op>`` on CUDA tensors reaches them with no Python in between;
- ``triton`` Triton kernels in kernels/<family>.py, the op ``torch.ops.rgpt4d.<op>_triton`` (Triton
  runs CUDA tensors, and CPU tensors under the interpreter when ``TRITON_INTERPRET=1`` is set
  before the first kernel is defined).

A family module declares each op with :meth:`Family.op`: its schema (one string, used for both
``rgpt4d::<op>`` and ``rgpt4d::<op>_triton``; the C++ code only registers implementations), its fake
(meta) function, its autograd formula, and its Triton host function. The formula's backward
reaches the sibling ops of the same backend through ``ctx.ops`` (``ctx.ops.tpe_table_backward`` is
the compiled op when the forward ran compiled, the Triton one when it ran on Triton).

Choice of backend: ``backend=`` per call, else ``RGPT4D_BACKEND`` (or :func:`set_backend`), else by
device: CPU tensors -> ``cpu``; CUDA tensors -> the family's preference among ``cuda``/``triton``.
Asking for a backend that cannot run raises :class:`BackendUnavailableError` saying what is
missing; the automatic choice falls back to ``eager`` with one warning when nothing compiled can.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("eager", "cpu", "triton", "cuda")
NAMESPACE = "rgpt4d"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


# ---------------------------------------------------------------------------------------------
# What this install can run
# ---------------------------------------------------------------------------------------------

_EXT: dict = {"loaded": None, "error": None, "module": None}


def _load_extension() -> bool:
    if _EXT["loaded"] is None:
        if os.environ.get("RGPT4D_DISABLE_EXT", "0") == "1":
            _EXT["loaded"], _EXT["error"] = False, "disabled by RGPT4D_DISABLE_EXT=1"
        else:
            try:  # optional: the compiled extension (absent, or disabled above)
                from rgpt4d import _C  # loading it registers the CPU/CUDA kernels of torch.ops.rgpt4d.*

                _EXT["loaded"], _EXT["module"] = True, _C
            except ImportError as e:  # not built, or built against another torch
                if importlib.util.find_spec("rgpt4d._C") is None:
                    _EXT["loaded"], _EXT["error"] = False, "rgpt4d._C is not built"
                else:
                    _EXT["loaded"], _EXT["error"] = False, f"{type(e).__name__}: {e}"
    return bool(_EXT["loaded"])


def extension_loaded() -> bool:
    """Whether the compiled extension rgpt4d._C (the cpu and cuda backends) is loaded."""
    return _load_extension()


def extension_built_with_cuda() -> bool:
    return _load_extension() and bool(getattr(_EXT["module"], "built_with_cuda", 0))


def extension_info() -> dict:
    """loaded, error (why it did not load), path, build (its build flags), cuda (built with CUDA kernels)."""
    loaded = _load_extension()
    mod = _EXT["module"]
    return {"loaded": loaded, "error": _EXT["error"], "path": getattr(mod, "__file__", None),
            "build": getattr(mod, "build_info", None), "cuda": extension_built_with_cuda()}


def _triton_status() -> Optional[str]:
    """None when Triton can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available():
        return None
    return "no GPU, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton kernels on CPU tensors)"


_STATE: dict = {"backend": None}  # set_backend's choice; "env" and "reasons" are cached reads
_WARNED: set = set()


def refresh() -> None:
    """Forget cached availability and RGPT4D_BACKEND (after changing the environment)."""
    _STATE.pop("reasons", None)
    _STATE.pop("env", None)


def unavailable_reasons() -> dict[str, str]:
    """For each backend this install cannot run, why. Computed once (see :func:`refresh`)."""
    if "reasons" not in _STATE:
        why: dict[str, str] = {}
        hint = "build it with `make setup` (or `pip install --no-build-isolation -e .`)"
        if not _load_extension():
            why["cpu"] = why["cuda"] = f"the compiled extension rgpt4d._C did not load ({_EXT['error']}); {hint}"
        elif not extension_built_with_cuda():
            why["cuda"] = "rgpt4d._C was built without CUDA kernels; rebuild with FORCE_CUDA=1 (needs nvcc)"
        elif not torch.cuda.is_available():
            why["cuda"] = "no CUDA device is visible to torch"
        t = _triton_status()
        if t is not None:
            why["triton"] = t
        _STATE["reasons"] = why
    return dict(_STATE["reasons"])


def available_backends(op: Optional[str] = None) -> list[str]:
    """Backends this install can run (those `op` implements, when given), in the order of BACKENDS."""
    why = unavailable_reasons()
    declared = BACKENDS if op is None else get(op).backends
    return [b for b in BACKENDS if b in declared and b not in why]


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (None: automatic). Same as RGPT4D_BACKEND."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _STATE["backend"] = name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """set_backend(name) inside the block; the previous process-wide choice is restored after it."""
    previous = _STATE["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _STATE["backend"] = previous


def get_backend() -> Optional[str]:
    """The process-wide default backend: set_backend's, else RGPT4D_BACKEND's, else None (automatic)."""
    if _STATE["backend"] is not None:
        return _STATE["backend"]
    if "env" not in _STATE:
        env = os.environ.get("RGPT4D_BACKEND") or None
        if env is not None and env not in BACKENDS and env != "auto":
            raise ValueError(f"RGPT4D_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
        _STATE["env"] = None if env == "auto" else env
    return _STATE["env"]


# ---------------------------------------------------------------------------------------------
# Declaration
# ---------------------------------------------------------------------------------------------

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_OPS: dict[str, "Op"] = {}


def _triton_name(name: str) -> str:
    """The Triton variant's op name: tpe_add -> tpe_add_triton, in-place tpe_add_ -> tpe_add_triton_."""
    return name[:-1] + "_triton_" if name.endswith("_") else name + "_triton"


class _Siblings:
    """ctx.ops of an autograd formula: the ops of the backend the forward ran on."""

    def __init__(self, triton: bool):
        self._triton = triton

    def __getattr__(self, name: str):
        return getattr(torch.ops.rgpt4d, _triton_name(name) if self._triton else name)


_COMPILED, _TRITON = _Siblings(False), _Siblings(True)


def _mutated_args(schema: str) -> tuple:
    """Names of the arguments the schema writes to (`Tensor(a!) x`)."""
    return tuple(re.findall(r"Tensor\([a-z]!\)\s+(\w+)", schema))


@dataclass
class Op:
    """One declared op. `kernel(backend)` is the torch op that runs it on a compiled backend."""

    name: str
    family: "Family"
    schema: str
    backends: tuple
    fake: Callable
    triton: Optional[Callable] = None
    autograd: Optional[tuple] = None
    api: str = ""  # the public function's name, for messages (default: the op's name)
    overloads: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.api = self.api or self.name

    def kernel(self, backend: str):
        """torch.ops.rgpt4d.<name> for cpu/cuda (the dispatch key picks the kernel), its Triton variant for triton."""
        op = self.overloads.get(backend)
        if op is None:
            name = _triton_name(self.name) if backend == "triton" else self.name
            op = self.overloads[backend] = getattr(torch.ops.rgpt4d, name).default
        return op

    def __call__(self, backend: str, *args):
        """Run the op on a compiled backend ("cpu", "cuda" or "triton") with the declared autograd.

        Outside torch.compile, a call with gradients runs the declared formula through one
        autograd.Function (_EagerAutograd), not through torch.library's generic autograd wrapper:
        that wrapper flattens every argument with pytree, which costs p4d_loss (lists of terms) a
        few hundred microseconds per call, as much as its kernels on small inputs
        (`python benchmarks/bench_p4d_loss.py --quick`). The formula and its results are the same."""
        fn = self.kernel(backend)
        if self.autograd is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return fn(*args)
        leaves, where = [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.requires_grad:
                    leaves.append(a)
                    where.append((i, None))
            elif type(a) is list:
                for j, t in enumerate(a):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        leaves.append(t)
                        where.append((i, j))
        if not leaves:
            return fn(*args)
        layout: list = []  # filled by forward: the outputs' structure
        flat = _EagerAutograd.apply(self, backend, args, where, layout, *leaves)
        return _unflatten(flat, layout[0])

    def select(self, device: torch.device, backend: Optional[str] = None) -> str:
        """The backend that runs this op on tensors on `device` (see the module docstring)."""
        requested = backend if backend is not None else get_backend()
        why = _STATE["reasons"] if "reasons" in _STATE else unavailable_reasons()
        if requested is not None:
            if requested not in BACKENDS:
                raise ValueError(f"{self.api}: backend must be one of {BACKENDS} or None, got {requested!r}")
            if requested != "eager":
                if requested not in self.backends:
                    raise BackendUnavailableError(
                        f"{self.api}: rgpt4d has no {requested} kernel for this op (it has {list(self.backends)})")
                if requested in why:
                    raise BackendUnavailableError(f"{self.api}: backend {requested!r} is not available: "
                                                  f"{why[requested]}")
                _check_device(self.api, requested, device)
            return requested
        if device.type == "cpu":
            candidates: tuple = ("cpu",)
        elif device.type == "cuda":
            candidates = self.family.cuda_preference
        else:
            candidates = ()
        candidates = tuple(c for c in candidates if c in self.backends)
        for c in candidates:
            if c not in why:
                return c
        if candidates and self.family.name not in _WARNED:
            _WARNED.add(self.family.name)
            reasons = "; ".join(f"{c}: {why[c]}" for c in candidates)
            warnings.warn(f"rgpt4d: no compiled backend for {self.family.name} ops on {device.type} ({reasons}); "
                          "using eager", RuntimeWarning, stacklevel=3)
        return "eager"


def _flatten(out) -> tuple:
    """(flat tensors, layout) of an op's output: a Tensor, or a tuple of Tensors and Tensor lists."""
    if isinstance(out, torch.Tensor):
        return (out,), None
    flat, layout = [], []
    for o in out:
        if isinstance(o, torch.Tensor):
            flat.append(o)
            layout.append(None)
        else:
            flat.extend(o)
            layout.append(len(o))
    return tuple(flat), layout


def _unflatten(flat, layout):
    if layout is None:
        return flat[0] if isinstance(flat, tuple) else flat
    out, k = [], 0
    for n in layout:
        if n is None:
            out.append(flat[k])
            k += 1
        else:
            out.append(list(flat[k:k + n]))
            k += n
    return tuple(out)


class _EagerAutograd(torch.autograd.Function):
    """An op call with its declared autograd formula (see Op.__call__). The differentiable tensors
    (top-level, or inside tensor-list arguments) are the Function's inputs; the formula sees the
    op's own arguments, outputs, gradients and needs_input_grad in the op's structure, exactly as
    torch.library.register_autograd gives them."""

    # forward takes ctx (no separate setup_context): with one, Function.apply binds the arguments
    # with inspect.signature on every call (~0.1 ms)
    @staticmethod
    def forward(ctx, op, backend, args, where, layout, *leaves):
        out = op.kernel(backend)(*args)  # autograd is off inside forward
        flat, out_layout = _flatten(out)
        layout.append(out_layout)
        ctx.ops = _TRITON if backend == "triton" else _COMPILED
        ctx.rgpt4d_call = (op, args, where, out_layout)
        op.autograd[0](ctx, args, out)
        return flat if out_layout is not None else flat[0]

    @staticmethod
    def backward(ctx, *grads):
        op, args, where, layout = ctx.rgpt4d_call
        flags = ctx.needs_input_grad[5:]
        needs = [[False] * len(a) if type(a) is list else False for a in args]
        for (i, j), f in zip(where, flags):
            if j is None:
                needs[i] = f
            else:
                needs[i][j] = f
        real = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(needs)
        try:
            result = op.autograd[1](ctx, *_unflatten_grads(grads, layout))
        finally:
            ctx.needs_input_grad = real
        if not isinstance(result, tuple):
            result = (result,)
        leaf_grads = [result[i] if j is None else (result[i][j] if result[i] is not None else None)
                      for i, j in where]
        return (None, None, None, None, None, *leaf_grads)


def _unflatten_grads(grads, layout) -> tuple:
    out = _unflatten(grads, layout)
    return (out,) if layout is None else out


def _check_device(op: str, backend: str, device: torch.device) -> None:
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"{op}: backend 'cpu' runs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"{op}: backend 'cuda' runs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise BackendUnavailableError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                                      "rgpt4d's Triton kernels are first used")


class Family:
    """The ops of one family (one file in rgpt4d/ops/, one folder in csrc/, one file in kernels/).

    kernels: the module of rgpt4d.kernels holding the family's Triton host functions (imported on
    first use: TRITON_INTERPRET must be set before any @triton.jit runs). cuda_preference: the
    order in which the automatic choice tries the GPU backends on CUDA tensors.
    """

    def __init__(self, name: str, kernels: Optional[str] = None, cuda_preference: tuple = ("cuda", "triton")):
        self.name, self._kernels_name, self.cuda_preference = name, kernels or name, cuda_preference
        self._kernels = None

    def kernels(self):
        if self._kernels is None:
            self._kernels = importlib.import_module(f"rgpt4d.kernels.{self._kernels_name}")
        return self._kernels

    def op(self, name: str, schema: str, *, fake: Callable, triton: Optional[Callable] = None,
           autograd: Optional[tuple] = None, backends: tuple = BACKENDS, api: str = "") -> Op:
        """Declare `rgpt4d::<name><schema>` and, when `triton` is given, its Triton variant
        `rgpt4d::<name>_triton` (`<name without _>_triton_` for an in-place op) with the same schema.

        fake(*args): the outputs' shapes and dtypes (for torch.compile and meta tensors).
        triton(K, *args): the Triton implementation, K being the family's kernels module.
        autograd: (setup_context, backward) as torch.library.register_autograd takes them; the
            backward reaches same-backend ops through ctx.ops.
        backends: those the op implements ("eager" is the public function's reference).
        api: the public function's name when it differs from the op's (error messages name it).
        """
        if name in _OPS:
            raise ValueError(f"rgpt4d op {name!r} is declared twice")
        if (triton is not None) != ("triton" in backends):
            raise ValueError(f"{name}: give a triton implementation exactly when 'triton' is in backends")
        op = Op(name, self, schema, tuple(backends), fake, triton, autograd, api)
        compiled = "cpu" in backends or "cuda" in backends
        if compiled:
            _LIB.define(name + schema)
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
            _register_autograd(f"{NAMESPACE}::{name}", autograd, _COMPILED)
        if triton is not None:
            family = self

            def impl(*args):
                return triton(family.kernels(), *args)

            qualname = f"{NAMESPACE}::{_triton_name(name)}"
            torch.library.custom_op(qualname, impl, mutates_args=_mutated_args(schema), schema=schema)
            torch.library.register_fake(qualname, fake)
            _register_autograd(qualname, autograd, _TRITON)
        _OPS[name] = op
        return op


def _register_autograd(qualname: str, autograd: Optional[tuple], siblings: _Siblings) -> None:
    if autograd is None:
        return
    setup, backward = autograd

    def setup_context(ctx, inputs, output):
        ctx.ops = siblings
        setup(ctx, inputs, output)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)


def get(name: str) -> Op:
    """The declared op `name` (KeyError naming the declared ones otherwise)."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no rgpt4d op {name!r}; declared: {sorted(_OPS)}") from None


def declared() -> dict[str, Op]:
    """Every declared op by name (the families register theirs when rgpt4d.ops is imported)."""
    return dict(_OPS)


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs op `op` on tensors on `device` (backend: the per-call choice, or None)."""
    return get(op).select(torch.device(device), backend)


# ---------------------------------------------------------------------------------------------
# Shared by the families' autograd formulas
# ---------------------------------------------------------------------------------------------


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 when an input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_values() -> bool:
    """Whether validation may read tensor data (index ranges, finiteness): not while torch.compile
    traces (a device sync and a graph break). The compiled kernels re-check indices themselves, so
    they never read out of bounds either way."""
    return not torch.compiler.is_compiling()


def is_real_tensor(t) -> bool:
    """A tensor with data (not a fake or functional tensor traced by torch.compile)."""
    return type(t) is torch.Tensor


def scaled(buf: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """buf * s for a gradient computed in forward and the real grad_output s; when s is exactly 1
    on the CPU (the usual `loss.backward()`), buf itself: no pass over it, no copy."""
    if is_real_tensor(s) and s.device.type == "cpu" and not s.requires_grad and float(s) == 1.0:
        return buf
    return buf * s


def grads_from_forward(op: str, ctx, g_loss: torch.Tensor, gh, gw, gb) -> tuple:
    """The gradients of h, weight and bias of a fused Linear + loss op (fused_linear_cross_entropy,
    fused_linear_latent_loss) that computed them in forward: each scaled by grad_output and cast
    to its parameter's dtype; None where not needed. Its setup_context set ctx.dtypes (h, weight,
    bias), ctx.has_bias and ctx.numels; an empty buffer for a needed gradient means the op was
    called without that gradient's flag, which raises."""
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
    for name, n, buf, numel in zip(("h", "weight", "bias"), need, (gh, gw, gb), ctx.numels):
        if n and numel > 0 and buf.numel() == 0 and is_real_tensor(buf):
            raise RuntimeError(f"{op}: the gradient of {name} was not computed in forward (need_{name[0]}_grad was "
                               f"False); call the op with it set when {name} requires grad")
    _, w_dtype, b_dtype = ctx.dtypes
    return (scaled(gh, g_loss) if need[0] else None, scaled(gw, g_loss).to(w_dtype) if need[1] else None,
            scaled(gb, g_loss).to(b_dtype) if need[2] else None)


def refuse_double_backward(op: str, grad: torch.Tensor) -> None:
    """The fused kernels compute first-order gradients only: create_graph=True through them raises."""
    if torch.is_grad_enabled() and is_real_tensor(grad):
        raise RuntimeError(f"{op}: the fused kernels compute first-order gradients only; double backward "
                           "(create_graph=True) is not supported. Use backend='eager' for higher-order gradients.")


# ---------------------------------------------------------------------------------------------
# The CPU output cache of the compiled kernels (csrc/cpu/)
# ---------------------------------------------------------------------------------------------


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


_load_extension()  # the C++ kernels register before the families declare their ops
