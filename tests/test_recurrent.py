"""mixprec.recurrent: the fused LSTM recurrence computes what a chain of per-step
low-precision linears computes (the implementation it replaced), roundings included."""

from __future__ import annotations

import pytest
import torch

from mixprec import ops
from mixprec.recipe import get_recipe
from mixprec.recurrent import lstm_recurrence


def per_step_reference(projected, h, c, weight, bias, rounder):
    """The recurrence as separate autograd nodes: a rounded linear per step."""
    outputs = []
    for projected_step in projected.unbind(0):
        gates = projected_step + ops.linear(h, weight, bias, rounder, weight_is_fp32=True)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def grid_weight(recipe, shape, seed):
    rounder = ops.Rounder(recipe)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 0.3
    return rounder.round(values, recipe.weight, "w")[0]


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8", "fp8-hybrid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_recurrence_matches_per_step_linears(name, seed):
    recipe = get_recipe(name)
    steps, batch, hidden = 6, 3, 8
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(steps, batch, 4 * hidden, generator=generator) * 2
    h0 = torch.randn(batch, hidden, generator=generator)
    c0 = torch.randn(batch, hidden, generator=generator)
    weight = grid_weight(recipe, (4 * hidden, hidden), seed)
    bias = grid_weight(recipe, (4 * hidden,), seed + 10)
    upstream = torch.randn(steps, batch, hidden, generator=generator) * 4
    upstream_h, upstream_c = torch.randn(2, batch, hidden, generator=generator)

    results = []
    for fn in (lstm_recurrence, per_step_reference):
        leaves = [t.clone().requires_grad_() for t in (projected, h0, c0, weight, bias)]
        rounder = ops.Rounder(recipe, torch.Generator().manual_seed(7))
        out, h, c = fn(*leaves, rounder)
        ((out * upstream).sum() + (h * upstream_h).sum() + (c * upstream_c).sum()).backward()
        results.append(((out, h, c), [leaf.grad for leaf in leaves]))
    (fused_out, fused_grads), (ref_out, ref_grads) = results
    for got, want in zip(fused_out, ref_out):
        assert torch.equal(got, want)  # the same operations in the same order
    # backward sums in another order, and a last-bit difference can move a rounding by
    # one step of the error format: compare to that format's precision
    tolerance = 2.0 ** -recipe.error.fmt.mantissa_bits * 4
    for got, want, name_ in zip(fused_grads, ref_grads, ("projected", "h0", "c0", "weight", "bias")):
        assert got is not None, name_
        scale = want.abs().max()
        assert scale > 0, name_
        assert (got - want).abs().max() <= tolerance * scale, name_


def test_recurrence_rejects_a_misshapen_projection():
    recipe = get_recipe("fp16")
    weight = torch.zeros(32, 8)
    with pytest.raises(ValueError, match="4 \\* hidden"):
        lstm_recurrence(torch.zeros(5, 2, 16), torch.zeros(2, 8), torch.zeros(2, 8), weight, None, ops.Rounder(recipe))
