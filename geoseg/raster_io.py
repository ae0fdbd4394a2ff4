"""Open and validate rasters, local or remote; windowed reads; tiled GeoTIFF writes (published by geoseg.publish).

The library never reads a whole scene: callers ask for windows. Every failure
a user can cause (missing file, not a raster, truncated TIFF, no CRS, a URL that
answers 404 or not at all, ...) is turned into a one-line GeosegError that names
the file (or URL) and the fix. Remote scenes (``https://``, ``s3://``, ``/vsicurl/``,
...) are read through GDAL's network file systems under one environment,
:func:`geoseg.remote.remote_env`: only the byte ranges of the windows asked for travel.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import GeoreferenceError, InputFileError, OutputError, file_error
# Publishing outputs has one home, geoseg.publish; raster_io re-exports its two everyday names.
from geoseg.publish import atomic_output, check_output  # noqa: F401
from geoseg.remote import as_source, is_url, remote_env, remote_failure, unwrap_vsicurl

#: Creation options for every GeoTIFF geoseg writes: tiled, compressed,
#: BigTIFF when the size calls for it.
GTIFF_PROFILE: dict[str, Any] = {
    "driver": "GTiff",
    "tiled": True,
    "blockxsize": 256,
    "blockysize": 256,
    "compress": "deflate",
    "bigtiff": "IF_SAFER",
}

#: Two pixel grids are the same pixels when every corner of one lies within this fraction of a
#: pixel of the other's (after a whole-pixel offset): GeoTIFFs written by other tools round
#: their transforms, and a shift below a hundredth of a pixel moves no pixel centre out of
#: its pixel, so such a raster reads exactly as a nearest-neighbour warp would give it.
#: The one tolerance for label rasters (geoseg.labels) and evaluation inputs.
GRID_TOLERANCE_PX = 0.01


def parse_crs(value: str | CRS | None) -> CRS | None:
    """The CRS of an ``--assume-crs`` value (``EPSG:32633``, WKT, PROJ string, ...); None stays None.

    The one parser of CRS options, for rasters (:func:`open_scene`) and vector files
    (:func:`geoseg.vector_io.read_frame`) alike.

    Raises:
        GeoreferenceError: Not a CRS.
    """
    if value is None or isinstance(value, CRS):
        return value
    try:
        return CRS.from_user_input(value)
    except Exception:  # noqa: BLE001 - rasterio raises CRSError, pyproj its own
        raise GeoreferenceError(f"--assume-crs {value!r} is not a CRS; pass e.g. EPSG:32633") from None


@dataclass(frozen=True)
class SceneInfo:
    """What geoseg needs to know about a raster, read from its header.

    Attributes:
        path: The file (a Path), or a remote scene's URL as given (text, see :func:`geoseg.remote.as_source`).
        width: Width in pixels.
        height: Height in pixels.
        count: Number of bands.
        dtype: Numpy dtype name of the bands (the first band's when mixed).
        crs: Coordinate reference system (the assumed one if the file had none).
        transform: Affine pixel-to-CRS transform.
        nodata: Nodata value, or None.
        descriptions: Band descriptions (None entries where unset).
        colorinterp: Band colour interpretations (rasterio ``ColorInterp`` names: ``red``, ``gray``,
            ``undefined``, ...); empty where unknown.
    """

    path: Path | str
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]
    colorinterp: tuple[str, ...] = ()

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units, both positive."""
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        return _bounds(self.transform, self.width, self.height)

    def window_transform(self, window: Window) -> Affine:
        """Transform of a window's pixel grid (also for windows reaching outside).

        It is the scene transform shifted by the window offset,
        ``transform @ Affine.translation(col_off, row_off)``.
        """
        return self.transform @ Affine.translation(window.col_off, window.row_off)


def _bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    corners = [transform @ (c, r) for c in (0, width) for r in (0, height)]
    xs = [x for x, _ in corners]
    ys = [y for _, y in corners]
    return (min(xs), min(ys), max(xs), max(ys))


#: First bytes of classic TIFF and BigTIFF files (little- and big-endian).
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_failure(path: str | os.PathLike[str], exc: BaseException, problem: str, fix: str) -> InputFileError:
    """A failed read of ``path`` in one line: for a remote input, a network or credentials failure in
    its own words (:func:`geoseg.remote.remote_failure`); otherwise ``problem`` (``{detail}`` is GDAL's)
    and ``fix``."""
    detail = _gdal_detail(exc)
    if is_url(path):
        failure = remote_failure(path, exc, detail)
        if failure is not None:
            return failure
    return file_error(InputFileError, path, problem.format(detail=detail), fix)


def display_name(src: rasterio.io.DatasetReader) -> str:
    """A dataset's name as the user gave it: ``/vsicurl/https://...`` shows as ``https://...``."""
    return unwrap_vsicurl(str(src.name))


def _gdal_detail(exc: BaseException) -> str:
    """The first line of a GDAL error, taken from the cause where rasterio only says 'see previous'."""
    detail = str(exc).split("\n")[0]
    cause = exc.__cause__ or exc.__context__
    if "previous exception" in detail and cause is not None and str(cause):
        detail = str(cause.args[-1] if getattr(cause, "args", None) else cause).split("\n")[0]
    return detail


def _not_a_raster(path: Path, exc: Exception) -> InputFileError:
    detail = _gdal_detail(exc)
    if path.stat().st_size == 0:
        detail = "the file is empty"
    else:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head in _TIFF_MAGIC:
            return file_error(
                InputFileError, path,
                f"cannot be read, the file looks truncated or corrupt ({detail})",
                "re-export or re-download it",
            )
    return file_error(
        InputFileError,
        path,
        f"is not a raster GDAL can read ({detail})",
        "pass a GeoTIFF (or another GDAL raster)",
    )


@contextlib.contextmanager
def open_raster(path: str | os.PathLike[str]) -> Iterator[rasterio.io.DatasetReader]:
    """Open a raster for reading, turning GDAL errors into InputFileError.

    A remote raster (:func:`geoseg.remote.is_url`) is opened, and must be read, inside the ``with``:
    the dataset is read under :func:`geoseg.remote.remote_env` there.

    Raises:
        InputFileError: If the file does not exist, is a folder, or is not a raster; a URL that
            answers an HTTP error, does not answer in time or cannot be reached.
    """
    if is_url(path):
        with _open_remote(os.fspath(path)) as src:
            yield src
        return
    p = Path(path)
    if not p.exists():
        raise file_error(InputFileError, p, "file does not exist", "check the path")
    if p.is_dir():
        raise file_error(InputFileError, p, "is a folder, not a raster file", "pass a GeoTIFF file")
    try:
        with warnings.catch_warnings():
            # A missing geotransform is reported by open_scene in geoseg's own words.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(p)
    except (RasterioIOError, RasterioError) as exc:
        raise _not_a_raster(p, exc) from None
    try:
        yield src
    finally:
        src.close()


@contextlib.contextmanager
def _open_remote(url: str) -> Iterator[rasterio.io.DatasetReader]:
    """Open a remote raster under :func:`geoseg.remote.remote_env` (GDAL reads the header's byte ranges only)."""
    with remote_env(url):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(url)
        except (RasterioIOError, RasterioError) as exc:
            raise read_failure(url, exc, "is not a raster GDAL can read ({detail})",
                               "pass a GeoTIFF (or another GDAL raster)") from None
        try:
            yield src
        finally:
            src.close()


def _check_readable(src: rasterio.io.DatasetReader, path: Path | str) -> None:
    """Read the first and last block of every band: catches truncated files cheaply.

    A truncated TIFF opens fine (its header is intact) and fails only when the
    missing blocks are read; the last block is the one a truncation removes.
    """
    h, w = src.block_shapes[0]
    last = Window(
        (src.width - 1) // w * w, (src.height - 1) // h * h,
        min(w, src.width - (src.width - 1) // w * w), min(h, src.height - (src.height - 1) // h * h),
    )
    try:
        for win in (Window(0, 0, min(w, src.width), min(h, src.height)), last):
            src.read(window=win)
    except (RasterioIOError, RasterioError) as exc:
        raise read_failure(
            path, exc, "cannot be read, the file looks truncated or corrupt ({detail})", "re-export or re-download it",
        ) from None


def open_scene(
    path: str | os.PathLike[str],
    *,
    assume_crs: str | CRS | None = None,
    check_blocks: bool = True,
) -> SceneInfo:
    """Open and validate a georeferenced raster scene.

    Args:
        path: The raster file, or a remote raster (``https://``, ``s3://``, ``/vsicurl/...``).
        assume_crs: CRS to use when the file has none (e.g. ``"EPSG:32633"``).
            A file that has a CRS keeps its own.
        check_blocks: Read the first and last block to detect truncated files.

    Returns:
        The scene's header information.

    Raises:
        InputFileError: Missing file, not a raster, truncated or corrupt; a URL that answers an
            HTTP error, does not answer in time or cannot be reached.
        GeoreferenceError: No CRS (and none assumed) or no geotransform.
    """
    p = as_source(path)
    with open_raster(p) as src:
        if src.count < 1:
            raise file_error(InputFileError, p, "has no bands", "pass a raster with image bands")
        if np.dtype(src.dtypes[0]).kind not in "uif":
            raise file_error(
                InputFileError, p, f"has band type {src.dtypes[0]}, expected integer or float",
                "convert it, e.g. gdal_translate -ot Float32",
            )
        if check_blocks:  # before the georeference checks: a cut header loses its tags too
            _check_readable(src, p)
        crs = src.crs
        if crs is None:
            if assume_crs is None:
                raise file_error(
                    GeoreferenceError, p, "has no CRS",
                    "georeference it (gdal_edit.py -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX",
                )
            crs = parse_crs(assume_crs)
        if src.transform == Affine.identity() and not src.gcps[0]:
            raise file_error(
                GeoreferenceError, p, "has no geotransform (pixel coordinates only)",
                "georeference it, e.g. gdal_translate -a_ullr or gdalwarp with GCPs",
            )
        return SceneInfo(
            path=p, width=src.width, height=src.height, count=src.count, dtype=src.dtypes[0],
            crs=crs, transform=src.transform, nodata=src.nodata,
            descriptions=tuple(src.descriptions), colorinterp=tuple(c.name for c in src.colorinterp),
        )


def read_window(
    src: rasterio.io.DatasetReader,
    window: Window,
    *,
    bands: Sequence[int] | None = None,
    fill: float = 0,
    pixel_interleaved: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a window (which may reach outside the raster) and its validity mask.

    Pixels outside the raster are set to ``fill`` and marked invalid; inside,
    a pixel is invalid where GDAL's dataset mask says so (nodata in every band,
    alpha 0, or an internal mask).

    Args:
        src: An open dataset.
        window: Window in the raster's pixel coordinates (integer offsets/sizes).
        bands: 1-based band indexes to read; all bands when None.
        fill: Value for pixels outside the raster.
        pixel_interleaved: Return data as (height, width, bands), written so by GDAL (no
            transposed copy: 16-35 ms for a 2048-px RGB block).

    Returns:
        ``(data, valid)``: data of shape (bands, height, width) (or (height, width, bands))
        in the raster's dtype, and a boolean (height, width) array, True where the pixel is data.

    Raises:
        InputFileError: If GDAL fails to read the window (truncated or corrupt file).
    """
    idx = list(bands) if bands is not None else list(range(1, src.count + 1))
    col, row = int(window.col_off), int(window.row_off)
    w, h = int(window.width), int(window.height)
    dtype = src.dtypes[idx[0] - 1]
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + w, src.width), min(row + h, src.height)
    inner = Window(c0, r0, c1 - c0, r1 - r0) if c1 > c0 and r1 > r0 else None
    whole = inner is not None and (c0, r0, c1, r1) == (col, row, col + w, row + h)
    shape = (h, w, len(idx)) if pixel_interleaved else (len(idx), h, w)
    # Inside the raster GDAL writes every pixel: no fill to write first.
    data = np.empty(shape, dtype=dtype) if whole else np.full(shape, fill, dtype=dtype)
    bands_first = data.transpose(2, 0, 1) if pixel_interleaved else data  # GDAL writes through the view
    valid = np.zeros((h, w), dtype=bool)
    if inner is not None:
        ys, xs = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        _, valid[ys, xs] = read_inside(src, idx, inner, out=bands_first[:, ys, xs])
    return data, valid


def read_inside(
    src: rasterio.io.DatasetReader,
    bands: Sequence[int],
    window: Window,
    *,
    out_shape: tuple[int, int] | None = None,
    resampling: Any = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a window that lies inside the raster, and its validity (GDAL's dataset mask).

    With ``out_shape`` (and fractional windows), GDAL resamples the window into that
    shape with ``resampling`` (the mask with nearest), from an overview where one fits.
    ``out``: a (bands, height, width) array (any strides: a view of a pixel-interleaved one)
    the data is read into, and returned.

    Raises:
        InputFileError: GDAL failed to read (truncated or corrupt file), naming it.
    """
    from rasterio.enums import Resampling

    try:
        if out_shape is None:
            return src.read(list(bands), window=window, out=out), src.dataset_mask(window=window) > 0
        data = src.read(list(bands), window=window, out_shape=(len(bands), *out_shape),
                        resampling=resampling or Resampling.nearest)
        return data, src.dataset_mask(window=window, out_shape=out_shape, resampling=Resampling.nearest) > 0
    except (RasterioIOError, RasterioError) as exc:
        raise read_failure(
            display_name(src), exc, f"cannot read window {window} ({{detail}})",
            "the file looks truncated or corrupt; re-export it",
        ) from None


def read_decimated(
    path: str | os.PathLike[str], *, bands: Sequence[int], max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole scene at most ``max_pixels`` pixels large (every n-th pixel, or an overview).

    A cheap look at a scene's values: GDAL reads from an overview where the file
    has one, and nearest-neighbour sampling keeps the values as they are (no
    averaging that would shrink the extremes). Never holds the full scene.

    Args:
        path: A raster, local or remote (of a remote COG only the overview's tiles travel).
        bands: 1-based band indexes to read.
        max_pixels: Pixels (per band) read at most.

    Returns:
        ``(data, valid)``: (bands, h, w) in the raster's dtype and a (h, w) bool
        array, True where the pixel is data (GDAL's dataset mask).

    Raises:
        InputFileError: Missing, not a raster, truncated or corrupt.
    """
    from rasterio.enums import Resampling

    from geoseg.encoding import GDAL_CACHE_BYTES

    # A decimated read without overviews decodes every tile it samples; under GDAL's default
    # cache (5% of RAM) they all stay cached: +1 GB at 20000² (measured). Cap it as the pipeline does.
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(path) as src:
        step = max(1, int(np.ceil(np.sqrt(src.width * src.height / max(1, max_pixels)))))
        h, w = -(-src.height // step), -(-src.width // step)
        try:
            data = src.read(list(bands), out_shape=(len(bands), h, w), resampling=Resampling.nearest)
            valid = src.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest) > 0
        except (RasterioIOError, RasterioError) as exc:
            raise read_failure(
                path, exc, "cannot be read ({detail})", "the file looks truncated or corrupt; re-export it",
            ) from None
    return data, valid


#: (what, path) pairs: an output's option and path, or an input's kind and path; None paths are skipped.
PathsByRole = Iterable[tuple[str, str | os.PathLike[str] | None]]
#: Folder entries looked at to find a name with letters when probing a file system for case.
_CASE_PROBE_ENTRIES = 64


def _identity(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int] | None]:
    """The real path (symlinks and ``..`` resolved) and, if the file exists, its (device, inode)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def is_case_insensitive(folder: str | os.PathLike[str]) -> bool:
    """Whether the file system holding ``folder`` (or its nearest existing parent) ignores case in names.

    Probed, not guessed from the platform: a name with letters (the folder's own,
    else one of its entries) is looked up with its case swapped, and the file
    system ignores case when that finds the same file. Only a folder with no
    such name falls back to the platform's default (macOS and Windows ignore case).
    """
    probe = os.path.abspath(folder)
    while not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    name = os.path.basename(probe)
    sample = probe if name.swapcase() != name else None
    if sample is None:
        try:
            with os.scandir(probe) as entries:
                sample = next((e.path for e in itertools.islice(entries, _CASE_PROBE_ENTRIES)
                               if e.name.swapcase() != e.name), None)
        except OSError:
            sample = None
    if sample is None:
        return sys.platform in ("darwin", "win32")
    head, tail = os.path.split(sample)
    try:
        return os.path.samefile(sample, os.path.join(head, tail.swapcase()))
    except OSError:  # the swapped name does not exist: case matters
        return False


def check_not_inputs(outputs: PathsByRole, inputs: PathsByRole) -> None:
    """Refuse any output that is one of the command's inputs, with or without ``--overwrite``.

    ``outputs`` are (option, path) pairs such as ``("--mask-out", "m.tif")``;
    ``inputs`` are (kind, path) pairs such as ``("scene", "in.tif")``. An
    output is an input when both name the same file or folder however they are
    spelled: the same real path (symlinks and ``..`` resolved), the same
    (device, inode) for existing files (hard links, other case on a
    case-insensitive file system), or, for an output that does not exist yet,
    the same real path up to case where its folder's file system ignores case.
    An output folder that is an input folder (a data folder) is refused too.

    A remote input (:func:`geoseg.remote.is_url`) is never a local output, and is skipped.

    Call it for every output before any input is read and anything is written,
    and before :func:`check_output` (whose hint is to pass ``--overwrite``).

    Raises:
        OutputError: ``"OUTPUT: OPTION would overwrite the input KIND INPUT; choose
            another output path"`` (``would write into`` for an input folder).
    """
    by_real: dict[str, tuple[str, str | os.PathLike[str]]] = {}
    by_inode: dict[tuple[int, int], tuple[str, str | os.PathLike[str]]] = {}
    for kind, path in inputs:
        if path is None or is_url(path):
            continue
        real, inode = _identity(path)
        by_real.setdefault(real, (kind, path))
        if inode is not None:
            by_inode.setdefault(inode, (kind, path))
    by_folded: dict[str, tuple[str, str | os.PathLike[str]]] | None = None
    for option, path in outputs:
        if path is None:
            continue
        real, inode = _identity(path)
        hit = by_real.get(real) or (by_inode.get(inode) if inode is not None else None)
        if hit is None and inode is None:
            if by_folded is None:
                by_folded = {}
                for key, value in by_real.items():
                    by_folded.setdefault(key.casefold(), value)
            folded = by_folded.get(real.casefold())
            if folded is not None and is_case_insensitive(os.path.dirname(real)):
                hit = folded
        if hit is not None:
            kind, source = hit
            folder = os.path.isdir(source)
            raise file_error(
                OutputError, path,
                f"{option} would {'write into' if folder else 'overwrite'} the input {kind} {os.fspath(source)}",
                f"choose another output {'folder' if folder else 'path'}",
            )


def check_distinct_outputs(outputs: PathsByRole) -> None:
    """Refuse two outputs of one run that are the same file, however they are spelled.

    ``outputs`` are (option, path) pairs such as ``("--preview", "p/s.png")``. Two
    are the same file when they have the same real path (symlinks and ``..``
    resolved), the same (device, inode) (hard links), or real paths equal up to case
    in a folder whose file system ignores case. Call it before any input is read.

    Raises:
        OutputError: ``"OUTPUT: OPTION is the same file as OTHER-OPTION OTHER; give every
            output its own path"``.
    """
    by_real: dict[str, tuple[str, str | os.PathLike[str]]] = {}
    by_inode: dict[tuple[int, int], tuple[str, str | os.PathLike[str]]] = {}
    by_folded: dict[str, tuple[str, str | os.PathLike[str]]] = {}
    ignores_case: dict[str, bool] = {}
    for option, path in outputs:
        if path is None:
            continue
        real, inode = _identity(path)
        hit = by_real.get(real) or (by_inode.get(inode) if inode is not None else None)
        folder = os.path.dirname(real)
        if hit is None and real.casefold() in by_folded:
            if folder not in ignores_case:
                ignores_case[folder] = is_case_insensitive(folder)
            if ignores_case[folder]:
                hit = by_folded[real.casefold()]
        if hit is not None:
            raise file_error(OutputError, path, f"{option} is the same file as {hit[0]} {os.fspath(hit[1])}",
                             "give every output its own path")
        by_real[real] = by_folded[real.casefold()] = (option, path)
        if inode is not None:
            by_inode[inode] = (option, path)


#: Placeholder for the scene name in per-scene output templates (``masks/{scene}.tif``).
SCENE_FIELD = "{scene}"


def per_scene_paths(
    spec: str | os.PathLike[str], names: Sequence[str], *, kind: str, extensions: Sequence[str],
    what: str = "file", template: str = "{scene}_{kind}",
) -> list[Path]:
    """Where each scene's ``kind`` output goes, from one command-line value.

    ``spec`` is a file with one of ``extensions`` (one scene only), a template
    containing ``{scene}`` (e.g. ``out/{scene}_mask.tif``), or a folder, which
    gets ``<scene>_<kind><extensions[0]>`` files.

    Raises:
        OutputError: One file for several scenes (the hint shows a template built from ``template``).
    """
    text = os.fspath(spec)
    if SCENE_FIELD in text:
        return [Path(text.replace(SCENE_FIELD, n)) for n in names]
    p = Path(text)
    if p.suffix.lower() in extensions:
        if len(names) > 1:
            hint = template.replace("{kind}", kind) + p.suffix
            raise file_error(
                OutputError, p, f"is one {what} for {len(names)} scenes",
                f"pass a folder or a template such as {p.parent / hint}",
            )
        return [p]
    return [p / f"{n}_{kind}{extensions[0]}" for n in names]


def write_geotiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    crs: CRS,
    transform: Affine,
    nodata: float | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a tiled, compressed GeoTIFF, atomically.

    For small rasters (chips, test data). Scene-sized outputs are written in
    windows by the inference module instead.

    Returns:
        The final path.
    """
    arr = array[None] if array.ndim == 2 else array
    profile = {
        **GTIFF_PROFILE, "count": arr.shape[0], "height": arr.shape[1], "width": arr.shape[2],
        "dtype": arr.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
    }
    if arr.shape[1] < 256 or arr.shape[2] < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    profile.update(options)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(arr)
    return Path(path)


#: Per thread (pyproj transformers are not shared between threads): CRS WKT -> transformer to lon/lat.
_LONLAT = threading.local()


def _to_lonlat(wkt: str) -> Any:
    """A transformer from the CRS ``wkt`` to lon/lat (WGS84), made once per CRS and thread: making one
    costs about a millisecond, more than the measurement it serves (once or twice per scene)."""
    import pyproj

    cache = _LONLAT.__dict__.setdefault("transformers", {})
    transformer = cache.get(wkt)
    if transformer is None:
        if len(cache) >= 64:  # a run over scenes in many CRSs: keep the cache small
            cache.clear()
        transformer = cache[wkt] = pyproj.Transformer.from_crs(
            pyproj.CRS.from_user_input(wkt), "EPSG:4326", always_xy=True)
    return transformer


def ground_pixel_size(
    crs: CRS, transform: Affine, width: int, height: int
) -> tuple[float, float]:
    """True ground metres of one pixel step (x, y) at the centre of a grid.

    Measured on the WGS84 ellipsoid with :class:`pyproj.Geod`, so it is right in
    any CRS: UTM, Web Mercator (where CRS metres shrink with latitude) and
    geographic degrees alike.

    Args:
        crs: The grid's CRS.
        transform: The grid's pixel-to-CRS transform.
        width: Grid width in pixels.
        height: Grid height in pixels.

    Returns:
        Ground metres covered by a step of one pixel along a row (x) and along
        a column (y), at the grid centre.

    Raises:
        GeoreferenceError: If the CRS cannot be related to the earth (a local
            engineering CRS) and has no linear unit.
    """
    import pyproj

    col, row = width / 2.0, height / 2.0
    pts = [transform @ (col, row), transform @ (col + 1, row), transform @ (col, row + 1)]
    try:
        to_lonlat = _to_lonlat(crs.to_wkt())
        lons, lats = to_lonlat.transform([p[0] for p in pts], [p[1] for p in pts], errcheck=True)
        geod = pyproj.Geod(ellps="WGS84")
        _, _, dx = geod.inv(lons[0], lats[0], lons[1], lats[1])
        _, _, dy = geod.inv(lons[0], lats[0], lons[2], lats[2])
        return (float(dx), float(dy))
    except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError):
        if crs.is_projected and crs.linear_units_factor:
            factor = float(crs.linear_units_factor[1])
            return (
                float(np.hypot(transform.a, transform.d)) * factor,
                float(np.hypot(transform.b, transform.e)) * factor,
            )
        raise GeoreferenceError(
            f"CRS {crs.to_string()!r} cannot be related to ground metres; "
            "reproject the scene to a projected CRS (e.g. UTM)"
        ) from None


def ground_resolution(info: SceneInfo) -> float:
    """Ground metres per pixel at the scene centre (mean of the x and y steps).

    True metres also for EPSG:4326 and EPSG:3857 (see :func:`ground_pixel_size`).

    Args:
        info: The scene, as returned by :func:`open_scene`.

    Returns:
        Metres per pixel.

    Raises:
        GeoreferenceError: If the CRS cannot be related to ground metres.
    """
    dx, dy = ground_pixel_size(info.crs, info.transform, info.width, info.height)
    return (dx + dy) / 2.0
