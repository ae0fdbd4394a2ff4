"""Write polygons to GeoPackage (with a QGIS default style), GeoJSON, FlatGeobuf or Shapefile.

The format follows the output's extension. Polygons of several scenes go into
one layer (``rooftops``) with a ``scene`` attribute, reprojected to the first
scene's CRS where CRSs differ. Every write is atomic: the file appears at its
final path only when complete (geoseg.publish), and never replaces a file
without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, TypeAlias

from geoseg.errors import OutputError, file_error
from geoseg.publish import Publication, atomic_output, check_output, publishing
from geoseg.temporaries import write_error, write_errors

if TYPE_CHECKING:
    import geopandas
    import pyproj
    import rasterio.crs

    #: A layer's CRS: a GeoDataFrame's (pyproj) or a scene's (rasterio).
    LayerCRS: TypeAlias = "pyproj.CRS | rasterio.crs.CRS"

log = logging.getLogger(__name__)

#: Layer name in a GeoPackage (and FlatGeobuf/GeoJSON layer name).
LAYER = "rooftops"
#: Output drivers by file extension.
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".fgb": "FlatGeobuf",
           ".shp": "ESRI Shapefile"}
#: Shapefile field names are at most 10 characters.
SHAPEFILE_FIELDS = {"perimeter_m": "perim_m"}
#: Files that make up a shapefile.
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
#: The default QGIS style shipped with geoseg.
STYLE_FILE = "rooftops.qml"
STYLE_NAME = "geoseg rooftops"
#: GeoPackage version written (readable without warnings by older GDAL/QGIS).
GPKG_VERSION = "1.2"


def driver_for(path: str | os.PathLike[str]) -> str:
    """OGR driver for an output path, from its extension.

    Raises:
        OutputError: An extension geoseg cannot write.
    """
    p = Path(path)
    driver = DRIVERS.get(p.suffix.lower())
    if driver is None:
        raise file_error(
            OutputError, p, f"has an unknown vector extension {p.suffix!r}",
            "use .gpkg (GeoPackage), .geojson, .fgb (FlatGeobuf) or .shp (Shapefile)",
        )
    return driver


def check_vector_output(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse a vector output that exists (any shapefile part too) or cannot be written.

    Raises:
        OutputError: Unknown extension, existing file without ``overwrite``, unwritable folder.
    """
    p = Path(path)
    driver = driver_for(p)
    check_output(p, overwrite=overwrite)
    if driver == "ESRI Shapefile" and not overwrite:
        for ext in SHAPEFILE_PARTS:
            check_output(p.with_suffix(ext), overwrite=False)
    return p


def default_style() -> str:
    """The QML text of geoseg's default rooftop style (outlined roofs)."""
    return resources.files("geoseg").joinpath(STYLE_FILE).read_text(encoding="utf-8")


def combine_frames(frames: Sequence["geopandas.GeoDataFrame"]) -> "geopandas.GeoDataFrame":
    """One GeoDataFrame from several scenes' polygons, in the first scene's CRS.

    ``id`` is renumbered 1..n over the combined layer.

    Raises:
        ValueError: If ``frames`` is empty.
    """
    import geopandas as gpd
    import pandas as pd

    if not frames:
        raise ValueError("no polygons to combine")
    target = frames[0].crs
    parts = [_in_layer_crs(frame, target) for frame in frames]
    combined = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry="geometry", crs=target)
    if "id" in combined:
        combined["id"] = range(1, len(combined) + 1)
    return combined


def _in_layer_crs(
    frame: "geopandas.GeoDataFrame", target: LayerCRS | None, *, warned: set[str] | None = None,
) -> "geopandas.GeoDataFrame":
    """``frame`` in the layer's CRS ``target`` (the first scene's), with a warning per scene
    reprojected (once per scene when ``warned`` collects the scenes already named)."""
    if frame.crs is None or target is None or frame.crs.equals(target):
        return frame
    scenes = ", ".join(sorted(set(frame["scene"]))) if len(frame) else "a scene"
    if warned is None or scenes not in warned:
        if warned is not None:
            warned.add(scenes)
        log.warning("reprojecting polygons of %s from %s to %s (the first scene's CRS) for one layer",
                    scenes, frame.crs.to_string(), target.to_string())
    return frame.to_crs(target)


