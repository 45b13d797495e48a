"""``mixprec bench step``: one training step of a ResNet-style CNN, a Transformer (GPT)
block and an MLP (4 x Linear(1024), batch 512), and on request the quick-budget
models of ``mixprec compare`` (``quick-cnn``, ``quick-lstm``, ``quick-gan``,
``quick-transformer``: their builders, sizes, optimizers, clipping and, for the GAN,
compare's step of both networks, on random data), under FP32 eager, torch.autocast (bf16,
fp16), torchao's float8 training emulation (an optional peer, where torchao imports) and
every mixprec recipe, in one run with interleaved rounds: median step time, its ratio to
FP32, and the bytes of parameters, optimizer state (master weights included) and
tensors saved for backward. The mixprec recipes run their GEMMs under a
:func:`mixprec.nn.kernels.gemm_kernels` policy (``"auto"`` by default: BF16 kernels where
exact and native)."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from mixprec.bench.timing import median_seconds
from mixprec.experiments.steps import gan_step, optimizer_step
from mixprec.experiments.models import CharGPT, CharLSTM, Discriminator, Generator, TransformerBlock, resnet_style_cnn
from mixprec.experiments.runner import BUDGETS
from mixprec.stats.memory import SavedBytesCounter
from mixprec.recipe import RECIPES
from mixprec.amp import prepare
from mixprec.nn.convert import engine_state, is_converted
from mixprec.nn.kernels import KernelMode, gemm_kernels

__all__ = ["StepRow", "run_step_bench", "CONFIGS", "COMPILED", "is_config", "MODELS", "DEFAULT_MODELS", "TORCHAO_FLOAT8",
           "torchao_float8_available", "transformer_block", "mlp", "quick_transformer"]

TORCHAO_FLOAT8 = "torchao-float8"
"""torchao's float8 training (``convert_to_float8_training``, tensorwise dynamic scaling)
with ``emulate=True``: its FP8 GEMMs emulated in high precision, as on a CPU."""

CONFIGS = ("fp32", "autocast-bf16", "autocast-fp16", TORCHAO_FLOAT8, *[name for name in RECIPES if name != "fp32"])
DEFAULT_MODELS = ("cnn", "transformer", "mlp")
"""The models a plain ``mixprec bench step`` times."""
MODELS = (*DEFAULT_MODELS, "quick-cnn", "quick-lstm", "quick-gan", "quick-transformer")
"""Every model it can time: the defaults and the quick-budget ``compare`` models (the CNN,
the character LSTM and Transformer, the DCGAN: compare's builders, sizes, optimizers,
gradient clipping and GAN step, on random data; small and overhead-bound, issue 12
holds them to 1.5x FP32's step)."""
_QUICK_TRANSFORMER = BUDGETS["quick"]["transformer"]
_QUICK_LSTM = BUDGETS["quick"]["lstm"]
_QUICK_CNN = BUDGETS["quick"]["cnn"]
_QUICK_GAN = BUDGETS["quick"]["gan"]
_GAN_LATENT = 64  # compare's generator input
_QUICK_VOCABULARY = 63  # the KJV corpus's characters, which compare trains it on
_CLIP = {"quick-lstm": 1.0, "quick-transformer": 1.0}  # compare clips the language models' gradients
COMPILED = "+compile"
"""A configuration's name with this suffix (``fp8-hybrid+compile``) runs its model under
``torch.compile`` (forward and backward; the optimizer step stays eager), with
``emulate_precision_casts`` so that a recipe's compiled results are its eager ones."""


def is_config(name: str) -> bool:
    """Whether ``name`` is a configuration :func:`run_step_bench` runs (one of
    :data:`CONFIGS`, optionally with the :data:`COMPILED` suffix)."""
    return name.removesuffix(COMPILED) in CONFIGS


def torchao_float8_available() -> str | None:
    """None where torchao's float8 training imports, else why not (torchao is optional)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: skip the peer
        return f"torchao.float8 does not import ({type(error).__name__}: {error})"
    return None


@dataclass(frozen=True)
class StepRow:
    """One model under one configuration: ``ms`` the median step, ``x_fp32`` its ratio
    to FP32 eager's in the same run."""

    model: str
    config: str
    ms: float
    x_fp32: float
    param_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    saved_ratio_to_fp32: float
    parameters: int = 0

    @property
    def bytes_per_parameter(self) -> float:
        """Weights (masters and this step's rounded weights) plus optimizer state, per parameter."""
        return (self.param_bytes + self.optimizer_bytes) / max(self.parameters, 1)

    def as_record(self) -> dict[str, object]:
        """The row as a JSON-ready dict."""
        return {**asdict(self), "bytes_per_parameter": self.bytes_per_parameter}


class _BlockWithHead(nn.Module):
    """The benchmark's Transformer workload: one block on input embeddings, a linear head."""

    def __init__(self, width: int = 256, heads: int = 4, vocabulary: int = 96) -> None:
        super().__init__()
        self.block = TransformerBlock(width, heads)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def transformer_block(width: int = 256, heads: int = 4) -> nn.Module:
    """The benchmark's Transformer block (d=256, 4 heads by default) with a head."""
    return _BlockWithHead(width, heads)


def mlp(width: int = 1024, layers: int = 4) -> nn.Module:
    """The benchmark's MLP: ``layers`` x Linear(width) with ReLUs between."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*modules)


def quick_transformer() -> nn.Module:
    """The quick-budget ``compare`` Transformer: its character GPT at that budget's sizes."""
    budget = _QUICK_TRANSFORMER
    return CharGPT(_QUICK_VOCABULARY, width=budget.width, layers=budget.layers, context=budget.sequence)


def _quick_lstm() -> nn.Module:
    return CharLSTM(_QUICK_VOCABULARY, hidden=_QUICK_LSTM.width, layers=_QUICK_LSTM.layers)


def _quick_cnn() -> nn.Module:
    return resnet_style_cnn(width=_QUICK_CNN.width, stem_stride=2)


_Optimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _sgd(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.01, momentum=0.9)


def _quick_adamw(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=_QUICK_TRANSFORMER.lr)  # compare's optimizer for it


def _quick_lstm_adamw(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=_QUICK_LSTM.lr)


def _quick_adam(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=_QUICK_CNN.lr)


def _workload(name: str, batch_scale: float
              ) -> tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor, _Optimizer]:
    """A model's builder, input, target and optimizer."""
    generator = torch.Generator().manual_seed(0)
    if name in ("quick-transformer", "quick-lstm"):
        budget = _QUICK_TRANSFORMER if name == "quick-transformer" else _QUICK_LSTM
        batch, sequence = max(2, int(budget.batch * batch_scale)), budget.sequence
        tokens = torch.randint(0, _QUICK_VOCABULARY, (batch, sequence + 1), generator=generator)
        if name == "quick-lstm":
            return _quick_lstm, tokens[:, :-1], tokens[:, 1:], _quick_lstm_adamw
        return quick_transformer, tokens[:, :-1], tokens[:, 1:], _quick_adamw
    if name == "quick-cnn":
        batch = max(2, int(_QUICK_CNN.batch * batch_scale))
        images = torch.rand(batch, 1, 28, 28, generator=generator) * 2 - 1  # compare maps [0, 1] to [-1, 1]
        return _quick_cnn, images, torch.randint(0, 10, (batch,), generator=generator), _quick_adam
    if name == "cnn":
        batch = max(2, int(128 * batch_scale))
        x = torch.randn(batch, 1, 28, 28, generator=generator)
        return resnet_style_cnn, x, torch.randint(0, 10, (batch,), generator=generator), _sgd
    if name == "mlp":
        batch = max(2, int(512 * batch_scale))
        x = torch.randn(batch, 1024, generator=generator)
        return mlp, x, torch.randint(0, 1024, (batch,), generator=generator), _sgd
    batch = max(2, int(32 * batch_scale))
    x = torch.randn(batch, 128, 256, generator=generator)
    return transformer_block, x, torch.randint(0, 96, (batch, 128), generator=generator), _sgd


