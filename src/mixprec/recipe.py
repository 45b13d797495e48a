"""Recipes: which format and rounding each class of tensor gets, which master copy and
loss scaler the optimizer keeps. Frozen dataclasses and named recipes; no work here.

Tensor classes follow the papers: weights, activations (every GEMM input and output in
the forward pass), errors (activation gradients, which carry the loss scale) and weight
gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mixprec.core import formats
from mixprec.core.formats import FloatFormat
from mixprec.core.quantize import Rounding
from mixprec.scaling import DynamicScaling, StaticScaling

__all__ = [
    "TensorFormat",
    "TensorScaling",
    "Recipe",
    "RECIPES",
    "ABLATIONS",
    "get_recipe",
    "FP32_MODULES",
]

FP32_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.Softmax,
    nn.LogSoftmax,
)
"""Module types kept in FP32 on purpose: their reductions (norm statistics, softmax)
need FP32, as paper 1 prescribes. They are listed in convert's summary, not warned of."""


@dataclass(frozen=True)
class TensorFormat:
    """How one class of tensors is rounded: a format and a rounding mode."""

    format: str = "fp32"
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        formats.get(self.format)  # a typo fails here, with the list of names
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', not {self.rounding!r}")

    @property
    def fmt(self) -> FloatFormat:
        """The :class:`FloatFormat` named by ``format``."""
        return formats.get(self.format)

    @property
    def is_fp32(self) -> bool:
        """Whether this class stays in FP32 (nothing to round)."""
        fmt = self.fmt
        return fmt.exponent_bits == 8 and fmt.mantissa_bits == 23


@dataclass(frozen=True)
class TensorScaling:
    """FP8 per-tensor scaling: each GEMM input, output and error is divided by a scale
    that maps its amax onto the format's range (``margin`` binades of headroom),
    ``"current"`` from this step's amax or ``"delayed"`` from the largest of the last
    ``history`` steps' (Transformer Engine's default); powers of two keep it exact."""

    mode: Literal["delayed", "current"] = "delayed"
    history: int = 16
    margin: int = 0
    power_of_two: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("delayed", "current"):
            raise ValueError(f"scaling mode must be 'delayed' or 'current', not {self.mode!r}")
        if self.history < 1 or self.margin < 0:
            raise ValueError("history must be >= 1 and margin >= 0")


