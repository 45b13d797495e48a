"""mixprec.core.block_quantize: MX against torchao's ``to_mx`` and an independent numpy
reference of the OCP formula, NVFP4 against torchao's ``nvfp4_quantize``, 2-D tiles and
both axes, results on the grid, NaN/Inf/zero blocks, stochastic rounding, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.core.block_quantize import quantize_blocks
from mixprec.core.formats import blocks
from tests.reference import assert_same, reference_round

torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale  # noqa: E402

MX = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]
TORCHAO_ELEMENT = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2,
                   "mxfp6_e3m2": "fp6_e3m2", "mxfp6_e2m3": "fp6_e2m3",
                   "mxfp4_e2m1": torch.float4_e2m1fn_x2}


def spread(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Values whose magnitudes span many binades, block to block and within a block, but
    stay where torchao and the spec agree (block amax well above 2**-100)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    binades = torch.randint(-30, 30, (rows, cols // 16, 1), generator=generator).float()
    return (x.view(rows, cols // 16, 16) * torch.exp2(binades)).view(rows, cols)


def torchao_mx_dequantized(x: torch.Tensor, name: str, mode: ScaleCalculationMode) -> torch.Tensor:
    mx = torchao_mx.MXTensor.to_mx(x, TORCHAO_ELEMENT[name], 32, scaling_mode=mode)
    return mx.dequantize(torch.float32)


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("rule", ["floor", "rceil", "ceil", "even"])
def test_mx_matches_torchao(backend, name, rule):
    x = spread(64, 512, seed=len(name) + len(rule))
    fmt = blocks.get(name).with_rule(rule)
    want = torchao_mx_dequantized(x, name, ScaleCalculationMode(rule))
    assert_same(mixprec.quantize(x, fmt), want, x, f"{name}:{rule} vs torchao")


def numpy_mx_reference(x: np.ndarray, name: str) -> np.ndarray:
    """OCP MX v1.0 section 6.3 in float64: X = 2**(floor(log2(amax)) - emax_elem), clamped
    to E8M0's exponents; elements RNE(x / X) clamped to the element's largest; NaN or
    Inf in a block makes the block NaN."""
    fmt = blocks.get(name)
    elem = fmt.element
    blocks_ = x.astype(np.float64).reshape(-1, 32)
    out = np.empty_like(blocks_)
    for i, block in enumerate(blocks_):
        amax = np.max(np.abs(block))
        if not np.isfinite(amax):
            out[i] = np.nan
            continue
        exponent = -127 if amax == 0 else int(np.floor(np.log2(amax))) - elem.max_exponent
        scale = 2.0 ** max(-127, min(127, exponent))
        scaled = torch.from_numpy((block / scale).astype(np.float32))
        out[i] = reference_round(scaled, elem, "saturate").numpy().astype(np.float64) * scale
    return out.reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("name", MX)
def test_mx_matches_the_spec_formula(name):
    x = spread(8, 256, seed=5)
    x[0, 3] = float("nan")
    x[1, 40] = -float("inf")
    x[2, 64:96] = 0.0
    x[3, :32] = torch.tensor(2.0**-130)  # a block at E8M0's smallest scale
    want = torch.from_numpy(numpy_mx_reference(x.numpy(), name))
    assert_same(mixprec.quantize(x, name), want, x, f"{name} vs the spec's formula")


@pytest.mark.parametrize("name", MX + ["nvfp4", "fp8_block128"])
def test_nan_or_inf_poisons_only_its_block_and_zero_blocks_stay_zero(backend, name):
    fmt = blocks.get(name)
    n = fmt.block_size
    x = torch.randn(4 * n) + 1.0
    x[1] = float("nan")
    x[n + 2] = float("inf")
    x[2 * n:3 * n] = 0.0
    q = mixprec.quantize(x, name)
    assert torch.isnan(q[:2 * n]).all()
    assert torch.equal(q[2 * n:3 * n], torch.zeros(n))
    assert torch.isfinite(q[3 * n:]).all()


@pytest.mark.parametrize("name", MX)
def test_mx_results_lie_on_the_grid(name):
    fmt = blocks.get(name)
    x = spread(16, 256, seed=9)
    parts = mixprec.core.block_quantize.block_parts(x, fmt)
    mantissa, _ = torch.frexp(parts.scales)
    assert (mantissa == 0.5).all()  # every scale a power of two
    elements = parts.elements
    assert_same(mixprec.quantize(elements, fmt.element, saturate=True), elements, elements, "elements")
    assert elements.abs().max() <= fmt.element.largest
    assert_same(parts.dequantize(), mixprec.quantize(x, fmt), x, "parts vs quantize")


def test_nvfp4_matches_torchao_two_level(backend):
    x = spread(64, 512, seed=3)
    x[5, 7] *= 1e4  # one large value sets the tensor scale
    per_tensor = per_tensor_amax_to_scale(x.abs().amax())
    scales, packed = nvfp4_quantize(x, 16, per_tensor)
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

    elements = f4_unpacked_to_f32(unpack_uint4(packed)).view(64, 32, 16)
    want = (elements * (per_tensor * scales.float()).unsqueeze(-1)).view(64, 512)
    assert_same(mixprec.quantize(x, "nvfp4"), want, x, "nvfp4 vs torchao")
    parts = mixprec.core.block_quantize.block_parts(x, blocks.nvfp4)
    assert torch.equal(parts.tensor_scale, per_tensor)
    assert torch.equal(parts.scales.reshape(64, 32), scales.float())


def test_nvfp4_tensor_amax_sets_the_second_level():
    x = spread(8, 64, seed=4)
    amax = float(x.abs().max()) * 4
    per_tensor = per_tensor_amax_to_scale(torch.tensor(amax))
    scales, packed = nvfp4_quantize(x, 16, per_tensor)
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

    elements = f4_unpacked_to_f32(unpack_uint4(packed)).view(8, 4, 16)
    want = (elements * (per_tensor * scales.float()).unsqueeze(-1)).view(8, 64)
    got = mixprec.core.block_quantize.quantize_blocks(x, blocks.nvfp4, tensor_amax=amax)
    assert_same(got, want, x, "nvfp4 with a given tensor amax")


def test_fp8_block128_is_round_of_x_times_reciprocal_amax_scale():
    x = spread(4, 256, seed=6)
    blocks_ = x.view(4, 2, 128)
    scale = blocks_.abs().amax(-1, keepdim=True) / 448.0
    want = (blocks_ * torch.reciprocal(scale)).to(torch.float8_e4m3fn).float() * scale
    assert_same(mixprec.quantize(x, "fp8_block128"), want.view(4, 256), x, "fp8_block128")


def transformer_engine_pow2_scales(amax: np.ndarray) -> np.ndarray:
    """Transformer Engine's power-of-two FP32 block scale (``Float8BlockScaling``'s
    default), in numpy float32: ``scale = 448 / amax``, its mantissa bits zeroed, and
    the dequantization scale its inverse (exact: a power of two)."""
    quotient = np.float32(448.0) / amax.astype(np.float32)
    bits = quotient.view(np.int32) & np.int32(-(1 << 23))  # sign and exponent kept
    return (np.float32(1.0) / bits.view(np.float32)).astype(np.float32)


def test_fp8_block128_rceil_has_transformer_engines_power_of_two_fp32_scales():
    x = spread(32, 256, seed=11)
    # adversarial amaxes: 448 * 2**k and its float32 neighbours, where the rules could part
    for row, k in enumerate(range(-20, 12)):
        edge = np.float32(448.0 * 2.0**k)
        neighbour = [np.nextafter(edge, np.float32(0)), edge, np.nextafter(edge, np.float32(np.inf))][row % 3]
        x[row, :128] *= float(neighbour) / float(x[row, :128].abs().max())
    fmt = blocks.get("fp8_block128:rceil")
    assert fmt.scale == mixprec.formats.fp32 and fmt.power_of_two_scales and fmt.bf16_values
    blocks_ = x.view(32, 2, 128)
    amax = blocks_.abs().amax(-1, keepdim=True)
    scale = torch.from_numpy(transformer_engine_pow2_scales(amax.numpy()))
    want = (blocks_ / scale).to(torch.float8_e4m3fn).float() * scale
    got = mixprec.quantize(x, fmt)
    assert_same(got, want.view(32, 256), x, "fp8_block128:rceil vs Transformer Engine's rule")
    assert torch.equal(got.bfloat16().float(), got)  # every value a BF16 value
    # the scales themselves, stored as FP32: powers of two
    packed = mixprec.core.block_storage.pack_blocks(x, fmt)
    assert packed.scales.dtype == torch.float32
    assert torch.equal(packed.scales.reshape(32, 2), scale.reshape(32, 2))


@pytest.mark.parametrize("name", ["nvfp4_16x16", "fp8_block128x128"])
def test_2d_tiles_equal_1d_blocks_of_the_rearranged_tiles(name):
    fmt = blocks.get(name)
    r, c = fmt.block_shape
    x = spread(2 * r, 3 * c, seed=8)
    # move each tile's r*c elements into one row, quantize with 1-D blocks of r*c
    tiles = x.view(2, r, 3, c).permute(0, 2, 1, 3).reshape(6, r * c)
    flat_fmt = blocks.BlockFormat("flat", fmt.element, (r * c,), fmt.scale, fmt.scale_rule, fmt.tensor_scale)
    want = mixprec.quantize(tiles, flat_fmt).view(2, 3, r, c).permute(0, 2, 1, 3).reshape(2 * r, 3 * c)
    assert_same(mixprec.quantize(x, fmt), want, x, f"{name} tiles")


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "nvfp4_16x16", "fp8_block128"])
def test_other_axis_equals_transposing(name):
    x = spread(256, 128, seed=2).t().contiguous().t()  # (256, 128), quantized along dim 0
    got = mixprec.quantize(x, name, axis=0 if "16x16" not in name else -2)
    want = mixprec.quantize(x.t().contiguous(), name).t()
    assert_same(got, want, x, f"{name} along axis 0")


def test_batched_and_half_inputs():
    x = spread(6, 64, seed=1).view(2, 3, 64)
    assert_same(mixprec.quantize(x, "mxfp8_e4m3"), mixprec.quantize(x.view(6, 64), "mxfp8_e4m3").view(2, 3, 64),
                x, "batched")
    half = x.bfloat16()
    assert_same(mixprec.quantize(half, "mxfp4_e2m1"), mixprec.quantize(half.float(), "mxfp4_e2m1"), x, "bf16")


def test_out_receives_block_results(backend):
    x = spread(32, 256, seed=12)
    out = torch.full_like(x, float("nan"))
    assert mixprec.quantize(x, "mxfp8_e4m3", out=out) is out
    assert_same(out, mixprec.quantize(x, "mxfp8_e4m3"), x, "out=")
    transposed_out = torch.empty(256, 32).t()
    mixprec.quantize(x, "nvfp4", out=transposed_out)
    assert_same(transposed_out, mixprec.quantize(x, "nvfp4"), x, "non-contiguous out=")


# ---- stochastic rounding -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mxfp6_e2m3", "nvfp4", "fp8_block128"])
def test_stochastic_elements_are_neighbours_and_unbiased(backend, name):
    fmt = blocks.get(name)
    n = fmt.block_size
    draws = 4096
    block = torch.linspace(-1.0, 1.0, n) * 5.3  # one block, repeated
    x = block.repeat(draws)
    q = mixprec.quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(1)).view(draws, n)
    nearest = mixprec.core.block_quantize.block_parts(block, fmt)
    scale = (nearest.scales if nearest.tensor_scale is None else nearest.tensor_scale * nearest.scales).reshape(-1)
    scaled = (block / scale.repeat_interleave(n)).numpy()
    # grid neighbours of each scaled element on the element grid
    from tests.reference import grid_neighbours

    lo, hi = grid_neighbours(scaled, fmt.element)
    lo = torch.from_numpy(np.sign(scaled) * lo).float() * scale.repeat_interleave(n)
    hi = torch.from_numpy(np.sign(scaled) * hi).float() * scale.repeat_interleave(n)
    is_neighbour = (q == lo) | (q == hi)
    assert is_neighbour.all()
    gap = (hi - lo).abs().double()
    p_up = ((block.double() - lo.double()) / (hi.double() - lo.double())).clamp(0, 1)
    standard_error = torch.sqrt(p_up * (1 - p_up) / draws) * gap
    bias = (q.double().mean(0) - block.double()).abs()
    assert (bias <= 4 * standard_error + 1e-7 * block.abs().double()).all(), (bias, standard_error)


def test_stochastic_is_reproducible_and_nearest_is_deterministic():
    x = spread(8, 256, seed=7)
    a = mixprec.quantize(x, "mxfp4_e2m1", "stochastic", generator=torch.Generator().manual_seed(3))
    b = mixprec.quantize(x, "mxfp4_e2m1", "stochastic", generator=torch.Generator().manual_seed(3))
    c = mixprec.quantize(x, "mxfp4_e2m1", "stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- errors -----------------------------------------------------------------------------


def test_a_dimension_not_a_multiple_of_the_block_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"not a multiple of the block extent 32.*Pad x with zeros"):
        mixprec.quantize(torch.ones(4, 33), "mxfp8_e4m3")


def test_2d_tiles_need_two_dimensions_and_whole_tiles():
    with pytest.raises(ValueError, match="2-D blocks"):
        mixprec.quantize(torch.ones(256), "nvfp4_16x16")
    with pytest.raises(ValueError, match="multiple of the block extent 16"):
        mixprec.quantize(torch.ones(24, 32), "nvfp4_16x16")
    with pytest.raises(ValueError, match="tiles the last two dimensions"):
        mixprec.quantize(torch.ones(16, 16, 16), "nvfp4_16x16", axis=0)


def test_unknown_block_format_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown block format 'mxfp5'.*mxfp8_e4m3, .*nvfp4"):
        blocks.get("mxfp5")
    with pytest.raises(ValueError, match=r"block formats: mxfp8_e4m3"):
        mixprec.quantize(torch.ones(32), "mxfp5")


def test_scale_and_saturate_are_refused_with_block_formats():
    with pytest.raises(ValueError, match=r"picks one scale per block.*drop scale="):
        mixprec.quantize(torch.ones(32), "mxfp4_e2m1", scale=2.0)
    with pytest.raises(ValueError, match="always clamps"):
        mixprec.quantize(torch.ones(32), "mxfp4_e2m1", saturate=True)


def test_block_format_where_a_scalar_one_is_needed():
    with pytest.raises(ValueError, match=r"'nvfp4' is a block format.*scalar element format"):
        mixprec.formats.get("nvfp4")
    with pytest.raises(ValueError, match="is a block format"):
        mixprec.scale_from_amax(torch.tensor(1.0), blocks.mxfp4_e2m1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"block_shape": (0,)}, "positive ints"), ({"scale_rule": "round"}, "unknown scale_rule"),
     ({"scale_rule": "floor", "scale": mixprec.formats.e4m3}, "needs an E8M0 scale"),
     ({"scale_rule": "amax"}, "needs a scale format with mantissa bits"),
     ({"tensor_scale": True}, "works with scale_rule='amax'")],
)
def test_inconsistent_block_formats_are_refused(kwargs, match):
    settings = {"name": "x", "element": mixprec.formats.e2m1fn, "block_shape": (32,),
                "scale": mixprec.formats.e8m0fnu, **kwargs}
    with pytest.raises(ValueError, match=match):
        blocks.BlockFormat(**settings)


def test_tensor_amax_only_for_two_level_formats():
    with pytest.raises(ValueError, match="has none"):
        mixprec.core.block_quantize.quantize_blocks(torch.ones(32), blocks.mxfp4_e2m1, tensor_amax=1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        mixprec.core.block_quantize.quantize_blocks(torch.ones(32), blocks.nvfp4, tensor_amax=math.inf)


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_16x16", "mxfp4_e2m1", "mxfp8_e4m3", "fp8_block128"])
def test_an_all_zero_tensor_quantizes_to_zeros(name: str) -> None:
    x = torch.zeros(256, 256)
    x[3, 5] = 0.0  # every block zero, NVFP4's tensor amax too
    out = mixprec.quantize(x, name)
    assert torch.equal(out, torch.zeros_like(x))
    y = torch.zeros(256, 256)
    y[0, :16] = torch.linspace(-3, 3, 16)  # one nonzero block among zero blocks
    assert bool(torch.isfinite(mixprec.quantize(y, name)).all())


# ---- the moved-grid kernel of power-of-two scales ------------------------------------------


def tiny_blocks(seed: int) -> torch.Tensor:
    """Blocks whose amax lies between 2**-152 and 2**-95 (float32 subnormals among them,
    E8M0's smallest scales, moved grids whose normal range reaches below float32's), and
    values up to 2**30 below their block's amax."""
    generator = torch.Generator().manual_seed(seed)
    top = torch.randint(-152, -95, (256, 8, 1), generator=generator).float()
    below = torch.randint(-30, 1, (256, 8, 32), generator=generator).float()
    signs = torch.randn(256, 8, 32, generator=generator).sign()
    return (signs * torch.exp2(top + below)).view(256, 256)


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("rule", ["floor", "rceil"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_moved_grid_equals_round_then_scale(backend, name, rule, rounding):
    # quantize rounds x onto each block's grid moved by X = 2**k; block_parts rounds
    # x / X and multiplies back: bit for bit the same, random bits included
    fmt = blocks.get(name).with_rule(rule)
    for x in (tiny_blocks(seed=len(name)), spread(64, 256, seed=len(rule))):
        x[0, 0] = float("nan")
        q = mixprec.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(7))
        parts = mixprec.core.block_quantize.block_parts(x, fmt, rounding, generator=torch.Generator().manual_seed(7))
        assert_same(q, parts.dequantize(), x, f"{fmt.name} {rounding}: moved grid vs round then scale")


@pytest.mark.parametrize(("name", "tensor_amax"), [("nvfp4", None), ("nvfp4", 1e-30), ("nvfp4_16x16", None),
                                                   ("fp8_block128", None)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_flushed_product_equals_the_exact_product(backend, name, tensor_amax, rounding):
    # the compiled path zeroes x under each block's flush floor before one float
    # multiply; block_parts multiplies without it (_times_block): the same bits, on
    # blocks of float32 subnormals, tiny blocks whose factor is large, and huge ones
    fmt = blocks.get(name)
    generator = torch.Generator().manual_seed(len(name))
    top = torch.randint(-150, 127, (256, 16, 1), generator=generator).float()
    below = torch.randint(-40, 1, (256, 16, 16), generator=generator).float()
    x = (torch.randn(256, 16, 16, generator=generator) * torch.exp2(top + below)).view(256, 256)
    x[1, :16] = 0.0
    x[2, 3] = float("nan")
    q = mixprec.core.block_quantize.quantize_blocks(x, fmt, rounding, generator=torch.Generator().manual_seed(2),
                                                     tensor_amax=tensor_amax)
    parts = mixprec.core.block_quantize.block_parts(x, fmt, rounding, generator=torch.Generator().manual_seed(2),
                                                    tensor_amax=tensor_amax)
    assert_same(q, parts.dequantize(), x, f"{name} {rounding}: flushed product vs exact product")


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4_e2m1", "nvfp4", "fp8_block128"])
@pytest.mark.parametrize("bits", [0x7FC00000, 0xFFFF0000, 0x7FFFFFFF, 0xFF800001])
def test_a_nan_of_any_payload_makes_its_block_nan(name, bits):
    """Every NaN bit pattern (quiet or signalling, either sign, payloads up to
    0x7FFFFFFF, whose int32 rounding would wrap) reads back as a NaN block."""
    x = torch.randn(4, 256)
    x.view(torch.int32)[1, 7] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    assert torch.isnan(x[1, 7])
    for backend in ("eager", "compiled"):
        with mixprec.core.kernels.kernel_backend(backend):
            q = mixprec.quantize(x, name)
        block = 16 if "nv" in name else 128 if "128" in name else 32
        assert torch.isnan(q[1, :block]).all(), backend
        assert torch.isfinite(q[0]).all() and torch.isfinite(q[1, block:]).all(), backend


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_values_are_the_float32_values(name: str, rounding: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-20, 20, 96)
    key = torch.tensor([5, 6], dtype=torch.int32)
    for axis in (-1, 0):
        wide = quantize_blocks(x, blocks.get(name), rounding, axis=axis, random_key=key)  # type: ignore[arg-type]
        narrow = quantize_blocks(x, blocks.get(name), rounding, axis=axis, random_key=key, dtype=torch.bfloat16)  # type: ignore[arg-type]
        assert narrow.dtype == torch.bfloat16 and narrow.shape == x.shape
        assert torch.equal(narrow.float(), wide)


def test_bf16_values_refused_where_they_would_round() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="not all BF16 values"):
        quantize_blocks(x, blocks.get("nvfp4"), dtype=torch.bfloat16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not all BF16 values"):
        quantize_blocks(x, blocks.get("fp8_block128"), dtype=torch.bfloat16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without out"):
        quantize_blocks(x, blocks.get("mxfp8_e4m3"), dtype=torch.bfloat16, out=torch.empty(4, 32))  # type: ignore[arg-type]


def test_many_variants_of_one_kernel_all_compile() -> None:
    """Each scale rule and input dtype of a block kernel compiles as a variant of its own:
    one compiled function for all twelve would pass dynamo's limit of 8 recompilations,
    after which it refuses to compile (an error under the "compiled" backend, eager
    for good under "auto")."""
    from mixprec.core.kernels import kernel_backend

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 64)  # FP16's range
    with kernel_backend("compiled"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rule in ("floor", "ceil", "even", "rceil"):
                fmt = blocks.get("mxfp8_e4m3").with_rule(rule)
                want = quantize_blocks(x.to(dtype).float(), fmt)
                assert torch.equal(quantize_blocks(x.to(dtype), fmt), want), (dtype, rule)
