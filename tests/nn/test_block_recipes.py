"""The block-format recipes (mxfp8, nvfp4, fp8-blockwise, mxfp4) on the engine's GEMMs:
each operand is quantized along the contraction dimension of its own GEMM, so the
emulated forward, dgrad and wgrad must equal float64 accumulation of operands quantized
independently with ``mixprec.quantize(..., axis=...)`` (zero-padded to whole blocks,
Hadamard-rotated where the recipe says), rounded once to BF16. Stochastic rounding is
reproduced exactly with the engine's key for the call site (its forward's key mixed
with the site's name)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.core.formats import BlockFormat, blocks
from mixprec.core.hadamard import hadamard_transform
from mixprec.core.kernels import kernel_backend
from mixprec.nn.convert import engine_state
from mixprec.recipe import Gemm, KeepHighPrecision, Operand, TensorScaling
from mixprec.stats.memory import SavedBytesCounter
from tests.nn.test_ops import on_grid

BLOCK_RECIPES = ["mxfp8", "nvfp4", "fp8-blockwise", "mxfp4"]


@pytest.fixture(autouse=True)
def eager_kernels():
    """The reference quantizations run the eager kernels (same bits, no compile time)."""
    with kernel_backend("eager"):
        yield


def reference(x: torch.Tensor, operand: Operand, axis: int, random_key: torch.Tensor | None) -> torch.Tensor:
    """``x`` quantized for ``operand`` along ``axis`` by the core alone: zero-padded to
    whole blocks, rotated if the operand says, quantized, the padding cropped (except a
    rotated axis's), as float64."""
    fmt = operand.fmt
    assert isinstance(fmt, BlockFormat)
    x = x.detach().float()
    axis %= x.dim()
    extents = {axis: fmt.block_shape[0]} if len(fmt.block_shape) == 1 else {
        x.dim() - 1: fmt.block_shape[1], x.dim() - 2: fmt.block_shape[0]}
    if operand.hadamard:
        extents[axis] = math.lcm(extents[axis], operand.hadamard)
    shape = list(x.shape)
    for dim, extent in extents.items():
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], -x.shape[dim] % extent, *x.shape[dim + 1:])], dim)
    if operand.hadamard:
        x = hadamard_transform(x, operand.hadamard, axis=axis)
        shape[axis] = x.shape[axis]
    q = mixprec.quantize(x, fmt, operand.rounding, axis=axis, random_key=random_key)
    return q[tuple(slice(0, n) for n in shape)].double()


def close_to(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """y equals ``left @ right (+ bias)`` in float64 rounded once to BF16, up to one BF16
    step plus what FP32's summation order may move (2^-20 of the sum of |products|:
    these operands span decades, so sums cancel); almost all bitwise equal."""
    reference = left @ right + (0 if bias is None else bias.double())
    expected = reference.bfloat16().double()
    slack = (left.abs() @ right.abs()) * 2.0**-20
    step = (expected.abs() * 2.0**-7).clamp_min(1e-30)
    differ = (y.double() - expected).abs()
    assert bool((differ <= step * 1.0001 + slack).all()), float((differ / (step + slack)).max())
    assert float((differ == 0).double().mean()) > 0.9


def equal_share(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """The share of y that equals ``left @ right`` rounded once to BF16, bit for bit."""
    return float((y.double() == (left @ right).bfloat16().double()).double().mean())


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])]) if x.shape[0] < rows else x


