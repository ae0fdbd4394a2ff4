"""``geoseg predict`` as a library call: scenes in, one polygon layer (and rasters) out.

Everything that can be checked is checked before any work (checkpoint,
every output path, every scene's CRS and bands), and every output of a run
appears only when the whole run succeeded (one geoseg.publish.Publication).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from geoseg.encoding import ProbDtype
from geoseg.inference.checks import check_value_range, scene_bands
from geoseg.inference.distributed import (
    RankGroup, Shard, assign_scenes, rank_device, read_partials, shard_from_env, write_partials,
)
from geoseg.inference.pipeline import PredictionResult, predict_scene
from geoseg.inputs import DEFAULT_MODEL, SCENE_EXTENSIONS, check_model_path, resolve_scenes  # noqa: F401
from geoseg.publish import Publication, publishing
from geoseg.raster_io import (
    check_distinct_outputs, check_not_inputs, check_output, open_scene, per_scene_paths,
)

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
    """

    out: Path
    features: int
    results: tuple[PredictionResult, ...]
    shard: Shard = Shard()


def scene_names(scenes: Sequence[Path]) -> list[str]:
    """Each scene's name (its ``scene`` attribute, and its name in per-scene outputs), unique in the run.

    The file stem; scenes that share a stem are named by their path from the folder
    they have in common, without the extension (``a/s`` and ``b/s``), or with it where
    that is all that tells them apart (``s.tif`` and ``s.tiff``).
    """
    names = [s.stem for s in scenes]
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
    config_file: str | os.PathLike[str] | None = None,
) -> list[tuple[str, str | os.PathLike[str] | None]]:
    """Every file a ``predict`` run reads, as (kind, path) pairs for :func:`check_not_inputs`."""
    model = model_path if model_path is not None else DEFAULT_MODEL
    return [*(("scene", s) for s in scenes), ("checkpoint", model), ("config file", config_file)]


def load_model(model_path: str | os.PathLike[str] | None, *, device: str = "cpu") -> tuple[object, object]:
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


