"""mixprec.experiments.report: the parity verdicts that the comparison's table prints."""

from __future__ import annotations

import pytest

from mixprec.experiments.report import parity, summary_rows


@pytest.mark.parametrize(("metric", "value", "base", "spread", "seeds", "text", "verdict"), [
    ("test_accuracy", 0.885, 0.89, 0.0, 1, "-0.50 pt", True),
    ("test_accuracy", 0.875, 0.89, 0.0, 1, "-1.50 pt", False),
    ("test_accuracy", 0.90, 0.89, 0.0, 1, "+1.00 pt", True),
    ("validation_bpc", 2.06, 2.00, 0.0, 1, "+3.0%", True),
    ("validation_bpc", 2.08, 2.00, 0.0, 1, "+4.0%", False),
    ("validation_bpc", 1.90, 2.00, 0.0, 1, "-5.0%", True),
    ("frechet_distance", 11.0, 10.0, 2.0, 3, "+1.00 (fp32 spread 2.00)", True),
    ("frechet_distance", 13.0, 10.0, 2.0, 3, "+3.00 (fp32 spread 2.00)", False),
    ("frechet_distance", 13.0, 10.0, 0.0, 1, "+3.00", None),
])
def test_parity_applies_each_metrics_claim(metric, value, base, spread, seeds, text, verdict):
    assert parity(metric, value, base, spread, seeds) == (text, verdict)


def record(recipe, seed, value):
    return {"model": "cnn", "recipe": recipe, "seed": seed, "metric_name": "test_accuracy", "metric_value": value,
            "step_time_ratio": 1.0, "param_bytes": 1, "optimizer_bytes": 1, "saved_bytes": 1, "step_seconds": 0.1,
            "skipped_steps": 0, "final_loss_scale": 1.0, "extra": {}}


def test_summary_rows_compare_means_over_seeds_with_fp32():
    rows = {row["recipe"]: row for row in summary_rows(
        [record("fp32", 0, 0.90), record("fp32", 1, 0.88), record("fp8", 0, 0.86), record("fp8", 1, 0.87)])}
    assert rows["fp32"]["meets_claim"] is None and rows["fp32"]["vs_fp32"] == ""
    assert rows["fp8"]["mean"] == pytest.approx(0.865)
    assert rows["fp8"]["vs_fp32"] == "-2.50 pt" and rows["fp8"]["meets_claim"] is False
