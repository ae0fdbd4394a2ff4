"""Tests for geoseg.labels: value mapping and checks, grid checks, vector labels per chip."""

from __future__ import annotations

import pickle

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.errors import GeoreferenceError, InputFileError, LabelError
from geoseg.labels import (
    IGNORE_INDEX,
    VectorLabels,
    check_label_grid,
    open_label_raster,
    resolve_label_values,
    same_grid,
    to_class_ids,
)
from geoseg.raster_io import open_scene

UTM = CRS.from_epsg(32633)


def _write(path, arr, *, crs=UTM, transform, nodata=None):
    arr = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(path, "w", driver="GTiff", count=arr.shape[0], height=arr.shape[1],
                       width=arr.shape[2], dtype=arr.dtype, crs=crs, transform=transform,
                       nodata=nodata) as dst:
        dst.write(arr)
    return path


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1)


# ---- values


@pytest.mark.parametrize(
    "values, classes, mode, expected",
    [
        ([0, 255], 2, "auto", "binary255"),
        ([0], 2, "auto", "binary255"),
        ([0, 1], 2, "auto", "classes"),
        ([0, 1, 255], 2, "auto", "classes"),
        ([0, 1, 2], 3, "auto", "classes"),
        ([0, 1], 2, "binary01", "binary01"),
        ([255], 2, "binary255", "binary255"),
    ],
)
def test_resolve_label_values(values, classes, mode, expected):
    assert resolve_label_values(values, classes=classes, label_values=mode) == expected


def test_values_outside_the_allowed_set():
    with pytest.raises(LabelError) as err:
        resolve_label_values([0, 3, 7, 255], classes=2, path="lab.tif")
    assert str(err.value) == (
        "lab.tif: has label values 3, 7 outside the allowed set {0, 255} (0/255 binary) or "
        "{0, 1} (0/1 binary); recode the labels, or set data.classes / data.label_values to match them"
    )
    with pytest.raises(LabelError, match=r"lab\.tif: has label values 255 outside the allowed set "
                                         r"\{0, 1\} \(0/1 binary\)"):
        resolve_label_values([0, 1, 255], label_values="binary01", path="lab.tif")
    with pytest.raises(LabelError, match=r"has label values 4 outside the allowed set \{0, 255\} "
                                         r"\(0/255 binary\) or class ids 0\.\.3"):
        resolve_label_values([0, 4], classes=4, path="lab.tif")