def predict_files(
    scenes: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None = None,
    mask_out: str | os.PathLike[str] | None = None,
    prob_out: str | os.PathLike[str] | None = None,
    prob_dtype: ProbDtype = "uint8",
    batch_size: int | None = None,
    overlap: int | None = None,
    block_size: int = 2048,
    tta: bool = False,
    threshold: float = 0.5,
    min_area: float = 0.0,
    simplify: float = 0.0,
    regularize: bool = False,
    device: str = "auto",
    precision: str = "auto",
    bands: Sequence[int] | None = None,
    assume_crs: str | None = None,
    overwrite: bool = False,
    compile: bool | None = None,
    instances: bool | None = None,
    seed_threshold: float = 0.5,
    min_seed_area: float = 0.5,
    progress: Callable[[str, int, int], None] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    rescale: bool = False,
    extra_outputs: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    publication: Publication | None = None,
    keep_polygons: bool = False,
) -> PredictSummary:
    """Predict scenes and write all their polygons into one layer (and rasters if asked).

    Args:
        scenes: Files, folders or globs.
        out: Polygon output (.gpkg, .geojson, .fgb, .shp).
        model_path: Checkpoint (default ``saved_models/best_iou.pt``).
        mask_out: Class-mask output: a file (one scene), a folder, or a
            template with ``{scene}``.
        prob_out: Probability output, like ``mask_out``.
        prob_dtype: ``"uint8"`` or ``"float16"``.
        batch_size: Chips per batch (None: device default).
        overlap: Chip overlap in pixels (None: chip/4).
        block_size: Block size in pixels.
        tta: Flip test-time augmentation.
        threshold: Rooftop probability threshold.
        min_area: Smallest polygon in m².
        simplify: Simplification tolerance in metres.
        regularize: Regularise outlines.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        precision: ``"auto"``, ``"32"``, ``"bf16"``, ``"16"``.
        bands: Scene bands to use instead of the checkpoint's.
        assume_crs: CRS for scenes without one.
        overwrite: Replace existing outputs.
        compile: ``torch.compile`` the model (None: on a CPU for scenes of many chips).
        instances: Split touching buildings (None: when the checkpoint learned instances).
        seed_threshold: Border/contact probability under which a rooftop pixel seeds a building.
        min_seed_area: Smallest building seed in m².
        progress: Called with (scene name, chips done, chips total).
        config_file: The YAML file the options came from, if any (never overwritten).
        rescale: Map each scene's values linearly onto the range the model learned
            (``checks.check_value_range``) instead of refusing scenes far outside it.
        extra_outputs: (option, path) of the caller's own outputs of the run (``--preview``
            files), checked with these before any work: not an input, no two the same file,
            none existing without ``overwrite``.
        publication: Publish the outputs with this publication's others when it ends (the
            caller's previews) instead of when this call returns.
        keep_polygons: Also return each scene's polygons in ``results`` (memory grows with
            the number of buildings). Otherwise, in a single process, polygons go to a
            temporary GeoPackage batch by batch as they are found (``export.PolygonSpool``)
            and ``results[i].polygons`` is None (``polygon_count`` holds the count).

    Returns:
        What was written.

    Raises:
        OutputError: An output that is one of the inputs (scene, checkpoint,
            config file), with or without ``overwrite``; two outputs that are one file; an
            output that exists without ``overwrite`` (also when another run published it
            first); a failed write (disk full, ...), after which nothing is left behind.
        GeosegError: Any bad input, before anything is written.
    """
    from geoseg.export import SHAPEFILE_PARTS, PolygonSpool, check_vector_output, driver_for, write_polygons

    scene_paths = resolve_scenes(scenes)
    names = scene_names(scene_paths)
    masks = raster_output_paths(mask_out, scene_paths, kind="mask", names=names)
    probs = raster_output_paths(prob_out, scene_paths, kind="prob", names=names)
    polygon_files = ([Path(out).with_suffix(ext) for ext in SHAPEFILE_PARTS]
                     if driver_for(out) == "ESRI Shapefile" else [Path(out)])
    outputs = [*(("--out", p) for p in polygon_files), *(("--mask-out", p) for p in masks),
               *(("--prob-out", p) for p in probs), *extra_outputs]
    # Every output, before any scene is read: not an input (before check_output, whose hint is
    # --overwrite), no two the same file, none that exists without --overwrite.
    check_not_inputs(outputs, predict_inputs(scene_paths, model_path=model_path, config_file=config_file))
    check_distinct_outputs(outputs)
    out_path = check_vector_output(out, overwrite=overwrite)
    for _, p in outputs:
        if p is not None:
            check_output(p, overwrite=overwrite)
    model, meta = load_model(model_path)
    chosen_bands, sizes = [], []
    for path in scene_paths:
        info = open_scene(path, assume_crs=assume_crs)
        chosen_bands.append(scene_bands(info, meta, bands))  # type: ignore[arg-type]
        if not rescale:  # refuse before any work; with rescale, predict_scene maps (and logs) each scene
            check_value_range(info, meta, chosen_bands[-1])  # type: ignore[arg-type]
        sizes.append(info.width * info.height)

    # Under torchrun each rank predicts its share of the scenes; alone, a process predicts them all.
    shard = shard_from_env()
    mine = [i for i, r in enumerate(assign_scenes(sizes, shard.world)) if r == shard.rank]
    run_device = rank_device(device, shard)
    first_crs = open_scene(scene_paths[0], assume_crs=assume_crs).crs  # the layer's CRS
    spool: PolygonSpool | None = None  # single process, polygons not kept: streamed to disk
    own_rasters = [p for i in mine for p in (masks[i], probs[i]) if p is not None]
    results: list[PredictionResult] = []

    def predict_share() -> list[object]:
        """Predict this process's scenes; under torchrun, leave their polygons in partial layers."""
        # Raster outputs stay at temporary paths until the polygons are written too.
        tmp = {p: pub.file(p) for p in own_rasters}
        for i in mine:
            path, mpath, ppath = scene_paths[i], masks[i], probs[i]
            cb = None
            if progress is not None:
                name = names[i]
                cb = lambda done, total, name=name: progress(name, done, total)  # noqa: E731
            res = predict_scene(
                path, model, meta,  # type: ignore[arg-type]
                mask_out=tmp[mpath] if mpath else None, prob_out=tmp[ppath] if ppath else None,
                polygons=True, batch_size=batch_size, overlap=overlap, block_size=block_size,
                tta=tta, threshold=threshold, device=run_device, precision=precision,
                prob_dtype=prob_dtype, min_area=min_area, simplify=simplify,
                regularize=regularize, bands=chosen_bands[i], assume_crs=assume_crs,
                scene_name=names[i], temp_dir=out_path.parent if out_path.parent.exists()
                else None, progress=cb, overwrite=True, compile_model=compile, instances=instances,
                seed_threshold=seed_threshold, min_seed_area=min_seed_area, rescale=rescale,
                polygon_sink=spool.append if spool is not None else None,
            )
            res.mask_path, res.prob_path = mpath, ppath
            results.append(res)
        frames = [r.polygons for r in results]
        if shard.active:
            write_partials(list(zip(mine, frames)), partials)
        return frames

    def merge(frames: list[object]) -> int | None:
        """Rank 0 (or the only process) writes the one layer; under torchrun from every rank's partials."""
        if shard.rank != 0:
            return None
        if spool is not None:
            spool.write(out_path, overwrite=overwrite, publication=pub)
            return spool.count
        if shard.active:
            frames = read_partials(partials, range(len(scene_paths)))
        write_polygons(frames, out_path, overwrite=overwrite, publication=pub)
        return sum(len(f) for f in frames)  # type: ignore[arg-type]

    partials: Path | None = None  # under torchrun: rank 0's temporary folder of partial layers
    with RankGroup(shard) as group, publishing(overwrite=overwrite, into=publication) as pub:
        # Each step ends with every rank agreeing: one failure fails all ranks. The rasters and
        # the layer are published together (without replacing a file unless overwrite) when the
        # publication ends normally: here, or with the caller's own outputs.
        if shard.active:
            made = group.run(lambda: pub.folder(out_path.parent, name="partials", output=out_path)
                             if shard.rank == 0 else None)
            partials = group.gather(made)[0]
        if not shard.active and not keep_polygons:
            spool = PolygonSpool(pub.folder(out_path.parent, name="spool", output=out_path), crs=first_crs)
        frames = group.run(predict_share)
        features = group.gather(group.run(merge, frames))[0]
    return PredictSummary(out=out_path, features=features, results=tuple(results), shard=shard)
