"""evaluate(): pixel and object metrics of a prediction against a truth on one grid."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio.windows
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import WindowError
from rasterio.windows import Window

from geoseg.errors import ConfigError, GeoreferenceError, file_error
from geoseg.evaluation.inputs import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_VECTOR_RESOLUTION,
    EvalInput,
    Grid,
    RasterMask,
    VectorOnGrid,
    open_input,
    raster_grid,
    raster_on_grid,
    vector_grid,
)
from geoseg.vector_io import VectorLayer, bounds_text, polygonal_parts, read_aoi
from geoseg.evaluation.objects import (
    DEFAULT_IOU_THRESHOLD,
    ROOFTOP_CLASS,
    ObjectMatch,
    _check_threshold,
    match_objects,
    IGNORE_INDEX,
    object_array,
)
from geoseg.vectorize import PixelPolygon, StripPolygonizer, apply_affine, strip_height
from geoseg.metrics import ConfusionMatrix
from geoseg.raster_io import ground_pixel_size

logger = logging.getLogger(__name__)

#: Decimals of the metrics in the table (the JSON carries full precision).
TABLE_DECIMALS = 4
#: The fix named when the AOI file is not a polygon file.
AOI_FIX = "pass a polygon file (GeoPackage, GeoJSON, Shapefile) of the evaluated area"


@dataclass(frozen=True)
class PixelScores:
    """Binary confusion counts of the evaluated class and the metrics derived from them.

    Counts are pixels where both inputs have data (and inside the AOI); the
    metrics are those of :meth:`geoseg.metrics.ConfusionMatrix.compute`, so
    evaluation and training validation agree. A ratio with a zero denominator
    is 1.0 when neither side has a rooftop pixel (both empty) and 0.0
    otherwise; the accuracy of zero pixels is 1.0; ``miou`` averages the IoU of
    the classes (rooftop, background) present in truth or prediction.

    Attributes:
        tp: Rooftop in both.
        fp: Rooftop in the prediction only.
        fn: Rooftop in the truth only.
        tn: Rooftop in neither.
        iou: Rooftop IoU tp / (tp + fp + fn).
        precision: tp / (tp + fp).
        recall: tp / (tp + fn).
        f1: 2 tp / (2 tp + fp + fn).
        accuracy: (tp + tn) / all pixels.
        miou: Mean IoU over the classes present.
    """

    tp: int
    fp: int
    fn: int
    tn: int
    iou: float
    precision: float
    recall: float
    f1: float
    accuracy: float
    miou: float

    @classmethod
    def from_confusion(cls, matrix: ConfusionMatrix) -> "PixelScores":
        """Scores of a 2-class matrix (rows truth, columns prediction; class 1 = rooftop)."""
        (tn, fp), (fn, tp) = matrix.counts.tolist()
        m = matrix.compute()
        return cls(
            tp=tp, fp=fp, fn=fn, tn=tn, iou=m["iou"], precision=m["precision"],
            recall=m["recall"], f1=m["f1"], accuracy=m["pixel_accuracy"], miou=m["miou"],
        )

    @property
    def total(self) -> int:
        """Evaluated pixels."""
        return self.tp + self.fp + self.fn + self.tn

    def to_dict(self) -> dict[str, Any]:
        """Metrics and counts as plain numbers."""
        return {
            "iou": self.iou, "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "accuracy": self.accuracy, "miou": self.miou,
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
        }


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Everything :func:`evaluate` measured, with the polygons behind the object metrics.

    Attributes:
        pred: The prediction file.
        truth: The truth file.
        aoi: The area-of-interest file, or None.
        grid: The common pixel grid.
        region: The window of ``grid`` that was evaluated (the AOI's bounds, or all of it).
        pixel: Pixel counts and metrics.
        objects: The one-to-one polygon matching.
        pred_polygons: Predicted polygons in ``grid.crs`` (indexes of ``objects``).
        true_polygons: True polygons in ``grid.crs``.
        warnings: Warnings issued (also logged).
    """

    pred: Path
    truth: Path
    aoi: Path | None
    grid: Grid
    region: Window
    pixel: PixelScores
    objects: ObjectMatch
    pred_polygons: np.ndarray = field(repr=False)
    true_polygons: np.ndarray = field(repr=False)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict: ``pixel`` and ``object`` metrics, inputs, grid, warnings."""
        return {
            "pred": str(self.pred),
            "truth": str(self.truth),
            "aoi": None if self.aoi is None else str(self.aoi),
            "grid": {
                "crs": _crs_name(self.grid.crs),
                "resolution": list(self.grid.res),
                "width": self.grid.width,
                "height": self.grid.height,
                "ground_resolution_m": _ground_resolution(self.grid),
                "evaluated_pixels": self.pixel.total,
            },
            "pixel": self.pixel.to_dict(),
            "object": {
                **self.objects.scores(),
                "n_pred": self.objects.n_pred,
                "n_true": self.objects.n_true,
                "iou_threshold": self.objects.iou_threshold,
            },
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """A human-readable table of the metrics (4 decimals)."""
        d = self.to_dict()
        px, ob, g = d["pixel"], d["object"], d["grid"]
        rx, ry = g["resolution"]
        ground = "" if g["ground_resolution_m"] is None else (
            f" ({g['ground_resolution_m']:.3g} m on the ground)")
        f = f".{TABLE_DECIMALS}f"
        lines = [
            f"prediction  {self.pred}",
            f"truth       {self.truth}",
            f"area        {self.aoi if self.aoi else 'where both have data'}",
            f"grid        {g['crs']}, {g['width']} x {g['height']} px of {rx:g} x {ry:g} CRS "
            f"units{ground}, {g['evaluated_pixels']} px evaluated",
            "",
            "pixel metrics (rooftop class)",
            f"  IoU              {px['iou']:{f}}",
            f"  precision        {px['precision']:{f}}",
            f"  recall           {px['recall']:{f}}",
            f"  F1               {px['f1']:{f}}",
            f"  pixel accuracy   {px['accuracy']:{f}}",
            f"  mIoU             {px['miou']:{f}}",
            "",
            f"object metrics (one-to-one matching at IoU >= {ob['iou_threshold']:g})",
            f"  precision        {ob['precision']:{f}}",
            f"  recall           {ob['recall']:{f}}",
            f"  F1               {ob['f1']:{f}}",
            f"  matched (tp)     {ob['tp']:>{TABLE_DECIMALS + 2}d}",
            f"  false (fp)       {ob['fp']:>{TABLE_DECIMALS + 2}d}",
            f"  missed (fn)      {ob['fn']:>{TABLE_DECIMALS + 2}d}",
            f"  predicted        {ob['n_pred']:>{TABLE_DECIMALS + 2}d}",
            f"  true             {ob['n_true']:>{TABLE_DECIMALS + 2}d}",
        ]
        return "\n".join(lines)


def _ground_resolution(grid: Grid) -> float | None:
    """Mean ground metres per pixel at the grid centre (None for an empty or unearthly grid)."""
    if grid.width == 0 or grid.height == 0:
        return None
    try:
        return float(np.mean(ground_pixel_size(grid.crs, grid.transform, grid.width, grid.height)))
    except GeoreferenceError:
        return None


def _crs_name(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _check_overlap(pred: EvalInput, truth: EvalInput, grid: Grid) -> None:
    pe, te = pred.extent(grid.crs), truth.extent(grid.crs)
    if pe is None or te is None or _overlaps(pe, te):
        return
    raise file_error(
        GeoreferenceError, pred.path,
        f"does not overlap the truth {truth.path} (prediction extent {bounds_text(pe, grid.crs)}, "
        f"truth extent {bounds_text(te, grid.crs)} in {_crs_name(grid.crs)})",
        "pass a prediction and a truth of the same area",
    )


def _region(grid: Grid, aoi_geom: Any, aoi_path: Path | None) -> Window:
    full = Window(0, 0, grid.width, grid.height)
    if aoi_geom is None or grid.width == 0:
        return full
    gb = grid.bounds
    if not _overlaps(aoi_geom.bounds, gb) or aoi_geom.intersection(shapely.box(*gb)).area <= 0:
        raise file_error(
            GeoreferenceError, aoi_path or "AOI",
            f"does not overlap the evaluated area (AOI extent {bounds_text(aoi_geom.bounds, grid.crs)}, "
            f"area extent {bounds_text(gb, grid.crs)} in {_crs_name(grid.crs)})",
            "pass an AOI polygon inside the prediction and truth",
        )
    try:
        win = rasterio.windows.from_bounds(*aoi_geom.bounds, transform=grid.transform)
        win = win.round_offsets(op="floor").round_lengths(op="ceil")
        # rounding offsets down can cut the far edge: extend by one pixel, then clip
        win = Window(win.col_off, win.row_off, win.width + 1, win.height + 1)
        return win.intersection(full)
    except WindowError:  # rotated grids: evaluate all of it, the AOI mask still applies
        return full


def _strips(region: Window, block_size: int) -> list[Window]:
    """Full-width strips of the region, each of about as many pixels as a ``block_size`` square."""
    c0, r0 = int(region.col_off), int(region.row_off)
    width, height = int(region.width), int(region.height)
    if width < 1 or height < 1:
        return []
    rows = strip_height(width, strip_pixels=block_size * block_size)
    return [Window(c0, r, width, min(rows, r0 + height - r)) for r in range(r0, r0 + height, rows)]


def _region_polygons(records: list[PixelPolygon], region: Window, transform: Affine) -> np.ndarray:
    """Components polygonised in region pixel coordinates -> CRS units, in raster order.

    The order is that of each component's first pixel (top row, then left), whatever
    the strips were: the order :func:`~geoseg.evaluation.objects.mask_polygons` and the
    object metrics of masks number regions in.
    """
    if not records:
        return np.empty(0, dtype=object)
    geoms = object_array([r.geometry for r in records])
    top = shapely.bounds(geoms)[:, 1]
    # The first pixel's top-left corner is the leftmost vertex on the top row (of the exterior ring).
    xy, index = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    on_top = xy[:, 1] == top[index]
    left = np.full(len(geoms), np.inf)
    np.minimum.at(left, index[on_top], xy[on_top, 0])
    geoms = geoms[np.lexsort((left, top))]
    # integer shift to grid pixels (exact), then the grid transform
    geoms = apply_affine(geoms, Affine.translation(region.col_off, region.row_off))
    return apply_affine(geoms, transform)


def _clip(geoms: np.ndarray, area: Any) -> np.ndarray:
    """Vector objects clipped to the evaluated area (parts outside it are not evaluated)."""
    if len(geoms) == 0:
        return geoms
    hit = shapely.intersects(geoms, area) & ~shapely.touches(geoms, area)
    geoms = geoms[hit]
    inside = shapely.within(geoms, area)
    if not inside.all():
        geoms = geoms.copy()
        geoms[~inside] = polygonal_parts(shapely.intersection(geoms[~inside], area))
    return geoms[~shapely.is_empty(geoms) & (shapely.area(geoms) > 0)]


def evaluate(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    aoi: str | os.PathLike[str] | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    class_id: int = ROOFTOP_CLASS,
    assume_crs: str | CRS | None = None,
    resolution: float = DEFAULT_VECTOR_RESOLUTION,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Compare a predicted rooftop mask or polygon file with the truth.

    Common grid: the truth raster's grid when the truth is a raster, else the
    prediction raster's; a prediction raster on another grid (CRS, pixel size
    or alignment) is resampled onto the truth grid with nearest neighbour. Two
    vector files are rasterised on a north-up grid in a local metric CRS
    (``resolution`` metres per pixel) covering the AOI, or both files. Vectors
    in another CRS are reprojected. Pixels count where both inputs have data
    (raster nodata, GDAL masks and the ignore value 255 of class-id masks are
    ignored) and, with ``aoi``, whose centre lies inside the AOI. Rasters are
    read in full-width strips of about ``block_size``² pixels, so memory does
    not grow with the scene (except for the polygons).

    Objects are the 4-connected regions of a mask (polygonised strip by strip
    by :class:`geoseg.vectorize.StripPolygonizer`, merged across strips, in
    raster order of their first pixel) or the features of a vector file clipped to
    the evaluated area (the grid or the AOI, minus pixels without data); they
    are matched one-to-one at IoU >= ``iou_threshold`` by :func:`match_objects`
    (greedy by descending IoU, ties to the lower truth index, then the lower
    prediction index). Empty cases: a ratio with a zero denominator is 1.0
    when both sides are empty, else 0.0; an empty truth logs a warning.

    Args:
        pred: Predicted mask GeoTIFF (0/255, 0/1 or class ids) or vector file.
        truth: True mask GeoTIFF or vector file (GeoPackage, GeoJSON, Shapefile).
        aoi: Polygon file (any CRS) restricting the evaluation.
        iou_threshold: IoU a pair of polygons needs to match, in (0, 1].
        class_id: Class evaluated in class-id masks (255 of a 0/255 mask is class 1).
        assume_crs: CRS for inputs that have none.
        resolution: Pixel size in metres when both inputs are vector files.
        block_size: Side in pixels of the square whose pixel count a strip read at a time has.
        progress: Called with (strips done, strips total) after each strip.

    Returns:
        The metrics, counts and polygons.

    Raises:
        InputFileError: A missing file, neither raster nor vector, a raster that
            is not a single-band class mask, a vector without polygons.
        GeoreferenceError: No CRS, or prediction, truth and AOI that do not overlap.
        ConfigError: ``iou_threshold``, ``resolution`` or ``block_size`` out of range.
    """
    _check_threshold(iou_threshold)
    if not resolution > 0:
        raise ConfigError(f"resolution should be > 0 metres, got {resolution!r}; pass e.g. 0.25")
    if block_size < 1:
        raise ConfigError(f"block_size should be >= 1 pixel, got {block_size!r}; pass e.g. 2048")
    pred_in = open_input(pred, class_id=class_id, assume_crs=assume_crs, block_size=block_size)
    truth_in = open_input(truth, class_id=class_id, assume_crs=assume_crs, block_size=block_size)
    aoi_layer = read_aoi(aoi, assume_crs=assume_crs, fix=AOI_FIX) if aoi is not None else None

    if isinstance(truth_in, RasterMask):
        grid = raster_grid(truth_in)
    elif isinstance(pred_in, RasterMask):
        grid = raster_grid(pred_in)
    else:
        grid = vector_grid([truth_in, pred_in], aoi=aoi_layer, resolution=resolution)
    _check_overlap(pred_in, truth_in, grid)
    aoi_geom = shapely.union_all(aoi_layer.in_crs(grid.crs)) if aoi_layer is not None else None
    region = _region(grid, aoi_geom, aoi_layer.path if aoi_layer else None)
    logger.info(
        "evaluating on a %d x %d px grid in %s (%g x %g CRS units per pixel), window %s",
        grid.width, grid.height, _crs_name(grid.crs), *grid.res, region,
    )

    matrix, pred_polys, true_polys = _scan(
        pred_in, truth_in, grid, region, aoi_geom, block_size=block_size, progress=progress
    )
    match = match_objects(pred_polys, true_polys, iou_threshold=iou_threshold)
    pixel = PixelScores.from_confusion(matrix)

    warnings: list[str] = []
    if pixel.tp + pixel.fn == 0 and len(true_polys) == 0:
        warnings.append(
            f"{truth_in.path}: the truth has no rooftops in the evaluated area; recall, IoU and F1 "
            "are 1.0 if the prediction is empty too, else 0.0"
        )
    if pixel.total == 0 and grid.width > 0:
        warnings.append(
            f"{pred_in.path}: no pixel where both the prediction and the truth have data"
            + (" inside the AOI" if aoi_geom is not None else "")
            + "; pixel metrics are defined by convention only"
        )
    for w in warnings:
        logger.warning("%s", w)
    return EvaluationResult(
        pred=pred_in.path, truth=truth_in.path, aoi=aoi_layer.path if aoi_layer else None,
        grid=grid, region=region, pixel=pixel, objects=match,
        pred_polygons=pred_polys, true_polygons=true_polys, warnings=tuple(warnings),
    )


