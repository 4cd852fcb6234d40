"""How kernels/regional.py launches its Triton kernels (checked on CPU, under the interpreter, by
recording every launch): host floats reach fp64 kernels as fp64 tensors (a Python float argument is
compiled as fp32 on a GPU), and every public entry point runs under the input's device."""

import pytest
import torch

from rgpt4d.kernels import regional as K
from rgpt4d.ops import mask_pool, region_pool, roi_align
from tests.ops.test_regional_roi_align import make_rois

HOST_FLOATS = {"spatial_scale", "log_base", "eps"}


class _Recorder:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel.fn.__name__, dict(zip(self.kernel.arg_names, args))))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    log = []
    for name in dir(K):
        obj = getattr(K, name)
        if name.endswith("_kernel") and hasattr(obj, "arg_names"):
            monkeypatch.setattr(K, name, _Recorder(obj, log))
    return log


def _run_all(dtype):
    x = torch.randn(1, 3, 6, 6, dtype=dtype, requires_grad=True)
    rois = make_rois(3, 1, 6, 6, max_size=4.0, dtype=dtype)
    out = roi_align(x, rois, 2, 0.5, 2, True, backend="triton")
    torch.autograd.grad(out, x, torch.ones_like(out))
    torch.use_deterministic_algorithms(True)
    try:
        torch.autograd.grad(roi_align(x, rois, 2, 0.5, 2, True, backend="triton"), x, torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(False)
    f = torch.randn(1, 2, 3, 4, 4, dtype=dtype, requires_grad=True)
    boxes = torch.tensor([[[[0.0, 0.0, 3.0, 3.0]], [[1.0, 1.0, 2.0, 3.0]]]], dtype=dtype)
    ts = torch.tensor([[0.0, 0.5]], dtype=dtype)
    region_pool(f, boxes, timestamps=ts, backend="triton").sum().backward()
    masks = torch.rand(1, 2, 2, 5, 5, dtype=dtype, requires_grad=True)
    mask_pool(f, masks, timestamps=ts, eps=1e-3, backend="triton").sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_floats_are_fp64_tensors_in_fp64_kernels(launches, dtype):
    _run_all(dtype)
    seen = set()
    for kernel, args in launches:
        for name in HOST_FLOATS & set(args):
            v = args[name]
            if dtype == torch.float64:
                assert isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.numel() == 1, (kernel, name, v)
            else:
                assert isinstance(v, float), (kernel, name, v)
            seen.add((kernel, name))
    assert {k for k, _ in seen} >= {"_roi_pool_fwd_kernel", "_roi_pool_bwd_atomic_kernel", "_roi_sample_counts_kernel",
                                    "_roi_entries_kernel", "_resize_masks_kernel", "_mask_pool_fwd_kernel"}
    assert {n for _, n in seen} == HOST_FLOATS


def test_every_entry_point_runs_under_the_input_device(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    class FakeCudaTensor:  # what the guard reads of its first argument
        is_cuda = True
        device = torch.device("cuda", 1)

    @K._device_guarded
    def launch(t):
        assert entered == [torch.device("cuda", 1)]  # inside the guard
        return "ran"

    assert launch(FakeCudaTensor()) == "ran" and entered[-1] == "exit"
    for name in ("roi_align_fwd", "roi_align_bwd", "region_pool_fwd", "region_pool_bwd", "mask_pool_fwd",
                 "mask_pool_bwd"):
        assert getattr(K, name).__wrapped__ is not None, name
