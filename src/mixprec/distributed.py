"""Multi-process training on PyTorch's own engine: ``torch.distributed`` and
``DistributedDataParallel`` (DDP), with gradient all-reduce in reduced precision.

The order is: build the model and its torch optimizer, :func:`mixprec.prepare` them (or
``mixprec.convert`` the model), then wrap the *converted* model in DDP (:func:`wrap_ddp`
does it, and registers a communication hook). The model's parameters are the master
weights, so DDP broadcasts rank 0's masters at construction; ``convert`` may change
their dtype (FP16 masters), so DDP must come second.

Communication hooks (``ddp_model.register_comm_hook(state, hook)``) reduce each gradient
bucket in one of:

- ``fp32``: cast to float32, all-reduce (sum), divide by the world size: the baseline,
  4 bytes per gradient element whatever the parameter dtype.
- ``fp16`` / ``bf16``: divide by the world size in float32, cast to 16 bits, all-reduce,
  cast back: 2 bytes per element. The hook runs inside the backward, so the
  gradients still carry the loss scale (the GradScaler unscales them afterwards): small
  FP16 gradients do not underflow on the wire, as they do not in the backward pass.
- ``e5m2`` (alias ``fp8``): one per-bucket scale agreed by all ranks (all-reduce MAX of
  the bucket's amax, 4 bytes, rounded up to a power of two so scaling is exact), the
  bucket divided by it and rounded to nearest-even into E5M2, and the 1-byte codes
  *all-gathered* (gloo cannot all-reduce float8, and summing in FP8 would round at every
  addition); each rank then sums the ranks' values in float32, in rank order, so every
  rank gets the same bits. 1 byte per element plus 4 per bucket.

Byte counts (:class:`CommState`): ``payload_bytes`` is the size of the tensors this rank
hands to collectives; ``wire_bytes`` is what it sends under the ring algorithms:
``2 (N-1)/N x payload`` for an all-reduce, ``(N-1) x payload`` for an all-gather. At two
ranks both are equal to the payload; beyond that the FP8 all-gather grows linearly with
N and its 4x advantage over an FP32 all-reduce shrinks to ``8/N`` (it is 1x at N = 8): a
reduce-scatter in FP8 would keep it, at the price of rounding partial sums.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if dist.is_available():
    # torch.distributed.nn.functional binds ``group.WORLD`` as the default argument of
    # ten functions when it is first imported, and the first torch optimizer and DDP import it lazily
    # (DDP through torch.distributed._shard), i.e. after init_process_group:
    # the default process group is then referenced for ever, destroy_process_group
    # cannot free it, and its gloo worker threads (and rank 0's TCPStore server thread)
    # run on until the interpreter exits and are torn down there, racing the other ranks'
    # exits: the likely source of a rare ``terminate called without an active exception``
    # (SIGABRT, issue 14).
    # Imported here, before any process group exists, the defaults are None.
    import torch.distributed.nn  # noqa: F401

from mixprec.amp import MixedPrecisionOptimizer
from mixprec.nn.convert import engine_state, is_converted
from mixprec.core.quantize import scale_from_amax
from mixprec.core.storage import from_storage, to_storage

__all__ = [
    "COMM_FORMATS",
    "resolve_comm_format",
    "CommState",
    "comm_hook",
    "wrap_ddp",
    "sync_from_rank0",
    "run_processes",
    "init_from_env",
    "free_port",
    "default_backend",
]

_ALLREDUCE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMM_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "e5m2")
"""The gradient-communication formats a hook can use (``fp8`` is an alias of ``e5m2``)."""
_ALIASES = {"fp8": "e5m2", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def resolve_comm_format(name: str) -> str:
    """The canonical communication format for ``name`` (``fp8`` -> ``e5m2``); raises for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"the communication format is a name, not {type(name).__name__}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in COMM_FORMATS:
        raise ValueError(
            f"unknown gradient communication format {name!r}; use one of {', '.join(COMM_FORMATS)} (or fp8 = e5m2)"
        )
    return key


@dataclass
class CommState:
    """What a communication hook needs (format, process group, world size) and what it
    counts: hook calls (one per bucket per step), gradient elements reduced, and bytes
    (``payload_bytes``: tensors handed to collectives by this rank; ``wire_bytes``: what
    this rank sends under ring algorithms). :meth:`reset` zeroes the counters."""

    format: str
    process_group: Any = None
    world_size: int = 1
    calls: int = 0
    elements: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    bucket_dtypes: set[torch.dtype] = field(default_factory=set)

    def reset(self) -> None:
        """Zero the counters (e.g. after warm-up steps)."""
        self.calls = self.elements = self.payload_bytes = self.wire_bytes = 0

    def _count(self, payload: int, collective: str) -> None:
        n = self.world_size
        self.payload_bytes += payload
        if collective == "all_reduce":
            self.wire_bytes += 2 * (n - 1) * payload // n
        else:  # all_gather
            self.wire_bytes += (n - 1) * payload


def _all_reduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.calls += 1
    state.elements += buffer.numel()
    state.bucket_dtypes.add(buffer.dtype)
    # divide before the cast (one rounding, and a sum of N values cannot overflow 16 bits)
    payload = (buffer.to(torch.float32) / state.world_size).to(_ALLREDUCE_DTYPES[state.format])
    state._count(payload.numel() * payload.element_size(), "all_reduce")
    work = dist.all_reduce(payload, group=state.process_group, async_op=True)

    def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        return buffer.copy_(future.value()[0])

    return work.get_future().then(unpack)  # type: ignore[no-any-return]


# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _e5m2_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.calls += 1
    state.elements += buffer.numel()
    state.bucket_dtypes.add(buffer.dtype)
    values = buffer.to(torch.float32)
    amax = values.abs().max().reshape(1)
    # one scale for the bucket on every rank: the largest amax (an Inf or NaN amax gives
    # scale 1, the Inf/NaN travels, and every rank skips the step)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=state.process_group)
    state._count(amax.numel() * amax.element_size(), "all_reduce")
    scale = scale_from_amax(amax, "e5m2", power_of_two=True)
    codes = to_storage(values / scale, "e5m2").view(torch.uint8)  # round to nearest even
    gathered = torch.empty(state.world_size * codes.numel(), dtype=torch.uint8, device=codes.device)
    state._count(codes.numel(), "all_gather")
    work = _all_gather_single(gathered, codes, group=state.process_group, async_op=True)

    def unpack(future: torch.futures.Future[Any]) -> torch.Tensor:
        ranks = from_storage(gathered.view(torch.float8_e5m2), "e5m2").reshape(state.world_size, -1)
        # summed in float32 in rank order: the same bits on every rank
        return buffer.copy_(ranks.sum(0) * (scale / state.world_size))

    return work.get_future().then(unpack)  # type: ignore[no-any-return]


# DDP checks the hooks' annotations against the objects themselves; under
# ``from __future__ import annotations`` they would be strings, so set the objects.
for _hook in (_all_reduce_hook, _e5m2_hook):
    _hook.__annotations__.update(bucket=dist.GradBucket, state=CommState,
                                 **{"return": torch.futures.Future[torch.Tensor]})


def comm_hook(
    fmt: str, process_group: Any = None
) -> tuple[CommState, Callable[[CommState, dist.GradBucket], torch.futures.Future[torch.Tensor]]]:
    """A DDP communication hook reducing gradients in ``fmt`` (fp32, fp16, bf16, e5m2
    or fp8), and its state: ``ddp_model.register_comm_hook(*comm_hook("fp16"))``.
    Needs an initialised process group (the world size is read here)."""
    name = resolve_comm_format(fmt)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("communication hooks need torch.distributed: call torch.distributed.init_process_group first")
    state = CommState(name, process_group, dist.get_world_size(process_group))
    return state, (_e5m2_hook if name == "e5m2" else _all_reduce_hook)


def sync_from_rank0(model: nn.Module, optimizer: MixedPrecisionOptimizer | None = None,
                    process_group: Any = None) -> None:
    """Broadcast rank 0's stochastic-rounding state (the model's seed and forward
    count, and the optimizer's update-rounding generator), so every rank rounds alike
    whatever its seed. DDP itself broadcasts the parameters (the masters) and buffers.
    Call before training."""
    source = _global_rank0(process_group)
    random_state = engine_state(model).random_state
    if random_state is not None:
        dist.broadcast(random_state, src=source, group=process_group)
    generator = optimizer.scaler.generator if optimizer is not None else None
    if generator is not None:
        generator_state = generator.get_state()
        dist.broadcast(generator_state, src=source, group=process_group)
        generator.set_state(generator_state)


def _global_rank0(process_group: Any) -> int:
    return 0 if process_group is None else dist.get_global_rank(process_group, 0)


def wrap_ddp(
    model: nn.Module,
    optimizer: MixedPrecisionOptimizer,
    comm: str = "fp32",
    process_group: Any = None,
    **ddp_kwargs: Any,
) -> tuple[DistributedDataParallel, CommState]:
    """Wrap a model already converted by :func:`mixprec.prepare` in
    ``DistributedDataParallel`` with gradients reduced in ``comm`` (see the module
    docstring), after broadcasting rank 0's masters (:func:`sync_from_rank0`); the
    optimizer then agrees on skipped steps across ``process_group``. Returns the DDP
    model (train with it; checkpoint ``ddp_model.module``) and the hook's byte counters.
    ``ddp_kwargs`` go to DDP (e.g. ``device_ids`` on GPUs, ``bucket_cap_mb``)."""
    name = resolve_comm_format(comm)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "wrap_ddp needs torch.distributed: call torch.distributed.init_process_group (gloo on CPU, "
            "nccl on GPUs) in every process first, or launch with torchrun"
        )
    if isinstance(model, DistributedDataParallel):
        raise ValueError(
            "this model is already wrapped in DistributedDataParallel; the order is prepare(model, ...) "
            "on the plain model, then wrap_ddp on the converted model"
        )
    if not isinstance(optimizer, MixedPrecisionOptimizer):
        raise TypeError(
            f"wrap_ddp takes the MixedPrecisionOptimizer that mixprec.prepare returned, not {type(optimizer).__name__}"
        )
    if not is_converted(model):
        raise ValueError("call mixprec.prepare(model, optimizer, recipe) first, then wrap the converted model")
    sync_from_rank0(model, optimizer, process_group)
    optimizer.scaler.process_group = process_group
    ddp_model = DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
    state, hook = comm_hook(name, process_group)
    ddp_model.register_comm_hook(state, hook)
    return ddp_model, state


# ---- launching ------------------------------------------------------------------------


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
    import time

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
