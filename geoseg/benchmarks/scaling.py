"""Scaling: time and peak memory of predicting square scenes of growing size, each in a fresh process.

A fresh process per size makes each peak its own: a process's peak resident
memory never goes down, so a size measured after a larger one would report the
larger one's peak.

The fresh process is started by :mod:`multiprocessing` with the ``spawn``
start method, not by a subprocess running a module of the library with
``python -m`` (which needs a ``__main__`` entry inside the library that
nothing else should call):

- spawn starts a new interpreter (fork and exec on Linux): the child begins
  with a memory map of its own, nothing of the parent's heap, threads, torch or
  CUDA state; so its ``VmHWM`` (:func:`~geoseg.benchmarks.workload.peak_rss_mb`)
  is its own peak. The default ``fork`` would copy the parent's heap, peak
  included, and CUDA cannot run in a forked child.
- The worker is an ordinary function: its arguments and its result travel
  pickled through a pipe, not as JSON on a command line and in the child's stdout.
- The child's stdout and stderr (file descriptors 1 and 2, so that C libraries'
  output goes too) are sent to a log file in the run's temporary folder: nothing
  it prints reaches the caller's output (``geoseg benchmark --json`` prints one
  JSON object). A failure comes back as one line, the last of the child's
  traceback.

As with every library that spawns, a script that calls :func:`scaling` does it
under ``if __name__ == "__main__":`` (the child imports the script's main module).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

from geoseg.benchmarks.workload import ProgressFn, benchmark_model, make_large_scene, peak_rss_mb, terraces_for
from geoseg.errors import ConfigError
from geoseg.temporaries import temporary_folder


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
    resolution: float | None = None  # ground m/px the model read the scene at (None: the scene's own)
    grid: tuple[int, int] | None = None  # (width, height) of the model grid, when resampled


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
    resolution: str | float = "native",
) -> list[ScalingPoint]:
    """Predict square scenes of each size, each in a fresh process, recording time and peak RSS.

    ``resolution`` is ``predict_scene``'s (the generated scenes are 0.3 m): e.g. 0.6 predicts
    each scene on a model grid of half its side and writes the mask back on the scene's grid.

    Raises:
        ConfigError: A run failed (the child's last error line), e.g. a bad device or precision.
        CheckpointError: Unreadable checkpoint.
    """
    say = progress or (lambda _msg: None)
    points = []
    terraces = 0.0
    if model_path is not None:
        from geoseg.checkpoints import read_checkpoint

        terraces = terraces_for(read_checkpoint(model_path).meta)
    with temporary_folder(name="scaling") as tmp:
        for n in sizes:
            scene = Path(tmp) / f"scene_{n}.tif"
            say(f"writing a {n}x{n} scene")
            make_large_scene(scene, n, n, terraces=terraces)
            args = {
                "scene": str(scene), "model_path": None if model_path is None else str(model_path),
                "arch": arch, "encoder": encoder, "batch_size": batch_size, "device": device,
                "precision": precision, "out": str(Path(tmp) / f"mask_{n}.tif"), "compile": compile,
                "resolution": resolution,
            }
            say(f"predicting {n}x{n} in a fresh process")
            point = in_fresh_process(_scaling_worker, args, log=Path(tmp) / f"scaling_{n}.log",
                                     what=f"scaling run at {n}x{n}")
            points.append(point)
            scene.unlink()
    return points


def in_fresh_process(fn: Callable[..., Any], *args: Any, log: Path, what: str) -> Any:
    """``fn(*args)`` in a new interpreter (multiprocessing spawn); its stdout and stderr go to ``log``.

    ``fn``, ``args`` and the result must pickle (``fn`` a module-level function).

    Raises:
        ConfigError: ``fn`` raised, or the child died: ``"{what} failed: "`` and the last line of its error.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run_child, args=(sender, fn, args, str(log)), name="geoseg-benchmark")
    child.start()
    sender.close()  # the child holds the only sending end: recv() sees EOF if it dies without a word
    try:
        try:
            ok, value = receiver.recv()
        except EOFError:  # it died without a word: a crash, or killed (out of memory)
            ok, value = False, None
        child.join()
    finally:
        receiver.close()
        if child.is_alive():  # interrupted: the child must not outlive the run
            child.terminate()
            child.join()
    if not ok:
        why = value or _last_line(log) or f"no output (exit code {child.exitcode})"
        raise ConfigError(f"{what} failed: {why}")
    return value


def _run_child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], log: str) -> None:
    """The child's side of :func:`in_fresh_process`: output to ``log``, then (ok, result or error line) to ``conn``."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        outcome: tuple[bool, Any] = (True, fn(*args))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent as one line
        traceback.print_exc()  # the whole traceback stays in the log
        sys.stderr.flush()
        outcome = (False, "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1])
    conn.send(outcome)
    conn.close()


def _last_line(log: Path) -> str | None:
    """The last non-empty line of the child's output, if any."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None


def _int8_for(precision: str, device: str, scene: str | os.PathLike[str], meta: Any) -> bool:
    """Whether predicting ``scene`` in ``precision`` runs an int8 model (``geoseg.devices.wants_int8``)."""
    from geoseg.devices import resolve_device, wants_int8
    from geoseg.raster_io import open_scene
    from geoseg.tiling import chips_about

    if precision not in ("int8", "auto"):
        return False
    info = open_scene(scene)
    chips = chips_about(info.width * info.height, int(meta.chip_size))
    return wants_int8(precision, resolve_device(device, setting="device"), chips)


def _scaling_worker(args: dict[str, Any]) -> ScalingPoint:
    """One scaling run, in the fresh process: the model built, the scene predicted as geoseg predict does."""
    from geoseg.inference import predict_scene
    from geoseg.raster_io import open_scene

    model, meta, _ = benchmark_model(
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
        min_area=0.0, simplify=0.0, resolution=args.get("resolution", "native"),
    )
    spool.write(folder / "roofs.gpkg", overwrite=True)
    for p in (spool.path, folder / "roofs.gpkg"):
        p.unlink(missing_ok=True)
    scene = open_scene(args["scene"])
    return ScalingPoint(
        width=scene.width, height=scene.height, chips=res.chips_predicted,
        seconds=round(res.seconds, 2), chips_per_s=round(res.chips_per_s, 3),
        peak_rss_mb=round(peak_rss_mb(), 1), stages={k: round(v, 3) for k, v in res.stages.items()},
        polygons=res.polygon_count, resolution=res.resolution,
        grid=(res.width, res.height) if res.resolution is not None else None,
    )
