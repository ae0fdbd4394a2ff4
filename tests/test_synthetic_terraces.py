"""Tests for terraces in geoseg.synthetic: touching and nearly touching houses, one polygon per building."""

from __future__ import annotations

import itertools

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.windows import Window

from geoseg.errors import ConfigError
from geoseg.synthetic import TERRACE_GAP_PX, instance_ids, make_dataset, make_scene

RES = 0.3
WIDTH, HEIGHT = 301, 263  # not multiples of 256


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _neighbours(scene, terrace):
    """Consecutive houses of one terrace row, with the distance between them."""
    polys = scene.polygons
    for a in range(len(polys) - 1):
        if terrace[a] and terrace[a] == terrace[a + 1]:
            yield a, a + 1, polys[a].distance(polys[a + 1])


@pytest.fixture(scope="module")
def terraced(tmp_path_factory):
    scene = make_scene(tmp_path_factory.mktemp("terraced"), width=WIDTH, height=HEIGHT, seed=2,
                       resolution=RES, terraces=0.5)
    gdf = gpd.read_file(scene.roofs, layer="roofs")
    return scene, gdf


def test_rows_of_houses_share_walls_or_stand_one_to_three_pixels_apart(terraced):
    scene, gdf = terraced
    terrace = gdf["terrace"].to_numpy()
    assert (terrace == 0).sum() >= 2 and len(set(terrace) - {0}) >= 2  # free-standing roofs and rows
    shared = gaps = 0
    for a, b, d in _neighbours(scene, terrace):
        pa, pb = scene.polygons[a], scene.polygons[b]
        if d == 0:
            common = pa.intersection(pb)
            assert pa.touches(pb) and common.geom_type == "LineString" and common.length > 2.0
            shared += 1
        elif d < 4 * RES:
            assert TERRACE_GAP_PX[0] * RES - 1e-6 <= d <= TERRACE_GAP_PX[1] * RES + 1e-6
            gaps += 1
    assert shared >= 3 and gaps >= 1
    # Houses of different rows, and free-standing roofs, keep the usual distance.
    for a, b in itertools.combinations(range(len(scene.polygons)), 2):
        if not (terrace[a] and terrace[a] == terrace[b]):
            assert scene.polygons[a].distance(scene.polygons[b]) >= 3 * RES - 1e-9


def test_one_valid_polygon_per_building_and_no_overlap(terraced):
    scene, gdf = terraced
    polys = scene.polygons
    assert all(p.is_valid for p in polys)
    assert list(gdf["building_id"]) == list(scene.building_ids) == list(range(1, len(polys) + 1))
    for got, want in zip(gdf.geometry, polys):
        assert shapely.equals_exact(got, want, tolerance=1e-6)
    tree = shapely.STRtree(polys)
    for a, b in zip(*tree.query(polys, predicate="intersects")):
        if a < b:
            assert polys[a].intersection(polys[b]).area == 0
    # Burnt one by one, no pixel belongs to two buildings.
    burns = sum(
        rasterio.features.rasterize([(p, 1)], out_shape=(HEIGHT, WIDTH), transform=scene.transform,
                                    dtype="uint8").astype(np.int32)
        for p in polys
    )
    assert burns.max() == 1


def test_instance_ids_are_the_rasterised_buildings_and_the_mask(terraced):
    scene, gdf = terraced
    ids = instance_ids(scene)
    assert ids.dtype == np.int32 and ids.shape == (HEIGHT, WIDTH)
    burnt = rasterio.features.rasterize(
        zip(gdf.geometry, gdf["building_id"]), out_shape=(HEIGHT, WIDTH), transform=scene.transform,
        dtype="int32",
    )
    np.testing.assert_array_equal(ids, burnt)
    assert set(np.unique(ids)) == {0, *scene.building_ids}  # every building has pixels
    np.testing.assert_array_equal(_read(scene.mask)[0], np.where(ids > 0, 255, 0))
    # Any window (also one reaching beyond the scene) is the same pixels.
    for win in (Window(17, 5, 100, 77), Window(150, 131, 151, 132), Window(250, 200, 80, 90)):
        padded = np.pad(ids, ((0, 100), (0, 100)))
        want = padded[win.row_off:win.row_off + win.height, win.col_off:win.col_off + win.width]
        np.testing.assert_array_equal(instance_ids(scene, win), want)


