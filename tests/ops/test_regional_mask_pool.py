"""mask_pool (soft masked average per region and frame, masks resized inside, TPE fused): every CPU
backend against the float64 eager composition: F.interpolate(bilinear, align_corners=False) +
normalise + einsum + rgpt4d.ops.tpe_add. Outputs and the gradients of features, masks and table."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rgpt4d.ops import MaskPool, mask_pool, mask_pool_eager, tpe_add
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("mask_pool")
GPU_BACKENDS = op_backends("mask_pool", device="cuda")

EPS = 1e-8


def make(B, T, C, H, W, R, Hm, Wm, *, tpe="learned", dtype=torch.float32, device="cpu", rows=7, mask_grad=True,
         sparse=True):
    f = torch.randn(B, T, C, H, W, device=device).to(dtype).requires_grad_(True)
    m = torch.rand(B, T, R, Hm, Wm, device=device)
    if sparse:  # object-like masks: mostly zero
        m = m * (torch.rand(B, T, R, Hm, Wm, device=device) > 0.5)
    m = m.to(dtype).requires_grad_(mask_grad)
    table = ts = None
    if tpe == "learned":
        table = torch.randn(rows, C, device=device).requires_grad_(True)
        ts = torch.randint(0, rows, (B, T), device=device)
    elif tpe == "sinusoidal":
        ts = torch.rand(B, T, device=device) * 30.0
    return f, m, ts, table


def composition(f, m, ts, table, eps=EPS):
    B, T, C, H, W = f.shape
    R, Hm, Wm = m.shape[2:]
    mr = F.interpolate(m.reshape(B * T * R, 1, Hm, Wm), size=(H, W), mode="bilinear", align_corners=False)
    mr = mr.view(B, T, R, H * W)
    out = torch.einsum("btrp,btcp->btrc", mr, f.reshape(B, T, C, H * W)) / (mr.sum(-1, keepdim=True) + eps)
    if ts is not None:
        out = tpe_add(out, ts if table is not None else ts.to(f.dtype), table, backend="eager")
    return out


def oracle(f, m, ts, table, g, eps=EPS):
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (f, m, table)]
    f64, m64, t64 = leaves
    out = composition(f64, m64, ts, t64, eps)
    out.backward(g.double())
    return out.detach(), [None if t is None else t.grad for t in leaves]


def check(backend, f, m, ts, table, *, eps=EPS, channels_last=False, tol=dict(atol=2e-5, rtol=1e-5)):
    fin = f.permute(0, 1, 3, 4, 2) if channels_last else f
    out = mask_pool(fin, m, eps=eps, timestamps=ts, table=table, channels_last=channels_last, backend=backend)
    assert out.shape == (f.shape[0], f.shape[1], m.shape[2], f.shape[2]) and out.dtype == f.dtype
    g = torch.randn(out.shape).to(out.dtype)
    ref, (ref_gf, ref_gm, ref_gt) = oracle(f, m, ts, table, g, eps)
    torch.testing.assert_close(out.double(), ref, **tol)
    out.backward(g)
    torch.testing.assert_close(f.grad.double(), ref_gf, **tol, msg=lambda s: f"grad of features: {s}")
    if m.requires_grad:
        torch.testing.assert_close(m.grad.double(), ref_gm, **tol, msg=lambda s: f"grad of masks: {s}")
    if table is not None:
        n = max(1, f.shape[0] * f.shape[1] * m.shape[2]) ** 0.5
        torch.testing.assert_close(table.grad.double(), ref_gt, atol=tol["atol"] * n, rtol=tol["rtol"])
    return out


MASK_SIZES = {"down": (23, 29), "up": (3, 4), "same": (7, 9), "mixed": (5, 17)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tpe", ["none", "sinusoidal", "learned"])
@pytest.mark.parametrize("masks", list(MASK_SIZES))
def test_matches_interpolate_normalise_einsum(backend, tpe, masks):
    Hm, Wm = MASK_SIZES[masks]
    check(backend, *make(2, 3, 6, 7, 9, 4, Hm, Wm, tpe=tpe))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_masks_and_empty_masks(backend):
    f, m, ts, table = make(1, 2, 5, 6, 6, 3, 12, 12, tpe="sinusoidal", mask_grad=False)
    m = m.detach().clone()
    m[0, 1, 2] = 0  # an empty mask: 0 / (0 + eps) -> a zero token (+ TPE)
    out = check(backend, f, m, ts, table)
    assert m.grad is None
    torch.testing.assert_close(out[0, 1, 2], tpe_add(torch.zeros(1, 1, 1, 5), ts[:, 1:], backend="eager")[0, 0, 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bool_masks(backend):
    f, _, ts, table = make(1, 2, 4, 5, 5, 2, 10, 10, tpe="none")
    mb = torch.rand(1, 2, 2, 10, 10) > 0.6
    out = mask_pool(f, mb, backend=backend)
    torch.testing.assert_close(out.double(), composition(f.double(), mb.double(), None, None), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_features(backend):
    f, m, ts, table = make(2, 2, 8, 5, 6, 3, 11, 7, tpe="learned")
    check(backend, f, m, ts, table, channels_last=True)
    fv = torch.randn(2, 2, 5, 6, 8).permute(0, 1, 4, 2, 3).requires_grad_(True)  # strided [B, T, C, H, W]
    out = mask_pool(fv, m.detach(), backend=backend)
    out.sum().backward()
    if backend != "eager":
        assert fv.grad.stride() == fv.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    f = torch.randn(2, 6, 5, 9, 8)[:, ::2, :, 1:, :].detach().requires_grad_(True)
    m = torch.rand(2, 3, 4, 13, 20)[..., ::2].detach().requires_grad_(True)
    _, _, ts, table = make(2, 3, 5, 8, 8, 4, 1, 1, tpe="learned")
    assert not f.is_contiguous() and not m.is_contiguous()
    check(backend, f, m, ts, table)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_with_fp32_accumulation(backend):
    f, m, ts, table = make(2, 2, 16, 6, 6, 3, 12, 12, tpe="learned", dtype=torch.bfloat16)
    check(backend, f, m, ts, table, tol=dict(atol=3e-2, rtol=2e-2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eps(backend):
    check(backend, *make(1, 2, 3, 4, 4, 2, 8, 8, tpe="none"), eps=0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 4, 2), (2, 0, 3, 4, 4, 2), (2, 2, 3, 4, 4, 0)], ids=["B0", "T0", "R0"])
def test_empty(backend, shape):
    f, m, ts, table = make(*shape, 6, 6, tpe="learned")
    out = mask_pool(f, m, timestamps=ts, table=table, backend=backend)
    assert out.shape == (shape[0], shape[1], shape[5], shape[2])
    out.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    assert torch.equal(table.grad, torch.zeros_like(table))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_fp64(backend):
    f, m, ts, table = make(1, 2, 3, 4, 5, 2, 6, 3, tpe="learned", dtype=torch.float64, sparse=False)
    table = table.detach().double().requires_grad_(True)

    def fn(f, m, table):
        return mask_pool(f, m, timestamps=ts, table=table, backend=backend)

    assert torch.autograd.gradcheck(fn, (f, m, table), fast_mode=backend == "triton")


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    f, m, ts, table = make(1, 2, 3, 4, 5, 2, 7, 6, tpe="learned")
    op = getattr(torch.ops.rgpt4d, "mask_pool" + suffix).default
    torch.library.opcheck(op, (f, m, ts, table, 1e-8, 10000.0))
    torch.library.opcheck(op, (f, m.detach(), torch.rand(1, 2), None, 0.1, 500.0))
    bwd = getattr(torch.ops.rgpt4d, "mask_pool_backward" + suffix).default
    g = torch.randn(1, 2, 2, 3)
    _, resized, inv_z = op(f.detach(), m.detach(), None, None, 1e-8, 10000.0)
    torch.library.opcheck(bwd, (g, f.detach(), m.detach(), resized, inv_z, True, True, False))
    torch.library.opcheck(bwd, (g, f.detach(), m.detach(), resized, inv_z, True, False, True))


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_returns_the_resized_masks_the_backward_reuses(suffix, dtype):
    # the op's 2nd and 3rd outputs are the masks on the feature grid (as F.interpolate) and
    # 1 / (sum + eps), in the accumulation dtype; they are not differentiable
    f, m, ts, table = make(2, 3, 4, 5, 7, 3, 11, 6, tpe="learned", dtype=dtype)
    op = getattr(torch.ops.rgpt4d, "mask_pool" + suffix)
    out, resized, inv_z = op(f, m, ts, table, 1e-3, 10000.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert resized.dtype == acc and inv_z.dtype == acc
    assert not resized.requires_grad and not inv_z.requires_grad and out.requires_grad
    ref = F.interpolate(m.detach().to(acc).reshape(18, 1, 11, 6), size=(5, 7), mode="bilinear",
                        align_corners=False).view(2, 3, 3, 5, 7)
    torch.testing.assert_close(resized, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inv_z, 1.0 / (ref.sum((-2, -1)) + 1e-3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_object_masks_on_the_parallel_path_match_the_oracle_at_every_thread_count(dtype):
    # Frozen object masks (the windowed loops: windows well under a third of the grid) on a problem
    # big enough that the forward, the grad/Z scaling (B*T*R*C >= 2^17) and the features gradient
    # run on the parallel (elastic) path at two threads: same bits at 1 and 2 threads, and the
    # float64 oracle.
    torch.manual_seed(3)
    B, T, C, H, W, R = 2, 4, 2080, 16, 16, 8
    f = torch.randn(B, T, C, H, W).to(dtype).requires_grad_(True)
    m = box_masks(B, T, R, 3 * H, 3 * W)
    table = torch.randn(5, C).requires_grad_(True)
    ts = torch.randint(0, 5, (B, T))
    g = torch.randn(B, T, R, C).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out = mask_pool(f, m, timestamps=ts, table=table, backend="cpu")
            results.append((out.detach(),) + torch.autograd.grad(out, (f, table), g))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))
    ref, (ref_gf, _, ref_gt) = oracle(f, m, ts, table, g)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    out, gf, gt = results[0]
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gf.double(), ref_gf, **tol)
    torch.testing.assert_close(gt.double(), ref_gt, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fdtype, gdtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                            (torch.float64, torch.float32)])
def test_backward_op_accepts_a_grad_in_another_dtype(fdtype, gdtype):
    # Called directly, the backward op takes grad in any float dtype: read in place when it
    # accumulates in the features' accumulation dtype, else converted first (the grad/Z loop).
    f, m, _, _ = make(2, 2, 6, 5, 4, 3, 9, 8, tpe="none", dtype=fdtype, mask_grad=False)
    _, resized, inv_z = torch.ops.rgpt4d.mask_pool(f.detach(), m, None, None, 1e-8, 10000.0)
    g = torch.randn(2, 2, 3, 6)
    bwd = torch.ops.rgpt4d.mask_pool_backward
    gf, _ = bwd(g.to(gdtype), f.detach(), m, resized, inv_z, True, False, False)
    gf_ref, _ = bwd(g.to(fdtype), f.detach(), m, resized, inv_z, True, False, False)
    assert gf.dtype == fdtype
    tol = dict(atol=1e-2, rtol=1e-2) if torch.bfloat16 in (fdtype, gdtype) else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gf.double(), gf_ref.double(), **tol)


def test_backward_rejects_saved_masks_of_the_wrong_shape_or_dtype():
    f, m, _, _ = make(1, 2, 3, 4, 5, 2, 7, 6, tpe="none")
    _, resized, inv_z = torch.ops.rgpt4d.mask_pool(f.detach(), m.detach(), None, None, 1e-8, 10000.0)
    g = torch.randn(1, 2, 2, 3)
    bwd = torch.ops.rgpt4d.mask_pool_backward
    with pytest.raises(RuntimeError, match=r"resized must be \[B, T, R, H, W\] = \[1, 2, 2, 4, 5\]"):
        bwd(g, f.detach(), m.detach(), resized[..., :4], inv_z, True, True, False)
    with pytest.raises(RuntimeError, match=r"inv_z must be \[B, T, R\]"):
        bwd(g, f.detach(), m.detach(), resized, inv_z[:, :1], True, True, False)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        bwd(g, f.detach(), m.detach(), resized.double(), inv_z, True, True, False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    f, m, ts, table = make(2, 2, 4, 5, 5, 3, 9, 9, tpe="learned")
    pool = MaskPool(backend=backend)

    @torch.compile(fullgraph=True)
    def step(f, m, ts, table):
        return (pool(f, m, ts, table) * 2.0).sum()

    loss = step(f, m, ts, table)
    loss.backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (f, m, table)]
    ref = (mask_pool_eager(leaves[0], leaves[1], timestamps=ts, table=leaves[2]) * 2.0).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for t, r in zip((f, m, table), leaves):
        torch.testing.assert_close(t.grad, r.grad, atol=2e-5, rtol=1e-5)


def box_masks(B, T, R, Hm, Wm, dtype=torch.float32, empty=False):
    """Object-like soft masks: random values inside a random rectangle per mask, zero elsewhere (the
    CPU kernel then sums over each mask's non-zero window instead of the whole grid)."""
    m = torch.zeros(B, T, R, Hm, Wm)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (B, T, R))).tolist():
        # 4 source pixels (a 3x downsampling then still reads some: no accidental empty mask) to half the grid
        h, w = torch.randint(4, max(5, Hm // 2), (1,)).item(), torch.randint(4, max(5, Wm // 2), (1,)).item()
        y0, x0 = torch.randint(0, Hm - h + 1, (1,)).item(), torch.randint(0, Wm - w + 1, (1,)).item()
        y1, x1 = y0 + h, x0 + w
        m[tuple(idx)][y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0) + 0.1
    if empty:
        m[0, 0, 0] = 0
    return m.to(dtype)


@pytest.mark.parametrize("layout", ["planar", "channels_last", "row_strided"])
@pytest.mark.parametrize("W", [5, 13, 27])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_windowed_loops_on_object_masks(layout, W, dtype):
    # windows narrower and wider than a vector, at the grid's edges, empty; features read in place
    torch.manual_seed(W)
    B, T, C, H, R = 2, 2, 9, 11, 5
    f, _, ts, table = make(B, T, C, H, W, R, 1, 1, tpe="learned", dtype=dtype)
    if layout == "row_strided":  # planar rows with a gap after each: row stride > W
        f = torch.randn(B, T, C, H, W + 3)[..., :W].to(dtype).detach().requires_grad_(True)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    cl = layout == "channels_last"
    check("cpu", f, box_masks(B, T, R, 3 * H, 3 * W, dtype).requires_grad_(True), ts, table, channels_last=cl, tol=tol)
    f.grad = table.grad = None
    # frozen masks (the usual case), one of them empty: 0 / (0 + eps) -> the TPE alone
    check("cpu", f, box_masks(B, T, R, 3 * H, 3 * W, dtype, empty=True), ts, table, channels_last=cl, tol=tol)


def test_cpu_backward_is_bitwise_independent_of_the_thread_count():
    # big enough for the parallel path (small problems run serially)
    f, m, ts, table = make(2, 3, 64, 12, 12, 5, 20, 20, tpe="learned", rows=2)
    out = mask_pool(f, m, timestamps=ts, table=table, backend="cpu")
    g = torch.randn_like(out)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(out, (f, m, table), g, retain_graph=True))
    finally:
        torch.set_num_threads(threads)
    for gi in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], gi))


