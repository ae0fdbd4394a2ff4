"""Scene-sized output rasters written block by block: class mask and rooftop probability.

Both are tiled, deflate-compressed GeoTIFFs (BigTIFF when needed) on the
scene's grid, with nodata set. They are written in whole tiles (block cores
are tile-aligned), read back in strips for vectorisation while the pass is
still running, and get overviews once the full-resolution pass is done.
"""

from __future__ import annotations

import functools

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.encoding import GDAL_CACHE_BYTES, MASK_NODATA, PROB_NODATA, PROB_SCALE, ProbDtype
from geoseg.temporaries import write_errors
from geoseg.raster_io import GTIFF_PROFILE

if TYPE_CHECKING:
    from geoseg.raster_io import SceneInfo

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


#: Compression of rasters that are only read back and deleted (the mask and probabilities behind
#: the polygons when no raster output was asked for, or on a model grid). Measured on a 2048²
#: block (one process, 2-core Xeon): a mask written in 7 ms against deflate's 44 ms, probabilities
#: 21 against 76 ms; files 1.3x deflate's.
SCRATCH_COMPRESSION: dict[str, Any] = {"compress": "zstd", "zstd_level": 1}


@functools.lru_cache(maxsize=1)
def zstd_available() -> bool:
    """Whether this GDAL writes ZSTD-compressed GeoTIFFs (rasterio's wheels do; some GDAL builds not)."""
    from rasterio.io import MemoryFile

    try:
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=1, height=1, count=1, dtype="uint8", crs="EPSG:4326",
                          transform=Affine(1.0, 0.0, 0.0, 0.0, -1.0, 1.0), **SCRATCH_COMPRESSION) as dst:
                dst.write(np.ones((1, 1, 1), dtype=np.uint8))
            with mem.open() as src:
                return src.compression is not None and src.compression.name.lower() == "zstd"
    except Exception:  # noqa: BLE001 - a missing codec is an answer, not a failure
        return False


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
        scratch: bool = False,
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
            scratch: The file is read back (polygons) and deleted, never handed to the user:
                written with ZSTD level 1 where GDAL has it (:data:`SCRATCH_COMPRESSION`).
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
        if scratch and zstd_available():
            options.update(SCRATCH_COMPRESSION)
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




#: A scratch raster read back only by the scene's own polygons is held in memory (:class:`MemorySink`)
#: up to this many pixels: a file is then only overhead. Two GeoTIFFs per 256² tile (created,
#: written, read back, closed, their folder removed) took 2.7 ms of one core (2-core Xeon); the
#: pending finishes and look-ahead hold at most a few such scenes (``batching``), and larger
#: scenes keep their file, so memory stays flat at any scene size.
MEMORY_SCRATCH_PIXELS = 2048 * 2048


class MemorySink:
    """A scratch mask or uint8 probability raster held in memory, with :class:`RasterSink`'s interface.

    Pixels never written read as nodata, as in a GeoTIFF with nodata set. Only for rasters
    nobody reads after the pass (no file to publish, nothing to move to the scene's grid).
    """

    path = None

    def __init__(self, *, kind: SinkKind, width: int, height: int, bands: int = 1) -> None:
        """Make the (bands, height, width) array, all nodata.

        Args:
            kind: ``"mask"`` (uint8 class ids) or ``"prob"`` (uint8 probability, value / 254).
            width: Scene width in pixels.
            height: Scene height in pixels.
            bands: Probability bands (a mask has one).
        """
        self.kind = kind
        self.dtype = np.dtype("uint8")
        self.nodata = MASK_NODATA if kind == "mask" else PROB_NODATA
        self.bands = 1 if kind == "mask" else int(bands)
        self.width, self.height = width, height
        self._data: np.ndarray | None = np.full((self.bands, height, width), self.nodata, dtype=self.dtype)

    def _slices(self, window: Window) -> tuple[slice, slice]:
        r, c = int(window.row_off), int(window.col_off)
        return slice(r, r + int(window.height)), slice(c, c + int(window.width))

    def write(self, window: Window, array: np.ndarray) -> None:
        """Store a (H, W) array (one band) or a (bands, H, W) array at ``window``."""
        assert self._data is not None, "the sink is closed"
        rows, cols = self._slices(window)
        self._data[:, rows, cols] = array if array.ndim == 3 else array[None]

    def read(self, window: Window) -> np.ndarray:
        """A copy of a window: (H, W) for one band, else (bands, H, W)."""
        assert self._data is not None, "the sink is closed"
        rows, cols = self._slices(window)
        part = self._data[:, rows, cols]
        return part[0].copy() if self.bands == 1 else part.copy()

    def finish(self, *, overviews: bool) -> None:
        """Nothing to build (a scratch raster has no overviews); the array is let go."""
        self.close()

    def close(self) -> None:
        """Let the array go (idempotent)."""
        self._data = None


