"""The ``mixprec`` command line: argument parsing and display only; the work lives in
the library and in :mod:`mixprec.bench`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["main", "build_parser"]


@contextmanager
def _labelled_progress(console: Console, total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar; the yielded callback names and counts each new stage."""
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting", total=total)
        seen = [0]

        def on_step(label: str) -> None:
            if seen[0]:
                progress.advance(task)
            seen[0] += 1
            progress.update(task, description=label)

        yield on_step
        progress.advance(task)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mixprec",
        description="Mixed-precision (FP16, BF16, FP8) training for PyTorch, emulated bit "
        "for bit where the hardware lacks the format.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "formats", help="list the named formats and their numbers (largest, smallest, epsilon)"
    )

    compare = commands.add_parser(
        "compare", help="train real models on real data under several recipes and write a report"
    )
    compare.add_argument("--model", default="cnn", help="cnn, lstm, gan, transformer, or all (default: cnn)")
    compare.add_argument("--recipes", default="fp32,fp16,bf16,fp8,fp8-hybrid",
                         help="comma-separated recipes or ablations (default: %(default)s)")
    compare.add_argument("--budget", default="quick", help="quick, full or test (default: quick)")
    compare.add_argument("--seeds", type=int, default=1, help="seeds per model x recipe (default: 1)")
    compare.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    compare.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted comparison")
    compare.add_argument("--data-dir", help="a folder with the Fashion-MNIST IDX files")
    compare.add_argument("--lr", type=float, help="peak learning rate for every run (default: the budget's)")

    coverage = commands.add_parser(
        "coverage", help="which GEMM of a built-in model runs in which format under a recipe")
    coverage.add_argument("--model", default="transformer", help="cnn, lstm or transformer (default: %(default)s)")
    coverage.add_argument("--recipe", default="fp8-hybrid", help="a named recipe or ablation (default: %(default)s)")

    _add_analyze_parser(commands)
    _add_distributed_parsers(commands)

    bench = commands.add_parser("bench", help="benchmarks, as ratios to baselines in the same run")
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    quant = benches.add_parser(
        "quantize",
        help="quantize throughput per format and rounding, against a copy and x * 1.0",
    )
    quant.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    quant.add_argument(
        "--numel", type=int, default=1 << 24, help="elements of the input (default 16M)"
    )
    quant.add_argument("--repeats", type=int, default=7, help="timed calls per row; the median counts")
    quant.add_argument(
        "--formats", default="fp16,bf16,e5m2,e4m3,mxfp8_e4m3,mxfp4_e2m1,nvfp4,fp8_block128",
        help="comma-separated scalar or block formats (default: %(default)s)"
    )
    quant.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    step = benches.add_parser(
        "step",
        help="one training step of a CNN, a Transformer block and an MLP under fp32, torch.autocast, "
        "torchao float8 (emulated) and every recipe",
    )
    step.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    step.add_argument("--repeats", type=int, default=3, help="timed rounds; the median counts (default: %(default)s)")
    step.add_argument("--models", default="cnn,transformer,mlp",
                      help="comma-separated: cnn, transformer, mlp, quick-cnn, quick-lstm, quick-gan, quick-transformer "
                      "(compare's quick-budget models, with its optimizers and steps) (default: %(default)s)")
    step.add_argument("--configs", default=",".join(_step_configs()),
                      help="comma-separated configurations (default: all); a name ending in +compile "
                      "(fp8-hybrid+compile) runs that configuration's model under torch.compile")
    step.add_argument("--batch-scale", type=float, default=1.0,
                      help="multiply the batch sizes (128 images, 32 sequences, 512 MLP rows) by this")
    step.add_argument("--gemm-kernels", choices=("auto", "fp32", "bf16"), default="auto",
                      help="GEMM kernels of the mixprec recipes: auto (BF16 where exact and native), "
                      "fp32, or bf16 wherever exact (default: %(default)s)")
    from mixprec.cli.distributed import add_comm_bench_arguments

    add_comm_bench_arguments(benches.add_parser(
        "comm", help="DDP gradient communication: bytes per step and step time, 1 vs N processes, "
        "fp32/fp16/bf16/e5m2"))
    return parser


