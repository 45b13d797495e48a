"""Formats: scalar floating-point formats (:mod:`.scalar`) and block-scaled formats built
from them (:mod:`.blocks`). ``formats.get`` looks up scalar formats, ``formats.blocks.get``
block formats, and :func:`resolve` either."""

from __future__ import annotations

import torch

from mixprec.core.formats import blocks
from mixprec.core.formats.blocks import BlockFormat
from mixprec.core.formats.scalar import (
    NAMED_FORMATS,
    FloatFormat,
    NanEncoding,
    Overflow,
    bf16,
    e2m1fn,
    e2m3fn,
    e3m2fn,
    e4m3,
    e5m2,
    e8m0fnu,
    fp16,
    fp32,
    get,
    ieee_format,
)

__all__ = [
    "FloatFormat",
    "BlockFormat",
    "NanEncoding",
    "Overflow",
    "fp32",
    "bf16",
    "fp16",
    "e5m2",
    "e4m3",
    "e2m1fn",
    "e2m3fn",
    "e3m2fn",
    "e8m0fnu",
    "NAMED_FORMATS",
    "blocks",
    "get",
    "ieee_format",
    "resolve",
]


def resolve(fmt: str | FloatFormat | BlockFormat | torch.dtype) -> FloatFormat | BlockFormat:
    """A scalar or a block format from a name, a dtype or a format object: block names
    (``"mxfp4_e2m1"``, ``"nvfp4"``, ``"mxfp8_e4m3:rceil"``) give a :class:`BlockFormat`,
    everything else what :func:`get` gives. The error for an unknown name lists both."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt.strip().lower().partition(":")[0] in blocks.NAMED_BLOCK_FORMATS:
        return blocks.get(fmt)
    try:
        return get(fmt)
    except ValueError as error:
        if isinstance(fmt, str) and str(error).startswith("unknown format"):
            raise ValueError(
                f"{error}; block formats: {', '.join(blocks.NAMED_BLOCK_FORMATS)}"
            ) from None
        raise
