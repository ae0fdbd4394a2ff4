"""Write generated scenes and datasets: GeoTIFF image and mask, GeoPackage of roofs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import Polygon

from geoseg.errors import ConfigError
from geoseg.raster_io import GTIFF_PROFILE, atomic_output, check_output
from geoseg.synthetic.layout import Layout, plan
from geoseg.synthetic.render import render

log = logging.getLogger(__name__)

#: Window size (pixels) used when rendering large scenes block by block.
RENDER_BLOCK = 1024


@dataclass(frozen=True)
class SyntheticScene:
    """A generated scene on disk and its ground truth.

    Attributes:
        name: Scene name (file stem of the image).
        image: 3-band uint8 RGB GeoTIFF.
        mask: uint8 GeoTIFF on the image grid, 255 on roofs and 0 elsewhere.
        roofs: GeoPackage with layer ``"roofs"`` of the roof polygons (None when
            not written, e.g. in a raster-labelled dataset).
        polygons: The roof polygons in CRS units.
        crs: The scene CRS.
        transform: The scene's pixel-to-CRS transform.
        width: Width in pixels.
        height: Height in pixels.
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


@dataclass(frozen=True)
class SyntheticDataset:
    """A generated dataset on disk (see :func:`make_dataset`).

    Attributes:
        root: The dataset folder (what ``geoseg train --data`` takes).
        layout: ``"seed"``, ``"flat"`` or ``"vector"``.
        scenes: The scenes, with ``image`` and ``mask`` at their places in the layout.
        vector: The roof GeoPackage of the vector layout, else None.
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
    with atomic_output(image, overwrite=overwrite) as tmp_img:
        with rasterio.open(tmp_img, "w", **_profile(layout, 3, nodata)) as dimg:
            dimg.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                rasterio.enums.ColorInterp.blue]
            if mask is None:
                for win in windows:
                    dimg.write(render(layout, win)[0], window=win)
            else:
                with atomic_output(mask, overwrite=overwrite) as tmp_mask:
                    with rasterio.open(tmp_mask, "w", **_profile(layout, 1, None)) as dmask:
                        for win in windows:
                            rgb, m = render(layout, win)
                            dimg.write(rgb, window=win)
                            dmask.write(m, 1, window=win)


def _write_roofs(
    path: Path, polygons: Sequence[Polygon], kinds: Sequence[str], crs: CRS, *,
    scene: str | Sequence[str], overwrite: bool,
) -> None:
    import geopandas as gpd

    scenes = [scene] * len(polygons) if isinstance(scene, str) else list(scene)
    gdf = gpd.GeoDataFrame(
        {"id": np.arange(1, len(polygons) + 1, dtype=np.int64), "scene": scenes,
         "roof": list(kinds)},
        geometry=list(polygons), crs=crs.to_wkt(),
    )
    with atomic_output(path, overwrite=overwrite) as tmp:
        gdf.to_file(tmp, layer="roofs", driver="GPKG", engine="pyogrio")


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
    origin: tuple[float, float], n_roofs: int | None, nodata_border: int,
) -> Layout:
    _check_args(width, height, resolution, nodata_border)
    if n_roofs is not None and (int(n_roofs) != n_roofs or n_roofs < 0):
        raise ConfigError(f"n_roofs should be a non-negative integer or None, got {n_roofs!r}")
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception:
        raise ConfigError(f"crs {crs!r} is not a CRS; pass e.g. 'EPSG:32633'") from None
    transform = Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1])
    return plan(width=int(width), height=int(height), seed=int(seed), crs=crs_obj,
                 transform=transform, n_roofs=n_roofs, nodata_border=int(nodata_border))


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
        n_roofs: At most this many roofs (None: about 80% of the lots, one roof
            per 18 m lot); fewer are placed when the scene has no room.
        nodata_border: Width in pixels of a nodata frame (value 0 in every band,
            declared as the image's nodata); 0 for none. No roof touches it.
        write_roofs: Write the roof GeoPackage (layer ``"roofs"``).
        overwrite: Replace existing outputs.

    Returns:
        The written scene with its roof polygons.

    Raises:
        ConfigError: Non-positive sizes, an unknown CRS, a border too wide.
        OutputError: An output exists without ``overwrite`` (nothing is written).
    """
    out = Path(out_dir)
    layout = _layout_for(width=width, height=height, seed=seed, crs=crs, resolution=resolution,
                         origin=origin, n_roofs=n_roofs, nodata_border=nodata_border)
    image, mask, roofs = out / f"{name}.tif", out / f"{name}_mask.tif", out / f"{name}_roofs.gpkg"
    for p in (image, mask, roofs) if write_roofs else (image, mask):
        check_output(p, overwrite=overwrite)
    _write_rasters(layout, image, mask, overwrite=overwrite, block=RENDER_BLOCK)
    if write_roofs:
        _write_roofs(roofs, layout.roofs, layout.roof_kind, layout.crs, scene=name,
                     overwrite=overwrite)
    log.info("wrote synthetic scene %s (%dx%d px, %d roofs)", image, width, height,
             len(layout.roofs))
    return SyntheticScene(
        name=name, image=image, mask=mask, roofs=roofs if write_roofs else None,
        polygons=list(layout.roofs), crs=layout.crs, transform=layout.transform,
        width=int(width), height=int(height),
    )


