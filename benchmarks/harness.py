"""Shared benchmark harness for benchmarks/*.py.

- Providers (eager, torch.compile, each rgpt4d backend on the device) are plain callables.
- Modes: "forward", "backward" (the backward of one retained forward graph), "full" (forward +
  backward), "nograd" (forward under torch.no_grad()).
- Time: median, p20, p80 of per-call wall times on CPU (perf_counter around each call, after a
  warm-up); on CUDA, triton.testing.do_bench (CUDA events, L2 flushed). Each call is wrapped in
  an NVTX range "<kernel>/<provider>/<mode>" (nvtx package) for Nsight Systems.
- Peak memory: on CUDA, torch.cuda.max_memory_allocated() above what was allocated before the
  call. On CPU, the same quantity from the torch profiler's memory events (profile_memory=True):
  every CPU tensor allocation and free reports the running total of bytes allocated while the
  profiler is on, through torch's CPU allocator and rgpt4d's CPU output cache alike
  (csrc/cpu/pool.cpp reports its blocks); the peak of that total during the call, minus
  its value before the call, is the tensor memory the call held at once (gradients it returns
  included), independent of glibc, page faults and other processes. Measured on a second call
  (the first creates lazy state: compiled graphs, caches). Allocations made inside another
  library's worker threads (none in these ops' hot paths) are not seen.
  Also reported, as metric "peak_rss": the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs) above its resident set right before the call, with glibc's mmap
  threshold pinned at 64 KiB and its heaps trimmed first. It counts pages rather than tensors and
  varies from run to run (by about 2x for the eager P4D loss: glibc, transparent huge pages and
  the kernel's lazily synced RSS counters), so the ratios use the profiler's number.
- Bandwidth: bytes the op must move at minimum / median time, and that as a fraction of a
  same-size Tensor.copy_ into a preallocated tensor ("copy_fraction": the streaming floor) and of
  Tensor.clone() ("clone_fraction": the floor for an op that allocates its output, which on CPU
  also pays the page faults of a fresh buffer), and of Tensor.sum() over the same bytes
  ("read_fraction": the floor of a reduction that reads its input once, e.g. a table gradient),
  all measured in the same run.
- Interleaving (Bench.compare, CPU): round after round, one call of each provider (the order
  reversed every other round), so load changes hit all alike; speed-ups are also reported paired
  (metric speedup_vs_<baseline>: the median over rounds of the per-round time ratio).
- GFLOP/s for ops with a matmul part (flops=...); roofline lines (Bench.roofline_lines): the
  minimum bytes and FLOPs, the floor time on an H100 (3.35 TB/s, 990 dense bf16 TFLOP/s) and the
  achieved fraction on CUDA; on CPU the same model against the copy_ bandwidth of this run.
- Output (Bench.finish): rows with stable columns (COLUMNS) to CSV, a markdown summary (ratios,
  times, peak memory, roofline lines) and a PNG per kernel (time against size per provider, one
  panel per mode; peak-memory bars).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Every (shape, mode) of a benchmark compiles its own graph for the torch.compile provider;
# without a higher limit dynamo would silently fall back to eager after 8 recompiles.
with contextlib.suppress(AttributeError):
    torch._dynamo.config.recompile_limit = 256
with contextlib.suppress(AttributeError):
    torch._dynamo.config.cache_size_limit = 256
with contextlib.suppress(AttributeError):
    torch._dynamo.config.accumulated_recompile_limit = 4096

COLUMNS = ["kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "config", "device",
           "torch", "triton", "git_sha", "timestamp"]
MODES = ("forward", "backward", "full", "nograd")
PAIRED_BASELINES = ("eager", "compile")

# H100 SXM roofline constants used for the GPU floor (issue 8): HBM3 bandwidth and dense bf16.
H100_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 990e12
# Nominal peaks (memory bytes/s, dense bf16 FLOP/s) of the GPUs a check may run on, from the vendors'
# data sheets, matched against torch.cuda.get_device_name(); others fall back to the H100 SXM's.
NOMINAL_PEAKS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 990e12),
                 ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100", 1.555e12, 312e12), ("L40S", 0.864e12, 362e12)]


def nominal_peak(device: torch.device) -> tuple[str, float, float]:
    """(name, bytes/s, bf16 FLOP/s) of this GPU's data-sheet roofline (the H100 SXM's on CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, bw, flops in NOMINAL_PEAKS:
        if key in name:
            return key, bw, flops
    return "H100", H100_BYTES_PER_S, H100_BF16_FLOPS


