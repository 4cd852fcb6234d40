"""roi_align: every CPU backend against torchvision.ops.roi_align (the oracle): outputs and input
gradients in fp32 within 1e-5, over fixed cases and hypothesis-generated shapes and boxes."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align as tv_roi_align

from rgpt4d.ops import RoIAlign, roi_align, roi_align_eager
from tests.conftest import op_backends, requires_gpu

CPU_BACKENDS = op_backends("roi_align")
GPU_BACKENDS = op_backends("roi_align", device="cuda")

FP32 = dict(atol=1e-5, rtol=1e-5)


def make_rois(K, N, H, W, *, scale=1.0, lo=-4.0, extent=None, max_size=10.0, device="cpu", dtype=torch.float32,
              zero_size=0.0):
    """[K, 5] RoIs in box coordinates (map size / scale), some partly outside the map."""
    extent = extent or (max(H, W) / scale)
    b = torch.randint(0, max(N, 1), (K, 1)).float()
    xy = lo + torch.rand(K, 2) * (extent - lo)
    wh = torch.rand(K, 2) * max_size / scale
    if zero_size:
        wh = torch.where(torch.rand(K, 1) < zero_size, torch.zeros_like(wh), wh)
    return torch.cat([b, xy, xy + wh], 1).to(device=device, dtype=dtype)


def check_vs_torchvision(backend, x, rois, output_size, scale=1.0, sr=-1, aligned=False, tol=FP32):
    """Output and input gradient of rgpt4d's roi_align against torchvision's, same inputs."""
    xa = x.detach().clone().requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    out = roi_align(xa, rois, output_size, scale, sr, aligned, backend=backend)
    tv_rois = rois if isinstance(rois, torch.Tensor) else [r for r in rois]
    ref = tv_roi_align(xt, tv_rois, output_size, scale, sr, aligned)
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **tol)
    if ref.numel() == 0:
        return out
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xt.grad, **tol)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned, row", [(False, [7.5, 8.0, 8.5, 9.0]), (True, [4.5, 5.0, 5.5, 6.0])])
def test_known_values_5x5_arange(backend, aligned, row):
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = roi_align(x, torch.tensor([[0.0, 1.0, 1.0, 3.0, 3.0]]), (4, 4), 1.0, -1, aligned, backend=backend)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(row))


CASES = {  # name: (N, C, H, W, K, output_size, scale, sampling_ratio, box kwargs)
    "adaptive": (2, 3, 11, 13, 9, (3, 4), 1.0, -1, {}),
    "adaptive_zero_ratio": (2, 3, 11, 13, 9, (2, 2), 0.5, 0, {}),
    "ratio1": (1, 5, 9, 9, 7, (3, 3), 1.0, 1, {}),
    "ratio2_detectorlike": (2, 7, 16, 12, 12, (7, 7), 0.25, 2, {}),
    "large_boxes_adaptive": (1, 2, 8, 8, 5, (2, 2), 1.0, -1, dict(max_size=30.0, lo=-10.0)),
    "wholly_outside": (1, 2, 6, 6, 6, (2, 2), 1.0, -1, dict(lo=8.0, extent=20.0)),
    "zero_size": (2, 3, 7, 7, 8, (2, 3), 1.0, -1, dict(zero_size=1.0)),
    "some_zero_size_ratio2": (2, 3, 7, 7, 8, (2, 3), 1.0, 2, dict(zero_size=0.5)),
    "one_pixel_map": (1, 4, 1, 1, 4, (2, 2), 1.0, -1, dict(lo=-2.0, extent=3.0, max_size=2.0)),
    "odd_channels": (1, 33, 5, 6, 3, (1, 1), 1.0, -1, {}),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torchvision(backend, aligned, case):
    N, C, H, W, K, os_, scale, sr, kw = CASES[case]
    x = torch.randn(N, C, H, W)
    rois = make_rois(K, N, H, W, scale=scale, **kw)
    check_vs_torchvision(backend, x, rois, os_, scale, sr, aligned)


@pytest.mark.parametrize("case", ["patch_loop", "sparse_scalar_loop", "dense_banded_loop", "many_bands",
                                  "banded_vector_blocks", "banded_vector_blocks_odd"])
def test_cpu_planar_loops(case):
    # The CPU kernel reads planar maps with a dense weight patch per output cell (few taps per
    # pixel), a scalar gather per tap (few taps spread over big cells), or in cache-sized bands of
    # rows transposed on the fly (many taps per pixel); all against torchvision.
    if case == "patch_loop":
        x, rois = torch.randn(2, 5, 30, 31), make_rois(2, 2, 30, 31, max_size=2.0)
        args = ((2, 2), 1.0, -1, True)
    elif case == "sparse_scalar_loop":  # 2 x 2 samples per big cell: 16 taps over a ~25 x 25 patch
        x = torch.randn(2, 7, 30, 31)
        rois = torch.tensor([[0, 2.0, 3.0, 27.5, 26.0], [1, 0.5, 1.0, 30.0, 29.0], [1, 4.0, 2.0, 20.0, 27.0]])
        args = ((1, 1), 1.0, 2, False)
    elif case == "dense_banded_loop":
        x, rois = torch.randn(2, 9, 6, 7), make_rois(40, 2, 6, 7, max_size=8.0)
        args = ((4, 4), 1.0, 3, False)
    elif case == "many_bands":  # wide rows: one row per band, many bands, RoIs crossing band edges
        x, rois = torch.randn(1, 70, 24, 300), make_rois(80, 1, 24, 300, max_size=40.0)
        args = ((3, 5), 1.0, 3, True)
    elif case == "banded_vector_blocks":  # 64-channel slices, rows of whole 8-pixel blocks, 16 cells per RoI
        x, rois = torch.randn(2, 64, 20, 40), make_rois(150, 2, 20, 40, max_size=12.0)
        args = ((4, 4), 1.0, 3, False)
    else:  # slices and rows with vector blocks and a remainder, 15 cells per RoI
        x, rois = torch.randn(1, 75, 19, 37), make_rois(120, 1, 19, 37, max_size=12.0)
        args = ((3, 5), 1.0, 3, True)
    check_vs_torchvision("cpu", x, rois, *args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_input_and_gradient_layout(backend):
    x = torch.randn(2, 6, 9, 10).to(memory_format=torch.channels_last)
    rois = make_rois(7, 2, 9, 10)
    out = check_vs_torchvision(backend, x, rois, (3, 2), 1.0, -1, True)
    assert out.is_contiguous()
    xa = x.detach().clone().requires_grad_(True)
    roi_align(xa, rois, 2, backend=backend).sum().backward()
    if backend != "eager":  # like torchvision: the gradient keeps the input's memory format
        assert xa.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["channels_last", "planar"])
def test_cpu_tap_loops_over_vector_blocks(dtype, layout):
    # 45 channels: a 32-channel block, an 8-channel block and 5 single channels in the CPU tap
    # loops; large adaptive cells (many taps each) so the planar map goes through the bands
    torch.manual_seed(0)
    x = torch.randn(2, 45, 17, 19).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rois = make_rois(60, 2, 17, 19, max_size=14.0)
    out = roi_align(x, rois, (3, 4), 1.0, 0, True, backend="cpu")
    ref = tv_roi_align(x.double(), rois.double(), (3, 4), 1.0, 0, True)
    tol = dict(atol=1e-2, rtol=8e-3) if dtype == torch.bfloat16 else FP32
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_list_of_boxes_rois(backend):
    x = torch.randn(3, 4, 8, 8)
    boxes = [make_rois(k, 1, 8, 8)[:, 1:] for k in (2, 0, 3)]
    check_vs_torchvision(backend, x, boxes, (2, 2), 1.0, 2, False)
    m = RoIAlign((2, 2), 1.0, 2, backend=backend)
    torch.testing.assert_close(m(x, boxes), tv_roi_align(x, boxes, (2, 2), 1.0, 2, False), **FP32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend):
    base = torch.randn(8, 3, 12, 10)
    x = base[::2, :, 1:, ::2]  # strided batch, rows and columns
    assert not x.is_contiguous()
    rois = make_rois(6, 4, 11, 5)
    check_vs_torchvision(backend, x, rois, (2, 3), 1.0, -1, True)
    rois_nc = torch.cat([rois, rois], 1)[:, :5].t().contiguous().t()  # non-contiguous rois
    check_vs_torchvision(backend, x, rois_nc, (2, 3), 1.0, 2, False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 0), (0, 3, 5, 5, 0), (2, 0, 5, 5, 3)], ids=["K0", "N0", "C0"])
def test_empty(backend, shape):
    N, C, H, W, K = shape
    x = torch.randn(N, C, H, W, requires_grad=True)
    rois = make_rois(K, max(N, 1), H, W)
    out = roi_align(x, rois, (2, 3), backend=backend)
    assert out.shape == (K, C, 2, 3)
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_native_with_fp32_accumulation(backend):
    x = torch.randn(2, 16, 10, 9).to(torch.bfloat16).requires_grad_(True)
    rois = make_rois(6, 2, 10, 9)
    out = roi_align(x, rois, (3, 3), 1.0, -1, True, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = tv_roi_align(x.detach().double(), rois.double(), (3, 3), 1.0, -1, True)
    # one bf16 rounding of an fp32-accumulated value
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=8e-3)
    g = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16
    xr = x.detach().double().requires_grad_(True)
    tv_roi_align(xr, rois.double(), (3, 3), 1.0, -1, True).backward(g.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_and_fp64(backend):
    x = torch.randn(1, 5, 7, 7)
    rois = make_rois(4, 1, 7, 7)
    ref = tv_roi_align(x.double(), rois.double(), 2, 1.0, -1, False)
    out64 = roi_align(x.double(), rois.double(), 2, backend=backend)
    torch.testing.assert_close(out64, ref, atol=1e-12, rtol=1e-12)
    out16 = roi_align(x.half(), rois, 2, backend=backend)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), ref, atol=4e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # nan boxes under the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_boxes_give_zeros_and_no_gradient(backend):
    # Documented choice: a RoI with a nan/inf coordinate samples nothing (zeros, zero gradient).
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0], [1, float("nan"), 1.0, 4.0, 4.0], [0, 1.0, 1.0, float("inf"), 3.0],
                         [1, -float("inf"), 0.0, 2.0, 2.0]])
    out = roi_align(x, rois, (2, 2), 1.0, -1, False, backend=backend)
    torch.testing.assert_close(out[0], tv_roi_align(x.detach(), rois[:1], (2, 2), 1.0, -1, False)[0], **FP32)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    out[1:].sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_fp64(backend):
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = make_rois(4, 2, 6, 7, dtype=torch.float64)
    # fast mode (random projections) keeps the interpreted Triton kernels to a few calls
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, (2, 2), 1.0, 2, True, backend=backend), (x,),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_opcheck(suffix):
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    rois = make_rois(3, 2, 6, 7)
    op = getattr(torch.ops.rgpt4d, "roi_align" + suffix).default
    torch.library.opcheck(op, (x, rois, 1.0, 2, 3, -1, False))
    torch.library.opcheck(op, (x.detach().to(memory_format=torch.channels_last).requires_grad_(), rois, 0.5, 1, 2, 2,
                               True))
    bwd = getattr(torch.ops.rgpt4d, "roi_align_backward" + suffix).default
    g = torch.randn(3, 3, 1, 2)
    torch.library.opcheck(bwd, (g, rois, 1.0, 1, 2, -1, False, 2, 6, 7, False, True))
    torch.library.opcheck(bwd, (g, rois, 1.0, 1, 2, -1, False, 2, 6, 7, True, False))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    rois = make_rois(5, 2, 8, 8)

    @torch.compile(fullgraph=True)
    def f(x, rois):
        return (roi_align(x, rois, (2, 2), 0.5, -1, True, backend=backend) * 2.0).sum()

    loss = f(x, rois)
    loss.backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = (tv_roi_align(xr, rois, (2, 2), 0.5, -1, True) * 2.0).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, **FP32)


def test_cpu_backward_is_bitwise_independent_of_the_thread_count():
    x = torch.randn(2, 24, 12, 12, requires_grad=True)
    rois = make_rois(40, 2, 12, 12, max_size=8.0)  # many overlapping RoIs: the add order matters
    out = roi_align(x, rois, (3, 3), 1.0, -1, True, backend="cpu")
    g = torch.randn_like(out)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(out, x, g, retain_graph=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], gi) for gi in grads[1:])


def test_triton_deterministic_backward_without_atomics():
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    rois = make_rois(6, 2, 7, 7, max_size=6.0)
    out = roi_align(x, rois, (2, 2), 1.0, 2, False, backend="triton")
    g = torch.randn_like(out)
    atomic = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    torch.use_deterministic_algorithms(True)
    try:
        det = [torch.autograd.grad(out, x, g, retain_graph=True)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(det[0], det[1])
    xr = x.detach().clone().requires_grad_(True)
    tv_roi_align(xr, rois, (2, 2), 1.0, 2, False).backward(g)
    torch.testing.assert_close(det[0], xr.grad, **FP32)
    torch.testing.assert_close(atomic, xr.grad, **FP32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_grad_builds_no_graph(backend):
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with torch.no_grad():
        out = roi_align(x, make_rois(3, 1, 5, 5), 2, backend=backend)
    assert out.grad_fn is None and not out.requires_grad


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    x = torch.randn(2, 3, 5, 5)
    box = [1.0, 1.0, 3.0, 3.0]
    with pytest.raises(IndexError, match=r"batch index\) must be in \[0, N\) = \[0, 2\), got values in \[0, 2\]"):
        roi_align(x, torch.tensor([[0.0] + box, [2.0] + box]), 2, backend=backend)
    with pytest.raises(IndexError, match=r"batch index\) must be in \[0, N\)"):
        roi_align(x, torch.tensor([[-1.0] + box]), 2, backend=backend)
    with pytest.raises(IndexError, match=r"batch index"):
        roi_align(x, torch.tensor([[float("nan")] + box]), 2, backend=backend)
    with pytest.raises(AssertionError, match=r"boxes must be a Tensor\[K, 5\]"):  # as torchvision
        roi_align(x, torch.tensor([box]), 2, backend=backend)
    with pytest.raises(AssertionError, match=r"boxes\[1\] is not one \(shape \[2, 5\]\)"):
        roi_align(x, [torch.tensor([box]), torch.zeros(2, 5)], 2, backend=backend)
    with pytest.raises(ValueError, match=r"input must be \[N, C, H, W\]"):
        roi_align(torch.randn(3, 5, 5), torch.tensor([[0.0] + box]), 2, backend=backend)
    with pytest.raises(ValueError, match="output_size must be"):
        roi_align(x, torch.tensor([[0.0] + box]), (0, 2), backend=backend)
    with pytest.raises(TypeError, match="boxes must be a floating-point"):
        roi_align(x, torch.tensor([[0, 1, 1, 3, 3]]), 2, backend=backend)
    with pytest.raises(ValueError, match="boxes must be on the features' device"):
        roi_align(x, torch.zeros(1, 5, device="meta"), 2, backend=backend)


def test_cpu_kernel_rejects_bad_batch_index_even_without_validation():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"rois\[1, 0\] \(batch index\) must be in \[0, 2\)"):
        roi_align(x, torch.tensor([[0, 1.0, 1, 3, 3], [5, 1.0, 1, 3, 3]]), 2, backend="cpu", validate=False)
    with pytest.raises(RuntimeError, match="batch index"):
        torch.ops.rgpt4d.roi_align_backward(torch.randn(1, 3, 2, 2), torch.tensor([[-3, 1.0, 1, 3, 3]]), 1.0, 2, 2,
                                            -1, False, 2, 5, 5, False, True)


def test_triton_kernel_skips_bad_batch_index_without_validation():
    # memory-safe without the Python checks: an out-of-range RoI reads nothing (zeros)
    x = torch.randn(2, 3, 5, 5)
    out = roi_align(x, torch.tensor([[0, 1.0, 1, 3, 3], [7, 1.0, 1, 3, 3]]), 2, backend="triton", validate=False)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# ---- hypothesis -------------------------------------------------------------------------------

@st.composite
def roi_problems(draw, max_k=8):
    N = draw(st.integers(0, 3))
    C = draw(st.integers(1, 5))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    K = draw(st.integers(0, max_k)) if N > 0 else 0
    scale = draw(st.sampled_from([0.5, 1.0, 1.25]))
    coord = st.floats(-6.0, 18.0, allow_nan=False, width=32)
    size = st.one_of(st.just(0.0), st.floats(0.0, 16.0, width=32))
    rois = []
    for _ in range(K):
        x1, y1 = draw(coord), draw(coord)
        rois.append([float(draw(st.integers(0, N - 1))), x1, y1, x1 + draw(size), y1 + draw(size)])
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sr = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    return dict(N=N, C=C, H=H, W=W, rois=torch.tensor(rois, dtype=torch.float32).view(K, 5), scale=scale,
                output_size=(ph, pw), sr=sr, aligned=draw(st.booleans()), channels_last=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _fuzz(backend, p):
    torch.manual_seed(p["seed"])
    x = torch.randn(p["N"], p["C"], p["H"], p["W"])
    if p["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    check_vs_torchvision(backend, x, p["rois"], p["output_size"], p["scale"], p["sr"], p["aligned"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=roi_problems(), backend=st.sampled_from(["eager", "cpu"]))
def test_fuzz_eager_cpu_vs_torchvision(p, backend):
    _fuzz(backend, p)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=roi_problems(max_k=4))
def test_fuzz_triton_vs_torchvision(p):
    _fuzz("triton", p)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_matches_torchvision(backend, dtype, channels_last):
    x = torch.randn(2, 64, 50, 40, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rois = make_rois(300, 2, 50, 40, scale=0.5, max_size=40.0, device="cuda")
    xa = x.to(dtype).requires_grad_(True)
    out = roi_align(xa, rois, (7, 7), 0.5, -1, False, backend=backend)
    xt = x.clone().requires_grad_(True)
    ref = tv_roi_align(xt, rois, (7, 7), 0.5, -1, False)
    tol = FP32 if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    torch.testing.assert_close(xa.grad.float(), xt.grad, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32
                                                              else dict(atol=5e-2, rtol=5e-2)))


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_backward(backend):
    x = torch.randn(2, 32, 30, 30, device="cuda", requires_grad=True)
    rois = make_rois(200, 2, 30, 30, max_size=20.0, device="cuda")
    out = roi_align(x, rois, (7, 7), 1.0, 2, True, backend=backend)
    g = torch.randn_like(out)
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.autograd.grad(out, x, g, retain_graph=True)[0]
        b = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
    xr = x.detach().clone().requires_grad_(True)
    tv_roi_align(xr, rois, (7, 7), 1.0, 2, True).backward(g)
    torch.testing.assert_close(a, xr.grad, atol=1e-4, rtol=1e-4)
    # the sorted (deterministic) path against the atomic one and the float64 reference
    atomic = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    torch.testing.assert_close(a, atomic, atol=1e-5, rtol=1e-5)
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(roi_align_eager(x64, rois.double(), (7, 7), 1.0, 2, True), x64, g.double())[0]
    torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)


def test_eager_reference_is_exported():
    x = torch.randn(1, 2, 5, 5)
    rois = make_rois(3, 1, 5, 5)
    torch.testing.assert_close(roi_align_eager(x, rois, 2), tv_roi_align(x, rois, 2), **FP32)
