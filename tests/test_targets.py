"""Tests for geoseg.targets and VectorLabels' instance rasterisation: exact border and contact pixels."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS

from geoseg.errors import ConfigError
from geoseg.labels import VectorLabels
from geoseg.targets import check_target, disk, instance_targets, padding_px, widths_in_pixels


def _grid(text: str) -> np.ndarray:
    """A 0/1 array from rows of '.' (0) and '#' (1)."""
    return np.array([[c == "#" for c in row] for row in text.split()], dtype=np.uint8)


def _two_rectangles(gap: int) -> np.ndarray:
    """Two 4 x 6 px buildings on rows 2-5, ``gap`` columns apart (0: touching), in a 8 x 18 array."""
    ids = np.zeros((8, 18), np.int32)
    ids[2:6, 2:8] = 1
    ids[2:6, 8 + gap:14 + gap] = 2
    return ids


def _naive(ids: np.ndarray, border_px: float, contact_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The definition, pixel by pixel (slow, for checking)."""
    h, w = ids.shape
    border = np.zeros((h, w), np.uint8)
    contact = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            near_b, near_c = set(), set()
            for yy in range(h):
                for xx in range(w):
                    d2 = (yy - y) ** 2 + (xx - x) ** 2
                    if d2 <= border_px**2:
                        near_b.add(int(ids[yy, xx]))
                    if d2 <= contact_px**2 and ids[yy, xx] > 0:
                        near_c.add(int(ids[yy, xx]))
            border[y, x] = ids[y, x] > 0 and near_b != {int(ids[y, x])}
            contact[y, x] = len(near_c) >= 2
    return border, contact


def test_disk_is_the_offsets_within_the_radius():
    np.testing.assert_array_equal(disk(1), _grid(".#. ### .#."))
    np.testing.assert_array_equal(disk(1.5), np.ones((3, 3), np.uint8))
    np.testing.assert_array_equal(disk(2), _grid("..#.. .###. ##### .###. ..#.."))
    np.testing.assert_array_equal(disk(0.5), np.ones((1, 1), np.uint8))
    with pytest.raises(ValueError, match="radius should be"):
        disk(-1)


def test_two_touching_rectangles():
    ids = _two_rectangles(gap=0)
    border, contact = instance_targets(ids, border_px=1, contact_px=1)
    np.testing.assert_array_equal(border, _grid("""
        ..................
        ..................
        ..############....
        ..#....##....#....
        ..#....##....#....
        ..############....
        ..................
        ..................
    """))
    # the cross of radius 1 sees both buildings only on the two columns of the shared wall
    np.testing.assert_array_equal(contact, _grid("""
        ..................
        ..................
        .......##.........
        .......##.........
        .......##.........
        .......##.........
        ..................
        ..................
    """))
    # radius 1.5 takes the diagonals: one row more above and below the wall, outside both buildings
    border, contact = instance_targets(ids, border_px=2, contact_px=1.5)
    np.testing.assert_array_equal(contact, _grid("""
        ..................
        .......##.........
        .......##.........
        .......##.........
        .......##.........
        .......##.........
        .......##.........
        ..................
    """))
    # border 2 px: two rings, so a 4-row building is all border
    np.testing.assert_array_equal(border, (ids > 0).astype(np.uint8))
    assert border.dtype == contact.dtype == np.uint8


def test_a_gap_of_two_pixels():
    ids = _two_rectangles(gap=2)
    # 1.5 px reaches one building from each gap pixel, never both: no contact
    border, contact = instance_targets(ids, border_px=1, contact_px=1.5)
    assert not contact.any()
    np.testing.assert_array_equal(border[2], _grid("..######..######..")[0])
    # 2 px reaches both buildings from the two gap columns only
    _, contact = instance_targets(ids, border_px=1, contact_px=2)
    np.testing.assert_array_equal(contact, _grid("""
        ..................
        ..................
        ........##........
        ........##........
        ........##........
        ........##........
        ..................
        ..................
    """))


def test_matches_the_definition_on_random_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=(9, 11)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.4] = 0
    for border_px, contact_px in ((1, 1), (1.5, 2.3), (2, 0.5), (3, 3)):
        border, contact = instance_targets(ids, border_px=border_px, contact_px=contact_px)
        want_b, want_c = _naive(ids, border_px, contact_px)
        np.testing.assert_array_equal(border, want_b)
        np.testing.assert_array_equal(contact, want_c)
    # ids too large for uint16 give the same maps
    big = np.where(ids > 0, ids + 100_000, 0)
    for a, b in zip(instance_targets(big, border_px=1.5, contact_px=2),
                    instance_targets(ids, border_px=1.5, contact_px=2)):
        np.testing.assert_array_equal(a, b)


def test_the_array_edge_is_not_a_boundary_and_empty_input():
    ids = np.ones((5, 5), np.int32)  # one building filling the array
    border, contact = instance_targets(ids, border_px=2, contact_px=2)
    assert not border.any() and not contact.any()
    zero = np.zeros((4, 3), np.int32)
    assert all(not m.any() and m.shape == (4, 3) for m in instance_targets(zero, border_px=1, contact_px=1))
    with pytest.raises(ValueError, match="ids should be >= 0"):
        instance_targets(zero - 1, border_px=1, contact_px=1)
    with pytest.raises(ValueError, match="2-D"):
        instance_targets(np.zeros((2, 2, 2), np.int32), border_px=1, contact_px=1)


