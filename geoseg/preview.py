"""Preview picture of a prediction: the scene, downsampled, with the polygons outlined over it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from geoseg.errors import ConfigError
from geoseg.publish import Publication, atomic_output
from geoseg.raster_io import check_not_inputs, check_output, per_scene_paths
from geoseg.remote import as_source, source_stem

if TYPE_CHECKING:
    import geopandas

log = logging.getLogger(__name__)

#: Longest side of the drawn scene in pixels (one scene pixel per PNG pixel when smaller).
DEFAULT_MAX_SIZE = 1600
#: Width of the polygon outlines in points (about 2 PNG pixels at geoseg's DPI of 100);
#: their colour is the rooftop colour of every geoseg picture (plots.ROOF_COLOUR).
OUTLINE_WIDTH_PT = 1.5
#: A dark halo under each outline keeps it visible on light roofs.
HALO_WIDTH_PT = 3.0
HALO_COLOUR = (0.0, 0.0, 0.0, 0.6)
#: Margins around the image in PNG pixels: room for the title, tick labels and axis labels.
MARGIN_LEFT_PX = 90
MARGIN_RIGHT_PX = 20
MARGIN_TOP_PX = 34
MARGIN_BOTTOM_PX = 56
#: Font sizes (points) of the title and of the tick and axis labels.
TITLE_FONTSIZE = 10
LABEL_FONTSIZE = 8
#: Placeholder for the scene name in a ``--preview`` template.
#: Colour of nodata pixels (white, as the figure background).
NODATA_RGB = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class PreviewLayout:
    """Where the scene lies in the preview PNG (all in PNG pixels, origin top left).

    Attributes:
        width: PNG width.
        height: PNG height.
        image_width: Width of the drawn (downsampled) scene.
        image_height: Height of the drawn scene.
        left: Column of the scene's left edge.
        top: Row of the scene's top edge.
        scale: Scene pixels per drawn pixel along each axis (x, y); 1.0 when not downsampled.
    """

    width: int
    height: int
    image_width: int
    image_height: int
    left: int
    top: int
    scale: tuple[float, float]


def preview_layout(width: int, height: int, *, max_size: int = DEFAULT_MAX_SIZE) -> PreviewLayout:
    """Size of the drawn scene and of the PNG for a scene of ``width`` x ``height`` pixels.

    The scene is downsampled so that its longer side is ``max_size`` pixels
    (never upsampled); the PNG adds fixed margins for the title and labels.

    Raises:
        ConfigError: ``max_size`` smaller than 1.
    """
    if int(max_size) != max_size or max_size < 1:
        raise ConfigError(f"preview max_size should be a positive number of pixels, got {max_size!r}")
    factor = max(width, height) / max_size
    if factor <= 1:
        out_w, out_h = int(width), int(height)
    else:
        out_w = max(1, round(width / factor))
        out_h = max(1, round(height / factor))
    return PreviewLayout(
        width=out_w + MARGIN_LEFT_PX + MARGIN_RIGHT_PX,
        height=out_h + MARGIN_TOP_PX + MARGIN_BOTTOM_PX,
        image_width=out_w, image_height=out_h, left=MARGIN_LEFT_PX, top=MARGIN_TOP_PX,
        scale=(width / out_w, height / out_h),
    )


def preview_paths(
    spec: str | os.PathLike[str], scenes: Sequence[str | os.PathLike[str]], *,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Where the preview of each scene goes.

    ``spec`` is a ``.png`` file (one scene only), a template containing
    ``{scene}`` (e.g. ``previews/{scene}.png``), or a folder, which gets
    ``<scene>_preview.png`` files; ``<scene>`` is the scene's name in ``names``
    (default: its file stem).

    Raises:
        OutputError: One ``.png`` file for several scenes.
    """
    names = [source_stem(s) for s in scenes] if names is None else list(names)
    return per_scene_paths(spec, names, kind="preview", extensions=(".png",),
                           what="preview file", template="{scene}")


