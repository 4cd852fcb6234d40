"""Every op family on a GPU, both compiled backends (cuda, triton), against the eager op in float64.

Coverage: fp32, bf16, fp16 and fp64 inputs; non-contiguous and channels-last inputs; in-place
tpe_add_; deterministic mode checked for values; torch.compile of a module calling the ops on each
backend; a tensor on cuda:1 when a second GPU exists; the Triton kernels compiled, not interpreted.
`make gpu-check` runs these (pytest -m gpu). Without a GPU they skip, except test_cases_on_cpu, which
runs the same cases on the CPU backend here so the harness itself is checked.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import rgpt4d.ops as ops
from tests.conftest import HAS_GPU, requires_gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# max |out - ref| / max |ref| (outputs and gradients), ref = the eager op on float64 copies of the
# same (already rounded) inputs. fp64 at 1e-9: a float argument rounded to fp32 (eps, log(base))
# moves the sinusoid encodings by ~1e-7 and fails it.
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-9}


def _noncontig(x):
    """Same values, last two dims transposed in memory (a non-contiguous view)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _channels_last(x):
    """[..., C, H, W] with C innermost in memory."""
    d = x.dim()
    perm = list(range(d - 3)) + [d - 2, d - 1, d - 3]
    inv = list(range(d - 3)) + [d - 1, d - 3, d - 2]
    return x.permute(perm).contiguous().permute(inv)


def _layout(x, layout):
    return {"contiguous": lambda t: t.contiguous(), "noncontig": _noncontig, "channels_last": _channels_last}[layout](x)


# ---- the cases: build(dtype, device, layout) -> (run(backend, tensors) -> output, tensors, grad_idx) ------
# `tensors` are the inputs (float ones in `dtype`); grad_idx: which of them get gradients.

def _tpe_add(dtype, device, layout, learned=False):
    g = torch.Generator().manual_seed(1)
    x = _layout(torch.randn(2, 3, 7, 33, generator=g).to(device, dtype), layout)
    if learned:
        table = torch.randn(5, 33, generator=g).to(device, dtype)
        rows = torch.randint(0, 5, (2, 3), generator=g).to(device)
        return (lambda be, t: ops.tpe_add(t[0], rows, t[1], backend=be)), [x, table], [0, 1]
    secs = (torch.rand(2, 3, generator=g) * 30).to(device)
    return (lambda be, t: ops.tpe_add(t[0], secs.to(t[0].dtype if t[0].dtype == torch.float64 else torch.float32),
                                      backend=be)), [x], [0]


def _tpe_ds_ln(dtype, device, layout):
    g = torch.Generator().manual_seed(2)
    x = _layout(torch.randn(2, 2, 35, 40, generator=g).to(device, dtype), layout)
    w = (1 + 0.1 * torch.randn(360, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(360, generator=g)).to(device, dtype)
    secs = (torch.rand(2, 2, generator=g) * 30).to(device)
    return (lambda be, t: ops.tpe_downsample_layernorm(t[0], secs.to(torch.float64 if t[0].dtype == torch.float64
                                                                       else torch.float32), None, t[1], t[2],
                                                       grid=(5, 7), window=3, backend=be)), [x, w, b], [0, 1, 2]


def _boxes(g, B, T, R, H, W):
    xy = torch.rand(B, T, R, 2, generator=g) * (max(H, W) + 4) - 2
    wh = torch.rand(B, T, R, 2, generator=g) * max(H, W) / 2 + 0.5
    return torch.cat([xy, xy + wh], -1)


def _roi_align(dtype, device, layout):
    g = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(2, 16, 20, 24, generator=g).to(device, dtype), layout)
    b = _boxes(g, 1, 2, 9, 40, 48).view(18, 4)
    rois = torch.cat([torch.arange(2).repeat_interleave(9)[:, None].float(), b], 1).to(device, dtype)
    return (lambda be, t: ops.roi_align(t[0], rois.to(t[0].dtype), (3, 3), 0.5, 2, True, backend=be)), [x], [0]


def _region_pool(dtype, device, layout):
    g = torch.Generator().manual_seed(4)
    f = _layout(torch.randn(2, 3, 16, 12, 14, generator=g).to(device, dtype), layout)
    boxes = _boxes(g, 2, 3, 5, 12, 14).to(device)
    valid = (torch.rand(2, 3, 5, generator=g) > 0.3).to(device)
    secs = (torch.rand(2, 3, generator=g) * 20).to(device)
    return (lambda be, t: ops.region_pool(t[0], boxes.to(t[0].dtype), output_size=(2, 2), sampling_ratio=2,
                                          valid=valid, timestamps=secs.to(torch.float64 if t[0].dtype == torch.float64
                                                                          else torch.float32), backend=be)), [f], [0]


