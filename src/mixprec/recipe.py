"""Recipes: the format, rounding and scaling of every operand of every GEMM, the dtype
of the other ops, the master weights and the loss scale. Frozen dataclasses and the
named recipes; no work here.

Each GEMM of a layer appears three times in training, and a recipe names each operand:

=========  ===========  ======  ===========
GEMM       left         right   result
=========  ===========  ======  ===========
forward    input        weight  output
dgrad      grad_output  weight  grad_input
wgrad      grad_output  input   grad_weight
=========  ===========  ======  ===========

A Parameter operand is a weight; any other operand is an activation (forward) or an
error (backward). An operand in a block format (``"mxfp8_e4m3"``, ``"nvfp4"``,
``"fp8_block128"``; 2-D tiles ``"nvfp4_16x16"``, ``"fp8_block128x128"`` for weights) is
quantized along the contraction dimension of *its* GEMM, so a tensor used in two GEMMs
(an input in forward and wgrad, a weight in forward and dgrad) is quantized afresh for
each, from its high-precision values (Transformer Engine's 1x32 and 32x1 MXFP8 copies);
square 2-D tiles are the same tiles either way round, so a tiled weight is quantized once. A product of two activations (attention's ``Q K^T`` and ``P V``) uses
the input's format for both in the forward, and in the backward the error's format for
the incoming gradient and the input's backward format (``wgrad.right``) for the other.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mixprec.core import formats
from mixprec.core.formats import BlockFormat, FloatFormat
from mixprec.core.quantize import Rounding
from mixprec.scaling import DynamicScaling, StaticScaling

__all__ = [
    "TensorScaling",
    "Operand",
    "Gemm",
    "KeepHighPrecision",
    "Recipe",
    "RECIPES",
    "ABLATIONS",
    "get_recipe",
    "COMPUTE_DTYPES",
]

FALLBACK_OPS = ("conv", "attention", "embedding")
"""The GEMM families a recipe may run under its ``fallback`` recipe."""

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtypes non-GEMM ops may run in (real torch tensors, torch's own kernels)."""


@dataclass(frozen=True)
class TensorScaling:
    """Per-tensor scaling of an FP8 operand: the tensor is divided by a scale that maps
    its amax onto the format's range (``margin`` binades of headroom) before rounding,
    ``"current"`` from this tensor's own amax or ``"delayed"`` from the largest of the
    last ``history`` amaxes seen at the same call site (Transformer Engine's default);
    power-of-two scales keep the scaling exact."""

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
class Operand:
    """How one GEMM operand (or result) is rounded: a format, a rounding mode and an
    optional per-tensor scaling. ``Operand()`` is FP32: nothing is rounded.

    ``format`` may name a block format (``Operand("mxfp8_e4m3")``,
    ``Operand("nvfp4", "stochastic")``): its blocks run along the contraction dimension
    of the operand's GEMM and carry their own scales (so ``scaling`` must be None).
    ``hadamard=n`` applies the random Hadamard transform of size n
    (:func:`mixprec.core.hadamard.hadamard_transform`, seed 0) along the contraction
    dimension before quantizing; both operands of a GEMM must then use the same n, so
    the two transforms cancel in the product (NVIDIA's NVFP4 recipe on wgrad)."""

    format: str = "fp32"
    rounding: Rounding = "nearest"
    scaling: TensorScaling | None = None
    hadamard: int = 0

    def __post_init__(self) -> None:
        fmt = formats.resolve(self.format)  # a typo fails here, with the list of names
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', not {self.rounding!r}")
        if self.scaling is not None and not isinstance(self.scaling, TensorScaling):
            raise TypeError(f"scaling is None or a mixprec.TensorScaling, not {type(self.scaling).__name__}")
        if isinstance(fmt, BlockFormat) and self.scaling is not None:
            raise ValueError(
                f"block format {fmt.name} scales each block itself; drop scaling= (per-tensor "
                "scaling is for scalar formats)")
        if isinstance(self.hadamard, bool) or not isinstance(self.hadamard, int) or self.hadamard < 0 or (
                self.hadamard & (self.hadamard - 1)):
            raise ValueError(f"hadamard is 0 (none) or a power of two (16), not {self.hadamard!r}")
        if self.hadamard and not isinstance(fmt, BlockFormat):
            raise ValueError("hadamard= rotates the blocks of a block format; use it with one (nvfp4, mxfp4_e2m1)")
        # resolved once: the engine asks for it on every rounding (1,700 name lookups a
        # step of the quick CNN); not a field, so equality and hashing ignore it
        object.__setattr__(self, "_resolved", fmt)

    @property
    def fmt(self) -> FloatFormat | BlockFormat:
        """The :class:`FloatFormat` (or :class:`BlockFormat`) named by ``format``."""
        return self._resolved  # type: ignore[attr-defined,no-any-return]

    @property
    def is_block(self) -> bool:
        """Whether ``format`` is a block-scaled format."""
        return isinstance(self.fmt, BlockFormat)

    @property
    def is_fp32(self) -> bool:
        """Whether this operand stays FP32 (nothing to round)."""
        fmt = self.fmt
        if isinstance(fmt, BlockFormat):
            return False
        return fmt.exponent_bits == 8 and fmt.mantissa_bits == 23 and self.scaling is None

    def describe(self) -> str:
        """A short label: ``e4m3/delayed``, ``e5m2/SR``, ``bf16``, ``nvfp4/RHT16/SR``."""
        label = self.fmt.name
        if self.hadamard:
            label += f"/RHT{self.hadamard}"
        if self.rounding == "stochastic":
            label += "/SR"
        if self.scaling is not None:
            label += f"/{self.scaling.mode}"
        return label