def test_widths_in_pixels_and_their_errors():
    assert widths_in_pixels(border_width=0.5, contact_width=1.0, resolution=0.25, path="a.tif") == (2.0, 4.0)
    assert widths_in_pixels(border_width=0.3, contact_width=0.3, resolution=0.3, path="a.tif") == (1.0, 1.0)
    with pytest.raises(ConfigError) as err:
        widths_in_pixels(border_width=0.05, contact_width=1.0, resolution=0.1493, path="scene.tif")
    assert str(err.value) == (
        "model.border_width 0.05 m is less than one pixel (0.149 m) of scene.tif; set it to at least 0.15")
    with pytest.raises(ConfigError) as err:
        widths_in_pixels(border_width=0.5, contact_width=0.2, resolution=0.3, path="b.tif")
    assert str(err.value) == (
        "model.contact_width 0.2 m is less than one pixel (0.3 m) of b.tif; set it to at least 0.3")
    assert padding_px(1.7, 3.33) == 4 and padding_px(2.0, 1.0) == 2


def test_check_target():
    check_target("footprint", classes=5)
    check_target("instances", classes=2)
    with pytest.raises(ConfigError) as err:
        check_target("instances", classes=3)
    assert str(err.value) == (
        "model.target=instances needs binary building labels (data.classes 2, no class column), got "
        "data.classes 3; train multi-class data with model.target=footprint")
    with pytest.raises(ConfigError, match="model.target should be 'footprint' or 'instances', got 'blobs'"):
        check_target("blobs", classes=2)


# ---- instance ids from vector labels

CRS_UTM = CRS.from_epsg(32633)
SCENE = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


def _box(r0: int, c0: int, r1: int, c1: int) -> shapely.Polygon:
    """The polygon covering pixels rows r0..r1-1, columns c0..c1-1 of SCENE."""
    x0, y0 = SCENE @ (c0, r0)
    x1, y1 = SCENE @ (c1, r1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture
def terrace(tmp_path) -> VectorLabels:
    """Three houses in a row on a 30 x 40 px grid: A and B share a wall at column 20, C stands 1 px off B."""
    path = tmp_path / "terrace.gpkg"
    polygons = [_box(10, 8, 18, 20), _box(10, 20, 18, 29), _box(10, 30, 18, 36)]
    gpd.GeoDataFrame({"geometry": polygons}, crs="EPSG:32633").to_file(path, layer="buildings")
    return VectorLabels(path)


def test_rasterize_instances_gives_one_id_per_polygon(terrace):
    ids = terrace.rasterize_instances(crs=CRS_UTM, transform=SCENE, shape=(30, 40))
    assert ids.dtype == np.int32 and ids.shape == (30, 40)
    assert (ids[10:18, 8:20] == 1).all() and (ids[10:18, 20:29] == 2).all() and (ids[10:18, 30:36] == 3).all()
    assert (ids > 0).sum() == 8 * (12 + 9 + 6)
    np.testing.assert_array_equal(ids > 0, terrace.rasterize(crs=CRS_UTM, transform=SCENE, shape=(30, 40)) == 1)
    # padding: the same pixel centres, more of them
    padded = terrace.rasterize_instances(crs=CRS_UTM, transform=SCENE @ Affine.translation(5, 5),
                                         shape=(10, 10), pad=5)
    np.testing.assert_array_equal(padded > 0, ids[0:20, 0:20] > 0)
    with pytest.raises(ValueError, match="pad should be"):
        terrace.rasterize_instances(crs=CRS_UTM, transform=SCENE, shape=(3, 3), pad=-1)
    assert terrace.count(CRS_UTM, (499_000, 3_999_000, 499_100, 3_999_100)) == 0
    assert terrace.count(CRS_UTM, (500_000, 3_999_985, 500_020, 4_000_000)) == 3


def test_chip_targets_see_the_buildings_beyond_the_chip_edge(terrace):
    border_px, contact_px = 2.0, 2.5
    whole = terrace.rasterize_instances(crs=CRS_UTM, transform=SCENE, shape=(30, 40))
    want_border, want_contact = instance_targets(whole, border_px=border_px, contact_px=contact_px)
    # a chip whose right edge is the shared wall of A and B: B is outside it
    rows, cols = slice(6, 22), slice(4, 20)
    chip = SCENE @ Affine.translation(cols.start, rows.start)
    ids, targets = terrace.rasterize_targets(crs=CRS_UTM, transform=chip, shape=(16, 16),
                                             border_px=border_px, contact_px=contact_px)
    assert targets.shape == (2, 16, 16) and targets.dtype == np.uint8
    np.testing.assert_array_equal(ids > 0, whole[rows, cols] > 0)
    np.testing.assert_array_equal(targets[0], want_border[rows, cols])
    np.testing.assert_array_equal(targets[1], want_contact[rows, cols])
    # B's wall makes contact and border in A's last columns, inside the chip
    assert targets[1][4:12, 14:16].all() and targets[0][4:12, 14:16].all()
    # without padding the chip would not know B
    _, alone = instance_targets(whole[rows, cols], border_px=border_px, contact_px=contact_px)
    assert not alone.any()
    # a chip cut through the middle of A: no border along the cut
    mid = SCENE @ Affine.translation(14, 0)
    _, t = terrace.rasterize_targets(crs=CRS_UTM, transform=mid, shape=(30, 4), border_px=1, contact_px=1)
    assert not t[0][12:16, 0].any()
