"""Command-line parts of distributed training: ``mixprec train`` (the CNN or the
Transformer LM on N processes, DDP or FSDP2 with ``--shard``) and ``mixprec bench comm``; argument parsing
and display only."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["add_train_arguments", "train_command", "add_comm_bench_arguments", "comm_bench_command"]

METRIC_COLUMNS = {"test_accuracy": "test accuracy", "validation_bpc": "held-out bits/char"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mixprec train``."""
    parser.add_argument("--model", default="cnn", choices=("cnn", "transformer"),
                        help="cnn: the Fashion-MNIST ResNet; transformer: the character-level GPT on the King James "
                             "Bible (default: %(default)s)")
    parser.add_argument("--recipe", default="fp16", help="mixprec recipe (default: %(default)s)")
    parser.add_argument("--comm", default="fp32", help="DDP's gradient all-reduce format: fp32, fp16, bf16, e5m2 (fp8)")
    parser.add_argument("--shard", action="store_true",
                        help="FSDP2 instead of DDP: parameters, gradients and optimizer state sharded over the "
                             "processes (gradients reduce-scattered in fp32); --checkpoint is then a directory")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes to start on localhost through torchrun's launcher (default 1; leave out "
                             "under torchrun)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    parser.add_argument("--global-batch", type=int, default=128,
                        help="images (cnn) or text windows (transformer) per step, over all processes "
                             "(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--width", type=int, default=0,
                        help="CNN channels or the Transformer's model dimension (default: 16 and 64)")
    parser.add_argument("--layers", type=int, default=2, help="Transformer blocks (default: %(default)s)")
    parser.add_argument("--sequence", type=int, default=64,
                        help="Transformer context: characters per window (default: %(default)s)")
    parser.add_argument("--eval-examples", type=int, default=2000,
                        help="test images (cnn) or held-out windows (transformer) evaluated at the end "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="the run's state: a file rank 0 writes (DDP), or a directory of every rank's shards "
                             "(--shard, torch.distributed.checkpoint)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint on every rank")
    parser.add_argument("--data-dir", help="a folder with the Fashion-MNIST IDX files")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")


def train_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``mixprec train`` and print rank 0's result."""
    from mixprec.experiments.distributed_train import DistributedTrainConfig, train

    config = DistributedTrainConfig(
        model=args.model, recipe=args.recipe, comm=args.comm, steps=args.steps, global_batch=args.global_batch,
        lr=args.lr, width=args.width, layers=args.layers, sequence=args.sequence, eval_examples=args.eval_examples,
        seed=args.seed, checkpoint=str(args.checkpoint) if args.checkpoint else None,
        checkpoint_every=args.checkpoint_every, resume=args.resume, data_dir=args.data_dir,
        result_path=str(args.json) if args.json else None, shard=args.shard,
    )
    result = train(config, args.nproc)
    if not result:  # a torchrun rank other than 0
        return 0
    how = "FSDP2, fp32 reduce-scatter" if config.shard else f"DDP, {config.comm} gradients"
    table = Table(title=f"mixprec train: {config.model}, recipe {config.recipe}, {result['world_size']} processes, "
                        f"{how}")
    metric = METRIC_COLUMNS[result["metric_name"]]
    for column in ("steps", "loss (last 10)", metric, "skipped", "loss scale", "step ms", "comm bytes/step",
                   "ranks identical"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['first_step']}-{result['last_step']}", f"{result['final_loss']:.4f}",
                  f"{result['metric_value']:.4f} ({result['eval_examples']})", str(result["skipped_steps"]),
                  f"{result['loss_scale']:g}", f"{result['step_ms']:.0f}",
                  f"{result['comm_payload_bytes_per_step']:,.0f}", "yes" if result["ranks_bitwise_equal"] else "NO")
    console.print(table)
    if config.checkpoint:
        console.print(f"checkpoint: {config.checkpoint}")
    return 0 if result["ranks_bitwise_equal"] else 1


def add_comm_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mixprec bench comm``."""
    parser.add_argument("--nproc", type=int, default=2, help="processes to compare with one (default: 2)")
    parser.add_argument("--comms", default="fp32,fp16,bf16,e5m2", help="comma-separated gradient formats")
    parser.add_argument("--recipe", default="fp16", help="the CNN's recipe (default: %(default)s)")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step over all processes")
    parser.add_argument("--width", type=int, default=16, help="CNN width (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median counts")
    parser.add_argument("--no-fsdp", action="store_true", help="DDP rows only (skip the FSDP2 rows)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")


def comm_bench_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``mixprec bench comm`` and print its table."""
    from mixprec.bench.comm_speed import COUNTS_NOTE, CommBenchConfig, run_comm_bench
    from mixprec.bench.timing import thread_settings

    config = CommBenchConfig(nprocs=(1, args.nproc), comms=tuple(c.strip() for c in args.comms.split(",") if c.strip()),
                             recipe=args.recipe, global_batch=args.global_batch, width=args.width,
                             repeats=args.repeats, fsdp=not args.no_fsdp)
    settings = thread_settings()
    console.print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = run_comm_bench(config, on_step=lambda label: console.print(f"running {label}..."))
    table = Table(title=f"DDP and FSDP2 step of the CNN (width {config.width}, recipe {config.recipe}, global batch "
                        f"{config.global_batch}; median of {config.repeats})")
    for column in ("processes", "parallel", "comm", "payload B/step", "gathered B", "scattered B", "wire B/step",
                   "x fewer", "step ms", "x 1-proc fp32", "threads/proc"):
        table.add_column(column, justify="left" if column in ("comm", "parallel") else "right")
    for row in rows:
        fsdp = row.parallel == "fsdp2"
        table.add_row(str(row.nproc), row.parallel, row.comm, f"{row.payload_bytes:,.0f}",
                      f"{row.all_gather_bytes:,.0f}" if fsdp else "", f"{row.reduce_scatter_bytes:,.0f}" if fsdp else "",
                      f"{row.wire_bytes:,.0f}",
                      "-" if math.isnan(row.bytes_ratio_to_fp32) else f"{row.bytes_ratio_to_fp32:.2f}", f"{row.step_ms:.1f}",
                      f"{row.ratio_to_single_fp32:.2f}", str(row.threads))
    console.print(table)
    console.print(COUNTS_NOTE)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "rows": [r.as_record() for r in rows]}, indent=2))
        console.print(f"wrote {args.json}")
    return 0
