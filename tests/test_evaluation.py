"""Tests for geoseg.evaluation: hand-computed pixel and object metrics on drawn rectangles."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas
import numpy as np
import pytest
import rasterio
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from affine import Affine
from shapely.geometry import box

from geoseg.errors import ConfigError, GeoreferenceError, InputFileError, OutputError
from geoseg.evaluation import (
    evaluate,
    mask_polygons,
    match_objects,
    object_scores,
    object_scores_from_masks,
    write_panels,
)
from geoseg.evaluation.panels import select_windows
from geoseg.metrics import ConfusionMatrix
from geoseg.plots import FALSE_COLOUR, MATCHED_COLOUR, MISSED_COLOUR
from geoseg.raster_io import write_geotiff

# Test grid: 40 x 30 px of 1 m in EPSG:32633; pixel (row r, col c) covers
# x in [X0 + c, X0 + c + 1], y in [Y0 - r - 1, Y0 - r].
W, H = 40, 30
X0, Y0 = 500000.0, 4000030.0
UTM = "EPSG:32633"
GRID = Affine(1, 0, X0, 0, -1, Y0)


def px_box(r0: int, r1: int, c0: int, c1: int, *, x0: float = X0, y0: float = Y0) -> shapely.Polygon:
    """The CRS rectangle of pixel rows r0..r1-1 and columns c0..c1-1."""
    return box(x0 + c0, y0 - r1, x0 + c1, y0 - r0)


def draw(rects: list[tuple[int, int, int, int]], *, value: int = 1, shape=(H, W)) -> np.ndarray:
    a = np.zeros(shape, dtype=np.uint8)
    for r0, r1, c0, c1 in rects:
        a[r0:r1, c0:c1] = value
    return a


def write_mask(path: Path, array: np.ndarray, *, transform: Affine = GRID, crs: str = UTM,
               nodata: float | None = None) -> Path:
    return write_geotiff(path, array, crs=rasterio.crs.CRS.from_user_input(crs),
                         transform=transform, nodata=nodata)


def write_vector(path: Path, geoms: list, *, crs: str = UTM, to_crs: str | None = None) -> Path:
    gs = geopandas.GeoSeries(geoms, crs=crs)
    if to_crs is not None:  # densify first, so the reprojected outline follows the rectangle
        gs = geopandas.GeoSeries(shapely.segmentize(np.asarray(gs.values), 0.5), crs=crs).to_crs(to_crs)
    geopandas.GeoDataFrame({"id": list(range(len(geoms)))}, geometry=gs).to_file(path)
    return path


# truth A, B, C; prediction A, B shifted 3 px right (IoU 70/130), D false; C missed
A, B, C = (2, 12, 2, 12), (2, 12, 20, 30), (18, 28, 2, 12)
B_SHIFTED, D = (2, 12, 23, 33), (18, 28, 25, 35)


# ----------------------------------------------------------------- match_objects


def test_shifted_square_iou_is_80_over_120() -> None:
    m = match_objects([box(2, 0, 12, 10)], [box(0, 0, 10, 10)])
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)
    assert m.pairs[0][:2] == (0, 0)
    assert m.pairs[0][2] == pytest.approx(80 / 120)
    assert (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)


def test_iou_below_threshold_is_a_miss_and_a_false() -> None:
    m = match_objects([box(4, 0, 14, 10)], [box(0, 0, 10, 10)])  # IoU 60/140
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    assert m.false_positives == (0,) and m.false_negatives == (0,)
    assert match_objects([box(4, 0, 14, 10)], [box(0, 0, 10, 10)], iou_threshold=0.4).tp == 1


def test_iou_exactly_half_matches_and_ties_go_to_lower_truth_index() -> None:
    # a 20 x 10 prediction made of exactly two 10 x 10 truths: IoU 0.5 with both
    pred = [box(0, 0, 20, 10)]
    m = match_objects(pred, [box(10, 0, 20, 10), box(0, 0, 10, 10)])
    assert m.pairs == ((0, 0, 0.5),)
    assert m.false_negatives == (1,)
    m = match_objects(pred, [box(0, 0, 10, 10), box(10, 0, 20, 10)])
    assert m.pairs == ((0, 0, 0.5),)


def test_tie_between_predictions_goes_to_lower_prediction_index() -> None:
    m = match_objects([box(10, 0, 20, 10), box(0, 0, 10, 10)], [box(0, 0, 20, 10)])
    assert m.pairs == ((0, 0, 0.5),)
    assert m.false_positives == (1,)


def test_greedy_takes_the_highest_iou_first() -> None:
    # overlapping truths: the prediction has IoU 0.8 with truth 0 and 0.9 with truth 1
    m = match_objects([box(0, 0, 10, 10)], [box(0, 0, 10, 8), box(0, 0, 10, 9)])
    assert [(p, t) for p, t, _ in m.pairs] == [(0, 1)]
    assert m.pairs[0][2] == pytest.approx(0.9)
    # several pairs: order of the pairs is descending IoU
    m = match_objects([box(0, 0, 10, 10), box(20, 0, 30, 10)],
                      [box(21, 0, 30, 10), box(0, 0, 10, 7)])
    assert [(p, t) for p, t, _ in m.pairs] == [(1, 0), (0, 1)]
    assert [round(i, 6) for _, _, i in m.pairs] == [0.9, 0.7]


def _cell_boxes(draw_, cells: int, size: float, offset: float) -> list[shapely.Polygon]:
    """Random boxes, one inside each of some grid cells: disjoint by construction."""
    out = []
    for i in range(cells):
        for j in range(cells):
            if draw_(st.booleans()):
                x0 = draw_(st.integers(0, int(size) - 2))
                y0 = draw_(st.integers(0, int(size) - 2))
                x1 = draw_(st.integers(x0 + 1, int(size)))
                y1 = draw_(st.integers(y0 + 1, int(size)))
                ox, oy = offset + i * size, offset + j * size
                out.append(box(ox + x0, oy + y0, ox + x1, oy + y1))
    return out


@st.composite
def disjoint_layers(draw_):
    truths = _cell_boxes(draw_, 4, 10, 0)
    preds = _cell_boxes(draw_, 5, 7, 3)  # another lattice: a prediction may cover several truths
    return preds, truths, draw_(st.randoms(use_true_random=False))


@settings(max_examples=60, deadline=None)
@given(disjoint_layers())
def test_matching_above_half_is_unique_for_disjoint_polygons(layers) -> None:
    preds, truths, rnd = layers
    pa, ta = np.meshgrid(np.asarray(preds + [None])[:-1], np.asarray(truths + [None])[:-1],
                         indexing="ij")
    iou = shapely.area(shapely.intersection(pa, ta)) / shapely.area(shapely.union(pa, ta))
    # the claim: above 0.5 every polygon has at most one partner ...
    assert ((iou > 0.5).sum(axis=0) <= 1).all() and ((iou > 0.5).sum(axis=1) <= 1).all()
    # ... so the matching is every such pair, whatever the order of the inputs
    expected = {(preds[i].wkt, truths[j].wkt) for i, j in zip(*np.nonzero(iou > 0.5))}
    rnd.shuffle(preds)
    rnd.shuffle(truths)
    m = match_objects(preds, truths, iou_threshold=0.5 + 1e-6)
    assert {(preds[p].wkt, truths[t].wkt) for p, t, _ in m.pairs} == expected


@pytest.mark.parametrize(
    ("pred", "true", "expected"),
    [
        ([], [], (1.0, 1.0, 1.0, 0, 0, 0)),                       # both empty
        ([], [box(0, 0, 1, 1)], (0.0, 0.0, 0.0, 0, 0, 1)),        # empty prediction
        ([box(0, 0, 1, 1)], [], (0.0, 0.0, 0.0, 0, 1, 0)),        # empty truth
    ],
)
def test_empty_cases(pred, true, expected) -> None:
    s = match_objects(pred, true).scores()
    assert (s["precision"], s["recall"], s["f1"], s["tp"], s["fp"], s["fn"]) == expected


def test_object_scores_from_counts() -> None:
    s = object_scores(3, 1, 2)
    assert s == {"precision": 0.75, "recall": 0.6, "f1": pytest.approx(6 / 9),
                 "tp": 3, "fp": 1, "fn": 2}
    assert object_scores(0, 0, 0)["f1"] == 1.0
    with pytest.raises(ConfigError, match=r"^object counts must be >= 0, got tp=-1, fp=0, fn=0$"):
        object_scores(-1, 0, 0)


def test_bad_threshold_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        match_objects([], [], iou_threshold=0)
    assert str(exc.value) == "iou_threshold should be in (0, 1], got 0; pass e.g. 0.5 (SpaceNet)"


def test_invalid_geometry_is_repaired_before_matching() -> None:
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    m = match_objects([bowtie], [box(0, 0, 10, 10)])  # repaired: two triangles of 25 m2
    assert m.pairs == ((0, 0, 0.5),)


# ----------------------------------------------------------------- masks


def test_mask_polygons_are_exact_rectangles_in_crs_units() -> None:
    polys = mask_polygons(draw([A, C]).astype(bool), transform=GRID)
    assert len(polys) == 2
    assert sorted(p.bounds for p in polys) == sorted([px_box(*A).bounds, px_box(*C).bounds])
    assert all(p.equals(px_box(*r)) for p, r in zip(sorted(polys, key=lambda p: -p.bounds[3]), [A, C]))


def test_object_scores_from_masks_batch_with_ignore_and_min_area() -> None:
    true = np.zeros((2, 40, 64), dtype=np.uint8)
    pred = np.zeros_like(true)
    true[0, 5:15, 5:15] = 1         # A: predicted shifted by 2 px (IoU 80/120)
    pred[0, 5:15, 7:17] = 1
    true[0, 25:35, 30:40] = 1       # B: missed
    pred[0, 5:10, 50:55] = 1        # false
    pred[0, 30:32, 5:7] = 1         # 4 px speck: dropped by min_area_px=5
    true[0, 20:40, 50:64] = 255     # ignored truth; the prediction there must not count
    pred[0, 25:35, 52:60] = 1
    true[1, 10:20, 10:20] = 1       # chip 2: exact
    pred[1, 10:20, 10:20] = 1
    t = Affine(0.3, 0, 500000, 0, -0.3, 4000000)
    s = object_scores_from_masks(pred, true, transform=t, min_area_px=5)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    s = object_scores_from_masks(torch.from_numpy(pred), torch.from_numpy(true), transform=t)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)  # the speck counts without min_area_px
    s = object_scores_from_masks(pred[1], true[1], transform=t)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (1, 0, 0, 1.0)
    with pytest.raises(ConfigError, match="should both be"):
        object_scores_from_masks(pred[0], true, transform=t)


def test_mask_scores_by_pixel_counts_equal_polygon_matching() -> None:
    rng = np.random.default_rng(5)
    true = np.zeros((4, 96, 80), dtype=np.uint8)
    for n in range(4):
        for _ in range(10):
            (r, c), (h, w) = rng.integers(0, 80, 2), rng.integers(3, 16, 2)
            true[n, r:r + h, c:c + w] = 1
    pred = true.copy()
    pred[:, :, ::9] = 0          # cuts some buildings in two
    pred[:, 40:42, :] = 1        # and merges others
    s = object_scores_from_masks(pred, true, transform=GRID)
    tp = fp = fn = 0
    for p, t in zip(pred, true):
        m = match_objects(mask_polygons(p == 1, transform=GRID), mask_polygons(t == 1, transform=GRID))
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    assert (s["tp"], s["fp"], s["fn"]) == (tp, fp, fn)
    assert tp > 0 and fp > 0 and fn > 0


# ----------------------------------------------------------------- evaluate: pixels and objects


def test_shifted_square_hand_values(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([(5, 15, 5, 15)], value=255))  # 0/255 mask
    pred = write_mask(tmp_path / "pred.tif", draw([(5, 15, 7, 17)]))               # 0/1 mask
    r = evaluate(pred, truth)
    px = r.pixel
    assert (px.tp, px.fp, px.fn, px.tn) == (80, 20, 20, 1080)
    assert px.iou == pytest.approx(80 / 120)
    assert (px.precision, px.recall, px.f1) == pytest.approx((0.8, 0.8, 0.8))
    assert px.accuracy == pytest.approx(1160 / 1200)
    assert px.miou == pytest.approx((80 / 120 + 1080 / 1120) / 2)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (1, 0, 0)
    assert r.objects.pairs[0][2] == pytest.approx(80 / 120)
    assert r.true_polygons[0].equals(px_box(5, 15, 5, 15))
    assert r.warnings == ()


def test_multiple_objects_one_missed_one_false(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A, B, C]))
    pred = write_mask(tmp_path / "pred.tif", draw([A, B_SHIFTED, D]))
    r = evaluate(pred, truth)
    px = r.pixel
    assert (px.tp, px.fp, px.fn, px.tn) == (170, 130, 130, 770)
    assert px.iou == pytest.approx(170 / 430)
    assert px.precision == pytest.approx(170 / 300) and px.recall == pytest.approx(170 / 300)
    assert px.accuracy == pytest.approx(940 / 1200)
    assert px.miou == pytest.approx((170 / 430 + 770 / 1030) / 2)
    m = r.objects
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert (m.precision, m.recall, m.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert sorted(round(i, 6) for _, _, i in m.pairs) == [round(70 / 130, 6), 1.0]
    assert r.pred_polygons[m.false_positives[0]].equals(px_box(*D))
    assert r.true_polygons[m.false_negatives[0]].equals(px_box(*C))


def test_metrics_agree_with_the_training_confusion_matrix(tmp_path: Path) -> None:
    t, p = draw([A, B, C]), draw([A, B_SHIFTED, D])
    r = evaluate(write_mask(tmp_path / "p.tif", p), write_mask(tmp_path / "t.tif", t))
    cm = ConfusionMatrix(2)
    cm.update(p, t)
    m = cm.compute()
    assert (r.pixel.iou, r.pixel.accuracy, r.pixel.miou, r.pixel.f1) == (
        m["iou"], m["pixel_accuracy"], m["miou"], m["f1"])


def test_empty_prediction(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    pred = write_mask(tmp_path / "pred.tif", draw([]))
    r = evaluate(pred, truth)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (0, 0, 100, 1100)
    assert (r.pixel.iou, r.pixel.precision, r.pixel.recall, r.pixel.f1) == (0.0, 0.0, 0.0, 0.0)
    assert r.pixel.accuracy == pytest.approx(1100 / 1200)
    assert r.pixel.miou == pytest.approx((0 + 1100 / 1200) / 2)
    assert r.objects.scores() == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 1}
    assert r.warnings == ()


def test_empty_truth_gives_defined_metrics_and_a_warning(tmp_path: Path, caplog) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([]))
    pred = write_mask(tmp_path / "pred.tif", draw([A]))
    with caplog.at_level(logging.WARNING, logger="geoseg.evaluation"):
        r = evaluate(pred, truth)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (0, 100, 0, 1100)
    assert (r.pixel.iou, r.pixel.precision, r.pixel.recall, r.pixel.f1) == (0.0, 0.0, 0.0, 0.0)
    assert r.objects.scores() == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 0}
    msg = (f"{truth}: the truth has no rooftops in the evaluated area; recall, IoU and F1 are "
           "1.0 if the prediction is empty too, else 0.0")
    assert r.warnings == (msg,)
    assert [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING] == [msg]


def test_both_empty_is_perfect(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([]))
    pred = write_mask(tmp_path / "pred.tif", draw([]))
    r = evaluate(pred, truth)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (0, 0, 0, 1200)
    d = r.to_dict()
    assert [d["pixel"][k] for k in ("iou", "precision", "recall", "f1", "accuracy", "miou")] == [1.0] * 6
    assert d["object"] | {} == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0,
                                "n_pred": 0, "n_true": 0, "iou_threshold": 0.5}
    assert len(r.warnings) == 1


def test_empty_truth_vector_file(tmp_path: Path) -> None:
    truth = write_vector(tmp_path / "truth.gpkg", [])
    pred = write_mask(tmp_path / "pred.tif", draw([A]))
    r = evaluate(pred, truth)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (0, 100, 0, 1100)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (0, 1, 0)
    assert "the truth has no rooftops" in r.warnings[0]


def test_both_empty_vector_files_without_area(tmp_path: Path) -> None:
    r = evaluate(write_vector(tmp_path / "p.gpkg", []), write_vector(tmp_path / "t.gpkg", []))
    assert r.pixel.total == 0
    assert (r.pixel.iou, r.pixel.accuracy, r.objects.f1) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------- grids, CRSs, nodata


def test_vector_truth_in_4326_against_raster_in_32633(tmp_path: Path) -> None:
    truth = write_vector(tmp_path / "truth.geojson", [px_box(*A), px_box(*B), px_box(*C)],
                         to_crs="EPSG:4326")
    assert geopandas.read_file(truth).crs.to_epsg() == 4326
    pred = write_mask(tmp_path / "pred.tif", draw([A, B_SHIFTED, D]))
    r = evaluate(pred, truth)
    assert r.grid.crs.to_epsg() == 32633
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (170, 130, 130, 770)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (2, 1, 1)
    assert sorted(i for _, _, i in r.objects.pairs) == pytest.approx([70 / 130, 1.0], abs=1e-6)
    # and the other way round: the vector file is the prediction
    r = evaluate(truth, pred)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn) == (170, 130, 130)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (2, 1, 1)


def test_prediction_on_another_grid_is_resampled_onto_the_truth(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A, B, C]))
    fine = np.repeat(np.repeat(draw([A, B_SHIFTED, D]), 2, axis=0), 2, axis=1)  # 0.5 m pixels
    pred = write_mask(tmp_path / "pred.tif", fine, transform=Affine(0.5, 0, X0, 0, -0.5, Y0))
    r = evaluate(pred, truth)
    assert (r.grid.width, r.grid.height, r.grid.res) == (W, H, (1.0, 1.0))
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (170, 130, 130, 770)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (2, 1, 1)


def test_prediction_covering_part_of_the_truth_counts_only_the_overlap(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A, B, C]))
    # prediction of the right 25 columns only (an aligned grid offset by 15 px)
    part = draw([A, B_SHIFTED, D])[:, 15:]
    pred = write_mask(tmp_path / "pred.tif", part, transform=Affine(1, 0, X0 + 15, 0, -1, Y0))
    r = evaluate(pred, truth)
    assert r.pixel.total == 25 * 30
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn) == (70, 130, 30)


def test_nodata_and_ignore_value_are_ignored(tmp_path: Path) -> None:
    t = draw([A, C])
    t[25:, :] = 255                                  # ignore index in a class-id mask
    truth = write_mask(tmp_path / "truth.tif", t)
    p = draw([A, C])
    p[:5, :] = 7                                     # declared nodata
    pred = write_mask(tmp_path / "pred.tif", p, nodata=7)
    r = evaluate(pred, truth)
    assert r.pixel.total == 40 * 20
    # A loses its 3 rows under the nodata; C loses its 3 rows in the ignored part
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn) == (70 + 70, 0, 0)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (2, 0, 0)


def test_class_id_selects_the_class(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]) + 2 * draw([C]))
    pred = write_mask(tmp_path / "pred.tif", draw([A]) + 2 * draw([D]))
    assert (evaluate(pred, truth).pixel.tp, evaluate(pred, truth).pixel.fn) == (100, 0)
    r = evaluate(pred, truth, class_id=2)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn) == (0, 100, 100)


def test_objects_cut_by_blocks_are_merged(tmp_path: Path) -> None:
    a = draw([(1, 20, 3, 9), (14, 20, 3, 30), (22, 29, 31, 39), (2, 6, 31, 35), (6, 10, 35, 39)])
    mask = write_mask(tmp_path / "m.tif", a)
    whole = evaluate(mask, mask)
    blocks = evaluate(mask, mask, block_size=4)
    # the L, the square, and two squares touching only at a corner (4-connected: separate)
    assert whole.objects.n_true == blocks.objects.n_true == 4
    assert sorted(shapely.area(blocks.true_polygons)) == sorted(shapely.area(whole.true_polygons))
    assert sorted(shapely.area(blocks.true_polygons)) == [16, 16, 56, 6 * 19 + 6 * 21]
    assert blocks.pixel == whole.pixel
    assert all(p.is_valid and p.geom_type == "Polygon" for p in blocks.true_polygons)


def test_synthetic_scene_mask_against_its_roof_polygons(synthetic_scene) -> None:
    r = evaluate(synthetic_scene.mask, synthetic_scene.roofs, block_size=100)
    assert r.pixel.iou == 1.0
    assert r.objects.n_true == len(synthetic_scene.polygons)
    assert r.objects.tp == r.objects.n_pred == r.objects.n_true


# ----------------------------------------------------------------- two vector files


def test_two_vector_files_are_rasterised_on_a_metric_grid(tmp_path: Path) -> None:
    truth = write_vector(tmp_path / "t.gpkg", [box(X0, 4000000, X0 + 10, 4000010)])
    pred = write_vector(tmp_path / "p.gpkg", [box(X0 + 2, 4000000, X0 + 12, 4000010)])
    r = evaluate(pred, truth)
    # 0.25 m grid over the union of both: 48 x 40 px
    assert (r.grid.width, r.grid.height, r.grid.res) == (48, 40, (0.25, 0.25))
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (1280, 320, 320, 0)
    assert r.objects.pairs[0][2] == pytest.approx(80 / 120)
    r = evaluate(pred, truth, resolution=1.0)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (80, 20, 20, 0)


def test_two_vector_files_in_degrees_use_a_utm_grid(tmp_path: Path) -> None:
    truth = write_vector(tmp_path / "t.geojson", [px_box(*A)], to_crs="EPSG:4326")
    pred = write_vector(tmp_path / "p.geojson", [px_box(*A)], to_crs="EPSG:4326")
    r = evaluate(pred, truth, resolution=0.5)
    assert r.grid.crs.to_epsg() == 32633
    assert r.pixel.iou == 1.0 and r.objects.tp == 1
    assert r.pixel.tp == pytest.approx(400, abs=4)


def test_the_utm_zone_is_the_aoi_s_when_the_truth_spans_continents(tmp_path: Path) -> None:
    """A truth layer of two cities 90° apart (EPSG:4326), evaluated in one of them: that city's
    UTM zone (33N, 15° E), not the zone of the truth's middle (40N, 56° E), where a grid
    "metre" is about a quarter less on the ground."""
    near = geopandas.GeoSeries([px_box(*A), px_box(*C)], crs=UTM).to_crs(4326)
    far = shapely.transform(near[0], lambda xy: xy + [82.0, 0.0])  # the same house 82° east
    truth_path = tmp_path / "t.gpkg"
    geopandas.GeoDataFrame({"id": [0, 1, 2]}, geometry=[*near, far], crs="EPSG:4326").to_file(truth_path)
    pred = write_vector(tmp_path / "p.geojson", [px_box(*A)], to_crs="EPSG:4326")
    aoi = write_vector(tmp_path / "aoi.geojson", [box(X0, Y0 - 30, X0 + 40, Y0)], to_crs="EPSG:4326")
    r = evaluate(pred, truth_path, aoi=aoi, resolution=0.5)
    assert r.grid.crs.to_epsg() == 32633
    # Ground metres as asked: A's 100 m² are 400 pixels of 0.25 m², C's missed 400 more.
    assert r.pixel.tp == pytest.approx(400, abs=8) and r.pixel.fn == pytest.approx(400, abs=8)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (1, 0, 1)


# ----------------------------------------------------------------- AOI


def test_aoi_in_another_crs_restricts_pixels_and_objects(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A, B, C]))
    pred = write_mask(tmp_path / "pred.tif", draw([A, B_SHIFTED, D]))
    aoi = write_vector(tmp_path / "aoi.geojson", [box(X0, Y0 - 30, X0 + 15, Y0)], to_crs="EPSG:4326")
    r = evaluate(pred, truth, aoi=aoi)
    # inside columns 0..14: truth A and C, prediction A
    assert r.pixel.total == 15 * 30
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (100, 0, 100, 250)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (1, 0, 1)
    assert r.aoi == aoi


def test_aoi_clips_vector_polygons(tmp_path: Path) -> None:
    truth = write_vector(tmp_path / "truth.gpkg", [px_box(*A), px_box(*C)], to_crs="EPSG:4326")
    pred = write_mask(tmp_path / "pred.tif", draw([A]))
    aoi = write_vector(tmp_path / "aoi.gpkg", [box(X0, Y0 - 30, X0 + 7, Y0)])
    r = evaluate(pred, truth, aoi=aoi)
    assert (r.pixel.tp, r.pixel.fp, r.pixel.fn, r.pixel.tn) == (50, 0, 50, 110)
    assert sorted(shapely.area(r.true_polygons)) == pytest.approx([50, 50], abs=1e-4)
    assert (r.objects.tp, r.objects.fp, r.objects.fn) == (1, 0, 1)
    assert r.objects.pairs[0][2] == pytest.approx(1.0, abs=1e-6)


def test_aoi_outside_the_area_is_an_error(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "m.tif", draw([A]))
    aoi = write_vector(tmp_path / "aoi.gpkg", [box(X0 + 100, Y0, X0 + 110, Y0 + 10)])
    with pytest.raises(GeoreferenceError) as exc:
        evaluate(mask, mask, aoi=aoi)
    assert str(exc.value) == (
        f"{aoi}: does not overlap the evaluated area (AOI extent (500100.00, 4000030.00, "
        "500110.00, 4000040.00), area extent (500000.00, 4000000.00, 500040.00, 4000030.00) "
        "in EPSG:32633); pass an AOI polygon inside the prediction and truth"
    )


# ----------------------------------------------------------------- bad input


def test_prediction_and_truth_that_do_not_overlap(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    pred = write_mask(tmp_path / "pred.tif", draw([A]), transform=Affine(1, 0, 600000, 0, -1, Y0))
    with pytest.raises(GeoreferenceError) as exc:
        evaluate(pred, truth)
    assert str(exc.value) == (
        f"{pred}: does not overlap the truth {truth} (prediction extent (600000.00, 4000000.00, "
        "600040.00, 4000030.00), truth extent (500000.00, 4000000.00, 500040.00, 4000030.00) "
        "in EPSG:32633); pass a prediction and a truth of the same area"
    )


def test_vector_prediction_elsewhere_names_extents_in_the_grid_crs(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    pred = write_vector(tmp_path / "pred.geojson", [box(16.0, 45.0, 16.001, 45.001)], crs="EPSG:4326")
    with pytest.raises(GeoreferenceError, match=r"does not overlap the truth .* in EPSG:32633\); "):
        evaluate(pred, truth)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.tif", None, "file does not exist; check the path"),
        ("empty.tif", b"", "the file is empty; pass a mask GeoTIFF or a vector file "
                           "(GeoPackage, GeoJSON, Shapefile)"),
        ("notes.txt", b"hello\n", "is neither a raster nor a vector file GDAL can read; pass a mask "
                                  "GeoTIFF or a vector file (GeoPackage, GeoJSON, Shapefile)"),
    ],
)
def test_unreadable_inputs(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(InputFileError) as exc:
        evaluate(bad, truth)
    assert str(exc.value) == f"{bad}: {message}"


def test_broken_geojson_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "roofs.geojson"
    bad.write_text("{not json")
    with pytest.raises(InputFileError, match=r"roofs.geojson: is not a vector file GDAL can read \("):
        evaluate(bad, bad)


def test_an_rgb_image_is_not_a_mask(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    rgb = write_mask(tmp_path / "rgb.tif", np.zeros((3, H, W), dtype=np.uint8))
    with pytest.raises(InputFileError) as exc:
        evaluate(rgb, truth)
    assert str(exc.value) == (f"{rgb}: has 3 bands, expected a single-band class mask; pass the mask "
                              "GeoTIFF (geoseg predict --mask-out) or a vector file")
    prob = write_mask(tmp_path / "prob.tif",
                      np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W))
    with pytest.raises(InputFileError, match=r"prob.tif: has more than 256 distinct values, so it is "
                                             r"not a class mask; pass a mask"):
        evaluate(prob, truth)


def test_points_are_not_buildings(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    pts = write_vector(tmp_path / "pts.gpkg", [shapely.Point(X0 + 1, Y0 - 1)])
    with pytest.raises(InputFileError) as exc:
        evaluate(pts, truth)
    assert str(exc.value) == (f"{pts}: has no polygon geometries (found Point); pass a polygon "
                              "layer (building outlines)")


def test_layer_choice_in_multi_layer_files(tmp_path: Path, caplog) -> None:
    import pandas
    import pyogrio

    truth = write_mask(tmp_path / "truth.tif", draw([A, C]))
    gpkg = tmp_path / "layers.gpkg"
    pyogrio.write_dataframe(pandas.DataFrame({"x": [1]}), gpkg, layer="aaa_styles")  # no geometry
    geopandas.GeoDataFrame(geometry=[px_box(*A)], crs=UTM).to_file(gpkg, layer="roofs")
    with caplog.at_level(logging.WARNING):
        assert evaluate(gpkg, truth).objects.n_pred == 1
    assert caplog.records == []
    geopandas.GeoDataFrame(geometry=[px_box(*A), px_box(*C)], crs=UTM).to_file(gpkg, layer="rooftops")
    geopandas.GeoDataFrame(geometry=[px_box(*D)], crs=UTM).to_file(gpkg, layer="zzz")
    with caplog.at_level(logging.WARNING):
        assert evaluate(gpkg, truth).objects.tp == 2   # the layer geoseg predict writes
    assert caplog.records == []
    gpkg2 = tmp_path / "two.gpkg"
    geopandas.GeoDataFrame(geometry=[px_box(*D)], crs=UTM).to_file(gpkg2, layer="first")
    geopandas.GeoDataFrame(geometry=[px_box(*A)], crs=UTM).to_file(gpkg2, layer="second")
    with caplog.at_level(logging.WARNING):
        assert evaluate(gpkg2, truth).objects.fp == 1
    assert f"{gpkg2}: has 2 layers, reading the first one (first)" in caplog.text


def test_shapefile_without_crs_needs_assume_crs(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A]))
    shp = tmp_path / "roofs.shp"
    geopandas.GeoDataFrame(geometry=[px_box(*A)]).to_file(shp)
    with pytest.raises(GeoreferenceError) as exc:
        evaluate(shp, truth)
    assert str(exc.value) == (f"{shp}: has no CRS; define one (ogr2ogr -a_srs EPSG:XXXX) or pass "
                              "--assume-crs EPSG:XXXX")
    assert evaluate(shp, truth, assume_crs=UTM).pixel.iou == 1.0


def test_bad_options(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "m.tif", draw([A]))
    with pytest.raises(ConfigError, match=r"^resolution should be > 0 metres, got 0; pass e.g. 0.25$"):
        evaluate(mask, mask, resolution=0)
    with pytest.raises(ConfigError, match=r"^iou_threshold should be in \(0, 1\], got 1.5"):
        evaluate(mask, mask, iou_threshold=1.5)


# ----------------------------------------------------------------- panels


def _colour_pixels(png: Path, colour: tuple[float, float, float]) -> int:
    import matplotlib.image

    img = matplotlib.image.imread(png)[:, :, :3]
    return int(np.count_nonzero(np.all(np.abs(img - np.asarray(colour)) < 0.02, axis=2)))


def test_panels_colour_missed_and_false_buildings(tmp_path: Path) -> None:
    truth = write_mask(tmp_path / "truth.tif", draw([A, B, C]))
    pred = write_mask(tmp_path / "pred.tif", draw([A, B_SHIFTED, D]))
    image = write_mask(tmp_path / "image.tif",
                       np.stack([draw([A, B, C], value=200) + 20] * 3).astype(np.uint8))
    perfect = write_panels(evaluate(truth, truth), tmp_path / "perfect.png", image=image)
    # the legend shows one patch of each colour: with nothing missed or false, only those
    legend = _colour_pixels(perfect, MISSED_COLOUR)
    assert legend > 0 and _colour_pixels(perfect, FALSE_COLOUR) == pytest.approx(legend, rel=0.1)
    assert _colour_pixels(perfect, MATCHED_COLOUR) > 10 * legend
    r = evaluate(pred, truth)
    out = write_panels(r, tmp_path / "panels.png", image=image)
    assert out == tmp_path / "panels.png"
    assert _colour_pixels(out, MISSED_COLOUR) > 2 * legend   # C
    assert _colour_pixels(out, FALSE_COLOUR) > 2 * legend    # D
    with pytest.raises(OutputError, match="already exists; pass --overwrite to replace it"):
        write_panels(r, out)
    write_panels(r, out, overwrite=True)


def test_panels_image_elsewhere_is_refused_without_output(tmp_path: Path) -> None:
    mask = write_mask(tmp_path / "m.tif", draw([A]))
    image = write_mask(tmp_path / "far.tif", np.zeros((3, 10, 10), np.uint8),
                       transform=Affine(1, 0, 700000, 0, -1, Y0))
    with pytest.raises(GeoreferenceError, match=r"far.tif: does not overlap the evaluated area"):
        write_panels(evaluate(mask, mask), tmp_path / "p.png", image=image)
    assert list(tmp_path.glob("*.png")) == [] and list(tmp_path.glob(".p.*")) == []


def test_panel_windows_are_those_with_most_buildings(tmp_path: Path) -> None:
    # 40 x 30 grid in 10 px windows: 4 x 3 windows; buildings of 2 x 2 px
    t = np.zeros((H, W), np.uint8)
    centres = {(0, 0): 1, (1, 2): 3, (2, 3): 2, (0, 3): 2}  # (window row, col): buildings
    for (wr, wc), n in centres.items():
        for k in range(n):
            t[wr * 10 + 1 + 3 * k: wr * 10 + 3 + 3 * k, wc * 10 + 1: wc * 10 + 3] = 1
    mask = write_mask(tmp_path / "m.tif", t)
    r = evaluate(mask, mask)
    wins = select_windows(r, window_px=10, max_windows=3)
    assert [(int(w.row_off), int(w.col_off)) for w in wins] == [(10, 20), (0, 30), (20, 30)]
    assert all((w.width, w.height) == (10, 10) for w in wins)
