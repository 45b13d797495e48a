"""Per-layer statistics of a model's tensors, to see why low precision fails.

``with mixprec.stats.observe(model, every=10, loss_scale=optimizer) as obs:`` records,
for each layer and tensor class (weights, activations, errors = activation gradients,
weight gradients), a histogram of log2|x| by binade, the amax, and for fp16, bf16, e5m2
and e4m3 how many values would flush to zero, be subnormal, or overflow, as seen (with
the loss scale), unscaled, and at every power-of-two loss scale from 2^-8 to 2^40; for
block formats named in ``formats`` (``"mxfp4_e2m1"``, ``"nvfp4"``), how many flush or clip
at their block's largest value, each against its own block's scale.
``obs.report(DIR)`` writes report.md and PNGs: the histogram with each format's ranges,
the layers ranked by values lost, the recommended loss scale, a precision advisor.
:func:`loss_scale_history` reads an optimizer's loss-scale curve and skipped steps.
"""

from mixprec.stats.advice import (
    DEFAULT_MARGIN,
    BlockShare,
    block_shares,
    DEFAULT_TOLERANCE,
    FormatAdvice,
    LayerLoss,
    LossScaleAdvice,
    RecipeVerdict,
    advise_formats,
    rank_layers,
    recipe_verdict,
    recommend_loss_scale,
)
from mixprec.stats.counting import (
    KINDS,
    LOG2_MAX,
    LOG2_MIN,
    FormatThresholds,
    TensorCounts,
    count_blocks,
    count_tensor,
    is_block_format,
    thresholds,
)
from mixprec.stats.history import LossScaleHistory, loss_scale_history
from mixprec.stats.observer import SCALED_CLASSES, TENSOR_CLASSES, ModelStats, Observer, StatsConfig, observe
from mixprec.stats.report import write_report

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_TOLERANCE",
    "KINDS",
    "LOG2_MAX",
    "LOG2_MIN",
    "SCALED_CLASSES",
    "TENSOR_CLASSES",
    "BlockShare",
    "FormatAdvice",
    "FormatThresholds",
    "LayerLoss",
    "LossScaleAdvice",
    "LossScaleHistory",
    "ModelStats",
    "Observer",
    "RecipeVerdict",
    "StatsConfig",
    "TensorCounts",
    "advise_formats",
    "block_shares",
    "count_blocks",
    "count_tensor",
    "is_block_format",
    "loss_scale_history",
    "observe",
    "rank_layers",
    "recipe_verdict",
    "recommend_loss_scale",
    "thresholds",
    "write_report",
]
