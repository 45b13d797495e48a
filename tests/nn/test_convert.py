"""mixprec.convert: any model, its own parameters as masters, what is kept in high
precision, state dicts, and misuse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, resnet_style_cnn
from mixprec.nn.convert import STATE_KEY, engine_state


@pytest.mark.parametrize(("build", "head", "embeddings"), [
    (lambda: resnet_style_cnn(width=8), "8", set()),
    (lambda: CharLSTM(20, hidden=16, embedding=8), "head", {"embed"}),
    (lambda: CharGPT(20, width=16, heads=2, layers=1, context=8), "head", None),
    (lambda: Generator(latent=8, width=4), "net.6", set()),
    (lambda: Discriminator(width=4), "net.5", set()),
])
def test_fp8_recipes_keep_the_output_layer_and_embeddings_in_high_precision(build, head, embeddings):
    for recipe in ("fp8", "fp8-hybrid", "fp8-rne", "fp8-nominscale"):
        kept = engine_state(mixprec.convert(build(), recipe)).kept
        assert head in kept
        expected = {n for n, m in build().named_modules() if isinstance(m, nn.Embedding)}
        assert set(kept) == {head} | expected
        if embeddings is not None:
            assert expected == embeddings
    for recipe in ("fp16", "bf16", "fp16-noscale", "fp16-nomaster"):
        assert engine_state(mixprec.convert(build(), recipe)).kept == {}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))


def test_parameters_are_the_model_own_and_become_the_masters() -> None:
    model = _mlp()
    before = [p for p in model.parameters()]
    values = [p.detach().clone() for p in before]
    mixprec.convert(model, "fp16")
    assert all(a is b for a, b in zip(model.parameters(), before))  # nothing replaced
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))  # nothing rounded
    fp8 = mixprec.convert(_mlp(), "fp8")
    assert all(p.dtype == torch.float32 and torch.equal(p.half().float(), p) for p in fp8.parameters())  # FP16 grid


def test_weights_loaded_after_convert_are_the_ones_used() -> None:
    pretrained = _mlp()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)
    model = mixprec.convert(_mlp(), "bf16")
    x = torch.randn(4, 8)
    model(x)  # rounds and caches the old weights
    model.load_state_dict(pretrained.state_dict())
    reference = mixprec.convert(copy.deepcopy(pretrained), "bf16")
    assert torch.equal(model(x), reference(x))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), pretrained.parameters()))


def test_state_dict_holds_exact_masters_and_the_engine_state() -> None:
    model = mixprec.convert(_mlp(), "fp8-hybrid")
    model(torch.randn(4, 8)).float().sum().backward()
    state = model.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())  # torch.save, safetensors and DCP take it
    assert any(k.startswith(f"{STATE_KEY}.amax.") for k in state)
    plain = _mlp()
    assert torch.equal(state["0.weight"], plain.state_dict()["0.weight"])  # the master, not a rounded copy
    fresh = mixprec.convert(_mlp(), "fp8-hybrid")
    fresh.load_state_dict(state)
    assert set(engine_state(fresh).histories) == set(engine_state(model).histories)
    with pytest.raises(ValueError, match="recipe 'fp8-hybrid'"):
        mixprec.convert(_mlp(), "bf16").load_state_dict(state)


def test_gradients_of_a_kept_layer_equal_fp32_bitwise() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    keep = mixprec.KeepHighPrecision(names=("1", "2"))
    mixprec.convert(model, mixprec.get_recipe("bf16").replace(keep=keep))
    seen = {}
    model[1].register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0].detach()))
    grad = torch.randn(5, 3)
    out = model(torch.randn(5, 8))
    assert out.dtype == torch.float32 and seen["input"].dtype == torch.float32  # FP32 inside the kept part
    out.backward(grad)
    # the kept part is FP32 all through: the same bits as plain FP32 on the same input
    reference[2](reference[1](seen["input"])).backward(grad)
    for name in ("1.weight", "1.bias", "2.weight", "2.bias"):
        assert torch.equal(model.get_parameter(name).grad, reference.get_parameter(name).grad), name
    assert seen["input"].to(torch.bfloat16).float().equal(seen["input"])  # it came from a bf16 GEMM


def test_misuse_is_refused_and_changes_nothing() -> None:
    model = mixprec.convert(_mlp(), "fp16")
    with pytest.raises(ValueError, match="already converted"):
        mixprec.convert(model, "fp16")
    with pytest.raises(ValueError, match="unknown recipe 'fp9'"):
        mixprec.convert(_mlp(), "fp9")
    with pytest.raises(ValueError, match="unknown format"):
        mixprec.Operand("e9m9x")
    with pytest.raises(TypeError, match="nn.Module"):
        mixprec.convert("model", "fp16")  # type: ignore[arg-type]
    emb = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    mixprec.convert(emb, "bf16")
    before = emb[0].weight.detach().clone()
    with pytest.raises(mixprec.UnsupportedOpError, match="max_norm"):
        emb(torch.tensor([1, 2]))
    assert torch.equal(emb[0].weight, before)
    assert not torch._C._is_torch_function_mode_enabled()  # the mode was left on the error


def test_functional_calls_anywhere_in_the_forward_are_emulated() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(torch.zeros(8), x, self.w) @ self.w.t()

    model = mixprec.convert(Custom(), "bf16")
    out = model(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16
    report = mixprec.coverage(model, torch.randn(3, 8))
    assert report.share == pytest.approx(1.0)
    assert {c.op for c in report.calls} == {"addmm", "matmul"}


def test_outside_the_forward_nothing_is_intercepted() -> None:
    model = mixprec.convert(_mlp(), "bf16")
    model(torch.randn(2, 8))
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert (a @ b).dtype == torch.float32
    assert torch.equal(a @ b, torch.mm(a, b))


def test_train_and_eval_and_amax_only_recorded_in_training() -> None:
    model = mixprec.convert(_mlp(), "fp8-hybrid")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 8))
    counts = {k: int(h.count) for k, h in engine_state(model).histories.items()}
    assert counts and all(c == 0 for c in counts.values())
    model.train()
    model(torch.randn(2, 8)).float().sum().backward()
    assert any(int(h.count) > 0 for h in engine_state(model).histories.values())


def test_an_error_inside_the_forward_leaves_the_mode() -> None:
    model = mixprec.convert(_mlp(), "bf16")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7))
    assert not torch._C._is_torch_function_mode_enabled()
    assert model(torch.randn(2, 8)).dtype == torch.bfloat16
