"""What all ranks must agree on beyond the gradients: the per-tensor FP8 scales.

Under per-tensor scaling (delayed or current) each rank would derive a scale from the
amax of its own share of the batch, so the ranks would round the same layer's
activations and gradients with different scales. :func:`agree_on_scales` makes every
amax the largest over the ranks (an all-reduce MAX of one float per scaled operand, as
Transformer Engine reduces its amaxes across the data-parallel group), so every rank
uses the same scale each step and keeps the same amax histories, which a checkpoint
written by one rank then restores on all. (The skip verdict of an overflowing step is
agreed in :class:`mixprec.GradScaler` itself.)
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.distributed.collectives import collective_device
from mixprec.nn.convert import engine_state
from mixprec.recipe import Recipe

__all__ = ["AmaxConsensus", "agree_on_scales", "check_same_recipe"]


class AmaxConsensus:
    """The amax reduction a converted model calls for each scaled operand: the largest
    amax over ``process_group``. A non-finite amax (an overflowing step) counts as +Inf
    on every rank, so all ranks see the same value (gloo's MAX of a NaN depends on the
    order). ``calls`` counts the all-reduces. Synchronises with the device (one
    blocking all-reduce per scaled operand)."""

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.calls = 0

    def __call__(self, amax: torch.Tensor) -> torch.Tensor:
        value = amax.detach().float().reshape(1).to(collective_device(self.process_group), copy=True)
        value = torch.where(torch.isfinite(value), value, torch.full_like(value, float("inf")))
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.process_group)
        self.calls += 1
        return value.reshape(()).to(amax.device)


def agree_on_scales(model: nn.Module, process_group: Any = None) -> AmaxConsensus | None:
    """Make the converted ``model``'s per-tensor scales agreed by all ranks of
    ``process_group`` (see the module docstring); returns the reduction (None where the
    group has one rank). A recipe without per-tensor scaling never calls it."""
    state = engine_state(model)
    if dist.get_world_size(process_group) == 1:
        state.amax_reduce = None
        return None
    consensus = AmaxConsensus(process_group)
    state.amax_reduce = consensus
    return consensus


def check_same_recipe(recipe: Recipe, process_group: Any = None) -> None:
    """Raise on every rank unless all ranks of ``process_group`` run the same recipe
    (its name and every field): ranks on different recipes would exchange gradients of
    different numerics and never agree on scales or skips. One all-gather of a digest."""
    # without memory addresses (a custom keep rule's function): the same recipe on every rank
    described = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(recipe))
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    mine = (recipe.name, digest)
    theirs: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(theirs, mine, group=process_group)
    if any(other != mine for other in theirs):
        names = ", ".join(f"rank {rank}: {name!r} ({d})" for rank, (name, d) in enumerate(theirs))
        raise ValueError(f"the ranks run different recipes ({names}): convert the model with the same recipe on "
                         "every rank")