#: Rows and columns of the scene written per step when outputs move from the model grid to the scene's.
REGRID_BLOCK = 1024


def to_scene_grid(
    source: Path, dest: Path, scene: "SceneInfo", *, kind: SinkKind, prob_dtype: ProbDtype = "uint8",
) -> None:
    """Write a raster predicted on a model grid onto the scene's own grid, block by block.

    The class mask is resampled with nearest neighbour (at an integer factor every scene
    pixel takes the class of the model pixel it lies in, which is what the polygons cover),
    the probabilities bilinearly with nodata kept out of the kernel (``rasterio.warp.reproject``,
    GDAL's warper). Each step reads the model-grid window under ``REGRID_BLOCK``² scene pixels
    (and a margin for the kernel), so memory stays flat. The result gets overviews, like
    every published output raster.

    Args:
        source: The raster on the model grid (same CRS and extent as the scene).
        dest: The output (a temporary path of the publication).
        scene: The scene's grid.
        kind: ``"mask"`` or ``"prob"``.
        prob_dtype: Storage of a probability raster.

    Raises:
        OutputError: The write failed (disk full, ...), naming the output.
    """
    from rasterio.warp import reproject

    # The pass's GDAL cache cap: under GDAL's default (5% of RAM) the written tiles of a large
    # scene stay cached, and memory grows with the scene (+330 MB at 20000², measured).
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(source) as src:
        if kind == "mask":
            tags = src.tags(1)
            names = tuple(tags[f"CLASS_{i}"] for i in range(len(tags)) if f"CLASS_{i}" in tags)
            extra: dict[str, Any] = {"class_names": names}
            resampling = Resampling.nearest
        else:
            extra = {"band_names": tuple((d or "rooftop").split(" probability")[0] for d in src.descriptions),
                     "prob_dtype": prob_dtype}
            resampling = Resampling.bilinear
        sink = RasterSink(dest, kind=kind, width=scene.width, height=scene.height, crs=scene.crs,
                          transform=scene.transform, tile=MAX_TILE, **extra)
        try:
            for row in range(0, scene.height, REGRID_BLOCK):
                for col in range(0, scene.width, REGRID_BLOCK):
                    win = Window(col, row, min(REGRID_BLOCK, scene.width - col), min(REGRID_BLOCK, scene.height - row))
                    dst_transform = scene.transform @ Affine.translation(col, row)
                    left, top = dst_transform @ (0, 0)
                    right, bottom = dst_transform @ (int(win.width), int(win.height))
                    near = src.window(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
                    c0, r0 = max(0, int(np.floor(near.col_off)) - 2), max(0, int(np.floor(near.row_off)) - 2)
                    c1 = min(src.width, int(np.ceil(near.col_off + near.width)) + 2)
                    r1 = min(src.height, int(np.ceil(near.row_off + near.height)) + 2)
                    read = Window(c0, r0, c1 - c0, r1 - r0)
                    out = np.full((sink.bands, int(win.height), int(win.width)), sink.nodata, dtype=sink.dtype)
                    reproject(
                        source=src.read(window=read), destination=out, src_transform=src.window_transform(read),
                        src_crs=src.crs, src_nodata=src.nodata, dst_transform=dst_transform, dst_crs=scene.crs,
                        dst_nodata=sink.nodata, resampling=resampling,
                    )
                    sink.write(win, out if sink.bands > 1 else out[0])
            sink.finish(overviews=True)
        finally:
            sink.close()
