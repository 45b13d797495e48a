"""Vectorised bit casts in inductor's C++ kernels, while mixprec's rounding kernels compile.

The rounding kernels read a float32's bits as an int32 and back (``x.view(torch.int32)``,
:mod:`mixprec.core.kernels`). Inductor's C++ backend (torch 2.13) has no vector form of
that op (``to_dtype_bitcast``): in a vectorised loop it stores the vector to a buffer,
casts 16 scalars one by one and loads them back, a store-to-load round trip the
compiler does not remove. With several casts per element that scalar detour cost more
than all the arithmetic: measured on 1M float32 elements here (AVX-512), a bit cast
and a mask took 0.91 ms against 0.40 ms with a vector cast, the E4M3 element rounding
3.1 ms against 0.9 ms, MXFP8 quantization 2.2 ms against 0.8 ms.

:func:`vector_bitcasts` adds the vector form for the 32-bit pairs while it is active:
``at::vec::cast<int32_t>(x)`` (ATen's bit reinterpretation of a vector: a register
cast where ATen specialises it, as for int32 -> float32 on AVX-512, elsewhere one
same-width store and load of the whole vector; register by register where a loop's
vectors span several). Other widths keep inductor's own code. Nothing
else in the generated C++ changes, and a bit cast has one meaning, so results are
unchanged (the exhaustive and random exactness tests run through these kernels).

It is scoped: :func:`mixprec.core.kernels.run_variant` enters it around each call of a
compiled kernel (compilation happens inside the first call, or a recompilation's), so
a user's own ``torch.compile`` elsewhere in the process is left as torch made it.
Inside it ``torch.compiler.config.cache_key_tag`` carries a tag of its own, so that
inductor's on-disk cache keeps these kernels apart from ones generated without the
vector form (an earlier version's, whose slower code it would otherwise reload).
Where inductor's internals differ from what this expects (another torch version), it
does nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["vector_bitcasts", "available"]

_WIDTH = 4  # bytes: float32 <-> int32 (and uint32)
_TAG = "mixprec-vector-bitcasts-2"  # part of inductor's cache key while active


@functools.cache
def _hooks() -> tuple[type, Any, Any] | None:
    """Inductor's C++ vector overrides class, its own ``to_dtype_bitcast`` (as found in
    the class) and the vector form wrapping it; None where this torch lacks what the
    vector form needs. Looked up once: torch's classes do not change under a process."""
    try:
        from torch._inductor.codegen import cpp
    except Exception:  # noqa: BLE001 - an inductor that does not import: nothing to do
        return None
    overrides = getattr(cpp, "CppVecOverrides", None)
    if overrides is None or getattr(cpp, "DTYPE_TO_CPP", None) is None:
        return None
    own = overrides.__dict__.get("to_dtype_bitcast")
    if not isinstance(own, staticmethod):
        return None
    return overrides, own, staticmethod(_vector_form(own.__func__))


def available() -> bool:
    """Whether this torch's inductor has the C++ codegen :func:`vector_bitcasts` extends."""
    return _hooks() is not None


def _vector_form(fallback: Callable[..., Any]) -> Callable[..., Any]:
    from torch._inductor.codegen import cpp

    def to_dtype_bitcast(x: Any, dtype: torch.dtype, src_dtype: torch.dtype) -> Any:
        kernel = cpp.V.kernel
        get_vectors = getattr(kernel, "_get_num_vectors", None)
        if not (dtype.itemsize == _WIDTH and src_dtype.itemsize == _WIDTH and dtype in cpp.DTYPE_TO_CPP
                and get_vectors is not None):
            return fallback(x, dtype, src_dtype)
        target, vectors = cpp.DTYPE_TO_CPP[dtype], get_vectors(src_dtype)
        if vectors == 1:
            return f"at::vec::cast<{target}>({x})"
        # a loop whose vectors span several registers (a 16-bit tensor in the kernel):
        # each register cast on its own
        return (f"[&]() {{ at::vec::VectorizedN<{target}, {vectors}> cast_; "
                f"for (int i = 0; i < {vectors}; i++) {{ cast_[i] = at::vec::cast<{target}>({x}[i]); }} "
                f"return cast_; }}()")

    return to_dtype_bitcast


class vector_bitcasts:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Inside the block, inductor's C++ kernels compiled in this process cast 32-bit
    vectors' bits in registers instead of element by element (see the module
    docstring); restored on exit. Nested blocks keep it on until the outermost exits.
    A class, not a generator: it is entered around every compiled rounding call (2-3
    us)."""

    __slots__ = ("_tag", "_active")

    def __enter__(self) -> None:
        hooks = _hooks()
        overrides = None if hooks is None else hooks[0]
        self._active = overrides is not None and overrides.__dict__["to_dtype_bitcast"] is not hooks[2]
        if self._active:
            assert hooks is not None
            config = torch.compiler.config
            self._tag = config.cache_key_tag
            hooks[0].to_dtype_bitcast = hooks[2]
            config.cache_key_tag = f"{self._tag}+{_TAG}"

    def __exit__(self, *exc: object) -> None:
        if self._active:
            hooks = _hooks()
            assert hooks is not None
            hooks[0].to_dtype_bitcast = hooks[1]
            torch.compiler.config.cache_key_tag = self._tag