class Layer(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("name", BLOCK_RECIPES)
def test_linear_gemms_quantize_each_operand_along_its_contraction(name: str) -> None:
    recipe = mixprec.get_recipe(name).replace(keep=KeepHighPrecision())
    # 48 and 24 rows are not multiples of 32 (mxfp8, mxfp4) or 128: the op pads them
    n_in, n_out = (256, 256) if name == "fp8-blockwise" else (64, 48)
    layer = Layer(n_in, n_out)
    with torch.no_grad():  # magnitudes that vary along both axes: blocks along rows and columns differ
        layer.fc.weight.mul_(torch.logspace(-6, 0, n_out)[:, None] * torch.logspace(0, -6, n_in))
    generator = torch.Generator().manual_seed(7)
    mixprec.convert(layer, recipe, generator=generator)
    x = (torch.randn(3, 8, n_in) * torch.logspace(-2, 2, n_in)).requires_grad_()  # outliers: scales matter
    w = layer.fc.weight
    y = layer(x)
    assert y.dtype == torch.bfloat16 and on_grid(y, "bf16")
    close_to(y, reference(x, recipe.forward.left, -1, None),
             reference(w, recipe.forward.right, -1, None).T, layer.fc.bias)

    g = (torch.randn(3, 8, n_out) * torch.logspace(-2, 4, n_out) * 1e-4).bfloat16()  # the error arrives in BF16
    state = engine_state(layer)
    def replay(axis: int) -> torch.Tensor:  # the error's key at this site, for its copy along ``axis``
        return state.random_key(f"fc:linear#0.grad_output@{axis}", state.forward_key)
    y.backward(g)
    assert on_grid(x.grad, "bf16") and on_grid(w.grad, "bf16")
    g_dgrad = reference(g, recipe.dgrad.left, -1, replay(2))  # grad_x = g @ W: contraction over W's rows
    close_to(x.grad, g_dgrad, reference(w, recipe.dgrad.right, -2, None))
    rows = 24
    g_rows = reference(g.reshape(rows, n_out), recipe.wgrad.left, 0, replay(0))  # grad_W = g^T x over the rows
    x_rows = reference(x.reshape(rows, n_in), recipe.wgrad.right, 0, None)
    length = max(g_rows.shape[0], x_rows.shape[0])
    close_to(w.grad, pad_rows(g_rows, length).T, pad_rows(x_rows, length))
    close_to(layer.fc.bias.grad, g.double().reshape(rows, n_out).T, torch.ones(rows, dtype=torch.float64))

    if name == "mxfp8":  # the forward's 1x32 copy of the input (not re-quantized 32x1) gives another wgrad
        stale_x = reference(x.reshape(rows, n_in), recipe.forward.left, -1, None)
        assert equal_share(w.grad, g_rows.T, stale_x) < equal_share(w.grad, g_rows.T, x_rows) == 1.0


@pytest.mark.parametrize("kernels", ["fp32", "bf16"])
def test_nvfp4_tensor_scales_multiply_the_fp32_sum(kernels: str) -> None:
    """An NVFP4 GEMM multiplies element x block-scale values (BF16 values) and applies
    the two FP32 tensor scales to the FP32 sum, as NVFP4 hardware's epilogue does
    (``alpha``): on the FP32 kernel the forward is that computation bit for bit; on the
    BF16 units (forced here at a small size) it differs only by summation order."""
    recipe = mixprec.get_recipe("nvfp4").replace(keep=KeepHighPrecision())
    layer = Layer(64, 48)
    mixprec.convert(layer, recipe, generator=torch.Generator().manual_seed(5))
    x = torch.randn(40, 64) * torch.logspace(-2, 2, 64)
    with mixprec.gemm_kernels(kernels), torch.no_grad():  # type: ignore[arg-type]
        y = layer(x)
    a, s_a = mixprec.core.block_quantize.quantize_blocks_factored(x, blocks.nvfp4)
    w, s_w = mixprec.core.block_quantize.quantize_blocks_factored(layer.fc.weight.detach(), blocks.nvfp4_16x16)
    assert s_a is not None and s_w is not None and float(s_a) != 1.0 and float(s_w) != 1.0
    for values in (a, w):  # without the tensor scale, every value is a BF16 value
        assert torch.equal(values.bfloat16().float(), values)
    want = ((a @ w.T) * (s_a * s_w) + layer.fc.bias.detach()).bfloat16()
    if kernels == "fp32":
        assert torch.equal(y, want)
    else:
        close_to(y, a.double() * float(s_a), w.double().T * float(s_w), layer.fc.bias.detach())


def test_nvfp4_errors_are_rounded_stochastically() -> None:
    """The replayed draws matter: a nearest-rounded error gives another dgrad."""
    recipe = mixprec.get_recipe("nvfp4").replace(keep=KeepHighPrecision())
    layer = Layer(64, 48)
    mixprec.convert(layer, recipe, generator=torch.Generator().manual_seed(3))
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(16, 48)
    layer(x).backward(g)
    nearest = (reference(g, Operand("nvfp4"), -1, None), reference(layer.fc.weight, recipe.dgrad.right, -2, None))
    with pytest.raises(AssertionError):
        close_to(x.grad, *nearest)


def test_weight_copies_once_per_version_and_axis() -> None:
    """A 1x32 weight has a forward copy and a dgrad copy; a 16x16-tiled weight one."""
    for name, copies in (("mxfp8", 2), ("nvfp4", 1)):
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))
        recipe = mixprec.get_recipe(name).replace(keep=KeepHighPrecision())
        mixprec.convert(model, recipe)
        model(torch.randn(4, 32, requires_grad=True)).float().sum().backward()
        state = engine_state(model)
        assert len(state.weights) == 3 * copies
        before = {k: v[3] for k, v in state.weights.items()}
        model(torch.randn(4, 32, requires_grad=True)).float().sum().backward()  # no update: the same copies
        assert all(state.weights[k][3] is q for k, q in before.items())


