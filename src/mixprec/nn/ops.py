"""The emulated GEMM family as autograd functions: matrix products (linear, addmm, mm,
bmm, matmul), convolutions and embedding, and attention built from them (the LSTM/GRU
recurrences: :mod:`mixprec.nn.recurrences`).

Every product follows one rule: each operand is rounded to its format (per the recipe's
forward, dgrad or wgrad GEMM, by its role: a Parameter is a weight), the exact products
are accumulated in FP32, and the result is rounded once to the result's format. The
FP32 kernels give exactly that up to the order of the FP32 summation: values of every
format mixprec emulates, and their pairwise products, are exact in FP32. What an op
saves for backward is its rounded operands in their real storage (1 byte for FP8, 2
for FP16/BF16), never the FP32 input.

Each product runs on torch's FP32 kernels, or on its BF16 kernels where those give the
same result (operands exact in BF16, a BF16 result, a CPU with native BF16 dot
products): :mod:`mixprec.nn.kernels` chooses per GEMM, under the policy in force when
the forward ran (:func:`mixprec.nn.kernels.gemm_kernels`).

State lives in the :class:`~mixprec.nn.state.EngineState` the call passes in (the
model's) and in the autograd context; these functions hold none.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mixprec.core.kernels import float32_column_sums
from mixprec.core.native import PackedBF16
from mixprec.nn import kernels
from mixprec.nn.kernels import GemmPath, KernelPolicy
from mixprec.nn.state import CallRecord, EngineState, Quantized, block_axis_key, quantize_operand, result_dtype
from mixprec.recipe import Operand, Recipe

__all__ = ["gemm", "forward_product", "convolution", "embedding", "scaled_dot_product_attention", "batch_norm"]


# the operand dtype of each 16-bit GEMM path (the others take float32)
_KERNEL_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_weight(t: torch.Tensor | None) -> bool:
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_mixprec_weight", False)


@dataclass
class _Call:
    """One call's context: the model's engine state, the call site's name, the
    recipe the call runs under (the model's, or its fallback for this GEMM family) and
    the kernel policy in force when the forward ran (its backward GEMMs keep it)."""

    state: EngineState
    site: str
    recipe_for_call: Recipe | None = None
    forward_key: torch.Tensor | None = None  # the random key of the forward the call ran in
    policy: KernelPolicy = field(default_factory=kernels.current_policy)

    def __post_init__(self) -> None:
        if self.forward_key is None:
            self.forward_key = self.state.forward_key
        if self.state.high_precision and self.state.kept_recipe is not None:
            self.recipe_for_call = self.state.kept_recipe  # inside a module kept under its own recipe

    @property
    def recipe(self) -> Recipe:
        return self.recipe_for_call if self.recipe_for_call is not None else self.state.recipe


def _refuse_blocks(recipe: Recipe, family: str) -> None:
    if recipe.has_blocks:
        raise NotImplementedError(
            f"recipe {recipe.name!r} has block-format operands, which mixprec emulates for matrix products "
            f"(linear, matmul, bmm) only; run {family} under another recipe with "
            f"recipe.replace(fallback='bf16', fallback_ops=(..., {family!r})) as the named block recipes do, "
            "or keep the module in high precision (KeepHighPrecision)")


def _forward_operand(call: _Call, x: torch.Tensor, weight: bool, key: str, axis: int = -1,
                     path: GemmPath | None = None) -> Quantized:
    """An operand rounded for the forward GEMM (block formats: along its contraction
    ``axis``); an input's values come with it in the dtype of the GEMM's ``path``."""
    recipe = call.recipe
    operand = recipe.forward.right if weight else recipe.forward.left
    if weight:
        return call.state.weight(x, operand, f"{call.site}.{key}", axis=axis, forward_key=call.forward_key,
                                 values_dtype=_kernel_dtype(path))
    return quantize_operand(x, operand, call.state, f"{call.site}.{key}", axis=axis,
                            forward_key=call.forward_key, values_dtype=_kernel_dtype(path))


def _kernel_dtype(path: GemmPath | None) -> torch.dtype | None:
    """The dtype a GEMM on ``path`` takes its operands in (None: not known yet)."""
    return None if path is None else _KERNEL_DTYPES.get(path, torch.float32)


def _forward_path(call: _Call, device: torch.device, bias: bool) -> GemmPath:
    """The forward GEMM's kernel, from the recipe alone (before its operands exist)."""
    forward = call.recipe.forward
    return kernels.choose([forward.left, forward.right], forward.result, call.policy, device, bias=bias)


def _reserve_histories(call: _Call, device: torch.device, operands: dict[str, bool], copies: tuple[str, ...],
                       gradients: tuple[bool, ...], extra: dict[str, tuple[Operand, ...]] | None = None) -> None:
    """Create the amax histories the call's roundings will use
    (:meth:`EngineState.reserve_history`) before its autograd.Function runs, so that
    torch.compile traces the Function whole: those of its ``operands`` (name -> is a
    weight), of the backward copies it saves (``copies``, where the backward format
    differs), of its result, and where it computes ``gradients`` (one is-a-weight flag
    per operand whose gradient backward computes) of the error and the gradient
    results; the keys the ops below round under (tests/nn check that these are exactly
    the histories a step uses)."""
    recipe, site = call.recipe, call.site
    if not recipe.delayed_scaling:
        return  # no histories to create: the common case, kept cheap
    wanted: dict[str, tuple[Operand, ...]] = {f"{site}.output": (recipe.forward.result,), **(extra or {})}
    for name, weight in operands.items():
        forward = recipe.forward.right if weight else recipe.forward.left
        wanted[f"{site}.{name}"] = (forward,)
        backward = recipe.dgrad.right if weight else recipe.wgrad.right
        # not (==), not !=: dynamo answers != on dataclasses by reading their equality as a
        # constant, which fails where an int field of a recipe became dynamic (several
        # compiled models of different recipes in one process)
        if name in copies and not backward == forward:
            wanted[f"{site}.{name}.backward"] = (backward,)
    if gradients:
        wanted[f"{site}.grad_output"] = (recipe.dgrad.left, recipe.wgrad.left)
    if False in gradients:
        wanted[f"{site}.grad_input"] = (recipe.dgrad.result,)
    if True in gradients:
        wanted[f"{site}.grad_weight"] = (recipe.wgrad.result,)
    for key, formats in wanted.items():
        for operand in formats:
            call.state.reserve_history(key, operand, device)


def _backward_copy(call: _Call, x: torch.Tensor, weight: bool, forward: Quantized, key: str,
                   forward_axis: int = -1, axis: int = -1, flatten: bool = False) -> Quantized:
    """What backward needs of an operand: the copy in its backward format (dgrad's
    weight operand, or wgrad's input), quantized along the backward GEMM's contraction
    ``axis`` (of x flattened to 2-D rows when ``flatten``), made now from the
    high-precision tensor where it differs from the forward's copy (another format, or
    a block format along another axis), else the forward's own rounded copy."""
    recipe = call.recipe
    operand = recipe.dgrad.right if weight else recipe.wgrad.right
    same_axis = (block_axis_key(operand, forward_axis, x.dim()) == block_axis_key(operand, axis, x.dim())
                 and not (flatten and operand.is_block))
    if operand == forward.operand and same_axis:
        return forward.drop_values()
    if flatten and operand.is_block:
        x = x.reshape(-1, x.shape[-1])
    if weight:
        return call.state.weight(x, operand, f"{call.site}.{key}.backward", axis=axis,
                                 forward_key=call.forward_key).drop_values()
    return quantize_operand(x, operand, call.state, f"{call.site}.{key}.backward", axis=axis,
                            forward_key=call.forward_key).drop_values()


def _save(ctx: Any, *operands: Quantized | None, extra: tuple[torch.Tensor, ...] = ()) -> None:
    """Save rounded operands through autograd (so saved-tensor hooks see their real
    storage: values, or a block format's codes, block scales and tensor scale); None
    for an operand backward will not need. ``extra`` tensors are saved after them
    (:func:`_load_extra` gives them back)."""
    tensors: list[torch.Tensor | None] = []
    for q in operands:
        tensors += [None, None, None] if q is None else list(q.tensors())
    ctx.operand_specs = [None if q is None else (q.operand, q.layout) for q in operands]
    ctx.save_for_backward(*tensors, *extra)


def _load(ctx: Any) -> list[Quantized | None]:
    saved = ctx.saved_tensors
    return [None if spec is None else
            Quantized(saved[3 * i], saved[3 * i + 1], spec[0], None, saved[3 * i + 2], spec[1])
            for i, spec in enumerate(ctx.operand_specs)]


def _load_extra(ctx: Any) -> tuple[torch.Tensor, ...]:
    """The ``extra`` tensors :func:`_save` saved after the operands."""
    return ctx.saved_tensors[3 * len(ctx.operand_specs):]


def _grad_operands(call: _Call, grad: torch.Tensor, for_weight: tuple[bool, ...],
                   axes: tuple[int, ...] | None = None, scale: torch.Tensor | None = None) -> list[Quantized]:
    """The incoming error rounded once per distinct format (and, for block formats,
    contraction axis) it is needed in: dgrad's left operand for activation gradients,
    wgrad's for weight gradients; ``scale`` replaces the per-tensor scale (one already
    taken, and its amax recorded, for the same error)."""
    recipe = call.recipe
    done: dict[tuple[Operand, int | None], Quantized] = {}
    out = []
    for i, weight in enumerate(for_weight):
        gemm = recipe.wgrad if weight else recipe.dgrad
        operand = gemm.left
        axis = -1 if axes is None else axes[i]
        key = (operand, block_axis_key(operand, axis, grad.dim()))
        if key not in done:
            # the error's values come with it, in its first GEMM's kernel dtype (used at
            # once: by dgrad and wgrad, or by that GEMM alone for a block format), and
            # without FP8 bytes, which nothing keeps, unless FP8 tensor cores take them
            values_dtype = _kernel_dtype(kernels.choose([gemm.left, gemm.right], gemm.result, call.policy,
                                                        grad.device))
            done[key] = quantize_operand(grad, operand, call.state, f"{call.site}.grad_output", axis=axis,
                                       scale=scale, forward_key=call.forward_key, values_dtype=values_dtype,
                                       keep_storage=None if kernels.fp8_tensor_cores(grad.device) else False)
        out.append(done[key])
    return out


def _flat_rows(q: Quantized) -> Quantized:
    """A per-tensor operand with its batch dimensions flattened into rows (2-D)."""
    return Quantized(q.storage.reshape(-1, q.storage.shape[-1]), q.scale, q.operand)


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """x zero-padded along ``dim`` to ``size`` (a Hadamard-rotated operand keeps its
    padded contraction length; zeros on the other side add nothing)."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    padding = [0] * (2 * x.dim())
    padding[2 * (x.dim() - 1 - dim % x.dim()) + 1] = extra
    return F.pad(x, padding)


def _path(call: _Call, result: Operand, *operands: Quantized | Operand | None, bias: bool = False) -> GemmPath:
    """The kernel of a GEMM of ``operands`` (None: not needed) rounded to ``result``
    (:func:`mixprec.nn.kernels.choose`, under the policy of the call's forward)."""
    ops = [q if isinstance(q, Operand) else q.operand for q in operands if q is not None]
    device = next((q.storage.device for q in operands if isinstance(q, Quantized)), torch.device("cpu"))
    return kernels.choose(ops, result, call.policy, device, bias=bias)


def _conv_path(path: GemmPath) -> GemmPath:
    """A convolution's kernel for a GEMM path: oneDNN's convolutions gained nothing from
    the BF16 math mode (:mod:`mixprec.nn.kernels`), so ``"bf16-fp32"`` runs as FP32, and
    so does ``"fp16"`` (FP16 convolutions are unmeasured)."""
    return "bf16" if path == "bf16" else "fp32"


def _values(path: GemmPath, q: Quantized, decoded: dict[tuple[int, torch.dtype], torch.Tensor] | None = None
            ) -> torch.Tensor:
    """An operand's values in the dtype its kernel takes (BF16 on ``"bf16"``, FP16 on
    ``"fp16"``, else float32; exact either way); ``decoded`` keeps them for a second GEMM of the same
    operand taking the same dtype (backward's error, in dgrad and wgrad), which then
    decodes it once."""
    if decoded is None:
        dtype = _KERNEL_DTYPES.get(path)
        # NVFP4: without the tensor scale, which _scale_sum applies to the FP32 sum
        return q.unscaled_as(torch.float32) if dtype is None else kernels.kernel_values(q, dtype)
    key = (id(q), _KERNEL_DTYPES.get(path, torch.float32))
    if key not in decoded:
        decoded[key] = _values(path, q)
    return decoded[key]


def _scale_sum(y: torch.Tensor, *operands: Quantized | None) -> torch.Tensor:
    """A GEMM's fresh FP32 sum ``y`` of operands taken without their FP32 tensor scales
    (NVFP4: :meth:`Quantized.unscaled_as`) times those scales, in place: the FP32
    ``alpha`` NVFP4 hardware applies in the GEMM's epilogue, before a bias and the
    result's rounding."""
    alpha = None
    for q in operands:
        if q is not None and q.tensor_scale is not None:
            alpha = q.tensor_scale if alpha is None else alpha * q.tensor_scale
    return y if alpha is None else y.mul_(alpha)


def _batch_sum(left: torch.Size, right: torch.Size, target: torch.Size) -> bool:
    """Whether torch.matmul of these shapes gives more batch entries than ``target``
    has (autograd then sums a broadcast gradient: in FP32, so on the FP32 kernel)."""
    return tuple(torch.broadcast_shapes(left[:-2], right[:-2])) != tuple(target[:-2])


def _finish(call: _Call, y: torch.Tensor, operand: Operand, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh FP32 result rounded once to its format, in its holding dtype (or
    ``dtype``); a BF16 or FP16 kernel's output for a result in its own format is already
    rounded (once, by the kernel) and is only cast."""
    target = dtype or result_dtype(operand, call.recipe.compute)
    if y.dtype != torch.float32 and kernels.kernel_rounds_to(operand, y.dtype):
        return y.to(target)
    # an FP8 result's values come out of its rounding pass in the holding dtype, with no
    # storage bytes (a result is used at once; an input a later GEMM keeps is rounded
    # again there, which a value already on the grid passes unchanged)
    rounded = quantize_operand(y, operand, call.state, f"{call.site}.{key}", in_place=True,
                               forward_key=call.forward_key, values_dtype=target, keep_storage=False)
    return rounded.values_as(target)


def _grad_result_operand(call: _Call, weight: bool) -> Operand:
    """The format of a gradient result: wgrad's for a weight, dgrad's for anything else."""
    return call.recipe.wgrad.result if weight else call.recipe.dgrad.result


def _grad_result(call: _Call, y: torch.Tensor, weight: bool, dtype: torch.dtype) -> torch.Tensor:
    operand = _grad_result_operand(call, weight)
    return _finish(call, y, operand, "grad_weight" if weight else "grad_input", dtype)


def _no_autocast() -> contextlib.AbstractContextManager[None]:
    """Run the op's own kernels whatever autocast the caller has on (a plain ``with`` on
    torch.autocast where one is on, so torch.compile traces through)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    if torch.cuda.is_available() and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


# ---- matrix products ------------------------------------------------------------------


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A broadcast gradient summed back to its operand's shape."""
    return t if t.shape == shape else t.sum_to_size(shape)


def forward_product(call: _Call, path: GemmPath, qa: Quantized, qb: Quantized, bias: torch.Tensor | None,
                    transpose_b: bool, right: torch.Tensor | PackedBF16 | None = None) -> torch.Tensor:
    """The FP32 sum (or a BF16 kernel's once-rounded result) of a forward GEMM
    ``qa @ op(qb) + bias`` on kernel ``path``, before the result's rounding; ``right``
    is qb's values already decoded for ``path``, or op(qb) packed
    (:func:`mixprec.nn.kernels.pack_right`): a weight used at every step of a recurrence
    is decoded and packed once."""
    y = kernels.scaled_mm(qa, qb, call.policy, transpose_right=transpose_b) if path == "fp32" else None
    if y is not None:  # FP8 tensor cores (CUDA): FP32 out, bias and one rounding after
        return y if bias is None else y.add_(bias.float())
    right = _values(path, qb) if right is None else right
    if path == "bf16" and bias is not None:
        return kernels.linear_bf16(_values(path, qa), right if transpose_b else right.t(), bias)
    if not isinstance(right, PackedBF16):  # a packed right operand is op(qb) already
        right = right.transpose(-1, -2) if transpose_b else right
    y = _scale_sum(kernels.matmul(_values(path, qa), right, path, call.policy), qa, qb)
    return y if bias is None else y.add_(bias.float())


class _Gemm(torch.autograd.Function):
    """``a @ op(b) + bias`` with torch.matmul's broadcasting; ``op`` transposes the
    last two dimensions of b when ``transpose_b`` (F.linear's weight)."""

    @staticmethod
    def forward(ctx: Any, a, b, bias, call: _Call, transpose_b: bool):  # type: ignore[override]
        # Block formats run along each GEMM's contraction dimension: forward a's last
        # and b's rows (its last when transposed); dgrad b's other axis; wgrad a's and
        # the error's rows (flattened batch rows under a 2-D weight).
        weights = (_is_weight(a), _is_weight(b))
        b_axis = -1 if transpose_b else -2
        # a bias goes into the BF16 kernel only as oneDNN's linear: a 2-D weight, a 1-D bias
        fusable = bias is None or (b.dim() == 2 and bias.dim() == 1)
        path = _forward_path(call, a.device, bias is not None) if fusable else "fp32"
        qa = _forward_operand(call, a, weights[0], "a", axis=-1, path=path)
        qb = _forward_operand(call, b, weights[1], "b", axis=b_axis, path=path)
        with _no_autocast():
            y = forward_product(call, path, qa, qb, bias, transpose_b)
        out = _finish(call, y, call.recipe.forward.result, "output")
        flatten = len(b.shape) == 2 and a.dim() > 2  # a weight under batched inputs: one wgrad GEMM
        ctx.call, ctx.transpose_b, ctx.weights, ctx.flatten = call, transpose_b, weights, flatten
        ctx.shapes = (a.shape, b.shape)
        ctx.dtypes = (a.dtype, b.dtype, None if bias is None else bias.dtype)
        _save(ctx, _backward_copy(call, a, weights[0], qa, "a", -1, -2, flatten) if ctx.needs_input_grad[1] else None,
              _backward_copy(call, b, weights[1], qb, "b", b_axis, -2 if transpose_b else -1)
              if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        call: _Call = ctx.call
        recipe = call.recipe
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        grad_a = grad_b = grad_bias = None
        blocks = recipe.dgrad.has_blocks or recipe.wgrad.has_blocks
        saved_a, saved_b = _load(ctx)
        if blocks:
            # each use of the error quantized along its own GEMM's contraction dimension
            flat_g = grad_output.reshape(-1, grad_output.shape[-1]) if ctx.flatten else grad_output
            ga = _grad_operands(call, grad_output, (ctx.weights[0],), (-1,))[0] if need_a else None
            gb = _grad_operands(call, flat_g, (ctx.weights[1],), (-2,))[0] if need_b else None
        else:
            wanted = [w for w, need in zip(ctx.weights, (need_a, need_b)) if need] + ([True] if need_bias else [])
            rounded = iter(_grad_operands(call, grad_output, tuple(wanted)))
            ga = next(rounded) if need_a else None
            gb = next(rounded) if need_b else None
            gbias = next(rounded) if need_bias else None
        a_shape, b_shape = ctx.shapes
        decoded: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # the error, decoded once per kernel
        with _no_autocast():
            if need_a:
                path = ("fp32" if _batch_sum(grad_output.shape, b_shape, a_shape)
                        else _path(call, _grad_result_operand(call, ctx.weights[0]), ga, saved_b))
                product = (kernels.scaled_mm(ga, saved_b, call.policy, transpose_right=not ctx.transpose_b)
                           if path == "fp32" and len(b_shape) == 2 else None)  # FP8 tensor cores (CUDA)
                if product is None:
                    g = _values(path, ga, decoded)
                    right = _values(path, saved_b)
                    right = right if ctx.transpose_b else right.transpose(-1, -2)
                    product = _scale_sum(kernels.matmul(g, right, path, call.policy), ga, saved_b)
                grad_a = _grad_result(call, _reduce_to(product, a_shape), ctx.weights[0], ctx.dtypes[0])
            if need_b:
                path = ("fp32" if not ctx.flatten and _batch_sum(a_shape, grad_output.shape, b_shape)
                        else _path(call, _grad_result_operand(call, ctx.weights[1]), gb, saved_a))
                product = None
                if path == "fp32" and (ctx.flatten or len(a_shape) == len(b_shape) == 2) and not blocks:  # FP8 tensor cores (CUDA)
                    flat_a = saved_a if len(a_shape) == 2 else _flat_rows(saved_a)
                    flat_g = gb if len(a_shape) == 2 else _flat_rows(gb)
                    product = (kernels.scaled_mm(flat_g, flat_a, call.policy, transpose_left=True) if ctx.transpose_b
                               else kernels.scaled_mm(flat_a, flat_g, call.policy, transpose_left=True))
                if product is not None:
                    grad_b = _grad_result(call, product, ctx.weights[1], ctx.dtypes[1])
            if need_b and product is None:
                g = _values(path, gb, decoded)
                left = _values(path, saved_a)
                if ctx.flatten:
                    left, g = left.reshape(-1, left.shape[-1]), g.reshape(-1, g.shape[-1])
                rows = max(left.shape[-2], g.shape[-2])  # Hadamard-padded rows: pad the other with zeros
                left, g = _pad_dim(left, -2, rows), _pad_dim(g, -2, rows)
                # the product in b's own layout (g^T a for F.linear's out x in weight), not a
                # transposed copy of it
                if ctx.transpose_b:
                    product = kernels.matmul(g.transpose(-1, -2), left, path, call.policy)
                else:
                    product = kernels.matmul(left.transpose(-1, -2), g, path, call.policy)
                product = _reduce_to(_scale_sum(product, gb, saved_a), ctx.shapes[1])
                grad_b = _grad_result(call, product.contiguous(), ctx.weights[1], ctx.dtypes[1])
            if need_bias:
                # block recipes: summed from the high-precision error, as Transformer Engine's dbias
                # (widened as the sum reads it: no float32 copy of the error)
                g = grad_output if blocks else gbias.values()
                grad_bias = _grad_result(call, float32_column_sums(g.reshape(-1, g.shape[-1])), True, ctx.dtypes[2])
        return grad_a, grad_b, grad_bias, None, None


def gemm(state: EngineState, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
         transpose_b: bool = False, op: str = "matmul", site: str | None = None,
         weight_operand: bool = False, recipe: Recipe | None = None) -> torch.Tensor:
    """``a @ b`` (``a @ b.mT`` when ``transpose_b``) plus ``bias``, under the state's
    recipe, with torch.matmul's broadcasting (1-D operands included).
    ``weight_operand`` marks ``b`` as a weight though it is not a Parameter itself (a
    slice of one, as MultiheadAttention's packed projection)."""
    if weight_operand and not isinstance(b, torch.nn.Parameter):
        b = b.view_as(b)
        b._mixprec_weight = True  # type: ignore[attr-defined]
    squeeze = []
    if a.dim() == 1:
        a, squeeze = a.unsqueeze(0), squeeze + [-2]
    if b.dim() == 1:
        b = b.unsqueeze(0 if transpose_b else -1)
        squeeze.append(-1)
    call = _Call(state, site or state.site(op), recipe)
    if state.log is not None:
        m, k = a.shape[-2], a.shape[-1]
        n = b.shape[-2] if transpose_b else b.shape[-1]
        batch = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        _log(state, call.site, op, 2.0 * batch * m * n * k, (a, b), a.requires_grad, b.requires_grad,
             recipe=call.recipe)
    grad_a, grad_b = (torch.is_grad_enabled() and t.requires_grad for t in (a, b))
    _reserve_histories(call, a.device, {"a": _is_weight(a), "b": _is_weight(b)},
                       ("a",) * grad_b + ("b",) * grad_a, (_is_weight(a),) * grad_a + (_is_weight(b),) * grad_b)
    out = _Gemm.apply(a, b, bias, call, transpose_b)
    for dim in squeeze:
        out = out.squeeze(dim)
    return out


def _log(state: EngineState, site: str, op: str, flops: float, operands: tuple[torch.Tensor, ...],
         grad_left: bool, grad_right: bool, recomputed: bool = False, recipe: Recipe | None = None) -> None:
    """Record a call for the coverage report: forward FLOPs plus those of the backward
    GEMMs that will run, and each operand's format (under ``recipe``, the call's own
    where it runs under a fallback)."""
    recipe = recipe if recipe is not None else state.recipe
    roles = ["weight" if _is_weight(t) else "input" for t in operands]
    forward = {f"forward.{'left' if i == 0 else 'right'} ({role})":
               (recipe.forward.right if role == "weight" else recipe.forward.left).describe()
               for i, role in enumerate(roles)}
    forward["forward.result"] = recipe.forward.result.describe()
    if grad_left or grad_right:
        forward["dgrad.left"] = recipe.dgrad.left.describe()
        forward["wgrad.left"] = recipe.wgrad.left.describe()
    total = flops * (1 + int(grad_left) + int(grad_right) + int(recomputed and (grad_left or grad_right)))
    assert state.log is not None
    state.log.append(CallRecord(site, op, total, forward, emulated=True))


# ---- convolution ------------------------------------------------------------------------


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, call: _Call, geometry: tuple):  # type: ignore[override]
        # torch's BF16 convolution takes no FP32 bias: with a bias, the FP32 kernel
        path = _conv_path(_forward_path(call, x.device, False)) if bias is None else "fp32"
        qx = _forward_operand(call, x, False, "input", path=path)
        qw = _forward_operand(call, weight, _is_weight(weight), "weight", path=path)
        with _no_autocast():
            y = torch.ops.aten.convolution(_values(path, qx), _values(path, qw),
                                           None if bias is None else bias.float(), *geometry)
        out = _finish(call, y, call.recipe.forward.result, "output")
        ctx.call, ctx.geometry, ctx.weight_role = call, geometry, _is_weight(weight)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.weight_shape, ctx.input_shape = weight.shape, tuple(x.shape)
        _save(ctx, _backward_copy(call, x, False, qx, "input") if ctx.needs_input_grad[1] else None,
              _backward_copy(call, weight, ctx.weight_role, qw, "weight"))
        return out

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        call: _Call = ctx.call
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
        shape = ctx.weight_shape
        g_data, g_weight = _grad_operands(call, grad_output, (False, ctx.weight_role))
        saved_x, saved_w = _load(ctx)
        grad_x = grad_w = grad_b = None
        with _no_autocast():
            dgrad_path = _conv_path(_path(call, _grad_result_operand(call, False), g_data, saved_w)) if need_x else None
            # the weight gradient's error as float32, decoded once for the weight and the bias
            g = g_weight.values() if need_w or need_b else None
            if need_x and need_w and dgrad_path == "fp32" and g_data is g_weight:
                # both gradients from FP32 kernels and one error: one oneDNN call, with the
                # real input (measured on the quick CNN's 3x3 layers: 9.3 ms against 6.0 +
                # 6.8 ms for two calls, and 7.8 ms for dgrad with an empty stand-in input)
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    g, saved_x.values(), saved_w.values(), None, stride, padding, dilation, transposed,
                    output_padding, groups, [True, True, False])
            else:
                if need_x:
                    w = _values(dgrad_path, saved_w)
                    # the input gradient needs only the input's shape: pass an empty stand-in
                    x_shape = w.new_zeros(()).expand(ctx.input_shape)
                    grad_x, _, _ = torch.ops.aten.convolution_backward(
                        _values(dgrad_path, g_data), x_shape, w, None, stride, padding, dilation, transposed,
                        output_padding, groups, [True, False, False])
                if need_w:
                    assert g is not None
                    # FP32 kernel: oneDNN's BF16 backward-weights convolution ran 20-40x slower
                    # than FP32 on some shapes (7x7 outputs, strided 1x1) on a CPU with native BF16
                    # the weight gradient needs only the weight's shape: an empty stand-in
                    w_shape = g.new_zeros(()).expand(tuple(shape))
                    _, grad_w, _ = torch.ops.aten.convolution_backward(
                        g, saved_x.values(), w_shape, None, stride,
                        padding, dilation, transposed, output_padding, groups, [False, True, False])
            if grad_x is not None:
                grad_x = _grad_result(call, grad_x, False, ctx.dtypes[0])
            if grad_w is not None:
                grad_w = _grad_result(call, grad_w, ctx.weight_role, ctx.dtypes[1])
            if need_b:
                assert g is not None
                dims = [0] + list(range(2, g.dim()))
                grad_b = _grad_result(call, g.sum(dims), True, ctx.dtypes[2])
        return grad_x, grad_w, grad_b, None, None


def convolution(state: EngineState, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                output_padding: list[int], groups: int, op: str = "conv") -> torch.Tensor:
    """aten's convolution (transposed too) under the recipe."""
    geometry = (list(stride), list(padding), list(dilation), transposed, list(output_padding), groups)
    recipe = state.recipe.for_op("conv")
    _refuse_blocks(recipe, "conv")
    call = _Call(state, state.site(op), recipe)
    if state.log is not None:
        with torch.no_grad(), _no_autocast():
            probe = torch.ops.aten.convolution(torch.zeros(x.shape, device="meta"),
                                               torch.zeros(weight.shape, device="meta"), None, *geometry)
        spatial = math.prod(probe.shape[2:]) if not transposed else math.prod(x.shape[2:])
        per_output = math.prod(weight.shape[1:]) if not transposed else math.prod(weight.shape[1:])
        channels = probe.shape[1] if not transposed else x.shape[1]
        flops = 2.0 * x.shape[0] * spatial * channels * per_output
        _log(state, call.site, op, flops, (x, weight), x.requires_grad, weight.requires_grad, recipe=call.recipe)
    grad_x, grad_w = (torch.is_grad_enabled() and t.requires_grad for t in (x, weight))
    _reserve_histories(call, x.device, {"input": False, "weight": _is_weight(weight)},
                       ("input",) * grad_w + ("weight",), (False,) * grad_x + (_is_weight(weight),) * grad_w)
    return _Convolution.apply(x, weight, bias, call, geometry)


# ---- embedding --------------------------------------------------------------------------


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices, weight, call: _Call, padding_idx: int | None):  # type: ignore[override]
        qw = _forward_operand(call, weight, True, "weight")
        with _no_autocast():
            y = F.embedding(indices, qw.values(), padding_idx)
        ctx.call, ctx.padding_idx, ctx.shape, ctx.dtype = call, padding_idx, weight.shape, weight.dtype
        ctx.save_for_backward(indices)
        return _finish(call, y, call.recipe.forward.result, "output")

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        call: _Call = ctx.call
        (indices,) = ctx.saved_tensors
        (g,) = _grad_operands(call, grad_output, (True,))
        values = g.values()
        grad_w = torch.zeros(ctx.shape, dtype=torch.float32, device=values.device)
        grad_w.index_add_(0, indices.reshape(-1), values.reshape(-1, ctx.shape[1]))
        if ctx.padding_idx is not None:
            grad_w[ctx.padding_idx] = 0
        return None, _grad_result(call, grad_w, True, ctx.dtype), None, None