def make_dataset(
    root: str | os.PathLike[str],
    *,
    layout: Literal["seed", "flat", "vector"] = "seed",
    n_scenes: int = 3,
    width: int = 517,
    height: int = 300,
    seed: int = 0,
    crs: str | CRS = "EPSG:32633",
    resolution: float = 0.3,
    origin: tuple[float, float] = (500000.0, 4650000.0),
    nodata_border: int = 0,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write a whole labelled dataset of generated scenes in one of the layouts geoseg reads.

    Layouts (scene names ``scene_000``, ``scene_001``, ...):

    - ``"seed"``: ``ROOT/images/images/NAME.tif`` + ``ROOT/label/label/NAME_label.tif`` (0/255).
    - ``"flat"``: ``ROOT/images/NAME.tif`` + ``ROOT/labels/NAME.tif`` (0/255).
    - ``"vector"``: ``ROOT/images/NAME.tif`` + one ``ROOT/roofs.gpkg`` (layer ``"roofs"``,
      attribute ``scene``); the masks go to ``ROOT/masks/NAME.tif`` for reference.

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
        overwrite: Replace existing files.

    Returns:
        The dataset: its root, layout, scenes and (vector layout) roof file.

    Raises:
        ConfigError: Unknown layout, n_scenes < 1, or bad scene arguments.
        OutputError: An output exists without ``overwrite``.
    """
    if layout not in ("seed", "flat", "vector"):
        raise ConfigError(f"layout should be one of 'seed', 'flat', 'vector', got {layout!r}")
    if int(n_scenes) != n_scenes or n_scenes < 1:
        raise ConfigError(f"n_scenes should be a positive integer, got {n_scenes!r}")
    root = Path(root)
    names = [f"scene_{i:03d}" for i in range(n_scenes)]
    if layout == "seed":
        paths = [(root / "images" / "images" / f"{n}.tif", root / "label" / "label" / f"{n}_label.tif")
                 for n in names]
    elif layout == "flat":
        paths = [(root / "images" / f"{n}.tif", root / "labels" / f"{n}.tif") for n in names]
    else:
        paths = [(root / "images" / f"{n}.tif", root / "masks" / f"{n}.tif") for n in names]
    vector = root / "roofs.gpkg" if layout == "vector" else None
    for img, msk in paths:
        check_output(img, overwrite=overwrite)
        check_output(msk, overwrite=overwrite)
    if vector is not None:
        check_output(vector, overwrite=overwrite)

    scenes: list[SyntheticScene] = []
    all_polys: list[Polygon] = []
    all_kinds: list[str] = []
    all_scenes: list[str] = []
    step = width * resolution * 1.25  # scenes side by side with a gap of a quarter scene
    for i, (name, (img, msk)) in enumerate(zip(names, paths)):
        lay = _layout_for(width=width, height=height, seed=seed * 1_000_003 + i, crs=crs,
                          resolution=resolution, origin=(origin[0] + i * step, origin[1]),
                          n_roofs=None, nodata_border=nodata_border)
        _write_rasters(lay, img, msk, overwrite=overwrite, block=RENDER_BLOCK)
        all_polys += lay.roofs
        all_kinds += lay.roof_kind
        all_scenes += [name] * len(lay.roofs)
        scenes.append(SyntheticScene(
            name=name, image=img, mask=msk, roofs=vector, polygons=list(lay.roofs), crs=lay.crs,
            transform=lay.transform, width=int(width), height=int(height),
        ))
    if vector is not None:
        _write_roofs(vector, all_polys, all_kinds, scenes[0].crs, scene=all_scenes,
                     overwrite=overwrite)
    log.info("wrote a %s-layout dataset of %d scenes to %s", layout, n_scenes, root)
    return SyntheticDataset(root=root, layout=layout, scenes=scenes, vector=vector)
