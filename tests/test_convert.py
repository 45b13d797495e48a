"""mixprec.convert: what it replaces, keeps and warns about; tied weights stay tied;
misuse is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec
from mixprec.layers import LowPrecisionConv, LowPrecisionLinear


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_summary_lists_converted_and_fp32_islands():
    model = small_cnn()
    summary = mixprec.convert(model, "fp16")
    assert summary.converted == [("0", "Conv2d"), ("4", "Linear")]
    assert summary.kept_fp32 == [("1", "BatchNorm2d")]
    assert isinstance(model[0], LowPrecisionConv) and isinstance(model[4], LowPrecisionLinear)
    assert model[1].weight.dtype == torch.float32
    assert "Conv2d" in str(summary)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_unsupported_layers_with_parameters_are_named_in_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Conv2d(1, 1, 2, padding_mode="reflect"))
    with pytest.warns(RuntimeWarning, match=r"PReLU.*Conv2d.*padding_mode"):
        summary = mixprec.convert(model, "bf16")
    assert [name for name, _, _ in summary.unsupported] == ["1", "2"]


def test_tied_weights_stay_tied():
    model = Tied()
    summary = mixprec.convert(model, "fp16")
    assert model.head.weight is model.embed.weight
    assert len(summary.param_pairs) == 1


def test_filter_keeps_chosen_layers_fp32():
    model = small_cnn()
    mixprec.convert(model, "fp16", module_filter_fn=lambda module, name: name != "4")
    assert isinstance(model[4], nn.Linear) and not isinstance(model[4], LowPrecisionLinear)


def test_fp32_recipe_changes_nothing():
    model = small_cnn()
    summary = mixprec.convert(model, "fp32")
    assert not summary.converted and isinstance(model[0], nn.Conv2d)


def test_misuse():
    model = small_cnn()
    mixprec.convert(model, "fp16")
    with pytest.raises(ValueError, match="already converted"):
        mixprec.convert(model, "fp16")
    with pytest.raises(ValueError, match="wrap it"):
        mixprec.convert(nn.Linear(2, 2), "fp16")
    with pytest.raises(ValueError, match="unknown recipe"):
        mixprec.convert(small_cnn(), "fp12")
