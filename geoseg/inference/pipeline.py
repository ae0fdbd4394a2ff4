"""Streamed sliding-window prediction of one scene: blocks in, blended mask and polygons out.

The scene is cut into tile-aligned blocks (``tiling.block_grid``). A reader
thread pool reads each block's extent (core + halo) ahead of the model into a
bounded queue; the main thread normalises it, cuts the chips, runs the model,
and blends the chip probabilities into a block-sized accumulator with a
smooth weight window. The parts of the accumulator that reach into later
blocks are carried to them, so every chip of the global grid is computed once
and a block's core is final as soon as its own chips are done. A writer
thread writes each finished core into the temporary mask/probability
GeoTIFFs and, when a row of blocks is complete, polygonises those rows
(``vectorize.StripPolygonizer``) while the model works on the next blocks.
Nothing scene-sized is ever held in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import nn

from geoseg.errors import CheckpointError, ConfigError, file_error
from geoseg.inference.blending import axis_weight_sum, taper_window
from geoseg.inference.outputs import (
    MASK_NODATA,
    PROB_NODATA,
    PROB_SCALE,
    ProbDtype,
    RasterSink,
    output_tile,
    stored_to_probability,
)
from geoseg.inference.runtime import (
    ChipPredictor,
    precision_name,
    resolve_device,
    resolve_precision,
    rooftop_index,
    torch_threads,
)
from geoseg.raster_io import SceneInfo, atomic_output, check_output, open_scene, read_window
from geoseg.tiling import Block, axis_starts, block_grid

if TYPE_CHECKING:
    import geopandas

    from geoseg.models import CheckpointMeta

log = logging.getLogger(__name__)

#: A scene whose ground resolution differs from the training data's by more than this gets a warning.
RESOLUTION_TOLERANCE = 0.25
#: GDAL block cache while predicting (MB). GDAL keeps every tile it reads up to
#: its cache limit (5% of RAM by default); capping it keeps memory flat in scene size.
GDAL_CACHE_MB = 64
#: Blocks read ahead of the model.
PREFETCH_BLOCKS = 2
#: Finished block cores queued for the writer.
WRITE_QUEUE = 2
#: Default chips per batch on a GPU (CPU: the config's batch size).
GPU_BATCH = 128
#: Block sizes are rounded up to a multiple of this (the output tile), or of 16 below it.
BLOCK_ALIGN = 256

ProgressFn = Callable[[int, int], None]


@dataclass
class PredictionResult:
    """What :func:`predict_scene` did.

    Attributes:
        scene: The input scene.
        name: Scene name (the ``scene`` attribute of its polygons).
        mask_path: Class mask written, or None.
        prob_path: Probability raster written, or None.
        polygons: The polygons (scene CRS), or None when not asked for.
        width: Scene width in pixels.
        height: Scene height in pixels.
        chips_total: Chips in the grid.
        chips_predicted: Chips run through the model.
        chips_skipped: Chips skipped because all their pixels are nodata.
        blocks: Blocks processed.
        seconds: Wall-clock seconds of the whole call.
        stages: Seconds per stage: ``read`` (reader threads), ``preprocess``
            (upload, normalise, cut chips), ``model``, ``blend_write`` (blending,
            finishing cores, writing, overviews), ``vectorise``; ``wait_read`` is
            the time the model waited for the reader. Stages overlap (threads),
            so they may add up to more than ``seconds``.
        device: Device used.
        precision: ``"32"``, ``"bf16"`` or ``"16"``.
        threads: Torch intra-op threads (CPU).
        batch_size: Chips per batch.
        overlap: Overlap between chips in pixels.
        block_size: Block core size in pixels.
    """

    scene: Path
    name: str
    mask_path: Path | None
    prob_path: Path | None
    polygons: "geopandas.GeoDataFrame | None"
    width: int
    height: int
    chips_total: int
    chips_predicted: int
    chips_skipped: int
    blocks: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "32"
    threads: int = 1
    batch_size: int = 0
    overlap: int = 0
    block_size: int = 0

    @property
    def chips_per_s(self) -> float:
        """End-to-end chips per second (chips run through the model / wall time)."""
        return self.chips_predicted / self.seconds if self.seconds > 0 else 0.0


# --- checks done before any work ----------------------------------------------------------------


def scene_bands(info: SceneInfo, meta: "CheckpointMeta", bands: Sequence[int] | None = None) -> tuple[int, ...]:
    """The scene bands to feed the model, checked against the checkpoint.

    A checkpoint trained on explicitly chosen bands (``data.bands`` in its
    config) reads those bands from any scene that has them; one trained on all
    the bands of its images wants a scene with the same number of bands.

    Args:
        info: The scene.
        meta: The checkpoint description.
        bands: 1-based scene bands chosen by the user (overrides the checkpoint's).

    Returns:
        1-based band indexes.

    Raises:
        CheckpointError: Bands that do not fit, with the fix.
    """
    expected = tuple(int(b) for b in meta.bands)
    listed = ",".join(str(b) for b in expected)
    if bands is not None:
        chosen = tuple(int(b) for b in bands)
        if len(chosen) != len(expected):
            raise file_error(
                CheckpointError, info.path,
                f"--bands {','.join(map(str, chosen))} gives {len(chosen)} bands, the model takes "
                f"{len(expected)} (bands {listed})", f"pass {len(expected)} band numbers",
            )
        bad = [b for b in chosen if not 1 <= b <= info.count]
        if bad:
            raise file_error(
                CheckpointError, info.path, f"has {info.count} bands, no band {bad[0]}",
                f"pass --bands with numbers from 1 to {info.count}",
            )
        return chosen
    data_cfg = meta.config.get("data", {}) if isinstance(meta.config, dict) else {}
    explicit = isinstance(data_cfg, dict) and data_cfg.get("bands") is not None
    fits = max(expected) <= info.count and (explicit or info.count == len(expected))
    if not fits:
        raise file_error(
            CheckpointError, info.path,
            f"scene has {info.count} band{'s' if info.count != 1 else ''}, model expects bands {listed} "
            f"({len(expected)} band{'s' if len(expected) != 1 else ''})",
            f"pass --bands with {len(expected)} band numbers to choose the scene's bands "
            f"(e.g. --bands {','.join(str(i) for i in range(1, len(expected) + 1))}) "
            f"or use a model trained on {info.count}-band imagery",
        )
    return expected


def check_resolution(info: SceneInfo, meta: "CheckpointMeta") -> float | None:
    """Warn when the scene's ground resolution differs from the training data's by > 25%.

    Returns:
        The scene's ground resolution (m/px), or None if it cannot be measured.
    """
    from geoseg.raster_io import ground_resolution

    try:
        res = float(ground_resolution(info))
    except Exception as exc:  # a CRS without ground metres: nothing to compare
        log.debug("%s: ground resolution unknown (%s)", info.path, exc)
        return None
    if meta.resolution and abs(res - meta.resolution) / meta.resolution > RESOLUTION_TOLERANCE:
        message = (
            f"{info.path}: ground resolution {res:.3g} m/px differs from the model's training data "
            f"({meta.resolution:.3g} m/px) by more than {RESOLUTION_TOLERANCE:.0%}; "
            "predictions may be poor (resample the scene to the training resolution)"
        )
        log.warning(message)
    return res


def effective_block_size(block_size: int, chip_size: int) -> int:
    """Block size actually used: at least a chip, aligned to the output tiles."""
    size = max(int(block_size), int(chip_size))
    unit = BLOCK_ALIGN if size >= BLOCK_ALIGN else 16
    return -(-size // unit) * unit


# --- the reader --------------------------------------------------------------------------------


@dataclass
class _BlockData:
    block: Block
    data: torch.Tensor  # (C, H, W) raw pixels of the block extent
    valid: torch.Tensor  # (H, W) bool
    chip_ok: list[bool]  # chip has at least one valid pixel
    seconds: float


class _BlockReader:
    """Read block extents in worker threads (one dataset handle per thread), in order, ahead of use."""

    def __init__(
        self, path: Path, bands: Sequence[int], *, workers: int, prefetch: int, pin: bool
    ) -> None:
        self.path, self.bands, self.pin = path, list(bands), pin
        self.prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="geoseg-read")
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def _src(self) -> Any:
        src = getattr(self._local, "src", None)
        if src is None:
            env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
            env.__enter__()
            src = rasterio.open(self.path)
            self._local.src = src
            with self._lock:
                self._handles.append((src, env))
        return src

    def _read(self, block: Block) -> _BlockData:
        t0 = time.perf_counter()
        src = self._src()
        data, valid = read_window(src, block.extent, bands=self.bands, fill=0)
        r0, c0 = int(block.extent.row_off), int(block.extent.col_off)
        chip_ok = []
        for chip in block.chips:
            w = chip.window
            r, c = int(w.row_off) - r0, int(w.col_off) - c0
            chip_ok.append(bool(valid[r:r + int(w.height), c:c + int(w.width)].any()))
        data_t, valid_t = torch.from_numpy(data), torch.from_numpy(valid)
        if self.pin:
            data_t, valid_t = data_t.pin_memory(), valid_t.pin_memory()
        return _BlockData(block, data_t, valid_t, chip_ok, time.perf_counter() - t0)

    def iterate(self, blocks: Sequence[Block]) -> Iterator[_BlockData]:
        """Yield the blocks' data in order, reading up to ``prefetch`` blocks ahead."""
        ahead: deque[Future[_BlockData]] = deque()
        it = iter(blocks)
        for block in it:
            ahead.append(self._pool.submit(self._read, block))
            if len(ahead) >= self.prefetch:
                break
        while ahead:
            item = ahead.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append(self._pool.submit(self._read, nxt))
            yield item

    def close(self) -> None:
        """Stop the workers and close their datasets."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for src, _ in self._handles:
            src.close()
        self._handles.clear()


# --- the writer --------------------------------------------------------------------------------


@dataclass
class _Finished:
    block: Block
    mask: np.ndarray
    prob: np.ndarray
    row_done: bool  # last block of its row: rows up to the core's bottom are complete


class _Writer(threading.Thread):
    """Write finished cores; polygonise complete rows of blocks while the model runs on."""

    def __init__(
        self,
        *,
        mask_sink: RasterSink | None,
        prob_sink: RasterSink | None,
        polygonizer: Any,
        strip_rows: int,
        width: int,
    ) -> None:
        super().__init__(name="geoseg-write", daemon=True)
        self.queue: queue.Queue[_Finished | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self.mask_sink, self.prob_sink = mask_sink, prob_sink
        self.polygonizer, self.strip_rows, self.width = polygonizer, strip_rows, width
        self.error: BaseException | None = None
        self.write_s = 0.0
        self.vector_s = 0.0
        self._next_row = 0

    def run(self) -> None:
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
                while True:
                    item = self.queue.get()
                    if item is None:
                        return
                    t0 = time.perf_counter()
                    core = item.block.core
                    if self.mask_sink is not None:
                        self.mask_sink.write(core, item.mask)
                    if self.prob_sink is not None:
                        self.prob_sink.write(core, item.prob)
                    t1 = time.perf_counter()
                    self.write_s += t1 - t0
                    if item.row_done and self.polygonizer is not None:
                        self._polygonise(int(core.row_off + core.height))
                        self.vector_s += time.perf_counter() - t1
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a main thread waiting on a full queue
                    self.queue.get_nowait()

    def _polygonise(self, stop: int) -> None:
        if self.mask_sink is None:  # polygons always come with a mask sink
            return
        while self._next_row < stop:
            r0 = self._next_row
            h = min(self.strip_rows, stop - r0)
            win = Window(0, r0, self.width, h)
            mask = self.mask_sink.read(win)
            prob = None
            if self.prob_sink is not None:
                prob, _ = stored_to_probability(self.prob_sink.read(win))
            self.polygonizer.add_strip(r0, mask, prob)
            self._next_row = r0 + h

    def put(self, item: _Finished | None) -> None:
        """Queue an item; raise the writer's error if it has died."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


# --- the main loop -----------------------------------------------------------------------------


def _intersect(a: Window, b: Window) -> Window | None:
    c0, r0 = max(int(a.col_off), int(b.col_off)), max(int(a.row_off), int(b.row_off))
    c1 = min(int(a.col_off + a.width), int(b.col_off + b.width))
    r1 = min(int(a.row_off + a.height), int(b.row_off + b.height))
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def predict_scene(
    scene_path: str | os.PathLike[str],
    model: nn.Module,
    meta: "CheckpointMeta",
    *,
    mask_out: str | os.PathLike[str] | None = None,
    prob_out: str | os.PathLike[str] | None = None,
    polygons: bool = True,
    batch_size: int | None = None,
    overlap: int | None = None,
    block_size: int = 2048,
    tta: bool = False,
    threshold: float = 0.5,
    device: str = "auto",
    precision: str = "auto",
    prob_dtype: ProbDtype = "uint8",
    min_area: float = 0.0,
    simplify: float = 0.0,
    regularize: bool = False,
    bands: Sequence[int] | None = None,
    assume_crs: str | None = None,
    scene_name: str | None = None,
    threads: int | None = None,
    read_workers: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    compile_model: bool = False,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> PredictionResult:
    """Predict a whole scene with bounded memory; optionally write rasters and return polygons.

    Args:
        scene_path: Georeferenced raster.
        model: Segmentation model returning logits (N, classes, H, W). It is
            put in eval mode, moved to the device and made channels_last.
        meta: Checkpoint description: bands, normalisation, chip size, classes.
        mask_out: Write the uint8 class mask here (255 = nodata).
        prob_out: Write the rooftop probability here (uint8 value/254 with 255
            nodata, or float16 with NaN nodata; see ``prob_dtype``).
        polygons: Vectorise the mask into polygons (``result.polygons``).
        batch_size: Chips per model call (None: 16 on CPU, 128 on a GPU).
        overlap: Overlap between neighbouring chips in pixels (None: chip/4).
        block_size: Block core size in pixels (rounded up to whole 256-px tiles).
        tta: Average the predictions of the four flips.
        threshold: Rooftop probability at or above which a binary model's pixel
            is rooftop.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        precision: ``"auto"`` (bf16 where the hardware has it), ``"32"``, ``"bf16"``, ``"16"``.
        prob_dtype: ``"uint8"`` or ``"float16"`` for ``prob_out``.
        min_area: Smallest polygon kept, in m².
        simplify: Polygon simplification tolerance, in metres.
        regularize: Regularise outlines (buildingregulariser).
        bands: 1-based scene bands to use instead of the checkpoint's.
        assume_crs: CRS for a scene without one.
        scene_name: ``scene`` attribute of the polygons (default: file stem).
        threads: Torch CPU threads (None: all cores, one spare above 4).
        read_workers: Reader threads (None: 1 on CPU, up to 8 with a GPU).
        temp_dir: Folder for temporary rasters needed for polygons only.
        compile_model: ``torch.compile`` the model first.
        progress: Called with (chips done, chips to predict).
        overwrite: Replace existing outputs.

    Returns:
        Paths, polygons, chip counts and stage timings.

    Raises:
        InputFileError: Unreadable scene.
        GeoreferenceError: Scene without CRS (and no ``assume_crs``).
        CheckpointError: Bands that do not fit the model.
        OutputError: Output exists without ``overwrite`` or cannot be written.
        ConfigError: Bad overlap, batch size, device or precision.
    """
    t_start = time.perf_counter()
    scene_path = Path(scene_path)
    info = open_scene(scene_path, assume_crs=assume_crs)
    use_bands = scene_bands(info, meta, bands)
    check_resolution(info, meta)
    chip = int(meta.chip_size)
    overlap = chip // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < chip:
        raise ConfigError(f"overlap should be from 0 to {chip - 1} pixels (chip size {chip}), got {overlap}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold should be a probability in [0, 1], got {threshold}")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if batch_size is None:
        batch_size = GPU_BATCH if dev.type == "cuda" else 16
    if batch_size < 1:
        raise ConfigError(f"batch size should be a positive number of chips, got {batch_size}")
    block = effective_block_size(block_size, chip)
    outputs = [Path(p) for p in (mask_out, prob_out) if p is not None]
    for p in outputs:
        check_output(p, overwrite=overwrite)
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"mask and probability outputs are the same file: {outputs[0]}")

    with contextlib.ExitStack() as stack:
        mask_tmp = stack.enter_context(atomic_output(mask_out, overwrite=overwrite)) if mask_out else None
        prob_tmp = stack.enter_context(atomic_output(prob_out, overwrite=overwrite)) if prob_out else None
        if polygons and (mask_tmp is None or prob_tmp is None):
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="geoseg-", dir=temp_dir)))
            mask_tmp = mask_tmp or scratch / "mask.tif"
            prob_tmp = prob_tmp or scratch / "prob.tif"
        result = _run(
            info, model, meta, use_bands, mask_tmp=mask_tmp, prob_tmp=prob_tmp, polygons=polygons,
            overviews={mask_tmp: mask_out is not None, prob_tmp: prob_out is not None},
            batch_size=batch_size, overlap=overlap, block=block, tta=tta, threshold=threshold,
            dev=dev, dtype=dtype, prob_dtype=prob_dtype if prob_out else "uint8", min_area=min_area,
            simplify=simplify, regularize=regularize,
            scene_name=scene_name or scene_path.stem, threads=threads, read_workers=read_workers,
            compile_model=compile_model, progress=progress,
        )
    result.mask_path = Path(mask_out) if mask_out else None
    result.prob_path = Path(prob_out) if prob_out else None
    result.seconds = time.perf_counter() - t_start
    log.info(
        "%s: %d chips (%d skipped, all nodata) in %.1f s = %.2f chips/s on %s (%s)",
        scene_path, result.chips_predicted, result.chips_skipped, result.seconds,
        result.chips_per_s, result.device, result.precision,
    )
    return result