def test_each_house_looks_like_its_own_roof(terraced):
    scene, gdf = terraced
    img = _read(scene.image).astype(float)
    ids = instance_ids(scene)
    for a, b, d in _neighbours(scene, gdf["terrace"].to_numpy()):
        if d > 0:
            continue
        ia, ib = scene.building_ids[a], scene.building_ids[b]
        mean_a, mean_b = img[:, ids == ia].mean(axis=1), img[:, ids == ib].mean(axis=1)
        assert np.abs(mean_a - mean_b).max() > 6, (a, b, mean_a, mean_b)
        # A darker line along the shared wall: the pixels on the common edge are darker
        # than the houses on either side.
        edge = scene.polygons[a].intersection(scene.polygons[b]).buffer(0.3)
        near = rasterio.features.rasterize([(edge, 1)], out_shape=ids.shape, transform=scene.transform,
                                           dtype="uint8") > 0
        inner_a = (ids == ia) & ~near
        assert img[:, near & (ids == ia)].mean() < img[:, inner_a].mean()


def test_seeded_terraces_give_the_same_bytes_whatever_the_block(tmp_path, monkeypatch):
    import geoseg.synthetic.scenes as scenes_module

    a = make_scene(tmp_path / "a", width=WIDTH, height=HEIGHT, seed=4, terraces=1.0)
    monkeypatch.setattr(scenes_module, "RENDER_BLOCK", 128)
    b = make_scene(tmp_path / "b", width=WIDTH, height=HEIGHT, seed=4, terraces=1.0)
    assert a.image.read_bytes() == b.image.read_bytes()
    assert np.array_equal(_read(a.mask), _read(b.mask))
    assert [p.wkt for p in a.polygons] == [p.wkt for p in b.polygons]
    assert gpd.read_file(a.roofs)["terrace"].max() > 0
    c = make_scene(tmp_path / "c", width=WIDTH, height=HEIGHT, seed=4, terraces=0.0)
    assert set(gpd.read_file(c.roofs)["terrace"]) == {0}
    assert not np.array_equal(_read(a.image), _read(c.image))


def test_n_roofs_counts_terrace_houses(tmp_path):
    scene = make_scene(tmp_path, width=WIDTH, height=HEIGHT, seed=4, terraces=1.0, n_roofs=7)
    assert len(scene.polygons) == 7 and scene.building_ids == tuple(range(1, 8))


def test_buildings_dataset_for_instance_training(tmp_path):
    from geoseg.datasets.pairs import find_pairs

    ds = make_dataset(tmp_path, layout="buildings", n_scenes=2, width=203, height=181, seed=5,
                      terraces=0.7)
    assert ds.layout == "buildings" and ds.vector == tmp_path / "buildings.gpkg"
    assert ds.scenes[1].image == tmp_path / "images" / "scene_001.tif"
    assert ds.scenes[1].mask == tmp_path / "labels" / "scene_001.tif"  # the flat layout of the dev sets
    gdf = gpd.read_file(ds.vector, layer="buildings")
    assert list(gdf["building_id"]) == list(range(1, len(gdf) + 1))  # unique across the file
    assert (gdf["terrace"] > 0).any()
    for scene in ds.scenes:
        rows = gdf[gdf["scene"] == scene.name]
        assert tuple(rows["building_id"]) == scene.building_ids
        burnt = rasterio.features.rasterize(
            zip(rows.geometry, rows["building_id"]), out_shape=(181, 203), transform=scene.transform,
            dtype="int32",
        )
        ids = instance_ids(scene)
        np.testing.assert_array_equal(ids, burnt)
        np.testing.assert_array_equal(_read(scene.mask)[0], np.where(ids > 0, 255, 0))
    # Raster labels as the flat layout; the polygons with data.vector_labels (relative to the root).
    pairs = find_pairs(tmp_path)
    assert [(p.image, p.label) for p in pairs] == [(s.image, s.mask) for s in ds.scenes]
    pairs = find_pairs(tmp_path, layout="flat", vector_labels=ds.vector)
    assert [p.image for p in pairs] == [s.image for s in ds.scenes]
    assert all(p.vector == ds.vector for p in pairs)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "many", True])
def test_bad_terraces(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"terraces should be a fraction from 0 .* got "):
        make_scene(tmp_path, width=64, height=64, terraces=bad)
    assert not any(tmp_path.iterdir())
