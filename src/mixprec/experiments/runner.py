"""The comparison runner: train one model under several recipes with the same seed, data
order, initial weights and hyper-parameters, measure each run, checkpoint as it goes."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.experiments.data import CharCorpus, load_fashion_mnist, load_kjv
from mixprec.experiments.gan_score import gan_score, load_classifier
from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, resnet_style_cnn
from mixprec.experiments.steps import classifier_loss, gan_step, language_loss, optimizer_step
from mixprec.stats.memory import SavedBytesCounter
from mixprec.amp import MixedPrecisionOptimizer, prepare
from mixprec.nn.convert import engine_state
from mixprec.stats import loss_scale_history

__all__ = ["BUDGETS", "MODELS", "Budget", "Data", "RunResult", "run_one"]

MODELS = ("cnn", "lstm", "gan", "transformer")


@dataclass(frozen=True)
class Budget:
    """One run's size and schedule: steps, batch, model width (channels, hidden size or
    model dimension), peak learning rate, layers and sequence length for the language
    models, evaluation and checkpoint intervals."""

    steps: int
    batch: int
    width: int
    lr: float
    eval_every: int
    layers: int = 2
    sequence: int = 128
    checkpoint_every: int = 100


BUDGETS: dict[str, dict[str, Budget]] = {
    "quick": {
        "cnn": Budget(steps=469, batch=128, width=24, lr=2e-3, eval_every=50),  # one epoch
        "lstm": Budget(steps=300, batch=32, width=256, lr=4e-3, eval_every=50, sequence=64),
        "gan": Budget(steps=300, batch=128, width=32, lr=2e-4, eval_every=50),
        "transformer": Budget(steps=500, batch=32, width=128, lr=4e-3, eval_every=50, sequence=64),
    },
    "full": {
        "cnn": Budget(steps=1407, batch=128, width=32, lr=2e-3, eval_every=100),  # three epochs
        "lstm": Budget(steps=1000, batch=32, width=256, lr=2e-3, eval_every=100),
        "gan": Budget(steps=1000, batch=128, width=32, lr=2e-4, eval_every=100),
        "transformer": Budget(steps=800, batch=32, width=256, lr=1e-3, eval_every=100, layers=4),
    },
    "test": {  # a few steps of everything, for the test suite
        "cnn": Budget(steps=3, batch=16, width=8, lr=2e-3, eval_every=2, checkpoint_every=2),
        "lstm": Budget(steps=3, batch=4, width=32, lr=2e-3, eval_every=2, sequence=32, checkpoint_every=2),
        "gan": Budget(steps=3, batch=16, width=8, lr=2e-4, eval_every=2, checkpoint_every=2),
        "transformer": Budget(steps=3, batch=4, width=32, lr=1e-3, eval_every=2, sequence=32, checkpoint_every=2),
    },
}
"""Sizes per model and budget, calibrated on a 2-core CPU: ``quick`` keeps one run near a
minute (FP32 20-60 s, the emulated recipes 1.5-5x that) and the five main recipes of
all four models near half an hour; ``full`` trains the sizes the papers' claims were
calibrated at (three CNN epochs, a 4-layer d=256 GPT, 1000 LSTM steps of 128
characters) for tighter parity: 17 minutes for the CNN (measured), two to two and a
half hours for everything (estimated from step times)."""



@dataclass
class RunResult:
    """One model trained under one recipe with one seed, and what was measured."""

    model: str
    recipe: str
    seed: int
    metric_name: str
    metric_value: float
    steps: int
    wall_seconds: float
    step_seconds: float
    param_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    skipped_steps: int
    final_loss_scale: float
    extra: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[Any]] = field(default_factory=dict)
    step_time_ratio: float | None = None
    fp32_layers: list[str] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        """The run as a JSON-ready dict."""
        return asdict(self)


class Data:
    """The data sets a comparison needs, loaded once and shared by its runs."""

    def __init__(self, data_dir: str | Path | None, cache_dir: Path) -> None:
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self._fashion: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._corpus: CharCorpus | None = None
        self._splits: tuple[torch.Tensor, torch.Tensor] | None = None
        self._classifier: nn.Module | None = None

    def fashion(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fashion-MNIST images in [0, 1] and labels."""
        if split not in self._fashion:
            self._fashion[split] = load_fashion_mnist(split, self.data_dir)
        return self._fashion[split]

    def corpus(self) -> tuple[CharCorpus, torch.Tensor, torch.Tensor]:
        """The King James Bible and its training and validation indices."""
        if self._corpus is None:
            self._corpus = load_kjv(self.cache_dir)
            self._splits = self._corpus.split()
        assert self._splits is not None
        return self._corpus, *self._splits

    def classifier(self) -> nn.Module:
        """The cached Fashion-MNIST classifier behind the GAN score."""
        if self._classifier is None:
            self._classifier = load_classifier(self.cache_dir, self.data_dir)
        return self._classifier


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(optimizer: MixedPrecisionOptimizer) -> int:
    """The optimizer's state (the masters are the model's parameters, counted there)."""
    return _tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _weight_bytes(model: nn.Module) -> int:
    """The model's parameters (the masters) and the weight operands rounded from them
    for this step, in their real storage."""
    rounded = [t for entry in engine_state(model).weights.values() for t in entry[3].tensors() if t is not None]
    return _tensor_bytes(model.parameters()) + _tensor_bytes(rounded)


