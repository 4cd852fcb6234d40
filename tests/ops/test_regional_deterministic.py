"""The deterministic RoI-pooling backward of the Triton kernels (entries sorted by target pixel,
segmented sums), under the interpreter: values against the float64 reference and the atomic path,
bitwise repeatability across runs, thread counts and launch geometries (tile sizes), several passes
when the entry list is capped, every layout and dtype. Sizes stay small: an interpreted program
costs about a millisecond."""

import pytest
import torch

from rgpt4d.kernels import regional as K
from rgpt4d.ops import region_pool, roi_align, roi_align_eager
from tests.ops.test_regional_roi_align import make_rois


def _grads(x, rois, g, output_size, sr, aligned, deterministic, **kw):
    out = roi_align(x, rois, output_size, 0.5, sr, aligned, backend="triton", **kw)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return torch.autograd.grad(out, x, g)[0]
    finally:
        torch.use_deterministic_algorithms(False)


def _reference(x, rois, g, output_size, sr, aligned):
    x64 = x.detach().double().requires_grad_(True)
    out = roi_align_eager(x64, rois.double(), output_size, 0.5, sr, aligned)
    return torch.autograd.grad(out, x64, g.double())[0]


@pytest.mark.parametrize("sr, aligned", [(2, False), (-1, True)])
def test_values_match_float64_reference_and_atomic_path(sr, aligned):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 7, requires_grad=True)
    rois = make_rois(12, 2, 18, 14, max_size=12.0)  # box coordinates at scale 0.5: many overlaps
    g = torch.randn(12, 5, 2, 3)
    det = _grads(x, rois, g, (2, 3), sr, aligned, True)
    atomic = _grads(x, rois, g, (2, 3), sr, aligned, False)
    ref = _reference(x, rois, g, (2, 3), sr, aligned)
    torch.testing.assert_close(det.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(det, atomic, atol=1e-5, rtol=1e-5)


def test_bitwise_repeatable_across_runs_threads_and_tiles():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 8, 8, requires_grad=True)
    rois = make_rois(16, 1, 16, 16, max_size=14.0)
    g = torch.randn(16, 6, 2, 2)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(_grads(x, rois, g, (2, 2), 2, True, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    # other tile shapes (pixels x channels per program): each pixel still sums its entries in one order
    roi_img = K._roi_images_from_rois(rois, 1)
    grad = g.contiguous()
    for blocks in ((4, 2), (32, 8), (1, 1)):
        other = K._pool_bwd_sorted(grad, rois[:, 1:].contiguous(), roi_img, 1, (1, 6, 8, 8), 1, False, 0.5, 2, 2, 2,
                                   True, blocks=blocks)
        assert torch.equal(other, runs[0]), blocks


def test_capped_entry_list_runs_in_passes():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    rois = make_rois(7, 2, 12, 12, max_size=10.0)
    g = torch.randn(7, 3, 2, 2)
    roi_img = K._roi_images_from_rois(rois, 2)
    one = K._pool_bwd_sorted(g, rois[:, 1:].contiguous(), roi_img, 2, (2, 3, 6, 6), 1, False, 0.5, 2, 2, -1, False)
    for cap in (4, 36):  # one sample per pass; a few RoIs per pass (RoIs cut between passes)
        passes = K._pool_bwd_sorted(g, rois[:, 1:].contiguous(), roi_img, 2, (2, 3, 6, 6), 1, False, 0.5, 2, 2, -1,
                                    False, max_entries=cap)
        torch.testing.assert_close(passes, one, atol=1e-6, rtol=1e-6)
        again = K._pool_bwd_sorted(g, rois[:, 1:].contiguous(), roi_img, 2, (2, 3, 6, 6), 1, False, 0.5, 2, 2, -1,
                                   False, max_entries=cap)
        assert torch.equal(passes, again)
    torch.testing.assert_close(one.double(), _reference(x, rois, g, (2, 2), -1, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes_and_channels_last(dtype):
    torch.manual_seed(3)
    x = torch.randn(1, 4, 6, 5).to(dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    rois = make_rois(5, 1, 12, 10, max_size=10.0)
    g = torch.randn(5, 4, 2, 2).to(dtype)
    det = _grads(x, rois, g, (2, 2), 2, True, True)
    assert det.dtype == dtype and det.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(x, rois, g, (2, 2), 2, True)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(det.double(), ref, **tol)


def test_skipped_rois_non_finite_boxes_and_no_rois():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    rois = make_rois(4, 2, 10, 10, max_size=8.0)
    rois[1, 1] = float("nan")  # samples nothing
    rois[2, 0] = 5.0  # batch index out of range (validate=False): skipped
    g = torch.randn(4, 3, 2, 2)
    det = _grads(x, rois, g, (2, 2), 2, False, True, validate=False)
    keep = torch.tensor([True, False, False, True])
    ref = _reference(x, rois[keep], g[keep], (2, 2), 2, False)
    torch.testing.assert_close(det.double(), ref, atol=1e-5, rtol=1e-5)
    empty = _grads(x, rois[:0], g[:0], (2, 2), 2, False, True)
    assert torch.equal(empty, torch.zeros_like(x))


def test_region_pool_with_valid_mask():
    torch.manual_seed(4)
    B, T, R, C, H, W = 1, 2, 3, 4, 6, 6
    f = torch.randn(B, T, C, H, W, requires_grad=True)
    xy = torch.rand(B, T, R, 2) * 4
    boxes = torch.cat([xy, xy + 1 + torch.rand(B, T, R, 2) * 4], -1)
    valid = torch.rand(B, T, R) > 0.3
    out = region_pool(f, boxes, sampling_ratio=2, valid=valid, backend="triton")
    g = torch.randn_like(out)
    torch.use_deterministic_algorithms(True)
    try:
        det = torch.autograd.grad(out, f, g, retain_graph=True)[0]
    finally:
        torch.use_deterministic_algorithms(False)
    atomic = torch.autograd.grad(out, f, g)[0]
    f64 = f.detach().double().requires_grad_(True)
    ref_out = region_pool(f64, boxes.double(), sampling_ratio=2, valid=valid, backend="eager")
    ref = torch.autograd.grad(ref_out, f64, g.double())[0]
    torch.testing.assert_close(det.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(det, atomic, atol=1e-5, rtol=1e-5)


# ---- the CUDA version's shared math (csrc/regional/regional_math.h), run by the CPU build ----------

def _need_extension():
    from rgpt4d.ops import registry
    if not registry.extension_loaded():
        pytest.skip(f"the compiled extension is not built: {registry.unavailable_reasons()}")


@pytest.mark.parametrize("sr, aligned", [(2, True), (-1, False)])
def test_cuda_entry_math_matches_triton_and_gives_the_reference_gradient(sr, aligned):
    _need_extension()
    torch.manual_seed(5)
    N, C, H, W, ph, pw = 2, 3, 7, 6, 2, 3
    x = torch.randn(N, C, H, W)
    rois = make_rois(9, N, 2 * H, 2 * W, max_size=12.0)
    rois[4, 0] = -1.0  # skipped
    g = torch.randn(9, C, ph, pw)
    roi_img = K._roi_images_from_rois(rois, N)
    boxes = rois[:, 1:].contiguous()
    keys, rows, w = torch.ops.rgpt4d._roi_backward_entries(boxes, roi_img, 0.5, ph, pw, sr, aligned, N, H, W)
    # the Triton kernels build the same list (same order, same keys and rows)
    counts = torch.empty(9, dtype=torch.int64)
    common = dict(ALIGNED=aligned, ACC=K.tl.float32)
    K._roi_sample_counts_kernel[(1,)](boxes, roi_img, counts, 9, 0.5, ph, pw, sr, BLOCK_K=16, **common)
    total = int(counts.sum())
    assert keys.numel() == 4 * total
    tk, tr, tw = (torch.empty(4 * total, dtype=d) for d in (torch.int64, torch.int64, torch.float32))
    K._roi_entries_kernel[(9,)](boxes, roi_img, torch.cumsum(counts, 0) - counts, tk, tr, tw, 0, total, N * H * W, H, W,
                                0.5, ph, pw, sr, BLOCK_S=64, **common)
    assert torch.equal(keys, tk) and torch.equal(rows, tr)
    torch.testing.assert_close(w, tw, atol=1e-6, rtol=1e-6)
    # sorted by pixel and summed, the list is the gradient
    keys, perm = torch.sort(keys, stable=True)
    gt = g.double().reshape(9, C, ph * pw).transpose(1, 2).reshape(-1, C)
    flat = torch.zeros(N * H * W + 1, C, dtype=torch.float64)
    flat.index_add_(0, keys, w[perm].double()[:, None] * gt[rows[perm]])
    got = flat[:-1].view(N, H, W, C).permute(0, 3, 1, 2)
    keep = roi_img >= 0
    torch.testing.assert_close(got, _reference(x, rois[keep], g[keep], (ph, pw), sr, aligned), atol=1e-5, rtol=1e-5)


def test_cuda_grid_rows_cover_more_than_65535_rows():
    _need_extension()
    grid_rows = torch.ops.rgpt4d._regional_grid_rows
    assert [grid_rows(n) for n in (0, 1, 7, 65535)] == [1, 1, 7, 65535]
    for rows in (65536, 70001, 3 * 65535 + 2):  # B*T*R masks (mask_pool's resize transpose), B*T frames
        grid = grid_rows(rows)
        assert grid <= 65535
        # the kernels stride blockIdx.y, + gridDim.y, ...: every row exactly once
        seen = torch.zeros(rows, dtype=torch.int64)
        for y in range(grid):
            seen[y::grid] += 1
        assert bool((seen == 1).all())
