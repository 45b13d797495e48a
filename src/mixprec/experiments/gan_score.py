"""The GAN's sample-quality score: a Fashion-MNIST classifier trained once and cached,
whose features give a Frechet distance between generated and real test images, and
whose predictions give the entropy of the generated class distribution (ln 10 = 2.30
when every class is generated equally often)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.experiments.data import load_fashion_mnist
from mixprec.experiments.models import resnet_style_cnn

__all__ = ["load_classifier", "features_and_probabilities", "frechet_distance", "gan_score"]

_CLASSIFIER_VERSION = 1


def load_classifier(cache_dir: Path, data_dir: str | Path | None = None) -> nn.Module:
    """The scoring classifier (the small CNN, FP32, two epochs), trained on first use
    and cached as ``classifier-v1.pt`` in ``cache_dir``."""
    path = cache_dir / f"classifier-v{_CLASSIFIER_VERSION}.pt"
    with torch.random.fork_rng():  # building or training it leaves the caller's RNG alone
        return _load_or_train(path, cache_dir, data_dir)


def _load_or_train(path: Path, cache_dir: Path, data_dir: str | Path | None) -> nn.Module:
    model = resnet_style_cnn(width=16)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    images, labels = load_fashion_mnist("train", data_dir)
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            batch = order[start:start + 128]
            loss = F.cross_entropy(model(images[batch] * 2 - 1), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def features_and_probabilities(classifier: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate-layer features (float64) and class probabilities of images in [-1, 1]."""
    assert isinstance(classifier, nn.Sequential)
    body, head = classifier[:-1], classifier[-1]
    features, probabilities = [], []
    for start in range(0, len(images), 500):
        hidden = body(images[start:start + 500].float())
        features.append(hidden.double())
        probabilities.append(torch.softmax(head(hidden), dim=-1).double())
    return torch.cat(features), torch.cat(probabilities)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (float64):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^(1/2)) is the sum of square roots of the (real, >= 0) eigenvalues of S_a S_b
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


def gan_score(classifier: nn.Module, generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """``frechet`` (lower is better) and ``class_entropy`` (higher is more diverse, at
    most ln 10) of generated images against real ones, all in [-1, 1]."""
    fake_features, fake_probabilities = features_and_probabilities(classifier, generated)
    real_features, _ = features_and_probabilities(classifier, real)
    marginal = fake_probabilities.mean(0)
    entropy = float(-(marginal * marginal.clamp(min=1e-12).log()).sum())
    return {"frechet": frechet_distance(fake_features, real_features), "class_entropy": entropy,
            "max_entropy": math.log(10)}
