"""Starting processes: :func:`init_from_env` (what a torchrun-launched script calls) and
:func:`run_processes` (``N`` local processes started by torchrun's own launcher, for
tests, ``mixprec train --nproc`` and benchmarks). The library itself launches nothing."""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import tempfile
import threading
import time
import traceback as traceback_module
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["default_backend", "init_from_env", "run_processes", "WorkerFailedError"]


def default_backend() -> str:
    """``nccl`` where CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless it already is; returns (rank, world
    size). ``timeout_s`` bounds every collective (gloo and nccl raise past it). On CUDA
    it also selects the device LOCAL_RANK."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"not launched by torchrun ({', '.join(missing)} unset): use `torchrun --standalone "
                "--nproc-per-node N -m mixprec ...` or the command's --nproc option"
            )
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


class WorkerFailedError(RuntimeError):
    """A process started by :func:`run_processes` raised: ``rank`` is the first rank
    that failed, ``traceback`` its traceback; the message names the ranks that failed
    after it (often as a consequence: a peer's collective breaks when it exits)."""

    def __init__(self, message: str, rank: int, traceback: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.traceback = traceback


def _worker(fn: Callable[..., None], backend: str, timeout_s: float, args: Sequence[Any], errors: str) -> None:
    """One rank, in a process torchrun's agent started (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT and the agent's store in the environment)."""
    # The time bound, from inside: a C watchdog thread (no GIL needed, so it fires even in
    # a collective that never returns or a loop in C) prints every thread's stack and
    # exits this process; the agent then sees a failed worker and stops the others.
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        init_from_env(backend, timeout_s)
        fn(*args)
        dist.barrier()  # no rank tears down while another is still in a collective
    except BaseException:
        # Recorded before the teardown below: the peers' collectives break only once this
        # rank closes its connections, so their errors are recorded later, and the caller
        # can name this rank's error as the first (the agent reports whichever process it
        # saw exit first, often a peer's "connection reset").
        rank = os.environ.get("RANK", "?")
        record = {"rank": rank, "time_ns": time.time_ns(), "traceback": traceback_module.format_exc()}
        partial = Path(errors) / f"rank{rank}.json.partial"
        partial.write_text(json.dumps(record))
        partial.replace(partial.with_suffix(""))
        raise
    finally:
        # on an error no barrier: the other ranks may be stuck mid-collective or gone, and
        # the agent terminates them; either way this rank's threads end here, not at exit
        if dist.is_initialized():
            dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _first_failure(errors: Path, nproc: int) -> WorkerFailedError | None:
    records = sorted((json.loads(path.read_text()) for path in errors.glob("rank*.json")),
                     key=lambda record: record["time_ns"])
    if not records:
        return None
    first, later = records[0], records[1:]
    message = f"rank {first['rank']} of {nproc} failed:\n{first['traceback']}"
    if later:
        message += "then " + "; ".join(
            f"rank {record['rank']}: {record['traceback'].strip().splitlines()[-1]}" for record in later)
    return WorkerFailedError(message, int(first["rank"]), first["traceback"])


@contextmanager
def _caller_state_kept() -> Iterator[None]:
    """Restore what torchrun's agent changes in the calling process: it installs signal
    handlers that raise ``SignalException`` (SIGTERM, SIGINT, SIGHUP, SIGQUIT) and sets
    TORCHELASTIC_SIGNALS_TO_HANDLE; the caller (a test session, the CLI) keeps its own."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in names if hasattr(signal, name)}
    variable = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    try:
        yield
    finally:
        if in_main:
            for name, handler in handlers.items():
                if handler is not None:
                    signal.signal(getattr(signal, name), handler)
        if variable is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = variable


def run_processes(
    fn: Callable[..., None],
    nproc: int,
    args: Sequence[Any] = (),
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes on localhost, started as
    ``torchrun --standalone --nproc-per-node nproc`` starts them: torchrun's launcher API
    (``elastic_launch``) with a c10d rendezvous on ``localhost:0`` (the agent's store
    takes a free port itself, and the workers connect to that store: no port to pick, no
    race for it), a fresh run id, no restarts, spawned processes. In each, the default
    process group is initialised (``backend``: gloo on CPU, nccl on GPUs) before ``fn``
    runs; ``fn`` must be importable (a module-level function) and finds its rank with
    ``torch.distributed.get_rank()``. Unlike the torchrun command, OMP_NUM_THREADS is
    left as the caller has it.

    Failures: if a process raises, the others are stopped and this raises
    :class:`WorkerFailedError` with the first failing rank's traceback (torch's
    ``ChildFailedError`` as its cause; that error itself where a process died without a
    Python exception). Ctrl-C stops the processes and raises ``KeyboardInterrupt``.

    Time: ``elastic_launch`` itself waits without a bound, so ``timeout_s`` is enforced
    inside the processes: it is the process group's timeout (every collective raises past
    it), and a watchdog in each process (``faulthandler``, a C thread that fires even in
    a collective that never returns) prints every thread's stack to stderr and exits the
    process ``timeout_s`` after it started (the spawn itself, a few seconds, comes on
    top); the agent then stops the rest (SIGTERM, SIGKILL 5 s later) and this raises
    ``TimeoutError``. A run is never left hanging, and the caller needs no signal or
    thread of its own."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive number of processes, got {nproc!r}")
    backend = backend or default_backend()
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise ValueError(f"{nproc} processes on nccl need {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mixprec-launch-") as logs, _caller_state_kept():
        errors = Path(logs) / "errors"
        errors.mkdir()
        config = LaunchConfig(  # torch/distributed/run.py's config_from_args under --standalone
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), role="default",
            rdzv_endpoint="localhost:0", rdzv_backend="c10d", max_restarts=0, monitor_interval=0.1,
            start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs),  # error files, removed after
            shutdown_timeout=5,
        )
        try:
            elastic_launch(config, _worker)(fn, backend, timeout_s, tuple(args), str(errors))
        except ChildFailedError as error:
            if time.monotonic() - started >= timeout_s:
                raise TimeoutError(f"{nproc} processes ran past {timeout_s:.0f} s; stopped them "
                                   "(their stacks are on stderr)") from error
            failure = _first_failure(errors, nproc)
            if failure is None:  # died without a Python error (a signal, os._exit): torch's report
                raise
            raise failure from error
        except SignalException as error:  # the agent's handler, installed for the run
            if error.sigval == signal.SIGINT:
                raise KeyboardInterrupt from error
            raise
