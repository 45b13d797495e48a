"""Starting processes: :func:`init_from_env` (what a torchrun-launched script calls) and
:func:`run_processes` (``N`` local processes, as torchrun would start them, for tests,
``mixprec train --nproc`` and benchmarks). The library itself launches nothing."""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["default_backend", "free_port", "init_from_env", "run_processes"]


def default_backend() -> str:
    """``nccl`` where CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless it already is; returns (rank, world
    size). On CUDA it also selects the device LOCAL_RANK."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"not launched by torchrun ({', '.join(missing)} unset): use `torchrun --nproc-per-node N "
                "-m mixprec ...` or the command's --nproc option"
            )
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _worker(rank: int, fn: Callable[..., None], nproc: int, port: int, backend: str, timeout_s: float,
            args: Sequence[Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    init_from_env(backend, timeout_s)
    try:
        fn(*args)
        if dist.is_initialized():
            dist.barrier()  # no rank tears down while another is still in a collective
    finally:
        # on an error no barrier: the other ranks may be stuck mid-collective or gone, and
        # run_processes terminates them; either way this rank's threads end here, not at exit
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(
    fn: Callable[..., None],
    nproc: int,
    args: Sequence[Any] = (),
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes (torch.multiprocessing spawn) on
    localhost, each with the default process group initialised (``backend`` gloo on
    CPU, nccl on GPUs) on a free port, as torchrun would. ``fn`` must be importable (a
    module-level function); it finds its rank with ``torch.distributed.get_rank()``.
    Raises if a process fails, or ``TimeoutError`` (after terminating them all) when they
    run past ``timeout_s`` seconds."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive number of processes, got {nproc!r}")
    backend = backend or default_backend()
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise ValueError(f"{nproc} processes on nccl need {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    context = mp.start_processes(
        _worker, args=(fn, nproc, free_port(), backend, timeout_s, tuple(args)), nprocs=nproc, join=False,
        start_method="spawn",
    )
    assert context is not None
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nproc} processes ran past {timeout_s:.0f} s; terminated them")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
