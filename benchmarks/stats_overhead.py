"""The cost of observing a model with mixprec.stats: one training step (fp32 recipe,
Adam) of the analyze CNN (width 24, batch 128) and LSTM (hidden 256, batch 32, sequence
128) with no observer, observing every step, and observing every 10th step, as ratios to
the unobserved step. The configurations are timed in interleaved rounds; the median
step of each counts.

    python benchmarks/stats_overhead.py [--rounds 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mixprec import stats
from mixprec.experiments.models import CharLSTM, resnet_style_cnn
from mixprec.amp import prepare


def _cnn():  # type: ignore[no-untyped-def]
    model = resnet_style_cnn(width=24, stem_stride=2)
    model, optimizer = prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3), "fp32")
    images, labels = torch.rand(128, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (128,))

    def step() -> None:
        optimizer.backward(F.cross_entropy(model(images), labels))
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def _lstm():  # type: ignore[no-untyped-def]
    model = CharLSTM(63, hidden=256)
    model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), "fp32")
    tokens = torch.randint(0, 63, (32, 129))

    def step() -> None:
        logits = model(tokens[:, :-1])
        optimizer.backward(F.cross_entropy(logits.reshape(-1, 63), tokens[:, 1:].reshape(-1)))
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round (keep 10)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, build in (("cnn", _cnn), ("lstm", _lstm)):
        model, step = build()
        for _ in range(2):
            step()  # warm-up
        times: dict[str, list[float]] = {"none": [], "every 1": [], "every 10": []}
        cycles: list[float] = []  # every 10: the mean step of each 10-step round (one sampled step each)
        observers = {"every 1": stats.observe(model, every=1), "every 10": stats.observe(model, every=10)}
        for _ in range(args.rounds):
            for config in times:
                observer = observers.get(config)
                if observer is not None:
                    observer.attach()
                for _ in range(args.steps):
                    started = time.perf_counter()
                    step()
                    if observer is not None:
                        observer.step()
                    times[config].append(time.perf_counter() - started)
                if observer is not None:
                    observer.close()
                if config == "every 10":
                    cycles.append(statistics.mean(times[config][-args.steps:]))
        base = statistics.median(times["none"])
        every_1 = statistics.median(times["every 1"])
        every_10 = statistics.median(cycles)  # what a run pays per step, sampled steps included
        print(f"{name}: step {base * 1e3:.0f} ms, observed every step x{every_1 / base:.2f}, "
              f"every 10 steps x{every_10 / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
