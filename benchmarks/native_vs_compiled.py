"""The native CPU block kernels against the compiled torch kernels they replace, in one
process: ``quantize_blocks`` into ``out=`` (nearest, stochastic), with a BF16 output,
along the first axis (dgrad's and wgrad's operands), and ``quantize_packed`` with BF16
values, each timed under the ``"auto"`` backend (native) and ``"compiled"`` in
interleaved rounds; the median of each counts, and the ratio is compiled over native
time (above 1: native faster). A copy of the input is the baseline of each round.

    python benchmarks/native_vs_compiled.py [--format mxfp8_e4m3] [--rows 16384] [--cols 1024] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mixprec.core import formats
from mixprec.core.block_quantize import quantize_blocks
from mixprec.core.block_storage import quantize_packed
from mixprec.core.kernels import kernel_backend


def cases(fmt_name: str, rows: int, cols: int) -> dict[str, Callable[[], object]]:
    """The timed calls on one random float32 ``rows x cols`` input."""
    fmt = formats.resolve(fmt_name)
    x = torch.randn(rows, cols)
    out = torch.empty_like(x)
    key = torch.tensor([1, 2], dtype=torch.int32)
    return {
        "copy": lambda: out.copy_(x),
        "nearest out=": lambda: quantize_blocks(x, fmt, out=out),
        "stochastic out=": lambda: quantize_blocks(x, fmt, "stochastic", out=out, random_key=key),
        "nearest BF16": lambda: quantize_blocks(x, fmt, dtype=torch.bfloat16),
        "nearest BF16, axis 0": lambda: quantize_blocks(x, fmt, axis=0, dtype=torch.bfloat16),
        "packed, BF16 values": lambda: quantize_packed(x, fmt, values_dtype=torch.bfloat16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="mxfp8_e4m3")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    calls = cases(args.format, args.rows, args.cols)
    backends = ("auto", "compiled")
    times: dict[tuple[str, str], list[float]] = {(b, name): [] for b in backends for name in calls}
    for backend in backends:  # warm-up: compile, build, allocate
        with kernel_backend(backend):  # type: ignore[arg-type]
            for call in calls.values():
                call()
    for _ in range(args.rounds):
        for backend in backends:
            with kernel_backend(backend):  # type: ignore[arg-type]
                for name, call in calls.items():
                    started = time.perf_counter()
                    call()
                    times[(backend, name)].append(time.perf_counter() - started)
    print(f"{args.format}, {args.rows} x {args.cols} float32, median of {args.rounds} interleaved rounds")
    for name in calls:
        native = statistics.median(times[("auto", name)]) * 1e3
        compiled = statistics.median(times[("compiled", name)]) * 1e3
        print(f"{name:22s} native {native:8.2f} ms  compiled {compiled:8.2f} ms  compiled/native {compiled / native:.2f}")


if __name__ == "__main__":
    main()
