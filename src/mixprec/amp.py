"""torch.amp's loop for mixprec's recipes: :class:`GradScaler`, and :func:`prepare`
with the optimizer it returns.

``GradScaler(recipe)`` has torch.amp.GradScaler's methods and misuse errors, with the
recipe's loss scaling (static, dynamic with torch's defaults, hysteresis, paper 2's
rising minimum). ``step`` skips a step whose gradients hold Inf/NaN (on every rank
under torch.distributed) and says so. Under FP16 masters (paper 2) the optimizer
computes the update in FP32 (its state FP32) and ``step`` rounds the parameters onto
the FP16 grid with the recipe's update rounding (stochastic for ``fp8``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.core.quantize import quantize
from mixprec.nn.convert import convert
from mixprec.recipe import Recipe, get_recipe
from mixprec.scaling import LossScaler, make_loss_scaler

__all__ = ["GradScaler", "MixedPrecisionOptimizer", "prepare"]


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class _OptimizerState:
    """What the scaler knows of one optimizer between two ``update()`` calls."""

    def __init__(self) -> None:
        self.stage = _Stage.READY
        self.found_inf: torch.Tensor | None = None


class GradScaler:
    """Loss scaling and the overflow check for a recipe, shaped like
    ``torch.amp.GradScaler``: ``scale(loss).backward()``, optionally ``unscale_(opt)``
    then clip, ``step(opt)``, ``update()``. ``recipe`` gives the loss scaling
    (``recipe.loss_scale``), the master format and the update rounding; a recipe with
    no loss scaling gets a constant scale of 1 (the overflow check still runs).
    ``process_group`` is the group whose ranks agree on skipping (the default group
    when torch.distributed is initialised with more than one rank)."""

    def __init__(self, recipe: str | Recipe = "fp16", *, enabled: bool = True,
                 generator: torch.Generator | None = None, process_group: Any = None) -> None:
        self.recipe = get_recipe(recipe)
        self._enabled = enabled
        self.loss_scaler: LossScaler = make_loss_scaler(self.recipe.loss_scale if enabled else None)
        self.process_group = process_group
        if generator is None and self.recipe.update_rounding == "stochastic":
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.generator = generator
        self._states: dict[int, _OptimizerState] = {}
        self.last_step_skipped = False

    # ---- torch.amp.GradScaler's interface ---------------------------------------------

    def is_enabled(self) -> bool:
        """Whether scaling is on (``enabled=False`` makes every method a pass-through)."""
        return self._enabled

    def get_scale(self) -> float:
        """The loss scale the next ``scale()`` multiplies by."""
        return self.loss_scaler.scale

    def scale(self, outputs: Any) -> Any:
        """``outputs`` (a tensor, or tensors in lists/tuples) times the loss scale, in FP32."""
        if isinstance(outputs, torch.Tensor):
            return outputs.float() * self.loss_scaler.scale
        if isinstance(outputs, Iterable):
            return type(outputs)(self.scale(o) for o in outputs)  # type: ignore[call-arg]
        raise TypeError(f"scale takes a tensor or an iterable of tensors, not {type(outputs).__name__}")

    def _state(self, optimizer: torch.optim.Optimizer) -> _OptimizerState:
        return self._states.setdefault(id(optimizer), _OptimizerState())

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the loss scale in place and check them
        for Inf/NaN (agreed across ranks)."""
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state.stage is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state.stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads = []
        device = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = _local(param.grad)  # FSDP2: this rank's shard; the all-reduce below covers the rest
                device = grad.device
                grads.append(grad)
        group = self._overflow_group()
        if device is None and group is not None and dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())  # nccl reduces CUDA tensors only
        found_inf = torch.zeros(1, device=device or "cpu")
        if grads:
            inverse = torch.full((1,), 1.0 / self.loss_scaler.scale, device=found_inf.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
        if group is not None:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        state.found_inf = found_inf
        state.stage = _Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Step ``optimizer`` unless the gradients hold Inf/NaN; returns what its
        ``step`` returned, or None for a skipped step (``last_step_skipped`` says which).
        A skipped step changes no parameter and no optimizer state."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        state = self._state(optimizer)
        if state.stage is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state.stage is _Stage.READY:
            self.unscale_(optimizer)
        assert state.found_inf is not None
        if not any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            raise AssertionError("No inf checks were recorded for this optimizer.")
        finite = not bool(state.found_inf.item())  # the step's one synchronisation
        result = None
        if finite:
            result = optimizer.step(*args, **kwargs)
            self._round_masters(optimizer)
        state.stage = _Stage.STEPPED
        self.last_step_skipped = not finite
        return result

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Adjust the loss scale from this iteration's steps (back off after an
        overflow, grow after ``growth_interval`` clean steps) and start the next one."""
        if not self._enabled:
            return
        if new_scale is not None:
            self.loss_scaler.state = dataclasses.replace(self.loss_scaler.state, scale=float(new_scale))
        else:
            checked = [s.found_inf for s in self._states.values() if s.found_inf is not None]
            if not checked:
                raise AssertionError("No inf checks were recorded prior to update.")
            finite = not any(bool(f.item()) for f in checked)
            self.loss_scaler.update(finite)
        self._states.clear()

    def state_dict(self) -> dict[str, Any]:
        """The recipe's name, the loss-scale state and history, and the generator."""
        return {
            "recipe": self.recipe.name,
            "loss_scaler": self.loss_scaler.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the recipe must be the one this scaler runs."""
        if not isinstance(state_dict, dict) or "loss_scaler" not in state_dict:
            raise ValueError("not a mixprec GradScaler state_dict (expected keys 'recipe', 'loss_scaler')")
        if state_dict.get("recipe") != self.recipe.name:
            raise ValueError(
                f"this GradScaler state is from recipe {state_dict.get('recipe')!r}, but this scaler runs "
                f"{self.recipe.name!r}: build GradScaler({state_dict.get('recipe')!r}) to resume it")
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        if self.generator is not None and state_dict.get("generator") is not None:
            self.generator.set_state(state_dict["generator"])

    # ---- internals --------------------------------------------------------------------

    def _overflow_group(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _round_masters(self, optimizer: torch.optim.Optimizer) -> None:
        """Round the updated parameters onto the master format's grid with the recipe's
        update rounding (paper 2: FP16 masters, stochastic): the update itself was
        computed in FP32 by the optimizer, whose state stays FP32."""
        fmt = self.recipe.master_fmt
        if fmt.mantissa_bits >= 23:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None and param.is_floating_point():
                        local = _local(param)  # FSDP2: each rank rounds its own shard
                        if local.dtype == torch.float32 and local.is_contiguous():
                            # in place: one pass, no float32 copy of the parameter
                            quantize(local, fmt, self.recipe.update_rounding, generator=self.generator, out=local)
                        else:
                            local.copy_(quantize(local, fmt, self.recipe.update_rounding, generator=self.generator))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's parameters and gradients); other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """The optimizer :func:`prepare` returns: the user's optimizer (its parameter
    groups and state, shared) with a :class:`GradScaler`. A real
    ``torch.optim.Optimizer``, so LR schedulers accept it. ``backward(loss)`` scales
    and back-propagates (call it for several losses before one step); ``unscale_()``
    then ``torch.nn.utils.clip_grad_norm_`` (or ``clip_grad_norm_``) clips true
    gradients; ``step()`` returns whether it stepped, and updates the loss scale."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: str | Recipe, generator: torch.Generator | None = None,
                 process_group: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MixedPrecisionOptimizer wraps a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if isinstance(optimizer, MixedPrecisionOptimizer):
            raise ValueError("this optimizer is already prepared; pass the torch optimizer it wraps only once")
        self.optimizer = optimizer
        self.scaler = GradScaler(recipe, generator=generator, process_group=process_group)
        self.recipe = self.scaler.recipe
        # share the wrapped optimizer's groups, state and defaults (no second copy)
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        from collections import OrderedDict

        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()
        self._backward_pending = False

    @property
    def loss_scale(self) -> float:
        """The loss scale the next ``backward`` multiplies by."""
        return self.scaler.get_scale()

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped for Inf/NaN gradients."""
        return self.scaler.last_step_skipped

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss * loss_scale`` (gradients accumulate over calls)."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("backward takes the scalar loss tensor (reduce it with .mean() or .sum() first)")
        if self.scaler._state(self.optimizer).stage is _Stage.UNSCALED:
            raise ValueError("backward() after unscale_() in the same step: call backward() for every loss first, "
                             "then unscale_() and clip, then step()")
        self.scaler.scale(loss).backward(**kwargs)
        self._backward_pending = True

    def unscale_(self) -> None:
        """Divide the gradients by the loss scale (before clipping them)."""
        self._check_pending()
        self.scaler.unscale_(self.optimizer)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale (once) and clip the gradients to a total norm of ``max_norm``;
        returns the norm before clipping (Inf/NaN on a step that will be skipped)."""
        if self.scaler._state(self.optimizer).stage is _Stage.READY:
            self.unscale_()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def _check_pending(self) -> None:
        if not self._backward_pending:
            raise ValueError("no gradients to use: call optimizer.backward(loss) first (a plain loss.backward() "
                             "would skip the loss scale)")

    def step(self, closure: Any = None) -> bool:  # type: ignore[override]
        """Step unless the gradients overflowed, then update the loss scale; returns
        whether it stepped."""
        if closure is not None:
            raise ValueError("closures are not supported: call backward(loss) and then step()")
        self._check_pending()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._backward_pending = False
        return not self.scaler.last_step_skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict and the scaler's."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict`."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "scaler"}:
            raise ValueError("not a MixedPrecisionOptimizer state_dict (expected keys 'optimizer' and 'scaler')")
        self.scaler.load_state_dict(state_dict["scaler"])  # checks the recipe first: nothing changes on mismatch
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        return f"MixedPrecisionOptimizer({self.recipe.name}, {self.optimizer!r})"


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer, recipe: str | Recipe = "fp16",
            generator: torch.Generator | None = None) -> tuple[nn.Module, MixedPrecisionOptimizer]:
    """The one-call shortcut: ``convert(model, recipe)`` and wrap ``optimizer`` (built
    over the model's parameters, which stay the master weights) in a
    :class:`MixedPrecisionOptimizer`. Returns ``(model, optimizer)``."""
    recipe = get_recipe(recipe)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"prepare takes a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if isinstance(optimizer, MixedPrecisionOptimizer):
        raise ValueError("this optimizer is already prepared; pass the torch optimizer it wraps only once")
    model_params = {id(p) for p in model.parameters()}
    if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds none of this model's parameters: build it over model.parameters()")
    convert(model, recipe, generator)
    return model, MixedPrecisionOptimizer(optimizer, recipe)
