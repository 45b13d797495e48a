"""mixprec.core.hadamard: orthonormal against a float64 reference, its own inverse, the
random signs seeded, any axis, and the errors."""

from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.core.hadamard import hadamard_matrix, random_signs


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


def test_transform_matches_float64_and_keeps_norms():
    x = torch.randn(64, 128)
    y = mixprec.hadamard_transform(x, seed=3)
    want = reference(x, 16, 3)
    assert torch.allclose(y.double(), want, rtol=0, atol=1e-5 * x.abs().max().item())
    group_norms = x.double().view(64, 8, 16).norm(dim=-1)
    assert torch.allclose(y.double().view(64, 8, 16).norm(dim=-1), group_norms, rtol=1e-6)


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
