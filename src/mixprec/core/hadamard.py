"""The random Hadamard transform of the NVFP4 and Quartet recipes: 16x16 blocks along an
axis, with a seeded random sign vector, orthonormal.

For each group of ``n`` consecutive elements ``v`` along ``axis`` (n = 16 by default),
``hadamard_transform`` returns ``H (D v)``: ``D`` is a diagonal of random +-1 signs drawn
once from ``seed`` (the same for every group, as NVIDIA's recipe fixes it), and ``H`` the
Sylvester Hadamard matrix divided by ``sqrt(n)`` (4 for n = 16), so ``H D`` is orthogonal
and spreads an outlier over its group before quantization. The inverse is ``D H``
(:func:`inverse_hadamard_transform`). In exact arithmetic the two transforms of a GEMM's
operands cancel: ``(A Q)(Q^T B) = A B`` with ``Q = (H D)^T``.

It runs as the fast Walsh-Hadamard transform: ``v`` times ``signs / sqrt(n)`` (exact for
powers of four), then log2(n) stages of butterflies, each a float32 sum and difference
of two elements, so results are exact up to float32 rounding of those sums. Groups of 16
on a CPU take one native pass that also moves the axis last and widens BF16 or FP16
input (:func:`mixprec.core.native.hadamard16`); the torch operations elsewhere add in the
same order, with the same results.
"""

from __future__ import annotations

import math

import torch

from mixprec.core import native
from mixprec.core.kernels import move_last, native_rounds, serial_threads

__all__ = ["hadamard_matrix", "random_signs", "hadamard_transform", "inverse_hadamard_transform"]


def hadamard_matrix(n: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two):
    entries +-1/sqrt(n), symmetric, its own inverse."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard size must be a power of two (2, 4, 8, 16, ...), not {n!r}")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int = 16, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` random +-1 values (float32) from ``seed``: the same on every call and device.
    The bits are splitmix64's in plain Python integers (no torch.Generator), so a
    compiled graph folds them into a constant."""
    mask = 2**64 - 1
    signs = []
    for i in range(n):
        z = (seed * 0x2545F4914F6CDD1D + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        signs.append(1.0 if (z ^ (z >> 31)) >> 63 else -1.0)
    return torch.tensor(signs, dtype=torch.float32, device=device)


_MULTIPLIERS: dict[tuple[int, int, bool, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}


def _multipliers(n: int, seed: int, inverse: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a group is multiplied by before the butterflies and (None: nothing) after:
    the forward ``H D v`` scales ``v`` by ``signs / sqrt(n)`` first, the inverse ``D H y``
    scales ``y`` by ``1 / sqrt(n)`` first and by the signs last (exact: +-1). Cached
    (building them per call cost about 0.1 ms, 14 calls a step in the quick Transformer
    under nvfp4)."""
    key = (n, seed, inverse, device)
    cached = _MULTIPLIERS.get(key)
    if cached is None:
        signs = random_signs(n, seed, device=device)
        factor = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float32, device=device)
        cached = (factor, signs) if inverse else (signs * factor, None)
        if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
            _MULTIPLIERS[key] = cached
    return cached


def _butterflies(v: torch.Tensor, n: int) -> torch.Tensor:
    """The fast Walsh-Hadamard transform (unnormalised) of each row of ``v`` (``(rows,
    n)`` float32): stages h = 1, 2, 4, ..., each ``(v[j], v[j + h]) -> (v[j] + v[j + h],
    v[j] - v[j + h])`` for the j with bit h clear. The native kernel adds in the same
    order, so the two agree bit for bit."""
    h = 1
    while h < n:
        pairs = v.reshape(-1, n // (2 * h), 2, h)
        lower, upper = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((lower + upper, lower - upper), dim=2).reshape(-1, n)
        h *= 2
    return v


def hadamard_transform(x: torch.Tensor, n: int = 16, axis: int = -1, seed: int = 0,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``H D v`` for every group ``v`` of ``n`` consecutive elements along ``axis`` (float32,
    x's shape): orthonormal, with random signs from ``seed``. A dimension that is not a
    multiple of ``n`` is refused (pad with zeros). The result is a view of a contiguous
    float32 tensor holding x with ``axis`` moved last (the layout a quantizer along
    ``axis`` reads); ``out``, a contiguous float32 tensor of that moved shape on x's device, is
    that tensor where given (a caller's buffer kept across calls: a fresh one's pages
    are faulted in anew each time, which cost more than the transform here)."""
    return _transform(x, n, axis, seed, inverse=False, out=out)


def inverse_hadamard_transform(x: torch.Tensor, n: int = 16, axis: int = -1, seed: int = 0) -> torch.Tensor:
    """``D H v`` per group: undoes :func:`hadamard_transform` with the same ``n``, ``axis``
    and ``seed`` (up to float32 rounding)."""
    return _transform(x, n, axis, seed, inverse=True)


def _transform(x: torch.Tensor, n: int, axis: int, seed: int, inverse: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("the Hadamard transform takes a floating-point torch.Tensor")
    if x.dim() == 0:
        raise ValueError("the Hadamard transform needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor with {x.dim()} dimensions")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard size must be a power of two (2, 4, 8, 16, ...), not {n!r}")
    size = x.shape[axis]
    if size % n:
        raise ValueError(
            f"dimension {axis % x.dim()} of x (shape {tuple(x.shape)}) has {size} elements, not a "
            f"multiple of the Hadamard size {n}; pad it with zeros to a multiple of {n}"
        )
    axis %= x.dim()
    pre, post = _multipliers(n, seed, inverse, x.device)
    moved_shape = (*x.shape[:axis], *x.shape[axis + 1:], size)
    if out is not None and (tuple(out.shape) != moved_shape or out.dtype != torch.float32
                            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {moved_shape} (x with axis {axis} "
                         f"moved last) on {x.device}, not {out.dtype} {tuple(out.shape)} on {out.device}")
    if n == 16 and native_rounds(x):
        # the transposing copy, the widening and the rotation in one native pass
        rotated = torch.empty(moved_shape, dtype=torch.float32) if out is None else out
        native.hadamard16(x.detach(), axis, pre, post, rotated, serial_threads(x.numel()))
    else:
        # contiguous float32, in one pass, so that the groups are the rows of one 2-D tensor
        moved = move_last(x.detach(), axis, torch.float32)
        rotated = _butterflies(moved.reshape(-1, n) * pre, n)
        rotated = (rotated if post is None else rotated * post).reshape(moved_shape)
        rotated = rotated if out is None else out.copy_(rotated)
    return rotated.movedim(-1, axis)
