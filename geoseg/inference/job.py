"""``geoseg predict`` as one library call: scenes in, one polygon layer (and rasters, previews) out.

Everything that can be checked is checked before any work (every output path,
then the checkpoint, every scene's CRS and bands), and every output of a run
appears only when the whole run succeeded (one geoseg.publish.Publication).
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from geoseg.config import PredictConfig
from geoseg.encoding import ProbDtype
from geoseg.inference.checks import check_value_range, model_resolution, scene_bands
from geoseg.inference.distributed import (
    RankGroup, Shard, assign_scenes, rank_device, read_partials, shard_from_env, write_partials,
)
from geoseg.inference.aoi import area_on_scene, area_outside_error, read_area
from geoseg.inference.batching import Batches
from geoseg.inference.pipeline import PredictionResult, default_batch_size, predict_scene
from geoseg.inputs import DEFAULT_MODEL, SCENE_EXTENSIONS, check_model_path, find_scenes, resolve_scenes  # noqa: F401
from geoseg.publish import Publication, publishing
from geoseg.raster_io import (
    PathsByRole, check_distinct_outputs, check_not_inputs, check_output, open_scene, per_scene_paths,
)
from geoseg.remote import source_stem

#: Scenes checked at once before a run (threads: file opening and decoding mostly release the GIL;
#: remote scenes wait on the network).
CHECK_WORKERS = 4
#: Scenes of a run set up ahead of their turn on a GPU (``Batches(ahead=...)``): while the device
#: runs a batch, the next tiles' first blocks are read (a 512-px tile had the model's thread wait
#: 6.5 ms for its read on a 2-core CPU). On a CPU the model's threads take every core, and reading
#: ahead only moved the work: 266 tiles in 24.8 / 25.2 / 24.7 s against 24.0 / 24.4 / 25.6 s.
SCENES_AHEAD = 8


def scenes_ahead(device: "torch.device") -> int:
    """Scenes a run sets up ahead of their turn on ``device``."""
    return SCENES_AHEAD if device.type == "cuda" else 0

if TYPE_CHECKING:
    import torch
    from torch import nn

    from geoseg.checkpoints import CheckpointMeta
    from geoseg.raster_io import SceneInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSummary:
    """What a ``predict`` run wrote.

    Attributes:
        out: The polygon file.
        features: Polygons written.
        results: One result per scene this process predicted (timings, chip counts, raster paths):
            every scene, or under torchrun this rank's share.
        shard: This process's rank among the prediction processes.
        previews: The previews this process drew, in the order of ``results`` (none unless asked).
    """

    out: Path
    features: int
    results: tuple[PredictionResult, ...]
    shard: Shard = Shard()
    previews: tuple[Path, ...] = ()


@dataclass(frozen=True)
class OutputPlan:
    """Every file a ``predict`` run writes (per-scene entries None where not asked for).

    Attributes:
        out: The polygon output.
        layer: The files of the polygon output (a shapefile's parts, else ``out`` alone).
        masks: Each scene's class mask.
        probs: Each scene's probability raster.
        previews: Each scene's preview PNG.
    """

    out: Path
    layer: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    probs: tuple[Path | None, ...]
    previews: tuple[Path | None, ...]

    @property
    def has_previews(self) -> bool:
        return any(p is not None for p in self.previews)

    def by_option(self) -> list[tuple[str, Path | None]]:
        """(option, path) of every output, as :func:`check_not_inputs` and :func:`check_distinct_outputs` take them."""
        return [*(("--out", p) for p in self.layer), *(("--mask-out", p) for p in self.masks),
                *(("--prob-out", p) for p in self.probs), *(("--preview", p) for p in self.previews)]


@dataclass(frozen=True)
class CheckedScenes:
    """What :func:`check_scenes` found: each scene's bands and pixel count, and the layer's CRS (the first scene's).

    With an AOI, ``sizes`` counts nothing for the scenes it does not touch (they are
    skipped), so torchrun ranks share the work there is.
    """

    bands: tuple[Sequence[int], ...]
    sizes: tuple[int, ...]
    crs: Any
    infos: tuple[SceneInfo, ...] = ()  # each scene's header, as opened for the check: not opened again


def scene_names(scenes: Sequence[Path | str], given: Sequence[str | None] | None = None) -> list[str]:
    """Each scene's name (its ``scene`` attribute, and its name in per-scene outputs), unique in the run.

    The name in ``given`` (a STAC Item's id), else the file stem (a URL's: of its last path
    component, without the query string); scenes that share a name are named by their path from
    the folder they have in common, without the extension (``a/s`` and ``b/s``), or with it where
    that is all that tells them apart (``s.tif`` and ``s.tiff``).
    """
    given = [None] * len(scenes) if given is None else given
    names = [g if g is not None else source_stem(s) for s, g in zip(scenes, given)]
    by_stem: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_stem.setdefault(name, []).append(i)
    for group in by_stem.values():
        if len(group) < 2:
            continue
        full = [os.path.abspath(scenes[i]) for i in group]
        try:
            common = os.path.commonpath([os.path.dirname(f) for f in full])
        except ValueError:  # Windows drives: nothing in common
            common = ""
        rel = [Path(os.path.relpath(f, common) if common else f) for f in full]
        unique = [r.with_suffix("").as_posix() for r in rel]
        if len(set(unique)) < len(unique):
            unique = [r.as_posix() for r in rel]
        for i, name in zip(group, unique):
            names[i] = name
    return names


def raster_output_paths(
    spec: str | os.PathLike[str] | None, scenes: Sequence[Path], *, kind: str,
    names: Sequence[str] | None = None,
) -> list[Path | None]:
    """Where each scene's mask/probability raster goes.

    ``spec`` is a file (one scene only), a template containing ``{scene}``
    (e.g. ``out/{scene}_mask.tif``), or a folder (no .tif extension), which
    gets ``<scene>_<kind>.tif`` files; ``<scene>`` is the scene's name
    (:func:`scene_names`, the default of ``names``).

    Raises:
        OutputError: A single file for several scenes.
    """
    if spec is None:
        return [None] * len(scenes)
    names = scene_names(scenes) if names is None else names
    return per_scene_paths(os.fspath(spec), names, kind=kind, extensions=SCENE_EXTENSIONS)


def predict_inputs(
    scenes: Sequence[Path], *, model_path: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None, aoi: str | os.PathLike[str] | None = None,
) -> list[tuple[str, str | os.PathLike[str] | None]]:
    """Every file a ``predict`` run reads, as (kind, path) pairs for :func:`check_not_inputs`."""
    model = model_path if model_path is not None else DEFAULT_MODEL
    return [*(("scene", s) for s in scenes), ("checkpoint", model), ("config file", config_file), ("AOI", aoi)]


def load_model(model_path: str | os.PathLike[str] | None, *, device: str = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Load a checkpoint (default ``saved_models/best_iou.pt``), or an exported ``.onnx`` model.

    Raises:
        CheckpointError: No checkpoint (with the hint to train one), or a corrupt one; an
            ``.onnx`` file without geoseg's description.
        ModelError: An ``.onnx`` model where ONNX Runtime is not installed.
    """
    from geoseg.checkpoints import load_checkpoint
    from geoseg.onnx_model import ONNX_SUFFIX, load_onnx_model

    path = check_model_path(model_path)
    if path.suffix.lower() == ONNX_SUFFIX:
        return load_onnx_model(path)
    return load_checkpoint(path, map_location="cpu")


def plan_outputs(
    scenes: Sequence[Path], names: Sequence[str], *, out: str | os.PathLike[str],
    mask_out: str | os.PathLike[str] | None = None, prob_out: str | os.PathLike[str] | None = None,
    preview: str | os.PathLike[str] | None = None,
) -> OutputPlan:
    """Every file a run writes: the layer (a shapefile's parts) and each scene's rasters and preview.

    Raises:
        OutputError: An unknown vector extension; one file (not a folder or a ``{scene}``
            template) for the rasters or previews of several scenes.
    """
    from geoseg.export import SHAPEFILE_PARTS, driver_for
    from geoseg.preview import preview_paths

    previews: list[Path | None] = (list(preview_paths(preview, scenes, names=names)) if preview is not None
                                   else [None] * len(scenes))
    layer = ([Path(out).with_suffix(ext) for ext in SHAPEFILE_PARTS]
             if driver_for(out) == "ESRI Shapefile" else [Path(out)])
    return OutputPlan(
        out=Path(out), layer=tuple(layer),
        masks=tuple(raster_output_paths(mask_out, scenes, kind="mask", names=names)),
        probs=tuple(raster_output_paths(prob_out, scenes, kind="prob", names=names)),
        previews=tuple(previews),
    )


def check_outputs(
    plan: OutputPlan, inputs: PathsByRole, *, overwrite: bool
) -> Path:
    """Refuse the run's outputs before anything is read; return the polygon output.

    In this order: an output that is an input (before the existence checks, whose hint is
    ``--overwrite``), two outputs that are one file (two scenes' masks or previews too),
    an output that exists without ``overwrite``.

    Raises:
        OutputError: The first output refused, in one line with its fix.
    """
    from geoseg.export import check_vector_output

    outputs = plan.by_option()
    check_not_inputs(outputs, inputs)
    check_distinct_outputs(outputs)
    out_path = check_vector_output(plan.out, overwrite=overwrite)
    for _, p in outputs:
        if p is not None:
            check_output(p, overwrite=overwrite)
    return out_path


def check_scenes(
    scenes: Sequence[Path], meta: CheckpointMeta, *, bands: Sequence[int | str] | None, assume_crs: str | None,
    rescale: bool, aoi: Any = None,
) -> CheckedScenes:
    """Open every scene and check its bands (and, without ``rescale``, its values) against the model.

    With ``aoi`` (a ``vector_io.VectorLayer``), at least one scene must touch it.

    Raises:
        GeosegError: An unreadable scene, one without CRS (and no ``assume_crs``), bands
            that do not fit the model, values far outside the range it learned; an AOI that
            touches none of the scenes.
    """
    def check(path: Path) -> tuple[SceneInfo, tuple[int, ...], int]:
        info = open_scene(path, assume_crs=assume_crs)
        chosen = scene_bands(info, meta, bands)
        if not rescale:  # refuse before any work; with rescale, predict_scene maps (and logs) each scene
            check_value_range(info, meta, chosen)
        touched = aoi is None or area_on_scene(aoi, info) is not None
        return info, chosen, info.width * info.height if touched else 0

    # Scenes are checked side by side (opening, a decimated read and its percentiles mostly
    # run outside the GIL: a folder of small tiles was otherwise checked one tile at a time,
    # before any prediction). Results, and the first failure, come in the scenes' order.
    workers = min(CHECK_WORKERS, len(scenes))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="geoseg-check") as pool:
            checked = list(pool.map(check, scenes))
    else:
        checked = [check(path) for path in scenes]
    infos = [info for info, _, _ in checked]
    chosen = [bands_of for _, bands_of, _ in checked]
    sizes = [size for _, _, size in checked]
    crs = next((info.crs for info in infos if info.crs is not None), None)
    if aoi is not None and not any(sizes):
        raise area_outside_error(aoi, infos)
    return CheckedScenes(bands=tuple(chosen), sizes=tuple(sizes), crs=crs, infos=tuple(infos))


def scene_options(config: PredictConfig) -> dict[str, Any]:
    """``config`` as the keyword arguments of :func:`~geoseg.inference.pipeline.predict_scene` (device apart)."""
    return dict(
        batch_size=config.batch_size, overlap=config.overlap, block_size=config.block_size, tta=config.tta,
        threshold=config.threshold, precision=config.precision, min_area=config.min_area,
        simplify=config.simplify, regularize=config.regularize, compile_model=config.compile,
        instances=config.instances, seed_threshold=config.seed_threshold, min_seed_area=config.min_seed_area,
        resolution=config.resolution,
    )


def predict(
    scenes: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    config: PredictConfig | None = None,
    model_path: str | os.PathLike[str] | None = None,
    mask_out: str | os.PathLike[str] | None = None,
    prob_out: str | os.PathLike[str] | None = None,
    prob_dtype: ProbDtype = "uint8",
    preview: str | os.PathLike[str] | None = None,
    bands: Sequence[int | str] | None = None,
    assume_crs: str | None = None,
    rescale: bool = False,
    overwrite: bool = False,
    config_file: str | os.PathLike[str] | None = None,
    keep_polygons: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    aoi: str | os.PathLike[str] | None = None,
    asset: str | None = None,
) -> PredictSummary:
    """``geoseg predict``: scenes in, all their polygons in one layer (and rasters and previews if asked).

    Args:
        scenes: Files, folders, globs, URLs or GDAL network paths (``https://``, ``s3://``,
            ``/vsicurl/...``: only the windows read travel), STAC Items or ItemCollections (``.json``).
        out: Polygon output (.gpkg, .geojson, .fgb, .shp).
        config: How to predict and vectorise (default: ``PredictConfig()``, the defaults of
            ``geoseg predict``).
        model_path: Checkpoint (default ``saved_models/best_iou.pt``) or exported ``.onnx`` model.
        mask_out: Class-mask output: a file (one scene), a folder, or a
            template with ``{scene}``.
        prob_out: Probability output, like ``mask_out``.
        prob_dtype: ``"uint8"`` or ``"float16"``.
        preview: A PNG of each scene with its polygons (``geoseg.preview``): a ``.png`` file
            (one scene), a folder, or a template with ``{scene}``.
        bands: Scene bands (numbers and/or names, ``geoseg.bands``) to use instead of the checkpoint's.
        assume_crs: CRS for scenes without one.
        rescale: Map each scene's values linearly onto the range the model learned
            (``checks.check_value_range``) instead of refusing scenes far outside it.
        overwrite: Replace existing outputs.
        config_file: The YAML file ``config`` came from, if any (never overwritten).
        keep_polygons: Also return each scene's polygons in ``results`` (memory grows with
            the number of buildings; always so with ``preview``). Otherwise, in a single
            process, polygons go to a temporary GeoPackage batch by batch as they are found
            (``export.PolygonSpool``) and ``results[i].polygons`` is None (``polygon_count``
            holds the count).
        progress: Called with (scene name, chips done, chips total).
        aoi: Area of interest, a polygon file in any CRS: each scene predicts only there
            (``predict_scene``'s ``aoi``); a scene it does not touch is skipped with a
            warning (its part of the layer is empty, its rasters all nodata).
        asset: The asset of every STAC Item to predict (default: ``visual``, else its first RGB GeoTIFF).

    Returns:
        What was written.

    Raises:
        OutputError: An output that is one of the inputs (scene, checkpoint,
            config file, AOI), with or without ``overwrite``; two outputs that are one file; an
            output that exists without ``overwrite`` (also when another run published it
            first); a failed write (disk full, ...), after which nothing is left behind.
        GeosegError: Any bad input, before anything is written (an AOI that is not a polygon
            file, or that touches none of the scenes, too).
    """
    config = PredictConfig() if config is None else config
    found = find_scenes(scenes, asset=asset)
    scene_paths = [s.source for s in found]
    names = scene_names(scene_paths, [s.name for s in found])
    plan = plan_outputs(scene_paths, names, out=out, mask_out=mask_out, prob_out=prob_out, preview=preview)
    out_path = check_outputs(
        plan, predict_inputs(scene_paths, model_path=model_path, config_file=config_file, aoi=aoi),
        overwrite=overwrite,
    )
    area = read_area(aoi) if aoi is not None else None
    model, meta = load_model(model_path)
    checked = check_scenes(scene_paths, meta, bands=bands, assume_crs=assume_crs, rescale=rescale, aoi=area)
    # Under torchrun each rank predicts its share of the scenes; alone, a process predicts them all.
    shard = shard_from_env()
    mine = [i for i, r in enumerate(assign_scenes(checked.sizes, shard.world)) if r == shard.rank]
    options = dict(scene_options(config), device=rank_device(config.device, shard), prob_dtype=prob_dtype,
                   assume_crs=assume_crs, rescale=rescale)
    if area is not None:  # at least one scene touches it (check_scenes): the others are skipped
        options.update(aoi=area, skip_outside_aoi=True)
    if config.compile is None:  # one decision for all this process's scenes: they share batches and the compile
        options["compile_model"] = _compile_run(options["device"], meta, config, [checked.sizes[i] for i in mine])
    with contextlib.ExitStack() as scratch:
        if _int8_run(config, options["device"], model, meta, checked.sizes):
            # Calibrated on all the run's scenes, so that every torchrun rank runs the same model.
            model, meta = _int8_model(model, meta, scene_paths, list(checked.bands), scratch,
                                      rescale=rescale, assume_crs=assume_crs, resolution=config.resolution)
            options["precision"] = "32"  # the int8 graph runs in its own precision
        run = _Run(
            scenes=scene_paths, names=names, plan=plan, out=out_path, shard=shard, mine=mine,
            model=model, meta=meta, bands=checked.bands, options=options, overwrite=overwrite, progress=progress,
            infos=checked.infos,
        )
        return _publish(run, shard, plan, keep_polygons=keep_polygons, crs=checked.crs, overwrite=overwrite)


def _int8_run(config: PredictConfig, device: str, model: object, meta: Any, sizes: Sequence[int]) -> bool:
    """Whether this run quantises its model to int8 (``geoseg.devices.wants_int8``).

    An int8 ONNX model runs as it is; an fp32 ONNX model is quantised when int8 is asked
    for by name (``auto`` runs an exported model as it was exported).
    """
    from geoseg.devices import resolve_device, wants_int8

    if getattr(model, "precision", None) == "int8" or config.precision not in ("int8", "auto"):
        return False
    if getattr(model, "runs_own_precision", False) and config.precision == "auto":
        return False
    return wants_int8(config.precision, resolve_device(device, setting="device"), _chips(meta, config, sizes))


def _compile_run(device: str, meta: Any, config: PredictConfig, sizes: Sequence[int]) -> bool:
    """Whether this process's scenes are predicted by a compiled model (``runtime.compile_wanted``
    for all their chips together: the compile is paid once per run)."""
    from geoseg.devices import resolve_device
    from geoseg.inference.runtime import compile_wanted

    return compile_wanted(None, resolve_device(device, setting="device"), _chips(meta, config, sizes))


def _chips(meta: Any, config: PredictConfig, sizes: Sequence[int]) -> int:
    """About how many chips scenes of these pixel counts make (before their grids exist)."""
    from geoseg.tiling import chips_about

    return sum(chips_about(n, int(meta.chip_size), config.overlap) for n in sizes)


def _int8_model(model: nn.Module, meta: CheckpointMeta, scenes: Sequence[Path],
                bands: Sequence[Sequence[int]], scratch: contextlib.ExitStack, *, rescale: bool,
                assume_crs: str | None, resolution: str | float = "native") -> tuple[nn.Module, CheckpointMeta]:
    """The run's (already loaded) model quantised to int8, calibrated on its scenes, in a scratch folder
    removed after the run.

    With ``rescale``, each scene's chips are normalised as prediction will normalise them:
    with its value map folded in; each scene predicted on a model grid (``resolution``) is
    calibrated with chips read there.
    """
    from geoseg.quantize import int8_model
    from geoseg.temporaries import temporary_folder

    normalisations = None
    if rescale:
        normalisations = []
        for path, use in zip(scenes, bands):
            value_map = check_value_range(open_scene(path, assume_crs=assume_crs), meta, use, rescale=True)
            mapped = value_map.applied_to(meta) if value_map is not None else meta
            normalisations.append((mapped.mean, mapped.std, mapped.stretch))
    resolutions = [None] * len(scenes) if resolution == "native" else [
        model_resolution(open_scene(path, assume_crs=assume_crs, check_blocks=False), meta, resolution)
        for path in scenes]
    folder = scratch.enter_context(temporary_folder(name="int8"))
    return int8_model((model, meta), scenes, folder, bands=bands, normalisations=normalisations,
                      resolutions=resolutions if any(r is not None for r in resolutions) else None,
                      assume_crs=assume_crs)


def _publish(run: "_Run", shard: Shard, plan: OutputPlan, *, keep_polygons: bool, crs: Any,
             overwrite: bool) -> PredictSummary:
    """Predict, then publish the rasters, the layer and the previews together."""
    from geoseg.export import PolygonSpool

    out_path = run.out
    with RankGroup(shard) as group, publishing(overwrite=overwrite) as pub:
        # Each step ends with every rank agreeing: one failure fails all ranks. The rasters, the
        # layer and the previews are published together (without replacing a file unless
        # overwrite) when the publication ends normally.
        if shard.active:
            run.partials = group.gather(group.run(run.partials_folder, pub))[0]
        elif not keep_polygons and not plan.has_previews:
            run.spool = PolygonSpool(pub.folder(out_path.parent, name="spool", output=out_path), crs=crs)
        frames = group.run(run.predict_share, pub)
        features = group.gather(group.run(run.merge, pub, frames))[0]
        previews = group.run(run.draw_previews, pub)
    return PredictSummary(out=out_path, features=features, results=tuple(run.results), shard=shard,
                          previews=tuple(previews))


@dataclass
class _Run:
    """The steps of one :func:`predict` run on this rank, and what they share."""

    scenes: list[Path]
    names: list[str]
    plan: OutputPlan
    out: Path  # the checked polygon output
    shard: Shard
    mine: list[int]  # indices of this rank's scenes
    model: nn.Module
    meta: CheckpointMeta
    bands: tuple[Sequence[int], ...]
    options: dict[str, Any]  # predict_scene's keywords
    overwrite: bool
    progress: Callable[[str, int, int], None] | None
    results: list[PredictionResult] = field(default_factory=list)
    infos: tuple[SceneInfo, ...] = ()  # the scenes' headers from the check (empty: each opened as predicted)
    spool: Any = None  # export.PolygonSpool: single process, polygons streamed to disk
    partials: Path | None = None  # under torchrun: rank 0's temporary folder of partial layers

    def partials_folder(self, pub: Publication) -> Path | None:
        """Rank 0 makes the temporary folder every rank writes its partial layers into."""
        return pub.folder(self.out.parent, name="partials", output=self.out) if self.shard.rank == 0 else None

    def predict_share(self, pub: Publication) -> list[Any]:
        """Predict this process's scenes; under torchrun, leave their polygons in partial layers."""
        own_rasters = [p for i in self.mine for p in (self.plan.masks[i], self.plan.probs[i]) if p is not None]
        # Raster outputs stay at temporary paths until the polygons are written too.
        tmp = {p: pub.file(p) for p in own_rasters}
        temp_dir = self.out.parent if self.out.parent.exists() else None
        # One set of batches for all the scenes: a scene's last chips go through with the next
        # scene's first, and it finishes as they pass (the last one at the flush). Scenes are set up
        # (and their first blocks read) ahead of their turn on a GPU.
        with Batches(self.options["batch_size"] or default_batch_size(self.device),
                     ahead=scenes_ahead(self.device)) as batches:
            for i in self.mine:
                mpath, ppath = self.plan.masks[i], self.plan.probs[i]
                self.results.append(predict_scene(
                    self.scenes[i], self.model, self.meta,
                    mask_out=tmp[mpath] if mpath else None, prob_out=tmp[ppath] if ppath else None,
                    polygons=True, bands=self.bands[i], scene_name=self.names[i], temp_dir=temp_dir,
                    progress=self._scene_progress(self.names[i]), overwrite=True,
                    polygon_sink=self.spool.append if self.spool is not None else None, batches=batches,
                    scene_info=self.infos[i] if self.infos else None, **self.options,
                ))
            batches.flush()
        for i, res in zip(self.mine, self.results):
            res.mask_path, res.prob_path = self.plan.masks[i], self.plan.probs[i]
        frames = [r.polygons for r in self.results]
        if self.shard.active:
            assert self.partials is not None  # made by rank 0 in partials_folder, shared by every rank
            write_partials(list(zip(self.mine, frames)), self.partials)
        return frames

    @property
    def device(self) -> "torch.device":
        """The device this process predicts on."""
        from geoseg.devices import resolve_device

        return resolve_device(self.options["device"], setting="device")

    def _scene_progress(self, name: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        report = self.progress
        return lambda done, total: report(name, done, total)

    def merge(self, pub: Publication, frames: list[Any]) -> int | None:
        """Rank 0 (or the only process) writes the one layer; under torchrun from every rank's partials."""
        from geoseg.export import write_polygons

        if self.shard.rank != 0:
            return None
        if self.spool is not None:
            self.spool.write(self.out, overwrite=self.overwrite, publication=pub)
            return self.spool.count
        if self.shard.active:
            assert self.partials is not None  # made by rank 0 in partials_folder
            frames = read_partials(self.partials, range(len(self.scenes)))
        write_polygons(frames, self.out, overwrite=self.overwrite, publication=pub)
        return sum(len(f) for f in frames)

    def draw_previews(self, pub: Publication) -> list[Path]:
        """The preview of each of this process's scenes, published with the other outputs."""
        from geoseg.preview import write_preview

        drawn = []
        for i, res in zip(self.mine, self.results):
            png = self.plan.previews[i]
            if png is not None:
                drawn.append(write_preview(res.scene, res.polygons, png, overwrite=self.overwrite, publication=pub))
        return drawn
