"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for converted models.

The order is **convert, then shard**: ``mixprec.convert(model, recipe)`` on the plain
model (every rank), then :func:`fully_shard` (this module's), which applies torch's
``fully_shard`` to each block and to the root. Then build the optimizer over
``model.parameters()`` (the sharded masters, DTensors) and a :class:`mixprec.GradScaler`.
``convert`` must see the plain model: it rounds the masters in place (FP16 masters of
paper 2), names the call sites after the module tree and hooks the root's forward; a
model sharded first is refused here ("convert the plain model first").

What the glue does, and why:

- **Rank 0's weights and generators** are broadcast before sharding (FSDP2, unlike DDP,
  keeps each rank's own slice of its own initialisation).
- **The weight operand is rounded after the all-gather**, from the full FP32 master
  (the emulated GEMM sees FSDP's unsharded parameter), so a sharded model computes the
  same products as an unsharded one. FSDP2 refills its unsharded parameters in place
  without a new tensor version, so the engine's version-keyed weight cache is switched
  to one rounding per forward (``EngineState.weights_per_forward``).
- **Overflow:** :class:`mixprec.GradScaler` checks the local shard of every gradient and
  all-reduces its verdict (MAX), so one rank's Inf/NaN skips the step on all.
- **Scales:** per-tensor amaxes are all-reduced with MAX
  (:func:`~mixprec.distributed.agree_on_scales`).
- **FP16 masters** (recipe ``fp8``): the masters are FP32 tensors holding FP16 values,
  so FSDP shards and all-gathers them as FP32 (4 bytes per weight element; an FP16
  all-gather would be exact and half the bytes, see ``param_dtype`` below) and
  ``GradScaler.step`` rounds each rank's shard back onto the FP16 grid with the
  recipe's update rounding. Stochastic rounding draws from each rank's generator for its
  own shard, so a sharded run's rounding noise differs from one process's (not its
  distribution), and the ranks' scaler generators differ after uneven shards: the
  sharded checkpoint (:mod:`mixprec.distributed.checkpoint`) keeps one per rank.

``fsdp_kwargs`` go to torch's ``fully_shard`` (``mesh``, ``reshard_after_forward``,
``mp_policy``...). A ``MixedPrecisionPolicy(param_dtype=...)`` all-gathers in 16 bits;
it equals rounding after the gather only where the weight format is that dtype with no
scaling (fp16 / bf16 recipes) and makes the weight gradient 16-bit before the
reduce-scatter (``reduce_dtype=torch.float32`` keeps the reduction in FP32): the counts
are in ``mixprec bench comm``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor

from mixprec.distributed.collectives import broadcast_object_tensor, collective_device
from mixprec.distributed.consensus import agree_on_scales, check_same_recipe
from mixprec.distributed.ddp import sync_from_rank0
from mixprec.nn.convert import engine_state, is_converted

__all__ = ["fully_shard", "default_blocks", "is_sharded", "FSDPCommState", "count_fsdp_comm"]


def is_sharded(model: nn.Module) -> bool:
    """Whether torch's ``fully_shard`` was applied to ``model`` or inside it."""
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters())


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: the children holding parameters of the model's
    longest ``ModuleList``/``Sequential`` (a transformer's layers, a CNN's stages), or
    of the model itself."""
    stacks = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    container = max(stacks, key=len) if stacks else model
    return [child for child in container.children() if any(True for _ in child.parameters())]


def fully_shard(
    model: nn.Module,
    blocks: Iterable[nn.Module] | None = None,
    *,
    scaler: Any = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Shard a model converted by :func:`mixprec.convert` with FSDP2: torch's
    ``fully_shard`` on each of ``blocks`` (default :func:`default_blocks`) and on the
    root, after broadcasting rank 0's parameters, buffers and generators (the model's,
    and ``scaler``'s update rounding), checking that every rank runs the same recipe,
    and agreeing per-tensor scales (see the module docstring). Returns ``model`` (now an
    ``FSDPModule``). Build the optimizer over ``model.parameters()`` afterwards (an
    optimizer built before holds the unsharded parameters FSDP2 replaced; so
    :func:`mixprec.prepare` does not fit here: wrap the new optimizer in
    ``mixprec.MixedPrecisionOptimizer(optimizer, recipe)`` if you want its loop). The
    ranks are ``fsdp_kwargs["mesh"]``'s (default: the world)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "fully_shard needs torch.distributed: call torch.distributed.init_process_group (gloo on CPU, nccl "
            "on GPUs) in every process first, or launch with torchrun")
    converted = is_converted(model)
    if is_sharded(model):
        if converted:
            raise ValueError("this model is already sharded (fully_shard was applied); shard it once")
        raise ValueError(
            "this model was sharded before it was converted: the order is mixprec.convert(model, recipe) on the "
            "plain model, then mixprec.distributed.fully_shard(model) (convert rounds the masters in place and "
            "hooks the forward of the unsharded module tree)")
    if not converted:
        raise ValueError("call mixprec.convert(model, recipe) first, then mixprec.distributed.fully_shard(model)")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("this model is wrapped in DistributedDataParallel: shard the converted model itself")
    process_group = fsdp_kwargs["mesh"].get_group() if fsdp_kwargs.get("mesh") is not None else None
    state = engine_state(model)
    check_same_recipe(state.recipe, process_group)
    if scaler is not None and scaler.recipe.name != state.recipe.name:
        raise ValueError(f"the GradScaler runs recipe {scaler.recipe.name!r} but the model {state.recipe.name!r}")
    _broadcast_from_rank0(model, process_group)
    sync_from_rank0(model, scaler=scaler, process_group=process_group)
    if scaler is not None:
        scaler.process_group = process_group
    agree_on_scales(model, process_group)
    state.weights_per_forward = True
    state.clear_weights()
    chosen = default_blocks(model) if blocks is None else list(blocks)
    for block in chosen:
        if block is model:
            continue
        torch_fully_shard(block, **fsdp_kwargs)
    torch_fully_shard(model, **fsdp_kwargs)
    return model


def _broadcast_from_rank0(model: nn.Module, process_group: Any) -> None:
    src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == collective_device(process_group).type:
                dist.broadcast(tensor.data, src=src, group=process_group)
            else:
                tensor.data.copy_(broadcast_object_tensor(tensor.data, src, process_group))


# ---- counting FSDP2's communication ---------------------------------------------------


@dataclass
class FSDPCommState:
    """Bytes FSDP2 hands to its collectives on this rank: ``all_gather_bytes`` (the
    rank's shard of the parameters, each forward and each backward re-gather),
    ``reduce_scatter_bytes`` (the full unsharded gradients this rank contributes) and
    the number of calls of each. :meth:`reset` zeroes them."""

    all_gathers: int = 0
    all_gather_bytes: int = 0
    reduce_scatters: int = 0
    reduce_scatter_bytes: int = 0

    def reset(self) -> None:
        """Zero the counters (e.g. after warm-up steps)."""
        self.all_gathers = self.all_gather_bytes = self.reduce_scatters = self.reduce_scatter_bytes = 0


def count_fsdp_comm(model: nn.Module) -> FSDPCommState:
    """Count the bytes of every FSDP2 all-gather and reduce-scatter of a sharded
    ``model`` (through FSDP's custom-collective interface; the collectives are torch's
    own)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    counts = FSDPCommState()

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                     async_op: bool = False) -> Any:
            counts.all_gathers += 1
            counts.all_gather_bytes += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> Any:
            counts.reduce_scatters += 1
            counts.reduce_scatter_bytes += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        raise ValueError("this model is not sharded: call mixprec.distributed.fully_shard(model) first")
    for module in sharded:
        module.set_custom_all_gather(CountingAllGather())
        module.set_custom_reduce_scatter(CountingReduceScatter())
    return counts