FP32 = Operand()


@dataclass(frozen=True)
class Gemm:
    """The three operands of one GEMM: ``left x right -> result``."""

    left: Operand = FP32
    right: Operand = FP32
    result: Operand = FP32

    def __post_init__(self) -> None:
        if self.left.hadamard != self.right.hadamard:
            raise ValueError(
                f"a GEMM's two operands must use the same Hadamard transform (left {self.left.hadamard}, "
                f"right {self.right.hadamard}): only then do the transforms cancel in the product")
        if self.result.is_block or self.result.hadamard:
            raise ValueError("a GEMM result is rounded to a scalar format (bf16, fp32, e5m2...), not a block format")

    @property
    def has_blocks(self) -> bool:
        """Whether an operand is in a block format."""
        return self.left.is_block or self.right.is_block

    @staticmethod
    def uniform(fmt: str, rounding: Rounding = "nearest") -> Gemm:
        """Every operand and the result in one format."""
        operand = Operand(fmt, rounding)
        return Gemm(operand, operand, operand)


@dataclass(frozen=True)
class KeepHighPrecision:
    """Which modules a recipe keeps in high precision (FP32 by default, all through: their
    GEMMs, their other ops and what they save for backward).

    ``module_types``: by type (subclasses included); ``names``: by qualified name,
    shell-style patterns (``"lm_head"``, ``"*.norm"``); ``embeddings``: every
    ``nn.Embedding``; ``output_head``: the model's output layer (Hugging Face's
    ``get_output_embeddings()`` where the model has it, else the last linear or
    convolution in module order); ``filter_fn(module, name)`` returning False keeps that module too
    (torchao's ``module_filter_fn`` convention: True means convert). ``last_layers``: the
    share (0..1) of the model's layers kept at its end, counted in the model's longest
    ``nn.ModuleList``/``nn.Sequential`` of blocks (a transformer's layers), rounded up:
    NVIDIA's NVFP4 recipe keeps the last few blocks in BF16. ``recipe``: what the kept
    modules run under: ``"fp32"`` (their own FP32 operations, the default), or a named
    recipe without block formats (``"bf16"``: BF16 operands and results, FP32
    accumulation, as the NVFP4 recipe's kept layers and the whole model around its
    NVFP4 GEMMs run)."""

    module_types: tuple[type[nn.Module], ...] = ()
    names: tuple[str, ...] = ()
    embeddings: bool = False
    output_head: bool = False
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    last_layers: float = 0.0
    recipe: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, str):
            raise TypeError(f"KeepHighPrecision.recipe names a recipe ('fp32', 'bf16', ...), not {self.recipe!r}")
        if not 0.0 <= self.last_layers <= 1.0:
            raise ValueError(f"last_layers is a share of the model's layers, 0..1, not {self.last_layers!r}")

    def matches(self, module: nn.Module, name: str) -> str | None:
        """Why ``module`` (qualified ``name``) is kept, or None if it is not."""
        if self.module_types and isinstance(module, self.module_types):
            return f"keep type {type(module).__name__}"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.names):
            return "keep name"
        if self.embeddings and isinstance(module, nn.Embedding):
            return "embedding (recipe default)"
        if self.filter_fn is not None and name and not self.filter_fn(module, name):
            return "filter_fn"
        return None