def _read_scene(
    path: Path, max_size: int
) -> tuple[np.ndarray, np.ndarray, Any, Any, tuple[int, int], PreviewLayout]:
    """The first three bands at the preview size (GDAL averages while reading), and the valid mask."""
    from rasterio.enums import Resampling

    from geoseg.raster_io import open_raster

    with open_raster(path) as src:
        layout = preview_layout(src.width, src.height, max_size=max_size)
        bands = list(range(1, min(src.count, 3) + 1))
        shape = (layout.image_height, layout.image_width)
        # a decimated read: GDAL streams the blocks, the full-resolution scene is never in memory
        resampling = Resampling.average if layout.scale != (1.0, 1.0) else Resampling.nearest
        data = src.read(bands, out_shape=(len(bands), *shape), resampling=resampling, masked=False)
        valid = src.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
        return data, valid, src.crs, src.transform, (src.width, src.height), layout


def _display(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """RGB floats in [0, 1], stretched as every geoseg picture, on the valid pixels only."""
    from geoseg.plots import display_image

    rgb = np.empty((*valid.shape, 3))
    rgb[:] = NODATA_RGB
    if valid.any():
        pixels = np.moveaxis(data, 0, -1)[valid]  # (N, C)
        rgb[valid] = display_image(pixels[None, :, :].astype(np.float64))[0]
    return rgb


def _polygons(polygons: Any, crs: Any) -> "geopandas.GeoSeries":
    """Polygons (a GeoDataFrame/GeoSeries or a vector file) as a GeoSeries in ``crs``.

    Polygons without a CRS are taken to be in ``crs``; with a scene without CRS
    (``crs`` None) they are drawn as they are.
    """
    import geopandas
    from rasterio.crs import CRS

    if polygons is None:
        return geopandas.GeoSeries([])
    if isinstance(polygons, (geopandas.GeoDataFrame, geopandas.GeoSeries)):
        series = polygons.geometry if isinstance(polygons, geopandas.GeoDataFrame) else polygons
        if series.crs is None or crs is None:
            return geopandas.GeoSeries(series.values)
        if CRS.from_wkt(series.crs.to_wkt()) == crs:
            return series
        return series.to_crs(crs.to_wkt())
    from geoseg.vector_io import read_vector

    layer = read_vector(polygons, assume_crs=crs)
    return geopandas.GeoSeries(layer.in_crs(crs) if crs is not None else layer.geometries)


def _outline_paths(geoms: Any, to_axes: Any) -> list[np.ndarray]:
    """Every ring (exterior and holes) of the polygons as an (N, 2) vertex array in axis units."""
    import shapely

    rings: list[np.ndarray] = []
    for geom in shapely.get_parts(np.asarray(geoms, dtype=object)):
        if geom is None or geom.is_empty or geom.geom_type != "Polygon":
            continue
        for ring in (geom.exterior, *geom.interiors):
            rings.append(to_axes(np.asarray(ring.coords)[:, :2]))
    return rings


def _axis_labels(crs: Any) -> tuple[str, str]:
    if crs is None:
        return "x", "y"
    if crs.is_geographic:
        return "longitude (degrees)", "latitude (degrees)"
    units = crs.linear_units or "CRS units"
    return f"x ({units})", f"y ({units})"


def _crs_label(crs: Any) -> str:
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else ("no CRS" if crs is None else "custom CRS")


def write_preview(
    scene_path: str | os.PathLike[str],
    polygons: "geopandas.GeoDataFrame | geopandas.GeoSeries | str | os.PathLike[str] | None",
    out_png: str | os.PathLike[str],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    overwrite: bool = False,
    title: str | None = None,
    publication: Publication | None = None,
) -> Path:
    """Draw the scene, downsampled, with the polygons outlined over it, in the scene CRS.

    The scene is read at the preview size (GDAL averages the pixels while
    reading, so a large scene is never in memory at full resolution) and
    stretched as in every geoseg picture (:func:`geoseg.plots.display_image`,
    nodata white). Polygons in another CRS are reprojected; outlines are drawn
    in :data:`geoseg.plots.ROOF_COLOUR`. Axes are in CRS units for a north-up
    scene (pixel columns and rows for a rotated one). One drawn pixel is one
    PNG pixel; see :func:`preview_layout` for the size and the margins.

    Args:
        scene_path: The georeferenced scene.
        polygons: A GeoDataFrame or GeoSeries (no CRS: the scene's), a vector
            file (a GeoPackage is read from its ``rooftops`` layer), or None
            for no polygons.
        out_png: Output PNG (written atomically).
        max_size: Longest side of the drawn scene in pixels.
        overwrite: Replace an existing ``out_png``.
        title: Title (default: scene name, polygon count and CRS).
        publication: Publish the PNG with this publication's other outputs (when it ends)
            instead of at once.

    Returns:
        The PNG written.

    Raises:
        OutputError: ``out_png`` is the scene or the polygon file, exists without
            ``overwrite`` or cannot be written (disk full, ...).
        ConfigError: ``max_size`` smaller than 1.
        InputFileError: Unreadable scene or polygon file.
        GeoreferenceError: A polygon file without CRS in a scene without CRS.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    from geoseg.plots import DPI, ROOF_COLOUR

    scene = as_source(scene_path)  # a URL stays text
    polygon_file = polygons if isinstance(polygons, (str, os.PathLike)) else None
    check_not_inputs([("--preview", out_png)], [("scene", scene), ("polygon file", polygon_file)])
    out = check_output(out_png, overwrite=overwrite)
    data, valid, crs, transform, (width, height), layout = _read_scene(scene, max_size)
    rgb = _display(data, valid)
    series = _polygons(polygons, crs)
    count = int((~(series.is_empty | series.isna())).sum())

    north_up = transform.b == 0 and transform.d == 0
    if north_up:
        x0, y0 = transform.c, transform.f
        x1, y1 = x0 + transform.a * width, y0 + transform.e * height
        extent = (x0, x1, y1, y0)

        def to_axes(xy: np.ndarray) -> np.ndarray:
            return xy
    else:
        extent = (0, width, height, 0)
        inverse = ~transform

        def to_axes(xy: np.ndarray) -> np.ndarray:
            cols, rows = inverse * (xy[:, 0], xy[:, 1])
            return np.column_stack([cols, rows])

    fig = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((
        layout.left / layout.width,
        1 - (layout.top + layout.image_height) / layout.height,
        layout.image_width / layout.width,
        layout.image_height / layout.height,
    ))
    ax.imshow(rgb, extent=extent, interpolation="nearest", aspect="auto")
    rings = _outline_paths(series.values, to_axes)
    for colour, line_width in ((HALO_COLOUR, HALO_WIDTH_PT), (ROOF_COLOUR, OUTLINE_WIDTH_PT)):
        if rings:
            ax.add_collection(LineCollection(rings, colors=[colour], linewidths=line_width,
                                             capstyle="round", joinstyle="round"))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=LABEL_FONTSIZE)
    xlabel, ylabel = _axis_labels(crs) if north_up else ("column (pixels)", "row (pixels)")
    ax.set_xlabel(xlabel, fontsize=LABEL_FONTSIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_FONTSIZE)
    noun = "polygon" if count == 1 else "polygons"
    ax.set_title(title if title is not None else f"{source_stem(scene)}: {count} {noun} ({_crs_label(crs)})",
                 fontsize=TITLE_FONTSIZE)
    with atomic_output(out, overwrite=overwrite, publication=publication) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    log.info("wrote preview %s (%d x %d px, %d polygons)", out, layout.width, layout.height, count)
    return out

