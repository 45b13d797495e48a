"""``convert(model, recipe)``: swap a model's supported layers for low-precision ones,
keep norms and other FP32 islands as they are, and say what was done.

Weights are copied once, rounded onto the weight format, into the recipe's 16-bit
parameter dtype; a parameter shared by several layers (tied weights) stays shared.
The float parameters are handed back in :attr:`ConversionSummary.param_pairs` so that
the optimizer wrapper can keep them as master weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mixprec.layers import (
    LowPrecisionConv,
    LowPrecisionEmbedding,
    LowPrecisionLinear,
    LowPrecisionLSTM,
    LowPrecisionModule,
    LowPrecisionMultiheadAttention,
    round_weight,
)
from mixprec.memory import attach_packer
from mixprec.recipe import Recipe, get_recipe

__all__ = ["convert", "ConversionSummary", "SUPPORTED_TYPES"]

SUPPORTED_TYPES: dict[type[nn.Module], Callable[..., LowPrecisionModule]] = {
    nn.Linear: LowPrecisionLinear,
    nn.Conv1d: LowPrecisionConv,
    nn.Conv2d: LowPrecisionConv,
    nn.ConvTranspose1d: LowPrecisionConv,
    nn.ConvTranspose2d: LowPrecisionConv,
    nn.Embedding: LowPrecisionEmbedding,
    nn.LSTM: LowPrecisionLSTM,
    nn.MultiheadAttention: LowPrecisionMultiheadAttention,
}
"""Layer types convert replaces (subclasses included, e.g. MultiheadAttention's
out_proj linear), and what with."""


@dataclass
class ConversionSummary:
    """What :func:`convert` did: the layers it replaced, the FP32 islands it kept, the
    layers it could not convert (and why), and (float param, low-precision param) pairs."""

    recipe: Recipe
    converted: list[tuple[str, str]] = field(default_factory=list)
    kept_fp32: list[tuple[str, str]] = field(default_factory=list)
    unsupported: list[tuple[str, str, str]] = field(default_factory=list)
    param_pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mixprec.convert with recipe {self.recipe.name}:"]
        lines.append(f"  converted {len(self.converted)} layers: "
                     + ", ".join(f"{name} ({kind})" for name, kind in self.converted))
        if self.kept_fp32:
            lines.append("  kept in FP32 by design: " + ", ".join(f"{n} ({k})" for n, k in self.kept_fp32))
        if self.unsupported:
            lines.append("  left in FP32, unsupported: "
                         + ", ".join(f"{n} ({k}: {why})" for n, k, why in self.unsupported))
        return "\n".join(lines)


def _supported_target(module: nn.Module) -> Callable[..., LowPrecisionModule] | None:
    for kind, target in SUPPORTED_TYPES.items():
        if isinstance(module, kind):
            return target
    return None


def convert(
    model: nn.Module,
    recipe: str | Recipe,
    generator: torch.Generator | None = None,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> ConversionSummary:
    """Replace ``model``'s supported layers in place with low-precision ones for
    ``recipe`` and return a summary. ``module_filter_fn(module, name)`` returning False
    keeps a layer in FP32. Layers with parameters of an unsupported type are named in a
    warning and left in FP32, never skipped silently. Forward hooks on the model hold the
    FP32 activations it saves for backward in the activation format."""
    recipe = get_recipe(recipe)
    if getattr(model, "_mixprec_recipe", None) is not None:
        raise ValueError("this model was already converted by mixprec; convert the original float model once")
    summary = ConversionSummary(recipe)
    if _supported_target(model) is not None:
        raise ValueError(
            f"convert replaces layers inside a model, and this model is itself a {type(model).__name__}; "
            "wrap it, e.g. nn.Sequential(layer)"
        )
    if recipe.is_fp32:
        return summary
    made: dict[int, nn.Parameter] = {}

    def make(param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None:
            return None
        existing = made.get(id(param))
        if existing is None:
            existing = nn.Parameter(round_weight(param, recipe, generator), requires_grad=param.requires_grad)
            made[id(param)] = existing
            summary.param_pairs.append((param, existing))
        return existing

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            target = _supported_target(child)
            kind = type(child).__name__
            if isinstance(child, recipe.keep_fp32):
                summary.kept_fp32.append((name, kind))
            elif target is not None and module_filter_fn is not None and not module_filter_fn(child, name):
                summary.kept_fp32.append((name, kind))
                continue  # the whole layer stays FP32, its sub-layers too
            elif target is not None:
                try:
                    replacement = target(child, recipe, generator, make)
                except ValueError as reason:
                    summary.unsupported.append((name, kind, str(reason)))
                    continue
                setattr(parent, child_name, replacement)
                summary.converted.append((name, kind))
                continue
            elif any(True for _ in child.parameters(recurse=False)):
                summary.unsupported.append((name, kind, "no low-precision version"))
            visit(child, f"{name}.")

    visit(model, "")
    if summary.unsupported:
        warnings.warn(
            "mixprec.convert left these layers in FP32: "
            + ", ".join(f"{name} ({kind}: {why})" for name, kind, why in summary.unsupported),
            RuntimeWarning,
            stacklevel=2,
        )
    if summary.converted:
        model._mixprec_recipe = recipe  # type: ignore[assignment]
        attach_packer(model)
    return summary
