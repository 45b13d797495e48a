"""Sweep all 2**32 float32 bit patterns through mixprec.core.quantize's round-to-nearest-even
and count mismatches against torch's casts and ml_dtypes, per format (expected: 0).

    .venv/bin/python benchmarks/exhaustive_rne.py [--formats fp16,bf16,e5m2,e4m3,e2m1fn,...] [--chunk-bits 24]

torch's casts are compared in the formats' default overflow mode, ml_dtypes in the
matching mode (e4m3 with saturate=False, since ml_dtypes' e4m3fn gives NaN on overflow).
NaN matches any NaN; everything else must agree bit for bit, -0 included. Takes about
ten minutes on 2 cores; ``--limit-chunks`` runs a prefix for a quick check.
"""

from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import mixprec
from mixprec.core import formats
from mixprec.core.kernels import kernel_backend

ML_TYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "e5m2": ml_dtypes.float8_e5m2,
            "e4m3": ml_dtypes.float8_e4m3fn, "e2m1fn": ml_dtypes.float4_e2m1fn,
            "e2m3fn": ml_dtypes.float6_e2m3fn, "e3m2fn": ml_dtypes.float6_e3m2fn,
            "e8m0fnu": ml_dtypes.float8_e8m0fnu}
# torch has no cast for these (or one that differs from ml_dtypes: e8m0fnu maps 0 and
# negatives to codes); they are compared with ml_dtypes only. ml_dtypes turns NaN into -0
# for formats without NaN, where mixprec keeps NaN: NaN inputs are left out for those.
NO_TORCH_CAST = ("e2m1fn", "e2m3fn", "e3m2fn", "e8m0fnu")
NO_NAN = ("e2m1fn", "e2m3fn", "e3m2fn")


def mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements whose float32 bits differ, NaN matching NaN."""
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    return int((~same).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="fp16,bf16,e5m2,e4m3,e2m1fn,e2m3fn,e3m2fn,e8m0fnu")
    parser.add_argument("--chunk-bits", type=int, default=24, help="log2 of the patterns per chunk")
    parser.add_argument("--limit-chunks", type=int, default=None, help="stop after this many chunks")
    parser.add_argument("--backend", default="auto", choices=["auto", "eager", "compiled"])
    args = parser.parse_args()
    names = [n.strip() for n in args.formats.split(",")]
    chunk = 1 << args.chunk_bits
    chunks = (1 << 32) // chunk
    if args.limit_chunks:
        chunks = min(chunks, args.limit_chunks)
    counts = {(n, ref): 0 for n in names for ref in ("torch", "ml_dtypes")}
    seconds = dict.fromkeys(names, 0.0)
    console = Console()
    start = time.perf_counter()
    with kernel_backend(args.backend), Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task("float32 patterns", total=chunks)
        for index in range(chunks):
            first = -(2**31) + index * chunk
            x = torch.arange(first, first + chunk, dtype=torch.int64).to(torch.int32).view(torch.float32)
            x_np = x.numpy()
            for name in names:
                fmt = formats.get(name)
                tick = time.perf_counter()
                ours = mixprec.quantize(x, fmt)
                seconds[name] += time.perf_counter() - tick
                if name not in NO_TORCH_CAST:
                    counts[(name, "torch")] += mismatches(ours, x.to(fmt.torch_dtype).float())
                ours_ml = mixprec.quantize(x, fmt, saturate=False) if name == "e4m3" else ours
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is the point
                    reference = torch.from_numpy(x_np.astype(ML_TYPES[name]).astype(np.float32))
                if name in NO_NAN:
                    keep = ~torch.isnan(x)
                    counts[(name, "ml_dtypes")] += int((~torch.isnan(ours[~keep])).sum())
                    ours_ml, reference = ours_ml[keep], reference[keep]
                counts[(name, "ml_dtypes")] += mismatches(ours_ml, reference)
            progress.advance(task)
    covered = chunks * chunk
    table = Table(title=f"round-to-nearest-even over {covered:,} float32 patterns ({covered / 2**32:.0%} of all)")
    for column in ("format", "mismatches vs torch", "mismatches vs ml_dtypes", "quantize seconds"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for name in names:
        torch_count = "n/a" if name in NO_TORCH_CAST else f"{counts[(name, 'torch')]:,}"
        table.add_row(name, torch_count, f"{counts[(name, 'ml_dtypes')]:,}",
                      f"{seconds[name]:.1f}")
    console.print(table)
    console.print(f"total run time {time.perf_counter() - start:.0f} s")
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
