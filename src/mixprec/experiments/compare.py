"""``mixprec compare``'s work: every model x recipe x seed, step-time ratios to FP32,
results and report rewritten after each run, resumable after an interruption."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixprec.experiments.report import write_report, write_results
from mixprec.experiments.runner import BUDGETS, MODELS, Data, RunResult, run_one
from mixprec.recipe import get_recipe

__all__ = ["ComparePlan", "run_compare"]


@dataclass(frozen=True)
class ComparePlan:
    """What one comparison runs and where it writes."""

    models: tuple[str, ...]
    recipes: tuple[str, ...]
    budget: str = "quick"
    seeds: int = 1
    out: Path = Path("runs/compare")
    data_dir: str | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        for model in self.models:
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)} or 'all'")
        for recipe in self.recipes:
            get_recipe(recipe)  # a misspelt recipe fails before any training
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        if self.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be a positive learning rate, not {self.lr}")

    def runs(self) -> list[tuple[str, str, int]]:
        """(model, recipe, seed) in order: FP32 first per model, the baseline of the ratios."""
        recipes = ("fp32", *[r for r in self.recipes if r != "fp32"]) if "fp32" in self.recipes else self.recipes
        return [(m, r, s) for m in self.models for s in range(self.seeds) for r in recipes]

    def settings(self) -> dict[str, Any]:
        """The plan as recorded in results.json."""
        return {"models": list(self.models), "recipes": list(self.recipes), "budget": self.budget,
                "seeds": self.seeds, "lr": self.lr, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _load_plan(out: Path) -> ComparePlan:
    if not (out / "results.json").exists():
        raise ValueError(f"{out} holds no results.json, so there is no comparison to resume; "
                         f"start one with `mixprec compare --out {out}`")
    settings = json.loads((out / "results.json").read_text())["settings"]
    return ComparePlan(tuple(settings["models"]), tuple(settings["recipes"]), settings["budget"],
                       settings["seeds"], out, lr=settings.get("lr"))


def _with_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    baseline = {(r["model"], r["seed"]): r["step_seconds"] for r in records if r["recipe"] == "fp32"}
    for record in records:
        base = baseline.get((record["model"], record["seed"]))
        record["step_time_ratio"] = record["step_seconds"] / base if base else None
    return records


def run_compare(
    plan: ComparePlan | None = None,
    resume: Path | None = None,
    on_run_start: Callable[[str, str, int, int], Callable[[int], None]] | None = None,
    on_run_end: Callable[[RunResult], None] | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Run the plan (or resume the one in ``resume``), writing results.json and
    report.md after every run. On KeyboardInterrupt the finished runs' report is
    written, marked partial, and the interrupt propagates. Returns the records and the
    report's path."""
    if resume is not None:
        plan = _load_plan(resume)
    if plan is None:
        raise ValueError("give a plan or a directory to resume")
    records: list[dict[str, Any]] = []
    if resume is not None:
        records = json.loads((resume / "results.json").read_text())["runs"]
    elif (plan.out / "checkpoints").exists():
        shutil.rmtree(plan.out / "checkpoints")  # a fresh comparison never resumes an older one's runs
    done = {(r["model"], r["recipe"], r["seed"]) for r in records}
    data = Data(plan.data_dir, Path.home() / ".cache" / "mixprec")
    settings = plan.settings()
    write_results(plan.out, records, settings)
    try:
        for model, recipe, seed in plan.runs():
            if (model, recipe, seed) in done:
                continue
            steps = BUDGETS[plan.budget][model].steps
            on_step = on_run_start(model, recipe, seed, steps) if on_run_start else (lambda step: None)
            checkpoint = plan.out / "checkpoints" / f"{model}-{recipe}-seed{seed}.pt"
            result = run_one(model, recipe, seed, plan.budget, data, checkpoint, on_step, lr=plan.lr)
            records.append(result.as_record())
            _with_ratios(records)
            write_results(plan.out, records, settings)
            if on_run_end:
                on_run_end(result)
    except KeyboardInterrupt:
        write_report(plan.out, _with_ratios(records), settings, partial=True)
        raise
    return records, write_report(plan.out, _with_ratios(records), settings)