def test_to_class_ids():
    raw = np.array([[0, 255], [255, 0]], np.uint8)
    np.testing.assert_array_equal(to_class_ids(raw, mode="binary255"), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(to_class_ids(raw, mode="classes"), raw)  # 255 = ignore
    raw3 = np.array([[0, 1, 2, 9]], np.uint8)
    np.testing.assert_array_equal(to_class_ids(raw3, mode="classes", classes=3, nodata=9),
                                  [[0, 1, 2, IGNORE_INDEX]])
    with pytest.raises(LabelError, match=r"x\.tif: has label values 9 outside"):
        to_class_ids(raw3, mode="classes", classes=3, path="x.tif")
    with pytest.raises(LabelError, match=r"x\.tif: has non-integer label values such as 0\.5"):
        to_class_ids(np.array([[0.0, 0.5]]), mode="classes", path="x.tif")


# ---- grids


def test_grid_check_names_both_grids(synthetic_scene, tmp_path):
    image = open_scene(synthetic_scene.image)
    mask = _read(synthetic_scene.mask)
    shifted = _write(tmp_path / "shifted.tif", mask,
                     transform=synthetic_scene.transform @ Affine.translation(1, 0))
    with pytest.raises(LabelError) as err:
        open_label_raster(shifted, image)
    assert str(err.value) == (
        f"{shifted}: label grid (EPSG:32633, 517x300 px, origin (500000, 4.65e+06), pixel (0.3, -0.3)) "
        f"differs from the grid of image {synthetic_scene.image} "
        "(EPSG:32633, 517x300 px, origin (500000, 4.65e+06), pixel (0.3, -0.3)); "
        "resample the label onto the image grid (e.g. gdalwarp -te/-ts/-t_srs of the image)"
    )
    smaller = _write(tmp_path / "smaller.tif", mask[:-1], transform=synthetic_scene.transform)
    with pytest.raises(LabelError, match=r"smaller\.tif: label grid \(EPSG:32633, 517x299 px"):
        open_label_raster(smaller, image)
    other_crs = _write(tmp_path / "crs.tif", mask, crs=CRS.from_epsg(32632),
                       transform=synthetic_scene.transform)
    with pytest.raises(LabelError, match=r"crs\.tif: label grid \(EPSG:32632, "):
        check_label_grid(image, open_scene(other_crs))


def test_grid_tolerance():
    t = Affine(0.3, 0, 500000, 0, -0.3, 4650000)
    nudged = Affine(0.3 + 1e-9, 0, 500000 + 0.001, 0, -0.3, 4650000)
    assert same_grid(UTM, t, (300, 517), UTM, nudged, (300, 517))
    assert not same_grid(UTM, t, (300, 517), UTM, t @ Affine.translation(0.1, 0), (300, 517))
    assert not same_grid(UTM, t, (300, 517), UTM, t, (300, 516))
    assert not same_grid(UTM, t, (300, 517), None, t, (300, 517))


def test_open_label_raster(synthetic_scene, tmp_path):
    image = open_scene(synthetic_scene.image)
    info, mode = open_label_raster(synthetic_scene.mask, image)
    assert mode == "binary255" and info.path == synthetic_scene.mask
    # A label without CRS on the image grid takes the image's CRS.
    nocrs = _write(tmp_path / "nocrs.tif", _read(synthetic_scene.mask), crs=None,
                   transform=synthetic_scene.transform)
    assert open_label_raster(nocrs, image)[0].crs == UTM
    bad = _read(synthetic_scene.mask).copy()
    bad[0, 0], bad[1, 1] = 7, 100
    badp = _write(tmp_path / "bad.tif", bad, transform=synthetic_scene.transform)
    with pytest.raises(LabelError, match=r"bad\.tif: has label values 7, 100 outside the allowed set"):
        open_label_raster(badp, image)
    two = _write(tmp_path / "two.tif", np.stack([bad, bad]), transform=synthetic_scene.transform)
    with pytest.raises(LabelError, match=r"two\.tif: has 2 bands, a label raster should have 1"):
        open_label_raster(two, image)


# ---- vector labels


def _reprojected_burn(polygons_4326, crs, transform, shape):
    gs = gpd.GeoSeries(polygons_4326, crs="EPSG:4326").to_crs(crs)
    return rasterio.features.rasterize([(g, 1) for g in gs], out_shape=shape, transform=transform,
                                       fill=0, dtype="uint8")


def test_vector_in_another_crs_is_reprojected(synthetic_scene, tmp_path):
    roofs = gpd.read_file(synthetic_scene.roofs, layer="roofs")
    in_4326 = roofs.to_crs("EPSG:4326")
    path = tmp_path / "roofs_4326.geojson"
    in_4326.to_file(path, driver="GeoJSON")
    labels = VectorLabels(path)
    assert labels.crs == CRS.from_epsg(4326) and len(labels) == len(roofs)
    info = open_scene(synthetic_scene.image)
    window = Window(200, 40, 256, 256)
    got = labels.rasterize_window(info, window)
    t = info.window_transform(window)
    stored = gpd.read_file(path).geometry  # what the file holds, exactly
    np.testing.assert_array_equal(got, _reprojected_burn(list(stored), UTM, t, (256, 256)))
    # ... and that is the raster mask up to a few boundary pixels (reprojection round trip).
    mask = _read(synthetic_scene.mask)[40:296, 200:456] // 255
    assert got.sum() > 1000 and (got != mask).sum() <= 20
    # The whole scene in the scene CRS from the GeoPackage is exactly the mask.
    same = VectorLabels(synthetic_scene.roofs)
    np.testing.assert_array_equal(
        same.rasterize(crs=UTM, transform=synthetic_scene.transform, shape=(300, 517)),
        _read(synthetic_scene.mask) // 255,
    )


def test_vector_class_column_and_filtering(tmp_path):
    polys = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]
    gdf = gpd.GeoDataFrame({"kind": [1, 2]}, geometry=polys, crs="EPSG:32633")
    extra = gpd.GeoDataFrame({"kind": [1]}, geometry=[shapely.Point(5, 5)], crs="EPSG:32633")
    path = tmp_path / "classes.gpkg"
    gpd.GeoDataFrame(pd_concat([gdf, extra]), crs="EPSG:32633").to_file(path, layer="b")
    labels = VectorLabels(path, class_column="kind", classes=3)
    assert len(labels) == 2  # the point is ignored
    burn = labels.rasterize(crs=UTM, transform=Affine(1, 0, 0, 0, -1, 10), shape=(10, 30))
    assert (burn[:, :10] == 1).all() and (burn[:, 10:20] == 0).all() and (burn[:, 20:] == 2).all()
    with pytest.raises(LabelError) as err:
        VectorLabels(path, class_column="kind", classes=2)
    assert str(err.value) == (
        f"{path}: has 'kind' values 2 outside the class ids 1..1; recode the classes or set data.classes"
    )
    with pytest.raises(LabelError, match=r"has no attribute 'cls' \(attributes: kind\)"):
        VectorLabels(path, class_column="cls")
    # Pickles for DataLoader workers and still works after.
    again = pickle.loads(pickle.dumps(labels))
    np.testing.assert_array_equal(
        again.rasterize(crs=UTM, transform=Affine(1, 0, 0, 0, -1, 10), shape=(10, 30)), burn
    )


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_vector_errors(tmp_path):
    missing = tmp_path / "none.gpkg"
    with pytest.raises(InputFileError) as err:
        VectorLabels(missing)
    assert str(err.value) == f"{missing}: file does not exist; check the path"
    junk = tmp_path / "junk.geojson"
    junk.write_text("not json at all")
    with pytest.raises(InputFileError) as err:
        VectorLabels(junk)
    msg = str(err.value)
    assert msg.startswith(f"{junk}: is not a vector file GDAL can read (")
    assert msg.endswith("; pass a GeoPackage, GeoJSON or Shapefile of label polygons")
    nocrs = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)]).to_file(nocrs)
    with pytest.raises(GeoreferenceError) as err:
        VectorLabels(nocrs)
    assert str(err.value) == (
        f"{nocrs}: has no CRS; set one (ogr2ogr -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX"
    )
    assert VectorLabels(nocrs, assume_crs="EPSG:32633").crs == UTM


def test_empty_vector_file_burns_background(tmp_path):
    path = tmp_path / "empty.gpkg"
    gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs="EPSG:32633")).to_file(path)
    labels = VectorLabels(path)
    assert len(labels) == 0
    out = labels.rasterize(crs=UTM, transform=Affine(1, 0, 0, 0, -1, 0), shape=(4, 5))
    assert out.shape == (4, 5) and not out.any()
