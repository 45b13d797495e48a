"""Low-precision autograd operations: linear, convolution (1-D, 2-D, transposed),
embedding, batched matmul and attention, each rounding per a :class:`~mixprec.recipe.Recipe`.

Forward: inputs are rounded to the activation format (weights already sit on the
weight format's grid in their 16-bit storage), the product is computed with FP32
accumulation, and the output is rounded to the activation format. Backward: the
incoming error (which carries the loss scale) is rounded to the error format, the input
and weight gradients are computed with FP32 accumulation and rounded to their formats.
Tensors saved for backward are packed into the activation format's storage dtype
(1 byte for FP8, 2 for FP16/BF16): that is where the memory saving comes from.

On CPU every product runs in float32 kernels: FP16, BF16 and FP8 values are exact in
float32 and so are their pairwise products, so only the accumulation order differs from
hardware, never the inputs. (torch's float16 and bfloat16 CPU matmuls are ~100x slower
than float32 on CPUs without native support, and are never used.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mixprec.memory import packer_active
from mixprec.provenance import is_on_grid, mark_on_grid
from mixprec.core.quantize import quantize, tensor_scale
from mixprec.recipe import Recipe, TensorFormat
from mixprec.scaling import AmaxHistory
from mixprec.core.storage import from_storage, to_storage

__all__ = [
    "Rounder",
    "linear",
    "convolution",
    "embedding",
    "matmul",
    "scaled_dot_product_attention",
    "weight_as_fp32",
]


class Rounder:
    """What one converted module needs to round its tensors: the recipe, the shared
    stochastic-rounding generator, and for FP8 per-tensor scaling one amax history per
    tensor role ("input", "output", "grad_output", ...). Held by the module, passed to
    the ops, so the ops themselves keep no state."""

    def __init__(self, recipe: Recipe, generator: torch.Generator | None = None) -> None:
        self.recipe = recipe
        self.generator = generator
        self.histories: dict[str, AmaxHistory] = {}

    def _scale(self, x: torch.Tensor, spec: TensorFormat, role: str) -> torch.Tensor | None:
        scaling = self.recipe.tensor_scaling
        if scaling is None:
            return None
        if scaling.mode == "current":
            return tensor_scale(x, spec.fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
        history = self.histories.get(role)
        if history is None:
            history = self.histories[role] = AmaxHistory(scaling.history, x.device)
        scale = history.scale(spec.fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
        history.record(x)
        return scale

    def round(
        self, x: torch.Tensor, spec: TensorFormat, role: str, owned: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` on ``spec``'s grid (as float32) and the per-tensor scale used, if any.
        ``owned`` says that ``x`` is a fresh result nobody else holds (a product this op
        just computed), which is then rounded in place: on CPU a new activation-sized
        output costs more in page faults than the rounding itself."""
        if spec.is_fp32:
            return x.float(), None
        if self.recipe.tensor_scaling is None and is_on_grid(x, spec.fmt):
            return x, None  # rounded already (the previous layer's output): rounding is idempotent
        scale = self._scale(x, spec, role)
        # Under per-tensor scaling a value past the scaled range saturates, as
        # Transformer Engine's casts do: the scale, not Inf, manages the range.
        saturate = True if scale is not None else None
        in_place = owned and x.dtype == torch.float32 and x.is_contiguous()
        rounded = quantize(x, spec.fmt, spec.rounding, scale=scale, saturate=saturate,
                           generator=self.generator, out=x if in_place else None)
        if scale is None:
            mark_on_grid(rounded, spec.fmt)
        return rounded, scale

    def pack(self, x_rounded: torch.Tensor, spec: TensorFormat, scale: torch.Tensor | None) -> torch.Tensor:
        """Grid values into the format's storage dtype (divided by the scale first)."""
        if spec.is_fp32:
            return x_rounded
        unscaled = x_rounded if scale is None else x_rounded * torch.reciprocal(scale)
        return to_storage(unscaled, spec.fmt)

    def unpack(self, packed: torch.Tensor, spec: TensorFormat, scale: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`pack` stored, as float32 grid values again."""
        if spec.is_fp32:
            return packed
        values = from_storage(packed, spec.fmt)
        return mark_on_grid(values, spec.fmt) if scale is None else values * scale

    def weight_grad(self, grad: torch.Tensor, dtype: torch.dtype, owned: bool = True) -> torch.Tensor:
        """A weight gradient rounded to the weight-gradient format, in the weight's dtype
        (in place unless ``owned`` is False: the ops pass gradients they just computed)."""
        rounded, _ = self.round(grad, self.recipe.weight_grad, "weight_grad", owned=owned)
        return rounded.to(dtype)

    def state_dict(self) -> dict[str, Any]:
        """The amax histories (empty without per-tensor scaling)."""
        return {role: history.state_dict() for role, history in self.histories.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the amax histories."""
        scaling = self.recipe.tensor_scaling
        for role, saved in state_dict.items():
            length = scaling.history if scaling is not None else saved["amax"].numel()
            history = self.histories.setdefault(role, AmaxHistory(length, saved["amax"].device))
            history.load_state_dict(saved)


def _save_input(rounder: Rounder, x: torch.Tensor, x_q: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """What an op saves of a rounded input: under a model's activation packer and with
    deterministic rounding, the float32 input itself (the packer stores it once, in
    the activation format, shared with any other op that saves it); otherwise the
    rounded values packed here. The flag says which."""
    spec = rounder.recipe.activation
    if packer_active() and spec.rounding == "nearest" and scale is None and x.dtype == torch.float32:
        return x, True
    return rounder.pack(x_q, spec, scale), False


def _load_input(rounder: Rounder, saved: torch.Tensor, raw: bool, scale: torch.Tensor | None) -> torch.Tensor:
    spec = rounder.recipe.activation
    if raw:
        if spec.is_fp32 or is_on_grid(saved, spec.fmt):
            return saved
        return mark_on_grid(quantize(saved, spec.fmt), spec.fmt)
    return rounder.unpack(saved, spec, scale)


def _finish_forward(ctx: Any, rounder: Rounder, x, x_q, x_scale, y, weight, bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The end of a weighted op's forward: round the product to the activation format
    (in place: it is fresh) and save what backward needs."""
    y_q, _ = rounder.round(y, rounder.recipe.activation, "output", owned=True)
    ctx.rounder, ctx.x_scale = rounder, x_scale
    ctx.bias_dtype = None if bias is None else bias.dtype
    saved_x, ctx.raw_x = _save_input(rounder, x, x_q, x_scale)
    ctx.save_for_backward(saved_x, weight)
    return y_q


def _start_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Rounder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The start of a weighted op's backward: its rounder, the incoming error rounded to
    the error format, and the saved input and weight."""
    rounder: Rounder = ctx.rounder
    saved_x, weight = ctx.saved_tensors
    g_q, _ = rounder.round(grad_output, rounder.recipe.error, "grad_output")
    return rounder, g_q, saved_x, weight


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, rounder: Rounder, weight_is_fp32: bool):  # type: ignore[override]
        recipe = rounder.recipe
        x_q, x_scale = rounder.round(x, recipe.activation, "input")
        weight32 = weight.float()
        y = F.linear(x_q, weight32, None if bias is None else bias.float())
        ctx.weight_is_fp32 = weight_is_fp32
        return _finish_forward(ctx, rounder, x, x_q, x_scale, y, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        rounder, g_q, saved_x, weight = _start_backward(ctx, grad_output)
        recipe = rounder.recipe
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x, _ = rounder.round(g_q @ weight.float(), recipe.error, "grad_input", owned=True)
        if ctx.needs_input_grad[1]:
            x_q = _load_input(rounder, saved_x, ctx.raw_x, ctx.x_scale)
            grad_w = _flat_rows(g_q).t() @ _flat_rows(x_q)
            # An FP32 weight (an RNN's recurrent weight) accumulates over time steps in
            # FP32 and is rounded once, by weight_as_fp32's backward.
            if not ctx.weight_is_fp32:
                grad_w = rounder.weight_grad(grad_w, weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = _flat_rows(g_q).sum(0)
            if not ctx.weight_is_fp32:
                grad_b = rounder.weight_grad(grad_b, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rounder: Rounder,
    weight_is_fp32: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the recipe's roundings. ``weight_is_fp32`` marks a
    float32 weight from :func:`weight_as_fp32` whose gradient is left unrounded."""
    return _Linear.apply(x, weight, bias, rounder, weight_is_fp32)


class _WeightAsFP32(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight, rounder: Rounder):  # type: ignore[override]
        ctx.rounder, ctx.dtype = rounder, weight.dtype
        return weight.float()

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        return ctx.rounder.weight_grad(grad, ctx.dtype, owned=False), None


def weight_as_fp32(weight: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """The weight's values as float32, for a weight used many times in one forward (an
    RNN's recurrent weight): its gradient accumulates over every use in FP32 and is
    rounded to the weight-gradient format once."""
    return _WeightAsFP32.apply(weight, rounder)


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, rounder: Rounder, geometry: tuple):  # type: ignore[override]
        stride, padding, dilation, transposed, output_padding, groups = geometry
        recipe = rounder.recipe
        x_q, x_scale = rounder.round(x, recipe.activation, "input")
        y = torch.ops.aten.convolution(
            x_q, weight.float(), None if bias is None else bias.float(),
            stride, padding, dilation, transposed, output_padding, groups,
        )
        ctx.geometry = geometry
        return _finish_forward(ctx, rounder, x, x_q, x_scale, y, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        rounder, g_q, saved_x, weight = _start_backward(ctx, grad_output)
        recipe = rounder.recipe
        x_q = _load_input(rounder, saved_x, ctx.raw_x, ctx.x_scale)
        has_bias = ctx.bias_dtype is not None
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
        out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g_q, x_q, weight.float(), [out_channels] if has_bias else None,
            stride, padding, dilation, transposed, output_padding, groups, mask,
        )
        if grad_x is not None:
            grad_x, _ = rounder.round(grad_x, recipe.error, "grad_input", owned=True)
        if grad_w is not None:
            grad_w = rounder.weight_grad(grad_w, weight.dtype)
        if grad_b is not None:
            grad_b = rounder.weight_grad(grad_b, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rounder: Rounder,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    transposed: bool,
    output_padding: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """A convolution (``transposed`` for ConvTranspose) with the recipe's roundings,
    through aten's own convolution and convolution_backward in float32."""
    geometry = (list(stride), list(padding), list(dilation), transposed, list(output_padding), groups)
    return _Convolution.apply(x, weight, bias, rounder, geometry)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices, weight, rounder: Rounder, padding_idx: int | None):  # type: ignore[override]
        y = F.embedding(indices, weight.float())
        y_q, _ = rounder.round(y, rounder.recipe.activation, "output", owned=True)
        ctx.rounder, ctx.padding_idx, ctx.weight_shape, ctx.dtype = rounder, padding_idx, weight.shape, weight.dtype
        ctx.save_for_backward(indices)
        return y_q

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        rounder: Rounder = ctx.rounder
        (indices,) = ctx.saved_tensors
        g_q, _ = rounder.round(grad_output, rounder.recipe.error, "grad_output")
        grad_w = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=g_q.device)
        grad_w.index_add_(0, indices.reshape(-1), g_q.reshape(-1, ctx.weight_shape[1]))
        if ctx.padding_idx is not None:
            grad_w[ctx.padding_idx] = 0
        return None, rounder.weight_grad(grad_w, ctx.dtype), None, None


def embedding(
    indices: torch.Tensor, weight: torch.Tensor, rounder: Rounder, padding_idx: int | None = None
) -> torch.Tensor:
    """Rows of ``weight`` (output rounded to the activation format); the weight
    gradient is summed in FP32 and rounded once to the weight-gradient format."""
    return _Embedding.apply(indices, weight, rounder, padding_idx)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a, b, rounder: Rounder, role: str):  # type: ignore[override]
        spec = rounder.recipe.activation
        a_q, a_scale = rounder.round(a, spec, f"{role}.a")
        b_q, b_scale = rounder.round(b, spec, f"{role}.b")
        y_q, _ = rounder.round(torch.matmul(a_q, b_q), spec, f"{role}.out", owned=True)
        ctx.rounder, ctx.role, ctx.scales = rounder, role, (a_scale, b_scale)
        saved_a, raw_a = _save_input(rounder, a, a_q, a_scale)
        saved_b, raw_b = _save_input(rounder, b, b_q, b_scale)
        ctx.raw = (raw_a, raw_b)
        ctx.save_for_backward(saved_a, saved_b)
        return y_q

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        rounder: Rounder = ctx.rounder
        recipe = rounder.recipe
        saved_a, saved_b = ctx.saved_tensors
        g_q, _ = rounder.round(grad_output, recipe.error, f"{ctx.role}.grad")
        a_q = _load_input(rounder, saved_a, ctx.raw[0], ctx.scales[0])
        b_q = _load_input(rounder, saved_b, ctx.raw[1], ctx.scales[1])
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a, _ = rounder.round(torch.matmul(g_q, b_q.transpose(-1, -2)), recipe.error, f"{ctx.role}.grad_a",
                                      owned=True)
        if ctx.needs_input_grad[1]:
            grad_b, _ = rounder.round(torch.matmul(a_q.transpose(-1, -2), g_q), recipe.error, f"{ctx.role}.grad_b",
                                      owned=True)
        return grad_a, grad_b, None, None


def matmul(a: torch.Tensor, b: torch.Tensor, rounder: Rounder, role: str = "matmul") -> torch.Tensor:
    """Batched ``a @ b`` of two activations (attention's products), both rounded to the
    activation format, FP32 accumulation, output and errors rounded per the recipe."""
    return _Matmul.apply(a, b, rounder, role)


class _Attention(torch.autograd.Function):
    """Softmax attention with both products in low precision that saves only Q, K and V
    (in the activation format) and recomputes the probabilities in backward, as fused
    attention kernels do: the L x S probability matrix is never kept."""

    @staticmethod
    def _probabilities(ctx: Any, products, mask, rounder: Rounder, scales: list):  # type: ignore[no-untyped-def]
        spec = rounder.recipe.activation
        scores = _round_with(rounder, products, spec, scales, 0) * ctx.factor
        if mask is not None:
            scores = scores + mask
        probabilities = torch.softmax(scores, dim=-1)
        return probabilities, _round_with(rounder, probabilities, spec, scales, 1)

    @staticmethod
    def forward(ctx: Any, q, k, v, mask, factor: float, rounder: Rounder):  # type: ignore[override]
        spec = rounder.recipe.activation
        q_q, q_scale = rounder.round(q, spec, "attention.q")
        k_q, k_scale = rounder.round(k, spec, "attention.k")
        v_q, v_scale = rounder.round(v, spec, "attention.v")
        ctx.factor = factor
        products = q_q @ k_q.transpose(-1, -2)
        scales: list = [None, None]  # scores' and probabilities' scales, reused in backward
        if rounder.recipe.tensor_scaling is not None:
            scales = [rounder._scale(products, spec, "attention.scores"), None]
        _, probabilities_q = _Attention._probabilities(ctx, products, mask, rounder, scales)
        out, _ = rounder.round(probabilities_q @ v_q, spec, "attention.out", owned=True)
        saved = [_save_input(rounder, t, t_q, scale) for t, t_q, scale in ((q, q_q, q_scale), (k, k_q, k_scale), (v, v_q, v_scale))]
        ctx.raw = [raw for _, raw in saved]
        ctx.scales, ctx.input_scales, ctx.rounder = scales, (q_scale, k_scale, v_scale), rounder
        ctx.save_for_backward(*(t for t, _ in saved), mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output):  # type: ignore[override]
        rounder: Rounder = ctx.rounder
        recipe = rounder.recipe
        *saved, mask = ctx.saved_tensors
        q_q, k_q, v_q = (_load_input(rounder, t, raw, scale) for t, raw, scale in zip(saved, ctx.raw, ctx.input_scales))
        probabilities, probabilities_q = _Attention._probabilities(
            ctx, q_q @ k_q.transpose(-1, -2), mask, rounder, ctx.scales
        )
        g_q, _ = rounder.round(grad_output, recipe.error, "attention.grad")
        grad_v, _ = rounder.round(probabilities_q.transpose(-1, -2) @ g_q, recipe.error, "attention.grad_v", owned=True)
        grad_probabilities, _ = rounder.round(g_q @ v_q.transpose(-1, -2), recipe.error, "attention.grad_p", owned=True)
        # softmax backward in FP32, on the FP32 probabilities
        grad_scores = probabilities * (grad_probabilities - (grad_probabilities * probabilities).sum(-1, keepdim=True))
        grad_scores, _ = rounder.round(grad_scores * ctx.factor, recipe.error, "attention.grad_s")
        grad_q, _ = rounder.round(grad_scores @ k_q, recipe.error, "attention.grad_q", owned=True)
        grad_k, _ = rounder.round(grad_scores.transpose(-1, -2) @ q_q, recipe.error, "attention.grad_k", owned=True)
        return grad_q, grad_k, grad_v, None, None, None


def _round_with(rounder: Rounder, x: torch.Tensor, spec: TensorFormat, scales: list, index: int) -> torch.Tensor:
    """Round with a scale fixed in forward, so backward's recomputation matches it."""
    if spec.is_fp32:
        return x
    scale = scales[index]
    saturate = True if scale is not None else None
    return quantize(x, spec.fmt, scale=scale, saturate=saturate)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rounder: Rounder,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Attention with both products in low precision (Q, K, V and the probabilities
    rounded to the activation format) and the softmax in FP32, as paper 1 prescribes.
    Arguments as torch's ``scaled_dot_product_attention``; shapes (..., L, E). Without
    dropout only Q, K and V are saved for backward (the probabilities are recomputed)."""
    factor = scale if scale is not None else query.shape[-1] ** -0.5
    length, source = query.shape[-2], key.shape[-2]
    mask = None
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        mask = torch.zeros(length, source, device=query.device).masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        extra = (
            torch.zeros(attn_mask.shape, device=query.device).masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn_mask.float()
        )
        mask = extra if mask is None else mask + extra
    if dropout_p == 0 or not training:
        return _Attention.apply(query, key, value, mask, factor, rounder)
    scores = matmul(query, key.transpose(-1, -2), rounder, "scores") * factor
    if mask is not None:
        scores = scores + mask
    probabilities = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return matmul(probabilities, value, rounder, "values")
