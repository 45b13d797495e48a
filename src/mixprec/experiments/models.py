"""The models the comparison trains, in plain PyTorch; mixprec converts them like any
user model. Sizes follow the issue's calibration on this 2-core machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ResidualBlock",
    "resnet_style_cnn",
    "CharLSTM",
    "Generator",
    "Discriminator",
    "TransformerBlock",
    "CharGPT",
]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 convolution when the
    block halves the resolution)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels // stride, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(channels // stride, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
            if stride > 1
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet_style_cnn(width: int = 32, classes: int = 10, stem_stride: int = 1) -> nn.Module:
    """A small ResNet for 28x28 single-channel images: a stem and three residual
    blocks with batch norm (the last two halve the resolution; a stem stride of 2 halves
    it first, for a quarter of the arithmetic)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width, 1), ResidualBlock(width * 2, 2), ResidualBlock(width * 4, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 4, classes),
    )


class CharLSTM(nn.Module):
    """A character language model: embedding, a 2-layer LSTM, a linear head."""

    def __init__(self, vocabulary: int, hidden: int = 256, layers: int = 2, embedding: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(hidden)


class Generator(nn.Module):
    """DCGAN generator for 28x28 images: transposed convolutions 1 -> 7 -> 14 -> 28."""

    def __init__(self, latent: int = 64, width: int = 64) -> None:
        super().__init__()
        self.latent = latent
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent, width * 4, 7, 1, 0, bias=False), nn.BatchNorm2d(width * 4), nn.ReLU(),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.ReLU(),
            nn.ConvTranspose2d(width * 2, 1, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent, 1, 1))


class Discriminator(nn.Module):
    """DCGAN discriminator for 28x28 images: strided convolutions to one logit."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 7, 1, 0),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(-1)


class TransformerBlock(nn.Module):
    """A pre-LN Transformer block: causal self-attention and a 4x GELU MLP, each with a
    residual connection."""

    def __init__(self, width: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        x = x + self.attention(h, h, h, need_weights=False, attn_mask=mask, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """A GPT-style causal character language model: token and position embeddings,
    pre-LN blocks, a final layer norm and a linear head."""

    def __init__(self, vocabulary: int, width: int = 256, heads: int = 4, layers: int = 4,
                 context: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))
