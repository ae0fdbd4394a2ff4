"""Cut scenes into georeferenced GeoTIFF chips with an index GeoPackage of their footprints.

Output (a flat-layout dataset that :func:`geoseg.datasets.find_pairs` reads back)::

    OUT/images/<scene>_<row>_<col>.tif   image chips (scene dtype, bands and nodata)
    OUT/labels/<scene>_<row>_<col>.tif   label chips: uint8 class ids, 255 = ignore (nodata)
    OUT/index.gpkg                       layer "chips": footprint, scene, window, file paths

``<row>`` and ``<col>`` are the chip's pixel offsets in its scene. Each chip's
transform is the scene transform shifted by the window, so its pixels lie
exactly where they are in the scene. With ``resolution``, scenes are cut on their
grid at that ground resolution (``resample.grid_at``; images bilinear, label
rasters nearest, vector labels rasterised there) and offsets are in its pixels. All inputs are validated before anything
is written; chips are written to a staging folder and published only when every
chip is done, the index last (geoseg.publish: no file is replaced without
``overwrite``, and a failure leaves nothing).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.datasets import ScenePair, find_pairs
from geoseg.errors import DatasetError, InputFileError, file_error
from geoseg.labels import (
    IGNORE_INDEX,
    LabelValues,
    VectorLabels,
    open_label_raster,
    to_class_ids,
)
from geoseg.publish import Publication
from geoseg.raster_io import (
    GTIFF_PROFILE, SceneInfo, check_not_inputs, check_output, open_scene,
)
from geoseg.remote import check_local
from geoseg.resample import grid_at, parse_resolution, read_resampled, same_grid
from geoseg.tiling import DEFAULT_CHIP_SIZE, chip_grid
from geoseg.vector_io import is_vector_file

log = logging.getLogger(__name__)

INDEX_NAME = "index.gpkg"
INDEX_LAYER = "chips"


@dataclass(frozen=True)
class ChipResult:
    """What :func:`chip_scenes` wrote.

    Attributes:
        out_dir: The output folder.
        index: The index GeoPackage (layer ``"chips"``).
        images: The image chips, in index order.
        labels: The label chips (empty without labels).
        scenes: Number of scenes chipped.
    """

    out_dir: Path
    index: Path
    images: list[Path]
    labels: list[Path]
    scenes: int


@dataclass(frozen=True)
class _Job:
    """A validated scene to chip, with its label raster's description or its vector labels."""

    pair: ScenePair
    info: SceneInfo  # the grid chips are cut from: the scene's own, or its grid at ``resolution``
    label_info: SceneInfo | None
    label_mode: LabelValues | None
    vector: VectorLabels | None = None
    scene: SceneInfo | None = None  # the scene's own grid when ``info`` is another

    @property
    def own(self) -> SceneInfo:
        """The scene's own grid."""
        return self.scene or self.info


def resolve_inputs(
    scenes: Sequence[str | os.PathLike[str]],
    labels: Sequence[str | os.PathLike[str]] = (),
) -> list[ScenePair]:
    """Turn command-line SCENE and --labels arguments into scene pairs.

    A SCENE may be an image or a dataset folder (layout detected; its labels
    are used unless a vector file is given). ``labels`` is either one vector
    file for all scenes, or one label raster per image SCENE, in order.

    Raises:
        InputFileError: A scene or label file does not exist, or is a URL.
        DatasetError: No scenes; label rasters that do not pair up with the
            images; a vector file mixed with rasters; two scenes with the same name.
    """
    if not scenes:
        raise DatasetError("no scenes given; pass image files or dataset folders")
    for given in (*scenes, *labels):  # before Path(), which collapses the // of a URL
        check_local(given)
    label_paths = [Path(p) for p in labels]
    for p in label_paths:
        if not p.exists():
            raise file_error(InputFileError, p, "file does not exist", "check the --labels path")
    vectors = [p for p in label_paths if is_vector_file(p)]
    rasters = [p for p in label_paths if not is_vector_file(p)]
    if vectors and (rasters or len(vectors) > 1):
        raise DatasetError(
            "--labels: give either one vector file for all scenes or one label raster per scene, "
            f"got {', '.join(map(str, label_paths))}"
        )
    vector = vectors[0] if vectors else None
    files = [Path(s) for s in scenes if not Path(s).is_dir()]
    if rasters and len(rasters) != len(files):
        raise DatasetError(
            f"--labels: {len(rasters)} label raster(s) for {len(files)} image scene(s); "
            "pass one label raster per image, in the same order, or one vector file"
        )
    pairs: list[ScenePair] = []
    it = iter(rasters)
    for s in scenes:
        p = Path(s)
        if p.is_dir():
            pairs.extend(find_pairs(p, vector_labels=vector))
        elif not p.exists():
            raise file_error(InputFileError, p, "file does not exist", "check the path")
        elif rasters:
            pairs.append(ScenePair(image=p, label=next(it)))
        else:
            pairs.append(ScenePair(image=p, vector=vector))
    seen: dict[str, Path] = {}
    for pair in pairs:
        if pair.name in seen and seen[pair.name] != pair.image:
            raise file_error(
                DatasetError, pair.image, f"has the same name as {seen[pair.name]}",
                "chips are named after their scene; rename one of them",
            )
        seen[pair.name] = pair.image
    return pairs


