"""Evaluation panels: image / truth / prediction for the windows with the most buildings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence
import numpy as np
import rasterio.features
import shapely
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.errors import ConfigError, GeoreferenceError, InputFileError, file_error
from geoseg.evaluation.core import EvaluationResult, _crs_name, _fmt_bounds, _overlaps
from geoseg.evaluation.inputs import Grid, _transform_bounds, raster_on_grid
from geoseg.raster_io import SceneInfo, atomic_output, check_output, open_scene

logger = logging.getLogger(__name__)

#: Side of a panel window in grid pixels.
PANEL_WINDOW_PX = 512
#: At most this many windows (rows) in a panel picture.
MAX_PANEL_WINDOWS = 4
#: Status values burned into the panel masks.
MATCHED, MISSED, FALSE = 1, 2, 3
#: Colours of matched, missed (false negative) and false (false positive) buildings.
MATCHED_COLOUR = (0.17, 0.63, 0.17)
MISSED_COLOUR = (1.0, 0.5, 0.05)
FALSE_COLOUR = (0.9, 0.1, 0.9)
STATUS_COLOURS = {MATCHED: MATCHED_COLOUR, MISSED: MISSED_COLOUR, FALSE: FALSE_COLOUR}
#: Size (inches) of a panel cell and of the legend strip below the panels.
CELL_INCHES = 3.0
LEGEND_INCHES = 0.5


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
            f"does not overlap the evaluated area (image extent {_fmt_bounds(extent, grid.crs)}, "
            f"area extent {_fmt_bounds(grid.bounds, grid.crs)} in {_crs_name(grid.crs)})",
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
        OutputError: ``path`` exists without ``overwrite`` or cannot be written.
        InputFileError: ``image`` missing or not a raster.
        GeoreferenceError: ``image`` does not overlap the evaluated area.
    """
    check_output(path, overwrite=overwrite)
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
    return plot_panels(rows, path, row_labels=labels, title=title)


def _display(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C, H, W) raw bands -> (H, W, C) floats with invalid pixels set to the band minimum."""
    img = np.moveaxis(data.astype(np.float64), 0, -1)
    if valid.any() and not valid.all():
        for b in range(img.shape[2]):
            img[~valid, b] = img[valid, b].min()
    return img



def plot_panels(
    rows: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write image / truth / prediction per window, matched, missed and false buildings coloured.

    Drawn here rather than in geoseg.plots (owned by training) with the same
    figure settings: Agg canvas, ``plots.DPI``, ``plots.display_image``.

    Args:
        rows: ``(image, truth_status, pred_status)`` per window: raw image
            (H, W, C) or (C, H, W), or None for no image column (when every row
            has None); status masks (H, W) with 0 background, 1 matched,
            2 missed (truth only), 3 false (prediction only). Truth and
            prediction are drawn over the dimmed grey image, or on white.
        path: Output PNG (replaced atomically).
        row_labels: Optional label per row (e.g. the window's position).
        title: Optional figure title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from geoseg.plots import DPI, display_image

    if not rows:
        raise ConfigError("evaluation panels need at least one window; pass a non-empty list of rows")
    with_image = any(r[0] is not None for r in rows)
    titles = (("image",) if with_image else ()) + ("truth", "prediction")
    h, w = np.asarray(rows[0][1]).shape
    height = CELL_INCHES * h / max(w, 1) * len(rows) + LEGEND_INCHES + (0.3 if title else 0.0)
    # the same Agg figure, DPI and image stretch as geoseg.plots (learning curves, previews)
    fig = Figure(figsize=(CELL_INCHES * len(titles), height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), len(titles), squeeze=False))
    for r, (image, truth, pred) in enumerate(rows):
        shape = np.asarray(truth).shape
        if image is not None:
            shown = display_image(image)
            base = 0.35 + 0.4 * shown.mean(axis=2, keepdims=True).repeat(3, axis=2)
        else:
            shown, base = None, np.ones((*shape, 3))
        pictures = [shown] if with_image else []
        for status in (truth, pred):
            pic = base.copy()
            for value, colour in STATUS_COLOURS.items():
                pic[np.asarray(status) == value] = colour
            pictures.append(pic)
        for c, (pic, name) in enumerate(zip(pictures, titles)):
            ax = axes[r, c]
            if pic is not None:
                ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    handles = [Patch(color=MATCHED_COLOUR, label="matched"),
               Patch(color=MISSED_COLOUR, label="missed (truth only)"),
               Patch(color=FALSE_COLOUR, label="false (prediction only)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, LEGEND_INCHES / height, 1, 1))
    with atomic_output(path, overwrite=True) as tmp:  # the caller checked overwrite
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)
