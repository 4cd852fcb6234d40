"""dpt_heads_fused (the frozen teacher heads in one grouped pass) against the per-head loop."""

import copy

import pytest
import torch

from rgpt4d.models.configs import P4DConfig
from rgpt4d.models.p4d import RGPT4DForP4DTraining
from rgpt4d.models.teacher import DPTHead, HEAD_SPECS, Teacher4D, dpt_heads_fused, same_structure
from rgpt4d.ops import set_backend
from tests.models.conftest import make_batch, make_student, teacher_config


def make_heads(dtype=torch.float64, in_dim=12, features=8, patch=8, tubelet=2, scales=(2.0, 1.0, 0.5, 0.25),
               std=0.3):
    torch.manual_seed(0)
    heads = [DPTHead(in_dim, features, HEAD_SPECS[n][0], patch, tubelet, HEAD_SPECS[n][1], scales)
             for n in ("depth", "flow", "motion")]
    for h in heads:
        for p in h.parameters():  # non-trivial biases and weights everywhere
            torch.nn.init.normal_(p, std=std)
    return [h.to(dtype) for h in heads]


def layer_grids(same: bool, shape=(2, 3, 5, 7, 12), dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    if same:
        x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
        return [x] * 4, [x]
    xs = [torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(4)]
    return xs, xs


@pytest.mark.parametrize("same", [True, False], ids=["one-grid", "four-grids"])
@pytest.mark.parametrize("scales", [(2.0, 1.0, 0.5, 0.25), (1.0, 1.0, 0.5, 0.5)])
def test_outputs_and_input_gradients_match_the_per_head_loop(same, scales):
    """Odd grids (5 x 7), float64: the fused pass is the per-head loop, values and gradients."""
    heads = make_heads(scales=scales)
    for h in heads:
        h.requires_grad_(False)
    layers, leaves = layer_grids(same)
    ref = [h(layers) for h in heads]
    weights = [torch.randn_like(r) for r in ref]
    g_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), leaves)
    cache = {}
    fused = dpt_heads_fused(heads, layers, cache=cache)
    assert [f.shape for f in fused] == [r.shape for r in ref]
    for f, r in zip(fused, ref):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-8)
    g_fused = torch.autograd.grad(sum((f * w).sum() for f, w in zip(fused, weights)), leaves)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-8)
    assert "packed" in cache  # frozen heads: the packed weights are kept


def test_trainable_heads_get_the_same_weight_gradients():
    heads = make_heads()
    twins = copy.deepcopy(heads)
    layers, _ = layer_grids(False)
    cache = {}
    sum(o.square().sum() for o in dpt_heads_fused(heads, layers, cache=cache)).backward()
    sum(h(layers).square().sum() for h in twins).backward()
    for h, t in zip(heads, twins):
        for (name, p), q in zip(h.named_parameters(), t.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert cache == {}  # trainable: packed per call (part of the graph), nothing cached


def test_cache_follows_weight_changes():
    heads = make_heads()
    for h in heads:
        h.requires_grad_(False)
    layers, _ = layer_grids(True)
    cache = {}
    dpt_heads_fused(heads, layers, cache=cache)
    packed = cache["packed"]
    dpt_heads_fused(heads, layers, cache=cache)
    assert cache["packed"] is packed  # unchanged weights: reused
    with torch.no_grad():
        heads[1].refine[2].conv1.weight.mul_(-1.5)  # in place: the version counter moves
    out = dpt_heads_fused(heads, layers, cache=cache)
    assert cache["packed"] is not packed
    torch.testing.assert_close(out[1], heads[1](layers), rtol=1e-9, atol=1e-8)
    heads[2].load_state_dict({k: torch.randn_like(v) for k, v in heads[2].state_dict().items()})
    torch.testing.assert_close(dpt_heads_fused(heads, layers, cache=cache)[2], heads[2](layers), rtol=1e-9,
                               atol=1e-8)
    heads[0].project[3].weight = torch.nn.Parameter(torch.randn_like(heads[0].project[3].weight),
                                                    requires_grad=False)  # a replaced parameter
    torch.testing.assert_close(dpt_heads_fused(heads, layers, cache=cache)[0], heads[0](layers), rtol=1e-9,
                               atol=1e-8)


def test_float32_and_bfloat16():
    """Low precision: the fused pass is as close to the float64 loop as the low-precision loop is."""
    heads64 = make_heads(std=0.1)
    for h in heads64:
        h.requires_grad_(False)
    layers, _ = layer_grids(True)
    oracle = [h(layers) for h in heads64]
    for dtype, slack in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        heads = [copy.deepcopy(h).to(dtype) for h in heads64]
        x = [layers[0].detach().to(dtype)] * 4
        for f, r, o in zip(dpt_heads_fused(heads, x), [h(x) for h in heads], oracle):
            assert f.dtype == dtype and torch.isfinite(f).all()
            err_fused, err_loop = (f.double() - o).abs().max(), (r.double() - o).abs().max()
            assert err_fused <= 2 * err_loop + slack * o.abs().max(), (dtype, err_fused, err_loop)


def test_bad_input():
    heads = make_heads()
    layers, _ = layer_grids(True)
    with pytest.raises(ValueError, match="four layer grids"):
        dpt_heads_fused(heads, layers[:3])
    other = DPTHead(12, 6, 1, 8, 2)  # different feature width
    assert not same_structure(heads + [other]) and same_structure(heads)
    with pytest.raises(ValueError, match="share features"):
        dpt_heads_fused(heads + [other.double()], layers)
    with pytest.raises(ValueError, match="no heads"):
        dpt_heads_fused([], layers)


def _p4d_step(model, batch, targets):
    model.zero_grad(set_to_none=True)
    out = model(**batch, teacher_targets=targets)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decoder", ["mlp", "linear"])
def test_p4d_model_fused_heads_equal_the_loop(tokenizer, decoder):
    """The P4D training model with fuse_heads on and off: same losses and the same gradient for
    every trainable parameter; the default follows the ops backend (eager: the loop)."""
    torch.manual_seed(0)
    teacher = Teacher4D(teacher_config()).freeze()
    student = make_student(tokenizer)
    model = RGPT4DForP4DTraining(student, teacher, P4DConfig(decoder=decoder, explicit=True, hidden_size=32))
    batch = make_batch(tokenizer, student.config)
    with torch.no_grad():
        o = teacher(batch["frames"])
    targets = {"latent": o.latent, "layers": torch.stack(o.layers, 1), "depth": o.depth, "flow": o.flow,
               "motion": o.motion}
    model.fuse_heads = False
    ref, g_ref = _p4d_step(model, batch, targets)
    model.fuse_heads = True
    fused, g_fused = _p4d_step(model, batch, targets)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for k in ("depth", "flow", "motion"):
        torch.testing.assert_close(fused.terms[k], ref.terms[k], rtol=1e-5, atol=1e-7)
    assert g_fused.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fused[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    model.fuse_heads = None
    try:
        set_backend("eager")
        assert not model._fused_heads()
        set_backend(None)
        assert model._fused_heads()
    finally:
        set_backend(None)
