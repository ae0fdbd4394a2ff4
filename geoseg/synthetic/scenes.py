"""Write generated scenes and datasets (GeoTIFF image, mask, GeoPackage of buildings); instance ids."""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import Polygon

from geoseg.errors import ConfigError
from geoseg.publish import atomic_output, publishing
from geoseg.raster_io import GTIFF_PROFILE, check_output
from geoseg.synthetic.layout import Layout, plan
from geoseg.synthetic.render import render

log = logging.getLogger(__name__)

#: Window size (pixels) used when rendering large scenes block by block.
RENDER_BLOCK = 1024
#: Layer and file name of the one-polygon-per-building vector file of the ``"buildings"`` layout.
BUILDINGS_LAYER = "buildings"
DatasetLayout = Literal["seed", "flat", "vector", "buildings"]
DATASET_LAYOUTS: tuple[str, ...] = ("seed", "flat", "vector", "buildings")


@dataclass(frozen=True)
class SyntheticScene:
    """A generated scene on disk and its ground truth.

    Attributes:
        name: Scene name (file stem of the image).
        image: 3-band uint8 RGB GeoTIFF.
        mask: uint8 GeoTIFF on the image grid, 255 on roofs and 0 elsewhere.
        roofs: GeoPackage of the building polygons, one per building (layer
            ``"roofs"``, or ``"buildings"`` in the buildings layout; None when
            not written, e.g. in a raster-labelled dataset).
        polygons: The building polygons in CRS units. Touching houses of a
            terrace share an edge; no two overlap.
        crs: The scene CRS.
        transform: The scene's pixel-to-CRS transform.
        width: Width in pixels.
        height: Height in pixels.
        building_ids: The ``building_id`` of each polygon (unique within the
            vector file; the values of :func:`instance_ids`).
    """

    name: str
    image: Path
    mask: Path | None
    roofs: Path | None
    polygons: list[Polygon] = field(repr=False)
    crs: CRS
    transform: Affine
    width: int
    height: int
    building_ids: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True)
class SyntheticDataset:
    """A generated dataset on disk (see :func:`make_dataset`).

    Attributes:
        root: The dataset folder (what ``geoseg train --data`` takes).
        layout: ``"seed"``, ``"flat"``, ``"vector"`` or ``"buildings"``.
        scenes: The scenes, with ``image`` and ``mask`` at their places in the layout.
        vector: The GeoPackage of the vector or buildings layout, else None.
    """

    root: Path
    layout: str
    scenes: list[SyntheticScene] = field(repr=False)
    vector: Path | None = None


def _profile(layout: Layout, count: int, nodata: float | None) -> dict:
    profile = {
        **GTIFF_PROFILE, "count": count, "width": layout.width, "height": layout.height,
        "dtype": "uint8", "crs": layout.crs, "transform": layout.transform, "nodata": nodata,
    }
    if layout.width < 256 or layout.height < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    return profile


def _write_rasters(
    layout: Layout, image: Path, mask: Path | None, *, overwrite: bool, block: int
) -> None:
    nodata = 0 if layout.nodata_border else None
    windows = [
        Window(c, r, min(block, layout.width - c), min(block, layout.height - r))
        for r in range(0, layout.height, block)
        for c in range(0, layout.width, block)
    ]
    with publishing(overwrite=overwrite) as publication:  # image and mask appear together
        tmp_img = publication.file(image)
        with rasterio.open(tmp_img, "w", **_profile(layout, 3, nodata)) as dimg:
            dimg.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                rasterio.enums.ColorInterp.blue]
            if mask is None:
                for win in windows:
                    dimg.write(render(layout, win)[0], window=win)
            else:
                with rasterio.open(publication.file(mask), "w", **_profile(layout, 1, None)) as dmask:
                    for win in windows:
                        rgb, m = render(layout, win)
                        dimg.write(rgb, window=win)
                        dmask.write(m, 1, window=win)


