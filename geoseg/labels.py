"""Labels as class-id masks: raster value checks, grid checks, vector labels rasterised per chip.

Masks are uint8 class ids: 0 background, 1 rooftop (binary), ``k`` for class
``k`` in multi-class data, and :data:`IGNORE_INDEX` (255) for pixels that loss
and metrics skip (padding, image nodata, label nodata). Vector labels also give
instance ids (one per polygon) and the instance targets built from them
(:meth:`VectorLabels.rasterize_targets`, see :mod:`geoseg.targets`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import rasterio
import rasterio.features
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.encoding import IGNORE_INDEX
from geoseg.errors import InputFileError, LabelError, file_error
from geoseg.raster_io import GRID_TOLERANCE_PX, SceneInfo, open_raster, open_scene
from geoseg.vector_io import read_frame

log = logging.getLogger(__name__)


LabelValues = Literal["auto", "binary255", "binary01", "classes"]
LABEL_VALUE_MODES: tuple[str, ...] = ("auto", "binary255", "binary01", "classes")

#: Fixes named in the errors of a label vector file (geoseg.vector_io reads it).
_VECTOR_FIX = "pass a GeoPackage, GeoJSON or Shapefile of label polygons"
_VECTOR_CRS_FIX = "set one (ogr2ogr -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX"


# --------------------------------------------------------------------------- raster labels


def _allowed_text(mode: str, classes: int) -> str:
    binary = classes == 2
    if mode == "binary255":
        return "{0, 255} (0/255 binary)"
    if mode == "binary01":
        return "{0, 1} (0/1 binary)"
    ids = f"class ids 0..{classes - 1} (and {IGNORE_INDEX} = ignore)"
    if mode == "classes":
        return ids
    if binary:
        return "{0, 255} (0/255 binary) or {0, 1} (0/1 binary)"
    return f"{{0, 255}} (0/255 binary) or {ids}"


def _values_text(values: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def resolve_label_values(
    values: Sequence[int] | np.ndarray,
    *,
    classes: int = 2,
    label_values: LabelValues = "auto",
    path: str | os.PathLike[str] = "labels",
) -> LabelValues:
    """Decide how a label raster's values map to class ids, from the values it holds.

    ``"auto"`` picks ``"binary255"`` for values within {0, 255} when there are
    two classes, else ``"classes"`` for values within 0..classes-1 (plus 255 as
    ignore), else fails.

    Args:
        values: The distinct values found in the label (nodata excluded).
        classes: Number of classes of the model (2 for binary rooftops).
        label_values: ``"auto"`` or a fixed mode.
        path: The label file, for the error message.

    Returns:
        The resolved mode: ``"binary255"``, ``"binary01"`` or ``"classes"``.

    Raises:
        LabelError: If a value is outside the allowed set of the mode.
    """
    if label_values not in LABEL_VALUE_MODES:
        raise LabelError(
            f"label_values should be one of {', '.join(map(repr, LABEL_VALUE_MODES))}, "
            f"got {label_values!r}"
        )
    found = np.unique(np.asarray(values, dtype=np.int64))
    ids = set(range(classes)) | {IGNORE_INDEX}
    allowed = {
        "binary255": {0, 255},
        "binary01": {0, 1},
        "classes": ids,
    }
    if label_values == "auto":
        if classes == 2 and set(found.tolist()) <= {0, 255}:
            return "binary255"
        if set(found.tolist()) <= ids:
            return "classes"
    elif set(found.tolist()) <= allowed[label_values]:
        return label_values
    bad = [v for v in found.tolist() if v not in (allowed[label_values] if label_values != "auto"
                                                   else ({0, 255} | ids))]
    raise file_error(
        LabelError, path,
        f"has label values {_values_text(bad)} outside the allowed set "
        f"{_allowed_text(label_values, classes)}",
        "recode the labels, or set data.classes / data.label_values to match them",
    )


def to_class_ids(
    values: np.ndarray,
    *,
    mode: LabelValues,
    nodata: float | None = None,
    classes: int = 2,
    path: str | os.PathLike[str] = "labels",
) -> np.ndarray:
    """Map label raster values to uint8 class ids (255 = ignore).

    Args:
        values: Label pixels (any integer or float dtype).
        mode: ``"binary255"`` (255 -> 1), ``"binary01"`` or ``"classes"`` (kept),
            as returned by :func:`resolve_label_values`.
        nodata: The label raster's nodata value; those pixels become IGNORE_INDEX.
        classes: Number of classes (for the check in ``"classes"`` mode).
        path: The label file, for the error message.

    Returns:
        uint8 class ids of the same shape.

    Raises:
        LabelError: If a value is outside the allowed set of ``mode``.
    """
    vals = np.asarray(values)
    ignore = np.zeros(vals.shape, bool) if nodata is None else (vals == nodata)
    if np.issubdtype(vals.dtype, np.floating):
        frac = (vals != np.round(vals)) & ~ignore
        if frac.any():
            raise file_error(
                LabelError, path,
                f"has non-integer label values such as {float(vals[frac][0])!r}",
                "labels should be class ids; recode or round them",
            )
    present = np.unique(vals[~ignore]) if ignore.any() else np.unique(vals)
    resolve_label_values(present, classes=classes, label_values=mode, path=path)
    out = vals.astype(np.int64, copy=False)
    if mode == "binary255":
        out = np.where(out == 255, 1, out)
    out = out.astype(np.uint8)
    out[ignore] = IGNORE_INDEX
    return out


def scan_label_values(
    src: rasterio.io.DatasetReader, *, band: int = 1
) -> np.ndarray:
    """Distinct values of a label band (nodata excluded), read block by block.

    Returns:
        Sorted distinct values.

    Raises:
        InputFileError: If a block cannot be read (truncated or corrupt file).
    """
    found: set[int] = set()
    nodata = src.nodata
    try:
        for _, win in src.block_windows(band):
            vals = src.read(band, window=win)
            if nodata is not None:
                vals = vals[vals != nodata]
            found.update(np.unique(vals).tolist())
    except rasterio.errors.RasterioError as exc:
        raise file_error(
            InputFileError, src.name,
            f"cannot be read, the file looks truncated or corrupt ({str(exc).splitlines()[0]})",
            "re-export or re-download it",
        ) from None
    return np.array(sorted(found))


# --------------------------------------------------------------------------- grids


def crs_text(crs: CRS | None) -> str:
    """A short name of a CRS for messages: ``EPSG:3857``, else its name, or ``no CRS``."""
    return "no CRS" if crs is None else (crs.to_string() if crs.to_epsg() else crs.name)


def grid_text(crs: CRS | None, transform: Affine, width: int, height: int) -> str:
    """A one-line description of a pixel grid, for error messages."""
    crs_name = crs_text(crs)
    return (
        f"{crs_name}, {width}x{height} px, origin ({transform.c:.6g}, {transform.f:.6g}), "
        f"pixel ({transform.a:.6g}, {transform.e:.6g})"
    )


def grid_bounds(transform: Affine, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a grid of ``shape`` (height, width) pixels, in its CRS units."""
    h, w = shape
    corners = [transform @ (c, r) for c in (0, w) for r in (0, h)]
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return min(xs), min(ys), max(xs), max(ys)


