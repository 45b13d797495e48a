"""``mixprec train``: a model trained by N processes with DistributedDataParallel (a
gradient-communication format) or FSDP2 (``shard``), under a mixprec recipe. The model
(``--model``) is the Fashion-MNIST CNN or the character-level Transformer LM of
``mixprec compare`` on the King James Bible; one loop trains both, the model, data, loss
and metric chosen by a small task object.

Every rank builds the float model from the seed, prepares it and wraps it in DDP
(:func:`mixprec.distributed.wrap_ddp`), or converts it and shards it
(:func:`mixprec.distributed.fully_shard` per block (the CNN's residual blocks, the
Transformer's blocks) and at the root, then Adam over the sharded masters and a
:class:`mixprec.GradScaler`), and trains on its slice of each global batch: the global
batch is drawn from the seed and the step alone (images from one permutation per
epoch; text windows at random offsets), and rank r takes rows ``[r B/N, (r+1) B/N)``, so
the data seen per step does not depend on N. Under DDP rank 0 writes checkpoints (one
file, atomically); under FSDP2 every rank writes its shards into a
``torch.distributed.checkpoint`` directory. Every rank loads them on resume. Launch it
with ``mixprec train --nproc N`` (torchrun's launcher, N processes on localhost) or
with ``torchrun --standalone --nproc-per-node N -m mixprec train ...``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixprec.amp import GradScaler
from mixprec.distributed import (
    count_fsdp_comm,
    default_blocks,
    fully_shard,
    init_from_env,
    load_checkpoint,
    read_checkpoint_info,
    resolve_comm_format,
    run_processes,
    save_checkpoint,
    wrap_ddp,
)
from mixprec.nn.convert import convert
from mixprec.experiments.data import load_fashion_mnist, load_kjv
from mixprec.experiments.models import CharGPT, resnet_style_cnn
from mixprec.experiments.steps import classifier_loss, language_loss, optimizer_step
from mixprec.recipe import get_recipe
from mixprec.amp import prepare

__all__ = ["TRAIN_MODELS", "DistributedTrainConfig", "train", "train_worker", "parameter_digest"]

TRAIN_MODELS = {"cnn": 16, "transformer": 64}
"""The models ``mixprec train`` trains, and each one's default width (CNN channels, the
Transformer's model dimension)."""


@dataclass(frozen=True)
class DistributedTrainConfig:
    """One distributed training run. ``model`` is ``cnn`` (the Fashion-MNIST ResNet,
    ``global_batch`` images a step) or ``transformer`` (the character-level GPT of
    ``mixprec compare --model transformer`` on the King James Bible, ``global_batch``
    windows of ``sequence`` characters a step, ``layers`` blocks); ``width`` 0 takes the
    model's default (:data:`TRAIN_MODELS`). ``checkpoint`` is a file rank 0 writes every
    ``checkpoint_every`` steps (0: only at the end) and at the end; ``resume`` continues
    from it (same model, sizes, recipe, comm, global batch and world size). ``stop_after``
    ends the run early (as an interruption would) while ``steps`` still names the planned
    length. ``eval_examples`` test images (CNN) or held-out windows (Transformer) are
    evaluated at the end. ``shard`` trains with FSDP2 instead of DDP (gradients
    reduce-scattered in FP32, so ``comm`` stays fp32; ``checkpoint`` is then a
    directory)."""

    model: str = "cnn"
    recipe: str = "fp16"
    comm: str = "fp32"
    steps: int = 200
    global_batch: int = 128
    lr: float = 2e-3
    width: int = 0
    layers: int = 2
    sequence: int = 64
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    stop_after: int | None = None
    data_dir: str | None = None
    eval_examples: int = 2000
    result_path: str | None = None
    shard: bool = False

    def __post_init__(self) -> None:
        if self.model not in TRAIN_MODELS:
            raise ValueError(f"mixprec train trains {' or '.join(TRAIN_MODELS)} (--model), not {self.model!r}")
        get_recipe(self.recipe)
        resolve_comm_format(self.comm)
        if (self.steps < 1 or self.global_batch < 1 or self.width < 0 or self.layers < 1 or self.sequence < 2
                or self.checkpoint_every < 0 or self.eval_examples < 1):
            raise ValueError("steps, global batch, layers and evaluation examples must be >= 1, sequence >= 2, "
                             "width and checkpoint_every >= 0")
        if self.model == "transformer" and self.model_width % 4:
            raise ValueError(f"the Transformer has 4 attention heads: its width must be a multiple of 4, "
                             f"not {self.model_width}")
        if self.shard and resolve_comm_format(self.comm) != "fp32":
            raise ValueError(f"--shard reduce-scatters gradients in fp32 (FSDP2); --comm {self.comm} chooses DDP's "
                             "all-reduce format: leave it out with --shard")
        if self.resume and self.checkpoint is None:
            raise ValueError("resume needs the checkpoint file to resume from (--checkpoint PATH)")

    @property
    def model_width(self) -> int:
        """``width``, or the model's default when it is 0."""
        return self.width or TRAIN_MODELS[self.model]

    def check_world(self, world_size: int) -> None:
        """Raise if the global batch cannot be split evenly over ``world_size`` ranks."""
        if self.global_batch % world_size:
            raise ValueError(
                f"the global batch {self.global_batch} does not split over {world_size} processes; "
                f"use a multiple of {world_size}"
            )

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the checkpoint's."""
        return {"model": self.model, "recipe": self.recipe, "comm": resolve_comm_format(self.comm),
                "global_batch": self.global_batch, "seed": self.seed, "width": self.model_width,
                "layers": self.layers, "sequence": self.sequence}


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for param in model.parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2: all-gathered (collective)
        digest.update(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _all_equal(text: str) -> bool:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text)
    return all(item == gathered[0] for item in gathered)


