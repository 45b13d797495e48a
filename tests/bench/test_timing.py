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
    assert calls == ["short", "long"] * 6  # one warm-up round, then five timed rounds, alternating
    assert 0.002 <= medians["short"] < medians["long"]
    assert medians["long"] >= 0.010


def test_interleaved_medians_refuse_no_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"f": lambda: None}, repeats=0)