def _run(
    info: SceneInfo,
    model: nn.Module,
    meta: "CheckpointMeta",
    bands: tuple[int, ...],
    *,
    mask_tmp: Path | None,
    prob_tmp: Path | None,
    polygons: bool,
    overviews: dict[Path | None, bool],
    batch_size: int,
    overlap: int,
    block: int,
    tta: bool,
    threshold: float,
    dev: torch.device,
    dtype: torch.dtype | None,
    prob_dtype: ProbDtype,
    min_area: float,
    simplify: float,
    regularize: bool,
    scene_name: str,
    threads: int | None,
    read_workers: int | None,
    compile_model: bool,
    progress: ProgressFn | None,
) -> PredictionResult:
    from geoseg import vectorize

    t_start = time.perf_counter()
    W, H, chip = info.width, info.height, int(meta.chip_size)
    stride = chip - overlap
    blocks = block_grid(W, H, block_size=block, chip_size=chip, stride=stride)
    cores = {(b.row, b.col): b.core for b in blocks}
    n_cols = max(b.col for b in blocks) + 1
    win1d = taper_window(chip, overlap)
    wsum_x = torch.from_numpy(axis_weight_sum(axis_starts(W, chip, stride), win1d, 0, W).astype(np.float32))
    wsum_y = torch.from_numpy(axis_weight_sum(axis_starts(H, chip, stride), win1d, 0, H).astype(np.float32))
    wsum_x, wsum_y = wsum_x.to(dev), wsum_y.to(dev)
    w2d = torch.from_numpy(np.outer(win1d, win1d).astype(np.float32)).to(dev)
    classes = int(meta.classes)
    names = tuple(meta.class_names) if meta.class_names else ("background", "rooftop")
    roof = rooftop_index(names, classes)
    predictor = ChipPredictor(
        model, mean=meta.mean, std=meta.std, classes=classes, device=dev, autocast_dtype=dtype, tta=tta,
    )
    if compile_model:
        predictor.model = torch.compile(predictor.model)  # type: ignore[assignment]
    A = predictor.channels
    chips_total = sum(len(b.chips) for b in blocks)
    tile = output_tile(block)
    cuda = dev.type == "cuda"
    io_threads: int | str = "ALL_CPUS" if cuda else 1
    sinks: list[RasterSink] = []
    mask_sink = prob_sink = None
    if mask_tmp is not None:
        mask_sink = RasterSink(mask_tmp, kind="mask", width=W, height=H, crs=info.crs, transform=info.transform,
                               tile=tile, num_threads=io_threads, class_names=names)
        sinks.append(mask_sink)
    if prob_tmp is not None:
        prob_sink = RasterSink(prob_tmp, kind="prob", width=W, height=H, crs=info.crs, transform=info.transform,
                               tile=tile, prob_dtype=prob_dtype, num_threads=io_threads)
        sinks.append(prob_sink)
    poly = None
    if polygons:
        poly_classes = range(1, classes) if classes > 2 else (1,)
        poly = vectorize.StripPolygonizer(width=W, height=H, classes=poly_classes)
    writer = _Writer(mask_sink=mask_sink, prob_sink=prob_sink, polygonizer=poly,
                     strip_rows=vectorize.strip_height(W), width=W)
    workers = read_workers or (min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1)
    reader = _BlockReader(info.path, bands, workers=workers, prefetch=max(PREFETCH_BLOCKS, workers + 1),
                          pin=cuda)
    stages = {"read": 0.0, "preprocess": 0.0, "model": 0.0, "blend_write": 0.0, "vectorise": 0.0,
              "wait_read": 0.0}
    chips_done = chips_skipped = 0
    chips_todo = chips_total
    base_cache: dict[int, torch.Tensor] = {}
    pending: dict[tuple[int, int], list[tuple[Window, torch.Tensor]]] = {}
    n_threads = torch.get_num_threads()
    try:
        writer.start()
        with contextlib.ExitStack() as stack:
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
            n_threads = stack.enter_context(torch_threads(threads if not cuda else torch.get_num_threads()))
            stack.enter_context(torch.inference_mode())
            t_wait = time.perf_counter()
            for item in reader.iterate(blocks):
                t0 = time.perf_counter()
                stages["wait_read"] += t0 - t_wait
                stages["read"] += item.seconds
                blk, ext = item.block, item.block.extent
                eh, ew = int(ext.height), int(ext.width)
                raw = item.data.to(dev, non_blocking=True)
                valid = item.valid.to(dev, non_blocking=True)
                # Normalised block, (H, W, C): a gather of chip pixels from it is channels_last.
                x = torch.empty((eh, ew, raw.shape[0]), dtype=torch.float32, device=dev)
                x.copy_(raw.permute(1, 2, 0))
                x.sub_(predictor.mean).mul_(predictor.inv_std)
                x.masked_fill_(~valid[..., None], 0.0)
                xf = x.view(eh * ew, -1)
                buf = torch.zeros((eh * ew, A), dtype=torch.float32, device=dev)
                base = base_cache.get(ew)
                if base is None:
                    ar = torch.arange(chip, device=dev)
                    base = base_cache.setdefault(ew, (ar[:, None] * ew + ar[None, :]).reshape(-1))
                todo = [c for c, ok in zip(blk.chips, item.chip_ok) if ok]
                skipped = len(blk.chips) - len(todo)
                chips_skipped += skipped
                chips_todo -= skipped
                stages["preprocess"] += time.perf_counter() - t0
                for i in range(0, len(todo), batch_size):
                    t1 = time.perf_counter()
                    batch = todo[i:i + batch_size]
                    offs = torch.tensor(
                        [(int(c.window.row_off) - int(ext.row_off)) * ew + int(c.window.col_off) - int(ext.col_off)
                         for c in batch], dtype=torch.int64,
                    ).to(dev, non_blocking=True)
                    idx = (offs[:, None] + base[None, :]).reshape(-1)
                    chips = xf.index_select(0, idx).view(len(batch), chip, chip, -1).permute(0, 3, 1, 2)
                    t2 = time.perf_counter()
                    probs = predictor(chips)
                    t3 = time.perf_counter()
                    probs = (probs * w2d).permute(0, 2, 3, 1).reshape(-1, A)
                    buf.index_add_(0, idx, probs)
                    t4 = time.perf_counter()
                    stages["preprocess"] += t2 - t1
                    stages["model"] += t3 - t2
                    stages["blend_write"] += t4 - t3
                    chips_done += len(batch)
                    if progress is not None:
                        progress(chips_done, chips_todo)
                t5 = time.perf_counter()
                buf3 = buf.view(eh, ew, A)
                for win, piece in pending.pop((blk.row, blk.col), []):
                    r, c = int(win.row_off - ext.row_off), int(win.col_off - ext.col_off)
                    buf3[r:r + int(win.height), c:c + int(win.width)] += piece
                for nb in ((blk.row, blk.col + 1), (blk.row + 1, blk.col), (blk.row + 1, blk.col + 1)):
                    if nb not in cores:
                        continue
                    inter = _intersect(ext, cores[nb])
                    if inter is not None:
                        r, c = int(inter.row_off - ext.row_off), int(inter.col_off - ext.col_off)
                        piece = buf3[r:r + int(inter.height), c:c + int(inter.width)].clone()
                        pending.setdefault(nb, []).append((inter, piece))
                mask_np, prob_np = _finish_core(
                    blk, buf3, valid, wsum_x, wsum_y, classes=classes, roof=roof, threshold=threshold,
                    prob_dtype=prob_dtype,
                )
                stages["blend_write"] += time.perf_counter() - t5
                writer.put(_Finished(blk, mask_np, prob_np, row_done=blk.col == n_cols - 1))
                t_wait = time.perf_counter()
        writer.put(None)
        writer.join()
        if writer.error is not None:
            raise writer.error
        t6 = time.perf_counter()
        for sink in sinks:
            sink.finish(overviews=overviews.get(sink.path, False))
        stages["blend_write"] += writer.write_s + time.perf_counter() - t6
        stages["vectorise"] += writer.vector_s
    except BaseException:
        if writer.is_alive():
            with contextlib.suppress(Exception):
                writer.queue.put_nowait(None)
            writer.join(timeout=30)
        raise
    finally:
        reader.close()
        for sink in sinks:
            sink.close()

    frame = None
    if poly is not None:
        t7 = time.perf_counter()
        frame = vectorize.polygons_to_frame(
            poly.finish(), transform=info.transform, crs=info.crs, width=W, height=H, scene=scene_name,
            min_area=min_area, simplify=simplify, regularize=regularize, class_names=names,
        )
        stages["vectorise"] += time.perf_counter() - t7
    if chips_skipped == chips_total:
        message = f"{info.path}: every pixel is nodata; nothing was predicted and its layer is empty"
        log.warning(message)
    return PredictionResult(
        scene=info.path, name=scene_name, mask_path=None, prob_path=None, polygons=frame,
        width=W, height=H, chips_total=chips_total, chips_predicted=chips_done,
        chips_skipped=chips_skipped, blocks=len(blocks), seconds=time.perf_counter() - t_start,
        stages=stages, device=str(dev), precision=precision_name(dtype), threads=n_threads,
        batch_size=batch_size, overlap=overlap, block_size=block,
    )