@dataclass(frozen=True)
class Recipe:
    """A complete mixed-precision recipe.

    ``forward``, ``dgrad`` and ``wgrad`` name each GEMM's operands (see the module
    docstring). ``compute_dtype`` is the dtype of non-GEMM ops (``"bf16"``, ``"fp16"`` or
    ``"fp32"``; norms, softmax and losses run in FP32 whatever it is, as torch.autocast
    does). ``master`` is the format of the model's parameters, which are the master
    weights (fp32; fp16 or bf16 for paper 2: their values on that grid, held in FP32);
    ``update_rounding`` rounds each update, computed in FP32, onto that grid. ``loss_scale`` is None, a number
    (static) or a :class:`~mixprec.scaling.DynamicScaling`. ``keep`` names the modules
    kept in high precision. ``fallback_ops`` names GEMM families (``"conv"``,
    ``"attention"``, ``"embedding"``) that run under the recipe named ``fallback``
    instead (block recipes run them in BF16: see :data:`RECIPES`).
    """

    name: str
    forward: Gemm = Gemm()
    dgrad: Gemm = Gemm()
    wgrad: Gemm = Gemm()
    compute_dtype: str = "fp32"
    master: str = "fp32"
    update_rounding: Rounding = "nearest"
    loss_scale: StaticScaling | DynamicScaling | float | None = None
    keep: KeepHighPrecision = field(default_factory=KeepHighPrecision)
    fallback: str | None = None
    fallback_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.fallback_ops) - set(FALLBACK_OPS)
        if unknown:
            raise ValueError(f"recipe {self.name!r}: fallback_ops are among {', '.join(FALLBACK_OPS)}, "
                             f"not {', '.join(sorted(unknown))}")
        if self.fallback_ops and self.fallback is None:
            raise ValueError(f"recipe {self.name!r}: fallback_ops need fallback=<recipe name> to run in")
        master = formats.get(self.master)
        if master.torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"recipe {self.name!r}: master weights must be fp32, fp16 or bf16, not {self.master!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"recipe {self.name!r}: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"not {self.compute_dtype!r}"
            )
        if self.update_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"update_rounding must be 'nearest' or 'stochastic', not {self.update_rounding!r}")
        for gemm in (self.forward, self.dgrad, self.wgrad):
            if not isinstance(gemm, Gemm):
                raise TypeError(f"recipe {self.name!r}: forward, dgrad and wgrad are mixprec.Gemm, not {gemm!r}")

    @property
    def operands(self) -> tuple[Operand, ...]:
        """The nine operands and results of its three GEMMs."""
        return tuple(op for g in (self.forward, self.dgrad, self.wgrad) for op in (g.left, g.right, g.result))

    @property
    def delayed_scaling(self) -> bool:
        """Whether an operand scales by delayed scaling (the recipe keeps amax histories)."""
        return any(op.scaling is not None and op.scaling.mode == "delayed" for op in self.operands)

    @property
    def is_fp32(self) -> bool:
        """Whether the recipe changes nothing (every operand FP32, FP32 compute and master)."""
        operands = self.operands
        return (all(op.is_fp32 for op in operands) and self.compute_dtype == "fp32"
                and formats.get(self.master).mantissa_bits == 23)

    @property
    def master_fmt(self) -> FloatFormat:
        """The format of the master weights: the model's parameters hold values on its
        grid (in FP32 storage), rounded there after every update."""
        return formats.get(self.master)

    @property
    def compute(self) -> torch.dtype:
        """The torch dtype of non-GEMM ops."""
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def stochastic(self) -> bool:
        """Whether anything is rounded stochastically (the recipe needs a generator)."""
        return self.update_rounding == "stochastic" or any(op.rounding == "stochastic" for op in self.operands)

    @property
    def has_blocks(self) -> bool:
        """Whether any operand is in a block format."""
        return any(g.has_blocks for g in (self.forward, self.dgrad, self.wgrad))

    def for_op(self, op: str) -> Recipe:
        """The recipe GEMM family ``op`` (``"conv"``, ``"attention"``, ``"embedding"``,
        ``"matmul"``) runs under: the fallback for ``fallback_ops``, else this one."""
        if op in self.fallback_ops and self.fallback is not None:
            return get_recipe(self.fallback)
        return self

    def replace(self, **changes: object) -> Recipe:
        """A copy with some fields changed (recipes are frozen)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_FP8_MIN_SCALE_SCHEDULE = ((0, 1.0), (2000, 2.0**4), (8000, 2.0**8))
_FP8_KEEP = KeepHighPrecision(embeddings=True, output_head=True)


def _paper2(error_rounding: Rounding = "stochastic") -> dict[str, Gemm]:
    """E5M2 everywhere: weights and activations to nearest, errors and gradients as given."""
    e5m2, err = Operand("e5m2"), Operand("e5m2", error_rounding)
    return {"forward": Gemm(e5m2, e5m2, e5m2), "dgrad": Gemm(err, e5m2, err), "wgrad": Gemm(err, e5m2, err)}


_DELAYED = TensorScaling("delayed", history=16)
_E4M3 = Operand("e4m3", scaling=_DELAYED)
_E4M3_WEIGHT = Operand("e4m3", scaling=TensorScaling("current"))
_E5M2_GRAD = Operand("e5m2", scaling=_DELAYED)
_BF16 = Operand("bf16")

_BLOCK_FALLBACK = {"fallback": "bf16", "fallback_ops": FALLBACK_OPS}
_MXFP8 = Operand("mxfp8_e4m3:rceil")
_NVFP4 = Operand("nvfp4")
_NVFP4_WEIGHT = Operand("nvfp4_16x16")
_NVFP4_GRAD = Operand("nvfp4", "stochastic")
_FP8_TILE = Operand("fp8_block128:rceil")
_FP8_BLOCK = Operand("fp8_block128x128:rceil")
_MXFP4 = Operand("mxfp4_e2m1")
NVFP4_LAST_LAYERS = 0.15
"""The share of a model's last layers the ``nvfp4`` recipe keeps in high precision."""

RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("fp32"),
    "fp16": Recipe(
        "fp16", forward=Gemm.uniform("fp16"), dgrad=Gemm.uniform("fp16"), wgrad=Gemm.uniform("fp16"),
        compute_dtype="fp16", loss_scale=DynamicScaling(),
    ),
    "bf16": Recipe(
        "bf16", forward=Gemm.uniform("bf16"), dgrad=Gemm.uniform("bf16"), wgrad=Gemm.uniform("bf16"),
        compute_dtype="bf16",
    ),
    "fp8": Recipe(
        "fp8", **_paper2(), compute_dtype="fp16", master="fp16", update_rounding="stochastic",
        loss_scale=DynamicScaling(min_scale_schedule=_FP8_MIN_SCALE_SCHEDULE), keep=_FP8_KEEP,
    ),
    "fp8-hybrid": Recipe(
        "fp8-hybrid",
        forward=Gemm(_E4M3, _E4M3_WEIGHT, _BF16),
        dgrad=Gemm(_E5M2_GRAD, _E4M3_WEIGHT, _BF16),
        wgrad=Gemm(_E5M2_GRAD, _E4M3, _BF16),
        compute_dtype="bf16", keep=_FP8_KEEP,
    ),
    "mxfp8": Recipe(
        "mxfp8", forward=Gemm(_MXFP8, _MXFP8, _BF16), dgrad=Gemm(_MXFP8, _MXFP8, _BF16),
        wgrad=Gemm(_MXFP8, _MXFP8, _BF16), compute_dtype="bf16", keep=_FP8_KEEP, **_BLOCK_FALLBACK,
    ),
    "nvfp4": Recipe(
        "nvfp4", forward=Gemm(_NVFP4, _NVFP4_WEIGHT, _BF16), dgrad=Gemm(_NVFP4_GRAD, _NVFP4_WEIGHT, _BF16),
        wgrad=Gemm(Operand("nvfp4", "stochastic", hadamard=16), Operand("nvfp4", hadamard=16), _BF16),
        compute_dtype="bf16", **_BLOCK_FALLBACK,
        keep=KeepHighPrecision(embeddings=True, output_head=True, last_layers=NVFP4_LAST_LAYERS, recipe="bf16"),
    ),
    "fp8-blockwise": Recipe(
        "fp8-blockwise", forward=Gemm(_FP8_TILE, _FP8_BLOCK, _BF16), dgrad=Gemm(_FP8_TILE, _FP8_BLOCK, _BF16),
        wgrad=Gemm(_FP8_TILE, _FP8_TILE, _BF16), compute_dtype="bf16", keep=_FP8_KEEP, **_BLOCK_FALLBACK,
    ),
    "mxfp4": Recipe(
        "mxfp4", forward=Gemm(_MXFP4, _MXFP4, _BF16), dgrad=Gemm(_MXFP4, _MXFP4, _BF16),
        wgrad=Gemm(_MXFP4, _MXFP4, _BF16), compute_dtype="bf16", keep=_FP8_KEEP, **_BLOCK_FALLBACK,
    ),
}
"""The named recipes: ``fp32`` (the reference); ``fp16`` (paper 1: FP16 operands and
results, FP32 masters, dynamic loss scaling); ``bf16``; ``fp8`` (paper 2: E5M2 for every
operand and result, errors and gradients rounded stochastically, FP16 masters with a
stochastically rounded update, enhanced loss scaling); ``fp8-hybrid`` (Transformer
Engine's default: E4M3 inputs and weights, E5M2 gradients, per-tensor scaling
(delayed for activations and gradients, current for weights), BF16 results). The FP8
recipes keep embeddings and the output head in high precision, as FP8 practice does
(``recipe.replace(keep=KeepHighPrecision())`` runs them in FP8 too).

The block recipes (FP32 masters, BF16 compute and results, FP32 accumulation, every
operand quantized along its own GEMM's contraction dimension, embeddings and output
head kept in high precision):

- ``mxfp8``: Transformer Engine's ``MXFP8BlockScaling``: E4M3 in all three GEMMs, 1x32
  blocks with E8M0 scales, rounded up as TE does (``mxfp8_e4m3:rceil``: no element
  saturates), a 1x32 and a 32x1 copy of each tensor (input, weight, error).
- ``nvfp4``: NVIDIA's NVFP4 pretraining recipe (2025): NVFP4 for the linear GEMMs,
  weights in 16x16 tiles (one copy serves forward and dgrad), activations and errors in
  1x16 blocks, errors rounded stochastically, a 16-point random Hadamard transform
  (seed 0) on both wgrad inputs, the last :data:`NVFP4_LAST_LAYERS` of the layers kept
  in BF16, as the paper keeps them (``KeepHighPrecision.last_layers``, rounded up;
  ``recipe="bf16"``: kept modules, embeddings and output head too, run under ``bf16``).
- ``fp8-blockwise``: DeepSeek-V3's fine-grained FP8 as Transformer Engine's
  ``Float8BlockScaling`` runs it: E4M3 in all three GEMMs, 1x128 activation and error
  tiles, 128x128 weight blocks, FP32 scales from the online amax kept to powers of two
  (TE's default; ``fp8_block128:rceil``, the smallest power of two that keeps the
  block's amax within 448). Power-of-two scales make every value a BF16 value, so the
  GEMMs run on BF16 units exactly; the plain ``amax / 448`` scales of the paper are the
  formats ``fp8_block128`` and ``fp8_block128x128`` (ablation ``fp8-blockwise-amax``).
- ``mxfp4``: plain OCP MXFP4 (E2M1, 1x32, E8M0, floor rule) everywhere, no stochastic
  rounding, no Hadamard transform, no kept layers: where FP4 without the NVFP4
  recipe's remedies breaks.

Convolutions, attention's two products and embeddings run under ``bf16`` in the block
recipes (``fallback_ops``): the recipes' sources keep attention in BF16, and a
convolution's wgrad contracts over batch x positions, which no block layout of its
input tensor covers without an im2col copy. A contraction dimension that is not a
multiple of the block size is zero-padded inside the op (exact: see
:mod:`mixprec.nn.state`)."""


