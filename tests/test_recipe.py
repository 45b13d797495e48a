"""Recipes: per-operand formats, the named recipes' meaning, and bad input."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.recipe import ABLATIONS, RECIPES, Gemm, Operand, Recipe, TensorScaling, get_recipe


def test_named_recipes_keep_their_meaning() -> None:
    fp16, bf16, fp8, hybrid = (RECIPES[n] for n in ("fp16", "bf16", "fp8", "fp8-hybrid"))
    assert fp16.forward == fp16.dgrad == fp16.wgrad == Gemm.uniform("fp16")
    assert fp16.master_fmt.name == "fp32" and fp16.compute == torch.float16 and fp16.loss_scale is not None
    assert bf16.forward.result.format == "bf16" and bf16.loss_scale is None
    # paper 2: E5M2 everywhere, errors and gradients stochastic, FP16 master, SR update
    assert {op.format for g in (fp8.forward, fp8.dgrad, fp8.wgrad) for op in (g.left, g.right, g.result)} == {"e5m2"}
    assert fp8.dgrad.left.rounding == fp8.wgrad.result.rounding == "stochastic"
    assert fp8.forward.left.rounding == "nearest"
    assert fp8.master_fmt.name == "fp16" and fp8.update_rounding == "stochastic"
    # Transformer Engine's default: E4M3 input and weight, E5M2 gradients, BF16 results, scaled
    assert hybrid.forward.left.format == hybrid.forward.right.format == "e4m3"
    assert hybrid.dgrad.left.format == hybrid.wgrad.left.format == "e5m2"
    assert hybrid.forward.result.format == hybrid.dgrad.result.format == "bf16"
    assert hybrid.forward.left.scaling == TensorScaling("delayed", history=16)
    assert fp8.keep.embeddings and fp8.keep.output_head and not fp16.keep.embeddings
    assert RECIPES["fp32"].is_fp32 and not fp16.is_fp32


def test_ablations_drop_one_ingredient_each() -> None:
    assert ABLATIONS["fp16-noscale"].loss_scale is None
    assert ABLATIONS["fp16-nomaster"].master_fmt.name == "fp16"
    assert ABLATIONS["fp8-rne"].dgrad.left.rounding == "nearest" and ABLATIONS["fp8-rne"].update_rounding == "nearest"
    assert ABLATIONS["fp8-nominscale"].loss_scale.min_scale_schedule == ()


def test_lookup_and_bad_input() -> None:
    assert get_recipe(" FP16 ") is RECIPES["fp16"]
    assert get_recipe(RECIPES["bf16"]) is RECIPES["bf16"]
    with pytest.raises(ValueError, match="unknown recipe 'fp9'.*named recipes: fp32, fp16"):
        get_recipe("fp9")
    with pytest.raises(TypeError, match="a recipe is a name"):
        get_recipe(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown format"):
        Operand("e4m3x")
    with pytest.raises(ValueError, match="rounding must be"):
        Operand("fp16", "truncate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="master weights must be"):
        Recipe("bad", master="e5m2")
    with pytest.raises(ValueError, match="compute_dtype must be"):
        Recipe("bad", compute_dtype="e4m3")
    with pytest.raises(ValueError, match="scaling mode"):
        TensorScaling("sometimes")  # type: ignore[arg-type]


def test_a_custom_recipe_runs() -> None:
    recipe = Recipe("e3m4-inputs", forward=Gemm(Operand("e3m4"), Operand("bf16"), Operand("bf16")),
                    compute_dtype="bf16")
    model = mixprec.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), recipe)
    assert model(torch.randn(2, 4)).dtype == torch.bfloat16
