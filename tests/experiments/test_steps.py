"""The shared training steps: the losses the built-in models train on and the
optimizer's part of a step."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.experiments.models import Discriminator, Generator
from mixprec.experiments.steps import classifier_loss, gan_step, language_loss, optimizer_step


def test_classifier_loss_maps_images_to_the_models_range() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    images, labels = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    expected = F.cross_entropy(model(images * 2 - 1), labels)
    assert torch.equal(classifier_loss(model, images, labels), expected)


def test_language_loss_is_per_character_cross_entropy() -> None:
    embedding = nn.Embedding(7, 7)
    inputs, targets = torch.randint(0, 7, (2, 5)), torch.randint(0, 7, (2, 5))
    expected = F.cross_entropy(embedding(inputs).reshape(10, 7), targets.reshape(10))
    assert torch.allclose(language_loss(embedding, inputs, targets), expected)


def test_optimizer_step_updates_clips_and_zeroes_and_skips_an_overflow() -> None:
    layer = nn.Linear(4, 2)
    layer, optimizer = mixprec.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.1), "fp16")
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 4) * 0.5  # the mean's errors times fp16's first loss scale (65536) stay finite
    assert optimizer_step(optimizer, layer(x).float().mean(), clip=1e-3)
    moved = (layer.weight - before["weight"]).norm()
    assert 0 < moved <= 0.1 * 1e-3 * 1.01  # lr x the clipped norm
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
    after_good = copy.deepcopy(layer.state_dict())
    assert not optimizer_step(optimizer, layer(x).float().mean() * float("inf"))
    assert all(torch.equal(after_good[k], v) for k, v in layer.state_dict().items() if not k.startswith("_mixprec"))


def test_gan_step_updates_both_networks() -> None:
    torch.manual_seed(0)
    generator, critic = Generator(8, 4), Discriminator(4)
    generator, opt_g = mixprec.prepare(generator, torch.optim.Adam(generator.parameters(), lr=1e-3), "bf16")
    critic, opt_d = mixprec.prepare(critic, torch.optim.Adam(critic.parameters(), lr=1e-3), "bf16")
    g0 = [p.detach().clone() for p in generator.parameters()]
    d0 = [p.detach().clone() for p in critic.parameters()]
    phases = []
    loss = gan_step(generator, critic, opt_g, opt_d, torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 8),
                    on_phase=phases.append)
    assert loss > 0 and phases == [opt_d, opt_g]
    assert any(not torch.equal(a, b) for a, b in zip(g0, generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, critic.parameters()))
