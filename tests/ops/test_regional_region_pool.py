"""region_pool (RoIAlign per frame + the TPE, fused): every CPU backend against the float64 eager
composition the op replaces: torchvision.ops.roi_align on each frame, then rgpt4d.ops.tpe_add, then
the valid mask. Outputs and the gradients of the features and of the TPE table."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align as tv_roi_align

from rgpt4d.ops import RegionPool, region_pool, region_pool_eager, tpe_add
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("region_pool")
GPU_BACKENDS = op_backends("region_pool", device="cuda")


def make(B, T, C, H, W, R, *, tpe="learned", valid=False, dtype=torch.float32, device="cpu", rows=9, scale=1.0,
         max_size=7.0):
    f = torch.randn(B, T, C, H, W, device=device).to(dtype).requires_grad_(True)
    xy = (torch.rand(B, T, R, 2, device=device) * (max(H, W) + 4) - 2) / scale
    wh = torch.rand(B, T, R, 2, device=device) * max_size / scale
    boxes = torch.cat([xy, xy + wh], -1)
    table = ts = None
    if tpe == "learned":
        table = torch.randn(rows, C, device=device).requires_grad_(True)
        ts = torch.randint(0, rows, (B, T), device=device)
    elif tpe == "sinusoidal":
        ts = torch.rand(B, T, device=device) * 20.0
    v = (torch.rand(B, T, R, device=device) > 0.3) if valid else None
    return f, boxes, v, ts, table


def composition(f, boxes, valid, ts, table, output_size, scale, sr, aligned):
    """torchvision roi_align on each frame (frames of a video as a batch of images), tpe_add, valid."""
    B, T, C, H, W = f.shape
    R = boxes.shape[2]
    ph, pw = output_size
    frames = []
    for t in range(T):
        idx = torch.arange(B, dtype=f.dtype, device=f.device).repeat_interleave(R)[:, None]
        rois = torch.cat([idx, boxes[:, t].reshape(B * R, 4).to(f.dtype)], 1)
        frames.append(tv_roi_align(f[:, t], rois, (ph, pw), scale, sr, aligned).view(B, R, C, ph, pw))
    out = torch.stack(frames, 1) if T else f.new_zeros((B, 0, R, C, ph, pw)) + f.sum() * 0  # [B, T, R, C, ph, pw]
    if ts is not None:
        tokens = out.permute(0, 1, 2, 4, 5, 3).reshape(B, T, R * ph * pw, C)
        tokens = tpe_add(tokens, ts if table is not None else ts.to(f.dtype), table, backend="eager")
        out = tokens.view(B, T, R, ph, pw, C).permute(0, 1, 2, 5, 3, 4)
    if valid is not None:
        out = torch.where(valid.view(B, T, R, 1, 1, 1), out, torch.zeros_like(out))
    return out.reshape(B, T, R, C) if (ph, pw) == (1, 1) else out


def oracle(f, boxes, valid, ts, table, g, **kw):
    f64 = f.detach().double().requires_grad_(True)
    t64 = table.detach().double().requires_grad_(True) if table is not None else None
    out = composition(f64, boxes.double(), valid, ts, t64, **kw)
    out.backward(g.double())
    return out.detach(), f64.grad, (t64.grad if t64 is not None else None)


def check(backend, f, boxes, valid, ts, table, *, output_size=(1, 1), scale=1.0, sr=-1, aligned=True,
          channels_last=False, tol=dict(atol=1e-5, rtol=1e-5)):
    fin = f.permute(0, 1, 3, 4, 2) if channels_last else f
    out = region_pool(fin, boxes, output_size=output_size, spatial_scale=scale, sampling_ratio=sr, aligned=aligned,
                      valid=valid, timestamps=ts, table=table, channels_last=channels_last, backend=backend)
    g = torch.randn(out.shape).to(out.dtype)
    ref, ref_gf, ref_gt = oracle(f, boxes, valid, ts, table, g, output_size=output_size, scale=scale, sr=sr,
                                 aligned=aligned)
    assert out.shape == ref.shape and out.dtype == f.dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    out.backward(g)
    torch.testing.assert_close(f.grad.double(), ref_gf, **tol)
    if table is not None:
        n = max(1, f.shape[0] * f.shape[1] * boxes.shape[2]) ** 0.5
        torch.testing.assert_close(table.grad.double(), ref_gt, atol=tol["atol"] * n, rtol=tol["rtol"])
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tpe", ["none", "sinusoidal", "learned"])
@pytest.mark.parametrize("output_size", [(1, 1), (2, 2), (2, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_roi_align_per_frame_plus_tpe_add(backend, tpe, output_size):
    check(backend, *make(2, 3, 7, 9, 8, 4, tpe=tpe), output_size=output_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned, sr, scale", [(False, -1, 1.0), (True, 2, 0.5), (False, 1, 0.25)])
def test_sampling_and_alignment(backend, aligned, sr, scale):
    check(backend, *make(1, 2, 5, 8, 9, 5, tpe="sinusoidal", scale=scale, max_size=9.0), output_size=(2, 2),
          scale=scale, sr=sr, aligned=aligned)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_valid_mask_zero_token_and_no_gradient(backend):
    f, boxes, valid, ts, table = make(2, 3, 6, 7, 7, 4, tpe="learned", valid=True)
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.full_like(boxes, float("nan")))  # absent: garbage boxes
    out = check(backend, f, boxes, valid, ts, table, output_size=(1, 1))
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))  # no TPE either
    # gradient from an absent region only: nothing reaches the features or the table
    f.grad = None
    table.grad = None
    out2 = region_pool(f, boxes, valid=valid, timestamps=ts, table=table, backend=backend)
    (out2 * (~valid).unsqueeze(-1)).sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    assert torch.equal(table.grad, torch.zeros_like(table))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_features(backend):
    # [B, T, H, W, C] (vision tokens as a grid) with channels_last=True, and the same memory as a
    # strided [B, T, C, H, W] view: both read in place.
    f, boxes, valid, ts, table = make(2, 2, 6, 5, 7, 3, tpe="learned")
    check(backend, f.detach().clone().requires_grad_(True), boxes, valid, ts, table, output_size=(2, 2),
          channels_last=True)
    base = torch.randn(2, 2, 5, 7, 6)
    view = base.permute(0, 1, 4, 2, 3).requires_grad_(False)
    out = region_pool(view, boxes, output_size=(2, 2), backend=backend)
    ref = composition(view.double(), boxes.double(), None, None, None, (2, 2), 1.0, -1, True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if backend != "eager":
        fv = base.clone().permute(0, 1, 4, 2, 3).requires_grad_(True)
        region_pool(fv, boxes, backend=backend).sum().backward()
        assert fv.grad.stride() == fv.stride()  # the gradient keeps the channels-last layout


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    big = torch.randn(2, 6, 5, 9, 10)
    f = big[:, ::2, :, 1:, ::2].detach().requires_grad_(True)  # strided frames, rows, columns
    _, boxes, _, ts, table = make(2, 3, 5, 8, 5, 3, tpe="learned")
    boxes = boxes.transpose(0, 1).contiguous().transpose(0, 1)
    ts = ts.t().contiguous().t()
    assert not f.is_contiguous() and not boxes.is_contiguous()
    check(backend, f, boxes, None, ts, table, output_size=(2, 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_with_fp32_accumulation(backend):
    f, boxes, valid, ts, table = make(2, 2, 16, 6, 6, 3, tpe="learned", dtype=torch.bfloat16, valid=True)
    check(backend, f, boxes, valid, ts, table, output_size=(1, 1), tol=dict(atol=3e-2, rtol=1.6e-2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 5, 5, 2), (2, 0, 3, 5, 5, 2), (2, 2, 3, 5, 5, 0)], ids=["B0", "T0", "R0"])
def test_empty(backend, shape):
    f, boxes, valid, ts, table = make(*shape, tpe="learned", valid=True)
    out = region_pool(f, boxes, valid=valid, timestamps=ts, table=table, backend=backend)
    assert out.shape == (shape[0], shape[1], shape[5], shape[2])
    out.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    assert torch.equal(table.grad, torch.zeros_like(table))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # nan boxes under the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_box_pools_zero_plus_tpe(backend):
    f, boxes, _, ts, table = make(1, 2, 4, 6, 6, 3, tpe="learned")
    boxes = boxes.clone()
    boxes[0, 1, 2, 0] = float("nan")
    boxes[0, 0, 1, 3] = float("inf")
    out = region_pool(f, boxes, timestamps=ts, table=table, backend=backend)
    torch.testing.assert_close(out[0, 1, 2], table[ts[0, 1]].detach())
    torch.testing.assert_close(out[0, 0, 1], table[ts[0, 0]].detach())
    (out[0, 1, 2].sum() + out[0, 0, 1].sum()).backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_fp64(backend):
    f, boxes, valid, ts, table = make(1, 2, 2, 5, 5, 2, tpe="learned", valid=True, dtype=torch.float64)
    table = table.detach().double().requires_grad_(True)
    boxes = boxes.double()

    def fn(f, table):
        return region_pool(f, boxes, output_size=(2, 1), valid=valid, timestamps=ts, table=table, backend=backend)

    assert torch.autograd.gradcheck(fn, (f, table), fast_mode=backend == "triton")


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    f, boxes, valid, ts, table = make(1, 2, 3, 5, 6, 2, tpe="learned", valid=True)
    op = getattr(torch.ops.rgpt4d, "region_pool" + suffix).default
    torch.library.opcheck(op, (f, boxes, valid, ts, table, 1.0, 1, 2, -1, True, 10000.0))
    secs = torch.rand(1, 2)
    torch.library.opcheck(op, (f, boxes, None, secs, None, 0.5, 1, 1, 2, False, 500.0))
    bwd = getattr(torch.ops.rgpt4d, "region_pool_backward" + suffix).default
    g = torch.randn(1, 2, 2, 3, 1, 2)
    torch.library.opcheck(bwd, (g, boxes, valid, 1.0, 1, 2, -1, True, 5, 6, False, True))
    torch.library.opcheck(bwd, (g, boxes, None, 1.0, 1, 2, -1, True, 5, 6, True, False))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    f, boxes, valid, ts, table = make(2, 2, 4, 6, 6, 3, tpe="learned", valid=True)
    m = RegionPool(output_size=(1, 1), backend=backend)

    @torch.compile(fullgraph=True)
    def step(f, boxes, valid, ts, table):
        return (m(f, boxes, valid, ts, table) * 2.0).sum()

    loss = step(f, boxes, valid, ts, table)
    loss.backward()
    fr = f.detach().clone().requires_grad_(True)
    tr = table.detach().clone().requires_grad_(True)
    ref = (region_pool_eager(fr, boxes, valid=valid, timestamps=ts, table=tr) * 2.0).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(f.grad, fr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.grad, tr.grad, atol=1e-5, rtol=1e-5)


def test_cpu_backward_is_bitwise_independent_of_the_thread_count():
    # big enough for the parallel path (small problems run serially)
    f, boxes, valid, ts, table = make(2, 3, 48, 9, 9, 12, tpe="learned", rows=2, max_size=9.0)
    out = region_pool(f, boxes, output_size=(2, 2), timestamps=ts, table=table, backend="cpu")
    g = torch.randn_like(out)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(out, (f, table), g, retain_graph=True))
    finally:
        torch.set_num_threads(threads)
    for gi in grads[1:]:
        assert torch.equal(grads[0][0], gi[0]) and torch.equal(grads[0][1], gi[1])


def test_triton_deterministic_backward():
    f, boxes, valid, ts, table = make(1, 2, 8, 6, 6, 3, tpe="learned", rows=2, max_size=5.0)
    out = region_pool(f, boxes, sampling_ratio=2, timestamps=ts, table=table, backend="triton")
    g = torch.randn_like(out)
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.autograd.grad(out, (f, table), g, retain_graph=True)
        b = torch.autograd.grad(out, (f, table), g, retain_graph=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref = oracle(f, boxes, None, ts, table, g, output_size=(1, 1), scale=1.0, sr=2, aligned=True)
    torch.testing.assert_close(a[0].double(), ref[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_frozen_features_get_no_gradient_work(backend):
    f, boxes, valid, ts, table = make(1, 2, 4, 5, 5, 2, tpe="learned")
    f.requires_grad_(False)
    out = region_pool(f, boxes, timestamps=ts, table=table, backend=backend)
    name = "rgpt4d::region_pool_backward" + ("_triton" if backend == "triton" else "")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    assert name not in {e.name for e in prof.events()}
    assert table.grad is not None


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    f = torch.randn(2, 3, 4, 5, 5)
    boxes = torch.rand(2, 3, 2, 4) * 4
    ts = torch.randint(0, 5, (2, 3))
    table = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"boxes must be \[B, T, R, 4\] = \[2, 3, R, 4\]"):
        region_pool(f, torch.rand(2, 3, 2, 5), backend=backend)
    with pytest.raises(ValueError, match=r"boxes must be \[B, T, R, 4\]"):
        region_pool(f, torch.rand(2, 2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"valid must be \[B, T, R\] = \[2, 3, 2\]"):
        region_pool(f, boxes, valid=torch.ones(2, 3, 3, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        region_pool(f, boxes, valid=torch.ones(2, 3, 2), backend=backend)
    with pytest.raises(ValueError, match=r"features must be \[B, T, C, H, W\]"):
        region_pool(torch.randn(2, 4, 5, 5), boxes, backend=backend)
    with pytest.raises(ValueError, match=r"timestamps must be \[B, T\] = \[2, 3\]"):
        region_pool(f, boxes, timestamps=torch.rand(2, 4), backend=backend)
    with pytest.raises(IndexError, match=r"timestamps must index rows of table in \[0, 5\)"):
        region_pool(f, boxes, timestamps=ts + 3, table=table, backend=backend)
    with pytest.raises(ValueError, match=r"table must be \[L, C\] with C = 4"):
        region_pool(f, boxes, timestamps=ts, table=torch.randn(5, 3), backend=backend)
    with pytest.raises(ValueError, match="output_size must be"):
        region_pool(f, boxes, output_size=(1, 0), backend=backend)
    with pytest.raises(ValueError, match=r"with channels_last=True, features must be \[B, T, H, W, C\]"):
        region_pool(torch.randn(2, 5, 5, 4), boxes, channels_last=True, backend=backend)


def test_cpu_kernel_rejects_bad_table_rows_even_without_validation():
    f = torch.randn(1, 2, 4, 5, 5)
    with pytest.raises(RuntimeError, match=r"timestamps must index rows of table in \[0, 3\)"):
        region_pool(f, torch.rand(1, 2, 2, 4) * 4, timestamps=torch.tensor([[0, 7]]), table=torch.randn(3, 4),
                    backend="cpu", validate=False)


# ---- hypothesis -------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 2), T=st.integers(0, 3), C=st.integers(1, 6), H=st.integers(1, 8), W=st.integers(1, 8),
       R=st.integers(0, 4), ph=st.integers(1, 3), pw=st.integers(1, 3), tpe=st.sampled_from(["none", "sinusoidal",
                                                                                             "learned"]),
       valid=st.booleans(), aligned=st.booleans(), sr=st.sampled_from([-1, 1, 2]),
       backend=st.sampled_from(["eager", "cpu", "cpu", "triton"]), seed=st.integers(0, 2**16))
def test_fuzz(B, T, C, H, W, R, ph, pw, tpe, valid, aligned, sr, backend, seed):
    torch.manual_seed(seed)
    check(backend, *make(B, T, C, H, W, R, tpe=tpe, valid=valid), output_size=(ph, pw), sr=sr, aligned=aligned)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("output_size", [(1, 1), (2, 2)], ids=["1x1", "2x2"])
def test_gpu_4d_rgpt_shape(backend, dtype, output_size):
    f, boxes, valid, ts, table = make(2, 16, 1152, 27, 27, 8, tpe="learned", valid=True, dtype=dtype, device="cuda",
                                      max_size=14.0)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    check(backend, f, boxes, valid, ts, table, output_size=output_size, tol=tol)


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_backward(backend):
    f, boxes, valid, ts, table = make(2, 4, 64, 20, 20, 16, tpe="learned", rows=3, device="cuda", max_size=12.0)
    out = region_pool(f, boxes, output_size=(2, 2), timestamps=ts, table=table, backend=backend)
    g = torch.randn_like(out)
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.autograd.grad(out, (f, table), g, retain_graph=True)
        b = torch.autograd.grad(out, (f, table), g, retain_graph=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
