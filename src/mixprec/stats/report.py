"""The analysis report: ``report.md`` with PNG figures (matplotlib, Agg) and
``stats.json``, from a :class:`~mixprec.stats.observer.ModelStats`. Only reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mixprec.core import formats as formats_module
from mixprec.recipe import get_recipe
from mixprec.stats.advice import (
    DEFAULT_MARGIN,
    DEFAULT_TOLERANCE,
    LossScaleAdvice,
    advise_formats,
    block_shares,
    rank_layers,
    recipe_verdict,
    recommend_loss_scale,
)
from mixprec.stats.counting import LOG2_MAX, LOG2_MIN, TensorCounts, is_block_format
from mixprec.stats.observer import TENSOR_CLASSES, ModelStats

__all__ = ["write_report"]

_CLASS_TITLES = {"weight": "weights", "activation": "activations", "error": "errors (activation gradients)",
                 "weight_grad": "weight gradients"}
_FORMAT_COLOURS = {"fp16": "tab:blue", "bf16": "tab:green", "e5m2": "tab:purple", "e4m3": "tab:orange"}


def _pct(share: float) -> str:
    if share == 0:
        return "0"
    return f"{share:.2%}" if share >= 1e-4 else f"{share:.1e}"


def _bins() -> np.ndarray:
    return np.arange(LOG2_MIN, LOG2_MAX + 1)


def _span(hists: list[np.ndarray], fmts: list[str], pad: int = 2) -> tuple[int, int]:
    """The log2 range worth drawing: the nonempty bins and the formats' ranges."""
    lows, highs = [], []
    for hist in hists:
        nonzero = np.nonzero(hist)[0]
        if nonzero.size:
            lows.append(LOG2_MIN + int(nonzero[0]))
            highs.append(LOG2_MIN + int(nonzero[-1]) + 1)
    for name in fmts:
        fmt = formats_module.get(name)
        if name != "bf16":  # bf16's range is float32's: it would squeeze everything else
            lows.append(int(math.log2(fmt.smallest_subnormal)) - 1)
            highs.append(math.ceil(math.log2(fmt.largest)) + 1)
    return (min(lows) - pad, max(highs) + pad) if lows else (-30, 20)


def _shade(ax: Any, name: str, low: int, high: int) -> None:
    """Shade ``name``'s ranges on a log2 axis: flushed (red), subnormal (orange), normal
    (green), overflow (red)."""
    fmt = formats_module.get(name)
    flush_top = math.log2(fmt.smallest_subnormal) - 1
    normal = math.log2(fmt.smallest_normal)
    top = math.log2(fmt.largest)
    ax.axvspan(low, flush_top, color="tab:red", alpha=0.10, lw=0, label="flushed to zero")
    ax.axvspan(flush_top, normal, color="tab:orange", alpha=0.25, lw=0, label="subnormal")
    ax.axvspan(normal, top, color="tab:green", alpha=0.15, lw=0, label="normal")
    ax.axvspan(top, high, color="tab:red", alpha=0.10, lw=0)


