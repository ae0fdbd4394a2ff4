"""Evaluation inputs (mask rasters, vector files, AOIs) read onto one common pixel grid."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geoseg.errors import InputFileError, file_error
from geoseg.evaluation.objects import IGNORE_INDEX
from geoseg.raster_io import GRID_TOLERANCE_PX, SceneInfo, open_scene, read_window
from geoseg.remote import check_local
from geoseg.vector_io import VECTOR_SUFFIXES, VectorLayer, read_vector, same_crs

logger = logging.getLogger(__name__)

#: A mask has at most this many distinct values; more means an image or probabilities.
MAX_MASK_VALUES = 256
#: Pixel size (metres) of the grid on which two vector files are rasterised.
DEFAULT_VECTOR_RESOLUTION = 0.25
#: Side (pixels) of the blocks a raster is read in (``evaluate``: full-width strips of as many
#: pixels): bounds memory for any scene size.
DEFAULT_BLOCK_SIZE = 2048

FORMATS_FIX = "pass a mask GeoTIFF or a vector file (GeoPackage, GeoJSON, Shapefile)"


@dataclass(frozen=True)
class Grid:
    """The pixel grid on which the evaluation counts pixels.

    Attributes:
        crs: Its CRS.
        transform: Pixel-to-CRS transform.
        width: Width in pixels.
        height: Height in pixels.
    """

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        return rasterio.windows.bounds(Window(0, 0, self.width, self.height), self.transform)

    def window_transform(self, window: Window) -> Affine:
        """Transform of a window of the grid."""
        return rasterio.windows.transform(window, self.transform)


@dataclass(frozen=True)
class RasterMask:
    """A class-mask raster and how its values are read.

    Attributes:
        path: The file.
        info: Its header.
        positive: Values that mean the evaluated class (rooftop).
        ignore: Values that mean "not labelled" (ignored like nodata).
        counts: Pixel count of every valid value in the file.
    """

    path: Path
    info: SceneInfo
    positive: tuple[float, ...]
    ignore: tuple[float, ...]
    counts: dict[float, int]

    @property
    def crs(self) -> CRS:
        """The raster's CRS (the assumed one if the file has none)."""
        return self.info.crs

    def extent(self, crs: CRS) -> tuple[float, float, float, float]:
        """Bounds in ``crs``."""
        return _transform_bounds(self.info.crs, crs, self.info.bounds)


EvalInput = Union[RasterMask, VectorLayer]


