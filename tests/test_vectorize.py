"""Tests for geoseg.vectorize: streamed polygonisation, exact merges, metres in any CRS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from shapely.geometry import Polygon, box

from _prediction_helpers import geodesic_area
from geoseg.errors import GeoreferenceError
from geoseg.vectorize import StripPolygonizer, mask_to_polygons, polygons_to_frame

UTM = "EPSG:32633"
T_UTM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0)


def _write(path, array, *, crs=UTM, transform=T_UTM, nodata=255):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                       dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array, 1)
    return path


def _px_box(t: Affine, col0: int, row0: int, col1: int, row1: int) -> Polygon:
    """The CRS rectangle of pixels [col0, col1) x [row0, row1), computed as a user would."""
    return box(*(t @ (col0, row1)), *(t @ (col1, row0)))


def _ring_mask() -> np.ndarray:
    mask = np.zeros((60, 80), np.uint8)
    mask[5:45, 10:50] = 1
    mask[15:35, 20:40] = 0  # courtyard: a hole
    mask[50:55, 60:65] = 1
    mask[30:31, 70:71] = 1  # one pixel
    mask[40, 60] = mask[41, 61] = 1  # diagonal neighbours: two objects with 4-connectivity
    return mask


@pytest.mark.parametrize("strip_pixels", [1, 80 * 7, 80 * 60])
def test_strips_merge_into_exact_polygons_with_holes(tmp_path, strip_pixels):
    mask = _ring_mask()
    path = _write(tmp_path / "mask.tif", mask)
    gdf = mask_to_polygons(path, strip_pixels=strip_pixels)
    assert gdf.is_valid.all() and gdf.crs == rasterio.crs.CRS.from_string(UTM)
    assert len(gdf) == 5
    ring = _px_box(T_UTM, 10, 5, 50, 45).difference(_px_box(T_UTM, 20, 15, 40, 35))
    big = gdf.geometry[gdf.area.argmax()]
    assert len(big.interiors) == 1
    assert big.symmetric_difference(ring).area == 0
    assert list(gdf["id"]) == [1, 2, 3, 4, 5]
    assert set(gdf["scene"]) == {"mask"}
    np.testing.assert_allclose(sorted(gdf["area_m2"])[:3], [0.25 / 0.9996**2] * 3, rtol=1e-4)
    assert gdf["confidence"].isna().all()  # no probability raster given


def _polygons_in_strips(mask: np.ndarray, rows: int, **kwargs) -> tuple[list[shapely.Geometry], StripPolygonizer]:
    poly = StripPolygonizer(width=mask.shape[1], height=mask.shape[0], classes=(1, 2), **kwargs)
    records = []
    for r0 in range(0, mask.shape[0], rows):
        poly.add_strip(r0, mask[r0:r0 + rows])
        records += poly.take_finished()
    records += poly.finish()
    return [r.geometry for r in sorted(records, key=lambda r: (r.cls, r.count))], poly


@pytest.mark.parametrize("max_pixels, retraced", [(1 << 23, 1), (100, 0)])
def test_a_component_in_many_strips_is_traced_whole_from_the_mask(monkeypatch, max_pixels, retraced):
    """Components spanning 4 strips or more are traced again from the mask under their box (unless the box is
    too big): the very polygon of the whole mask traced at once (holes, a neighbour of another class in a hole,
    a diagonal touch), with no vertex the strips added; fewer pieces are joined by union, equal as geometry."""
    from geoseg.vectorize import strips

    monkeypatch.setattr(strips, "RETRACE_MAX_PIXELS", max_pixels)
    mask = np.zeros((40, 30), np.uint8)
    mask[2:38, 3:27] = 1  # a tall ring: 10 strips of 4 rows
    mask[8:14, 8:20] = 0  # two courtyards
    mask[20:32, 10:22] = 0
    mask[24:28, 14:18] = 2  # another class inside the second one
    mask[5:9, 28] = 1  # a short piece of class 1 off to the side: 1 strip
    mask[1, 2] = 1  # touching the ring diagonally only: its own object
    want, _ = _polygons_in_strips(mask, 40)  # one strip: traced whole
    got, poly = _polygons_in_strips(mask, 4, mask_window=lambda w: mask[
        int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)])
    assert poly.retraced == retraced
    assert len(got) == len(want) == 4
    assert all(g.equals(w) for g, w in zip(got, want))
    ring = max(got, key=lambda g: g.area)
    assert len(ring.interiors) == 2 and ring.area == 36 * 24 - 6 * 12 - 12 * 12
    if retraced:  # traced whole: the same vertices as tracing the whole mask
        assert shapely.normalize(ring).equals_exact(shapely.normalize(max(want, key=lambda g: g.area)), 0)


@pytest.mark.parametrize("seed", range(4))
def test_strip_pieces_joined_as_a_coverage_equal_their_plain_union(seed):
    """A component's pieces are joined by a coverage union of their outlines (split where the other side's
    vertices lie) and their holes added back: vertex for vertex the plain union of the pieces (normalised),
    on blob masks whose holes lie inside strips, across strip lines (holes only of the union) and hold
    islands; and the same area as one strip."""
    from scipy import ndimage

    from geoseg.vectorize.strips import union_of_strip_pieces

    rng = np.random.default_rng(seed)
    mask = (ndimage.gaussian_filter(rng.random((90, 70)), 1.5) > 0.47).astype(np.uint8)
    mask[0], mask[:, 0] = 1, 1  # one frame-like component that spans every strip
    got, _ = _polygons_in_strips(mask, 7)  # union without a mask to trace again from
    whole, _ = _polygons_in_strips(mask, 90)
    joined = 0
    poly = StripPolygonizer(width=70, height=90, classes=(1,))
    records = []
    for r0 in range(0, 90, 7):
        poly.add_strip(r0, mask[r0:r0 + 7])
        records += poly.take_finished()
    records += poly.finish()
    for rec in records:
        if len(rec.pieces) > 1 and any(len(p.interiors) for p in rec.pieces):
            joined += 1
            plain = shapely.union_all(rec.pieces)
            fast = union_of_strip_pieces(rec.pieces)
            assert fast.is_valid and shapely.normalize(fast).equals_exact(shapely.normalize(plain), 0)
    assert joined >= 1
    frame = max(got, key=lambda g: g.area)
    assert len(frame.interiors) > 3 and frame.area == max(whole, key=lambda g: g.area).area
    assert sorted(g.area for g in got) == sorted(g.area for g in whole)


def test_pieces_that_are_not_a_coverage_get_the_plain_union():
    """Outlines that overlap, or that do not join into one polygon, are not what strip pieces are:
    the plain union is taken."""
    from geoseg.vectorize.strips import union_of_strip_pieces

    holed = Polygon([(0, 0), (6, 0), (6, 6), (0, 6)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    for pieces in ([holed, box(4, 0, 9, 3)],  # overlapping
                   [holed, box(7, 0, 9, 3)]):  # apart: two polygons
        got = union_of_strip_pieces(pieces)
        assert shapely.normalize(got).equals_exact(shapely.normalize(shapely.union_all(pieces)), 0)
    assert union_of_strip_pieces([holed, box(4, 6, 9, 8)]).equals(shapely.union_all([holed, box(4, 6, 9, 8)]))


def test_polygonizer_rejects_strips_out_of_order():
    poly = StripPolygonizer(width=10, height=10)
    poly.add_strip(0, np.zeros((4, 10), np.uint8))
    with pytest.raises(ValueError, match="does not continue the mask at row 4"):
        poly.add_strip(5, np.zeros((4, 10), np.uint8))
    with pytest.raises(ValueError, match="strips stopped at row 4"):
        poly.finish()


def test_u_shape_joined_only_below_is_one_polygon():
    # Two arms that meet only in the last strip, and a bar across the first boundary.
    mask = np.zeros((9, 12), np.uint8)
    mask[0:9, 1:3] = 1
    mask[0:9, 8:10] = 1
    mask[7:9, 1:10] = 1
    poly = StripPolygonizer(width=12, height=9)
    for r0 in range(0, 9, 2):
        poly.add_strip(r0, mask[r0:r0 + 2])
    recs = poly.finish()
    assert len(recs) == 1 and recs[0].count == int(mask.sum())
    geom = recs[0].geometry
    assert geom.geom_type == "Polygon" and geom.is_valid and geom.area == mask.sum()


def test_nodata_never_becomes_a_polygon_and_confidence_is_the_mean_probability(tmp_path):
    mask = np.full((40, 50), 255, np.uint8)
    mask[10:20, 10:30] = 1
    mask[10:20, 30:40] = 0
    prob = np.full((40, 50), 255, np.uint8)
    prob[10:20, 10:20] = 254  # p = 1.0
    prob[10:20, 20:30] = 127  # p = 0.5
    gdf = mask_to_polygons(_write(tmp_path / "m.tif", mask), prob_path=_write(tmp_path / "p.tif", prob))
    assert len(gdf) == 1
    assert gdf["confidence"][0] == pytest.approx(0.75, abs=1e-3)
    assert gdf.geometry[0].symmetric_difference(_px_box(T_UTM, 10, 10, 30, 20)).area == 0


def test_min_area_and_simplify_in_metres(tmp_path):
    mask = np.zeros((100, 100), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px = 1 m² at 0.5 m
    for i in range(40):  # a staircase triangle: simplifies to few vertices
        mask[50 + i, 10:10 + i + 1] = 1
    path = _write(tmp_path / "m.tif", mask)
    raw = mask_to_polygons(path)
    assert len(raw) == 2
    kept = mask_to_polygons(path, min_area=2.0)
    assert len(kept) == 1 and kept["area_m2"][0] > 100
    stair = kept.geometry[0]
    simple = mask_to_polygons(path, min_area=2.0, simplify=1.0).geometry[0]
    assert len(simple.exterior.coords) < len(stair.exterior.coords) / 5
    assert simple.is_valid and simple.symmetric_difference(stair).area / stair.area < 0.05
    # Kept vertices sit exactly on the pixel corners of the original.
    corners = {tuple(c) for c in stair.exterior.coords}
    assert {tuple(c) for c in simple.exterior.coords} <= corners


def test_simplify_tolerance_is_metres_in_geographic_crs(tmp_path):
    # 1e-5 degree pixels (about 0.85 m x 1.1 m at 40 N): 1 m tolerance must act like 1 m.
    t = Affine(1e-5, 0, 10.0, 0, -1e-5, 40.0)
    mask = np.zeros((100, 100), np.uint8)
    for i in range(40):
        mask[50 + i, 10:10 + i + 1] = 1
    path = _write(tmp_path / "geo.tif", mask, crs="EPSG:4326", transform=t)
    fine = mask_to_polygons(path, simplify=0.1).geometry[0]
    coarse = mask_to_polygons(path, simplify=2.0).geometry[0]
    assert len(coarse.exterior.coords) <= 6 < len(fine.exterior.coords)
    assert coarse.is_valid


def test_area_and_perimeter_are_ground_metres_in_web_mercator_at_40_degrees(tmp_path):
    # EPSG:3857 at 40 N: one CRS metre is cos(40 deg) = 0.766 ground metres.
    x0, y0 = 1113194.9, 4865942.3  # about 10 E, 40 N
    t = Affine(0.5, 0, x0, 0, -0.5, y0)
    mask = np.zeros((200, 300), np.uint8)
    mask[20:120, 30:230] = 1  # 200 x 100 px = 100 m x 50 m in CRS metres
    gdf = mask_to_polygons(_write(tmp_path / "wm.tif", mask, crs="EPSG:3857", transform=t))
    geom = gdf.geometry[0]
    truth = geodesic_area(geom, "EPSG:3857")
    lat = math.radians(40.0)
    assert gdf["area_m2"][0] == pytest.approx(truth, rel=0.01)
    assert gdf["area_m2"][0] == pytest.approx(100 * 50 * math.cos(lat) ** 2, rel=0.01)
    assert gdf["perimeter_m"][0] == pytest.approx(2 * (100 + 50) * math.cos(lat), rel=0.01)
    assert geom.area == 100 * 50  # the polygon itself stays in CRS units


def test_regularize_squares_a_rotated_staircase(tmp_path):
    from rasterio import features
    from shapely import affinity

    rect = affinity.rotate(box(20, 40, 90, 80), 30, origin=(55, 60))  # 70 x 40 px, turned 30 degrees
    mask = features.rasterize([rect], out_shape=(120, 120), transform=Affine.identity()).astype(np.uint8)
    path = _write(tmp_path / "r.tif", mask)
    raw = mask_to_polygons(path).geometry[0]
    reg = mask_to_polygons(path, regularize=True).geometry[0]
    assert len(raw.exterior.coords) > 100  # the pixel staircase
    assert reg.is_valid and reg.geom_type == "Polygon"
    corners = np.array(reg.exterior.coords)[:-1]
    assert len(corners) == 4
    edges = np.diff(np.vstack([corners, corners[:1]]), axis=0)
    angles = np.degrees(np.arctan2(edges[:, 1], edges[:, 0])) % 90
    np.testing.assert_allclose(angles, 60.0, atol=1.0)  # all edges square to the roof's -30 deg axis
    assert reg.area == pytest.approx(70 * 40 * 0.25, rel=0.06)


def test_multiclass_mask_names_classes(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[2:10, 2:10] = 1
    mask[2:10, 10:20] = 2  # touching, different class: two polygons
    gdf = mask_to_polygons(_write(tmp_path / "mc.tif", mask), class_names=("bg", "house", "shed"))
    assert sorted(gdf["class"]) == ["house", "shed"]
    assert gdf.is_valid.all()


def test_empty_mask_gives_an_empty_frame_with_columns(tmp_path):
    gdf = mask_to_polygons(_write(tmp_path / "z.tif", np.zeros((20, 30), np.uint8)))
    assert len(gdf) == 0
    assert list(gdf.columns) == ["id", "scene", "area_m2", "perimeter_m", "confidence", "geometry"]
    assert gdf.crs == rasterio.crs.CRS.from_string(UTM)


def test_mismatched_probability_grid_is_refused(tmp_path):
    m = _write(tmp_path / "m.tif", np.zeros((20, 30), np.uint8))
    p = _write(tmp_path / "p.tif", np.zeros((20, 31), np.uint8))
    with pytest.raises(GeoreferenceError, match="is not on the mask's grid"):
        mask_to_polygons(m, prob_path=p)


def test_polygons_to_frame_makes_invalid_input_valid():
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])
    from geoseg.vectorize import PixelPolygon

    gdf = polygons_to_frame(
        [PixelPolygon([bowtie], 1, 1.0, 1)], transform=T_UTM, crs=rasterio.crs.CRS.from_string(UTM),
        width=10, height=10, scene="s",
    )
    assert gdf.is_valid.all() and shapely.area(gdf.geometry[0]) > 0


def test_speck_prefilter_changes_nothing_but_speed(tmp_path):
    rng = np.random.default_rng(5)
    mask = (rng.random((90, 120)) < 0.45).astype(np.uint8)  # noise: many specks, some large blobs
    mask[30:60, 40:90] = 1
    path = _write(tmp_path / "noise.tif", mask)
    fast = mask_to_polygons(path, min_area=3.0, strip_pixels=120 * 16)
    # No prefilter; components joined across strips as mask_to_polygons joins them (traced again whole).
    poly = StripPolygonizer(width=120, height=90, mask_window=lambda w: mask[
        int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)])
    for r0 in range(0, 90, 16):
        poly.add_strip(r0, mask[r0:r0 + 16])
    slow = polygons_to_frame(poly.finish(), transform=T_UTM, crs=rasterio.crs.CRS.from_string(UTM), width=120,
                             height=90, scene="noise", min_area=3.0)
    assert 0 < len(fast) == len(slow) < len(mask_to_polygons(path)) / 3
    key = lambda g: (g.bounds, g.area)  # noqa: E731
    for a, b in zip(sorted(fast.geometry, key=key), sorted(slow.geometry, key=key)):
        assert a.equals_exact(b, 0)


def test_vectorising_a_mask_does_not_import_torch(tmp_path):
    """Polygons from a mask (and the watershed split) need no torch: a fresh process proves it."""
    import subprocess
    import sys

    path = tmp_path / "m.tif"
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:15, 5:25] = 1
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000)) as dst:
        dst.write(mask, 1)
    code = (
        "import sys\n"
        "from geoseg.vectorize import mask_to_polygons\n"
        "import geoseg.instances\n"
        f"gdf = mask_to_polygons({str(path)!r})\n"
        "print(len(gdf), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False"]


def test_open_components_keep_their_own_pixels_not_views_of_whole_strips():
    """A component open across strips must not pin the strips' arrays (views would keep every
    object pixel of every strip it crossed alive: memory growing with the scene's height)."""
    from geoseg.vectorize import StripPolygonizer

    h, w = 60, 40
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, 5:8] = 1  # a column of roof through every strip
    mask[2:4, 20:30] = 1  # small components that finish inside strips
    mask[22:25, 20:30] = 1
    seed = mask.astype(bool)
    elev = np.zeros((h, w), dtype=np.uint8)
    poly = StripPolygonizer(width=w, height=h, keep_pixels=("seed", "elevation"))
    for r0 in range(0, h, 10):
        sl = slice(r0, r0 + 10)
        poly.add_strip(r0, mask[sl], mask[sl].astype(np.float32), {"seed": seed[sl], "elevation": elev[sl]})
        for rid in poly._open:
            for chunk in poly._chunks[rid]:
                assert all(a.base is None for a in chunk.values()), f"strip {r0}: a kept chunk is a view"
    done = poly.take_finished() + poly.finish()
    column = [r for r in done if r.count == 3 * h]
    assert len(column) == 1 and len(column[0].pixels["row"]) == 3 * h
    assert sorted(column[0].pixels["row"].tolist()) == sorted(list(range(h)) * 3)