def write_polygons(
    frames: "geopandas.GeoDataFrame | Sequence[geopandas.GeoDataFrame]",
    path: str | os.PathLike[str],
    *,
    layer: str = LAYER,
    overwrite: bool = False,
    style: bool = True,
    publication: Publication | None = None,
) -> Path:
    """Write polygons atomically; the format follows the extension.

    GeoPackage: layer ``layer`` with a spatial index and, with ``style``, the
    default QGIS style as the layer's default in ``layer_styles`` (the table
    QGIS itself writes), so it opens as outlined roofs. Shapefile: field names
    shortened to 10 characters (``perimeter_m`` -> ``perim_m``).

    Args:
        frames: One GeoDataFrame or several (combined with :func:`combine_frames`).
        path: Output file (.gpkg, .geojson, .json, .fgb, .shp).
        layer: Layer name.
        overwrite: Replace an existing output.
        style: Store the default QGIS style (GeoPackage only).
        publication: Publish the file(s) with this publication's other outputs (when it
            ends) instead of at once.

    Returns:
        The output path.

    Raises:
        OutputError: Unknown extension, output exists without ``overwrite``, unwritable folder,
            or the write failed (disk full, ...).
    """
    import geopandas as gpd
    import pyogrio

    p = check_vector_output(path, overwrite=overwrite)
    driver = driver_for(p)
    frame = frames if isinstance(frames, gpd.GeoDataFrame) else combine_frames(list(frames))
    kinds = set(frame.geom_type.dropna()) if len(frame) else set()
    geometry_type = "MultiPolygon" if "MultiPolygon" in kinds else "Polygon"
    options: dict[str, object] = {}
    dataset_options: dict[str, object] = {}
    if driver == "GPKG":
        options["SPATIAL_INDEX"] = "YES"
        # GeoPackage 1.2: GDAL 3.10 would write 1.4, which the GDAL of many QGIS installs
        # (e.g. Debian 12's 3.6) opens only with a warning.
        dataset_options["VERSION"] = GPKG_VERSION
    elif driver == "FlatGeobuf":
        options["SPATIAL_INDEX"] = "YES"
    if driver == "ESRI Shapefile":
        frame = frame.rename(columns=SHAPEFILE_FIELDS)
        _write_shapefile(frame, p, layer=layer, geometry_type=geometry_type, overwrite=overwrite,
                         publication=publication)
        return p
    with atomic_output(p, overwrite=overwrite, publication=publication) as tmp:
        pyogrio.write_dataframe(
            frame, tmp, layer=layer, driver=driver, geometry_type=geometry_type,
            promote_to_multi=geometry_type == "MultiPolygon", layer_options=options,
            dataset_options=dataset_options,
        )
        if driver == "GPKG" and style:
            add_layer_style(tmp, layer=layer, qml=default_style())
    log.info("wrote %d polygons to %s (%s)", len(frame), p, driver)
    return p


#: Features per read when a spooled layer is copied into its output.
SPOOL_CHUNK = 20000
#: Features gathered in memory before the spool writes them (one GeoPackage transaction each).
SPOOL_BATCH = 5000


