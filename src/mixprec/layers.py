"""Low-precision counterparts of torch.nn layers, built from a float module by
:func:`mixprec.convert`. Each holds its weights in the recipe's 16-bit parameter dtype
(values on the weight format's grid), keeps the float module's parameter names (so
state dicts line up), and computes through :mod:`mixprec.ops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixprec import ops
from mixprec.ops import Rounder
from mixprec.core.quantize import quantize, tensor_scale
from mixprec.recipe import Recipe
from mixprec.recurrent import lstm_recurrence

__all__ = [
    "LowPrecisionModule",
    "LowPrecisionLinear",
    "LowPrecisionConv",
    "LowPrecisionEmbedding",
    "LowPrecisionLSTM",
    "LowPrecisionMultiheadAttention",
    "round_weight",
]

ParamMaker = Callable[[Any], Any]
"""Makes a converted layer's parameter from the float one (None stays None)."""


def round_weight(master: torch.Tensor, recipe: Recipe, generator: torch.Generator | None = None) -> torch.Tensor:
    """A master weight rounded onto the weight format's grid (with a current
    per-tensor scale under FP8 scaling), in the recipe's parameter dtype."""
    spec = recipe.weight
    if spec.is_fp32:
        return master.detach().to(recipe.param_dtype)
    scaling = recipe.tensor_scaling
    scale = None
    if scaling is not None:
        scale = tensor_scale(master, spec.fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
    rounded = quantize(master.detach().float(), spec.fmt, spec.rounding, scale=scale, generator=generator)
    return rounded.to(recipe.param_dtype)


class LowPrecisionModule(nn.Module):
    """Base of the converted layers: the recipe and the rounding state they share."""

    def __init__(self, recipe: Recipe, generator: torch.Generator | None) -> None:
        super().__init__()
        self.recipe = recipe
        self.rounder = Rounder(recipe, generator)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name}"


class LowPrecisionLinear(LowPrecisionModule):
    """``nn.Linear`` in low precision."""

    def __init__(self, source: nn.Linear, recipe: Recipe, generator: torch.Generator | None, make: ParamMaker):
        super().__init__(recipe, generator)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = make(source.weight)
        self.bias = make(source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.rounder)