def _add_distributed_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from mixprec.cli.distributed import add_train_arguments

    add_train_arguments(commands.add_parser(
        "train", help="train the Fashion-MNIST CNN or the Transformer LM on N processes (DDP with a gradient "
        "all-reduce format, or FSDP2 with --shard; gloo/nccl) under a recipe; also under torchrun --standalone "
        "--nproc-per-node N -m mixprec train"))


def _add_analyze_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from mixprec.cli.analyze import add_analyze_arguments

    add_analyze_arguments(commands.add_parser(
        "analyze", help="train a model a few steps, observe its tensors' ranges, and write a report "
        "(histograms, underflow and overflow, loss-scale and format advice)"))


def _timing_settings() -> dict[str, str]:
    """Prepare this process for timed runs (:func:`mixprec.bench.timing.keep_freed_memory`)
    and return the settings that decide its timings, for display."""
    from mixprec.bench.timing import keep_freed_memory, thread_settings

    settings = thread_settings()
    settings["malloc"] = "keeps freed memory" if keep_freed_memory() else "default"
    return settings


def _step_configs() -> tuple[str, ...]:
    from mixprec.bench.step_speed import CONFIGS

    return CONFIGS


def _bench_step(args: argparse.Namespace, console: Console) -> int:
    from mixprec.bench.step_speed import MODELS, TORCHAO_FLOAT8, is_config, run_step_bench, torchao_float8_available
    from mixprec.nn.kernels import native_bf16

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if not is_config(c)] + [m for m in models if m not in MODELS]
    if unknown or args.repeats < 1 or args.batch_scale <= 0:
        console.print(f"[red]unknown models or configurations {unknown}, or a bad --repeats/--batch-scale; "
                      f"models: {', '.join(MODELS)}; configurations: {', '.join(_step_configs())}[/red]")
        return 2
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in _timing_settings().items()))
    console.print(f"native BF16 dot products on this CPU: {'yes' if native_bf16('cpu') else 'no'} "
                  f"(mixprec GEMM kernels: {args.gemm_kernels})")
    missing = torchao_float8_available()
    if missing is not None and TORCHAO_FLOAT8 in configs:
        console.print(f"skipping {TORCHAO_FLOAT8}: {missing}")
        configs = [c for c in configs if c != TORCHAO_FLOAT8]
    if "quick-gan" in models and TORCHAO_FLOAT8 in configs:
        console.print(f"quick-gan: no {TORCHAO_FLOAT8} row (its convolutions and one-logit head hold no "
                      "linear layer torchao's float8 converts)")
    total = sum(len({"fp32", *configs} - ({TORCHAO_FLOAT8} if m == "quick-gan" else set())) for m in models)
    with _labelled_progress(console, total) as on_step:
        rows = run_step_bench(models=models, configs=configs, repeats=args.repeats,
                              batch_scale=args.batch_scale, on_step=on_step, kernels=args.gemm_kernels)
    table = Table(title=f"one training step (median of {args.repeats} interleaved rounds); bytes in MB")
    for column in ("model", "config", "step ms", "x fp32", "params", "optimizer", "B/param", "saved", "saved x fp32"):
        table.add_column(column, justify="left" if column in ("model", "config") else "right")
    for row in rows:
        table.add_row(row.model, row.config, f"{row.ms:.1f}", f"{row.x_fp32:.2f}",
                      f"{row.param_bytes / 1e6:.2f}", f"{row.optimizer_bytes / 1e6:.2f}",
                      f"{row.bytes_per_parameter:.1f}", f"{row.saved_bytes / 1e6:.1f}", f"{row.saved_ratio_to_fp32:.2f}")
    console.print(table)
    console.print("params = the parameters (the masters) plus this step's rounded weights; optimizer = its "
                  "state; B/param = both per parameter; saved = tensors autograd keeps for backward "
                  "(parameters excluded).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([row.as_record() for row in rows], indent=2))
        console.print(f"wrote {args.json}")
    return 0


def _formats_command(console: Console) -> int:
    from mixprec.core import formats

    table = Table(title="mixprec formats")
    for column in ("name", "exp", "man", "bias", "largest", "smallest normal", "smallest subnormal",
                   "epsilon", "Inf", "overflow", "torch dtype"):
        table.add_column(column, justify="right" if column not in ("name", "torch dtype") else "left")
    for fmt in formats.NAMED_FORMATS.values():
        table.add_row(
            fmt.name, str(fmt.exponent_bits), str(fmt.mantissa_bits), str(fmt.bias),
            f"{fmt.largest:.6g}", f"2^{fmt.min_exponent}",
            f"2^{fmt.min_exponent - fmt.mantissa_bits}", f"2^-{fmt.mantissa_bits}",
            "yes" if fmt.has_infinities else "no", fmt.overflow, str(fmt.torch_dtype),
        )
    console.print(table)
    console.print("Any 'eXmY' (1 <= X <= 8, 0 <= Y <= 23) names an IEEE-style custom format.")
    return 0


def _bench_quantize(args: argparse.Namespace, console: Console) -> int:
    from mixprec.bench.quantize_speed import range_shares, bench_input, run_quantize_bench
    from mixprec.core.kernels import current_backend

    if args.numel < 1 or args.repeats < 1:
        console.print("[red]--numel and --repeats must be >= 1[/red]")
        return 2
    names = [name.strip() for name in args.formats.split(",") if name.strip()]
    settings = _timing_settings()
    settings["kernel backend"] = current_backend()
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if settings["OMP_WAIT_POLICY"].startswith("(unset"):
        console.print("[yellow]tip: OMP_WAIT_POLICY=passive steadies timings on busy cores[/yellow]")

    steps = 2 + len(names) * 4
    with _labelled_progress(console, steps) as on_step:
        rows, baselines = run_quantize_bench(
            numel=args.numel, repeats=args.repeats, format_names=names, device=args.device,
            on_step=on_step,
        )

    sample = bench_input(min(args.numel, 1 << 20))
    table = Table(title=f"quantize throughput, {args.numel:,} float32 elements (median of {args.repeats})")
    for column in ("format", "rounding", "out=", "GB/s", "x copy", "x alloc", "below normal", "overflow"):
        table.add_column(column, justify="right" if column not in ("format", "rounding") else "left")
    table.add_row("baseline", "y.copy_(x)", "yes", f"{baselines['copy']:.2f}", "1.00", "", "", "")
    table.add_row("baseline", "x * 1.0", "no", f"{baselines['alloc']:.2f}", "", "1.00", "", "")
    for row in rows:
        shares = range_shares(sample, row.format)
        below_normal, overflow = ("n/a", "n/a") if shares is None else (f"{shares[0]:.1%}", f"{shares[1]:.1%}")
        table.add_row(
            row.format, row.rounding, "yes" if row.out else "no", f"{row.gbps:.2f}",
            f"{row.ratio_to_copy:.2f}", f"{row.ratio_to_alloc:.2f}", below_normal, overflow,
        )
    console.print(table)
    console.print("GB/s counts 4 bytes read + 4 written per element; 'below normal' and 'overflow' "
                  "are the input's shares under the format's smallest normal (subnormal or flushed) "
                  "and beyond its largest value (n/a for block formats, whose scales move the range).")
    if args.json:
        records = [row.as_record() for row in rows]
        records += [
            {"format": "baseline", "rounding": "copy", "out": True, "gbps": baselines["copy"],
             "ratio_to_copy": 1.0, "ratio_to_alloc": baselines["copy"] / baselines["alloc"]},
            {"format": "baseline", "rounding": "alloc", "out": False, "gbps": baselines["alloc"],
             "ratio_to_copy": baselines["alloc"] / baselines["copy"], "ratio_to_alloc": 1.0},
        ]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "rows": records}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


