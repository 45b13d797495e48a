"""The observer: hooks on a model that record, every N steps, the counts of
:mod:`mixprec.stats.counting` for each layer and tensor class. It changes nothing in
training: the hooks read tensors and return None."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mixprec.core import formats as formats_module
from mixprec.stats.counting import TensorCounts, count_tensor, is_block_format, thresholds

__all__ = [
    "TENSOR_CLASSES",
    "SCALED_CLASSES",
    "StatsConfig",
    "ModelStats",
    "Observer",
    "observe",
]

TENSOR_CLASSES = ("weight", "activation", "error", "weight_grad")
"""The tensor classes of the papers: weights, activations (layer outputs), errors
(activation gradients: the gradient of each layer's output) and weight gradients."""
SCALED_CLASSES = ("error", "weight_grad")
"""The classes that carry the loss scale."""

LossScaleSource = Any
"""None (no scaling), a number, an object with ``.loss_scale`` (a
:class:`mixprec.MixedPrecisionOptimizer`) or ``.get_scale()`` (torch's GradScaler), or a
callable returning the scale."""


@dataclass(frozen=True)
class StatsConfig:
    """What the observer records. ``every``: sample one step in N (steps 0, N, 2N, ...);
    ``formats``: the formats whose flush, subnormal and overflow counts are kept (block
    formats too, ``"mxfp4_e2m1"``, ``"nvfp4"``: flushed, subnormal and clipped in each
    value's block, blocks along the tensor's last dimension);
    ``scale_exponents``: errors and weight gradients are also counted at the unscaled
    values times 2^e for each e here (what-if loss scales); ``classes``: the tensor
    classes to record; ``record_without_grad``: also record forward passes run under
    ``torch.no_grad`` (evaluation), which are skipped by default."""

    every: int = 1
    formats: tuple[str, ...] = ("fp16", "bf16", "e5m2", "e4m3")
    scale_exponents: tuple[int, ...] = tuple(range(-8, 41))
    classes: tuple[str, ...] = TENSOR_CLASSES
    record_without_grad: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an int >= 1 (sample one step in N), got {self.every!r}")
        if not self.formats:
            raise ValueError("formats must name at least one format, e.g. ('fp16', 'bf16', 'e5m2', 'e4m3')")
        for name in self.formats:
            if not is_block_format(name):  # an unknown name fails here, with the list of names
                thresholds(name)  # an unsupported scalar format fails here, with the reason
        unknown = [c for c in self.classes if c not in TENSOR_CLASSES]
        if unknown or not self.classes:
            raise ValueError(f"unknown tensor classes {unknown}; choose from {', '.join(TENSOR_CLASSES)}")
        exps = self.scale_exponents
        if not exps or list(exps) != sorted(set(exps)) or 0 not in exps:
            raise ValueError("scale_exponents must be increasing, distinct, and include 0 (unscaled)")

    @property
    def format_names(self) -> tuple[str, ...]:
        """The canonical names of ``formats``."""
        return tuple(formats_module.resolve(name).name for name in self.formats)


@dataclass(frozen=True)
class ModelStats:
    """What an observer recorded: ``counts[(layer, class)]`` in layer order, the steps
    sampled, the loss scales seen, the recipe name when the model was prepared, the
    layers' module types, and ``extra`` facts for the report's stats.json."""

    layers: tuple[str, ...]
    counts: dict[tuple[str, str], TensorCounts]
    config: StatsConfig
    steps_sampled: int
    loss_scales: tuple[float, ...]
    recipe: str | None = None
    model_name: str = "model"
    layer_types: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, layer: str, cls: str) -> TensorCounts | None:
        """The counts of one layer and class, or None when none were recorded."""
        return self.counts.get((layer, cls))

    def total(self, cls: str) -> TensorCounts:
        """Every layer's counts of one class, summed (the whole-model histogram)."""
        if cls not in TENSOR_CLASSES:
            raise ValueError(f"unknown tensor class {cls!r}; choose from {', '.join(TENSOR_CLASSES)}")
        total = _empty(self.config, cls)
        for (_, c), counts in self.counts.items():
            if c == cls:
                total = total.merged(counts)
        return total


