"""mixprec.memory: converted models keep their saved activations in the activation
format, each tensor once: half of FP32's bytes for 16-bit formats, a quarter for FP8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec.bench.step_speed import transformer_block
from mixprec.experiments.models import resnet_style_cnn
from mixprec.memory import SavedBytesCounter


def saved_bytes(build, x, recipe) -> int:
    torch.manual_seed(0)
    model = build()
    if recipe != "fp32":
        mixprec.convert(model, recipe)
    with SavedBytesCounter(exclude_from=[model]) as counter:
        model(x)
    return counter.bytes


@pytest.mark.parametrize(("recipe", "bound"), [("fp16", 0.5), ("bf16", 0.5), ("fp8", 0.3)])
def test_cnn_saved_activation_bytes(recipe, bound):
    x = torch.randn(8, 1, 28, 28)
    ratio = saved_bytes(resnet_style_cnn, x, recipe) / saved_bytes(resnet_style_cnn, x, "fp32")
    assert 0.2 < ratio <= bound + 0.005, ratio


def test_transformer_fp8_saved_activation_bytes():
    x = torch.randn(2, 128, 256)
    ratio = saved_bytes(transformer_block, x, "fp8") / saved_bytes(transformer_block, x, "fp32")
    assert 0.2 < ratio <= 0.3, ratio


def test_packed_activations_give_the_same_gradients_as_rounding_in_place():
    """The packer stores a ReLU output that the next layer rounds anyway: packing it
    changes nothing the backward pass computes with for that layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    mixprec.convert(model, "fp16")
    x = torch.randn(32, 64)
    grads = []
    for packed in (True, False):
        model._mixprec_pack_activations = packed
        model.zero_grad()
        F.mse_loss(model(x), torch.zeros(32, 8)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_counter_skips_parameters_and_counts_a_storage_once():
    weight = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16, requires_grad=True)
    module = torch.nn.Module()
    module.weight = weight
    with SavedBytesCounter(exclude_from=[module]) as counter:
        y = x @ weight
        (y * y).sum()
    # x (saved by the matmul) and y (saved twice by the product): 2 x 4 x 16 x 4 bytes
    assert counter.bytes == 2 * 4 * 16 * 4


def test_a_deep_copy_packs_its_own_activations():
    import copy

    torch.manual_seed(0)
    model = resnet_style_cnn()
    mixprec.convert(model, "fp8")
    twin = copy.deepcopy(model)
    x = torch.randn(4, 1, 28, 28)
    with SavedBytesCounter(exclude_from=[twin]) as counter:
        twin(x).sum().backward()
    assert twin[0].weight.grad is not None and model[0].weight.grad is None
    assert counter.bytes > 0


def test_packing_hooks_are_left_even_when_forward_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    mixprec.convert(model, "fp16")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width
    assert not model._mixprec_packing_stack
    y = torch.randn(3, 3, requires_grad=True)
    (y * y).sum().backward()  # autograd outside the model is untouched by mixprec's hooks
    assert torch.equal(y.grad, 2 * y.detach())
