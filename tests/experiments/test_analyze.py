"""mixprec analyze: the runner on every model at a few steps and tiny widths (real
data), the command line, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixprec.cli import main
from mixprec.experiments.analyze import AnalyzePlan, run_analyze

TINY = {"cnn": dict(batch=8, width=8), "lstm": dict(batch=4, width=16, sequence=16),
        "gan": dict(batch=8, width=8), "transformer": dict(batch=4, width=16, sequence=16)}


@pytest.mark.parametrize("model", ["cnn", "lstm", "gan", "transformer"])
def test_run_analyze_writes_a_report(model: str, tmp_path: Path) -> None:
    plan = AnalyzePlan(model, recipe="fp32", steps=2, every=1, out=tmp_path, **TINY[model])  # type: ignore[arg-type]
    result = run_analyze(plan)
    assert result.report == tmp_path / "report.md" and len(result.losses) == 2
    assert result.stats.steps_sampled == 2
    errors = result.stats.total("error")
    assert errors.nonzero > 0 and errors.scales == (1.0,)
    record = json.loads((tmp_path / "stats.json").read_text())
    assert record["verdict"]["needs_loss_scale"] is False  # fp32 errors
    assert record["training"]["steps"] == 2
    assert (tmp_path / "errors_histogram.png").exists()


def test_fp16_run_records_loss_scale_history(tmp_path: Path) -> None:
    plan = AnalyzePlan("cnn", recipe="fp16", steps=2, every=1, out=tmp_path, batch=8, width=8)
    result = run_analyze(plan)
    history = result.histories["model"]
    assert history.steps == (1, 2) and history.dynamic
    assert result.stats.loss_scales  # errors carried the optimizer's scale
    assert "loss scale of `model` during the run" in result.report.read_text()


def test_block_recipe_reports_clipped_and_flushed_shares(tmp_path: Path) -> None:
    plan = AnalyzePlan("transformer", recipe="mxfp4", steps=2, every=1, out=tmp_path,
                       **TINY["transformer"])  # type: ignore[arg-type]
    result = run_analyze(plan)
    assert result.stats.config.format_names[-1] == "mxfp4_e2m1"
    weights = result.stats.total("weight")
    # OCP's floor rule clips where a block's amax has a significand of 1.75 or more
    assert weights.share("mxfp4_e2m1", "clip") > 0 and weights.share("mxfp4_e2m1", "flush") > 0
    record = json.loads((tmp_path / "stats.json").read_text())
    assert record["verdict"]["needs_loss_scale"] is False and "mxfp4_e2m1" in record["verdict"]["reason"]
    layers = {row["layer"] for row in record["blocks"] if row["clipped"] > 0}
    assert "(model)" in layers and len(layers) > 1
    assert "## Block formats: values clipped and flushed per layer" in result.report.read_text()


def test_cli_analyze(tmp_path: Path) -> None:
    code = main(["analyze", "--model", "cnn", "--steps", "1", "--every", "1", "--batch", "8", "--width", "8",
                 "--out", str(tmp_path)])
    assert code == 0 and (tmp_path / "report.md").exists()


@pytest.mark.parametrize("argv", [
    ["analyze", "--model", "resnet"],
    ["analyze", "--model", "cnn", "--recipe", "fp12"],
    ["analyze", "--model", "cnn", "--steps", "0"],
    ["analyze", "--model", "cnn", "--every", "0"],
])
def test_cli_analyze_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "mixprec:" in capsys.readouterr().out


def test_plan_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="cnn, lstm, gan, transformer"):
        AnalyzePlan("resnet")
    with pytest.raises(ValueError, match="unknown recipe"):
        AnalyzePlan("cnn", recipe="fp12")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        AnalyzePlan("cnn", steps=0)
