"""Loss scaling (static, dynamic, enhanced with a rising minimum) and FP8 per-tensor
scale tracking (current, or delayed over an amax history).

The dynamic loss scale is an immutable value with a pure update,
``adjust(state, finite, config) -> state``, so it can be tested step by step and
checkpointed field by field; :class:`LossScaler` wraps it with the history the
diagnostics read. Nothing here touches parameters.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec.core import formats
from mixprec.core.formats import FloatFormat
from mixprec.core.quantize import abs_max, scale_from_amax

_FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = [
    "DynamicScaling",
    "StaticScaling",
    "LossScaleState",
    "adjust",
    "min_scale_at",
    "LossScaler",
    "AmaxHistory",
    "make_loss_scaler",
]


@dataclass(frozen=True)
class StaticScaling:
    """A constant loss scale S (paper 1: chosen per model; 1.0 means no scaling)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"a static loss scale must be finite and > 0, got {self.scale}")


@dataclass(frozen=True)
class DynamicScaling:
    """Dynamic loss scaling: start at ``init_scale``; after a step whose gradients hold
    Inf/NaN, skip it and multiply the scale by ``backoff_factor``; after
    ``growth_interval`` clean steps in a row, multiply it by ``growth_factor``. The
    defaults are torch.amp.GradScaler's.

    ``hysteresis`` > 1 backs off only after that many overflowing steps in a row
    (DeepSpeed's option). The scale never falls below ``min_scale``, nor below the
    minimum that ``min_scale_schedule`` (``(step, minimum)`` pairs: paper 2's enhanced
    loss scaling) gives for the current step; reaching the floor warns, never aborts.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: float = 0.0
    min_scale_schedule: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be finite and > 0, got {self.init_scale}")
        if not self.growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError("growth_interval and hysteresis must be >= 1")
        if self.min_scale < 0:
            raise ValueError(f"min_scale must be >= 0, got {self.min_scale}")
        steps = [step for step, _ in self.min_scale_schedule]
        if steps != sorted(steps) or any(m <= 0 for _, m in self.min_scale_schedule):
            raise ValueError(
                "min_scale_schedule must be (step, minimum) pairs with rising steps and "
                f"positive minimums, got {self.min_scale_schedule}"
            )


@dataclass(frozen=True)
class LossScaleState:
    """Everything the dynamic loss scale remembers between steps."""

    scale: float
    growth_tracker: int = 0  # clean steps since the last change
    hysteresis_left: int = 1  # overflows still tolerated before backing off
    step: int = 0  # updates seen, skipped ones included
    skipped: int = 0  # steps skipped for Inf/NaN


def min_scale_at(config: DynamicScaling, step: int) -> float:
    """The floor under the loss scale at ``step``: the largest of ``min_scale`` and the
    schedule's minimum for the latest entry at or before ``step``."""
    floor = config.min_scale
    for start, minimum in config.min_scale_schedule:
        if step >= start:
            floor = max(floor, minimum)
    return floor


def adjust(state: LossScaleState, finite: bool, config: DynamicScaling) -> LossScaleState:
    """The loss-scale state after one step whose gradients were ``finite`` (or not).

    Overflow: count a skip; when hysteresis is used up, back off (never below the
    floor) and restart the growth count. Clean step: count it, restore hysteresis,
    and grow the scale after ``growth_interval`` clean steps (unless that overflows).
    """
    step = state.step + 1
    floor = min_scale_at(config, step)
    if not finite:
        if state.hysteresis_left > 1:
            return dataclasses.replace(
                state, hysteresis_left=state.hysteresis_left - 1, growth_tracker=0,
                step=step, skipped=state.skipped + 1,
            )
        scale = max(state.scale * config.backoff_factor, floor)
        return LossScaleState(scale, 0, config.hysteresis, step, state.skipped + 1)
    tracker = state.growth_tracker + 1
    scale = state.scale
    if tracker >= config.growth_interval:
        grown = scale * config.growth_factor
        if grown <= _FLOAT32_MAX:  # the scale multiplies float32 losses
            scale = grown
        tracker = 0
    return LossScaleState(max(scale, floor), tracker, config.hysteresis, step, state.skipped)


