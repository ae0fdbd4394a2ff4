"""Ground metres in any CRS: a local equal-area frame around a scene, cleaning and regularising there.

Tolerances and attributes are in true ground metres in any CRS (also EPSG:3857
and EPSG:4326): they are computed in a Lambert azimuthal equal-area projection
centred on the scene (areas exact, distances within a few parts per million
over a scene).
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS

if TYPE_CHECKING:
    import pyproj

#: Distance (metres) under which buildingregulariser merges nearly parallel edges.
REGULARIZE_PARALLEL_THRESHOLD = 1.0
#: Least simplification (metres) before regularising: a pixel staircase must become
#: straight edges before their directions can be squared.
REGULARIZE_SIMPLIFY = 0.5


class MetricFrame:
    """A local equal-area projection (metres) around a scene, and the way there and back."""

    def __init__(self, crs: CRS, transform: Affine, width: int, height: int) -> None:
        """Centre a Lambert azimuthal equal-area projection on the scene.

        Args:
            crs: Scene CRS.
            transform: Scene transform.
            width: Scene width in pixels.
            height: Scene height in pixels.

        Raises:
            GeoreferenceError: A CRS that cannot be related to the earth and has no linear unit.
        """
        import pyproj

        from geoseg.errors import GeoreferenceError

        wkt = crs.to_wkt()
        cx, cy = transform @ (width / 2.0, height / 2.0)
        self.crs: pyproj.CRS | None
        try:
            lon, lat = _to_lonlat(wkt).transform(cx, cy, errcheck=True)
            self.crs, self._fwd, self._inv = _laea(wkt, _centre(lon), _centre(lat))
            self._scale = 1.0
        except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError) as exc:
            src = pyproj.CRS.from_user_input(wkt)
            factor = src.axis_info[0].unit_conversion_factor if src.is_projected and src.axis_info else None
            if not factor:
                raise GeoreferenceError(
                    f"CRS {crs.to_string()!r} cannot be related to ground metres ({exc}); "
                    "reproject the scene to a projected CRS (e.g. UTM)"
                ) from None
            self.crs, self._scale = None, float(factor)

    def pixel_area(self, transform: Affine, width: int, height: int) -> float:
        """Ground area (m²) of the scene's centre pixel."""
        col, row = width // 2, height // 2
        pixel = shapely.Polygon([transform @ (col + dc, row + dr) for dc, dr in ((0, 0), (1, 0), (1, 1), (0, 1))])
        return float(shapely.area(self.to_metres(np.array([pixel], dtype=object)))[0])

    def to_metres(self, geoms: np.ndarray) -> np.ndarray:
        """Geometries in the scene CRS -> the local metric frame."""
        if self.crs is None:
            return shapely.transform(geoms, lambda xy: xy * self._scale)
        return shapely.transform(geoms, lambda xy: np.column_stack(self._fwd.transform(xy[:, 0], xy[:, 1])))

    def from_metres(self, geoms: np.ndarray) -> np.ndarray:
        """Geometries in the local metric frame -> the scene CRS."""
        if self.crs is None:
            return shapely.transform(geoms, lambda xy: xy / self._scale)
        return shapely.transform(geoms, lambda xy: np.column_stack(self._inv.transform(xy[:, 0], xy[:, 1])))


#: A frame is centred on the scene's centre rounded to this many degrees (about 1 km): scenes
#: near each other (the tiles of one area) share its transformers, which take tens of ms to
#: build. The projection is equal-area anywhere, and a centre 1 km away changes distances
#: over a scene by parts per billion.
CENTRE_STEP_DEGREES = 0.01


def _centre(degrees: float) -> float:
    return round(round(degrees / CENTRE_STEP_DEGREES) * CENTRE_STEP_DEGREES, 6)


