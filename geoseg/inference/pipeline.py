"""Streamed sliding-window prediction of one scene: blocks in, blended mask and polygons out.

The scene is cut into tile-aligned blocks (``tiling.block_grid``). Reader
threads read each block's extent (core + halo) ahead of the model
(``streams.BlockReader``); the main thread normalises it, gathers the chips,
runs the model and blends the chip probabilities into a block accumulator with
a smooth weight window (``stitch.BlockStitcher``). Halos are carried to the
blocks they reach into, so every chip of the global grid is computed once and
a block's core is final as soon as its own chips are done (its rows in whole
tile rows even before: as soon as no chip still to come reaches them). A writer
thread writes each finished core (or its final rows) into the (temporary)
mask/probability GeoTIFFs and, when rows of the scene are complete, polygonises those rows
(``vectorize.StripPolygonizer``) while the model works on. Nothing
scene-sized is ever held in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import rasterio
import shapely
import torch
from torch import nn

from geoseg.config import PredictConfig
from geoseg.errors import ConfigError
from geoseg.inference.checks import (
    check_rooftop_share, check_value_range, effective_block_size, model_resolution, scene_bands,
)
from geoseg.encoding import DEFAULT_CLASS_NAMES, GDAL_CACHE_BYTES, ProbDtype
from geoseg.inference.outputs import MEMORY_SCRATCH_PIXELS, MemorySink, RasterSink, output_tile, to_scene_grid
from geoseg.devices import resolve_device, resolve_precision, torch_threads
from geoseg.inference.runtime import compile_wanted, prefer_heap, rooftop_index
from geoseg.inference.stitch import BlockStitcher
from geoseg.models import INSTANCE_CHANNELS
from geoseg.inference.aoi import AoiPixels, area_on_scene, area_outside_error, read_area
from geoseg.inference.batching import Batches, BlockWork
from geoseg.inference.streams import BlockReader, CoreWriter
from geoseg.publish import publishing
from geoseg.raster_io import SceneInfo, check_output, open_scene
from geoseg.remote import as_source, source_stem
from geoseg.resample import grid_at
from geoseg.temporaries import temporary_folder
from geoseg.tiling import block_grid
from geoseg.vector_io import VectorLayer

if TYPE_CHECKING:
    import geopandas

    from geoseg.checkpoints import CheckpointMeta

log = logging.getLogger(__name__)

#: Blocks read ahead of the model.
PREFETCH_BLOCKS = 2
#: Default chips per batch on a CPU and on a GPU.
CPU_BATCH = 16
GPU_BATCH = 128
#: Most reader threads with a GPU (each decodes whole blocks; GDAL releases the GIL).
MAX_GPU_READERS = 8
#: The defaults of every prediction option: those of ``geoseg predict`` (one set, from the config).
DEFAULTS = PredictConfig()

ProgressFn = Callable[[int, int], None]

@dataclass
class PredictionResult:
    """What :func:`predict_scene` did.

    Attributes:
        scene: The input scene.
        name: Scene name (the ``scene`` attribute of its polygons).
        mask_path: Class mask written, or None.
        prob_path: Probability raster written, or None.
        polygons: The polygons (scene CRS), or None when not asked for or handed to a sink.
        polygon_count: How many polygons the scene gave (also when handed to a sink).
        width: Scene width in pixels.
        height: Scene height in pixels.
        chips_total: Chips in the grid.
        chips_predicted: Chips run through the model.
        chips_skipped: Chips skipped because all their pixels are nodata (or, with an AOI,
            because none of their pixels with data is inside it).
        blocks: Blocks processed.
        seconds: Wall-clock seconds of the scene's own work: the whole call, for a scene
            with batches of its own; with batches shared by a run's scenes, its setup and
            feed (less the time earlier scenes took to finish inside it), its share of the
            run's last batch and its finish, so that the scenes' seconds add up to the run's
            (the chips it left in a batch are timed with the scene whose chips filled it).
        stages: Seconds per stage: ``read`` (reader threads), ``preprocess``
            (upload, normalise, cut chips), ``model``, ``blend_write`` (blending,
            finishing cores, writing, overviews), ``vectorise`` (polygons, including
            ``split``: separating touching buildings, with an instances model); ``wait_read``
            is the time the model waited for the reader. Stages overlap (threads),
            so they may add up to more than ``seconds``.
        device: Device used.
        precision: ``"32"``, ``"bf16"`` or ``"16"``.
        threads: Torch intra-op threads (CPU).
        batch_size: Chips per batch.
        overlap: Overlap between chips in pixels.
        block_size: Block core size in pixels.
        compiled: Whether a ``torch.compile``d model predicted (see ``compile_model``).
        polygon_count: Polygons written (also when they were streamed, not kept).
        batches: Model calls that carried this scene's chips (batches fill across blocks, and
            across scenes when they share ``batches``: alone, ``ceil(chips_predicted / batch_size)``).
        resolution: Ground metres per pixel the model read the scene at, or None: its own grid
            (``width``, ``height`` and the chip counts are those of the grid predicted).
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
    compiled: bool = False
    polygon_count: int = 0
    batches: int = 0
    resolution: float | None = None

    @property
    def chips_per_s(self) -> float:
        """End-to-end chips per second (chips run through the model / wall time)."""
        return self.chips_predicted / self.seconds if self.seconds > 0 else 0.0


