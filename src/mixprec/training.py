"""``prepare(model, optimizer, recipe)``: the one call that turns a float PyTorch model
and its optimizer into a mixed-precision pair."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mixprec.convert import ConversionSummary, convert
from mixprec.layers import LowPrecisionModule
from mixprec.optim import MixedPrecisionOptimizer
from mixprec.recipe import Recipe, get_recipe

__all__ = ["prepare"]


def prepare(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: str | Recipe = "fp16",
    generator: torch.Generator | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> tuple[nn.Module, MixedPrecisionOptimizer]:
    """Convert ``model`` in place for ``recipe`` and wrap ``optimizer``, which must have
    been built over the model's float parameters: those become the master weights.

    ``generator`` drives every stochastic rounding (errors, gradients, the update); by
    default one is seeded from torch's global RNG, so ``torch.manual_seed`` makes a run
    repeatable. ``module_filter_fn(module, name)`` returning False keeps that layer in
    FP32 (as torchao's float8 conversion takes one: a language model's output layer is
    commonly kept out of FP8). The conversion summary is ``optimizer.summary``.
    """
    recipe = get_recipe(recipe)
    if isinstance(optimizer, MixedPrecisionOptimizer):
        raise ValueError("this optimizer is already prepared; pass the torch optimizer it wraps only once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"prepare takes a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare takes an nn.Module, not {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "prepare the model before wrapping it in DistributedDataParallel (DDP would keep "
            "all-reducing the float parameters that prepare replaces): prepare, then "
            "mixprec.distributed.wrap_ddp"
        )
    if getattr(model, "_mixprec_recipe", None) is not None:
        raise ValueError(
            "this model was already prepared by mixprec; build the float model and its optimizer "
            "again, and prepare them once"
        )
    if generator is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(device=device).manual_seed(seed)
    summary: ConversionSummary = convert(model, recipe, generator, module_filter_fn)
    if not recipe.is_fp32 and not summary.converted:
        found = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
        raise ValueError(
            f"recipe {recipe.name} found no layer it can convert in this model (it has: "
            f"{', '.join(found) or 'no sub-modules'}); mixprec converts Linear, Conv1d/2d, "
            "ConvTranspose1d/2d, Embedding, LSTM and MultiheadAttention"
        )
    model._mixprec_recipe = recipe  # type: ignore[assignment]
    rounders = [m.rounder for m in model.modules() if isinstance(m, LowPrecisionModule)]
    wrapped = MixedPrecisionOptimizer(optimizer, recipe, summary.param_pairs, generator, rounders)
    wrapped.summary = summary  # type: ignore[attr-defined]
    return model, wrapped
