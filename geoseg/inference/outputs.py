"""Scene-sized output rasters written block by block: class mask and rooftop probability.

Both are tiled, deflate-compressed GeoTIFFs (BigTIFF when needed) on the
scene's grid, with nodata set. They are written in whole tiles (block cores
are tile-aligned), read back in strips for vectorisation while the pass is
still running, and get overviews once the full-resolution pass is done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, ProbDtype
from geoseg.temporaries import write_errors
from geoseg.raster_io import GTIFF_PROFILE

log = logging.getLogger(__name__)

#: Largest GeoTIFF tile edge used for outputs (pixels).
MAX_TILE = 256
#: Smallest overview edge worth building (pixels).
MIN_OVERVIEW = 256

SinkKind = Literal["mask", "prob"]


def output_tile(block_size: int) -> int:
    """GeoTIFF tile edge for outputs: the largest power of two <= 256 that divides ``block_size``.

    Block cores start at multiples of ``block_size``, so every core is written
    as whole tiles and no compressed tile is ever rewritten.

    Raises:
        ValueError: If ``block_size`` is not a multiple of 16 (GeoTIFF tiles are).
    """
    tile = MAX_TILE
    while tile >= 16:
        if block_size % tile == 0:
            return tile
        tile //= 2
    raise ValueError(f"block size should be a multiple of 16 pixels, got {block_size}")


def overview_factors(width: int, height: int) -> list[int]:
    """Overview decimation factors 2, 4, 8, ... while the overview is at least MIN_OVERVIEW px."""
    factors = []
    f = 2
    while max(width, height) // f >= MIN_OVERVIEW:
        factors.append(f)
        f *= 2
    return factors


class RasterSink:
    """One output GeoTIFF open for windowed writing and reading back.

    Attributes:
        path: The (temporary) file being written.
        kind: ``"mask"`` or ``"prob"``.
        dtype: Numpy dtype of the stored values (float32 for float16 storage).
        nodata: The nodata value.
    """

    def __init__(
        self,
        path: Path,
        *,
        kind: SinkKind,
        width: int,
        height: int,
        crs: CRS,
        transform: Affine,
        tile: int,
        prob_dtype: ProbDtype = "uint8",
        num_threads: int | str = 1,
        class_names: tuple[str, ...] = (),
        band_names: tuple[str, ...] = ("rooftop",),
    ) -> None:
        """Create the file.

        Args:
            path: File to create (a temporary path; the caller moves it into place).
            kind: ``"mask"`` (uint8 class ids) or ``"prob"`` (rooftop probability).
            width: Scene width in pixels.
            height: Scene height in pixels.
            crs: Scene CRS.
            transform: Scene transform.
            tile: Tile edge in pixels.
            prob_dtype: ``"uint8"`` (value / 254, 255 nodata) or ``"float16"`` (NaN nodata).
            num_threads: GDAL compression threads (``"ALL_CPUS"`` or a number).
            class_names: Class names, recorded in the mask's metadata.
            band_names: ``"prob"``: what each band is the probability of (``rooftop``; an
                ``instances`` model adds ``border`` and ``contact``).
        """
        self.path = Path(path)
        self.kind = kind
        options: dict[str, Any] = {}
        if kind == "mask":
            self.dtype, self.nodata = np.dtype("uint8"), MASK_NODATA
            self.resampling = Resampling.nearest
        elif prob_dtype == "uint8":
            self.dtype, self.nodata = np.dtype("uint8"), PROB_NODATA
            self.resampling = Resampling.average
        elif prob_dtype == "float16":
            # GDAL 3.10 has no Float16 type; GeoTIFF stores Float32 bands as halves with NBITS=16.
            self.dtype, self.nodata = np.dtype("float32"), float("nan")
            self.resampling = Resampling.average
            options["nbits"] = 16
        else:
            raise ValueError(f"probability dtype should be 'uint8' or 'float16', got {prob_dtype!r}")
        self.bands = len(band_names) if kind == "prob" else 1
        profile = {
            **GTIFF_PROFILE, "blockxsize": tile, "blockysize": tile, "count": self.bands,
            "width": width, "height": height, "dtype": self.dtype.name, "crs": crs,
            "transform": transform, "nodata": self.nodata, "num_threads": num_threads, **options,
        }
        self.width, self.height = width, height
        # "w+" so that finished strips can be read back through the same handle.
        with write_errors(self.path):
            self._dst = rasterio.open(self.path, "w+", **profile)
        if kind == "prob" and prob_dtype == "uint8":
            self._dst.scales = (1.0 / PROB_SCALE,) * self.bands
            self._dst.offsets = (0.0,) * self.bands
            for b, name in enumerate(band_names, 1):
                self._dst.set_band_description(b, f"{name} probability (value / 254)")
        elif kind == "prob":
            for b, name in enumerate(band_names, 1):
                self._dst.set_band_description(b, f"{name} probability")
        else:
            self._dst.set_band_description(1, "class id")
            if class_names:
                self._dst.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(class_names)})

    def write(self, window: Window, array: np.ndarray) -> None:
        """Write a (H, W) array (one band) or a (bands, H, W) array at ``window``.

        Raises:
            OutputError: The write failed (disk full, ...), naming the output.
        """
        with write_errors(self.path):
            if array.ndim == 3:
                self._dst.write(array, window=window)
            else:
                self._dst.write(array, 1, window=window)

    def read(self, window: Window) -> np.ndarray:
        """Read back a window that has been written: (H, W) for one band, else (bands, H, W).

        Raises:
            OutputError: GDAL could not flush the blocks it read back through (disk full, ...).
        """
        with write_errors(self.path):  # reading back flushes the written blocks first
            return self._dst.read(1, window=window) if self.bands == 1 else self._dst.read(window=window)

    def finish(self, *, overviews: bool) -> None:
        """Build overviews (after the full-resolution pass) and close the file.

        Raises:
            OutputError: The write failed (disk full, ...), naming the output.
        """
        with write_errors(self.path):
            try:
                factors = overview_factors(self.width, self.height) if overviews else []
                if factors:
                    self._dst.build_overviews(factors, self.resampling)
                    self._dst.update_tags(ns="rio_overview", resampling=self.resampling.name)
            finally:
                self.close()

    def close(self) -> None:
        """Close the file (idempotent); closing flushes the last blocks, so it may fail as a write does."""
        if not self._dst.closed:
            with write_errors(self.path):
                self._dst.close()


