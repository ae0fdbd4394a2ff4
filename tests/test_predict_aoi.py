"""Tests for ``geoseg predict --aoi``: only the area is read and predicted, polygons are cut to it.

The oracle model reproduces the label carried in the scene's last band, so inside the
AOI the mask must equal the label exactly and the polygons must be the drawn
rectangles cut exactly to the AOI. The AOI is an L with one slanted edge, written in
EPSG:4326 while the scene is UTM; its vertices lie at fractions of a pixel, so no edge
runs along a pixel boundary. What the AOI covers is computed here independently
(pixel, chip and block footprints against the polygon, in the scene CRS).
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from shapely.geometry import Point, Polygon, box

import cli
from _prediction_helpers import Oracle, UTM, UTM_TRANSFORM, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg.errors import GeoreferenceError, InputFileError
from geoseg.inference import predict_scene, streams
from geoseg.tiling import block_grid, chip_grid
from geoseg.vectorize import ground_area_perimeter, metric_frame

H, W = 300, 517
CHIP, OVERLAP, BLOCK = 64, 16, 128
CPU = dict(device="cpu", precision="32")
#: (row, col, height, width): inside, across the inner corner, across the slanted edge, across both
#: sides of the vertical bar, and two outside.
RECTS = [(40, 30, 20, 30), (100, 60, 40, 50), (60, 230, 40, 40), (200, 10, 20, 100),
         (250, 300, 30, 60), (150, 150, 20, 20)]
#: The L (col, row) in scene pixels: a bar along the top, one down the left, a slanted outer corner.
L_PIXELS = [(20.3, 30.7), (250.3, 30.7), (250.3, 80.4), (220.6, 110.7), (90.3, 110.7), (90.3, 230.6),
            (20.3, 230.6)]


def pixel_polygon(vertices) -> Polygon:
    return Polygon([UTM_TRANSFORM @ v for v in vertices])


AOI_UTM = pixel_polygon(L_PIXELS)


def write_aoi(path: Path, geoms, *, crs: str = UTM, to_crs: str | None = "EPSG:4326") -> Path:
    frame = gpd.GeoDataFrame({"name": [f"part{i}" for i in range(len(geoms))]}, geometry=list(geoms), crs=crs)
    if to_crs is not None:
        frame = frame.to_crs(to_crs)
    frame.to_file(path)
    return path


def window_box(col: float, row: float, width: float, height: float) -> Polygon:
    return pixel_polygon([(col, row), (col + width, row), (col + width, row + height), (col, row + height)])


def meets(geoms) -> np.ndarray:
    """Whether each footprint shares area with the AOI (a common edge alone is not enough)."""
    return shapely.intersects(AOI_UTM, geoms) & ~shapely.touches(AOI_UTM, geoms)


def covered_pixels() -> np.ndarray:
    rows, cols = np.mgrid[0:H, 0:W]
    x0, y0 = UTM_TRANSFORM @ (cols.ravel(), rows.ravel())
    x1, y1 = UTM_TRANSFORM @ (cols.ravel() + 1, rows.ravel() + 1)
    pixels = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))
    return meets(pixels).reshape(H, W)


def run(*args: str):
    return CliRunner().invoke(cli.cli, ["predict", *args])


@pytest.fixture
def oracle(monkeypatch):
    """``geoseg predict`` with the oracle model instead of a checkpoint."""
    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=CHIP))
    return model


@pytest.fixture
def reads(monkeypatch) -> list:
    """The windows the block readers read from the scene."""
    seen = []
    real = streams.read_window

    def spy(src, window, **kwargs):
        seen.append((int(window.col_off), int(window.row_off), int(window.width), int(window.height)))
        return real(src, window, **kwargs)

    monkeypatch.setattr(streams, "read_window", spy)
    return seen


def test_only_the_aoi_is_read_predicted_and_kept(tmp_path, reads):
    label = draw_rectangles(H, W, RECTS)
    scene = write_scene(tmp_path / "scene.tif", label)
    aoi = write_aoi(tmp_path / "aoi.geojson", [AOI_UTM])
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(chip_size=CHIP), mask_out=tmp_path / "mask.tif",
                        prob_out=tmp_path / "prob.tif", overlap=OVERLAP, block_size=BLOCK, aoi=aoi, **CPU)

    # (a) the mask is the label on every pixel the AOI covers (even partly), nodata elsewhere;
    # both rasters keep the scene's grid.
    inside = covered_pixels()
    with rasterio.open(scene) as src:
        grid = (src.crs, src.transform, src.shape)
    with rasterio.open(tmp_path / "mask.tif") as m, rasterio.open(tmp_path / "prob.tif") as p:
        assert (m.crs, m.transform, m.shape) == grid and (p.crs, p.transform, p.shape) == grid
        mask, prob = m.read(1), p.read(1)
    assert np.array_equal(mask[inside], label[inside])
    assert (mask[~inside] == 255).all() and (prob[~inside] == 255).all() and (prob[inside] != 255).all()

    # (b) exactly the chips whose window meets the AOI went through the model.
    chips = chip_grid(W, H, size=CHIP, stride=CHIP - OVERLAP)
    touching = int(meets([window_box(c.window.col_off, c.window.row_off, CHIP, CHIP) for c in chips]).sum())
    assert 0 < touching < len(chips)
    assert res.chips_predicted == model.chips == touching
    assert res.chips_total == len(chips) and res.chips_skipped == len(chips) - touching

    # (c) only the blocks whose extent (core and halo) meets the AOI were read, each once, and of each
    # only the box of its pixels the AOI covers.
    blocks = block_grid(W, H, block_size=BLOCK, chip_size=CHIP, stride=CHIP - OVERLAP)
    extents = [(int(b.extent.col_off), int(b.extent.row_off), int(b.extent.width), int(b.extent.height))
               for b in blocks]
    expected = [e for e, hit in zip(extents, meets([window_box(*e) for e in extents])) if hit]
    assert len(expected) == 3 and len(blocks) == 15
    pad = 2 * BLOCK
    covered = np.zeros((H + 2 * pad, W + 2 * pad), bool)
    covered[pad:pad + H, pad:pad + W] = inside
    boxes = []
    for c, r, w, h in expected:
        sub = covered[r + pad:r + pad + h, c + pad:c + pad + w]
        rows, cols = np.flatnonzero(sub.any(axis=1)), np.flatnonzero(sub.any(axis=0))
        boxes.append((c + int(cols[0]), r + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)))
    assert sorted(reads) == sorted(boxes)
    assert all(b[2] * b[3] < e[2] * e[3] for b, e in zip(boxes, expected))  # each read is less than its block

    # (d) polygons are the drawn rectangles cut exactly to the AOI, measured as cut.
    gdf = res.polygons
    want = [r for r in (box(*(UTM_TRANSFORM @ (c, rr + h)), *(UTM_TRANSFORM @ (c + w, rr))).intersection(AOI_UTM)
                        for rr, c, h, w in RECTS) if r.area > 0]
    assert len(gdf) == len(want) == 4 and gdf.is_valid.all()
    for geom in gdf.geometry:
        assert min(geom.symmetric_difference(e).area for e in want) < 1e-6
    assert any(not g.equals(g.envelope) for g in gdf.geometry)  # the slanted edge and the inner corner cut
    frame = metric_frame(gdf.crs, UTM_TRANSFORM, W, H)
    area, perimeter = ground_area_perimeter(np.asarray(gdf.geometry.values), frame)
    assert np.allclose(gdf["area_m2"], area) and np.allclose(gdf["perimeter_m"], perimeter)
    assert sorted(gdf["area_m2"]) == pytest.approx(sorted(ground_area_perimeter(np.asarray(want), frame)[0]))


def test_command_writes_the_aoi_prediction_and_cut_polygons(tmp_path, oracle):
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(H, W, RECTS))
    aoi = write_aoi(tmp_path / "aoi.gpkg", [AOI_UTM])
    result = run(str(scene), "--aoi", str(aoi), "--out", str(tmp_path / "roofs.gpkg"), "--min-area", "0",
                 "--block-size", str(BLOCK), "--device", "cpu")
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(tmp_path / "roofs.gpkg", layer="rooftops")
    assert len(gdf) == 4 and all(AOI_UTM.buffer(1e-6).covers(g) for g in gdf.geometry)


def test_several_features_and_parts_are_one_area(tmp_path):
    """Two features (one a MultiPolygon) make one area: their union, as if drawn as one."""
    label = draw_rectangles(H, W, RECTS)
    scene = write_scene(tmp_path / "scene.tif", label)
    top = pixel_polygon([(20.3, 30.7), (250.3, 30.7), (250.3, 80.4), (220.6, 110.7), (20.3, 110.7)])
    left = pixel_polygon([(20.3, 100.2), (90.3, 100.2), (90.3, 170.5), (20.3, 170.5)])
    low = pixel_polygon([(20.3, 170.5), (90.3, 170.5), (90.3, 230.6), (20.3, 230.6)])
    aoi = write_aoi(tmp_path / "parts.gpkg", [top, shapely.MultiPolygon([left, low])])
    res = predict_scene(scene, Oracle(), oracle_meta(chip_size=CHIP), mask_out=tmp_path / "m.tif",
                        overlap=OVERLAP, block_size=BLOCK, aoi=aoi, min_area=0.0, **CPU)
    inside = covered_pixels()
    with rasterio.open(tmp_path / "m.tif") as m:
        mask = m.read(1)
    assert np.array_equal(mask[inside], label[inside]) and (mask[~inside] == 255).all()
    assert len(res.polygons) == 4


def refused(folder: Path, model: Oracle, args: list[str], message: str) -> None:
    """The command fails with exactly ``message`` on one line, exit 1, having read and written nothing."""
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    result = run(*args)
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before and model.calls == 0


def test_scene_outside_the_aoi_is_one_line_exit_1_and_writes_nothing(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_scene(tmp_path / "scene.tif", draw_rectangles(H, W, RECTS))
    write_aoi(tmp_path / "far.gpkg", [box(501000, 4650000, 501010, 4650010)], to_crs=None)
    refused(tmp_path, oracle, ["scene.tif", "--aoi", "far.gpkg", "--out", "roofs.gpkg", "--mask-out", "m.tif"],
            "far.gpkg: the AOI does not touch the scene scene.tif (AOI extent (501000.00, 4650000.00, "
            "501010.00, 4650010.00), scene extent (500000.00, 4649850.00, 500258.50, 4650000.00) in "
            "EPSG:32633); pass an AOI that overlaps the scene, or predict without --aoi")
    # Several scenes, none touched: the extent of them all (scene b lies 1 km west of the first).
    write_scene(tmp_path / "b.tif", draw_rectangles(100, 120, RECTS[:1]),
                transform=UTM_TRANSFORM @ UTM_TRANSFORM.translation(-2000, 0))
    refused(tmp_path, oracle, ["scene.tif", "b.tif", "--aoi", "far.gpkg", "--out", "roofs.gpkg"],
            "far.gpkg: the AOI does not touch any of the 2 scenes (AOI extent (501000.00, 4650000.00, "
            "501010.00, 4650010.00), extent of the scenes (499000.00, 4649850.00, 500258.50, 4650000.00) in "
            "EPSG:32633); pass an AOI that overlaps a scene, or predict without --aoi")


def test_library_refuses_a_scene_outside_the_aoi(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(H, W, RECTS))
    far = write_aoi(tmp_path / "far.geojson", [box(501000, 4650000, 501010, 4650010)])
    with pytest.raises(GeoreferenceError, match=r"far.geojson: the AOI does not touch the scene .*scene.tif"):
        predict_scene(scene, Oracle(), oracle_meta(chip_size=CHIP), aoi=far, **CPU)


def test_scenes_the_aoi_does_not_touch_are_skipped_with_a_warning(tmp_path, oracle, reads, caplog):
    a = write_scene(tmp_path / "a.tif", draw_rectangles(H, W, RECTS))
    # Scene b lies 10 km east: nothing of it is read, its layer part is empty, its mask all nodata.
    b = write_scene(tmp_path / "b.tif", draw_rectangles(100, 120, RECTS[:1]),
                    transform=UTM_TRANSFORM @ UTM_TRANSFORM.translation(20000, 0), seed=1)
    aoi = write_aoi(tmp_path / "aoi.geojson", [AOI_UTM])
    with caplog.at_level(logging.WARNING):
        result = run(str(a), str(b), "--aoi", str(aoi), "--out", str(tmp_path / "r.gpkg"), "--min-area", "0",
                     "--block-size", str(BLOCK), "--mask-out", str(tmp_path / "masks"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"{b}: the AOI {aoi} does not touch this scene: skipped" in caplog.text
    assert "b: 0 polygons, 0 chips" in result.output
    gdf = gpd.read_file(tmp_path / "r.gpkg", layer="rooftops")
    assert len(gdf) == 4 and set(gdf["scene"]) == {"a"}
    with rasterio.open(tmp_path / "masks" / "b_mask.tif") as m:
        assert m.shape == (100, 120) and (m.read(1) == 255).all()
    assert len(reads) == 3  # scene a's three blocks that meet the AOI, nothing of b


def test_the_aoi_file_as_output_is_refused(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_scene(tmp_path / "scene.tif", draw_rectangles(H, W, RECTS))
    write_aoi(tmp_path / "aoi.gpkg", [AOI_UTM])
    refused(tmp_path, oracle, ["scene.tif", "--aoi", "./aoi.gpkg", "--out", "aoi.gpkg", "--overwrite"],
            "aoi.gpkg: --out would overwrite the input AOI ./aoi.gpkg; choose another output path")


def test_an_aoi_without_polygons_is_one_line(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_scene(tmp_path / "scene.tif", draw_rectangles(H, W, RECTS))
    write_aoi(tmp_path / "points.gpkg", [Point(500010, 4649990)])
    refused(tmp_path, oracle, ["scene.tif", "--aoi", "points.gpkg", "--out", "roofs.gpkg"],
            "points.gpkg: has no polygon geometries (found Point); pass a polygon file (GeoPackage, GeoJSON, "
            "Shapefile) of the area to predict")
    Path("empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    refused(tmp_path, oracle, ["scene.tif", "--aoi", "empty.geojson", "--out", "roofs.gpkg"],
            "empty.geojson: has no polygons; pass a polygon file (GeoPackage, GeoJSON, Shapefile) of the area "
            "to predict")
    with pytest.raises(InputFileError, match=r"points.gpkg: has no polygon geometries"):
        predict_scene("scene.tif", Oracle(), oracle_meta(chip_size=CHIP), aoi="points.gpkg", **CPU)