def _save_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # an interrupted write never leaves a torn checkpoint


def _load_checkpoint(config: DistributedTrainConfig, world: int) -> dict[str, Any]:
    """The checkpoint to resume from, checked against this run's settings."""
    assert config.checkpoint is not None
    if Path(config.checkpoint).is_dir() != config.shard:
        kind = "an FSDP2 checkpoint directory" if Path(config.checkpoint).is_dir() else "a DDP checkpoint file"
        raise ValueError(f"{config.checkpoint} is {kind}: resume it with the --shard setting that wrote it")
    if config.shard:
        info = read_checkpoint_info(config.checkpoint)
        saved = {"world_size": info["world_size"], "config": info["extra"]["config"], "step": info["extra"]["step"]}
    else:
        saved = torch.load(config.checkpoint, map_location="cpu", weights_only=False)
    # a checkpoint written before a setting existed ran with that setting's default
    fields = {field.name for field in dataclasses.fields(DistributedTrainConfig)}
    written = DistributedTrainConfig(**{k: v for k, v in saved["config"].items() if k in fields and k != "resume"})
    expected, found = config.identity(), written.identity()
    if saved["world_size"] != world or found != expected:
        raise ValueError(
            f"checkpoint {config.checkpoint} was written by {saved['world_size']} processes with {found}; "
            f"this run has {world} processes and {expected}: resume with the same settings"
        )
    return saved


# ---- what --model chooses: model, data, loss, blocks, metric ----------------------------