def check_chip_out_dir(
    out_dir: str | os.PathLike[str], pairs: Sequence[ScenePair], *,
    dataset_folders: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Refuse an output folder that would write over the inputs or among them.

    ``out_dir`` may not be an input dataset folder, and its ``images/``,
    ``labels/`` and index may not be an input file or the folder of one (chips
    would land among the scenes they were cut from), with or without overwrite.

    Raises:
        OutputError: Naming the output, the input and the fix.
    """
    out = Path(out_dir)
    files: list[tuple[str, Path | None]] = []
    for pair in pairs:
        files += [("scene", pair.image), ("label", pair.label), ("label", pair.vector)]
    check_not_inputs([("--out", out)], [*(("dataset folder", f) for f in dataset_folders), *files])
    labelled = any(p.label is not None or p.vector is not None for p in pairs)
    parents = [(f"{kind} folder", path.parent) for kind, path in files if path is not None]
    check_not_inputs(
        [("--out", out / "images"), ("--out", out / "labels" if labelled else None), ("--out", out / INDEX_NAME)],
        [*files, *parents],
    )


def chip_name(scene: str, window: Window) -> str:
    """File name of a chip: ``<scene>_<row>_<col>.tif`` (pixel offsets in the scene)."""
    return f"{scene}_{int(window.row_off)}_{int(window.col_off)}.tif"


def _profile(count: int, dtype: str, crs: CRS, transform: Affine, nodata: float | None, size: int) -> dict[str, Any]:
    profile = {
        **GTIFF_PROFILE, "count": count, "width": size, "height": size, "dtype": dtype,
        "crs": crs, "transform": transform, "nodata": nodata,
    }
    if size % 16 or size < 256:  # GeoTIFF tiles must be multiples of 16: strips otherwise
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    return profile


def chip_scenes(
    scenes: Sequence[str | os.PathLike[str]] | Sequence[ScenePair],
    *,
    out_dir: str | os.PathLike[str],
    labels: Sequence[str | os.PathLike[str]] = (),
    size: int = DEFAULT_CHIP_SIZE,
    stride: int | None = None,
    overwrite: bool = False,
    assume_crs: str | None = None,
    classes: int = 2,
    label_values: LabelValues = "auto",
    class_column: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    resolution: float | None = None,
) -> ChipResult:
    """Cut scenes into chips on the tiling grid and write them with an index GeoPackage.

    Args:
        scenes: Image files and/or dataset folders (or ready ScenePairs).
        out_dir: Output folder (created).
        labels: One vector file, or one label raster per image scene.
        size: Chip side in pixels.
        stride: Step between chips in pixels (default ``size``: no overlap).
        overwrite: Replace existing chips and index.
        assume_crs: CRS for scenes (and vector files) that have none.
        classes: Number of classes (label value check).
        label_values: How label raster values map to class ids.
        class_column: Class attribute of vector labels (None: binary).
        progress: Called with (chips done, chips total).
        resolution: Ground metres per pixel to cut every scene at (None: as it is).

    Returns:
        What was written.

    Raises:
        InputFileError, GeoreferenceError, LabelError, DatasetError: Bad inputs
            (checked before anything is written).
        OutputError: An output exists without ``overwrite``, or the folder is not writable.
        ValueError: Bad size or stride.
    """
    out = Path(out_dir)
    pairs = _scene_pairs(scenes, labels)
    chip_grid(1, 1, size=size, stride=stride)  # validates size and stride before any file is opened
    if resolution is not None:
        parse_resolution(resolution, setting="--resolution", allow_auto=False)
    folders = [Path(s) for s in scenes if not isinstance(s, ScenePair) and Path(s).is_dir()]
    check_chip_out_dir(out, pairs, dataset_folders=folders)
    jobs = _open_inputs(pairs, assume_crs=assume_crs, classes=classes, label_values=label_values,
                        class_column=class_column, resolution=resolution)
    with_labels = _with_labels(jobs)
    chips = [_Chip(job, c.window, chip_name(job.pair.name, c.window))
             for job in jobs for c in chip_grid(job.info.width, job.info.height, size=size, stride=stride)]
    index_path = _check_outputs(out, chips, with_labels=with_labels, overwrite=overwrite)

    # Write into a staging folder; publish all files together (the index last) when all chips
    # are done: without --overwrite no file is replaced, and a failure leaves nothing behind.
    publication = Publication(overwrite=overwrite)
    stage = publication.folder(out, name="chips", output=out)
    try:
        records = _write_chips(stage, chips, size=size, classes=classes, with_labels=with_labels,
                               progress=progress)
        _write_index(stage / INDEX_NAME, records, [j.info.crs for j in jobs])
        for sub in ("images", "labels") if with_labels else ("images",):
            for f in sorted((stage / sub).iterdir()):
                publication.adopt(f, out / sub / f.name)
        publication.adopt(stage / INDEX_NAME, index_path)
        publication.commit()
    except BaseException as exc:
        error = publication.failure(exc)  # before the discard frees the disk
        publication.discard()
        if error is None:
            raise
        raise error from None
    log.info("wrote %d chips of %d scenes to %s", len(records), len(jobs), out)
    return ChipResult(
        out_dir=out, index=index_path,
        images=[out / r.fields["image"] for r in records],
        labels=[out / r.fields["label"] for r in records if r.fields["label"]],
        scenes=len(jobs),
    )


# --- the steps of chip_scenes ------------------------------------------------------------------


@dataclass(frozen=True)
class _Chip:
    """One chip to write: its scene, its window (pixels of the scene) and its file name."""

    job: _Job
    window: Window
    name: str


@dataclass(frozen=True)
class _Record:
    """One row of the index (``fields``) and the WKT of its footprint's CRS (the scene's)."""

    fields: dict[str, Any]
    crs_wkt: str


def _scene_pairs(
    scenes: Sequence[str | os.PathLike[str]] | Sequence[ScenePair], labels: Sequence[str | os.PathLike[str]]
) -> list[ScenePair]:
    """Ready ScenePairs as given; paths (files and dataset folders) through :func:`resolve_inputs`."""
    ready = [s for s in scenes if isinstance(s, ScenePair)]
    if scenes and len(ready) == len(scenes):
        return ready
    if ready:  # a mix: resolve_inputs would fail on the first ScenePair
        raise TypeError(f"scenes should be all paths or all ScenePairs, got {len(ready)} ScenePair(s) among paths")
    return resolve_inputs([s for s in scenes if not isinstance(s, ScenePair)], labels)


def _open_inputs(
    pairs: Sequence[ScenePair], *, assume_crs: str | None, classes: int, label_values: LabelValues,
    class_column: str | None, resolution: float | None = None,
) -> list[_Job]:
    """Open and validate every scene and label, before anything is written (one VectorLabels per file)."""
    jobs: list[_Job] = []
    vectors: dict[Path, VectorLabels] = {}
    for pair in pairs:
        info = open_scene(pair.image, assume_crs=assume_crs)
        linfo, mode, vector = None, None, None
        if pair.label is not None:
            linfo, mode = open_label_raster(pair.label, info, classes=classes,
                                            label_values=label_values)
        elif pair.vector is not None:
            if pair.vector not in vectors:
                vectors[pair.vector] = VectorLabels(pair.vector, class_column=class_column,
                                                    classes=classes, assume_crs=assume_crs)
            vector = vectors[pair.vector]
        grid = grid_at(info, resolution) if resolution is not None else info
        if same_grid(info, grid):
            jobs.append(_Job(pair, info, linfo, mode, vector))
        else:
            jobs.append(_Job(pair, grid, linfo, mode, vector, scene=info))
    return jobs


def _with_labels(jobs: Sequence[_Job]) -> bool:
    """Whether the scenes have labels: all of them or none.

    Raises:
        DatasetError: Some scenes have a label and some none.
    """
    with_labels = any(j.pair.label is not None or j.pair.vector is not None for j in jobs)
    if with_labels and not all(j.pair.label is not None or j.pair.vector is not None for j in jobs):
        missing = next(j.pair.image for j in jobs if j.pair.label is None and j.pair.vector is None)
        raise file_error(DatasetError, missing, "has no label while other scenes have one",
                         "give every scene a label, or none")
    return with_labels


def _check_outputs(out: Path, chips: Sequence[_Chip], *, with_labels: bool, overwrite: bool) -> Path:
    """Refuse existing outputs (without ``overwrite``) before writing anything; the index path.

    Raises:
        OutputError: An output exists without ``overwrite``, or the folder is not writable.
    """
    index_path = check_output(out / INDEX_NAME, overwrite=overwrite)
    for chip in chips:
        check_output(out / "images" / chip.name, overwrite=overwrite)
        if with_labels:
            check_output(out / "labels" / chip.name, overwrite=overwrite)
    return index_path


@contextlib.contextmanager
def _open_rasters() -> Iterator[Callable[[Path], rasterio.io.DatasetReader]]:
    """A reader per raster path, opened at its first chip and closed when the block ends."""
    handles: dict[Path, rasterio.io.DatasetReader] = {}
    with contextlib.ExitStack() as stack:
        def src_of(path: Path) -> rasterio.io.DatasetReader:
            if path not in handles:
                handles[path] = stack.enter_context(rasterio.open(path))
            return handles[path]

        yield src_of


def _write_chips(
    stage: Path, chips: Sequence[_Chip], *, size: int, classes: int, with_labels: bool,
    progress: Callable[[int, int], None] | None,
) -> list[_Record]:
    """Write every image chip (and label chip) into ``stage``; the index rows, in chip order."""
    records: list[_Record] = []
    (stage / "images").mkdir()
    if with_labels:
        (stage / "labels").mkdir()
    with _open_rasters() as src_of:
        for done, chip in enumerate(chips, 1):
            transform = chip.job.info.window_transform(chip.window)
            valid = _write_image_chip(stage / "images" / chip.name, chip, transform, src_of, size=size)
            label_rel = None
            mask = _label_chip(chip, transform, src_of, size=size, classes=classes)
            if mask is not None:
                mask[~valid] = IGNORE_INDEX
                with rasterio.open(stage / "labels" / chip.name, "w", **_profile(
                        1, "uint8", chip.job.info.crs, transform, IGNORE_INDEX, size)) as dst:
                    dst.write(mask, 1)
                label_rel = f"labels/{chip.name}"
            records.append(_index_record(chip, transform, size=size, label_rel=label_rel))
            if progress is not None:
                progress(done, len(chips))
    return records


def _write_image_chip(
    path: Path, chip: _Chip, transform: Affine, src_of: Callable[[Path], rasterio.io.DatasetReader], *, size: int
) -> np.ndarray:
    """Write the image chip (scene dtype, bands and nodata; padding marked); its valid pixels."""
    info, window = chip.job.info, chip.window
    fill = info.nodata if info.nodata is not None else 0
    data, valid = read_resampled(src_of(info.path), chip.job.own, info, window, fill=fill)
    padded = (window.col_off + window.width > info.width
              or window.row_off + window.height > info.height)
    with rasterio.open(path, "w", **_profile(
            info.count, info.dtype, info.crs, transform, info.nodata, size)) as dst:
        dst.write(data)
        if padded and info.nodata is None:
            # No nodata value to mark the padding with: an internal mask does.
            inside = np.zeros(valid.shape, dtype=np.uint8)
            inside[: min(size, info.height - int(window.row_off)),
                   : min(size, info.width - int(window.col_off))] = 255
            dst.write_mask(inside)
    return valid


def _label_chip(
    chip: _Chip, transform: Affine, src_of: Callable[[Path], rasterio.io.DatasetReader], *, size: int,
    classes: int,
) -> np.ndarray | None:
    """The chip's class ids (uint8, 255 ignore) from its label raster or vector file; None: no label."""
    job = chip.job
    if job.pair.label is not None:
        lab, lab_valid = read_resampled(src_of(job.pair.label), job.own, job.info, chip.window, bands=[1],
                                        resampling=Resampling.nearest)
        mask = to_class_ids(lab[0], mode=job.label_mode or "auto",
                            nodata=job.label_info.nodata if job.label_info else None,
                            classes=classes, path=job.pair.label)
        mask[~lab_valid] = IGNORE_INDEX
        return mask
    if job.vector is not None:
        return job.vector.rasterize(crs=job.info.crs, transform=transform, shape=(size, size))
    return None