class LowPrecisionConv(LowPrecisionModule):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose1d`` and ``nn.ConvTranspose2d``
    in low precision (zero padding)."""

    def __init__(self, source: nn.modules.conv._ConvNd, recipe: Recipe, generator: torch.Generator | None,
                 make: ParamMaker):
        super().__init__(recipe, generator)
        self.source_type = type(source).__name__
        self.transposed = source.transposed
        self.stride, self.dilation, self.groups = source.stride, source.dilation, source.groups
        self.output_padding = source.output_padding
        self.padding = resolve_padding(source)
        self.weight = make(source.weight)
        self.bias = make(source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.convolution(x, self.weight, self.bias, self.rounder, self.stride, self.padding,
                               self.dilation, self.transposed, self.output_padding, self.groups)

    def extra_repr(self) -> str:
        return f"{self.source_type}, weight={tuple(self.weight.shape)}, recipe={self.recipe.name}"


def resolve_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """Explicit padding of a convolution, or ValueError where only torch's own
    asymmetric 'same' padding or a non-zero padding mode would do."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    padding = conv.padding
    if padding == "valid":
        return (0,) * len(conv.kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(total % 2 for total in totals):
            raise ValueError("padding='same' with an even kernel pads asymmetrically; not supported")
        return tuple(total // 2 for total in totals)
    return tuple(padding)  # type: ignore[arg-type]


class LowPrecisionEmbedding(LowPrecisionModule):
    """``nn.Embedding`` in low precision (no max_norm, dense gradients)."""

    def __init__(self, source: nn.Embedding, recipe: Recipe, generator: torch.Generator | None, make: ParamMaker):
        super().__init__(recipe, generator)
        if source.max_norm is not None or source.sparse:
            raise ValueError("Embedding with max_norm or sparse=True is not supported")
        self.num_embeddings, self.embedding_dim = source.num_embeddings, source.embedding_dim
        self.padding_idx = source.padding_idx
        self.weight = make(source.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return ops.embedding(indices, self.weight, self.rounder, self.padding_idx)


class LowPrecisionLSTM(LowPrecisionModule):
    """``nn.LSTM`` (unidirectional, no projections) in low precision: per layer, one
    GEMM over every time step for the input weights, and the recurrence as one
    operation (:func:`mixprec.recurrent.lstm_recurrence`): a low-precision product per
    step with the recurrent weights, whose gradient is summed over the steps in FP32 and
    rounded once. Gates and cell state are point-wise FP32 operations."""

    def __init__(self, source: nn.LSTM, recipe: Recipe, generator: torch.Generator | None, make: ParamMaker):
        super().__init__(recipe, generator)
        if source.bidirectional or source.proj_size:
            raise ValueError("bidirectional LSTMs and proj_size are not supported")
        self.input_size, self.hidden_size = source.input_size, source.hidden_size
        self.num_layers, self.batch_first, self.dropout = source.num_layers, source.batch_first, source.dropout
        self.has_bias = source.bias
        for name in source._flat_weights_names:
            setattr(self, name, make(getattr(source, name)))

    def _layer_params(self, layer: int) -> tuple[Any, ...]:
        names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
        return tuple(getattr(self, name, None) for name in names)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        sequence = x.transpose(0, 1) if self.batch_first else x  # (time, batch, features)
        batch = sequence.shape[1]
        if state is None:
            zeros = sequence.new_zeros(self.num_layers, batch, self.hidden_size, dtype=torch.float32)
            state = (zeros, zeros)
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer_params(layer)
            projected = ops.linear(sequence, w_ih, b_ih, self.rounder)
            w_hh32 = ops.weight_as_fp32(w_hh, self.rounder)
            b_hh32 = None if b_hh is None else ops.weight_as_fp32(b_hh, self.rounder)
            sequence, h, c = lstm_recurrence(projected, state[0][layer], state[1][layer], w_hh32, b_hh32,
                                             self.rounder)
            if self.dropout and self.training and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout)
            final_h.append(h)
            final_c.append(c)
        output = sequence.transpose(0, 1) if self.batch_first else sequence
        return output, (torch.stack(final_h), torch.stack(final_c))


class LowPrecisionMultiheadAttention(LowPrecisionModule):
    """``nn.MultiheadAttention`` in low precision: the projections are low-precision
    linears, the two attention products low-precision matmuls, the softmax FP32.
    Returns ``(output, None)``: attention weights are not materialised."""

    def __init__(self, source: nn.MultiheadAttention, recipe: Recipe, generator: torch.Generator | None,
                 make: ParamMaker):
        super().__init__(recipe, generator)
        if not source._qkv_same_embed_dim or source.bias_k is not None:
            raise ValueError("MultiheadAttention with kdim/vdim or add_bias_kv is not supported")
        self.embed_dim, self.num_heads = source.embed_dim, source.num_heads
        self.dropout, self.batch_first = source.dropout, source.batch_first
        self.in_proj_weight = make(source.in_proj_weight)
        self.in_proj_bias = make(source.in_proj_bias)
        self.out_proj = LowPrecisionLinear(source.out_proj, recipe, generator, make)  # type: ignore[arg-type]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("LowPrecisionMultiheadAttention does not return attention weights; "
                             "call it with need_weights=False")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        if query is key and key is value:
            q, k, v = ops.linear(query, self.in_proj_weight, self.in_proj_bias, self.rounder).chunk(3, dim=-1)
        else:
            weights = self.in_proj_weight.chunk(3)
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = (ops.linear(t, w, b, self.rounder) for t, w, b in zip((query, key, value), weights, biases))

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

        mask = _merge_masks(attn_mask, key_padding_mask, batch, heads)
        # is_causal is a hint that attn_mask is causal; with no mask it asks for one
        causal = is_causal and mask is None
        attended = ops.scaled_dot_product_attention(
            split(q), split(k), split(v), self.rounder, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout, training=self.training,
        )
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, None


def _merge_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int
) -> torch.Tensor | None:
    """One additive float mask from torch's two mask conventions (True = masked out)."""
    merged = None
    if attn_mask is not None:
        merged = (
            torch.zeros_like(attn_mask, dtype=torch.float32).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn_mask.float()
        )
        if merged.dim() == 3:  # (batch * heads, L, S)
            merged = merged.reshape(batch, heads, *merged.shape[1:])
    if key_padding_mask is not None:
        padding = (
            torch.zeros_like(key_padding_mask, dtype=torch.float32).masked_fill(key_padding_mask, float("-inf"))
            if key_padding_mask.dtype == torch.bool
            else key_padding_mask.float()
        )[:, None, None, :]
        merged = padding if merged is None else merged + padding
    return merged
