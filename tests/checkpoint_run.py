"""A training run the checkpoint test drives in fresh processes: train a small model
for some steps from scratch or from a checkpoint, then save the final state, in the
torch.amp-shaped loop (the user's optimizer, mixprec.GradScaler, an LR scheduler).

    python -m tests.checkpoint_run RECIPE FIRST_STEP LAST_STEP [--load CKPT] --save OUT
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import mixprec


def build(recipe: str) -> tuple[nn.Module, torch.optim.Optimizer, mixprec.GradScaler, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5))
    model = mixprec.convert(model, recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, mixprec.GradScaler(recipe), scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("first", type=int)
    parser.add_argument("last", type=int)
    parser.add_argument("--load")
    parser.add_argument("--save", required=True)
    args = parser.parse_args()
    model, optimizer, scaler, scheduler = build(args.recipe)
    if args.load:
        checkpoint = torch.load(args.load, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    for step in range(args.first, args.last):
        x, y = batch(step)
        loss = F.cross_entropy(model(x).float(), y)
        if step == 2:
            loss = loss * float("inf")  # an overflowing step, skipped
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict()}, args.save)


if __name__ == "__main__":
    main()
