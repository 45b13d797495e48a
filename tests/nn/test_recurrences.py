"""nn.LSTM and nn.GRU under a recipe (mixprec.nn.recurrences) against an independent
float64 reference of the same GEMM structure: every rounding done by torch's own casts,
every sum in float64. The recurrent product is rounded per step (its input, its weight,
its result; in backward the error and the hidden state's gradient); the recurrent
weight's gradient is one GEMM over all steps, rounded once. Results must lie on their
format's grid and equal the reference up to FP32 summation order: a dropped or an extra
rounding fails."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import mixprec
from mixprec.nn import recurrences
from mixprec.nn.convert import engine_state
from mixprec.nn.ops import _Call
from mixprec.nn.state import _mix_key
from mixprec.recipe import FP32

# per recipe: (forward result / operands, dgrad error and result, wgrad result, compute) as torch dtypes
FORMATS = {
    "bf16": {"operand": torch.bfloat16, "error": torch.bfloat16, "result": torch.bfloat16,
             "compute": torch.bfloat16, "step": 2**-7},
    "fp8-rne": {"operand": torch.float8_e5m2, "error": torch.float8_e5m2, "result": torch.float8_e5m2,
                "compute": torch.float16, "step": 2**-2},
}


def _q(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to nearest even in ``dtype`` by torch's cast, back in float64."""
    return x.to(torch.float32).to(dtype).to(torch.float64)


