"""The benchmarks' timing helpers: interleaved rounds, medians."""

from __future__ import annotations

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