def _transform_bounds(
    src: CRS, dst: CRS, bounds: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    if same_crs(src, dst):
        return bounds
    left, bottom, right, top = rasterio.warp.transform_bounds(src, dst, *bounds, densify_pts=21)
    return (left, bottom, right, top)


def _check_exists(path: Path, fix: str) -> None:
    if not path.exists():
        raise file_error(InputFileError, path, "file does not exist", "check the path")
    if path.is_dir():
        raise file_error(InputFileError, path, "is a folder, not a file", fix)


def _scan_values(src: rasterio.io.DatasetReader, path: Path, block_size: int) -> dict[float, int]:
    """Count the valid values of band 1, block by block (never the whole raster at once)."""
    counts: dict[float, int] = {}
    integer = np.dtype(src.dtypes[0]).kind in "ui"
    for row in range(0, src.height, block_size):
        for col in range(0, src.width, block_size):
            win = Window(col, row, min(block_size, src.width - col), min(block_size, src.height - row))
            data, valid = read_window(src, win, bands=[1])
            values = data[0][valid]
            if not integer:
                values = values[~np.isnan(values)]
            if src.dtypes[0] == "uint8":
                hist = np.bincount(values, minlength=256)
                uniq = np.nonzero(hist)[0]
                cnt = hist[uniq]
            else:
                uniq, cnt = np.unique(values, return_counts=True)
            for v, c in zip(uniq.tolist(), cnt.tolist()):
                counts[v] = counts.get(v, 0) + int(c)
            if len(counts) > MAX_MASK_VALUES:
                raise file_error(
                    InputFileError, path,
                    f"has more than {MAX_MASK_VALUES} distinct values, so it is not a class mask",
                    "pass a mask (0/255, 0/1 or class ids), e.g. from geoseg predict --mask-out, "
                    "not an image or probabilities",
                )
    return counts


def read_mask(
    path: str | os.PathLike[str],
    *,
    class_id: int,
    assume_crs: str | CRS | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> RasterMask:
    """Open a class-mask raster and decide which of its values mean the evaluated class.

    A mask whose only non-zero value is 255 is a 0/255 binary mask: 255 is
    the rooftop class (class 1). Otherwise values are class ids: ``class_id``
    is the evaluated class and 255 (geoseg's ignore index) is ignored like
    nodata. Nodata (and GDAL mask) pixels are always ignored.

    Raises:
        InputFileError: Missing, a URL, not a raster, several bands, or not a class mask.
        GeoreferenceError: No CRS and none assumed, or no geotransform.
    """
    check_local(path)
    p = Path(path)
    info = open_scene(p, assume_crs=assume_crs)
    if info.count != 1:
        raise file_error(
            InputFileError, p, f"has {info.count} bands, expected a single-band class mask",
            "pass the mask GeoTIFF (geoseg predict --mask-out) or a vector file",
        )
    with rasterio.open(p) as src:
        counts = _scan_values(src, p, block_size)
    nonzero = {v for v in counts if v != 0}
    if nonzero == {IGNORE_INDEX}:
        positive: tuple[float, ...] = (IGNORE_INDEX,) if class_id == 1 else ()
        ignore: tuple[float, ...] = ()
        logger.info("%s: a 0/255 mask, 255 is the rooftop class", p)
    else:
        positive = (class_id,)
        ignore = (IGNORE_INDEX,) if class_id != IGNORE_INDEX else ()
    return RasterMask(path=p, info=info, positive=positive, ignore=ignore, counts=counts)


def open_input(
    path: str | os.PathLike[str],
    *,
    class_id: int,
    assume_crs: str | CRS | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> EvalInput:
    """Open a prediction or truth: a mask raster or a vector file, told apart by GDAL.

    Raises:
        InputFileError: Missing, a URL, neither raster nor vector, or unusable (see
            :func:`read_mask`, :func:`read_vector`).
        GeoreferenceError: No CRS and none assumed.
    """
    check_local(path)
    p = Path(path)
    _check_exists(p, FORMATS_FIX)
    if p.suffix.lower() in VECTOR_SUFFIXES:
        return read_vector(p, assume_crs=assume_crs, fix=FORMATS_FIX)
    try:
        with rasterio.open(p):
            pass
    except (RasterioIOError, RasterioError):
        try:
            return read_vector(p, assume_crs=assume_crs, fix=FORMATS_FIX)
        except InputFileError as exc:
            if "is not a vector file" not in str(exc):
                raise
            problem = "the file is empty" if p.stat().st_size == 0 else (
                "is neither a raster nor a vector file GDAL can read"
            )
            raise file_error(InputFileError, p, problem, FORMATS_FIX) from None
    return read_mask(p, class_id=class_id, assume_crs=assume_crs, block_size=block_size)


def _metric_crs(layers: list[VectorLayer], *, region: VectorLayer | None = None) -> CRS:
    """The first layer CRS that is projected in metres (not Web Mercator), else the UTM zone of
    ``region`` (the AOI: what is evaluated), else of all the layers' geometries.

    A truth layer that spans several cities (a country's buildings, a dataset's three) centres
    on none of them: its own UTM zone may lie 90° of longitude from the area evaluated, where a
    "metre" of the grid is a quarter less on the ground.
    """
    import geopandas

    for layer in [*layers, *([region] if region is not None else [])]:
        crs = layer.crs
        if crs.is_projected and crs.linear_units == "metre" and crs.to_epsg() not in (3857, 900913):
            return crs
    geoms = [g for layer in ([region] if region is not None else layers) for g in layer.in_crs(CRS.from_epsg(4326))]
    if not geoms:
        return layers[0].crs
    utm = geopandas.GeoSeries(geoms, crs="EPSG:4326").estimate_utm_crs()
    return CRS.from_wkt(utm.to_wkt())


def vector_grid(
    layers: list[VectorLayer],
    *,
    aoi: VectorLayer | None,
    resolution: float,
) -> Grid:
    """A north-up grid in a local metric CRS covering the AOI, or else all layers.

    The CRS is the first of the layers' CRSs that is projected in metres
    (Web Mercator excluded: its metres are not ground metres), else the UTM
    zone of the AOI, or without one of the data. The extent is snapped outward to multiples of
    ``resolution`` (metres).
    """
    crs = _metric_crs(layers, region=aoi)
    if aoi is not None:
        extents = [aoi.extent(crs)]
    else:
        extents = [layer.extent(crs) for layer in layers]
    boxes = [e for e in extents if e is not None]
    if not boxes:
        return Grid(crs=crs, transform=Affine(resolution, 0, 0, 0, -resolution, 0), width=0, height=0)
    left = math.floor(min(b[0] for b in boxes) / resolution) * resolution
    bottom = math.floor(min(b[1] for b in boxes) / resolution) * resolution
    right = math.ceil(max(b[2] for b in boxes) / resolution) * resolution
    top = math.ceil(max(b[3] for b in boxes) / resolution) * resolution
    width = max(1, round((right - left) / resolution))
    height = max(1, round((top - bottom) / resolution))
    return Grid(crs=crs, transform=Affine(resolution, 0, left, 0, -resolution, top),
                width=width, height=height)


def raster_grid(mask: RasterMask) -> Grid:
    """The grid of a mask raster."""
    i = mask.info
    return Grid(crs=i.crs, transform=i.transform, width=i.width, height=i.height)


def _integer_offset(info: SceneInfo, grid: Grid) -> tuple[int, int] | None:
    """(col, row) offset of the grid in the raster's pixels when both grids align, else None."""
    if not same_crs(info.crs, grid.crs):
        return None
    to_raster = ~info.transform
    col, row = to_raster @ (grid.transform.c, grid.transform.f)
    dc, dr = round(col), round(row)
    # Every corner of the grid within GRID_TOLERANCE_PX of the raster pixel corner it should be:
    # also bounds the drift of slightly different pixel sizes over the whole grid.
    for c, r in ((0, 0), (grid.width, 0), (0, grid.height), (grid.width, grid.height)):
        x, y = to_raster @ (grid.transform @ (c, r))
        if abs(x - (c + dc)) > GRID_TOLERANCE_PX or abs(y - (r + dr)) > GRID_TOLERANCE_PX:
            return None
    return dc, dr


@contextlib.contextmanager
def raster_on_grid(
    info: SceneInfo, grid: Grid
) -> Iterator[Callable[[Window, list[int] | None], tuple[np.ndarray, np.ndarray]]]:
    """Read a raster in windows of ``grid``: directly when aligned, else warped (nearest).

    Yields:
        ``read(window, bands) -> (data (C, H, W), valid (H, W))`` in grid pixels;
        pixels outside the raster are invalid.
    """
    offset = _integer_offset(info, grid)
    with rasterio.open(info.path) as src:
        if offset is not None:
            dc, dr = offset

            def read(window: Window, bands: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
                shifted = Window(window.col_off + dc, window.row_off + dr, window.width, window.height)
                return read_window(src, shifted, bands=bands)

            yield read
            return
        logger.info("%s: resampled onto the evaluation grid (nearest)", info.path)
        options = dict(
            crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
            resampling=Resampling.nearest,
        )
        if src.crs is None:
            options["src_crs"] = info.crs
        if src.nodata is None:
            options["add_alpha"] = True
        with WarpedVRT(src, **options) as vrt:

            def read_vrt(
                window: Window, bands: list[int] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
                return read_window(vrt, window, bands=bands or list(range(1, info.count + 1)))

            yield read_vrt


class VectorOnGrid:
    """Rasterises polygons (already in the grid's CRS) window by window."""

    def __init__(self, geometries: np.ndarray, grid: Grid) -> None:
        self.geometries = geometries
        self.grid = grid
        self.tree = shapely.STRtree(geometries)

    def read(self, window: Window) -> np.ndarray:
        """Boolean (H, W): True at pixels whose centre is inside a polygon."""
        shape = (int(window.height), int(window.width))
        bounds = rasterio.windows.bounds(window, self.grid.transform)
        idx = self.tree.query(shapely.box(*bounds))
        if len(idx) == 0:
            return np.zeros(shape, dtype=bool)
        burned = rasterio.features.rasterize(
            ((g, 1) for g in self.geometries[np.sort(idx)]), out_shape=shape,
            transform=self.grid.window_transform(window), fill=0, dtype="uint8",
        )
        return burned.astype(bool)