def same_grid(
    a_crs: CRS | None, a_transform: Affine, a_shape: tuple[int, int],
    b_crs: CRS | None, b_transform: Affine, b_shape: tuple[int, int],
    *, tolerance_px: float = GRID_TOLERANCE_PX,
) -> bool:
    """Whether two grids (CRS, transform, (height, width)) are the same pixels on the ground.

    The transforms may differ by less than ``tolerance_px`` of a pixel at every
    corner of the grid.
    """
    if tuple(a_shape) != tuple(b_shape):
        return False
    if (a_crs is None) != (b_crs is None) or (a_crs is not None and a_crs != b_crs):
        return False
    h, w = a_shape
    px = min(abs(a_transform.a) or 1, abs(a_transform.e) or 1)
    for col, row in ((0, 0), (w, 0), (0, h), (w, h)):
        ax, ay = a_transform @ (col, row)
        bx, by = b_transform @ (col, row)
        if abs(ax - bx) > tolerance_px * px or abs(ay - by) > tolerance_px * px:
            return False
    return True


def check_label_grid(image: SceneInfo, label: SceneInfo) -> None:
    """Refuse a label raster that is not on exactly the image's pixel grid.

    Raises:
        LabelError: Different CRS, transform (beyond a hundredth of a pixel) or size;
            the message names both grids.
    """
    if same_grid(image.crs, image.transform, (image.height, image.width),
                 label.crs, label.transform, (label.height, label.width)):
        return
    raise file_error(
        LabelError, label.path,
        f"label grid ({grid_text(label.crs, label.transform, label.width, label.height)}) "
        f"differs from the grid of image {image.path} "
        f"({grid_text(image.crs, image.transform, image.width, image.height)})",
        "resample the label onto the image grid (e.g. gdalwarp -te/-ts/-t_srs of the image)",
    )