def _mask_pool(dtype, device, layout):
    g = torch.Generator().manual_seed(5)
    f = _layout(torch.randn(2, 3, 16, 9, 11, generator=g).to(device, dtype), layout)
    m = torch.rand(2, 3, 4, 30, 26, generator=g).to(device, dtype)
    return (lambda be, t: ops.mask_pool(t[0], t[1], backend=be)), [f, m], [0, 1]


def _p4d_loss(dtype, device, layout):
    g = torch.Generator().manual_seed(6)
    lat, lat_t = (torch.randn(2, 10, 24, generator=g).to(device, dtype) for _ in range(2))
    d, d_t = ((torch.rand(2, 3, 1, 9, 11, generator=g) + 0.1).to(device, dtype) for _ in range(2))
    f, f_t = (torch.randn(2, 3, 2, 9, 11, generator=g).to(device, dtype) for _ in range(2))
    mask = (torch.rand(2, 3, 1, 9, 11, generator=g) > 0.2).to(device)
    d, f = _layout(d, layout), _layout(f, layout)

    def run(be, t):
        return ops.p4d_loss(t[0], lat_t.to(t[0].dtype), {"depth": t[1], "flow": t[2]},
                            {"depth": d_t.to(t[0].dtype), "flow": f_t.to(t[0].dtype)}, preset="code",
                            masks={"depth": mask}, backend=be).total
    return run, [lat, d, f], [0, 1, 2]


def _linear_latent(dtype, device, layout):
    g = torch.Generator().manual_seed(7)
    h = _layout(torch.randn(37, 48, generator=g).to(device, dtype), layout)
    w = (torch.randn(24, 48, generator=g) / 7).to(device, dtype)
    b = (0.1 * torch.randn(24, generator=g)).to(device, dtype)
    tg = torch.randn(37, 24, generator=g).to(device, dtype)
    return (lambda be, t: ops.fused_linear_latent_loss(t[0], t[1], t[2], tg.to(t[0].dtype), chunk_size=16,
                                                       backend=be)), [h, w, b], [0, 1, 2]


def _cross_entropy(dtype, device, layout):
    g = torch.Generator().manual_seed(8)
    h = _layout(torch.randn(37, 48, generator=g).to(device, dtype), layout)
    w = (torch.randn(100, 48, generator=g) / 7).to(device, dtype)
    tg = torch.randint(0, 100, (37,), generator=g)
    tg[::5] = -100
    tg = tg.to(device)
    return (lambda be, t: ops.fused_linear_cross_entropy(t[0], t[1], tg, chunk_size=16, backend=be)), [h, w], [0, 1]


def _rms_norm(dtype, device, layout):
    g = torch.Generator().manual_seed(9)
    x = _layout(torch.randn(37, 96, generator=g).to(device, dtype), layout)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(device, dtype)
    return (lambda be, t: ops.rms_norm(t[0], t[1], backend=be)), [x, w], [0, 1]


def _swiglu(dtype, device, layout):
    g = torch.Generator().manual_seed(10)
    a, b = (_layout(torch.randn(37, 96, generator=g).to(device, dtype), layout) for _ in range(2))
    return (lambda be, t: ops.swiglu(t[0], t[1], backend=be)), [a, b], [0, 1]


def _rope(dtype, device, layout):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 9, 4, 16, generator=g).to(device, dtype).transpose(1, 2)  # the attention's view
    k = torch.randn(2, 9, 2, 16, generator=g).to(device, dtype).transpose(1, 2)
    ang = torch.randn(2, 9, 8, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(device, dtype), torch.cat([ang.sin()] * 2, -1).to(device, dtype)

    def run(be, t):
        qo, ko = ops.rope(t[0], t[1], cos.to(t[0].dtype), sin.to(t[0].dtype), backend=be)
        return torch.cat([qo.flatten(), ko.flatten()])
    return run, [q, k], [0, 1]


def _pixel_shuffle(dtype, device, layout):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 12, 5, 6, generator=g).to(device, dtype)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else _layout(x, layout)
    return (lambda be, t: ops.pixel_shuffle_act(t[0], 2, "exp", backend=be)), [x], [0]


