"""p4d_loss / P4DLoss: every CPU backend against a float64 composition of F.smooth_l1_loss /
F.mse_loss / F.l1_loss (boolean-indexed masks), values and the gradient of every prediction."""

import math

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.ops import P4D_PRESETS, P4DLoss, P4DLossOutput, p4d_loss
from tests.conftest import op_backends, op_memory, requires_gpu

CPU_BACKENDS = op_backends("p4d_loss")
GPU_BACKENDS = op_backends("p4d_loss", device="cuda")

# The presets, written out independently of the code (../shared/PAPER.md): effective weight of
# each term in the total, kind, and log-space terms.
PAPER = dict(kind="smooth_l1", log=(), w={"latent": 0.5, "depth": 0.1 * 1.0, "flow": 0.1 * 0.1,
                                          "motion": 0.1 * 0.05, "camray": 0.1 * 0.05})
CODE = dict(kind="mse", log=("depth",), w={"latent": 0.01, "depth": 0.1, "flow": 0.001, "motion": 0.01})
LOSS_FN = {"smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss, "l1": F.l1_loss}


def oracle_term(pred, target, mask=None, kind="smooth_l1", beta=1.0, log=False, reduction="mean"):
    """float64, eager: select the valid elements, (log), then the torch loss."""
    p, t = pred.double(), target.detach().double()
    if mask is not None:
        m = torch.broadcast_to(mask, pred.shape)
        p, t = p[m], t[m]
    if log:
        p, t = torch.log(p + 1e-8), torch.log(t + 1e-8)
    if p.numel() == 0:
        return p.sum() * 0.0
    kw = dict(beta=beta) if kind == "smooth_l1" else {}
    return LOSS_FN[kind](p, t, reduction=reduction, **kw)


def make_batch(B=2, dtype=torch.float32, heads=("depth", "flow", "motion", "camray"), device="cpu",
               requires_grad=True, T=3, H=8, W=8, C=16):
    """A miniature teacher grid: latent [B, T, h, w, C]; depth (positive), flow, motion, camray maps."""
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, positive=False):
        x = torch.rand(*shape, generator=g) * 2 + 0.05 if positive else torch.randn(*shape, generator=g) * 1.5
        return x.to(device=device, dtype=dtype)

    chans = {"depth": 1, "flow": 2, "motion": 1, "camray": 6}
    lat, lat_t = rnd(B, T, 4, 4, C), rnd(B, T, 4, 4, C)
    preds = {h: rnd(B, T, chans[h], H, W, positive=h == "depth") for h in heads}
    targets = {h: rnd(B, T, chans[h], H, W, positive=h == "depth") for h in heads}
    if requires_grad:
        lat.requires_grad_(True)
        for p in preds.values():
            p.requires_grad_(True)
    depth_mask = (torch.rand(B, T, 1, H, W, generator=g) > 0.35).to(device)
    return lat, lat_t, preds, targets, depth_mask


def oracle_total(lat, lat_t, preds, targets, masks, cfg, kind=None, beta=1.0, reduction="mean"):
    terms = {}
    if lat is not None:
        terms["latent"] = oracle_term(lat, lat_t, masks.get("latent"), kind or cfg["kind"], beta, "latent" in cfg["log"],
                                      reduction)
    for h in preds:
        terms[h] = oracle_term(preds[h], targets[h], masks.get(h), kind or cfg["kind"], beta, h in cfg["log"], reduction)
    total = sum(cfg["w"][k] * v for k, v in terms.items())
    return total, terms


def leaves(lat, preds):
    return ([lat] if lat is not None else []) + list(preds.values())


