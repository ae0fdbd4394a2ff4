"""Instance targets: the border and contact maps of rasterised buildings (numpy + OpenCV, no torch).

An ``instances`` model (``geoseg.models.TARGETS``) learns, besides the footprint
classes, one sigmoid channel per name of ``geoseg.models.INSTANCE_CHANNELS``:
``border`` and ``contact``. They are channels, not classes, because they overlap
the footprint (a border pixel is also a roof pixel) and each other, and because
the footprint must stay exactly what a ``footprint`` model predicts. Both are
built here from a raster of building ids (0 background, ``i > 0`` building ``i``),
as in the SpaceNet-4 winners' and solaris' ``footprint/boundary/contact`` masks.

Widths are in pixels here; the config gives them in ground metres
(``model.border_width``, ``model.contact_width``) and :func:`widths_in_pixels`
converts them with a scene's ground resolution.
"""

from __future__ import annotations

import math
import os

import numpy as np

from geoseg.errors import ConfigError

#: Order of the target maps returned by :func:`instance_targets` (= models.INSTANCE_CHANNELS).
TARGET_NAMES = ("border", "contact")


def disk(radius: float) -> np.ndarray:
    """The disk of ``radius`` pixels: a uint8 (2R+1, 2R+1) kernel, R = floor(radius).

    Offset (dy, dx) from the centre belongs to the disk when ``dx² + dy² <= radius²``.

    Raises:
        ValueError: A negative or non-finite radius.
    """
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius should be a finite number of pixels >= 0, got {radius!r}")
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    return (dx * dx + dy * dy <= radius * radius).astype(np.uint8)


def _grey(ids: np.ndarray, kernel: np.ndarray, op: str, big: float) -> np.ndarray:
    """Max (``op="max"``) or min over the disk; pixels outside the array take part in neither.

    OpenCV does the morphology (fast, exact on integers): ids go in as uint16 when
    they fit (below ``big`` = 65535), else as float64 (exact up to 2**53).
    """
    import cv2

    if op == "max":  # outside = 0: never above a building id, never a second building
        return cv2.dilate(ids, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.erode(ids, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=big)


def instance_targets(
    ids: np.ndarray, *, border_px: float, contact_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The border and contact maps of a raster of building ids.

    With ``D(p, r)`` the pixels of the array whose offset ``(dy, dx)`` from pixel
    ``p`` has ``dx² + dy² <= r²`` (a disk, ``r`` in pixels, fractions allowed;
    pixels outside the array belong to no disk):

    - ``border[p] = 1`` where ``ids[p] = i > 0`` and some pixel of
      ``D(p, border_px)`` holds another value (background 0 or another building):
      the inner ring of each building, ``border_px`` wide.
    - ``contact[p] = 1`` where ``D(p, contact_px)`` holds two or more different
      building ids (> 0), for ``p`` inside or outside buildings: the strip where
      buildings touch or stand less than about ``2 * contact_px`` apart.

    Exactly: ``max`` and ``min`` of the ids over each disk (grey dilation, and grey
    erosion with background read as +inf); border where ``ids > 0`` and
    ``min != ids or max != ids``; contact where both exist and ``max != min``.
    The edge of the array is no boundary: to know what lies beyond a chip, rasterise
    it padded by ``ceil(max(border_px, contact_px))`` pixels and crop (see
    ``VectorLabels.rasterize_instances``). A radius below 1 gives empty maps.

    Args:
        ids: (H, W) integer building ids, 0 = background, >= 0 everywhere.
        border_px: Border width in pixels (>= 0).
        contact_px: Contact distance in pixels (>= 0).

    Returns:
        ``(border, contact)``, uint8 0/1 arrays of shape (H, W).

    Raises:
        ValueError: ``ids`` not 2-D, negative ids, or a negative radius.
    """
    a = np.asarray(ids)
    if a.ndim != 2:
        raise ValueError(f"ids should be a 2-D array (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids should be integers, got {a.dtype}")
    border_kernel, contact_kernel = disk(border_px), disk(contact_px)
    if a.size and int(a.min()) < 0:
        raise ValueError("ids should be >= 0 (0 = background)")
    if a.size == 0 or int(a.max()) == 0:
        return np.zeros(a.shape, np.uint8), np.zeros(a.shape, np.uint8)
    if int(a.max()) < np.iinfo(np.uint16).max:
        work, big = a.astype(np.uint16), float(np.iinfo(np.uint16).max)
    else:
        work, big = a.astype(np.float64), float(2**53)
    inside = work > 0
    # min with the background read as +inf: the smallest building id in each disk
    as_inf = np.where(inside, work, np.asarray(big, dtype=work.dtype))

    hi = _grey(work, border_kernel, "max", big)
    lo = _grey(work, border_kernel, "min", big)
    border = inside & ((hi != work) | (lo != work))

    hi = _grey(work, contact_kernel, "max", big)
    lo = _grey(as_inf, contact_kernel, "min", big)
    contact = (hi > 0) & (lo < big) & (hi != lo)
    return border.astype(np.uint8), contact.astype(np.uint8)


def check_target(target: str, *, classes: int, class_column: str | None = None) -> None:
    """Refuse an unknown target, and ``instances`` for anything but binary building labels.

    Raises:
        ConfigError: With the key and the fix.
    """
    if target not in ("footprint", "instances"):
        raise ConfigError(f"model.target should be 'footprint' or 'instances', got {target!r}")
    if target == "instances" and (classes != 2 or class_column is not None):
        raise ConfigError(
            f"model.target=instances needs binary building labels (data.classes 2, no class column), "
            f"got data.classes {classes}{f' and class column {class_column!r}' if class_column else ''}; "
            "train multi-class data with model.target=footprint"
        )


def padding_px(border_px: float, contact_px: float) -> int:
    """Pixels to pad a chip by so that its targets see every building that affects them."""
    return int(math.ceil(max(border_px, contact_px, 0.0)))


def _at_least(resolution: float) -> str:
    """``resolution`` rounded up to 3 significant digits: a width that is surely one pixel."""
    digits = 2 - int(math.floor(math.log10(resolution)))
    return f"{math.ceil(resolution * 10**digits - 1e-6) / 10**digits:g}"


def widths_in_pixels(
    *,
    border_width: float,
    contact_width: float,
    resolution: float,
    path: str | os.PathLike[str],
) -> tuple[float, float]:
    """Convert the border and contact widths from ground metres to pixels of one scene.

    Args:
        border_width: ``model.border_width`` in metres.
        contact_width: ``model.contact_width`` in metres.
        resolution: Ground metres per pixel of the scene (``raster_io.ground_resolution``).
        path: The scene, for the error message.

    Returns:
        ``(border_px, contact_px)`` as floats (``width / resolution``).

    Raises:
        ConfigError: A width below one pixel of the scene (or not positive), e.g.
            ``model.border_width 0.05 m is less than one pixel (0.15 m) of scene.tif;
            set it to at least 0.15``.
    """
    if not (math.isfinite(resolution) and resolution > 0):
        raise ConfigError(f"{os.fspath(path)}: ground resolution {resolution!r} m is not positive; "
                          "check the scene's CRS and transform")
    out = []
    for key, width in (("model.border_width", border_width), ("model.contact_width", contact_width)):
        if not math.isfinite(width) or width * (1 + 1e-9) < resolution:
            raise ConfigError(
                f"{key} {width:g} m is less than one pixel ({resolution:.3g} m) of {os.fspath(path)}; "
                f"set it to at least {_at_least(resolution)}"
            )
        out.append(float(width) / float(resolution))
    return out[0], out[1]
