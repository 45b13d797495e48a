"""mixprec.recipe: the named recipes say what the papers say, and bad recipes fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mixprec.recipe import RECIPES, Recipe, TensorFormat, get_recipe
from mixprec.scaling import DynamicScaling


def test_fp16_is_paper_one():
    recipe = get_recipe("fp16")
    assert {recipe.weight.format, recipe.activation.format, recipe.error.format,
            recipe.weight_grad.format} == {"fp16"}
    assert recipe.master == "fp32"
    assert recipe.loss_scale == DynamicScaling()  # torch.amp's defaults
    assert recipe.loss_scale.init_scale == 2.0**16 and recipe.loss_scale.growth_interval == 2000
    assert recipe.param_dtype == torch.float16


def test_fp8_is_paper_two():
    recipe = get_recipe("fp8")
    assert recipe.weight.format == recipe.activation.format == "e5m2"
    assert recipe.error.rounding == recipe.weight_grad.rounding == recipe.update_rounding == "stochastic"
    assert recipe.activation.rounding == "nearest"
    assert recipe.master == "fp16"
    assert recipe.loss_scale.min_scale_schedule  # enhanced loss scaling
    assert recipe.param_dtype == torch.float16  # holds every e5m2 value exactly


def test_hybrid_and_bf16():
    hybrid = get_recipe("fp8-hybrid")
    assert (hybrid.weight.format, hybrid.error.format) == ("e4m3", "e5m2")
    assert hybrid.tensor_scaling is not None and hybrid.param_dtype == torch.bfloat16
    bf16 = get_recipe("bf16")
    assert bf16.loss_scale is None and bf16.param_dtype == torch.bfloat16
    assert get_recipe("fp32").is_fp32 and not bf16.is_fp32


def test_recipes_are_frozen_and_varied_by_replace():
    recipe = get_recipe("fp16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.master = "fp16"  # type: ignore[misc]
    variant = recipe.replace(name="fp16-static", loss_scale=128.0)
    assert variant.loss_scale == 128.0 and RECIPES["fp16"].loss_scale == DynamicScaling()


def test_misspelt_recipe_lists_the_names():
    with pytest.raises(ValueError, match="fp32, fp16, bf16, fp8, fp8-hybrid"):
        get_recipe("fp61")


def test_bad_fields():
    with pytest.raises(ValueError, match="unknown format"):
        TensorFormat("e9m9x")
    with pytest.raises(ValueError, match="rounding"):
        TensorFormat("fp16", "up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="master weights"):
        Recipe("x", master="e5m2")


def test_ablations_drop_one_ingredient_each():
    from mixprec.recipe import ABLATIONS

    assert get_recipe("fp16-noscale").loss_scale is None
    nomaster = get_recipe("fp16-nomaster")
    assert nomaster.master == "fp16" and nomaster.update_rounding == "nearest"
    rne = get_recipe("fp8-rne")
    assert (rne.error.rounding, rne.weight_grad.rounding, rne.update_rounding) == ("nearest",) * 3
    assert get_recipe("fp8-nominscale").loss_scale.min_scale_schedule == ()
    for name, recipe in ABLATIONS.items():
        assert recipe.name == name
