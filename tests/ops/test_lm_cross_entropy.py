"""fused_linear_cross_entropy / FusedLinearCrossEntropyLoss: every CPU backend against a float64
composition (F.linear, then F.cross_entropy with ignore_index), values and the gradients of h,
weight and bias, for both reductions."""

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.ops import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy, fused_linear_cross_entropy_eager
from tests.conftest import op_backends, op_memory, requires_gpu

CPU_BACKENDS = op_backends("linear_cross_entropy")
GPU_BACKENDS = op_backends("linear_cross_entropy", device="cuda")


def make(B=2, N=13, D=20, V=37, dtype=torch.float32, bias=True, ignore_p=0.4, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    b = (0.1 * torch.randn(V, generator=g)).to(device=device, dtype=dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, V, (B, N), generator=g)
    if ignore_p:
        t[torch.rand(B, N, generator=g) < ignore_p] = -100
    return h, w, b, t.to(device)


def leaves(h, w, b):
    return [x for x in (h, w, b) if x is not None]


def oracle(h, w, b, t, reduction="mean", ignore_index=-100):
    """float64: Linear, then torch's cross-entropy."""
    logits = F.linear(h.double(), w.double(), None if b is None else b.double())
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def check(backend, h, w, b, t, reduction="mean", chunk_size=None, g=0.5, rtol=2e-5, grad_rtol=5e-5, ignore_index=-100):
    loss = fused_linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=chunk_size, backend=backend,
                                      ignore_index=ignore_index)
    x64 = [x.detach().double().requires_grad_(True) for x in leaves(h, w, b)]
    ref = oracle(x64[0], x64[1], x64[2] if b is not None else None, t, reduction, ignore_index)
    assert loss.shape == () and loss.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-6)
    grads = torch.autograd.grad(loss, leaves(h, w, b), torch.tensor(g, dtype=loss.dtype))
    ref_grads = torch.autograd.grad(ref, x64, torch.tensor(g, dtype=torch.float64))
    for name, a, r in zip(("h", "weight", "bias"), grads, ref_grads):
        assert a.dtype == h.dtype and a.shape == r.shape, name
        s = max(float(r.abs().max()), 1e-30)
        torch.testing.assert_close(a.double(), r, rtol=grad_rtol, atol=1e-5 * s, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_p", [0.0, 0.4, 0.95])
def test_reductions(backend, reduction, ignore_p):
    h, w, b, t = make(ignore_p=ignore_p, seed=1)
    if not (t != -100).any():
        t[0, 0] = 3
    check(backend, h, w, b, t, reduction=reduction, chunk_size=5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("chunk_size", [1, 3, 26, 1000])
def test_chunk_sizes_do_not_change_the_result(backend, chunk_size):
    h, w, b, t = make()
    check(backend, h, w, b, t, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_bias_odd_shapes_other_ignore_index(backend):
    h, w, b, t = make(B=1, N=1, D=1, V=1, bias=False, ignore_p=0.0)
    check(backend, h, w, b, t)
    h, w, b, t = make(B=3, N=7, D=33, V=1023, bias=False)
    check(backend, h, w, b, t, chunk_size=4)
    h, w, b, t = make(N=9, V=11, ignore_p=0.0, seed=2)
    t[0, :4] = 7  # class 7 is the ignored one here
    check(backend, h, w, b, t, ignore_index=7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits_are_stable(backend):
    h, w, b, t = make(N=8, V=50, ignore_p=0.2)
    with torch.no_grad():
        w.mul_(300.0)  # logits of several thousand: exp overflows without the max shift
    check(backend, h, w, b, t, rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16(backend):
    # bf16 Linear (logits rounded to bf16, as F.linear does), read in fp32; grad_weight accumulated
    # in fp32 and cast to bf16. Compared with the float64 oracle at bf16 tolerances.
    h, w, b, t = make(N=16, D=32, V=64, dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(h, w, t, b, chunk_size=8, backend=backend)
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    ref = oracle(*x64, t)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(loss, [h, w, b])
    for name, a, r in zip(("h", "weight", "bias"), grads, torch.autograd.grad(ref, x64)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), r, rtol=3e-2, atol=3e-2 * float(r.abs().max()), msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64(backend):
    h, w, b, t = make(dtype=torch.float64)
    check(backend, h, w, b, t, rtol=1e-12, grad_rtol=1e-10)
    check(backend, h, w, b, t, reduction="sum", rtol=1e-12, grad_rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_labelled_rows_and_empty_inputs(backend):
    h, w, b, t = make()
    t = torch.full_like(t, -100)
    loss = fused_linear_cross_entropy(h, w, t, b, backend=backend)  # 0 / 0, as F.cross_entropy
    assert torch.isnan(loss) and torch.isnan(oracle(h, w, b, t))
    total = fused_linear_cross_entropy(h, w, t, b, reduction="sum", backend=backend)
    assert float(total.detach()) == 0.0
    grads = torch.autograd.grad(total, [h, w, b])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    h0, t0 = torch.randn(0, 20, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert float(fused_linear_cross_entropy(h0, w, t0, b, reduction="sum", backend=backend).detach()) == 0.0
    (gh,) = torch.autograd.grad(fused_linear_cross_entropy(h0, w, t0, b, reduction="sum", backend=backend), [h0])
    assert gh.shape == (0, 20)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_from_a_larger_graph(backend):
    h, w, b, t = make()
    hid = torch.tanh(h)
    loss = fused_linear_cross_entropy(hid, w, t, b, chunk_size=4, backend=backend)
    obj = 0.3 * loss ** 2 + hid.sum()
    grads = torch.autograd.grad(obj, [h, w, b])
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    hid64 = torch.tanh(x64[0])
    ref = 0.3 * oracle(hid64, x64[1], x64[2], t) ** 2 + hid64.sum()
    torch.testing.assert_close(obj.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    for a, r in zip(grads, torch.autograd.grad(ref, x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    h, w, b, t = make(N=10, D=16, V=9)
    h_nc = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    w_nc = w.detach().t().contiguous().t().requires_grad_(True)
    t_nc = t.t().contiguous().t()
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    loss = fused_linear_cross_entropy(h_nc, w_nc, t_nc, b, chunk_size=3, backend=backend)
    loss.backward()
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    ref = oracle(*x64, t)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    for a, r in zip((h_nc.grad, w_nc.grad, b.grad), (x.grad for x in x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_logits_for_ignored_rows_and_no_gradient_buffers_when_not_needed(backend):
    N, D, V = 256, 64, 2048
    h, w, b, t = make(B=1, N=N, D=D, V=V, bias=False, ignore_p=0.0)
    t[:, 4:] = -100  # 4 labelled rows (an SFT answer), 252 prompt rows
    gw_bytes, gh_bytes, logits_bytes = V * D * 4, N * D * 4, N * V * 4

    def run():
        return fused_linear_cross_entropy(h, w, t, backend=backend)

    used = op_memory("linear_cross_entropy", backend, run)
    assert gw_bytes + gh_bytes <= used < gw_bytes + gh_bytes + logits_bytes // 8  # 4 rows of logits, not 256
    with torch.no_grad():
        assert op_memory("linear_cross_entropy", backend, run) < logits_bytes // 8
    w.requires_grad_(False)
    assert gh_bytes <= op_memory("linear_cross_entropy", backend, run) < gh_bytes + gw_bytes // 2
    (gh,) = torch.autograd.grad(run(), h)
    h64 = h.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(oracle(h64, w, None, t), h64)
    torch.testing.assert_close(gh.double(), ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(gh[:, 4:], torch.zeros_like(gh[:, 4:]))  # unlabelled rows: exactly zero gradient


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_retain_graph_and_double_backward(backend):
    h, w, b, t = make()
    loss = fused_linear_cross_entropy(h, w, t, b, backend=backend)
    a = torch.autograd.grad(loss, [h, w], retain_graph=True)
    c = torch.autograd.grad(loss, [h, w], torch.tensor(2.0), retain_graph=True)
    for x, y in zip(a, c):
        torch.testing.assert_close(2 * x, y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [h], create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_fp64(backend, reduction):
    h, w, b, t = make(B=1, N=5, D=3, V=4, dtype=torch.float64, ignore_p=0.3, seed=3)
    t[0, 0] = 2
    fn = lambda h, w, b: fused_linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=2,  # noqa: E731
                                                    backend=backend)
    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    op = getattr(torch.ops.rgpt4d, "linear_cross_entropy" + suffix).default
    h, w, b, t = make(B=1, N=6, D=5, V=7, ignore_p=0.3)
    h2, t2 = h.detach().reshape(6, 5).requires_grad_(True), t.reshape(6)
    t2[0] = 1
    for reduction in (1, 2):
        torch.library.opcheck(op, (h2, w, b, t2, -100, reduction, 4, True, True, True))
    torch.library.opcheck(op, (h2, w.detach(), None, t2, -100, 1, 2, True, False, False))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = FusedLinearCrossEntropyLoss(chunk_size=5, backend=backend)
    h, w, b, t = make()

    @torch.compile(fullgraph=True)
    def step(h, w, b, t):
        return module(torch.tanh(h), w, t, b) * 3.0

    loss = step(h, w, b, t)
    loss.backward()
    x64 = [x.detach().double().requires_grad_(True) for x in (h, w, b)]
    ref = 3.0 * oracle(torch.tanh(x64[0]), x64[1], x64[2], t)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    for a, r in zip((h.grad, w.grad, b.grad), (x.grad for x in x64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_eager_reference_is_the_transformers_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    h, w, _, labels = make(B=2, N=11, D=8, V=13, bias=False)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = ForCausalLMLoss(F.linear(h, w), labels, vocab_size=13)
    torch.testing.assert_close(fused_linear_cross_entropy_eager(h, w, shifted), ref, rtol=0, atol=0)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, shifted, backend="cpu"), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(backend):
    h, w, b, t = make()
    with pytest.raises(ValueError, match=r"target must have h's leading shape \(2, 13\)"):
        fused_linear_cross_entropy(h, w, t[:, :5], b, backend=backend)
    with pytest.raises(TypeError, match="target must be class indices"):
        fused_linear_cross_entropy(h, w, t.float(), b, backend=backend)
    with pytest.raises(ValueError, match=r"h must be \[..., D\] and weight \[V, D\]"):
        fused_linear_cross_entropy(h, w[:, :5], t, b, backend=backend)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[37\]"):
        fused_linear_cross_entropy(h, w, t, b[:3], backend=backend)
    with pytest.raises(TypeError, match="must share a dtype"):
        fused_linear_cross_entropy(h, w.double(), t, b, backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_cross_entropy(h, w, t, b, reduction="none", backend=backend)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_cross_entropy(h, w, t, b, chunk_size=0, backend=backend)
    bad = t.clone()
    bad[0, 0] = 37
    with pytest.raises((ValueError, RuntimeError, IndexError), match="out of (range|bounds)"):
        fused_linear_cross_entropy(h, w, bad, b, backend=backend)


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_ops_check_without_validation(suffix):
    op = getattr(torch.ops.rgpt4d, "linear_cross_entropy" + suffix)
    h, w = torch.randn(6, 5), torch.randn(4, 5)
    with pytest.raises((RuntimeError, ValueError), match="target"):
        op(h, w, None, torch.zeros(5, dtype=torch.long), -100, 1, 4, False, False, False)
    with pytest.raises((RuntimeError, ValueError), match="out of range"):
        op(h, w, None, torch.full((6,), 4, dtype=torch.long), -100, 1, 4, False, False, False)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_linear_cross_entropy(backend, dtype):
    h, w, b, t = make(B=2, N=300, D=256, V=5000, dtype=dtype, device="cuda")
    if dtype == torch.float32:
        check(backend, h, w, b, t, chunk_size=128, rtol=1e-4, grad_rtol=2e-3)
    else:
        loss = fused_linear_cross_entropy(h, w, t, b, chunk_size=128, backend=backend)
        ref = fused_linear_cross_entropy(h, w, t, b, backend="eager")
        torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-3)
