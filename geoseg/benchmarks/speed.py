"""Prediction speed: model-only vs end-to-end throughput, stage times, memory, FLOP use.

Everything is measured in one run on the same chips and settings, so the
ratios hold on a noisy machine: (a) model-only chips/s on pre-loaded tensors,
(b) end-to-end ``predict_scene`` chips/s on a scene (reading, normalising,
blending, writing and vectorising included), (c) their ratio, (d) the time
per stage, (e) peak memory, (f) model FLOP utilisation against a matmul
measured in the same run, and the fp32 per-chip loop that the seed notebook
and most tools use, as a baseline. With ``scaling`` sizes, :func:`run_benchmark`
then predicts a scene of each size in a fresh process (:mod:`~geoseg.benchmarks.scaling`)
to show how time and peak memory grow with the scene.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geoseg.benchmarks.scaling import ScalingPoint, scaling as scaling_points
from geoseg.benchmarks.workload import (
    DEFAULT_SCENE_SIZE,
    ProgressFn,
    benchmark_model,
    make_large_scene,
    peak_rss_mb,
    terraces_for,
)
from geoseg.errors import ConfigError
from geoseg.temporaries import temporary_folder

log = logging.getLogger(__name__)

#: Side of the square matmul used as the machine's achievable FLOP rate.
MATMUL_SIZE = 2048
#: Chips timed in the fp32 per-chip baseline loop (it is slow; a sample suffices).
BASELINE_CHIPS = 12
#: The replayed end-to-end run (``replay_chips_per_s``) holds every logit of one run: up to this many chips
#: (an 8192² scene is 1,849; its bf16 logits of two classes 485 MB).
REPLAY_MAX_CHIPS = 4096


@dataclass
class BenchmarkResult:
    """The numbers of one benchmark run (``to_dict`` gives the JSON object).

    With ``tiles`` > 1 the end-to-end run predicts that many scenes of ``scene_size`` as
    ``geoseg predict`` does, sharing batches (``chips`` counts them all); ``model_calls`` is
    its number of model calls, and ``own_batches_*`` the same scenes each predicted with
    batches of its own (as every scene was before batches were shared), in the same run.
    Where a run sets scenes up ahead of their turn (a GPU, ``job.scenes_ahead``),
    ``no_ahead_chips_per_s`` is the shared-batches run without it, in the same run.
    ``replay_chips_per_s`` is the end-to-end run with the model's outputs replayed (:func:`_replay`:
    the same masks and polygons, the model's time zero): what everything around the model
    sustains on this machine, the ceiling of end to end with a model of any speed (None above
    :data:`REPLAY_MAX_CHIPS` chips).
    """

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
    scaling: list[ScalingPoint] = field(default_factory=list)
    tiles: int = 1
    model_calls: int = 0
    own_batches_chips_per_s: float | None = None
    own_batches_calls: int | None = None
    no_ahead_chips_per_s: float | None = None
    replay_chips_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``scaling`` only when scaling runs were made; the per-scene batches
        comparison only with ``tiles``)."""
        out = asdict(self)
        if not self.scaling:
            del out["scaling"]
        if self.tiles == 1:
            del out["own_batches_chips_per_s"], out["own_batches_calls"]
        if self.no_ahead_chips_per_s is None:
            del out["no_ahead_chips_per_s"]
        return out