# (name, builder, layouts beyond "contiguous", fp64 tolerance override)
CASES = [
    ("tpe_add[sin]", _tpe_add, ["noncontig"], None),
    ("tpe_add[learned]", lambda d, dev, l: _tpe_add(d, dev, l, learned=True), [], None),
    ("tpe_downsample_layernorm", _tpe_ds_ln, ["noncontig"], None),
    ("roi_align", _roi_align, ["channels_last"], None),
    ("region_pool", _region_pool, ["channels_last"], None),
    ("mask_pool", _mask_pool, ["channels_last"], None),
    ("p4d_loss", _p4d_loss, ["noncontig"], None),
    ("fused_linear_latent_loss", _linear_latent, ["noncontig"], None),
    ("fused_linear_cross_entropy", _cross_entropy, ["noncontig"], None),
    ("rms_norm", _rms_norm, ["noncontig"], None),
    ("swiglu", _swiglu, ["noncontig"], None),
    ("rope", _rope, [], None),
    ("pixel_shuffle_act", _pixel_shuffle, ["channels_last"], None),
]
# the ops whose backward sums (atomics on the fast path, an ordered path in deterministic mode)
DETERMINISTIC = ("tpe_add[learned]", "roi_align", "region_pool", "mask_pool", "p4d_loss")
PARAMS = [(name, build, layout, tol64) for name, build, extra, tol64 in CASES for layout in ["contiguous"] + extra]


