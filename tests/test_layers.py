"""mixprec.layers: with FP32 formats the converted layers compute what torch's own do
(so the low-precision versions differ only by their roundings); with low-precision
formats their weights live in 16-bit storage on the format's grid."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixprec
from mixprec.recipe import Recipe

# every tensor class FP32, but a BF16 master, so convert does swap the layers
FP32_FORMATS = Recipe("fp32-formats", master="bf16")


def converted_copy(module: nn.Module, recipe) -> nn.Module:
    wrapped = nn.Sequential(copy.deepcopy(module))
    summary = mixprec.convert(wrapped, recipe)
    assert summary.converted, summary
    return wrapped


def test_lstm_matches_torch_with_fp32_formats():
    lstm = nn.LSTM(12, 16, num_layers=2, batch_first=True)
    ours = converted_copy(lstm, FP32_FORMATS)
    x = torch.randn(3, 7, 12)
    h0 = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    want, (want_h, want_c) = lstm(x, h0)
    got, (got_h, got_c) = ours[0](x, h0)
    for a, b in ((got, want), (got_h, want_h), (got_c, want_c)):
        assert torch.allclose(a, b, atol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for name, param in lstm.named_parameters():
        assert torch.allclose(getattr(ours[0], name).grad, param.grad, atol=1e-4), name


def test_multihead_attention_matches_torch_with_fp32_formats():
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    ours = converted_copy(attention, FP32_FORMATS)
    x = torch.randn(2, 9, 32)
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -2:] = True
    want, _ = attention(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)
    got, weights = ours[0](x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)
    assert weights is None
    assert torch.allclose(got, want, atol=1e-5)
    cross, _ = ours[0](x, x.flip(1), x.flip(1), need_weights=False)
    want_cross, _ = attention(x, x.flip(1), x.flip(1), need_weights=False)
    assert torch.allclose(cross, want_cross, atol=1e-5)


def test_attention_refuses_to_return_weights():
    ours = converted_copy(nn.MultiheadAttention(8, 2), FP32_FORMATS)
    x = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="need_weights=False"):
        ours[0](x, x, x, need_weights=True)


@pytest.mark.parametrize(("recipe", "dtype", "fmt"), [("fp16", torch.float16, "fp16"), ("fp8", torch.float16, "e5m2"),
                                                      ("bf16", torch.bfloat16, "bf16")])
def test_weights_are_16_bit_and_on_the_grid(recipe, dtype, fmt):
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 2, 3), nn.Embedding(5, 4), nn.LSTM(4, 4))
    mixprec.convert(model, recipe)
    for name, param in model.named_parameters():
        assert param.dtype == dtype, name
        assert torch.equal(mixprec.quantize(param.float(), fmt), param.float()), name


def test_state_dict_keys_are_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, num_layers=2), nn.MultiheadAttention(4, 2))
    keys = set(model.state_dict())
    mixprec.convert(model, "fp16")
    assert set(model.state_dict()) == keys
