"""Prediction at the model's ground resolution: resampled windowed reads, outputs on the scene's grid."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from rasterio.windows import Window

from geoseg.errors import ConfigError, GeoreferenceError
from geoseg.inference import predict_scene
from geoseg.raster_io import open_scene
from geoseg.resample import grid_at, parse_resolution, read_resampled
from geoseg.tiling import chip_grid

from _prediction_helpers import UTM, Oracle, draw_rectangles, geodesic_area, oracle_meta, write_scene

CPU = dict(device="cpu", precision="32")
#: Rectangles on even pixels and 2 px apart or more: a factor-2 resampling keeps every edge.
EVEN_RECTS = [(8, 8, 40, 60), (8, 72, 40, 30), (60, 20, 100, 24), (60, 46, 100, 40), (180, 100, 64, 150),
              (260, 300, 90, 120), (30, 200, 120, 250), (280, 10, 80, 80)]


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile, src.read_masks(1)


def _edges(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px of a label edge (where a resampling may move the boundary)."""
    import cv2

    k = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    return cv2.dilate(label, k) != cv2.erode(label, k)


def _polygons_on(frame, shape, transform) -> np.ndarray:
    return rasterize([(g, 1) for g in frame.geometry], out_shape=shape, transform=transform, fill=0, dtype="uint8")


@pytest.mark.parametrize("block_size", [128, 2048])
def test_scene_finer_than_model_is_read_at_the_model_resolution(tmp_path, block_size):
    # 0.25 m scene, 0.5 m model: the model grid has 2x2 scene pixels per pixel.
    label = draw_rectangles(400, 560, EVEN_RECTS)
    transform = Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 4650000.0)
    scene = write_scene(tmp_path / "fine.tif", label, transform=transform)
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(resolution=0.5), mask_out=tmp_path / "m.tif",
                        prob_out=tmp_path / "p.tif", block_size=block_size, simplify=0.0, min_area=0.0, **CPU)
    assert res.resolution == 0.5 and (res.width, res.height) == (280, 200)
    # Chips cover the 280x200 model grid, not the 560x400 scene (64-px chips, 16-px overlap: 6x4).
    assert res.chips_total == len(chip_grid(280, 200, size=64, stride=48)) == 24
    mask, profile, valid = _read(tmp_path / "m.tif")
    with rasterio.open(scene) as src:
        assert (profile["width"], profile["height"], profile["crs"], profile["transform"]) == (
            src.width, src.height, src.crs, src.transform)
    assert valid.all()
    np.testing.assert_array_equal(mask, label)  # every edge is on an even pixel: nothing moves
    prob, pprofile, _ = _read(tmp_path / "p.tif")
    assert pprofile["transform"] == transform and ((prob >= 127) == (label == 1)).all()
    # Polygons come from the model grid: exact in the scene's CRS, true areas.
    on_scene = _polygons_on(res.polygons, label.shape, transform)
    np.testing.assert_array_equal(on_scene, label)
    for geom, area in zip(res.polygons.geometry, res.polygons["area_m2"]):
        assert area == pytest.approx(geodesic_area(geom, UTM), rel=1e-3)
    assert sorted(res.polygons["area_m2"]) == pytest.approx(
        sorted(h * w * 0.0625 / 0.9996**2 for _, _, h, w in EVEN_RECTS), rel=1e-4)


def test_blocks_give_the_same_result_as_one_block_at_any_factor(tmp_path):
    """No seams: small blocks equal one block, also at factors that are not integers."""
    rng = np.random.default_rng(3)
    rects = [(int(r), int(c), int(h), int(w)) for r, c, h, w in
             zip(rng.integers(0, 330, 12), rng.integers(0, 430, 12), rng.integers(9, 60, 12), rng.integers(9, 60, 12))]
    label = draw_rectangles(390, 490, rects)
    transform = Affine(0.3, 0.0, 500000.0, 0.0, -0.3, 4650000.0)
    scene = write_scene(tmp_path / "s.tif", label, transform=transform)
    for metres in (0.7, 0.21):
        outs = []
        for block in (64, 1024):
            out = tmp_path / f"m_{metres}_{block}.tif"
            predict_scene(scene, Oracle(), oracle_meta(resolution=0.5), mask_out=out, polygons=False,
                          block_size=block, resolution=metres, **CPU)
            outs.append(_read(out)[0])
        np.testing.assert_array_equal(outs[0], outs[1])
        # The label, resampled there and back, moves only near its edges.
        moved = outs[0] != label
        assert not (moved & ~_edges(label, 2)).any()


