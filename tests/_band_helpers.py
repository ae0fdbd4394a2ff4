"""Helpers of the band tests: multi-band rasters of any dtype with band descriptions and colour
interpretations, and small training folders of them (images/NAME.tif + labels/NAME.tif)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import ColorInterp

from _prediction_helpers import UTM, UTM_TRANSFORM


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    descriptions: Sequence[str | None] | None = None,
    colorinterp: Sequence[str] | None = None,
    nodata: float | None = None,
) -> Path:
    """``data`` (bands, rows, cols) as a GeoTIFF on the UTM test grid, with the given band names."""
    count, h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name, crs=UTM,
                   transform=UTM_TRANSFORM, photometric="MINISBLACK", nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if colorinterp is not None:
            dst.colorinterp = [ColorInterp[c] for c in colorinterp]
        for i, desc in enumerate(descriptions or (), start=1):
            if desc is not None:
                dst.set_band_description(i, desc)
    return path


def roof_label(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 0/1 label with a few rectangles (roofs) placed by ``seed``."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), np.uint8)
    for _ in range(4):
        r, c = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        label[r:r + int(rng.integers(8, 20)), c:c + int(rng.integers(8, 20))] = 1
    return label


def sixteen_bit(label: np.ndarray, seed: int, *, bands: int = 4, top: int = 10000) -> np.ndarray:
    """uint16 bands up to ``top`` (a satellite scene's reflectance x 10000), roofs brighter."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, top // 2, (bands, *label.shape)).astype(np.int64)
    base[:, label == 1] += top // 2
    base[:, 0, 0] = top  # the full range, up to ``top``
    return np.clip(base, 0, top).astype(np.uint16)


def write_dataset(
    root: Path,
    scenes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    descriptions: Sequence[str | None] | None = None,
    nodata: float | None = None,
) -> Path:
    """A flat training folder: ``images/scene_i.tif`` and ``labels/scene_i.tif`` per scene."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (data, label) in enumerate(zip(scenes, labels)):
        write_raster(root / "images" / f"scene_{i}.tif", data, descriptions=descriptions, nodata=nodata)
        write_raster(root / "labels" / f"scene_{i}.tif", label[None])
    return root