def close(actual, expected, rtol=2e-5, atol_scale=1e-5, msg=""):
    """Relative comparison with an absolute floor scaled to the expected magnitude."""
    expected = expected.double()
    expected = expected.detach()
    atol = atol_scale * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def check(backend, preset, cfg, dtype=torch.float32, masks_of=lambda b: {"depth": b[4]}, g=0.5, heads=None,
          rtol=2e-5, grad_rtol=2e-5, **kw):
    batch = make_batch(dtype=dtype, heads=heads or tuple(h for h in cfg["w"] if h != "latent"))
    lat, lat_t, preds, targets, _ = batch
    masks = masks_of(batch)
    out = p4d_loss(lat, lat_t, preds, targets, preset=preset, masks=masks, backend=backend, **kw)
    assert isinstance(out, P4DLossOutput) and out.total.dim() == 0
    assert out.total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ins = leaves(lat, preds)
    grads = torch.autograd.grad(out.total * g, ins)
    x64 = [x.detach().double().requires_grad_(True) for x in ins]
    lat64, preds64 = x64[0], dict(zip(preds, x64[1:]))
    ref_total, ref_terms = oracle_total(lat64, lat_t, preds64, targets, masks, cfg,
                                        reduction=kw.get("reduction", "mean"))
    ref_grads = torch.autograd.grad(ref_total * g, x64)
    close(out.total, ref_total, rtol, msg="total")
    assert set(out.terms) == set(ref_terms)
    for k in ref_terms:
        close(out.terms[k], ref_terms[k], rtol, msg=f"term {k}")
    for name, a, r in zip(["latent"] + list(preds), grads, ref_grads):
        assert a.dtype == dtype and a.shape == r.shape
        close(a, r, grad_rtol, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("preset", ["paper", "code"])
def test_presets_values_and_grads(backend, preset):
    check(backend, preset, PAPER if preset == "paper" else CODE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_accumulates_in_fp32(backend):
    # bf16 inputs; the oracle reads the same bf16 values in float64. Gradients are rounded to bf16.
    check(backend, "paper", PAPER, dtype=torch.bfloat16, rtol=1e-4, grad_rtol=1.6e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64(backend):
    check(backend, "code", CODE, dtype=torch.float64, rtol=1e-10, grad_rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_bf16_pred_fp32_target(backend):
    lat, lat_t, preds, targets, mask = make_batch(dtype=torch.bfloat16, heads=("depth",))
    targets = {"depth": targets["depth"].float() + 0.001}
    out = p4d_loss(None, None, preds, targets, masks={"depth": mask}, backend=backend)
    p64 = preds["depth"].detach().double().requires_grad_(True)
    ref = 0.1 * oracle_term(p64, targets["depth"], mask)
    close(out.total, ref, 1e-5)
    (ga,) = torch.autograd.grad(out.total, preds["depth"])
    (gr,) = torch.autograd.grad(ref, p64)
    close(ga, gr, 1.6e-2)


# ---- masks ----------------------------------------------------------------------------------

MASK_LAYOUTS = {
    # same shape as the prediction
    "same-shape": lambda b: {"depth": b[4]},
    # a token mask [B, T, h, w, 1] of the latent (repeats over channels)
    "latent-token-mask": lambda b: {"latent": torch.rand(b[0].shape[:-1] + (1,)) > 0.3},
    # a per-pixel [H, W] mask broadcast over leading dims
    "leading-broadcast": lambda b: {"flow": torch.rand(8, 8) > 0.5},
    # [B, 1, 2, H, W]: varies over non-consecutive dims, expanded to the prediction's shape
    "expanded": lambda b: {"flow": torch.rand(2, 1, 2, 8, 8) > 0.5},
    # fewer dims: [T, 1, H, W] for [B, T, 1, H, W]
    "fewer-dims": lambda b: {"motion": torch.rand(3, 1, 8, 8) > 0.5},
    # a scalar mask
    "scalar-true": lambda b: {"camray": torch.tensor(True)},
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_layouts(backend, layout):
    check(backend, "paper", PAPER, masks_of=MASK_LAYOUTS[layout])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_zero_valid_mask_gives_zero_loss_and_gradient(backend, reduction):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow"))
    none = torch.zeros_like(mask)
    out = p4d_loss(lat, lat_t, preds, targets, masks={"depth": none, "latent": torch.zeros(1, dtype=torch.bool)},
                   reduction=reduction, backend=backend)
    assert out.terms["depth"].item() == 0.0 and out.terms["latent"].item() == 0.0
    assert torch.isfinite(out.total)
    g_lat, g_depth, g_flow = torch.autograd.grad(out.total, [lat, preds["depth"], preds["flow"]])
    assert torch.equal(g_depth, torch.zeros_like(g_depth)) and torch.equal(g_lat, torch.zeros_like(g_lat))
    assert g_flow.abs().sum() > 0
    close(out.total, 0.01 * oracle_term(preds["flow"], targets["flow"], reduction=reduction))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_values_under_the_mask_are_ignored(backend):
    # Invalid depth pixels often hold inf/NaN in the teacher's target: masked out, they must not leak.
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth",))
    tgt = targets["depth"].clone()
    tgt[~mask] = float("nan")
    tgt[~mask & (torch.rand(mask.shape) > 0.5)] = float("inf")
    for preset in ("paper", "code"):  # code: log space too
        out = p4d_loss(None, None, preds, {"depth": tgt}, preset=preset, masks={"depth": mask}, backend=backend)
        (gd,) = torch.autograd.grad(out.total, preds["depth"])
        assert torch.isfinite(out.total) and torch.isfinite(gd).all()
        cfg = PAPER if preset == "paper" else CODE
        close(out.total, cfg["w"]["depth"] * oracle_term(preds["depth"], tgt, mask, cfg["kind"],
                                                          log="depth" in cfg["log"]))


# ---- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_term_overrides(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow", "motion"))
    kind = {"latent": "mse", "flow": "l1"}
    beta = {"depth": 0.3, "motion": 0.0}  # beta 0: l1, as F.smooth_l1_loss
    weights = {"latent": 2.0, "explicit": 0.5, "flow": 3.0, "camray": 7.0}  # camray: preset head, absent here
    preset = P4D_PRESETS["paper"].replace(kinds=kind, betas=beta, log_space=("depth",))
    out = p4d_loss(lat, lat_t, preds, targets, preset=preset, weights=weights, masks={"depth": mask}, backend=backend)
    x64 = [x.detach().double().requires_grad_(True) for x in leaves(lat, preds)]
    ref_terms = {
        "latent": oracle_term(x64[0], lat_t, kind="mse"),
        "depth": oracle_term(x64[1], targets["depth"], mask, "smooth_l1", 0.3, log=True),
        "flow": oracle_term(x64[2], targets["flow"], kind="l1"),
        "motion": oracle_term(x64[3], targets["motion"], kind="l1"),
    }
    w = {"latent": 2.0, "depth": 0.5 * 1.0, "flow": 0.5 * 3.0, "motion": 0.5 * 0.05}
    ref = sum(w[k] * v for k, v in ref_terms.items())
    close(out.total, ref)
    for k, v in ref_terms.items():
        close(out.terms[k], v, msg=k)
    for a, r in zip(torch.autograd.grad(out.total, leaves(lat, preds)), torch.autograd.grad(ref, x64)):
        close(a, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log_space_of_a_preset(backend):
    lat, lat_t, preds, targets, _ = make_batch(heads=("depth",))
    lat_pos, lat_t_pos = lat.detach().abs() + 0.1, lat_t.abs() + 0.1
    ref = oracle_term(lat_pos, lat_t_pos, log=True) * 0.5 + 0.1 * oracle_term(preds["depth"], targets["depth"], log=True)
    preset = P4D_PRESETS["paper"].replace(log_space=("latent", "depth"))
    close(p4d_loss(lat_pos, lat_t_pos, preds, targets, preset=preset, backend=backend).total, ref)
    out = p4d_loss(None, None, preds, targets, preset=P4D_PRESETS["code"].replace(log_space=()), backend=backend)
    close(out.total, 0.1 * oracle_term(preds["depth"], targets["depth"], kind="mse"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reduction_sum(backend):
    check(backend, "paper", PAPER, reduction="sum", heads=("depth", "motion"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_latent_only_and_explicit_only(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("flow",))
    out = p4d_loss(lat, lat_t, backend=backend)
    assert list(out.terms) == ["latent"]
    close(out.total, 0.5 * oracle_term(lat, lat_t))
    out = p4d_loss(None, None, preds, targets, backend=backend)
    assert list(out.terms) == ["flow"]
    close(out.total, 0.01 * oracle_term(preds["flow"], targets["flow"]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_head_name_and_empty_term(backend):
    lat, lat_t, preds, targets, _ = make_batch(heads=("depth",))
    normals, normals_t = torch.randn(2, 3, 3, 5, 5, requires_grad=True), torch.randn(2, 3, 3, 5, 5)
    empty, empty_t = torch.randn(0, 4, requires_grad=True), torch.randn(0, 4)
    out = p4d_loss(None, None, {"normals": normals, "empty": empty}, {"normals": normals_t, "empty": empty_t},
                   weights={"normals": 2.0, "empty": 1.0}, backend=backend)
    assert out.terms["empty"].item() == 0.0
    close(out.total, 0.1 * 2.0 * oracle_term(normals, normals_t))
    g_n, g_e = torch.autograd.grad(out.total, [normals, empty])
    assert g_e.shape == (0, 4)
    n64 = normals.detach().double().requires_grad_(True)
    close(g_n, torch.autograd.grad(0.2 * oracle_term(n64, normals_t), n64)[0])


# ---- gradients: real grad_output, targets, frozen predictions, no_grad -----------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_from_a_larger_graph(backend):
    # total and the logged terms both feed a larger graph; a zero-weight term is trained only
    # through its logged value.
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow", "motion"))
    weights = {"motion": 0.0}
    out = p4d_loss(lat, lat_t, preds, targets, weights=weights, masks={"depth": mask}, backend=backend)
    a, b = torch.tensor(1.7), torch.tensor(-0.6)
    sft = (lat * 0.01).sum()  # another use of the latent prediction
    big = torch.tanh(out.total) * a + out.terms["depth"] * b + out.terms["motion"] ** 2 + sft
    grads = torch.autograd.grad(big, leaves(lat, preds))

    x64 = [x.detach().double().requires_grad_(True) for x in leaves(lat, preds)]
    cfg = dict(PAPER, w=dict(PAPER["w"], motion=0.0))
    total, terms = oracle_total(x64[0], lat_t, dict(zip(preds, x64[1:])), targets, {"depth": mask}, cfg)
    ref_big = torch.tanh(total) * a + terms["depth"] * b + terms["motion"] ** 2 + (x64[0] * 0.01).sum()
    close(big, ref_big)
    for name, g, r in zip(["latent"] + list(preds), grads, torch.autograd.grad(ref_big, x64)):
        close(g, r, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_targets_never_receive_gradient(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth",))
    lat_t.requires_grad_(True)
    targets["depth"].requires_grad_(True)
    out = p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)
    out.total.backward()
    assert lat_t.grad is None and targets["depth"].grad is None
    assert lat.grad is not None and preds["depth"].grad is not None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_gradient_buffers_under_no_grad_or_for_frozen_predictions(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow"))
    big = (lat.numel() + preds["depth"].numel() + preds["flow"].numel()) * 4

    def run():
        return p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)

    assert op_memory("p4d_loss", backend, run) >= big  # the gradients are produced in forward
    with torch.no_grad():
        assert op_memory("p4d_loss", backend, run) < 4096
        out = run()
    assert out.total.grad_fn is None and not out.total.requires_grad
    lat.requires_grad_(False)
    preds["flow"].requires_grad_(False)
    used = op_memory("p4d_loss", backend, run)
    assert preds["depth"].numel() * 4 <= used < preds["depth"].numel() * 4 + 4096  # only depth's gradient
    out = run()
    (gd,) = torch.autograd.grad(out.total, preds["depth"])
    assert gd.shape == preds["depth"].shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_backward_twice_is_consistent(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth",))
    out = p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)
    g1 = torch.autograd.grad(out.total * 0.25, [lat, preds["depth"]], retain_graph=True)
    g2 = torch.autograd.grad(out.total, [lat, preds["depth"]], retain_graph=True)
    g3 = torch.autograd.grad(out.total * 0.25, [lat, preds["depth"]])
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a * 4, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_is_refused(backend):
    lat, lat_t, _, _, _ = make_batch(heads=())
    out = p4d_loss(lat, lat_t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.total, lat, create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_deterministic(backend):
    lat, lat_t, preds, targets, mask = make_batch(B=3, heads=("depth", "flow"), H=40, W=40, C=64)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            out = p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)
            runs.append((out.total, *torch.autograd.grad(out.total, leaves(lat, preds))))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_large_gradient_buffers_behave_like_ordinary_tensors():
    # Gradients of >= 4 MiB come from a 2 MiB-aligned, huge-page-advised allocation on Linux.
    g = torch.Generator().manual_seed(2)
    p = torch.randn(2, 1024, 1024, generator=g, requires_grad=True)
    t = torch.randn(2, 1024, 1024, generator=g)
    for _ in range(2):  # .grad: stolen on the first backward, accumulated into on the second
        p4d_loss(p, t, backend="cpu").total.backward()
    ref = p.detach().clone().requires_grad_(True)
    for _ in range(2):
        p4d_loss(ref, t, backend="eager").total.backward()
    torch.testing.assert_close(p.grad, ref.grad)
    p.grad.zero_()
    assert float(p.grad.abs().sum()) == 0.0
    out = p4d_loss(p * 1.0, t, backend="cpu")
    (gp,) = torch.autograd.grad(out.total * 0.5, p)
    torch.testing.assert_close(gp, ref.grad / 4)


_AVX2_VS_GENERIC = """
import sys, torch, rgpt4d.ops as o
g = torch.Generator().manual_seed(3)
out = []
# odd sizes (vector tails), every kind, masks with NaN targets where masked out, log space (the
# chain factor), zero differences; the last two are big enough (> 32 MiB moved) for the AVX2 loop's
# streaming stores
for n, kind, log, masked in [(1023, "smooth_l1", False, True), (4097, "mse", False, False),
                             (8200, "l1", True, True), (20001, "smooth_l1", True, False),
                             (3 * 2**20 + 5, "smooth_l1", False, True), (3 * 2**20 + 3, "mse", False, False)]:
    p = (torch.rand(n, generator=g) + 0.05).requires_grad_()
    t = torch.rand(n, generator=g) + 0.05
    t[::7] = p.detach()[::7]
    m = torch.rand(n, generator=g) > 0.3
    if masked:
        t[~m] = float("nan")
    preset = o.P4D_PRESETS["paper"].replace(kind=kind, beta=0.1, log_space=("latent",) if log else ())
    r = o.p4d_loss(p, t, preset=preset, masks={"latent": m} if masked else None, backend="cpu")
    out += [r.total.detach(), *torch.autograd.grad(r.total * 0.5, p)]
torch.save(out, sys.argv[1])
"""


def test_cpu_avx2_loop_matches_the_generic_loop_bitwise(tmp_path):
    # The float loop has an AVX2 version (intrinsics, streaming stores) next to the generic one;
    # both must give the same bits. RGPT4D_P4D_NO_AVX2=1 forces the generic loop.
    import os
    import subprocess
    import sys

    outs = []
    for name, extra in (("avx2", {}), ("generic", {"RGPT4D_P4D_NO_AVX2": "1"})):
        path = str(tmp_path / f"{name}.pt")
        env = {k: v for k, v in os.environ.items() if k != "RGPT4D_P4D_NO_AVX2"}
        r = subprocess.run([sys.executable, "-c", _AVX2_VS_GENERIC, path], capture_output=True, text=True,
                           env={**env, **extra}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(torch.load(path))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow"))
    # channels-last-like permutations of every tensor, masks included
    perm = lambda x: x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    lat_nc = lat.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    preds_nc = {k: perm(v).requires_grad_(True) for k, v in preds.items()}
    targets_nc = {k: perm(v) for k, v in targets.items()}
    mask_nc = perm(mask)
    assert not lat_nc.is_contiguous() and not preds_nc["flow"].is_contiguous() and not mask_nc.is_contiguous()
    out = p4d_loss(lat_nc, lat_t.transpose(-1, -2).contiguous().transpose(-1, -2), preds_nc, targets_nc,
                   masks={"depth": mask_nc}, backend=backend)
    ref_total, _ = oracle_total(lat, lat_t, preds, targets, {"depth": mask}, PAPER)
    close(out.total, ref_total)
    ga = torch.autograd.grad(out.total, leaves(lat_nc, preds_nc))
    gr = torch.autograd.grad(ref_total, leaves(lat, preds))
    for a, r in zip(ga, gr):
        close(a, r)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_fp64(backend):
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lat_t = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    dep = (torch.rand(1, 1, 2, 2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    dep_t = torch.rand(1, 1, 2, 2, generator=g, dtype=torch.float64) + 0.5
    flo = torch.randn(1, 2, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    flo_t = torch.randn(1, 2, 1, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[[[True, False], [True, True]]]])
    tok = torch.tensor([[[True], [False]]])

    def fn(lat, dep, flo):
        preset = P4D_PRESETS["paper"].replace(kinds={"flow": "mse"}, log_space=("depth",))
        out = p4d_loss(lat, lat_t, {"depth": dep, "flow": flo}, {"depth": dep_t, "flow": flo_t}, preset=preset,
                       masks={"depth": mask, "latent": tok}, backend=backend)
        return out.total, out.terms["depth"]

    assert torch.autograd.gradcheck(fn, (lat, dep, flo))


@pytest.mark.parametrize("op_name", ["p4d_loss", "p4d_loss_triton"])
def test_opcheck(op_name):
    op = getattr(torch.ops.rgpt4d, op_name).default
    g = torch.Generator().manual_seed(3)
    p1, t1 = torch.randn(2, 3, 5, generator=g, requires_grad=True), torch.randn(2, 3, 5, generator=g)
    p2 = (torch.rand(4, 6, generator=g) + 0.5).requires_grad_(True)
    t2 = torch.rand(4, 6, generator=g) + 0.5
    p3, t3 = torch.randn(7, generator=g, dtype=torch.bfloat16), torch.randn(7, generator=g)
    m1 = torch.rand(6, generator=g) > 0.3  # [2, 3, 1] token mask, flattened: inner = 5
    none = torch.empty(0, dtype=torch.bool)
    args = ([p1, p2, p3], [t1, t2, t3], [m1, none, none], [5, 1, 1], [0, 1, 2], [1.0, 1.0, 1.0],
            [2 | 4, 2 | 1, 0], [0.5, 0.1, 0.0], True, 1e-8)
    torch.library.opcheck(op, args)
    torch.library.opcheck(op, args[:8] + (False, 1e-8))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph_with_masks(backend):
    torch._dynamo.reset()
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow"))
    tok = torch.rand(lat.shape[:-1] + (1,)) > 0.2

    @torch.compile(fullgraph=True)
    def step(lat, preds, masks):
        out = p4d_loss(lat, lat_t, preds, targets, preset="code", masks=masks, backend=backend)
        return out.total * 2.0, out.terms

    total, terms = step(lat, preds, {"depth": mask, "latent": tok})
    grads = torch.autograd.grad(total, leaves(lat, preds))
    x64 = [x.detach().double().requires_grad_(True) for x in leaves(lat, preds)]
    ref, ref_terms = oracle_total(x64[0], lat_t, dict(zip(preds, x64[1:])), targets, {"depth": mask, "latent": tok},
                                  CODE)
    close(total, ref * 2.0)
    close(terms["depth"], ref_terms["depth"])
    for a, r in zip(grads, torch.autograd.grad(ref * 2.0, x64)):
        close(a, r)


def test_module_and_presets():
    m = P4DLoss("code", backend="cpu")
    assert "preset='code'" in repr(m)
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow", "motion"))
    out = m(lat, lat_t, preds, targets, masks={"depth": mask})
    total, terms = out  # a named tuple
    ref, _ = oracle_total(lat, lat_t, preds, targets, {"depth": mask}, CODE)
    close(total, ref)
    assert P4D_PRESETS["paper"].head_weights["camray"] == 0.05 and P4D_PRESETS["code"].latent_weight == 0.01
    with pytest.raises(TypeError, match="unknown options"):
        P4DLoss("paper", alpha=0.3)
    with pytest.raises(ValueError, match="preset must be one of"):
        P4DLoss("nope")


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors_name_the_term(backend):
    lat, lat_t, preds, targets, mask = make_batch(heads=("depth", "flow"))
    bad = dict(targets, flow=targets["flow"][:, :2])
    with pytest.raises(ValueError, match=r"term 'flow': prediction shape \(2, 3, 2, 8, 8\) and target shape "
                                         r"\(2, 2, 2, 8, 8\) differ"):
        p4d_loss(lat, lat_t, preds, bad, backend=backend)
    with pytest.raises(ValueError, match=r"term 'latent': prediction shape"):
        p4d_loss(lat, lat_t[..., :3], preds, targets, backend=backend)
    with pytest.raises(ValueError, match=r"masks\['depth'\] of shape \(2, 3, 1, 7, 8\) is not broadcastable to "
                                         r"the depth prediction"):
        p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask[..., :7, :]}, backend=backend)
    with pytest.raises(ValueError, match=r"masks\['depth'\] of shape \(1, 2, 3, 1, 8, 8\) is not broadcastable"):
        p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask[None]}, backend=backend)
    with pytest.raises(TypeError, match=r"masks\['depth'\] must be a bool tensor"):
        p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask.float()}, backend=backend)
    with pytest.raises(ValueError, match=r"masks\['motion'\] given but there is no 'motion' term"):
        p4d_loss(lat, lat_t, preds, targets, masks={"motion": mask}, backend=backend)
    with pytest.raises(ValueError, match=r"no weight for head 'normals'"):
        p4d_loss(None, None, {"normals": lat}, {"normals": lat_t}, backend=backend)
    with pytest.raises(ValueError, match=r"weights\['dpeth'\]: unknown term"):
        p4d_loss(lat, lat_t, preds, targets, weights={"dpeth": 1.0}, backend=backend)
    with pytest.raises(ValueError, match=r"log_space\['normals'\]: unknown term"):
        p4d_loss(lat, lat_t, preds, targets, preset=P4D_PRESETS["paper"].replace(log_space=("depth", "normals")),
                 backend=backend)
    with pytest.raises(ValueError, match=r"term 'flow': kind must be one of"):
        p4d_loss(lat, lat_t, preds, targets, preset=P4D_PRESETS["paper"].replace(kinds={"flow": "huber"}),
                 backend=backend)
    with pytest.raises(ValueError, match=r"term 'depth': beta must be >= 0"):
        p4d_loss(lat, lat_t, preds, targets, preset=P4D_PRESETS["paper"].replace(betas={"depth": -1.0}),
                 backend=backend)
    with pytest.raises(ValueError, match="unmatched: \\['flow'\\]"):
        p4d_loss(lat, lat_t, preds, {"depth": targets["depth"]}, backend=backend)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        p4d_loss(lat, lat_t, reduction="none", backend=backend)
    with pytest.raises(TypeError, match="term 'depth': the target must be a floating-point tensor"):
        p4d_loss(lat, lat_t, {"depth": preds["depth"]}, {"depth": mask}, backend=backend)
    with pytest.raises(ValueError, match="no terms"):
        p4d_loss(None, None, backend=backend)


@pytest.mark.parametrize("op_name", ["p4d_loss", "p4d_loss_triton"])
def test_ops_check_shapes_even_without_validation(op_name):
    # validate=False skips the Python checks; the ops still never read outside their tensors.
    op = getattr(torch.ops.rgpt4d, op_name)
    p, t = torch.randn(4, 5), torch.randn(4, 6)
    none = torch.empty(0, dtype=torch.bool)
    with pytest.raises((RuntimeError, ValueError), match=r"term 0: prediction .*4, 5.* and target .*4, 6.*"):
        op([p], [t], [none], [1], [0], [1.0], [0], [1.0], True, 1e-8)
    with pytest.raises((RuntimeError, ValueError), match="does not tile"):
        op([p], [p], [torch.ones(3, dtype=torch.bool)], [1], [0], [1.0], [4], [1.0], True, 1e-8)
    with pytest.raises((RuntimeError, ValueError), match="term 'depth'|term 0"):
        p4d_loss(None, None, {"depth": p}, {"depth": t}, backend="cpu" if op_name == "p4d_loss" else "triton",
                 validate=False)


# ---- GPU ------------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["paper", "code"])
def test_gpu_values_and_grads(backend, dtype, preset):
    cfg = PAPER if preset == "paper" else CODE
    lat, lat_t, preds, targets, mask = make_batch(dtype=dtype, device="cuda", H=56, W=56, C=128,
                                                  heads=tuple(h for h in cfg["w"] if h != "latent"))
    out = p4d_loss(lat, lat_t, preds, targets, preset=preset, masks={"depth": mask}, backend=backend)
    grads = torch.autograd.grad(out.total * 0.5, leaves(lat, preds))
    x64 = [x.detach().double().requires_grad_(True) for x in leaves(lat, preds)]
    ref, _ = oracle_total(x64[0], lat_t, dict(zip(preds, x64[1:])), targets, {"depth": mask}, cfg)
    rt = 1e-4 if dtype == torch.float32 else 1.6e-2
    close(out.total, ref, 1e-4)
    for a, r in zip(grads, torch.autograd.grad(ref * 0.5, x64)):
        close(a, r, rt)


@requires_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic(backend):
    lat, lat_t, preds, targets, mask = make_batch(B=4, device="cuda", H=224, W=224, C=256, heads=("depth", "flow"))
    a = p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)
    b = p4d_loss(lat, lat_t, preds, targets, masks={"depth": mask}, backend=backend)
    assert torch.equal(a.total, b.total)
    ga = torch.autograd.grad(a.total, leaves(lat, preds))
    gb = torch.autograd.grad(b.total, leaves(lat, preds))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_presets_match_the_paper_text():
    assert math.isclose(P4D_PRESETS["paper"].latent_weight, 0.5) and math.isclose(P4D_PRESETS["paper"].explicit_weight, 0.1)
    assert dict(P4D_PRESETS["paper"].head_weights) == {"depth": 1.0, "flow": 0.1, "motion": 0.05, "camray": 0.05}
    assert P4D_PRESETS["paper"].kind == "smooth_l1" and P4D_PRESETS["code"].kind == "mse"
    assert dict(P4D_PRESETS["code"].head_weights) == {"depth": 0.1, "flow": 0.001, "motion": 0.01}
    assert P4D_PRESETS["code"].explicit_weight == 1.0 and P4D_PRESETS["code"].log_space == ("depth",)
