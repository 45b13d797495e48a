"""mixprec.core.hadamard: orthonormal against a float64 reference, its own inverse, the
random signs seeded, any axis, and the errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec
from mixprec.core import native
from mixprec.core.hadamard import hadamard_matrix, random_signs
from mixprec.core.kernels import kernel_backend


def reference(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """H D v per group of n along the last axis, in float64 from the definition."""
    h = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                     dtype=torch.float64) / n**0.5
    d = torch.diag(random_signs(n, seed).double())
    groups = x.double().reshape(-1, n)
    return (groups @ (h @ d).t()).reshape(x.shape)


@pytest.mark.parametrize("n", [2, 16, 32])
def test_matrix_is_orthonormal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-15)
    if n == 16:  # 1/4 is exact: so is the float32 matrix's orthogonality
        h32 = hadamard_matrix(n)
        assert torch.equal(h32 @ h32.t(), torch.eye(n))
    assert torch.equal(h, h.t())
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), rtol=1e-15)


@pytest.mark.parametrize("n", [2, 4, 16, 32])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_transform_matches_float64_and_keeps_norms(n: int, backend: str):
    x = torch.randn(64, 128)
    with kernel_backend(backend):
        y = mixprec.hadamard_transform(x, n, seed=3)
    want = reference(x, n, 3)
    assert torch.allclose(y.double(), want, rtol=0, atol=1e-5 * x.abs().max().item())
    group_norms = x.double().view(64, 128 // n, n).norm(dim=-1)
    assert torch.allclose(y.double().view(64, 128 // n, n).norm(dim=-1), group_norms, rtol=1e-6)


def same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit, NaN where the other has NaN (its payload is no result)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    nan = b.isnan()
    assert torch.equal(a.isnan(), nan)
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape_index=st.integers(0, 5),
    dtype_index=st.integers(0, 2),
    log_scale=st.floats(-40.0, 40.0),
    inverse=st.booleans(),
)
def test_native_pass_equals_the_torch_butterflies(seed: int, shape_index: int, dtype_index: int, log_scale: float,
                                                  inverse: bool):
    """The native pass (transposing copy, widening and rotation in one) against the torch
    operations adding in the same order, bit for bit: every axis of 1- to 3-D tensors
    (a partial 16-column tile too), float32, BF16 and FP16 input, values over a wide
    range with NaN, Inf, zeros and subnormals."""
    if not native.available():
        pytest.skip("no native library on this machine")
    shapes = [((48,), 0), ((32, 40), 0), ((40, 32), 1), ((3, 32, 21), 1), ((32, 5, 7), 0), ((2, 3, 64), 2)]
    shape, axis = shapes[shape_index]
    dtype = (torch.float32, torch.bfloat16, torch.float16)[dtype_index]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape, generator=generator) * 4) * 2.0**log_scale
    flat = x.view(-1)
    flat[::29] = float("nan")
    flat[3::31] = float("inf")
    flat[5::37] = -0.0
    flat[7::41] = 2.0**-140
    x = x.to(dtype)
    transform = mixprec.inverse_hadamard_transform if inverse else mixprec.hadamard_transform
    calls = []
    real = native.hadamard16
    native.hadamard16 = lambda *args: (calls.append(1), real(*args))[1]  # type: ignore[assignment]
    try:
        result = transform(x, 16, axis=axis, seed=seed % 7)
    finally:
        native.hadamard16 = real  # type: ignore[assignment]
    assert calls == [1]
    with kernel_backend("eager"):
        expected = transform(x, 16, axis=axis, seed=seed % 7)
    same_values(result, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2048, 256), (40, 2048, 8)])
def test_native_pass_streams_large_outputs_to_the_same_bits(shape: tuple[int, ...], dtype: torch.dtype,
                                                             monkeypatch: pytest.MonkeyPatch):
    """From 2^19 elements the native pass along a strided axis writes with non-temporal
    stores: the same bits as the torch operations (into a caller's ``out`` as well),
    a partial 16-column tile included."""
    if not native.available():
        pytest.skip("no native library on this machine")
    calls = []
    real = native.hadamard16
    monkeypatch.setattr(native, "hadamard16", lambda *args: (calls.append(args[0].numel()), real(*args))[1])
    generator = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape, generator=generator) * 3)).to(dtype)
    x.view(-1)[::97] = float("nan")
    with kernel_backend("eager"):
        expected = mixprec.hadamard_transform(x, 16, axis=-2, seed=3)
    result = mixprec.hadamard_transform(x, 16, axis=-2, seed=3)
    same_values(result, expected)
    moved = (*shape[:-2], shape[-1], shape[-2])
    out = torch.full(moved, 7.0)
    into = mixprec.hadamard_transform(x, 16, axis=-2, seed=3, out=out)
    assert into.data_ptr() == out.data_ptr()
    same_values(into, expected)
    assert calls == [x.numel()] * 2 and x.numel() >= 1 << 19


def test_out_takes_the_rotation_on_every_path():
    """``out`` receives the rotated values with the axis moved last, on the native and on
    the torch path alike; a wrong ``out`` is refused with the shape it needs."""
    x = torch.randn(32, 48)
    expected = mixprec.hadamard_transform(x, 16, axis=0)
    for backend in ("auto", "eager"):
        out = torch.full((48, 32), float("nan"))
        with kernel_backend(backend):
            result = mixprec.hadamard_transform(x, 16, axis=0, out=out)
        assert result.data_ptr() == out.data_ptr() and result.shape == x.shape
        assert torch.equal(out, expected.t())
    with pytest.raises(ValueError, match=r"shape \(48, 32\)"):
        mixprec.hadamard_transform(x, 16, axis=0, out=torch.empty(32, 48))
    with pytest.raises(ValueError, match="contiguous float32"):
        mixprec.hadamard_transform(x, 16, axis=0, out=torch.empty(48, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_inverse_undoes_the_transform(axis):
    x = torch.randn(32, 48) * 100
    y = mixprec.hadamard_transform(x, axis=axis, seed=5)
    back = mixprec.inverse_hadamard_transform(y, axis=axis, seed=5)
    assert torch.allclose(back, x, rtol=0, atol=1e-4)
    wrong_seed = mixprec.inverse_hadamard_transform(y, axis=axis, seed=6)
    assert not torch.allclose(wrong_seed, x, atol=1e-2)


def test_axis_equals_transposing():
    x = torch.randn(32, 48)
    assert torch.equal(mixprec.hadamard_transform(x, axis=0, seed=1),
                       mixprec.hadamard_transform(x.t(), axis=-1, seed=1).t())


def test_it_spreads_an_outlier_over_its_group():
    x = torch.zeros(16)
    x[3] = 16.0
    y = mixprec.hadamard_transform(x, seed=0)
    assert torch.equal(y.abs(), torch.full((16,), 4.0))


def test_gemm_operands_transformed_on_the_contraction_axis_cancel():
    a, b = torch.randn(8, 64), torch.randn(64, 12)
    product = mixprec.hadamard_transform(a, axis=1, seed=2) @ mixprec.hadamard_transform(b, axis=0, seed=2)
    assert torch.allclose(product, a @ b, atol=1e-4)


def test_signs_are_seeded():
    assert torch.equal(random_signs(16, 4), random_signs(16, 4))
    assert not torch.equal(random_signs(16, 4), random_signs(16, 5))
    assert set(random_signs(16, 4).tolist()) == {-1.0, 1.0}


def test_errors():
    with pytest.raises(ValueError, match="not a multiple of the Hadamard size 16"):
        mixprec.hadamard_transform(torch.ones(3, 20))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(TypeError, match="floating-point"):
        mixprec.hadamard_transform(torch.ones(16, dtype=torch.int32))