class PolygonSpool:
    """Polygons written to a temporary GeoPackage batch by batch, as scenes produce them.

    The streamed counterpart of collecting every scene's GeoDataFrame and
    calling :func:`write_polygons`: memory holds one batch, not the layer. The
    result is the same layer: one ``rooftops`` layer in the first scene's CRS
    (other CRSs reprojected, with the same warning), ``id`` numbered 1..n in the
    order the polygons came, Polygon or MultiPolygon as :func:`write_polygons`
    decides. :meth:`write` copies the spool into the output in chunks
    (GeoPackage) or, for the other formats, through :func:`write_polygons`.
    """

    def __init__(self, folder: str | os.PathLike[str], *, crs: LayerCRS | None = None) -> None:
        """Start an empty spool in ``folder`` (a temporary folder the caller removes).

        Args:
            folder: Where the spool's GeoPackage is written.
            crs: The layer's CRS (the first scene's); None: the first batch's.
        """
        self.path = Path(folder) / f"spool{os.getpid()}.gpkg"
        self.crs = crs
        self.count = 0
        self.multi = False
        self._template: "geopandas.GeoDataFrame | None" = None
        self._warned: set[str] = set()
        self._pending: list["geopandas.GeoDataFrame"] = []
        self._written = 0  # features in the file; count also holds the pending ones

    def append(self, frame: "geopandas.GeoDataFrame") -> None:
        """Add a batch (columns as :meth:`~geoseg.vectorize.PolygonBuilder.frame`; ``id`` is renumbered)."""
        if self.crs is None:
            self.crs = frame.crs
        frame = _in_layer_crs(frame, self.crs, warned=self._warned)
        if self._template is None:
            self._template = frame.iloc[:0].copy()
        if not len(frame):
            return
        self.multi = self.multi or bool((frame.geom_type == "MultiPolygon").any())
        self._pending.append(frame)
        self.count += len(frame)
        if self.count - self._written >= SPOOL_BATCH:
            self._flush()

    def _flush(self) -> None:
        import geopandas as gpd
        import pandas as pd
        import pyogrio

        if not self._pending:
            return
        frame = gpd.GeoDataFrame(pd.concat(self._pending, ignore_index=True), geometry="geometry", crs=self.crs)
        self._pending = []
        frame["id"] = range(self._written + 1, self._written + len(frame) + 1)
        with write_errors(self.path):
            pyogrio.write_dataframe(frame, self.path, layer=LAYER, driver="GPKG", geometry_type="Unknown",
                                    append=self._written > 0)
        self._written += len(frame)

    def chunks(self, size: int = SPOOL_CHUNK) -> "Iterator[geopandas.GeoDataFrame]":
        """The spooled polygons in order, ``size`` at a time (nothing when empty)."""
        import pyogrio

        self._flush()
        for first in range(1, self.count + 1, size):
            chunk = pyogrio.read_dataframe(self.path, layer=LAYER, where=f"FID >= {first} AND FID < {first + size}")
            yield chunk.set_crs(self.crs, allow_override=True) if self.crs is not None else chunk

    def empty(self) -> "geopandas.GeoDataFrame":
        """An empty layer with the spool's columns and CRS."""
        import geopandas as gpd

        if self._template is not None:
            return self._template.set_crs(self.crs, allow_override=True) if self.crs is not None else self._template
        return gpd.GeoDataFrame({c: [] for c in ("id", "scene", "area_m2", "perimeter_m", "confidence")},
                                geometry=gpd.GeoSeries([], crs=self.crs), crs=self.crs)

    def write(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, style: bool = True,
        publication: Publication | None = None,
    ) -> Path:
        """Write the spooled layer to ``path`` atomically, as :func:`write_polygons` would write it.

        Raises:
            OutputError: As :func:`write_polygons`.
        """
        import geopandas as gpd
        import pandas as pd
        import pyogrio

        p = check_vector_output(path, overwrite=overwrite)
        driver = driver_for(p)
        if driver != "GPKG" or not self.count:  # other formats (no appends everywhere): one frame
            parts = list(self.chunks()) or [self.empty()]
            frame = parts[0] if len(parts) == 1 else gpd.GeoDataFrame(
                pd.concat(parts, ignore_index=True), geometry="geometry", crs=self.crs)
            return write_polygons(frame, p, overwrite=overwrite, style=style, publication=publication)
        geometry_type = "MultiPolygon" if self.multi else "Polygon"
        with atomic_output(p, overwrite=overwrite, publication=publication) as tmp:
            for k, chunk in enumerate(self.chunks()):
                pyogrio.write_dataframe(
                    chunk, tmp, layer=LAYER, driver="GPKG", geometry_type=geometry_type,
                    promote_to_multi=self.multi, append=k > 0,
                    layer_options={"SPATIAL_INDEX": "YES"} if k == 0 else None,
                    dataset_options={"VERSION": GPKG_VERSION} if k == 0 else None,
                )
            if style:
                add_layer_style(tmp, layer=LAYER, qml=default_style())
        log.info("wrote %d polygons to %s (GPKG)", self.count, p)
        return p


