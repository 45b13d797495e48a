"""``coverage(model, example_inputs, recipe)``: which GEMM-family call of a forward and
backward ran in which format, what stayed high precision and why, and the share of
GEMM FLOPs under the recipe. Silent fallback to high precision is the most common
complaint about FP8 tools; this report is mixprec's answer to it.

Total GEMM FLOPs come from torch's own ``FlopCounterMode`` (every matmul and
convolution of the forward and backward, whoever ran it); emulated FLOPs from mixprec's
own record of the calls it ran, forward plus the backward GEMMs (one each for the
input and the weight gradient, of the forward's size).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mixprec.core.kernels import kernel_backend
from mixprec.nn.convert import convert, engine_state, is_converted
from mixprec.nn.state import CallRecord
from mixprec.recipe import Recipe

__all__ = ["Coverage", "coverage"]


@dataclass
class Coverage:
    """The report: every recorded call, the GEMM FLOPs in all and under the recipe, and
    the modules kept in high precision with the reason."""

    recipe: str
    calls: list[CallRecord]
    total_flops: float
    emulated_flops: float
    kept_flops: float
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Emulated GEMM FLOPs over all GEMM FLOPs of the forward and backward."""
        return self.emulated_flops / self.total_flops if self.total_flops else 1.0

    @property
    def share_outside_kept(self) -> float:
        """The share among the FLOPs outside what the recipe keeps in high precision on
        purpose: what silently fell back would show here."""
        outside = self.total_flops - self.kept_flops
        return self.emulated_flops / outside if outside > 0 else 1.0

    def by_op(self) -> dict[tuple[str, str], tuple[int, float]]:
        """(op, formats) -> (calls, FLOPs) for the emulated calls."""
        table: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        for call in self.calls:
            if call.emulated:
                key = (call.op, ", ".join(f"{k}={v}" for k, v in call.formats.items()))
                table[key][0] += 1
                table[key][1] += call.flops
        return {k: (int(v[0]), v[1]) for k, v in table.items()}

    def __str__(self) -> str:
        lines = [f"coverage under recipe {self.recipe}: {self.share:.1%} of forward+backward GEMM FLOPs "
                 f"({self.share_outside_kept:.1%} outside modules kept in high precision on purpose)"]
        for (op, formats), (count, flops) in sorted(self.by_op().items(), key=lambda item: -item[1][1]):
            share = flops / self.total_flops if self.total_flops else 0.0
            lines.append(f"  {op:<16} x{count:<4} {share:6.1%}  {formats}")
        for name, why in self.kept.items():
            lines.append(f"  kept in high precision: {name} ({why})")
        other = self.total_flops - self.emulated_flops - self.kept_flops
        if self.total_flops and other > 0.001 * self.total_flops:
            lines.append(f"  not emulated (ran in FP32, e.g. einsum): {other / self.total_flops:.1%}")
        return "\n".join(lines)


def _default_loss(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().sum()
    if hasattr(output, "logits"):
        return output.logits.float().sum()
    if isinstance(output, (tuple, list)):
        return _default_loss(output[0])
    if isinstance(output, dict):
        return _default_loss(next(iter(output.values())))
    raise TypeError("coverage cannot find a tensor in the model's output: pass loss_fn=")


def coverage(model: nn.Module, example_inputs: Any, recipe: str | Recipe | None = None,
             loss_fn: Callable[[Any], torch.Tensor] | None = None) -> Coverage:
    """Run one forward and backward of ``model`` on ``example_inputs`` (a tensor, a
    tuple of positional arguments or a dict of keyword arguments) and report what ran in
    which format. An unconverted model is copied and the copy converted with
    ``recipe``; a converted model is run as it is (its gradients are restored after,
    its amax histories untouched). ``loss_fn(output)`` gives the scalar to back-propagate
    (by default the sum of the output)."""
    if is_converted(model):
        if recipe is not None and engine_state(model).recipe != recipe and not isinstance(recipe, str):
            raise ValueError("this model is converted already; leave recipe out to report on it as it is")
        target = model
    else:
        if recipe is None:
            raise ValueError("coverage needs a recipe for a model that was not converted")
        target = convert(copy.deepcopy(model), recipe)
    state = engine_state(target)
    grads = {p: p.grad for p in target.parameters()}
    histories = copy.deepcopy(state.histories)
    state.log = []
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, dict) is False else ((), example_inputs)
    if isinstance(args, torch.Tensor):
        args = (args,)
    try:
        with kernel_backend("eager"), FlopCounterMode(display=False) as counter:
            output = target(*args, **kwargs)
            (loss_fn or _default_loss)(output).backward()
        calls = state.log
    finally:
        state.log = None
        state.histories = histories
        for param, grad in grads.items():
            param.grad = grad
    emulated = sum(call.flops for call in calls if call.emulated)
    kept = sum(call.flops for call in calls if not call.emulated)
    return Coverage(state.recipe.name, calls, float(counter.get_total_flops()), emulated, kept, dict(state.kept))
