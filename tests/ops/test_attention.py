"""attention: the eager (SDPA) and cpu backends against the float64 definition (attention_math) for
values and the gradients of q, k and v; causal (top-left), grouped-query heads, bool and additive
masks (rows that see no key), Lq != Lk, odd head sizes, Dv != D, non-contiguous inputs and
grad_outputs, empty inputs, bf16/fp16, gradcheck, opcheck, torch.compile, determinism, bad inputs,
and the student's SigLIP / Qwen2 attention through the op."""

import pytest
import torch

from rgpt4d.ops import BackendUnavailableError, attention, attention_math, set_backend
from tests.conftest import op_backends, requires_model_stack

BACKENDS = op_backends("attention")  # eager and cpu: no Triton / CUDA kernel (rgpt4d/ops/attn.py)


def make(B=2, Hq=4, Hkv=2, Lq=37, Lk=29, D=8, Dv=None, dtype=torch.float32, layout="bhld", seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def t(H, L, E):
        if layout == "blhd":  # [B, L, H, E] memory viewed as [B, H, L, E] (what a transformer hands over)
            return torch.randn(B, L, H, E, generator=g).to(dtype).transpose(1, 2)
        if layout == "strided":  # every other element of the last dim
            return torch.randn(B, H, L, 2 * E, generator=g).to(dtype)[..., ::2]
        return torch.randn(B, H, L, E, generator=g).to(dtype)

    return t(Hq, Lq, D), t(Hkv, Lk, D), t(Hkv, Lk, Dv)


def bool_mask(B, Hq, Lq, Lk, seed=1, broadcast_heads=True, dead_row=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, 1 if broadcast_heads else Hq, Lq, Lk, generator=g) > 0.35
    if dead_row and Lq > 2:
        m[0, :, 2] = False  # a query that sees no key: output 0, zero gradients
    return m


def check(backend, q, k, v, mask=None, causal=False, scale=None, tol=2e-5, grad_layout=None):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = attention(q, k, v, mask, causal=causal, scale=scale, backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = attention_math(q64, k64, v64, m64, causal=causal, scale=scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gq = g.to(q.dtype)
    if grad_layout == "blhd":
        gq = gq.transpose(1, 2).contiguous().transpose(1, 2)
    elif grad_layout == "expanded":
        g = torch.randn(ref.shape[:-1] + (1,), dtype=torch.float64).expand(ref.shape)
        gq = g.to(q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), gq)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g)
    for name, a, b in zip("qkv", grads, refs):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=tol * 5, atol=tol * 5, msg=f"grad {name}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["bhld", "blhd", "strided"])
def test_values_and_gradients(backend, causal, layout):
    check(backend, *make(layout=layout), causal=causal)  # GQA 4 -> 2, Lq > Lk
    check(backend, *make(B=3, Hq=3, Hkv=3, Lq=20, Lk=70, D=16, layout=layout), causal=causal)  # Lk > Lq
    check(backend, *make(B=1, Hq=2, Hkv=1, Lq=130, Lk=130, D=32, layout=layout), causal=causal)  # several blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,Dv", [(1, 1), (2, 3), (3, 2), (17, 5), (64, 64)])
def test_odd_head_sizes(backend, D, Dv):
    check(backend, *make(B=2, Hq=2, Hkv=1, Lq=9, Lk=11, D=D, Dv=Dv), causal=True)
    check(backend, *make(B=1, Hq=1, Hkv=1, Lq=1, Lk=1, D=D, Dv=Dv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks(backend, causal):
    q, k, v = make(B=2, Hq=4, Hkv=2, Lq=21, Lk=21)
    check(backend, q, k, v, bool_mask(2, 4, 21, 21), causal=causal)
    check(backend, q, k, v, bool_mask(2, 4, 21, 21, broadcast_heads=False), causal=causal)
    check(backend, q, k, v, bool_mask(2, 4, 21, 21)[0, 0], causal=causal)  # [Lq, Lk], broadcast
    add = torch.randn(1, 4, 21, 21)
    add[..., 3] = float("-inf")  # a key nobody sees
    check(backend, q, k, v, add, causal=causal)


def test_rows_that_see_no_key_give_zero_and_zero_gradient():
    q, k, v = make(B=1, Hq=2, Hkv=2, Lq=6, Lk=5)
    mask = torch.ones(1, 1, 6, 5, dtype=torch.bool)
    mask[..., 4, :] = False
    q.requires_grad_(True)
    out = attention(q, k, v, mask, backend="cpu")
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(gq[:, :, 4], torch.zeros_like(gq[:, :, 4]))
    assert torch.isfinite(out).all() and torch.isfinite(gq).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_non_contiguous_grad_outputs(backend):
    q, k, v = make(Lq=33, Lk=33, D=16, layout="blhd")
    check(backend, q, k, v, causal=True, scale=0.3, grad_layout="blhd")
    check(backend, q, k, v, causal=False, scale=1.7, grad_layout="expanded")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = make(B=2, Hq=4, Hkv=2, Lq=45, Lk=45, D=32, dtype=dtype, layout="blhd")
    check("cpu", q, k, v, bool_mask(2, 4, 45, 45), causal=True, tol=2e-2)


def test_float64_matches_to_rounding():
    check("cpu", *make(dtype=torch.float64), causal=True, tol=1e-12)


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7, 4), (2, 2, 2, 0, 7, 4), (2, 2, 1, 5, 0, 4)],
                         ids=["empty-batch", "no-queries", "no-keys"])