# Output check inside the benchmark: each provider's outputs (and gradients, in the backward modes)
# against the eager provider's in the same run, max |out - eager| / max |eager| per tensor.
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def compare_outputs(out, ref) -> Optional[float]:
    """Largest relative error of out's tensors against ref's (inf on a shape mismatch or a non-finite
    value); None when there is nothing to compare."""
    a, b = _tensors(out), _tensors(ref)
    if not b:
        return None
    if len(a) != len(b):
        return float("inf")
    err = 0.0
    for x, r in zip(a, b):
        if x.shape != r.shape:
            return float("inf")
        if r.numel() == 0:
            continue
        x, r = x.detach().double(), r.detach().double()
        if not torch.isfinite(x).all():
            return float("inf")
        scale = r.abs().max().item()
        err = max(err, (x - r).abs().max().item() / (scale if scale > 0 else 1.0))
    return err


# ---- environment --------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{os.cpu_count()}cores"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc M_MMAP_THRESHOLD (fixing it also turns off glibc's dynamic threshold)."""
    if platform.system() != "Linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))


# While timing: glibc's largest threshold (32 MiB), so medium temporaries come from the heap as in a
# warmed-up process. While measuring peak memory: 64 KiB, so freed tensors leave the RSS at once.
_TIMING_MMAP_THRESHOLD = 32 * 2**20
_PEAK_MMAP_THRESHOLD = 64 * 2**10


def _malloc_trim() -> None:
    """Give the free memory of glibc's heaps back to the OS (so the next peak counts what a call
    touches, not what it reuses of memory freed earlier, e.g. while timing)."""
    if platform.system() != "Linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    return int(info["VmRSS"].split()[0]) * 1024, int(info["VmHWM"].split()[0]) * 1024


def cpu_peak_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _rss_bytes()
        return True
    except OSError:
        return False


# ---- measurement --------------------------------------------------------------------------

