"""``convert(model, recipe)``: make any ``nn.Module`` run under a recipe.

Nothing in the model is replaced or copied. Its parameters stay its own and become
the master weights (FP32; for paper 2's FP16 masters, FP32 tensors whose values are
rounded onto the FP16 grid, here and after every update: one dtype for DDP, FSDP and
the optimizer, the same numbers as FP16 storage);
hooks enter :class:`~mixprec.nn.intercept.EmulationMode` around the model's forward
and leave it on exit, errors included; modules the recipe keeps in high precision get
FP32 inputs. The per-model state (generator, amax histories, rounded weights) lives on
the model as ``model._mixprec`` and travels in ``model.state_dict()`` as tensors under
keys starting ``_mixprec_state.``; a state dict without them (pretrained weights) loads
as usual.
"""

from __future__ import annotations

import functools

import math

from typing import Any

import torch
from torch import nn

from mixprec.core.quantize import quantize
from mixprec.nn import kernels
from mixprec.nn.intercept import EmulationMode
from mixprec.nn.state import EngineState, random_state_from
from mixprec.recipe import Recipe, get_recipe

__all__ = ["convert", "engine_state", "is_converted", "STATE_KEY"]

STATE_KEY = "_mixprec_state"
"""The state-dict key prefix of a converted model's mixprec state."""


