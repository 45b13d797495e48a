"""The scoped function mode that runs a converted model's forward under its recipe.

While a converted model's forward runs, :class:`EmulationMode` sees every torch
function call (``torch.overrides.TorchFunctionMode``), so coverage does not depend on
module types: a Hugging Face Conv1D's ``addmm``, a hand-written attention's ``@``, a
functional call anywhere in the forward are all GEMMs it runs through
:mod:`mixprec.nn.ops`. Its op policy:

- **GEMM family** (``F.linear``, ``addmm``, ``mm``, ``bmm``, ``baddbmm``, ``matmul``
  and ``@``, ``conv1d/2d/3d`` and their transposes, ``scaled_dot_product_attention``,
  ``F.embedding``, and the fused recurrences ``torch.lstm``/``torch.gru`` that
  nn.LSTM/nn.GRU run): emulated.
- **FP32 ops**: the ops torch.autocast runs in FP32 on GPUs (layer and group norms,
  softmax, log-softmax, losses, exp/log/pow and large reductions): their 16-bit inputs
  are widened to FP32, as paper 1 prescribes. Batch norm is not among them (as in
  autocast): it takes 16-bit inputs, computes its statistics in FP32 and returns 16 bits. This list is CUDA autocast's, on every
  device, so the emulation computes what a GPU would.
- **Everything else** runs in whatever dtype its inputs have: the GEMMs' results come
  in the recipe's compute dtype, so point-wise ops run there, in torch's own kernels.

Inside a module the recipe keeps in high precision, GEMMs run in FP32 on FP32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixprec.nn import ops, recurrences
from mixprec.nn.state import CallRecord, EngineState

__all__ = ["EmulationMode", "GEMM_FUNCTIONS", "FP32_FUNCTIONS", "UnsupportedOpError"]


class UnsupportedOpError(ValueError):
    """A GEMM-family call with an option mixprec cannot emulate (raised before
    anything changes); the message names the option and the way out."""


def _linear(state: EngineState, input, weight, bias=None):  # type: ignore[no-untyped-def]
    return ops.gemm(state, input, weight, bias, transpose_b=True, op="linear")


def _matmul(state: EngineState, a, b, *, out=None):  # type: ignore[no-untyped-def]
    if out is not None:
        raise UnsupportedOpError("matmul(..., out=) cannot be emulated inside a converted model; drop out=")
    return ops.gemm(state, a, b, op="matmul")


def _rmatmul(state: EngineState, a, b):  # type: ignore[no-untyped-def]
    return ops.gemm(state, b, a, op="matmul")


def _addmm(state: EngineState, input, mat1, mat2, *, beta=1, alpha=1, out=None):  # type: ignore[no-untyped-def]
    if out is not None:
        raise UnsupportedOpError("addmm(..., out=) cannot be emulated inside a converted model; drop out=")
    if beta == 1 and alpha == 1:
        return ops.gemm(state, mat1, mat2, input, op="addmm")
    product = ops.gemm(state, mat1, mat2, op="addmm")
    return (product * alpha if alpha != 1 else product) + (input * beta if beta != 0 else 0)


def _baddbmm(state: EngineState, input, batch1, batch2, *, beta=1, alpha=1, out=None):  # type: ignore[no-untyped-def]
    if out is not None:
        raise UnsupportedOpError("baddbmm(..., out=) cannot be emulated inside a converted model; drop out=")
    product = ops.gemm(state, batch1, batch2, op="baddbmm")
    product = product * alpha if alpha != 1 else product
    return product if beta == 0 else product + input * beta


def _conv_padding(padding: Any, weight: torch.Tensor, dilation: list[int], stride: list[int]) -> tuple[list[int], list[int] | None]:
    """Numeric padding for 'valid'/'same' (and the extra right padding 'same' needs
    for an even kernel), as torch's convolution computes it."""
    dims = weight.dim() - 2
    if padding == "valid":
        return [0] * dims, None
    if padding == "same":
        if any(s != 1 for s in stride):
            raise UnsupportedOpError("padding='same' needs stride 1 (torch refuses it too)")
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        left = [t // 2 for t in total]
        extra = [t - 2 * l for t, l in zip(total, left)]
        return left, (extra if any(extra) else None)
    return list(padding), None


def _tuple(value: Any, dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


def _conv(dims: int) -> Callable[..., torch.Tensor]:
    def handler(state: EngineState, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # type: ignore[no-untyped-def]
        stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
        numeric, extra = _conv_padding(padding if isinstance(padding, str) else _tuple(padding, dims), weight,
                                       dilation, stride)
        if extra is not None:  # 'same' with an even kernel: the extra padding goes on the right
            pads = [p for e in reversed(extra) for p in (0, e)]
            input = F.pad(input, pads)
        return ops.convolution(state, input, weight, bias, stride, numeric, dilation, False, [0] * dims, groups,
                               op=f"conv{dims}d")
    return handler


def _conv_transpose(dims: int) -> Callable[..., torch.Tensor]:
    def handler(state: EngineState, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,  # type: ignore[no-untyped-def]
                dilation=1):
        return ops.convolution(state, input, weight, bias, _tuple(stride, dims), _tuple(padding, dims),
                               _tuple(dilation, dims), True, _tuple(output_padding, dims), groups,
                               op=f"conv_transpose{dims}d")
    return handler


def _embedding(state: EngineState, input, weight, padding_idx=None, max_norm=None, norm_type=2.0,  # type: ignore[no-untyped-def]
               scale_grad_by_freq=False, sparse=False):
    if max_norm is not None or scale_grad_by_freq or sparse:
        raise UnsupportedOpError(
            "mixprec emulates F.embedding without max_norm, scale_grad_by_freq and sparse; keep this embedding "
            "in high precision (KeepHighPrecision(embeddings=True), the FP8 recipes' default) or drop the option")
    return ops.embedding(state, input, weight, padding_idx)


def _sdpa(state: EngineState, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,  # type: ignore[no-untyped-def]
          enable_gqa=False):
    return ops.scaled_dot_product_attention(state, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa)


def _lstm(state: EngineState, *args: Any) -> Any:
    if len(args) != 9 or not isinstance(args[1], (list, tuple)) or not isinstance(args[2], (list, tuple)):
        raise UnsupportedOpError("mixprec does not emulate nn.LSTM on packed sequences; pad the batch, or keep "
                                 "the LSTM in high precision (KeepHighPrecision(module_types=(nn.LSTM,)))")
    x, hx, weights, has_bias, layers, dropout, training, bidirectional, batch_first = args
    return recurrences.lstm(state, x, tuple(hx), list(weights), has_bias, layers, dropout, training, bidirectional,
                            batch_first)


def _gru(state: EngineState, *args: Any) -> Any:
    if len(args) != 9 or not isinstance(args[2], (list, tuple)):
        raise UnsupportedOpError("mixprec does not emulate nn.GRU on packed sequences; pad the batch, or keep "
                                 "the GRU in high precision (KeepHighPrecision(module_types=(nn.GRU,)))")
    x, hx, weights, has_bias, layers, dropout, training, bidirectional, batch_first = args
    return recurrences.gru(state, x, hx, list(weights), has_bias, layers, dropout, training, bidirectional, batch_first)


def _multi_head_attention(state: EngineState, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,  # type: ignore[no-untyped-def]
                          in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                          training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                          use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
                          static_k=None, static_v=None, average_attn_weights=True, is_causal=False):
    """F.multi_head_attention_forward (what nn.MultiheadAttention and the torch
    Transformer layers run) with its projections and both attention products emulated.
    torch runs this Python function with the mode off, so it is rebuilt here from the
    emulated ops."""
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise UnsupportedOpError("mixprec does not emulate nn.MultiheadAttention with add_bias_kv, add_zero_attn "
                                 "or static keys; keep the module in high precision (KeepHighPrecision)")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    length, batch, embed = query.shape
    source = key.shape[0]
    head = embed // num_heads
    if not use_separate_proj_weight and query is key and key is value:
        q, k, v = ops.gemm(state, query, in_proj_weight, in_proj_bias, transpose_b=True, op="mha.in_proj").chunk(3, -1)
    else:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else \
            in_proj_weight.chunk(3)
        biases = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (ops.gemm(state, x, w, b, transpose_b=True, op="mha.in_proj", weight_operand=True)
                   for x, w, b in zip((query, key, value), weights, biases))

    def heads(t: torch.Tensor, rows: int) -> torch.Tensor:  # (rows, N, E) -> (N, H, rows, head)
        # one copy into the attention's own layout: a strided (N, H, rows, head) view sent
        # torch's BF16 batched GEMM to a path 3.5x slower than on contiguous operands
        # (32 x 4 heads of 64 x 32 at 64 x 32: 823 against 229 us, the copy 60)
        return t.reshape(rows, batch, num_heads, head).permute(1, 2, 0, 3).contiguous()

    q, k, v = heads(q, length), heads(k, source), heads(v, source)
    mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=torch.float32, check_other=False)
    if mask is not None:
        mask = mask.reshape(batch, num_heads, length, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask", other_type=None,
                                    other_name="", target_type=torch.float32)
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    causal = is_causal and mask is None
    dropout = dropout_p if training else 0.0
    if need_weights:
        scores = ops.gemm(state, q, k, transpose_b=True, op="sdpa.qk").float() / math.sqrt(head)
        if causal:
            scores = scores.masked_fill(~torch.ones(length, source, dtype=torch.bool).tril(), float("-inf"))
        if mask is not None:
            scores = scores + mask
        probabilities = torch.softmax(scores, dim=-1)
        dropped = F.dropout(probabilities, dropout) if dropout > 0 else probabilities
        attention = ops.gemm(state, dropped, v, op="sdpa.pv")
    else:
        attention = ops.scaled_dot_product_attention(state, q, k, v, mask, dropout, causal)
    attention = attention.permute(2, 0, 1, 3).reshape(length * batch, embed)
    out = ops.gemm(state, attention, out_proj_weight, out_proj_bias, transpose_b=True, op="mha.out_proj")
    out = out.reshape(length, batch, embed)
    weights_out = None
    if need_weights:
        weights_out = probabilities.mean(1) if average_attn_weights else probabilities
        weights_out = weights_out.squeeze(0) if unbatched else weights_out
    return (out.squeeze(1) if unbatched else out), weights_out


def _refuse(name: str) -> Callable[..., Any]:
    def handler(state: EngineState, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOpError(
            f"{name} runs a fused kernel mixprec cannot see inside; this is nn.MultiheadAttention's or "
            "nn.TransformerEncoderLayer's inference fast path, which a converted model should not take: "
            "call the model in training mode or under torch.enable_grad(), or keep the module in high precision")
    return handler


GEMM_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: _rmatmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.addmm: _addmm,
    torch.Tensor.addmm: _addmm,
    torch.baddbmm: _baddbmm,
    torch.Tensor.baddbmm: _baddbmm,
    F.conv1d: _conv(1),
    F.conv2d: _conv(2),
    F.conv3d: _conv(3),
    F.conv_transpose1d: _conv_transpose(1),
    F.conv_transpose2d: _conv_transpose(2),
    F.conv_transpose3d: _conv_transpose(3),
    F.embedding: _embedding,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _multi_head_attention,
    torch.lstm: _lstm,
    torch.gru: _gru,
}
"""The functions the mode emulates, and how."""

_FAST_PATHS: dict[Callable[..., Any], Callable[..., Any]] = {
    f: _refuse(name) for name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
    if (f := getattr(torch, name, None)) is not None
}

FP32_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    f for f in (
        F.layer_norm, F.group_norm, getattr(F, "rms_norm", None), F.normalize,
        F.softmax, F.softmin, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
        torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss,
        F.huber_loss, F.kl_div, F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.softplus,
        F.cosine_similarity, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow,
        torch.rsqrt, torch.Tensor.rsqrt, torch.cumsum, torch.Tensor.cumsum, torch.logsumexp,
        torch.Tensor.logsumexp, torch.norm, torch.Tensor.norm, torch.sum, torch.Tensor.sum, torch.prod,
        torch.Tensor.prod,
    ) if f is not None
)
"""Functions run in FP32 on 16-bit inputs: torch.autocast's FP32 list on GPUs."""

_LOW = (torch.float16, torch.bfloat16)


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_widen(v) for v in value)
    return value


