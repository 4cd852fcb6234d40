"""Regression benchmarks (pytest-benchmark): small versions of the cases of benchmarks/bench_*.py.

    pytest benchmarks/ --benchmark-only                          # run (about a minute on 2 cores)
    pytest benchmarks/ --benchmark-only --benchmark-save=base    # save a baseline (.benchmarks/)
    pytest benchmarks/ --benchmark-only --benchmark-compare      # compare with the latest saved run
    pytest benchmarks/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:25%

Each case runs with the eager reference and with the compiled backend of the device, on the same
fresh random inputs. Nothing here asserts a time (the machines are shared and noisy); a regression
is what --benchmark-compare(-fail) reports against a baseline saved on the same machine. Without
--benchmark-only the same tests also check that every provider returns a finite result.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_p4d_loss, bench_regional  # noqa: E402
from benchmarks.harness import mode_fn  # noqa: E402
from rgpt4d.ops import (attention, available_backends, fused_linear_latent_loss, mask_pool, p4d_loss, region_pool,  # noqa: E402
                        roi_align, tpe_add, tpe_downsample_layernorm)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":  # as run_all.py: one thread on the shared CPU machines (benchmarks/README.md);
    # RGPT4D_BENCH_THREADS=0 keeps torch's default
    _threads = int(os.environ.get("RGPT4D_BENCH_THREADS", "1"))
    if _threads > 0:
        torch.set_num_threads(_threads)
NATIVE = [b for b in (["cpu"] if DEVICE.type == "cpu" else ["cuda", "triton"]) if b in available_backends()]
BACKENDS = ["eager", *NATIVE]


def _finite(out) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return all(bool(torch.isfinite(o).all()) for o in outs if isinstance(o, torch.Tensor))


def _run(benchmark, fn):
    out = benchmark(fn)
    assert _finite(out)


# ---- TPE (bench_tpe.py's "small" case: B 2, T 8, 8x8 tokens, D 64; and a mid-size one) -----------

TPE_SHAPES = {"small": (2, 8, 8, 8, 64), "mid": (1, 8, 27, 27, 256)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(TPE_SHAPES))
def test_tpe_add_forward(benchmark, backend, shape):
    B, T, h, w, D = TPE_SHAPES[shape]
    x = torch.randn(B, T, h * w, D, device=DEVICE)
    secs = torch.rand(B, T, device=DEVICE) * 30
    _run(benchmark, lambda: tpe_add(x, secs, backend=backend, validate=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(TPE_SHAPES))
def test_tpe_downsample_layernorm_full(benchmark, backend, shape):
    B, T, h, w, D = TPE_SHAPES[shape]
    x = torch.randn(B, T, h * w, D, device=DEVICE, requires_grad=True)
    secs = torch.rand(B, T, device=DEVICE) * 30
    wt = (1 + 0.1 * torch.randn(9 * D, device=DEVICE)).requires_grad_(True)
    bs = (0.1 * torch.randn(9 * D, device=DEVICE)).requires_grad_(True)
    fwd = lambda: tpe_downsample_layernorm(x, secs, None, wt, bs, grid=(h, w), backend=backend,  # noqa: E731
                                           validate=False)
    _run(benchmark, mode_fn("full", fwd, [x, wt, bs]))


# ---- regional (bench_regional.py's --quick cases) ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_align_full(benchmark, backend):
    x0, rois, _ = bench_regional.detector_case(DEVICE, quick=True)
    x = x0[:, :16].contiguous().requires_grad_(True)  # 16 channels keep the eager gather small
    fwd = lambda: roi_align(x, rois[:64], (7, 7), 0.25, 2, False, backend=backend, validate=False)  # noqa: E731
    _run(benchmark, mode_fn("full", fwd, [x]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_pool_full(benchmark, backend):
    f0, boxes, table0, ts, img, _ = bench_regional.rgpt_case(DEVICE, quick=True)
    f, table = f0.requires_grad_(True), table0.requires_grad_(True)
    fwd = lambda: region_pool(f, boxes, output_size=(2, 2), spatial_scale=f.shape[-1] / img,  # noqa: E731
                              timestamps=ts, table=table, backend=backend, validate=False)
    _run(benchmark, mode_fn("full", fwd, [f, table]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_pool_full(benchmark, backend):
    f0, boxes, table0, ts, img, _ = bench_regional.rgpt_case(DEVICE, quick=True)
    masks = bench_regional.box_masks(boxes, 96, DEVICE)
    f, table = f0.requires_grad_(True), table0.requires_grad_(True)
    fwd = lambda: mask_pool(f, masks, timestamps=ts, table=table, backend=backend, validate=False)  # noqa: E731
    _run(benchmark, mode_fn("full", fwd, [f, table]))


# ---- P4D loss (bench_p4d_loss.py's "small" case; fused linear at N 2048) ---------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_p4d_loss_full(benchmark, backend):
    lat, lat_t, preds, targets, masks = bench_p4d_loss.p4d_inputs(2, 4 * 8 * 8, 384, 8, 112, 112, device=DEVICE)
    fwd = lambda: p4d_loss(lat, lat_t, preds, targets, preset="paper", masks=masks, backend=backend).total  # noqa: E731
    _run(benchmark, mode_fn("full", fwd, [lat, *preds.values()]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_latent_loss_full(benchmark, backend):
    N, D_in, D_out = 2048, 512, 384
    h = torch.randn(N, D_in, device=DEVICE, requires_grad=True)
    w = (torch.randn(D_out, D_in, device=DEVICE) / D_in ** 0.5).requires_grad_(True)
    b = (0.01 * torch.randn(D_out, device=DEVICE)).requires_grad_(True)
    t = torch.randn(N, D_out, device=DEVICE)
    fwd = lambda: fused_linear_latent_loss(h, w, b, t, backend=backend)  # noqa: E731
    _run(benchmark, mode_fn("full", fwd, [h, w, b]))


# ---- end to end (bench_e2e.py at batch 1) ------------------------------------------------------

@pytest.fixture(scope="module")
def e2e():
    from benchmarks.bench_e2e import build

    return build("tiny", 1, DEVICE, regions=6)


# ---- attention (bench_attention.py's llm-tiny case: causal, 4 query / 2 key-value heads) ---------

@pytest.mark.parametrize("backend", BACKENDS if DEVICE.type == "cpu" else ["eager"])
def test_attention_full(benchmark, backend):
    q, k, v = (torch.randn(2, 211, H, 32, device=DEVICE).transpose(1, 2) for H in (4, 2, 2))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    _run(benchmark, mode_fn("full", lambda: attention(q, k, v, causal=True, backend=backend, validate=False),
                            [q, k, v]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, e2e, backend):
    import copy

    from rgpt4d.ops import set_backend

    base, _, train, _, targets = e2e
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(**train, teacher_targets=targets)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    set_backend(backend)
    try:  # a step takes about a second: three rounds after one warm-up bound the test's time
        out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
        assert _finite(out)
    finally:
        set_backend(None)
