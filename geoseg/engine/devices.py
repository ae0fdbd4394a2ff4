"""torch.distributed set-up for training: rank context, process group, sums over ranks, seeding.

Device and precision choices live in :mod:`geoseg.devices`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from geoseg.devices import resolve_device

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when RANK/WORLD_SIZE say so (NCCL on GPUs, gloo on CPU).

    Returns:
        The rank context (``owned``: this call created the group and must
        destroy it) and the device of this rank.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank, setting="train.device")
    if world <= 1:
        return DistContext(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owned = True
    logger.info("distributed training: rank %d of %d on %s", rank, world, device)
    return DistContext(rank=rank, world=world, local_rank=local_rank, owned=owned), device


def all_reduce_sum(values: Sequence[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum numbers over all ranks (float64; unchanged outside DDP)."""
    if not ctx.active:
        return [float(v) for v in values]
    import torch.distributed as dist

    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same seed on every rank: identical initial weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
