"""``mixprec bench quantize``: throughput of :func:`mixprec.core.quantize` for every format
(block-scaled ones along the last axis too) and rounding mode, allocating and into ``out=``, against a copy and an allocating
element-wise op timed in the same run: each configuration in interleaved rounds with
the two baselines (copy, ``x * 1.0``, the configuration, repeated), so its ratios
compare calls made under the same conditions."""

from __future__ import annotations

import statistics

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from mixprec.core import formats
from mixprec.bench.timing import interleaved_medians
from mixprec.core.quantize import Rounding, quantize

__all__ = ["QuantizeRow", "bench_input", "run_quantize_bench", "DEFAULT_FORMATS"]

DEFAULT_FORMATS = ("fp16", "bf16", "e5m2", "e4m3", "mxfp8_e4m3", "mxfp4_e2m1", "nvfp4", "fp8_block128")


@dataclass(frozen=True)
class QuantizeRow:
    """One timed configuration: GB/s counts 4 bytes read and 4 written per element."""

    format: str
    rounding: str
    out: bool
    gbps: float
    ratio_to_copy: float
    ratio_to_alloc: float

    def as_record(self) -> dict[str, object]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def bench_input(numel: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """float32 values whose binary exponents are uniform over [-140, 128): every format
    sees subnormals, values that flush to zero, and values that overflow (bf16 too,
    just under float32's maximum), with random signs."""
    generator = torch.Generator().manual_seed(seed)
    exponent = torch.empty(numel).uniform_(-140.0, 128.0, generator=generator)
    sign = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
    return (torch.exp2(exponent) * sign).to(device)


def range_shares(x: torch.Tensor, fmt_name: str) -> tuple[float, float] | None:
    """Share of ``x`` under ``fmt``'s smallest normal (subnormal or flushed to zero), and
    share beyond its largest value; None for block formats, whose scales move the range."""
    fmt = formats.resolve(fmt_name)
    if isinstance(fmt, formats.BlockFormat):
        return None
    magnitude = x.abs()
    below_normal = ((magnitude < fmt.smallest_normal) & (magnitude > 0)).float().mean().item()
    overflow = (magnitude > fmt.largest).float().mean().item()
    return below_normal, overflow


def run_quantize_bench(
    numel: int = 1 << 24,
    repeats: int = 7,
    format_names: Sequence[str] = DEFAULT_FORMATS,
    roundings: Sequence[Rounding] = ("nearest", "stochastic"),
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
) -> tuple[list[QuantizeRow], dict[str, float]]:
    """Time every format x rounding x (allocating, ``out=``), each in interleaved rounds
    with the two baselines; return the rows (ratios to the baselines of the same rounds)
    and the baselines' GB/s (medians over all rounds). ``on_step`` is called with a label
    before each configuration (the command line uses it for its progress bar)."""
    x = bench_input(numel, device=device)
    out = torch.empty_like(x)
    bytes_moved = numel * 8
    generator = torch.Generator(device=device).manual_seed(0)
    notify = on_step or (lambda label: None)
    baselines = {"copy": lambda: out.copy_(x), "alloc": lambda: x * 1.0}
    copy_seconds: list[float] = []
    alloc_seconds: list[float] = []
    rows = []
    for name in format_names:
        fmt = formats.resolve(name)
        for rounding in roundings:
            for into_out in (False, True):
                notify(f"{fmt.name} {rounding} {'out=' if into_out else 'alloc'}")
                source, target = x, out if into_out else None
                if isinstance(fmt, formats.BlockFormat) and len(fmt.block_shape) == 2:
                    # 2-D tiles need a matrix: rows of 4096 (a multiple of every tile width)
                    source = x.view(-1, 4096)
                    target = None if target is None else target.view(-1, 4096)
                seconds = interleaved_medians({
                    **baselines,
                    "quantize": lambda: quantize(source, fmt, rounding, generator=generator, out=target),  # noqa: B023
                }, repeats=repeats, warmup=2)
                copy_seconds.append(seconds["copy"])
                alloc_seconds.append(seconds["alloc"])
                rows.append(
                    QuantizeRow(
                        format=fmt.name,
                        rounding=rounding,
                        out=into_out,
                        gbps=bytes_moved / seconds["quantize"] / 1e9,
                        ratio_to_copy=seconds["copy"] / seconds["quantize"],
                        ratio_to_alloc=seconds["alloc"] / seconds["quantize"],
                    )
                )
    if not rows:  # no configuration: the baselines alone
        seconds = interleaved_medians(baselines, repeats=repeats, warmup=2)
        copy_seconds, alloc_seconds = [seconds["copy"]], [seconds["alloc"]]
    copy_gbps = bytes_moved / statistics.median(copy_seconds) / 1e9
    alloc_gbps = bytes_moved / statistics.median(alloc_seconds) / 1e9
    return rows, {"copy": copy_gbps, "alloc": alloc_gbps}
