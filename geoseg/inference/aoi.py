"""The area of interest of ``geoseg predict --aoi``: read once, placed on each scene's pixel grid.

Only blocks whose extent touches the area are read (``streams.BlockReader``), only
chips with data inside it are predicted, pixels outside it are nodata and polygons
are cut to it (``vectorize.PolygonBuilder(clip=)``). The area is rasterised one
window at a time: nothing scene-sized is made.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

from geoseg.errors import GeoreferenceError, file_error
from geoseg.labels import crs_text
from geoseg.raster_io import SceneInfo
from geoseg.vector_io import VectorLayer, bounds_text, read_aoi, same_crs

#: The fix named when the ``--aoi`` file is not a polygon file.
AOI_FIX = "pass a polygon file (GeoPackage, GeoJSON, Shapefile) of the area to predict"
#: The fix named when the ``--aoi`` file has no CRS (the scenes' ``--assume-crs`` is not the AOI's).
AOI_CRS_FIX = "define one (ogr2ogr -a_srs EPSG:XXXX)"


def read_area(path: str | os.PathLike[str]) -> VectorLayer:
    """Read ``--aoi``: polygons in any CRS (``vector_io.read_aoi``), the area being their union.

    Raises:
        InputFileError: Missing, not a vector file, or without polygons.
        GeoreferenceError: A file without CRS.
    """
    return read_aoi(path, fix=AOI_FIX, crs_fix=AOI_CRS_FIX, polygon_fix=AOI_FIX)


def area_on_scene(area: VectorLayer, info: SceneInfo) -> AoiPixels | None:
    """The area of interest in the scene's CRS, on its grid; None where it has no area in common with the scene."""
    geometry = shapely.union_all(area.in_crs(info.crs))
    pixels = AoiPixels(geometry, info.transform)
    scene = pixels.footprint(Window(0, 0, info.width, info.height))
    if not shapely.intersects(geometry, scene) or shapely.intersection(geometry, scene).area <= 0:
        return None
    return pixels


def area_outside_error(area: VectorLayer, scenes: Sequence[SceneInfo]) -> GeoreferenceError:
    """The one-line error for an AOI that touches none of the scenes: both extents, in the first scene's CRS."""
    from rasterio.warp import transform_bounds

    crs = scenes[0].crs
    boxes = [s.bounds if same_crs(s.crs, crs) else transform_bounds(s.crs, crs, *s.bounds) for s in scenes]
    union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    extent = area.extent(crs) or (float("nan"),) * 4
    if len(scenes) == 1:
        what, where = f"the scene {scenes[0].path}", "scene extent"
    else:
        what, where = f"any of the {len(scenes)} scenes", "extent of the scenes"
    return file_error(
        GeoreferenceError, area.path,
        f"the AOI does not touch {what} (AOI extent {bounds_text(extent, crs)}, {where} "
        f"{bounds_text(union, crs)} in {crs_text(crs)})",
        f"pass an AOI that overlaps {'the scene' if len(scenes) == 1 else 'a scene'}, or predict without --aoi",
    )


class AoiPixels:
    """An area of interest on a scene's pixel grid: the windows it touches, the pixels it covers.

    A pixel is inside when the area covers any part of it (GDAL's ``all_touched``), so
    the pixels inside cover the whole area and polygons cut exactly along its edge lose
    nothing. Nothing scene-sized is made: the area is rasterised one window at a time.
    GEOS prepared geometries are not thread-safe, so :meth:`touches` (prepared, fast)
    belongs to one thread, the one iterating :class:`BlockReader`, and :meth:`pixels`
    works on a copy of the area per thread.
    """

    def __init__(self, geometry: Any, transform: Affine) -> None:
        """Keep the area.

        Args:
            geometry: The area, a shapely (multi)polygon in the scene CRS (empty: it touches nothing).
            transform: The scene's pixel-to-CRS transform.
        """
        self.transform = transform
        self._wkb = shapely.to_wkb(geometry)
        self._prepared = self.geometry()
        shapely.prepare(self._prepared)
        self._local = threading.local()

    def geometry(self) -> Any:
        """A new copy of the area (the caller's own: prepare it freely)."""
        return shapely.from_wkb(self._wkb)

    def footprint(self, window: Window) -> Any:
        """The window's pixels as a polygon in the scene CRS (any transform, rotated too)."""
        c0, r0 = float(window.col_off), float(window.row_off)
        c1, r1 = c0 + float(window.width), r0 + float(window.height)
        return shapely.Polygon([self.transform @ xy for xy in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])

    def touches(self, window: Window) -> bool:
        """Whether the area meets the window at all (a quick test; :meth:`pixels` decides)."""
        return bool(shapely.intersects(self._prepared, self.footprint(window)))

    def pixels(self, window: Window) -> np.ndarray:
        """(H, W) bool: the window's pixels the area covers, even partly."""
        area = getattr(self._local, "area", None)
        if area is None:
            area = self._local.area = self.geometry()
        shape = (int(window.height), int(window.width))
        # Only the part near the window is handed to GDAL (a large area has many vertices);
        # one pixel of margin keeps the pixels on the window's edge exact.
        left, bottom, right, top = self.footprint(window).bounds
        mx, my = abs(self.transform.a) + abs(self.transform.b), abs(self.transform.d) + abs(self.transform.e)
        near = shapely.clip_by_rect(area, left - mx, bottom - my, right + mx, top + my)
        if near.is_empty:
            return np.zeros(shape, dtype=bool)
        tf = self.transform @ Affine.translation(float(window.col_off), float(window.row_off))
        burned = rasterio.features.rasterize([(near, 1)], out_shape=shape, transform=tf, fill=0,
                                             all_touched=True, dtype="uint8")
        return burned.astype(bool)
