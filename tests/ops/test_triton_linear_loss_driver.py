"""The Triton host code shared by the kernel files: kernels/linear_loss.py's chunked Linear + loss driver
(behind the LM cross-entropy and the P4D latent loss) and kernels/_common.py's accumulation dtype. The
driver is checked with a loss written in torch (0.5 ||y - t||^2 per row), against autograd in float64."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from rgpt4d.kernels import _common  # noqa: E402
from rgpt4d.kernels.linear_loss import linear_loss_chunks  # noqa: E402


def _squared_error_rows(target, rows, row_loss, calls):
    """rows_loss for the driver: row losses 0.5 ||y - t||^2 into row_loss, dL/dy = y - t written over y."""
    def rows_loss(y, c0, c1, write_grad):
        calls.append((c0, c1, write_grad))
        t = target[c0:c1] if rows is None else target.index_select(0, rows[c0:c1])
        d = y - t.to(y.dtype)
        row_loss[c0:c1] = 0.5 * (d.double() ** 2).sum(1)
        if write_grad:
            y.copy_(d)
    return rows_loss


def _reference(h, weight, bias, target, rows):
    h, weight = h.double().requires_grad_(), weight.double().requires_grad_()
    bias = bias.double().requires_grad_() if bias is not None else None
    sel = torch.arange(h.shape[0]) if rows is None else rows
    y = h[sel] @ weight.t() + (bias if bias is not None else 0)
    loss = 0.5 * ((y - target.double()[sel]) ** 2).sum()
    loss.backward()
    return loss.detach(), h.grad, weight.grad, (bias.grad if bias is not None else None)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("rows", [None, [6, 0, 3, 2]], ids=["all-rows", "selected-rows"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_driver_matches_autograd_fp64(chunk_size, rows, with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g) if with_bias else None
    target = torch.randn(7, 4, dtype=torch.float64, generator=g)
    rows = torch.tensor(rows) if rows is not None else None
    n = 7 if rows is None else rows.numel()
    row_loss, calls = torch.empty(n, dtype=torch.float64), []
    gh, gw, gb = linear_loss_chunks(h, weight, bias, chunk_size, _squared_error_rows(target, rows, row_loss, calls),
                                    True, True, True, rows=rows)
    loss, rh, rw, rb = _reference(h, weight, bias, target, rows)
    torch.testing.assert_close(row_loss.sum(), loss)
    torch.testing.assert_close(gh, rh)  # rows not selected: zero, as autograd's
    torch.testing.assert_close(gw, rw)
    if with_bias:
        torch.testing.assert_close(gb, rb)
    else:
        assert gb.numel() == 0
    assert [c[:2] for c in calls] == [(c0, min(n, c0 + chunk_size)) for c0 in range(0, n, chunk_size)]
    assert all(c[2] for c in calls)


def test_driver_bf16_accumulates_weight_grads_in_fp32_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 9, generator=g).to(torch.bfloat16)[:, ::2]  # non-contiguous [5, 5]
    weight = torch.randn(5, 3, generator=g).to(torch.bfloat16).t()  # non-contiguous [3, 5]
    bias = torch.randn(3, generator=g).to(torch.bfloat16)
    target = torch.randn(5, 3, generator=g)
    row_loss = torch.empty(5, dtype=torch.float64)
    gh, gw, gb = linear_loss_chunks(h, weight, bias, 2, _squared_error_rows(target, None, row_loss, []),
                                    True, True, True)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    loss, rh, rw, rb = _reference(h, weight, bias, target, None)
    torch.testing.assert_close(row_loss.sum(), loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.double(), rh, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gw.double(), rw, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gb.double(), rb, rtol=2e-2, atol=5e-2)


def test_driver_allocates_and_computes_only_what_is_asked():
    h, weight, target = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    row_loss, calls = torch.empty(4, dtype=torch.float64), []
    gh, gw, gb = linear_loss_chunks(h, weight, None, 3, _squared_error_rows(target, None, row_loss, calls),
                                    False, True, True)  # need_b without a bias: no grad_b
    assert gh.numel() == 0 and gw.shape == (2, 3) and gb.numel() == 0
    calls.clear()
    gh, gw, gb = linear_loss_chunks(h, weight, None, 3, _squared_error_rows(target, None, row_loss, calls),
                                    False, False, False)  # the loss only: y is left as the projection
    assert (gh.numel(), gw.numel(), gb.numel()) == (0, 0, 0) and calls == [(0, 3, False), (3, 4, False)]
    torch.testing.assert_close(row_loss, 0.5 * ((h @ weight.t() - target).double() ** 2).sum(1))
    calls.clear()
    linear_loss_chunks(h, weight, None, 3, _squared_error_rows(target, None, row_loss, calls), False, False, False,
                       need_loss=False)
    assert calls == []  # nothing wanted: no projection at all
    empty = linear_loss_chunks(h, weight, None, 3, _squared_error_rows(target, None, row_loss, calls), True, True,
                               False, rows=torch.zeros(0, dtype=torch.int64))
    assert calls == [] and torch.equal(empty[0], torch.zeros(4, 3)) and torch.equal(empty[1], torch.zeros(2, 3))


@pytest.mark.parametrize("dtypes,expected", [((torch.float32,), torch.float32), ((torch.bfloat16,), torch.float32),
                                             ((torch.float16,), torch.float32), ((torch.float64,), torch.float64),
                                             ((torch.bfloat16, torch.float64), torch.float64)])
def test_accumulation_dtype_rule(dtypes, expected):
    import triton.language as tl

    assert _common.acc_dtype(*dtypes) == expected
    assert _common.acc_types(*dtypes) == ((tl.float64 if expected == torch.float64 else tl.float32), expected)