class _Task:
    """One model's part of the shared loop: build the model (from the seed), the blocks
    FSDP2 shards one by one, the rows of each step's global batch (from the seed and the
    step alone, so that a step sees the same data for any number of ranks and after a
    resume), the examples behind rows, the loss, and the held-out metric."""

    metric: str
    clip: float | None = None  # the gradients' total norm is clipped to this (after unscaling)

    def build(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return default_blocks(model)

    def global_rows(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def examples(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> tuple[float, int]:
        """The metric on held-out data and the number of examples it covered."""
        raise NotImplementedError


class _ImageTask(_Task):
    """The CNN on Fashion-MNIST: test accuracy on the first ``eval_examples`` test images."""

    metric = "test_accuracy"

    def __init__(self, config: DistributedTrainConfig) -> None:
        self.config = config
        self.images, self.labels = load_fashion_mnist("train", config.data_dir)
        self.orders: dict[int, torch.Tensor] = {}

    def build(self) -> nn.Module:
        return resnet_style_cnn(width=self.config.model_width, stem_stride=2)

    def global_rows(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step * self.config.global_batch, len(self.images))
        if epoch not in self.orders:  # one permutation per epoch, from the seed alone
            self.orders.clear()
            self.orders[epoch] = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
                self.config.seed * 10007 + epoch))
        return self.orders[epoch][position:position + self.config.global_batch]

    def examples(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[rows], self.labels[rows]

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return classifier_loss(model, inputs, targets)

    def evaluate(self, model: nn.Module) -> tuple[float, int]:
        test_images, test_labels = load_fashion_mnist("test", self.config.data_dir)
        count = min(self.config.eval_examples, len(test_images))
        logits = torch.cat([model(test_images[s:min(s + 500, count)] * 2 - 1) for s in range(0, count, 500)])
        return float((logits.argmax(1) == test_labels[:count]).float().mean()), count


class _TextTask(_Task):
    """The character-level GPT on the King James Bible (``mixprec compare --model
    transformer``'s model, data and loss; gradients clipped to norm 1 as there): bits
    per character on ``eval_examples`` windows spread over the held-out last 10%."""

    metric = "validation_bpc"
    clip = 1.0

    def __init__(self, config: DistributedTrainConfig) -> None:
        self.config = config
        self.corpus = load_kjv()
        self.train, self.validation = self.corpus.split()

    def build(self) -> nn.Module:
        return CharGPT(self.corpus.vocabulary_size, width=self.config.model_width, layers=self.config.layers,
                       context=self.config.sequence)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]  # (the longest Sequential is a block's MLP)

    def _windows(self, source: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = source[offsets[:, None] + torch.arange(self.config.sequence + 1)]
        return tokens[:, :-1], tokens[:, 1:]

    def global_rows(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 10007 + step)
        return torch.randint(0, len(self.train) - self.config.sequence - 1, (self.config.global_batch,),
                             generator=generator)

    def examples(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.train, rows)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return language_loss(model, inputs, targets)

    def evaluate(self, model: nn.Module) -> tuple[float, int]:
        count = self.config.eval_examples
        offsets = torch.linspace(0, len(self.validation) - self.config.sequence - 1, count).long()
        nats = sum(language_loss(model, *self._windows(self.validation, chunk)).item() * len(chunk)
                   for chunk in offsets.split(32))
        return nats / count / math.log(2), count


def _task(config: DistributedTrainConfig) -> _Task:
    return _ImageTask(config) if config.model == "cnn" else _TextTask(config)


def train_worker(config: DistributedTrainConfig) -> None:
    """The training loop one rank runs (the process group must be initialised: by
    torchrun, :func:`train` or :func:`mixprec.distributed.run_processes`), for every
    model: ``config.model`` chooses the model, data, loss and metric."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config.check_world(world)
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with warnings.catch_warnings():
        # The Transformer's logits are a view (torch's linear over (batch, sequence)
        # rows), which FSDP2 warns about at the root because an in-place op on them would
        # skip its backward hook; the losses here never modify them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        _train(config, rank, world)


def _train(config: DistributedTrainConfig, rank: int, world: int) -> None:
    task = _task(config)
    torch.manual_seed(config.seed)
    model = task.build()
    if config.shard:
        trainer: _Trainer = _ShardedTrainer(config, model, task.blocks(model))
    else:
        trainer = _ReplicatedTrainer(config, model)
    start = 0
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    if config.resume and checkpoint is not None and checkpoint.exists():
        start = trainer.load(checkpoint, _load_checkpoint(config, world))
    local = config.global_batch // world

    def save(step: int) -> None:
        if checkpoint is not None:
            trainer.save(checkpoint, step)
        dist.barrier()  # nobody resumes or exits before the checkpoint is complete

    end = min(config.steps, config.stop_after if config.stop_after is not None else config.steps)
    losses: list[float] = []
    skipped = 0
    started = time.perf_counter()
    for step in range(start, end):
        rows = task.global_rows(step)[rank * local:(rank + 1) * local]  # this rank's slice
        loss = task.loss(trainer.model, *task.examples(rows))
        skipped += not trainer.step(loss, task.clip)
        losses.append(loss.item())
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < end:
            save(step + 1)
    seconds = time.perf_counter() - started
    save(end)
    mean_loss = torch.tensor([sum(losses[-10:]) / max(len(losses[-10:]), 1)])
    dist.all_reduce(mean_loss)
    digest = parameter_digest(trainer.module)  # a collective under FSDP2: every rank
    agree = _all_equal(digest)
    metric, examples = float("nan"), 0
    if rank == 0 or config.shard:  # a sharded model's forward all-gathers: every rank runs it
        trainer.module.eval()
        with torch.no_grad():
            metric, examples = task.evaluate(trainer.module)
        trainer.module.train()
    if rank == 0:
        steps_run = max(end - start, 1)
        result = {
            "config": dataclasses.asdict(config), "world_size": world, "first_step": start, "last_step": end,
            "final_loss": float(mean_loss) / world, "metric_name": task.metric, "metric_value": metric,
            "eval_examples": examples, "skipped_steps": skipped, "loss_scale": trainer.scaler.get_scale(),
            "step_ms": seconds / steps_run * 1e3, "sharded": config.shard,
            "comm_payload_bytes_per_step": trainer.payload_bytes / steps_run,
            "comm_wire_bytes_per_step": trainer.wire_bytes / steps_run,
            "ranks_bitwise_equal": agree, "parameter_digest": digest,
        }
        if config.result_path:
            Path(config.result_path).parent.mkdir(parents=True, exist_ok=True)
            Path(config.result_path).write_text(json.dumps(result, indent=2))
    dist.barrier()


class _Trainer:
    """One rank's model, optimizer and scaler under DDP or FSDP2: step, save, load, bytes."""

    model: nn.Module  # what the training forward calls (the DDP wrapper, or the sharded model)
    module: nn.Module  # the model itself: evaluation (no DDP collectives), digests
    scaler: GradScaler
    payload_bytes: int
    wire_bytes: int

    def step(self, loss: torch.Tensor, clip: float | None) -> bool:
        """Backward, clip the unscaled gradients' norm to ``clip`` (None: no clipping),
        step unless they overflowed (on any rank), zero them; whether it stepped."""
        raise NotImplementedError

    def save(self, path: Path, step: int) -> None:
        raise NotImplementedError

    def load(self, path: Path, saved: dict[str, Any]) -> int:
        raise NotImplementedError


class _ReplicatedTrainer(_Trainer):
    """DDP: prepare, wrap_ddp; rank 0 writes one checkpoint file."""

    def __init__(self, config: DistributedTrainConfig, model: nn.Module) -> None:
        self.config = config
        model, self.optimizer = prepare(model, torch.optim.Adam(model.parameters(), lr=config.lr), config.recipe)
        self.model, self.comm = wrap_ddp(model, self.optimizer, config.comm)
        self.module = model
        self.scaler = self.optimizer.scaler

    payload_bytes = property(lambda self: self.comm.payload_bytes)  # type: ignore[assignment]
    wire_bytes = property(lambda self: self.comm.wire_bytes)  # type: ignore[assignment]

    def step(self, loss: torch.Tensor, clip: float | None) -> bool:
        return optimizer_step(self.optimizer, loss, clip)

    def save(self, path: Path, step: int) -> None:
        if dist.get_rank() == 0:
            _save_atomic(path, {
                "step": step, "world_size": dist.get_world_size(), "config": dataclasses.asdict(self.config),
                "model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            })

    def load(self, path: Path, saved: dict[str, Any]) -> int:
        self.model.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return int(saved["step"])


class _ShardedTrainer(_Trainer):
    """FSDP2: convert, fully_shard, Adam over the sharded masters, a GradScaler; every
    rank writes its shards with torch.distributed.checkpoint."""

    def __init__(self, config: DistributedTrainConfig, model: nn.Module, blocks: list[nn.Module]) -> None:
        self.config = config
        self.model = self.module = convert(model, config.recipe)
        self.scaler = GradScaler(config.recipe)
        fully_shard(self.model, blocks, scaler=self.scaler)
        self.comm = count_fsdp_comm(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)

    @property  # type: ignore[override]
    def payload_bytes(self) -> int:
        return self.comm.all_gather_bytes + self.comm.reduce_scatter_bytes

    @property  # type: ignore[override]
    def wire_bytes(self) -> int:
        # ring all-gather and reduce-scatter each send (N-1)/N of the full tensor: the
        # all-gather's payload is one shard (x (N-1)), the reduce-scatter's the full gradient
        n = dist.get_world_size()
        return (n - 1) * self.comm.all_gather_bytes + (n - 1) * self.comm.reduce_scatter_bytes // n

    def step(self, loss: torch.Tensor, clip: float | None) -> bool:
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            # over the sharded gradients (DTensors): the norm is reduced across ranks
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return not self.scaler.last_step_skipped

    def save(self, path: Path, step: int) -> None:
        save_checkpoint(path, self.model, self.optimizer, self.scaler,
                        extra={"step": step, "config": dataclasses.asdict(self.config)})

    def load(self, path: Path, saved: dict[str, Any]) -> int:
        return int(load_checkpoint(path, self.model, self.optimizer, self.scaler)["step"])


def train(config: DistributedTrainConfig, nproc: int | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run :func:`train_worker` on ``nproc`` processes and return rank 0's result. Under
    torchrun (RANK and WORLD_SIZE set) this process is one of the ranks: ``nproc``, if
    given, must equal WORLD_SIZE, and ranks other than 0 return an empty dict."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if nproc not in (None, world):
            raise ValueError(f"launched by torchrun with WORLD_SIZE={world}, but --nproc {nproc}; drop --nproc")
        config.check_world(world)
        init_from_env()
        with tempfile.TemporaryDirectory() as folder:
            path = config.result_path or str(Path(folder) / "result.json")
            try:
                train_worker(dataclasses.replace(config, result_path=path))
                return json.loads(Path(path).read_text()) if dist.get_rank() == 0 else {}
            finally:
                dist.destroy_process_group()
    nproc = 1 if nproc is None else nproc
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {nproc!r}")
    config.check_world(nproc)
    if config.resume and config.checkpoint is not None and Path(config.checkpoint).exists():
        _load_checkpoint(config, nproc)  # a mismatch fails here, before any process starts
    with tempfile.TemporaryDirectory() as folder:
        path = config.result_path or str(Path(folder) / "result.json")
        run_processes(train_worker, nproc, (dataclasses.replace(config, result_path=path),), timeout_s=timeout_s)
        return dict(json.loads(Path(path).read_text()))
