"""TPE ops: tpe_add / tpe_add_ / TimestampPositionalEncoding, every CPU backend against a float64
eager oracle (outputs and all gradients)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgpt4d.ops import TimestampPositionalEncoding, tpe_add, tpe_add_, tpe_add_eager, tpe_sinusoid
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("tpe_add", "tpe_add_")
GPU_BACKENDS = op_backends("tpe_add", "tpe_add_", device="cuda")

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}

SHAPES = [(1, 1, 1, 1), (1, 2, 1, 2), (2, 3, 5, 3), (2, 3, 7, 33), (1, 2, 3, 1023), (2, 4, 9, 64)]


def make_inputs(shape, learned, dtype=torch.float32, table_rows=11, device="cpu", requires_grad=True):
    B, T, N, D = shape
    x = torch.randn(B, T, N, D, device=device).to(dtype)
    if learned:
        table = torch.randn(table_rows, D, device=device)
        ts = torch.randint(0, table_rows, (B, T), device=device)
    else:
        table = None
        ts = torch.rand(B, T, device=device) * 60.0  # seconds: up to a minute of video
    if requires_grad:
        x.requires_grad_(True)
        if table is not None:
            table.requires_grad_(True)
    return x, ts, table


def oracle(x, ts, table, g):
    """float64 eager output and gradients (x, table)."""
    x64 = x.detach().double().requires_grad_(True)
    t64 = table.detach().double().requires_grad_(True) if table is not None else None
    out = tpe_add_eager(x64, ts if table is not None else ts.double(), t64)
    out.backward(g.double())
    return out.detach(), x64.grad, (t64.grad if t64 is not None else None)


def check_against_oracle(backend, x, ts, table):
    out = tpe_add(x, ts, table, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape
    g = torch.randn_like(out)
    ref_out, ref_gx, ref_gt = oracle(x, ts, table, g)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), ref_gx, **tol)
    if table is not None:
        # fp32 sums over N (bf16 grads are exact in fp32); tolerance grows with the sum length.
        n = x.shape[2] * x.shape[0] * x.shape[1]
        torch.testing.assert_close(table.grad.double(), ref_gt, atol=1e-5 * max(1, n) ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_fp32(backend, learned, shape):
    check_against_oracle(backend, *make_inputs(shape, learned))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_forward_backward_bf16(backend, learned):
    check_against_oracle(backend, *make_inputs((2, 3, 7, 40), learned, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_and_fp64(backend):
    for dtype, tol in ((torch.float16, dict(atol=4e-3, rtol=2e-3)), (torch.float64, TOL[torch.float64])):
        x, ts, table = make_inputs((2, 2, 3, 10), learned=False, dtype=dtype, requires_grad=False)
        out = tpe_add(x, ts, backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), tpe_add_eager(x.double(), ts.double()), **tol)


# Outputs whose call moves at least 32 MiB (x read + out written) are written with streaming
# stores (csrc/cpu/stream.h, kStreamFootprint): float rows by one fused SSE loop, other
# dtypes a cache line at a time. D = 1025 makes every other row start off a 16-byte boundary.
@pytest.mark.parametrize("dtype,N", [(torch.float32, 2049), (torch.bfloat16, 4097), (torch.float16, 4097),
                                     (torch.float64, 1025)], ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_large_outputs_streamed_match_the_oracle(dtype, N, learned):
    x, ts, table = make_inputs((1, 2, N, 1025), learned, dtype=dtype, requires_grad=False)
    assert 2 * x.numel() * x.element_size() >= 32 << 20
    out = tpe_add(x, ts, table, backend="cpu")
    ref = tpe_add_eager(x.double(), ts if learned else ts.double(), table.double() if learned else None)
    tol = dict(atol=4e-3, rtol=2e-3) if dtype == torch.float16 else TOL[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    # the in-place variant reads and writes the same lines: ordinary stores, same values
    y = x.clone()
    tpe_add_(y, ts, table, backend="cpu")
    assert torch.equal(y, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_table_with_bf16_x(backend):
    x, ts, table = make_inputs((2, 3, 4, 12), learned=True, dtype=torch.bfloat16)
    table = table.detach().to(torch.bfloat16).requires_grad_(True)
    out = tpe_add(x, ts, table, backend=backend)
    out.backward(torch.ones_like(out))
    assert table.grad.dtype == torch.bfloat16
    ref = torch.zeros(table.shape, dtype=torch.float64).index_add_(0, ts.flatten(), torch.full((6, 12), 4.0, dtype=torch.float64))
    torch.testing.assert_close(table.grad.double(), ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sinusoid_values_follow_the_paper(backend):
    # p[2i] = sin(t / 10000^(2i/D)), p[2i+1] = cos(t / 10000^(2i/D)); odd D ends with a sine.
    D = 5
    t = torch.tensor([[0.0, 1.5, 42.0]])
    out = tpe_add(torch.zeros(1, 3, 1, D), t, backend=backend)[0, :, 0].double()
    expected = torch.zeros(3, D, dtype=torch.float64)
    for n in range(3):
        for d in range(D):
            i2 = d - d % 2
            a = float(t[0, n]) / 10000.0 ** (i2 / D)
            expected[n, d] = torch.sin(torch.tensor(a, dtype=torch.float64)) if d % 2 == 0 else torch.cos(
                torch.tensor(a, dtype=torch.float64))
    torch.testing.assert_close(out, expected, atol=3e-6, rtol=0)
    torch.testing.assert_close(tpe_sinusoid(t[0].double(), D, dtype=torch.float64), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_non_contiguous_x(backend, learned):
    base = torch.randn(3, 8, 2, 6)  # [B, N, T, D] -> permuted to [B, T, N, D]
    x = base.permute(0, 2, 1, 3).requires_grad_(False)
    assert not x.is_contiguous()
    _, ts, table = make_inputs((3, 2, 8, 6), learned, requires_grad=False)
    ts = ts.t().contiguous().t()  # non-contiguous timestamps too
    out = tpe_add(x, ts, table, backend=backend)
    ref = tpe_add_eager(x.double(), ts if learned else ts.double(), None if table is None else table.double())
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 0, 3, 4), (2, 3, 0, 4)], ids=["B0", "T0", "N0"])
def test_empty_inputs(backend, shape):
    x, ts, table = make_inputs(shape, learned=True)
    out = tpe_add(x, ts, table, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(table.grad, torch.zeros_like(table))
    x, ts, _ = make_inputs(shape, learned=False, requires_grad=False)
    assert tpe_add(x, ts, backend=backend).shape == x.shape


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_grad_x_is_grad_out_itself(backend):
    x, ts, table = make_inputs((2, 3, 4, 8), learned=True)
    out = tpe_add(x, ts, table, backend=backend)
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (x, table), g)
    assert gx.data_ptr() == g.data_ptr()  # no copy


def _ops_in_backward(backend, table_requires_grad):
    x, ts, table = make_inputs((2, 3, 4, 8), learned=True)
    table.requires_grad_(table_requires_grad)
    out = tpe_add(x, ts, table, backend=backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.randn_like(out))
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_frozen_table_gets_no_gradient_work(backend):
    name = "rgpt4d::tpe_table_backward" + ("_triton" if backend == "triton" else "")
    assert name in _ops_in_backward(backend, True)
    assert name not in _ops_in_backward(backend, False)
    x, ts, table = make_inputs((2, 3, 4, 8), learned=True)
    with torch.no_grad():
        out = tpe_add(x, ts, table, backend=backend)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic_backward_is_bitwise_repeatable(backend):
    # Many frames share few rows: the scatter order matters for float sums.
    x, ts, table = make_inputs((4, 16, 9, 70), learned=True, table_rows=3)
    g = torch.randn(x.shape)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(3):
            out = tpe_add(x, ts, table, backend=backend)
            (gt,) = torch.autograd.grad(out, table, g)
            grads.append(gt)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(grads[0], gi) for gi in grads[1:])
    ref = oracle(x, ts, table, g)[2]
    torch.testing.assert_close(grads[0].double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_nondeterministic_triton_atomics_path_is_correct(backend):
    x, ts, table = make_inputs((2, 5, 6, 20), learned=True, table_rows=4)
    out = tpe_add(x, ts, table, backend=backend)
    g = torch.randn_like(out)
    (gt,) = torch.autograd.grad(out, table, g)
    torch.testing.assert_close(gt.double(), oracle(x, ts, table, g)[2], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
def test_gradcheck_fp64(backend, learned):
    x, ts, table = make_inputs((2, 2, 3, 5), learned, dtype=torch.float64)
    if table is not None:
        table = table.detach().double().requires_grad_(True)
        fn = lambda x, table: tpe_add(x, ts, table, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, table))
    else:
        ts = ts.double()
        assert torch.autograd.gradcheck(lambda x: tpe_add(x, ts, backend=backend), (x,))


@pytest.mark.parametrize("op_name", ["tpe_add", "tpe_add_triton"])
def test_opcheck(op_name):
    op = getattr(torch.ops.rgpt4d, op_name).default
    x, ts, table = make_inputs((2, 3, 4, 6), learned=True)
    torch.library.opcheck(op, (x, ts, table, 10000.0))
    x, ts, _ = make_inputs((2, 3, 4, 6), learned=False)
    torch.library.opcheck(op, (x, ts, None, 500.0))


@pytest.mark.parametrize("op_name", ["tpe_add_", "tpe_add_triton_"])
def test_opcheck_inplace(op_name):
    op = getattr(torch.ops.rgpt4d, op_name).default
    x, ts, table = make_inputs((2, 3, 4, 6), learned=True, requires_grad=False)
    torch.library.opcheck(op, (x, ts, table, 10000.0))


@pytest.mark.parametrize("op_name", ["tpe_table_backward", "tpe_table_backward_triton"])
def test_opcheck_table_backward(op_name):
    op = getattr(torch.ops.rgpt4d, op_name).default
    g = torch.randn(2, 3, 4, 6)
    ts = torch.randint(0, 5, (2, 3))
    torch.library.opcheck(op, (g, ts, 5, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_inplace_matches_out_of_place(backend):
    for learned in (False, True):
        x, ts, table = make_inputs((2, 3, 4, 9), learned, requires_grad=False)
        expected = tpe_add(x, ts, table, backend=backend)
        y = x.clone()
        assert tpe_add_(y, ts, table, backend=backend) is y
        torch.testing.assert_close(y, expected, atol=0, rtol=0)
        # non-contiguous in place
        z = x.clone().transpose(1, 2).contiguous().transpose(1, 2)
        tpe_add_(z, ts, table, backend=backend)
        torch.testing.assert_close(z, expected, atol=0, rtol=0)


def test_inplace_refuses_autograd():
    x, ts, table = make_inputs((1, 2, 3, 4), learned=True)
    with pytest.raises(RuntimeError, match="in-place op is for inference"):
        tpe_add_(x, ts, table)
    with torch.no_grad():
        tpe_add_(x.detach().clone(), ts, table)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x, ts, table = make_inputs((2, 3, 4, 16), learned=True)

    @torch.compile(fullgraph=True)
    def f(x, ts, table):
        return (tpe_add(x, ts, table, backend="cpu") * 2.0).sum()

    loss = f(x, ts, table)
    loss.backward()
    ref = (tpe_add_eager(x.detach().double(), ts, table.detach().double()) * 2.0).sum()
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    expected_gt = torch.zeros_like(table).index_add_(0, ts.flatten(), torch.full((6, 16), 8.0))
    torch.testing.assert_close(table.grad, expected_gt)


def test_compile_fullgraph_triton_module():
    torch._dynamo.reset()
    m = TimestampPositionalEncoding(16, max_len=20, mode="sinusoidal", backend="triton")
    x, ts, _ = make_inputs((2, 3, 4, 16), learned=False, requires_grad=False)
    out = torch.compile(m, fullgraph=True)(x, ts)
    torch.testing.assert_close(out.double(), tpe_add_eager(x.double(), ts.double()), **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_learned_matches_the_seed_snippet(backend):
    torch.manual_seed(3)
    m = TimestampPositionalEncoding(d_model=24, max_len=500, mode="learned", backend=backend)
    assert m.encoding.shape == (500, 24) and torch.equal(m.encoding, torch.zeros(500, 24))
    with torch.no_grad():
        m.encoding.normal_()
    feats = torch.randn(2, 16, 5, 24)  # [batch, frames, regions, dim]
    ts = torch.randint(0, 500, (2, 16))
    seed = feats + m.encoding[ts].unsqueeze(2)  # the seed's formula
    assert torch.equal(m(feats, ts), seed)  # numerically identical, fp32
    m(feats, ts).sum().backward()
    ref = torch.zeros(500, 24).index_add_(0, ts.flatten(), torch.full((32, 24), 5.0))
    torch.testing.assert_close(m.encoding.grad, ref)


def test_module_sinusoidal_has_no_parameters():
    m = TimestampPositionalEncoding(d_model=8, mode="sinusoidal")
    assert list(m.parameters()) == []
    with pytest.raises(ValueError, match="mode must be"):
        TimestampPositionalEncoding(8, mode="rope")


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    x = torch.randn(2, 3, 4, 8)
    table = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"x must be \[B, T, N, D\]"):
        tpe_add(torch.randn(2, 3, 8), torch.rand(2, 3), backend=backend)
    with pytest.raises(ValueError, match=r"timestamps must be \[B, T\] = \[2, 3\]"):
        tpe_add(x, torch.rand(2, 4), backend=backend)
    with pytest.raises(IndexError, match=r"timestamps must index rows of table in \[0, 10\), got values in \[0, 10\]"):
        tpe_add(x, torch.tensor([[0, 1, 2], [3, 4, 10]]), table, backend=backend)
    with pytest.raises(IndexError, match=r"\[-1, "):
        tpe_add(x, torch.tensor([[0, 1, 2], [3, 4, -1]]), table, backend=backend)
    with pytest.raises(ValueError, match="must be finite seconds"):
        tpe_add(x, torch.tensor([[0.0, 1.0, float("nan")], [0.0, 1.0, 2.0]]), backend=backend)
    with pytest.raises(ValueError, match="must be finite seconds"):
        tpe_add(x, torch.tensor([[0.0, 1.0, float("inf")], [0.0, 1.0, 2.0]]), backend=backend)
    with pytest.raises(TypeError, match="without a table, timestamps must be float seconds"):
        tpe_add(x, torch.zeros(2, 3, dtype=torch.long), backend=backend)
    with pytest.raises(TypeError, match="with a table, timestamps must be integer"):
        tpe_add(x, torch.zeros(2, 3), table, backend=backend)
    with pytest.raises(ValueError, match=r"table must be \[L, D\] with D = x.size\(3\) = 8"):
        tpe_add(x, torch.zeros(2, 3, dtype=torch.long), torch.randn(10, 7), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tpe_add(torch.zeros(2, 3, 4, 8, dtype=torch.long), torch.rand(2, 3), backend=backend)
    with pytest.raises(ValueError, match="timestamps must be on x's device"):
        tpe_add(x, torch.rand(2, 3, device="meta"), backend=backend)


def test_compiled_kernel_rejects_out_of_range_rows_even_without_validation():
    # validate=False skips the Python checks; the CPU kernel still never reads outside the table.
    x, table = torch.randn(1, 2, 3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"timestamps must index rows of table in \[0, 5\)"):
        tpe_add(x, torch.tensor([[0, 7]]), table, backend="cpu", validate=False)


# ---- hypothesis shape fuzzing -----------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 3), T=st.integers(0, 4), N=st.integers(0, 9), D=st.integers(1, 40),
       learned=st.booleans(), backend=st.sampled_from(["cpu", "triton"]), seed=st.integers(0, 2**16))
def test_fuzz_shapes(B, T, N, D, learned, backend, seed):
    torch.manual_seed(seed)
    check_against_oracle(backend, *make_inputs((B, T, N, D), learned, table_rows=7))


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("learned", [False, True], ids=["sinusoidal", "learned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 33), (2, 16, 729, 1152)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_forward_backward(backend, learned, dtype, shape):
    check_against_oracle(backend, *make_inputs(shape, learned, dtype=dtype, device="cuda"))


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_backward(backend):
    x, ts, table = make_inputs((4, 16, 50, 300), learned=True, table_rows=3, device="cuda")
    g = torch.randn(x.shape, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.autograd.grad(tpe_add(x, ts, table, backend=backend), table, g)[0]
        b = torch.autograd.grad(tpe_add(x, ts, table, backend=backend), table, g)[0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
