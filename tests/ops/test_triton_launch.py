"""How the Triton kernels are launched: on the inputs' own GPU, with tensors (not addresses) as arguments."""

import ast
import os

import pytest
import torch

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
FILES = sorted(f for f in os.listdir(KERNELS) if f.endswith(".py") and f != "__init__.py")
# a `with` item that makes the tensor's device current: torch.cuda.device(t.device) / device_of(t)
_GUARDS = {"device", "device_of"}


def _launches_outside_a_device_guard(path: str) -> list[str]:
    tree = ast.parse(open(path).read(), path)
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(i.context_expr, ast.Call)
                                     and isinstance(i.context_expr.func, ast.Attribute)
                                     and i.context_expr.func.attr in _GUARDS for i in node.items)
        # kernel[grid](...): a call of a subscript of a @triton.jit function
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and not guarded:
            bad.append(f"{os.path.basename(path)}:{node.lineno} {ast.unparse(node.func.value)}[...]")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return bad


@pytest.mark.parametrize("name", FILES)
def test_every_triton_launch_is_on_the_inputs_device(name):
    # Triton launches on the *current* CUDA device: a tensor on cuda:1 would be read by a kernel
    # running on cuda:0. Each launch must sit inside `with torch.cuda.device_of(tensor)` (a no-op for
    # CPU tensors) or `with torch.cuda.device(tensor.device)`. (tests/ops/test_gpu.py runs a cuda:1
    # tensor through every family when a second GPU exists.)
    bad = _launches_outside_a_device_guard(os.path.join(KERNELS, name))
    assert not bad, "Triton launches without a device guard:\n" + "\n".join(bad)


def test_p4d_kernel_gets_tensors_not_addresses(monkeypatch):
    # An int64 table of data_ptr() addresses breaks under the interpreter on a GPU machine (host code
    # reads device addresses) and loses the pointers' alignment in the compiled kernel.
    from rgpt4d.kernels import p4d as K

    seen = []
    cls = K._p4d_terms_kernel.__class__  # JITFunction, or the interpreter's InterpretedFunction
    orig = cls.__getitem__

    def record(self, grid):
        launch = orig(self, grid)

        def run(*args, **kwargs):
            seen.append([a for a in args if isinstance(a, torch.Tensor)])
            return launch(*args, **kwargs)
        return run
    monkeypatch.setattr(cls, "__getitem__", record)
    p = [torch.randn(3, 5), torch.rand(2, 7) + 0.1]
    t = [torch.randn(3, 5), torch.rand(2, 7) + 0.1]
    m = torch.rand(7) > 0.3
    total, losses, grads = K.p4d_loss(p, t, [p[0].new_empty(0, dtype=torch.bool), m], [1, 1], [0, 1], [1.0, 1.0],
                                      [2, 2 | 4 | 1], [0.5, 1.0], True, 1e-6)
    assert seen, "no Triton launch recorded"
    addresses = {x.data_ptr() for x in p + t + [m] + [g for g in grads if g.numel()]}
    for args in seen:
        for a in args:
            if a.dtype == torch.int64 and a.numel():
                assert not set(a.flatten().tolist()) & addresses, "a kernel argument holds tensor addresses"
    passed = {a.data_ptr() for args in seen for a in args}
    assert {x.data_ptr() for x in p + t} <= passed, "the predictions and targets are not kernel arguments"
    ref = (torch.nn.functional.smooth_l1_loss(p[0], t[0]) * 0.5
           + ((torch.log(p[1] + 1e-6) - torch.log(t[1] + 1e-6)) ** 2)[:, m].mean())
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
