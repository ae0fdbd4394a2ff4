"""A scene seen at another ground resolution: the model's grid over the same extent, and windowed resampled reads.

A model learns roofs at one ground resolution. Training and prediction both
read a scene on a *model grid*: the scene's CRS and extent, cut into pixels of
the model's ground size (:func:`grid_at`). A window of that grid is read from
the scene with GDAL's resampled ``RasterIO`` (:func:`read_resampled`): only the
scene pixels under the window are decoded (from an overview where the file has
a fitting one), and a window gives exactly the pixels it gives as part of any
larger read, so blocks and chips meet without seams. Nothing scene-sized is held.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.errors import ConfigError
from geoseg.raster_io import SceneInfo, ground_pixel_size, read_inside, read_window
from geoseg.tiling import fitted_length

#: A scene within this relative difference of the resolution asked for by ``auto`` is read as
#: it is (resampling by a few percent only blurs; the model does not see the difference).
AUTO_TOLERANCE = 0.05
#: A prediction's model grid may have pixels up to this much larger than the resolution asked for
#: when that saves a row or column of chips (:func:`grid_at` with ``chips``): well inside what
#: ``auto`` already reads as it is (:data:`AUTO_TOLERANCE`). Most of the 266 hotosm-oam-more tiles
#: (0.075 m, 512 px) read for a 0.148 m model fell 1-2 px over one chip: 984 chips, 674 fitted.
CHIP_FIT_TOLERANCE = 0.02


def parse_resolution(value: Any, *, setting: str = "--resolution", allow_auto: bool = True) -> float | str:
    """Check a resolution setting: ``"auto"`` (when allowed), ``"native"`` or ground metres > 0.

    Args:
        value: The setting (text from a command line or YAML, or a number).
        setting: Its name, for the message.
        allow_auto: Whether ``auto`` is a valid value (prediction; not training).

    Returns:
        ``"auto"``, ``"native"`` or the metres as a float.

    Raises:
        ConfigError: Anything else, a resolution of 0 or below, or not finite.
    """
    words = ("auto", "native") if allow_auto else ("native",)
    choices = " or ".join(repr(w) for w in words)
    if value is None:
        return "native"
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    try:
        metres = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting} should be {choices} or ground metres per pixel (e.g. 0.15), "
                          f"got {value!r}") from None
    if not math.isfinite(metres) or metres <= 0:
        raise ConfigError(f"{setting} should be a ground resolution above 0 metres per pixel "
                          f"(e.g. 0.15), or {choices}; got {value!r}")
    return metres


def grid_at(info: SceneInfo, metres: float, *, chips: tuple[int, int] | None = None) -> SceneInfo:
    """The scene's grid at ``metres`` ground metres per pixel: same CRS and extent, other pixel size.

    The pixel count per axis is ``round(size * scene_metres / metres)`` (at least 1), and the
    pixel size is chosen so that the grid covers exactly the scene's extent; a factor of 2
    (0.15 m scene, 0.3 m model) pairs every model pixel with 2x2 scene pixels exactly. Ground
    metres are measured at the scene centre (:func:`~geoseg.raster_io.ground_pixel_size`),
    so it is true also in EPSG:4326 and EPSG:3857.

    With ``chips`` (a prediction's chip size and stride), an axis a few pixels longer than a
    length that whole chips tile is drawn at that length when its pixels grow by at most
    :data:`CHIP_FIT_TOLERANCE` (:func:`~geoseg.tiling.fitted_length`): a 512-px tile of
    0.0745 m ground pixels read for a 0.148 m model is 257 px by rounding, two chips a row
    (256-px chips, 64 px overlap); drawn at 256 px (pixels 0.4% larger) it is one chip.

    Args:
        info: The scene.
        metres: Ground metres per pixel wanted (> 0).
        chips: ``(chip size, stride)`` of the prediction the grid is for; None: no fitting.

    Returns:
        A :class:`SceneInfo` of the same file with the new ``width``, ``height`` and ``transform``.

    Raises:
        GeoreferenceError: A CRS that cannot be related to ground metres.
    """
    gx, gy = ground_pixel_size(info.crs, info.transform, info.width, info.height)
    width = max(1, round(info.width * gx / metres))
    height = max(1, round(info.height * gy / metres))
    if chips is not None:
        width, height = (fitted_length(n, *chips, tolerance=CHIP_FIT_TOLERANCE) for n in (width, height))
    transform = info.transform @ Affine.scale(info.width / width, info.height / height)
    return dataclasses.replace(info, width=width, height=height, transform=transform)


def scale_of(scene: SceneInfo, grid: SceneInfo) -> tuple[float, float]:
    """Scene pixels per grid pixel along x and y (2.0: the grid is twice as coarse)."""
    return scene.width / grid.width, scene.height / grid.height


def same_grid(scene: SceneInfo, grid: SceneInfo) -> bool:
    """Whether ``grid`` is the scene's own grid (then reads need no resampling)."""
    return (scene.width, scene.height, scene.transform) == (grid.width, grid.height, grid.transform)


def _inside(start: float, step: float, count: int, size: int) -> tuple[int, int]:
    """Output pixels [a, b) whose centres ``start + (i + 0.5) * step`` fall in [0, size)."""
    a = max(0, math.ceil(-start / step - 0.5 - 1e-9))
    b = min(count, math.ceil((size - start) / step - 0.5 - 1e-9))
    return a, max(a, b)


def read_resampled(
    src: Any,
    scene: SceneInfo,
    grid: SceneInfo,
    window: Window,
    *,
    out_shape: tuple[int, int] | None = None,
    bands: Sequence[int] | None = None,
    resampling: Resampling = Resampling.bilinear,
    fill: float = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a window of the model grid from the scene, resampled (reaching outside is allowed).

    Pixels whose centre lies outside the grid are ``fill`` and invalid, as in
    :func:`~geoseg.raster_io.read_window` (which this is, on the scene's own grid and
    without ``out_shape``). Validity is GDAL's dataset mask, resampled with nearest.

    Args:
        src: The scene, open (rasterio dataset).
        scene: The scene's own grid (:func:`~geoseg.raster_io.open_scene`).
        grid: The model grid (:func:`grid_at`).
        window: Window in model-grid pixels (float offsets and sizes allowed).
        out_shape: (height, width) of the result; default the window's size (a larger
            or smaller window read into it is a scale jitter of training).
        bands: 1-based bands (default all).
        resampling: ``bilinear`` for imagery, ``nearest`` for class labels.
        fill: Value of pixels outside the grid.

    Returns:
        ``(data, valid)``: (bands, h, w) in the raster's dtype and (h, w) bool.

    Raises:
        InputFileError: GDAL failed to read (truncated or corrupt file), naming it.
    """
    h, w = out_shape if out_shape is not None else (int(window.height), int(window.width))
    if same_grid(scene, grid) and _integral(window) and (h, w) == (int(window.height), int(window.width)):
        return read_window(src, window, bands=bands, fill=fill)
    idx = list(bands) if bands is not None else list(range(1, src.count + 1))
    data = np.full((len(idx), h, w), fill, dtype=src.dtypes[idx[0] - 1])
    valid = np.zeros((h, w), dtype=bool)
    px, py = float(window.width) / w, float(window.height) / h  # grid pixels per output pixel
    c0, c1 = _inside(float(window.col_off), px, w, grid.width)
    r0, r1 = _inside(float(window.row_off), py, h, grid.height)
    if c1 <= c0 or r1 <= r0:
        return data, valid
    sx, sy = scale_of(scene, grid)
    # Model-grid edges of the pixels inside, clamped to the grid, in scene pixels.
    x0 = max(0.0, float(window.col_off) + c0 * px) * sx
    x1 = min(float(grid.width), float(window.col_off) + c1 * px) * sx
    y0 = max(0.0, float(window.row_off) + r0 * py) * sy
    y1 = min(float(grid.height), float(window.row_off) + r1 * py) * sy
    inner = Window(x0, y0, x1 - x0, y1 - y0)
    data[:, r0:r1, c0:c1], valid[r0:r1, c0:c1] = read_inside(
        src, idx, inner, out_shape=(r1 - r0, c1 - c0), resampling=resampling)
    return data, valid


def _integral(window: Window) -> bool:
    return all(float(v).is_integer() for v in (window.col_off, window.row_off, window.width, window.height))