def _compare(args: argparse.Namespace, console: Console) -> int:
    from mixprec.experiments.compare import ComparePlan, run_compare
    from mixprec.experiments.report import summary_rows
    from mixprec.experiments.runner import MODELS

    # its step times are compared across recipes: the process set up as for the benchmarks
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in _timing_settings().items()))
    plan = None
    if args.resume is None:
        models = MODELS if args.model == "all" else tuple(m.strip() for m in args.model.split(","))
        recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
        plan = ComparePlan(models, recipes, args.budget, args.seeds, args.out, args.data_dir, args.lr)
    progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console)

    def on_run_start(model: str, recipe: str, seed: int, steps: int):  # type: ignore[no-untyped-def]
        task = progress.add_task(f"{model} {recipe} seed {seed}", total=steps)
        return lambda step: progress.update(task, completed=step)

    def on_run_end(result) -> None:  # type: ignore[no-untyped-def]
        progress.console.print(
            f"{result.model} {result.recipe} seed {result.seed}: {result.metric_name} {result.metric_value:.4f}, "
            f"{result.step_seconds * 1e3:.0f} ms/step, {result.skipped_steps} skipped, "
            f"loss scale {result.final_loss_scale:g}")

    out = args.resume or args.out
    try:
        with progress:
            records, report = run_compare(plan, args.resume, on_run_start, on_run_end)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: finished runs are in {out}/results.json and {out}/report.md; "
                      f"continue with `mixprec compare --resume {out}`[/yellow]")
        return 130
    table = Table(title="mixprec compare")
    for column in ("model", "recipe", "metric", "mean", "spread", "vs fp32", "parity", "MB", "step ms", "x fp32",
                   "skipped"):
        table.add_column(column, justify="left" if column in ("model", "recipe", "metric") else "right")
    for row in summary_rows(records):
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        verdict = {True: "yes", False: "[red]no[/red]", None: "-"}[row["meets_claim"]]
        table.add_row(row["model"], row["recipe"], row["metric"], f"{row['mean']:.4f}", f"{row['spread']:.4f}",
                      row["vs_fp32"], verdict, f"{row['megabytes']:.1f}", f"{row['step_ms']:.0f}", ratio,
                      f"{row['skipped']:.0f}")
    console.print(table)
    console.print(f"report: {report}")
    return 0