def test_empty(shape):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = (x.requires_grad_(True) for x in make(B, Hq, Hkv, Lq, Lk, D))
    out = attention(q, k, v, backend="cpu")
    assert out.shape == (B, Hq, Lq, D)
    assert torch.equal(out, torch.zeros_like(out))  # no key: 0 (as SDPA)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, x in ((gq, q), (gk, k), (gv, v)):
        assert g is not None and g.shape == x.shape and torch.equal(g, torch.zeros_like(g))


def test_only_the_needed_gradients():
    q, k, v = make()
    k.requires_grad_(True)
    out = attention(q, k, v, causal=True, backend="cpu")
    (gk,) = torch.autograd.grad(out.square().sum(), k)
    q64, k64, v64 = (x.detach().double() for x in (q, k, v))
    k64.requires_grad_(True)
    (rk,) = torch.autograd.grad(attention_math(q64, k64, v64, causal=True).square().sum(), k64)
    torch.testing.assert_close(gk.double(), rk, rtol=1e-4, atol=1e-4)


def test_output_is_a_view_of_the_token_major_layout():
    q, k, v = make(layout="blhd")
    out = attention(q, k, v, backend="cpu")
    assert out.transpose(1, 2).is_contiguous()  # [B, Lq, Hq, Dv]: what o_proj reads, without a copy


def test_gradcheck():
    q, k, v = (x.double().requires_grad_(True) for x in make(B=1, Hq=2, Hkv=1, Lq=5, Lk=6, D=3, Dv=2))
    mask = bool_mask(1, 2, 5, 6)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask, causal=True, backend="cpu"), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, backend="cpu"), (q, k, v))


def test_opcheck():
    q, k, v = (x.requires_grad_(True) for x in make(B=1, Hq=2, Hkv=1, Lq=5, Lk=6, D=3))
    mask = bool_mask(1, 2, 5, 6)
    torch.library.opcheck(torch.ops.rgpt4d.attention.default, (q, k, v, mask, 0.5, True))
    torch.library.opcheck(torch.ops.rgpt4d.attention.default, (q, k, v, None, 0.5, False))


def test_torch_compile_fullgraph():
    q, k, v = make(B=2, Hq=4, Hkv=2, Lq=19, Lk=19, D=8)
    mask = bool_mask(2, 4, 19, 19)

    def f(a, b, c, m):
        return attention(a, b, c, m, causal=True, backend="cpu", validate=False).sum(-1)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = cf(qs, ks, vs, mask)
    torch.testing.assert_close(out, f(q, k, v, mask))
    grads = torch.autograd.grad(out.sum(), (qs, ks, vs))
    qe, ke, ve = (x.detach().requires_grad_(True) for x in (q, k, v))
    refs = torch.autograd.grad(f(qe, ke, ve, mask).sum(), (qe, ke, ve))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b)


