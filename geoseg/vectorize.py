"""Class mask -> valid, merged, simplified (and optionally regularised) polygons with ground attributes.

The mask is read in horizontal strips, never whole. Each strip is labelled
into 4-connected components (``scipy.ndimage.label``) and polygonised with
``rasterio.features.shapes`` in exact integer pixel coordinates; components
touching the strip's bottom row stay open and are joined with the components
of the next strip they touch (same class, a shared pixel edge), so a building
crossing strip or block boundaries comes out as one polygon. Merging is done in
pixel coordinates because integer coordinates make the union exact; polygons
leave this module in the scene's CRS only.

Tolerances and attributes are in true ground metres in any CRS (also EPSG:3857
and EPSG:4326): they are computed in a Lambert azimuthal equal-area projection
centred on the scene (areas exact, distances within a few parts per million
over a scene).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import shape

log = logging.getLogger(__name__)

#: Pixels per strip when reading a mask for vectorisation (bounds memory; the
#: strip height is this divided by the width).
STRIP_PIXELS = 1 << 22
#: Mask value that is never vectorised (nodata / ignore).
MASK_NODATA = 255
#: 4-connectivity: diagonal neighbours are separate objects (as in rasterio.features.shapes).
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
#: Distance (metres) under which buildingregulariser merges nearly parallel edges.
REGULARIZE_PARALLEL_THRESHOLD = 1.0
#: Least simplification (metres) before regularising: a pixel staircase must become
#: straight edges before their directions can be squared.
REGULARIZE_SIMPLIFY = 0.5


@dataclass
class PixelPolygon:
    """A finished connected component in scene pixel coordinates (column, row).

    Attributes:
        pieces: Polygons whose union is the component (one per strip it spans).
        cls: Class id.
        prob_sum: Sum of the rooftop probability over its pixels.
        count: Number of pixels.
    """

    pieces: list[shapely.Polygon]
    cls: int
    prob_sum: float
    count: int

    @property
    def geometry(self) -> shapely.Geometry:
        """The component as one polygon (pieces unioned; exact, coordinates are integers)."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        return shapely.union_all(self.pieces)


@dataclass
class _Open:
    record: PixelPolygon
    touched: bool = field(default=False)


