"""Read polygons from vector files in any CRS: the one reader for labels, evaluation and previews.

:func:`read_frame` opens a vector file (GeoPackage, GeoJSON, Shapefile, FlatGeobuf,
...) with pyogrio and gives it a CRS (the file's, or ``--assume-crs`` parsed by
:func:`geoseg.raster_io.parse_crs`, the one parser of CRS options, which lives a floor
up because ``open_scene`` needs it too). :func:`read_vector` adds evaluation's
cleaning (valid, polygonal parts only) and gives a :class:`VectorLayer`;
:class:`geoseg.labels.VectorLabels` adds the label checks (class column) to the
same frame. :data:`VECTOR_SUFFIXES` is the one list of suffixes taken for vector
files without asking GDAL: finding label files in a folder, telling vector labels
from raster labels, and reading an evaluation input as vector before trying it as
a raster.

Grids: whether two pixel grids are the same pixels is decided with the one
tolerance :data:`geoseg.raster_io.GRID_TOLERANCE_PX` (0.01 px at every corner of
the grid), chosen over 1e-6 px because GeoTIFFs written by other tools round their
transforms (a few 1e-9 degrees or 1e-4 m) and a shift below a hundredth of a pixel
moves no pixel centre out of its pixel: reading such a raster directly gives the
same pixels a nearest-neighbour warp would, and label rasters stay accepted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import shapely
from rasterio.crs import CRS

from geoseg.errors import GeoreferenceError, InputFileError, file_error
from geoseg.raster_io import parse_crs
from geoseg.remote import check_local

if TYPE_CHECKING:
    import geopandas

log = logging.getLogger(__name__)

#: File suffixes taken for vector files without trying GDAL's raster drivers.
VECTOR_SUFFIXES = frozenset(
    {".gpkg", ".geojson", ".json", ".geojsonl", ".shp", ".fgb", ".gml", ".kml", ".sqlite"}
)
#: The layer ``geoseg predict`` writes; read first from a file with several layers.
PREFERRED_LAYER = "rooftops"
#: The fix named when a file is not a readable vector file (callers name their own).
FORMATS_FIX = "pass a GeoPackage, GeoJSON or Shapefile"
#: The fix named when a vector file has no CRS and none is assumed.
CRS_FIX = "define one (ogr2ogr -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX"
#: The fix named when a vector file of buildings holds geometries but no polygons.
POLYGON_FIX = "pass a polygon layer (building outlines)"

_POLYGON_TYPES = ("Polygon", "MultiPolygon")


def is_vector_file(path: str | os.PathLike[str]) -> bool:
    """Whether a path names a vector file by its suffix (:data:`VECTOR_SUFFIXES`)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def same_crs(a: CRS, b: CRS) -> bool:
    """Whether two CRSs are the same (equal, or the same WKT)."""
    return a == b or a.to_wkt() == b.to_wkt()


def object_array(geoms: Iterable[Any]) -> np.ndarray:
    """A 1-D object array of geometries (never a 2-D array, whatever the items are)."""
    items = list(geoms)
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def polygonal_parts(geoms: Iterable[Any]) -> np.ndarray:
    """Keep only the polygonal parts of each geometry (an empty polygon where there are none)."""
    out = []
    for g in geoms:
        if g is None or g.is_empty:
            out.append(shapely.Polygon())
        elif g.geom_type in _POLYGON_TYPES:
            out.append(g)
        else:
            parts = [p for p in shapely.get_parts(g) if p.geom_type in _POLYGON_TYPES]
            out.append(shapely.union_all(parts) if parts else shapely.Polygon())
    return object_array(out)


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _not_vector(path: Path, exc: BaseException, fix: str) -> InputFileError:
    return file_error(InputFileError, path, f"is not a vector file GDAL can read ({_detail(exc)})", fix)


