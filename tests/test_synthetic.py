"""Tests for geoseg.synthetic: the realistic, reproducible scene generator."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS

from geoseg.errors import ConfigError, OutputError
from geoseg.synthetic import ROOF_GAP_PX, instance_ids, make_dataset, make_scene


def _read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile


def _burn(polygons, transform, shape):
    return rasterio.features.rasterize(
        [(p, 255) for p in polygons], out_shape=shape, transform=transform, dtype="uint8"
    )


def test_scene_files_and_georeference(synthetic_scene):
    img, prof = _read(synthetic_scene.image)
    mask, mprof = _read(synthetic_scene.mask)
    assert img.shape == (3, 300, 517) and img.dtype == np.uint8
    assert mask.shape == (1, 300, 517) and mask.dtype == np.uint8
    assert prof["crs"] == CRS.from_epsg(32633) == mprof["crs"]
    assert prof["transform"] == Affine(0.3, 0, 500000.0, 0, -0.3, 4650000.0) == mprof["transform"]
    assert set(np.unique(mask)) == {0, 255}


def test_mask_is_the_rasterised_polygons(synthetic_scene):
    mask, _ = _read(synthetic_scene.mask)
    expected = _burn(synthetic_scene.polygons, synthetic_scene.transform, (300, 517))
    np.testing.assert_array_equal(mask[0], expected)
    # The instance ids are the polygons burnt with their building ids; their union is the mask.
    ids = instance_ids(synthetic_scene)
    assert ids.dtype == np.int32 and ids.shape == (300, 517)
    burnt = rasterio.features.rasterize(
        zip(synthetic_scene.polygons, synthetic_scene.building_ids), out_shape=(300, 517),
        transform=synthetic_scene.transform, dtype="int32",
    )
    np.testing.assert_array_equal(ids, burnt)
    np.testing.assert_array_equal(mask[0], np.where(ids > 0, 255, 0))


def test_roof_geopackage_holds_the_polygons(synthetic_scene):
    gdf = gpd.read_file(synthetic_scene.roofs, layer="roofs")
    assert gdf.crs == CRS.from_epsg(32633)
    assert len(gdf) == len(synthetic_scene.polygons) >= 10
    for got, want in zip(gdf.geometry, synthetic_scene.polygons):
        assert shapely.equals_exact(got, want, tolerance=1e-6)
    assert set(gdf["scene"]) == {"scene"}
    assert set(gdf["roof"]) <= {"gable", "hip", "flat"}
    assert list(gdf["building_id"]) == list(synthetic_scene.building_ids) == list(range(1, len(gdf) + 1))
    assert set(gdf["terrace"]) == {0}  # no terraces unless asked for


def test_roofs_are_valid_inside_apart_and_varied(synthetic_scene):
    polys = synthetic_scene.polygons
    left, top = synthetic_scene.transform @ (0, 0)
    right, bottom = synthetic_scene.transform @ (517, 300)
    scene_box = shapely.box(left, bottom, right, top)
    assert all(p.is_valid and scene_box.contains(p) for p in polys)
    # Non-overlapping, with at least the minimum gap between any two roofs.
    gap = ROOF_GAP_PX * 0.3
    for i, a in enumerate(polys):
        for b in polys[i + 1:]:
            assert a.distance(b) >= gap - 1e-9
    # Rectangles and L-shapes (4 and 6 corners).
    corners = {len(p.exterior.coords) - 1 for p in polys}
    assert corners == {4, 6}
    # Not only axis-aligned: edge directions are spread over angles.
    angles = set()
    for p in polys:
        (x0, y0), (x1, y1) = p.exterior.coords[:2]
        angles.add(round(math.degrees(math.atan2(y1 - y0, x1 - x0)) % 90))
    assert len(angles) >= 4 and any(5 < a < 85 for a in angles)
    # Varied sizes (m²).
    areas = [p.area for p in polys]
    assert max(areas) > 2 * min(areas)


def test_looks_like_a_scene(synthetic_scene):
    img, _ = _read(synthetic_scene.image)
    mask = _read(synthetic_scene.mask)[0][0] > 0
    rgb = img.reshape(3, -1).astype(float)
    # Textured ground (not a flat colour) and roofs of several colours.
    ground = rgb[:, ~mask.ravel()]
    assert ground.std(axis=1).min() > 8
    roof_means = []
    for poly in synthetic_scene.polygons:
        one = _burn([poly], synthetic_scene.transform, (300, 517)) > 0
        roof_means.append(img[:, one].mean(axis=1))
    roof_means = np.array(roof_means)
    assert roof_means.std(axis=0).max() > 20
    # Shading: a roof is not one flat colour.
    assert any(img[:, _burn([p], synthetic_scene.transform, (300, 517)) > 0].std(axis=1).max() > 8
               for p in synthetic_scene.polygons)
    # Dark green tree crowns exist (green clearly above red and blue, and dark).
    r, g, b = rgb
    assert ((g > r + 15) & (g > b + 15) & (g < 90)).sum() > 200
    # Nothing is 0: 0 is reserved for nodata.
    assert img.min() >= 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_scene(tmp_path / "a", width=120, height=90, seed=7)
    b = make_scene(tmp_path / "b", width=120, height=90, seed=7)
    c = make_scene(tmp_path / "c", width=120, height=90, seed=8)
    assert np.array_equal(_read(a.image)[0], _read(b.image)[0])
    assert np.array_equal(_read(a.mask)[0], _read(b.mask)[0])
    assert [p.wkt for p in a.polygons] == [p.wkt for p in b.polygons]
    assert not np.array_equal(_read(a.image)[0], _read(c.image)[0])


def test_render_is_independent_of_block_size(tmp_path, monkeypatch):
    import geoseg.synthetic.scenes as scenes_module

    a = make_scene(tmp_path / "a", width=300, height=270, seed=3)
    monkeypatch.setattr(scenes_module, "RENDER_BLOCK", 128)
    b = make_scene(tmp_path / "b", width=300, height=270, seed=3)
    assert np.array_equal(_read(a.image)[0], _read(b.image)[0])
    assert np.array_equal(_read(a.mask)[0], _read(b.mask)[0])


def test_nodata_border(nodata_scene):
    img, prof = _read(nodata_scene.image)
    mask = _read(nodata_scene.mask)[0][0]
    assert prof["nodata"] == 0
    border = np.ones((280, 300), bool)
    border[12:-12, 12:-12] = False
    assert (img[:, border] == 0).all() and (img[:, ~border] >= 1).all()
    assert (mask[border] == 0).all() and mask.any()


def test_n_roofs_and_other_crs(tmp_path):
    scene = make_scene(tmp_path, width=400, height=300, seed=1, n_roofs=5, crs="EPSG:3857",
                       resolution=0.4, origin=(1_000_000.0, 4_900_000.0))
    assert len(scene.polygons) == 5
    assert _read(scene.image)[1]["crs"] == CRS.from_epsg(3857)
    np.testing.assert_array_equal(
        _read(scene.mask)[0][0], _burn(scene.polygons, scene.transform, (300, 400))
    )


def test_existing_output_is_refused_and_nothing_written(tmp_path):
    (tmp_path / "scene_roofs.gpkg").write_text("keep me")
    with pytest.raises(OutputError, match=r"scene_roofs\.gpkg: already exists; pass --overwrite"):
        make_scene(tmp_path, width=64, height=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene_roofs.gpkg"]
    scene = make_scene(tmp_path, width=64, height=64, overwrite=True)
    assert scene.roofs.stat().st_size > 100


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="scene width should be a positive number of pixels, got 0"):
        make_scene(tmp_path, width=0)
    with pytest.raises(ConfigError, match="crs 'EPSG:0' is not a CRS"):
        make_scene(tmp_path, crs="EPSG:0")
    with pytest.raises(ConfigError, match="layout should be one of"):
        make_dataset(tmp_path, layout="nested")


@pytest.mark.parametrize(
    "layout, image, label",
    [
        ("seed", "images/images/scene_001.tif", "label/label/scene_001_label.tif"),
        ("flat", "images/scene_001.tif", "labels/scene_001.tif"),
        ("vector", "images/scene_001.tif", "masks/scene_001.tif"),
        ("buildings", "images/scene_001.tif", "labels/scene_001.tif"),
    ],
)
def test_make_dataset_layouts(tmp_path, layout, image, label):
    ds = make_dataset(tmp_path, layout=layout, n_scenes=2, width=96, height=80, seed=4)
    assert ds.root == tmp_path and ds.layout == layout and len(ds.scenes) == 2
    assert ds.scenes[1].image == tmp_path / image and ds.scenes[1].mask == tmp_path / label
    assert (tmp_path / image).exists() and (tmp_path / label).exists()
    t0, t1 = ds.scenes[0].transform, ds.scenes[1].transform
    assert t1.c > t0.c + 96 * 0.3  # side by side, not overlapping
    if layout in ("vector", "buildings"):
        gdf = gpd.read_file(ds.vector, layer="roofs" if layout == "vector" else "buildings")
        assert ds.vector.name == ("roofs.gpkg" if layout == "vector" else "buildings.gpkg")
        assert len(gdf) == sum(len(s.polygons) for s in ds.scenes)
        assert list(gdf["scene"]).count("scene_001") == len(ds.scenes[1].polygons)
        assert list(gdf["building_id"]) == [i for s in ds.scenes for i in s.building_ids]
    else:
        assert ds.vector is None


def test_fixtures(seed_dataset, flat_dataset, small_scene):
    assert len(seed_dataset.scenes) == 3
    assert all(s.image.exists() and s.mask.exists() for s in seed_dataset.scenes)
    assert flat_dataset.root.joinpath("labels", "scene_000.tif").exists()
    assert (small_scene.width, small_scene.height) == (200, 150) and small_scene.polygons