def _scan(
    pred_in: EvalInput,
    truth_in: EvalInput,
    grid: Grid,
    region: Window,
    aoi_geom: Any,
    *,
    block_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[ConfusionMatrix, np.ndarray, np.ndarray]:
    """One pass over the region: confusion counts and the polygons of both sides."""
    inputs = (pred_in, truth_in)
    width, height = int(region.width), int(region.height)
    if width < 1 or height < 1:  # an empty grid: nothing to read
        width = height = 0

    def polygonizer() -> StripPolygonizer:
        return StripPolygonizer(width=width, height=height)

    # Regions of raster masks, and pixels without data where a vector side is clipped to them.
    sides = [polygonizer() if isinstance(i, RasterMask) else None for i in inputs]
    no_data = polygonizer() if any(isinstance(i, VectorLayer) for i in inputs) else None
    matrix = ConfusionMatrix(2, ignore_index=IGNORE_INDEX)
    with contextlib.ExitStack() as stack:
        readers = [_reader(i, grid, stack) for i in inputs]
        aoi_reader = VectorOnGrid(object_array([aoi_geom]), grid) if aoi_geom is not None else None
        strips = _strips(region, block_size)
        for n, win in enumerate(strips, start=1):
            shape = (int(win.height), int(win.width))
            (p, p_valid), (t, t_valid) = (read(win) for read in readers)
            data = np.ones(shape, dtype=bool)
            for v in (p_valid, t_valid):
                if v is not None:
                    data &= v
            valid = data & aoi_reader.read(win) if aoi_reader is not None else data
            p, t = p & valid, t & valid
            matrix.update(p.view(np.uint8), np.where(valid, t.view(np.uint8), IGNORE_INDEX))
            row = int(win.row_off - region.row_off)
            for side, m in zip(sides, (p, t)):
                if side is not None:
                    side.add_strip(row, m.view(np.uint8))
            if no_data is not None:
                no_data.add_strip(row, (~data).view(np.uint8))
            if progress is not None:
                progress(n, len(strips))

    area = shapely.box(*rasterio.windows.bounds(region, grid.transform))
    if aoi_geom is not None:
        area = area.intersection(aoi_geom)
    if no_data is not None:
        holes = _region_polygons(no_data.finish(), region, grid.transform)
        if len(holes):
            area = area.difference(shapely.union_all(holes))
    polys = []
    for inp, side in zip(inputs, sides):
        if side is not None:
            polys.append(_region_polygons(side.finish(), region, grid.transform))
        else:
            polys.append(_clip(_vector_geoms(inp, grid), area))
    return matrix, polys[0], polys[1]


def _vector_geoms(layer: VectorLayer, grid: Grid) -> np.ndarray:
    geoms = layer.in_crs(grid.crs)
    return geoms[~shapely.is_empty(geoms)]


def _reader(
    inp: EvalInput, grid: Grid, stack: contextlib.ExitStack
) -> Callable[[Window], tuple[np.ndarray, np.ndarray | None]]:
    """``read(window) -> (positive, valid or None)`` of one input on the grid."""
    if isinstance(inp, VectorLayer):
        on_grid = VectorOnGrid(_vector_geoms(inp, grid), grid)
        return lambda win: (on_grid.read(win), None)
    read_raw = stack.enter_context(raster_on_grid(inp.info, grid))
    positive = np.asarray(inp.positive)
    ignore = np.asarray(inp.ignore)

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        data, valid = read_raw(win, [1])
        values = data[0]
        if len(ignore):
            valid &= ~np.isin(values, ignore)
        if values.dtype.kind == "f":
            valid &= ~np.isnan(values)
        return np.isin(values, positive) & valid, valid

    return read
