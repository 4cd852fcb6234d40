"""The linear probe of depth and motion from visual-token features (rgpt4d.train.probe)."""

import pytest
import torch

from rgpt4d.train.probe import cell_means, ridge_probe, window_features


def test_probe_scores_linear_features_high_and_noise_near_zero():
    g = torch.Generator().manual_seed(0)
    n, d = 1200, 24
    X = torch.randn(2 * n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = X @ w + 0.1 * torch.randn(2 * n, generator=g)
    good = ridge_probe(X[:n], y[:n], X[n:], y[n:])
    assert good["r2"] > 0.98 and good["n_fit"] == n and good["n_eval"] == n
    noise = torch.randn(2 * n, generator=g)  # a target the features do not encode
    bad = ridge_probe(X[:n], noise[:n], X[n:], noise[n:])
    assert -0.05 < bad["r2"] < 0.03
    # features that are noise, for a target that is not
    junk = ridge_probe(torch.randn(n, d, generator=g), y[:n], torch.randn(n, d, generator=g), y[n:])
    assert -0.05 < junk["r2"] < 0.03
    # a strong ridge is picked when the fit set is small and the features many
    few = ridge_probe(torch.randn(60, 200, generator=g), y[:60], torch.randn(100, 200, generator=g), y[:100])
    assert few["strength"] >= 10.0 and few["r2"] < 0.1


def test_probe_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        ridge_probe(torch.randn(10, 3), torch.randn(9), torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match="too few samples"):
        ridge_probe(torch.randn(3, 3), torch.randn(3), torch.randn(5, 3), torch.randn(5))


def test_cell_means_and_window_features_match_loops():
    x = torch.rand(2, 3, 16, 16)
    got = cell_means(x, 16, 2, 3)  # cells of 6 pixels: [0, 6), [6, 12), [12, 16)
    assert got.shape == (2, 3, 3, 3)
    edges = [(0, 6), (6, 12), (12, 16)]
    for i, (a, b) in enumerate(edges):
        for j, (c, d) in enumerate(edges):
            torch.testing.assert_close(got[..., i, j], x[..., a:b, c:d].mean((-1, -2)))
    # a map at another resolution is area-resized to the image size first
    torch.testing.assert_close(cell_means(x.repeat_interleave(2, -1).repeat_interleave(2, -2), 16, 2, 3), got)
    f = torch.randn(4, 5, 5, 7)  # a 5x5 patch grid, window 2 -> 3x3 cells
    wf = window_features(f, 2)
    assert wf.shape == (4, 3, 3, 2 * 2 * 7)
    cell = torch.zeros(4, 7, 2, 2)
    cell[:, :, :1, :1] = f[:, 4:, 4:].permute(0, 3, 1, 2)  # the corner cell: one patch, zeros past the edge
    torch.testing.assert_close(wf[:, 2, 2], cell.flatten(1))
    torch.testing.assert_close(wf[:, 0, 1], f[:, 0:2, 2:4].permute(0, 3, 1, 2).flatten(1))
