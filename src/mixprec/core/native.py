"""Hand-written C++ kernels, compiled on this machine at first use and called through ctypes.

Most rounding kernels are torch operations fused by ``torch.compile``
(:mod:`mixprec.core.kernels`). Block quantization with amax scales (NVFP4's 1x16 blocks
and 16x16 tiles, DeepSeek-V3's FP8 blocks) is the exception: inductor splits it into a
reduction per block and an element pass, and its reductions over blocks of 16 ran at
8-17 ms per 16M float32 whatever form they took (0.29x a copy for NVFP4 into ``out=``).
``native/kernels.cpp`` does the whole quantization in one pass over memory: per unit
of blocks (64 rows of 1-D blocks, or one strip of 2-D tiles) the amax, the scales and the
rounded elements, while the unit is in cache. Its arithmetic is the torch kernels'
operation for operation, so results are the same bit for bit, which
``tests/core/test_native.py`` checks against the eager torch kernels.

The source is compiled once per machine (``-O3 -march=native -fopenmp``, no fast-math,
no FMA contraction) with the C++ compiler inductor uses (``$CXX``, else ``g++`` or
``c++``), into ``$MIXPREC_CACHE_DIR`` (default ``~/.cache/mixprec``) under a name made of
the source's and the CPU's fingerprint; a compiler or a CPU that cannot build it leaves
the compiled torch kernels in charge (one warning). Plain C++ through ctypes rather
than a torch extension: it builds in about two seconds against a minute for one that
includes torch's headers. The library's OpenMP is the ``libgomp.so.1`` torch has loaded
(the dynamic linker matches the name), so the two share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mixprec.core.formats import FloatFormat

__all__ = ["PackedBF16", "amax_blocks", "available", "bf16_dot_available", "column_sums", "decode_fp8", "gemm_bf16", "hadamard16",
           "library_path", "lstm_backward_step", "lstm_cell", "lstm_hidden", "lstm_preactivations", "pack_bf16", "packs",
           "pow2_blocks", "pow2_strided", "round_scalar", "unpack_blocks"]

_SOURCE = Path(__file__).with_name("native") / "kernels.cpp"
def _flags() -> tuple[str, ...]:
    """The compiler flags: full-width AVX-512 loops where the CPU has them (an x86 flag,
    which gcc elsewhere refuses), no fast-math, no FMA contraction."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if x86 else ()), "-fopenmp",
            "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()

STREAM_FROM = 1 << 22
"""From this many elements (16 MiB of float32 output) the kernel writes its output with
non-temporal stores: past the caches, which a result that size would overflow anyway,
and without reading each line before writing it (a third less memory traffic; 16M
NVFP4 elements: 0.50x -> 0.6x a copy, measured). Smaller outputs stay in cache for the
GEMM that reads them next."""


def _cache_dir() -> Path:
    return Path(os.environ.get("MIXPREC_CACHE_DIR") or Path.home() / ".cache" / "mixprec") / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(lines)))