def nvtx_range(name: str):
    try:
        import nvtx

        return nvtx.annotate(name)
    except ImportError:
        return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, rep: int = 15,
            max_seconds: float = 5.0, label: str = "") -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        with nvtx_range(label):
            q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rep and (time.perf_counter() - start < max_seconds or len(times) < 3):
        t0 = time.perf_counter()
        with nvtx_range(label):
            fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra bytes of tensor memory the call holds at its peak (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_tensor_peak(fn)


def cpu_tensor_peak(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes of CPU tensor memory allocated by fn() and live at once, from the profiler's
    memory events (the running total each allocation and free reports); None if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    fn()  # once, so lazily created state (compiled graphs, caches) is not counted
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        events = _allocation_events(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError:
        return None
    if not events:
        return 0
    events.sort()
    # total_allocated is the reporter's running total after each event; before the first event
    # it was the first total minus the first event's size
    base = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - base)


def _allocation_events(nodes) -> list:
    """(time ns, bytes (+alloc / -free), running total) of the CPU allocation events in a profiler
    event tree."""
    out, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        ef = node.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation" and ef.device.type == "cpu":
            out.append((node.start_time_ns, int(ef.alloc_size), int(ef.total_allocated)))
        stack.extend(node.children)
    return out


def peak_rss(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Extra resident memory the call touched at its peak (VmHWM; see the module docstring)."""
    if device.type != "cpu" or not cpu_peak_memory_supported():
        return None
    gc.collect()
    _set_mmap_threshold(_PEAK_MMAP_THRESHOLD)
    try:
        _malloc_trim()
        fn()  # once, so lazily created state (compiled graphs, caches) is not counted
        gc.collect()
        # ... but the kernels' output cache is emptied, so the measured call pays for its outputs
        # afresh (with blocks cached from the first call it would look free)
        from rgpt4d.ops import empty_cpu_cache

        empty_cpu_cache()
        _malloc_trim()
        before, _ = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        _, peak = _rss_bytes()
    finally:
        _set_mmap_threshold(_TIMING_MMAP_THRESHOLD)
    return max(0, peak - before)


def copy_bandwidth(nbytes: int, device: torch.device, allocate: bool = False) -> float:
    """Bytes/s moved (read + written) by Tensor.copy_ of an nbytes tensor into a preallocated
    one, or (allocate=True) by Tensor.clone(), which like any out-of-place op also pays for a
    fresh output (on CPU: page faults on first touch)."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fn = src.clone if allocate else (lambda: dst.copy_(src))
    p50, _, _ = time_fn(fn, device, warmup=3, rep=20, label="clone" if allocate else "copy_")
    return 2 * n * 4 / (p50 * 1e-3)


# ---- rows -----------------------------------------------------------------------------------

@dataclass
class Bench:
    """Collects rows for one script run."""

    device: torch.device
    rows: list = field(default_factory=list)
    copy_bw: dict = field(default_factory=dict)
    # (kernel, mode, x) -> {"bytes": minimum bytes moved, "flops": FLOPs, "copy_bw": copy_ bytes/s
    # measured in this run}: the work model behind the roofline lines
    work: dict = field(default_factory=dict)
    # defaults of compare(): interleaved rounds at most, and seconds after which no new round starts
    rounds: int = 15
    max_seconds: float = 20.0
    load_before: tuple = field(default_factory=lambda: _loadavg())
    # output checks against eager that failed: "kernel mode x provider: error > tolerance"
    check_failures: list = field(default_factory=list)
    # a regular expression: only the cases whose size label x matches it are run (None: all)
    only_x: Optional[str] = None
    # False: time only, no peak-memory rows (each peak costs two more calls under the profiler)
    memory: bool = True

    def skip(self, x: str) -> bool:
        import re

        return self.only_x is not None and re.search(self.only_x, x) is None

    def __post_init__(self):
        if self.device.type == "cpu":
            _set_mmap_threshold(_TIMING_MMAP_THRESHOLD)

    def add_row(self, kernel, provider, mode, metric, unit, x, p50, p20=None, p80=None, config=""):
        self.rows.append(dict(kernel=kernel, provider=provider, mode=mode, metric=metric, unit=unit, x=x,
                              p50=p50, p20=p50 if p20 is None else p20, p80=p50 if p80 is None else p80,
                              config=config, device=device_name(self.device), torch=torch.__version__,
                              triton=_triton_version(), git_sha=git_sha(),
                              timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))

    def copy_floor(self, nbytes: int, allocate: bool = False) -> float:
        key = (int(nbytes), allocate)  # measured once per size, in this run
        if key not in self.copy_bw:
            self.copy_bw[key] = copy_bandwidth(int(nbytes), self.device, allocate)
        return self.copy_bw[key]

    def measure(self, kernel: str, provider: str, mode: str, x: str, fn: Callable[[], object], *,
                config: str = "", min_bytes: Optional[int] = None, flops: Optional[float] = None,
                memory: bool = True, copy_bytes: Optional[int] = None) -> float:
        """Time (and peak memory of) fn; returns the median ms. min_bytes: bytes the op must move
        at least (for GB/s and the fraction of copy bandwidth)."""
        if self.skip(x):
            return float("nan")
        label = f"{kernel}/{provider}/{mode}"
        p50, p20, p80 = time_fn(fn, self.device, label=label)
        self.add_row(kernel, provider, mode, "time", "ms", x, p50, p20, p80, config)
        if memory:
            self._add_peaks(kernel, provider, mode, x, fn, config)
        self._record_work(kernel, mode, x, min_bytes, flops,
                          self.copy_floor(copy_bytes or min_bytes) if min_bytes else None)
        if min_bytes:
            gbs = min_bytes / (p50 * 1e-3) / 1e9
            self.add_row(kernel, provider, mode, "bandwidth", "GB/s", x, gbs, config=config)
            floor = self.copy_floor(copy_bytes or min_bytes)
            self.add_row(kernel, provider, mode, "copy_fraction", "ratio", x, gbs * 1e9 / floor, config=config)
            floor = self.copy_floor(copy_bytes or min_bytes, allocate=True)
            self.add_row(kernel, provider, mode, "clone_fraction", "ratio", x, gbs * 1e9 / floor, config=config)
        if self.device.type == "cuda" and (min_bytes or flops):
            _, bw, fl = nominal_peak(self.device)
            floor = max((min_bytes or 0) / bw, (flops or 0) / fl)
            self.add_row(kernel, provider, mode, "nominal_floor_fraction", "ratio", x, floor / (p50 * 1e-3),
                         config=config)
        if flops:
            self.add_row(kernel, provider, mode, "gflops", "GFLOP/s", x, flops / (p50 * 1e-3) / 1e9, config=config)
        return p50

    def _add_peaks(self, kernel, provider, mode, x, fn, config) -> None:
        if not self.memory:
            return
        peak = peak_memory(fn, self.device)
        if peak is not None:
            self.add_row(kernel, provider, mode, "peak_memory", "MB", x, peak / 2**20, config=config)
        rss = peak_rss(fn, self.device)
        if rss is not None:
            self.add_row(kernel, provider, mode, "peak_rss", "MB", x, rss / 2**20, config=config)

    def compare(self, kernel: str, mode: str, x: str, fns: dict, *, config: str = "",
                min_bytes: Optional[int] = None, flops: Optional[float] = None, memory: bool = True,
                copy_bytes: Optional[int] = None, rounds: Optional[int] = None,
                max_seconds: Optional[float] = None, read_of: Optional[torch.Tensor] = None) -> dict:
        """Time several providers of one (kernel, mode, x) *interleaved*: round after round, one
        call of each provider (and of the copy_/clone references when min_bytes is given), so a
        change in machine load hits all of them alike. Returns {provider: median ms}.

        read_of: the tensor the read_fraction reference (Tensor.sum()) reads, e.g. the
        grad_output a backward reduces (default: the copy_ reference's source, copy_bytes long).

        On CUDA each provider is timed with do_bench instead (the GPU is not shared).

        Before timing, each provider's outputs are checked against the eager provider's (check_outputs).
        A case whose x does not match --only-x is skipped (returns {})."""
        if self.skip(x):
            return {}
        self.check_outputs(kernel, mode, x, fns, config)
        if self.device.type == "cuda":
            return {name: self.measure(kernel, name, mode, x, fn, config=config, min_bytes=min_bytes,
                                       flops=flops, memory=memory, copy_bytes=copy_bytes)
                    for name, fn in fns.items()}
        rounds = self.rounds if rounds is None else rounds
        max_seconds = self.max_seconds if max_seconds is None else max_seconds
        refs = {}
        if min_bytes:
            n = max(1, (copy_bytes or min_bytes) // 4)
            src = torch.randn(n, device=self.device)
            dst = torch.empty_like(src)
            read_src = src if read_of is None else read_of
            refs = {"__copy_": lambda: dst.copy_(src), "__clone": src.clone, "__read": read_src.sum}
        everything = {**fns, **refs}
        for fn in everything.values():  # warm up (and compile) each once
            for _ in range(2):
                fn()
        times: dict = {name: [] for name in everything}
        start = time.perf_counter()
        # the order is reversed every other round: no provider always runs after the same neighbour
        order = list(everything.items())
        for r in range(rounds):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                with nvtx_range(f"{kernel}/{name}/{mode}"):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if r >= 2 and time.perf_counter() - start > max_seconds:
                break

        def q(v, f):
            v = sorted(v)
            return v[min(len(v) - 1, int(round(f * (len(v) - 1))))]

        moved = 2 * ((copy_bytes or min_bytes or 0) // 4) * 4
        self._record_work(kernel, mode, x, min_bytes, flops,
                          moved / (statistics.median(times["__copy_"]) * 1e-3) if min_bytes else None)
        medians = {}
        for name, fn in fns.items():
            v = times[name]
            p50 = statistics.median(v)
            medians[name] = p50
            self.add_row(kernel, name, mode, "time", "ms", x, p50, q(v, 0.2), q(v, 0.8), config)
            if memory:
                self._add_peaks(kernel, name, mode, x, fn, config)
            if min_bytes:
                gbs = min_bytes / (p50 * 1e-3) / 1e9
                self.add_row(kernel, name, mode, "bandwidth", "GB/s", x, gbs, config=config)
                # Fractions of a reference's bandwidth, paired like the speed-ups: per round, this
                # provider's GB/s over the reference's GB/s in the same round, then the median
                # over rounds (p20 / p80 kept): a drift in machine load between rounds cancels.
                # Tensor.sum() (read_fraction) reads read_of, or else the copy's source, once: the
                # floor of a reduction.
                read_bytes = moved // 2 if read_of is None else read_of.numel() * read_of.element_size()
                for ref, metric, ref_bytes in (("__copy_", "copy_fraction", moved), ("__clone", "clone_fraction", moved),
                                               ("__read", "read_fraction", read_bytes)):
                    pairs = [(min_bytes / tp) / (ref_bytes / tr) for tp, tr in zip(v, times[ref]) if tp > 0 and tr > 0]
                    self.add_row(kernel, name, mode, metric, "ratio", x, statistics.median(pairs), q(pairs, 0.2),
                                 q(pairs, 0.8), config)
            if flops:
                self.add_row(kernel, name, mode, "gflops", "GFLOP/s", x, flops / (p50 * 1e-3) / 1e9, config=config)
        # Paired speed-ups: the median over rounds of baseline time / provider time within a round
        # (calls seconds apart), steadier than a ratio of medians when the machine's load drifts.
        for base in PAIRED_BASELINES:
            if base not in fns:
                continue
            for name in fns:
                if name != base:
                    pairs = [tb / tp for tb, tp in zip(times[base], times[name]) if tp > 0]
                    self.add_row(kernel, name, mode, f"speedup_vs_{base}", "ratio", x, statistics.median(pairs),
                                 q(pairs, 0.2), q(pairs, 0.8), config)
        return medians

    def check_outputs(self, kernel: str, mode: str, x: str, fns: dict, config: str = "") -> None:
        """One call of each provider, its outputs compared with the "eager" provider's (rows
        max_rel_err_vs_eager and check_vs_eager: 1 pass, 0 fail; failures also in check_failures).
        Nothing is checked without an eager provider or when eager returns no tensor."""
        if "eager" not in fns:
            return
        ref = [t.detach().clone() for t in _tensors(fns["eager"]())]
        if not ref:
            return
        tol = max(CHECK_TOL.get(t.dtype, 0.0) for t in ref if t.is_floating_point()) if any(
            t.is_floating_point() for t in ref) else 0.0
        for name, fn in fns.items():
            if name == "eager":
                continue
            err = compare_outputs(fn(), ref)
            if err is None:
                continue
            ok = err <= tol
            self.add_row(kernel, name, mode, "max_rel_err_vs_eager", "ratio", x, err, config=config)
            self.add_row(kernel, name, mode, "check_vs_eager", "pass", x, 1.0 if ok else 0.0, config=config)
            if not ok:
                self.check_failures.append(f"{kernel} {mode} {x} {name}: {err:.3g} > {tol:g}")
                print(f"[bench] OUTPUT CHECK FAILED: {self.check_failures[-1]}", flush=True)

    # ---- output ---------------------------------------------------------------------------

    def write_csv(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    def table(self, metric: str = "time") -> str:
        rows = [r for r in self.rows if r["metric"] == metric]
        if not rows:
            return ""
        unit = rows[0]["unit"]
        out = [f"| kernel | mode | x | provider | p50 {unit} | p20 | p80 |", "|---|---|---|---|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['kernel']} | {r['mode']} | {r['x']} | {r['provider']} | {r['p50']:.4g} | "
                       f"{r['p20']:.4g} | {r['p80']:.4g} |")
        return "\n".join(out)

    def value(self, kernel, provider, mode, x, metric="time"):
        for r in self.rows:
            if (r["kernel"], r["provider"], r["mode"], r["x"], r["metric"]) == (kernel, provider, mode, x, metric):
                return r["p50"]
        return None

    def ratios(self, provider: str, baselines=("eager", "compile")) -> str:
        """Speed-up of `provider` over each baseline, per (kernel, mode, x), from the same run: the
        paired (per-round) median ratio when the providers were interleaved, else the ratio of medians."""
        out = [f"| kernel | mode | x | {provider} ms | " + " | ".join(f"vs {b}" for b in baselines) +
               " | peak MB | peak vs eager |", "|---|---|---|---:|" + "---:|" * (len(baselines) + 2)]
        seen = set()
        for r in self.rows:
            key = (r["kernel"], r["mode"], r["x"])
            if r["metric"] != "time" or r["provider"] != provider or key in seen:
                continue
            seen.add(key)
            t = r["p50"]
            cells = []
            for b in baselines:
                paired = self.value(key[0], provider, key[1], key[2], f"speedup_vs_{b}")
                tb = self.value(*key[:1], b, *key[1:])
                cells.append(f"{paired:.2f}x" if paired is not None else (f"{tb / t:.2f}x" if tb else "-"))
            mem = self.value(key[0], provider, key[1], key[2], "peak_memory")
            mem_e = self.value(key[0], "eager", key[1], key[2], "peak_memory")
            mem_ratio = f"{mem / mem_e:.2f}" if (mem is not None and mem_e) else "-"
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {t:.4g} | " + " | ".join(cells) +
                       f" | {'-' if mem is None else f'{mem:.1f}'} | {mem_ratio} |")
        return "\n".join(out)


    # ---- roofline, markdown, plots ----------------------------------------------------------

    def _record_work(self, kernel, mode, x, min_bytes, flops, copy_bw) -> None:
        if min_bytes or flops:
            self.work[(kernel, mode, x)] = {"bytes": min_bytes or 0, "flops": flops or 0.0, "copy_bw": copy_bw}

    def roofline_lines(self) -> list[str]:
        """One line per (kernel, mode, x, provider) with a work model: the minimum bytes and FLOPs,
        the floor time at the GPU's nominal peaks (on CPU: the H100 SXM's, HBM 3.35 TB/s, dense
        bf16 990 TFLOP/s) and, on CUDA, the fraction of it achieved; on both the floor at the copy_
        bandwidth measured in this run and the fraction achieved (the matmul part is reported as
        GFLOP/s on CPU: there is no CPU FLOP roof here)."""
        out = []
        peak, bw, fl = nominal_peak(self.device)
        for (kernel, mode, x), w in self.work.items():
            nominal = max(w["bytes"] / bw, w["flops"] / fl)
            for r in self.rows:
                if (r["kernel"], r["mode"], r["x"], r["metric"]) != (kernel, mode, x, "time"):
                    continue
                t = r["p50"] * 1e-3
                line = (f"roofline {kernel} {mode} {x} {r['provider']}: min {w['bytes'] / 1e6:.1f} MB, "
                        f"{w['flops'] / 1e9:.2f} GFLOP; {peak} floor {nominal * 1e3:.4g} ms")
                if self.device.type == "cuda":
                    line += f", measured {t * 1e3:.4g} ms = {nominal / t:.1%} of the {peak} floor"
                else:
                    line += f"; measured {t * 1e3:.4g} ms"
                if w["copy_bw"] and w["bytes"]:
                    floor = w["bytes"] / w["copy_bw"]
                    line += (f"; floor at this run's copy_ bandwidth ({w['copy_bw'] / 1e9:.1f} GB/s) "
                             f"{floor * 1e3:.4g} ms = {floor / t:.1%} achieved")
                if w["flops"] and self.device.type == "cpu":
                    line += f"; {w['flops'] / t / 1e9:.1f} GFLOP/s"
                out.append(line)
        return out

    def providers(self) -> list[str]:
        seen: dict = {}
        for r in self.rows:
            seen.setdefault(r["provider"], None)
        return list(seen)

    def markdown(self, title: str, ours: Optional[list] = None, baselines=("eager", "compile")) -> str:
        """The summary of a run: environment and load, ratio tables, times, roofline lines."""
        ours = ours if ours is not None else [p for p in self.providers() if p.startswith("rgpt4d")]
        present = tuple(b for b in baselines if b in self.providers())
        after = _loadavg()
        lines = [f"# {title}", "",
                 f"{device_name(self.device)}, torch {torch.__version__}, triton {_triton_version()}, "
                 f"{torch.get_num_threads()} threads, git {git_sha()}, "
                 f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
                 f"load average (1/5/15 min) at start {_fmt_load(self.load_before)}, at end {_fmt_load(after)}", ""]
        for p in ours:
            lines += [f"## {p}: speed-up over each baseline (same run) and peak memory", "",
                      self.ratios(p, baselines=present), ""]
        lines += ["## Time (ms)", "", self.table("time"), ""]
        if any(r["metric"] == "peak_memory" for r in self.rows):
            lines += ["## Peak memory (MB)", "", "Tensor memory held at once during the call (CPU: the torch "
                      "profiler's memory events; CUDA: max_memory_allocated), returned gradients included.", "",
                      self.table("peak_memory"), ""]
        if any(r["metric"] == "peak_rss" for r in self.rows):
            lines += ["## Peak resident memory (MB, CPU, for reference)", "", "VmHWM above VmRSS before the call: "
                      "pages, not tensors; varies between runs (benchmarks/harness.py).", "",
                      self.table("peak_rss"), ""]
        checks = [r for r in self.rows if r["metric"] == "check_vs_eager"]
        if checks:
            tols = ", ".join(f"{str(k).replace('torch.', '')} {v:g}" for k, v in CHECK_TOL.items())
            passed = sum(r["p50"] == 1.0 for r in checks)
            lines += ["## Output check against eager (same run)", "",
                      f"{passed} of {len(checks)} (kernel, mode, size, provider) outputs within tolerance of eager's "
                      f"(max |out - eager| / max |eager|: {tols})."
                      + ("" if not self.check_failures else " FAILED: " + "; ".join(self.check_failures)), ""]
        roof = self.roofline_lines()
        if roof:
            lines += ["## Roofline", "", "```", *roof, "```", ""]
        return "\n".join(lines)

    def plot(self, path_prefix: str, kernels: Optional[list] = None) -> list[str]:
        """One PNG per kernel: time against size per provider (one panel per mode, p20-p80 bars)
        and peak-memory bars per provider (per mode, at the largest size). Returns the paths."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("[bench] matplotlib is not installed: no plots")
            return []
        paths = []
        all_kernels = list(dict.fromkeys(r["kernel"] for r in self.rows))
        for kernel in kernels or all_kernels:
            rows = [r for r in self.rows if r["kernel"] == kernel]
            modes = list(dict.fromkeys(r["mode"] for r in rows if r["metric"] == "time"))
            if not modes:
                continue
            xs = list(dict.fromkeys(r["x"] for r in rows))
            provs = list(dict.fromkeys(r["provider"] for r in rows))
            has_mem = any(r["metric"] == "peak_memory" for r in rows)
            ncol = len(modes) + (1 if has_mem else 0)
            fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.8), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                for prov in provs:
                    pts = [(xs.index(r["x"]), r["p50"], r["p20"], r["p80"]) for r in rows
                           if r["metric"] == "time" and r["mode"] == mode and r["provider"] == prov]
                    if not pts:
                        continue
                    i, p50, p20, p80 = zip(*pts)
                    ax.errorbar(i, p50, yerr=[[a - b for a, b in zip(p50, p20)], [c - a for a, c in zip(p50, p80)]],
                                marker="o", capsize=3, label=prov)
                ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=7)
                ax.set_yscale("log")
                ax.set_ylabel("time per call (ms, median)")
                ax.set_title(f"{kernel} - {mode}", fontsize=9)
                ax.grid(alpha=0.3)
            if has_mem:
                ax = axes[0][-1]
                width = 0.8 / max(1, len(provs))
                for j, prov in enumerate(provs):
                    vals = []
                    for mode in modes:
                        mem = [r for r in rows if r["metric"] == "peak_memory" and r["mode"] == mode
                               and r["provider"] == prov]
                        vals.append(mem[-1]["p50"] if mem else 0.0)
                    ax.bar([k + j * width for k in range(len(modes))], vals, width, label=prov)
                ax.set_xticks([k + 0.4 - width / 2 for k in range(len(modes))], modes, fontsize=8)
                ax.set_ylabel("peak memory (MB)")
                ax.set_title(f"{kernel} - peak memory at {xs[-1]}", fontsize=9)
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            path = f"{path_prefix}_{kernel.replace('[', '-').replace(']', '').replace('/', '-')}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
        return paths

    def finish(self, out_dir: str, name: str, title: str, *, ours: Optional[list] = None,
               plots: bool = True, extra: str = "") -> str:
        """Write <out_dir>/<name>.csv, <name>.md (markdown summary + `extra`) and <name>_<kernel>.png;
        print the summary. Returns the markdown."""
        os.makedirs(out_dir, exist_ok=True)
        self.write_csv(os.path.join(out_dir, f"{name}.csv"))
        md = self.markdown(title, ours=ours) + ("\n" + extra if extra else "")
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(md + "\n")
        pngs = self.plot(os.path.join(out_dir, name)) if plots else []
        print(md)
        print(f"wrote {os.path.join(out_dir, name)}.csv, .md" + (f" and {len(pngs)} PNG" if pngs else ""))
        return md


def _loadavg() -> tuple:
    try:
        return os.getloadavg()
    except OSError:
        return ()


def _fmt_load(load: tuple) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "n/a"


# ---- CLI helpers ----------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results/<device>, or $RGPT4D_BENCH_OUT/<device>)")
    p.add_argument("--modes", default=None, help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's). On a shared CPU machine use 1: with two "
                        "OpenMP threads every parallel region waits for a thread another process has "
                        "descheduled (benchmarks/README.md, Threads)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (at most)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="no new round of a case starts after this many seconds (at least 3 rounds run)")
    p.add_argument("--only-x", default=None,
                   help="a regular expression: time only the cases whose size label matches (e.g. 'paper|full')")
    p.add_argument("--no-memory", action="store_true", help="time only: no peak-memory measurement")
    return p


def make_bench(args, device: torch.device) -> "Bench":
    """A Bench with the command line's threads and timing budget (--threads, --rounds, --max-seconds)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return Bench(device, rounds=args.rounds, max_seconds=args.max_seconds, only_x=getattr(args, "only_x", None),
                 memory=not getattr(args, "no_memory", False))


def default_results_dir(device: torch.device) -> str:
    """benchmarks/results/<device>, or $RGPT4D_BENCH_OUT/<device> where that is set: tests/conftest.py sets
    it to a temporary folder, so that no benchmark run under the tests writes into the source tree."""
    root = os.environ.get("RGPT4D_BENCH_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return os.path.join(root, device_name(device))


def results_dir(args, device: torch.device) -> str:
    """--out, else default_results_dir(device)."""
    return args.out or default_results_dir(device)


def grad_modes(args) -> list[str]:
    modes = args.modes.split(",") if args.modes else list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"unknown modes {bad}; choose from {MODES}")
    return modes


def mode_fn(mode: str, forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A callable running `mode` of `forward` (which returns one tensor) w.r.t. `inputs`."""
    if mode == "nograd":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if mode == "forward":
        return forward
    if mode == "full":
        def run():
            out = forward()
            g = torch.ones_like(out) if out.dim() == 0 else _grad_like(out)
            return torch.autograd.grad(out, inputs, g)
        return run
    if mode == "backward":
        out = forward()
        g = torch.ones_like(out) if out.dim() == 0 else _grad_like(out)

        def run():
            return torch.autograd.grad(out, inputs, g, retain_graph=True)
        return run
    raise ValueError(mode)


_GRADS: dict = {}


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    return grad_output_for(out.shape, out.dtype, out.device)


def grad_output_for(shape, dtype, device) -> torch.Tensor:
    """The grad_output mode_fn's backward and full modes use for an output of this shape: one
    random (never zero) tensor per shape, reused so allocation is not timed."""
    key = (tuple(shape), dtype, torch.device(device))
    if key not in _GRADS:
        _GRADS[key] = torch.randn(tuple(shape), dtype=dtype, device=device)
    return _GRADS[key]