@dataclass
class LossScaler:
    """The loss scale in force, its update after each step, and its history (step,
    scale, skipped) for diagnostics; ``state_dict`` round-trips every field."""

    config: StaticScaling | DynamicScaling
    state: LossScaleState = field(init=False)
    history: list[tuple[int, float, bool]] = field(default_factory=list)
    _warned_floor: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        init = self.config.scale if isinstance(self.config, StaticScaling) else self.config.init_scale
        hysteresis = self.config.hysteresis if isinstance(self.config, DynamicScaling) else 1
        self.state = LossScaleState(init, hysteresis_left=hysteresis)

    @property
    def scale(self) -> float:
        """The current loss scale S: the loss is multiplied by it before backward."""
        return self.state.scale

    @property
    def dynamic(self) -> bool:
        """Whether the scale changes with overflow (dynamic), or stays fixed (static)."""
        return isinstance(self.config, DynamicScaling)

    def update(self, finite: bool) -> None:
        """Record one step: ``finite`` says whether its gradients were free of Inf/NaN."""
        if isinstance(self.config, DynamicScaling):
            before = self.state
            self.state = adjust(self.state, finite, self.config)
            floor = min_scale_at(self.config, self.state.step)
            if not finite and floor > 0 and self.state.scale == floor and not self._warned_floor:
                self._warned_floor = True
                warnings.warn(
                    f"mixprec: the loss scale reached its floor {floor:g} at step "
                    f"{self.state.step} (from {before.scale:g}); gradients still overflow "
                    "there. Training continues, skipping those steps; lower the learning "
                    "rate or look at `mixprec analyze` if this persists.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            self.state = dataclasses.replace(
                self.state, step=self.state.step + 1, skipped=self.state.skipped + (not finite)
            )
        self.history.append((self.state.step, self.state.scale, not finite))

    def state_dict(self) -> dict[str, Any]:
        """Every field of the state, the history and the warning flag."""
        return {
            "state": dataclasses.asdict(self.state),
            "history": list(self.history),
            "warned_floor": self._warned_floor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.state = LossScaleState(**state_dict["state"])
        self.history = [tuple(entry) for entry in state_dict["history"]]  # type: ignore[misc]
        self._warned_floor = bool(state_dict["warned_floor"])


def make_loss_scaler(config: StaticScaling | DynamicScaling | float | None) -> LossScaler:
    """A :class:`LossScaler` from a config, a number (static scale) or None (no scaling)."""
    if config is None:
        return LossScaler(StaticScaling(1.0))
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        return LossScaler(StaticScaling(float(config)))
    if isinstance(config, (StaticScaling, DynamicScaling)):
        return LossScaler(config)
    raise TypeError(
        "a loss scale is None, a number, StaticScaling(...) or DynamicScaling(...), "
        f"not {type(config).__name__}"
    )


class AmaxHistory:
    """FP8 per-tensor scaling state for one tensor: the last ``length`` absolute
    maxima ("delayed scaling": the scale for this step comes from earlier steps'
    amax, as Transformer Engine does), kept on the tensor's device so that recording
    an amax never synchronises with the host."""

    def __init__(self, length: int = 16, device: torch.device | str = "cpu") -> None:
        if length < 1:
            raise ValueError(f"an amax history needs length >= 1, got {length}")
        self.length = length
        self.amax = torch.zeros(length, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, x: torch.Tensor) -> None:
        """Push ``x``'s absolute maximum (as a device tensor; no synchronisation); a
        non-finite amax is pushed as 0."""
        self.record_amax(abs_max(x))

    def record_amax(self, current: torch.Tensor) -> None:
        """Push an absolute maximum already taken (a 0-d float32 tensor: a rounding
        pass that reduced it while it read the tensor); a non-finite one as 0."""
        # an overflowing step's Inf/NaN is not a range to scale for (the step is skipped):
        # recorded as 0, it leaves the history's maximum to the finite steps around it
        current = torch.where(torch.isfinite(current), current, torch.zeros_like(current))
        if self.amax.device != current.device:
            self.amax = self.amax.to(current.device)
            self.count = self.count.to(current.device)
        # in place: a compiled graph (and an autograd.Function's backward in it) updates
        # the history's own tensors
        slot = torch.remainder(self.count, self.length)
        self.amax.index_put_((slot.reshape(1),), current.reshape(1))
        self.count.add_(1)

    def scale(self, fmt: str | FloatFormat, margin: int = 0, power_of_two: bool = True) -> torch.Tensor:
        """The scale from the history's largest amax (1.0 while the history is empty)."""
        return scale_from_amax(self.amax.max(), formats.get(fmt), margin=margin, power_of_two=power_of_two)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The history and the count of records."""
        return {"amax": self.amax.clone(), "count": self.count.clone()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved (its length must match)."""
        amax = state_dict["amax"]
        if amax.numel() != self.length:
            raise ValueError(f"amax history of length {amax.numel()} does not fit length {self.length}")
        self.amax = amax.clone().to(self.amax.device)
        self.count = state_dict["count"].clone().to(self.count.device)