ABLATIONS: dict[str, Recipe] = {
    "fp16-noscale": RECIPES["fp16"].replace(name="fp16-noscale", loss_scale=None),
    "fp16-nomaster": RECIPES["fp16"].replace(name="fp16-nomaster", master="fp16", update_rounding="nearest"),
    "fp8-rne": RECIPES["fp8"].replace(name="fp8-rne", **_paper2("nearest"), update_rounding="nearest"),
    "fp8-nominscale": RECIPES["fp8"].replace(name="fp8-nominscale", loss_scale=DynamicScaling()),
    "fp8-blockwise-amax": RECIPES["fp8-blockwise"].replace(
        name="fp8-blockwise-amax",
        forward=Gemm(Operand("fp8_block128"), Operand("fp8_block128x128"), _BF16),
        dgrad=Gemm(Operand("fp8_block128"), Operand("fp8_block128x128"), _BF16),
        wgrad=Gemm(Operand("fp8_block128"), Operand("fp8_block128"), _BF16)),
}
"""Recipes that each drop one ingredient, to show why it is there: loss scaling
(``fp16-noscale``), the FP32 master copy (``fp16-nomaster``: FP16 parameters, the update
rounded to nearest), stochastic rounding (``fp8-rne``: round-to-nearest for errors,
gradients and the update), the rising minimum loss scale (``fp8-nominscale``); and
``fp8-blockwise-amax``, ``fp8-blockwise`` with DeepSeek-V3's unrounded FP32 scales
``amax / 448`` instead of Transformer Engine's powers of two (its values are no longer
BF16 values, so its GEMMs take the FP32 kernels)."""


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
