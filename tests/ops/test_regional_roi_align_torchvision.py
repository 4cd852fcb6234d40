"""rgpt4d.ops.roi_align / RoIAlign as a drop-in for torchvision.ops.roi_align / RoIAlign: what
torchvision's own TestRoIAlign (pytorch/vision test/test_ops.py) checks, written here for rgpt4d
(the reference below is this file's own loop), plus the same calls on torchvision's op side by side.

Checked, as torchvision's tests do: forward against a per-sample bilinear reference (fp16/fp32/fp64,
aligned or not, contiguous or not, deterministic mode on and off), the output dtype, gradcheck of the
function and of its torch.jit.script, a leaf under torch.fx (symbolic_trace and torchvision's
get_graph_node_names), AssertionError on a bad box shape, quantized inputs against the float op,
and torch.jit.script of a model holding RoIAlign called with a list of boxes.
Differences from torchvision (documented in roi_align's docstring): a scripted roi_align calls the
op through Python (cannot be saved with torch.jit.save); quantized input may hold several images.
"""

import inspect
import math

import pytest
import torch
from torch import Tensor, nn

from rgpt4d.ops import RoIAlign, roi_align
from tests.conftest import op_backends

CPU_BACKENDS = op_backends("roi_align")

tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed (requirements.txt installs it)")

ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]  # (batch, x1, y1, x2, y2)


class _Deterministic:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.saved)


def _bilinear(plane: Tensor, y: float, x: float) -> float:
    """One bilinear sample of a [H, W] plane as RoIAlign takes it: samples within one pixel of the
    border snap onto it; the four taps outside the plane count zero."""
    h, w = plane.shape
    if -1 < y <= 0:
        y = 0.0
    elif h - 1 <= y < h:
        y = float(h - 1)
    if -1 < x <= 0:
        x = 0.0
    elif w - 1 <= x < w:
        x = float(w - 1)
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = y - y0, x - x0
    val = 0.0
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                val += wy * wx * float(plane[yy, xx])
    return val


def reference_roi_align(x: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=False) -> Tensor:
    """RoIAlign by its definition, one sample at a time, in float64."""
    x = x.double()
    out = torch.zeros(rois.shape[0], x.shape[1], ph, pw, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for r, roi in enumerate(rois.double().tolist()):
        b = int(roi[0])
        x1, y1, x2, y2 = (v * spatial_scale - off for v in roi[1:])
        rh, rw = y2 - y1, x2 - x1
        if not aligned:
            rh, rw = max(rh, 1.0), max(rw, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bw)
        for i in range(ph):
            for j in range(pw):
                for c in range(x.shape[1]):
                    acc = 0.0
                    for iy in range(gh):
                        for ix in range(gw):
                            acc += _bilinear(x[b, c], y1 + i * bh + (iy + 0.5) * bh / gh,
                                             x1 + j * bw + (ix + 0.5) * bw / gw)
                    out[r, c, i, j] = acc / max(gh * gw, 1)
    return out


# ---- the interface ---------------------------------------------------------------------------

def test_signature_matches_torchvision():
    ours, theirs = inspect.signature(roi_align).parameters, inspect.signature(tv_ops.roi_align).parameters
    assert [(p.name, p.default, p.kind) for p in theirs.values()] == [
        (p.name, p.default, p.kind) for p in list(ours.values())[:len(theirs)]]
    ours, theirs = inspect.signature(RoIAlign.__init__).parameters, inspect.signature(tv_ops.RoIAlign.__init__).parameters
    assert [(p.name, p.default) for p in theirs.values()] == [(p.name, p.default) for p in list(ours.values())[:len(theirs)]]
    assert list(inspect.signature(RoIAlign.forward).parameters) == list(inspect.signature(tv_ops.RoIAlign.forward).parameters)
    assert repr(RoIAlign((5, 5), 0.5, 2, True)) == repr(tv_ops.RoIAlign((5, 5), 0.5, 2, True))


def test_keyword_call_as_torchvision():
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64)
    rois = torch.tensor(ROIS, dtype=torch.float64)
    kw = dict(input=x, boxes=rois, output_size=[3, 2], spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(roi_align(**kw), tv_ops.roi_align(**kw), rtol=1e-12, atol=1e-12)


# ---- TestRoIAlign's cases ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("aligned", [False, True])
def test_forward(aligned, x_dtype, contiguous, deterministic, backend):
    tol = 4e-3 if x_dtype == torch.float16 else 1e-5
    x = torch.rand(2, 6, 10, 10, dtype=x_dtype)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(ROIS, dtype=x_dtype)
    with _Deterministic(deterministic):
        y = RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1, aligned=aligned, backend=backend)(x, rois)
    assert y.dtype == x.dtype
    torch.testing.assert_close(reference_roi_align(x, rois, 5, 5, 1, -1, aligned).to(y), y, rtol=tol, atol=tol)
    if x_dtype != torch.float16 or backend == "eager":  # torchvision's CPU kernel has no fp16 on some builds
        torch.testing.assert_close(tv_ops.RoIAlign((5, 5), 1, -1, aligned)(x, rois), y, rtol=tol, atol=tol)