def _per_thread_cheap(transformer: "pyproj.Transformer", probe: tuple[float, float]) -> "pyproj.Transformer":
    """The same operation as a transformer made from its PROJ pipeline, where that gives the same answer.

    pyproj keeps a transformer's PROJ object per thread and builds it again in every new thread:
    one made from two CRSs searches PROJ's database again (6 ms on a 2-core Xeon), one made from
    a pipeline only parses it (0.15 ms). Every scene polygonises in a writer thread of its own,
    so on 512-px tiles the two transformers of its frame cost more than the rest of its polygons.
    ``probe`` (a point in the transformer's source CRS) must come out the same to the nanometre;
    a transformer that has no single pipeline (several candidate operations) stays as it is.
    """
    import pyproj

    try:
        definition = transformer.definition
        if not definition or "proj=" not in definition:
            return transformer
        rebuilt = pyproj.Transformer.from_pipeline(definition)
        want = transformer.transform(*probe, errcheck=True)
        got = rebuilt.transform(*probe, errcheck=True)
    except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError):
        return transformer
    return rebuilt if np.allclose(want, got, rtol=0.0, atol=1e-9) else transformer


@functools.lru_cache(maxsize=64)
def _to_lonlat(wkt: str) -> "pyproj.Transformer":
    import pyproj

    return pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(wkt), "EPSG:4326", always_xy=True)


@functools.lru_cache(maxsize=256)
def _laea(wkt: str, lon: float, lat: float) -> tuple["pyproj.CRS", "pyproj.Transformer", "pyproj.Transformer"]:
    """The Lambert azimuthal equal-area CRS centred at (lon, lat), and the transformers to and from it."""
    import pyproj

    src = pyproj.CRS.from_user_input(wkt)
    laea = pyproj.CRS.from_proj4(
        f"+proj=laea +lat_0={lat:.10f} +lon_0={lon:.10f} +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
    )
    inv = pyproj.Transformer.from_crs(laea, src, always_xy=True)
    inv = _per_thread_cheap(inv, (100.0, 100.0))  # a point 141 m from the centre
    centre_src = inv.transform(100.0, 100.0)
    fwd = _per_thread_cheap(pyproj.Transformer.from_crs(src, laea, always_xy=True), centre_src)
    return laea, fwd, inv


@functools.lru_cache(maxsize=16)
def _cached_frame(wkt: str, transform: Affine, width: int, height: int) -> MetricFrame:
    return MetricFrame(CRS.from_wkt(wkt), transform, width, height)


def metric_frame(crs: CRS, transform: Affine, width: int, height: int) -> MetricFrame:
    """The scene's :class:`MetricFrame`, cached (building pyproj transformers takes tens of ms)."""
    return _cached_frame(crs.to_wkt(), transform, int(width), int(height))


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry | None:
    """make_valid, keeping only the polygonal part."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return None
    return shapely.union_all(parts) if len(parts) > 1 else parts[0]


def ground_area_perimeter(geoms: Sequence[shapely.Geometry], frame: MetricFrame) -> tuple[np.ndarray, np.ndarray]:
    """True ground area (m²) and perimeter (m) of geometries in the scene CRS."""
    metric = frame.to_metres(np.asarray(geoms, dtype=object))
    return shapely.area(metric), shapely.length(metric)


def _regularize(geoms: np.ndarray, frame: MetricFrame, *, tolerance: float) -> np.ndarray:
    """Square building outlines with buildingregulariser, in the metric frame (tolerances in metres)."""
    import geopandas as gpd
    from buildingregulariser import regularize_geodataframe

    metric = frame.to_metres(geoms)
    gdf = gpd.GeoDataFrame({"_row": np.arange(len(metric))}, geometry=list(metric), crs=frame.crs)
    with warnings.catch_warnings():  # the package's own pandas deprecations are not the user's business
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = regularize_geodataframe(
            gdf, parallel_threshold=REGULARIZE_PARALLEL_THRESHOLD, simplify=True,
            simplify_tolerance=tolerance, num_cores=1,  # no process pool: we may run inside a thread
        )
    result = np.array(list(metric), dtype=object)
    for row, geom in zip(out["_row"].to_numpy(), out.geometry.to_numpy()):
        if geom is not None and not geom.is_empty:
            result[int(row)] = geom  # outlines it could not square keep their shape
    return frame.from_metres(result)