def _choose_layer(path: Path, fix: str) -> str | None:
    """The layer to read: the only one, else ``rooftops``, else the first with geometries (warned)."""
    import pyogrio

    try:
        listed = [(str(name), kind) for name, kind in pyogrio.list_layers(path)]
    except Exception as exc:  # noqa: BLE001 - pyogrio raises DataSourceError and plain errors alike
        raise _not_vector(path, exc, fix) from None
    if len(listed) <= 1:
        return None
    # tables without geometry (e.g. a GeoPackage's layer_styles) are not candidates
    layers = [name for name, kind in listed if kind is not None] or [listed[0][0]]
    layer = PREFERRED_LAYER if PREFERRED_LAYER in layers else layers[0]
    if layer != PREFERRED_LAYER and len(layers) > 1:
        log.warning("%s: has %d layers, reading the first one (%s)", path, len(layers), layer)
    return layer


def read_frame(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    assume_crs: str | CRS | None = None,
    fix: str = FORMATS_FIX,
    crs_fix: str = CRS_FIX,
) -> tuple["geopandas.GeoDataFrame", str | None]:
    """Read the features of a vector file, with a CRS.

    Args:
        path: The file.
        layer: The layer to read; None: the only layer, else ``rooftops`` (the layer
            ``geoseg predict`` writes), else the first with geometries (with a warning).
        assume_crs: CRS for a file that has none (``--assume-crs``).
        fix: The fix named in errors about the file's kind.
        crs_fix: The fix named when the file has no CRS and none is assumed.

    Returns:
        The features (attributes and geometries, in the file's or the assumed CRS) and
        the layer read (None for a single-layer file).

    Raises:
        InputFileError: Missing, a URL, a folder, unreadable, or without geometries.
        GeoreferenceError: No CRS and none assumed, or an ``assume_crs`` that is not a CRS.
    """
    import geopandas

    check_local(path)
    p = Path(path)
    if not p.exists():
        raise file_error(InputFileError, p, "file does not exist", "check the path")
    if p.is_dir():
        raise file_error(InputFileError, p, "is a folder, not a vector file", fix)
    if layer is None:
        layer = _choose_layer(p, fix)
    try:
        gdf = geopandas.read_file(p, layer=layer, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001 - pyogrio raises DataSourceError, DataLayerError, ...
        raise _not_vector(p, exc, fix) from None
    if "geometry" not in gdf or not isinstance(gdf, geopandas.GeoDataFrame):
        raise file_error(InputFileError, p, "has no geometry column", "pass a polygon layer")
    if gdf.crs is None:
        assumed = parse_crs(assume_crs)
        if assumed is None:
            raise file_error(GeoreferenceError, p, "has no CRS", crs_fix)
        gdf = gdf.set_crs(assumed.to_wkt())
    return gdf, layer


@dataclass(frozen=True)
class VectorLayer:
    """Polygons read from a vector file, one object per feature.

    Attributes:
        path: The file.
        layer: The layer read (None for single-layer formats).
        crs: The layer's CRS (the assumed one if the file has none).
        geometries: Object array of polygonal shapely geometries in ``crs``.
    """

    path: Path
    layer: str | None
    crs: CRS
    geometries: np.ndarray

    def in_crs(self, crs: CRS) -> np.ndarray:
        """The geometries reprojected to ``crs`` (made valid again after reprojection)."""
        if len(self.geometries) == 0 or same_crs(self.crs, crs):
            return self.geometries
        import geopandas

        out = np.asarray(geopandas.GeoSeries(self.geometries, crs=self.crs).to_crs(crs).values)
        return polygonal_parts(shapely.make_valid(out))

    def extent(self, crs: CRS) -> tuple[float, float, float, float] | None:
        """Bounds in ``crs``; None when the layer has no features."""
        geoms = self.in_crs(crs)
        if len(geoms) == 0:
            return None
        left, bottom, right, top = (float(v) for v in shapely.total_bounds(geoms))
        return left, bottom, right, top


def read_vector(
    path: str | os.PathLike[str],
    *,
    assume_crs: str | CRS | None = None,
    fix: str = FORMATS_FIX,
    crs_fix: str = CRS_FIX,
    polygon_fix: str = POLYGON_FIX,
) -> VectorLayer:
    """Read the polygons of a vector file (GeoPackage, GeoJSON, Shapefile, ...).

    The layer is chosen as :func:`read_frame` does. Geometries are made valid;
    features without polygonal parts become empty polygons and are dropped.

    Args:
        path: The file.
        assume_crs: CRS for a file that has none.
        fix: The fix named in errors about the file's kind.
        crs_fix: The fix named when the file has no CRS and none is assumed.
        polygon_fix: The fix named when the file holds geometries but no polygons.

    Returns:
        The layer.

    Raises:
        InputFileError: Missing, a URL, unreadable, or holds no polygon geometries.
        GeoreferenceError: No CRS and none assumed.
    """
    gdf, layer = read_frame(path, assume_crs=assume_crs, fix=fix, crs_fix=crs_fix)
    p = Path(path)
    geoms = object_array(gdf.geometry.values)
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    geoms = geoms[present]
    if len(geoms):
        types = set(shapely.get_type_id(geoms).tolist())
        polygon_types = {3, 6}  # Polygon, MultiPolygon
        if not types & polygon_types and not types & {7}:  # 7: GeometryCollection
            names = sorted({g.geom_type for g in geoms})
            raise file_error(
                InputFileError, p, f"has no polygon geometries (found {', '.join(names)})", polygon_fix,
            )
        geoms = polygonal_parts(shapely.make_valid(geoms))
        geoms = geoms[~shapely.is_empty(geoms)]
    crs = CRS.from_wkt(gdf.crs.to_wkt())
    return VectorLayer(path=p, layer=layer, crs=crs, geometries=object_array(geoms))


def read_aoi(
    path: str | os.PathLike[str],
    *,
    fix: str,
    assume_crs: str | CRS | None = None,
    crs_fix: str = CRS_FIX,
    polygon_fix: str | None = None,
) -> VectorLayer:
    """Read an area of interest: a vector file with at least one polygon (any CRS).

    Several features and multi-part polygons are all part of the area (callers take
    the union of :meth:`VectorLayer.in_crs`).

    Args:
        path: The file.
        fix: The fix named when the file is not a vector file or has no polygons.
        assume_crs: CRS for a file that has none.
        crs_fix: The fix named when the file has no CRS and none is assumed.
        polygon_fix: The fix named when the file holds only other geometries (points,
            lines); None: that of :func:`read_vector`.

    Raises:
        InputFileError: Missing, not a vector file, or without polygons.
        GeoreferenceError: No CRS and none assumed.
    """
    layer = read_vector(path, assume_crs=assume_crs, fix=fix, crs_fix=crs_fix,
                        polygon_fix=POLYGON_FIX if polygon_fix is None else polygon_fix)
    if len(layer.geometries) == 0:
        raise file_error(InputFileError, layer.path, "has no polygons", fix)
    return layer


def bounds_text(bounds: Iterable[float], crs: CRS) -> str:
    """``(left, bottom, right, top)`` for a message: degrees to 6 decimals, projected units to 2."""
    decimals = 6 if crs.is_geographic else 2
    return "(" + ", ".join(f"{float(v):.{decimals}f}" for v in bounds) + ")"


def clip_polygons(geoms: np.ndarray, area: Any) -> tuple[np.ndarray, np.ndarray]:
    """Polygons cut exactly to an area (a shapely polygon in their CRS; prepare it for speed).

    Polygons the area covers are kept as they are; the others become their
    intersection with it, polygonal parts only (GEOS overlays of valid polygons are
    valid), or None where nothing polygonal is left.

    Returns:
        ``(clipped, cut)``: an object array like ``geoms`` (None where nothing is left)
        and whether each polygon was cut.
    """
    geoms = object_array(geoms)
    cut = ~shapely.covers(area, geoms) if len(geoms) else np.zeros(0, dtype=bool)
    out = geoms.copy()
    if cut.any():
        parts = polygonal_parts(shapely.intersection(geoms[cut], area))
        out[cut] = object_array(None if g.is_empty else g for g in parts)
    return out, cut
