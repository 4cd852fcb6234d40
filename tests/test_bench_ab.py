"""benchmarks/ab.py's reading and ratio logic on hand-written result files (nothing is timed)."""

import csv
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import ab  # noqa: E402
from benchmarks.harness import COLUMNS  # noqa: E402


def _write(folder, name, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for kernel, provider, metric, p50 in rows:
            w.writerow(dict(kernel=kernel, provider=provider, mode="full", metric=metric, unit="ms", x="small",
                            p50=p50, p20=p50, p80=p50))


def test_read_times_keeps_time_rows_of_every_csv(tmp_path):
    _write(tmp_path, "tpe-quick.csv", [("tpe_add", "eager", "time", 2.0), ("tpe_add", "eager", "peak_memory", 9.0),
                                       ("tpe_add", "rgpt4d-cpu", "time", 1.0),
                                       ("tpe_add", "rgpt4d-cpu", "speedup_vs_eager", 2.5)])
    _write(tmp_path, "other.csv", [("roi_align", "eager", "time", 3.5)])
    (tmp_path / "notes.md").write_text("not a csv")
    times, rel = ab.read_times(str(tmp_path), "tpe")
    assert times == {("tpe", "tpe_add", "full", "small", "eager"): 2.0,
                     ("tpe", "tpe_add", "full", "small", "rgpt4d-cpu"): 1.0,
                     ("tpe", "roi_align", "full", "small", "eager"): 3.5}
    assert rel == {("tpe", "tpe_add", "full", "small", "rgpt4d-cpu"): pytest.approx(0.4)}  # 1 / the speed-up
    assert ab.read_times(str(tmp_path / "missing"), "tpe") == ({}, {})


def test_spread_is_the_largest_log_ratio():
    assert ab.spread([2.0, 1.0, 1.5]) == pytest.approx(math.log(2.0))
    assert ab.spread([1.0]) is None
    assert ab.spread([3.0, 3.0]) == 0.0


def test_compare_ratio_noise_and_verdicts():
    k_slow, k_same, k_fast, k_base_only = (("b", f"k{i}", "full", "small", "p") for i in range(4))
    base = [{k_slow: 1.0, k_same: 1.0, k_fast: 2.0, k_base_only: 1.0},
            {k_slow: 1.1, k_same: 1.2, k_fast: 2.0},
            {k_slow: 1.0, k_same: 1.0, k_fast: 2.0}]
    new = [{k_slow: 1.5, k_same: 1.1, k_fast: 1.0},
           {},  # a failed run: skipped, the other rounds still count
           {k_slow: 1.6, k_same: 1.05, k_fast: 1.02}]
    rows = {r["kernel"]: r for r in ab.compare(base, new)}
    assert set(rows) == {"k0", "k1", "k2"}  # a key timed in one tree only has no row
    slow = rows["k0"]
    assert slow["base_ms"] == 1.0 and slow["new_ms"] == pytest.approx(1.55)
    assert slow["ratio"] == pytest.approx(1.55)
    assert slow["paired_ratio"] == pytest.approx(1.55)  # rounds 0 and 2: 1.5 and 1.6
    assert slow["base_noise"] == pytest.approx(1.1) and slow["new_noise"] == pytest.approx(1.6 / 1.5)
    assert slow["noise"] == pytest.approx(1.1)  # the larger of the two
    assert slow["verdict"] == "slower" and slow["rounds"] == "3/2"
    assert rows["k1"]["verdict"] == "same"  # 1.075 / 1.0 is within base's own 1.2x spread
    fast = rows["k2"]
    # its own runs spread by 1.02x only: the noise is the median of the rows' (1.1, 1.2, 1.02)
    assert fast["noise"] == pytest.approx(1.1) and fast["ratio"] == pytest.approx(0.505)
    assert fast["verdict"] == "faster"


def test_compare_relative_to_eager():
    k = ("b", "k", "full", "small", "rgpt4d-cpu")
    e = ("b", "k", "full", "small", "eager")
    base = [{k: 1.0, e: 2.0}, {k: 2.0, e: 4.0}]  # the load doubled between the base runs
    new = [{k: 1.5, e: 2.0}, {k: 3.0, e: 4.0}]
    base_rel, new_rel = [{k: 0.5}, {k: 0.5}], [{k: 0.75}, {k: 0.75}]
    rows = {r["provider"]: r for r in ab.compare(base, new, base_rel, new_rel)}
    assert rows["rgpt4d-cpu"]["verdict"] == "same"  # 1.5x within the 2x load swing
    assert rows["rgpt4d-cpu"]["rel_ratio"] == pytest.approx(1.5) and rows["rgpt4d-cpu"]["rel_noise"] == 1.0
    assert rows["rgpt4d-cpu"]["rel_verdict"] == "slower"  # against eager in the same process it is
    assert rows["eager"]["rel_ratio"] is None and rows["eager"]["rel_verdict"] == ""


def test_compare_without_repeats_gives_no_verdict():
    k = ("b", "k", "full", "small", "p")
    (row,) = ab.compare([{k: 1.0}], [{k: 3.0}])
    assert row["ratio"] == 3.0 and row["noise"] is None and row["verdict"] == "n/a"


def test_markdown_and_csv_carry_every_row(tmp_path):
    k1, k2 = ("tpe", "a", "full", "small", "eager"), ("e2e", "train_step", "full", "tiny-B1", "rgpt4d-cpu")
    rows = ab.compare([{k1: 1.0, k2: 100.0}, {k1: 1.0, k2: 110.0}], [{k1: 2.0, k2: 100.0}, {k1: 2.0, k2: 100.0}])
    md = ab.markdown(rows, ["header line"], ["e2e new round 1 (exit 1)"])
    assert "header line" in md and "e2e new round 1 (exit 1)" in md
    assert "| tpe | a | full | small | eager | 1 | 2 | 2 | 2 | 1.05 | slower | - | - | - |" in md  # noise: median 1.0, 1.1
    assert "| tpe | 1 | 2 |" in md  # per-benchmark geometric mean
    path = tmp_path / "ab.csv"
    ab.write_csv(str(path), rows)
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["kernel"] for r in got] == ["a", "train_step"]
    assert float(got[1]["ratio"]) == pytest.approx(100 / 105)
    assert got[1]["verdict"] == "same"


def test_geomean():
    assert ab.geomean([2.0, 0.5, None]) == pytest.approx(1.0)
    assert ab.geomean([]) is None