def _dense_flops(func: Any, args: tuple) -> float:
    """Forward plus backward FLOPs of a kept linear or matmul-family call (0 for others:
    the coverage report then counts them as not emulated)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if func is F.linear and len(tensors) >= 2:
        x, w = tensors[0], tensors[1]
        forward = 2.0 * x.numel() * w.shape[0]
    elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
                  torch.bmm, torch.Tensor.bmm) and len(tensors) >= 2 and min(t.dim() for t in tensors[:2]) >= 2:
        x, w = tensors[0], tensors[1]
        forward = 2.0 * x.numel() * w.shape[-1]
    else:
        return 0.0
    return forward * (1 + int(x.requires_grad) + int(w.requires_grad))


_INDUCTOR_CODE = "torch._inductor."


def _called_by_compiled_graph() -> bool:
    """Whether the call being dispatched comes from code torch.compile generated.

    Dynamo traces this mode into a compiled graph (the graph holds the emulated ops), but
    leaves the mode on the stack while the graph runs, so the graph's own kernel calls
    (inductor's ``extern_kernels.bmm(..., out=buf)``) reach the mode a second time. They
    are the emulation's results already and pass through. Inductor loads its generated
    code as modules named under ``torch._inductor``; the caller is two frames up (this
    function's caller is ``__torch_function__``). While dynamo traces, the answer is
    no (and the frame is not looked at, which dynamo cannot trace)."""
    if torch.compiler.is_compiling():
        return False
    return sys._getframe(2).f_globals.get("__name__", "").startswith(_INDUCTOR_CODE)


class EmulationMode(TorchFunctionMode):
    """The op policy of the module docstring, for one converted model's forward."""

    def __init__(self, state: EngineState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        state = self.state
        handler = GEMM_FUNCTIONS.get(func) or _FAST_PATHS.get(func)
        if (handler is not None or func in FP32_FUNCTIONS) and _called_by_compiled_graph():
            return func(*args, **kwargs)
        if handler is not None:
            if state.high_precision and state.kept_recipe is None:
                return self._high_precision(func, args, kwargs)
            return handler(state, *args, **kwargs)  # kept modules with a recipe of their own: under it
        if func is F.batch_norm and not (state.high_precision and state.kept_recipe is None):
            return ops.batch_norm(*args, **kwargs)
        if func in FP32_FUNCTIONS and state.recipe.compute_dtype != "fp32":
            return func(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)

    def _high_precision(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A GEMM inside a module kept in high precision: FP32 operands, FP32 kernels."""
        state = self.state
        if state.log is not None:
            module = state.module_stack[-1] if state.module_stack else ""
            owner = next((name for name in reversed(state.module_stack) if name in state.kept), module)
            name = getattr(func, "__name__", "?")
            state.log.append(CallRecord(f"{module}:{name}", name, _dense_flops(func, args), {}, emulated=False,
                                        reason=state.kept.get(owner, "kept")))
        return func(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()})