def test_deterministic_across_runs_and_thread_counts():
    q, k, v = (x.requires_grad_(True) for x in make(B=2, Hq=4, Hkv=2, Lq=150, Lk=150, D=32, layout="blhd"))
    g = torch.randn(2, 4, 150, 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            out = attention(q, k, v, causal=True, backend="cpu")
            results.append((out.detach(),) + torch.autograd.grad(out, (q, k, v), g))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def test_backend_choice():
    q, k, v = make()
    with pytest.raises(BackendUnavailableError, match="no triton kernel"):
        attention(q, k, v, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no cuda kernel"):
        attention(q, k, v, backend="cuda")
    # a process-wide GPU backend (the whole stack on a GPU) runs SDPA for attention
    set_backend("triton")
    try:
        torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="eager"))
    finally:
        set_backend(None)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v, None), "q must be 4-D"),
    (lambda q, k, v: (q, k.double(), v, None), "one dtype"),
    (lambda q, k, v: (q, k[:1], v[:1], None), "batch size"),
    (lambda q, k, v: (q, k[..., :3], v, None), "head size"),
    (lambda q, k, v: (q, k, v[:, :, :5], None), "v must have k's heads and length"),
    (lambda q, k, v: (q[:, :3], k, v, None), "multiple of k's and v's heads"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 4, 37, 5, dtype=torch.bool)), "mask must broadcast"),
    (lambda q, k, v: (q, k, v, torch.ones(37, 29, dtype=torch.int64)), "mask must be bool"),
    (lambda q, k, v: (q, k, v, torch.zeros(37, 29, requires_grad=True)), "mask receives no gradient"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), None), "q must be float32"),
])
def test_bad_inputs(bad, match):
    args = bad(*make())
    with pytest.raises((ValueError, TypeError), match=match):
        attention(*args, backend="cpu")
    with pytest.raises(ValueError, match="scale must be a finite"):
        attention(*make(), scale=float("nan"), backend="cpu")


def test_the_kernel_checks_its_arguments_without_validation():
    q, k, v = make()
    with pytest.raises(RuntimeError, match="multiple of k's"):
        torch.ops.rgpt4d.attention(q[:, :3], k, v, None, 1.0, False)
    with pytest.raises(RuntimeError):
        torch.ops.rgpt4d.attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), 1.0, False)


def _count_op_calls(monkeypatch) -> list:
    """Count the calls of rgpt4d.ops.attention made by the models' sdpa_attention."""
    from rgpt4d.models import attention as at

    calls, real = [], at.attention
    monkeypatch.setattr(at, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@requires_model_stack  # rgpt4d.models
def test_student_vision_tower_and_llm_attention_go_through_the_op(monkeypatch):
    # SigLIP's and Qwen2's "sdpa" attention run rgpt4d.ops.attention with the cpu backend and equal
    # transformers' own path (backend eager) to rounding
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from rgpt4d.models import student as st

    cfg = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)
    torch.manual_seed(0)
    tower = st.use_rgpt4d_vision_ops(SiglipVisionModel._from_config(cfg, attn_implementation="sdpa"))
    stock = SiglipVisionModel._from_config(cfg, attn_implementation="sdpa")
    stock.load_state_dict(tower.state_dict())
    x = torch.randn(3, 3, 32, 32)
    calls = _count_op_calls(monkeypatch)
    set_backend("cpu")
    try:
        out = tower(pixel_values=x).last_hidden_state
    finally:
        set_backend(None)
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(out, stock(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
    set_backend("eager")
    try:
        assert torch.equal(tower(pixel_values=x).last_hidden_state, stock(pixel_values=x).last_hidden_state)
    finally:
        set_backend(None)
    assert len(calls) == 2  # backend eager: transformers' sdpa path, not the op


@requires_model_stack  # rgpt4d.models
def test_teacher_encoder_attention_goes_through_the_op(monkeypatch):
    # the VideoMAE teacher's attention (trained in P4D's first stage, then frozen): through the op with
    # the cpu backend, equal to stock transformers to rounding, forward and backward
    from transformers import VideoMAEModel

    from rgpt4d.models.configs import get_preset
    from rgpt4d.models.teacher import Teacher4D

    teacher = Teacher4D(get_preset("smoke").teacher)
    enc = teacher.encoder
    stock = VideoMAEModel(enc.config)
    stock.load_state_dict(enc.state_dict())
    cfg = enc.config
    x = torch.randn(2, cfg.num_frames, cfg.num_channels, cfg.image_size, cfg.image_size)
    calls = _count_op_calls(monkeypatch)
    set_backend("cpu")
    try:
        out = enc(pixel_values=x).last_hidden_state
        out.square().mean().backward()
    finally:
        set_backend(None)
    assert len(calls) == cfg.num_hidden_layers
    ref = stock(pixel_values=x).last_hidden_state
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(enc.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * max(1.0, float(q.grad.abs().max())), msg=n)
