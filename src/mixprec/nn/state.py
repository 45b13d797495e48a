"""What one converted model carries between and during its forwards: the recipe, the
stochastic-rounding generator, the amax histories of per-tensor scaling (one per tensor
per call site), the weight operands rounded this step, and where in the model the
forward is. It lives on the model (``model._mixprec``), never in a global.

:func:`quantize_operand` is the one place an operand is rounded: it returns the values
the FP32 GEMM multiplies and what backward saves (the same values in the format's real
storage, 1 or 2 bytes, with their scale).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.core.quantize import quantize, tensor_scale
from mixprec.core.storage import from_storage, to_storage
from mixprec.recipe import Operand, Recipe
from mixprec.scaling import AmaxHistory

__all__ = ["Quantized", "CallRecord", "EngineState", "quantize_operand", "result_dtype"]


@dataclass
class Quantized:
    """One rounded operand: ``storage`` holds its values in the format's real storage
    (divided by ``scale`` where there is one); :meth:`values` gives them back as the
    float32 values the GEMM multiplies."""

    storage: torch.Tensor
    scale: torch.Tensor | None
    operand: Operand
    cached_values: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """The operand's values as float32 (on the format's grid, times the scale)."""
        if self.cached_values is not None:
            return self.cached_values
        if self.operand.is_fp32 or self.storage.dtype in (torch.float16, torch.bfloat16, torch.float32):
            values = self.storage.float()
        else:
            values = from_storage(self.storage, self.operand.fmt)
        return values if self.scale is None else values * self.scale

    def drop_values(self) -> Quantized:
        """This operand without its float32 values (what backward saves)."""
        return Quantized(self.storage, self.scale, self.operand)


@dataclass
class CallRecord:
    """One GEMM-family call seen in a forward: for the coverage report."""

    site: str
    op: str
    flops: float
    formats: dict[str, str]
    emulated: bool
    reason: str = ""


@dataclass
class EngineState:
    """The per-model state of the emulation (see the module docstring)."""

    recipe: Recipe
    generator: torch.Generator | None
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it stays high precision
    histories: dict[str, AmaxHistory] = field(default_factory=dict)
    weights: dict[int, tuple[Any, int, Operand, Quantized]] = field(default_factory=dict)
    module_stack: list[str] = field(default_factory=list)
    high_precision: int = 0  # depth of kept modules the forward is inside
    site_counts: dict[str, int] = field(default_factory=dict)
    recording: bool = False  # amax histories are updated (training forward with grad)
    log: list[CallRecord] | None = None  # coverage recording, when a report asks

    # ---- call sites -------------------------------------------------------------------

    def begin_forward(self, training: bool) -> None:
        """Reset the per-forward call counters at the root module's forward."""
        self.site_counts.clear()
        self.module_stack.clear()
        self.high_precision = 0
        self.recording = training and torch.is_grad_enabled()

    def site(self, op: str) -> str:
        """A name for this call: the module it runs in, the op and its count there."""
        module = self.module_stack[-1] if self.module_stack else ""
        base = f"{module}:{op}"
        count = self.site_counts.get(base, 0)
        self.site_counts[base] = count + 1
        return f"{base}#{count}"

    # ---- scales -----------------------------------------------------------------------

    def scale(self, x: torch.Tensor, operand: Operand, key: str) -> torch.Tensor | None:
        """The per-tensor scale for ``x`` at call site ``key`` (None without scaling);
        under delayed scaling the history records x's amax when training."""
        scaling = operand.scaling
        if scaling is None:
            return None
        fmt = operand.fmt
        if scaling.mode == "current":
            return tensor_scale(x, fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
        history = self.histories.get(key)
        if history is None:
            history = self.histories[key] = AmaxHistory(scaling.history, x.device)
        scale = history.scale(fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
        if self.recording:
            history.record(x)
        return scale

    # ---- weights ----------------------------------------------------------------------

    def weight(self, param: torch.Tensor, operand: Operand, key: str) -> Quantized:
        """``param`` rounded for ``operand``, once per parameter version: a weight used
        several times in one step (tied, shared, recurrent) is rounded once, and the
        optimizer's in-place update (a new version) makes the next forward round again.
        A slice of a parameter used as a weight (MultiheadAttention's packed projection
        for cross-attention) is rounded at each use, not cached."""
        entry = self.weights.get(id(param))
        version = param._version
        if entry is not None and entry[0]() is param and entry[1] == version and entry[2] == operand:
            return entry[3]
        rounded = quantize_operand(param.detach(), operand, self, key)
        if isinstance(param, torch.nn.Parameter) and not torch.compiler.is_compiling():
            self.weights[id(param)] = (weakref.ref(param), version, operand, rounded.drop_values())
        return rounded

    def clear_weights(self) -> None:
        """Forget the rounded weights (after a load or a dtype change)."""
        self.weights.clear()

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The amax histories and the generator's state, as tensors (so the model's
        state dict stays a dict of tensors for torch.save, safetensors and
        torch.distributed.checkpoint): what a resume needs."""
        state = {"recipe": torch.tensor(list(self.recipe.name.encode()), dtype=torch.uint8)}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        for key, history in self.histories.items():
            state[f"amax.{key}"] = history.amax.clone()
            state[f"count.{key}"] = history.count.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved (the recipe's name must match)."""
        name = bytes(state["recipe"].tolist()).decode() if "recipe" in state else None
        if name != self.recipe.name:
            raise ValueError(
                f"this checkpoint's mixprec state is for recipe {name!r}, but the model runs "
                f"{self.recipe.name!r}: convert the model with the checkpoint's recipe")
        histories = {}
        for key, amax in state.items():
            if key.startswith("amax."):
                site = key[len("amax."):]
                history = AmaxHistory(amax.numel(), amax.device)
                history.load_state_dict({"amax": amax, "count": state[f"count.{site}"]})
                histories[site] = history
        self.histories = histories
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


def result_dtype(operand: Operand, compute: torch.dtype) -> torch.dtype:
    """The torch dtype a GEMM result in ``operand``'s format is held in: its own dtype
    for FP32, BF16 and FP16; the compute dtype for narrower formats it holds exactly
    (an E5M2 output of paper 2 lives in FP16); else float32."""
    fmt = operand.fmt
    if fmt.torch_dtype in (torch.float32, torch.float16, torch.bfloat16) and operand.scaling is None:
        return fmt.torch_dtype
    from mixprec.core import formats

    holder = formats.get(compute)
    fits = (fmt.mantissa_bits <= holder.mantissa_bits and fmt.largest <= holder.largest
            and fmt.smallest_subnormal >= holder.smallest_subnormal)
    return compute if fits and operand.scaling is None else torch.float32


def quantize_operand(
    x: torch.Tensor, operand: Operand, state: EngineState, key: str, in_place: bool = False,
    scale: torch.Tensor | None = None,
) -> Quantized:
    """``x`` rounded for ``operand`` (see :class:`Quantized`). A tensor already in the
    format's own dtype is on its grid and is not rounded again. ``in_place`` rounds a
    fresh float32 tensor nobody else holds without a copy. ``scale`` replaces the
    operand's own per-tensor scale (a recomputation in backward reuses the forward's)."""
    if operand.is_fp32:
        return Quantized(x, None, operand, x.float())
    fmt = operand.fmt
    if operand.scaling is None and x.dtype == fmt.torch_dtype:
        return Quantized(x, None, operand, x.float())
    if scale is None:
        scale = state.scale(x, operand, key)
    x32 = x.detach()
    fresh = in_place and x32.dtype == torch.float32 and x32.is_contiguous()
    if x32.dtype != torch.float32:
        x32, fresh = x32.float(), x32.is_contiguous()
    values = quantize(x32, fmt, operand.rounding, scale=scale, saturate=True if scale is not None else None,
                      generator=state.generator, out=x32 if fresh else None)
    unscaled = values if scale is None else values * torch.reciprocal(scale)
    return Quantized(to_storage(unscaled, fmt), scale, operand, values)
