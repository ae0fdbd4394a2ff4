"""Evaluation panels: image / truth / prediction for the windows with the most buildings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import numpy as np
import rasterio.features
import shapely
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.errors import ConfigError, GeoreferenceError, InputFileError, file_error
from geoseg.evaluation.core import EvaluationResult, _crs_name, _overlaps
from geoseg.evaluation.inputs import Grid, _transform_bounds, raster_on_grid
from geoseg.plots import plot_evaluation_panels
from geoseg.raster_io import SceneInfo, check_not_inputs, check_output, open_scene
from geoseg.vector_io import bounds_text

logger = logging.getLogger(__name__)

#: Side of a panel window in grid pixels.
PANEL_WINDOW_PX = 512
#: At most this many windows (rows) in a panel picture.
MAX_PANEL_WINDOWS = 4
#: Status values burned into the panel masks (drawn by geoseg.plots.plot_evaluation_panels,
#: matched / missed / false in MATCHED_COLOUR / MISSED_COLOUR / FALSE_COLOUR).
MATCHED, MISSED, FALSE = 1, 2, 3


def select_windows(
    result: EvaluationResult, *, window_px: int = PANEL_WINDOW_PX, max_windows: int = MAX_PANEL_WINDOWS
) -> list[Window]:
    """Non-overlapping windows of the evaluated region with the most buildings.

    Windows are ranked by the number of true polygons whose representative
    point lies inside, then predicted ones, then position (top-left first);
    windows without any polygon are skipped unless no window has one.

    Raises:
        ConfigError: ``window_px`` or ``max_windows`` below 1.
    """
    if window_px < 1 or max_windows < 1:
        raise ConfigError(
            f"window_px and max_windows should be >= 1, got {window_px} and {max_windows}"
        )
    region = result.region
    if region.width < 1 or region.height < 1:
        return []
    w, h = int(min(window_px, region.width)), int(min(window_px, region.height))
    c0, r0 = int(region.col_off), int(region.row_off)
    windows = [
        Window(c0 + c, r0 + r, w, h)
        for r in _starts(int(region.height), h)
        for c in _starts(int(region.width), w)
    ]
    inv = ~result.grid.transform

    def counts(polys: np.ndarray) -> np.ndarray:
        hits = np.zeros(len(windows), dtype=int)
        if len(polys) == 0:
            return hits
        pts = shapely.get_coordinates(shapely.point_on_surface(polys))
        cols, rows = inv @ (pts[:, 0], pts[:, 1])
        for k, win in enumerate(windows):
            inside = ((cols >= win.col_off) & (cols < win.col_off + win.width)
                      & (rows >= win.row_off) & (rows < win.row_off + win.height))
            hits[k] = int(np.count_nonzero(inside))
        return hits

    n_true, n_pred = counts(result.true_polygons), counts(result.pred_polygons)
    order = sorted(range(len(windows)), key=lambda k: (-n_true[k], -n_pred[k], k))
    chosen = [windows[k] for k in order if n_true[k] + n_pred[k] > 0][:max_windows]
    return chosen or windows[:1]


def _starts(length: int, size: int) -> list[int]:
    """Non-overlapping starts; a last, flush window only when it shows at least half new pixels."""
    starts = list(range(0, length - size + 1, size))
    if length - (starts[-1] + size) >= size // 2:
        starts.append(length - size)
    return starts


def _status_mask(polys: np.ndarray, status: np.ndarray, grid: Grid, window: Window) -> np.ndarray:
    shape = (int(window.height), int(window.width))
    if len(polys) == 0:
        return np.zeros(shape, dtype=np.uint8)
    area = shapely.box(*rasterio.windows.bounds(window, grid.transform))
    hit = np.nonzero(shapely.intersects(polys, area))[0]
    if len(hit) == 0:
        return np.zeros(shape, dtype=np.uint8)
    return rasterio.features.rasterize(
        ((polys[i], int(status[i])) for i in hit), out_shape=shape,
        transform=grid.window_transform(window), fill=0, dtype="uint8",
    )


def check_panels_output(
    path: str | os.PathLike[str],
    *,
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    aoi: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Refuse a panels PNG that is one of the evaluation's inputs, exists (unless ``overwrite``) or cannot be written.

    Raises:
        OutputError: ``path`` is the prediction, truth, AOI or image (with or without
            ``overwrite``), exists without ``overwrite``, or cannot be written.
    """
    check_not_inputs([("--panels", path)],
                     [("prediction", pred), ("truth", truth), ("AOI", aoi), ("image", image)])
    return check_output(path, overwrite=overwrite)


