"""The benchmarks' timing helpers: interleaved rounds, medians, the allocator setting."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mixprec.bench.timing import interleaved_medians


def test_interleaved_medians_alternate_the_functions_and_take_medians() -> None:
    calls: list[str] = []

    def sleeper(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            time.sleep(seconds)
        return run

    medians = interleaved_medians({"short": sleeper("short", 0.002), "long": sleeper("long", 0.010)},
                                  repeats=5, warmup=1)
    assert calls[:2] == ["short", "long"]  # the warm-up round, in the given order
    rounds = [calls[i:i + 2] for i in range(2, 12, 2)]
    assert all(sorted(r) == ["long", "short"] for r in rounds)  # every round calls each once
    assert 0.002 <= medians["short"] < medians["long"]
    assert medians["long"] >= 0.010


def test_interleaved_rounds_vary_the_order() -> None:
    """What ran just before a call slows it; the rounds shuffle the order (seeded, so
    the same every run), so no function always follows the same one."""
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("copy", "alloc", "quantize")}
    interleaved_medians(fns, repeats=12, warmup=0)
    rounds = [tuple(calls[i:i + 3]) for i in range(0, 36, 3)]
    assert all(sorted(r) == ["alloc", "copy", "quantize"] for r in rounds)
    followed = {r[r.index("quantize") - 1] for r in rounds if r.index("quantize") > 0}  # within a round
    assert followed == {"copy", "alloc"}
    calls_again = list(calls)
    calls.clear()
    interleaved_medians(fns, repeats=12, warmup=0)
    assert calls == calls_again


def test_interleaved_medians_refuse_no_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"f": lambda: None}, repeats=0)


_FAULTS_SCRIPT = """
import resource, sys, torch
from mixprec.bench.timing import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():
    blocks = [torch.ones(10 << 18) for _ in range(3)]  # three 10 MiB tensors, written
    del blocks
for _ in range(4):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_keep_freed_memory_stops_page_faults_on_reallocation() -> None:
    """Freed tensors' pages are handed to the next allocation, not returned to the
    system. Both processes start with malloc set to map every block afresh and trim the
    heap at once (glibc's defaults do so only in some runs, as its own thresholds
    settle): 30 MiB allocated, written and freed four times (after four) then faults in
    every page each time, and (almost) never once ``keep_freed_memory`` has overridden
    those settings."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}
    faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        faults[mode] = int(run.stdout.split()[-1])
    pages = 4 * 30 * 256  # four cycles of 30 MiB in 4 KiB pages
    assert faults["default"] > pages * 9 // 10, faults
    assert faults["keep"] < pages // 50, faults
