"""The comparison's report: ``results.json`` (one record per run), ``report.md`` (one row
per model x recipe) and PNG plots (curves, loss scales, GAN samples)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from mixprec.recipe import get_recipe  # noqa: E402

__all__ = ["summary_rows", "write_results", "write_report"]

_HIGHER_IS_BETTER = {"test_accuracy": True, "validation_bpc": False, "frechet_distance": False}


def parity(metric: str, value: float, fp32_mean: float, fp32_spread: float, fp32_seeds: int) -> tuple[str, bool | None]:
    """How a recipe's mean metric compares with FP32's, and whether it meets the papers'
    claim at this scale: test accuracy within 1.0 point, bits per character within 3%,
    the GAN score within FP32's spread over seeds (undecided with a single FP32 seed)."""
    if metric == "test_accuracy":
        delta = (value - fp32_mean) * 100
        return f"{delta:+.2f} pt", round(delta, 9) >= -1.0  # rounded: 0.885 - 0.895 is not below -1
    if metric == "validation_bpc":
        delta = (value / fp32_mean - 1) * 100
        return f"{delta:+.1f}%", round(delta, 9) <= 3.0
    delta = value - fp32_mean
    if fp32_seeds < 2:
        return f"{delta:+.2f}", None
    return f"{delta:+.2f} (fp32 spread {fp32_spread:.2f})", delta <= fp32_spread


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model x recipe: metric mean and spread over seeds, bytes, times."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["model"], record["recipe"])].append(record)
    rows = []
    for (model, recipe), runs in groups.items():
        values = [r["metric_value"] for r in runs]
        ratios = [r["step_time_ratio"] for r in runs if r.get("step_time_ratio") is not None]
        rows.append({
            "model": model, "recipe": recipe, "metric": runs[0]["metric_name"],
            "mean": statistics.mean(values), "spread": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(runs),
            "megabytes": statistics.mean(r["param_bytes"] + r["optimizer_bytes"] + r["saved_bytes"] for r in runs) / 1e6,
            "step_ms": statistics.mean(r["step_seconds"] for r in runs) * 1e3,
            "ratio": statistics.mean(ratios) if ratios else None,
            "skipped": statistics.mean(r["skipped_steps"] for r in runs),
            "final_scale": runs[-1]["final_loss_scale"],
            "extra": {k: statistics.mean(r["extra"][k] for r in runs) for k in runs[0]["extra"]},
        })
    baselines = {row["model"]: row for row in rows if row["recipe"] == "fp32"}
    for row in rows:
        base = baselines.get(row["model"])
        row["vs_fp32"], row["meets_claim"] = (
            parity(row["metric"], row["mean"], base["mean"], base["spread"], base["seeds"])
            if base is not None and row is not base else ("", None))
    return rows