def _rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def check_case(build, dtype, device, layout, backend, tol64=None, deterministic=False):
    """Outputs and gradients of `backend` against the eager op on float64 copies of the inputs. With
    deterministic=True the backend runs twice under torch.use_deterministic_algorithms(True) and
    must repeat itself bitwise (the float64 reference runs outside that mode)."""
    run, tensors, grad_idx = build(dtype, device, layout)

    def ours():
        leaves = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(tensors)]  # same strides
        out = run(backend, leaves)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        return out, torch.autograd.grad(out, [leaves[i] for i in grad_idx], gout.to(out.dtype)), gout

    if deterministic:
        torch.use_deterministic_algorithms(True)
        try:
            (out, grads, gout), (out2, grads2, _) = ours(), ours()
        finally:
            torch.use_deterministic_algorithms(False)
        assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), \
            f"{backend}: two runs in deterministic mode differ"
    else:
        out, grads, gout = ours()
    ref_leaves = [t.detach().double().requires_grad_(i in grad_idx) for i, t in enumerate(tensors)]
    ref = run("eager", ref_leaves)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in grad_idx], gout)
    tol = TOL[dtype] if not (dtype == torch.float64 and tol64) else tol64
    err = _rel_err(out, ref)
    assert err <= tol, f"{backend} {dtype} {layout}: output off by {err:.3g} (relative to max |ref|), tolerance {tol}"
    for i, a, r in zip(grad_idx, grads, ref_grads):
        err = _rel_err(a, r)
        gtol = tol * (5 if dtype in (torch.bfloat16, torch.float16) else 10)
        assert err <= gtol, f"{backend} {dtype} {layout}: gradient of input {i} off by {err:.3g}, tolerance {gtol}"


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,build,layout,tol64", PARAMS, ids=[f"{p[0]}-{p[2]}" for p in PARAMS])
def test_gpu_matches_float64_eager(name, build, layout, tol64, dtype, backend):
    if layout != "contiguous" and dtype not in (torch.float32, torch.bfloat16):
        pytest.skip("layouts are checked in fp32 and bf16 (each dtype compiles its own Triton kernels)")
    check_case(build, dtype, "cuda", layout, backend, tol64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,build,layout,tol64", PARAMS, ids=[f"{p[0]}-{p[2]}" for p in PARAMS])
def test_cases_on_cpu(name, build, layout, tol64, dtype):
    # the GPU test's harness and cases, run here on the compiled CPU backend
    if "cpu" not in ops.available_backends():
        pytest.skip("the compiled CPU backend is not built")
    check_case(build, dtype, "cpu", layout, "cpu", tol64)


# ---- compiled Triton, not the interpreter -----------------------------------------------------

@requires_gpu
def test_gpu_triton_kernels_are_compiled_not_interpreted():
    import triton

    from rgpt4d.kernels import heads, lm, p4d, regional, tpe

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "TRITON_INTERPRET=1 on a GPU machine"
    interpreted = []
    for mod in (tpe, p4d, regional, lm, heads):
        for name in dir(mod):
            if type(getattr(mod, name)).__name__ == "InterpretedFunction":
                interpreted.append(f"{mod.__name__}.{name}")
        assert any(isinstance(getattr(mod, n), triton.runtime.JITFunction) for n in dir(mod)), mod.__name__
    assert not interpreted, f"Triton kernels under the interpreter: {interpreted}"
    x = torch.randn(2, 3, 5, 8, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.tpe_add(x, torch.rand(2, 3, device="cuda"), backend="triton")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("_tpe_add_kernel" in n for n in names), f"no compiled Triton kernel ran on the GPU: {names[:20]}"


# ---- in place, deterministic, torch.compile, a second GPU, large D ---------------------------

@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontig"])
def test_gpu_tpe_add_in_place(backend, dtype, contiguous):
    x = torch.randn(2, 3, 7, 33, device="cuda").to(dtype)
    x = x if contiguous else _noncontig(x)
    secs = torch.rand(2, 3, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 30
    ref = ops.tpe_add(x.double(), secs.double(), backend="eager")
    ptr, strides = x.data_ptr(), x.stride()
    with torch.no_grad():
        y = ops.tpe_add_(x, secs, backend=backend)
    assert y is x and x.data_ptr() == ptr and x.stride() == strides
    assert _rel_err(x, ref) <= TOL[dtype]


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name,build", [c[:2] for c in CASES if c[0] in DETERMINISTIC],
                         ids=[c[0] for c in CASES if c[0] in DETERMINISTIC])
def test_gpu_deterministic_mode_values(name, build, backend):
    # under torch.use_deterministic_algorithms(True) the gradients that sum (table rows, the RoI and
    # mask-pool backward, p4d's partial sums) take their ordered paths: equal to float64 within
    # tolerance, and bitwise repeatable
    check_case(build, torch.float32, "cuda", "contiguous", backend, deterministic=True)


class _Block(torch.nn.Module):
    """A few ops in a row, as a model calls them."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.w = torch.nn.Parameter(1 + 0.1 * torch.randn(64))

    def forward(self, x, secs):
        y = ops.tpe_add(x, secs, backend=self.backend)
        y = ops.rms_norm(y.flatten(0, 2), self.w, backend=self.backend)
        return ops.swiglu(y, y, backend=self.backend).sum()


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_torch_compile(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 5, 64, device="cuda", requires_grad=True)
    secs = torch.rand(2, 3, device="cuda") * 30
    m = _Block(backend).cuda()
    ref_m = _Block("eager").cuda().double()
    ref_m.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    out = torch.compile(m, fullgraph=True)(x, secs)
    ref = ref_m(x.detach().double().requires_grad_(True), secs.double())
    assert _rel_err(out, ref) <= 1e-4
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and m.w.grad is not None


@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name,build,layout,tol64", [p for p in PARAMS if p[2] == "contiguous"],
                         ids=[p[0] for p in PARAMS if p[2] == "contiguous"])
def test_gpu_second_device(name, build, layout, tol64, backend):
    # the current device stays cuda:0: every launch must follow its tensors to cuda:1
    assert torch.cuda.current_device() == 0
    check_case(build, torch.float32, "cuda:1", layout, backend)
    torch.cuda.synchronize(1)


@requires_gpu
@pytest.mark.parametrize("D", [12256, 12288])
def test_gpu_tpe_cuda_large_channel_count(D):
    # the CUDA TPE kernels keep a frame's encoding in shared memory next to a static scratch array:
    # fp32 12257 <= D <= 12288 needs more than the 48 KiB default: these sizes check that it launches
    x = torch.randn(1, 2, 9, D, device="cuda")
    secs = torch.rand(1, 2, device="cuda") * 30
    out = ops.tpe_downsample_layernorm(x, secs, grid=(3, 3), window=3, backend="cuda")
    ref = ops.tpe_downsample_layernorm(x.double(), secs.double(), grid=(3, 3), window=3, backend="eager")
    assert _rel_err(out, ref) <= 1e-4
    assert math.isfinite(_rel_err(ops.tpe_add(x, secs, backend="cuda"), ops.tpe_add(x.double(), secs.double(),
                                                                                     backend="eager")))