def _index_record(chip: _Chip, transform: Affine, *, size: int, label_rel: str | None) -> _Record:
    """The chip's index row: scene, window, files and footprint in the scene's CRS."""
    import shapely

    info, window = chip.job.info, chip.window
    left, top = transform @ (0, 0)
    right, bottom = transform @ (size, size)
    return _Record({
        "scene": chip.job.pair.name,
        "col_off": int(window.col_off), "row_off": int(window.row_off),
        "width": int(window.width), "height": int(window.height),
        "image": f"images/{chip.name}", "label": label_rel,
        "crs": info.crs.to_string(),
        "geometry": shapely.box(min(left, right), min(top, bottom),
                                max(left, right), max(top, bottom)),
    }, info.crs.to_wkt())


def _write_index(path: Path, records: Sequence[_Record], scene_crss: Sequence[CRS]) -> None:
    """Write the index GeoPackage: one layer needs one CRS; scenes in several CRSs go to EPSG:4326."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    crss = {crs.to_wkt(): crs for crs in scene_crss}
    index_crs = next(iter(crss.values())) if len(crss) == 1 else CRS.from_epsg(4326)
    frames = []
    for wkt in crss:
        rows = [r.fields for r in records if r.crs_wkt == wkt]
        frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=wkt)
        if len(crss) > 1:
            log.info("scenes in %d CRSs: index footprints in EPSG:4326", len(crss))
            # Densify so that the reprojected footprints keep their shape.
            frame["geometry"] = shapely.segmentize(frame.geometry.values,
                                                   float(frame.geometry.length.max()) / 16)
            frame = frame.to_crs(index_crs.to_wkt())
        frames.append(frame)
    index = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry",
                             crs=index_crs.to_wkt())
    index.to_file(path, layer=INDEX_LAYER, driver="GPKG", engine="pyogrio")


def chip_demo(
    out_dir: str | os.PathLike[str], *, size: int = DEFAULT_CHIP_SIZE, overwrite: bool = False
) -> tuple[Path, ChipResult]:
    """Generate a synthetic scene in ``out_dir`` and chip it into ``out_dir/chips``.

    Returns:
        The generated image and the chipping result.

    Raises:
        OutputError: An output exists without ``overwrite`` (nothing is written).
    """
    from geoseg.synthetic import make_scene

    out = Path(out_dir)
    for name in ("demo.tif", "demo_mask.tif", "demo_roofs.gpkg", f"chips/{INDEX_NAME}"):
        check_output(out / name, overwrite=overwrite)
    scene = make_scene(out, name="demo", width=1000, height=700, seed=0, overwrite=overwrite)
    result = chip_scenes([scene.image], labels=[scene.mask], out_dir=out / "chips", size=size,
                         overwrite=overwrite)
    return scene.image, result