def _write_roofs(
    path: Path, layouts: Sequence[Layout], scenes: Sequence[str], *, layer: str, overwrite: bool,
) -> None:
    """One polygon per building: ``building_id``, ``scene``, ``roof`` (kind), ``terrace`` (row, 0: none)."""
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(
        {"building_id": np.concatenate([lay.building_ids for lay in layouts]),
         "scene": [name for lay, name in zip(layouts, scenes) for _ in lay.roofs],
         "roof": [kind for lay in layouts for kind in lay.roof_kind],
         "terrace": np.concatenate([lay.roof_terrace for lay in layouts])},
        geometry=[p for lay in layouts for p in lay.roofs], crs=layouts[0].crs.to_wkt(),
    )
    with atomic_output(path, overwrite=overwrite) as tmp:
        gdf.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio")


def _scene(lay: Layout, name: str, image: Path, mask: Path | None, roofs: Path | None) -> SyntheticScene:
    return SyntheticScene(
        name=name, image=image, mask=mask, roofs=roofs, polygons=list(lay.roofs), crs=lay.crs,
        transform=lay.transform, width=lay.width, height=lay.height,
        building_ids=tuple(int(i) for i in lay.building_ids),
    )


def _check_args(width: int, height: int, resolution: float, nodata_border: int) -> None:
    for key, val in (("width", width), ("height", height)):
        if int(val) != val or val < 1:
            raise ConfigError(f"scene {key} should be a positive number of pixels, got {val!r}")
    if not resolution > 0:
        raise ConfigError(f"resolution should be positive (CRS units per pixel), got {resolution!r}")
    if int(nodata_border) != nodata_border or nodata_border < 0 or 2 * nodata_border >= min(width, height):
        raise ConfigError(
            f"nodata_border should be 0 or a few pixels, less than half the scene, got {nodata_border!r}"
        )


def _layout_for(
    *, width: int, height: int, seed: int, crs: str | CRS, resolution: float,
    origin: tuple[float, float], n_roofs: int | None, nodata_border: int, terraces: float,
    first_id: int = 1,
) -> Layout:
    _check_args(width, height, resolution, nodata_border)
    if n_roofs is not None and (int(n_roofs) != n_roofs or n_roofs < 0):
        raise ConfigError(f"n_roofs should be a non-negative integer or None, got {n_roofs!r}")
    if isinstance(terraces, bool) or not isinstance(terraces, numbers.Real) or not 0 <= terraces <= 1:
        raise ConfigError(
            f"terraces should be a fraction from 0 (no terrace rows) to 1 (every pair of lots "
            f"that can hold one), got {terraces!r}"
        )
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception:
        raise ConfigError(f"crs {crs!r} is not a CRS; pass e.g. 'EPSG:32633'") from None
    transform = Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1])
    return plan(width=int(width), height=int(height), seed=int(seed), crs=crs_obj,
                transform=transform, n_roofs=n_roofs, nodata_border=int(nodata_border),
                terraces=float(terraces), first_id=first_id)