def test_scene_coarser_than_model_is_upsampled_and_written_back(tmp_path):
    # 1.0 m scene, 0.5 m model: the model grid has twice the pixels per axis.
    label = draw_rectangles(120, 150, [(10, 10, 20, 30), (40, 60, 30, 50), (90, 5, 20, 100)])
    transform = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4650000.0)
    scene = write_scene(tmp_path / "coarse.tif", label, transform=transform)
    res = predict_scene(scene, Oracle(), oracle_meta(resolution=0.5), mask_out=tmp_path / "m.tif",
                        simplify=0.0, min_area=0.0, **CPU)
    assert res.resolution == 0.5 and (res.width, res.height) == (300, 240)
    mask, profile, _ = _read(tmp_path / "m.tif")
    assert profile["transform"] == transform and mask.shape == label.shape
    moved = mask != label
    assert not (moved & ~_edges(label, 1)).any()
    # Polygons keep the model's finer outline: each rectangle within half a scene pixel of its drawing.
    assert len(res.polygons) == 3
    for (r, c, h, w) in [(10, 10, 20, 30), (40, 60, 30, 50), (90, 5, 20, 100)]:
        drawn = shapely.box(500000.0 + c, 4650000.0 - r - h, 500000.0 + c + w, 4650000.0 - r)
        best = max(res.polygons.geometry, key=lambda g: g.intersection(drawn).area)
        assert best.symmetric_difference(drawn).area <= 0.5 * (2 * h + 2 * w)


@pytest.mark.parametrize("scene_px, grid_px, chips", [(130, 64, 1), (140, 70, 4)])
def test_a_model_grid_just_over_whole_chips_is_drawn_at_whole_chips(tmp_path, scene_px, grid_px, chips):
    # 0.25 m scene, 0.5 m model, 64-px chips with 16 px overlap. 130 px read at 0.5 m are 65 px
    # by rounding: one pixel over a chip, 2x2 chips; drawn at 64 px (pixels 1.6% larger) one
    # chip. 140 px give 70: 64 would make pixels 9% larger, the grid stays 70 px (2x2 chips).
    rects = [(20, 20, 40, 60), (70, 14, 50, 30), (30, 90, 80, 30)]
    label = draw_rectangles(scene_px, scene_px, rects)
    transform = Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 4650000.0)
    scene = write_scene(tmp_path / "s.tif", label, transform=transform)
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(resolution=0.5), mask_out=tmp_path / "m.tif",
                        simplify=0.0, min_area=0.0, **CPU)
    assert (res.width, res.height) == (grid_px, grid_px) and res.resolution == 0.5
    assert res.chips_total == model.chips == chips
    # The mask is written on the scene's own grid; the label moves only at its edges.
    mask, profile, valid = _read(tmp_path / "m.tif")
    assert (profile["width"], profile["height"], profile["transform"]) == (scene_px, scene_px, transform)
    assert valid.all() and not ((mask != label) & ~_edges(label, 2)).any()
    # The polygons are on the model grid's pixels (whatever their size), in the scene's CRS.
    pixel = scene_px * 0.25 / grid_px
    assert len(res.polygons) == len(rects)
    for r, c, h, w in rects:
        drawn = shapely.box(500000.0 + 0.25 * c, 4650000.0 - 0.25 * (r + h), 500000.0 + 0.25 * (c + w),
                            4650000.0 - 0.25 * r)
        best = max(res.polygons.geometry, key=lambda g: g.intersection(drawn).area)
        assert best.symmetric_difference(drawn).area <= pixel * drawn.length
        xs, ys = np.asarray(best.exterior.coords).T
        np.testing.assert_allclose((xs - 500000.0) / pixel, np.rint((xs - 500000.0) / pixel), atol=1e-6)
        np.testing.assert_allclose((4650000.0 - ys) / pixel, np.rint((4650000.0 - ys) / pixel), atol=1e-6)