def matmul_flops(device: Any, dtype: Any, *, size: int = MATMUL_SIZE, repeats: int = 5,
                 min_seconds: float = 0.05) -> float:
    """Achievable matmul FLOP/s on ``device`` in ``dtype`` (median of ``repeats``).

    Each timed repeat runs as many matmuls as take ``min_seconds`` (doubling them until they do
    is the warm-up): one bf16 2048-cube matmul takes 8 ms on two AMX cores, and five of those
    single calls timed right after the first measured 0.64-1.16 TFLOP/s in benchmark runs where
    a longer timing gave 2.1-2.3.
    """
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def seconds_each(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / n

    n = 1
    while seconds_each(n) * n < min_seconds:
        n *= 2
    return 2.0 * size**3 / statistics.median(seconds_each(n) for _ in range(repeats))


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

    from geoseg.augment import raw_normalisation

    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    raw_mean, raw_std, clip = raw_normalisation(meta.mean, meta.std, meta.stretch)
    mean = np.asarray(raw_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(raw_std, dtype=np.float32)[:, None, None]
    bounds = np.asarray(clip, np.float32).T[:, :, None, None] if clip else None  # (2, bands, 1, 1)
    with rasterio.open(scene) as src:
        grid = chip_grid(src.width, src.height, size=meta.chip_size, stride=meta.chip_size - overlap)
        sample = grid[:chips]
        times = []
        with torch.inference_mode():
            for i, chip in enumerate([sample[0], *sample]):  # first one is warm-up
                t0 = time.perf_counter()
                data, _ = read_window(src, chip.window, bands=meta.bands)
                values = data.astype(np.float32) if bounds is None else np.clip(data.astype(np.float32), *bounds)
                x = torch.from_numpy((values - mean) / std)[None]
                model(x).argmax(1).numpy()
                if i:
                    times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


class _Tape:
    """The logits of one end-to-end run, model call after model call, and where a replay is."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.position = 0


#: Tapes by key: the predictor runs a deep copy of the model it is given (folded batch norms), whose
#: tape must be the original's.
_TAPES: dict[int, _Tape] = {}


def _taping(model: Any, tape: _Tape) -> Any:
    """``model``, each output it gives also put on ``tape``."""
    from torch import nn

    class _Taping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.key = model, id(tape)
            self.runs_own_precision = getattr(model, "runs_own_precision", False)
            if hasattr(model, "precision"):
                self.precision = model.precision

        def forward(self, x: Any) -> Any:
            import torch

            out = self.model(x)
            # Prediction's calls (under inference mode), not the probes of folding batch norms (no_grad).
            if torch.is_inference_mode_enabled():
                _TAPES[self.key].calls.append(out.detach().clone())
            return out

    _TAPES[id(tape)] = tape
    return _Taping()


def _replay(tape: _Tape) -> Any:
    """A model that gives back ``tape``'s outputs in order (for the same chip counts), at no cost."""
    from torch import nn

    class _Replay(nn.Module):
        runs_own_precision = True  # nothing to autocast, fold or compile

        def forward(self, x: Any) -> Any:
            out = tape.calls[tape.position]
            if out.shape[0] != x.shape[0]:
                raise RuntimeError(f"replayed model call {tape.position} had {out.shape[0]} chips, this one "
                                   f"{x.shape[0]}: the runs differ")
            tape.position += 1
            return out

    return _Replay()


@dataclass(frozen=True)
class _Run:
    """One end-to-end run over the benchmark's scenes."""

    seconds: float
    chips: int
    stages: dict[str, float]
    calls: int

    @property
    def chips_per_s(self) -> float:
        return self.chips / self.seconds if self.seconds > 0 else 0.0


def _predict_run(scenes: Sequence[Path], model: Any, meta: Any, work: Path, *, shared: bool, ahead: int | None = None,
                 **options: Any) -> _Run:
    """Predict ``scenes`` one after the other (mask and polygons), with shared batches or each its own;
    shared ones set scenes up ``ahead`` (None: as ``geoseg predict`` does on the device)."""
    from geoseg.inference import predict_scene
    from geoseg.inference.batching import Batches
    from geoseg.devices import resolve_device
    from geoseg.inference.job import scenes_ahead

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if ahead is None:
            ahead = scenes_ahead(resolve_device(options["device"], setting="device"))
        batches = stack.enter_context(Batches(options["batch_size"], ahead=ahead)) if shared else None
        results = [predict_scene(path, model, meta, mask_out=work / f"mask{i}.tif", polygons=True, overwrite=True,
                                 batches=batches, **options) for i, path in enumerate(scenes)]
        if batches is not None:
            batches.flush()
    seconds = time.perf_counter() - t0
    stages: dict[str, float] = {}
    for res in results:
        for key, value in res.stages.items():
            stages[key] = stages.get(key, 0.0) + value
    calls = batches.calls if batches is not None else sum(r.batches for r in results)
    return _Run(seconds, sum(r.chips_predicted for r in results), stages, calls)


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
    scaling: Sequence[int] = (),
    scaling_resolution: str | float = "native",
    progress: ProgressFn | None = None,
    tiles: int = 1,
    replay: bool = True,
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
        scaling: Then predict a square scene of each of these sides (pixels), each in a
            fresh process (:func:`geoseg.benchmarks.scaling.scaling`), with the same model,
            batch size, device, precision and compile.
        scaling_resolution: Ground resolution the scaling runs read their scenes at
            (``predict_scene``'s ``resolution``; the generated scenes are 0.3 m).
        progress: Called with a short description before each stage.
        tiles: Predict this many generated scenes of ``size`` as one run (batches shared by the
            scenes, as ``geoseg predict`` does), and the same scenes each with its own batches
            (after one untimed tile: the first prediction's one-off costs).
        replay: Also run end to end with the model's outputs replayed (``replay_chips_per_s``:
            one more untimed run records them, then one replay per repeat), up to
            :data:`REPLAY_MAX_CHIPS` chips.

    Returns:
        The measurements (``scaling``: one point per size).

    Raises:
        ConfigError: Bad size, batch size, repeats, device or precision; a scaling run that failed.
        CheckpointError: Unreadable checkpoint.
        InputFileError: Unreadable scene.
    """
    import torch

    from geoseg.devices import precision_name, resolve_device, resolve_precision, torch_threads, wants_int8
    from geoseg.inference.job import scenes_ahead
    from geoseg.inference import model_throughput
    from geoseg.inference.runtime import prefer_heap
    from geoseg.raster_io import open_scene
    from geoseg.remote import check_local
    from geoseg.tiling import chip_grid

    if repeats < 1:
        raise ConfigError(f"repeats should be at least 1, got {repeats}")
    if tiles < 1:
        raise ConfigError(f"tiles should be at least 1 scene, got {tiles}")
    if tiles > 1 and scene is not None:
        raise ConfigError("--tiles predicts generated scenes of --size; leave out --scene")
    if scene is not None:
        check_local(scene)  # before Path(), which collapses the // of a URL; and before any work
    say = progress or (lambda _msg: None)
    prefer_heap()  # the heap as prediction sets it: model-only and end to end on the same allocator
    asked_precision = precision  # the scaling runs decide on int8 for their own sizes
    dev = resolve_device(device, setting="device")
    dtype = resolve_precision("32" if precision == "int8" else precision, dev, setting="precision").dtype
    model, meta, model_name = benchmark_model(model_path, arch=arch, encoder=encoder, chip_size=chip_size)
    chip = int(meta.chip_size)
    overlap = chip // 4 if overlap is None else int(overlap)
    flops = model_flops(model, in_channels=len(meta.bands), chip_size=chip)

    with temporary_folder(name="bench") as tmp:
        work = Path(tmp)
        if scene is None:
            say(f"generating {tiles} scenes of {size[0]}x{size[1]}" if tiles > 1
                else f"generating a {size[0]}x{size[1]} scene")
            scenes = [make_large_scene(work / f"scene{i}.tif", *size, seed=i, terraces=terraces_for(meta))
                      for i in range(tiles)]
        else:
            scenes = [Path(scene)]
        scene_path = scenes[0]
        info = open_scene(scene_path)
        n_chips = tiles * len(chip_grid(info.width, info.height, size=chip, stride=chip - overlap))
        torch_model = model  # the fp32 per-chip baseline stays the torch model
        if wants_int8(precision, dev, n_chips):
            say("int8: export, calibration on the scene, quantisation")
            from geoseg.quantize import int8_model

            (work / "int8").mkdir()
            model, meta = int8_model((model, meta), scenes, work / "int8")
            precision, dtype = "32", None  # the int8 graph runs in its own precision

        say("matmul peak")
        with torch_threads(threads if dev.type == "cpu" else torch.get_num_threads()):
            mm = matmul_flops(dev, dtype or torch.float32)  # same thread count as the model

        say("model only")
        model_runs = []
        runs: list[_Run] = []
        own_runs: list[_Run] = []
        no_ahead_runs: list[_Run] = []
        replay_runs: list[_Run] = []
        tape: _Tape | None = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        options = dict(batch_size=batch_size, overlap=overlap, device=str(dev), precision=precision,
                       threads=threads, temp_dir=work, compile_model=compile, min_area=0.0, simplify=0.0)
        if tiles > 1:  # one tile untimed first: the first prediction's one-off costs would fall on one side only
            say("end to end, warm-up on one tile")
            _predict_run(scenes[:1], model, meta, work, shared=False, **options)
        replay_options = dict(options, compile_model=False)
        if replay and n_chips <= REPLAY_MAX_CHIPS:  # the model's outputs of one (untimed) run, to replay
            say("end to end, recording the model's outputs")
            tape = _Tape()
            try:
                _predict_run(scenes, _taping(model, tape), meta, work, shared=tiles > 1, **replay_options)
            finally:
                _TAPES.pop(id(tape), None)
        # Interleave the measurements so that machine noise hits them alike.
        for i in range(repeats):
            tp = model_throughput(
                model, in_channels=len(meta.bands), chip_size=chip, classes=meta.classes,
                batch_size=batch_size, device=str(dev), precision=precision, repeats=3,
                warmup=1 if i == 0 else 0, threads=threads, compile=compile,
            )
            model_runs.append(tp.chips_per_s)
            say(f"end to end, run {i + 1}/{repeats}")
            runs.append(_predict_run(scenes, model, meta, work, shared=tiles > 1, **options))
            if tiles > 1:
                say(f"end to end, each scene with its own batches, run {i + 1}/{repeats}")
                own_runs.append(_predict_run(scenes, model, meta, work, shared=False, **options))
            if tiles > 1 and scenes_ahead(dev) > 0:
                say(f"end to end, shared batches without reading ahead, run {i + 1}/{repeats}")
                no_ahead_runs.append(_predict_run(scenes, model, meta, work, shared=True, ahead=0, **options))
            if tape is not None:
                say(f"end to end with the model's outputs replayed, run {i + 1}/{repeats}")
                tape.position = 0
                replay_runs.append(_predict_run(scenes, _replay(tape), meta, work, shared=tiles > 1,
                                                **replay_options))
        say("fp32 per-chip baseline")
        base = baseline_loop(torch_model, scene_path, meta, chips=baseline_chips, overlap=overlap)

    model_cps = statistics.median(model_runs)
    e2e_runs = [r.chips_per_s for r in runs]
    e2e_cps = statistics.median(e2e_runs)
    best = runs[e2e_runs.index(sorted(e2e_runs)[len(e2e_runs) // 2])]
    own_cps = statistics.median([r.chips_per_s for r in own_runs]) if own_runs else None
    no_ahead_cps = statistics.median([r.chips_per_s for r in no_ahead_runs]) if no_ahead_runs else None
    replay_cps = statistics.median([r.chips_per_s for r in replay_runs]) if replay_runs else None
    del tape  # the logits
    result = BenchmarkResult(
        model=model_name, device=str(dev), precision=getattr(model, "precision", None) or precision_name(dtype),
        threads=tp.threads,
        batch_size=batch_size, chip_size=chip, overlap=overlap, scene=str(scene or "generated"),
        scene_size=(info.width, info.height), chips=n_chips,
        model_chips_per_s=round(model_cps, 3), e2e_chips_per_s=round(e2e_cps, 3),
        ratio=round(e2e_cps / model_cps, 3), baseline_chips_per_s=round(base, 3),
        speedup_vs_baseline=round(e2e_cps / base, 2),
        stages={k: round(v, 3) for k, v in best.stages.items()},
        e2e_seconds=round(best.seconds, 3), peak_rss_mb=round(peak_rss_mb(), 1),
        peak_gpu_mb=(round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None),
        flops_per_chip=flops, matmul_tflops=round(mm / 1e12, 4),
        mfu=round(model_cps * flops / mm, 4), repeats=repeats, e2e_runs=[round(x, 3) for x in e2e_runs],
        compiled=compile, tiles=tiles, model_calls=best.calls,
        own_batches_chips_per_s=round(own_cps, 3) if own_cps is not None else None,
        own_batches_calls=own_runs[0].calls if own_runs else None,
        no_ahead_chips_per_s=round(no_ahead_cps, 3) if no_ahead_cps is not None else None,
        replay_chips_per_s=round(replay_cps, 3) if replay_cps is not None else None,
    )
    if scaling:  # after this run's scene and outputs are gone; each size in its own process
        result.scaling = scaling_points(
            scaling, model_path=model_path, arch=arch, encoder=encoder, batch_size=batch_size,
            device=device, precision=asked_precision, compile=compile, progress=progress,
            resolution=scaling_resolution,
        )
    return result
