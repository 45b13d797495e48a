"""The native amax-scale block kernel (mixprec.core.native) against the eager torch kernels
it replaces: the same bits on adversarial inputs, every path through it (block widths
as constants and not, 2-D tiles, BF16 input, two-level scaling with and without a given
tensor amax, unscaled values, streamed stores, one and two threads), and the fallback
where it cannot be built."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.bench.quantize_speed import bench_input
from mixprec.core import formats, native
from mixprec.core.block_quantize import quantize_blocks, quantize_blocks_factored
from mixprec.core.kernels import kernel_backend

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernel")

AMAX_FORMATS = [
    formats.resolve("nvfp4"),
    formats.resolve("nvfp4_16x16"),
    formats.resolve("fp8_block128"),
    formats.resolve("fp8_block128x128"),
    # a block width the kernel does not specialise (a loop over columns), E5M2 elements
    dataclasses.replace(formats.resolve("fp8_block128"), name="e5m2_block32", element=formats.e5m2, block_shape=(32,)),
]
KEY = torch.tensor([0x1234567, -0x7654321], dtype=torch.int32)


def adversarial(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values over float32's whole range (subnormals, values that flush, that overflow),
    plus NaN, Inf, all-zero blocks, blocks of subnormals and of huge values."""
    numel = shape[0] * shape[1]
    x = bench_input(numel, seed=seed).view(shape)
    flat = x.view(-1)
    generator = torch.Generator().manual_seed(seed)
    flat[97::2003] = float("nan")
    flat[5::3001] = float("inf")
    flat[7::4001] = -float("inf")
    flat[:128] = 0.0
    flat[128:256] = torch.randn(128, generator=generator) * 1e-40
    flat[256:384] = torch.randn(128, generator=generator) * 1e38
    flat[384:512] = torch.randn(128, generator=generator)
    flat[512:528] = 2.0**-149
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit, NaNs aside (any NaN equals any: a block with NaN or Inf reads
    back NaN, whose payload the multiply order decides, eager and compiled differ)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    bits_a = a.masked_fill(nan_a, 0).view(torch.int32)
    bits_b = b.masked_fill(nan_b, 0).view(torch.int32)
    assert torch.equal(bits_a, bits_b), f"{int((bits_a != bits_b).sum())} values differ"


