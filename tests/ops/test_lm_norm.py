"""rms_norm / RMSNorm and swiglu: every CPU backend against float64 references (Qwen2RMSNorm's
formula; silu(gate) * up), outputs and gradients; the eager backend is transformers' own code."""

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.ops import RMSNorm, rms_norm, rms_norm_eager, swiglu, swiglu_eager
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("rms_norm", "swiglu", "rope")
GPU_BACKENDS = op_backends("rms_norm", "swiglu", "rope", device="cuda")


def rms_ref(x, w, eps):
    x64 = x.double()
    return w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


def make_rms(shape=(2, 7, 33), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    return x, w


def check_rms(backend, x, w, eps=1e-6, rtol=1e-5, grad_rtol=5e-5):
    y = rms_norm(x, w, eps, backend=backend)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = rms_ref(x64, w64, eps)
    assert y.shape == x.shape and y.dtype == torch.promote_types(x.dtype, w.dtype)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=rtol, atol=rtol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, [x, w], gy.to(y.dtype))
    rx, rw = torch.autograd.grad(ref, [x64, w64], gy)
    for name, a, r in (("x", gx, rx), ("weight", gw, rw)):
        s = max(float(r.abs().max()), 1e-2)  # D = 1: grad_x is 0 up to fp32 rounding (cancellation)
        torch.testing.assert_close(a.double(), r, rtol=grad_rtol, atol=grad_rtol * s, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (2, 7, 33), (3, 1023), (300, 128)])
def test_rms_norm(backend, shape):
    x, w = make_rms(shape)
    check_rms(backend, x, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rms_norm_fp64_eps_and_the_eager_backend_is_qwen2(backend):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x, w = make_rms(dtype=torch.float64)
    check_rms(backend, x, w, eps=0.1, rtol=1e-12, grad_rtol=1e-10)
    mod = Qwen2RMSNorm(33, eps=1e-5)
    with torch.no_grad():
        mod.weight.copy_(torch.linspace(0.5, 1.5, 33))
    xf = torch.randn(4, 33)
    assert torch.equal(rms_norm_eager(xf, mod.weight, 1e-5), mod(xf))
    torch.testing.assert_close(rms_norm(xf, mod.weight, 1e-5, backend=backend), mod(xf), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_bf16(backend, w_dtype):
    x, w = make_rms((5, 64), dtype=torch.bfloat16)
    w = w.detach().to(w_dtype).requires_grad_(True)
    y = rms_norm(x, w, backend=backend)
    assert y.dtype == torch.promote_types(torch.bfloat16, w_dtype)
    ref = rms_norm_eager(x, w)  # Qwen2RMSNorm in bf16 (the same roundings, up to an ulp or two)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    gx, gw = torch.autograd.grad(y.float().sum(), [x, w])
    x64 = x.detach().double().requires_grad_(True)
    (rx,) = torch.autograd.grad(rms_ref(x64, w.detach().double(), 1e-6).sum(), [x64])
    assert gx.dtype == torch.bfloat16 and gw.dtype == w_dtype
    torch.testing.assert_close(gx.double(), rx, rtol=3e-2, atol=3e-2 * float(rx.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rms_norm_non_contiguous_empty_and_frozen_weight(backend):
    x, w = make_rms((9, 16))
    x_nc = x.detach().t().contiguous().t().requires_grad_(True)
    assert not x_nc.is_contiguous()
    check_rms(backend, x_nc, w)
    x0 = torch.randn(0, 16, requires_grad=True)
    y0 = rms_norm(x0, w, backend=backend)
    assert y0.shape == (0, 16)
    gx0, gw0 = torch.autograd.grad(y0.sum(), [x0, w])
    assert gx0.shape == (0, 16) and torch.equal(gw0, torch.zeros_like(gw0))
    wf = w.detach()
    (gx,) = torch.autograd.grad(rms_norm(x, wf, backend=backend).sum(), [x])
    assert gx.shape == x.shape


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_rms_norm_gradcheck_opcheck_compile(backend):
    x, w = make_rms((3, 5), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-3, backend=backend), (x, w))
    suffix = "_triton" if backend == "triton" else ""
    x32, w32 = make_rms((4, 6))
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "rms_norm" + suffix).default, (x32, w32, 1e-6))
    _, rstd = getattr(torch.ops.rgpt4d, "rms_norm" + suffix)(x32.detach(), w32.detach(), 1e-6)
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "rms_norm_backward" + suffix).default,
                          (torch.randn(4, 6), x32.detach(), w32.detach(), rstd, True, True))
    torch._dynamo.reset()
    mod = RMSNorm(6, eps=1e-5, backend=backend)

    @torch.compile(fullgraph=True)
    def f(x):
        return mod(torch.tanh(x)) * 2

    y = f(x32)
    y.sum().backward()
    x64 = x32.detach().double().requires_grad_(True)
    w64 = mod.weight.detach().double().requires_grad_(True)
    ref = rms_ref(torch.tanh(x64), w64, 1e-5) * 2
    ref.sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rms_norm_errors(backend):
    x, w = make_rms((3, 8))
    with pytest.raises(ValueError, match=r"weight must be \[D\] with D = x.size\(-1\)"):
        rms_norm(x, w[:5], backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        rms_norm(x.detach().long(), w, backend=backend)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, w, -1.0, backend=backend)


