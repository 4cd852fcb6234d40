"""RegionalEncoder4D: region_pool / mask_pool + TPE + Linear, against the composition written out
with the eager ops; boxes per frame or on the first frame only (the R4D-Bench case)."""

import pytest
import torch

from rgpt4d.models import RegionalEncoder4D
from rgpt4d.ops import mask_pool_eager, region_pool_eager
from tests.conftest import op_backends

CPU_BACKENDS = op_backends("region_pool", "mask_pool")

B, T, C, H, W, R, D = 2, 3, 8, 6, 7, 3, 16


def boxes_first_frame():
    xy = torch.rand(B, R, 2) * 50
    return torch.cat([xy, xy + 10 + torch.rand(B, R, 2) * 40], -1)  # image pixels of a 112-px frame


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("output_size", [(1, 1), (2, 2)], ids=["1x1", "2x2"])
def test_box_mode_matches_the_composition(backend, output_size):
    enc = RegionalEncoder4D(C, D, mode="box", output_size=output_size, spatial_scale=W / 112, backend=backend)
    with torch.no_grad():
        enc.tpe_table.normal_()
    f = torch.randn(B, T, C, H, W, requires_grad=True)
    boxes = torch.rand(B, T, R, 4) * 60
    boxes[..., 2:] += boxes[..., :2]
    ts = torch.randint(0, 500, (B, T))
    out = enc(f, boxes, ts)
    assert out.shape == (B, T, R, D)
    pooled = region_pool_eager(f.double(), boxes.double(), output_size=output_size, spatial_scale=W / 112,
                               timestamps=ts, table=enc.tpe_table.double())
    ref = torch.nn.functional.linear(pooled.reshape(B, T, R, -1), enc.proj.weight.double(), enc.proj.bias.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert f.grad is not None and enc.tpe_table.grad is not None and enc.proj.weight.grad is not None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_first_frame_boxes_are_repeated_over_frames(backend):
    enc = RegionalEncoder4D(C, D, spatial_scale=W / 112, tpe="sinusoidal", backend=backend)
    f = torch.randn(B, T, C, H, W)
    boxes = boxes_first_frame()
    ts = torch.rand(B, T) * 8.0
    a = enc(f, boxes, ts)
    b = enc(f, boxes.unsqueeze(1), ts)
    c = enc(f, boxes.unsqueeze(1).repeat(1, T, 1, 1), ts)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)
    with pytest.raises(ValueError, match="needs timestamps"):
        enc(f, boxes)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_valid_regions_and_channels_last_tokens(backend):
    # vision tokens [B, T, h*w, C] viewed as a grid [B, T, h, w, C]
    enc = RegionalEncoder4D(C, D, spatial_scale=W / 112, channels_last=True, tpe="learned", backend=backend)
    tokens = torch.randn(B, T, H * W, C)
    boxes = boxes_first_frame()
    valid = torch.tensor([[True, False, True], [True, True, False]])
    out = enc(tokens.view(B, T, H, W, C), boxes, valid=valid)
    ref = enc.proj(region_pool_eager(tokens.view(B, T, H, W, C).permute(0, 1, 4, 2, 3),
                                     boxes.unsqueeze(1).expand(B, T, R, 4), spatial_scale=W / 112,
                                     valid=valid.unsqueeze(1).expand(B, T, R), timestamps=torch.arange(T).expand(B, T),
                                     table=enc.tpe_table))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # an absent region is a zero token before the projection: its output is the bias
    torch.testing.assert_close(out[0, :, 1], enc.proj.bias.expand(T, D).detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mask_mode(backend):
    enc = RegionalEncoder4D(C, D, mode="mask", tpe="learned", backend=backend)
    with torch.no_grad():
        enc.tpe_table.normal_()
    f = torch.randn(B, T, C, H, W)
    masks = (torch.rand(B, R, 20, 24) > 0.5).float()  # first-frame masks
    ts = torch.randint(0, 500, (B, T))
    out = enc(f, masks, ts)
    pooled = mask_pool_eager(f, masks.unsqueeze(1).expand(B, T, R, 20, 24), timestamps=ts, table=enc.tpe_table)
    torch.testing.assert_close(out, enc.proj(pooled), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`valid` is for box mode"):
        enc(f, masks, ts, valid=torch.ones(B, R, dtype=torch.bool))


def test_bad_configuration():
    with pytest.raises(ValueError, match="mode must be"):
        RegionalEncoder4D(C, D, mode="polygon")
    with pytest.raises(ValueError, match="tpe must be"):
        RegionalEncoder4D(C, D, tpe="rope")
    enc = RegionalEncoder4D(C, D, tpe="none")
    assert enc.tpe_table is None
    with pytest.raises(ValueError, match=r"boxes must be \[B, T, R, 4\]"):
        enc(torch.randn(B, T, C, H, W), torch.rand(B, T, R, 5))


def test_compiles_fullgraph():
    torch._dynamo.reset()
    enc = RegionalEncoder4D(C, D, spatial_scale=W / 112, backend="cpu")
    f = torch.randn(B, T, C, H, W, requires_grad=True)
    boxes = boxes_first_frame()
    out = torch.compile(enc, fullgraph=True)(f, boxes)
    torch.testing.assert_close(out, enc(f, boxes))
    out.sum().backward()
    assert f.grad is not None
