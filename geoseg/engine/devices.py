"""Devices, precision and torch.distributed set-up for training."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from geoseg.errors import ConfigError

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


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` refuses a machine without GPU.

    Raises:
        ConfigError: CUDA asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA GPU is available; use --device cpu or auto")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device should be one of 'auto', 'cpu', 'cuda', got {name!r}")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Autocast dtype (None: full fp32) and whether to use a GradScaler.

    ``"auto"``: bf16 on GPUs that support it (fp16 + GradScaler on older GPUs),
    bf16 on CPUs with native bf16, else fp32. ``"32"`` is always fp32.

    Raises:
        ConfigError: fp16 asked for on a CPU, or an unknown value.
    """
    if precision == "32":
        return None, False
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
        return (torch.bfloat16, False) if cpu_supports_bf16() else (None, False)
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "16":
        if not cuda:
            raise ConfigError("train.precision '16' (fp16) needs a CUDA GPU; use 'bf16' or '32' on CPU")
        return torch.float16, True
    raise ConfigError(f"precision should be one of 'auto', '32', 'bf16', '16', got {precision!r}")


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
    device = resolve_device(device_name, local_rank=local_rank)
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
