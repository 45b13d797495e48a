"""mixprec compare end to end on the real data with the tiny 'test' budget: every model
under every main recipe writes sane results and a report; an interrupted comparison
leaves a partial report and resumes; bad plans fail before training."""

from __future__ import annotations

import json
import math

import pytest

from mixprec.experiments import compare as compare_module
from mixprec.experiments.compare import ComparePlan, run_compare
from mixprec.experiments.runner import MODELS
from mixprec.recipe import RECIPES


@pytest.mark.slow
def test_every_model_under_every_recipe_writes_a_sane_report(tmp_path):
    plan = ComparePlan(MODELS, tuple(RECIPES), budget="test", out=tmp_path)
    records, report = run_compare(plan)
    assert len(records) == len(MODELS) * len(RECIPES)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == len(records) and saved["settings"]["budget"] == "test"
    for record in records:
        assert math.isfinite(record["metric_value"]) and record["steps"] == 3
        assert record["param_bytes"] > 0 and record["saved_bytes"] > 0 and record["wall_seconds"] > 0
        assert record["step_time_ratio"] > 0
        assert len(record["curves"]["train_loss"]) == 3 and record["curves"]["validation"]
        if record["model"] == "cnn":
            assert 0.0 <= record["metric_value"] <= 1.0
        # the FP8 recipes keep embeddings and the output layer in high precision
        output_layers = {"cnn": ["8"], "lstm": ["embed", "head"], "transformer": ["head", "positions", "tokens"],
                         "gan": ["generator.net.6", "critic.net.5"]}[record["model"]]
        if record["recipe"] in ("fp32", "fp16", "bf16", "fp8", "fp8-hybrid"):
            assert record["fp32_layers"] == (output_layers if record["recipe"] in ("fp8", "fp8-hybrid") else [])
        else:  # the block recipes keep the output layer too (nvfp4 also its last layers)
            assert set(output_layers) <= set(record["fp32_layers"])
    fp32 = {r["model"]: r for r in records if r["recipe"] == "fp32"}
    fp8 = {r["model"]: r for r in records if r["recipe"] == "fp8"}
    for model in MODELS:
        assert fp32[model]["step_time_ratio"] == 1.0
        assert fp8[model]["saved_bytes"] < fp32[model]["saved_bytes"]
    text = report.read_text()
    assert "| cnn | fp8 |" in text and "Partial" not in text
    assert "under nvfp4 (in BF16)" in text and "under fp8 (in FP32)" in text  # what kept layers run in
    for picture in ("curves_cnn.png", "loss_scale_lstm.png", "gan_samples.png", "curves_transformer.png"):
        assert (tmp_path / picture).stat().st_size > 1000


def test_interrupted_comparison_leaves_a_partial_report_and_resumes(tmp_path, monkeypatch):
    plan = ComparePlan(("cnn",), ("fp32", "fp16"), budget="test", out=tmp_path)
    original = compare_module.run_one
    calls = []

    def interrupt_second(model, recipe, *args, **kwargs):
        calls.append(recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(model, recipe, *args, **kwargs)

    monkeypatch.setattr(compare_module, "run_one", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_compare(plan)
    assert "Partial report" in (tmp_path / "report.md").read_text()
    assert [r["recipe"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == ["fp32"]
    monkeypatch.setattr(compare_module, "run_one", original)
    records, _ = run_compare(resume=tmp_path)
    assert [r["recipe"] for r in records] == ["fp32", "fp16"]


@pytest.mark.parametrize(("kwargs", "message"), [({"models": ("mlp",)}, "unknown model"),
                                                  ({"recipes": ("fp9",)}, "unknown recipe"),
                                                  ({"budget": "huge"}, "unknown budget")])
def test_bad_plans_fail_before_training(tmp_path, kwargs, message):
    arguments = {"models": ("cnn",), "recipes": ("fp32",), "out": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        ComparePlan(**arguments)


@pytest.mark.parametrize("model", ["cnn", "lstm", "gan"])
def test_a_run_resumes_exactly_from_its_checkpoint(tmp_path, model):
    from pathlib import Path

    from mixprec.experiments.runner import Data, run_one

    data = Data(None, Path.home() / ".cache" / "mixprec")
    straight = run_one(model, "fp8", 0, "test", data)
    checkpoint = tmp_path / "run.pt"

    def stop_at_three(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_one(model, "fp8", 0, "test", data, checkpoint, stop_at_three)
    assert checkpoint.exists()  # written at step 2
    resumed = run_one(model, "fp8", 0, "test", data, checkpoint)
    assert not checkpoint.exists()
    assert resumed.metric_value == straight.metric_value
    assert resumed.curves["train_loss"] == straight.curves["train_loss"]


def test_resuming_a_folder_without_results_says_so(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        run_compare(resume=tmp_path)


def test_a_fresh_comparison_discards_an_older_ones_checkpoints(tmp_path, monkeypatch):
    stale = tmp_path / "checkpoints" / "cnn-fp32-seed0.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a checkpoint")  # resuming it would fail loudly
    records, _ = run_compare(ComparePlan(("cnn",), ("fp32",), budget="test", out=tmp_path))
    assert len(records) == 1 and not stale.exists()


def test_a_learning_rate_override_is_used_recorded_and_checked(tmp_path):
    with pytest.raises(ValueError, match="--lr must be a positive"):
        ComparePlan(("cnn",), ("fp32",), budget="test", out=tmp_path, lr=0.0)
    default, _ = run_compare(ComparePlan(("cnn",), ("fp32",), budget="test", out=tmp_path / "a"))
    slow, report = run_compare(ComparePlan(("cnn",), ("fp32",), budget="test", out=tmp_path / "b", lr=1e-6))
    assert json.loads((tmp_path / "b" / "results.json").read_text())["settings"]["lr"] == 1e-6
    assert "peak learning rate 1e-06" in report.read_text()
    # the first step's loss is the same (same weights, same batch); later ones differ
    assert default[0]["curves"]["train_loss"][0] == slow[0]["curves"]["train_loss"][0]
    assert default[0]["curves"]["train_loss"][2] != slow[0]["curves"]["train_loss"][2]
