"""One training step per built-in model, shared by ``compare`` (the runner), ``analyze``,
``train`` (DDP and FSDP2) and the benchmarks, so that every command trains a model the
same way: the loss each model is trained on, and the optimizer's part of a step.

Callers choose the batch (an epoch's permutation, random rows, a rank's slice); these
functions only turn a batch into a loss and a loss into an update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.amp import MixedPrecisionOptimizer

__all__ = ["classifier_loss", "language_loss", "optimizer_step", "gan_step"]


def classifier_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the CNN on Fashion-MNIST ``images`` (values in [0, 1], mapped to
    [-1, 1] as the models expect), computed on FP32 logits."""
    return F.cross_entropy(model(images * 2 - 1).float(), labels)


def language_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy of a character LM (nats per character), on FP32
    logits: ``inputs`` and ``targets`` are token windows of shape (batch, sequence)."""
    logits = model(inputs).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def optimizer_step(optimizer: MixedPrecisionOptimizer, loss: torch.Tensor, clip: float | None = None) -> bool:
    """Backward through the loss scale, optionally clip the unscaled gradients' norm to
    ``clip``, step (skipped on Inf/NaN) and zero the gradients; whether it stepped."""
    optimizer.backward(loss)
    if clip is not None:
        optimizer.clip_grad_norm_(clip)
    stepped = optimizer.step()
    optimizer.zero_grad()
    return bool(stepped)


def gan_step(generator: nn.Module, critic: nn.Module, opt_g: MixedPrecisionOptimizer,
             opt_d: MixedPrecisionOptimizer, real: torch.Tensor, noise: torch.Tensor,
             on_phase: Callable[[MixedPrecisionOptimizer], None] | None = None) -> float:
    """One DCGAN step with the non-saturating loss: the critic on ``real`` (images in
    [-1, 1]) and on the generator's samples of ``noise``, then the generator through
    the critic. Each backward carries its own optimizer's loss scale, the critic's errors
    included; ``on_phase(optimizer)`` is told which optimizer's phase begins. Returns
    the generator's loss."""
    fake = generator(noise)
    batch = real.shape[0]
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    if on_phase is not None:
        on_phase(opt_d)
    opt_d.zero_grad()
    opt_d.backward(F.binary_cross_entropy_with_logits(critic(real).float(), ones))
    opt_d.backward(F.binary_cross_entropy_with_logits(critic(fake.detach()).float(), zeros))
    opt_d.step()
    if on_phase is not None:
        on_phase(opt_g)
    opt_g.zero_grad()
    loss_g = F.binary_cross_entropy_with_logits(critic(fake).float(), ones)
    opt_g.backward(loss_g)
    opt_g.step()
    return loss_g.item()