def spy(monkeypatch: pytest.MonkeyPatch, name: str, record: Callable[[torch.Tensor], object] = lambda x: tuple(x.shape)
        ) -> list:
    """What ``record`` makes of the first argument of each call of ``native.<name>``
    from now on (the call still runs): its shape by default."""
    seen: list = []
    real = getattr(native, name)

    def counting(x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(record(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(native, name, counting)
    return seen


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes the native kernel was called with (it still runs)."""
    return spy(monkeypatch, "amax_blocks")


@pytest.mark.parametrize("fmt", AMAX_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_equals_eager(fmt, rounding: str, dtype: torch.dtype, calls: list) -> None:
    x = adversarial((256, 384), seed=1).to(dtype)
    for axis in (-1, -2):
        result = quantize_blocks(x, fmt, rounding, axis=axis, random_key=KEY)
        with kernel_backend("eager"):
            reference = quantize_blocks(x, fmt, rounding, axis=axis, random_key=KEY)
        same_bits(result, reference)
    assert len(calls) == 2
    # the values lie on the grid: quantized again (with scales that are powers of two
    # times the first ones, FP32 scales), nothing changes
    if dtype == torch.float32 and rounding == "nearest" and not fmt.tensor_scale and fmt.scale == formats.fp32:
        finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        once = quantize_blocks(finite, fmt)
        same_bits(quantize_blocks(once, fmt), once)


@pytest.mark.parametrize("fmt", [f for f in AMAX_FORMATS if f.tensor_scale], ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("tensor_amax", [None, 3.5e3, 0.0])
def test_two_level_factored_and_given_amax(fmt, rounding: str, tensor_amax, calls: list) -> None:
    x = adversarial((128, 256), seed=2)
    values, scale = quantize_blocks_factored(x, fmt, rounding, random_key=KEY, tensor_amax=tensor_amax)
    with kernel_backend("eager"):
        ref_values, ref_scale = quantize_blocks_factored(x, fmt, rounding, random_key=KEY, tensor_amax=tensor_amax)
    same_bits(values, ref_values)
    same_bits(scale, ref_scale)
    assert scale.shape == () and scale.dtype == torch.float32
    full = quantize_blocks(x, fmt, rounding, random_key=KEY, tensor_amax=tensor_amax)
    with kernel_backend("eager"):
        same_bits(full, quantize_blocks(x, fmt, rounding, random_key=KEY, tensor_amax=tensor_amax))
    assert len(calls) == 2


def test_tensor_amax_leaves_out_blocks_with_nan_or_inf() -> None:
    """With no NaN or Inf the tensor amax comes from one streaming pass; with them, block
    by block without the bad blocks: both give the eager kernels' tensor scale."""
    fmt = formats.resolve("nvfp4")
    x = torch.randn(64, 64) * 3.0
    x[0, 0] = 1e6  # the largest value, in a block that also holds a NaN
    clean_scale = quantize_blocks_factored(x, fmt)[1]
    x[0, 1] = float("nan")
    scale = quantize_blocks_factored(x, fmt)[1]
    with kernel_backend("eager"):
        reference = quantize_blocks_factored(x, fmt)[1]
    same_bits(scale, reference)
    assert float(scale) < float(clean_scale) / 1000  # the 1e6 no longer sets it


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-140.0, 120.0),
    fmt_index=st.integers(0, len(AMAX_FORMATS) - 1),
    stochastic=st.booleans(),
)
def test_native_equals_eager_random(seed: int, log_scale: float, fmt_index: int, stochastic: bool) -> None:
    fmt = AMAX_FORMATS[fmt_index]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 128, generator=generator) * 2.0**log_scale
    rounding = "stochastic" if stochastic else "nearest"
    key = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32, generator=generator)
    result = quantize_blocks(x, fmt, rounding, random_key=key)
    with kernel_backend("eager"):
        same_bits(result, quantize_blocks(x, fmt, rounding, random_key=key))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_streamed_stores(monkeypatch: pytest.MonkeyPatch, threads: int, aligned: bool) -> None:
    """Large outputs go out by non-temporal stores where ``out`` is 64-byte aligned; an
    unaligned ``out`` (a view one float in) takes the ordinary stores: same bits."""
    monkeypatch.setattr(native, "STREAM_FROM", 0)
    fmt = formats.resolve("nvfp4")
    x = adversarial((64, 512), seed=3)
    storage = torch.empty(x.numel() + 16)
    out = storage[:x.numel()] if aligned else storage[1:x.numel() + 1]
    out = out.view(x.shape)
    assert (out.data_ptr() % 64 == 0) == aligned
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        quantize_blocks(x, fmt, out=out)
    finally:
        torch.set_num_threads(previous)
    with kernel_backend("eager"):
        same_bits(out, quantize_blocks(x, fmt))


def test_other_backends_and_dtypes_keep_torch_kernels(calls: list) -> None:
    """``"compiled"`` and ``"eager"`` keep their own kernels, FP16 input the compiled
    path: the native kernel serves ``"auto"`` with float32 or BF16 input."""
    fmt = formats.resolve("nvfp4")
    x = torch.randn(32, 64)
    with kernel_backend("compiled"):
        compiled = quantize_blocks(x, fmt)
    with kernel_backend("eager"):
        eager = quantize_blocks(x, fmt)
    assert calls == []
    same_bits(quantize_blocks(x.half(), fmt), quantize_blocks(x.half().float(), fmt))
    assert len(calls) == 1  # the float32 call
    same_bits(compiled, eager)


