"""The benchmark harness checks each provider's output against eager before timing it."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Bench, compare_outputs  # noqa: E402


def test_compare_outputs():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert compare_outputs(a, a.clone()) == 0.0
    assert abs(compare_outputs(a + torch.tensor([0.0, 0.0, 0.04]), a) - 0.01) < 1e-6
    assert compare_outputs((a, a), (a,)) == float("inf")  # a missing output
    assert compare_outputs(a[:2], a) == float("inf")
    assert compare_outputs(torch.tensor([float("nan"), 1.0, 1.0]), a) == float("inf")
    assert compare_outputs(a, None) is None


def test_check_outputs_records_pass_and_failure():
    b = Bench(torch.device("cpu"))
    x = torch.randn(50)
    b.check_outputs("k", "forward", "s", {"eager": lambda: x * 2, "good": lambda: x + x, "bad": lambda: x * 2.1})
    rows = {r["provider"]: r["p50"] for r in b.rows if r["metric"] == "check_vs_eager"}
    assert rows == {"good": 1.0, "bad": 0.0}
    assert len(b.check_failures) == 1 and "bad" in b.check_failures[0]
    assert "Output check against eager" in b.markdown("t")


def test_no_memory_times_without_peak_rows():
    from benchmarks.harness import base_parser, make_bench

    x = torch.randn(64)
    fns = {"eager": lambda: x * 2, "other": lambda: x + x}
    for flag, expect_peaks in ((["--no-memory"], False), ([], True)):
        b = make_bench(base_parser("t").parse_args(["--rounds", "3", "--max-seconds", "1", *flag]), torch.device("cpu"))
        b.compare("k", "forward", "s", fns)
        metrics = {r["metric"] for r in b.rows}
        assert "time" in metrics
        assert ("peak_memory" in metrics) == expect_peaks
