"""The loss-scale history of a training run: the scale after each step and which steps
were skipped for Inf/NaN gradients, read from the optimizer's loss scaler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixprec.scaling import LossScaler

__all__ = ["LossScaleHistory", "loss_scale_history"]


@dataclass(frozen=True)
class LossScaleHistory:
    """``steps[i]`` is the step count after update i (skipped steps included),
    ``scales[i]`` the loss scale in force after it, ``skipped[i]`` whether that step was
    skipped; ``skipped_steps`` counts them; ``final_scale`` is the scale now."""

    steps: tuple[int, ...]
    scales: tuple[float, ...]
    skipped: tuple[bool, ...]
    skipped_steps: int
    final_scale: float
    dynamic: bool

    @property
    def skipped_at(self) -> tuple[int, ...]:
        """The steps that were skipped."""
        return tuple(step for step, skip in zip(self.steps, self.skipped) if skip)

    def as_record(self) -> dict[str, Any]:
        """A JSON-ready dict: ``curve`` as [step, scale] pairs, the skipped steps and counts."""
        return {
            "curve": [[step, scale] for step, scale in zip(self.steps, self.scales)],
            "skipped_at": list(self.skipped_at),
            "skipped_steps": self.skipped_steps,
            "final_scale": self.final_scale,
            "dynamic": self.dynamic,
        }


def loss_scale_history(optimizer: Any) -> LossScaleHistory:
    """The loss-scale history of a :class:`mixprec.MixedPrecisionOptimizer` (or of its
    :class:`mixprec.scaling.LossScaler`): every update's scale and skip flag, the number
    of skipped steps, and the current scale. Reads host values only (no synchronisation)."""
    scaler = optimizer if isinstance(optimizer, LossScaler) else getattr(optimizer, "scaler", optimizer)
    scaler = getattr(scaler, "loss_scaler", scaler)  # a mixprec.GradScaler holds its LossScaler
    if not isinstance(scaler, LossScaler):
        raise TypeError(
            "loss_scale_history takes a mixprec.MixedPrecisionOptimizer (from mixprec.prepare) or a "
            f"mixprec.scaling.LossScaler, not {type(optimizer).__name__}"
        )
    history = scaler.history
    return LossScaleHistory(
        steps=tuple(int(step) for step, _, _ in history),
        scales=tuple(float(scale) for _, scale, _ in history),
        skipped=tuple(bool(skip) for _, _, skip in history),
        skipped_steps=int(scaler.state.skipped),
        final_scale=float(scaler.scale),
        dynamic=scaler.dynamic,
    )
