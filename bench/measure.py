"""Timing (median with 20th/80th percentiles) and peak memory of one call, on the CPU or a CUDA device, and
the machine's matmul rate per dtype (the roofline that the benchmark reports each kernel's rate against).

CPU: ``torch.utils.benchmark.Timer.blocked_autorange``, topped up with single runs until there are
enough samples; memory is the process's peak resident set (VmHWM), reset before the call by writing
"5" to /proc/self/clear_refs after returning freed heap memory to the system (malloc_trim).
CUDA: ``triton.testing.do_bench`` quantiles (CUDA events when Triton is missing); memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils import benchmark

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


@dataclass(frozen=True)
class Memory:
    peak_bytes: int  # CUDA: max allocated; CPU: peak resident set of the process
    added_bytes: int  # the peak minus what was in use just before the call (inputs, libraries)


@dataclass(frozen=True)
class Effort:
    """How long to measure: at least ``min_run_time`` seconds and ``min_samples`` samples, up to ``max_seconds``.

    A call slower than ``slow_call_seconds`` is timed by single runs, its memory run counting as the first.
    """

    min_run_time: float
    min_samples: int
    max_seconds: float
    slow_call_seconds: float


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str) -> tuple[object, float]:
    """What one call of ``step`` returns, and its wall time in seconds (the device synchronised)."""
    _synchronize(device)
    started = time.perf_counter()
    result = step()
    _synchronize(device)
    return result, time.perf_counter() - started


def _quantiles_ms(seconds: list[float]) -> Timing:
    median, p20, p80 = (1e3 * float(value) for value in np.quantile(seconds, QUANTILES))
    return Timing(median, p20, p80, len(seconds))


def time_call(step: Callable[[], object], device: str, effort: Effort) -> Timing:
    if device == "cuda":
        return _time_cuda(step, effort)
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    started = time.perf_counter()
    times = list(timer.blocked_autorange(min_run_time=effort.min_run_time).times)
    while len(times) < effort.min_samples and time.perf_counter() - started < effort.max_seconds:
        times.extend(timer.timeit(1).times)
    return _quantiles_ms(times)


def time_slow_call(step: Callable[[], object], device: str, effort: Effort, first_seconds: float) -> Timing:
    """Single runs of a call that takes seconds: ``first_seconds`` and more until min_samples or max_seconds."""
    times = [first_seconds]
    while len(times) < effort.min_samples and sum(times) + times[-1] < effort.max_seconds:
        times.append(timed(step, device)[1])
    return _quantiles_ms(times)


def _time_cuda(step: Callable[[], object], effort: Effort) -> Timing:
    rep_ms = 1e3 * effort.min_run_time
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(step, effort)
    median, p20, p80 = do_bench(step, warmup=max(rep_ms / 4, 1.0), rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(median, p20, p80, -1)


def _time_cuda_events(step: Callable[[], object], effort: Effort) -> Timing:
    times = []
    started = time.perf_counter()
    while (len(times) < effort.min_samples or sum(times) < 1e3 * effort.min_run_time) \
            and time.perf_counter() - started < effort.max_seconds:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    median, p20, p80 = (float(value) for value in np.quantile(times, QUANTILES))
    return Timing(median, p20, p80, len(times))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak_resident_set() -> int:
    """Return freed heap memory to the system, reset VmHWM to the current resident set; returns that, in bytes."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return 1024 * _status_kib("VmRSS")


def peak_resident_set() -> int:
    return 1024 * _status_kib("VmHWM")


def peak_memory(step: Callable[[], object], device: str) -> tuple[Memory, float]:
    """Peak memory of one call of ``step``, and the call's wall time in seconds."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result, seconds = timed(step, device)
        peak = torch.cuda.max_memory_allocated()
        del result
        return Memory(peak, peak - before), seconds
    before = reset_peak_resident_set()
    result, seconds = timed(step, device)
    peak = peak_resident_set()
    del result
    return Memory(peak, max(peak - before, 0)), seconds


# The matmul whose rate is the roofline: square, large enough for the library's best kernels on either device.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def matmul_rate(dtype: torch.dtype, device: str, effort: Effort) -> float:
    """FLOP/s of torch.matmul of two square matrices of MATMUL_SIZE in ``dtype``, from the median time."""
    size = MATMUL_SIZE[device]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    step = lambda: torch.matmul(a, b)  # noqa: E731
    timed(step, device)
    median_ms = time_call(step, device, effort).median_ms
    return 2.0 * size**3 / (median_ms * 1e-3)