def make_scene(
    out_dir: str | os.PathLike[str],
    *,
    name: str = "scene",
    width: int = 517,
    height: int = 300,
    seed: int = 0,
    crs: str | CRS = "EPSG:32633",
    resolution: float = 0.3,
    origin: tuple[float, float] = (500000.0, 4650000.0),
    n_roofs: int | None = None,
    nodata_border: int = 0,
    terraces: float = 0.0,
    write_roofs: bool = True,
    overwrite: bool = False,
) -> SyntheticScene:
    """Generate a realistic scene and write ``NAME.tif``, ``NAME_mask.tif``, ``NAME_roofs.gpkg``.

    Roof, tree and road sizes are in ground metres (converted to CRS units at
    the scene centre, so a scene in EPSG:4326 or EPSG:3857 looks the same on
    the ground as one in UTM when its resolution is given in CRS units).

    Args:
        out_dir: Folder for the outputs (created if needed).
        name: File stem of the outputs.
        width: Width in pixels.
        height: Height in pixels.
        seed: Random seed; the same seed gives identical pixels and polygons.
        crs: Scene CRS.
        resolution: Pixel size in CRS units (metres for a projected CRS).
        origin: CRS coordinates (x, y) of the top-left corner.
        n_roofs: At most this many buildings (None: about 80% of the lots, one roof
            per 18 m lot); fewer are placed when the scene has no room.
        nodata_border: Width in pixels of a nodata frame (value 0 in every band,
            declared as the image's nodata); 0 for none. No roof touches it.
        terraces: Chance (0 to 1) that a pair of neighbouring lots holds a terrace:
            a row of 2 to 8 houses (4 to 9 m wide, 7.5 to 11 m deep) that share
            walls or stand 1 to 3 pixels apart, each its own polygon with its own
            roof colour and a darker rim along its walls.
            0 (the default) draws no terrace and gives the same bytes as before
            terraces existed.
        write_roofs: Write the building GeoPackage (layer ``"roofs"``, one polygon
            per building with a unique ``building_id``).
        overwrite: Replace existing outputs.

    Returns:
        The written scene with its roof polygons.

    Raises:
        ConfigError: Non-positive sizes, an unknown CRS, a border too wide.
        OutputError: An output exists without ``overwrite`` (nothing is written).
    """
    out = Path(out_dir)
    layout = _layout_for(width=width, height=height, seed=seed, crs=crs, resolution=resolution,
                         origin=origin, n_roofs=n_roofs, nodata_border=nodata_border,
                         terraces=terraces)
    image, mask, roofs = out / f"{name}.tif", out / f"{name}_mask.tif", out / f"{name}_roofs.gpkg"
    for p in (image, mask, roofs) if write_roofs else (image, mask):
        check_output(p, overwrite=overwrite)
    _write_rasters(layout, image, mask, overwrite=overwrite, block=RENDER_BLOCK)
    if write_roofs:
        _write_roofs(roofs, [layout], [name], layer="roofs", overwrite=overwrite)
    log.info("wrote synthetic scene %s (%dx%d px, %d roofs)", image, width, height,
             len(layout.roofs))
    return _scene(layout, name, image, mask, roofs if write_roofs else None)