def _write_shapefile(
    frame: "geopandas.GeoDataFrame", path: Path, *, layer: str, geometry_type: str, overwrite: bool,
    publication: Publication | None = None,
) -> None:
    """A shapefile is several files: write them in a temporary folder, then publish them together, .shp last."""
    import pyogrio

    with publishing(overwrite=overwrite, into=publication) as pub:
        folder = pub.folder(path.parent, name="shapefile")
        pyogrio.write_dataframe(
            frame, folder / path.name, layer=layer, driver="ESRI Shapefile", geometry_type=geometry_type,
            promote_to_multi=geometry_type == "MultiPolygon",
        )
        for part in sorted(folder.iterdir(), key=lambda f: f.suffix.lower() == ".shp"):
            pub.adopt(part, path.with_suffix(part.suffix))


def add_layer_style(
    gpkg: str | os.PathLike[str],
    *,
    layer: str = LAYER,
    qml: str,
    name: str = STYLE_NAME,
    description: str = "Rooftop outlines (geoseg default)",
) -> None:
    """Store ``qml`` as the default QGIS style of ``layer`` in a GeoPackage.

    The ``layer_styles`` table has the layout QGIS writes itself and is
    registered as an attribute table, so QGIS applies the style when the layer
    is opened.

    Raises:
        OutputError: If the GeoPackage cannot be updated.
    """
    import pandas as pd
    import pyogrio

    geom_col = "geom"
    with contextlib.suppress(Exception):
        geom_col = pyogrio.read_info(gpkg, layer=layer).get("geometry_name") or "geom"
    if "layer_styles" not in [n for n, _ in pyogrio.list_layers(gpkg)]:
        # An empty table through OGR: registered in gpkg_contents with the column types QGIS uses.
        empty = pd.DataFrame({
            "f_table_catalog": pd.Series([], dtype=str), "f_table_schema": pd.Series([], dtype=str),
            "f_table_name": pd.Series([], dtype=str), "f_geometry_column": pd.Series([], dtype=str),
            "styleName": pd.Series([], dtype=str), "styleQML": pd.Series([], dtype=str),
            "styleSLD": pd.Series([], dtype=str), "useAsDefault": pd.Series([], dtype=bool),
            "description": pd.Series([], dtype=str), "owner": pd.Series([], dtype=str),
            "ui": pd.Series([], dtype=str), "update_time": pd.Series([], dtype="datetime64[ms, UTC]"),
        })
        pyogrio.write_dataframe(empty, gpkg, layer="layer_styles", driver="GPKG")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    try:
        with contextlib.closing(sqlite3.connect(os.fspath(gpkg))) as con, con:
            con.execute(
                "UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ? AND f_geometry_column = ?",
                (layer, geom_col),
            )
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, "
                "ui, update_time) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL, ?)",
                (layer, geom_col, name, qml, description, now),
            )
    except sqlite3.Error as exc:
        failed = write_error(exc, gpkg)  # disk full: SQLite says "database or disk is full"
        raise failed or file_error(OutputError, gpkg, f"cannot store the QGIS style ({exc})", "check the file") from None
