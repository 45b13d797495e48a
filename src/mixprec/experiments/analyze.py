"""``mixprec analyze``: train one of the experiment models for a few steps on its real
data set under a recipe, observe it with :mod:`mixprec.stats`, and write the report.
A small training loop of its own (constant learning rate): the point is the tensors'
ranges, not the final accuracy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixprec import stats
from mixprec.stats import LossScaleHistory, ModelStats
from mixprec.experiments.data import load_fashion_mnist, load_kjv
from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, resnet_style_cnn
from mixprec.experiments.steps import classifier_loss, gan_step, language_loss, optimizer_step
from mixprec.amp import MixedPrecisionOptimizer, prepare
from mixprec.recipe import Recipe, get_recipe

__all__ = ["MODELS", "AnalyzePlan", "AnalyzeResult", "run_analyze", "recipe_block_formats"]

MODELS = ("cnn", "lstm", "gan", "transformer")
_SIZES = {"cnn": (128, 24), "lstm": (32, 256), "gan": (128, 32), "transformer": (32, 256)}  # batch, width


@dataclass(frozen=True)
class AnalyzePlan:
    """One analysis: ``model`` trained ``steps`` steps under ``recipe``, sampled every
    ``every`` steps; ``batch``/``width`` default to the comparison's quick sizes (CNN
    128/24, LSTM 32/256, GAN 128/32, Transformer 32/256); ``sequence`` is the language
    models' context; the report goes to ``out``."""

    model: str
    recipe: str = "fp32"
    steps: int = 50
    every: int = 5
    out: Path = Path("runs/analyze")
    batch: int | None = None
    width: int | None = None
    sequence: int = 128
    seed: int = 0
    data_dir: str | None = None
    tolerance: float = stats.DEFAULT_TOLERANCE
    margin: int = stats.DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        get_recipe(self.recipe)  # an unknown recipe fails here, with the list of names
        for name in ("steps", "every", "sequence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("batch", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (the default size), got {value!r}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be a share in [0, 1), got {self.tolerance}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0 binades, got {self.margin}")

    @property
    def sizes(self) -> tuple[int, int]:
        """(batch, width) after defaults."""
        batch, width = _SIZES[self.model]
        return self.batch or batch, self.width or width


@dataclass(frozen=True)
class AnalyzeResult:
    """The report's path, what was recorded, the training losses, and each optimizer's
    loss-scale history."""

    report: Path
    stats: ModelStats
    losses: tuple[float, ...]
    histories: dict[str, LossScaleHistory]


@dataclass
class _Session:
    observed: nn.Module
    step: Callable[[int], float]
    optimizers: dict[str, MixedPrecisionOptimizer]
    loss_scale: Callable[[], float]


def _cnn(plan: AnalyzePlan, sampler: torch.Generator) -> _Session:
    images, labels = load_fashion_mnist("train", plan.data_dir)
    batch, width = plan.sizes
    model = resnet_style_cnn(width=width, stem_stride=2)
    model, optimizer = prepare(model, torch.optim.Adam(model.parameters(), lr=2e-3), plan.recipe)

    def step(index: int) -> float:
        rows = torch.randint(0, len(images), (batch,), generator=sampler)
        loss = classifier_loss(model, images[rows], labels[rows])
        optimizer_step(optimizer, loss)
        return loss.item()

    return _Session(model, step, {"model": optimizer}, lambda: optimizer.loss_scale)


def _language(plan: AnalyzePlan, sampler: torch.Generator) -> _Session:
    corpus = load_kjv()
    train, _ = corpus.split()
    batch, width = plan.sizes
    vocabulary, sequence = corpus.vocabulary_size, plan.sequence
    model: nn.Module = (CharLSTM(vocabulary, hidden=width) if plan.model == "lstm"
                        else CharGPT(vocabulary, width=width, context=sequence))
    lr = 2e-3 if plan.model == "lstm" else 1e-3
    model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=lr), plan.recipe)

    def step(index: int) -> float:
        offsets = torch.randint(0, len(train) - sequence - 2, (batch,), generator=sampler)
        tokens = train[offsets[:, None] + torch.arange(sequence + 1)]
        loss = language_loss(model, tokens[:, :-1], tokens[:, 1:])
        optimizer_step(optimizer, loss, clip=1.0)
        return loss.item()

    return _Session(model, step, {"model": optimizer}, lambda: optimizer.loss_scale)