class _Wrapper(nn.Module):
    """torchvision's RoIOpTesterModuleWrapper: the op as the only call of a module with two inputs."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.n_inputs = 2

    def forward(self, a, b):
        self.layer(a, b)


def test_is_leaf_node():
    from torchvision.models.feature_extraction import get_graph_node_names

    train, evaluation = get_graph_node_names(_Wrapper(RoIAlign((5, 5), 1, -1)))
    assert len(train) == len(evaluation) == 1 + 2, (train, evaluation)  # a, b and the roi_align call


def test_torch_fx_trace():
    mod = RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1)
    gm = torch.fx.symbolic_trace(mod)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [roi_align]  # a leaf: the validation is not traced into
    x = torch.rand(2, 6, 5, 5)
    rois = torch.tensor(ROIS, dtype=torch.float)
    out, out_fx = mod(x, rois), gm(x, rois)
    assert out.dtype == out_fx.dtype == x.dtype
    torch.testing.assert_close(out, out_fx, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def scripted_roi_align():
    return torch.jit.script(roi_align)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(2))
def test_backward(seed, contiguous, deterministic, scripted_roi_align):
    torch.manual_seed(seed)
    x = torch.rand(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64)
    with _Deterministic(deterministic):
        assert torch.autograd.gradcheck(lambda z: RoIAlign((2, 2), 1, 1)(z, rois), (x,), atol=1e-5)
    assert torch.autograd.gradcheck(lambda z: scripted_roi_align(z, rois, 2), (x,), atol=1e-5)


def test_boxes_shape_is_an_assertion():
    a = torch.linspace(1, 64, 64).reshape(1, 1, 8, 8)
    with pytest.raises(AssertionError):
        roi_align(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), output_size=(2, 2))
    with pytest.raises(AssertionError):
        roi_align(a, [torch.tensor([[0, 0, 3]], dtype=a.dtype)], output_size=(2, 2))
    with pytest.raises(AssertionError):  # torchvision asserts here too
        tv_ops.roi_align(a, [torch.tensor([[0, 0, 3]], dtype=a.dtype)], output_size=(2, 2))


def _make_rois(img_size, num_imgs, dtype, num_rois=1000):
    rois = torch.randint(0, img_size // 2, size=(num_rois, 5)).to(dtype)
    rois[:, 0] = torch.randint(0, num_imgs, size=(num_rois,))
    rois[:, 3:] += rois[:, 1:3]  # non-degenerate boxes
    return rois


@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32])
@pytest.mark.parametrize("scale, zero_point", [(1, 0), (2, 10), (0.1, 50)])
@pytest.mark.parametrize("aligned", [True, False])
def test_quantized(aligned, scale, zero_point, qdtype):
    x = torch.randint(50, 100, size=(1, 2, 10, 10)).float()
    qx = torch.quantize_per_tensor(x, scale=scale, zero_point=zero_point, dtype=qdtype)
    qrois = torch.quantize_per_tensor(_make_rois(10, 1, torch.float), scale=scale, zero_point=zero_point, dtype=qdtype)
    y = roi_align(qx.dequantize(), qrois.dequantize(), output_size=5, spatial_scale=1, sampling_ratio=-1,
                  aligned=aligned)
    qy = roi_align(qx, qrois, output_size=5, spatial_scale=1, sampling_ratio=-1, aligned=aligned)
    assert qy.is_quantized and qy.dtype == qdtype and qy.q_scale() == scale and qy.q_zero_point() == zero_point
    # the float op on the same (dequantized) values, quantized as the input: exactly
    assert torch.equal(qy.int_repr(), torch.quantize_per_tensor(y, scale, zero_point, qdtype).int_repr())
    # torchvision's integer kernel rounds differently in rare cases, by one quantization step
    tv = tv_ops.roi_align(qx, qrois, output_size=5, spatial_scale=1, sampling_ratio=-1, aligned=aligned)
    diff = (qy.int_repr().long() - tv.int_repr().long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05


def test_quantized_input_needs_quantized_boxes_and_takes_several_images():
    x = torch.randint(50, 100, size=(2, 3, 10, 10)).float()
    qx = torch.quantize_per_tensor(x, scale=1, zero_point=0, dtype=torch.qint8)
    rois = _make_rois(10, 2, torch.float, num_rois=10)
    with pytest.raises(ValueError, match="boxes must also be quantized"):
        roi_align(qx, rois, output_size=5)
    qrois = torch.quantize_per_tensor(rois, scale=1, zero_point=0, dtype=torch.qint8)
    with pytest.raises(RuntimeError, match="Only one image per batch is allowed"):
        tv_ops.roi_align(qx, qrois, output_size=5)
    qy = roi_align(qx, qrois, output_size=5)  # rgpt4d takes any batch size
    y = roi_align(qx.dequantize(), qrois.dequantize(), output_size=5)
    assert torch.equal(qy.int_repr(), torch.quantize_per_tensor(y, 1, 0, torch.qint8).int_repr())


class _PoolWrapper(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, imgs: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.pool(imgs, boxes)


def test_jit_script_of_a_model_with_a_list_of_boxes():
    x = torch.rand(2, 1, 10, 10)
    roi = torch.tensor(ROIS, dtype=torch.float).t()  # [5, 4]: five boxes per image
    scripted = torch.jit.script(_PoolWrapper(RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1)))
    y = scripted(x, [roi, roi])
    assert y.shape == (10, 1, 3, 3)
    torch.testing.assert_close(y, tv_ops.roi_align(x, [roi, roi], [3, 3], 1.0, -1))


def test_jit_script_function_matches_eager(scripted_roi_align):
    x = torch.rand(2, 4, 10, 10)
    rois = torch.tensor(ROIS, dtype=torch.float)
    scripted = scripted_roi_align
    torch.testing.assert_close(scripted(x, rois, [2, 3], 0.5, 2, True), roi_align(x, rois, (2, 3), 0.5, 2, True))
    with pytest.raises(Exception, match="boxes must be a Tensor"):  # the shape check runs in TorchScript
        scripted(x, rois[:, :4], 2)
