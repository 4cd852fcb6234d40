"""The compiled CPU kernels' cache of large outputs (csrc/cpu/pool.cpp).

Reused blocks hold stale data, so every kernel that takes its output from the cache must write
all of it (or zero it first): each op here runs once, its large outputs and gradients are filled
with NaN and freed into the cache, and the second run, which gets those blocks back, must match
the eager reference exactly as before."""

import os
import subprocess
import sys

import pytest
import torch

import rgpt4d.ops as ops

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends(),
                                reason="the compiled CPU kernels are not built")

MB = 2**20


def _poison(*tensors):
    for t in tensors:
        if t is not None and t.dtype.is_floating_point:
            t.detach().fill_(float("nan"))


def _twice(fn):
    """Run fn twice; poison what the first run returned, so the second gets stale NaN blocks."""
    ops.empty_cpu_cache()
    first = fn()
    _poison(*first)
    del first
    assert ops.cpu_cache_stats()["bytes"] >= 8 * MB  # the poisoned blocks are waiting for reuse
    return fn()


def test_reuse_returns_the_same_block_and_empty_gives_it_back():
    ops.empty_cpu_cache()
    x = torch.randn(4, 8, 64, 1024)  # 8 MiB
    ts = torch.rand(4, 8).cumsum(1)
    a = ops.tpe_add(x, ts, backend="cpu")
    ptr = a.data_ptr()
    del a
    stats = ops.cpu_cache_stats()
    assert stats["bytes"] >= 8 * MB and stats["blocks"] == 1
    b = ops.tpe_add(x, ts, backend="cpu")
    assert b.data_ptr() == ptr and ops.cpu_cache_stats()["blocks"] == 0
    del b
    assert ops.empty_cpu_cache() >= 8 * MB
    assert ops.cpu_cache_stats() == {"bytes": 0, "blocks": 0}


def test_small_outputs_are_not_cached():
    ops.empty_cpu_cache()
    y = ops.tpe_add(torch.randn(2, 4, 16, 64), torch.rand(2, 4).cumsum(1), backend="cpu")
    del y
    assert ops.cpu_cache_stats()["blocks"] == 0


def test_tpe_ops_write_all_of_a_reused_output():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 81, 1664, generator=g).requires_grad_()  # 8.2 MiB outputs and grads
    ts = torch.rand(2, 8, generator=g).cumsum(1)
    gy = torch.randn(2, 8, 81, 1664, generator=g)

    def run():
        y = ops.tpe_add(x, ts, backend="cpu")
        (gx,) = torch.autograd.grad(y, x, gy.clone())  # (sinusoidal: grad_x may be grad_out itself)
        z = ops.tpe_downsample_layernorm(x, ts, grid=(9, 9), window=3, backend="cpu")
        (gz,) = torch.autograd.grad(z, x, torch.ones_like(z))
        return y, gx, z, gz

    y, gx, z, gz = _twice(run)
    torch.testing.assert_close(y, ops.tpe_add_eager(x, ts))
    torch.testing.assert_close(gx, gy)
    ref = ops.tpe_downsample_layernorm_eager(x, ts, grid=(9, 9), window=3)
    (gref,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    torch.testing.assert_close(z, ref)
    torch.testing.assert_close(gz, gref, atol=1e-4, rtol=1e-4)


def test_regional_ops_write_all_of_a_reused_output():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 128, 48, 48, generator=g).requires_grad_()  # grads ~18 MiB
    xy = torch.rand(2, 8, 4, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + 10], -1)
    masks = (torch.rand(2, 8, 4, 48, 48, generator=g) > 0.5).float().requires_grad_()

    def run(backend):
        p = ops.region_pool(feats, boxes, output_size=(2, 2), backend=backend)
        m = ops.mask_pool(feats, masks, backend=backend)
        grads = torch.autograd.grad(p.sum() + (m * m).sum(), [feats, masks])
        return (p, m, *grads)

    got = _twice(lambda: run("cpu"))
    ref = run("eager")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_p4d_gradients_write_all_of_a_reused_output():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(4, 1024, 1024, generator=g).requires_grad_()  # 16 MiB gradient
    target = torch.randn(4, 1024, 1024, generator=g)

    def run(backend):
        loss = ops.p4d_loss(pred, target, backend=backend).total
        return (torch.autograd.grad(loss, pred)[0],)

    (got,) = _twice(lambda: run("cpu"))
    (ref,) = run("eager")
    torch.testing.assert_close(got, ref)


def _python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_cap_and_switch_from_the_environment():
    code = ("import torch, rgpt4d.ops as o\n"
            "xs = [o.tpe_add(torch.randn(1, 1, 2**10, 2**11), torch.zeros(1, 1), backend='cpu') for _ in range(3)]\n"
            "del xs\n"
            "print(o.cpu_cache_stats()['bytes'] // 2**20)\n")
    capped = _python(code, RGPT4D_CPU_POOL_MB="20")
    assert capped.returncode == 0, capped.stderr
    assert int(capped.stdout.split()[-1]) == 16  # two 8 MiB blocks fit under 20 MiB, the third is freed
    off = _python(code, RGPT4D_CPU_POOL_MB="0")
    assert off.returncode == 0 and int(off.stdout.split()[-1]) == 0, off.stderr
    bad = _python(code, RGPT4D_CPU_POOL_MB="lots")
    assert bad.returncode != 0 and "RGPT4D_CPU_POOL_MB must be a non-negative integer" in bad.stderr