# ---- SwiGLU ---------------------------------------------------------------------------------

def make_glu(shape=(2, 7, 33), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (3 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return a, b


def check_glu(backend, gate, up, rtol=1e-5):
    y = swiglu(gate, up, backend=backend)
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    ref = F.silu(g64) * u64
    torch.testing.assert_close(y.double(), ref.detach(), rtol=rtol, atol=rtol)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(y, [gate, up], gy.to(y.dtype)), torch.autograd.grad(ref, [g64, u64], gy)):
        torch.testing.assert_close(a.double(), r, rtol=rtol * 5, atol=rtol * 5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7, 1), (2, 7, 33), (422, 256)])
def test_swiglu(backend, shape):
    check_glu(backend, *make_glu(shape))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swiglu_dtypes_non_contiguous_empty(backend):
    check_glu(backend, *make_glu(dtype=torch.float64), rtol=1e-12)
    g, u = make_glu((6, 40), dtype=torch.bfloat16)
    torch.testing.assert_close(swiglu(g, u, backend=backend).float(), swiglu_eager(g, u).float(), rtol=2e-2, atol=2e-2)
    dg, du = torch.autograd.grad(swiglu(g, u, backend=backend).float().sum(), [g, u])
    rg, ru = torch.autograd.grad(swiglu_eager(g.double(), u.double()).sum(), [g, u])
    assert dg.dtype == torch.bfloat16
    torch.testing.assert_close(dg.double(), rg.double(), rtol=2e-2, atol=2e-2)
    g, u = make_glu((8, 12))
    g_nc, u_nc = (t.detach().t().contiguous().t().requires_grad_(True) for t in (g, u))
    check_glu(backend, g_nc, u_nc)
    e = torch.randn(0, 4, requires_grad=True)
    assert swiglu(e, e.detach(), backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_swiglu_gradcheck_opcheck_compile(backend):
    g, u = make_glu((3, 4), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda g, u: swiglu(g, u, backend=backend), (g, u))
    suffix = "_triton" if backend == "triton" else ""
    g32, u32 = make_glu((4, 6))
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "swiglu" + suffix).default, (g32, u32))
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "swiglu_backward" + suffix).default,
                          (torch.randn(4, 6), g32.detach(), u32.detach()))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(g, u):
        return swiglu(g * 2, u, backend=backend).sum()

    f(g32, u32).backward()
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (g32, u32))
    (F.silu(g64 * 2) * u64).sum().backward()
    torch.testing.assert_close(g32.grad.double(), g64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u32.grad.double(), u64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swiglu_errors(backend):
    g, u = make_glu((3, 8))
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(g, u[:, :5], backend=backend)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(g, u.double(), backend=backend)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_rms_norm_and_swiglu(backend):
    x, w = make_rms((300, 512), device="cuda")
    check_rms(backend, x, w, rtol=1e-4, grad_rtol=1e-3)
    check_glu(backend, *make_glu((300, 1024), device="cuda"), rtol=1e-4)


# ---- RoPE -----------------------------------------------------------------------------------

from rgpt4d.ops import rope, rope_eager  # noqa: E402


def make_rope(B=2, H=4, Hk=2, L=9, D=16, dtype=torch.float32, device="cpu", seed=0, transposed=True):
    """q / k as the attention makes them: view(B, L, H, D).transpose(1, 2) of a projection."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, L, Hk, D, generator=g).to(device=device, dtype=dtype)
    q, k = (q.transpose(1, 2), k.transpose(1, 2)) if transposed else (q.transpose(1, 2).contiguous(),
                                                                        k.transpose(1, 2).contiguous())
    pos = torch.arange(L, dtype=torch.float64)[None].expand(B, L) + torch.arange(B)[:, None] * 3
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
    return q.detach().requires_grad_(True), k.detach().requires_grad_(True), cos, sin


def check_rope(backend, q, k, cos, sin, rtol=1e-5):
    qo, ko = rope(q, k, cos, sin, backend=backend)
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    rq, rk = rope_eager(q64, k64, cos.double(), sin.double())
    torch.testing.assert_close(qo.double(), rq.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(ko.double(), rk.detach(), rtol=rtol, atol=rtol)
    gq = torch.randn(qo.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gk = torch.randn(ko.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((qo * gq.to(qo.dtype)).sum() + (ko * gk.to(ko.dtype)).sum(), [q, k])
    ref = torch.autograd.grad((rq * gq).sum() + (rk * gk).sum(), [q64, k64])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=rtol * 5, atol=rtol * 5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("transposed", [True, False], ids=["views", "contiguous"])
def test_rope(backend, transposed):
    check_rope(backend, *make_rope(transposed=transposed))
    check_rope(backend, *make_rope(B=1, H=1, Hk=1, L=1, D=2, transposed=transposed))
    check_rope(backend, *make_rope(B=3, H=7, Hk=1, L=33, D=34, transposed=transposed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rope_general_cos_sin_fp64_bf16_unsqueeze2_broadcast_and_empty(backend):
    q, k, cos, sin = make_rope()
    g = torch.Generator().manual_seed(5)
    check_rope(backend, q, k, torch.randn(cos.shape, generator=g), torch.randn(sin.shape, generator=g))  # halves differ
    check_rope(backend, *make_rope(dtype=torch.float64), rtol=1e-12)
    check_rope(backend, q, k, cos[:1], sin[:1])  # cos/sin shared by the batch
    qb, kb, cb, sb = make_rope(dtype=torch.bfloat16)
    for a, r in zip(rope(qb, kb, cb, sb, backend=backend), rope_eager(qb, kb, cb, sb)):
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)
    q2, k2 = q.detach().transpose(1, 2), k.detach().transpose(1, 2)  # [B, L, H, D]
    for a, r in zip(rope(q2, k2, cos, sin, unsqueeze_dim=2, backend=backend), rope_eager(q2, k2, cos, sin, 2)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    qe, ke, ce, se = make_rope(L=0)
    a, b = rope(qe, ke, ce, se, backend=backend)
    assert a.shape == qe.shape and b.shape == ke.shape


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_rope_gradcheck_opcheck_compile(backend):
    q, k, cos, sin = make_rope(B=1, H=2, Hk=1, L=3, D=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: rope(q, k, cos, sin, backend=backend), (q, k))
    suffix = "_triton" if backend == "triton" else ""
    q, k, cos, sin = make_rope(L=5)
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "rope" + suffix).default, (q, k, cos, sin))
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "rope_backward" + suffix).default,
                          (q.detach().contiguous(), k.detach().contiguous(), cos, sin))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(q, k):
        a, b = rope(q * 2, k, cos, sin, backend=backend)
        return a.sum() + (b * b).sum()

    f(q, k).backward()
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    a, b = rope_eager(q64 * 2, k64, cos.double(), sin.double())
    (a.sum() + (b * b).sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rope_errors_and_cos_with_grad(backend):
    q, k, cos, sin = make_rope()
    with pytest.raises(ValueError, match="cos and sin"):
        rope(q, k, cos[:, :3], sin[:, :3], backend=backend)
    with pytest.raises(ValueError, match="D even"):
        rope(q[..., :3], k[..., :3], cos[..., :3], sin[..., :3], backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        rope(q, k.double(), cos, sin, backend=backend)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, sin, unsqueeze_dim=0, backend=backend)
    c = cos.clone().requires_grad_(True)
    a, _ = rope(q, k, c, sin, backend=backend)  # gradient to cos: the eager composition
    (gc,) = torch.autograd.grad(a.sum(), [c])
    assert gc.shape == c.shape


@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_rope(backend):
    check_rope(backend, *make_rope(B=2, H=8, Hk=2, L=300, D=64, device="cuda"), rtol=1e-4)
