"""pixel_shuffle_act: every CPU backend against float64 F.pixel_shuffle (+ exp(clamp(max))) for values
and gradients, channels-last and odd shapes, bf16, empty inputs, gradcheck, opcheck, compile."""

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.ops import pixel_shuffle_act, pixel_shuffle_act_eager
from tests.conftest import op_backends, requires_gpu, requires_model_stack

CPU_BACKENDS = op_backends("pixel_shuffle_act")
GPU_BACKENDS = op_backends("pixel_shuffle_act", device="cuda")


def ref(x, r, activation, clamp_max=20.0):
    y = F.pixel_shuffle(x, r)
    return torch.exp(y.clamp(max=clamp_max)) if activation == "exp" else y


def make(N=3, C=2, r=4, H=5, W=7, dtype=torch.float32, channels_last=False, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(N, C * r * r, H, W, generator=g)).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def check(backend, x, r, activation, clamp_max=20.0, rtol=1e-6):
    y = pixel_shuffle_act(x, r, activation, clamp_max, backend=backend)
    x64 = x.detach().double().requires_grad_(True)
    yr = ref(x64, r, activation, clamp_max)
    assert y.shape == yr.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), yr.detach(), rtol=rtol, atol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    (gr,) = torch.autograd.grad(yr, x64, g)
    assert gx.shape == x.shape
    torch.testing.assert_close(gx.double(), gr, rtol=rtol * 10, atol=rtol * 10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["none", "exp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_pixel_shuffle_act(backend, activation, channels_last):
    check(backend, make(channels_last=channels_last), 4, activation, rtol=1e-5)
    check(backend, make(N=1, C=1, r=1, H=1, W=1, channels_last=channels_last), 1, activation, rtol=1e-5)
    check(backend, make(N=2, C=3, r=2, H=9, W=4, channels_last=channels_last), 2, activation, rtol=1e-5)
    # every upscale the CPU kernel specialises (2, 4, 8) and a generic one (3, 5)
    check(backend, make(N=2, C=2, r=8, H=3, W=2, channels_last=channels_last), 8, activation, rtol=1e-5)
    check(backend, make(N=1, C=2, r=5, H=2, W=3, channels_last=channels_last), 5, activation, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_clamp_fp64_bf16(backend):
    # the channels-last path (the heads' layout; the CPU kernel's slab loop): clamped values, odd
    # sizes, several slabs per thread, float64 and bf16
    x = make(N=2, C=3, r=2, H=5, W=3, scale=15.0, channels_last=True)
    check(backend, x, 2, "exp", clamp_max=20.0, rtol=1e-5)
    check(backend, make(N=3, C=1, r=3, H=4, W=5, scale=3.0, channels_last=True), 3, "exp", clamp_max=1.5, rtol=1e-5)
    check(backend, make(N=2, C=2, r=2, H=3, W=3, dtype=torch.float64, channels_last=True), 2, "exp", rtol=1e-12)
    xb = make(N=2, C=2, r=2, H=3, W=5, dtype=torch.bfloat16, channels_last=True)
    xe = xb.detach().float().requires_grad_(True)
    yb, ye = pixel_shuffle_act(xb, 2, "exp", backend=backend), pixel_shuffle_act_eager(xe, 2, "exp")
    torch.testing.assert_close(yb.float(), ye, rtol=1e-2, atol=1e-2)
    g = torch.randn(ye.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.autograd.grad(yb, xb, g.bfloat16())[0].float(),
                               torch.autograd.grad(ye, xe, g)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exp_clamp_region_fp64_bf16_empty(backend):
    x = make(r=2, scale=15.0)  # values beyond the clamp: zero gradient there, exp(20) value
    check(backend, x, 2, "exp", clamp_max=20.0, rtol=1e-5)
    check(backend, make(r=2, scale=3.0), 2, "exp", clamp_max=1.5, rtol=1e-5)
    check(backend, make(r=2, dtype=torch.float64), 2, "exp", rtol=1e-12)
    xb = make(r=2, dtype=torch.bfloat16)
    torch.testing.assert_close(pixel_shuffle_act(xb, 2, "exp", backend=backend).float(),
                               pixel_shuffle_act_eager(xb, 2, "exp").float(), rtol=1e-2, atol=1e-2)
    xe = torch.randn(0, 8, 3, 3, requires_grad=True)
    y = pixel_shuffle_act(xe, 2, backend=backend)
    assert y.shape == (0, 2, 6, 6)
    if backend != "eager":  # (torch's own PixelShuffleBackward0 rejects an empty batch)
        assert torch.autograd.grad(y.sum(), xe)[0].shape == xe.shape


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_opcheck_compile(backend):
    x = make(N=1, C=1, r=2, H=2, W=3, dtype=torch.float64)
    for act in ("none", "exp"):
        assert torch.autograd.gradcheck(lambda x: pixel_shuffle_act(x, 2, act, 0.5, backend=backend), (x,))
    suffix = "_triton" if backend == "triton" else ""
    x32 = make(N=2, C=2, r=2, H=3, W=3, channels_last=True)
    for act in (0, 1):
        torch.library.opcheck(getattr(torch.ops.rgpt4d, "pixel_shuffle_act" + suffix).default, (x32, 2, act, 20.0))
    torch.library.opcheck(getattr(torch.ops.rgpt4d, "pixel_shuffle_act_backward" + suffix).default,
                          (torch.randn(2, 2, 6, 6), x32.detach(), 2, 1, 20.0))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(x):
        return pixel_shuffle_act(x * 2, 2, "exp", backend=backend).sum()

    f(x32).backward()
    x64 = x32.detach().double().requires_grad_(True)
    ref(x64 * 2, 2, "exp").sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(backend):
    x = make(r=2)
    with pytest.raises(ValueError, match="multiple of upscale"):
        pixel_shuffle_act(x, 3, backend=backend)
    with pytest.raises(ValueError, match="activation must be one of"):
        pixel_shuffle_act(x, 2, "relu", backend=backend)
    with pytest.raises(ValueError, match="upscale must be a positive int"):
        pixel_shuffle_act(x, 0, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        pixel_shuffle_act(x.detach().long(), 2, backend=backend)


@requires_model_stack  # rgpt4d.models
def test_teacher_head_eager_backend_is_the_original_code():
    from rgpt4d.models.teacher import DPTHead
    from rgpt4d.ops import set_backend

    torch.manual_seed(0)
    head = DPTHead(16, 8, 1, 8, 2, "exp").eval()
    layers = [torch.randn(2, 2, 4, 4, 16) for _ in range(4)]
    set_backend("eager")
    try:
        out = head(layers)
    finally:
        set_backend(None)
    fused = head(layers)
    torch.testing.assert_close(fused, out, rtol=1e-6, atol=1e-6)


@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_pixel_shuffle_act(backend):
    check(backend, make(N=16, C=2, r=4, H=16, W=16, channels_last=True, device="cuda"), 4, "exp", rtol=1e-5)
