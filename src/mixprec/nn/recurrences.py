"""The LSTM and GRU recurrences (``torch.lstm``/``torch.gru``, what nn.LSTM and nn.GRU
run) under a recipe, shaped as fused RNN kernels (cuDNN's) run them:

- each layer's input projection is one GEMM over all time steps (:func:`ops.gemm`);
- the recurrent product ``h @ W_hh^T`` is one GEMM per step in forward (h rounded to
  the forward's input format, the weight rounded once per step of the optimizer and
  decoded once per layer, the result rounded once), and its error ``dG_t @ W_hh`` one
  per step in backward (the error rounded to dgrad's format, the result once to
  dgrad's result format);
- the recurrent weight's gradient is one GEMM over all time steps after the backward
  sweep, ``dG^T @ H`` with the T x B rows of every step's error and previous hidden
  state, each rounded once as that GEMM's operands, accumulated in FP32 and rounded
  once; the bias gradient is the FP32 sum of the same rounded errors, rounded once;
- the gates, the cell state and their gradients are point-wise FP32, as fused kernels
  keep them; the hidden state is held in the recipe's result dtype (the next step's
  GEMM input), and its gradient is accumulated in FP32.

A layer is one autograd Function (:class:`_Recurrence`), so a step adds no autograd
nodes, and its backward writes the gates' gradients into one buffer that is at the same
time the input projection's error. On CPU an LSTM step's point-wise operations run in
native passes (:mod:`mixprec.core.native`: three in forward around torch's two sigmoids,
one in backward), the same arithmetic as the torch ops they replace, bit for bit, and
these passes also take the step's roundings where the format is an unscaled scalar one
(:func:`_step_rounding`): the recurrent product's result, the next step's h, the dgrad's
error and its result, with the values and random bits of the separate rounding passes
(block formats and scaled operands keep those passes). Under a passive OpenMP the step
loop runs on one thread while its GEMMs are small
(:func:`mixprec.core.kernels.serial_gemm_threads`), so no op of a step waits for a
sleeping thread to wake. Stochastic roundings take a key per time step (the
forward's key mixed with the step), so consecutive steps do not reuse one stream of
random bits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mixprec.nn import kernels
from mixprec.nn.ops import (_Call, _backward_copy, _grad_operands, _grad_result, _grad_result_operand,
                            _kernel_dtype, _load, _load_extra, _log, _save, _no_autocast, _pad_dim, _path, _reserve_histories, _scale_sum,
                            _values, _finish, _forward_path, forward_product, gemm)
from mixprec.core import native
from mixprec.core.block_kernels import RULE_IDS
from mixprec.core.block_quantize import _block_params
from mixprec.core.formats import BlockFormat
from mixprec.core.kernels import _params, native_steps, serial_gemm_threads, serial_threads, torch_threads
from mixprec.core.quantize import abs_max, resolve_overflow
from mixprec.nn.state import EngineState, Quantized, _mix_tensor, quantize_operand, result_dtype
from mixprec.recipe import Operand
from mixprec.scaling import AmaxHistory

__all__ = ["lstm", "gru"]

_GATES = {"lstm": 4, "gru": 3}


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as 2 sigmoid(2x) - 1 in FP32 (within 2**-23 of tanh, absolute): torch's CPU
    tanh ran 5-13x slower than its sigmoid here (65 against 5 us on a 32 x 256 gate),
    and the recurrences take three of them per step."""
    return torch.mul(x, 2).sigmoid_().mul_(2).sub_(1)


def _sequence_scale(call: _Call, operand: Operand, key: str, device: torch.device
                    ) -> tuple[torch.Tensor | None, AmaxHistory | None]:
    """For an operand under delayed scaling, rounded at every time step: one scale for
    all steps, from the history of earlier iterations, and the history to record the
    whole sequence's amax into once (None when this pass does not record), as delayed
    scaling treats any other tensor of an iteration. (None, None) for other operands,
    which :func:`quantize_operand` scales per step itself."""
    scaling = operand.scaling
    if scaling is None or scaling.mode != "delayed":
        return None, None
    state = call.state
    state.reserve_history(key, operand, device)
    history = state.histories[key]
    scale = history.scale(operand.fmt, margin=scaling.margin, power_of_two=scaling.power_of_two)
    return scale, history if state.recording else None