def _coverage(args: argparse.Namespace, console: Console) -> int:
    import torch

    import mixprec
    from mixprec.experiments.models import CharGPT, CharLSTM, resnet_style_cnn

    torch.manual_seed(0)
    builders = {
        "cnn": lambda: (resnet_style_cnn(width=24, stem_stride=2), torch.randn(8, 1, 28, 28)),
        "lstm": lambda: (CharLSTM(80, hidden=256), torch.randint(0, 80, (8, 64))),
        "transformer": lambda: (CharGPT(80, width=128, layers=2, context=64), torch.randint(0, 80, (8, 64))),
    }
    if args.model not in builders:
        raise ValueError(f"unknown model {args.model!r}; coverage knows {', '.join(builders)}")
    model, example = builders[args.model]()
    console.print(str(mixprec.coverage(model, example, args.recipe)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # pipes and logs: wide enough for the tables
        console = Console(width=120)
    try:
        if args.command == "formats":
            return _formats_command(console)
        if args.command == "compare":
            return _compare(args, console)
        if args.command == "coverage":
            return _coverage(args, console)
        if args.command == "analyze":
            from mixprec.cli.analyze import analyze_command

            return analyze_command(args, console)
        if args.command == "bench" and args.bench == "quantize":
            return _bench_quantize(args, console)
        if args.command == "bench" and args.bench == "step":
            return _bench_step(args, console)
        if args.command == "bench" and args.bench == "comm":
            from mixprec.cli.distributed import comm_bench_command

            return comm_bench_command(args, console)
        if args.command == "train":
            from mixprec.cli.distributed import train_command

            return train_command(args, console)
    except (ValueError, TypeError) as error:
        console.print(f"[red]mixprec: {error}[/red]")
        return 2
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