def check_image(
    image: str | os.PathLike[str], grid: Grid, *, assume_crs: str | CRS | None = None
) -> SceneInfo:
    """Open the scene shown in the image column and check that it covers the grid.

    Raises:
        InputFileError: Missing or not a raster.
        GeoreferenceError: No CRS, or no overlap with the evaluated grid.
    """
    info = open_scene(image, assume_crs=assume_crs)
    extent = _transform_bounds(info.crs, grid.crs, info.bounds)
    if grid.width and not _overlaps(extent, grid.bounds):
        raise file_error(
            GeoreferenceError, info.path,
            f"does not overlap the evaluated area (image extent {bounds_text(extent, grid.crs)}, "
            f"area extent {bounds_text(grid.bounds, grid.crs)} in {_crs_name(grid.crs)})",
            "pass the scene the prediction was made from",
        )
    return info


def write_panels(
    result: EvaluationResult,
    path: str | os.PathLike[str],
    *,
    image: str | os.PathLike[str] | None = None,
    assume_crs: str | CRS | None = None,
    overwrite: bool = False,
    window_px: int = PANEL_WINDOW_PX,
    max_windows: int = MAX_PANEL_WINDOWS,
) -> Path:
    """Write a PNG of image / truth / prediction for up to ``max_windows`` windows.

    Truth polygons are drawn green when matched and orange when missed (fn);
    predicted polygons green when matched and magenta when false (fp). The
    image column (the scene, resampled onto the evaluation grid) appears only
    with ``image``; without it truth and prediction are drawn on white.

    Args:
        result: An evaluation (its grid, polygons and matching).
        path: Output PNG, written atomically.
        image: The scene to show in the first column.
        assume_crs: CRS for an image without one.
        overwrite: Replace an existing ``path``.
        window_px: Side of a window in grid pixels.
        max_windows: Rows of the picture.

    Returns:
        The path written.

    Raises:
        OutputError: ``path`` is an input, exists without ``overwrite`` or cannot be written.
        InputFileError: ``image`` missing or not a raster.
        GeoreferenceError: ``image`` does not overlap the evaluated area.
    """
    check_panels_output(path, pred=result.pred, truth=result.truth, aoi=result.aoi, image=image,
                        overwrite=overwrite)
    info = check_image(image, result.grid, assume_crs=assume_crs) if image is not None else None
    windows = select_windows(result, window_px=window_px, max_windows=max_windows)
    if not windows:
        raise file_error(
            InputFileError, result.truth,
            "has no polygons and neither has the prediction, so there is no area to draw",
            "pass --aoi to give the area",
        )
    m = result.objects
    true_status = np.full(m.n_true, MISSED, dtype=np.uint8)
    pred_status = np.full(m.n_pred, FALSE, dtype=np.uint8)
    for p, t, _ in m.pairs:
        pred_status[p] = MATCHED
        true_status[t] = MATCHED
    rows: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]] = []
    labels = []
    for win in windows:
        truth = _status_mask(result.true_polygons, true_status, result.grid, win)
        pred = _status_mask(result.pred_polygons, pred_status, result.grid, win)
        rows.append((None, truth, pred))
        x, y = result.grid.transform @ (win.col_off, win.row_off)
        decimals = 6 if result.grid.crs.is_geographic else 1
        labels.append(f"x {x:.{decimals}f}, y {y:.{decimals}f}")
    if info is not None:
        bands = list(range(1, min(info.count, 3) + 1))
        with raster_on_grid(info, result.grid) as read:
            for k, win in enumerate(windows):
                data, valid = read(win, bands)
                rows[k] = (_display(data, valid), rows[k][1], rows[k][2])
    title = (
        f"objects: {m.tp} matched, {m.fn} missed, {m.fp} false "
        f"(IoU >= {m.iou_threshold:g}); rooftop IoU {result.pixel.iou:.3f}"
    )
    if not rows:
        raise ConfigError("evaluation panels need at least one window; pass a non-empty list of rows")
    return plot_evaluation_panels(rows, path, row_labels=labels, title=title, overwrite=overwrite)


def _display(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C, H, W) raw bands -> (H, W, C) floats with invalid pixels set to the band minimum."""
    img = np.moveaxis(data.astype(np.float64), 0, -1)
    if valid.any() and not valid.all():
        for b in range(img.shape[2]):
            img[~valid, b] = img[valid, b].min()
    return img