def make_dataset(
    root: str | os.PathLike[str],
    *,
    layout: DatasetLayout = "seed",
    n_scenes: int = 3,
    width: int = 517,
    height: int = 300,
    seed: int = 0,
    crs: str | CRS = "EPSG:32633",
    resolution: float = 0.3,
    origin: tuple[float, float] = (500000.0, 4650000.0),
    nodata_border: int = 0,
    terraces: float = 0.0,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write a whole labelled dataset of generated scenes in one of the layouts geoseg reads.

    Layouts (scene names ``scene_000``, ``scene_001``, ...):

    - ``"seed"``: ``ROOT/images/images/NAME.tif`` + ``ROOT/label/label/NAME_label.tif`` (0/255).
    - ``"flat"``: ``ROOT/images/NAME.tif`` + ``ROOT/labels/NAME.tif`` (0/255).
    - ``"vector"``: ``ROOT/images/NAME.tif`` + one ``ROOT/roofs.gpkg`` (layer ``"roofs"``,
      attribute ``scene``); the masks go to ``ROOT/masks/NAME.tif`` for reference.
    - ``"buildings"``: the flat layout plus one ``ROOT/buildings.gpkg`` (layer
      ``"buildings"``, one polygon per building): the form of the instance-labelled
      development sets. Found as the flat layout; ``data.vector_labels=buildings.gpkg``
      trains instances from the polygons.

    Every vector file holds one polygon per building with a ``building_id``
    unique in the file (scene after scene: the first building of a scene
    follows the last of the scene before), ``scene``, ``roof`` (kind) and
    ``terrace`` (row number in its scene, 0 for a free-standing roof).
    Scenes lie side by side in the CRS (with a gap), so they never overlap.

    Args:
        root: Dataset folder.
        layout: Which layout to write.
        n_scenes: Number of scenes.
        width: Width of each scene in pixels.
        height: Height of each scene in pixels.
        seed: Base seed; scene ``i`` uses a seed derived from it.
        crs: CRS of every scene.
        resolution: Pixel size in CRS units.
        origin: Top-left corner of the first scene.
        nodata_border: As in :func:`make_scene`.
        terraces: As in :func:`make_scene` (0, the default: no terrace rows).
        overwrite: Replace existing files.

    Returns:
        The dataset: its root, layout, scenes and (vector and buildings layouts) vector file.

    Raises:
        ConfigError: Unknown layout, n_scenes < 1, or bad scene arguments.
        OutputError: An output exists without ``overwrite``.
    """
    if layout not in DATASET_LAYOUTS:
        raise ConfigError(
            f"layout should be one of {', '.join(map(repr, DATASET_LAYOUTS))}, got {layout!r}"
        )
    if int(n_scenes) != n_scenes or n_scenes < 1:
        raise ConfigError(f"n_scenes should be a positive integer, got {n_scenes!r}")
    root = Path(root)
    names = [f"scene_{i:03d}" for i in range(n_scenes)]
    if layout == "seed":
        paths = [(root / "images" / "images" / f"{n}.tif", root / "label" / "label" / f"{n}_label.tif")
                 for n in names]
    elif layout in ("flat", "buildings"):
        paths = [(root / "images" / f"{n}.tif", root / "labels" / f"{n}.tif") for n in names]
    else:
        paths = [(root / "images" / f"{n}.tif", root / "masks" / f"{n}.tif") for n in names]
    layer = {"vector": "roofs", "buildings": BUILDINGS_LAYER}.get(layout)
    vector = root / f"{layer}.gpkg" if layer is not None else None
    for img, msk in paths:
        check_output(img, overwrite=overwrite)
        check_output(msk, overwrite=overwrite)
    if vector is not None:
        check_output(vector, overwrite=overwrite)

    layouts: list[Layout] = []
    step = width * resolution * 1.25  # scenes side by side with a gap of a quarter scene
    for i, (img, msk) in enumerate(paths):
        lay = _layout_for(width=width, height=height, seed=seed * 1_000_003 + i, crs=crs,
                          resolution=resolution, origin=(origin[0] + i * step, origin[1]),
                          n_roofs=None, nodata_border=nodata_border, terraces=terraces,
                          first_id=sum(len(prev.roofs) for prev in layouts) + 1)
        _write_rasters(lay, img, msk, overwrite=overwrite, block=RENDER_BLOCK)
        layouts.append(lay)
    if vector is not None:
        _write_roofs(vector, layouts, names, layer=layer, overwrite=overwrite)
    log.info("wrote a %s-layout dataset of %d scenes to %s", layout, n_scenes, root)
    scenes = [_scene(lay, name, img, msk, vector) for lay, name, (img, msk) in zip(layouts, names, paths)]
    return SyntheticDataset(root=root, layout=layout, scenes=scenes, vector=vector)


def instance_ids(scene: SyntheticScene | Layout, window: Window | None = None) -> np.ndarray:
    """The true instance-id raster of a generated scene, or of a window of it.

    Each pixel holds the ``building_id`` of the building whose polygon covers
    its centre (the rule of ``rasterio.features.rasterize``, the same that drew
    the mask), 0 elsewhere; so ``instance_ids(scene) > 0`` is the mask.

    Args:
        scene: A scene from :func:`make_scene` or :func:`make_dataset`, or a planned layout.
        window: Pixels of the scene grid (may reach beyond the scene: 0 there);
            None for the whole scene.

    Returns:
        An int32 array of the window's shape ``(height, width)``.

    Raises:
        ConfigError: A window with fractional offsets or sizes, or a negative size.
    """
    if isinstance(scene, Layout):
        polygons, ids = scene.roofs, scene.building_ids
    else:
        polygons, ids = scene.polygons, np.asarray(scene.building_ids, dtype=np.int64)
    if window is None:
        window = Window(0, 0, scene.width, scene.height)
    col0, row0, w, h = window.col_off, window.row_off, window.width, window.height
    if any(int(v) != v for v in (col0, row0, w, h)) or w < 0 or h < 0:
        raise ConfigError(f"window should have whole-pixel offsets and sizes >= 0, got {window!r}")
    shape = (int(h), int(w))
    if not polygons or 0 in shape:
        return np.zeros(shape, dtype=np.int32)
    t_win = scene.transform @ Affine.translation(int(col0), int(row0))
    (x0, y0), (x1, y1) = t_win @ (0, 0), t_win @ (int(w), int(h))
    hits = np.flatnonzero(shapely.intersects(
        np.asarray(polygons, dtype=object), shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    ))
    if not len(hits):
        return np.zeros(shape, dtype=np.int32)
    return rasterio.features.rasterize(
        [(polygons[i], int(ids[i])) for i in hits], out_shape=shape, transform=t_win, fill=0,
        dtype="int32",
    )
