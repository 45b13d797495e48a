"""An LSTM layer's recurrence as one autograd operation with the recipe's roundings.

The recurrent product ``h @ W_hh.T`` runs once per time step. As a chain of per-step
autograd nodes it costs more in graph bookkeeping than in arithmetic (about 15 nodes a
step, ~5x the step time of torch's fused FP32 LSTM on a CPU). Here the forward loop
and a hand-written backward through time run inside one node, with exactly the
roundings a per-step :func:`mixprec.ops.linear` would apply, in the same order (so
delayed per-tensor scaling sees the same amax sequence): the recurrent input ``h``
and the product rounded to the activation format, the incoming error and the
recurrent input gradient to the error format. The weight gradient is one FP32 GEMM
over all steps, returned unrounded (``weight_as_fp32`` rounds it once).
"""

from __future__ import annotations

from typing import Any

import torch

from mixprec.ops import Rounder
from mixprec.core.storage import from_storage, storage_dtype

__all__ = ["lstm_recurrence"]


class _LSTMRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, projected, h0, c0, weight, bias, rounder: Rounder):  # type: ignore[override]
        spec = rounder.recipe.activation
        steps, batch, four_hidden = projected.shape
        hidden = four_hidden // 4
        weight_t = weight.t()
        packed_dtype = torch.float32 if spec.is_fp32 else storage_dtype(spec.fmt)
        inputs = torch.empty(steps, batch, hidden, dtype=packed_dtype, device=projected.device)
        gates = torch.empty_like(projected, dtype=torch.float32)  # i, f, g, o after their nonlinearities
        cells = torch.empty(steps + 1, batch, hidden, dtype=torch.float32, device=projected.device)
        outputs = torch.empty(steps, batch, hidden, dtype=torch.float32, device=projected.device)
        cells[0] = c0
        scales = []
        h = h0
        for t in range(steps):
            h_q, scale = rounder.round(h, spec, "input")
            inputs[t] = rounder.pack(h_q, spec, scale)
            scales.append(scale)
            product = torch.addmm(bias, h_q, weight_t) if bias is not None else h_q @ weight_t
            product_q, _ = rounder.round(product, spec, "output", owned=True)
            step_gates = gates[t]
            torch.add(projected[t], product_q, out=step_gates)
            i, f, g, o = step_gates.chunk(4, dim=-1)
            # gate by gate: torch's vectorised sigmoid gives other last bits on a wider slice
            i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
            torch.add(f * cells[t], i * g, out=cells[t + 1])
            h = torch.mul(o, torch.tanh(cells[t + 1]), out=outputs[t])
        ctx.rounder = rounder
        present = [scale for scale in scales if scale is not None]  # all or none: per-tensor scaling or not
        ctx.scales = torch.stack(present) if present else None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(inputs, gates, cells, weight)
        return outputs, h.clone(), cells[steps].clone()

    @staticmethod
    def backward(ctx: Any, grad_outputs, grad_h_last, grad_c_last):  # type: ignore[override]
        rounder: Rounder = ctx.rounder
        recipe = rounder.recipe
        inputs, gates, cells, weight = ctx.saved_tensors
        steps, batch, four_hidden = gates.shape
        hidden = four_hidden // 4
        grad_projected = torch.empty_like(gates)
        errors = torch.empty_like(gates)  # the rounded gate errors, for the weight gradient
        dh_next = grad_h_last if grad_h_last is not None else gates.new_zeros(batch, hidden)
        dc_next = grad_c_last if grad_c_last is not None else gates.new_zeros(batch, hidden)
        for t in reversed(range(steps)):
            dh = grad_outputs[t] + dh_next if grad_outputs is not None else dh_next
            i, f, g, o = gates[t].chunk(4, dim=-1)
            tanh_c = torch.tanh(cells[t + 1])
            dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
            d = grad_projected[t]
            di, df, dg, do = d.chunk(4, dim=-1)
            torch.mul(dc * g, i * (1 - i), out=di)
            torch.mul(dc * cells[t], f * (1 - f), out=df)
            torch.mul(dc * i, 1 - g * g, out=dg)
            torch.mul(dh * tanh_c, o * (1 - o), out=do)
            errors[t], _ = rounder.round(d, recipe.error, "grad_output")
            dh_next, _ = rounder.round(errors[t] @ weight, recipe.error, "grad_input", owned=True)
            dc_next = dc * f
        grad_weight = grad_bias = None
        flat_errors = errors.reshape(-1, four_hidden)
        if ctx.needs_input_grad[3]:
            spec = recipe.activation
            values = inputs if spec.is_fp32 else from_storage(inputs, spec.fmt)
            if ctx.scales is not None:
                values = values * ctx.scales.reshape(steps, 1, 1)
            grad_weight = flat_errors.t() @ values.reshape(-1, hidden)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_bias = flat_errors.sum(0)
        return grad_projected, dh_next, dc_next, grad_weight, grad_bias, None


def lstm_recurrence(
    projected: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rounder: Rounder,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one LSTM layer over time: ``projected`` (time, batch, 4 * hidden) holds the
    input projections ``x @ W_ih.T + b_ih``; ``weight`` and ``bias`` are the recurrent
    ``W_hh`` and ``b_hh`` as float32 grid values (from :func:`mixprec.ops.weight_as_fp32`).
    Returns the hidden states of every step and the last hidden and cell states."""
    if projected.dim() != 3 or projected.shape[-1] != 4 * weight.shape[1]:
        raise ValueError(f"projected must be (time, batch, 4 * hidden) with hidden = {weight.shape[1]}, "
                         f"got {tuple(projected.shape)}")
    if projected.shape[0] == 0:
        raise ValueError("an LSTM needs at least one time step")
    return _LSTMRecurrence.apply(projected, h0, c0, weight, bias, rounder)