class _RoundForward(torch.autograd.Function):
    """Rounds in forward, passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x, dtype):  # type: ignore[no-untyped-def, override]
        return _q(x, dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return g, None


class _HeldIn(torch.autograd.Function):
    """A tensor held in ``dtype``: its gradient arrives rounded to it (autograd gives a
    tensor's gradient its dtype), the forward value is already on its grid."""

    @staticmethod
    def forward(ctx, x, dtype):  # type: ignore[no-untyped-def, override]
        ctx.dtype = dtype
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return _q(g, ctx.dtype), None


class _Recurrent(torch.autograd.Function):
    """One step's ``h @ W^T + b`` as the recipe defines it: h and W rounded, the float64
    sum rounded to the result format; backward: the error rounded, ``dh`` rounded to
    dgrad's result format; ``dW`` and ``db`` from the rounded error and hidden state,
    unrounded (summed over the steps by autograd in float64, rounded once at the end)."""

    @staticmethod
    def forward(ctx, h, w, b, f):  # type: ignore[no-untyped-def, override]
        hq, wq = _q(h, f["operand"]), _q(w, f["operand"])
        ctx.save_for_backward(hq, wq)
        ctx.f = f
        return _q(hq @ wq.t() + b, f["result"])

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        hq, wq = ctx.saved_tensors
        gq = _q(g, ctx.f["error"])
        return _q(gq @ wq, ctx.f["result"]), gq.t() @ hq, gq.sum(0), None


def _reference(kind: str, x: torch.Tensor, params: dict[str, torch.Tensor], layers: int, hidden: int,
               f: dict) -> torch.Tensor:
    """The emulated recurrence in float64 (batch first; zero initial states)."""
    sequence = x.double()  # float32 inputs: exact in float64, rounded by the first GEMM
    for layer in range(layers):
        w_ih, w_hh = params[f"weight_ih_l{layer}"], params[f"weight_hh_l{layer}"]
        b_ih, b_hh = params[f"bias_ih_l{layer}"], params[f"bias_hh_l{layer}"]
        # the input projection: one GEMM over all steps, held in the compute dtype
        rows = sequence.reshape(-1, sequence.shape[-1])
        projected = _HeldIn.apply(_Recurrent.apply(rows, w_ih, b_ih, f), f["compute"]).reshape(
            x.shape[0], x.shape[1], -1)
        h = torch.zeros(x.shape[0], hidden, dtype=torch.float64)
        c = torch.zeros_like(h)
        outputs = []
        for step in range(x.shape[1]):
            recurrent = _Recurrent.apply(h, w_hh, b_hh, f)
            if kind == "lstm":
                i, fg, g, o = (projected[:, step] + recurrent).chunk(4, -1)
                c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = projected[:, step].chunk(3, -1)
                hr, hz, hn = recurrent.chunk(3, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
            h = _RoundForward.apply(h, f["compute"])  # held in the compute dtype
            outputs.append(_HeldIn.apply(h, f["compute"]))  # its gradient from outside the layer too
        sequence = torch.stack(outputs, 1)
    return sequence


def _on_grid(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.float().to(dtype).float(), t.float())


def _close(ours: torch.Tensor, reference: torch.Tensor, step: float, name: str) -> None:
    """Equal to the reference up to a format step where FP32 summation order moved a
    value across a rounding boundary (rare), and mostly bit for bit."""
    ours, reference = ours.double(), reference.double()
    scale = reference.abs().clamp_min(reference.abs().max() * 2**-10)
    differ = (ours - reference).abs() / scale
    assert float(differ.max()) <= 2 * step, (name, float(differ.max()))
    assert float((ours == reference).double().mean()) > 0.8, name


@pytest.mark.parametrize("recipe", ["bf16", "fp8-rne"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrence_matches_float64_reference_of_its_gemms(kind: str, recipe: str) -> None:
    torch.manual_seed(0)
    hidden, layers = 12, 2
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(8, hidden, num_layers=layers, batch_first=True)
    converted = mixprec.convert(copy.deepcopy(rnn), mixprec.get_recipe(recipe).replace(
        keep=mixprec.KeepHighPrecision()))
    f = FORMATS[recipe]
    x = torch.randn(5, 9, 8)
    out, _ = converted(x)
    # the reference starts from the converted model's own parameters (FP16 masters under fp8)
    params = {name: p.detach().double().requires_grad_() for name, p in converted.named_parameters()}
    expected = _reference(kind, x, params, layers, hidden, f)
    assert out.dtype == f["compute"] and _on_grid(out, f["compute"])
    _close(out, expected, f["step"], "output")
    weights = torch.randn(out.shape)
    (out.float() * weights).sum().backward()
    (expected * weights.double()).sum().backward()  # out's gradient is rounded to its dtype, as ours
    for name, p in converted.named_parameters():
        assert p.grad is not None and _on_grid(p.grad, f["result"]), name
        _close(p.grad, _q(params[name].grad, f["result"]), f["step"], name)


def test_recurrent_weight_gradient_is_one_rounding_of_all_steps() -> None:
    """The recurrent weight's gradient is rounded once after summing every step (one
    GEMM over T x B rows), not rounded per step and summed: with many steps the two
    differ, and the emulation is the first."""
    torch.manual_seed(1)
    rnn = nn.LSTM(4, 8, batch_first=True)
    converted = mixprec.convert(copy.deepcopy(rnn), mixprec.get_recipe("fp8-rne").replace(
        keep=mixprec.KeepHighPrecision()))
    x = torch.randn(3, 40, 4)
    out, _ = converted(x)
    out.float().sum().backward()
    params = {name: p.detach().double().requires_grad_() for name, p in converted.named_parameters()}
    _reference("lstm", x, params, 1, 8, FORMATS["fp8-rne"]).sum().backward()
    once = _q(params["weight_hh_l0"].grad, torch.float8_e5m2)
    ours = converted.weight_hh_l0.grad.double()
    assert float((ours == once).double().mean()) > 0.9


def test_stochastic_rounding_takes_a_key_per_time_step() -> None:
    """Under stochastic rounding (recipe fp8) each time step's roundings draw bits of
    their own key, the same in forward and backward; without a stochastic recipe the
    call is the layer's own."""
    model = mixprec.convert(nn.Sequential(nn.LSTM(4, 8)), "fp8")
    state = engine_state(model)
    state.begin_forward(training=True)
    call = _Call(state, "lstm0.hh")
    batch = recurrences._step_keys(call, 3)
    keys = [recurrences._step_call(call, step, batch).forward_key for step in range(3)]
    assert all(k is not None for k in keys)
    assert len({tuple(k.tolist()) for k in keys}) == 3
    # the batch of keys is the forward's key mixed with step + 1, as _mix_key mixes one
    assert call.forward_key is not None
    for step, key in enumerate(keys):
        assert torch.equal(key, _mix_key(call.forward_key, step + 1))
    plain = mixprec.convert(nn.Sequential(nn.LSTM(4, 8)), "bf16")
    plain_call = _Call(engine_state(plain), "lstm0.hh")
    assert recurrences._step_keys(plain_call, 2) is None
    assert recurrences._step_call(plain_call, 2, None) is plain_call


def test_delayed_scaling_takes_one_scale_and_one_amax_per_sequence() -> None:
    """Under delayed scaling (fp8-hybrid) the hidden states of every step share one
    scale from earlier iterations, and the iteration records one amax, the sequence's
    largest: the history counts iterations, not time steps. The errors likewise, once
    for dgrad and wgrad together."""
    torch.manual_seed(0)
    model = mixprec.convert(nn.Sequential(nn.LSTM(6, 16)), "fp8-hybrid")
    state = engine_state(model)
    x = torch.randn(20, 3, 6)
    for iteration in (1, 2):
        out, _ = model(x)
        out.float().square().sum().backward()
        inputs = state.histories["0:lstm0.hh.a"]
        errors = state.histories["0:lstm0.hh.grad_output"]
        assert int(inputs.count) == int(errors.count) == iteration
    # the recorded amax is that of the GEMM inputs of the last iteration: the initial
    # state (zeros) and every hidden state but the last
    expected = out[:-1].float().abs().max()
    assert float(inputs.amax[1]) == float(expected)
    assert float(inputs.amax[0]) > 0 and float(errors.amax[1]) > 0


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_coverage_counts_the_gemms_backward_runs(kind: type[nn.Module]) -> None:
    """The recurrence's logged FLOPs are those torch's FLOP counter sees it run (no dgrad
    at the first step when the initial state needs no gradient): the share is 1 under
    a recipe that emulates every GEMM."""
    torch.manual_seed(0)
    model = mixprec.convert(nn.Sequential(kind(6, 16, num_layers=2)), "bf16")
    report = mixprec.coverage(model, (torch.randn(7, 3, 6),))
    assert report.share == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("recipe", ["fp32-compute", "bf16", "fp16", "fp8", "fp8-stochastic-inputs", "fp8-hybrid",
                                    "nvfp4"])
def test_native_cell_steps_equal_the_torch_ops_bit_for_bit(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LSTM's point-wise steps in the native kernels, with the roundings they fuse
    (the recurrent product's result, the next step's h, the dgrad's error: unscaled
    scalar formats, to nearest and stochastically), give the torch chain's and separate
    rounding passes' results bit for bit: outputs, final states and every gradient, with
    hidden states held in float32, BF16 and FP16, adversarial magnitudes (saturated
    gates, large cell states) and initial states with gradients of their own. Delayed
    scaling (fp8-hybrid) and block formats (nvfp4) keep their rounding passes."""
    if not recurrences.native.available():
        pytest.skip("no C++ compiler here: the native kernels are not built")
    torch.manual_seed(3)
    rnn = nn.LSTM(16, 32, num_layers=2, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(8)  # gates pushed into saturation, cell states past 1
    named = {"fp32-compute": "fp8-hybrid", "fp8-stochastic-inputs": "fp8"}.get(recipe, recipe)
    chosen = mixprec.get_recipe(named).replace(keep=mixprec.KeepHighPrecision())
    if recipe == "fp32-compute":  # results and hidden states held in float32
        chosen = chosen.replace(forward=dataclasses.replace(chosen.forward, result=FP32), compute_dtype="fp32")
    if recipe == "fp8-stochastic-inputs":  # the forward's inputs (h) and results rounded stochastically
        forward = chosen.forward
        chosen = chosen.replace(forward=dataclasses.replace(
            forward, left=dataclasses.replace(forward.left, rounding="stochastic"),
            result=dataclasses.replace(forward.result, rounding="stochastic")))
    x = torch.randn(6, 11, 16) * 3
    h0 = torch.randn(2, 6, 32, requires_grad=True)
    c0 = (torch.randn(2, 6, 32) * 4).requires_grad_()

    def run(native_on: bool) -> list[torch.Tensor]:
        if not native_on:
            monkeypatch.setattr(recurrences, "native_steps", lambda _: False)
        torch.manual_seed(5)  # the same stochastic-rounding keys in both runs
        converted = mixprec.convert(copy.deepcopy(rnn), chosen)
        h, c = h0.detach().clone().requires_grad_(), c0.detach().clone().requires_grad_()
        out, (hn, cn) = converted(x, (h, c))
        torch.manual_seed(4)
        (out.float() * torch.randn(out.shape)).sum().add((hn.float() * cn.float()).sum()).backward()
        monkeypatch.undo()
        return [out, hn, cn, h.grad, c.grad] + [p.grad for p in converted.parameters()]

    native_results, torch_results = run(True), run(False)
    assert native_results[0].dtype == {"fp32-compute": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                       "fp8": torch.float16, "fp8-stochastic-inputs": torch.float16,
                                       "fp8-hybrid": torch.bfloat16, "nvfp4": torch.bfloat16}[recipe]
    for ours, theirs in zip(native_results, torch_results):
        assert ours is not None and theirs is not None
        assert torch.equal(ours, theirs), float((ours.float() - theirs.float()).abs().max())