def _gan(plan: AnalyzePlan, sampler: torch.Generator) -> _Session:
    images, _ = load_fashion_mnist("train", plan.data_dir)
    batch, width = plan.sizes
    latent = 64
    generator: nn.Module = Generator(latent, width)
    critic: nn.Module = Discriminator(width)
    generator, opt_g = prepare(generator, torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                               plan.recipe)
    critic, opt_d = prepare(critic, torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999)), plan.recipe)
    # each backward carries its own optimizer's loss scale, the critic's errors included
    current = [opt_d]

    def step(index: int) -> float:
        rows = torch.randint(0, len(images), (batch,), generator=sampler)
        noise = torch.randn(batch, latent, generator=sampler)

        def on_phase(optimizer: MixedPrecisionOptimizer) -> None:
            current[0] = optimizer

        return gan_step(generator, critic, opt_g, opt_d, images[rows] * 2 - 1, noise, on_phase)

    observed = nn.ModuleDict({"generator": generator, "critic": critic})
    return _Session(observed, step, {"generator": opt_g, "critic": opt_d}, lambda: current[0].loss_scale)


def recipe_block_formats(recipe: str | Recipe) -> tuple[str, ...]:
    """The block formats ``recipe``'s operands use (scale rule included, e.g.
    ``"mxfp8_e4m3:rceil"``), in the order forward, dgrad, wgrad, each once: the formats
    whose clipped and flushed shares ``mixprec analyze`` reports."""
    recipe = get_recipe(recipe)
    names: list[str] = []
    for gemm in (recipe.forward, recipe.dgrad, recipe.wgrad):
        for operand in (gemm.left, gemm.right):
            if operand.is_block and operand.fmt.name not in names:
                names.append(operand.fmt.name)
    return tuple(names)


def run_analyze(plan: AnalyzePlan, on_step: Callable[[int, float], None] | None = None) -> AnalyzeResult:
    """Train ``plan.model`` for ``plan.steps`` steps under ``plan.recipe``, observing every
    ``plan.every``-th step (fp16, bf16, e5m2, e4m3 and the recipe's block formats), and
    write the report into ``plan.out``. ``on_step(step,
    loss)`` is called after each step (progress display)."""
    torch.manual_seed(plan.seed)
    sampler = torch.Generator().manual_seed(plan.seed + 1)
    builders = {"cnn": _cnn, "lstm": _language, "transformer": _language, "gan": _gan}
    session = builders[plan.model](plan, sampler)
    losses = []
    # a block recipe's formats are counted too: their clipped and flushed shares per layer
    config = stats.StatsConfig(every=plan.every,
                               formats=stats.StatsConfig().formats + recipe_block_formats(plan.recipe))
    with stats.Observer(session.observed, config, loss_scale=session.loss_scale, model_name=plan.model) as obs:
        for index in range(plan.steps):
            losses.append(session.step(index))
            obs.step()
            if on_step is not None:
                on_step(index + 1, losses[-1])
    histories = {name: stats.loss_scale_history(opt) for name, opt in session.optimizers.items()}
    batch, width = plan.sizes
    summary = dataclasses.replace(obs.summary(), extra={
        "loss_scale_history": {name: h.as_record() for name, h in histories.items()},
        "training": {"steps": plan.steps, "every": plan.every, "batch": batch, "width": width, "seed": plan.seed,
                     "first_loss": losses[0], "last_loss": losses[-1]},
    })
    title = f"{plan.model} ({plan.recipe}, {plan.steps} steps, batch {batch}, width {width})"
    report = stats.write_report(summary, plan.out, tolerance=plan.tolerance, margin=plan.margin,
                                recipe=plan.recipe, title=title)
    return AnalyzeResult(report, summary, tuple(losses), histories)
