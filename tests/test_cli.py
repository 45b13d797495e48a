"""The command line: subcommands listed, formats table, and the quantize benchmark's
JSON records, run as a user would (a subprocess through ``python -m mixprec``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixprec.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mixprec", *args], capture_output=True, text=True,
                          timeout=600)


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout and "formats" in result.stdout


def test_formats_prints_the_numbers(capsys):
    assert main(["formats"]) == 0
    printed = capsys.readouterr().out
    assert "65504" in printed and "57344" in printed and "448" in printed


def test_bench_quantize_writes_json_records(tmp_path):
    path = tmp_path / "bench.json"
    result = run("bench", "quantize", "--numel", "65536", "--repeats", "2", "--formats", "fp16,e4m3",
                 "--json", str(path))
    assert result.returncode == 0, result.stderr
    report = json.loads(path.read_text())
    rows = [row for row in report["rows"] if row["format"] != "baseline"]
    assert {(r["format"], r["rounding"], r["out"]) for r in rows} == {
        (f, r, o) for f in ("fp16", "e4m3") for r in ("nearest", "stochastic") for o in (False, True)
    }
    for row in rows:
        assert set(row) == {"format", "rounding", "out", "gbps", "ratio_to_copy", "ratio_to_alloc"}
        assert row["gbps"] > 0 and row["ratio_to_copy"] > 0
    assert "quantize throughput" in result.stdout


def test_bad_arguments_fail_with_a_message():
    result = run("bench", "quantize", "--formats", "fp99", "--numel", "1024")
    assert result.returncode == 2
    assert "unknown format" in result.stdout
    assert run("nonsense").returncode == 2


def test_coverage_command_prints_the_share_and_what_is_kept():
    result = run("coverage", "--model", "transformer", "--recipe", "fp8-hybrid")
    assert result.returncode == 0, result.stderr
    assert "100.0% outside modules kept in high precision" in result.stdout
    assert "kept in high precision: head" in result.stdout and "sdpa.qk" in result.stdout
    assert run("coverage", "--model", "resnet").returncode == 2


def test_bench_step_writes_rows_for_every_configuration(tmp_path):
    path = tmp_path / "step.json"
    result = run("bench", "step", "--repeats", "1", "--batch-scale", "0.0625", "--models", "cnn",
                 "--configs", "fp32,autocast-bf16,fp16,fp8", "--json", str(path))
    assert result.returncode == 0, result.stderr
    rows = json.loads(path.read_text())
    assert [row["config"] for row in rows] == ["fp32", "autocast-bf16", "fp16", "fp8"]
    by_config = {row["config"]: row for row in rows}
    assert by_config["fp32"]["x_fp32"] == 1.0
    # paper 1: FP32 masters plus 2-byte weight operands (batch norms have none): under 6 of 4 bytes
    assert 1.4 < by_config["fp16"]["param_bytes"] / by_config["fp32"]["param_bytes"] <= 1.5
    # paper 2: masters on the FP16 grid (held in FP32) plus 1-byte E5M2 weight operands (the kept
    # output layer has none)
    assert 1.15 < by_config["fp8"]["param_bytes"] / by_config["fp32"]["param_bytes"] <= 1.25
    assert by_config["fp8"]["saved_bytes"] < 0.75 * by_config["fp32"]["saved_bytes"]
    assert by_config["fp32"]["bytes_per_parameter"] == pytest.approx(8.0)  # weights + SGD momentum
    assert all(row["ms"] > 0 and row["saved_bytes"] > 0 for row in rows)


def test_bench_step_times_the_quick_compare_models(tmp_path):
    """quick-cnn and quick-lstm are compare's networks at its quick budget, with AdamW/Adam
    state (two FP32 tensors a parameter) and, under bf16, a 2-byte copy of each weight."""
    path = tmp_path / "step.json"
    result = run("bench", "step", "--repeats", "1", "--batch-scale", "0.0625", "--models", "quick-cnn,quick-lstm",
                 "--configs", "fp32,bf16", "--json", str(path))
    assert result.returncode == 0, result.stderr
    rows = {(row["model"], row["config"]): row for row in json.loads(path.read_text())}
    assert set(rows) == {(m, c) for m in ("quick-cnn", "quick-lstm") for c in ("fp32", "bf16")}
    hidden, embedding, vocabulary = 256, 64, 63  # compare's quick LSTM on the KJV's characters
    lstm = (vocabulary * embedding + 4 * hidden * (embedding + hidden) + 8 * hidden
            + 4 * hidden * 2 * hidden + 8 * hidden + vocabulary * hidden + vocabulary)
    assert rows["quick-lstm", "fp32"]["parameters"] == lstm
    for model in ("quick-cnn", "quick-lstm"):
        fp32, bf16 = rows[model, "fp32"], rows[model, "bf16"]
        assert fp32["x_fp32"] == 1.0 and fp32["bytes_per_parameter"] == pytest.approx(12.0, rel=1e-3)  # + step counts
        assert 1.4 < bf16["param_bytes"] / fp32["param_bytes"] <= 1.5
        assert bf16["saved_bytes"] < fp32["saved_bytes"]


def test_bench_step_times_the_quick_gan_with_both_networks(tmp_path):
    """quick-gan is compare's DCGAN at its quick budget: the generator and the critic, each
    with its Adam state, stepped by compare's gan_step; no torchao row (nothing for its
    float8 to convert)."""
    path = tmp_path / "step.json"
    result = run("bench", "step", "--repeats", "1", "--batch-scale", "0.0625", "--models", "quick-gan",
                 "--configs", "fp32,torchao-float8,bf16,fp8", "--json", str(path))
    assert result.returncode == 0, result.stderr
    rows = {row["config"]: row for row in json.loads(path.read_text())}
    assert set(rows) == {"fp32", "bf16", "fp8"}
    from mixprec.experiments.models import Discriminator, Generator

    width = 32  # compare's quick budget
    expected = sum(p.numel() for m in (Generator(64, width), Discriminator(width)) for p in m.parameters())
    assert rows["fp32"]["parameters"] == expected
    # Adam's two FP32 moments per parameter, and a step count per tensor
    assert rows["fp32"]["optimizer_bytes"] == pytest.approx(8 * expected, rel=1e-3)
    assert rows["fp32"]["x_fp32"] == 1.0 and rows["fp8"]["ms"] > 0
    # bf16: a 2-byte rounded copy of each weight beside the FP32 masters; fp8: 1 byte
    assert rows["bf16"]["param_bytes"] > rows["fp8"]["param_bytes"] > rows["fp32"]["param_bytes"]


def test_bench_step_times_the_mlp_against_torchao_and_says_whether_bf16_is_native(tmp_path):
    path = tmp_path / "step.json"
    result = run("bench", "step", "--repeats", "1", "--batch-scale", "0.0625", "--models", "mlp",
                 "--configs", "fp32,autocast-bf16,torchao-float8,bf16,fp8-hybrid", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert "native BF16 dot products on this CPU: " in result.stdout
    # timed with glibc's malloc keeping freed memory (mixprec.bench.timing.keep_freed_memory)
    assert "malloc=keeps freed memory" in " ".join(result.stdout.split())
    rows = json.loads(path.read_text())
    configs = [row["config"] for row in rows]
    expected = ["fp32", "autocast-bf16", "torchao-float8", "bf16", "fp8-hybrid"]
    if "skipping torchao-float8" in result.stdout:  # torchao is an optional peer
        expected.remove("torchao-float8")
    assert configs == expected
    assert {"model", "config", "ms", "x_fp32", "param_bytes", "saved_bytes", "bytes_per_parameter"} <= set(rows[0])
    assert all(row["model"] == "mlp" and row["ms"] > 0 for row in rows)


def test_bench_step_skips_torchao_where_it_does_not_import(monkeypatch):
    from mixprec.bench import step_speed

    monkeypatch.setattr(step_speed, "torchao_float8_available", lambda: "torchao.float8 does not import")
    rows = step_speed.run_step_bench(models=["mlp"], configs=["fp32", "torchao-float8"], repeats=1,
                                     batch_scale=0.0625)
    assert [row.config for row in rows] == ["fp32"]


def test_bench_step_times_compiled_models_and_refuses_unknown_configs():
    from mixprec.bench import step_speed

    rows = step_speed.run_step_bench(models=["mlp"], configs=["fp32", "fp8-hybrid", "fp8-hybrid+compile"],
                                     repeats=1, batch_scale=0.0625)
    assert [row.config for row in rows] == ["fp32", "fp8-hybrid", "fp8-hybrid+compile"]
    assert rows[2].ms > 0 and rows[2].saved_bytes == rows[1].saved_bytes  # bytes: the eager model's
    assert step_speed.is_config("mxfp8+compile") and not step_speed.is_config("mxfp9+compile")
    result = run("bench", "step", "--models", "mlp", "--configs", "fp32,bf17+compile")
    assert result.returncode == 2 and "bf17+compile" in result.stdout


def test_bench_step_times_the_quick_compare_transformer_when_asked():
    """``quick-transformer`` is compare's quick-budget character GPT (its sizes, AdamW),
    timed only when asked for."""
    from mixprec.bench import step_speed
    from mixprec.experiments.models import CharGPT
    from mixprec.experiments.runner import BUDGETS

    assert "quick-transformer" in step_speed.MODELS and "quick-transformer" not in step_speed.DEFAULT_MODELS
    budget = BUDGETS["quick"]["transformer"]
    model = step_speed.quick_transformer()
    assert isinstance(model, CharGPT) and len(model.blocks) == budget.layers
    rows = step_speed.run_step_bench(models=["quick-transformer"], configs=["fp32", "fp8"], repeats=1,
                                     batch_scale=0.125)
    assert [(row.model, row.config) for row in rows] == [("quick-transformer", "fp32"), ("quick-transformer", "fp8")]
    assert rows[0].parameters == sum(p.numel() for p in model.parameters())
    assert rows[1].saved_bytes < rows[0].saved_bytes  # FP8 copies saved for backward, not FP32 ones