def _float8_filter(module: nn.Module, name: str) -> bool:
    # torchao's float8 GEMMs need both dimensions a multiple of 16
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _tensor_bytes([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)])


class _Run:
    """One model under one configuration, built and ready to step."""

    def __init__(self, model_name: str, config: str, batch_scale: float, kernels: KernelMode = "auto") -> None:
        self.clip = _CLIP.get(model_name)
        self.compiled = config.endswith(COMPILED)
        config = config.removesuffix(COMPILED)
        build, self.x, self.y, make_optimizer = _workload(model_name, batch_scale)
        torch.manual_seed(0)
        self.model = build()
        if config == TORCHAO_FLOAT8:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            convert_to_float8_training(self.model, config=Float8LinearConfig(emulate=True),
                                       module_filter_fn=_float8_filter)
        self.optimizer = make_optimizer(self.model.parameters())
        self.autocast = None
        if config.startswith("autocast-"):
            self.autocast = torch.bfloat16 if config.endswith("bf16") else torch.float16
        self.wrapped = None
        self.kernels = kernels
        if config in RECIPES and config != "fp32":
            self.model, self.wrapped = prepare(self.model, self.optimizer, config)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if self.compiled else self.model)

    def loss(self, eager: bool = False) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else nullcontext()
        compiled = self.compiled and not eager
        faithful = inductor_config.patch(emulate_precision_casts=True) if compiled else nullcontext()
        with context, gemm_kernels(self.kernels), faithful:
            out = self.forward(self.x) if compiled else self.model(self.x)
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), self.y.reshape(-1))

    def step(self) -> None:
        loss = self.loss()
        if self.wrapped is not None:
            optimizer_step(self.wrapped, loss, clip=self.clip)  # the step compare, analyze and train take
        else:
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def parameter_count(self) -> int:
        """The model's parameters."""
        return sum(p.numel() for p in self.model.parameters())

    def bytes(self) -> dict[str, int]:
        # the eager model's bytes (a compiled graph's saved tensors are out of the hooks' sight)
        with SavedBytesCounter(exclude_from=[self.model]) as counter:
            loss = self.loss(eager=True)
        del loss
        rounded = ([t for e in engine_state(self.model).weights.values() for t in e[3].tensors() if t is not None]
                   if self.wrapped else [])
        return {
            "param_bytes": _tensor_bytes(list(self.model.parameters())) + _tensor_bytes(rounded),
            "optimizer_bytes": _optimizer_bytes(self.optimizer),
            "saved_bytes": counter.bytes,
        }