@pytest.mark.parametrize("epsg, centre", [
    (3857, (13826000.0, 1460000.0)),  # web tiles (the OpenAerialMap data), Catanduanes
    (32651, (560000.0, 1510000.0)),  # UTM 51N
    (4326, (124.2, 13.6)),  # degrees
    (27700, (530000.0, 180000.0)),  # British National Grid: another datum, several candidate operations
])
def test_metric_frame_transformers_are_cheap_in_new_threads_and_exact(epsg, centre):
    """Every scene polygonises in a writer thread of its own, where pyproj builds a transformer
    again: the frame's are made from their PROJ pipeline (parsed, not searched for), and give
    exactly what transformers made from the two CRSs give. Where PROJ has several candidate
    operations (no one pipeline until a point is transformed), the transformer stays as made."""
    import threading

    import pyproj
    from affine import Affine
    from rasterio.crs import CRS

    from geoseg.vectorize.metric import metric_frame

    step = 1e-6 if epsg == 4326 else 0.15
    transform = Affine(step, 0, centre[0], 0, -step, centre[1])
    frame = metric_frame(CRS.from_epsg(epsg), transform, 512, 512)
    src = pyproj.CRS.from_epsg(epsg)
    fwd = pyproj.Transformer.from_crs(src, frame.crs, always_xy=True)
    inv = pyproj.Transformer.from_crs(frame.crs, src, always_xy=True)
    xs = centre[0] + np.array([0.0, 40 * step, 512 * step])
    ys = centre[1] - np.array([0.0, 300 * step, 512 * step])
    got: dict[str, tuple] = {}

    def in_a_new_thread() -> None:
        got["fwd"] = frame._fwd.transform(xs, ys)
        got["inv"] = frame._inv.transform(*got["fwd"])

    worker = threading.Thread(target=in_a_new_thread)
    worker.start()
    worker.join()
    np.testing.assert_allclose(got["fwd"], fwd.transform(xs, ys), rtol=0, atol=1e-6)  # metres
    np.testing.assert_allclose(got["inv"], inv.transform(*got["fwd"]), rtol=0, atol=1e-9 if epsg == 4326 else 1e-6)
    makers = {type(getattr(t, "_transformer_maker", None)).__name__ for t in (frame._fwd, frame._inv)}
    assert makers == {"TransformerFromCRS" if epsg == 27700 else "TransformerFromPipeline"}, makers
