"""``mixprec bench comm``: bytes communicated per step and step time of the
Fashion-MNIST CNN under DDP, for 1 and N processes and every gradient-communication
format (fp32, fp16, bf16, e5m2), in one run.

Each process count is one spawn; inside it, one DDP model per format (same seed, same
data) is stepped in interleaved rounds (one step of each per round, median over rounds),
so drift of a shared machine hits the formats alike. The global batch is fixed, so N
processes each compute 1/N of it. One process still runs DDP (world size 1): the hook
casts and "reduces", and sends nothing.
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

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mixprec.distributed import COMM_FORMATS, resolve_comm_format, run_processes, wrap_ddp
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
    """One process count under one communication format (bytes per rank per step)."""

    nproc: int
    comm: str
    payload_bytes: float
    wire_bytes: float
    bytes_ratio_to_fp32: float
    step_ms: float
    ratio_to_single_fp32: float
    threads: int

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
    runs = {}
    for comm in config.comms:
        torch.manual_seed(0)
        model = resnet_style_cnn(width=config.width, stem_stride=2)
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), config.recipe)
        ddp_model, state = wrap_ddp(model, optimizer, comm)
        runs[comm] = (ddp_model, optimizer, state)

    def step(comm: str) -> float:
        ddp_model, optimizer, _ = runs[comm]
        dist.barrier()  # every rank starts the step together
        start = time.perf_counter()
        optimizer.backward(F.cross_entropy(ddp_model(x).float(), y))
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for comm in config.comms:  # warm-up: DDP's first step rebuilds its buckets
        step(comm)
        step(comm)
        runs[comm][2].reset()
    times: dict[str, list[float]] = {comm: [] for comm in config.comms}
    for _ in range(config.repeats):
        for comm in config.comms:
            times[comm].append(step(comm))
    if rank == 0:
        records = [{
            "comm": resolve_comm_format(comm), "step_s": statistics.median(times[comm]),
            "payload_bytes": runs[comm][2].payload_bytes / config.repeats,
            "wire_bytes": runs[comm][2].wire_bytes / config.repeats,
            "threads": torch.get_num_threads(),
        } for comm in config.comms]
        Path(out).write_text(json.dumps(records))


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
                                    global_batch=config.global_batch, width=config.width, repeats=config.repeats)
            run_processes(_bench_worker, nproc, (inner, str(out)), timeout_s=timeout_s)
            measured[nproc] = json.loads(out.read_text())
    single_fp32 = next(r["step_s"] for r in measured[1] if r["comm"] == "fp32")
    rows: list[CommRow] = []
    wanted = {resolve_comm_format(c) for c in config.comms}
    for nproc in nprocs:
        if nproc not in config.nprocs and nproc != 1:
            continue
        fp32 = next(r for r in measured[nproc] if r["comm"] == "fp32")
        for record in measured[nproc]:
            if record["comm"] not in wanted and record["comm"] != "fp32":
                continue
            rows.append(CommRow(
                nproc=nproc, comm=str(record["comm"]), payload_bytes=record["payload_bytes"],
                wire_bytes=record["wire_bytes"],
                bytes_ratio_to_fp32=fp32["payload_bytes"] / max(record["payload_bytes"], 1e-9),
                step_ms=record["step_s"] * 1e3, ratio_to_single_fp32=record["step_s"] / single_fp32,
                threads=int(record["threads"]),
            ))
    return rows


COUNTS_NOTE = (
    "payload = bytes of the tensors one rank hands to collectives per step; wire = what it sends under ring "
    "algorithms (2(N-1)/N x payload for an all-reduce, (N-1) x payload for e5m2's all-gather); "
    "x fewer = fp32 payload / payload at the same process count."
)
"""What the byte columns of the table count."""