def test_native_reads_the_scene_as_it_is_and_warns(tmp_path, caplog):
    label = draw_rectangles(80, 90, [(10, 10, 20, 30)])
    scene = write_scene(tmp_path / "r.tif", label)  # 0.5 m pixels (UTM)
    with caplog.at_level(logging.WARNING, logger="geoseg.inference.checks"):
        res = predict_scene(scene, Oracle(), oracle_meta(resolution=0.3), polygons=False, resolution="native",
                            mask_out=tmp_path / "m.tif", **CPU)
    assert res.resolution is None and (res.width, res.height) == (90, 80)
    assert [r.getMessage() for r in caplog.records] == [
        f"{scene}: ground resolution 0.5 m/px differs from the model's training data (0.3 m/px) by more than "
        "25%; predictions may be poor (predict with --resolution auto to read it at the model's resolution)"
    ]
    np.testing.assert_array_equal(_read(tmp_path / "m.tif")[0], label)
    # auto: within 5% of the model's resolution the scene is read as it is, without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = predict_scene(scene, Oracle(), oracle_meta(resolution=0.49), polygons=False, **CPU)
    assert res.resolution is None and caplog.records == []


@pytest.mark.parametrize("bad", [0, -0.5, "0", "-1", "fine", float("nan"), float("inf")])
def test_bad_resolution_is_refused_before_anything_is_written(tmp_path, bad):
    scene = write_scene(tmp_path / "s.tif", draw_rectangles(40, 40, []))
    with pytest.raises(ConfigError) as err:
        predict_scene(scene, Oracle(), oracle_meta(), mask_out=tmp_path / "m.tif", resolution=bad, **CPU)
    assert str(err.value).startswith("--resolution should be ")
    assert not (tmp_path / "m.tif").exists()
    assert parse_resolution("AUTO") == "auto" and parse_resolution("0.15") == 0.15


def test_metres_on_a_crs_without_ground_metres_is_refused(tmp_path):
    engineering = ('LOCAL_CS["local",UNIT["unknown",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    scene = write_scene(tmp_path / "e.tif", draw_rectangles(40, 40, []), crs=engineering)
    with pytest.raises(GeoreferenceError, match="cannot be related to ground metres"):
        predict_scene(scene, Oracle(), oracle_meta(), resolution=0.3, polygons=False, **CPU)


def test_grid_at_keeps_the_extent_in_any_crs(tmp_path):
    # EPSG:3857 at 60° N: 0.3 CRS metres are 0.15 ground metres.
    t = Affine(0.3, 0.0, 1113194.9, 0.0, -0.3, 8399737.9)
    scene = write_scene(tmp_path / "m.tif", draw_rectangles(200, 300, []), crs="EPSG:3857", transform=t)
    info = open_scene(scene)
    grid = grid_at(info, 0.3)
    assert (grid.width, grid.height) == (150, 100)
    assert grid.bounds == pytest.approx(info.bounds) and grid.crs == info.crs


def test_read_resampled_windows_equal_a_whole_read(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (300, 420), dtype=np.uint8)
    scene = write_scene(tmp_path / "n.tif", data, rgb=False)
    info = open_scene(scene)
    for metres in (1.0, 0.35, 0.8):
        grid = grid_at(info, metres)
        with rasterio.open(scene) as src:
            whole, wvalid = read_resampled(src, info, grid, Window(0, 0, grid.width, grid.height))
            assert wvalid.all()
            # Windows reaching outside: the part outside is fill and invalid, the rest equals the whole read.
            win = Window(-7, grid.height - 30, 50, 45)
            part, valid = read_resampled(src, info, grid, win, fill=9)
        inside = part[:, :30, 7:]
        np.testing.assert_array_equal(inside, whole[:, grid.height - 30:, :43])
        assert valid[:30, 7:].all() and not valid[30:].any() and not valid[:, :7].any()
        assert (part[:, 30:] == 9).all()


@pytest.mark.parametrize("bad, said", [("0", "'0'"), ("-2", "'-2'"), ("fine", "'fine'")])
def test_cli_bad_resolution_is_one_line_and_writes_nothing(tmp_path, bad, said):
    from click.testing import CliRunner

    import cli

    scene = write_scene(tmp_path / "s.tif", draw_rectangles(40, 40, []))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.cli, ["predict", str(scene), "--out", str(out / "roofs.gpkg"),
                                          "--resolution", bad])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --resolution should be ") and said in lines[0]
    assert "Traceback" not in result.output and not out.exists()
