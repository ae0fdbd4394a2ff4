"""Benchmark: model-only vs end-to-end prediction throughput, stage times, memory, FLOP use.

Everything is measured in one run on the same chips and settings, so the
ratios hold on a noisy machine: (a) model-only chips/s on pre-loaded tensors,
(b) end-to-end ``predict_scene`` chips/s on a scene (reading, normalising,
blending, writing and vectorising included), (c) their ratio, (d) the time
per stage, (e) peak memory, (f) model FLOP utilisation against a matmul
measured in the same run, and the fp32 per-chip loop that the seed notebook
and most tools use, as a baseline. ``scaling`` runs predict in a fresh process
per scene size to show how time and peak memory grow with the scene.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from geoseg.errors import ConfigError
from geoseg.temporaries import temporary_folder

log = logging.getLogger(__name__)

#: Side of the square matmul used as the machine's achievable FLOP rate.
MATMUL_SIZE = 2048
#: Chips timed in the fp32 per-chip baseline loop (it is slow; a sample suffices).
BASELINE_CHIPS = 12
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


@dataclass
class BenchmarkResult:
    """The numbers of one benchmark run (``to_dict`` gives the JSON object)."""

    model: str
    device: str
    precision: str
    threads: int
    batch_size: int
    chip_size: int
    overlap: int
    scene: str
    scene_size: tuple[int, int]
    chips: int
    model_chips_per_s: float
    e2e_chips_per_s: float
    ratio: float
    baseline_chips_per_s: float
    speedup_vs_baseline: float
    stages: dict[str, float]
    e2e_seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    flops_per_chip: float
    matmul_tflops: float
    mfu: float
    repeats: int
    e2e_runs: list[float] = field(default_factory=list)
    compiled: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _peak_rss_mb() -> float:
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


def matmul_flops(device: Any, dtype: Any, *, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s on ``device`` in ``dtype`` (median of ``repeats``)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / statistics.median(times)


def model_flops(model: Any, *, in_channels: int, chip_size: int) -> float:
    """FLOPs of one forward pass on one chip (multiply-adds count as 2), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_channels, chip_size, chip_size)
    was_training = model.training
    model.eval().cpu()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def baseline_loop(
    model: Any, scene: Path, meta: Any, *, chips: int = BASELINE_CHIPS, overlap: int
) -> float:
    """Chips/s of the per-chip fp32 loop most tools run: read, normalise, forward, argmax, one at a time.

    Batch 1, fp32, contiguous memory format, no background threads; the chips
    are the first ``chips`` of the same grid ``predict`` uses.
    """
    import rasterio
    import torch

    from geoseg.raster_io import read_window
    from geoseg.tiling import chip_grid

    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    mean = np.asarray(meta.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(meta.std, dtype=np.float32)[:, None, None]
    with rasterio.open(scene) as src:
        grid = chip_grid(src.width, src.height, size=meta.chip_size, stride=meta.chip_size - overlap)
        sample = grid[:chips]
        times = []
        with torch.inference_mode():
            for i, chip in enumerate([sample[0], *sample]):  # first one is warm-up
                t0 = time.perf_counter()
                data, _ = read_window(src, chip.window, bands=meta.bands)
                x = torch.from_numpy((data.astype(np.float32) - mean) / std)[None]
                model(x).argmax(1).numpy()
                if i:
                    times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def _benchmark_model(
    model_path: str | os.PathLike[str] | None, *, arch: str, encoder: str, chip_size: int
) -> tuple[Any, Any, str]:
    from geoseg.inference.job import load_model
    from geoseg.checkpoints import CheckpointMeta
    from geoseg.models import create_model

    if model_path is not None:  # a checkpoint, or an exported .onnx model (ONNX Runtime)
        model, meta = load_model(model_path)
        return model, meta, str(model_path)
    model = create_model(arch=arch, encoder=encoder, encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch=arch, encoder=encoder, in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=IMAGENET_MEAN, std=IMAGENET_STD, chip_size=chip_size,
    )
    return model, meta, f"{arch}/{encoder} (random weights)"


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


def run_benchmark(
    *,
    model_path: str | os.PathLike[str] | None = None,
    arch: str = "deeplabv3plus",
    encoder: str = "resnet50",
    scene: str | os.PathLike[str] | None = None,
    size: tuple[int, int] = DEFAULT_SCENE_SIZE,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    overlap: int | None = None,
    repeats: int = 3,
    chip_size: int = 256,
    threads: int | None = None,
    baseline_chips: int = BASELINE_CHIPS,
    compile: bool = False,
    progress: ProgressFn | None = None,
) -> BenchmarkResult:
    """Measure model-only and end-to-end throughput and everything around it, in one run.

    Args:
        model_path: Checkpoint to benchmark; None builds ``arch``/``encoder`` with random weights.
        arch: smp architecture when no checkpoint is given.
        encoder: smp encoder when no checkpoint is given.
        scene: Scene to predict; None generates one of ``size`` in a temporary folder.
        size: (width, height) in pixels of the generated scene.
        batch_size: Chips per model call (both measurements).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"``, ``"32"``, ``"bf16"``, ``"16"`` or ``"int8"`` (the model
            quantised by :mod:`geoseg.quantize`, calibrated on the scene; untimed, as a compile).
        overlap: Chip overlap in pixels (None: a quarter of the chip).
        repeats: Timed repeats of each measurement (medians are reported).
        chip_size: Chip size when no checkpoint is given (pixels).
        threads: Torch CPU threads (None: geoseg's default).
        baseline_chips: Chips timed in the fp32 per-chip loop.
        compile: ``torch.compile`` the model for both measurements (the compile is
            warm-up: it happens in the first, untimed model-only batch).
        progress: Called with a short description before each stage.

    Returns:
        The measurements.

    Raises:
        ConfigError: Bad size, batch size, repeats, device or precision.
        CheckpointError: Unreadable checkpoint.
        InputFileError: Unreadable scene.
    """
    import torch

    from geoseg.devices import precision_name, resolve_device, resolve_precision, torch_threads, wants_int8
    from geoseg.inference import model_throughput, predict_scene
    from geoseg.raster_io import check_local, open_scene
    from geoseg.tiling import chip_grid

    if repeats < 1:
        raise ConfigError(f"repeats should be at least 1, got {repeats}")
    if scene is not None:
        check_local(scene)  # before Path(), which collapses the // of a URL; and before any work
    say = progress or (lambda _msg: None)
    dev = resolve_device(device, setting="device")
    dtype = resolve_precision("32" if precision == "int8" else precision, dev, setting="precision").dtype
    model, meta, model_name = _benchmark_model(model_path, arch=arch, encoder=encoder, chip_size=chip_size)
    chip = int(meta.chip_size)
    overlap = chip // 4 if overlap is None else int(overlap)
    flops = model_flops(model, in_channels=len(meta.bands), chip_size=chip)

    with temporary_folder(name="bench") as tmp:
        work = Path(tmp)
        if scene is None:
            say(f"generating a {size[0]}x{size[1]} scene")
            scene_path = make_large_scene(work / "scene.tif", *size, terraces=_terraces_for(meta))
        else:
            scene_path = Path(scene)
        info = open_scene(scene_path)
        n_chips = len(chip_grid(info.width, info.height, size=chip, stride=chip - overlap))
        torch_model = model  # the fp32 per-chip baseline stays the torch model
        if wants_int8(precision, dev, n_chips):
            say("int8: export, calibration on the scene, quantisation")
            from geoseg.quantize import int8_model

            (work / "int8").mkdir()
            model, meta = int8_model((model, meta), [scene_path], work / "int8")
            precision, dtype = "32", None  # the int8 graph runs in its own precision

        say("matmul peak")
        with torch_threads(threads if dev.type == "cpu" else torch.get_num_threads()):
            mm = matmul_flops(dev, dtype or torch.float32)  # same thread count as the model

        say("model only")
        model_runs = []
        e2e_runs: list[float] = []
        stage_runs: list[dict[str, float]] = []
        seconds_runs: list[float] = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # Interleave the two measurements so that machine noise hits both alike.
        for i in range(repeats):
            tp = model_throughput(
                model, in_channels=len(meta.bands), chip_size=chip, classes=meta.classes,
                batch_size=batch_size, device=str(dev), precision=precision, repeats=3,
                warmup=1 if i == 0 else 0, threads=threads, compile=compile,
            )
            model_runs.append(tp.chips_per_s)
            say(f"end to end, run {i + 1}/{repeats}")
            res = predict_scene(
                scene_path, model, meta, mask_out=work / f"mask{i}.tif", polygons=True,
                batch_size=batch_size, overlap=overlap, device=str(dev), precision=precision,
                threads=threads, temp_dir=work, compile_model=compile, min_area=0.0, simplify=0.0,
            )
            e2e_runs.append(res.chips_per_s)
            stage_runs.append(dict(res.stages))
            seconds_runs.append(res.seconds)
        say("fp32 per-chip baseline")
        base = baseline_loop(torch_model, scene_path, meta, chips=baseline_chips, overlap=overlap)

    model_cps = statistics.median(model_runs)
    e2e_cps = statistics.median(e2e_runs)
    best = e2e_runs.index(sorted(e2e_runs)[len(e2e_runs) // 2])
    return BenchmarkResult(
        model=model_name, device=str(dev), precision=getattr(model, "precision", None) or precision_name(dtype),
        threads=tp.threads,
        batch_size=batch_size, chip_size=chip, overlap=overlap, scene=str(scene or "generated"),
        scene_size=(info.width, info.height), chips=n_chips,
        model_chips_per_s=round(model_cps, 3), e2e_chips_per_s=round(e2e_cps, 3),
        ratio=round(e2e_cps / model_cps, 3), baseline_chips_per_s=round(base, 3),
        speedup_vs_baseline=round(e2e_cps / base, 2),
        stages={k: round(v, 3) for k, v in stage_runs[best].items()},
        e2e_seconds=round(seconds_runs[best], 3), peak_rss_mb=round(_peak_rss_mb(), 1),
        peak_gpu_mb=(round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None),
        flops_per_chip=flops, matmul_tflops=round(mm / 1e12, 4),
        mfu=round(model_cps * flops / mm, 4), repeats=repeats, e2e_runs=[round(x, 3) for x in e2e_runs],
        compiled=compile,
    )


@dataclass(frozen=True)
class ScalingPoint:
    """Time and peak memory of predicting one scene size in a fresh process."""

    width: int
    height: int
    chips: int
    seconds: float
    chips_per_s: float
    peak_rss_mb: float
    stages: dict[str, float] = field(default_factory=dict)
    polygons: int = 0  # streamed to disk and written as geoseg predict writes them


def _terraces_for(meta: Any) -> float:
    """Terraces in generated scenes: for an instances model, the touching houses it is for."""
    return INSTANCE_TERRACES if getattr(meta, "target", "footprint") == "instances" else 0.0


def scaling(
    sizes: Sequence[int],
    *,
    model_path: str | os.PathLike[str] | None = None,
    arch: str = "deeplabv3plus",
    encoder: str = "resnet50",
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    progress: ProgressFn | None = None,
) -> list[ScalingPoint]:
    """Predict square scenes of each size, each in a fresh process, recording time and peak RSS.

    A fresh process per size makes each peak its own (ru_maxrss never goes down).
    """
    say = progress or (lambda _msg: None)
    points = []
    terraces = 0.0
    if model_path is not None:
        from geoseg.checkpoints import read_checkpoint

        terraces = _terraces_for(read_checkpoint(model_path).meta)
    with temporary_folder(name="scaling") as tmp:
        for n in sizes:
            scene = Path(tmp) / f"scene_{n}.tif"
            say(f"writing a {n}x{n} scene")
            make_large_scene(scene, n, n, terraces=terraces)
            args = {
                "scene": str(scene), "model_path": None if model_path is None else str(model_path),
                "arch": arch, "encoder": encoder, "batch_size": batch_size, "device": device,
                "precision": precision, "out": str(Path(tmp) / f"mask_{n}.tif"), "compile": compile,
            }
            say(f"predicting {n}x{n} in a fresh process")
            proc = subprocess.run(
                [sys.executable, "-m", "geoseg.benchmark", json.dumps(args)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                raise ConfigError(f"scaling run at {n}x{n} failed: {tail[0]}")
            points.append(ScalingPoint(**json.loads(proc.stdout.strip().splitlines()[-1])))
            scene.unlink()
    return points


def _int8_for(precision: str, device: str, scene: str | os.PathLike[str], meta: Any) -> bool:
    """Whether predicting ``scene`` in ``precision`` runs an int8 model (``geoseg.devices.wants_int8``)."""
    from geoseg.devices import resolve_device, wants_int8
    from geoseg.raster_io import open_scene
    from geoseg.tiling import chip_grid

    if precision not in ("int8", "auto"):
        return False
    info, chip = open_scene(scene), int(meta.chip_size)
    chips = len(chip_grid(info.width, info.height, size=chip, stride=chip - chip // 4))
    return wants_int8(precision, resolve_device(device, setting="device"), chips)


def _scaling_worker(args: dict[str, Any]) -> dict[str, Any]:
    from geoseg.inference import predict_scene

    model, meta, _ = _benchmark_model(
        args["model_path"], arch=args["arch"], encoder=args["encoder"], chip_size=256
    )
    from geoseg.export import PolygonSpool

    folder = Path(args["out"]).parent
    precision = args["precision"]
    if _int8_for(precision, args["device"], args["scene"], meta):
        from geoseg.quantize import int8_model

        (folder / "int8").mkdir(exist_ok=True)
        model, meta = int8_model((model, meta), [args["scene"]], folder / "int8")  # untimed, as a compile
        precision = "32"  # the int8 graph runs in its own precision
    spool = PolygonSpool(folder)  # as geoseg predict: polygons streamed to disk, then the layer written
    res = predict_scene(
        args["scene"], model, meta, mask_out=args["out"], polygons=True,
        batch_size=args["batch_size"], device=args["device"], precision=precision,
        temp_dir=str(folder), compile_model=bool(args.get("compile", False)), polygon_sink=spool.append,
        min_area=0.0, simplify=0.0,
    )
    spool.write(folder / "roofs.gpkg", overwrite=True)
    for p in (spool.path, folder / "roofs.gpkg"):
        p.unlink(missing_ok=True)
    return {
        "width": res.width, "height": res.height, "chips": res.chips_predicted,
        "seconds": round(res.seconds, 2), "chips_per_s": round(res.chips_per_s, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "stages": {k: round(v, 3) for k, v in res.stages.items()},
        "polygons": res.polygon_count,
    }


if __name__ == "__main__":  # the subprocess entry of scaling(); prints one JSON line
    sys.stdout.write(json.dumps(_scaling_worker(json.loads(sys.argv[1]))) + "\n")