def _empty(config: StatsConfig, cls: str) -> TensorCounts:
    exps = config.scale_exponents if cls in SCALED_CLASSES else (0,)
    return TensorCounts(formats=config.format_names, exponents=tuple(exps))


def _scale_reader(source: LossScaleSource) -> Callable[[], float]:
    if source is None:
        return lambda: 1.0
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        value = float(source)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"a loss scale must be finite and > 0, got {source}")
        return lambda: value
    if hasattr(source, "loss_scale"):
        return lambda: float(source.loss_scale)
    if hasattr(source, "get_scale"):
        return lambda: float(source.get_scale())
    if callable(source):
        return lambda: float(source())
    raise TypeError(
        "loss_scale must be None, a number, a mixprec optimizer (anything with .loss_scale), "
        f"a torch GradScaler, or a callable returning the scale; got {type(source).__name__}"
    )


def _default_filter(name: str, module: nn.Module) -> bool:
    """Layers are the modules that own parameters (convolutions, linears, norms,
    embeddings, LSTMs, attention), the root excepted."""
    return bool(name) and any(True for _ in module.parameters(recurse=False))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module's output (tuples, lists, dicts nested)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class Observer:
    """Records per-layer statistics of a model's weights, activations, errors and weight
    gradients while it trains; a context manager that removes its hooks on exit.

    Call :meth:`step` once per training step (after the optimizer's step): the observer
    samples steps 0, N, 2N, ... (``config.every``). On a sampled step it counts each
    observed layer's own parameters (once a step), each floating-point output of its
    forward calls, the gradient of each such output (the errors: a tensor hook), and each
    gradient that backward computes for its parameters (a parameter hook, once per
    backward contribution). Errors and weight gradients carry the loss scale in force
    when backward runs, read from ``loss_scale``. Unsampled steps cost one flag check
    per hook.
    """

    def __init__(
        self,
        model: nn.Module,
        config: StatsConfig | None = None,
        loss_scale: LossScaleSource = None,
        module_filter: Callable[[str, nn.Module], bool] | None = None,
        model_name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"observe takes an nn.Module, not {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else StatsConfig()
        if not isinstance(self.config, StatsConfig):
            raise TypeError(f"config must be a StatsConfig, not {type(self.config).__name__}")
        self._read_scale = _scale_reader(loss_scale)
        chosen = module_filter or _default_filter
        self.modules: dict[str, nn.Module] = {name: m for name, m in model.named_modules() if chosen(name, m)}
        if not self.modules:
            raise ValueError(
                "no layer to observe: the default filter takes modules that own parameters; "
                "pass module_filter=lambda name, module: ... to choose others"
            )
        self.model_name = model_name or type(model).__name__
        self.counts: dict[tuple[str, str], TensorCounts] = {}
        self.step_index = 0
        self.steps_sampled = 0
        self._loss_scales: set[float] = set()
        self._weights_done: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._attached = False
        self._sampled_this_step = False

    # ---- attaching ---------------------------------------------------------------------

    def __enter__(self) -> Observer:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self) -> None:
        """Register the hooks (``with observe(...)`` does this on entry)."""
        if self._attached:
            raise ValueError("this observer is already attached; use it in one `with` block at a time")
        claimed: set[int] = set()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            if "weight_grad" not in self.config.classes:
                continue
            for param in module.parameters(recurse=False):
                if param.requires_grad and id(param) not in claimed:  # a tied weight counts once
                    claimed.add(id(param))
                    self._handles.append(param.register_hook(self._grad_hook(name, "weight_grad")))
        self._attached = True

    def close(self) -> None:
        """Remove every hook; what was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attached = False

    # ---- the clock -----------------------------------------------------------------------

    @property
    def sampling(self) -> bool:
        """Whether the current step is recorded."""
        return self.step_index % self.config.every == 0

    def step(self) -> None:
        """Advance to the next training step (call once per step, after the update)."""
        if self.sampling and self._sampled_this_step:
            self.steps_sampled += 1
        self.step_index += 1
        self._weights_done.clear()
        self._sampled_this_step = False

    # ---- recording -----------------------------------------------------------------------

    def _record(self, layer: str, cls: str, tensor: torch.Tensor, scale: float) -> None:
        if tensor.numel() == 0:
            return
        exps = self.config.scale_exponents if cls in SCALED_CLASSES else (0,)
        counts = count_tensor(tensor, self.config.format_names, scale, exps)
        key = (layer, cls)
        previous = self.counts.get(key)
        self.counts[key] = counts if previous is None else previous.merged(counts)
        self._sampled_this_step = True
        if cls in SCALED_CLASSES:
            self._loss_scales.add(scale)

    def _forward_hook(self, layer: str) -> Callable[[nn.Module, Any, Any], None]:
        classes = self.config.classes

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (self._attached and self.sampling):
                return
            if not torch.is_grad_enabled() and not self.config.record_without_grad:
                return
            if "weight" in classes and layer not in self._weights_done:
                self._weights_done.add(layer)
                for param in module.parameters(recurse=False):
                    self._record(layer, "weight", param, 1.0)
            for tensor in _tensors(output):
                if "activation" in classes:
                    self._record(layer, "activation", tensor, 1.0)
                if "error" in classes and tensor.requires_grad:
                    tensor.register_hook(self._grad_hook(layer, "error"))

        return hook

    def _grad_hook(self, layer: str, cls: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._attached and self.sampling:
                self._record(layer, cls, grad, self._read_scale())

        return hook

    # ---- results -------------------------------------------------------------------------

    def summary(self) -> ModelStats:
        """What was recorded so far, as an immutable :class:`ModelStats`."""
        sampled = self.steps_sampled + (1 if self.sampling and self._sampled_this_step else 0)
        recipe = next((m._mixprec.recipe for m in self.model.modules() if hasattr(m, "_mixprec")), None)
        recorded = {layer for layer, _ in self.counts}
        return ModelStats(
            layers=tuple(name for name in self.modules if name in recorded),
            layer_types=tuple(type(m).__name__ for name, m in self.modules.items() if name in recorded),
            counts=dict(self.counts),
            config=self.config,
            steps_sampled=sampled,
            loss_scales=tuple(sorted(self._loss_scales)),
            recipe=getattr(recipe, "name", None),
            model_name=self.model_name,
        )

    def report(self, out_dir: str | Path, **options: Any) -> Path:
        """Write ``report.md`` and its PNGs into ``out_dir`` (see
        :func:`mixprec.stats.report.write_report` for ``options``); returns the path of
        report.md."""
        from mixprec.stats.report import write_report

        return write_report(self.summary(), out_dir, **options)


def observe(
    model: nn.Module,
    every: int = 1,
    loss_scale: LossScaleSource = None,
    formats: tuple[str, ...] | None = None,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    config: StatsConfig | None = None,
) -> Observer:
    """An :class:`Observer` of ``model``, to use as ``with observe(model) as obs:``.

    ``every``: sample one training step in N (call ``obs.step()`` after each step);
    ``loss_scale``: the optimizer (or scale, or callable) whose loss scale the errors and
    weight gradients carry; ``formats``: the formats to count for (default fp16, bf16,
    e5m2, e4m3); ``module_filter(name, module)``: which modules are layers (default:
    those that own parameters). ``config`` overrides ``every`` and ``formats``.
    """
    if config is None:
        config = StatsConfig(every=every) if formats is None else StatsConfig(every=every, formats=tuple(formats))
    return Observer(model, config, loss_scale=loss_scale, module_filter=module_filter)