def test_triton_backward_is_repeatable():
    # no atomics in the Triton mask backward: bitwise repeatable in any mode
    f, m, ts, table = make(1, 2, 8, 5, 5, 3, 9, 7, tpe="none")
    out = mask_pool(f, m, backend="triton")
    g = torch.randn_like(out)
    a = torch.autograd.grad(out, (f, m), g, retain_graph=True)
    b = torch.autograd.grad(out, (f, m), g, retain_graph=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    f = torch.randn(2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match=r"masks must be \[B, T, R, Hm, Wm\] \(one soft mask"):
        mask_pool(f, torch.rand(2, 3, 8, 8), backend=backend)
    with pytest.raises(ValueError, match=r"masks must be \[B, T, R, Hm, Wm\] \(one soft mask"):
        mask_pool(f, torch.rand(2, 3, 1, 2, 8, 8), backend=backend)
    with pytest.raises(ValueError, match=r"with B, T = 2, 3"):
        mask_pool(f, torch.rand(2, 2, 1, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="non-empty grids"):
        mask_pool(f, torch.rand(2, 3, 1, 0, 8), backend=backend)
    with pytest.raises(ValueError, match="eps must be"):
        mask_pool(f, torch.rand(2, 3, 1, 8, 8), eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match=r"features must be \[B, T, C, H, W\]"):
        mask_pool(torch.randn(3, 4, 5, 5), torch.rand(2, 3, 1, 8, 8), backend=backend)
    with pytest.raises(ValueError, match="masks must be on the features' device"):
        mask_pool(f, torch.rand(2, 3, 1, 8, 8, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="with a table, timestamps must be integer"):
        mask_pool(f, torch.rand(2, 3, 1, 8, 8), timestamps=torch.rand(2, 3), table=torch.randn(4, 4),
                  backend=backend)


# ---- hypothesis -------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 2), T=st.integers(0, 3), C=st.integers(1, 9), H=st.integers(1, 7), W=st.integers(1, 7),
       R=st.integers(0, 4), Hm=st.integers(1, 20), Wm=st.integers(1, 20),
       tpe=st.sampled_from(["none", "sinusoidal", "learned"]), backend=st.sampled_from(["eager", "cpu", "cpu", "triton"]),
       seed=st.integers(0, 2**16))
def test_fuzz(B, T, C, H, W, R, Hm, Wm, tpe, backend, seed):
    torch.manual_seed(seed)
    check(backend, *make(B, T, C, H, W, R, Hm, Wm, tpe=tpe, sparse=False))


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_4d_rgpt_shape(backend, dtype):
    f, m, ts, table = make(2, 16, 1152, 27, 27, 8, 96, 96, tpe="learned", dtype=dtype, device="cuda")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    check(backend, f, m, ts, table, tol=tol)


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backward_is_repeatable(backend):
    f, m, ts, table = make(2, 4, 64, 16, 16, 6, 40, 40, tpe="learned", rows=2, device="cuda")
    out = mask_pool(f, m, timestamps=ts, table=table, backend=backend)
    g = torch.randn_like(out)
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.autograd.grad(out, (f, m, table), g, retain_graph=True)
        b = torch.autograd.grad(out, (f, m, table), g, retain_graph=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