def test_without_a_compiler_quantize_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No compiler, or one that fails: one warning that names the cause, and quantize
    runs on the compiled torch kernels with the same results."""
    x = torch.randn(16, 64)
    fmt = formats.resolve("nvfp4")
    expected = quantize_blocks(x, fmt)
    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.setattr(native, "_compiler", lambda: None)
        native._library.cache_clear()
        with pytest.warns(RuntimeWarning, match="no C.. compiler"):
            assert not native.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not per call
            same_bits(quantize_blocks(x, fmt), expected)
        monkeypatch.setattr(native, "_compiler", lambda: "false")  # exits 1: a failed build
        native._library.cache_clear()
        with pytest.warns(RuntimeWarning, match="building the native block kernel failed"):
            assert not native.available()
        assert not any(tmp_path.rglob("*.so"))  # no half-written library left behind
    finally:
        native._library.cache_clear()


def test_library_is_cached_per_source_and_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A fresh cache directory gets the library built once, under a name that changes
    with the compiler."""
    monkeypatch.setenv("MIXPREC_CACHE_DIR", str(tmp_path))
    compiler = native._compiler()
    assert compiler is not None
    first = native.library_path(compiler)
    assert first.parent == tmp_path / "native"
    assert native.library_path(compiler + "x") != first
    try:
        native._library.cache_clear()
        assert native.available()
        assert first.exists()
        built = first.stat().st_mtime_ns
        native._library.cache_clear()
        assert native.available()
        assert first.stat().st_mtime_ns == built  # loaded, not rebuilt
    finally:
        native._library.cache_clear()


PACK_FORMATS = [f for f in AMAX_FORMATS if f.name != "e5m2_block32"] + [
    dataclasses.replace(formats.resolve("fp8_block128"), name="e5m2_block32", element=formats.e5m2, block_shape=(32,)),
]


def same_packed(a, b) -> None:  # type: ignore[no-untyped-def]
    """Two PackedBlocks hold the same bytes, scales, tensor scale and layout."""
    assert a.codes.dtype == b.codes.dtype and a.codes.shape == b.codes.shape
    assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8))
    assert a.scales.dtype == b.scales.dtype
    same_bits(a.scales.float(), b.scales.float())
    assert (a.tensor_scale is None) == (b.tensor_scale is None)
    if a.tensor_scale is not None:
        assert a.tensor_scale.shape == b.tensor_scale.shape == (1,)
        same_bits(a.tensor_scale, b.tensor_scale)
    assert (a.shape, a.moved_shape, a.axis, a.nbytes) == (b.shape, b.moved_shape, b.axis, b.nbytes)


