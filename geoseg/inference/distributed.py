"""Prediction over many scenes under torchrun: scenes sharded by rank, one merged layer.

``torchrun --nproc_per_node N -m geoseg predict SCENES... --out roofs.gpkg``
starts N processes. Each predicts its share of the scenes (largest first to
the least loaded rank, so ranks finish together) on its own GPU, writes each
scene's polygons to a partial layer in rank 0's temporary folder beside the
output (geoseg.publish), and rank 0 merges the partial layers, in the order the
scenes were given, into the one output.
The ranks agree after every phase, so one rank's failure fails the whole run
and no output appears, as in a single process.

Coordination uses a gloo process group on every device: only a few small
Python objects travel between ranks, never tensors.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from geoseg.errors import GeosegError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits for the others at a collective (a big scene on one rank takes long).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    """This process's place among the prediction ranks (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def shard_from_env() -> Shard:
    """The rank, world size and local rank torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    return Shard(rank=int(os.environ.get("RANK", "0")), world=world,
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def assign_scenes(sizes: Sequence[int], world: int) -> list[int]:
    """The rank of each scene: largest scene first to the least loaded rank (ties: lower rank).

    Deterministic, so every rank computes the same assignment without talking.
    """
    load = [0] * world
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        ranks[i] = r
        load[r] += sizes[i]
    return ranks


def rank_device(device: str, shard: Shard) -> str:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) when CUDA is used."""
    if not shard.active or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    return device


def partial_path(folder: Path, index: int) -> Path:
    """The partial layer of scene ``index`` in the run's temporary folder of partial layers."""
    return folder / f"scene{index:05d}.gpkg"


class RankGroup:
    """The gloo process group of a prediction job (joined on entry, left on exit if we made it)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._owned = False

    def __enter__(self) -> "RankGroup":
        import torch.distributed as dist

        if self.shard.active and not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
            self._owned = True
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (just ``[value]`` outside torchrun)."""
        if not self.shard.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.shard.world
        dist.all_gather_object(out, value)
        return out

    def run(self, step: Callable[..., T], *args: Any) -> T:
        """``step(*args)`` on this rank, then agree with every rank on how their steps went.

        Every rank reaches the agreement even when its step fails, or the others would wait
        forever. This rank's own error is raised as it is.

        Raises:
            GeosegError: Another rank's step failed (named with the first failing rank's message).
        """
        try:
            value = step(*args)
        except Exception as exc:
            self.gather(_describe(exc))
            raise
        failed = [(r, e) for r, e in enumerate(self.gather(None)) if e is not None]
        if failed:
            rank, message = failed[0]
            raise GeosegError(f"rank {rank} of {self.shard.world} failed: {message}")
        return value


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def write_partials(frames: Sequence[tuple[int, Any]], folder: Path) -> list[Path]:
    """Write each (scene index, polygons) of this rank to its partial layer in ``folder``."""
    from geoseg.export import write_polygons

    written = []
    for index, frame in frames:
        path = partial_path(folder, index)
        write_polygons(frame, path, overwrite=True, style=False)
        written.append(path)
    return written


def read_partials(folder: Path, indices: Sequence[int]) -> list[Any]:
    """The partial layers of ``indices`` in ``folder``, in that order, each in its scene's own CRS."""
    import geopandas as gpd

    from geoseg.export import LAYER

    frames = []
    for index in indices:
        frame = gpd.read_file(partial_path(folder, index), layer=LAYER)
        frames.append(frame)
    return frames