class StripPolygonizer:
    """Polygonise a class mask delivered as consecutive full-width strips, top to bottom.

    Memory holds one strip plus the finished polygons; components are merged
    across strip boundaries.
    """

    def __init__(
        self, *, width: int, height: int, classes: Sequence[int] = (1,), nodata: int = MASK_NODATA
    ) -> None:
        """Start an empty polygonisation.

        Args:
            width: Mask width in pixels.
            height: Mask height in pixels.
            classes: Class ids to polygonise (background excluded).
            nodata: Mask value never polygonised.
        """
        self.width, self.height = int(width), int(height)
        self.classes = tuple(int(c) for c in classes if int(c) != nodata)
        self.next_row = 0
        self._open: dict[int, PixelPolygon] = {}
        self._final: list[PixelPolygon] = []
        self._prev_ids = np.zeros(self.width, dtype=np.int64)  # open record id per column of the last row
        self._next_id = 1

    def add_strip(self, row_off: int, mask: np.ndarray, prob: np.ndarray | None = None) -> None:
        """Add the strip of rows ``row_off .. row_off + len(mask) - 1``.

        Args:
            row_off: First row of the strip; must follow the previous strip.
            mask: (h, width) class ids.
            prob: (h, width) rooftop probability in [0, 1] for the confidence
                attribute, or None.

        Raises:
            ValueError: A strip out of order or of the wrong width.
        """
        from rasterio import features
        from scipy import ndimage

        h, w = mask.shape
        if row_off != self.next_row or w != self.width or row_off + h > self.height:
            raise ValueError(
                f"strip at row {row_off} ({h}x{w}) does not continue the mask at row {self.next_row} "
                f"(width {self.width}, height {self.height})"
            )
        self.next_row = row_off + h
        labels = np.zeros((h, w), dtype=np.int32)
        cls_of = [0]
        for k in self.classes:
            lab, n = ndimage.label(mask == k, structure=_CROSS)
            if n:
                sel = lab > 0
                labels[sel] = lab[sel] + (len(cls_of) - 1)
                cls_of.extend([k] * n)
        n_comp = len(cls_of) - 1
        flat = labels.ravel()
        counts = np.bincount(flat, minlength=n_comp + 1)
        if prob is not None:
            sums = np.bincount(flat, weights=prob.ravel().astype(np.float64), minlength=n_comp + 1)
        else:  # no probability: confidence unknown
            sums = np.full(n_comp + 1, np.nan)
        geoms: list[shapely.Polygon | None] = [None] * (n_comp + 1)
        if n_comp:
            shift = Affine.translation(0, row_off)
            for geom, value in features.shapes(labels, mask=labels > 0, connectivity=4, transform=shift):
                geoms[int(value)] = shape(geom)

        # Links between open records (last row of the previous strip) and new components.
        parent: dict[tuple[str, int], tuple[str, int]] = {}

        def find(node: tuple[str, int]) -> tuple[str, int]:
            root = node
            while parent.get(root, root) != root:
                root = parent[root]
            while parent.get(node, node) != root:
                parent[node], node = root, parent[node]
            return root

        first = labels[0].astype(np.int64)
        link = (self._prev_ids > 0) & (first > 0)
        if link.any():
            pairs = np.unique(np.stack([self._prev_ids[link], first[link]], axis=1), axis=0)
            for rec_id, comp in pairs.tolist():
                if self._open[rec_id].cls != cls_of[comp]:
                    continue
                ra, rb = find(("r", rec_id)), find(("c", comp))
                if ra != rb:
                    parent[ra] = rb
        groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for node in list(parent):
            groups.setdefault(find(node), []).append(node)
        for root in list(groups):
            if root not in groups[root]:
                groups[root].append(root)

        comp_record = np.zeros(n_comp + 1, dtype=np.int64)
        merged_open: set[int] = set()
        new_records: dict[int, PixelPolygon] = {}
        grouped_comps: set[int] = set()
        for members in groups.values():
            pieces: list[shapely.Polygon] = []
            total, count, cls = 0.0, 0, 0
            comps = []
            for kind, idx in members:
                if kind == "r":
                    rec = self._open[idx]
                    merged_open.add(idx)
                    pieces.extend(rec.pieces)
                    total += rec.prob_sum
                    count += rec.count
                    cls = rec.cls
                else:
                    comps.append(idx)
            for comp in comps:
                pieces.append(geoms[comp])  # type: ignore[arg-type]
                total += float(sums[comp])
                count += int(counts[comp])
                cls = cls_of[comp]
                grouped_comps.add(comp)
            rid = self._take_id()
            new_records[rid] = PixelPolygon(pieces=pieces, cls=cls, prob_sum=total, count=count)
            comp_record[comps] = rid
        for comp in range(1, n_comp + 1):
            if comp not in grouped_comps:
                rid = self._take_id()
                new_records[rid] = PixelPolygon(
                    pieces=[geoms[comp]], cls=cls_of[comp],  # type: ignore[list-item]
                    prob_sum=float(sums[comp]), count=int(counts[comp]),
                )
                comp_record[comp] = rid
        # Open records that touched nothing in this strip are finished.
        for rid, rec in self._open.items():
            if rid not in merged_open:
                self._final.append(rec)
        last_row_ids = comp_record[labels[-1]] if self.next_row < self.height else np.zeros(w, np.int64)
        still_open = set(np.unique(last_row_ids[last_row_ids > 0]).tolist())
        self._open = {}
        for rid, rec in new_records.items():
            if rid in still_open:
                self._open[rid] = rec
            else:
                self._final.append(rec)
        self._prev_ids = last_row_ids

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def finish(self) -> list[PixelPolygon]:
        """All components, once the last strip has been added.

        Raises:
            ValueError: If rows are missing.
        """
        if self.next_row != self.height:
            raise ValueError(f"mask has {self.height} rows but strips stopped at row {self.next_row}")
        final = self._final + list(self._open.values())
        self._open = {}
        return final


# --- ground metres in any CRS ----------------------------------------------------------------


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

        src = pyproj.CRS.from_user_input(crs.to_wkt())
        cx, cy = transform @ (width / 2.0, height / 2.0)
        self.crs: pyproj.CRS | None
        try:
            lon, lat = pyproj.Transformer.from_crs(src, "EPSG:4326", always_xy=True).transform(
                cx, cy, errcheck=True
            )
            self.crs = pyproj.CRS.from_proj4(
                f"+proj=laea +lat_0={lat:.10f} +lon_0={lon:.10f} +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
            )
            self._fwd = pyproj.Transformer.from_crs(src, self.crs, always_xy=True)
            self._inv = pyproj.Transformer.from_crs(self.crs, src, always_xy=True)
            self._scale = 1.0
        except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError) as exc:
            factor = src.axis_info[0].unit_conversion_factor if src.is_projected and src.axis_info else None
            if not factor:
                raise GeoreferenceError(
                    f"CRS {crs.to_string()!r} cannot be related to ground metres ({exc}); "
                    "reproject the scene to a projected CRS (e.g. UTM)"
                ) from None
            self.crs, self._scale = None, float(factor)

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


