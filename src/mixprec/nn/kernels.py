"""Which torch kernel runs an emulated GEMM: its FP32 GEMM, or its BF16 GEMM where that
gives the same result.

An emulated GEMM is defined as FP32 accumulation of the exact products of its rounded
operands, rounded once to the result format (:mod:`mixprec.nn.ops`). torch's FP32 GEMM
gives that up to the order of the FP32 summation, for every recipe. torch's BF16 GEMM
gives the same -- products of two BF16 values are exact in FP32, the native dot-product
instructions (x86 ``VDPBF16PS``, AMX ``TDPBF16PS``) accumulate them in FP32, and oneDNN
rounds the FP32 sum once to BF16 -- when

- both operands' values are exactly BF16 values (:func:`bf16_exact`): BF16 itself; the
  FP8 formats E4M3 and E5M2 and any ``eXmY`` with X <= 8 and Y <= 7, unscaled or times a
  power-of-two per-tensor scale (``TensorScaling(power_of_two=True)``, the default);
  MX elements times E8M0 block scales; FP8 elements times power-of-two FP32 block
  scales (``fp8_block128:rceil``, the ``fp8-blockwise`` recipe's, as Transformer
  Engine keeps them); NVFP4-style elements times E4M3 block scales. Not FP16 (11
  significant bits), not FP32, not a non-power-of-two per-tensor scale, not
  unrounded FP32 block scales (``fp8_block128``): those values carry more than 8
  significant bits. NVFP4's FP32 tensor scale is left out of its operands and applied
  to the GEMM's FP32 sum, as NVFP4 hardware applies it (``alpha``, in the epilogue;
  :func:`bf16_exact_unscaled`): such GEMMs need the FP32 sum, so they run as
  ``"bf16-fp32"`` below, never ``"bf16"`` (multiplying the scales out after a BF16
  result would round twice);
- the result format is BF16 rounded to nearest without a scale (fp8-hybrid, bf16, the
  MX recipes' results): the kernel's own output rounding is then the emulation's one
  rounding. A stochastically rounded or scaled result needs the FP32 sum: FP32 kernel;
- a bias, added to the FP32 sum before the rounding, is fused into the kernel: oneDNN's
  linear (``torch.ops.mkldnn._linear_pointwise``) adds an FP32 bias to the FP32
  accumulator before converting to BF16. :func:`fused_bias_exact` checks that once per
  process on a case where adding after the rounding gives another result; where the op
  is missing or rounds twice, GEMMs with a bias keep the FP32 kernel. Convolutions with
  a bias always do (torch's BF16 convolution takes no FP32 bias); convolutions without
  one (the usual conv + norm) do not. A convolution's weight gradient always runs on
  the FP32 kernel (:mod:`mixprec.nn.ops`): oneDNN's BF16 backward-weights convolution
  ran 20-40x slower than FP32 for some shapes (7x7 outputs, strided 1x1) on a CPU with
  native BF16, and which shapes is not knowable in advance;
- no broadcast operand makes autograd sum a gradient over batch dimensions (that sum
  would run on BF16 values).

Where the operands are BF16 values but the emulation needs the FP32 sum itself -- a
result narrower than BF16 (paper 2's E5M2 outputs, recipe ``fp8``), a stochastically
rounded or scaled result, a bias the BF16 kernel cannot fuse -- the GEMM runs on CPUs as
``"bf16-fp32"``: the FP32 sum of the exact products, computed on the BF16 units. torch
has no CPU GEMM of BF16 operands with an FP32 result (``aten::mm.dtype`` is CUDA-only,
``torch._scaled_mm`` on CPU ran 2.5-3.5x slower than the FP32 GEMM), so where the native
library is built with AVX512_BF16 (:func:`mixprec.core.native.bf16_dot_available`) a 2-D
right operand goes to its GEMM (:func:`mixprec.core.native.gemm_bf16`, the operator
``mixprec::gemm_bf16_packed``): the right operand packed into pairs once (a recurrent
weight once for all time steps: :func:`pack_right`), ``VDPBF16PS`` adding two exact
products a lane into FP32 accumulators. Measured here it ran within 10-20% of torch's
BF16 GEMM and 1.8-2.5x faster than the FP32 one (2048x128x512: 786 against 2181 us;
32x256x1024 on one thread: 88 against 221). Elsewhere, and for batched right operands,
torch's FP32 GEMM runs in oneDNN's BF16 math mode (:func:`bf16_products`), which
converts the FP32 operands to BF16 (exact here) at every call, multiplies them on the
same units and returns FP32 (1.2-1.4x the FP32 GEMM's speed on these shapes). Both give
the FP32 kernel's result up to summation order. Under ``"auto"`` GEMMs below 2**21
multiply-adds keep the plain FP32 kernel (the set-up costs more there). The math mode is
a process-wide oneDNN setting, switched on around each such GEMM and restored after it
(1 us): an FP32 GEMM another thread runs at that moment would run in it too. oneDNN's
convolutions gained nothing from the mode (measured on the CNN's layers), so
convolutions take ``"fp32"`` instead.

FP16 operands (recipe ``fp16``: 11 significant bits) are not BF16 values. Where a GEMM's
operands are FP16 values (FP16 or an unscaled FP8 format), its result is FP16 rounded to
nearest and it has no bias, it runs as ``"fp16"`` on CPUs with native FP16 arithmetic
(:func:`native_fp16`: AVX512-FP16 or AMX-FP16, through oneDNN, and a probe that the
kernel accumulates in FP32 and rounds once): products of two FP16 values are exact in
FP32, so the kernel's one rounding of its FP32 sum is the emulation's. On a CPU with
AVX512-FP16 but not AMX-FP16 it runs at the FP32 GEMM's speed and saves the conversions
of the operands to float32 and of the result back to FP16. torch's FP16 linear adds a
bias after its rounding (or rounds an FP32 bias to FP16 first), so GEMMs with a bias
keep the FP32 kernel, as do convolutions (unmeasured in FP16).

The BF16 kernel with a result narrower than BF16 rounds the FP32 sum to BF16 and the
emulation then rounds that to E5M2: a double rounding, which differs from the single
one where the FP32 sum lies within half a BF16 step of an E5M2 rounding boundary. That
path is off by default and opt-in with ``gemm_kernels(double_rounding=True)``; measured
on random E5M2 operands (K=256, round to nearest), 1.58% of outputs land one E5M2 step
away (``tests/nn/test_kernels.py`` measures and bounds it).

Deviations of the BF16 paths, besides the order of the FP32 summation: the native
instructions treat BF16 subnormal inputs (|x| < 2**-126) as zero and flush subnormal
sums to zero, where the FP32 GEMM keeps FP32 subnormals. Values that small occur only
far outside the range any recipe scales tensors into.

Which path runs: :func:`gemm_kernels` sets the policy for the GEMMs called inside it
(a context manager, per thread, restored on exit, as torch.autocast): ``"auto"`` (the
default, or the ``MIXPREC_GEMM_KERNELS`` environment variable's value) takes the BF16
paths (``"bf16"``, ``"bf16-fp32"``) where they are exact and the device has native
BF16 dot products (:func:`native_bf16`: on CPU ``avx512_bf16`` or AMX-BF16 with
oneDNN; decided by torch's own capability checks at first use and cached per process,
never at import and never from the CPU's name), and the FP16 path where it is exact and
the device has native FP16 (:func:`native_fp16`); ``"bf16"`` takes these 16-bit paths
wherever they are exact, on any machine and at any size (tests: slow where the CPU
lacks native BF16 or FP16); ``"fp32"`` never takes them. The policy a
forward ran under is kept with its call, so the backward GEMMs of that forward run
under it too, wherever ``backward()`` is called.

CUDA: a 2-D (or batch-flattened) GEMM of two per-tensor-scaled FP8 operands (E4M3 or
E5M2 storage, power-of-two scales or none, not both E5M2) runs on FP8 tensor cores
through ``torch._scaled_mm`` where the device has them (compute capability 8.9 or
higher, checked at first use), under ``"auto"`` and ``"bf16"``: the operands' 1-byte
storage goes in with their scales, the output is FP32 (FP32 accumulation, the scales
applied to the FP32 sum: exact for power-of-two scales), and the emulation then adds
the bias and rounds once to the result format, as on the FP32 path. Dimensions that
are not multiples of 16 fall back to the FP32 kernel. :func:`scaled_mm` is that path.
No GPU was available where this was written: it is untested, and
``tests/nn/test_kernels.py`` holds its test, skipped without CUDA. Otherwise ``"auto"``
keeps FP32 kernels on CUDA (a BF16 cuBLAS GEMM may reduce split-K partial sums in BF16
unless ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` is off,
which this module would have to check). ``"bf16"`` forced on CUDA runs torch's BF16
GEMM there; that path is untested too.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.flop_counter import register_flop_formula

from mixprec.core import native
from mixprec.core.formats import BlockFormat, FloatFormat
from mixprec.core.kernels import serial_threads
from mixprec.core.native import PackedBF16
from mixprec.nn.state import Quantized
from mixprec.recipe import Operand

__all__ = ["GemmPath", "KernelMode", "KernelPolicy", "gemm_kernels", "current_policy", "native_bf16",
           "native_fp16", "fused_bias_exact", "probe", "bf16_exact", "bf16_exact_unscaled", "fp16_exact", "choose", "kernel_rounds_to", "bf16_values",
           "kernel_values", "linear_bf16", "matmul",
           "bf16_products", "fp8_tensor_cores", "scaled_mm"]

GemmPath = Literal["fp32", "bf16", "bf16-fp32", "fp16"]
"""The kernel an emulated GEMM runs: torch's FP32 GEMM; its BF16 GEMM (BF16 operands,
FP32 accumulation, BF16 result); ``"bf16-fp32"``, its FP32 GEMM in oneDNN's BF16 math
mode (operands that are BF16 values multiplied on the BF16 units, FP32 accumulation,
FP32 result: :func:`matmul`); or its FP16 GEMM (FP16 operands, FP32 accumulation, FP16
result)."""

KernelMode = Literal["auto", "fp32", "bf16"]
"""``"auto"``: BF16 (and FP16) kernels where exact and native; ``"bf16"``: wherever
exact; ``"fp32"``: never."""

_MODES = ("auto", "fp32", "bf16")
_ENV = "MIXPREC_GEMM_KERNELS"
# BF16's grid: 8 significant bits, FP32's exponent range (subnormals down to 2**-133)
_BF16_MANTISSA = 7
_BF16_SMALLEST_SUBNORMAL = 2.0**-133
_BF16_LARGEST = float(torch.finfo(torch.bfloat16).max)
_FP16_MANTISSA = 10
_FP16_SMALLEST_SUBNORMAL = 2.0**-24
_FP16_LARGEST = 65504.0


@dataclass(frozen=True)
class KernelPolicy:
    """Which kernels emulated GEMMs may use: ``mode`` (:data:`KernelMode`) and whether a
    result narrower than BF16 may be rounded from a BF16 GEMM's output
    (``double_rounding``, off by default: see the module docstring)."""

    mode: KernelMode = "auto"
    double_rounding: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"GEMM kernel mode must be one of {', '.join(_MODES)}, not {self.mode!r}")
        if not isinstance(self.double_rounding, bool):
            raise TypeError(f"double_rounding is a bool, not {type(self.double_rounding).__name__}")


class _PolicyState(threading.local):
    """The policy in force in this thread: the environment's mode until a
    :func:`gemm_kernels` block changes it (and restores it on exit)."""

    def __init__(self) -> None:
        mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
        if mode not in _MODES:
            warnings.warn(f"{_ENV}={mode!r} is not one of {_MODES}; using 'auto'", RuntimeWarning, stacklevel=2)
            mode = "auto"
        self.policy = KernelPolicy(mode)  # type: ignore[arg-type]


_state = _PolicyState()


def current_policy() -> KernelPolicy:
    """The :class:`KernelPolicy` in force in this thread."""
    return _state.policy


@contextmanager
def gemm_kernels(mode: KernelMode = "auto", *, double_rounding: bool = False) -> Iterator[KernelPolicy]:
    """Run the emulated GEMMs of the forwards inside the block (and their backward GEMMs,
    wherever ``backward()`` runs) under ``mode``: ``"auto"`` (BF16 kernels where they give
    the emulation's result and the device has native BF16 dot products), ``"bf16"``
    (BF16 kernels wherever they give it, on any machine), ``"fp32"`` (FP32 kernels
    only). ``double_rounding=True`` also lets results narrower than BF16 (E5M2) be
    rounded from a BF16 GEMM's output, which differs from the emulation's single
    rounding on a small share of outputs (see :mod:`mixprec.nn.kernels`). The previous
    policy is restored on exit; the ``MIXPREC_GEMM_KERNELS`` environment variable sets
    the mode outside any block."""
    policy = KernelPolicy(mode, double_rounding)
    previous = _state.policy
    _state.policy = policy
    try:
        yield policy
    finally:
        _state.policy = previous


# ---- capabilities: probed at first use, cached per process ---------------------------------

_capabilities: dict[str, bool] = {}


def _capability(key: str, probe: Callable[[], bool]) -> bool:
    """``probe()``'s answer, cached for the process under ``key``. While torch.compile
    traces nothing is probed (False): the eager warm-up or :func:`probe` fills the cache."""
    if key not in _capabilities:
        if torch.compiler.is_compiling():
            return False
        _capabilities[key] = probe()
    return _capabilities[key]


def _probe_native_bf16(device_type: str) -> bool:
    if device_type != "cpu":
        return False  # CUDA: FP32 kernels under "auto" (see the module docstring)
    if not torch.backends.mkldnn.is_available():
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs torch's BF16 GEMMs on native BF16 dot products (CPU:
    ``avx512_bf16`` or AMX-BF16, through oneDNN), by torch's own capability checks at
    the first call, cached for the process. Always False on CUDA (FP32 kernels there)."""
    device_type = torch.device(device).type
    return _capability(f"native_bf16:{device_type}", lambda: _probe_native_bf16(device_type))


def _probe_native_fp16(device_type: str) -> bool:
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return False  # no AVX512-FP16 or AMX-FP16: torch's FP16 GEMM runs a slow fallback
    # FP32 accumulation, one rounding at the end: 1 + 4096 * 2**-11 is 3 in FP32 sums,
    # 1 in FP16 ones (each 2**-11 is half an FP16 step at 1, a tie to even)
    left = torch.full((2, 4097), 2.0**-11, dtype=torch.float16)
    left[:, 0] = 1.0
    right = torch.ones(4097, 2, dtype=torch.float16)
    with torch.no_grad():
        return bool((torch.matmul(left, right) == 3.0).all())


def native_fp16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs torch's FP16 GEMMs on native FP16 instructions (CPU:
    oneDNN's check for AVX512-FP16 or AMX-FP16) accumulating in FP32 and rounding once
    (checked on a sum FP16 accumulation gets wrong), at the first call, cached for the
    process. Always False on CUDA. (torch's FP16 linear adds an FP32 bias after the
    rounding, or in FP16, so the FP16 path serves GEMMs without a bias.)"""
    device_type = torch.device(device).type
    return _capability(f"native_fp16:{device_type}", lambda: _probe_native_fp16(device_type))


def _linear_op() -> object | None:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return getattr(mkldnn, "_linear_pointwise") if mkldnn is not None else None
    except (AttributeError, RuntimeError):
        return None


def _probe_fused_bias() -> bool:
    op = _linear_op()
    if op is None:
        return False
    # x @ w = 1 + 2**-8: a tie between BF16 neighbours 1 and 1 + 2**-7 (RNE gives 1). A
    # bias of 2**-20 added before the rounding breaks the tie upwards; added after a
    # BF16 rounding it is lost.
    x = torch.tensor([[1.0, 2.0**-8]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    bias = torch.tensor([2.0**-20])
    try:
        with torch.no_grad():
            y = op(x, w, bias, "none", [], "")  # type: ignore[operator]
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return y.dtype == torch.bfloat16 and float(y.float().reshape(())) == 1.0 + 2.0**-7


def fused_bias_exact() -> bool:
    """Whether oneDNN's BF16 linear (``torch.ops.mkldnn._linear_pointwise``) exists and
    adds an FP32 bias before its one rounding to BF16 (checked once per process on a
    case that tells the two orders apart)."""
    return _capability("fused_bias", _probe_fused_bias)


def probe(device: torch.device | str = "cpu") -> None:
    """Fill the capability cache for ``device`` now (``convert`` calls this, so that a
    model compiled before its first eager forward still finds the answers: the checks
    do not run while torch.compile traces)."""
    native_bf16(device)
    native_fp16(device)
    if torch.device(device).type == "cpu":
        fused_bias_exact()


def _probe_fp8_tensor_cores(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_tensor_cores(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies FP8 operands on tensor cores through
    ``torch._scaled_mm`` (CUDA, compute capability 8.9 or higher), checked at the first
    call and cached for the process; False on CPUs."""
    device = torch.device(device)
    return _capability(f"fp8_tensor_cores:{device}", lambda: _probe_fp8_tensor_cores(device))


# ---- which operands and results the BF16 path serves exactly --------------------------------


def _scalar_in_bf16(fmt: FloatFormat) -> bool:
    return (fmt.mantissa_bits <= _BF16_MANTISSA and fmt.smallest_subnormal >= _BF16_SMALLEST_SUBNORMAL
            and fmt.largest <= _BF16_LARGEST)


def bf16_exact(operand: Operand) -> bool:
    """Whether every value ``operand`` can produce is a BF16 value: a scalar format of
    at most 7 mantissa bits inside BF16's range, unscaled or with a power-of-two
    per-tensor scale; or a block format whose element times block scale has at most 8
    significant bits (E8M0 scales: MX; E4M3 scales over E2M1: NVFP4's blocks) and no
    FP32 tensor scale. (A power-of-two scale can push values below 2**-126, where the
    native instructions flush them: see the module docstring.)"""
    fmt = operand.fmt
    if isinstance(fmt, BlockFormat):
        return fmt.bf16_values
    if not _scalar_in_bf16(fmt):
        return False
    return operand.scaling is None or operand.scaling.power_of_two


def bf16_exact_unscaled(operand: Operand) -> bool:
    """Whether ``operand`` has an FP32 tensor scale (NVFP4) over values that are BF16
    values without it (:attr:`BlockFormat.block_bf16_values`): its GEMMs take those and
    apply the operands' tensor scales to the FP32 sum, as NVFP4 hardware does
    (``alpha`` in its epilogue), so they run on the BF16 units as ``"bf16-fp32"``."""
    fmt = operand.fmt
    return isinstance(fmt, BlockFormat) and fmt.tensor_scale and fmt.block_bf16_values


def fp16_exact(operand: Operand) -> bool:
    """Whether every value ``operand`` can produce is an FP16 value: an unscaled scalar
    format of at most 10 mantissa bits inside FP16's range (FP16 itself, the FP8
    formats; a per-tensor scale could move values out of that range)."""
    fmt = operand.fmt
    return (isinstance(fmt, FloatFormat) and operand.scaling is None and fmt.mantissa_bits <= _FP16_MANTISSA
            and fmt.smallest_subnormal >= _FP16_SMALLEST_SUBNORMAL and fmt.largest <= _FP16_LARGEST)


def kernel_rounds_to(result: Operand, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The kernel's own rounding to ``dtype`` is the emulation's: that dtype's format,
    to nearest, no scale, overflowing to infinity as the kernel's conversion does."""
    fmt = result.fmt
    return (isinstance(fmt, FloatFormat) and fmt.torch_dtype == dtype and result.rounding == "nearest"
            and result.scaling is None and fmt.overflow == "inf")


def choose(operands: Sequence[Operand], result: Operand, policy: KernelPolicy, device: torch.device | str,
           bias: bool = False) -> GemmPath:
    """The kernel for a GEMM of ``operands`` (every operand entering the product) whose
    FP32 sum is rounded to ``result``, with a ``bias`` added before that rounding or
    not, under ``policy`` on ``device``: ``"bf16"`` where that path gives the
    emulation's result up to summation order (or, opted in, a double rounding to a
    narrower result); else ``"bf16-fp32"`` where the operands are BF16 values on a CPU
    (the FP32 sum on the BF16 units: a narrower, stochastic or scaled result, or a bias
    the BF16 kernel cannot fuse); else ``"fp16"`` where the operands are FP16 values and
    the result FP16 rounded to nearest, without a bias (torch's FP16 linear does not add
    an FP32 one before its rounding: :func:`native_fp16`), on a CPU with native FP16 arithmetic; else
    ``"fp32"``."""
    device = torch.device(device)
    if policy.mode == "fp32":
        return "fp32"
    # tensor-scaled operands: the scales multiply the FP32 sum, never a BF16 result
    unscaled = any(bf16_exact_unscaled(op) for op in operands)
    if not all(bf16_exact(op) or bf16_exact_unscaled(op) for op in operands):
        fp16 = (device.type == "cpu" and not bias and kernel_rounds_to(result, torch.float16)
                and all(fp16_exact(op) for op in operands) and (policy.mode == "bf16" or native_fp16(device)))
        return "fp16" if fp16 else "fp32"
    if policy.mode == "auto" and not native_bf16(device):
        return "fp32"
    narrower = (policy.double_rounding and isinstance(result.fmt, FloatFormat) and bf16_exact(result)
                and result.fmt.torch_dtype != torch.bfloat16)
    fused = not bias or (device.type == "cpu" and fused_bias_exact())
    if (kernel_rounds_to(result) or narrower) and fused and not unscaled:
        return "bf16"
    # the FP32 sum itself is needed (a narrower, stochastic or scaled result, an FP32
    # bias added after the GEMM): BF16 products in oneDNN's FP32 GEMM, on CPUs
    # (torch._C._has_mkldnn is what torch.backends.mkldnn.is_available() reads; dynamo
    # refuses to trace that function, and reads the flag as a constant)
    return "bf16-fp32" if device.type == "cpu" and torch._C._has_mkldnn else "fp32"


# ---- the BF16 path's pieces ---------------------------------------------------------------


def kernel_values(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """A rounded operand's values as a ``dtype`` tensor (BF16 or FP16, one the operand's
    values all fit: :func:`bf16_exact`, :func:`fp16_exact`), exactly: its storage itself
    where that is already ``dtype`` and unscaled, else decoded from its storage (FP8
    storage straight into ``dtype``) or its float32 values."""
    if q.layout is None and q.scale is None and q.storage.dtype == dtype:
        return q.storage  # values in their own dtype's storage: no copy
    return q.values_as(dtype)


def bf16_values(q: Quantized) -> torch.Tensor:
    """:func:`kernel_values` in BF16 (an operand :func:`bf16_exact` accepts)."""
    return kernel_values(q, torch.bfloat16)


@torch.library.custom_op("mixprec::linear_bf16", mutates_args=())
def _linear_bf16_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    op = _linear_op()
    assert op is not None, "linear_bf16 runs only where fused_bias_exact() is True"
    return op(x.contiguous(), weight.contiguous(), bias, "none", [], "")  # type: ignore[operator]


@_linear_bf16_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@register_flop_formula(torch.ops.mixprec.linear_bf16)
def _linear_bf16_flops(x_shape: Sequence[int], w_shape: Sequence[int], *args: object, **kwargs: object) -> int:
    # what torch's FlopCounterMode (and mixprec.coverage) counts for it: the GEMM's
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` of BF16 ``x`` and ``weight`` (out x in) and an FP32
    ``bias``, accumulated in FP32 with the bias and rounded once to BF16 (oneDNN's
    linear; only where :func:`fused_bias_exact`). A custom op, so that torch.compile
    calls it as it is (inductor lowers oneDNN's linear only for frozen weights)."""
    return _linear_bf16_op(x, weight, bias.float())


# ---- the BF16-products path: oneDNN's FP32 GEMM in BF16 math mode ---------------------------

# multiply-adds below which oneDNN's BF16 math mode cost more than it saved under "auto"
# (measured here: an FP32 GEMM of 32x64x64 took 9 us, in BF16 math mode 54 us;
# 512x1024x1024 4.8 ms against 2.1 ms)
_BF16_PRODUCTS_MIN_MACS = 1 << 21


@contextmanager
def bf16_products() -> Iterator[None]:
    """Inside the block, torch's FP32 GEMMs on oneDNN (CPU ``mm``, ``bmm``, ``matmul``,
    ``linear``) round their FP32 operands to BF16 and multiply those on the BF16 units,
    accumulating and returning FP32 (oneDNN's BF16 math mode, torch's
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). Exact only for operands
    that are BF16 values (:func:`bf16_exact`): it changes every other operand. The
    setting is process-wide; it is restored on exit."""
    flags = torch.backends.mkldnn.matmul
    previous = flags.fp32_precision
    flags.fp32_precision = "bf16"
    try:
        yield
    finally:
        flags.fp32_precision = previous


def _native_dot(device: torch.device) -> bool:
    """Whether the native GEMM on BF16 dot products (:func:`mixprec.core.native.gemm_bf16`)
    serves ``"bf16-fp32"`` on ``device``: a CPU whose native library was built with
    AVX512_BF16, checked at first use and cached for the process."""
    return device.type == "cpu" and _capability("native_bf16_dot", native.bf16_dot_available)


def pack_right(b: torch.Tensor, path: GemmPath, policy: KernelPolicy, rows: int) -> PackedBF16 | None:
    """A 2-D right operand that :func:`matmul` will take many times (a recurrent weight,
    at each time step, by left operands of ``rows`` rows), packed once for the native
    BF16 dot-product GEMM where its GEMMs run there; else None (pass ``b`` itself)."""
    if (path != "bf16-fp32" or b.dim() != 2 or torch.compiler.is_compiling() or not _native_dot(b.device)
            or (policy.mode == "auto" and rows * b.shape[0] * b.shape[1] < _BF16_PRODUCTS_MIN_MACS)):
        return None
    return native.pack_bf16(b, serial_threads(b.numel()))


# The native GEMM as an operator, so that torch's FLOP counter (coverage counts its FLOPs),
# dispatch modes and profiler see it: a plain library op costs about 5 us a call, where
# torch.library.custom_op's wrappers cost 14 (a recurrence calls it at every time step).
_OPS = torch.library.Library("mixprec", "FRAGMENT")
_OPS.define("gemm_bf16_packed(Tensor a, Tensor words, int k, int n) -> Tensor")


def _gemm_bf16_packed_cpu(a: torch.Tensor, words: torch.Tensor, k: int, n: int) -> torch.Tensor:
    return native.gemm_bf16(a, PackedBF16(words, k, n), torch.get_num_threads())


def _gemm_bf16_packed_meta(a: torch.Tensor, words: torch.Tensor, k: int, n: int) -> torch.Tensor:
    return a.new_empty((a.shape[0], n), dtype=torch.float32)


_OPS.impl("gemm_bf16_packed", _gemm_bf16_packed_cpu, "CPU")
_OPS.impl("gemm_bf16_packed", _gemm_bf16_packed_meta, "Meta")


@register_flop_formula(torch.ops.mixprec.gemm_bf16_packed)
def _gemm_bf16_packed_flops(a_shape: Sequence[int], words_shape: Sequence[int], k: int, n: int, *args: object,
                            **kwargs: object) -> int:
    return 2 * a_shape[0] * k * n


def _packed_product(a: torch.Tensor, b: PackedBF16) -> torch.Tensor:
    """``a @ b`` (``a`` of at least two dimensions) on the native GEMM."""
    product = torch.ops.mixprec.gemm_bf16_packed(a.reshape(-1, a.shape[-1]), b.words, b.k, b.n)
    return product.view(*a.shape[:-1], b.n)


def _bf16_sum_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` of operands holding BF16 values, summed in FP32 on the BF16
    units: the native GEMM for a 2-D ``b`` where the library has it, else oneDNN's BF16
    math mode (:func:`bf16_products`)."""
    if b.dim() == 2 and a.dim() >= 2 and a.dtype == b.dtype and b.dtype in (torch.float32, torch.bfloat16) \
            and a.device == b.device and _native_dot(b.device):
        return _packed_product(a, native.pack_bf16(b, serial_threads(b.numel())))
    with bf16_products():
        return torch.matmul(a, b)


@torch.library.custom_op("mixprec::matmul_bf16_products", mutates_args=())
def _matmul_bf16_products_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _bf16_sum_eager(a, b)


@_matmul_bf16_products_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


@register_flop_formula(torch.ops.mixprec.matmul_bf16_products)
def _matmul_bf16_products_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args: object,
                                **kwargs: object) -> int:
    batch = math.prod(torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


def matmul(a: torch.Tensor, b: torch.Tensor | PackedBF16, path: GemmPath, policy: KernelPolicy) -> torch.Tensor:
    """``torch.matmul(a, b)`` of two operands of at least two dimensions on ``path``'s
    kernel: on ``"bf16-fp32"`` (operands holding BF16 values) their FP32 sum on the BF16
    units (:func:`_bf16_sum_eager`: the native GEMM, else oneDNN's BF16 math mode),
    except under ``policy`` ``"auto"`` for GEMMs too small to gain from it; otherwise
    torch's own. ``b`` may come packed (:func:`pack_right`). Under torch.compile the
    BF16-units GEMM is a custom op, so that it runs as it is."""
    if isinstance(b, PackedBF16):
        return _packed_product(a, b)
    if path != "bf16-fp32":
        return torch.matmul(a, b)
    if policy.mode == "auto" and a.numel() * b.shape[-1] < _BF16_PRODUCTS_MIN_MACS:
        return torch.matmul(a, b)
    if torch.compiler.is_compiling():
        return torch.ops.mixprec.matmul_bf16_products(a, b)
    return _bf16_sum_eager(a, b)


# ---- the FP8 tensor-core path (CUDA) --------------------------------------------------------

_FP8_STORAGE = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_operand(q: Quantized) -> bool:
    return (q.layout is None and q.storage.dtype in _FP8_STORAGE and bf16_exact(q.operand)
            and (q.scale is None or q.scale.numel() == 1))


def scaled_mm(left: Quantized, right: Quantized, policy: KernelPolicy, *, transpose_left: bool = False,
              transpose_right: bool = False) -> torch.Tensor | None:
    """``op(left) @ op(right)`` (``op`` transposes the last two dimensions where asked) on
    FP8 tensor cores, as FP32: ``torch._scaled_mm`` of the operands' 1-byte storage with
    their per-tensor scales, FP32 accumulation, FP32 output for the caller to round once.
    ``left`` may have batch dimensions (flattened into rows; only untransposed),
    ``right`` is 2-D. None where this path does not serve the GEMM (policy ``"fp32"``, a
    device without FP8 tensor cores, operands that are not per-tensor FP8 with
    power-of-two or no scales, both E5M2, a dimension not a multiple of 16, batched
    operands): the caller then takes its FP32 or BF16 kernel. Untested here (no GPU):
    see the module docstring."""
    a, b = left.storage, right.storage
    if (policy.mode == "fp32" or not fp8_tensor_cores(a.device)
            or not (_fp8_operand(left) and _fp8_operand(right)) or b.dim() != 2
            or (a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2)
            or (transpose_left and a.dim() != 2)):
        return None
    lead = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])
    a = a.t() if transpose_left else a
    b = b.t() if transpose_right else b
    if a.shape[1] != b.shape[0] or any(d % 16 for d in (*a.shape, b.shape[1])):
        return None
    one = torch.ones((), dtype=torch.float32, device=a.device)
    scale_a = left.scale.reshape(()).float() if left.scale is not None else one
    scale_b = right.scale.reshape(()).float() if right.scale is not None else one
    # _scaled_mm takes a row-major left and a column-major right operand
    y = torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                         out_dtype=torch.float32)
    return y if transpose_left else y.reshape(*lead, b.shape[1])