@pytest.mark.parametrize("fmt", PACK_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_packing_equals_compiled(fmt, rounding: str, dtype: torch.dtype, calls: list) -> None:
    """quantize_packed's values, codes and scales from the native pass equal the compiled
    pack and scale kernels' (the ``"compiled"`` backend), for both block axes, with and
    without values, NaN and Inf blocks included (zero codes under a NaN scale)."""
    from mixprec.core.block_storage import quantize_packed, unpack_blocks

    x = adversarial((128, 256), seed=4).to(dtype)
    for axis in (-1, -2):
        for with_values in (True, False):
            values, packed = quantize_packed(x, fmt, rounding, axis=axis, random_key=KEY, with_values=with_values)
            with kernel_backend("compiled"):
                ref_values, ref_packed = quantize_packed(x, fmt, rounding, axis=axis, random_key=KEY,
                                                         with_values=with_values)
            same_packed(packed, ref_packed)
            assert (values is None) == (ref_values is None) == (not with_values)
            if values is not None:
                same_bits(values, ref_values)
                # the values are what the codes decode to
                same_bits(unpack_blocks(packed, fmt), values)
    assert len(calls) == 4


UNPACK_FORMATS = ["nvfp4", "nvfp4_16x16", "fp8_block128", "fp8_block128x128", "mxfp4_e2m1", "mxfp8_e4m3",
                  "mxfp8_e5m2", "mxfp6_e2m3"]


@pytest.mark.parametrize("name", UNPACK_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decoding_equals_compiled(name: str, dtype: torch.dtype) -> None:
    """unpack_blocks by the native kernel (4- and 8-bit codes; FP6 keeps the compiled
    path) equals the compiled decoding on every code: random bytes, NaN codes of E4M3
    and E5M2 and every scale included, both axes."""
    from mixprec.core.block_storage import PackedBlocks, quantize_packed, unpack_blocks

    fmt = formats.resolve(name)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(128, 256, generator=generator) * 100
    for axis in (-1, -2):
        _, packed = quantize_packed(x, fmt, axis=axis)
        raw = torch.randint(0, 256, packed.codes.shape, dtype=torch.uint8, generator=generator)
        scales = packed.scales.float() * torch.exp2(torch.randint(-3, 4, packed.scales.shape, generator=generator))
        scales.view(-1)[::7] = float("nan")
        random = PackedBlocks(fmt, raw.view(packed.codes.dtype), scales.to(packed.scales.dtype),
                              packed.tensor_scale, packed.shape, packed.moved_shape, packed.axis)
        for case in (packed, random):
            result = unpack_blocks(case, fmt, dtype)
            with kernel_backend("compiled"):
                reference = unpack_blocks(case, fmt, dtype)
            assert result.dtype == reference.dtype == dtype and result.shape == reference.shape
            same_bits(result.float(), reference.float())


def test_bf16_rounding_of_decoded_values() -> None:
    """The native BF16 output rounds half to even, as torch's cast: values whose float32
    products land exactly between two BF16 values (an FP32 block scale with a 9th
    significand bit) go to the even one."""
    from mixprec.core.block_storage import quantize_packed, unpack_blocks

    fmt = formats.resolve("fp8_block128")
    x = torch.full((4, 128), 1.0)
    x[:, 0] = 448.0 * (1 + 2**-8 + 2**-20)  # the block scale: amax / 448, bits below BF16's
    _, packed = quantize_packed(x, fmt)
    decoded = unpack_blocks(packed, fmt, torch.bfloat16)
    assert torch.equal(decoded, unpack_blocks(packed, fmt).to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_factored_bf16_values(backend: str, rounding: str, calls: list) -> None:
    """NVFP4's unscaled values asked as BF16 are the float32 ones cast (exact: element
    times an E4M3 block scale has at most 5 significant bits), written by the native
    pass itself under ``"auto"``; formats whose products are not BF16 values refuse."""
    fmt = formats.resolve("nvfp4")
    x = adversarial((64, 256), seed=6)
    with kernel_backend(backend):  # type: ignore[arg-type]
        values, scale = quantize_blocks_factored(x, fmt, rounding, random_key=KEY, dtype=torch.bfloat16)
        reference, ref_scale = quantize_blocks_factored(x, fmt, rounding, random_key=KEY)
    assert values.dtype == torch.bfloat16
    same_bits(values.float(), reference)
    same_bits(scale, ref_scale)
    assert len(calls) == (2 if backend == "auto" else 0)
    with pytest.raises(ValueError, match="float32, not torch.bfloat16"):
        quantize_blocks_factored(x, formats.resolve("fp8_block128"), dtype=torch.bfloat16)


# ---- power-of-two scales (MX) ---------------------------------------------------------------

MX_FORMATS = [formats.resolve(name) for name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
                                                 "mxfp4_e2m1")] + [
    # the round-up scale rules (Transformer Engine's, torchao's) and a width the kernel
    # does not specialise (a loop over columns)
    dataclasses.replace(formats.resolve("mxfp4_e2m1"), name=f"mxfp4_{rule}", scale_rule=rule)
    for rule in ("ceil", "even", "rceil")
] + [dataclasses.replace(formats.resolve("mxfp8_e4m3"), name="mxfp8_rceil_block64", scale_rule="rceil",
                         block_shape=(64,))]


@pytest.fixture
def pow2_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes the native power-of-two kernel was called with (it still runs)."""
    return spy(monkeypatch, "pow2_blocks")


def mx_input(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """:func:`adversarial` plus rows whose blocks have the smallest scales (their moved
    grid reaches below float32's normals: the integer path) and rows near float32's
    largest (the round-up rules' grid tops past it)."""
    x = adversarial((256, 384), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    x[10:20] = torch.randn(10, 384, generator=generator) * 2.0**-130
    x[20:30] = torch.randn(10, 384, generator=generator) * 2.0**-140
    x[30:40] = torch.randn(10, 384, generator=generator).clamp(-1.9, 1.9) * 2.0**127
    return x.to(dtype)


@pytest.mark.parametrize("fmt", MX_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_pow2_equals_compiled(fmt, rounding: str, dtype: torch.dtype, pow2_calls: list) -> None:
    """The native MX quantization equals the compiled kernels (and those the eager ones)
    bit for bit: float32 and BF16 values, both block axes, every scale rule, blocks of
    NaN and Inf, of zeros, of the smallest scales and of the largest."""
    x = mx_input(dtype, seed=7)
    for axis in (-1, -2):
        for out_dtype in (torch.float32, torch.bfloat16):
            result = quantize_blocks(x, fmt, rounding, axis=axis, random_key=KEY, dtype=out_dtype)
            with kernel_backend("compiled"):
                reference = quantize_blocks(x, fmt, rounding, axis=axis, random_key=KEY, dtype=out_dtype)
            assert result.dtype == reference.dtype == out_dtype
            same_bits(result.float(), reference.float())
    # along axis -2, blocks of 32 take the strided kernel (test_native_pow2_along_other_axes)
    assert len(pow2_calls) == (2 if fmt.block_shape == (32,) else 4)
    if rounding == "nearest" and dtype == torch.float32:
        with kernel_backend("eager"):
            eager = quantize_blocks(x, fmt)
        same_bits(quantize_blocks(x, fmt), eager)
        # on the grid: quantized again, nothing changes (floor keeps each block's scale)
        if fmt.scale_rule == "floor":
            finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            once = quantize_blocks(finite, fmt)
            same_bits(quantize_blocks(once, fmt), once)


@pytest.mark.parametrize("fmt", [f for f in MX_FORMATS if f.element.total_bits in (4, 8)], ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_native_pow2_packing_equals_compiled(fmt, rounding: str, pow2_calls: list) -> None:
    """quantize_packed of an MX format by the native pass: the compiled kernels' codes
    (zero under a NaN scale), E8M0 scales and values (float32 and BF16), and the codes
    decode to the values, where the round-up rules put a block's grid top past float32's
    largest (values Inf, codes the elements x / X rounded) included."""
    from mixprec.core.block_storage import quantize_packed, unpack_blocks

    for dtype in (torch.float32, torch.bfloat16):
        x = mx_input(dtype, seed=8)
        for axis in (-1, -2):
            for values_dtype in (torch.float32, torch.bfloat16):
                for with_values in (True, False):
                    values, packed = quantize_packed(x, fmt, rounding, axis=axis, random_key=KEY,
                                                     with_values=with_values, values_dtype=values_dtype)
                    with kernel_backend("compiled"):
                        ref_values, ref_packed = quantize_packed(x, fmt, rounding, axis=axis, random_key=KEY,
                                                                 with_values=with_values, values_dtype=values_dtype)
                    same_packed(packed, ref_packed)
                    assert packed.scales.dtype == torch.float8_e8m0fnu
                    if with_values:
                        assert values is not None and values.dtype == ref_values.dtype == values_dtype
                        same_bits(values.float(), ref_values.float())
                        if values_dtype == torch.float32:
                            with kernel_backend("compiled"):
                                same_bits(unpack_blocks(packed, fmt), values)
                    else:
                        assert values is None
    assert len(pow2_calls) == 16


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-150.0, 126.0),
    fmt_index=st.integers(0, len(MX_FORMATS) - 1),
    stochastic=st.booleans(),
)
def test_native_pow2_equals_eager_random(seed: int, log_scale: float, fmt_index: int, stochastic: bool) -> None:
    fmt = MX_FORMATS[fmt_index]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=generator) * 2.0**log_scale
    rounding = "stochastic" if stochastic else "nearest"
    key = torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32, generator=generator)
    result = quantize_blocks(x, fmt, rounding, random_key=key)
    with kernel_backend("eager"):
        same_bits(result, quantize_blocks(x, fmt, rounding, random_key=key))


@pytest.mark.parametrize("fmt", MX_FORMATS[:5], ids=lambda f: f.name)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_pow2_along_other_axes(fmt, rounding: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """MX blocks along a dimension that is not the last (dgrad's and wgrad's operands)
    are read where they lie by the strided kernel: the compiled kernels' values on the
    moved copy, bit for bit (random bits of the moved layout's indices), with the same
    shape and strides, for 2-D to 4-D tensors and float32 and BF16 values."""
    seen: list[tuple[int, int, int]] = []
    real = native.pow2_strided
    monkeypatch.setattr(native, "pow2_strided", lambda x, out, pe, bp, key, dims, threads: (
        seen.append(dims), real(x, out, pe, bp, key, dims, threads))[1])
    x = mx_input(dtype, seed=10)
    cases = [((256, 384), 0), ((256, 384), -2), ((2, 128, 384), 1), ((4, 64, 2, 192), 1)]
    for shape, axis in cases:
        xx = x.reshape(shape)
        for out_dtype in (torch.float32, torch.bfloat16):
            result = quantize_blocks(xx, fmt, rounding, axis=axis, random_key=KEY, dtype=out_dtype)
            with kernel_backend("compiled"):
                reference = quantize_blocks(xx, fmt, rounding, axis=axis, random_key=KEY, dtype=out_dtype)
            assert result.shape == reference.shape and result.stride() == reference.stride()
            same_bits(result.float(), reference.float())
    assert seen == [(1, 256, 384)] * 4 + [(2, 128, 384)] * 2 + [(4, 64, 384)] * 2
    out = torch.empty(256, 384)
    quantize_blocks(x.float(), fmt, rounding, axis=0, random_key=KEY, out=out)
    with kernel_backend("compiled"):
        same_bits(out, quantize_blocks(x.float(), fmt, rounding, axis=0, random_key=KEY))


def test_pow2_streamed_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large float32 outputs of the MX kernel go out by non-temporal stores: same bits."""
    monkeypatch.setattr(native, "STREAM_FROM", 0)
    fmt = formats.resolve("mxfp8_e4m3")
    x = mx_input(torch.float32, seed=9)
    out = torch.empty_like(x)
    assert out.data_ptr() % 64 == 0
    quantize_blocks(x, fmt, "stochastic", random_key=KEY, out=out)
    with kernel_backend("compiled"):
        same_bits(out, quantize_blocks(x, fmt, "stochastic", random_key=KEY))


def test_pow2_other_widths_keep_compiled_kernels(pow2_calls: list) -> None:
    """Blocks not a multiple of 16 wide, FP16 input and the other backends keep the
    compiled kernels."""
    fmt = dataclasses.replace(formats.resolve("mxfp8_e4m3"), name="mxfp8_block24", block_shape=(24,))
    x = torch.randn(32, 96)
    quantize_blocks(x, fmt)
    quantize_blocks(x.half(), formats.resolve("mxfp8_e4m3"), axis=0)
    with kernel_backend("compiled"):
        quantize_blocks(x, formats.resolve("mxfp8_e4m3"))
    assert pow2_calls == []
    quantize_blocks(x, formats.resolve("mxfp8_e4m3"))
    assert len(pow2_calls) == 1


# ---- scalar formats: quantize and FP8 storage ------------------------------------------


@pytest.fixture
def round_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many elements each native scalar rounding call took (it still runs)."""
    return spy(monkeypatch, "round_scalar", torch.Tensor.numel)


def scalar_input(seed: int, numel: int = 40_009) -> torch.Tensor:
    """float32 values over the whole range, NaN, both infinities and both zeros; an odd
    length, so that the last vector is partial."""
    x = bench_input(numel, seed=seed)
    x[::101] = float("nan")
    x[7::211] = float("inf")
    x[9::307] = -float("inf")
    x[11::401] = 0.0
    x[13::409] = -0.0
    return x


@pytest.mark.parametrize("name", ["fp16", "bf16", "e5m2", "e4m3", "e2m1fn", "e3m2fn", "e8m0fnu"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("saturate", [None, True])
def test_native_quantize_equals_compiled(name: str, rounding: str, saturate, round_calls: list) -> None:
    """quantize by the native pass equals the compiled kernels, allocating, into out=
    and in place, with and without a per-tensor scale (the bit path, the float path
    and stochastic rounding all taken)."""
    from mixprec.core.quantize import quantize

    x = scalar_input(7)
    for scale in (None, torch.tensor(2.0**-20), torch.tensor(3.7e-3)):
        kwargs = dict(rounding=rounding, scale=scale, random_key=KEY, saturate=saturate)
        with kernel_backend("compiled"):
            reference = quantize(x, name, **kwargs)
        same_bits(quantize(x, name, **kwargs), reference)
        out = torch.empty_like(x)
        quantize(x, name, out=out, **kwargs)
        same_bits(out, reference)
        inplace = x.clone()
        quantize(inplace, name, out=inplace, **kwargs)
        same_bits(inplace, reference)
    assert len(round_calls) == 9


@pytest.mark.parametrize("name", ["bf16", "e5m2", "e4m3", "e2m1fn"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_native_quantize_reads_half_precision_inputs(name: str, rounding: str, x_dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP16 or BF16 x goes to the native pass as it is (no float32 copy first) and
    gives, as float32, the compiled kernels' rounding of x widened: stochastic bits by
    the same flat indices, overflow, NaN and both zeros included; with out= as well."""
    from mixprec.core.quantize import quantize

    seen = spy(monkeypatch, "round_scalar", lambda x: x.dtype)
    x = scalar_input(11).clamp(-6e4, 6e4).to(x_dtype)  # FP16's range; NaN, Inf, zeros kept
    x[3::97] = torch.tensor(2.0**-20).to(x_dtype)  # subnormal in FP16, tiny in every target
    with kernel_backend("compiled"):
        reference = quantize(x.float(), name, rounding, random_key=KEY)
    result = quantize(x, name, rounding, random_key=KEY)
    assert result.dtype == torch.float32
    same_bits(result, reference)
    out = torch.empty(x.shape)
    quantize(x, name, rounding, random_key=KEY, out=out)
    same_bits(out, reference)
    assert seen == [x_dtype, x_dtype]
    if not (name == "bf16" and x_dtype == torch.bfloat16):  # BF16 onto its own grid: nothing to change
        finite = torch.isfinite(reference)
        assert not torch.equal(reference[finite], x.float()[finite]), "nothing rounded: a dropped rounding would pass"


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_fp8_storage_equals_compiled(name: str, rounding: str, x_dtype: torch.dtype,
                                            values_dtype: torch.dtype, round_calls: list) -> None:
    """FP8 storage with values and amax from one native pass: the compiled kernel's
    bytes (torch's FP8 casts, NaN and Inf codes included), values and amax."""
    from mixprec.core.storage import quantize_stored_with_amax

    x = scalar_input(8).to(x_dtype)
    x[17::503] = torch.tensor(2.0**-20).to(x_dtype)  # FP16 subnormals, widened exactly
    finite = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-3.0)
    for source in (x, finite):
        for scale in (None, torch.tensor(0.125), torch.tensor(0.37)):
            for saturate in (None, True):
                kwargs = dict(scale=scale, random_key=KEY, values_dtype=values_dtype, saturate=saturate)
                values, stored, amax = quantize_stored_with_amax(source, name, rounding, **kwargs)
                with kernel_backend("compiled"):
                    ref_values, ref_stored, ref_amax = quantize_stored_with_amax(source, name, rounding, **kwargs)
                assert values.dtype == ref_values.dtype == values_dtype
                same_bits(values.float(), ref_values.float())
                assert stored.dtype == ref_stored.dtype
                assert torch.equal(stored.view(torch.uint8), ref_stored.view(torch.uint8))
                same_bits(amax, ref_amax)
    assert len(round_calls) == 12


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16])
def test_native_fp8_storage_of_every_fp16_pattern(name: str, rounding: str, values_dtype: torch.dtype,
                                                  round_calls: list) -> None:
    """Every FP16 bit pattern (subnormals, both infinities, signalling and quiet NaNs),
    read by the native kernel's vector conversions: the compiled kernel's FP8 bytes bit
    for bit, and its values, where a NaN stays a NaN (its payload is not part of the
    result: torch's own casts differ in it from one code path to another)."""
    from mixprec.core.storage import quantize_stored_with_amax

    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.cat([patterns, patterns[:37]])  # a partial last vector too
    for saturate in (None, True):
        kwargs = dict(random_key=KEY, values_dtype=values_dtype, saturate=saturate)
        values, stored, _ = quantize_stored_with_amax(x, name, rounding, **kwargs)
        with kernel_backend("compiled"):
            ref_values, ref_stored, _ = quantize_stored_with_amax(x, name, rounding, **kwargs)
        assert torch.equal(stored.view(torch.uint8), ref_stored.view(torch.uint8))
        nan = ref_values.isnan()
        assert torch.equal(values.isnan(), nan)
        same_bits(values[~nan].float(), ref_values[~nan].float())
    assert len(round_calls) == 2


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fp8_decoding_of_every_code(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding FP8 storage (stored_values) by the native pass: every code, unscaled and
    times scales that move values into BF16's rounding, subnormals and overflow, equals
    the compiled kernel bit for bit (NaN where it has NaN) and ml_dtypes' decoding times
    the scale, rounded once to the output dtype."""
    import ml_dtypes
    import numpy as np

    from mixprec.core.storage import stored_values

    decoded = spy(monkeypatch, "decode_fp8", torch.Tensor.numel)
    torch_dtype = torch.float8_e4m3fn if name == "e4m3" else torch.float8_e5m2
    codes = torch.arange(256, dtype=torch.uint8)
    stored = torch.cat([codes, codes.flip(0)[:1000 % 256 + 21], codes.roll(7)]).view(torch_dtype)  # a partial vector
    reference_dtype = ml_dtypes.float8_e4m3fn if name == "e4m3" else ml_dtypes.float8_e5m2
    independent = torch.from_numpy(stored.view(torch.uint8).numpy().view(reference_dtype).astype(np.float32))
    for scale in (None, torch.tensor(0.125), torch.tensor([0.37]), torch.tensor(3.0e37), torch.tensor(2.0**-130)):
        values = stored_values(stored, name, scale, dtype)
        with kernel_backend("compiled"):
            reference = stored_values(stored, name, scale, dtype)
        assert values.dtype == reference.dtype == dtype and values.shape == reference.shape
        nan = reference.isnan()
        assert torch.equal(values.isnan(), nan)
        same_bits(values[~nan].float(), reference[~nan].float())
        expected = (independent if scale is None else independent * scale).to(dtype)
        assert torch.equal(expected.isnan(), nan)
        same_bits(values[~nan].float(), expected[~nan].float())
    assert decoded == [stored.numel()] * 5


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 200), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), threads=st.sampled_from([1, 2]))
def test_column_sums_are_float32_sums_of_the_widened_elements(rows: int, cols: int, seed: int, dtype: torch.dtype,
                                                               threads: int) -> None:
    """Each column summed in float32 (not in the 16-bit dtype: a BF16 accumulator loses
    the small addends; within the float32 summation bound of the float64 sum), in row
    order (so that 1 and 2 threads agree bit for bit)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, cols)).to(dtype)
    sums = native.column_sums(x, threads)
    exact = x.double().sum(0)
    bound = rows * 2.0**-24 * x.double().abs().sum(0)
    assert sums.dtype == torch.float32 and bool(((sums.double() - exact).abs() <= bound).all())
    sequential = torch.zeros(cols)
    for row in x.float():
        sequential += row
    assert torch.equal(sums, sequential)