def _affine(geoms: np.ndarray, t: Affine) -> np.ndarray:
    # Same arithmetic as ``Affine * (col, row)``: a polygon from a mask lands on
    # exactly the coordinates a rectangle drawn with the scene transform has.
    return shapely.transform(
        geoms, lambda xy: np.column_stack((t.a * xy[:, 0] + t.b * xy[:, 1] + t.c,
                                           t.d * xy[:, 0] + t.e * xy[:, 1] + t.f))
    )


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
) -> "geopandas.GeoDataFrame":  # noqa: F821
    """Turn pixel-space components into a GeoDataFrame in the scene CRS.

    Steps: to the scene CRS (exact), drop objects under ``min_area`` m²,
    simplify with ``simplify`` metres (Douglas-Peucker in the metric frame; the
    kept vertices are snapped back onto their exact pixel corners), optionally
    regularise to dominant orthogonal directions (``buildingregulariser``),
    make valid, and compute the attributes.

    Args:
        records: Components from :class:`StripPolygonizer`.
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

    Returns:
        Columns ``id, scene, area_m2, perimeter_m, confidence`` (+ ``class``)
        and the geometry, in ``crs``.

    Raises:
        GeoreferenceError: A CRS that cannot be related to ground metres.
    """
    import geopandas as gpd

    multi = class_names is not None and len(class_names) > 2
    columns = ["id", "scene", "area_m2", "perimeter_m", "confidence"] + (["class"] if multi else [])
    frame = MetricFrame(crs, transform, width, height)
    pixel = np.array([r.geometry for r in records], dtype=object)
    geoms = _affine(pixel, transform) if len(pixel) else pixel
    keep = np.ones(len(records), dtype=bool)
    if len(geoms) and min_area > 0:
        area, _ = ground_area_perimeter(geoms, frame)
        keep = area >= min_area
    records = [r for r, k in zip(records, keep) if k]
    geoms, pixel = geoms[keep], pixel[keep]
    if len(geoms) and simplify > 0:
        metric = shapely.simplify(frame.to_metres(geoms), simplify, preserve_topology=True)
        back = _affine(frame.from_metres(metric), ~transform)
        # Douglas-Peucker keeps a subset of the vertices, all of them pixel corners:
        # rounding undoes the round trip through the projection exactly.
        snapped = shapely.transform(back, np.rint)
        geoms = _affine(snapped, transform)
    if len(geoms) and regularize:
        geoms = _regularize(geoms, frame, tolerance=max(simplify, REGULARIZE_SIMPLIFY))
    cleaned = [_polygonal(g) for g in geoms]
    ok = [g is not None for g in cleaned]
    records = [r for r, k in zip(records, ok) if k]
    geoms = np.array([g for g in cleaned if g is not None], dtype=object)
    if not len(geoms):
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    area, perimeter = ground_area_perimeter(geoms, frame)
    data = {
        "id": np.arange(1, len(geoms) + 1, dtype=np.int64),
        "scene": [scene] * len(geoms),
        "area_m2": area,
        "perimeter_m": perimeter,
        "confidence": np.array([r.prob_sum / r.count if r.count else np.nan for r in records]),
    }
    if multi:
        names = list(class_names or ())
        data["class"] = [names[r.cls] if r.cls < len(names) else str(r.cls) for r in records]
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


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


def strip_height(width: int, *, strip_pixels: int = STRIP_PIXELS) -> int:
    """Rows per vectorisation strip for a mask ``width`` pixels wide."""
    return max(1, strip_pixels // max(1, width))


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
) -> "geopandas.GeoDataFrame":  # noqa: F821
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
    from geoseg.errors import GeoreferenceError, file_error
    from geoseg.inference.outputs import stored_to_probability
    from geoseg.raster_io import open_raster

    names = tuple(class_names) if class_names else ("background", "rooftop")
    classes = range(1, len(names)) if len(names) > 2 else (1,)
    with open_raster(mask_path) as msrc:
        if msrc.crs is None:
            raise file_error(GeoreferenceError, mask_path, "has no CRS", "write the mask with a CRS")
        psrc_ctx = open_raster(prob_path) if prob_path is not None else None
        psrc = psrc_ctx.__enter__() if psrc_ctx is not None else None
        try:
            if psrc is not None and (psrc.shape != msrc.shape or psrc.transform != msrc.transform):
                raise file_error(
                    GeoreferenceError, prob_path, "is not on the mask's grid",  # type: ignore[arg-type]
                    "pass the probability raster written together with the mask",
                )
            poly = StripPolygonizer(width=msrc.width, height=msrc.height, classes=classes)
            rows = strip_height(msrc.width, strip_pixels=strip_pixels)
            for r0 in range(0, msrc.height, rows):
                win = Window(0, r0, msrc.width, min(rows, msrc.height - r0))
                mask = msrc.read(1, window=win)
                prob = None
                if psrc is not None:
                    prob, _ = stored_to_probability(psrc.read(1, window=win))
                poly.add_strip(r0, mask, prob)
                if progress is not None:
                    progress(r0 + int(win.height), msrc.height)
        finally:
            if psrc_ctx is not None:
                psrc_ctx.__exit__(None, None, None)
        records = poly.finish()
        return polygons_to_frame(
            records, transform=msrc.transform, crs=msrc.crs, width=msrc.width, height=msrc.height,
            scene=scene if scene is not None else Path(mask_path).stem, min_area=min_area,
            simplify=simplify, regularize=regularize, class_names=names,
        )
