"""The emulated GEMM family against independent references: torch's own casts for the
roundings and float64 for the products. Each result must lie on its format's grid and
equal float64 accumulation of the rounded operands, rounded once (up to FP32 summation
order); a dropped rounding of an operand or of the result fails these tests."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e5m2}


def cast(x: torch.Tensor, recipe: str) -> torch.Tensor:
    """Round to nearest even with torch's cast (the reference rounding)."""
    return x.to(DTYPES[recipe]).double()


def on_grid(y: torch.Tensor, recipe: str) -> bool:
    return torch.equal(y.float().to(DTYPES[recipe]).float(), y.float())


def close_to(y: torch.Tensor, reference: torch.Tensor, recipe: str) -> None:
    """y equals reference rounded once to the format, up to one step where FP32's
    summation order moved a value across a rounding boundary."""
    expected = cast(reference, recipe)
    step = (expected.abs() * {"fp16": 2**-10, "bf16": 2**-7, "fp8": 2**-2}[recipe]).clamp_min(1e-30)
    differ = (y.double() - expected).abs()
    assert bool((differ <= step * 1.0001).all()), float((differ / step).max())
    assert float((differ == 0).double().mean()) > 0.9  # almost all bitwise equal


class Linear1(nn.Module):
    def __init__(self, n_in: int = 48, n_out: int = 24) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("recipe", ["fp16", "bf16", "fp8"])
def test_linear_forward_and_backward_against_float64(recipe: str) -> None:
    torch.manual_seed(0)
    model = Linear1()
    plain = copy.deepcopy(model)
    mixprec.convert(model, mixprec.get_recipe(recipe).replace(keep=mixprec.KeepHighPrecision()))
    x = (torch.randn(4, 5, 48) * 3).requires_grad_()
    y = model(x)
    w, b = plain.fc.weight.detach(), plain.fc.bias.detach()
    if recipe == "fp8":  # paper 2: FP16 masters
        w, b = w.half().float(), b.half().float()
    reference = cast(x.detach(), recipe) @ cast(w, recipe).t() + b.double()
    assert on_grid(y, recipe)
    close_to(y, reference, recipe)
    unrounded = x.detach().double() @ w.double().t() + b.double()
    assert float((unrounded - reference).abs().max()) > 1e-3  # the input rounding matters here
    if recipe == "fp8":
        return  # errors and gradients are rounded stochastically: see the next test
    g = torch.randn_like(y.float()) * 1e-2
    y.backward(g.to(y.dtype))
    g64 = cast(g, recipe)
    assert on_grid(x.grad, recipe) and on_grid(model.fc.weight.grad, recipe)
    close_to(x.grad, g64 @ cast(w, recipe), recipe)
    close_to(model.fc.weight.grad, g64.reshape(-1, 24).t() @ cast(x.detach(), recipe).reshape(-1, 48), recipe)
    close_to(model.fc.bias.grad, g64.reshape(-1, 24).sum(0), recipe)


def test_fp8_errors_and_gradients_round_stochastically_to_a_neighbour() -> None:
    torch.manual_seed(0)
    model = mixprec.convert(Linear1(), mixprec.get_recipe("fp8").replace(keep=mixprec.KeepHighPrecision()))
    x = torch.randn(64, 48).requires_grad_()
    y = model(x)
    g = cast(torch.randn(64, 24) * 0.1, "fp8").float()  # already on the grid: its own rounding is exact
    y.backward(g.half())
    exact = g.double() @ cast(model.fc.weight.detach().float(), "fp8")
    grad = x.grad.double()
    assert on_grid(grad, "fp8")
    # on the grid and less than one E5M2 step from the exact value: one of its two neighbours
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-14))) - 2)
    assert bool(((grad - exact).abs() < spacing).all())
    nearest = cast(exact.float(), "fp8")
    assert float((grad != nearest).double().mean()) > 0.05  # not all rounded to nearest
    # unbiased: the mean error is far below the rounding's spacing
    assert abs(float(((grad - exact) / spacing).mean())) < 0.05


@pytest.mark.parametrize("recipe", ["fp16", "bf16"])
def test_conv2d_and_transposed_against_float64(recipe: str) -> None:
    torch.manual_seed(0)
    for layer in (nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.ConvTranspose2d(3, 5, 3, stride=2)):
        plain = copy.deepcopy(layer)
        model = mixprec.convert(nn.Sequential(layer), recipe)
        x = torch.randn(2, 3, 9, 9)
        y = model(x)
        w, b = plain.weight.detach(), plain.bias.detach()
        conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv_transpose2d
        kwargs = {"padding": 1, "stride": 2} if isinstance(layer, nn.Conv2d) else {"stride": 2}
        reference = conv(cast(x, recipe), cast(w, recipe), b.double(), **kwargs)
        assert on_grid(y, recipe)
        close_to(y, reference, recipe)


