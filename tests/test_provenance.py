"""mixprec.provenance: a rounded tensor is known to be on its grid until it changes or
dies, and a layer fed another layer's rounded output does not round it again."""

from __future__ import annotations

import gc

import torch

import mixprec
from mixprec import ops, provenance
from mixprec.core import formats
from mixprec.ops import Rounder
from mixprec.provenance import is_on_grid, mark_on_grid


def test_marks_follow_identity_version_and_format():
    x = mixprec.quantize(torch.randn(100), "fp16")
    mark_on_grid(x, formats.fp16)
    assert is_on_grid(x, formats.fp16)
    assert not is_on_grid(x, formats.e5m2)
    assert not is_on_grid(x.clone(), formats.fp16)
    x.mul_(1.0001)  # an in-place change drops the mark
    assert not is_on_grid(x, formats.fp16)


def test_entries_leave_with_their_tensor():
    before = len(provenance._registry.entries)
    x = mark_on_grid(torch.zeros(10), formats.fp16)
    assert len(provenance._registry.entries) == before + 1
    del x
    gc.collect()
    assert len(provenance._registry.entries) == before


def test_a_rounded_output_is_not_rounded_again(monkeypatch):
    recipe = mixprec.get_recipe("fp16")
    weight = torch.nn.Parameter(mixprec.quantize(torch.randn(8, 8), "fp16").half())
    rounder = Rounder(recipe)
    hidden = ops.linear(torch.randn(4, 8), weight, None, rounder)
    calls = []
    original = ops.quantize
    monkeypatch.setattr(ops, "quantize", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    ops.linear(hidden, weight, None, rounder)
    assert len(calls) == 1  # only the output; the input was the previous layer's output