class _GanRun:
    """compare's quick-budget DCGAN under one configuration: its generator and critic with
    their Adam optimizers, one step being compare's :func:`gan_step` (the critic on real
    and generated images, then the generator through the critic), on random images and
    noise. Both networks go through :func:`prepare` under every configuration, FP32
    included, as compare runs them (the FP32 recipe converts nothing); autocast wraps
    the whole step."""

    def __init__(self, model_name: str, config: str, batch_scale: float, kernels: KernelMode = "auto") -> None:
        self.compiled = config.endswith(COMPILED)
        config = config.removesuffix(COMPILED)
        generator = torch.Generator().manual_seed(0)
        batch = max(2, int(_QUICK_GAN.batch * batch_scale))
        self.real = torch.rand(batch, 1, 28, 28, generator=generator) * 2 - 1
        self.noise = torch.randn(batch, _GAN_LATENT, generator=generator)
        self.autocast = None
        if config.startswith("autocast-"):
            self.autocast = torch.bfloat16 if config.endswith("bf16") else torch.float16
        recipe = config if config in RECIPES else "fp32"
        torch.manual_seed(0)
        self.models, self.optimizers = [], []
        for network in (Generator(_GAN_LATENT, _QUICK_GAN.width), Discriminator(_QUICK_GAN.width)):
            adam = torch.optim.Adam(network.parameters(), lr=_QUICK_GAN.lr, betas=(0.5, 0.999))
            model, optimizer = prepare(network, adam, recipe)
            self.models.append(model)
            self.optimizers.append(optimizer)
        self.forwards = [torch.compile(m) if self.compiled else m for m in self.models]
        self.kernels = kernels

    def _context(self, compiled: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(torch.autocast("cpu", dtype=self.autocast))
        stack.enter_context(gemm_kernels(self.kernels))
        if compiled:
            stack.enter_context(inductor_config.patch(emulate_precision_casts=True))
        return stack

    def step(self) -> None:
        with self._context(self.compiled):
            gan_step(*self.forwards, *self.optimizers, self.real, self.noise)

    def parameter_count(self) -> int:
        """Both networks' parameters."""
        return sum(p.numel() for m in self.models for p in m.parameters())

    def bytes(self) -> dict[str, int]:
        generator, critic = self.models
        with self._context(False), SavedBytesCounter(exclude_from=self.models) as counter:
            score = critic(generator(self.noise))  # what compare counts: the critic on generated images
        del score
        rounded = [t for m in self.models if is_converted(m) for e in engine_state(m).weights.values()
                   for t in e[3].tensors() if t is not None]
        return {
            "param_bytes": sum(_tensor_bytes(list(m.parameters())) for m in self.models) + _tensor_bytes(rounded),
            "optimizer_bytes": sum(_optimizer_bytes(o) for o in self.optimizers),
            "saved_bytes": counter.bytes,
        }


def run_step_bench(
    models: Sequence[str] = DEFAULT_MODELS,
    configs: Sequence[str] = CONFIGS,
    repeats: int = 3,
    batch_scale: float = 1.0,
    on_step: Callable[[str], None] | None = None,
    kernels: KernelMode = "auto",
) -> list[StepRow]:
    """Every model under every configuration, FP32 first (the baseline of the ratios).
    The configurations of a model are timed in interleaved rounds (one step of each per
    round, median over rounds), so drift of the shared machine hits them alike.
    ``kernels`` is the GEMM kernel policy of the mixprec recipes. The torchao peer is
    left out where torchao does not import (:func:`torchao_float8_available` says why)."""
    # Compiled configurations share code objects (the model's forward, mixprec's ops),
    # each model with guards of its own: beyond dynamo's default 8 entries per code
    # object the later configurations would fall back to eager and time that.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        return _run_step_bench(models, configs, repeats, batch_scale, on_step, kernels)


def _run_step_bench(models: Sequence[str], configs: Sequence[str], repeats: int, batch_scale: float,
                    on_step: Callable[[str], None] | None, kernels: KernelMode) -> list[StepRow]:
    rows = []
    notify = on_step or (lambda label: None)
    skip = {TORCHAO_FLOAT8} if TORCHAO_FLOAT8 in configs and torchao_float8_available() is not None else set()
    for model_name in models:
        # the GAN has no linear layer torchao's float8 would convert: that row would be FP32's
        left_out = skip | ({TORCHAO_FLOAT8} if model_name == "quick-gan" else set())
        names = ("fp32", *[c for c in configs if c != "fp32" and c not in left_out])
        runs = {}
        for config in names:
            notify(f"{model_name} {config}")
            run = runs[config] = (_GanRun if model_name == "quick-gan" else _Run)(model_name, config, batch_scale,
                                                                                    kernels)
            # warm-up; a compiled model compiles at its first step and, under delayed
            # scaling, recompiles at its second (the amax histories exist from then on)
            median_seconds(run.step, repeats=1, warmup=2 if run.compiled else 1)
        times: dict[str, list[float]] = {config: [] for config in names}
        for _ in range(repeats):
            for config in names:
                times[config].append(median_seconds(runs[config].step, repeats=1, warmup=0))
        medians = {config: statistics.median(values) for config, values in times.items()}
        sizes = {config: runs[config].bytes() for config in names}
        for config in names:
            rows.append(StepRow(
                model=model_name, config=config, ms=medians[config] * 1e3,
                x_fp32=medians[config] / medians["fp32"],
                param_bytes=sizes[config]["param_bytes"], optimizer_bytes=sizes[config]["optimizer_bytes"],
                saved_bytes=sizes[config]["saved_bytes"],
                saved_ratio_to_fp32=sizes[config]["saved_bytes"] / max(sizes["fp32"]["saved_bytes"], 1),
                parameters=runs[config].parameter_count(),
            ))
    return rows