@pytest.mark.parametrize("recipe", ["fp16", "bf16"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa"])
def test_attention_forward_and_backward_against_float64_autograd(recipe: str, case: str) -> None:
    torch.manual_seed(0)
    heads_kv = 2 if case == "gqa" else 4
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k = torch.randn(2, heads_kv, 7 if case != "causal" else 6, 8, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    mask = None
    if case == "bool_mask":
        mask = torch.rand(6, k.shape[-2]) > 0.3
        mask[:, 0] = True
    elif case == "float_mask":
        mask = torch.randn(6, k.shape[-2])

    class Attention(nn.Module):
        def forward(self, q, k, v):  # type: ignore[no-untyped-def]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal",
                                                  enable_gqa=case == "gqa")

    model = mixprec.convert(Attention(), recipe)
    out = model(q, k, v)
    assert on_grid(out, recipe)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), is_causal=case == "causal", enable_gqa=case == "gqa")
    tolerance = {"fp16": 4e-3, "bf16": 3e-2}[recipe]
    assert float((out.double() - reference).abs().max()) < tolerance
    g = torch.randn_like(reference)
    out.backward(g.to(out.dtype))
    reference.backward(g)
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        # grouped heads' K and V gradients are sums over the group, accumulated in FP32
        assert on_grid(ours, recipe) or (case == "gqa" and ours is not q.grad)
        assert float((ours.double() - theirs).abs().max()) < tolerance * 4 * (1 + float(theirs.abs().max()))


def test_attention_dropout_is_applied_as_torch_applies_it() -> None:
    recipe = mixprec.Recipe("fp32-compute-bf16", compute_dtype="bf16")  # FP32 operands: the structure alone

    class Attention(nn.Module):
        def forward(self, q, k, v):  # type: ignore[no-untyped-def]
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    model = mixprec.convert(Attention(), recipe)
    torch.manual_seed(5)
    ours = model(q, k, v)
    torch.manual_seed(5)
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    reference = F.dropout(p, 0.5, training=True) @ v
    assert torch.allclose(ours, reference, atol=1e-6)
    torch.manual_seed(5)
    no_dropout = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    assert not torch.allclose(ours, no_dropout, atol=1e-3)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_recurrences_compute_what_torch_computes(kind: type[nn.Module]) -> None:
    torch.manual_seed(0)
    rnn = kind(6, 10, num_layers=2, batch_first=True)
    plain = copy.deepcopy(rnn)
    x = torch.randn(3, 7, 6)
    structure = mixprec.Recipe("fp32-structure", compute_dtype="bf16")  # no rounding: the math alone
    emulated = mixprec.convert(copy.deepcopy(rnn), structure)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, _ = emulated(x_ours)
    theirs, _ = plain(x_theirs)
    assert torch.allclose(ours.float(), theirs, atol=1e-5)
    weights = torch.randn(theirs.shape)
    (ours.float() * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert torch.allclose(x_ours.grad, x_theirs.grad, atol=1e-5)
    for (name, mine), theirs_p in zip(emulated.named_parameters(), plain.parameters()):
        assert torch.allclose(mine.grad, theirs_p.grad, atol=1e-5), name
    theirs = theirs.detach()
    model = mixprec.convert(nn.Sequential(rnn), "bf16")
    out, _ = model[0](x) if False else (model(x)[0], None)
    assert out.dtype == torch.bfloat16 and on_grid(out, "bf16")
    assert float((out.float() - theirs).abs().max()) < 0.05
    out.float().sum().backward()
    # each weight's gradient is one GEMM over all steps, rounded once (tests/nn/test_recurrences.py
    # checks the values against a float64 reference)
    assert all(p.grad is not None and on_grid(p.grad, "bf16") for p in rnn.parameters())


@pytest.mark.parametrize("train", [True, False])
def test_torch_transformer_layers_run_in_train_and_eval(train: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    for module in (layer, mha):
        plain = copy.deepcopy(module).train(train)
        model = mixprec.convert(copy.deepcopy(module), "bf16").train(train)
        context = torch.enable_grad() if train else torch.no_grad()
        with context:
            ours = model(x) if module is layer else model(x, x, x, need_weights=False)[0]
            theirs = plain(x) if module is layer else plain(x, x, x, need_weights=False)[0]
        assert float((ours.float() - theirs).abs().max()) < 0.1
        report = mixprec.coverage(model.train(), (x,) if module is layer else (x, x, x))
        assert report.share > 0.99


def test_bf16_recipe_matches_torch_autocast_bf16() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = model(x)
    ours = mixprec.convert(copy.deepcopy(model), "bf16")(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    # same op policy: differences are BF16 summation-order noise (a step or two of the last layer)
    scale = float(theirs.float().abs().max())
    assert float((ours.float() - theirs.float()).abs().max()) <= 2 ** -6 * scale
    assert float((ours == theirs).float().mean()) > 0.5


def test_fp16_recipe_matches_torch_autocast_fp16() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        theirs = model(x)
    ours = mixprec.convert(copy.deepcopy(model), "fp16")(x)
    assert ours.dtype == theirs.dtype == torch.float16
    assert float((ours.float() - theirs.float()).abs().max()) <= 2 ** -9 * float(theirs.float().abs().max())


def test_a_weight_used_twice_is_rounded_once_per_step() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):  # type: ignore[no-untyped-def]
            return F.linear(F.linear(x, self.w), self.w)

    model = mixprec.convert(Tied(), "fp16")
    from mixprec.nn.convert import engine_state

    def rounded() -> torch.Tensor:  # the cache is keyed by (parameter, operand, block axis)
        entries = [v for k, v in engine_state(model).weights.items() if k[0] == id(model.w)]
        assert len(entries) == 1
        return entries[0][3].storage

    model(torch.randn(2, 8))
    first = rounded()
    model(torch.randn(2, 8))
    assert rounded() is first  # same version: not rounded again
    assert first.dtype == torch.float16  # held in real 2-byte storage
    with torch.no_grad():
        model.w.add_(1)
    model(torch.randn(2, 8))
    assert rounded() is not first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
def test_batch_norm_on_16_bit_inputs_normalises_in_fp32(dtype, param_dtype):
    """A 16-bit input: statistics and normalisation in FP32, the output and the input's
    gradient in the input's dtype, within one rounding of the FP32 computation; the
    running statistics update in FP32. FP32 parameters take torch's mixed-dtype
    kernel, 16-bit ones (FP16 masters) the FP32 copies."""
    from mixprec.nn.ops import batch_norm

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 6, 5, 5, generator=generator) * 3 + 1).to(dtype)
    pd = dtype if param_dtype == "same" else param_dtype
    weight = (torch.rand(6, generator=generator) + 0.5).to(pd).requires_grad_()
    bias = torch.randn(6, generator=generator).to(pd).requires_grad_()
    mean, var = torch.zeros(6), torch.ones(6)
    xg = x.clone().requires_grad_()
    out = batch_norm(xg, mean, var, weight, bias, training=True)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    out.backward(grad)
    x64 = x.double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref_mean, ref_var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    ref = F.batch_norm(x64, ref_mean, ref_var, w64, b64, training=True)
    ref.backward(grad.double())
    ulp = torch.finfo(dtype).eps
    assert out.dtype == dtype and xg.grad.dtype == dtype and weight.grad.dtype == pd
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + 1e-6).all()  # one rounding of FP32's result
    assert torch.allclose(xg.grad.double(), x64.grad, rtol=2 * ulp, atol=1e-3)
    assert mean.dtype == torch.float32 and torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(var.double(), ref_var, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["fp16", "bf16"])