def _saved_bytes(modules: list[nn.Module], forward: Callable[[], object]) -> int:
    """Bytes autograd saves for one forward pass, leaving the modules as they were (a
    training-mode forward would move batch-norm statistics) and the RNG untouched."""
    states = [{k: v.clone() for k, v in module.state_dict().items()} for module in modules]
    with torch.random.fork_rng(), SavedBytesCounter(exclude_from=modules) as counter:
        forward()
    for module, state in zip(modules, states):
        module.load_state_dict(state)
    return counter.bytes


def _checkpoint(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


class _Trainer:
    """The loop shared by every model: steps, timing, curves, checkpoints."""

    def __init__(self, name: str, recipe: str, seed: int, budget: Budget, checkpoint: Path | None,
                 on_step: Callable[[int], None]) -> None:
        self.name, self.recipe, self.seed, self.budget = name, recipe, seed, budget
        self.checkpoint, self.on_step = checkpoint, on_step
        self.curves: dict[str, list[Any]] = {"train_loss": [], "validation": []}
        self.step_times: list[float] = []
        self.start_step = 0
        self.kept_fp32: list[str] = []
        self.sampler = torch.Generator().manual_seed(seed)

    def resume(self, stateful: dict[str, Any]) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        state = torch.load(self.checkpoint, weights_only=False)
        for key, thing in stateful.items():
            thing.load_state_dict(state["stateful"][key])
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.curves, self.start_step = state["curves"], state["step"]

    def save(self, step: int, stateful: dict[str, Any]) -> None:
        _checkpoint(self.checkpoint, {
            "stateful": {key: thing.state_dict() for key, thing in stateful.items()},
            "sampler": self.sampler.get_state(), "torch_rng": torch.get_rng_state(),
            "curves": self.curves, "step": step,
        })

    def loop(self, step_fn: Callable[[int], float], evaluate: Callable[[], float], stateful: dict[str, Any]) -> None:
        """Run the remaining steps; ``stateful`` names what a checkpoint holds (modules,
        optimizers, schedulers: anything with ``state_dict`` and ``load_state_dict``)."""
        self.resume(stateful)
        for step in range(self.start_step, self.budget.steps):
            started = time.perf_counter()
            loss = step_fn(step)
            self.step_times.append(time.perf_counter() - started)
            self.curves["train_loss"].append([step + 1, loss])
            if (step + 1) % self.budget.eval_every == 0 or step + 1 == self.budget.steps:
                self.curves["validation"].append([step + 1, evaluate()])
            if (step + 1) % self.budget.checkpoint_every == 0 and step + 1 < self.budget.steps:
                self.save(step + 1, stateful)
            self.on_step(step + 1)

    def step_seconds(self) -> float:
        times = self.step_times[3:] or self.step_times
        return statistics.median(times) if times else float("nan")


def _prepare(trainer: _Trainer, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: str,
             role: str = "") -> tuple[nn.Module, MixedPrecisionOptimizer]:
    """Convert and wrap for the run; the modules the recipe keeps in high precision (the
    FP8 recipes' embeddings and output layer) are recorded with the run."""
    model, wrapped = prepare(model, optimizer, recipe)
    kept = engine_state(model).kept
    trainer.kept_fp32 += [f"{role}.{name}" if role else name for name in sorted(kept)]
    return model, wrapped


def _one_cycle(optimizer: MixedPrecisionOptimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm up over the first quarter of the run, then anneal to near zero: the final
    metric then reflects the run rather than the noise of its last few steps."""
    peak = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=steps, pct_start=0.25)


def _classifier_run(trainer: _Trainer, data: Data, recipe: str) -> RunResult:
    images, labels = data.fashion("train")
    test_images, test_labels = data.fashion("test")
    torch.manual_seed(trainer.seed)
    model = resnet_style_cnn(width=trainer.budget.width, stem_stride=2)
    model, optimizer = _prepare(trainer, model, torch.optim.Adam(model.parameters(), lr=trainer.budget.lr), recipe)
    schedule = _one_cycle(optimizer, trainer.budget.steps)
    batch = trainer.budget.batch
    epochs: dict[int, torch.Tensor] = {}

    def epoch_order(epoch: int) -> torch.Tensor:
        # one permutation per epoch, from the seed alone, so a resumed run sees the same order
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                trainer.seed * 10007 + epoch))
        return epochs[epoch]

    def accuracy(count: int) -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, count, 1000):
                chunk = slice(start, min(start + 1000, count))
                correct += int((model(test_images[chunk] * 2 - 1).argmax(1) == test_labels[chunk]).sum())
        model.train()
        return correct / count

    def step(index: int) -> float:
        epoch, position = divmod(index * batch, len(images))
        rows = epoch_order(epoch)[position:position + batch]
        loss = classifier_loss(model, images[rows], labels[rows])
        optimizer_step(optimizer, loss)
        schedule.step()  # every step, skipped or not: the schedule follows the step count
        return loss.item()

    saved = _saved_bytes([model], lambda: classifier_loss(model, images[:batch], labels[:batch]))
    trainer.loop(step, lambda: accuracy(2000), {"model": model, "optimizer": optimizer, "schedule": schedule})
    started = time.perf_counter()
    final = accuracy(len(test_images))
    return _result(trainer, "test_accuracy", final, optimizer, model, saved, {}, started)


def _language_run(trainer: _Trainer, data: Data, recipe: str, kind: str) -> RunResult:
    corpus, train, validation = data.corpus()
    torch.manual_seed(trainer.seed)
    vocabulary = corpus.vocabulary_size
    width, sequence, layers = trainer.budget.width, trainer.budget.sequence, trainer.budget.layers
    model: nn.Module = (CharLSTM(vocabulary, hidden=width, layers=layers) if kind == "lstm"
                        else CharGPT(vocabulary, width=width, layers=layers, context=sequence))
    model, optimizer = _prepare(trainer, model, torch.optim.AdamW(model.parameters(), lr=trainer.budget.lr), recipe)
    schedule = _one_cycle(optimizer, trainer.budget.steps)
    batch = trainer.budget.batch
    evaluation_offsets = torch.linspace(0, len(validation) - sequence - 2, 16 * 8).long()

    def windows(source: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = offsets[:, None] + torch.arange(sequence + 1)
        tokens = source[rows]
        return tokens[:, :-1], tokens[:, 1:]

    def bits_per_character() -> float:
        model.eval()
        with torch.no_grad():
            losses = [language_loss(model, *windows(validation, chunk)).item()
                      for chunk in evaluation_offsets.split(16)]
        model.train()
        return statistics.mean(losses) / math.log(2)

    def step(index: int) -> float:
        offsets = torch.randint(0, len(train) - sequence - 2, (batch,), generator=trainer.sampler)
        loss = language_loss(model, *windows(train, offsets))
        optimizer_step(optimizer, loss, clip=1.0)
        schedule.step()
        return loss.item()

    saved = _saved_bytes([model], lambda: language_loss(model, *windows(train, torch.arange(batch) * 1000)))
    trainer.loop(step, bits_per_character, {"model": model, "optimizer": optimizer, "schedule": schedule})
    started = time.perf_counter()
    return _result(trainer, "validation_bpc", bits_per_character(), optimizer, model, saved, {}, started)


def _gan_run(trainer: _Trainer, data: Data, recipe: str) -> RunResult:
    images, _ = data.fashion("train")
    test_images, _ = data.fashion("test")
    torch.manual_seed(trainer.seed)
    latent = 64
    generator: nn.Module = Generator(latent, trainer.budget.width)
    critic: nn.Module = Discriminator(trainer.budget.width)
    lr = trainer.budget.lr
    generator, opt_g = _prepare(trainer, generator, torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999)),
                                recipe, "generator")
    critic, opt_d = _prepare(trainer, critic, torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.999)), recipe,
                             "critic")
    batch = trainer.budget.batch
    fixed_noise = torch.randn(64, latent, generator=torch.Generator().manual_seed(99))
    classifier = data.classifier()

    def score() -> float:
        generator.eval()
        with torch.no_grad():
            noise = torch.randn(1000, latent, generator=torch.Generator().manual_seed(7))
            samples = generator(noise)
        generator.train()
        return gan_score(classifier, samples, test_images[:1000] * 2 - 1)["frechet"]

    def step(index: int) -> float:
        rows = torch.randint(0, len(images), (batch,), generator=trainer.sampler)
        noise = torch.randn(batch, latent, generator=trainer.sampler)
        return gan_step(generator, critic, opt_g, opt_d, images[rows] * 2 - 1, noise)

    saved = _saved_bytes([generator, critic], lambda: critic(generator(torch.randn(batch, latent))))
    trainer.loop(step, score, {"generator": generator, "critic": critic, "opt_g": opt_g, "opt_d": opt_d})
    started = time.perf_counter()
    generator.eval()
    with torch.no_grad():
        noise = torch.randn(2000, latent, generator=torch.Generator().manual_seed(7))
        final = gan_score(classifier, generator(noise), test_images[:2000] * 2 - 1)
        samples = generator(fixed_noise)
    result = _result(trainer, "frechet_distance", final["frechet"], opt_g, generator, saved,
                     {"class_entropy": final["class_entropy"]}, started)
    result.param_bytes += _weight_bytes(critic)
    result.optimizer_bytes += _optimizer_bytes(opt_d)
    critic_history = loss_scale_history(opt_d)
    result.skipped_steps += critic_history.skipped_steps
    result.curves["samples"] = samples.reshape(64, 28 * 28).tolist()
    result.curves["loss_scale_critic"] = critic_history.as_record()["curve"]
    result.curves["skipped_at_critic"] = list(critic_history.skipped_at)
    return result


def _result(trainer: _Trainer, metric: str, value: float, optimizer: MixedPrecisionOptimizer, model: nn.Module,
            saved: int, extra: dict[str, float], evaluation_started: float) -> RunResult:
    history = loss_scale_history(optimizer)
    trainer.curves["loss_scale"] = history.as_record()["curve"]
    trainer.curves["skipped_at"] = list(history.skipped_at)
    return RunResult(
        model=trainer.name, recipe=trainer.recipe, seed=trainer.seed, metric_name=metric, metric_value=value,
        steps=trainer.budget.steps, wall_seconds=sum(trainer.step_times) + time.perf_counter() - evaluation_started,
        step_seconds=trainer.step_seconds(), param_bytes=_weight_bytes(model),
        optimizer_bytes=_optimizer_bytes(optimizer), saved_bytes=saved,
        skipped_steps=history.skipped_steps, final_loss_scale=history.final_scale,
        extra=extra, curves=trainer.curves, fp32_layers=trainer.kept_fp32,
    )


def run_one(model: str, recipe: str, seed: int, budget_name: str, data: Data,
            checkpoint: Path | None = None, on_step: Callable[[int], None] = lambda step: None,
            lr: float | None = None) -> RunResult:
    """Train ``model`` under ``recipe`` with ``seed`` for the budget's steps (resuming
    from ``checkpoint`` if it exists) and measure the run; ``lr`` replaces the budget's
    peak learning rate."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)} or 'all'")
    if budget_name not in BUDGETS:
        raise ValueError(f"unknown budget {budget_name!r}; choose from {', '.join(BUDGETS)}")
    budget = BUDGETS[budget_name][model]
    if lr is not None:
        budget = dataclasses.replace(budget, lr=lr)
    trainer = _Trainer(model, recipe, seed, budget, checkpoint, on_step)
    if model == "cnn":
        result = _classifier_run(trainer, data, recipe)
    elif model in ("lstm", "transformer"):
        result = _language_run(trainer, data, recipe, model)
    else:
        result = _gan_run(trainer, data, recipe)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()  # the run is complete: its result replaces the checkpoint
    return result
