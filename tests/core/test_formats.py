"""mixprec.core.formats: derived numbers against PAPERS.md's table and torch.finfo, custom
eXmY parsing, and the errors for formats mixprec cannot emulate."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import pytest
import torch

from mixprec.core import formats
from mixprec.core.formats import FloatFormat, ieee_format

# (name, largest, smallest normal, smallest subnormal, has Inf) from PAPERS.md
PAPER_TABLE = [
    ("fp32", 3.4028234663852886e38, 2.0**-126, 2.0**-149, True),
    ("bf16", 3.3895313892515355e38, 2.0**-126, 2.0**-133, True),
    ("fp16", 65504.0, 2.0**-14, 2.0**-24, True),
    ("e5m2", 57344.0, 2.0**-14, 2.0**-16, True),
    ("e4m3", 448.0, 2.0**-6, 2.0**-9, False),
]


@pytest.mark.parametrize(("name", "largest", "normal", "subnormal", "has_inf"), PAPER_TABLE)
def test_named_formats_match_the_papers_table(name, largest, normal, subnormal, has_inf):
    fmt = formats.get(name)
    assert fmt.largest == largest
    assert fmt.smallest_normal == normal
    assert fmt.smallest_subnormal == subnormal
    assert fmt.has_infinities is has_inf


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "e5m2", "e4m3"])
def test_named_formats_match_torch_finfo(name):
    fmt = formats.get(name)
    info = torch.finfo(fmt.torch_dtype)
    assert fmt.largest == info.max
    assert fmt.smallest_normal == info.tiny
    assert fmt.epsilon == info.eps
    assert fmt.smallest_subnormal == info.smallest_normal * 2.0**-fmt.mantissa_bits


@pytest.mark.parametrize(
    ("name", "ml_type"), [("e3m4", ml_dtypes.float8_e3m4), ("e2m1", None), ("e6m9", None)]
)
def test_custom_formats_are_ieee_style(name, ml_type):
    fmt = formats.get(name)
    e, m = int(name[1]), int(name[3:])
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (e, m, 2 ** (e - 1) - 1)
    assert fmt.has_infinities and fmt.overflow == "inf"
    assert fmt.largest == (2 - 2.0**-m) * 2.0 ** (2**e - 2 - fmt.bias)
    if ml_type is not None:
        assert fmt.largest == float(ml_dtypes.finfo(ml_type).max)
        assert fmt.smallest_subnormal == float(ml_dtypes.finfo(ml_type).smallest_subnormal)


def test_ieee_e4m3_differs_from_the_fn_convention():
    ieee = ieee_format(4, 3)
    assert ieee.largest == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3).max) == 240.0
    assert formats.e4m3.largest == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == 448.0


def test_get_accepts_aliases_dtypes_and_formats():
    assert formats.get("FP16") is formats.fp16
    assert formats.get("bfloat16") is formats.bf16
    assert formats.get(torch.float8_e4m3fn) is formats.e4m3
    assert formats.get(formats.e5m2) is formats.e5m2
    assert formats.get("e5m2") is formats.e5m2
    assert formats.get("e5m10").torch_dtype == torch.float16


def test_formats_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        formats.fp16.mantissa_bits = 3  # type: ignore[misc]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"fp32, bf16, fp16, e5m2, e4m3.*eXmY"):
        formats.get("fp17")


@pytest.mark.parametrize("name", ["e9m2", "e0m3", "e5m24"])
def test_custom_name_out_of_range(name):
    with pytest.raises(ValueError, match="1 <= X <= 8"):
        formats.get(name)


def test_get_rejects_other_types():
    with pytest.raises(TypeError, match="a format is a name"):
        formats.get(16)  # type: ignore[arg-type]


def test_inconsistent_format_definitions_are_refused():
    with pytest.raises(ValueError, match="no infinities"):
        FloatFormat("x", 4, 3, 7, has_infinities=False, nan_encoding="all_ones", overflow="inf")
    with pytest.raises(ValueError, match="IEEE layout"):
        FloatFormat("x", 4, 3, 7, has_infinities=True, nan_encoding="all_ones")
    with pytest.raises(ValueError, match="outside what mixprec emulates"):
        FloatFormat("x", 8, 7, 140)
    with pytest.raises(ValueError, match="no nonzero finite value"):
        FloatFormat("x", 1, 0, 0)
