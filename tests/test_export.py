"""Tests for geoseg.export: formats by extension, GeoPackage style and index, atomic writes."""

from __future__ import annotations

import logging
import os
import sqlite3

import geopandas as gpd
import pyogrio
import pytest
from shapely.geometry import box

from geoseg.errors import OutputError
from geoseg.export import add_layer_style, combine_frames, default_style, write_polygons

QGIS_STYLE_COLUMNS = [
    "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column", "styleName", "styleQML",
    "styleSLD", "useAsDefault", "description", "owner", "ui", "update_time",
]


def _frame(scene: str = "a", crs: str = "EPSG:32633", x0: float = 500000.0, n: int = 3) -> gpd.GeoDataFrame:
    geoms = [box(x0 + 10 * i, 4650000.0, x0 + 10 * i + 5, 4650004.0) for i in range(n)]
    return gpd.GeoDataFrame(
        {"id": list(range(1, n + 1)), "scene": [scene] * n, "area_m2": [20.0] * n,
         "perimeter_m": [18.0] * n, "confidence": [0.9] * n},
        geometry=geoms, crs=crs,
    )


def test_geopackage_has_layer_spatial_index_and_default_qgis_style(tmp_path):
    out = write_polygons(_frame(), tmp_path / "roofs.gpkg")
    assert [name for name, _ in pyogrio.list_layers(out)] == ["rooftops", "layer_styles"]
    back = gpd.read_file(out, layer="rooftops")
    assert len(back) == 3 and back.crs == "EPSG:32633"
    assert back.geometry.equals(_frame().geometry)
    with sqlite3.connect(out) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "rtree_rooftops_geom" in tables
        cols = [r[1] for r in con.execute("PRAGMA table_info(layer_styles)")]
        assert [c for c in cols if c not in ("fid", "id")] == QGIS_STYLE_COLUMNS
        row = con.execute(
            "SELECT f_table_name, f_geometry_column, styleName, styleQML, useAsDefault FROM layer_styles"
        ).fetchall()
        contents = dict(con.execute("SELECT table_name, data_type FROM gpkg_contents").fetchall())
    assert row == [("rooftops", "geom", "geoseg rooftops", default_style(), 1)]
    assert contents == {"rooftops": "features", "layer_styles": "attributes"}
    qml = default_style()
    assert 'class="SimpleFill"' in qml and 'name="style"' in qml and 'value="no"' in qml


def test_second_style_becomes_the_only_default(tmp_path):
    out = write_polygons(_frame(), tmp_path / "roofs.gpkg")
    add_layer_style(out, qml="<qgis/>", name="other")
    with sqlite3.connect(out) as con:
        rows = con.execute("SELECT styleName, useAsDefault FROM layer_styles ORDER BY 1").fetchall()
    assert rows == [("geoseg rooftops", 0), ("other", 1)]


@pytest.mark.parametrize("ext,driver", [(".geojson", "GeoJSON"), (".fgb", "FlatGeobuf"),
                                        (".shp", "ESRI Shapefile")])
def test_other_formats_by_extension(tmp_path, ext, driver):
    out = write_polygons(_frame(), tmp_path / f"roofs{ext}")
    info = pyogrio.read_info(out)
    assert info["driver"] == driver and info["features"] == 3
    back = gpd.read_file(out).sort_values("id", ignore_index=True)  # FlatGeobuf's index reorders
    assert back.crs == "EPSG:32633"
    assert back.geometry.geom_equals(_frame().geometry).all()  # shapefile rings run clockwise
    expected = {"id", "scene", "area_m2", "confidence", "geometry"}
    expected |= {"perim_m"} if ext == ".shp" else {"perimeter_m"}
    assert set(back.columns) == expected
    if ext == ".shp":
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"roofs{e}" for e in (".cpg", ".dbf", ".prj", ".shp", ".shx")]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"roofs{ext}"]


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(OutputError) as err:
        write_polygons(_frame(), tmp_path / "roofs.kml")
    assert str(err.value) == (
        f"{tmp_path / 'roofs.kml'}: has an unknown vector extension '.kml'; "
        "use .gpkg (GeoPackage), .geojson, .fgb (FlatGeobuf) or .shp (Shapefile)"
    )


@pytest.mark.parametrize("name", ["roofs.gpkg", "roofs.shp"])
def test_existing_output_needs_overwrite(tmp_path, name):
    write_polygons(_frame(), tmp_path / name)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_polygons(_frame(n=1), tmp_path / name)
    write_polygons(_frame(n=1), tmp_path / name, overwrite=True)
    assert pyogrio.read_info(tmp_path / name, layer="rooftops" if name.endswith(".gpkg") else 0)["features"] == 1


def test_several_scenes_one_layer_reprojected_to_the_first_crs(tmp_path, caplog):
    a = _frame("a")
    b = _frame("b").to_crs("EPSG:3857")
    with caplog.at_level(logging.INFO, logger="geoseg.export"):
        combined = combine_frames([a, b])
    assert "reprojecting polygons of b from EPSG:3857 to EPSG:32633" in caplog.text
    assert combined.crs == "EPSG:32633"
    assert list(combined["id"]) == [1, 2, 3, 4, 5, 6]
    assert list(combined["scene"]) == ["a"] * 3 + ["b"] * 3
    assert combined.geometry.iloc[3].symmetric_difference(a.geometry.iloc[0]).area < 1e-6
    out = write_polygons([a, b], tmp_path / "all.gpkg")
    assert pyogrio.read_info(out, layer="rooftops")["features"] == 6


def test_empty_layer_keeps_crs_and_columns(tmp_path):
    empty = _frame().iloc[0:0]
    out = write_polygons(empty, tmp_path / "empty.gpkg")
    info = pyogrio.read_info(out, layer="rooftops")
    assert info["features"] == 0 and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == ["id", "scene", "area_m2", "perimeter_m", "confidence"]
    assert gpd.read_file(out, layer="rooftops").crs == "EPSG:32633"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real = pyogrio.write_dataframe

    def half_then_fail(df, path, **kwargs):
        real(df, path, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(pyogrio, "write_dataframe", half_then_fail)
    for name in ("roofs.gpkg", "roofs.shp"):
        with pytest.raises(RuntimeError, match="disk full"):
            write_polygons(_frame(), tmp_path / name)
    assert os.listdir(tmp_path) == []