def _histogram_figure(total: TensorCounts, fmts: list[str], advice: dict[str, LossScaleAdvice], title: str,
                      path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = total.hist / max(total.nonzero, 1)
    shifted: dict[str, int] = {}
    for name in fmts:
        exponent = advice[name].exponent if name in advice else None
        if exponent and advice[name].flush_unscaled > 0:
            shifted[name] = exponent
    hists = [total.hist] + [np.roll(total.hist, k) for k in shifted.values()]
    low, high = _span(hists, fmts)
    figure, axes = plt.subplots(len(fmts), 1, figsize=(10, 2.1 * len(fmts) + 0.8), sharex=True, squeeze=False)
    bins = _bins()
    for ax, name in zip(axes[:, 0], fmts):
        _shade(ax, name, low, high)
        ax.bar(bins + 0.5, np.where(shares > 0, shares, np.nan), width=1.0, color="0.25", label="unscaled")
        lines = f"{name}: unscaled {_pct(total.share(name, 'flush'))} flushed, " \
                f"{_pct(total.share(name, 'subnormal'))} subnormal"
        if name in shifted:
            k = shifted[name]
            ax.step(bins + k, np.where(shares > 0, shares, np.nan), where="post", color="tab:blue", lw=1.2,
                    label=f"x 2^{k} (recommended loss scale)")
            lines += f"; x 2^{k}: {_pct(total.share(name, 'flush', 2.0**k))} flushed, " \
                     f"{_pct(total.share(name, 'overflow', 2.0**k))} overflow"
        ax.set_yscale("log")
        ax.set_ylim(max(np.nanmin(np.where(shares > 0, shares, np.nan), initial=1) / 3, 1e-9) if shares.any() else 1e-6,
                    1.5)
        ax.set_ylabel("share")
        ax.set_title(lines, fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=5)
    axes[-1, 0].set_xlim(low, high)
    axes[-1, 0].set_xlabel("log2 |x|  (bin j holds 2^j <= |x| < 2^(j+1); zeros counted apart)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _layers_figure(stats: ModelStats, cls: str, fmts: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows: list[tuple[str, TensorCounts]] = []
    for layer in stats.layers:
        counts = stats.get(layer, cls)
        if counts is not None and counts.nonzero:
            rows.append((layer, counts))
    if not rows:
        return False
    low, high = _span([c.hist for _, c in rows], fmts, pad=1)
    start, stop = low - LOG2_MIN, high - LOG2_MIN
    matrix = np.array([c.hist[start:stop] / c.nonzero for _, c in rows], dtype=np.float64)
    matrix[matrix == 0] = np.nan
    height = max(3.6, 1.9 + 0.28 * len(rows))
    figure, ax = plt.subplots(figsize=(10, height))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(low, high, len(rows), 0),
                      norm=LogNorm(vmin=max(np.nanmin(matrix), 1e-8), vmax=1.0))
    for name in fmts:
        if name == "bf16":
            continue
        fmt = formats_module.get(name)
        colour = _FORMAT_COLOURS.get(name, "white")
        for x, style in ((math.log2(fmt.smallest_subnormal) - 1, ":"), (math.log2(fmt.smallest_normal), "--"),
                         (math.log2(fmt.largest), "-")):
            ax.axvline(x, color=colour, ls=style, lw=1.2)
        ax.plot([], [], color=colour, label=name)
    for style, meaning in ((":", "flushes below"), ("--", "normal from"), ("-", "largest")):
        ax.plot([], [], color="grey", ls=style, label=meaning)
    types = dict(zip(stats.layers, stats.layer_types))
    ax.set_yticks(np.arange(len(rows)) + 0.5, [f"{layer} ({types.get(layer, '?')})" for layer, _ in rows], fontsize=7)
    ax.set_xlabel("log2 |x| (unscaled)")
    ax.set_title(f"{_CLASS_TITLES[cls]} per layer: share of each layer's nonzero values per binade", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=7, ncol=6, frameon=False)
    figure.colorbar(image, ax=ax, label="share")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def _sweep_figure(total: TensorCounts, fmts: list[str], advice: dict[str, LossScaleAdvice], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = np.array(total.exponents)
    figure, ax = plt.subplots(figsize=(8, 4))
    for name in fmts:
        colour = _FORMAT_COLOURS.get(name)
        flush = [total.share(name, "flush", 2.0**int(e)) for e in exps]
        over = [total.share(name, "overflow", 2.0**int(e)) for e in exps]
        ax.plot(exps, np.maximum(flush, 1e-9), color=colour, label=f"{name} flushed")
        ax.plot(exps, np.maximum(over, 1e-9), color=colour, ls="--", label=f"{name} overflow")
        exponent = advice[name].exponent
        if exponent is not None:
            ax.axvline(exponent, color=colour, ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 1.5)
    ax.set_xlabel("log2 of the loss scale S (dotted: recommended)")
    ax.set_ylabel("share of the errors' nonzero values")
    ax.set_title("errors lost at each power-of-two loss scale", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    stats: ModelStats,
    out_dir: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    margin: int = DEFAULT_MARGIN,
    recipe: str | None = None,
    primary_format: str | None = None,
    title: str | None = None,
) -> Path:
    """Write ``report.md``, ``stats.json`` and PNGs into ``out_dir``; returns report.md.

    ``tolerance``: the share of nonzero values the advisor lets a format lose;
    ``margin``: binades of headroom under the format's largest value for the recommended
    loss scale; ``recipe``: the recipe to judge (default: the one the model was prepared
    with, if any); ``primary_format``: the format layers are ranked by (default: the
    recipe's error format, or fp16)."""
    if not isinstance(stats, ModelStats):
        raise TypeError(f"write_report takes ModelStats (observer.summary()), not {type(stats).__name__}")
    if not any(c.samples for c in stats.counts.values()):
        raise ValueError("nothing was recorded: run forward and backward passes inside the `with observe(...)` "
                         "block, and call obs.step() after each training step")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    observed = list(stats.config.format_names)
    block_names = [name for name in observed if is_block_format(name)]
    fmts = [name for name in observed if name not in block_names]  # the ranges, loss scales and advisor
    recipe_name = recipe or stats.recipe
    verdict = recipe_verdict(stats, recipe_name, tolerance, margin) if recipe_name else None
    if primary_format is None:
        error_fmt = get_recipe(recipe_name).dgrad.left.fmt.name if recipe_name else "fp16"
        primary_format = error_fmt if error_fmt in observed else ("fp16" if "fp16" in observed else observed[0])
    primary_format = formats_module.resolve(primary_format).name
    advice = {name: recommend_loss_scale(stats, name, margin) for name in fmts}
    errors = stats.total("error")
    figures: dict[str, str] = {}
    lines = [f"# mixprec analyze: {title or stats.model_name}", ""]
    scales = ", ".join(f"{s:g}" for s in stats.loss_scales) or "none recorded"
    lines += [
        f"- recipe: `{recipe_name or 'not prepared (FP32)'}`; steps sampled: {stats.steps_sampled}; "
        f"loss scales the errors carried: {scales}",
        f"- layers observed: {len(stats.layers)}; formats: {', '.join(observed)}; advisor tolerance: "
        f"{tolerance:.2%} of nonzero values lost; loss-scale margin: {margin} binades",
        "",
    ]
    if errors.samples and fmts:
        _histogram_figure(errors, fmts, advice, f"{title or stats.model_name}\nactivation gradients (errors) of the "
                          f"whole model, unscaled: {errors.nonzero:,} nonzero values "
                          f"({errors.zeros / max(errors.numel, 1):.1%} zeros apart)", out / "errors_histogram.png")
        figures["errors_histogram"] = "errors_histogram.png"
        lines += ["## Activation gradients across the model", "",
                  "![errors histogram](errors_histogram.png)", "",
                  f"{errors.nonzero:,} nonzero values sampled ({errors.zeros:,} zeros counted apart, "
                  f"{errors.infs} Inf, {errors.nans} NaN); largest |error| unscaled: {errors.amax:.3g} "
                  f"(2^{math.log2(errors.amax):.1f})." if errors.amax > 0 else "All sampled errors were zero.", ""]
    if verdict is not None:
        lines += ["## Does the recipe need a loss scale?", "", f"**{verdict.recipe}**: {verdict.reason}.", ""]
    lines += ["## Recommended loss scale per format", "",
              f"S is the largest power of two with max|grad| x S <= largest / 2^{margin} (max|grad|: the largest "
              "unscaled error or weight gradient sampled). Shares are of the errors' nonzero values.", "",
              "| format | largest | max\\|grad\\| | needs a loss scale | recommended S | flushed unscaled | "
              "flushed at S | subnormal unscaled | subnormal at S | overflow at S |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in fmts:
        a = advice[name]
        s = "-" if a.exponent is None else f"2^{a.exponent}" + (" (clamped)" if a.clamped else "")
        needed = "yes" if a.flush_unscaled > tolerance else "no"
        lines.append(f"| {name} | {formats_module.get(name).largest:.6g} | {a.amax:.3g} | {needed} | {s} | "
                     f"{_pct(a.flush_unscaled)} | {_pct(a.flush_at_scale)} | {_pct(a.subnormal_unscaled)} | "
                     f"{_pct(a.subnormal_at_scale)} | {_pct(a.overflow_at_scale)} |")
    lines += ["", f"A format needs a loss scale when more than {tolerance:.2%} of the errors' nonzero values flush "
              "to zero unscaled.", ""]
    history = stats.extra.get("loss_scale_history", {})
    for name, curve in history.items():
        lines.append(f"- loss scale of `{name}` during the run: final {curve['final_scale']:g}, "
                     f"{curve['skipped_steps']} skipped steps" + (" (dynamic)" if curve["dynamic"] else ""))
    if history:
        lines.append("")
    if errors.samples and fmts:
        _sweep_figure(errors, fmts, advice, out / "loss_scale_sweep.png")
        figures["loss_scale_sweep"] = "loss_scale_sweep.png"
        lines += ["![loss-scale sweep](loss_scale_sweep.png)", ""]
    ranked = rank_layers(stats, primary_format, classes=TENSOR_CLASSES)
    lines += [f"## Layers ranked by the share of values lost in {primary_format}", "",
              "Lost = flushed to zero or overflowing (block formats: clipped at the block's largest value), unscaled, "
              "as a share of the nonzero values.", "",
              "| layer | class | nonzero values | max\\|x\\| | " + " | ".join(f"{f} lost" for f in observed)
              + f" | {primary_format} subnormal |",
              "|---|---|---|---|" + "---|" * len(observed) + "---|"]
    for row in ranked[:25]:
        lines.append(f"| {row.layer} | {row.cls} | {row.nonzero:,} | {row.amax:.3g} | "
                     + " | ".join(_pct(row.lost[f]) for f in observed) + f" | {_pct(row.subnormal[primary_format])} |")
    if len(ranked) > 25:
        lines.append(f"\n({len(ranked) - 25} more rows in stats.json)")
    lines.append("")
    lines += ["## Per layer", ""]
    for cls in TENSOR_CLASSES:
        name = f"{cls}_layers.png"
        if _layers_figure(stats, cls, fmts, out / name):
            figures[f"{cls}_layers"] = name
            lines += [f"![{cls} per layer]({name})", ""]
    shares = block_shares(stats)
    if shares:
        lines += ["## Block formats: values clipped and flushed per layer", "",
                  "Each value rounded to nearest against its own block's scale (blocks along the tensor's last "
                  "dimension, zero-padded to whole blocks as the engine pads them). *Clipped*: saturated at the "
                  "block's largest value (it would round past the element format's largest value times the block "
                  "scale: OCP's floor scale rule clips when amax's significand exceeds the element's largest one; "
                  "round-up rules such as rceil never clip). *Flushed*: a nonzero value that rounds to zero in its "
                  "block (below half the smallest element subnormal times the block scale). *Subnormal*: an "
                  "element below the element format's smallest normal. Shares of the nonzero values; a loss "
                  "scale changes none of them.", "",
                  "| layer | class | format | nonzero values | clipped | flushed | subnormal |",
                  "|---|---|---|---|---|---|---|"]
        for share in shares:
            lines.append(f"| {share.layer} | {share.cls} | {share.format} | {share.nonzero:,} | "
                         f"{_pct(share.clipped)} | {_pct(share.flushed)} | {_pct(share.subnormal)} |")
        lines.append("")
    advised = advise_formats(stats, tolerance, margin)
    table: dict[str, dict[str, str]] = {}
    for item in advised:
        scale = f" at 2^{int(math.log2(item.scale))}" if item.scale != 1.0 else ""
        table.setdefault(item.layer, {})[item.cls] = f"{item.format} ({_pct(item.lost)}{scale})"
    lines += ["## Precision advisor", "",
              f"The narrowest format that loses less than {tolerance:.2%} of the nonzero values (at equal width, the "
              "one that loses less; fp32 when none does). Errors and weight gradients are judged at that format's "
              "recommended loss scale, weights and activations unscaled. In brackets: the share lost.", "",
              "| layer | " + " | ".join(TENSOR_CLASSES) + " |", "|---|" + "---|" * len(TENSOR_CLASSES)]
    for layer in [*stats.layers, "(model)"]:
        if layer in table:
            lines.append(f"| {layer} | " + " | ".join(table[layer].get(c, "-") for c in TENSOR_CLASSES) + " |")
    lines += ["", "## Definitions", "",
              "- Rounding is to nearest, ties to even, as `mixprec.core.quantize`: a nonzero value *flushes* when it "
              "rounds to 0, is *subnormal* when it rounds to a nonzero value below the smallest normal, and "
              "*overflows* when it rounds past the largest finite value (Inf, or the saturated largest value for "
              "e4m3). Shares are over nonzero values; zeros are counted apart.",
              "- Errors are the gradients of each layer's output; they and the weight gradients carry the loss "
              "scale, and are shown unscaled (divided by the scale they carried) unless a scale is named.",
              "- Histogram bins are binades: bin j holds 2^j <= |x| < 2^(j+1).", ""]
    (out / "report.md").write_text("\n".join(lines))
    record: dict[str, Any] = {
        "model": stats.model_name, "recipe": recipe_name, "steps_sampled": stats.steps_sampled,
        "loss_scales": list(stats.loss_scales), "tolerance": tolerance, "margin": margin,
        "verdict": None if verdict is None else {"needs_loss_scale": verdict.needs_loss_scale,
                                                 "reason": verdict.reason},
        "loss_scale": {name: {"exponent": a.exponent, "amax": a.amax, "flush_unscaled": a.flush_unscaled,
                              "flush_at_scale": a.flush_at_scale, "subnormal_unscaled": a.subnormal_unscaled,
                              "subnormal_at_scale": a.subnormal_at_scale, "overflow_at_scale": a.overflow_at_scale}
                       for name, a in advice.items()},
        "layers": [{"layer": r.layer, "class": r.cls, "nonzero": r.nonzero, "amax": r.amax, "lost": r.lost,
                    "subnormal": r.subnormal} for r in ranked],
        "advice": [{"layer": a.layer, "class": a.cls, "format": a.format, "lost": a.lost, "scale": a.scale}
                   for a in advised],
        "blocks": [{"layer": b.layer, "class": b.cls, "format": b.format, "nonzero": b.nonzero,
                    "clipped": b.clipped, "flushed": b.flushed, "subnormal": b.subnormal} for b in shares],
        "figures": figures,
        **stats.extra,
    }
    (out / "stats.json").write_text(json.dumps(record, indent=2))
    return out / "report.md"
