"""The Triton interpreter runs loops whose bound is a runtime value (kernels/__init__.py makes the
interpreter of triton < 3.8 accept them under numpy >= 2.4)."""
import pytest
import torch

from tests.conftest import INTERPRETED

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")

import rgpt4d.kernels  # noqa: E402,F401  (installs the interpreter fix)


@triton.jit
def _count_blocks_kernel(n_ptr, m, out_ptr, BLOCK: tl.constexpr):
    # bounds: a loaded value, an argument times a value, and a where() of both
    n = tl.load(n_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, n, BLOCK):
        acc += 1
    for i in range(n, n + m * 2, BLOCK):
        acc += 100
    for i in range(0, tl.where(n > m, n, m), BLOCK):
        acc += 10000
    tl.store(out_ptr + tl.arange(0, BLOCK), acc)


@pytest.mark.skipif(not INTERPRETED, reason="needs the Triton interpreter (no CUDA GPU, TRITON_INTERPRET=1)")
@pytest.mark.parametrize("n,m", [(10, 3), (0, 5), (4, 0)])
def test_runtime_loop_bounds(n, m):
    out = torch.zeros(4, dtype=torch.int32)
    _count_blocks_kernel[(1,)](torch.tensor([n], dtype=torch.int32), m, out, BLOCK=4)
    cdiv = lambda a: -(-a // 4)  # noqa: E731
    expected = cdiv(n) + 100 * cdiv(2 * m) + 10000 * cdiv(max(n, m))
    assert out.tolist() == [expected] * 4