def default_batch_size(device: torch.device) -> int:
    """Chips per model call when none is asked for: :data:`GPU_BATCH` on a GPU, else :data:`CPU_BATCH`."""
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def predict_scene(
    scene_path: str | os.PathLike[str],
    model: nn.Module,
    meta: "CheckpointMeta",
    *,
    mask_out: str | os.PathLike[str] | None = None,
    prob_out: str | os.PathLike[str] | None = None,
    polygons: bool = True,
    batch_size: int | None = DEFAULTS.batch_size,
    overlap: int | None = DEFAULTS.overlap,
    block_size: int = DEFAULTS.block_size,
    tta: bool = DEFAULTS.tta,
    threshold: float = DEFAULTS.threshold,
    device: str = DEFAULTS.device,
    precision: str = DEFAULTS.precision,
    prob_dtype: ProbDtype = "uint8",
    min_area: float = DEFAULTS.min_area,
    simplify: float = DEFAULTS.simplify,
    regularize: bool = DEFAULTS.regularize,
    bands: Sequence[int] | None = None,
    assume_crs: str | None = None,
    scene_name: str | None = None,
    threads: int | None = None,
    read_workers: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    compile_model: bool | None = DEFAULTS.compile,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    instances: bool | None = DEFAULTS.instances,
    seed_threshold: float = DEFAULTS.seed_threshold,
    min_seed_area: float = DEFAULTS.min_seed_area,
    rescale: bool = False,
    polygon_sink: Callable[[Any], None] | None = None,
    aoi: str | os.PathLike[str] | VectorLayer | None = None,
    skip_outside_aoi: bool = False,
    resolution: str | float = DEFAULTS.resolution,
    batches: Batches | None = None,
    scene_info: SceneInfo | None = None,
) -> PredictionResult:
    """Predict a whole scene with bounded memory; optionally write rasters and return polygons.

    The prediction options default to those of ``geoseg predict`` (:data:`DEFAULTS`, a
    :class:`~geoseg.config.PredictConfig`), so a call gives the command's polygons.

    Args:
        scene_path: Georeferenced raster.
        model: Segmentation model returning logits (N, classes, H, W). It is
            put in eval mode, moved to the device and made channels_last.
        meta: Checkpoint description: bands, normalisation, chip size, classes.
        mask_out: Write the uint8 class mask here (255 = nodata).
        prob_out: Write the rooftop probability here (uint8 value/254 with 255
            nodata, or float16 with NaN nodata; see ``prob_dtype``).
        polygons: Vectorise the mask into polygons (``result.polygons``).
        batch_size: Chips per model call (None: ``batches``' size, else 16 on CPU, 128 on a GPU).
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
        compile_model: ``torch.compile`` the model (static shapes, frozen weights); None:
            on a CPU for scenes of ``runtime.compile_min_chips`` chips or more (20,000; 4000 with AMX).
        progress: Called with (chips done, chips to predict).
        overwrite: Replace existing outputs.
        instances: Split touching buildings with a seeded watershed (needs an ``instances``
            checkpoint; None: whenever the checkpoint is one). With an ``instances``
            checkpoint ``prob_out`` has three bands: rooftop, border, contact.
        seed_threshold: A rooftop pixel seeds a building where its border and contact
            probabilities are below this.
        min_seed_area: Seeds smaller than this (m²) are ignored.
        rescale: Map the scene's values linearly onto the range the model learned, per band
            (``checks.check_value_range``), instead of refusing a scene far outside it.
        polygon_sink: With ``polygons``: hand each batch of finished polygons (a GeoDataFrame)
            to this callable as the scene is predicted (e.g. ``export.PolygonSpool.append``)
            instead of returning them; ``result.polygons`` is then None and
            ``result.polygon_count`` says how many there were.
        aoi: Area of interest: a polygon file in any CRS (or a layer :func:`read_area`
            read), the area being the union of its polygons. Only the blocks whose
            extent (core and halo) touches it are read, only the chips with data
            inside it are predicted; pixels it does not cover (even partly) are nodata
            in the rasters, which keep the scene's grid; polygons are cut exactly to it
            (their attributes measure what is left).
        skip_outside_aoi: With ``aoi``: a scene the area does not touch is skipped (a
            warning; nothing read or predicted, no polygons, rasters all nodata) instead
            of refused (``geoseg predict`` with several scenes).
        resolution: Ground metres per pixel the model reads the scene at: ``"auto"`` (the
            checkpoint's, when the scene's differs by more than 5%), ``"native"`` (the scene's
            own grid) or metres. On another grid than the scene's, each block is read resampled
            (bilinear) onto the model grid (``resample.grid_at``: same CRS and extent; an axis
            a few pixels over whole chips is drawn at whole chips, pixels at most 2% larger),
            predicted and polygonised there (polygons are exact in the scene's CRS, ``area_m2`` true), and
            the mask (nearest) and probability (bilinear) are written on the scene's own grid.
        batches: Model batches shared with the other scenes of a run (``inference.job``), of
            ``batch_size`` chips: this scene's last chips go through with the next scene's first,
            and the scene finishes (outputs written and published, the result filled in) as they
            pass, at the latest in ``batches.flush()``; the caller owns ``batches`` (on a failure
            its context aborts every scene not finished); with ``Batches(ahead=...)`` the scene is
            only set up here (its outputs opened, its first blocks read) and fed once later scenes
            are set up, or in the flush. None: the scene's own batches, and the scene is finished
            when the call returns.
        scene_info: The scene's header as :func:`~geoseg.raster_io.open_scene` read it already
            (with the same ``assume_crs``; a run checks every scene first), so that it is not
            opened again; None: it is opened (and checked) here.

    Returns:
        Paths, polygons, chip counts and stage timings (with ``batches``: filled in when the
        scene finishes; the same object).

    Raises:
        InputFileError: Unreadable scene; an ``aoi`` file that is not a polygon file.
        GeoreferenceError: Scene without CRS (and no ``assume_crs``); an ``aoi`` without
            CRS, or that does not touch the scene (without ``skip_outside_aoi``).
        CheckpointError: Bands that do not fit the model, or values far outside the range it
            learned (without ``rescale``).
        OutputError: Output exists without ``overwrite`` or cannot be written.
        ConfigError: Bad overlap, batch size, device or precision.
    """
    t_start = time.perf_counter()
    prefer_heap()
    scene_path = as_source(scene_path)  # a URL stays text
    scene = open_scene(scene_path, assume_crs=assume_crs) if scene_info is None else scene_info
    chip = int(meta.chip_size)
    overlap = chip // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < chip:
        raise ConfigError(f"overlap should be from 0 to {chip - 1} pixels (chip size {chip}), got {overlap}")
    target = model_resolution(scene, meta, resolution)
    # The grid the model reads: on a model grid, drawn to whole chips where that is close enough.
    info = scene if target is None else grid_at(scene, target, chips=(chip, chip - overlap))
    area = None
    if aoi is not None:
        layer = aoi if isinstance(aoi, VectorLayer) else read_area(aoi)
        area = area_on_scene(layer, info)
        if area is None:
            if not skip_outside_aoi:
                raise area_outside_error(layer, [scene])
            log.warning("%s: the AOI %s does not touch this scene: skipped (nothing predicted, no polygons, "
                        "rasters all nodata)", scene_path, layer.path)
            area = AoiPixels(shapely.Polygon(), info.transform)  # touches no block
    use_bands = scene_bands(scene, meta, bands)
    value_map = check_value_range(scene, meta, use_bands, rescale=rescale)
    if value_map is not None:  # folded into the normalisation: every block is mapped as it is normalised
        meta = value_map.applied_to(meta)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold should be a probability in [0, 1], got {threshold}")
    split = _wants_instances(instances, meta, seed_threshold, min_seed_area)
    dev = resolve_device(device, setting="device")
    dtype = resolve_precision(precision, dev, setting="precision").dtype
    if batch_size is None:
        batch_size = batches.batch_size if batches is not None else default_batch_size(dev)
    if batch_size < 1:
        raise ConfigError(f"batch size should be a positive number of chips, got {batch_size}")
    block = effective_block_size(block_size, chip)
    outputs = [Path(p) for p in (mask_out, prob_out) if p is not None]
    for p in outputs:
        check_output(p, overwrite=overwrite)
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"mask and probability outputs are the same file: {outputs[0]}")

    own = batches is None
    with contextlib.ExitStack() as stack:
        if batches is None:  # the scene's own batches: finished before this call returns
            batches = stack.enter_context(Batches(batch_size))
        elif batches.batch_size != batch_size:
            raise ConfigError(f"batch size {batch_size} differs from the shared batches' {batches.batch_size}")
        scene_pass = _ScenePass(
            info, model, meta, use_bands, scene=scene, target=target, mask_out=mask_out, prob_out=prob_out,
            polygons=polygons, overlap=overlap, block=block, tta=tta, threshold=threshold,
            dev=dev, dtype=dtype, prob_dtype=prob_dtype, min_area=min_area,
            simplify=simplify, regularize=regularize, scene_name=scene_name or source_stem(scene_path),
            threads=threads, read_workers=read_workers, compile_model=compile_model, progress=progress,
            split=split, seed_threshold=seed_threshold, min_seed_area=min_seed_area, polygon_sink=polygon_sink,
            area=area, overwrite=overwrite, temp_dir=temp_dir, batches=batches, t_start=t_start,
            source=scene_path,
        )
        batches.take(scene_pass)  # fed now, or once later scenes are set up (look-ahead)
        if own:
            batches.flush()
    return scene_pass.result