def _finish_core(
    blk: Block,
    buf3: torch.Tensor,
    valid: torch.Tensor,
    wsum_x: torch.Tensor,
    wsum_y: torch.Tensor,
    *,
    classes: int,
    roof: int,
    threshold: float,
    prob_dtype: ProbDtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise the core's weighted sums into probabilities; class mask and stored probability."""
    core = blk.core
    r0, c0, ch, cw = int(core.row_off), int(core.col_off), int(core.height), int(core.width)
    wsum = wsum_y[r0:r0 + ch, None] * wsum_x[None, c0:c0 + cw]
    p = buf3[:ch, :cw] / wsum[..., None]
    ok = valid[:ch, :cw]
    if p.shape[-1] == 1:
        prob = p[..., 0]
        mask = (prob >= threshold).to(torch.uint8)
    else:
        prob = p[..., roof]
        mask = p.argmax(dim=-1).to(torch.uint8)
    mask = mask.masked_fill(~ok, MASK_NODATA)
    if prob_dtype == "uint8":
        stored = torch.round(prob * PROB_SCALE).clamp_(0, PROB_SCALE).to(torch.uint8).masked_fill(~ok, PROB_NODATA)
        prob_np = stored.cpu().numpy()
    else:
        prob_np = prob.to(torch.float16).to(torch.float32).masked_fill(~ok, float("nan")).cpu().numpy()
    return mask.cpu().numpy(), prob_np
