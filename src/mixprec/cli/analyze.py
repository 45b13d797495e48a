"""The ``mixprec analyze`` subcommand's arguments and display (rich); the work is
:func:`mixprec.experiments.analyze.run_analyze`. Kept apart from :mod:`mixprec.cli.main` so
that adding the command there takes two lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["add_analyze_arguments", "analyze_command"]


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``mixprec analyze``."""
    parser.add_argument("--model", required=True, help="cnn, lstm, gan or transformer")
    parser.add_argument("--recipe", default="fp32",
                        help="recipe to train under (default fp32: the values before any rounding)")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default: %(default)s)")
    parser.add_argument("--every", type=int, default=5, help="sample one step in N (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/analyze"), help="output folder (default: %(default)s)")
    parser.add_argument("--batch", type=int, help="batch size (default: the compare quick budget's)")
    parser.add_argument("--width", type=int, help="model width (default: the compare quick budget's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="share of values a format may lose and still be advised (default: %(default)s)")
    parser.add_argument("--margin", type=int, default=3,
                        help="binades of headroom under the largest value for the loss scale (default: %(default)s)")
    parser.add_argument("--data-dir", help="a folder with the Fashion-MNIST IDX files")


def analyze_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``mixprec analyze``; returns the exit code (errors in arguments raise
    ValueError, which the command line prints)."""
    from mixprec.experiments.analyze import AnalyzePlan, run_analyze

    plan = AnalyzePlan(model=args.model, recipe=args.recipe, steps=args.steps, every=args.every, out=args.out,
                       batch=args.batch, width=args.width, seed=args.seed, data_dir=args.data_dir,
                       tolerance=args.tolerance, margin=args.margin)
    with Progress(TextColumn("{task.description:<30}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"{plan.model} {plan.recipe}", total=plan.steps)

        def on_step(step: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"{plan.model} {plan.recipe} loss {loss:.3f}")

        result = run_analyze(plan, on_step)
    errors = result.stats.total("error")
    table = Table(title=f"{plan.model} under {plan.recipe}: errors (activation gradients), "
                        f"{result.stats.steps_sampled} steps sampled")
    for column in ("format", "flushed unscaled", "subnormal unscaled", "recommended S", "flushed at S",
                   "overflow at S"):
        table.add_column(column, justify="left" if column == "format" else "right")
    from mixprec.stats import block_shares, is_block_format, recommend_loss_scale

    for name in result.stats.config.format_names:
        if is_block_format(name):
            continue
        advice = recommend_loss_scale(result.stats, name, plan.margin)
        at = advice.scale or 1.0
        table.add_row(name, f"{errors.share(name, 'flush'):.4%}", f"{errors.share(name, 'subnormal'):.4%}",
                      "-" if advice.exponent is None else f"2^{advice.exponent}",
                      f"{errors.share(name, 'flush', at):.4%}", f"{errors.share(name, 'overflow', at):.4%}")
    console.print(table)
    model_rows = [row for row in block_shares(result.stats) if row.layer == "(model)"]
    if model_rows:
        blocks = Table(title="block formats, whole model: values clipped at their block's largest value and "
                             "flushed to zero in their block (per layer: the report)")
        for column in ("format", "class", "nonzero values", "clipped", "flushed", "subnormal"):
            blocks.add_column(column, justify="left" if column in ("format", "class") else "right")
        for row in sorted(model_rows, key=lambda r: r.format):
            blocks.add_row(row.format, row.cls, f"{row.nonzero:,}", f"{row.clipped:.4%}", f"{row.flushed:.4%}",
                           f"{row.subnormal:.4%}")
        console.print(blocks)
    console.print(f"report: {result.report}")
    return 0
