"""``mixprec bench comm``: bytes communicated per step and step time of the
Fashion-MNIST CNN under DDP, for 1 and N processes and every gradient-communication
format (fp32, fp16, bf16, e5m2), and under FSDP2 for each all-gather format of the
weights (fp32 masters, rounded to the weight format after the gather; or gathered in
the recipe's 16-bit weight format where that is exact), in one run.

Each process count is one spawn; inside it, one DDP model per format (same seed, same
data), and one FSDP2 model per all-gather format, is stepped in interleaved rounds (one step of each per round, median over rounds),
so drift of a shared machine hits the formats alike. The global batch is fixed, so N
processes each compute 1/N of it. One process still runs DDP (world size 1): the hook
casts and "reduces", and sends nothing; FSDP2 on one process calls no collective at all
(payload 0).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.distributed.fsdp import MixedPrecisionPolicy

from mixprec.amp import GradScaler
from mixprec.distributed import COMM_FORMATS, count_fsdp_comm, fully_shard, resolve_comm_format, run_processes, wrap_ddp
from mixprec.nn.convert import convert
from mixprec.experiments.models import resnet_style_cnn
from mixprec.recipe import get_recipe
from mixprec.amp import prepare

__all__ = ["CommRow", "CommBenchConfig", "run_comm_bench", "COUNTS_NOTE"]


@dataclass(frozen=True)
class CommBenchConfig:
    """What ``mixprec bench comm`` measures: process counts, formats, the recipe of the
    model, the global batch (split over the processes), CNN width and timed rounds."""

    nprocs: tuple[int, ...] = (1, 2)
    comms: tuple[str, ...] = COMM_FORMATS
    recipe: str = "fp16"
    global_batch: int = 64
    width: int = 16
    repeats: int = 5
    fsdp: bool = True

    def __post_init__(self) -> None:
        get_recipe(self.recipe)
        for comm in self.comms:
            resolve_comm_format(comm)
        if not self.nprocs or any(n < 1 or self.global_batch % n for n in self.nprocs):
            raise ValueError(f"process counts must be >= 1 and divide the global batch {self.global_batch}")
        if self.repeats < 1 or self.width < 1:
            raise ValueError("repeats and width must be >= 1")


@dataclass(frozen=True)
class CommRow:
    """One process count under one communication format (bytes per rank per step).
    ``parallel`` is ``ddp`` (``comm``: the gradient all-reduce format) or ``fsdp2``
    (``comm``: the weights' all-gather format; gradients reduce-scattered in FP32), whose
    payload splits into ``all_gather_bytes`` and ``reduce_scatter_bytes``."""

    nproc: int
    comm: str
    payload_bytes: float
    wire_bytes: float
    bytes_ratio_to_fp32: float
    step_ms: float
    ratio_to_single_fp32: float
    threads: int
    parallel: str = "ddp"
    all_gather_bytes: float = 0.0
    reduce_scatter_bytes: float = 0.0

    def as_record(self) -> dict[str, object]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def _bench_worker(config: CommBenchConfig, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    local = config.global_batch // world
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(local, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (local,), generator=generator)
    runs: dict[tuple[str, str], Any] = {}
    for comm in config.comms:
        torch.manual_seed(0)
        model = resnet_style_cnn(width=config.width, stem_stride=2)
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), config.recipe)
        ddp_model, state = wrap_ddp(model, optimizer, comm)
        runs["ddp", resolve_comm_format(comm)] = (ddp_model, optimizer, state)
    for gather in fsdp_gathers(config) if config.fsdp else ():
        torch.manual_seed(0)
        model = convert(resnet_style_cnn(width=config.width, stem_stride=2), config.recipe)
        scaler = GradScaler(config.recipe)
        policy = MixedPrecisionPolicy(param_dtype=_GATHER_DTYPES[gather], reduce_dtype=torch.float32)
        fully_shard(model, scaler=scaler, mp_policy=policy)
        counts = count_fsdp_comm(model)
        runs["fsdp2", gather] = (model, (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), scaler), counts)

    def step(key: tuple[str, str]) -> float:
        model, optimizer, _ = runs[key]
        dist.barrier()  # every rank starts the step together
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).float(), y)
        if key[0] == "ddp":
            optimizer.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        else:
            torch_optimizer, scaler = optimizer
            scaler.scale(loss).backward()
            scaler.step(torch_optimizer)
            scaler.update()
            torch_optimizer.zero_grad()
        return time.perf_counter() - start

    for key in runs:  # warm-up: DDP's first step rebuilds its buckets
        step(key)
        step(key)
        runs[key][2].reset()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(config.repeats):
        for key in runs:
            times[key].append(step(key))
    if rank == 0:
        records = []
        for key, (_, _, counts) in runs.items():
            record: dict[str, Any] = {"parallel": key[0], "comm": key[1], "step_s": statistics.median(times[key]),
                                      "threads": torch.get_num_threads()}
            if key[0] == "ddp":
                record.update(payload_bytes=counts.payload_bytes / config.repeats,
                              wire_bytes=counts.wire_bytes / config.repeats)
            else:
                gathered, scattered = counts.all_gather_bytes / config.repeats, counts.reduce_scatter_bytes / config.repeats
                # ring algorithms: an all-gather sends its shard N-1 times; a reduce-scatter
                # sends (N-1)/N of the full gradient
                record.update(payload_bytes=gathered + scattered, all_gather_bytes=gathered,
                              reduce_scatter_bytes=scattered,
                              wire_bytes=(world - 1) * gathered + (world - 1) * scattered / world)
            records.append(record)
        Path(out).write_text(json.dumps(records))


_GATHER_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def fsdp_gathers(config: CommBenchConfig) -> tuple[str, ...]:
    """FSDP2's all-gather formats benchmarked for ``config.recipe``: fp32 (the masters;
    the engine rounds after the gather), and the recipe's weight format where it is
    fp16 or bf16 without scaling, where gathering in it gives the same weight operand
    (FP8 weights would need FSDP2's pre/post all-gather extension: not done)."""
    weight = get_recipe(config.recipe).forward.right
    name = getattr(weight.fmt, "name", "")
    if weight.scaling is None and name in ("fp16", "bf16"):
        return ("fp32", name)
    return ("fp32",)


def run_comm_bench(
    config: CommBenchConfig = CommBenchConfig(),
    on_step: Callable[[str], None] | None = None,
    timeout_s: float = 900.0,
) -> list[CommRow]:
    """Every process count x communication format; ratios against fp32 communication
    at the same process count (bytes) and the one-process fp32 run (time). The
    baselines are run even when not asked for."""
    notify = on_step or (lambda label: None)
    comms = tuple(dict.fromkeys(["fp32", *(resolve_comm_format(c) for c in config.comms)]))
    nprocs = tuple(dict.fromkeys([1, *config.nprocs]))
    measured: dict[int, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for nproc in nprocs:
            notify(f"{nproc} process{'es' if nproc > 1 else ''}")
            out = Path(folder) / f"{nproc}.json"
            inner = CommBenchConfig(nprocs=(nproc,), comms=comms, recipe=config.recipe,
                                    global_batch=config.global_batch, width=config.width, repeats=config.repeats,
                                    fsdp=config.fsdp)
            run_processes(_bench_worker, nproc, (inner, str(out)), timeout_s=timeout_s)
            measured[nproc] = json.loads(out.read_text())
    single_fp32 = next(r["step_s"] for r in measured[1] if r["comm"] == "fp32" and r["parallel"] == "ddp")
    rows: list[CommRow] = []
    wanted = {resolve_comm_format(c) for c in config.comms}
    for nproc in nprocs:
        if nproc not in config.nprocs and nproc != 1:
            continue
        fp32 = next(r for r in measured[nproc] if r["comm"] == "fp32" and r["parallel"] == "ddp")
        for record in measured[nproc]:
            if record["parallel"] == "ddp" and record["comm"] not in wanted and record["comm"] != "fp32":
                continue
            rows.append(CommRow(
                nproc=nproc, comm=str(record["comm"]), payload_bytes=record["payload_bytes"],
                wire_bytes=record["wire_bytes"],
                # nothing sent (FSDP2 on one process skips its collectives): no ratio
                bytes_ratio_to_fp32=(fp32["payload_bytes"] / record["payload_bytes"] if record["payload_bytes"]
                                     else float("nan")),
                step_ms=record["step_s"] * 1e3, ratio_to_single_fp32=record["step_s"] / single_fp32,
                threads=int(record["threads"]), parallel=str(record["parallel"]),
                all_gather_bytes=float(record.get("all_gather_bytes", 0.0)),
                reduce_scatter_bytes=float(record.get("reduce_scatter_bytes", 0.0)),
            ))
    return rows


COUNTS_NOTE = (
    "payload = bytes of the tensors one rank hands to collectives per step; wire = what it sends under ring "
    "algorithms (2(N-1)/N x payload for an all-reduce, (N-1) x payload for e5m2's all-gather); "
    "x fewer = DDP fp32 payload / payload at the same process count. fsdp2 rows: comm = the weights' all-gather "
    "format, gradients reduce-scattered in fp32; payload = shard all-gathered (forward, and again in backward for "
    "the blocks resharded after forward) + full gradient reduce-scattered; wire = (N-1) x gathered + "
    "(N-1)/N x scattered."
)
"""What the byte columns of the table count."""
