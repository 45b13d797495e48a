"""The native GEMM on BF16 dot products (mixprec.core.native.gemm_bf16) against float64.

Its operands hold BF16 values, so each product is exact in float32 and the result is
their float32 sum: within ``(K + 1) * 2**-24 * sum |a b|`` of the exact (float64) one,
whatever the order. A rounded product or a narrower accumulator lands far outside that
bound; small integers, whose sums float32 holds exactly, must come out equal.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.core import native

pytestmark = pytest.mark.skipif(not native.bf16_dot_available(),
                                reason="the native library has no BF16 dot-product GEMM on this CPU (no AVX512_BF16)")


def _bf16_values(shape: tuple[int, ...], generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale).bfloat16().float()


def _within_fp32_sum_bound(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    exact = a.double() @ b.double()
    bound = (a.shape[1] + 1) * 2.0**-24 * (a.double().abs() @ b.double().abs())
    return bool(((y.double() - exact).abs() <= bound).all())


def _layout(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x itself, or the same values through a transposed (column-major) tensor."""
    return x.t().contiguous().t() if transposed else x


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 150), seed=st.integers(0, 2**31 - 1),
       a_t=st.booleans(), b_t=st.booleans(), bf16=st.booleans(), threads=st.sampled_from([1, 2]))
def test_gemm_is_the_fp32_sum_of_exact_products(m: int, k: int, n: int, seed: int, a_t: bool, b_t: bool, bf16: bool,
                                                threads: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a, b = _bf16_values((m, k), generator), _bf16_values((k, n), generator, scale=3.0)
    a_in, b_in = _layout(a, a_t), _layout(b, b_t)
    if bf16:
        a_in, b_in = a_in.bfloat16(), b_in.bfloat16()
    y = native.gemm_bf16(a_in, native.pack_bf16(b_in, threads), threads)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert _within_fp32_sum_bound(y, a, b)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 300), n=st.integers(1, 130), seed=st.integers(0, 2**31 - 1))
def test_small_integer_sums_are_exact(m: int, k: int, n: int, seed: int) -> None:
    """Every element in its place: sums of small integers are exact in float32."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (m, k), generator=generator).float()
    b = torch.randint(-8, 9, (k, n), generator=generator).float()
    y = native.gemm_bf16(a, native.pack_bf16(b, 1), 1)
    assert torch.equal(y, (a.double() @ b.double()).float())


def test_accumulation_is_float32_not_bf16() -> None:
    """1 + 256 * 2**-9 is 1.5 in float32 sums; BF16 accumulation (8 significant bits)
    would stay at 1, each 2**-9 being under half its step at 1."""
    a = torch.full((3, 257), 2.0**-9)
    a[:, 0] = 1.0
    b = torch.ones(257, 70)
    y = native.gemm_bf16(a, native.pack_bf16(b, 1), 1)
    assert torch.equal(y, torch.full((3, 70), 1.5))


def test_products_are_not_rounded() -> None:
    """(1 + 2**-7)**2 = 1 + 2**-6 + 2**-14 needs 15 significant bits: kept by an exact
    product, lost by one rounded to BF16."""
    value = 1.0 + 2.0**-7
    a, b = torch.full((1, 2), value), torch.full((2, 1), value)
    y = native.gemm_bf16(a, native.pack_bf16(b, 1), 1)
    assert y.item() == 2 * value * value


def test_threads_give_the_same_bits() -> None:
    generator = torch.Generator().manual_seed(1)
    a, b = _bf16_values((100, 96), generator), _bf16_values((96, 200), generator)
    packed = native.pack_bf16(b, 2)
    assert torch.equal(native.gemm_bf16(a, packed, 1), native.gemm_bf16(a, packed, 2))
    assert torch.equal(packed.words, native.pack_bf16(b, 1).words)


def test_one_packing_serves_many_left_operands() -> None:
    generator = torch.Generator().manual_seed(2)
    b = _bf16_values((256, 1024), generator)
    packed = native.pack_bf16(b.t().contiguous().t(), 1)
    for _ in range(3):
        a = _bf16_values((32, 256), generator)
        assert _within_fp32_sum_bound(native.gemm_bf16(a, packed, 1), a, b)


def test_mismatched_or_unsupported_operands_are_refused() -> None:
    packed = native.pack_bf16(torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="columns"):
        native.gemm_bf16(torch.ones(2, 5), packed, 1)
    with pytest.raises(ValueError, match="dtype"):
        native.pack_bf16(torch.ones(4, 3, dtype=torch.float64), 1)