def write_results(out: Path, records: list[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """``results.json``: the settings and every run's record."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"settings": settings, "runs": records}))
    temporary.replace(path)
    return path


def _save(figure: Any, out: Path, name: str) -> str:
    """Write a figure as ``out/name`` (trimmed to its contents), close it, return the name."""
    figure.tight_layout()
    figure.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return name


def _plot_curves(out: Path, model: str, runs: list[dict[str, Any]]) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{run['recipe']} (seed {run['seed']})"
        steps, losses = zip(*run["curves"]["train_loss"]) if run["curves"]["train_loss"] else ((), ())
        left.plot(steps, losses, label=label, linewidth=0.8)
        if run["curves"]["validation"]:
            steps, values = zip(*run["curves"]["validation"])
            right.plot(steps, values, marker="o", markersize=3, label=label)
    left.set(title=f"{model}: training loss", xlabel="step", ylabel="loss")
    right.set(title=f"{model}: {runs[0]['metric_name'].replace('_', ' ')} (validation)", xlabel="step")
    left.legend(fontsize=7)
    return _save(figure, out, f"curves_{model}.png")


def _plot_scales(out: Path, model: str, runs: list[dict[str, Any]]) -> str:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    styles = ("-", "--", ":", "-.")
    for index, run in enumerate(runs):
        curve = run["curves"].get("loss_scale") or []
        if not curve:
            continue
        steps, scales = zip(*curve)
        # line styles and widths apart, so that recipes on the same scale stay visible
        line, = axis.step(steps, scales, where="post", linestyle=styles[index % len(styles)],
                          linewidth=2.2 - 0.3 * (index % 4), label=f"{run['recipe']} (seed {run['seed']})")
        skipped = set(run["curves"].get("skipped_at") or [])
        marks = [(step, scale) for step, scale in curve if step in skipped]
        if marks:
            axis.plot(*zip(*marks), "x", color=line.get_color(), markersize=6)
    axis.plot([], [], "kx", label="skipped step (Inf/NaN)")
    axis.set_yscale("log", base=2)
    axis.set(title=f"{model}: loss scale over steps", xlabel="step", ylabel="loss scale")
    axis.legend(fontsize=7)
    return _save(figure, out, f"loss_scale_{model}.png")


def _plot_samples(out: Path, runs: list[dict[str, Any]]) -> str:
    firsts: dict[str, dict[str, Any]] = {}
    for run in runs:
        firsts.setdefault(run["recipe"], run)
    figure, axes = plt.subplots(1, len(firsts), figsize=(3.2 * len(firsts), 3.4), squeeze=False)
    for axis, (recipe, run) in zip(axes[0], firsts.items()):
        # 64 samples of 28x28 tiled into an 8x8 grid: (row, y, col, x) -> (row*28+y, col*28+x)
        samples = np.asarray(run["curves"]["samples"], dtype=np.float32).reshape(8, 8, 28, 28)
        axis.imshow(samples.transpose(0, 2, 1, 3).reshape(8 * 28, 8 * 28), cmap="gray", vmin=-1, vmax=1)
        axis.set_title(recipe)
        axis.axis("off")
    return _save(figure, out, "gan_samples.png")


def _kept_precision(recipe: str) -> str:
    """What a recipe's kept layers run in: FP32, or the recipe it keeps them under
    (``KeepHighPrecision.recipe``: BF16 for nvfp4)."""
    try:
        return get_recipe(recipe).keep.recipe.upper()
    except ValueError:
        return "FP32"


def write_report(out: Path, records: list[dict[str, Any]], settings: dict[str, Any], partial: bool = False) -> Path:
    """``report.md`` with the table and the plots beside it."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(records)
    lines = ["# mixprec compare", ""]
    if partial:
        lines += ["**Partial report**: the comparison was interrupted; only finished runs are listed. "
                  "`mixprec compare --resume DIR` continues it.", ""]
    learning_rate = f", peak learning rate {settings['lr']:g} for every run" if settings.get("lr") else ""
    lines += [f"Budget `{settings.get('budget')}`{learning_rate}, seeds {settings.get('seeds')}, torch {settings.get('torch')}, "
              f"{settings.get('threads')} threads.", "",
              "| model | recipe | metric | mean | spread | vs fp32 | parity | MB (params + optimizer + saved) | "
              "step ms | x fp32 | skipped | final loss scale |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        extra = "".join(f"; {k} {v:.3f}" for k, v in row["extra"].items())
        verdict = {True: "yes", False: "**no**", None: "-"}[row["meets_claim"]]
        lines.append(f"| {row['model']} | {row['recipe']} | {row['metric']}{extra} | {row['mean']:.4f} | "
                     f"{row['spread']:.4f} | {row['vs_fp32']} | {verdict} | {row['megabytes']:.1f} | "
                     f"{row['step_ms']:.1f} | {ratio} | {row['skipped']:.1f} | {row['final_scale']:g} |")
    lines += ["", "Metrics: CNN test accuracy (higher is better); language models' validation bits per "
              "character (lower is better); GAN Frechet distance on a Fashion-MNIST classifier's features "
              "(lower is better) with the entropy of generated classes (ln 10 = 2.30 at most). Parity is the "
              "papers' claim at this scale: accuracy within 1.0 point of FP32, bits per character within 3%, "
              "the GAN score within FP32's spread over seeds (needs 2+ seeds).", ""]
    kept = sorted({(r["model"], r["recipe"], ", ".join(r.get("fp32_layers") or [])) for r in records
                   if r.get("fp32_layers")})
    if kept:
        lines += ["Layers kept in high precision on purpose (besides the norms and softmax every recipe keeps): "
                  + "; ".join(f"{model} under {recipe} (in {_kept_precision(recipe)}): `{names}`"
                              for model, recipe, names in kept) + ".", ""]
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_model[record["model"]].append(record)
    for model, runs in by_model.items():
        lines += [f"## {model}", "", f"![curves]({_plot_curves(out, model, runs)})", "",
                  f"![loss scale]({_plot_scales(out, model, runs)})", ""]
        if model == "gan":
            lines += [f"![samples]({_plot_samples(out, runs)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