def engine_state(model: nn.Module) -> EngineState:
    """The :class:`EngineState` of a converted model (unwrapping DDP, FSDP and
    ``torch.compile`` wrappers); a clear error for a model that was never converted."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        state = getattr(candidate, "_mixprec", None)
        if isinstance(state, EngineState):
            return state
    raise ValueError("this model was not converted: call mixprec.convert(model, recipe) first")


def is_converted(model: nn.Module) -> bool:
    """Whether :func:`convert` ran on ``model`` (or the model a wrapper holds)."""
    try:
        engine_state(model)
    except ValueError:
        return False
    return True


_WEIGHTED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _output_head(model: nn.Module) -> nn.Module | None:
    """The layer whose output is the model's own: Hugging Face's output embeddings, or
    the last linear or convolution in definition order (logits, a generator's images)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module):
            return head
    layers = [m for m in model.modules() if isinstance(m, _WEIGHTED_LAYERS)]
    return layers[-1] if layers else None


def _kept_modules(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    rules = recipe.keep
    head = _output_head(model) if rules.output_head else None
    kept: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(f"{outer}.") for outer in kept):
            continue  # inside a kept module already
        why = "output head (recipe default)" if module is head else rules.matches(module, name)
        if why is not None:
            kept[name] = why
    if rules.last_layers > 0:
        for name in _last_layers(model, rules.last_layers):
            if name not in kept and not any(name.startswith(f"{outer}.") for outer in kept):
                kept[name] = f"last {rules.last_layers:.0%} of the layers (recipe default)"
    return kept


def _kept_recipe(recipe: Recipe) -> Recipe | None:
    """The recipe the kept modules run under (None: their own FP32 operations)."""
    name = recipe.keep.recipe
    if name.strip().lower() == "fp32":
        return None
    kept = get_recipe(name)
    if kept.has_blocks or kept.fallback is not None:
        raise ValueError(f"recipe {recipe.name!r} keeps modules under {name!r}, which has block formats or a "
                         "fallback of its own; name a recipe with scalar formats (KeepHighPrecision(recipe='bf16'))")
    return kept


def _last_layers(model: nn.Module, share: float) -> list[str]:
    """The names of the last ``share`` (rounded up) of the blocks in the model's longest
    ModuleList or Sequential (a transformer's layers)."""
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    if not stacks:
        return []
    name, stack = max(stacks, key=lambda item: len(item[1]))
    count = math.ceil(share * len(stack) - 1e-9)
    prefix = f"{name}." if name else ""
    return [f"{prefix}{child}" for child, _ in list(stack.named_children())[len(stack) - count:]]


def _widen_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def widen(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        return value

    return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}


def convert(model: nn.Module, recipe: str | Recipe, generator: torch.Generator | None = None) -> nn.Module:
    """Run every GEMM-family call of ``model``'s forward (and backward) under
    ``recipe``; returns the same model. ``generator`` seeds stochastic rounding (by
    default torch's global RNG does, so ``torch.manual_seed`` makes a run repeatable);
    the seed and a forward count are in the model's state dict. Convert before wrapping in DDP/FSDP and before ``torch.compile``."""
    recipe = get_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, not {type(model).__name__}")
    if is_converted(model):
        raise ValueError("this model was already converted by mixprec; convert the original model once")
    if isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod") or _sharded(model):
        raise ValueError(
            f"convert the model before wrapping it ({type(model).__name__}): mixprec.convert(model, recipe), "
            "then DistributedDataParallel / fully_shard / torch.compile")
    params = list(model.parameters())
    if generator is None and recipe.stochastic:
        device = params[0].device if params else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator(device=device).manual_seed(seed)
    if recipe.master_fmt.mantissa_bits < 23:
        with torch.no_grad():  # masters on the master format's grid (paper 2's FP16), in place
            for param in params:
                if param.is_floating_point():
                    param.copy_(quantize(param, recipe.master_fmt))
    random_state = None if generator is None else random_state_from(generator)
    state = EngineState(recipe, random_state, kept=_kept_modules(model, recipe), kept_recipe=_kept_recipe(recipe))
    model._mixprec = state  # type: ignore[assignment]
    if recipe.is_fp32:
        return model
    # probe the GEMM kernels' capabilities now, eagerly: a compiled forward cannot
    kernels.probe(params[0].device if params else "cpu")
    _attach(model, state)
    model.__class__ = _converted_class(type(model))
    return model


@functools.cache
def _converted_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` that only marks a converted model, with ``cls``'s name.

    torch.compile guards a compiled module call on the module's type but, by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), not on its hooks, which are
    what convert adds: without a type of its own, a converted model would run the graph
    compiled earlier for an unconverted model of the same class, with no emulation at
    all. (FSDP2's ``fully_shard`` swaps in a subclass for the same kind of reason.)"""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                        "__doc__": cls.__doc__})


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` ran on ``model`` or inside it (its parameters are
    then shards, and its all-gathered weights would bypass the engine's weight cache)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _attach(model: nn.Module, state: EngineState) -> None:
    mode = EmulationMode(state)
    depth = [0]

    def enter(module: nn.Module, args: tuple) -> None:
        if depth[0] == 0:
            state.begin_forward(module.training)
            mode.__enter__()
        depth[0] += 1

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            mode.__exit__(None, None, None)

    model.register_forward_pre_hook(enter, prepend=True)
    model.register_forward_hook(leave, always_call=True)
    for name, module in model.named_modules():
        if not name:
            continue
        kept = name in state.kept
        module.register_forward_pre_hook(_push(state, name, kept), with_kwargs=True)
        module.register_forward_hook(_pop(state, kept), always_call=True)
    model.register_state_dict_post_hook(_save_state)
    model.register_load_state_dict_pre_hook(_load_state)


def _push(state: EngineState, name: str, kept: bool) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state.module_stack.append(name)
        if kept:
            state.high_precision += 1
            # FP32 inputs for FP32 operations; a kept recipe rounds them itself
            return _widen_inputs(args, kwargs) if state.kept_recipe is None else None
        if isinstance(module, nn.RNNBase):
            return _as_weight_dtype(module, args, kwargs)
        return None
    return hook


def _as_weight_dtype(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """nn.LSTM/GRU check that their input has their weights' dtype before the emulated
    recurrence runs (which rounds it to the recipe's format anyway): cast it there."""
    dtype = module._flat_weights[0].dtype

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _pop(state: EngineState, kept: bool) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if state.module_stack:
            state.module_stack.pop()
        if kept:
            state.high_precision -= 1
    return hook


def _save_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state = getattr(module, "_mixprec", None)
    if isinstance(state, EngineState):
        for key, value in state.state_dict().items():
            state_dict[f"{prefix}{STATE_KEY}.{key}"] = value


def _load_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    head = f"{prefix}{STATE_KEY}."
    saved = {key[len(head):]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(head)]}
    state = getattr(module, "_mixprec", None)
    if saved and isinstance(state, EngineState):
        state.load_state_dict(saved)
    if isinstance(state, EngineState):
        state.clear_weights()