def embedding(state: EngineState, indices: torch.Tensor, weight: torch.Tensor,
              padding_idx: int | None = None) -> torch.Tensor:
    """Rows of the rounded weight (a one-hot GEMM); the weight gradient is summed in
    FP32 from the rounded errors and rounded once."""
    recipe = state.recipe.for_op("embedding")
    _refuse_blocks(recipe, "embedding")
    call = _Call(state, state.site("embedding"), recipe)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if state.log is not None:
        # as a one-hot GEMM: the FLOPs a dense product would take are not spent; count the rows
        state.log.append(CallRecord(call.site, "embedding", 0.0, {
            "forward.right (weight)": recipe.forward.right.describe(),
            "forward.result": recipe.forward.result.describe()}, emulated=True))
    _reserve_histories(call, weight.device, {"weight": True}, (),
                       (True,) * (torch.is_grad_enabled() and weight.requires_grad))
    return _Embedding.apply(indices, weight, call, padding_idx)


# ---- attention --------------------------------------------------------------------------


class _Attention(torch.autograd.Function):
    """Softmax attention without dropout as one operation that saves only the rounded
    Q, K and V (and the mask) and recomputes the probabilities in backward, as fused
    attention kernels do: the L x S matrices are never kept. Its roundings are those of
    the two emulated GEMMs and the FP32 softmax between them, in the same order, and
    the recomputation reuses the forward's per-tensor scales."""

    @staticmethod
    def _probabilities(call: _Call, path: GemmPath, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       factor: float, causal: bool, scales: list[torch.Tensor | None]) -> tuple[torch.Tensor, Quantized]:
        recipe = call.recipe
        scores = kernels.matmul(q, k.transpose(-1, -2), path, call.policy)
        if scores.dtype != torch.float32 and kernels.kernel_rounds_to(recipe.forward.result, scores.dtype):
            scores = scores.float() * factor  # the BF16 or FP16 kernel rounded them (once)
        else:
            # used at once: float32 values rounded in place, no FP8 bytes to decode again
            rounded = quantize_operand(scores, recipe.forward.result, call.state, f"{call.site}.scores",
                                       in_place=True, scale=scales[0], forward_key=call.forward_key,
                                       values_dtype=torch.float32, keep_storage=False)
            scales[0] = rounded.scale
            # on the result format's grid already: the round trip through the dtype the
            # result lives in (result_dtype) would give the same values back
            scores = rounded.values() * factor
        if causal:
            length, source = scores.shape[-2], scores.shape[-1]
            keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores + mask
        probabilities = torch.softmax(scores, dim=-1)
        # used at once, by this pass's GEMMs: the values in their kernel's dtype, written by
        # the rounding pass itself (no storage to decode)
        p = quantize_operand(probabilities, recipe.forward.left, call.state, f"{call.site}.probabilities",
                             scale=scales[1], forward_key=call.forward_key,
                             values_dtype=_KERNEL_DTYPES.get(path, torch.float32), keep_storage=False)
        scales[1] = p.scale
        return probabilities, p

    @staticmethod
    def forward(ctx: Any, q, k, v, mask, call: _Call, factor: float, causal: bool):  # type: ignore[override]
        qq, qk, qv = (_forward_operand(call, t, False, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
        scales: list[torch.Tensor | None] = [None, None]
        # P is rounded as an input: the same operand format as Q, K and V
        path = _path(call, call.recipe.forward.result, qq, qk, qv)
        with _no_autocast():
            _, p = _Attention._probabilities(call, path, _values(path, qq), _values(path, qk), mask, factor,
                                             causal, scales)
            y = kernels.matmul(_values(path, p), _values(path, qv), path, call.policy)
        out = _finish(call, y, call.recipe.forward.result, "output")
        ctx.call, ctx.factor, ctx.causal, ctx.scales = call, factor, causal, scales
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        _save(ctx, *(_backward_copy(call, t, False, qt, name) for t, qt, name in
                     ((q, qq, "q"), (k, qk, "k"), (v, qv, "v"))))
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        call: _Call = ctx.call
        recipe = call.recipe
        saved = _load(ctx)
        (g,) = _grad_operands(call, grad_output, (False,))
        # one kernel for the recomputed scores and the four gradient GEMMs: their operands
        # are the saved Q, K, V, P (an input) and the errors (dG and dS, dgrad's left)
        path = _path(call, recipe.forward.result, *saved, recipe.forward.left, recipe.dgrad.left)
        if path in ("bf16", "fp16"):
            path = _path(call, recipe.dgrad.result, *saved, recipe.forward.left, recipe.dgrad.left)
        q, k, v = (_values(path, t) for t in saved)  # type: ignore[arg-type]
        with _no_autocast():
            probabilities, p = _Attention._probabilities(call, path, q, k, ctx.mask, ctx.factor, ctx.causal,
                                                         list(ctx.scales))
            g_lp = _values(path, g)
            grad_v = _grad_result(call, kernels.matmul(_values(path, p).transpose(-1, -2), g_lp, path, call.policy),
                                  False, torch.float32)
            grad_p = _grad_result(call, kernels.matmul(g_lp, v.transpose(-1, -2), path, call.policy), False,
                                  torch.float32)
            # softmax backward in FP32 on the FP32 probabilities, then the scaling
            grad_scores = probabilities * (grad_p - (grad_p * probabilities).sum(-1, keepdim=True)) * ctx.factor
            (gs,) = _grad_operands(_Call(call.state, f"{call.site}.scores", recipe, call.forward_key, call.policy), grad_scores, (False,))
            s_lp = _values(path, gs)
            grad_q = _grad_result(call, kernels.matmul(s_lp, k, path, call.policy), False, ctx.dtypes[0])
            grad_k = _grad_result(call, kernels.matmul(s_lp.transpose(-1, -2), q, path, call.policy), False,
                                  ctx.dtypes[1])
        return grad_q, grad_k, grad_v.to(ctx.dtypes[2]), None, None, None, None


def scaled_dot_product_attention(
    state: EngineState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention (masks, causal, dropout, grouped-query
    heads) with both products emulated: ``S = Q K^T`` and ``O = P V`` are GEMMs of the
    recipe (Q, K, V and P rounded as inputs, results rounded), the scaling, mask and
    softmax in FP32 (the softmax rule of paper 1 and of torch.autocast). Without
    dropout it runs as one operation that recomputes P in backward (:class:`_Attention`);
    with dropout, as two emulated GEMMs around torch's softmax and dropout."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = None
    if attn_mask is not None:
        mask = (torch.zeros(attn_mask.shape, device=query.device).masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool else attn_mask.float())
    recipe = state.recipe.for_op("attention")
    _refuse_blocks(recipe, "attention")
    if dropout_p == 0:
        call = _Call(state, state.site("sdpa"), recipe)
        needs = tuple(torch.is_grad_enabled() and t.requires_grad for t in (query, key, value))
        grads = any(needs)
        if state.log is not None:
            batch = math.prod(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]))
            flops = 2.0 * batch * query.shape[-2] * key.shape[-2] * query.shape[-1]
            _log(state, call.site, "sdpa.qk", flops, (query, key), grads, grads, recomputed=True,
                 recipe=recipe)  # S again in backward
            _log(state, call.site, "sdpa.pv", flops, (query, value), grads, grads, recipe=recipe)
        extra = {f"{call.site}.scores": (recipe.forward.result,),
                 f"{call.site}.probabilities": (recipe.forward.left,)}
        if grads:
            extra[f"{call.site}.scores.grad_output"] = (recipe.dgrad.left, recipe.wgrad.left)
        _reserve_histories(call, query.device, {"q": False, "k": False, "v": False}, ("q", "k", "v"),
                           (False,) * grads, extra)
        return _Attention.apply(query, key, value, mask, call, factor, is_causal)
    length, source = query.shape[-2], key.shape[-2]
    scores = gemm(state, query, key, transpose_b=True, op="sdpa.qk", recipe=recipe).float() * factor
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores + mask
    probabilities = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=True)
    return gemm(state, probabilities, value, op="sdpa.pv", recipe=recipe)


