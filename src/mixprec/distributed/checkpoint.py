"""Checkpoints of sharded (FSDP2) or replicated (DDP) training with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards in parallel
into one directory, and every rank reads back its own.

What is saved: the model's state dict (its sharded parameters, buffers, and the
``_mixprec_state.*`` entries: amax histories, which agreed scales keep identical on all
ranks, and the stochastic-rounding generator), the optimizer's state (torch's
``get_state_dict``, sharded like the parameters), the GradScaler's loss-scale state,
its update-rounding generator *per rank* (under FSDP2 each rank rounds its own shard
and the generators drift apart), and ``mixprec.json``: the recipe, the world size, and
the caller's ``extra`` (e.g. the step). :func:`load_checkpoint` reads ``mixprec.json``
first and refuses a checkpoint of another recipe or world size before anything is
changed. Resuming on the same number of ranks is bitwise: tested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from mixprec.amp import GradScaler, MixedPrecisionOptimizer
from mixprec.nn.convert import STATE_KEY, engine_state

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_info"]

_INFO = "mixprec.json"
_FORMAT = "mixprec-dcp-1"


def _parts(optimizer: torch.optim.Optimizer, scaler: GradScaler | None) -> tuple[torch.optim.Optimizer, GradScaler]:
    if isinstance(optimizer, MixedPrecisionOptimizer):
        return optimizer.optimizer, optimizer.scaler if scaler is None else scaler
    if scaler is None:
        raise ValueError("pass the GradScaler (scaler=) with a plain torch optimizer: its loss scale is part of the "
                         "training state")
    return optimizer, scaler


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _scaler_state(scaler: GradScaler, rank: int) -> dict[str, Any]:
    state = scaler.state_dict()
    generator = state.pop("generator")
    state = {"recipe": state["recipe"], "loss_scaler": state["loss_scaler"]}
    if generator is not None:
        state[f"generator_rank{rank}"] = generator
    return state


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: GradScaler | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (FSDP2-sharded, DDP-wrapped or plain), ``optimizer`` (a torch
    optimizer, or the one :func:`mixprec.prepare` returned) and ``scaler`` into the
    directory ``path`` with DCP, from every rank. ``extra`` (JSON values) is stored in
    ``mixprec.json`` and returned by :func:`load_checkpoint`."""
    torch_optimizer, scaler = _parts(optimizer, scaler)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _unwrapped(model)
    # the model's own state dict (FSDP2: DTensor shards), not torch's get_state_dict, which
    # resolves every key to a module attribute and so rejects the _mixprec_state entries
    state = {"model": model.state_dict(), "optimizer": get_optimizer_state_dict(model, torch_optimizer),
             "scaler": _scaler_state(scaler, rank)}
    directory = Path(path)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        info = {"format": _FORMAT, "recipe": engine_state(model).recipe.name, "world_size": world,
                "extra": extra or {}}
        temporary = directory / f"{_INFO}.tmp"
        temporary.write_text(json.dumps(info, indent=1))
        temporary.replace(directory / _INFO)
    dcp.save(state, checkpoint_id=str(directory))
    dist.barrier()


def read_checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``mixprec.json`` of a checkpoint directory (recipe, world size, extra)."""
    info_path = Path(path) / _INFO
    if not info_path.is_file():
        raise ValueError(f"{path} is not a mixprec distributed checkpoint (no {_INFO} in it)")
    info = json.loads(info_path.read_text())
    if info.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {info.get('format')!r}")
    return info  # type: ignore[no-any-return]


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: GradScaler | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the same kind of model, optimizer
    and scaler on the same number of ranks; returns its ``extra``. A checkpoint of
    another recipe or world size is refused before anything is changed."""
    torch_optimizer, scaler = _parts(optimizer, scaler)
    info = read_checkpoint_info(path)
    recipe = engine_state(model).recipe.name
    rank, world = dist.get_rank(), dist.get_world_size()
    if info["recipe"] != recipe or scaler.recipe.name != recipe:
        raise ValueError(f"{path} was written under recipe {info['recipe']!r}, but this model runs {recipe!r} "
                         f"(scaler {scaler.recipe.name!r}): convert the model with the checkpoint's recipe")
    if info["world_size"] != world:
        raise ValueError(
            f"{path} was written by {info['world_size']} processes, and this run has {world}: each rank's "
            "update-rounding generator is saved per rank, so resume on the same number of processes")
    model = _unwrapped(model)
    model_state = model.state_dict()
    optimizer_state = get_optimizer_state_dict(model, torch_optimizer)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    head = f"model.{STATE_KEY}."
    for key, meta in metadata.items():
        # amax histories are created at the first forward: a fresh model has none yet
        if key.startswith(head) and key[len("model."):] not in model_state:
            model_state[key[len("model."):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    scaler_state = _scaler_state(scaler, rank)
    state = {"model": model_state, "optimizer": optimizer_state, "scaler": scaler_state}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])  # the parameters are loaded in place; this restores the mixprec state
    set_optimizer_state_dict(model, torch_optimizer, optim_state_dict=state["optimizer"])
    loaded = state["scaler"]
    scaler.load_state_dict({"recipe": loaded["recipe"], "loss_scaler": loaded["loss_scaler"],
                            "generator": loaded.get(f"generator_rank{rank}")})
    return info["extra"]  # type: ignore[no-any-return]