class Tiny(nn.Module):
    """Embedding, two blocks of attention (heads of 16) and an MLP of width 24, a conv,
    and a head: every GEMM family the block recipes see or hand to their fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(32, 96), "up": nn.Linear(32, 24), "down": nn.Linear(24, 32)}) for _ in range(2))
        self.head = nn.Linear(32, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            q, k, v = block["qkv"](h).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
            h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            h = h + block["down"](F.gelu(block["up"](h)))
        return self.head(h)


@pytest.mark.parametrize("name", BLOCK_RECIPES)
def test_block_recipes_train_without_nan(name: str) -> None:
    model = Tiny()
    mixprec.convert(model, name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 20, (4, 12))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kept = engine_state(model).kept
    assert ("blocks.1" in kept) == (name == "nvfp4")  # NVFP4 keeps its last layers



def test_nvfp4_runs_its_kept_layers_in_bf16() -> None:
    """NVIDIA's NVFP4 recipe keeps its last layers in BF16: the kept output head's result
    and its weight gradient are what the same layer gives under ``bf16`` for the same
    input and error (bit for bit), not FP32's; a recipe that keeps modules under FP32
    (the default) still runs them in FP32."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    plain_head = copy.deepcopy(model[2])
    mixprec.convert(model, "nvfp4")
    assert "2" in engine_state(model).kept
    seen: dict[str, torch.Tensor] = {}
    model[2].register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out))
    out = model(torch.randn(32, 64))
    error = torch.randn(out.shape).to(out.dtype)
    out.backward(error)
    assert out.dtype == torch.bfloat16
    head = mixprec.convert(copy.deepcopy(plain_head), "bf16")
    reference = head(seen["x"])
    reference.backward(error)
    assert torch.equal(out, reference)
    assert torch.equal(model[2].weight.grad, head.weight.grad)
    assert not torch.equal(out.float(), F.linear(seen["x"].float(), plain_head.weight, plain_head.bias))
    fp32_kept = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    mixprec.convert(fp32_kept, mixprec.get_recipe("nvfp4").replace(
        keep=KeepHighPrecision(output_head=True)))
    assert fp32_kept(torch.randn(32, 64)).dtype == torch.float32


def test_kept_recipe_must_be_scalar() -> None:
    with pytest.raises(ValueError, match="block formats"):
        mixprec.convert(nn.Linear(32, 32), mixprec.get_recipe("mxfp8").replace(
            keep=KeepHighPrecision(output_head=True, recipe="mxfp4")))
    with pytest.raises(ValueError, match="unknown recipe"):
        mixprec.convert(nn.Linear(32, 32), mixprec.get_recipe("mxfp8").replace(
            keep=KeepHighPrecision(output_head=True, recipe="bf17")))

def test_mxfp8_saves_well_below_bf16() -> None:
    saved = {}
    for name in ("bf16", "mxfp8"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256))
        mixprec.convert(model, mixprec.get_recipe(name).replace(keep=KeepHighPrecision()))
        x = torch.randn(64, 256, requires_grad=True)
        with SavedBytesCounter(exclude_from=[model]) as counter:
            loss = model(x).float().sum()
        del loss
        saved[name] = counter.bytes
    # 1 byte per element plus one E8M0 scale per 32, against 2 bytes
    assert saved["mxfp8"] < 0.6 * saved["bf16"], saved


def test_block_operands_validate_and_describe() -> None:
    assert Operand("nvfp4", "stochastic").describe() == "nvfp4/SR"
    assert Operand("nvfp4", hadamard=16).describe() == "nvfp4/RHT16"
    assert Operand("mxfp8_e4m3").is_block and not Operand("mxfp8_e4m3").is_fp32
    with pytest.raises(ValueError, match="scales each block"):
        Operand("mxfp8_e4m3", scaling=TensorScaling("current"))
    with pytest.raises(ValueError, match="same Hadamard"):
        Gemm(Operand("nvfp4", hadamard=16), Operand("nvfp4"))
    with pytest.raises(ValueError, match="block format"):
        Operand("e4m3", hadamard=16)
    with pytest.raises(ValueError, match="unknown"):
        Operand("mxfp9")
    for name in BLOCK_RECIPES:
        assert mixprec.get_recipe(name).has_blocks


def test_block_recipe_refuses_conv_without_fallback() -> None:
    recipe = mixprec.get_recipe("mxfp8").replace(fallback=None, fallback_ops=(), keep=KeepHighPrecision())
    model = nn.Sequential(nn.Conv1d(32, 32, 1), nn.Conv1d(32, 4, 1))
    mixprec.convert(model, recipe)
    x = torch.randn(2, 32, 5)
    with pytest.raises(NotImplementedError, match="fallback"):
        model(x)


@pytest.mark.parametrize("name", ["mxfp8", "nvfp4", "fp8-hybrid", "fp8"])
def test_compiled_operand_kernels_train_bit_for_bit_as_eager(name: str) -> None:
    """The engine's compiled operand kernels (block values and codes in two passes; FP8
    values and storage in one, decoded into the GEMM's dtype) give eager's training run
    bit for bit: losses, and every parameter after three steps."""
    runs = {}
    for backend in ("eager", "compiled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))
        mixprec.convert(model, mixprec.get_recipe(name).replace(keep=KeepHighPrecision()))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
        target = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(2))
        losses = []
        with kernel_backend(backend):
            for _ in range(3):
                loss = F.cross_entropy(model(x).float(), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
        runs[backend] = (torch.stack(losses), [p.detach().clone() for p in model.parameters()])
    assert torch.equal(runs["compiled"][0], runs["eager"][0])
    assert all(torch.equal(c, e) for c, e in zip(runs["compiled"][1], runs["eager"][1]))