def test_conv2d_and_transposed_gradients_against_float64(recipe: str) -> None:
    """Input, weight and bias gradients of a (grouped, transposed) convolution: float64
    products of the rounded error and rounded operands, rounded once to the format."""
    torch.manual_seed(0)
    for layer in (nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2), nn.ConvTranspose2d(4, 6, 3, stride=2)):
        plain = copy.deepcopy(layer)
        model = mixprec.convert(nn.Sequential(layer), recipe)
        x = torch.randn(2, 4, 9, 9, requires_grad=True)
        y = model(x)
        grad = torch.randn(y.shape)
        y.backward(grad.to(y.dtype))
        conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv_transpose2d
        kwargs = ({"padding": 1, "stride": 2, "groups": 2} if isinstance(layer, nn.Conv2d) else {"stride": 2})
        grads, bounds = [], []
        for sign in (lambda t: t, torch.abs):  # the gradients, and the sums of |terms| they cancel from
            x64 = sign(cast(x.detach(), recipe)).requires_grad_()
            w64 = sign(cast(plain.weight.detach(), recipe)).requires_grad_()
            b64 = sign(plain.bias.detach().double()).requires_grad_()
            conv(x64, w64, b64, **kwargs).backward(sign(cast(grad, recipe)))
            (grads if not bounds and not grads else bounds).append((x64.grad, w64.grad, b64.grad))
        assert on_grid(x.grad, recipe) and on_grid(layer.weight.grad, recipe)
        for got, exact, terms in zip((x.grad, layer.weight.grad, layer.bias.grad), grads[0], bounds[0]):
            expected = cast(exact, recipe)
            step = expected.abs() * {"fp16": 2**-10, "bf16": 2**-7}[recipe]
            # one rounding, plus FP32 summation's error where terms cancel
            assert bool(((got.double() - expected).abs() <= step + 2**-20 * terms).all())
            assert float((got.double() == expected).double().mean()) > 0.9