def _record(call: _Call, history: AmaxHistory | None, x: torch.Tensor) -> None:
    """Record ``x``'s amax (agreed over the ranks where the state reduces amaxes)."""
    if history is None:
        return
    amax = abs_max(x)
    history.record_amax(amax if call.state.amax_reduce is None else call.state.amax_reduce(amax))


def _step_rounding(call: _Call, operand: Operand, site: str, step_key: torch.Tensor | None,
                   device: torch.device) -> native.StepRounding | None:
    """The rounding onto ``operand``'s grid a native step fuses: the format's kernel
    parameters (its default overflow, as an unscaled :func:`quantize_operand` takes it)
    and, for stochastic rounding, the key call site ``site`` draws at this step (the same
    random bits). None where a step cannot take it: FP32 (nothing to round), a block
    format or a scaled operand (the separate rounding pass runs), or stochastic rounding
    without a forward key."""
    fmt = operand.fmt
    if operand.is_fp32 or operand.scaling is not None or isinstance(fmt, BlockFormat):
        return None
    key = call.state.random_key(site, step_key) if operand.rounding == "stochastic" else None
    if operand.rounding == "stochastic" and key is None:
        return None
    return _params(fmt, resolve_overflow(fmt, None), device), key


class _StepBlocks:
    """An operand in an NVFP4-style format (1-D blocks along the contraction axis, amax
    block scales under a tensor scale, no rotation), rounded at every time step of a
    (B, N) tensor by one call of the native kernel: what :func:`quantize_operand`'s
    values-only rounding sets up per call (the blocked view, the kernel's parameters, a
    values buffer) is set up once per sequence. The same values (without the tensor
    scale, which the GEMM applies to its sum), tensor scale and random bits."""

    def __init__(self, call: _Call, operand: Operand, site: str, shape: tuple[int, ...], device: torch.device):
        fmt = operand.fmt
        assert isinstance(fmt, BlockFormat)
        self.state, self.operand = call.state, operand
        self.params = _block_params(fmt, device)
        self.site = f"{site}@{len(shape) - 1}"  # quantize_operand's key: the site and the normalised axis
        self.stochastic = operand.rounding == "stochastic"
        self.values = torch.empty(shape, dtype=torch.float32, device=device)
        self.blocked = (-1, 1, 1, fmt.block_shape[0])
        self.threads = serial_threads(self.values.numel())

    @staticmethod
    def make(call: _Call, operand: Operand, site: str, shape: tuple[int, ...], values_dtype: torch.dtype | None,
             device: torch.device) -> _StepBlocks | None:
        """The per-step rounding of a (B, N) ``shape`` operand, or None where
        :func:`quantize_operand` must round it (another format, a rotation, a scale,
        BF16 values, stochastic rounding without a forward key). Called where the native
        steps run (:func:`native_steps`), whose conditions the native block kernel shares."""
        fmt = operand.fmt
        if not (isinstance(fmt, BlockFormat) and fmt.tensor_scale and len(fmt.block_shape) == 1
                and fmt.scale_rule not in RULE_IDS and not operand.hadamard and operand.scaling is None
                and len(shape) == 2 and shape[-1] % fmt.block_shape[0] == 0):
            return None
        if values_dtype == torch.bfloat16 and fmt.block_bf16_values:
            return None  # quantize_operand writes these in BF16
        if operand.rounding == "stochastic" and call.forward_key is None:
            return None
        return _StepBlocks(call, operand, site, shape, device)

    def round(self, x: torch.Tensor, step_key: torch.Tensor | None) -> Quantized | None:
        """``x`` (contiguous float32 or BF16, the sequence's shape) rounded, in the
        values buffer (valid until the next call); None where x cannot go as it is."""
        if not (x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16) and x.shape == self.values.shape):
            return None
        key = self.state.random_key(self.site, step_key) if self.stochastic else None
        pe, ps, fp = self.params
        tensor_scale = native.amax_blocks(x.view(self.blocked), self.values.view(self.blocked), pe, ps, fp, True,
                                          None, True, key, self.threads)
        return Quantized(self.values, None, self.operand, None, tensor_scale)


