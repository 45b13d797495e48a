"""The optimizer wrapper: master weights, loss scaling, the overflow check and skip,
and rounding the master back into the model's low-precision weights.

It wraps any ``torch.optim`` optimizer and re-implements none of them: the wrapped
optimizer steps the master copies (the model's original float parameters, which only
the optimizer references after :func:`mixprec.prepare`). A master held in FP16
(paper 2) is widened to FP32 for the update, which is then rounded back into FP16 with
the recipe's rounding (stochastic for ``fp8``), so optimizer state stays FP32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.core import formats
from mixprec.layers import round_weight
from mixprec.ops import Rounder
from mixprec.core.quantize import quantize
from mixprec.recipe import Recipe
from mixprec.scaling import LossScaler, make_loss_scaler

__all__ = ["MixedPrecisionOptimizer"]


class MixedPrecisionOptimizer:
    """Mixed-precision training around a torch optimizer.

    Use ``backward(loss)`` (the loss times the loss scale), optionally
    ``clip_grad_norm_(max_norm)``, then ``step()``, which returns whether it stepped: a
    step whose gradients hold Inf/NaN (a NaN loss included) changes no weight, master
    or optimizer state, and the loss scale backs off. ``step()`` synchronises with the
    device once, to read the overflow flag. Give LR schedulers ``optimizer.optimizer``
    and advance them only when ``step()`` returned True.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        recipe: Recipe,
        param_pairs: Sequence[tuple[nn.Parameter, nn.Parameter]],
        generator: torch.Generator | None = None,
        rounders: Sequence[Rounder] = (),
        process_group: Any = None,
        sync_overflow: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MixedPrecisionOptimizer wraps a torch.optim.Optimizer, not {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.recipe = recipe
        self.generator = generator
        self.rounders = list(rounders)
        self.scaler: LossScaler = make_loss_scaler(recipe.loss_scale)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # (master, model weight) for converted layers this optimizer steps
        self.pairs = [(master, model) for master, model in param_pairs if id(master) in in_optimizer]
        paired = {id(master) for master, _ in self.pairs}
        # parameters the model uses directly (norms, unconverted layers): their own masters
        self.direct = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in paired]
        self.master_dtype = formats.get(recipe.master).torch_dtype
        with torch.no_grad():
            for master, _ in self.pairs:
                master.data = master.data.to(self.master_dtype)
                master.grad = None
        self._grads: list[torch.Tensor | None] | None = None
        self._found_inf: torch.Tensor | None = None
        self._backward_pending = False
        self.last_step_skipped = False
        self.process_group = process_group
        self.sync_overflow = sync_overflow

    # ---- the step ----------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (learning rates live here)."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        """The loss scale the next ``backward`` multiplies by."""
        return self.scaler.scale

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss * loss_scale``; may be called several times (several
        losses) before one ``step()``; gradients accumulate."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("backward takes the scalar loss tensor (reduce it with .mean() or .sum() first)")
        if self._grads is not None:
            raise ValueError(
                "backward() after clip_grad_norm_() in the same step: the gradients were already "
                "unscaled; call backward() for every loss first, then clip, then step()"
            )
        (loss.float() * self.scaler.scale).backward(**kwargs)
        self._backward_pending = True

    def _model_grads(self) -> list[torch.Tensor | None]:
        return [model.grad for _, model in self.pairs] + [p.grad for p in self.direct]

    def _unscale(self) -> list[torch.Tensor | None]:
        """FP32 copies of every gradient divided by the loss scale, and the device-side
        flag that says whether any holds Inf/NaN (no host synchronisation here)."""
        if self._grads is not None:
            return self._grads
        if not self._backward_pending:
            raise ValueError(
                "no gradients to use: call optimizer.backward(loss) before step() or clip_grad_norm_() "
                "(a plain loss.backward() would skip the loss scale)"
            )
        grads = [None if g is None else g.detach().to(torch.float32, copy=True) for g in self._model_grads()]
        present = [g for g in grads if g is not None]
        device = present[0].device if present else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
        inverse = torch.full((1,), 1.0 / self.scaler.scale, device=device)
        if present:
            torch._amp_foreach_non_finite_check_and_unscale_(present, found_inf, inverse)
        self._grads, self._found_inf = grads, found_inf
        return grads

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the unscaled gradients to a total norm of ``max_norm``; returns the norm
        before clipping (Inf/NaN on an overflowing step, which step() then skips)."""
        grads = [g for g in self._unscale() if g is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        # torch.nn.utils.clip_grad_norm_'s rule, applied to the unscaled FP32 copies
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient)
        return total

    def step(self, closure: None = None) -> bool:
        """Unscale, check for Inf/NaN, and either skip (returns False) or step the
        masters and round them into the model's weights (returns True)."""
        if closure is not None:
            raise ValueError("closures are not supported: call backward(loss) and then step()")
        grads = self._unscale()
        assert self._found_inf is not None
        group = self._overflow_group()
        if group is not None:
            # overflow consensus: one rank's Inf/NaN skips the step on every rank
            dist.all_reduce(self._found_inf, op=dist.ReduceOp.MAX, group=group)
        finite = not bool(self._found_inf.item())  # the step's one synchronisation
        self._grads, self._found_inf, self._backward_pending = None, None, False
        self.last_step_skipped = not finite
        self.scaler.update(finite)
        if not finite:
            return False
        masters = [master for master, _ in self.pairs] + self.direct
        widened = self._widen_masters()
        for master, grad in zip(masters, grads):
            master.grad = grad
        self.optimizer.step()
        for master in masters:
            master.grad = None
        self._narrow_masters(widened, rounding=self.recipe.update_rounding)
        with torch.no_grad():
            for master, model in self.pairs:
                model.copy_(round_weight(master, self.recipe, self.generator))
        return True

    def _overflow_group(self) -> Any:
        """The process group whose ranks must agree on skipping, or None (no sync)."""
        if self.sync_overflow is False:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.sync_overflow:
                raise ValueError(
                    "sync_overflow=True needs torch.distributed: call torch.distributed.init_process_group "
                    "first (or leave sync_overflow=None for single-process training)"
                )
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) <= 1 and not self.sync_overflow:
            return None
        return group

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (and any the wrapped optimizer holds)."""
        for _, model in self.pairs:
            model.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grads, self._found_inf, self._backward_pending = None, None, False

    def _widen_masters(self) -> list[nn.Parameter]:
        """Low-precision masters as FP32 for the update (the optimizer sees FP32)."""
        if self.master_dtype == torch.float32:
            return []
        widened = [master for master, _ in self.pairs]
        for master in widened:
            master.data = master.data.float()
        return widened

    def _narrow_masters(self, widened: list[nn.Parameter], rounding: str) -> None:
        fmt = formats.get(self.recipe.master)
        for master in widened:
            master.data = quantize(master.data, fmt, rounding, generator=self.generator).to(self.master_dtype)  # type: ignore[arg-type]

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Master weights, the wrapped optimizer's state, the loss scaler, the
        stochastic-rounding generator and the FP8 amax histories."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "masters": [master.detach().clone() for master, _ in self.pairs],
            "scaler": self.scaler.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
            "rounders": [rounder.state_dict() for rounder in self.rounders],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, into an optimizer prepared the same way."""
        masters = state_dict["masters"]
        if len(masters) != len(self.pairs) or len(state_dict["rounders"]) != len(self.rounders):
            raise ValueError(
                f"checkpoint holds {len(masters)} master weights and {len(state_dict['rounders'])} "
                f"rounding states; this optimizer has {len(self.pairs)} and {len(self.rounders)}: "
                "prepare the same model with the same recipe before loading"
            )
        # torch casts loaded optimizer state to each parameter's dtype: load it while
        # the masters are FP32, as they are when the optimizer steps.
        widened = self._widen_masters()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for (master, _), saved in zip(self.pairs, masters):
                master.data = saved.to(device=master.device, dtype=torch.float32).clone()
        self._narrow_masters(widened, rounding="nearest")  # exact: saved values are on the grid
        self.scaler.load_state_dict(state_dict["scaler"])
        if self.generator is not None and state_dict["generator"] is not None:
            self.generator.set_state(state_dict["generator"])
        for rounder, saved in zip(self.rounders, state_dict["rounders"]):
            rounder.load_state_dict(saved)
