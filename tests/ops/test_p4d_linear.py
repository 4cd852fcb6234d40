"""fused_linear_latent_loss / FusedLinearLatentLoss: every CPU backend against a float64
composition (F.linear, then F.smooth_l1_loss / F.mse_loss / F.l1_loss on the valid tokens),
values and the gradients of h, weight and bias, for every reduction."""

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.ops import FusedLinearLatentLoss, fused_linear_latent_loss
from tests.conftest import op_backends, op_memory, requires_gpu

CPU_BACKENDS = op_backends("p4d_linear_loss")
GPU_BACKENDS = op_backends("p4d_linear_loss", device="cuda")

LOSS_FN = {"smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss, "l1": F.l1_loss}


def make(B=2, N=13, D_in=20, D_out=12, dtype=torch.float32, bias=True, mask_p=0.3, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D_in, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(D_out, D_in, generator=g) / D_in ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    b = (0.1 * torch.randn(D_out, generator=g)).to(device=device, dtype=dtype).requires_grad_(True) if bias else None
    t = torch.randn(B, N, D_out, generator=g).to(device=device, dtype=dtype)
    m = (torch.rand(B, N, generator=g) > mask_p).to(device) if mask_p is not None else None
    return h, w, b, t, m


def oracle(h, w, b, t, mask, kind="smooth_l1", beta=1.0, reduction="mean"):
    """float64: Linear, then the torch loss over the valid tokens' elements."""
    y = F.linear(h.double(), w.double(), None if b is None else b.double())
    t = t.detach().double()
    kw = dict(beta=beta) if kind == "smooth_l1" else {}
    if reduction == "none":
        per_tok = LOSS_FN[kind](y, t, reduction="none", **kw).mean(-1)
        return per_tok if mask is None else per_tok * mask
    if mask is not None:
        y, t = y[mask], t[mask]
    if y.numel() == 0:
        return y.sum() * 0.0
    return LOSS_FN[kind](y, t, reduction=reduction, **kw)


def leaves(h, w, b):
    return [x for x in (h, w, b) if x is not None]


def check(backend, h, w, b, t, m, kind="smooth_l1", beta=1.0, reduction="mean", chunk_size=None, g=None,
          rtol=2e-5, grad_rtol=5e-5):
    loss = fused_linear_latent_loss(h, w, b, t, kind=kind, beta=beta, mask=m, reduction=reduction,
                                    chunk_size=chunk_size, backend=backend)
    x64 = [x.detach().double().requires_grad_(True) for x in leaves(h, w, b)]
    ref = oracle(x64[0], x64[1], x64[2] if b is not None else None, t, m, kind, beta, reduction)
    assert loss.shape == ref.shape
    assert loss.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    scale = max(float(ref.detach().abs().max()) if ref.numel() else 0.0, 1e-30)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-5 * scale)
    if g is None:
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)) if reduction == "none" \
            else torch.tensor(0.5)
    grads = torch.autograd.grad(loss, leaves(h, w, b), g.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, x64, g.double())
    for name, a, r in zip(("h", "weight", "bias"), grads, ref_grads):
        assert a.dtype == h.dtype and a.shape == r.shape, name
        s = max(float(r.abs().max()), 1e-30)
        torch.testing.assert_close(a.double(), r, rtol=grad_rtol, atol=1e-5 * s, msg=lambda msg: f"grad of {name}: {msg}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_reductions(backend, reduction, masked):
    h, w, b, t, m = make(mask_p=0.3 if masked else None)
    check(backend, h, w, b, t, m, reduction=reduction, chunk_size=5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind,beta", [("mse", 1.0), ("l1", 1.0), ("smooth_l1", 0.25), ("smooth_l1", 0.0)])
def test_kinds(backend, kind, beta):
    h, w, b, t, m = make(N=9, seed=1)
    check(backend, h, w, b, t, m, kind=kind, beta=beta, chunk_size=4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("chunk_size", [1, 7, 26, 1000])
def test_chunk_sizes_do_not_change_the_result(backend, chunk_size):
    h, w, b, t, m = make(N=13)  # 26 tokens
    check(backend, h, w, b, t, m, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_bias_and_odd_shapes(backend):
    h, w, b, t, m = make(B=1, N=1, D_in=1, D_out=1, bias=False, mask_p=None)
    check(backend, h, w, b, t, m)
    h, w, b, t, m = make(B=3, N=7, D_in=33, D_out=17, bias=False)
    check(backend, h, w, b, t, m, reduction="none", chunk_size=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16(backend):
    # bf16 Linear (the projection is rounded to bf16, as F.linear does); the oracle reads the bf16
    # projection in float64. grad_weight is accumulated in fp32, then cast to the weight's dtype.
    h, w, b, t, m = make(N=16, D_in=32, D_out=24, dtype=torch.bfloat16)
    loss = fused_linear_latent_loss(h, w, b, t, mask=m, chunk_size=8, backend=backend)
    y = F.linear(h, w, b).detach().double().requires_grad_(True)
    ref = F.smooth_l1_loss(y[m], t.double()[m])
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-4, atol=1e-6)
    gh, gw, gb = torch.autograd.grad(loss, [h, w, b])
    (gy,) = torch.autograd.grad(ref, y)
    h64, w64 = h.detach().double(), w.detach().double()
    for name, a, r in (("h", gh, gy @ w64), ("weight", gw, gy.reshape(-1, 24).t() @ h64.reshape(-1, 32)),
                       ("bias", gb, gy.reshape(-1, 24).sum(0))):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=2e-2 * float(r.abs().max()), msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64(backend):
    h, w, b, t, m = make(dtype=torch.float64)
    check(backend, h, w, b, t, m, rtol=1e-10, grad_rtol=1e-10)
    check(backend, h, w, b, t, m, reduction="none", rtol=1e-10, grad_rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_valid_tokens(backend, reduction):
    h, w, b, t, m = make()
    m = torch.zeros_like(m)
    t = t.clone()
    t[:, 0] = float("nan")  # masked-out tokens may hold anything
    loss = fused_linear_latent_loss(h, w, b, t, mask=m, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    grads = torch.autograd.grad(loss, [h, w, b], torch.ones_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_from_a_larger_graph(backend):
    h, w, b, t, m = make()
    hid = torch.tanh(h)  # h comes from upstream layers; the loss feeds a larger objective
    loss = fused_linear_latent_loss(hid, w, b, t, mask=m, chunk_size=6, backend=backend)
    per_tok = fused_linear_latent_loss(hid, w, b, t, mask=m, reduction="none", chunk_size=6, backend=backend)
    obj = 0.3 * loss ** 2 + (per_tok * torch.linspace(-1, 1, per_tok.numel()).reshape(per_tok.shape)).sum() + hid.sum()
    grads = torch.autograd.grad(obj, [h, w, b])
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    hid64 = torch.tanh(x64[0])
    ref_obj = (0.3 * oracle(hid64, x64[1], x64[2], t, m) ** 2
               + (oracle(hid64, x64[1], x64[2], t, m, reduction="none")
                  * torch.linspace(-1, 1, per_tok.numel()).double().reshape(per_tok.shape)).sum() + hid64.sum())
    torch.testing.assert_close(obj.double(), ref_obj.detach(), rtol=2e-5, atol=1e-6)
    for a, r in zip(grads, torch.autograd.grad(ref_obj, x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_and_target_without_grad(backend):
    h, w, b, t, m = make(N=10, D_in=16, D_out=8)
    h_nc = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    t_nc = t.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    w_nc = w.detach().t().contiguous().t().requires_grad_(True)
    m_nc = m.t().contiguous().t()
    assert not (h_nc.is_contiguous() or t_nc.is_contiguous() or w_nc.is_contiguous() or m_nc.is_contiguous())
    loss = fused_linear_latent_loss(h_nc, w_nc, b, t_nc, mask=m_nc, chunk_size=3, backend=backend)
    loss.backward()
    assert t_nc.grad is None
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    ref = oracle(*x64, t, m)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    for a, r in zip((h_nc.grad, w_nc.grad, b.grad), (x.grad for x in x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_gradient_buffers_under_no_grad_or_for_a_frozen_weight(backend):
    h, w, b, t, m = make(B=1, N=256, D_in=256, D_out=128)
    gw_bytes, gh_bytes = 128 * 256 * 4, 256 * 256 * 4

    def run():
        return fused_linear_latent_loss(h, w, b, t, mask=m, chunk_size=64, backend=backend)

    # grad_h and grad_w (fp32) exist in forward; chunk buffers are 64 x 128 x 4 = 32 KiB each
    assert op_memory("p4d_linear_loss", backend, run) >= gw_bytes + gh_bytes
    with torch.no_grad():
        assert op_memory("p4d_linear_loss", backend, run) < gw_bytes // 2
    w.requires_grad_(False)
    b.requires_grad_(False)
    used = op_memory("p4d_linear_loss", backend, run)
    assert gh_bytes <= used < gh_bytes + gw_bytes // 2  # grad_h only
    gh = torch.autograd.grad(run(), h)[0]
    assert gh.shape == h.shape


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_none_reduction_keeps_no_gradient_buffers_in_forward(backend):
    h, w, b, t, m = make(B=1, N=256, D_in=256, D_out=128)
    used = op_memory("p4d_linear_loss", backend,
                     lambda: fused_linear_latent_loss(h, w, b, t, mask=m, reduction="none", chunk_size=64,
                                                      backend=backend))
    assert used < 128 * 256 * 4 // 2  # the backward recomputes the projection chunk by chunk


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_retain_graph_and_double_backward(backend):
    h, w, b, t, m = make()
    for reduction in ("mean", "none"):
        loss = fused_linear_latent_loss(h, w, b, t, mask=m, reduction=reduction, backend=backend)
        g = torch.ones_like(loss)
        a = torch.autograd.grad(loss, [h, w], g, retain_graph=True)
        c = torch.autograd.grad(loss, [h, w], 2 * g, retain_graph=True)
        for x, y in zip(a, c):
            torch.testing.assert_close(2 * x, y)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, [h], g, create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_fp64(backend, reduction):
    h, w, b, t, m = make(B=1, N=4, D_in=3, D_out=2, mask_p=0.2, dtype=torch.float64, seed=3)
    fn = lambda h, w, b: fused_linear_latent_loss(h, w, b, t, mask=m, reduction=reduction, chunk_size=2,  # noqa: E731
                                                  backend=backend)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    fwd = getattr(torch.ops.rgpt4d, "p4d_linear_loss" + suffix).default
    bwd = getattr(torch.ops.rgpt4d, "p4d_linear_loss_backward" + suffix).default
    h, w, b, t, m = make(B=1, N=6, D_in=5, D_out=4)
    h2, t2, m2 = h.detach().reshape(6, 5).requires_grad_(True), t.reshape(6, 4), m.reshape(6)
    for reduction in (0, 1, 2):
        torch.library.opcheck(fwd, (h2, w, b, t2, m2, 0, 1.0, reduction, 4, True, True, True))
    torch.library.opcheck(fwd, (h2, w.detach(), None, t2, None, 1, 1.0, 1, 2, True, False, False))
    torch.library.opcheck(bwd, (torch.randn(6), h2.detach(), w.detach(), b.detach(), t2, m2, 0, 1.0, 4,
                                True, True, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph_with_mask(backend):
    torch._dynamo.reset()
    module = FusedLinearLatentLoss(20, 12, chunk_size=5, backend=backend)
    h, _, _, t, m = make()

    @torch.compile(fullgraph=True)
    def step(h, t, m):
        return module(torch.tanh(h), t, m) * 3.0

    loss = step(h, t, m)
    loss.backward()
    x64 = [x.detach().double().requires_grad_(True) for x in (h, module.weight, module.bias)]
    ref = 3.0 * oracle(torch.tanh(x64[0]), x64[1], x64[2], t, m)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    for a, r in zip((h.grad, module.weight.grad, module.bias.grad), (x.grad for x in x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_module_matches_nn_linear_then_loss():
    torch.manual_seed(4)
    module = FusedLinearLatentLoss(16, 8, kind="mse", reduction="sum")
    assert "in_features=16, out_features=8" in repr(module)
    lin = torch.nn.Linear(16, 8)
    lin.load_state_dict({"weight": module.weight.detach(), "bias": module.bias.detach()})
    h, t = torch.randn(3, 5, 16), torch.randn(3, 5, 8)
    torch.testing.assert_close(module(h, t), F.mse_loss(lin(h), t, reduction="sum"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(backend):
    h, w, b, t, m = make()
    with pytest.raises(ValueError, match=r"target must be \[..., D_out\] = \(2, 13, 12\)"):
        fused_linear_latent_loss(h, w, b, t[..., :5], backend=backend)
    with pytest.raises(ValueError, match=r"h must be \[..., D_in\] and weight \[D_out, D_in\]"):
        fused_linear_latent_loss(h, w[:, :5], b, t, backend=backend)
    with pytest.raises(ValueError, match=r"bias must be \[D_out\] = \[12\]"):
        fused_linear_latent_loss(h, w, b[:3], t, backend=backend)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 12\) is not broadcastable"):
        fused_linear_latent_loss(h, w, b, t, mask=m[:, :12], backend=backend)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fused_linear_latent_loss(h, w, b, t, mask=m.float(), backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_latent_loss(h, w, b, t, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_linear_latent_loss(h, w, b, t, kind="huber", backend=backend)
    with pytest.raises(TypeError, match="must share a dtype"):
        fused_linear_latent_loss(h, w.double(), b, t, backend=backend)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_latent_loss(h, w, b, t, chunk_size=0, backend=backend)


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_ops_check_shapes_even_without_validation(suffix):
    op = getattr(torch.ops.rgpt4d, "p4d_linear_loss" + suffix)
    h, w, t = torch.randn(6, 5), torch.randn(4, 5), torch.randn(6, 3)
    with pytest.raises((RuntimeError, ValueError), match="target"):
        op(h, w, None, t, None, 0, 1.0, 1, 4, False, False, False)
    with pytest.raises((RuntimeError, ValueError), match="mask"):
        op(h, w, None, torch.randn(6, 4), torch.ones(5, dtype=torch.bool), 0, 1.0, 1, 4, False, False, False)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_linear(backend, reduction, dtype):
    h, w, b, t, m = make(B=2, N=300, D_in=256, D_out=192, dtype=dtype, device="cuda")
    if dtype == torch.float32:
        check(backend, h, w, b, t, m, reduction=reduction, chunk_size=128, rtol=1e-4, grad_rtol=2e-3)
    else:
        loss = fused_linear_latent_loss(h, w, b, t, mask=m, reduction=reduction, chunk_size=128, backend=backend)
        ref = fused_linear_latent_loss(h, w, b, t, mask=m, reduction=reduction, backend="eager")
        torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-3)
