"""mixprec.core.block_quantize.block_counts: values flushed, subnormal and clipped in their
blocks, against a float64 numpy reference (the OCP formula for the MX scales; the
quantizer's own scales for the amax rules), on crafted blocks and on random tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixprec.core.block_quantize import block_counts, block_parts
from mixprec.core.formats import blocks
from tests.reference import reference_round

MX_FLOOR = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]


def classify(x: np.ndarray, scaled: np.ndarray, fmt: blocks.BlockFormat) -> tuple[int, int, int]:
    """(flushed, subnormal, clipped) of float32 ``scaled`` (x over its block scale, NaN
    in bad blocks), each rounded to nearest even in float64 with no saturation."""
    rounded = reference_round(torch.from_numpy(scaled.astype(np.float32)), fmt.element, "inf").numpy()
    rounded = rounded.astype(np.float64)
    flushed = int(((rounded == 0) & (x != 0)).sum())
    subnormal = int(((np.abs(rounded) > 0) & (np.abs(rounded) < fmt.element.smallest_normal)).sum())
    clipped = int(np.isinf(rounded).sum())
    return flushed, subnormal, clipped


def spec_counts(x: np.ndarray, fmt: blocks.BlockFormat) -> tuple[int, int, int]:
    """OCP MX v1.0's floor rule in float64: X = 2**(floor(log2 amax) - emax), clamped to
    E8M0's exponents; a block with NaN or Inf counts in nothing."""
    n = fmt.block_size
    rows = x.astype(np.float64).reshape(-1, n)
    amax = np.abs(rows).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))), -127.0)
        exponent = np.clip(exponent - fmt.element.max_exponent, -127, 127)
        scaled = np.where(np.isfinite(amax), rows / 2.0**exponent, np.nan)
    return classify(rows, scaled, fmt)


def scale_counts(x: torch.Tensor, fmt: blocks.BlockFormat) -> tuple[int, int, int]:
    """The same counts with the scales block_parts reports, each value multiplied by its
    block's factor in float32 as the quantizer does (``1 / X``, NVFP4 ``(1 / s) / X``)."""
    parts = block_parts(x, fmt)
    x4 = x.reshape(parts.elements.shape).numpy()
    scales = parts.scales.numpy()
    one = np.float32(1.0)
    if fmt.scale_rule == "amax":
        inverse = one if parts.tensor_scale is None else one / np.float32(parts.tensor_scale.item())
        with np.errstate(divide="ignore"):
            factor = (inverse / scales).astype(np.float32)
        scaled = (x4 * factor).astype(np.float32)
    else:
        scaled = (x4 / scales).astype(np.float32)  # exact: powers of two
    return classify(x4, scaled, fmt)


def got(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    counts = block_counts(x, blocks.get(name))
    return counts.flushed, counts.subnormal, counts.clipped


@pytest.mark.parametrize("k", [-20, -3, 0, 5, 40])
def test_an_e2m1_block_whose_amax_is_7_5_times_a_power_of_two_clips(k: int) -> None:
    unit = 2.0**k
    x = torch.full((3, 32), 2.0 * unit)
    x[0, 0] = 7.5 * unit  # X = 2**k: 7.5 rounds past 6, saturates
    x[1, 0] = 6.5 * unit  # X = 2**k: 6.5 rounds to 6 anyway, saturation changes nothing
    x[2, 0] = -7.0 * unit  # the tie rounds to even (8): past 6, clipped
    assert got(x, "mxfp4_e2m1") == (0, 0, 2) == spec_counts(x.numpy(), blocks.mxfp4_e2m1)
    assert got(x, "mxfp4_e2m1:rceil")[2] == 0  # a scale rounded up clips nothing


def test_tiny_values_beside_a_large_one_flush() -> None:
    x = torch.zeros(2, 32)
    x[0, :8] = torch.tensor([4.0, 0.25, -0.25, 0.2500001, 0.1, 1e-30, 0.75, -0.5])  # X = 1
    x[1, :3] = torch.tensor([1.0, 2.0**-30, 0.0])
    # 0.25 (a tie), 0.1, 1e-30 and 2**-30 flush; 0.2500001 and -0.5 are the subnormal 0.5;
    # 0.75 is 1.0 (normal, tie to even)
    flushed, subnormal, clipped = got(x, "mxfp4_e2m1")
    assert (flushed, subnormal, clipped) == (5, 2, 0) == spec_counts(x.numpy(), blocks.mxfp4_e2m1)
    counts = block_counts(x, blocks.mxfp4_e2m1)
    assert counts.numel == 64 and counts.nonzero == 10


def test_bad_and_zero_blocks_count_in_nothing() -> None:
    x = torch.full((4, 32), 1e-3)
    x[0, 0] = 60.0  # a clipping block, poisoned by a NaN
    x[0, 1] = float("nan")
    x[1, 0] = float("inf")
    x[2] = 0.0
    counts = block_counts(x, blocks.mxfp4_e2m1)
    assert (counts.flushed, counts.subnormal, counts.clipped) == (0, 0, 0)
    assert counts.nonzero == 96


def spread(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    binades = torch.randint(-30, 30, (rows, cols // 16, 1), generator=generator).float()
    x = (x.view(rows, cols // 16, 16) * torch.exp2(binades)).view(rows, cols)
    x[torch.rand(rows, cols, generator=generator) < 0.05] *= 2.0**-12  # values far below their block's amax
    return x


@pytest.mark.parametrize("name", MX_FLOOR)
def test_mx_counts_match_the_spec_formula(name: str) -> None:
    x = spread(32, 256, seed=len(name))
    x[3, :32] = torch.tensor(2.0**-130)  # a block at E8M0's smallest scale
    x[4, 5] = float("nan")
    fmt = blocks.get(name)
    want = spec_counts(x.numpy(), fmt)
    assert got(x, name) == want
    assert want[0] > 0  # the crafted spread flushes some in every format


@pytest.mark.parametrize("name", ["mxfp8_e4m3:rceil", "mxfp4_e2m1:ceil", "mxfp6_e2m3:even", "nvfp4",
                                  "nvfp4_16x16", "fp8_block128", "fp8_block128x128"])
def test_counts_match_the_quantizers_own_scales(name: str) -> None:
    x = spread(128, 256, seed=len(name))
    x[7, 100] *= 1e4  # one value sets NVFP4's tensor scale
    fmt = blocks.get(name)
    assert got(x, name) == scale_counts(x, fmt)


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp8_e4m3:rceil", "nvfp4", "fp8_block128"])
def test_flushed_are_the_nonzero_values_block_parts_rounds_to_zero(name: str) -> None:
    x = spread(16, 256, seed=11)
    parts = block_parts(x, blocks.get(name))
    elements = parts.elements.reshape(x.shape)
    counts = block_counts(x, blocks.get(name))
    assert counts.flushed == int(((elements == 0) & (x != 0)).sum())
    largest = blocks.get(name).element.largest
    assert counts.clipped <= int((elements.abs() == largest).sum())


def test_counts_follow_the_axis_and_refuse_partial_blocks() -> None:
    x = spread(64, 256, seed=2)
    assert block_counts(x.t(), blocks.mxfp4_e2m1, axis=0) == block_counts(x, blocks.mxfp4_e2m1)
    with pytest.raises(ValueError, match="not a multiple"):
        block_counts(torch.ones(3, 20), blocks.mxfp4_e2m1)