@dataclass(frozen=True)
class Recipe:
    """A complete mixed-precision recipe.

    ``master`` is the format of the optimizer's master copy (fp32 or fp16);
    ``update_rounding`` rounds the FP32-computed update into a low-precision master
    (paper 2's stochastic update) and the master into the model's weights. ``loss_scale``
    is None (no scaling), a number (static) or a :class:`DynamicScaling`.
    """

    name: str
    weight: TensorFormat = TensorFormat()
    activation: TensorFormat = TensorFormat()
    error: TensorFormat = TensorFormat()
    weight_grad: TensorFormat = TensorFormat()
    master: str = "fp32"
    update_rounding: Rounding = "nearest"
    loss_scale: StaticScaling | DynamicScaling | float | None = None
    tensor_scaling: TensorScaling | None = None
    keep_fp32: tuple[type[nn.Module], ...] = field(default=FP32_MODULES)

    def __post_init__(self) -> None:
        master = formats.get(self.master)
        if master.torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"recipe {self.name!r}: master weights must be fp32, fp16 or bf16, not {self.master!r}"
            )
        if self.update_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"update_rounding must be 'nearest' or 'stochastic', not {self.update_rounding!r}")

    @property
    def is_fp32(self) -> bool:
        """Whether the recipe changes nothing (every tensor class FP32, FP32 master)."""
        return all(t.is_fp32 for t in (self.weight, self.activation, self.error, self.weight_grad)) and (
            formats.get(self.master).mantissa_bits == 23
        )

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the model's converted weights (and so their gradients) are held in:
        the narrowest of float16, bfloat16 and float32 that holds both weight and
        weight-gradient values exactly (bfloat16 under per-tensor scaling, for range).
        FP8 values are held in 16 bits because torch cannot add float8 tensors, and
        gradients of a weight used twice (RNNs, a GAN's two losses) must accumulate."""
        kinds = (self.weight.fmt, self.weight_grad.fmt)
        if all(_fits(fmt, formats.fp16) for fmt in kinds) and self.tensor_scaling is None:
            return torch.float16
        if all(_fits(fmt, formats.bf16) for fmt in kinds):
            return torch.bfloat16
        return torch.float32

    def replace(self, **changes: object) -> Recipe:
        """A copy with some fields changed (recipes are frozen)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _fits(inner: FloatFormat, outer: FloatFormat) -> bool:
    """Whether every value of ``inner`` is a value of ``outer``."""
    return (
        inner.mantissa_bits <= outer.mantissa_bits
        and inner.smallest_subnormal >= outer.smallest_subnormal
        and inner.largest <= outer.largest
        and inner.min_exponent >= outer.min_exponent - (outer.mantissa_bits - inner.mantissa_bits)
    )


_FP8_MIN_SCALE_SCHEDULE = ((0, 1.0), (2000, 2.0**4), (8000, 2.0**8))

RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("fp32"),
    "fp16": Recipe(
        "fp16",
        weight=TensorFormat("fp16"),
        activation=TensorFormat("fp16"),
        error=TensorFormat("fp16"),
        weight_grad=TensorFormat("fp16"),
        master="fp32",
        loss_scale=DynamicScaling(),
    ),
    "bf16": Recipe(
        "bf16",
        weight=TensorFormat("bf16"),
        activation=TensorFormat("bf16"),
        error=TensorFormat("bf16"),
        weight_grad=TensorFormat("bf16"),
        master="fp32",
    ),
    "fp8": Recipe(
        "fp8",
        weight=TensorFormat("e5m2"),
        activation=TensorFormat("e5m2"),
        error=TensorFormat("e5m2", "stochastic"),
        weight_grad=TensorFormat("e5m2", "stochastic"),
        master="fp16",
        update_rounding="stochastic",
        loss_scale=DynamicScaling(min_scale_schedule=_FP8_MIN_SCALE_SCHEDULE),
    ),
    "fp8-hybrid": Recipe(
        "fp8-hybrid",
        weight=TensorFormat("e4m3"),
        activation=TensorFormat("e4m3"),
        error=TensorFormat("e5m2"),
        weight_grad=TensorFormat("e5m2"),
        master="fp32",
        tensor_scaling=TensorScaling("delayed", history=16),
    ),
}
"""The named recipes: ``fp32`` (the reference), ``fp16`` (paper 1), ``bf16``, ``fp8``
(paper 2: E5M2 everywhere, FP16 master, enhanced loss scaling, stochastic rounding of
errors, gradients and the update) and ``fp8-hybrid`` (E4M3 forward, E5M2 backward,
delayed per-tensor scaling, FP32 master: Transformer Engine's default)."""


ABLATIONS: dict[str, Recipe] = {
    "fp16-noscale": RECIPES["fp16"].replace(name="fp16-noscale", loss_scale=None),
    "fp16-nomaster": RECIPES["fp16"].replace(name="fp16-nomaster", master="fp16", update_rounding="nearest"),
    "fp8-rne": RECIPES["fp8"].replace(
        name="fp8-rne", error=TensorFormat("e5m2"), weight_grad=TensorFormat("e5m2"), update_rounding="nearest"
    ),
    "fp8-nominscale": RECIPES["fp8"].replace(name="fp8-nominscale", loss_scale=DynamicScaling()),
}
"""Recipes that each drop one ingredient, to show why it is there: loss scaling
(``fp16-noscale``), the FP32 master copy (``fp16-nomaster``: the update is applied and
rounded in FP16), stochastic rounding (``fp8-rne``: round-to-nearest for errors,
gradients and the update), and the rising minimum loss scale (``fp8-nominscale``)."""


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A named recipe or ablation, or a :class:`Recipe` passed through."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"a recipe is a name or a mixprec.Recipe, not {type(recipe).__name__}")
    key = recipe.strip().lower()
    if key in RECIPES:
        return RECIPES[key]
    if key in ABLATIONS:
        return ABLATIONS[key]
    raise ValueError(
        f"unknown recipe {recipe!r}; named recipes: {', '.join(RECIPES)}; ablations: "
        f"{', '.join(ABLATIONS)}; or build a mixprec.Recipe(...)"
    )