# ---- batch norm -------------------------------------------------------------------------


class _BatchNorm(torch.autograd.Function):
    """Batch norm on a 16-bit input with 16-bit parameters, as cuDNN runs it under
    torch.autocast: statistics and normalisation in FP32, the output in the input's
    dtype, and only the 16-bit input saved for backward (torch's mixed-dtype kernel
    takes 16-bit inputs only with FP32 parameters and statistics)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, running_mean, running_var, training: bool, momentum: float,  # type: ignore[override]
                eps: float):
        with _no_autocast():
            out, mean, invstd = torch.ops.aten.native_batch_norm(
                x.float(), None if weight is None else weight.float(), None if bias is None else bias.float(),
                running_mean, running_var, training, momentum, eps)
        ctx.training, ctx.eps = training, eps
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x, weight, running_mean, running_var, mean, invstd)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        x, weight, running_mean, running_var, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with _no_autocast():
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_output.float(), x.float(), None if weight is None else weight.float(), running_mean,
                running_var, mean, invstd, ctx.training, ctx.eps, mask)
        cast = [None if g is None else g.to(d) for g, d in zip((grad_x, grad_w, grad_b), ctx.dtypes)]
        return cast[0], cast[1], cast[2], None, None, None, None, None


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """F.batch_norm for a 16-bit input. With FP32 parameters and statistics (or none)
    torch's own mixed-dtype CPU/CUDA kernel runs it (statistics and normalisation in
    FP32, the output in the input's dtype, as torch.autocast leaves it; one pass, no
    FP32 copy of the input); with 16-bit parameters (FP16 masters), which that kernel
    refuses, :class:`_BatchNorm` does the same through FP32 copies. FP32 inputs go to
    torch."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if all(t is None or t.dtype == torch.float32 for t in (weight, bias, running_mean, running_var)):
        with _no_autocast():
            return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, training, momentum, eps)
