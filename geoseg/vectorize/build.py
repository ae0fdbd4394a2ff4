"""Finished pixel-space components -> valid, simplified (optionally regularised) polygons with ground attributes.

Polygons leave pixel space here, in the scene's CRS only: exact (integer pixel
corners through the scene transform), then filtered, simplified and measured
in true ground metres (:mod:`geoseg.vectorize.metric`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pyproj
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.encoding import DEFAULT_CLASS_NAMES, GDAL_CACHE_BYTES, stored_to_probability
from geoseg.vector_io import clip_polygons
from geoseg.vectorize.metric import REGULARIZE_SIMPLIFY, _polygonal, _regularize, ground_area_perimeter, metric_frame
from geoseg.vectorize.strips import STRIP_PIXELS, PixelPolygon, StripPolygonizer, apply_affine, min_pixels_for, strip_height

if TYPE_CHECKING:
    import geopandas


class PolygonBuilder:
    """Turn finished pixel-space components into polygons in the scene CRS, batch by batch.

    Steps per batch: to the scene CRS (exact), drop objects under ``min_area``
    m², simplify with ``simplify`` metres (Douglas-Peucker in the metric frame;
    the kept vertices are snapped back onto their exact pixel corners), make
    valid, compute the attributes. Only the finished polygons and their
    attributes are kept, so components are processed as soon as they are
    complete (while the model still runs) and never pile up in pixel form.
    Regularisation, when asked for, runs in :meth:`frame`; so does the cut to an
    area of interest (``clip``), last before the attributes, so that they measure
    the polygons as they are written.
    """

    def __init__(
        self,
        *,
        transform: Affine,
        crs: CRS,
        width: int,
        height: int,
        scene: str,
        min_area: float = 0.0,
        simplify: float = 0.0,
        regularize: bool = False,
        class_names: Sequence[str] | None = None,
        sink: Callable[[geopandas.GeoDataFrame], None] | None = None,
        clip: shapely.Geometry | None = None,
    ) -> None:
        """Set up the conversion.

        Args:
            transform: Scene transform.
            crs: Scene CRS.
            width: Scene width in pixels.
            height: Scene height in pixels.
            scene: Value of the ``scene`` attribute.
            min_area: Smallest object kept, in m² (0 keeps all).
            simplify: Simplification tolerance in metres (0: none).
            regularize: Regularise outlines with buildingregulariser.
            class_names: Class names; with more than two classes a ``class``
                attribute holds the name.
            sink: Hand each batch's finished polygons, as a GeoDataFrame with
                :meth:`frame`'s columns (``id`` 0: numbered by the sink), to this
                callable instead of keeping them (memory then does not grow with
                the number of buildings); :meth:`frame` returns None.
            clip: Cut every polygon exactly to this area (a shapely polygon in the scene CRS,
                the builder's own: it is prepared here); polygons with nothing left are dropped,
                and so are cut ones under ``min_area``.

        Raises:
            GeoreferenceError: A CRS that cannot be related to ground metres.
        """
        self.transform, self.crs, self.scene = transform, crs, scene
        # The frames' CRS as geopandas keeps it, parsed once: from rasterio's CRS every frame
        # (one a scene, or more) parsed its WKT twice, half the cost of a small tile's frame.
        self._frame_crs = pyproj.CRS.from_user_input(crs) if crs is not None else None
        self.min_area, self.simplify, self.regularize = float(min_area), float(simplify), bool(regularize)
        self.class_names = tuple(class_names) if class_names else None
        self.multi = self.class_names is not None and len(self.class_names) > 2
        self.metric = metric_frame(crs, transform, width, height)
        self._geoms: list[np.ndarray] = []
        self._conf: list[np.ndarray] = []
        self._cls: list[np.ndarray] = []
        self.sink = sink
        self.clip = clip
        if clip is not None:
            shapely.prepare(clip)
        self.count = 0  # polygons made so far

    def add(self, records: Sequence[PixelPolygon]) -> None:
        """Convert and keep a batch of finished components."""
        if not records:
            return
        pixel = np.array([r.geometry for r in records], dtype=object)
        group = np.array([r.group for r in records], dtype=np.int64)
        if self.simplify <= 0 and group.any():  # split buildings carry a vertex per pixel corner
            pixel[group > 0] = shapely.simplify(pixel[group > 0], 0.0)
        geoms = apply_affine(pixel, self.transform)
        if self.min_area > 0:
            area, _ = ground_area_perimeter(geoms, self.metric)
            keep = area >= self.min_area
            records = [r for r, k in zip(records, keep) if k]
            geoms, group = geoms[keep], group[keep]
            if not len(geoms):
                return
        if self.simplify > 0:
            metric = self.metric.to_metres(geoms)
            simple = shapely.simplify(metric, self.simplify, preserve_topology=True)
            # The buildings of one split component are simplified together (Visvalingam-Whyatt on
            # the coverage), so a shared wall stays one shared edge with no gap or overlap.
            for g in np.unique(group[group > 0]).tolist():
                members = np.flatnonzero(group == g)
                if len(members) > 1:
                    simple[members] = shapely.coverage_simplify(metric[members], self.simplify)
            metric = simple
            back = apply_affine(self.metric.from_metres(metric), ~self.transform)
            # Both simplifications keep a subset of the vertices, all of them pixel corners:
            # rounding undoes the round trip through the projection exactly.
            geoms = apply_affine(shapely.transform(back, np.rint), self.transform)
        if not self.regularize:
            cleaned = [_polygonal(g) for g in geoms]
            ok = np.array([g is not None for g in cleaned], dtype=bool)
            geoms = np.array([g for g in cleaned if g is not None], dtype=object)
            records = [r for r, k in zip(records, ok) if k]
        conf = np.array([r.prob_sum / r.count if r.count else np.nan for r in records])
        cls = np.array([r.cls for r in records], dtype=np.int64)
        if self.sink is not None:  # streamed: regularise and hand over this batch now
            batch = self._frame(geoms, conf, cls, first_id=0)
            self.count += len(batch)
            if len(batch):
                self.sink(batch)
            return
        self.count += len(geoms)
        self._geoms.append(geoms)
        self._conf.append(conf)
        self._cls.append(cls)

    def frame(self, *, chunk: int = 4096) -> geopandas.GeoDataFrame | None:
        """All polygons so far as a GeoDataFrame in the scene CRS (``id`` numbered 1..n).

        Returns:
            Columns ``id, scene, area_m2, perimeter_m, confidence`` (+ ``class``)
            and the geometry; None when the polygons went to a ``sink``.
        """
        if self.sink is not None:  # the layer's columns, for a run that found nothing
            self.sink(self._frame(np.array([], dtype=object), np.array([]), np.array([], np.int64), first_id=0))
            return None
        geoms = np.concatenate(self._geoms) if self._geoms else np.array([], dtype=object)
        conf = np.concatenate(self._conf) if self._conf else np.array([])
        cls = np.concatenate(self._cls) if self._cls else np.array([], dtype=np.int64)
        frame = self._frame(geoms, conf, cls, first_id=1, chunk=chunk)
        self.count = len(frame)
        return frame

    def _frame(
        self, geoms: np.ndarray, conf: np.ndarray, cls: np.ndarray, *, first_id: int, chunk: int = 4096,
    ) -> geopandas.GeoDataFrame:
        """Regularise (if asked) and attribute polygons; ``id`` from ``first_id`` (0: all 0)."""
        import geopandas as gpd

        columns = ["id", "scene", "area_m2", "perimeter_m", "confidence"] + (["class"] if self.multi else [])
        if len(geoms) and self.regularize:
            parts = []
            for i in range(0, len(geoms), chunk):
                reg = _regularize(geoms[i:i + chunk], self.metric,
                                  tolerance=max(self.simplify, REGULARIZE_SIMPLIFY))
                parts.extend(_polygonal(g) for g in reg)
            ok = np.array([g is not None for g in parts], dtype=bool)
            geoms = np.array([g for g in parts if g is not None], dtype=object)
            conf, cls = conf[ok], cls[ok]
        cut = np.zeros(len(geoms), dtype=bool)
        if len(geoms) and self.clip is not None:
            clipped, cut = clip_polygons(geoms, self.clip)
            ok = np.array([g is not None for g in clipped], dtype=bool)
            geoms, conf, cls, cut = clipped[ok], conf[ok], cls[ok], cut[ok]
        area = np.empty(len(geoms))
        perimeter = np.empty(len(geoms))
        for i in range(0, len(geoms), chunk):
            area[i:i + chunk], perimeter[i:i + chunk] = ground_area_perimeter(geoms[i:i + chunk], self.metric)
        keep = ~(cut & (area < self.min_area))  # what a cut leaves of a polygon is kept by the same rule
        if not keep.all():
            geoms, conf, cls, area, perimeter = geoms[keep], conf[keep], cls[keep], area[keep], perimeter[keep]
        if not len(geoms):
            return gpd.GeoDataFrame({c: [] for c in columns}, geometry=gpd.GeoSeries([], crs=self._frame_crs),
                                    crs=self._frame_crs)
        ids = np.arange(first_id, first_id + len(geoms), dtype=np.int64) if first_id else np.zeros(len(geoms), np.int64)
        data: dict[str, object] = {
            "id": ids,
            "scene": [self.scene] * len(geoms),
            "area_m2": area,
            "perimeter_m": perimeter,
            "confidence": conf,
        }
        if self.multi:
            names = list(self.class_names or ())
            data["class"] = [names[c] if c < len(names) else str(c) for c in cls]
        return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(geoms, crs=self._frame_crs), crs=self._frame_crs)


def polygons_to_frame(
    records: Sequence[PixelPolygon],
    *,
    transform: Affine,
    crs: CRS,
    width: int,
    height: int,
    scene: str,
    min_area: float = 0.0,
    simplify: float = 0.0,
    regularize: bool = False,
    class_names: Sequence[str] | None = None,
) -> geopandas.GeoDataFrame:
    """Turn pixel-space components into a GeoDataFrame in the scene CRS (see :class:`PolygonBuilder`).

    Raises:
        GeoreferenceError: A CRS that cannot be related to ground metres.
    """
    builder = PolygonBuilder(
        transform=transform, crs=crs, width=width, height=height, scene=scene, min_area=min_area,
        simplify=simplify, regularize=regularize, class_names=class_names,
    )
    builder.add(records)
    return builder.frame()




def mask_to_polygons(
    mask_path: str | os.PathLike[str],
    *,
    prob_path: str | os.PathLike[str] | None = None,
    scene: str | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    regularize: bool = False,
    class_names: Sequence[str] | None = None,
    strip_pixels: int = STRIP_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> geopandas.GeoDataFrame:
    """Polygons of a class-mask GeoTIFF, read in strips (never whole).

    Args:
        mask_path: uint8 class mask (0 background, 255 nodata).
        prob_path: Rooftop probability raster on the same grid (uint8 value/254
            or float) for the ``confidence`` attribute; None leaves it NaN.
        scene: ``scene`` attribute (default: the mask's file stem).
        min_area: Smallest object kept, in m².
        simplify: Simplification tolerance in metres.
        regularize: Regularise outlines with buildingregulariser.
        class_names: Class names (default background, rooftop). With more than
            two, every non-background class is polygonised and named in ``class``.
        strip_pixels: Pixels per strip read at a time.
        progress: Called with (rows done, rows total).

    Returns:
        A GeoDataFrame in the mask's CRS (see :func:`polygons_to_frame`).

    Raises:
        InputFileError: Unreadable rasters.
        GeoreferenceError: Mask and probability grids differ, or no CRS.
    """
    import rasterio

    from geoseg.errors import GeoreferenceError, file_error
    from geoseg.raster_io import open_raster

    names = tuple(class_names) if class_names else DEFAULT_CLASS_NAMES
    classes = range(1, len(names)) if len(names) > 2 else (1,)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))  # memory flat in raster size
        msrc = stack.enter_context(open_raster(mask_path))
        if msrc.crs is None:
            raise file_error(GeoreferenceError, mask_path, "has no CRS", "write the mask with a CRS")
        psrc: rasterio.io.DatasetReader | None = None
        if prob_path is not None:
            psrc = stack.enter_context(open_raster(prob_path))
            if psrc.shape != msrc.shape or psrc.transform != msrc.transform:
                raise file_error(
                    GeoreferenceError, prob_path, "is not on the mask's grid",
                    "pass the probability raster written together with the mask",
                )
        poly = StripPolygonizer(
            width=msrc.width, height=msrc.height, classes=classes,
            min_pixels=min_pixels_for(min_area, crs=msrc.crs, transform=msrc.transform,
                                      width=msrc.width, height=msrc.height),
            mask_window=lambda win: msrc.read(1, window=win),
        )
        builder = PolygonBuilder(
            transform=msrc.transform, crs=msrc.crs, width=msrc.width, height=msrc.height,
            scene=scene if scene is not None else Path(mask_path).stem, min_area=min_area,
            simplify=simplify, regularize=regularize, class_names=names,
        )
        rows = strip_height(msrc.width, strip_pixels=strip_pixels)
        for r0 in range(0, msrc.height, rows):
            win = Window(0, r0, msrc.width, min(rows, msrc.height - r0))
            prob = stored_to_probability(psrc.read(1, window=win))[0] if psrc is not None else None
            poly.add_strip(r0, msrc.read(1, window=win), prob)
            builder.add(poly.take_finished())
            if progress is not None:
                progress(r0 + int(win.height), msrc.height)
        builder.add(poly.finish())
        return builder.frame()
