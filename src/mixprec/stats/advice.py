"""Advice from recorded statistics: the loss scale each format needs, whether a recipe
needs one at all, the layers that lose the most values, and the narrowest format per
layer and tensor class that loses less than a stated share. Pure functions of
:class:`~mixprec.stats.observer.ModelStats`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixprec.core import formats as formats_module
from mixprec.recipe import Recipe, get_recipe
from mixprec.stats.counting import TensorCounts, is_block_format
from mixprec.stats.observer import SCALED_CLASSES, ModelStats

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_TOLERANCE",
    "LossScaleAdvice",
    "recommend_loss_scale",
    "RecipeVerdict",
    "recipe_verdict",
    "LayerLoss",
    "rank_layers",
    "FormatAdvice",
    "advise_formats",
    "BlockShare",
    "block_shares",
]

DEFAULT_MARGIN = 3
"""Binades of headroom a recommended loss scale leaves: max|grad| x S <= largest / 2^3,
room for gradients 8x larger than any sampled one before the scaled values overflow."""
DEFAULT_TOLERANCE = 1e-3
"""The share of nonzero values a format may lose (flush to zero or overflow) and still be
advised: 0.1%."""


@dataclass(frozen=True)
class LossScaleAdvice:
    """The loss scale recommended for one format: the largest power of two S with
    ``amax x S <= largest / 2**margin``, ``amax`` the largest unscaled error or weight
    gradient sampled (None when none was). Shares are of the errors' nonzero values:
    flushed to zero and subnormal without scaling, and flushed, subnormal and overflowing
    at S."""

    format: str
    amax: float
    exponent: int | None
    flush_unscaled: float
    subnormal_unscaled: float
    flush_at_scale: float
    subnormal_at_scale: float
    overflow_at_scale: float
    clamped: bool = False

    @property
    def scale(self) -> float | None:
        """The recommended loss scale, 2**exponent."""
        return None if self.exponent is None else 2.0**self.exponent


def recommend_loss_scale(stats: ModelStats, fmt: str, margin: int = DEFAULT_MARGIN) -> LossScaleAdvice:
    """The largest power-of-two loss scale that keeps the largest sampled gradient
    (errors and weight gradients, unscaled) times S under ``fmt``'s largest value with
    ``margin`` binades to spare, clamped to the what-if scales recorded, and the errors'
    shares without it and with it. Block formats have no loss scale to recommend (each
    block's scale follows its values): ValueError."""
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (binades of headroom), got {margin!r}")
    if is_block_format(fmt):
        raise ValueError(
            f"{fmt} is a block format: each block's scale follows its values, so there is no loss scale to "
            "recommend; read its flushed and clipped shares with counts.share(fmt, 'flush') and "
            "counts.share(fmt, 'clip')")
    fmt_obj = formats_module.get(fmt)
    errors = stats.total("error")
    amax = max(errors.amax, stats.total("weight_grad").amax)
    exps = stats.config.scale_exponents
    exponent: int | None = None
    clamped = False
    if amax > 0 and math.isfinite(amax):
        wanted = math.floor(math.log2(fmt_obj.largest / amax)) - margin
        exponent = min(max(wanted, exps[0]), exps[-1])
        clamped = exponent != wanted
    at = 2.0**exponent if exponent is not None else 1.0
    return LossScaleAdvice(
        format=fmt_obj.name, amax=amax, exponent=exponent,
        flush_unscaled=errors.share(fmt_obj, "flush"), subnormal_unscaled=errors.share(fmt_obj, "subnormal"),
        flush_at_scale=errors.share(fmt_obj, "flush", at), subnormal_at_scale=errors.share(fmt_obj, "subnormal", at),
        overflow_at_scale=errors.share(fmt_obj, "overflow", at), clamped=clamped,
    )


@dataclass(frozen=True)
class RecipeVerdict:
    """Whether a recipe needs loss scaling for this model, and why."""

    recipe: str
    needs_loss_scale: bool
    reason: str
    advice: LossScaleAdvice | None = None


def _describe_scaling(recipe: Recipe) -> str:
    scaling = recipe.loss_scale
    if scaling is None:
        return "it has no loss scaling"
    if isinstance(scaling, (int, float)):
        return f"it has a static loss scale of {scaling:g}"
    name = type(scaling).__name__
    if name == "StaticScaling":
        return f"it has a static loss scale of {scaling.scale:g}"  # type: ignore[union-attr]
    return f"it has dynamic loss scaling (from {scaling.init_scale:g})"  # type: ignore[union-attr]


def _block_verdict(stats: ModelStats, recipe: Recipe, has: str, tolerance: float) -> RecipeVerdict:
    """A recipe whose errors are in a block format: a loss scale moves every block's scale
    with the values and changes nothing, so the verdict is no, with what the blocks lose."""
    name = recipe.dgrad.left.fmt.name
    reason = (f"no: its errors are in the block format {name}, whose block scales follow the values, so a "
              f"power-of-two loss scale changes nothing")
    if name in stats.config.format_names:
        errors = stats.total("error")
        flushed, clipped = errors.share(name, "flush"), errors.share(name, "clip")
        reason += (f"; in their blocks {flushed:.3%} of the errors' nonzero values flush to zero and {clipped:.3%} "
                   f"clip at the block's largest value")
        if flushed > tolerance:
            reason += (f" (more than the tolerance of {tolerance:.2%} flush: the block formats' narrow element "
                       "range, not the loss scale, is what loses them)")
    return RecipeVerdict(recipe.name, False, f"{reason} ({has})")


def recipe_verdict(
    stats: ModelStats, recipe: str | Recipe, tolerance: float = DEFAULT_TOLERANCE, margin: int = DEFAULT_MARGIN
) -> RecipeVerdict:
    """Whether ``recipe`` needs a loss scale: yes when more than ``tolerance`` of the
    unscaled errors' nonzero values would flush to zero in its error format; no for FP32
    errors, for per-tensor scaling (each tensor is scaled onto the format's range), for
    block formats (each block is, and the reason gives the errors' flushed and clipped
    shares where the format was observed), or when the unscaled errors fit."""
    recipe = get_recipe(recipe)
    has = _describe_scaling(recipe)
    if recipe.dgrad.left.is_block:
        return _block_verdict(stats, recipe, has, tolerance)
    fmt = recipe.dgrad.left.fmt
    assert isinstance(fmt, formats_module.FloatFormat)
    if recipe.dgrad.left.scaling is not None:
        return RecipeVerdict(recipe.name, False, f"no: per-tensor scaling maps each tensor's amax onto {fmt.name}'s "
                             f"range, so a loss scale adds nothing ({has})")
    if fmt.mantissa_bits == 23 and fmt.exponent_bits == 8:
        return RecipeVerdict(recipe.name, False, f"no: its errors are FP32 ({has})")
    if fmt.name not in stats.config.format_names:
        return RecipeVerdict(recipe.name, False, f"unknown: its error format {fmt.name} was not observed")
    advice = recommend_loss_scale(stats, fmt.name, margin)
    if advice.flush_unscaled > tolerance:
        at = "" if advice.scale is None else (
            f"; at the recommended 2^{advice.exponent} that falls to {advice.flush_at_scale:.3%}")
        return RecipeVerdict(recipe.name, True, f"yes: {advice.flush_unscaled:.3%} of the errors' nonzero values "
                             f"flush to zero in {fmt.name} without a loss scale{at} ({has})", advice)
    return RecipeVerdict(recipe.name, False, f"no: only {advice.flush_unscaled:.3%} of the errors' nonzero values "
                         f"flush to zero in {fmt.name} unscaled, within the tolerance of {tolerance:.2%} ({has})",
                         advice)


@dataclass(frozen=True)
class LayerLoss:
    """One layer and tensor class: its nonzero values, unscaled amax, and the share lost
    (flushed or overflowing) in each format, unscaled."""

    layer: str
    cls: str
    nonzero: int
    amax: float
    lost: dict[str, float]
    subnormal: dict[str, float]


def rank_layers(stats: ModelStats, fmt: str = "fp16", classes: tuple[str, ...] = ("error",)) -> list[LayerLoss]:
    """Layers (and classes) ordered by the unscaled share of their nonzero values lost
    in ``fmt``, the worst first."""
    name = formats_module.resolve(fmt).name
    rows = []
    for (layer, cls), counts in stats.counts.items():
        if cls not in classes or counts.nonzero == 0:
            continue
        rows.append(LayerLoss(
            layer, cls, counts.nonzero, counts.amax,
            {f: counts.share(f, "lost") for f in counts.formats},
            {f: counts.share(f, "subnormal") for f in counts.formats},
        ))
    rows.sort(key=lambda row: (-row.lost[name], stats.layers.index(row.layer) if row.layer in stats.layers else 0))
    return rows


@dataclass(frozen=True)
class FormatAdvice:
    """The narrowest format for one layer and tensor class that loses (flushes or
    overflows) less than the tolerance, the share it loses, and the scale it was judged
    at (errors and weight gradients: that format's recommended loss scale)."""

    layer: str
    cls: str
    format: str
    lost: float
    scale: float


def _candidates(names: tuple[str, ...]) -> list[str]:
    """The scalar formats among ``names``, narrowest first."""
    return sorted((n for n in names if not is_block_format(n)), key=lambda n: formats_module.get(n).total_bits)


def advise_formats(
    stats: ModelStats, tolerance: float = DEFAULT_TOLERANCE, margin: int = DEFAULT_MARGIN
) -> list[FormatAdvice]:
    """For each layer and class, the narrowest observed format losing less than
    ``tolerance`` of the nonzero values (at equal width, the one that loses less);
    "fp32" when none does. Errors and weight gradients are judged at the format's
    recommended loss scale (one scale for the model, as loss scaling works), the other
    classes unscaled. A "(model)" row per class judges the whole model's values. Block
    formats are not candidates: what they lose depends on each block's spread, not on
    a range a loss scale can move, and their shares are reported per layer apart
    (:func:`block_shares`)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a share in [0, 1), got {tolerance}")
    scales = {}
    for name in _candidates(stats.config.format_names):
        exponent = recommend_loss_scale(stats, name, margin).exponent
        scales[name] = 1.0 if exponent is None else 2.0**exponent
    advice = []
    entries: list[tuple[str, str, TensorCounts]] = [(layer, cls, c) for (layer, cls), c in stats.counts.items()]
    for cls in ("weight", "activation", "error", "weight_grad"):
        total = stats.total(cls)
        if total.samples:
            entries.append(("(model)", cls, total))
    for layer, cls, counts in entries:
        options = []
        for name in _candidates(counts.formats):
            scale = scales[name] if cls in SCALED_CLASSES else 1.0
            options.append((formats_module.get(name).total_bits, counts.share(name, "lost", scale), name, scale))
        options.sort(key=lambda o: (o[0], o[1]))
        chosen = next((o for o in options if o[1] < tolerance), None)
        if chosen is None:
            advice.append(FormatAdvice(layer, cls, "fp32", 0.0, 1.0))
        else:
            advice.append(FormatAdvice(layer, cls, chosen[2], chosen[1], chosen[3]))
    return advice


@dataclass(frozen=True)
class BlockShare:
    """One layer and tensor class in one block format: its nonzero values and the shares
    of them flushed to zero in their block, subnormal elements, and clipped at their
    block's largest value (to nearest, blocks along the tensor's last dimension)."""

    layer: str
    cls: str
    format: str
    nonzero: int
    flushed: float
    subnormal: float
    clipped: float


def block_shares(stats: ModelStats, classes: tuple[str, ...] = ("weight", "activation", "error", "weight_grad"),
                 ) -> list[BlockShare]:
    """For every observed block format, each layer's and class's shares flushed,
    subnormal and clipped, in layer order (then class, then format), and a "(model)" row
    per class and format over the whole model. Empty when no block format was observed."""
    names = [n for n in stats.config.format_names if is_block_format(n)]
    rows: list[BlockShare] = []
    if not names:
        return rows
    order = {layer: i for i, layer in enumerate(stats.layers)}
    entries = sorted(((layer, cls, c) for (layer, cls), c in stats.counts.items() if cls in classes),
                     key=lambda e: (order.get(e[0], len(order)), classes.index(e[1])))
    entries += [("(model)", cls, stats.total(cls)) for cls in classes]
    for layer, cls, counts in entries:
        if counts.nonzero == 0:
            continue
        for name in names:
            rows.append(BlockShare(layer, cls, name, counts.nonzero, counts.share(name, "flush"),
                                   counts.share(name, "subnormal"), counts.share(name, "clip")))
    return rows