class _ScenePass:
    """One scene's prediction from its setup to its finish, and what it holds in between.

    Set up (outputs, sinks, threads, the model's predictor), it is held by the
    :class:`~geoseg.inference.batching.Batches` its chips go through; :meth:`feed` reads
    every block and adds its chips; the batches call :meth:`finish` once the last chips
    are through (write, polygonise, publish, fill :attr:`result`) or :meth:`abort` on a
    failure (outputs discarded, threads stopped, scratch removed).
    """

    def __init__(
        self,
        info: SceneInfo,
        model: nn.Module,
        meta: "CheckpointMeta",
        bands: tuple[int, ...],
        *,
        scene: SceneInfo,
        target: float | None,
        mask_out: str | os.PathLike[str] | None,
        prob_out: str | os.PathLike[str] | None,
        polygons: bool,
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
        compile_model: bool | None,
        progress: ProgressFn | None,
        split: bool,
        seed_threshold: float,
        min_seed_area: float,
        polygon_sink: Callable[[Any], None] | None,
        area: AoiPixels | None,
        overwrite: bool,
        temp_dir: str | os.PathLike[str] | None,
        batches: Batches,
        t_start: float,
        source: str | Path,
    ) -> None:
        """Open the outputs and start the writer; on a failure, leave nothing behind."""
        self.info, self.scene, self.target, self.source = info, scene, target, source
        self.mask_out, self.prob_out, self.prob_dtype = mask_out, prob_out, prob_dtype
        self.area, self.t_start = area, t_start
        self.reader: BlockReader | None = None
        self.writer: CoreWriter | None = None
        self.sinks: list[RasterSink | MemorySink] = []
        self._fed_s = self._setup_s = 0.0
        self._stack = contextlib.ExitStack()
        from geoseg import vectorize
        from geoseg.instances import MAX_SPLIT_PIXELS, SPLIT_VALUES, InstanceSplitter

        try:
            # Both rasters are published together (a caller's temporaries are left to the caller).
            publication = self._stack.enter_context(publishing(overwrite=overwrite))
            self.mask_pub = publication.file(mask_out) if mask_out else None
            self.prob_pub = publication.file(prob_out) if prob_out else None
            # On a model grid the rasters predicted are scratch (the published ones are written on the
            # scene's grid from them); polygons need both, each published raster its own.
            mask_tmp, prob_tmp = (self.mask_pub, self.prob_pub) if target is None else (None, None)
            want_mask, want_prob = polygons or self.mask_pub is not None, polygons or self.prob_pub is not None
            # A raster only the polygons read back is held in memory when the scene is small (no file
            # to make, write, read back and remove: most of a small tile's cost outside the model).
            small = info.width * info.height <= MEMORY_SCRATCH_PIXELS
            memory_mask = small and want_mask and self.mask_pub is None
            memory_prob = small and want_prob and self.prob_pub is None
            file_mask, file_prob = want_mask and not memory_mask, want_prob and not memory_prob
            if (file_mask and mask_tmp is None) or (file_prob and prob_tmp is None):
                scratch = self._stack.enter_context(temporary_folder(temp_dir))
                mask_tmp = mask_tmp or (scratch / "mask.tif" if file_mask else None)
                prob_tmp = prob_tmp or (scratch / "prob.tif" if file_prob else None)
            self.mask_tmp, self.prob_tmp = mask_tmp, prob_tmp
            self.overviews = {mask_tmp: mask_out is not None and target is None,
                              prob_tmp: prob_out is not None and target is None}
            prob_dtype = self.prob_dtype if prob_out else "uint8"

            W, H, chip = info.width, info.height, int(meta.chip_size)
            blocks = block_grid(W, H, block_size=block, chip_size=chip, stride=chip - overlap)
            self.blocks = blocks
            classes = int(meta.classes)
            names = tuple(meta.class_names) if meta.class_names else DEFAULT_CLASS_NAMES
            chips_total = sum(len(b.chips) for b in blocks)
            extra = INSTANCE_CHANNELS if getattr(meta, "target", "footprint") == "instances" else ()
            predictor = batches.predictor(
                model, mean=meta.mean, std=meta.std, classes=classes, device=dev, autocast_dtype=dtype, tta=tta,
                compile=compile_wanted(compile_model, dev, chips_total), batch_size=batches.batch_size,
                extra_channels=len(extra), stretch=meta.stretch,
            )
            self.predictor = predictor
            cuda = dev.type == "cuda"
            # On a GPU the CPU threads serve reading and writing: torch keeps its setting.
            self.cpu_threads = threads if threads is not None or not cuda else torch.get_num_threads()
            self.n_threads = torch.get_num_threads()
            sink_args = dict(width=W, height=H, crs=info.crs, transform=info.transform, tile=output_tile(block),
                             num_threads="ALL_CPUS" if cuda else 1)
            mask_sink: RasterSink | MemorySink | None = (
                MemorySink(kind="mask", width=W, height=H) if memory_mask
                else RasterSink(mask_tmp, kind="mask", class_names=names, **sink_args,
                                scratch=mask_tmp != self.mask_pub) if mask_tmp else None)
            self.sinks.extend([mask_sink] if mask_sink is not None else [])  # closed by abort if the next fails
            prob_sink: RasterSink | MemorySink | None = (
                MemorySink(kind="prob", width=W, height=H, bands=1 + len(extra)) if memory_prob
                else RasterSink(prob_tmp, kind="prob", prob_dtype=prob_dtype, band_names=("rooftop", *extra),
                                **sink_args, scratch=prob_tmp != self.prob_pub) if prob_tmp else None)
            self.sinks.extend([prob_sink] if prob_sink is not None else [])
            self.poly = self.builder = self.splitter = None
            if polygons:
                min_pixels = vectorize.min_pixels_for(min_area, crs=info.crs, transform=info.transform,
                                                      width=W, height=H)
                if split:
                    seed_pixels = vectorize.min_pixels_for(min_seed_area, crs=info.crs, transform=info.transform,
                                                           width=W, height=H, margin=1.0)
                    self.splitter = InstanceSplitter(threshold=threshold, seed_threshold=seed_threshold,
                                                     min_seed_pixels=seed_pixels)
                self.poly = vectorize.StripPolygonizer(
                    width=W, height=H, classes=range(1, classes) if classes > 2 else (1,), min_pixels=min_pixels,
                    keep_pixels=SPLIT_VALUES if split else (), pixel_limit=MAX_SPLIT_PIXELS,
                    # The written mask, read back in the writer's thread (which finishes components).
                    mask_window=mask_sink.read if mask_sink is not None else None,
                )
                self.builder = vectorize.PolygonBuilder(
                    transform=info.transform, crs=info.crs, width=W, height=H, scene=scene_name, min_area=min_area,
                    simplify=simplify, regularize=regularize, class_names=names,
                    sink=batches.in_turn(polygon_sink) if polygon_sink is not None else None,
                    clip=area.geometry() if area is not None else None,
                )
            self.writer = CoreWriter(mask_sink=mask_sink, prob_sink=prob_sink, polygonizer=self.poly,
                                     builder=self.builder, strip_rows=vectorize.strip_height(W), width=W,
                                     splitter=self.splitter)
            workers = read_workers or (min(MAX_GPU_READERS, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1)
            self.reader = BlockReader(info.path, bands, workers=workers, prefetch=max(PREFETCH_BLOCKS, workers + 1),
                                      pin=cuda, aoi=area, scene=scene, grid=info)
            self.work = BlockWork(
                predictor, BlockStitcher(blocks, width=W, height=H, chip_size=chip, overlap=overlap,
                                         channels=predictor.channels, device=dev),
                self.writer, batches, roof=rooftop_index(names, classes), threshold=threshold,
                prob_dtype=prob_dtype, last_col=max(b.col for b in blocks), chips_total=chips_total,
                progress=progress, extra=len(extra), release_rows=output_tile(block),
            )
            self.writer.start()
        except BaseException as exc:
            self.abort(exc)
            raise
        #: What the pass did: filled in by :meth:`finish`.
        self.result = PredictionResult(
            scene=info.path, name=scene_name, mask_path=None, prob_path=None, polygons=None,
            width=info.width, height=info.height, chips_total=self.work.chips_total, chips_predicted=0,
            chips_skipped=0, blocks=len(self.blocks), seconds=0.0, device=str(dev),
            precision=self.predictor.precision, threads=self.n_threads, batch_size=batches.batch_size,
            overlap=overlap, block_size=block, compiled=self.predictor.compiled, resolution=target,
        )
        batches.hold(self.work, self, threads=self.cpu_threads, pixels=info.width * info.height)
        self._blocks_in = self.reader.iterate(self.blocks)  # the first reads start now
        self._setup_s = time.perf_counter() - t_start

    def feed(self) -> None:
        """Read every block and add its chips to the batches (full ones run), then end the scene.

        One process-wide GDAL cache cap for the pass: reader, writer and overviews.
        """
        assert self.reader is not None
        t_feed = time.perf_counter()
        work, batches = self.work, self.work.shared
        batches.feeding = work
        try:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), torch_threads(self.cpu_threads) as n, \
                    torch.inference_mode():
                self.n_threads = n
                t_wait = time.perf_counter()
                for item in self._blocks_in:
                    work.stages["wait_read"] += time.perf_counter() - t_wait
                    work.run(item)
                    t_wait = time.perf_counter()
                self.reader.close()
                # Set up and fed: with look-ahead other scenes were fed in between.
                self._fed_s = self._setup_s + time.perf_counter() - t_feed
                work.end()  # finished now, or when its last chips pass through a later batch
        finally:
            batches.feeding = None
            self.reader.close()

    def finish(self) -> None:
        """The last core is given to the writer: write, polygonise, publish, fill :attr:`result`."""
        assert self.writer is not None
        work, info = self.work, self.info
        t_finish = time.perf_counter()
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
            self.writer.finish()
            t0 = time.perf_counter()
            for sink in self.sinks:
                sink.finish(overviews=self.overviews.get(sink.path, False))
            work.stages["blend_write"] += self.writer.write_s + time.perf_counter() - t0
            work.stages["vectorise"] += self.writer.vector_s
            for sink in self.sinks:
                sink.close()
            frame = None
            if self.poly is not None and self.builder is not None:
                t1 = time.perf_counter()
                self.poly.mask_window = None  # the rasters are closed: anything left is joined by union
                rest = self.poly.finish()
                self.builder.add(self.splitter(rest) if self.splitter is not None else rest)
                frame = self.builder.frame()
                work.stages["vectorise"] += time.perf_counter() - t1
                if self.splitter is not None:  # part of "vectorise", also given on its own
                    work.stages["split"] = self.splitter.seconds
            if work.skipped == work.chips_total and self.area is None:
                log.warning("%s: every pixel is nodata; nothing was predicted and its layer is empty", info.path)
            elif work.skipped == work.chips_total and work.read_blocks:
                log.warning("%s: every pixel inside the AOI is nodata; nothing was predicted and its layer is empty",
                            info.path)
            check_rooftop_share(info.path, work.rooftop_pixels, work.valid_pixels)
            if self.target is not None:
                t0 = time.perf_counter()
                if self.mask_pub is not None:
                    to_scene_grid(self.mask_tmp, self.mask_pub, self.scene, kind="mask")
                if self.prob_pub is not None:
                    to_scene_grid(self.prob_tmp, self.prob_pub, self.scene, kind="prob", prob_dtype=self.prob_dtype)
                work.stages["blend_write"] += time.perf_counter() - t0
        self._stack.close()  # publishes the rasters, removes the scratch
        result = self.result
        result.mask_path = Path(self.mask_out) if self.mask_out else None
        result.prob_path = Path(self.prob_out) if self.prob_out else None
        result.polygons = frame
        result.polygon_count = self.builder.count if self.builder is not None else 0
        result.chips_predicted, result.chips_skipped = work.done, work.skipped
        # The scene's own time: its feed (less other scenes finishing in it), its share of the
        # run's last batch and (:meth:`waited`) the time the model's thread waited for its finish,
        # which otherwise runs beside the next scenes. Its chips left for a later scene's batch
        # are timed there.
        result.seconds = self._fed_s - work.nested_s + work.late_s
        result.stages, result.threads, result.batches = work.stages, self.n_threads, work.batches
        result.precision, result.compiled = self.predictor.precision, self.predictor.compiled
        log.info(
            "%s: %d chips (%d skipped, all nodata), finished in %.2f s, on %s (%s)",
            self.source, result.chips_predicted, result.chips_skipped, time.perf_counter() - t_finish,
            result.device, result.precision,
        )

    def waited(self, seconds: float) -> None:
        """The model's thread waited ``seconds`` for this scene's finish: part of the scene's time."""
        self.result.seconds += seconds

    def abort(self, exc: BaseException | None) -> None:
        """Stop the threads, close the files, discard the outputs and the scratch (idempotent).

        Raises:
            OutputError: ``exc`` was a failed write: named by its output.
        """
        if self.writer is not None:
            self.writer.stop()
        if self.reader is not None:
            self.reader.close()
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()
        error = exc if exc is not None else RuntimeError("prediction aborted")
        self._stack.__exit__(type(error), error, error.__traceback__)


def _wants_instances(
    instances: bool | None, meta: "CheckpointMeta", seed_threshold: float, min_seed_area: float
) -> bool:
    """Whether to split touching buildings; checks the request against the checkpoint."""
    has = getattr(meta, "target", "footprint") == "instances"
    if instances and not has:
        raise ConfigError(
            "--instances needs a model trained with model.target=instances; this checkpoint learned "
            "footprints only: retrain with --set model.target=instances, or drop --instances"
        )
    if not 0.0 < seed_threshold <= 1.0:
        raise ConfigError(f"seed threshold should be a probability in (0, 1], got {seed_threshold}")
    if min_seed_area < 0:
        raise ConfigError(f"min seed area should be >= 0 m², got {min_seed_area}")
    return has if instances is None else bool(instances)
