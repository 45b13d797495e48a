"""Multi-process training on PyTorch's own engines: ``DistributedDataParallel``
(:func:`wrap_ddp`, gradient all-reduce in fp32/fp16/bf16/e5m2 with counted bytes) and
FSDP2 (:func:`fully_shard`: torch's ``fully_shard`` on a converted model), with what all
ranks must agree on (skipped steps in :class:`mixprec.GradScaler`; per-tensor FP8 scales
in :func:`agree_on_scales`), sharded checkpoints (:func:`save_checkpoint`,
:func:`load_checkpoint`, ``torch.distributed.checkpoint``) and, for tests and the
``mixprec train --nproc`` command, a local launcher on torchrun's own API (:func:`run_processes`).

The order is always: the plain model, ``mixprec.convert`` (or ``mixprec.prepare``),
then DDP or FSDP2. See docs/distributed.md.
"""

from __future__ import annotations

import torch.distributed as dist

if dist.is_available():
    # torch.distributed.nn.functional binds ``group.WORLD`` as the default argument of
    # ten functions when it is first imported, and the first torch optimizer and DDP import it lazily
    # (DDP through torch.distributed._shard), i.e. after init_process_group:
    # the default process group is then referenced for ever, destroy_process_group
    # cannot free it, and its gloo worker threads (and rank 0's TCPStore server thread)
    # run on until the interpreter exits and are torn down there, racing the other ranks'
    # exits: the likely source of a rare ``terminate called without an active exception``
    # (SIGABRT, issue 14).
    # Imported here, before any process group exists, the defaults are None.
    import torch.distributed.nn  # noqa: F401

from mixprec.distributed.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from mixprec.distributed.collectives import broadcast_object_tensor, collective_device
from mixprec.distributed.consensus import AmaxConsensus, agree_on_scales, check_same_recipe
from mixprec.distributed.ddp import COMM_FORMATS, CommState, comm_hook, resolve_comm_format, sync_from_rank0, wrap_ddp
from mixprec.distributed.fsdp import FSDPCommState, count_fsdp_comm, default_blocks, fully_shard, is_sharded
from mixprec.distributed.launch import WorkerFailedError, default_backend, init_from_env, run_processes

__all__ = [
    "COMM_FORMATS",
    "resolve_comm_format",
    "CommState",
    "comm_hook",
    "wrap_ddp",
    "sync_from_rank0",
    "fully_shard",
    "default_blocks",
    "is_sharded",
    "FSDPCommState",
    "count_fsdp_comm",
    "AmaxConsensus",
    "agree_on_scales",
    "check_same_recipe",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "collective_device",
    "broadcast_object_tensor",
    "run_processes",
    "init_from_env",
    "WorkerFailedError",
    "default_backend",
]
