"""Stochastic rounding: always a grid neighbour, unbiased within a stated bound in the
normal and subnormal ranges, reproducible with a generator, defined at overflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixprec
from mixprec.core import formats
from tests.reference import grid_neighbours, same_values

DRAWS = 200_000  # >= 10**5 draws per value


@given(values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False,
                                 min_value=-3e4, max_value=3e4), min_size=1, max_size=64),
       name=st.sampled_from(["bf16", "fp16", "e5m2", "e4m3", "e3m2"]))
def test_result_is_always_a_grid_neighbour(values, name):
    fmt = formats.get(name)
    x = torch.tensor(values, dtype=torch.float32)
    x = x.clamp(-fmt.largest, fmt.largest)  # overflow is tested apart
    q = mixprec.quantize(x, fmt, "stochastic")
    lo, hi = grid_neighbours(x.numpy(), fmt)
    magnitude = np.abs(q.numpy().astype(np.float64))
    assert np.all((magnitude == lo) | (magnitude == hi)), (x, q)
    assert np.all((np.sign(q.numpy()) == np.sign(x.numpy())) | (q.numpy() == 0))


def unbiased_case(name: str, where: str) -> float:
    """A value strictly between two grid points, in the normal or subnormal range."""
    fmt = formats.get(name)
    if where == "normal":
        return float(np.float32(1.0 + 0.3 * fmt.epsilon) * 8)
    if where == "subnormal":
        return float(np.float32(fmt.smallest_subnormal * 2.37))
    return float(np.float32(fmt.smallest_subnormal * 0.013))  # "flush": below the smallest subnormal


@pytest.mark.parametrize("where", ["normal", "subnormal", "flush"])
@pytest.mark.parametrize("name", ["bf16", "fp16", "e5m2", "e4m3"])
def test_mean_is_the_input_within_four_standard_errors(backend, name, where):
    fmt = formats.get(name)
    value = unbiased_case(name, where)
    x = torch.full((DRAWS,), value, dtype=torch.float32)
    q = mixprec.quantize(x, fmt, "stochastic").double()
    lo, hi = (float(v[0]) for v in grid_neighbours(np.array([value], dtype=np.float32), fmt))
    assert set(q.unique().tolist()) <= {lo, hi}
    p_up = (value - lo) / (hi - lo)
    share_up = (q == hi).double().mean().item()
    standard_error = math.sqrt(p_up * (1 - p_up) / DRAWS)
    assert abs(share_up - p_up) < 4 * standard_error, (share_up, p_up, standard_error)
    # the mean of the rounded values is the input, within the same bound
    assert abs(q.mean().item() - value) < 4 * standard_error * (hi - lo)


def test_mean_over_a_whole_spread_of_values_is_unbiased():
    x = torch.randn(DRAWS) * 0.01
    rounded = mixprec.quantize(x, "e5m2", "stochastic")
    nearest = mixprec.quantize(x, "e5m2")
    # stochastic error averages out; nearest's does not on this skewed-magnitude data
    spacing = (x.abs() * 0.25).mean().item()
    assert abs((rounded - x).double().mean().item()) < 4 * spacing / math.sqrt(DRAWS)
    assert not torch.equal(rounded, nearest)


def test_values_on_the_grid_never_move():
    x = mixprec.quantize(torch.randn(1 << 16) * 100, "e4m3")
    assert torch.equal(mixprec.quantize(x, "e4m3", "stochastic"), x)


def test_reproducible_with_a_generator(backend):
    x = torch.randn(1 << 16)
    first = mixprec.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(3))
    again = mixprec.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(3))
    other = mixprec.quantize(x, "e5m2", "stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_successive_calls_draw_fresh_bits():
    x = torch.full((1 << 16,), 1.0 + 2**-4)  # halfway in e5m2's first binade step
    generator = torch.Generator().manual_seed(0)
    a = mixprec.quantize(x, "e5m2", "stochastic", generator=generator)
    b = mixprec.quantize(x, "e5m2", "stochastic", generator=generator)
    up_a, up_b = (a > 1.0).float(), (b > 1.0).float()
    correlation = torch.corrcoef(torch.stack([up_a, up_b]))[0, 1].abs().item()
    assert correlation < 4 / math.sqrt(x.numel())


def test_default_generator_follows_manual_seed():
    x = torch.randn(4096)
    torch.manual_seed(9)
    first = mixprec.quantize(x, "e4m3", "stochastic")
    torch.manual_seed(9)
    assert torch.equal(mixprec.quantize(x, "e4m3", "stochastic"), first)


def test_overflow_boundary_follows_saturate(backend):
    fmt = formats.e5m2
    # halfway between the largest value (57344) and the next, virtual, grid point 65536
    x = torch.full((DRAWS,), 61440.0)
    default = mixprec.quantize(x, fmt, "stochastic")
    assert set(default.unique().tolist()) == {57344.0, math.inf}
    share_inf = torch.isinf(default).double().mean().item()
    assert abs(share_inf - 0.5) < 4 * math.sqrt(0.25 / DRAWS)
    saturated = mixprec.quantize(x, fmt, "stochastic", saturate=True)
    assert saturated.unique().tolist() == [57344.0]
    e4m3 = mixprec.quantize(torch.full((1000,), 470.0), "e4m3", "stochastic")
    assert e4m3.unique().tolist() == [448.0]  # e4m3 saturates by default


def test_specials_pass_through():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    q = mixprec.quantize(x, "fp16", "stochastic")
    assert same_values(q, x).all()


def test_stochastic_with_scale_is_round_of_scaled_values():
    x = torch.randn(1 << 14) * 1000
    scale = torch.tensor(4.0)
    generator = torch.Generator().manual_seed(1)
    scaled = mixprec.quantize(x, "e4m3", "stochastic", scale=scale, generator=generator)
    generator = torch.Generator().manual_seed(1)
    direct = mixprec.quantize(x / 4.0, "e4m3", "stochastic", generator=generator) * 4.0
    assert torch.equal(scaled, direct)
