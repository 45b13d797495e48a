"""DistributedDataParallel (DDP) with gradient all-reduce in reduced precision.

The order is: build the model and its torch optimizer, :func:`mixprec.prepare` them (or
``mixprec.convert`` the model), then wrap the *converted* model in DDP (:func:`wrap_ddp`
does it, and registers a communication hook). The model's parameters are the master
weights, so DDP broadcasts rank 0's masters at construction; ``convert`` may round
their values (FP16 masters), so DDP must come second.

Communication hooks (``ddp_model.register_comm_hook(state, hook)``) reduce each gradient
bucket in one of:

- ``fp32``: cast to float32, all-reduce (sum), divide by the world size: the baseline,
  4 bytes per gradient element whatever the parameter dtype.
- ``fp16``: divide by the world size in float32, cast to float16, all-reduce, cast
  back: 2 bytes per element. Not torch's ``fp16_compress_hook``, which casts first and
  divides in float16: a loss-scaled gradient between 65504 and N x 65504 overflows on
  its wire (a skipped step ours does not take) and a subnormal quotient is rounded twice.
  The hook runs inside the backward, so the gradients still carry the loss scale (the
  GradScaler unscales them afterwards): small FP16 gradients do not underflow on the
  wire, as they do not in the backward pass.
- ``bf16``: torch's own ``bf16_compress_hook`` where the world size is a power of two
  (casting first and then dividing by 2^k gives the same bits as dividing first, except
  beyond bfloat16's range, 3.4e38 / N, and in its subnormals below 1.2e-38, where no
  gradient of a scaled loss lives); the fp16 hook's order in bfloat16 otherwise.
- ``e5m2`` (alias ``fp8``): each rank scales its bucket by its own power-of-two scale
  (its amax onto E5M2's largest value, so scaling is exact), rounds to nearest-even
  E5M2 and *all-gathers* the 1-byte codes with the 4 bytes of its scale appended (gloo
  cannot all-reduce float8, and summing in FP8 would round at every addition); each
  rank then sums the ranks' values times their scales in float32, in rank order, so
  every rank gets the same bits. One collective and no wait inside the hook: the sum
  runs in the future's callback. 1 byte per element plus 4 per bucket.

Byte counts (:class:`CommState`): ``payload_bytes`` is the size of the tensors this rank
hands to collectives; ``wire_bytes`` is what it sends under the ring algorithms:
``2 (N-1)/N x payload`` for an all-reduce, ``(N-1) x payload`` for an all-gather. At two
ranks both are equal to the payload; beyond that the FP8 all-gather grows linearly with
N and its 4x advantage over an FP32 all-reduce shrinks to ``8/N`` (it is 1x at N = 8): a
reduce-scatter in FP8 would keep it, at the price of rounding partial sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from mixprec.amp import MixedPrecisionOptimizer
from mixprec.core.quantize import scale_from_amax
from mixprec.core.storage import from_storage, to_storage
from mixprec.distributed.collectives import broadcast_object_tensor
from mixprec.distributed.consensus import agree_on_scales, check_same_recipe
from mixprec.nn.convert import engine_state, is_converted

__all__ = ["COMM_FORMATS", "resolve_comm_format", "CommState", "comm_hook", "wrap_ddp", "sync_from_rank0"]

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
    wire_dtype = _ALLREDUCE_DTYPES[state.format]
    state._count(buffer.numel() * wire_dtype.itemsize, "all_reduce")
    if state.format == "bf16" and _power_of_two(state.world_size):
        return default_hooks.bf16_compress_hook(state.process_group, bucket)
    # divide before the cast (one rounding, and a sum of N values cannot overflow 16 bits)
    payload = (buffer.to(torch.float32) / state.world_size).to(wire_dtype)
    work = dist.all_reduce(payload, group=state.process_group, async_op=True)

    def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        return buffer.copy_(future.value()[0])

    return work.get_future().then(unpack)  # type: ignore[no-any-return]


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_SCALE_BYTES = 4


def _e5m2_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.calls += 1
    state.elements += buffer.numel()
    state.bucket_dtypes.add(buffer.dtype)
    values = buffer.to(torch.float32)
    # this rank's own scale (an Inf or NaN amax gives scale 1: the Inf/NaN travels as
    # E5M2's own Inf/NaN code, and every rank skips the step)
    scale = scale_from_amax(values.abs().max(), "e5m2", power_of_two=True).reshape(1)
    codes = to_storage(values / scale, "e5m2").view(torch.uint8)  # round to nearest even
    message = torch.cat([codes, scale.view(torch.uint8)])  # the scale's 4 bytes ride along
    gathered = torch.empty(state.world_size * message.numel(), dtype=torch.uint8, device=message.device)
    state._count(message.numel(), "all_gather")
    work = _all_gather_single(gathered, message, group=state.process_group, async_op=True)
    n = codes.numel()

    def unpack(future: torch.futures.Future[Any]) -> torch.Tensor:
        ranks = gathered.reshape(state.world_size, n + _SCALE_BYTES)
        # a fresh 1-D copy: viewing bytes as float32 needs 4-byte alignment of offset and strides
        scales = ranks[:, n:].reshape(-1).clone().view(torch.float32)  # (N,)
        decoded = from_storage(ranks[:, :n].contiguous().view(torch.float8_e5m2), "e5m2")
        # summed in float32 in rank order: the same bits on every rank
        total = decoded[0] * scales[0]
        for rank in range(1, state.world_size):
            total = total + decoded[rank] * scales[rank]
        return buffer.copy_(total / state.world_size)

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


def sync_from_rank0(model: nn.Module, optimizer: Any = None, process_group: Any = None,
                    scaler: Any = None) -> None:
    """Broadcast rank 0's stochastic-rounding state (the model's seed and forward count,
    and the update rounding's generator of ``scaler`` or of the prepared ``optimizer``'s
    scaler), so every rank rounds alike whatever its seed. DDP itself broadcasts the
    parameters (the masters) and buffers. Call before training. Under nccl the states
    travel through the collective on the current GPU."""
    source = _global_rank0(process_group)
    random_state = engine_state(model).random_state
    if random_state is not None:
        random_state.copy_(broadcast_object_tensor(random_state, source, process_group))
    if scaler is None and isinstance(optimizer, MixedPrecisionOptimizer):
        scaler = optimizer.scaler
    generator = scaler.generator if scaler is not None else None
    if generator is not None:
        generator.set_state(broadcast_object_tensor(generator.get_state(), source, process_group))


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
    docstring), after broadcasting rank 0's generators (:func:`sync_from_rank0`); the
    optimizer then agrees on skipped steps across ``process_group``, and per-tensor FP8
    scales are agreed by all ranks (:func:`~mixprec.distributed.agree_on_scales`). Returns the DDP
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
    check_same_recipe(engine_state(model).recipe, process_group)
    sync_from_rank0(model, optimizer, process_group)
    optimizer.scaler.process_group = process_group
    agree_on_scales(model, process_group)
    ddp_model = DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
    state, hook = comm_hook(name, process_group)
    ddp_model.register_comm_hook(state, hook)
    return ddp_model, state


