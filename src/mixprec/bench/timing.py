"""Timing helpers shared by the benchmarks: medians of repeats, and the thread settings
that decide CPU timings."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_seconds", "interleaved_medians", "thread_settings", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit machines


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones,
    synchronising CUDA around each call so queued kernels are counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timed in ``repeats`` rounds of one call each
    (after ``warmup`` untimed rounds), so that drift of a shared machine (another
    process, frequency, cache state) hits all of them alike and their ratios hold. Each
    round calls them in an order of its own (a seeded shuffle): a call is slowed by what
    ran just before it (after an allocating baseline's 64 MB of fresh pages, a
    quantization into ``out=`` ran 25% slower than after a copy), and a fixed order
    would charge that to the same function every round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    orders = random.Random(0)
    names = list(fns)
    for _ in range(repeats):
        orders.shuffle(names)
        for name in names:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def thread_settings() -> dict[str, str]:
    """The settings that change CPU timings: torch's intra-op threads and OpenMP's
    waiting policy (spin-waiting costs milliseconds per parallel region on busy cores)."""
    return {
        "torch threads": str(torch.get_num_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: spin-waits)"),
        "cpu count": str(os.cpu_count()),
        "torch": torch.__version__,
    }


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what the process frees for its next allocations: no
    trimming of the heap, and no fresh mapping for any block under 32 MiB. By default a
    training step's freed tensors go back to the system and the next step's are faulted
    in page by page, zeroed: on the quick Transformer 3-15 thousand faults a step, whose
    number changed from run to run by 2x and whose cost (2.6 us each here) grew with a
    configuration's temporaries, so that it blurred the ratios to FP32. Process-wide:
    the command line calls it for its timed runs (every configuration alike, FP32
    included); the library never does. A user's own loop gains from the same setting
    (``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` in the environment, or a
    caching allocator such as jemalloc). Returns whether it applied (glibc only)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting it (or the trim threshold) ends glibc's own
    # adjustment of both
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
