"""mixprec.experiments.models: every model trains a few steps under every recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, resnet_style_cnn
from mixprec.recipe import RECIPES


def train_steps(model, inputs, targets, recipe, steps=3):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = mixprec.prepare(model, optimizer, recipe)
    losses = []
    for _ in range(steps):
        out = model(inputs)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
        optimizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_classifier_and_language_models_train(recipe):
    torch.manual_seed(0)
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    assert all(torch.isfinite(torch.tensor(train_steps(resnet_style_cnn(8), images, labels, recipe))))
    tokens = torch.randint(0, 20, (4, 17))
    for model in (CharLSTM(20, hidden=32, embedding=16), CharGPT(20, width=32, heads=2, layers=2, context=16)):
        losses = train_steps(model, tokens[:, :-1], tokens[:, 1:], recipe, steps=4)
        assert losses[-1] < losses[0], (type(model).__name__, losses)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gan_shapes_and_a_step(recipe):
    torch.manual_seed(0)
    generator, critic = Generator(latent=16, width=8), Discriminator(width=8)
    generator, opt_g = mixprec.prepare(generator, torch.optim.Adam(generator.parameters(), 2e-4), recipe)
    critic, opt_d = mixprec.prepare(critic, torch.optim.Adam(critic.parameters(), 2e-4), recipe)
    fake = generator(torch.randn(6, 16))
    assert fake.shape == (6, 1, 28, 28) and fake.abs().max() <= 1.0
    real = torch.rand(6, 1, 28, 28) * 2 - 1
    opt_d.backward(F.binary_cross_entropy_with_logits(critic(real), torch.ones(6)))
    opt_d.backward(F.binary_cross_entropy_with_logits(critic(fake.detach()), torch.zeros(6)))
    opt_d.step()
    opt_g.backward(F.binary_cross_entropy_with_logits(critic(fake), torch.ones(6)))
    opt_g.step()
    assert opt_g.scaler.loss_scaler.state.step == opt_d.scaler.loss_scaler.state.step == 1