def library_path(compiler: str) -> Path:
    """Where the library built from the current source, flags, compiler and CPU lives."""
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_flags()).encode(), compiler.encode(), _cpu_fingerprint().encode()):
        digest.update(part)
    return _cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name and renamed: another process may be loading it
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
        scratch = Path(handle.name)
    try:
        subprocess.run([compiler, *_flags(), str(_SOURCE), "-o", str(scratch)], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded library, built first if this machine has none; None (with a warning)
    where it cannot be built or loaded."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("mixprec: no C++ compiler found (set CXX); block quantization with amax scales runs on the "
                      "compiled torch kernels (same results, slower)", RuntimeWarning, stacklevel=3)
        return None
    try:
        with _lock:
            target = library_path(compiler)
            if not target.exists():
                _build(compiler, target)
            library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or ""
        warnings.warn(f"mixprec: building the native block kernel failed ({error!r}{': ' + detail[-500:] if detail else ''}); "
                      "block quantization with amax scales runs on the compiled torch kernels (same results, slower)",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        function, unpack = library.mixprec_amax_blocks, library.mixprec_unpack_blocks
        rounding, pow2, strided = library.mixprec_round, library.mixprec_pow2_blocks, library.mixprec_pow2_strided
        decode, hadamard = library.mixprec_decode, library.mixprec_hadamard16
        cells = (library.mixprec_lstm_preact, library.mixprec_lstm_cell, library.mixprec_lstm_hidden,
                 library.mixprec_lstm_backward)
        gemm = (library.mixprec_bf16_dot_available, library.mixprec_bf16_packed_words, library.mixprec_pack_bf16,
                library.mixprec_gemm_bf16)
        sums = library.mixprec_column_sums
    except AttributeError as error:  # a library from elsewhere under this name
        warnings.warn(f"mixprec: the native block kernel at {target} lacks a function ({error}); delete it to "
                      "rebuild. Block quantization runs on the compiled torch kernels (same results, slower)",
                      RuntimeWarning, stacklevel=3)
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    function.argtypes = [pointer, i32, pointer, i64, i64, i64, i64, pointer, pointer, pointer, i32, pointer, i32, i32,
                         pointer, pointer, pointer, i32, i32, pointer, pointer, i32, i32]
    function.restype = i32
    unpack.argtypes = [pointer, i32, pointer, pointer, pointer, pointer, i32, i64, i64, i64, i64, i32]
    unpack.restype = i32
    f32 = ctypes.c_float
    rounding.argtypes = [pointer, i32, i64, pointer, i32, pointer, i32, f32, f32, pointer, i32, pointer, i32, pointer,
                         i32]
    rounding.restype = i32
    pow2.argtypes = [pointer, i32, pointer, i32, i64, i64, i64, i64, pointer, pointer, i32, pointer, pointer, i32, i32,
                     pointer, pointer, i32]
    pow2.restype = i32
    strided.argtypes = [pointer, i32, pointer, i32, i64, i64, i64, pointer, pointer, i32, pointer, i32]
    strided.restype = i32
    decode.argtypes = [pointer, i64, pointer, pointer, pointer, i32, i32]
    decode.restype = i32
    hadamard.argtypes = [pointer, i32, pointer, i64, i64, i64, pointer, pointer, i32]
    hadamard.restype = i32
    preact, cell, hidden, backward = cells
    preact.argtypes = [pointer, pointer, i32, pointer, i64, i64, pointer, pointer, i32]
    cell.argtypes = [pointer, pointer, pointer, pointer, i64, i64, i32]
    hidden.argtypes = [pointer, pointer, pointer, i32, i64, i64, pointer, pointer, pointer, i32, i32]
    backward.argtypes = [pointer, pointer, i32, pointer, pointer, pointer, pointer, pointer, i64, i64, pointer, pointer,
                         pointer, i32, pointer, pointer, i32]
    for function in cells:
        function.restype = i32
    dot, words, pack, product = gemm
    dot.argtypes, dot.restype = [], i32
    words.argtypes, words.restype = [i64, i64], i64
    pack.argtypes, pack.restype = [pointer, i32, i64, i64, i64, i64, pointer, i32], i32
    product.argtypes, product.restype = [pointer, i32, i64, i64, i64, i64, pointer, i64, pointer, i64, i32], i32
    sums.argtypes, sums.restype = [pointer, i32, i64, i64, pointer, i32], i32
    return library


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on first call)."""
    return _library() is not None


def amax_blocks(
    x4: torch.Tensor,
    out4: torch.Tensor | None,
    pe: torch.Tensor,
    ps: torch.Tensor,
    fp: torch.Tensor,
    two_level: bool,
    tensor_amax: torch.Tensor | None,
    unscaled: bool,
    key: torch.Tensor | None,
    threads: int,
    scales: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    element: FloatFormat | None = None,
) -> torch.Tensor | None:
    """Quantize contiguous CPU ``x4`` (float32 or BF16, blocked ``(groups, rows, h,
    cols)``) to an amax-scaled block format into contiguous float32 ``out4``: what
    :func:`mixprec.core.block_quantize._round_blocks` computes with the torch kernels,
    bit for bit (``out4`` BF16, blocks 16 or 128 wide: those values cast to BF16). The parameters are theirs (``pe``, ``ps``, ``fp``: the element's and
    scale's kernel parameters and the float constants; ``key``: stochastic rounding).
    ``scales`` (float32, ``groups * h`` elements), when given, receives the block scales.
    ``codes`` (uint8; ``cols`` a multiple of 16), when given, receives the codes of
    ``element`` (4 or 8 bits) as :mod:`mixprec.core.block_storage` packs them, and
    ``out4`` may be None. Returns the tensor scale (a 0-d tensor) of two-level formats,
    else None. The caller checks :func:`available` first."""
    library = _library()
    assert library is not None, "call native.available() first"
    groups, rows, h, cols = x4.shape
    tensor_scale = torch.empty((), dtype=torch.float32) if two_level else None
    amax_value = None if tensor_amax is None else tensor_amax.detach().to("cpu", torch.float32).reshape(())
    encoding = None if codes is None else _encoding(element)
    status = library.mixprec_amax_blocks(
        x4.data_ptr(), _DTYPE_CODES[x4.dtype], None if out4 is None else out4.data_ptr(), groups, rows, h, cols,
        pe.data_ptr(), ps.data_ptr(), fp.data_ptr(), int(two_level),
        None if amax_value is None else amax_value.data_ptr(), int(unscaled), int(key is not None),
        None if key is None else key.data_ptr(), None if tensor_scale is None else tensor_scale.data_ptr(),
        None if scales is None else scales.data_ptr(), max(int(threads), 1),
        int(out4 is not None and out4.numel() >= STREAM_FROM), None if codes is None else codes.data_ptr(),
        None if encoding is None else encoding.data_ptr(), 0 if element is None else element.total_bits,
        int(out4 is not None and out4.dtype == torch.bfloat16))
    if status != 0:
        raise ValueError(f"native amax_blocks: unsupported input (status {status}: dtype {x4.dtype}, "
                         f"{cols} columns, {None if element is None else element.name} codes)")
    return tensor_scale


_OUT_KINDS = {torch.float32: 1, torch.bfloat16: 2}


def pow2_blocks(
    x4: torch.Tensor,
    out4: torch.Tensor | None,
    pe: torch.Tensor,
    bp: torch.Tensor,
    key: torch.Tensor | None,
    threads: int,
    scales: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    element: FloatFormat | None = None,
) -> None:
    """Quantize contiguous CPU ``x4`` (float32 or BF16, blocked ``(groups, rows, h,
    cols)``, cols a multiple of 16) to a block format with power-of-two scales (MX) into
    contiguous ``out4`` (float32 or BF16, or None): what
    :func:`mixprec.core.block_quantize._round_blocks` computes with the compiled pow2
    kernels, bit for bit, in one pass (``pe``, ``bp``: the element's kernel parameters and
    the scale rule's; ``key``: stochastic rounding). ``scales`` (float32, ``groups * h``
    elements), when given, receives the block scales (NaN for a block holding NaN or
    Inf); ``codes`` (uint8), when given, the codes of ``element`` (4 or 8 bits) as
    :mod:`mixprec.core.block_storage` packs them. The caller checks :func:`available`."""
    library = _library()
    assert library is not None, "call native.available() first"
    groups, rows, h, cols = x4.shape
    encoding = None if codes is None else _encoding(element)
    status = library.mixprec_pow2_blocks(
        x4.data_ptr(), _DTYPE_CODES[x4.dtype], None if out4 is None else out4.data_ptr(),
        0 if out4 is None else _OUT_KINDS[out4.dtype], groups, rows, h, cols, pe.data_ptr(), bp.data_ptr(),
        int(key is not None), None if key is None else key.data_ptr(), None if scales is None else scales.data_ptr(),
        max(int(threads), 1), int(out4 is not None and out4.numel() >= STREAM_FROM),
        None if codes is None else codes.data_ptr(), None if encoding is None else encoding.data_ptr(),
        0 if element is None else element.total_bits)
    if status != 0:
        raise ValueError(f"native pow2_blocks: unsupported input (status {status}: dtype {x4.dtype}, "
                         f"{cols} columns, {None if element is None else element.name} codes)")


def pow2_strided(
    x: torch.Tensor,
    out: torch.Tensor,
    pe: torch.Tensor,
    bp: torch.Tensor,
    key: torch.Tensor | None,
    dims: tuple[int, int, int],
    threads: int,
) -> None:
    """Quantize contiguous CPU ``x`` (float32 or BF16) viewed as ``dims`` = ``(outer,
    rows, inner)`` (rows a multiple of 32, inner of 16) in blocks of 32 along ``rows``
    to an MX format (``pe``, ``bp``: as :func:`pow2_blocks`; ``key``: stochastic) into
    contiguous ``out`` (float32 or BF16) laid out ``(outer, inner, rows)``: what
    :func:`pow2_blocks` writes for x with its block axis moved last, without the copy
    that moves it. The caller checks :func:`available`."""
    library = _library()
    assert library is not None, "call native.available() first"
    status = library.mixprec_pow2_strided(
        x.data_ptr(), _DTYPE_CODES[x.dtype], out.data_ptr(), _OUT_KINDS[out.dtype], *dims, pe.data_ptr(),
        bp.data_ptr(), int(key is not None), None if key is None else key.data_ptr(), max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native pow2_strided: unsupported input (status {status}: dtype {x.dtype}, dims {dims}, "
                         f"out {out.dtype})")


def unpack_blocks(
    codes: torch.Tensor,
    code_bits: int,
    table: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    out: torch.Tensor,
    blocked: tuple[int, int, int, int],
    threads: int,
) -> None:
    """Decode contiguous ``codes`` (``code_bits`` 4: two a byte, first in the low
    nibble; or 8) laid out in the blocked shape ``blocked`` = ``(groups, rows, h,
    cols)``, cols a multiple of 16, into contiguous ``out`` (float32 or BF16):
    ``table[code] * (tensor_scale * scale)`` with ``scales`` float32, one per block
    ``(groups, h)``, rounded once to out's dtype, as
    :func:`mixprec.core.block_storage.unpack_blocks` decodes them."""
    library = _library()
    assert library is not None, "call native.available() first"
    ts = None if tensor_scale is None else tensor_scale.detach().to("cpu", torch.float32).reshape(())
    scales = scales.contiguous()
    status = library.mixprec_unpack_blocks(
        codes.data_ptr(), code_bits, table.data_ptr(), scales.data_ptr(), None if ts is None else ts.data_ptr(),
        out.data_ptr(), _DTYPE_CODES[out.dtype], *blocked, max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native unpack_blocks: unsupported input (status {status}: {code_bits}-bit codes, "
                         f"blocked {blocked}, {out.dtype})")


def decode_fp8(
    stored: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor, threads: int,
) -> None:
    """Decode contiguous FP8 ``stored`` into contiguous ``out`` (float32 or BF16, the same
    size): ``table[code] * scale`` (``table``: the 256 float32 values torch's cast gives
    the codes; no product where ``scale`` is None), rounded once to out's dtype, as
    :func:`mixprec.core.storage.stored_values` computes it, in one pass (a compiled one
    costs its guards, about 60 us a call, and ran at 2.3 ns an element on the quick
    Transformer's saved activations)."""
    library = _library()
    assert library is not None, "call native.available() first"
    factor = None if scale is None else scale.detach().to(torch.float32).reshape(())
    status = library.mixprec_decode(stored.data_ptr(), stored.numel(), table.data_ptr(),
                                    None if factor is None else factor.data_ptr(), out.data_ptr(),
                                    _DTYPE_CODES.get(out.dtype, -1), max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native decode: unsupported output dtype {out.dtype}")


def hadamard16(
    x: torch.Tensor, axis: int, pre: torch.Tensor, post: torch.Tensor | None, out: torch.Tensor, threads: int,
) -> None:
    """The Hadamard transform of 16-element groups along ``axis`` of contiguous ``x``
    (float32, BF16 or FP16; that dimension a multiple of 16), as
    :func:`mixprec.core.hadamard.hadamard_transform` computes it (``pre`` and ``post``:
    its 16 multipliers), written into contiguous float32 ``out`` with ``axis`` moved last:
    the transposing copy, the widening and the rotation in one pass."""
    library = _library()
    assert library is not None, "call native.available() first"
    shape = x.shape
    outer = 1
    for size in shape[:axis]:
        outer *= size
    inner = 1
    for size in shape[axis + 1:]:
        inner *= size
    status = library.mixprec_hadamard16(
        x.data_ptr(), _SCALAR_DTYPES.get(x.dtype, -1), out.data_ptr(), outer, shape[axis], inner, pre.data_ptr(),
        None if post is None else post.data_ptr(), max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native hadamard16: unsupported input (status {status}: {x.dtype}, shape {tuple(shape)}, "
                         f"axis {axis})")


def column_sums(x: torch.Tensor, threads: int) -> torch.Tensor:
    """The float32 column sums of the contiguous 2-D CPU tensor ``x`` (float32, BF16 or
    FP16), each element widened exactly and summed in row order: torch's
    ``sum(0, dtype=torch.float32)`` of a 16-bit tensor writes a float32 copy of it first
    (a BF16 bias gradient's error of 2048 x 512: 1.2 ms in a training step). The caller
    checks :func:`available`."""
    library = _library()
    assert library is not None, "call native.available() first"
    rows, cols = x.shape
    out = torch.empty(cols, dtype=torch.float32)
    status = library.mixprec_column_sums(x.data_ptr(), _SCALAR_DTYPES.get(x.dtype, -1), rows, cols, out.data_ptr(),
                                         max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native column_sums: unsupported dtype {x.dtype}")
    return out


_FP8_KINDS = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_SCALAR_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def round_scalar(
    x: torch.Tensor,
    p: torch.Tensor,
    float_path: bool,
    key: torch.Tensor | None,
    scale: torch.Tensor | None,
    values: torch.Tensor | None,
    storage: torch.Tensor | None,
    amax: torch.Tensor | None,
    threads: int,
) -> None:
    """Round contiguous CPU ``x`` (float32, BF16 or FP16) onto the grid of the scalar format
    with kernel parameters ``p``, as :func:`mixprec.core.kernels.round_grid` does
    (``float_path``: to nearest by float arithmetic; ``key``: stochastically), as
    ``round(x * (1 / scale)) * scale`` where ``scale`` (a 0-d float32 tensor) is given,
    writing each of these that is given: ``values`` (float32, BF16 or FP16, x's size; may be
    x itself), ``storage`` (a float8_e4m3fn or float8_e5m2 tensor: the rounded values
    before the scale, as torch casts them) and ``amax`` (a 0-d float32 tensor: the
    largest ``|x|``, NaN where x holds one). The caller checks :func:`available`."""
    library = _library()
    assert library is not None, "call native.available() first"
    scale_inverse = 1.0 if scale is None else float(torch.reciprocal(scale))
    status = library.mixprec_round(
        x.data_ptr(), _SCALAR_DTYPES[x.dtype], x.numel(), p.data_ptr(), int(float_path),
        None if key is None else key.data_ptr(), int(scale is not None), scale_inverse,
        1.0 if scale is None else float(scale), None if values is None else values.data_ptr(),
        0 if values is None else _SCALAR_DTYPES[values.dtype], None if storage is None else storage.data_ptr(),
        0 if storage is None else _FP8_KINDS[storage.dtype], None if amax is None else amax.data_ptr(),
        max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native round: unsupported dtype {x.dtype}")


_encodings: dict[FloatFormat, torch.Tensor] = {}


def _encoding(element: FloatFormat | None) -> torch.Tensor:
    """The int32 ``[mantissa bits, bias, float32 biased exponent of the smallest normal,
    sign bit]`` the kernel encodes ``element``'s codes by (cached)."""
    assert element is not None, "codes need their element format"
    cached = _encodings.get(element)
    if cached is None:
        cached = torch.tensor([element.mantissa_bits, element.bias, element.min_exponent + 127,
                               element.exponent_bits + element.mantissa_bits], dtype=torch.int32)
        _encodings[element] = cached
    return cached


def writes_bf16(cols: int) -> bool:
    """Whether the kernel writes BF16 values for blocks ``cols`` wide."""
    return cols in (16, 128)


def packs(element: FloatFormat, cols: int) -> bool:
    """Whether the kernel packs codes of ``element`` in blocks ``cols`` wide."""
    return element.total_bits in (4, 8) and cols % 16 == 0


# ---- the LSTM cell's point-wise steps (mixprec.nn.recurrences) ----------------------------------
# Arguments are contiguous CPU tensors: gates (batch, 4 hidden) float32, states (batch,
# hidden); the recurrence checks that before it calls them. A ``rounding`` is a scalar
# format's kernel parameters (mixprec.core.kernels._params, int32) and, for stochastic
# rounding, its two-word key (None: to nearest): a rounding the step fuses, computed as
# round_scalar computes it on the tensor it rounds.

StepRounding = tuple[torch.Tensor, torch.Tensor | None]


def _rounding_pointers(rounding: StepRounding | None) -> tuple[int | None, int | None]:
    if rounding is None:
        return None, None
    params, key = rounding
    return params.data_ptr(), None if key is None else key.data_ptr()


def _cell_status(status: int, name: str, *dtypes: torch.dtype) -> None:
    if status != 0:
        raise ValueError(f"native {name}: unsupported dtypes {', '.join(str(d) for d in dtypes)}")


def lstm_preactivations(projected: torch.Tensor, recurrent: torch.Tensor, gates: torch.Tensor, threads: int,
                        rounding: StepRounding | None = None) -> None:
    """``gates = projected + recurrent`` (float32 plus the recurrent product's result in
    float32, BF16 or FP16), with the cell candidate's quarter doubled: the LSTM step's
    operations before its gates' sigmoid, in one pass. With ``rounding``, ``recurrent``
    is the product's FP32 sum, rounded on the way (the result's one rounding)."""
    library = _library()
    assert library is not None, "call native.available() first"
    batch, width = gates.shape
    p, key = _rounding_pointers(rounding)
    _cell_status(library.mixprec_lstm_preact(projected.data_ptr(), recurrent.data_ptr(),
                                             _SCALAR_DTYPES.get(recurrent.dtype, -1), gates.data_ptr(), batch,
                                             width // 4, p, key, max(int(threads), 1)),
                 "lstm_preactivations", recurrent.dtype)


def lstm_cell(gates: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor, doubled: torch.Tensor, threads: int) -> None:
    """After the gates' sigmoid: the candidate ``g = 2 s - 1`` (written into ``gates``),
    the cell state ``c = f c_prev + i g`` (one fused multiply-add, as torch's addcmul) and
    ``doubled = 2 c``, whose sigmoid gives ``tanh(c)``."""
    library = _library()
    assert library is not None, "call native.available() first"
    batch, hidden = c.shape
    library.mixprec_lstm_cell(gates.data_ptr(), c_prev.data_ptr(), c.data_ptr(), doubled.data_ptr(), batch, hidden,
                              max(int(threads), 1))


def lstm_hidden(gates: torch.Tensor, sigmoid: torch.Tensor, h: torch.Tensor, threads: int,
                rounding: StepRounding | None = None, rounded: torch.Tensor | None = None) -> None:
    """``h = o (2 sigmoid - 1)``: the output gate times ``tanh(c)``, cast once to h's dtype
    (float32, BF16 or FP16). With ``rounding``, ``rounded`` (float32 or BF16) receives the
    held h rounded for the next step's GEMM, written by the same pass."""
    library = _library()
    assert library is not None, "call native.available() first"
    batch, hidden = h.shape
    p, key = _rounding_pointers(rounding)
    q_dtype = 0 if rounded is None else _DTYPE_CODES.get(rounded.dtype, -1)
    _cell_status(library.mixprec_lstm_hidden(gates.data_ptr(), sigmoid.data_ptr(), h.data_ptr(),
                                             _SCALAR_DTYPES.get(h.dtype, -1), batch, hidden, p, key,
                                             None if rounded is None else rounded.data_ptr(), q_dtype,
                                             max(int(threads), 1)),
                 "lstm_hidden", h.dtype, *(() if rounded is None else (rounded.dtype,)))


def lstm_backward_step(dh: torch.Tensor, grad_output: torch.Tensor, dc: torch.Tensor, cell_tanh: torch.Tensor,
                       acts: torch.Tensor, c_prev: torch.Tensor, d_act: torch.Tensor, threads: int,
                       rounding: StepRounding | None = None, error: torch.Tensor | None = None,
                       dh_rounding: StepRounding | None = None) -> None:
    """One step of the LSTM's backward sweep before its dgrad GEMM, in place, with the
    activations' slopes computed on the way from ``acts`` (i, f, g, o) and ``cell_tanh``
    (as the torch chain computes them, not read from a tensor of the whole sequence):
    ``dh += grad_output``; ``dc += dh o (1 - tanh(c)^2)`` (fused, as addcmul); the gates'
    gradients ``d_act = (dc g, dc c_prev, dc i, dh tanh(c))`` times the slopes; ``dc *= f``.
    With ``rounding``, ``error`` (float32 or BF16, d_act's shape) receives d_act rounded
    for the dgrad GEMM, written by the same pass. With ``dh_rounding``, ``dh`` is the later
    step's dgrad sum, rounded first (that GEMM's result rounding)."""
    library = _library()
    assert library is not None, "call native.available() first"
    batch, hidden = dh.shape
    p, key = _rounding_pointers(rounding)
    p_dh, key_dh = _rounding_pointers(dh_rounding)
    e_dtype = 0 if error is None else _DTYPE_CODES.get(error.dtype, -1)
    _cell_status(library.mixprec_lstm_backward(
        dh.data_ptr(), grad_output.data_ptr(), _SCALAR_DTYPES.get(grad_output.dtype, -1), dc.data_ptr(),
        cell_tanh.data_ptr(), acts.data_ptr(), c_prev.data_ptr(), d_act.data_ptr(), batch, hidden, p, key,
        None if error is None else error.data_ptr(), e_dtype, p_dh, key_dh, max(int(threads), 1)),
        "lstm_backward_step", grad_output.dtype, *(() if error is None else (error.dtype,)))


# ---- the FP32 sum of BF16 products (mixprec.nn.kernels' "bf16-fp32" path) -----------------------


def bf16_dot_available() -> bool:
    """Whether the library is built with the GEMM on the CPU's BF16 dot-product
    instructions (AVX512_BF16: ``-march=native`` on a CPU that has them)."""
    library = _library()
    return library is not None and bool(library.mixprec_bf16_dot_available())


@dataclass(frozen=True)
class PackedBF16:
    """A GEMM's right operand (K x N, BF16 values) packed for :func:`gemm_bf16`: pairs of
    rows interleaved in panels of 64 columns, as the dot-product instruction reads them.
    Packed once, it serves every GEMM by that operand (a recurrent weight at each step)."""

    words: torch.Tensor
    """The packed BF16 pairs as int32 words."""
    k: int
    """The contraction dimension."""
    n: int
    """The columns."""


_BF16_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def pack_bf16(b: torch.Tensor, threads: int) -> PackedBF16:
    """Pack the 2-D CPU tensor ``b`` (float32 holding BF16 values, or BF16; any strides)
    for :func:`gemm_bf16`. Float32 elements are rounded to BF16 as torch casts them,
    which leaves BF16 values as they are. The caller checks :func:`bf16_dot_available`."""
    library = _library()
    assert library is not None, "call native.bf16_dot_available() first"
    k, n = b.shape
    words = torch.empty(int(library.mixprec_bf16_packed_words(k, n)), dtype=torch.int32)
    status = library.mixprec_pack_bf16(b.data_ptr(), _BF16_DTYPES.get(b.dtype, -1), k, n, b.stride(0), b.stride(1),
                                       words.data_ptr(), max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native pack_bf16: unsupported dtype {b.dtype} (float32 or bfloat16)")
    return PackedBF16(words, k, n)


def gemm_bf16(a: torch.Tensor, b: PackedBF16, threads: int) -> torch.Tensor:
    """``a @ b`` as float32 for the 2-D CPU tensor ``a`` (float32 holding BF16 values, or
    BF16; any strides) and a packed ``b``: each product exact, summed in float32 on the
    BF16 dot-product units (the FP32 sum, up to summation order, with denormals flushed
    to zero as oneDNN's BF16 GEMMs flush them). The caller checks
    :func:`bf16_dot_available`."""
    library = _library()
    assert library is not None, "call native.bf16_dot_available() first"
    m, k = a.shape
    if k != b.k:
        raise ValueError(f"native gemm_bf16: a has {k} columns, the packed operand {b.k} rows")
    out = torch.empty((m, b.n), dtype=torch.float32)
    status = library.mixprec_gemm_bf16(a.data_ptr(), _BF16_DTYPES.get(a.dtype, -1), m, k, a.stride(0), a.stride(1),
                                       b.words.data_ptr(), b.n, out.data_ptr(), b.n, max(int(threads), 1))
    if status != 0:
        raise ValueError(f"native gemm_bf16: status {status} (dtype {a.dtype}; 3: no BF16 dot products in this build)")
    return out