def open_label_raster(
    path: str | os.PathLike[str],
    image: SceneInfo,
    *,
    classes: int = 2,
    label_values: LabelValues = "auto",
    scan: bool = True,
) -> tuple[SceneInfo, LabelValues]:
    """Open and validate a label raster against its image.

    A label without CRS takes the image's CRS (labels exported as plain TIFFs
    on the image grid are common); its transform must still match.

    Args:
        path: The label raster.
        image: The image it labels.
        classes: Number of classes.
        label_values: How values map to classes (see :func:`resolve_label_values`).
        scan: Read every block to check the values (else ``label_values`` must
            not be ``"auto"``... it is then resolved per chip).

    Returns:
        The label's header information and the resolved value mode (``"auto"``
        when not scanned).

    Raises:
        InputFileError: Missing, not a raster, truncated.
        LabelError: Grid differs from the image; disallowed values; more than one band.
    """
    info = open_scene(path, assume_crs=image.crs)
    if info.count != 1:
        raise file_error(
            LabelError, info.path, f"has {info.count} bands, a label raster should have 1",
            "pass a single-band class-id raster",
        )
    check_label_grid(image, info)
    mode: LabelValues = label_values
    if scan:
        with open_raster(info.path) as src:
            values = scan_label_values(src)
        mode = resolve_label_values(values, classes=classes, label_values=label_values,
                                    path=info.path)
    return info, mode


# --------------------------------------------------------------------------- vector labels


