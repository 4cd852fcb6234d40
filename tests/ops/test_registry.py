"""The op registry (rgpt4d/ops/registry.py): every op declared once, in Python; the C++ code only
registers kernels under dispatch keys; the autograd formula of a backend calls that backend's ops."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rgpt4d.ops as ops
from rgpt4d.ops import BackendUnavailableError, registry

ROOT = Path(__file__).resolve().parents[2]
# C++-only internal ops (the CPU output cache, the thread count, the CPU tests' view of the CUDA math)
CPP_INTERNAL = {"cpu_pool_empty", "cpu_pool_stats", "parallel_for_threads"}
PUBLIC_OPS = {
    "tpe_add", "tpe_add_", "tpe_table_backward", "tpe_ds_ln", "tpe_ds_ln_backward",
    "roi_align", "roi_align_backward", "region_pool", "region_pool_backward", "mask_pool", "mask_pool_backward",
    "p4d_loss", "p4d_linear_loss", "p4d_linear_loss_backward", "linear_cross_entropy",
    "rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rope", "rope_backward",
    "pixel_shuffle_act", "pixel_shuffle_act_backward", "attention", "attention_backward",
}


def test_every_op_is_declared_once_with_its_backends():
    declared = registry.declared()
    assert set(declared) == PUBLIC_OPS
    for name, op in declared.items():
        assert op.backends[0] == "eager" and set(op.backends) <= set(registry.BACKENDS), name
        assert op.name == name and op.schema.startswith("(") and "->" in op.schema, name
        if "triton" in op.backends:  # one schema for both variants
            triton = str(op.kernel("triton")._schema)
            assert re.sub(r"_triton(_?)\(", r"\1(", triton, 1) == str(op.kernel("cpu")._schema), name
    assert declared["attention"].backends == ("eager", "cpu")
    with pytest.raises(ValueError, match="declared twice"):
        registry.Family("tpe").op("tpe_add", "(Tensor x) -> Tensor", fake=lambda x: x, backends=("eager", "cpu"))
    with pytest.raises(ValueError, match="exactly when 'triton' is in backends"):
        registry.Family("x").op("_never", "(Tensor x) -> Tensor", fake=lambda x: x)


def test_compiled_kernels_are_registered_under_their_dispatch_keys():
    if not registry.extension_loaded():
        pytest.skip(f"the compiled extension is not built: {registry.unavailable_reasons()}")
    for name, op in registry.declared().items():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rgpt4d::{name}", "CPU"), name
        if registry.extension_built_with_cuda() and "cuda" in op.backends:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rgpt4d::{name}", "CUDA"), name


def _cpp_calls(kind: str) -> set:
    names = set()
    for path in (ROOT / "csrc").rglob("*.c*"):
        names |= set(re.findall(rf'm\.{kind}\(\s*"(\w+)', path.read_text()))
    return names


def test_cpp_defines_no_public_schema_and_implements_only_declared_ops():
    defined = _cpp_calls("def")
    assert defined, "no m.def found: the scan is broken"
    assert {n for n in defined if not n.startswith("_")} == CPP_INTERNAL, defined
    implemented = _cpp_calls("impl")
    assert implemented and implemented - {n for n in defined} <= PUBLIC_OPS, implemented - PUBLIC_OPS


def _package_files():
    return sorted((ROOT / "rgpt4d").rglob("*.py"))


def test_only_the_registry_registers_torch_library_ops():
    calls = {"custom_op", "register_fake", "register_autograd", "register_kernel", "define", "impl", "Library"}
    offenders = []
    for path in _package_files():
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in calls and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "library":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.library.{node.attr}")
    assert not offenders, offenders


def test_no_module_reads_another_modules_private_names():
    """`from rgpt4d.x import _name` and `rgpt4d_module._name` across modules (dunder names and the
    compiled extension rgpt4d._C excepted)."""
    offenders = []
    for path in _package_files():
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rgpt4d"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_C":
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("rgpt4d")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in aliases and node.attr != "_C":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_the_choice_follows_the_declaration():
    cpu = torch.device("cpu")
    assert registry.resolve("tpe_add", cpu) == "cpu"
    assert registry.resolve("tpe_add", cpu, "eager") == "eager"
    assert ops.available_backends("attention") == [b for b in ("eager", "cpu") if b in ops.available_backends()]
    with pytest.raises(BackendUnavailableError, match="attention: rgpt4d has no triton kernel"):
        registry.resolve("attention", cpu, "triton")
    if "cuda" not in ops.available_backends():
        with pytest.raises(BackendUnavailableError, match="tpe_downsample_layernorm: backend 'cuda'"):
            registry.resolve("tpe_ds_ln", cpu, "cuda")
    with pytest.raises(KeyError, match="no rgpt4d op 'nope'"):
        registry.get("nope")
    with ops.use_backend("eager"):
        assert ops.get_backend() == "eager" and registry.resolve("rms_norm", cpu) == "eager"
    assert ops.get_backend() is None


_TRITON_ONLY = """
import torch
from rgpt4d import ops
from rgpt4d.ops import registry
assert not registry.extension_loaded()
x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
rows = torch.tensor([[0, 2, 1], [1, 1, 0]])
table = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
outs = [ops.tpe_add(x, rows, table, backend=b) for b in ("triton", "eager")]
grads = [torch.autograd.grad(o.square().sum(), (x, table)) for o in outs]
for a, b in zip(*grads):
    torch.testing.assert_close(a, b)
w = torch.randn(8, dtype=torch.float64, requires_grad=True)
outs = [ops.rms_norm(x, w, backend=b) for b in ("triton", "eager")]
grads = [torch.autograd.grad(o.square().sum(), (x, w)) for o in outs]
for a, b in zip(*grads):
    torch.testing.assert_close(a, b)
print("ok")
"""


def test_triton_backward_runs_the_triton_siblings_without_the_extension():
    """Without rgpt4d._C the Triton ops' autograd still works: the backward formula reaches the
    Triton backward ops through ctx.ops, never a compiled op."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton runs neither interpreted nor on a GPU here")
    env = {**os.environ, "RGPT4D_DISABLE_EXT": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _TRITON_ONLY], capture_output=True, text=True, env=env, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
