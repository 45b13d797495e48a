"""torch.compile(model) on a converted model: it runs, and trains to eager's losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec


def _losses(base: nn.Module, recipe: str, compiled: bool) -> list[float]:
    torch.manual_seed(1)
    model = mixprec.convert(copy.deepcopy(base), recipe)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.GradScaler(recipe)
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(forward(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_model_trains_to_eager_losses() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    eager = _losses(base, "fp8-hybrid", compiled=False)
    compiled = _losses(base, "fp8-hybrid", compiled=True)
    # the same roundings: only the FP32 summation order of the compiled loss can differ
    assert compiled == pytest.approx(eager, rel=1e-6)
