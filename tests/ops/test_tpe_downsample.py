"""tpe_downsample_layernorm (TPE + window downsample + LayerNorm, fused): every CPU backend against
a float64 eager oracle, outputs and the gradients of x, table, weight and bias."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgpt4d.ops import TPEDownsampleLayerNorm, tpe_downsample_layernorm, tpe_downsample_layernorm_eager
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("tpe_ds_ln")
GPU_BACKENDS = op_backends("tpe_ds_ln", device="cuda")


def make(B, T, h, w, D, window, learned, affine=True, dtype=torch.float32, device="cpu", rows=6):
    x = torch.randn(B, T, h * w, D, device=device).to(dtype).requires_grad_(True)
    K = window * window * D
    weight = (1 + 0.5 * torch.randn(K, device=device)).requires_grad_(True) if affine else None
    bias = (0.1 * torch.randn(K, device=device)).requires_grad_(True) if affine else None
    if learned:
        table = torch.randn(rows, D, device=device).requires_grad_(True)
        ts = torch.randint(0, rows, (B, T), device=device)
    else:
        table, ts = None, torch.rand(B, T, device=device) * 30.0
    return x, ts, table, weight, bias


def oracle(x, ts, table, weight, bias, grid, window, g):
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, table, weight, bias)]
    x64, t64, w64, b64 = leaves
    out = tpe_downsample_layernorm_eager(x64, ts if table is not None else ts.double(), t64, w64, b64, grid=grid,
                                         window=window)
    out.backward(g.double())
    return out.detach(), [None if t is None else t.grad for t in leaves]


def check(backend, B, T, h, w, D, window, learned, affine=True, dtype=torch.float32, device="cpu"):
    x, ts, table, weight, bias = make(B, T, h, w, D, window, learned, affine, dtype, device)
    out = tpe_downsample_layernorm(x, ts, table, weight, bias, grid=(h, w), window=window, backend=backend)
    M = -(-h // window) * -(-w // window)
    assert out.shape == (B, T, M, window * window * D) and out.dtype == dtype
    g = torch.randn_like(out)
    ref, ref_grads = oracle(x, ts, table, weight, bias, (h, w), window, g)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    out.backward(g)
    # The same composition in eager fp32: a LayerNorm over a few nearly equal values is
    # ill-conditioned (its gradient scales with 1/std), so the fp32 tolerance also admits 4x the
    # error eager PyTorch itself makes against the float64 oracle.
    eager_grads = [None] * 4
    if dtype == torch.float32:
        leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (x, table, weight, bias)]
        tpe_downsample_layernorm_eager(leaves[0], ts, leaves[1], leaves[2], leaves[3], grid=(h, w),
                                       window=window).backward(g)
        eager_grads = [None if t is None else t.grad for t in leaves]
    for name, t, r, e in zip(("x", "table", "weight", "bias"), (x, table, weight, bias), ref_grads, eager_grads):
        if t is None:
            continue
        # weight/bias/table grads are sums over many rows: scale the tolerance with their count.
        n = 1 if name == "x" else max(1, B * T * M) ** 0.5
        gtol = dict(atol=tol["atol"] * n, rtol=tol["rtol"]) if dtype == torch.float32 else dict(atol=0.1 * n, rtol=5e-2)
        if e is not None and e.numel():
            gtol["atol"] = max(gtol["atol"], 4 * (e.double() - r).abs().max().item())
        torch.testing.assert_close(t.grad.double(), r, **gtol, msg=lambda m: f"grad of {name}: {m}")


CASES = [  # B, T, h, w, D, window
    (1, 1, 1, 1, 1, 3),      # a single token, padded to a 3x3 window
    (2, 3, 4, 5, 6, 3),      # h, w not multiples of the window
    (1, 2, 6, 6, 3, 3),      # exact multiples
    (2, 2, 5, 3, 2, 2),
    (1, 2, 3, 4, 7, 1),      # window 1: TPE + LayerNorm per token
    (1, 1, 2, 3, 1023, 3),   # wide D
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp32(backend, learned, case):
    check(backend, *case, learned)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_affine(backend):
    check(backend, 2, 2, 4, 4, 5, 3, learned=True, affine=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_bf16(backend, learned):
    check(backend, 2, 2, 5, 4, 16, 3, learned, dtype=torch.bfloat16)


def test_layout_convention_by_hand():
    # 1 frame, 2x4 grid, D=1, window 2: output token (0,0) holds cells (0,0),(0,1),(1,0),(1,1)
    # in channels (dy*2+dx); token (0,1) holds (0,2),(0,3),(1,2),(1,3). With eps -> 0 and
    # no affine, LayerNorm of [a,b,c,d] is known in closed form; check the order through it.
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]).view(1, 1, 8, 1)
    ts = torch.zeros(1, 1)  # sin(0) = 0 for the single (even) channel: the encoding adds nothing
    for backend in CPU_BACKENDS:
        out = tpe_downsample_layernorm(x, ts, grid=(2, 4), window=2, eps=1e-12, backend=backend)
        for tok, vals in ((0, [0.0, 1.0, 10.0, 11.0]), (1, [2.0, 3.0, 12.0, 13.0])):
            v = torch.tensor(vals)
            expected = (v - v.mean()) / v.var(unbiased=False).sqrt()
            torch.testing.assert_close(out[0, 0, tok], expected, atol=1e-5, rtol=1e-5)


def test_padding_comes_after_the_encoding():
    # h=w=1 with window 2: one real cell + three zero-padded ones. The encoding must not leak into
    # the padding: the padded channels hold exactly 0 before the LayerNorm.
    D = 4
    x = torch.zeros(1, 1, 1, D)
    ts = torch.full((1, 1), 0.7)
    for backend in CPU_BACKENDS:
        out = tpe_downsample_layernorm(x, ts, grid=(1, 1), window=2, eps=1e-12, backend=backend)[0, 0, 0]
        enc = torch.tensor([torch.sin(torch.tensor(0.7)), torch.cos(torch.tensor(0.7)),
                            torch.sin(torch.tensor(0.7) / 100.0), torch.cos(torch.tensor(0.7) / 100.0)])
        v = torch.cat([enc, torch.zeros(3 * D)])
        expected = (v - v.mean()) / v.var(unbiased=False).sqrt()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_x(backend):
    base = torch.randn(2, 20, 3, 6)
    x = base.transpose(1, 2)  # [B, T, h*w, D], non-contiguous
    ts = torch.rand(2, 3) * 5
    out = tpe_downsample_layernorm(x, ts, grid=(4, 5), window=3, backend=backend)
    ref = tpe_downsample_layernorm_eager(x.double(), ts.double(), grid=(4, 5), window=3)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,T", [(0, 2), (2, 0)])
def test_empty(backend, B, T):
    x, ts, table, weight, bias = make(B, T, 4, 4, 3, 3, learned=True)
    out = tpe_downsample_layernorm(x, ts, table, weight, bias, grid=(4, 4), window=3, backend=backend)
    assert out.shape == (B, T, 4, 27)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for t in (table, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_gradcheck_fp64(backend, learned):
    x, ts, table, weight, bias = make(1, 2, 2, 3, 2, 2, learned, dtype=torch.float64)
    weight = weight.detach().double().requires_grad_(True)
    bias = bias.detach().double().requires_grad_(True)
    if table is not None:
        table = table.detach().double().requires_grad_(True)
        fn = lambda x, t, w, b: tpe_downsample_layernorm(x, ts, t, w, b, grid=(2, 3), window=2,  # noqa: E731
                                                         backend=backend)
        assert torch.autograd.gradcheck(fn, (x, table, weight, bias))
    else:
        ts = ts.double()
        fn = lambda x, w, b: tpe_downsample_layernorm(x, ts, None, w, b, grid=(2, 3), window=2,  # noqa: E731
                                                      backend=backend)
        assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("op_name", ["tpe_ds_ln", "tpe_ds_ln_triton"])
def test_opcheck(op_name):
    op = getattr(torch.ops.rgpt4d, op_name).default
    x, ts, table, weight, bias = make(2, 2, 4, 5, 3, 3, learned=True)
    torch.library.opcheck(op, (x, ts, table, weight, bias, 4, 5, 3, 1e-5, 10000.0))
    x, ts, _, _, _ = make(1, 2, 3, 3, 4, 2, learned=False)
    torch.library.opcheck(op, (x, ts, None, None, None, 3, 3, 2, 1e-5, 10000.0))


@pytest.mark.parametrize("op_name", ["tpe_ds_ln_backward", "tpe_ds_ln_backward_triton"])
def test_opcheck_backward(op_name):
    x, ts, table, weight, bias = make(1, 2, 4, 5, 3, 3, learned=True)
    fwd = torch.ops.rgpt4d.tpe_ds_ln if op_name == "tpe_ds_ln_backward" else torch.ops.rgpt4d.tpe_ds_ln_triton
    out, mean, rstd = fwd(x.detach(), ts, table.detach(), weight.detach(), bias.detach(), 4, 5, 3, 1e-5, 1e4)
    op = getattr(torch.ops.rgpt4d, op_name).default
    g = torch.randn_like(out)
    torch.library.opcheck(op, (g, x.detach(), ts, table.detach(), weight.detach(), mean, rstd, 4, 5, 3, 1e4,
                               True, True, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_weight_and_table_grads(backend):
    x, ts, table, weight, bias = make(2, 8, 7, 7, 12, 3, learned=True, rows=2)
    g = torch.randn(2, 8, 9, 108)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = tpe_downsample_layernorm(x, ts, table, weight, bias, grid=(7, 7), backend=backend)
            runs.append(torch.autograd.grad(out, (x, table, weight, bias), g))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_compile_fullgraph_module_forward_backward():
    torch._dynamo.reset()
    m = TPEDownsampleLayerNorm(6, window=3, mode="learned", max_len=8, backend="cpu")
    with torch.no_grad():
        m.encoding.normal_()
    x = torch.randn(2, 3, 20, 6, requires_grad=True)
    ts = torch.randint(0, 8, (2, 3))
    out = torch.compile(m, fullgraph=True)(x, ts, (4, 5))
    ref = tpe_downsample_layernorm_eager(x.double(), ts, m.encoding.double(), m.weight.double(), m.bias.double(),
                                         grid=(4, 5))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    assert x.grad is not None and m.encoding.grad is not None and m.weight.grad is not None


def test_bad_inputs():
    x = torch.randn(1, 2, 20, 4)
    ts = torch.rand(1, 2)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) has 16 tokens but x.size\(2\) = 20"):
        tpe_downsample_layernorm(x, ts, grid=(4, 4))
    with pytest.raises(ValueError, match="grid must be a pair of positive ints"):
        tpe_downsample_layernorm(x, ts, grid=(20,))
    with pytest.raises(ValueError, match="window must be a positive int"):
        tpe_downsample_layernorm(x, ts, grid=(4, 5), window=0)
    with pytest.raises(ValueError, match=r"weight must be \[window\^2 \* D\] = \[36\]"):
        tpe_downsample_layernorm(x, ts, None, torch.ones(35), grid=(4, 5))
    with pytest.raises(ValueError, match=r"bias must be \[window\^2 \* D\] = \[16\]"):
        tpe_downsample_layernorm(x, ts, None, None, torch.ones(3), grid=(4, 5), window=2)
    with pytest.raises(IndexError, match="timestamps must index rows of table"):
        tpe_downsample_layernorm(x, torch.tensor([[0, 9]]), torch.randn(3, 4), grid=(4, 5))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 2), T=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), D=st.integers(1, 9),
       window=st.integers(1, 4), learned=st.booleans(), backend=st.sampled_from(["cpu", "triton"]),
       seed=st.integers(0, 2**16))
def test_fuzz(B, T, h, w, D, window, learned, backend, seed):
    torch.manual_seed(seed)
    check(backend, B, T, h, w, D, window, learned)


@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 3, 4, 5, 6, 3), (2, 16, 27, 27, 1152, 3)], ids=["small", "paper"])
def test_gpu(backend, dtype, case):
    check(backend, *case, learned=False, dtype=dtype, device="cuda")