class VectorLabels:
    """Vector labels (GeoPackage, GeoJSON, Shapefile, ...) rasterised onto any grid on the fly.

    The file is read once; for each CRS asked for, the polygons are
    reprojected once and given a spatial index, so rasterising a chip only
    touches the polygons that overlap it.

    Args:
        path: The vector file.
        layer: Layer name (None: as :func:`geoseg.vector_io.read_frame` chooses: the only
            layer, else ``rooftops``, else the first with geometries).
        class_column: Attribute holding the class id (1..classes-1) of each
            polygon; None burns every polygon as class 1 (rooftop).
        classes: Number of classes (to check ``class_column`` values).
        assume_crs: CRS of a file that has none.

    Raises:
        InputFileError: Missing file, a URL, or not a vector file.
        GeoreferenceError: The file has no CRS (and none assumed), or ``assume_crs`` is not a CRS.
        LabelError: ``class_column`` missing or holding values outside 1..classes-1.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layer: str | None = None,
        class_column: str | None = None,
        classes: int = 2,
        assume_crs: str | CRS | None = None,
    ) -> None:
        import shapely

        self.path = Path(path)
        self.class_column = class_column
        p = self.path
        gdf, self.layer = read_frame(p, layer=layer, assume_crs=assume_crs, fix=_VECTOR_FIX,
                                     crs_fix=_VECTOR_CRS_FIX)
        if class_column is not None:
            if class_column not in gdf.columns:
                raise file_error(
                    LabelError, p, f"has no attribute {class_column!r} (attributes: "
                    f"{', '.join(c for c in gdf.columns if c != gdf.geometry.name) or 'none'})",
                    "pass the name of the class column, or none for binary labels",
                )
            vals = gdf[class_column]
            ok = vals.notna() & (vals == vals.round()) & (vals >= 1) & (vals < classes)
            if not ok.all():
                bad = sorted(set(vals[~ok].tolist()), key=str)
                raise file_error(
                    LabelError, p,
                    f"has {class_column!r} values {_values_text(bad)} outside the class ids "
                    f"1..{classes - 1}",
                    "recode the classes or set data.classes",
                )
        keep = gdf.geometry.notna() & ~gdf.geometry.is_empty
        keep &= gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
        dropped = int((~keep).sum())
        if dropped:
            log.warning("%s: ignoring %d features that are not polygons", p, dropped)
        gdf = gdf[keep]
        invalid = ~gdf.geometry.is_valid
        if invalid.any():
            log.info("%s: repairing %d invalid polygons", p, int(invalid.sum()))
            gdf = gdf.set_geometry(shapely.make_valid(gdf.geometry.values))
        if len(gdf) == 0:
            log.warning("%s: no label polygons; every pixel is background", p)
        self._frame = gdf
        self._by_crs: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._frame)

    @property
    def crs(self) -> CRS:
        """The file's own CRS."""
        return CRS.from_user_input(self._frame.crs.to_wkt())

    def frame(self, crs: CRS | str) -> Any:
        """The polygons (GeoDataFrame) reprojected to ``crs``; cached, with a spatial index."""
        target = CRS.from_user_input(crs)
        key = target.to_wkt()
        if key not in self._by_crs:
            gdf = self._frame
            if CRS.from_user_input(gdf.crs.to_wkt()) != target:
                gdf = gdf.to_crs(key)
            gdf.sindex  # build the spatial index once per CRS
            self._by_crs[key] = gdf
        return self._by_crs[key]

    def polygons(self, crs: CRS | str, bounds: tuple[float, float, float, float] | None = None) -> list:
        """The label geometries in ``crs`` (those intersecting ``bounds`` if given)."""
        gdf = self.frame(crs)
        if bounds is None:
            return list(gdf.geometry)
        import shapely

        idx = gdf.sindex.query(shapely.box(*bounds), predicate="intersects")
        return list(gdf.geometry.iloc[np.sort(idx)])

    def rasterize(
        self,
        *,
        crs: CRS | str,
        transform: Affine,
        shape: tuple[int, int],
        all_touched: bool = False,
    ) -> np.ndarray:
        """Burn the labels onto a grid (e.g. one chip): uint8 class ids, 0 background.

        Polygons later in the file are drawn over earlier ones where they overlap.

        Args:
            crs: The grid's CRS.
            transform: The grid's transform (for a chip: the chip's transform).
            shape: (height, width) in pixels.
            all_touched: Burn every pixel a polygon touches, not only those
                whose centre it covers.

        Returns:
            A (height, width) uint8 array.
        """
        gdf, idx = self._query_grid(crs, transform, shape)
        if len(idx) == 0:
            return np.zeros(shape, dtype=np.uint8)
        geoms = gdf.geometry.iloc[idx]
        if self.class_column is None:
            values = np.ones(len(idx), dtype=np.uint8)
        else:
            values = gdf[self.class_column].iloc[idx].to_numpy().astype(np.uint8)
        return rasterio.features.rasterize(
            zip(geoms, values.tolist()), out_shape=shape, transform=transform, fill=0,
            all_touched=all_touched, dtype="uint8",
        )

    def _query_grid(self, crs: CRS | str, transform: Affine, shape: tuple[int, int]) -> tuple[Any, np.ndarray]:
        """The polygons (in ``crs``) that meet the grid's bounds, as (frame, sorted row indexes)."""
        import shapely

        gdf = self.frame(crs)
        idx = gdf.sindex.query(shapely.box(*grid_bounds(transform, shape)), predicate="intersects")
        return gdf, np.sort(idx)

    def count(self, crs: CRS | str, bounds: tuple[float, float, float, float]) -> int:
        """How many label polygons intersect ``bounds`` (left, bottom, right, top in ``crs``)."""
        import shapely

        return int(len(self.frame(crs).sindex.query(shapely.box(*bounds), predicate="intersects")))

    def rasterize_instances(
        self,
        *,
        crs: CRS | str,
        transform: Affine,
        shape: tuple[int, int],
        pad: int = 0,
        all_touched: bool = False,
    ) -> np.ndarray:
        """Burn every polygon with its own id onto a grid: int32 ids, 0 background.

        Ids are 1..n over the polygons that meet the (padded) grid, in file order;
        a polygon later in the file is drawn over earlier ones where they overlap
        (as in :meth:`rasterize`, so ``ids > 0`` is exactly its footprint mask).
        ``pad`` widens the grid by that many pixels on every side (same pixel
        centres), so that targets near a chip edge see the buildings just outside
        it (:func:`geoseg.targets.padding_px`).

        Args:
            crs: The grid's CRS.
            transform: The grid's transform (for a chip: the chip's transform).
            shape: (height, width) in pixels, without the padding.
            pad: Pixels added on every side (>= 0).
            all_touched: Burn every pixel a polygon touches.

        Returns:
            A (height + 2 pad, width + 2 pad) int32 array; row ``pad``, column
            ``pad`` is the grid's first pixel.

        Raises:
            ValueError: A negative ``pad``.
        """
        if int(pad) != pad or pad < 0:
            raise ValueError(f"pad should be a whole number of pixels >= 0, got {pad!r}")
        pad = int(pad)
        padded = transform @ Affine.translation(-pad, -pad) if pad else transform
        out_shape = (int(shape[0]) + 2 * pad, int(shape[1]) + 2 * pad)
        gdf, idx = self._query_grid(crs, padded, out_shape)
        if len(idx) == 0:
            return np.zeros(out_shape, dtype=np.int32)
        geoms = gdf.geometry.iloc[idx]
        return rasterio.features.rasterize(
            zip(geoms, range(1, len(idx) + 1)), out_shape=out_shape, transform=padded, fill=0,
            all_touched=all_touched, dtype="int32",
        )

    def rasterize_targets(
        self,
        *,
        crs: CRS | str,
        transform: Affine,
        shape: tuple[int, int],
        border_px: float,
        contact_px: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Building ids and instance targets of a grid, built on the grid padded as the targets need.

        Args:
            crs, transform, shape: The grid (e.g. one chip).
            border_px: Border width in pixels of this grid.
            contact_px: Contact distance in pixels of this grid.

        Returns:
            ``(ids, targets)``: (H, W) int32 ids as :meth:`rasterize_instances` gives
            them, and (2, H, W) uint8 0/1 ``border`` and ``contact``
            (:func:`geoseg.targets.instance_targets` of the padded ids, cropped).
        """
        from geoseg.targets import instance_targets, padding_px

        pad = padding_px(border_px, contact_px)
        ids = self.rasterize_instances(crs=crs, transform=transform, shape=shape, pad=pad)
        border, contact = instance_targets(ids, border_px=border_px, contact_px=contact_px)
        h, w = int(shape[0]), int(shape[1])
        crop = (slice(pad, pad + h), slice(pad, pad + w))
        return np.ascontiguousarray(ids[crop]), np.stack([border[crop], contact[crop]])

    def rasterize_window(self, info: SceneInfo, window: Window, **kwargs: Any) -> np.ndarray:
        """Burn the labels onto a window of a scene's grid (see :meth:`rasterize`)."""
        return self.rasterize(
            crs=info.crs, transform=info.window_transform(window),
            shape=(int(window.height), int(window.width)), **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        # Spatial indexes are rebuilt lazily in each DataLoader worker.
        state = self.__dict__.copy()
        state["_by_crs"] = {}
        return state