def _loop_threads(state: torch.Tensor, weight: torch.Tensor) -> int:
    """The threads the time-step loop runs on: each step's GEMM of the (B, H) state and
    the (gates x H, H) weight is small, and under a passive OpenMP one thread runs the
    loop faster than two that sleep between its ops (:func:`serial_gemm_threads`)."""
    return serial_gemm_threads(state.numel() // state.shape[-1] * weight.numel())


def _step_keys(call: _Call, steps: int) -> torch.Tensor | None:
    """Every time step's random key, (steps, 2) int32: the forward's key mixed with the
    step + 1, as :func:`mixprec.nn.state._mix_key` mixes an int salt, in one batch of
    tensor ops rather than one mixing per step. None where the call has no key."""
    if call.forward_key is None:
        return None
    salts = torch.arange(1, steps + 1, dtype=torch.int32, device=call.forward_key.device)
    return _mix_tensor(call.forward_key, torch.stack([salts, salts * 31 + 17], -1))


def _step_call(call: _Call, step: int, keys: torch.Tensor | None) -> _Call:
    """The call of time step ``step``: the layer's site and histories, and for
    stochastic roundings a random key of its own (row ``step`` of :func:`_step_keys`)."""
    if keys is None:
        return call
    return _Call(call.state, call.site, call.recipe_for_call, keys[step], call.policy)


class _Recurrence(torch.autograd.Function):
    """One unidirectional LSTM or GRU layer over a whole sequence (see the module
    docstring): ``projected`` (T, B, gates x H) is the input projection in FP32,
    ``h0``/``c0`` the initial states (``c0`` None for a GRU). Returns the hidden states
    (T, B, H) in the compute dtype, the last hidden state and the last cell state."""

    @staticmethod
    def forward(ctx: Any, projected, h0, c0, w_hh, b_hh, call: _Call, kind: str,  # type: ignore[override]
                compute: torch.dtype):
        recipe, state = call.recipe, call.state
        steps, hidden = projected.shape[0], h0.shape[-1]
        path = _forward_path(call, projected.device, b_hh is not None)
        # the weight rounded (once per optimizer step, cached by the state) and decoded once
        # for all steps
        qw = call.state.weight(w_hh, recipe.forward.right, f"{call.site}.b", axis=-1,
                               forward_key=call.forward_key, values_dtype=_kernel_dtype(path))
        values = _values(path, qw)
        # packed once for all steps where their GEMMs take it so
        packed = kernels.pack_right(values.t(), path, call.policy, h0.numel() // hidden)
        right = values if packed is None else packed
        lstm = kind == "lstm"
        # LSTM: i, f, g, o activations; GRU: r, z, n and the recurrent product's n part
        acts = projected.new_empty(steps, *projected.shape[1:-1], 4 * hidden)
        outputs = projected.new_empty(steps, *h0.shape, dtype=compute)
        cells = projected.new_empty(steps + 1, *h0.shape) if lstm else None
        if cells is not None:
            cells[0] = c0
        h = h0
        h_scale, h_history = _sequence_scale(call, recipe.forward.left, f"{call.site}.a", projected.device)
        # the cell's point-wise steps in three native passes around torch's two sigmoids
        native_cells = lstm and h0.dim() == 2 and native_steps(acts) and projected.is_contiguous()
        doubled = h0.new_empty(h0.shape, dtype=torch.float32) if native_cells else None
        cell_threads = serial_threads(h0.numel() * 4)
        # the native step also takes the recurrent product's rounding and the next step's
        # rounding of h, where they are unscaled scalar formats (the same values and
        # random bits as the separate passes): h's rounded values go to a buffer the
        # next step's GEMM reads
        input_dtype = _kernel_dtype(path)
        left = recipe.forward.left
        fuse_h = (native_cells and h_scale is None and input_dtype in (torch.float32, torch.bfloat16)
                  and not left.is_fp32 and not isinstance(left.fmt, BlockFormat) and left.fmt.torch_dtype != compute)
        fused_h = h0.new_empty(h0.shape, dtype=input_dtype) if fuse_h else None
        prepared: Quantized | None = None
        # an NVFP4 h: one native call a step (native_cells: the steps' native kernels)
        h_blocks = (_StepBlocks.make(call, left, f"{call.site}.a", tuple(h0.shape), input_dtype, h0.device)
                    if native_cells and h0.dim() == 2 else None)
        keys = _step_keys(call, steps)
        with _no_autocast(), torch_threads(_loop_threads(h0, w_hh)):
            for step in range(steps):
                step_call = _step_call(call, step, keys)
                # h rounded by the previous step's native pass, or by one native call, or here
                if prepared is None and h_blocks is not None:
                    prepared = h_blocks.round(h, step_call.forward_key)
                qh = prepared if prepared is not None else quantize_operand(
                    h, left, state, f"{call.site}.a", axis=-1, scale=h_scale,
                    forward_key=step_call.forward_key, values_dtype=input_dtype, keep_storage=False)
                prepared = None
                y = forward_product(step_call, path, qh, qw, b_hh, True, right)
                gates = acts[step]
                y_rounding = (_step_rounding(call, recipe.forward.result, f"{call.site}.output", step_call.forward_key,
                                             y.device)
                              if native_cells and y.dtype == torch.float32 and y.is_contiguous() else None)
                # the rounded result in its holding dtype, widened by the FP32 additions
                recurrent = y if y_rounding is not None else _finish(step_call, y, recipe.forward.result, "output")
                if native_cells and recurrent.is_contiguous():
                    native.lstm_preactivations(projected[step], recurrent, gates, cell_threads, y_rounding)
                    gates.sigmoid_()
                    native.lstm_cell(gates, cells[step], cells[step + 1], doubled, cell_threads)  # type: ignore[index]
                    doubled.sigmoid_()  # type: ignore[union-attr]
                    h = outputs[step]
                    next_rounding = (_step_rounding(call, recipe.forward.left, f"{call.site}.a",
                                                    None if keys is None else keys[step + 1], h.device)
                                     if fused_h is not None and step + 1 < steps else None)
                    native.lstm_hidden(gates, doubled, h, cell_threads, next_rounding,
                                       fused_h if next_rounding is not None else None)
                    if next_rounding is not None:
                        prepared = Quantized(fused_h, None, recipe.forward.left, fused_h)  # type: ignore[arg-type]
                elif lstm:
                    torch.add(projected[step], recurrent, out=gates)
                    i, f, g, o = gates.split(hidden, -1)
                    g.mul_(2)
                    gates.sigmoid_()
                    g.mul_(2).sub_(1)  # tanh(x) = 2 sigmoid(2x) - 1
                    c = torch.mul(f, cells[step], out=cells[step + 1])  # type: ignore[index]
                    c.addcmul_(i, g)
                    # h = o tanh(c), rounded once to the compute dtype by the output's cast
                    h = torch.mul(o, _tanh(c), out=outputs[step])
                else:
                    states_h = h
                    xr, xz, xn = projected[step].split(hidden, -1)
                    hr, hz, hn = recurrent.split(hidden, -1)
                    r, z, n, kept_hn = gates.split(hidden, -1)
                    torch.sigmoid(xr + hr, out=r)
                    torch.sigmoid(xz + hz, out=z)
                    kept_hn.copy_(hn)
                    torch.addcmul(xn, r, kept_hn, out=n)
                    n.copy_(_tanh(n))
                    h = outputs[step]
                    h.copy_(torch.lerp(n, states_h.float(), z))  # (1 - z) n + z h
        with _no_autocast():
            # the weight gradient's operands: every step's previous hidden state, as one
            # (T x B, H) operand of one GEMM, contracted over its rows
            previous = torch.cat([h0.to(compute).unsqueeze(0), outputs[:-1]]).reshape(-1, hidden)
            _record(call, h_history, previous)  # every step's GEMM input
            saved_h = (quantize_operand(previous, recipe.wgrad.right, state, f"{call.site}.a.backward", axis=-2,
                                        forward_key=call.forward_key).drop_values()
                       if ctx.needs_input_grad[3] else None)
            saved_w = _backward_copy(call, w_hh, True, qw, "b", -1, -2) if any(ctx.needs_input_grad[:5]) else None
        ctx.call, ctx.kind, ctx.path = call, kind, path
        ctx.dtypes = (h0.dtype, None if c0 is None else c0.dtype, w_hh.dtype, None if b_hh is None else b_hh.dtype)
        # a GRU's backward needs the previous hidden states themselves
        _save(ctx, saved_h, saved_w,
              extra=(acts, cells if lstm else torch.cat([h0.to(compute).unsqueeze(0), outputs])))
        last_c = None if cells is None else cells[-1].clone()
        return outputs, outputs[-1].clone(), last_c

    @staticmethod
    def backward(ctx: Any, grad_outputs, grad_h, grad_c):  # type: ignore[override]
        call: _Call = ctx.call
        recipe = call.recipe
        saved_h, saved_w = _load(ctx)
        acts, states = _load_extra(ctx)
        lstm = ctx.kind == "lstm"
        steps, hidden = acts.shape[0], acts.shape[-1] // 4
        gates = _GATES[ctx.kind] * hidden
        need_proj, need_h0, need_c0, need_w, need_b = ctx.needs_input_grad[:5]
        # the input projection's error, which is also the recurrent product's for an
        # LSTM; a GRU's recurrent error differs in its n part
        grad_projected = acts.new_empty(*acts.shape[:-1], gates)
        grad_recurrent = grad_projected if lstm else acts.new_empty(*acts.shape[:-1], gates)
        dgrad_path = _path(call, _grad_result_operand(call, False), recipe.dgrad.left, saved_w)
        w_values = _values(dgrad_path, saved_w)  # (gates, H): the error times it gives dh
        packed = kernels.pack_right(w_values, dgrad_path, call.policy, acts[0].numel() // acts.shape[-1])
        w_right = w_values if packed is None else packed  # packed once for all steps where their GEMMs take it so
        # each step's error is used at once, by its dgrad GEMM: its values alone, in that
        # GEMM's kernel dtype (FP8 bytes only where FP8 tensor cores take them)
        error_dtype = _kernel_dtype(dgrad_path)
        error_storage = None if kernels.fp8_tensor_cores(acts.device) else False
        error_key = f"{call.site}.grad_output"
        error_scale, error_history = _sequence_scale(call, recipe.dgrad.left, error_key, acts.device)
        dh = grad_h.float().clone()
        # the native pass takes the activations' slopes on the way (the torch chain's
        # arithmetic), the torch ops from tensors of the whole sequence
        native_cells = lstm and dh.dim() == 2 and native_steps(acts)
        cell_threads = serial_threads(acts[0].numel())
        with _no_autocast():
            if lstm:
                i, f, g, o = acts.split(hidden, -1)
                cell_tanh = _tanh(states[1:])
                dc = grad_c.float().clone() if grad_c is not None else acts.new_zeros(acts.shape[1:-1] + (hidden,))
            if native_cells:
                grad_outputs, dc = grad_outputs.contiguous(), dc.contiguous()
            elif lstm:
                # d(activation)/d(pre-activation): sigmoid's y(1-y), tanh's 1-y^2
                slopes = acts * (1 - acts)
                slopes[..., 2 * hidden:3 * hidden] = 1 - g * g
                out_slope = o * (1 - cell_tanh * cell_tanh)  # dc/dh through h = o tanh(c)
        keys = _step_keys(call, steps)
        # the native step also rounds the errors for the dgrad GEMM where their format is an
        # unscaled scalar one (the same values and random bits as the separate pass)
        fuse_error = (native_cells and error_scale is None and error_storage is False
                      and error_dtype in (torch.float32, torch.bfloat16))
        fused_error = acts.new_empty(acts.shape[1:-1] + (gates,), dtype=error_dtype) if fuse_error else None
        # an NVFP4 error: one native call a step
        error_blocks = (_StepBlocks.make(call, recipe.dgrad.left, error_key, tuple(acts.shape[1:-1]) + (gates,),
                                         error_dtype, acts.device)
                        if native_cells and error_scale is None and error_storage is False else None)
        dh_rounding: native.StepRounding | None = None  # the later step's dgrad result, rounded by this step's pass
        with _no_autocast(), torch_threads(_loop_threads(dh, w_values)):
            for step in reversed(range(steps)):
                step_call = _step_call(call, step, keys)
                error_rounding = (_step_rounding(call, recipe.dgrad.left, error_key, step_call.forward_key, acts.device)
                                  if fused_error is not None and (step > 0 or need_h0) else None)
                if native_cells:
                    dh = dh.contiguous()
                    native.lstm_backward_step(dh, grad_outputs[step], dc, cell_tanh[step], acts[step], states[step],
                                              grad_projected[step], cell_threads, error_rounding,
                                              fused_error if error_rounding is not None else None, dh_rounding)
                    dh_rounding = None
                elif lstm:
                    dh += grad_outputs[step].float()
                    d_act = grad_projected[step]
                    di, df, dg, do = d_act.split(hidden, -1)
                    dc.addcmul_(dh, out_slope[step])
                    torch.mul(dh, cell_tanh[step], out=do)
                    torch.mul(dc, g[step], out=di)
                    torch.mul(dc, states[step], out=df)
                    torch.mul(dc, i[step], out=dg)
                    dc.mul_(f[step])
                    d_act.mul_(slopes[step])
                else:
                    dh += grad_outputs[step].float()
                    r, z, n, hn = acts[step].split(hidden, -1)
                    dr, dz, dn = grad_projected[step].split(hidden, -1)
                    previous = states[step].float()
                    torch.mul(dh, 1 - z, out=dn)
                    dn.mul_(1 - n * n)
                    torch.mul(dh, previous - n, out=dz)
                    dz.mul_(z * (1 - z))
                    torch.mul(dn, hn, out=dr)
                    dr.mul_(r * (1 - r))
                    grad_recurrent[step, ..., :2 * hidden] = grad_projected[step, ..., :2 * hidden]
                    torch.mul(dn, r, out=grad_recurrent[step, ..., 2 * hidden:])
                    dh = dh * z
                if step == 0 and not need_h0:
                    break
                error = None
                if error_rounding is not None:  # rounded by the native pass
                    error = Quantized(fused_error, None, recipe.dgrad.left, fused_error)  # type: ignore[arg-type]
                elif error_blocks is not None:
                    error = error_blocks.round(grad_recurrent[step], step_call.forward_key)
                if error is None:
                    error = quantize_operand(grad_recurrent[step], recipe.dgrad.left, call.state, error_key,
                                             scale=error_scale, forward_key=step_call.forward_key,
                                             values_dtype=error_dtype, keep_storage=error_storage)
                product = _scale_sum(kernels.matmul(_values(dgrad_path, error), w_right, dgrad_path, call.policy),
                                     error, saved_w)
                if native_cells and step > 0 and product.dtype == torch.float32 and product.is_contiguous():
                    # rounded by the next (earlier) step's native pass, which adds to it first
                    dh_rounding = _step_rounding(call, recipe.dgrad.result, f"{call.site}.grad_input",
                                                 step_call.forward_key, product.device)
                if dh_rounding is not None:
                    dh = product
                else:
                    previous_grad = _grad_result(step_call, product, False, torch.float32)
                    dh = previous_grad if lstm else dh + previous_grad
        with _no_autocast():
            grad_w = grad_b = None
            # the errors' amax, once; wgrad's rounding of the same errors in the same
            # format takes the same scale rather than recording them a second time
            _record(call, error_history, grad_recurrent)
            shared = error_scale if recipe.wgrad.left == recipe.dgrad.left else None
            if need_w or need_b:
                grad_w, grad_b = _weight_gradients(call, grad_recurrent.reshape(-1, gates), saved_h, need_w,
                                                   need_b, ctx.dtypes[2:], shared)
        grad_h0 = dh.to(ctx.dtypes[0]) if need_h0 else None
        grad_c0 = dc.to(ctx.dtypes[1]) if lstm and need_c0 else None
        return (grad_projected if need_proj else None), grad_h0, grad_c0, grad_w, grad_b, None, None, None


def _weight_gradients(call: _Call, errors: torch.Tensor, saved_h: Quantized | None, need_w: bool, need_b: bool,
                      dtypes: tuple[torch.dtype | None, ...], scale: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The recurrent weight's and bias's gradients from all steps' errors (T x B rows):
    one GEMM ``errors^T @ H`` and one FP32 sum, each rounded once; ``scale``: the
    errors' delayed-scaling scale, already recorded."""
    recipe = call.recipe
    blocks = recipe.wgrad.has_blocks
    (rounded,) = _grad_operands(call, errors, (True,), (-2,), scale=scale)
    grad_w = grad_b = None
    if need_w:
        assert saved_h is not None
        path = _path(call, recipe.wgrad.result, rounded, saved_h)
        product = (kernels.scaled_mm(rounded, saved_h, call.policy, transpose_left=True)
                   if path == "fp32" and not blocks else None)  # FP8 tensor cores (CUDA)
        if product is None:
            g, left = _values(path, rounded), _values(path, saved_h)
            rows = max(left.shape[-2], g.shape[-2])  # Hadamard-padded rows: pad the other with zeros
            left, g = _pad_dim(left, -2, rows), _pad_dim(g, -2, rows)
            product = _scale_sum(kernels.matmul(g.t(), left, path, call.policy), rounded, saved_h)
        grad_w = _grad_result(call, product.contiguous(), True, dtypes[0])  # type: ignore[arg-type]
    if need_b:
        # block recipes: summed from the high-precision error, as Transformer Engine's dbias
        g = errors if blocks else rounded.values()
        grad_b = _grad_result(call, g.sum(0, dtype=torch.float32), True, dtypes[1])  # type: ignore[arg-type]
    return grad_w, grad_b


def _layer_weights(weights: list[torch.Tensor], layer: int, has_bias: bool) -> tuple[Any, ...]:
    per_layer = 4 if has_bias else 2
    chunk = weights[layer * per_layer:(layer + 1) * per_layer]
    return tuple(chunk) if has_bias else (chunk[0], chunk[1], None, None)


def _recurrent_layer(state: EngineState, kind: str, layer: int, projected: torch.Tensor, h0: torch.Tensor,
                     c0: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                     compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    module = state.module_stack[-1] if state.module_stack else ""
    call = _Call(state, f"{module}:{kind}{layer}.hh")
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (projected, h0, c0, w_hh, b_hh))
    if state.log is not None:
        steps, batch = projected.shape[0], h0.numel() // h0.shape[-1]
        per_step = 2.0 * batch * w_hh.shape[0] * w_hh.shape[1]
        _log(state, call.site, f"{kind}.hh", per_step * steps, (h0, w_hh), grads, grads and w_hh.requires_grad,
             recipe=call.recipe)
        # the GEMMs backward runs: dgrad at every step but the first unless h0 needs a
        # gradient, and the weight's over all steps
        dgrad_steps = (steps - (not h0.requires_grad)) if grads else 0
        state.log[-1].flops = per_step * (steps + dgrad_steps + steps * (grads and w_hh.requires_grad))
    _reserve_histories(call, projected.device, {"a": False, "b": True}, ("b",) * grads,
                       (False, True) if grads else (),
                       {f"{call.site}.a.backward": (call.recipe.wgrad.right,)} if grads else None)
    return _Recurrence.apply(projected, h0, c0, w_hh, b_hh, call, kind, compute)


def _recurrence(state: EngineState, kind: str, x: torch.Tensor, hx: tuple[torch.Tensor, ...],
                weights: list[torch.Tensor], has_bias: bool, num_layers: int, dropout: float, training: bool,
                bidirectional: bool, batch_first: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    if bidirectional:
        raise NotImplementedError(
            f"mixprec emulates unidirectional nn.{kind.upper()} only; keep this module in high precision "
            "with KeepHighPrecision(module_types=(nn.LSTM, nn.GRU)) or names=[...]")
    if len(weights) != num_layers * (4 if has_bias else 2):
        raise NotImplementedError(f"mixprec does not emulate nn.{kind.upper()} with proj_size; keep it in "
                                  "high precision (KeepHighPrecision)")
    sequence = x.transpose(0, 1) if batch_first else x
    finals: list[list[torch.Tensor]] = [[] for _ in hx]
    compute = result_dtype(state.recipe.forward.result, state.recipe.compute)
    for layer in range(num_layers):
        w_ih, w_hh, b_ih, b_hh = _layer_weights(weights, layer, has_bias)
        projected = gemm(state, sequence, w_ih, b_ih, transpose_b=True, op=f"{kind}{layer}.ih").float()
        c0 = hx[1][layer] if kind == "lstm" else None
        sequence, h, c = _recurrent_layer(state, kind, layer, projected, hx[0][layer], c0, w_hh, b_hh, compute)
        if dropout and training and layer < num_layers - 1:
            sequence = F.dropout(sequence, dropout)
        finals[0].append(h)
        if c is not None:
            finals[1].append(c)
    output = sequence.transpose(0, 1) if batch_first else sequence
    return output, tuple(torch.stack(f).to(hx[0].dtype) for f in finals if f)


def lstm(state: EngineState, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor], weights: list[torch.Tensor],
         has_bias: bool, num_layers: int, dropout: float, training: bool, bidirectional: bool,
         batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.lstm`` (what nn.LSTM runs) under the state's recipe, as the module
    docstring describes."""
    output, (h, c) = _recurrence(state, "lstm", x, hx, weights, has_bias, num_layers, dropout, training,
                                 bidirectional, batch_first)
    return output, h, c


def gru(state: EngineState, x: torch.Tensor, hx: torch.Tensor, weights: list[torch.Tensor], has_bias: bool,
        num_layers: int, dropout: float, training: bool, bidirectional: bool,
        batch_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.gru`` (what nn.GRU runs), emulated as :func:`lstm` is."""
    output, (h,) = _recurrence(state, "gru", x, (hx,), weights, has_bias, num_layers, dropout, training,
                               bidirectional, batch_first)
    return output, h
