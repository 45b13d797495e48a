"""The rounding kernel: float32 values onto a format's grid by integer arithmetic on
their bits, run eagerly or fused by ``torch.compile``.

Rounding works on the 32-bit pattern of each float32 value, so it is exact and
independent of the floating-point environment (no FPU rounding mode, no flush-to-zero,
no fast-math reassociation can change a result). Eager and compiled paths run the same
torch integer operations and give bit-identical results; the compiled one fuses them
into a single pass over memory (inductor emits a vectorised C++ loop on CPU and a
Triton kernel on CUDA), which is 50-100x faster than the eager chain of ~25 operations.

Random bits for stochastic rounding come from a counter-based hash of each element's
flat index and a 64-bit key drawn from a ``torch.Generator``, so they are reproducible,
identical on every device, and need no random tensor in memory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from mixprec.core import native
from mixprec.core.formats import FloatFormat, Overflow
from mixprec.core.vector_bitcasts import vector_bitcasts

__all__ = ["Backend", "kernel_backend", "current_backend", "round_to_format", "run_variant", "COMPILE_MIN_NUMEL"]

Backend = Literal["auto", "eager", "compiled"]
"""``"eager"``: plain torch ops. ``"compiled"``: always the ``torch.compile`` kernel
(errors propagate). ``"auto"``: compiled for tensors of at least
:data:`COMPILE_MIN_NUMEL` elements where it works, eager otherwise."""

COMPILE_MIN_NUMEL = 2
"""Below this many elements quantize runs eagerly: sizes 0 and 1 would each cost dynamo
a recompilation. From 2 elements on a compiled call (~60 us of guards and wrappers) is
cheaper than the eager chain of ~25 operations (measured: 16 to 4,096 elements, 135-200
us compiled against 270-710 us eager, and 65-85 us compiled since small kernels run on
one thread under a passive OpenMP, :data:`SERIAL_BELOW_PASSIVE`; once 4,096, which left
every bias, norm weight and small convolution kernel of a small model on the eager
chain)."""

_INT32_MIN = -(2**31)
_F32_INF_BITS = 0x7F800000
_F32_QNAN_BITS = 0x7FC00000
_ABS_MASK = 0x7FFFFFFF

# Odd 32-bit multipliers of the murmur3 finaliser, as signed int32 (torch has no uint32
# arithmetic on CPU); int32 multiplication wraps modulo 2**32 on every backend.
_MIX1 = 0x85EBCA6B - 2**32
_MIX2 = 0xC2B2AE35 - 2**32
_GOLDEN = 0x9E3779B9 - 2**32

_VALID_BACKENDS = ("auto", "eager", "compiled")


class _BackendState(threading.local):
    def __init__(self) -> None:
        env = os.environ.get("MIXPREC_KERNEL", "auto")
        if env not in _VALID_BACKENDS:
            warnings.warn(
                f"MIXPREC_KERNEL={env!r} is not one of {_VALID_BACKENDS}; using 'auto'",
                RuntimeWarning,
                stacklevel=2,
            )
            env = "auto"
        self.backend: str = env


_state = _BackendState()
_compiled: dict[str, Callable[..., torch.Tensor | None]] = {}
_compile_broken: list[str] = []  # why compiled calls failed in "auto" mode, if they did
_MAX_COMPILE_FAILURES = 3  # after this many failures "auto" stops trying to compile


def current_backend() -> Backend:
    """The kernel backend in force in this thread (set by :func:`kernel_backend` or the
    ``MIXPREC_KERNEL`` environment variable)."""
    return _state.backend  # type: ignore[return-value]


@contextmanager
def kernel_backend(backend: Backend) -> Iterator[None]:
    """Run the enclosed code with the given kernel backend, restoring the previous one
    on exit; results are bit-identical across backends, only speed differs."""
    if backend not in _VALID_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {_VALID_BACKENDS}")
    previous = _state.backend
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


# ---- parameters ------------------------------------------------------------------------


def _f32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


_params_cache: dict[tuple[FloatFormat, str, torch.device], torch.Tensor] = {}
_float_nearest_cache: dict[tuple[FloatFormat, str], bool] = {}


# Run as it is while torch.compile traces (its result is a constant of the format): a
# model compiled before its eager steps had seen a format traced struct.pack, which sent
# dynamo's polyfill of it into endless recursion (mixprec bench step with several
# +compile configurations in one process).
@torch.compiler.assume_constant_result
def param_values(fmt: FloatFormat, overflow: Overflow) -> tuple[int, ...]:
    """The kernel's int32 parameters for ``fmt`` and ``overflow``, as Python ints:
    shift, largest's bits, overflow result's bits, the float32 biased exponent below
    which the grid stops shrinking, the smallest subnormal's bits, the bits dropped in
    float32's subnormal range, the smallest result's bits, the invalid-input bound."""
    shift = 23 - fmt.mantissa_bits
    min_exp_biased = fmt.min_exponent + 127  # float32 biased exponent of the smallest normal
    # Below this float32 exponent the grid spacing stops shrinking (the format's
    # subnormals). Formats whose normal range starts where float32's does need no such
    # floor: float32's own subnormals share its smallest binade's spacing.
    subnormal_below = min_exp_biased if min_exp_biased > 1 else 0
    max_bits = _f32_bits(fmt.largest)
    overflow_bits = {"inf": _F32_INF_BITS, "saturate": max_bits, "nan": _F32_QNAN_BITS}[overflow]
    if min_exp_biased >= 1:
        f32_subnormal_drop = shift + max(subnormal_below - 1, 0)  # what the exponent clamp gives
    else:
        # A format reaching below float32's normals (E8M0's 2**-127): float32's subnormal
        # range is its lowest binade, with spacing 2**min_exponent.
        f32_subnormal_drop = shift + min_exp_biased - 1
    # No zero: results never go below the smallest value. Unsigned: inputs whose int32
    # pattern is below this are invalid (negatives; zero too where there is no zero).
    min_bits = 0 if fmt.has_zero else _f32_bits(fmt.smallest_subnormal)
    invalid_below = _INT32_MIN if fmt.signed else (0 if fmt.has_zero else 1)
    return (shift, max_bits, overflow_bits, subnormal_below, _f32_bits(fmt.smallest_subnormal),
            f32_subnormal_drop, min_bits, invalid_below)


def float_nearest(fmt: FloatFormat, overflow: Overflow) -> bool:
    """:func:`float_nearest_ok` for ``fmt`` and ``overflow`` (cached)."""
    key = (fmt, overflow)
    cached = _float_nearest_cache.get(key)
    if cached is None:
        cached = float_nearest_ok(param_values(fmt, overflow))
        if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
            _float_nearest_cache[key] = cached
    return cached


def _params(fmt: FloatFormat, overflow: Overflow, device: torch.device) -> torch.Tensor:
    """The int32 parameter vector the kernel reads (:func:`param_values`), one per
    format, overflow mode and device (cached: building a tensor per call would cost more
    than small kernels)."""
    key = (fmt, overflow, device)
    cached = _params_cache.get(key)
    if cached is not None:
        return cached
    params = torch.tensor(param_values(fmt, overflow), dtype=torch.int32, device=device)
    if not torch.compiler.is_compiling():  # a traced write to a global would break the graph
        _params_cache[key] = params
    return params


# ---- the kernel ------------------------------------------------------------------------


def _hash_bits(numel_like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """32 pseudo-random bits per element: the murmur3 finaliser (a bijection with full
    avalanche) over the element's flat index, keyed by the two int32 words of ``key``
    (one before and one after an odd multiply, so each key is its own permutation).
    ``numel_like`` is contiguous; the index takes its shape (the block kernels round
    in their blocked layout, so that the block scales broadcast without a reshape)."""
    index = torch.arange(numel_like.numel(), dtype=torch.int32, device=numel_like.device)
    index = index.view(numel_like.shape)
    h = ((index ^ key[1]) * _GOLDEN) ^ key[0]
    h = h ^ ((h >> 16) & 0xFFFF)  # logical shifts, spelled for signed int32
    h = h * _MIX1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _MIX2
    return h ^ ((h >> 16) & 0xFFFF)


def _round_bits(x: torch.Tensor, p: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
    """Round float32 ``x`` onto the grid ``p`` describes; ``key`` selects stochastic
    rounding. Returns float32.

    Within a binade float32's bit pattern is linear in the value, and so is it across
    float32's subnormals. A grid spacing of ``2**s`` float32 ulps is therefore met by
    adding a rounding increment below bit ``s`` of the 31-bit magnitude pattern and
    clearing those bits; a carry runs into the exponent, which is exactly the next grid
    point. ``s`` is ``23 - mantissa_bits`` in the format's normal range and grows by one
    per binade below it (the subnormal range, where the spacing stays fixed).
    Round-to-nearest-even adds half a spacing minus one plus the kept lowest bit of the
    significand; stochastic rounding adds uniform random bits, so it rounds up with
    probability (x - lo) / (hi - lo).

    Once the spacing outgrows the value (``s >= 24``: x is below the smallest subnormal)
    the result is 0 or the smallest subnormal: up past the midpoint for nearest, with
    probability ``significand * 2**-s`` for stochastic.

    Formats with no zero (E8M0) clamp results up to their smallest value; unsigned
    formats give NaN for negative inputs (and for zero where there is no zero).
    """
    shift, max_bits, overflow_bits, subnormal_below, step_bits = p[0], p[1], p[2], p[3], p[4]
    f32_subnormal_drop, min_bits, invalid_below = p[5], p[6], p[7]
    bits = x.view(torch.int32)
    magnitude = bits & _ABS_MASK
    sign = bits & _INT32_MIN
    exponent = torch.clamp(magnitude >> 23, min=1)  # float32 subnormals share binade 1's spacing
    # The significand with its implicit bit (none for float32 subnormals, exponent 0).
    significand = magnitude - ((exponent - 1) << 23)
    drop = shift + torch.clamp(subnormal_below - exponent, min=0)
    drop = torch.where(magnitude < (1 << 23), f32_subnormal_drop, drop)

    if key is None:
        drop = torch.clamp(drop, max=25)  # from 25 on everything rounds to zero
        drop_mask = (1 << drop) - 1
        # The kept lowest bit of the significand decides ties; with no mantissa bits it
        # is the implicit leading bit, so ties go to the even multiple of the spacing,
        # as torch's and ml_dtypes' e8m0 casts do.
        increment = (drop_mask >> 1) + ((significand >> drop) & 1 & drop_mask)
        tiny_up = significand > ((1 << drop) >> 1)
    else:
        random = _hash_bits(x, key)
        drop = torch.clamp(drop, max=61)
        drop_mask = (1 << torch.clamp(drop, max=24)) - 1
        increment = random & drop_mask
        # 30 random bits resolve the round-up probability significand * 2**-drop to
        # 2**-30 of a spacing; below that the significand's low bits are truncated.
        threshold = (significand << torch.clamp(30 - drop, min=0)) >> torch.clamp(drop - 30, min=0, max=31)
        tiny_up = (random & 0x3FFFFFFF) < threshold

    rounded = (magnitude + increment) & ~drop_mask
    tiny = torch.where(tiny_up, step_bits, 0)
    result = torch.where(drop >= 24, tiny, rounded)
    result = torch.where(result > max_bits, overflow_bits, result)
    result = torch.maximum(result, min_bits)
    result = torch.where(magnitude > _F32_INF_BITS, magnitude, result)  # NaN stays NaN
    result = torch.where(bits < invalid_below, _F32_QNAN_BITS, result | sign)
    return result.view(torch.float32)


def nearest_steps(magnitude: torch.Tensor, mantissa_bits: torch.Tensor, step_min: torch.Tensor) -> torch.Tensor:
    """Round to nearest even, in float arithmetic, the nonnegative finite float32 values
    whose int32 bits are ``magnitude`` onto the grid of ``mantissa_bits``-bit significands
    whose spacing stops shrinking at ``2**(step_min - 127)`` (``step_min``, at least 2, is
    the biased float32 exponent of the grid's smallest subnormal), without a largest
    value. Returns the result's int32 bits (Inf's where the result overflows float32).

    ``magnitude`` must be finite: Inf would meet a zero inverse. Every float operation
    is exact: in binade E the spacing is ``s = 2**max(E - m, step_min - 127)``, a power
    of two whose inverse is a float32 normal, so ``x * (1/s)`` is x's value in steps (a
    normal float32 of at most m + 1 integer bits), ``round`` (half to even) picks the
    grid point, and ``q * s`` is exact. Values at or below half the smallest spacing
    round to zero (ties to the even zero) and are zeroed before the multiply, so no
    operand or product is a float32 subnormal, which would cost a microcode assist per
    vector on x86. About 15 vector operations per element against :func:`_round_bits`'
    45: 1.6x faster on 1M elements (one thread), which is why rounding to nearest takes
    this path wherever it applies (:func:`float_nearest_ok`). Stochastic rounding keeps
    the integer kernel, whose random increment is exact at every bit."""
    step_exp = torch.maximum((magnitude >> 23) - mantissa_bits, step_min)
    inverse = ((254 - step_exp) << 23).view(torch.float32)
    step = (step_exp << 23).view(torch.float32)
    kept = torch.where(magnitude <= ((step_min - 1) << 23), 0, magnitude).view(torch.float32)
    return (torch.round(kept * inverse) * step).view(torch.int32)


def float_nearest_ok(p: tuple[int, ...]) -> bool:
    """Whether :func:`_round_nearest_float` gives :func:`_round_bits`' nearest results
    bit for bit for the format with kernel parameters ``p`` (:func:`param_values`): it
    has a zero and signed values (no result floor, no invalid inputs), subnormals whose
    smallest is a float32 normal of at least 2**-125 (float32's subnormal inputs then
    round to zero both ways), a normal range that starts where its subnormal spacing
    stops (a grid of fixed spacing below it), and at least one mantissa bit (so that
    the inverse spacing in float32's top binade, ``2**(m - 127)``, is a normal).
    FP16, every FP8 and the MX and NVFP4 elements; not BF16 (its subnormals are
    float32's), E8M0 or ``eXm0``."""
    shift, _, _, subnormal_below, step_bits, _, min_bits, invalid_below = p
    step_exp = step_bits >> 23
    return (min_bits == 0 and invalid_below == _INT32_MIN and 0 <= shift <= 22 and step_bits & 0x7FFFFF == 0
            and step_exp >= 2 and subnormal_below == step_exp + 23 - shift)


def _round_nearest_float(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """:func:`_round_bits` of ``x`` to nearest for a format :func:`float_nearest_ok`
    accepts, by :func:`nearest_steps`: Inf rounds as float32's largest value does
    (past the format's largest, to the overflow result), a NaN keeps its bits."""
    bits = x.view(torch.int32)
    magnitude = bits & _ABS_MASK
    rounded = nearest_steps(torch.clamp(magnitude, max=_F32_INF_BITS - 1), 23 - p[0], p[4] >> 23)
    rounded = torch.where(rounded > p[1], p[2], rounded)
    rounded = torch.where(magnitude > _F32_INF_BITS, magnitude, rounded)  # NaN stays NaN
    return (rounded | (bits & _INT32_MIN)).view(torch.float32)


def round_grid(x: torch.Tensor, p: torch.Tensor, key: torch.Tensor | None, float_path: bool) -> torch.Tensor:
    """:func:`_round_bits`: stochastically with ``key``, else to nearest, by
    :func:`_round_nearest_float` where ``float_path`` (:func:`float_nearest_ok` of the
    format; a constant to the compiler)."""
    if key is not None:
        return _round_bits(x, p, key)
    return _round_nearest_float(x, p) if float_path else _round_bits(x, p, None)


def _scaled(
    x: torch.Tensor,
    p: torch.Tensor,
    key: torch.Tensor | None,
    scale_inv: torch.Tensor | None,
    scale: torch.Tensor | None,
    float_path: bool = False,
) -> torch.Tensor:
    if scale_inv is None or scale is None:
        return round_grid(x, p, key, float_path)
    return round_grid(x * scale_inv, p, key, float_path) * scale


# One entry point per variant, each its own code object, so that dynamo's per-function
# recompile limit is never reached by the variants together.
def _nearest(x, p, scale_inv, scale):  # type: ignore[no-untyped-def]
    return _scaled(x, p, None, scale_inv, scale)


def _nearest_float(x, p, scale_inv, scale):  # type: ignore[no-untyped-def]
    return _scaled(x, p, None, scale_inv, scale, True)


def _nearest_float_out(x, p, scale_inv, scale, out):  # type: ignore[no-untyped-def]
    out.copy_(_scaled(x, p, None, scale_inv, scale, True))


def _nearest_float_inplace(x, p, scale_inv, scale):  # type: ignore[no-untyped-def]
    x.copy_(_scaled(x, p, None, scale_inv, scale, True))


def _nearest_out(x, p, scale_inv, scale, out):  # type: ignore[no-untyped-def]
    out.copy_(_scaled(x, p, None, scale_inv, scale))


def _stochastic(x, p, key, scale_inv, scale):  # type: ignore[no-untyped-def]
    return _scaled(x, p, key, scale_inv, scale)


def _stochastic_out(x, p, key, scale_inv, scale, out):  # type: ignore[no-untyped-def]
    out.copy_(_scaled(x, p, key, scale_inv, scale))


# Rounding in place gets entries of its own: passing one tensor as both input and out
# makes dynamo trace aliased inputs, which inductor failed to compile from a cold cache.
def _nearest_inplace(x, p, scale_inv, scale):  # type: ignore[no-untyped-def]
    x.copy_(_scaled(x, p, None, scale_inv, scale))


def _stochastic_inplace(x, p, key, scale_inv, scale):  # type: ignore[no-untyped-def]
    x.copy_(_scaled(x, p, key, scale_inv, scale))


_ENTRIES: dict[str, Callable[..., torch.Tensor | None]] = {
    "nearest": _nearest,
    "nearest_float": _nearest_float,
    "nearest_float_out": _nearest_float_out,
    "nearest_float_inplace": _nearest_float_inplace,
    "nearest_out": _nearest_out,
    "nearest_inplace": _nearest_inplace,
    "stochastic": _stochastic,
    "stochastic_out": _stochastic_out,
    "stochastic_inplace": _stochastic_inplace,
}


def _own_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs and its
    recompile limit per code object, so closures of one factory (a kernel per format)
    would otherwise evict each other's graphs."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compiled_entry(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _compiled.get(name)
    if compiled is None:
        # Compiled lazily on first use and cached by inductor on disk across processes.
        # One compiled kernel serves every size, so it must not be sequential: inductor
        # decides a CPU loop's threading from the size of the call that compiles it and
        # leaves loops too small for the threads it has sequential, for every later call
        # (and in its disk cache). A kernel first compiled on a small tensor (a test's, a
        # bias) then ran large tensors on one core (measured: 0.44x a copy instead of
        # 0.69x on two). ``dynamic_threads`` keeps a parallel loop and leaves the split
        # to OpenMP at run time.
        compiled = torch.compile(_own_code(fn, f"mixprec_{name}"), dynamic=True, fullgraph=True,
                                 options={"cpp.dynamic_threads": True})
        _compiled[name] = compiled
    return compiled


def _wants_compiled(x: torch.Tensor) -> bool:
    backend = _state.backend
    # Sizes 0 and 1 are specialised by dynamo and would each cost a recompile.
    if backend == "eager" or x.numel() < 2 or torch.compiler.is_compiling():
        return False  # inside a user's torch.compile the eager ops are traced and fused
    if backend == "compiled":
        return True
    if len(_compile_broken) >= _MAX_COMPILE_FAILURES or x.numel() < COMPILE_MIN_NUMEL:
        return False
    if x.device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return x.device.type == "cpu"


def _run(name: str, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor | None:
    return run_variant(name, _ENTRIES[name], x, *args)


SERIAL_BELOW_PASSIVE = 1 << 18
"""Under ``OMP_WAIT_POLICY=passive`` a compiled kernel on fewer elements than this runs
on one thread. Inductor opens an OpenMP parallel region in every kernel whatever the
size (its shapes are dynamic), and passive OpenMP threads sleep between regions: waking
them cost 120-190 us a region here (a 2-core VM), more than the work of a kernel on
100K elements. Measured on 64x64 to 1024x1024 float32 (e5m2 nearest and stochastic,
mxfp8): one thread was 3x faster at 4K elements, 1.1-1.6x at 128K, even at 256K, slower
from 1M. Under the default (spinning) policy the wake-up is cheap and two threads were
as fast or faster at every size, so kernels keep every thread there. torch's thread
count is process-wide: another thread starting a parallel torch op during such a kernel
(tens of microseconds) runs it on one thread."""


@functools.cache
def _serial_below() -> int:
    """The element count below which compiled kernels run on one thread, from the OpenMP
    wait policy of this process (read at first use)."""
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
    return SERIAL_BELOW_PASSIVE if passive else 0


def serial_threads(numel: int) -> int:
    """The threads a kernel on ``numel`` elements runs on: one below
    :func:`_serial_below`'s bound (see :data:`SERIAL_BELOW_PASSIVE`), else torch's."""
    return 1 if numel < _serial_below() else torch.get_num_threads()


SERIAL_GEMM_BELOW_PASSIVE = 1 << 25
"""Under ``OMP_WAIT_POLICY=passive`` a loop of dependent small GEMMs (a recurrence's
time steps) whose GEMMs take fewer multiply-adds than this runs on one thread
(:func:`serial_gemm_threads`): each GEMM and point-wise op of a step otherwise wakes the
sleeping second thread. Measured on this 2-core VM, B x 256 @ 256 x 1024 in FP32 and
BF16, one thread against two: B = 32 (8M multiply-adds) 227-257 against 268-286 us
(FP32) and 115-130 against 151-171 (BF16); B = 64 even; B = 128 (33M) two threads
faster in BF16 (239-291 against 332-355 us); B = 256 two threads 1.5x faster."""


def serial_gemm_threads(macs: int) -> int:
    """The threads a loop of dependent GEMMs of ``macs`` multiply-adds each runs on: one
    under a passive OpenMP below :data:`SERIAL_GEMM_BELOW_PASSIVE`, else torch's."""
    serial = _serial_below() > 0 and macs < SERIAL_GEMM_BELOW_PASSIVE
    return 1 if serial else torch.get_num_threads()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's (process-wide) thread count set to ``count`` inside the block and restored
    on exit; nothing changes where it already is ``count``."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_variant(name: str, fn: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
    """``fn(x, *args)``, compiled by ``torch.compile`` where the backend and ``x``'s size
    and device call for it (see :data:`Backend`), else eagerly: the same results. ``name``
    identifies ``fn`` among every kernel: one compiled function per name, so a kernel
    made per format (a closure) names its format. Non-tensor ``args`` are constants to
    dynamo: each new value recompiles."""
    if _wants_compiled(x):
        try:
            # One grad mode for every call: a change of it is a recompilation for dynamo.
            # Each context costs 10-20 us a call, as much as a small kernel's work: entered
            # only where needed (grad mode on; a profiler running, to name the kernel).
            grad = torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
            named = (torch.profiler.record_function(f"mixprec.{name}")
                     if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext())
            compiled = _compiled_entry(name, fn)
            threads = torch.get_num_threads()
            serial = threads > 1 and x.numel() < _serial_below()
            with grad, named, vector_bitcasts():
                if not serial:
                    return compiled(x, *args)
                with torch_threads(1):
                    return compiled(x, *args)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back
            if _state.backend == "compiled":
                raise
            # This call runs eagerly (same results); the next one compiles afresh, and
            # after a few failures "auto" stays eager.
            _compile_broken.append(repr(error))
            _compiled.pop(name, None)
            if len(_compile_broken) in (1, _MAX_COMPILE_FAILURES):
                final = len(_compile_broken) == _MAX_COMPILE_FAILURES
                warnings.warn(
                    f"mixprec: torch.compile of the rounding kernel failed "
                    f"({len(_compile_broken)} time{'s' if final else ''}), so "
                    f"{'quantize now runs eagerly' if final else 'this call ran eagerly'} "
                    f"(same results, slower): {error!r}. Set MIXPREC_KERNEL=eager to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return fn(x, *args)


def move_last(x: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with dimension ``axis`` moved last, as a contiguous ``dtype`` tensor, in one
    pass: a compiled one where the axis moves (inductor tiles the transposition;
    measured on a 1024 x 1024 float32 weight, 1.8 ms against 4.6 ms for torch's eager
    copy of the transposed view, and a 1024 x 4096 BF16 activation widened on the way
    ran 23 ms eagerly), torch's own copy or cast where it stays."""
    ndim = x.dim()
    axis %= max(ndim, 1)
    if axis == ndim - 1 or x.numel() == 0:
        moved = x.movedim(axis, -1) if ndim else x
        return moved.contiguous() if moved.dtype == dtype else moved.to(dtype, memory_format=torch.contiguous_format)
    return run_variant(f"move_axis_{axis}_of_{ndim}_{str(x.dtype)[6:]}_to_{str(dtype)[6:]}", _axis_mover(axis, dtype),
                       x)


def _axis_mover(axis: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x with dimension ``axis`` moved last, as contiguous ``dtype`` (one kernel per axis
    and dtypes: :func:`move_last`)."""

    def move(x: torch.Tensor) -> torch.Tensor:
        return x.movedim(axis, -1).to(dtype).contiguous()

    return move


def native_rounds(x: torch.Tensor) -> bool:
    """Whether rounding ``x`` to a scalar format runs the native kernel
    (:func:`mixprec.core.native.round_scalar`) rather than a compiled one: the
    ``"auto"`` backend, a contiguous float32, BF16 or FP16 CPU tensor, outside a user's
    ``torch.compile`` (which traces the torch operations instead), with the library
    built. A native call costs about 10 us where a compiled one's guards and wrappers
    cost 60, which on small models' many small tensors is most of the rounding's time."""
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _native_takes(x)


def native_decodes(stored: torch.Tensor) -> bool:
    """Whether decoding FP8 ``stored`` (:func:`mixprec.core.storage.stored_values`) runs the
    native kernel (:func:`mixprec.core.native.decode_fp8`): as :func:`native_rounds`,
    for a contiguous float8_e4m3fn or float8_e5m2 CPU tensor."""
    return stored.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and _native_takes(stored)


def native_steps(x: torch.Tensor) -> bool:
    """Whether a recurrence's point-wise steps on ``x`` (its float32 gates) run the native
    kernels (:func:`mixprec.core.native.lstm_cell` and the others): as
    :func:`native_rounds`, for a contiguous float32 CPU tensor. Each replaces a chain of
    torch ops on a (batch, hidden) state, whose dispatches cost more than their work."""
    return x.dtype == torch.float32 and _native_takes(x)


def float32_column_sums(x: torch.Tensor) -> torch.Tensor:
    """The 2-D ``x`` summed over its rows in float32 (a bias gradient): for a 16-bit
    ``x`` where the native kernel takes it, in one pass that widens each element as it
    reads it (:func:`mixprec.core.native.column_sums`); else torch's sum."""
    if x.dtype in (torch.bfloat16, torch.float16) and _native_takes(x):
        return native.column_sums(x, serial_threads(x.numel()))
    return x.sum(0, dtype=torch.float32)


def _native_takes(x: torch.Tensor) -> bool:
    """The ``"auto"`` backend, a contiguous CPU tensor, no ``torch.compile`` tracing, the
    library built: where a native kernel may take ``x``."""
    return (_state.backend == "auto" and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and x.is_contiguous() and native.available())


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors are the very same elements."""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and b.is_contiguous()


def round_to_format(
    x: torch.Tensor,
    fmt: FloatFormat,
    overflow: Overflow,
    key: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round contiguous float32 ``x`` onto ``fmt``'s grid (stochastically when ``key``,
    an int32 tensor of two words, is given), optionally as ``round(x * (1/scale)) *
    scale``, into ``out`` when given, as float32. ``x`` may be FP16 or BF16 where
    :func:`native_rounds` takes it. Inputs are assumed validated by the caller."""
    # A detached flat alias has no view base, so dynamo guards on nothing but its
    # length (guards on a view's base would recompile for every base shape).
    flat = x.reshape(-1).detach()
    p = _params(fmt, overflow, x.device)
    if native_rounds(flat) and (scale is None or scale.device.type == "cpu"):
        # one native pass (mixprec.core.native): no compiled call's guards and wrappers
        direct = out is not None and out.is_contiguous()
        target = out.view(-1) if direct else torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        native.round_scalar(flat, p, key is None and float_nearest(fmt, overflow), key, scale, target, None, None,
                            serial_threads(flat.numel()))
        if out is None:
            return target.view(x.shape)
        return out if direct else out.copy_(target.view(x.shape))
    scale_inv = None if scale is None else torch.reciprocal(scale)
    nearest = "nearest_float" if float_nearest(fmt, overflow) else "nearest"
    if out is not None and out.is_contiguous() and _same_memory(out, x):
        if key is None:
            _run(f"{nearest}_inplace", flat, p, scale_inv, scale)
        else:
            _run("stochastic_inplace", flat, p, key, scale_inv, scale)
        return out
    if out is not None and out.is_contiguous():
        if key is None:
            _run(f"{nearest}_out", flat, p, scale_inv, scale, out.view(-1).detach())
        else:
            _run("stochastic_out", flat, p, key, scale_inv, scale, out.view(-1).detach())
        return out
    if key is None:
        result = _run(nearest, flat, p, scale_inv, scale)
    else:
        result = _run("stochastic", flat, p, key, scale_inv, scale)
    assert result is not None
    result = result.view(x.shape)
    if out is not None:
        return out.copy_(result)
    return result
