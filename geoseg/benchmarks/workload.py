"""What the prediction benchmarks run on: the model, generated scenes of any size, their sizes; peak memory.

Shared by the speed run (:mod:`~geoseg.benchmarks.speed`) and the scaling runs
(:mod:`~geoseg.benchmarks.scaling`), so that both benchmark the same model on
the same kind of scene and measure memory the same way.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any, Callable

from geoseg.errors import ConfigError
from geoseg.temporaries import temporary_folder

#: Default generated scene for the end-to-end measurement (pixels).
DEFAULT_SCENE_SIZE = (2048, 2048)
#: Side of the generated tile repeated to build large scaling scenes (pixels).
SCALING_TILE = 2048
#: Share of terraces (touching houses) in generated scenes when the model learned instances, so
#: that the watershed split has the work it has on real towns (the quickstart's share).
INSTANCE_TERRACES = 0.5
#: ImageNet statistics in 0-255 units (what an untrained benchmark model is given).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

ProgressFn = Callable[[str], None]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's
    own memory map. ``ru_maxrss`` is not used there: it survives ``exec``, so a
    fresh child process would report its parent's peak when that is higher.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WxH"`` or ``"N"`` (square) into (width, height) pixels.

    Raises:
        ConfigError: Not of that form, or not positive.
    """
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise ConfigError(f"size should look like WIDTHxHEIGHT in pixels (e.g. 2048x2048), got {text!r}")
    return dims[0], dims[1]


def parse_sizes(text: str) -> list[int]:
    """Parse ``"1000,5000"`` (the sides of square scenes, in pixels) into a list; empty items are skipped.

    Raises:
        ConfigError: An item that is not a whole number.
    """
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--scaling should be sizes in pixels like 1000,5000, got {text!r}") from None


#: Seed of the random weights of a benchmark run without a checkpoint.
BENCHMARK_SEED = 0


def benchmark_model(
    model_path: str | os.PathLike[str] | None, *, arch: str, encoder: str, chip_size: int
) -> tuple[Any, Any, str]:
    """(model, its description, its name in the report): a checkpoint or exported model, else random weights."""
    from geoseg.inference.job import load_model
    from geoseg.checkpoints import CheckpointMeta
    from geoseg.models import create_model

    if model_path is not None:  # a checkpoint, or an exported .onnx model (ONNX Runtime)
        model, meta = load_model(model_path)
        return model, meta, str(model_path)
    import torch

    # The same random weights in every process: what they predict (no roofs, or all rooftop) sets
    # the polygons' work, so unseeded runs of the same command measured different workloads.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BENCHMARK_SEED)
        model = create_model(arch=arch, encoder=encoder, encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch=arch, encoder=encoder, in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD, chip_size=chip_size,
    )
    return model, meta, f"{arch}/{encoder} (random weights)"


def terraces_for(meta: Any) -> float:
    """Terraces in generated scenes: for an instances model, the touching houses it is for."""
    return INSTANCE_TERRACES if getattr(meta, "target", "footprint") == "instances" else 0.0


def make_large_scene(
    path: Path, width: int, height: int, *, tile: int = SCALING_TILE, seed: int = 0, terraces: float = 0.0
) -> Path:
    """Write a ``width`` x ``height`` scene by repeating one generated tile (fast for any size).

    Generating a 20000-pixel scene roof by roof takes many minutes; repeating a
    realistic tile gives the same reading, model and writing work. ``terraces``: share
    of lots with rows of touching houses (see ``synthetic.make_scene``).
    """
    import rasterio
    from rasterio.windows import Window

    from geoseg.raster_io import GTIFF_PROFILE
    from geoseg.synthetic import make_scene

    with temporary_folder(name="tile") as tmp:
        small = make_scene(
            tmp, name="tile", width=min(tile, width), height=min(tile, height), seed=seed,
            write_roofs=False, terraces=terraces,
        )
        with rasterio.open(small.image) as src:
            pixels = src.read()
            profile = {
                **GTIFF_PROFILE, "count": 3, "dtype": "uint8", "width": width, "height": height,
                "crs": src.crs, "transform": src.transform, "photometric": "RGB",
            }
        th, tw = pixels.shape[1:]
        with rasterio.open(path, "w", **profile) as dst:
            for r in range(0, height, th):
                for c in range(0, width, tw):
                    h, w = min(th, height - r), min(tw, width - c)
                    dst.write(pixels[:, :h, :w], window=Window(c, r, w, h))
    return path
