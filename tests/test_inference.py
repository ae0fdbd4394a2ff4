"""Tests for geoseg.inference (and the block maths it adds to geoseg.tiling).

Stand-in models: the oracle reproduces the label carried in the scene's last
band, so the stitched mask must equal the label exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.enums import Compression
from rasterio.features import rasterize
from shapely.geometry import box

from _prediction_helpers import Constant, Oracle, draw_rectangles, geodesic_area, oracle_meta, write_scene
from geoseg.errors import CheckpointError, ConfigError, OutputError
from geoseg.inference import (
    MASK_NODATA,
    PROB_NODATA,
    PROB_SCALE,
    WEIGHT_FLOOR,
    axis_weight_sum,
    model_throughput,
    predict_scene,
    taper_window,
)
from geoseg.inference import pipeline
from geoseg.tiling import axis_starts, block_grid, chip_grid


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Prediction's autocast dtype for ``precision`` (geoseg.devices owns the choice)."""
    from geoseg import devices

    return devices.resolve_precision(precision, device, setting="precision").dtype

CPU = dict(device="cpu", precision="32")


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _rects_for(height: int, width: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    rects = []
    for _ in range(14):
        h, w = int(rng.integers(3, 70)), int(rng.integers(3, 70))
        rects.append((int(rng.integers(0, height - 3)), int(rng.integers(0, width - 3)), h, w))
    return rects


# --- block maths (geoseg.tiling) ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 700), height=st.integers(1, 700), chip=st.sampled_from([16, 32, 48]),
    overlap_frac=st.floats(0, 0.9), block_mult=st.integers(1, 5),
)
def test_block_grid_partitions_scene_and_assigns_each_chip_once(width, height, chip, overlap_frac, block_mult):
    stride = max(1, chip - int(chip * overlap_frac))
    block = chip * block_mult
    blocks = block_grid(width, height, block_size=block, chip_size=chip, stride=stride)
    cover = np.zeros((height, width), dtype=np.int32)
    cores = {(b.row, b.col): b.core for b in blocks}
    for b in blocks:
        c = b.core
        assert c.col_off % block == 0 and c.row_off % block == 0
        cover[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] += 1
        e = b.extent
        assert (e.col_off, e.row_off) == (c.col_off, c.row_off)
        for chip_ in b.chips:
            w = chip_.window
            assert c.col_off <= w.col_off < c.col_off + c.width
            assert c.row_off <= w.row_off < c.row_off + c.height
            assert w.col_off + w.width <= e.col_off + e.width
            assert w.row_off + w.height <= e.row_off + e.height
        # The halo reaches only into the right, lower and lower-right neighbours' cores.
        right_end = min(e.col_off + e.width, width)
        bottom_end = min(e.row_off + e.height, height)
        if right_end > c.col_off + c.width:
            nb = cores[(b.row, b.col + 1)]
            assert right_end <= nb.col_off + nb.width
        if bottom_end > c.row_off + c.height:
            nb = cores[(b.row + 1, b.col)]
            assert bottom_end <= nb.row_off + nb.height
    assert (cover == 1).all()
    assigned = [ch for b in blocks for ch in b.chips]
    assert assigned and sorted(assigned, key=lambda k: (k.window.row_off, k.window.col_off)) == \
        chip_grid(width, height, size=chip, stride=stride)


def test_block_grid_refuses_blocks_smaller_than_a_chip():
    with pytest.raises(ValueError, match="at least the chip size"):
        block_grid(500, 500, block_size=64, chip_size=128, stride=96)


# --- blending weights ---------------------------------------------------------------------------


def test_taper_window_is_smooth_symmetric_and_never_zero():
    w = taper_window(64, 16)
    assert w.shape == (64,)
    np.testing.assert_array_equal(w, w[::-1])
    assert w.min() >= WEIGHT_FLOOR and w[0] < 0.02 and w[15] > 0.99
    np.testing.assert_array_equal(w[16:48], 1.0)
    assert np.all(np.diff(w[:16]) > 0)
    np.testing.assert_array_equal(taper_window(64, 0), 1.0)


def test_axis_weight_sum_counts_every_chip_touching_a_pixel():
    win = taper_window(8, 2)
    starts = axis_starts(21, 8, 6)  # 0, 6, 12, 13
    total = axis_weight_sum(starts, win, 0, 21)
    manual = np.zeros(21)
    for s in starts:
        manual[s:s + 8] += win
    np.testing.assert_allclose(total, manual)
    np.testing.assert_allclose(axis_weight_sum(starts, win, 5, 15), manual[5:15])


# --- exact stitching with the oracle ------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(300, 517), (1000, 777)])
@pytest.mark.parametrize("overlap", [0, 32, 64, 100])
def test_oracle_mask_equals_label_exactly(tmp_path, height, width, overlap):
    label = draw_rectangles(height, width, _rects_for(height, width, seed=height + overlap))
    scene = write_scene(tmp_path / "scene.tif", label)
    model = Oracle()
    res = predict_scene(
        scene, model, oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif",
        prob_out=tmp_path / "prob.tif", polygons=False, overlap=overlap, block_size=256,
        batch_size=8, **CPU,
    )
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)
    prob = _read(tmp_path / "prob.tif")
    np.testing.assert_array_equal(prob >= PROB_SCALE // 2, label == 1)
    n_chips = len(chip_grid(width, height, size=128, stride=128 - overlap))
    assert res.chips_total == res.chips_predicted == model.chips == n_chips
    assert res.blocks == -(-height // 256) * -(-width // 256) > 1
    assert res.chips_skipped == 0


class _BatchSizes(Oracle):
    """The oracle, recording the size of every batch it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        return super().forward(x)


@pytest.mark.parametrize("block_size,batch_size", [(256, 8), (128, 5), (384, 16), (128, 64)])
def test_batches_fill_across_blocks_and_only_the_last_is_partial(tmp_path, block_size, batch_size):
    """Chips left at the end of a block share a batch with the next block's: the mask stays exact."""
    height, width = 700, 517
    label = draw_rectangles(height, width, _rects_for(height, width, seed=11))
    nodata = np.zeros((height, width), bool)
    nodata[:, :200] = True  # whole chips of nodata are skipped: blocks hold different chip counts
    scene = write_scene(tmp_path / "scene.tif", label, nodata_mask=nodata)
    model = _BatchSizes()
    res = predict_scene(scene, model, oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif",
                        polygons=False, overlap=32, block_size=block_size, batch_size=batch_size, **CPU)
    mask = _read(tmp_path / "mask.tif")
    np.testing.assert_array_equal(mask[~nodata], label[~nodata])
    n = res.chips_predicted
    assert res.blocks > 1 and res.chips_skipped > 0
    assert sum(model.sizes) == n
    assert model.sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert res.batches == len(model.sizes) == -(-n // batch_size)


@pytest.mark.parametrize("height,width", [(50, 90), (40, 300), (200, 30)])
def test_scene_smaller_than_a_chip_along_an_axis(tmp_path, height, width):
    label = draw_rectangles(height, width, [(5, 5, 20, 20), (height - 10, width - 10, 10, 10)])
    scene = write_scene(tmp_path / "small.tif", label)
    predict_scene(scene, Oracle(), oracle_meta(chip_size=64), mask_out=tmp_path / "m.tif",
                  polygons=False, block_size=64, overlap=16, **CPU)
    np.testing.assert_array_equal(_read(tmp_path / "m.tif"), label)


def test_multiclass_oracle_and_class_attribute(tmp_path):
    label = draw_rectangles(300, 517, [(10, 10, 50, 60), (100, 200, 80, 40)], value=1)
    label[200:260, 300:420] = 2
    scene = write_scene(tmp_path / "mc.tif", label)
    res = predict_scene(scene, Oracle(classes=3), oracle_meta(classes=3), mask_out=tmp_path / "m.tif",
                        block_size=128, overlap=16, **CPU)
    np.testing.assert_array_equal(_read(tmp_path / "m.tif"), label)
    gdf = res.polygons
    assert sorted(gdf["class"]) == ["class1", "class1", "class2"]


def test_polygons_equal_drawn_rectangles_and_cross_blocks_as_one(tmp_path):
    # The second rectangle straddles the block boundaries at x=128 and y=128.
    rects = [(10, 10, 30, 40), (100, 90, 70, 80), (200, 400, 60, 50)]
    label = draw_rectangles(300, 517, rects)
    scene = write_scene(tmp_path / "s.tif", label)
    with rasterio.open(scene) as src:
        t = src.transform
    res = predict_scene(scene, Oracle(), oracle_meta(), block_size=128, overlap=16, **CPU)
    gdf = res.polygons
    assert res.blocks == 3 * 5
    assert len(gdf) == 3 and gdf.is_valid.all()
    assert gdf.crs == rasterio.crs.CRS.from_string("EPSG:32633")
    expected = [box(*(t @ (c, r + h)), *(t @ (c + w, r))) for r, c, h, w in rects]
    for geom in gdf.geometry:
        match = [e for e in expected if e.intersects(geom)]
        assert len(match) == 1
        assert geom.symmetric_difference(match[0]).area == 0
    assert list(gdf["id"]) == [1, 2, 3]
    assert set(gdf["scene"]) == {"s"}
    # True ground area: UTM grid metres are 0.9996 ground metres on the central meridian.
    truth = [geodesic_area(e, "EPSG:32633") for e in expected]
    np.testing.assert_allclose(sorted(gdf["area_m2"]), sorted(truth), rtol=1e-4)
    assert sorted(truth)[0] == pytest.approx(30 * 40 * 0.25 / 0.9996**2, rel=1e-4)
    np.testing.assert_allclose(gdf["confidence"], 1.0, atol=1e-3)


# --- seams, TTA, precision ----------------------------------------------------------------------


@pytest.mark.parametrize("prob_dtype", ["uint8", "float16"])
def test_constant_model_gives_exactly_constant_probability(tmp_path, prob_dtype):
    scene = write_scene(tmp_path / "c.tif", np.zeros((300, 517), np.uint8))
    predict_scene(scene, Constant((0.0, 0.7)), oracle_meta(chip_size=64), prob_out=tmp_path / "p.tif",
                  mask_out=tmp_path / "m.tif", polygons=False, overlap=24, block_size=128,
                  prob_dtype=prob_dtype, **CPU)
    prob = _read(tmp_path / "p.tif")
    expected = 1 / (1 + np.exp(-0.7))
    assert np.unique(prob).size == 1
    if prob_dtype == "uint8":
        assert prob[0, 0] == round(expected * PROB_SCALE)
    else:
        assert abs(float(prob[0, 0]) - expected) < 1e-3
    np.testing.assert_array_equal(_read(tmp_path / "m.tif"), 1)


class _ColumnRamp(torch.nn.Module):
    """Rooftop logit grows with the column: not flip-invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2) / 8
        return torch.stack([torch.zeros(n, h, w), ramp.expand(n, h, w)], dim=1)


def test_tta_averages_flips(tmp_path):
    scene = write_scene(tmp_path / "t.tif", np.zeros((150, 200), np.uint8))
    meta = oracle_meta(chip_size=64)
    predict_scene(scene, _ColumnRamp(), meta, prob_out=tmp_path / "plain.tif", polygons=False, **CPU)
    predict_scene(scene, _ColumnRamp(), meta, prob_out=tmp_path / "tta.tif", polygons=False, tta=True, **CPU)
    assert np.unique(_read(tmp_path / "plain.tif")).size > 10
    # sigmoid(a) + sigmoid(-a) = 1: the flipped pairs average to exactly 1/2.
    np.testing.assert_array_equal(_read(tmp_path / "tta.tif"), round(0.5 * PROB_SCALE))


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("16", cpu)
    with pytest.raises(ConfigError, match="precision should be one of"):
        resolve_precision("64", cpu)


def test_bf16_matches_fp32_for_the_oracle(tmp_path):
    label = draw_rectangles(200, 300, _rects_for(200, 300, seed=3))
    scene = write_scene(tmp_path / "b.tif", label)
    predict_scene(scene, Oracle(), oracle_meta(), mask_out=tmp_path / "m.tif", polygons=False,
                  device="cpu", precision="bf16")
    np.testing.assert_array_equal(_read(tmp_path / "m.tif"), label)


# --- georeference and file format ----------------------------------------------------------------


def test_outputs_share_the_scene_grid_and_are_tiled_compressed_with_overviews(tmp_path):
    label = draw_rectangles(600, 700, [(10, 10, 100, 100)])
    scene = write_scene(tmp_path / "g.tif", label)
    predict_scene(scene, Oracle(), oracle_meta(), mask_out=tmp_path / "m.tif", prob_out=tmp_path / "p.tif",
                  polygons=False, block_size=256, **CPU)
    with rasterio.open(scene) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    for name, nodata in (("m.tif", MASK_NODATA), ("p.tif", PROB_NODATA)):
        with rasterio.open(tmp_path / name) as out:
            assert out.crs == crs and out.transform == transform and out.shape == shape
            assert out.dtypes[0] == "uint8" and out.nodata == nodata
            assert out.profile["tiled"] and out.block_shapes[0] == (256, 256)
            assert out.compression == Compression.deflate
            assert out.overviews(1) == [2]
    assert sorted(os.listdir(tmp_path)) == ["g.tif", "m.tif", "p.tif"]


# --- nodata -------------------------------------------------------------------------------------


def test_nodata_is_not_predicted_and_all_nodata_chips_are_skipped(tmp_path):
    h, w = 300, 517
    label = draw_rectangles(h, w, [(20, 20, 60, 60), (150, 300, 60, 80)])
    nodata = np.zeros((h, w), dtype=bool)
    nodata[:, 380:] = True  # a wide nodata band on the right
    nodata[130:170, 320:360] = True  # a hole inside a roof
    scene = write_scene(tmp_path / "n.tif", label, nodata_mask=nodata)
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(), mask_out=tmp_path / "m.tif", prob_out=tmp_path / "p.tif",
                        overlap=16, block_size=128, **CPU)
    mask, prob = _read(tmp_path / "m.tif"), _read(tmp_path / "p.tif")
    np.testing.assert_array_equal(mask == MASK_NODATA, nodata)
    np.testing.assert_array_equal(prob == PROB_NODATA, nodata)
    np.testing.assert_array_equal(mask[~nodata], label[~nodata])
    chips = chip_grid(w, h, size=64, stride=48)
    empty = sum(bool(nodata[c.window.row_off:c.window.row_off + 64, c.window.col_off:c.window.col_off + 64].all())
                for c in chips)
    assert empty > 0
    assert res.chips_skipped == empty and model.chips == len(chips) - empty == res.chips_predicted
    gdf = res.polygons
    assert len(gdf) == 2
    with rasterio.open(scene) as src:
        t = src.transform
    hole = box(*(t @ (320, 170)), *(t @ (360, 130)))
    assert all(g.intersection(hole).area == 0 for g in gdf.geometry)


def test_all_nodata_scene_gives_empty_polygons_and_a_warning(tmp_path, caplog):
    label = np.zeros((100, 150), np.uint8)
    scene = write_scene(tmp_path / "e.tif", label, nodata_mask=np.ones_like(label, dtype=bool))
    model = Oracle()
    with caplog.at_level(logging.WARNING):
        res = predict_scene(scene, model, oracle_meta(), mask_out=tmp_path / "m.tif", **CPU)
    assert model.calls == 0 and res.chips_predicted == 0 and res.chips_skipped == res.chips_total
    assert len(res.polygons) == 0
    assert (_read(tmp_path / "m.tif") == MASK_NODATA).all()
    assert "every pixel is nodata" in caplog.text


# --- checks before any work ----------------------------------------------------------------------


def test_band_mismatch_names_the_bands(tmp_path):
    scene = write_scene(tmp_path / "four.tif", np.zeros((80, 90), np.uint8))  # 4 bands
    meta = oracle_meta(bands=(1, 2, 3))
    with pytest.raises(CheckpointError) as err:
        predict_scene(scene, Oracle(), meta, **CPU)
    assert str(err.value) == (
        f"{scene}: scene has 4 bands, model expects bands 1,2,3 (3 bands); pass --bands with 3 band "
        "numbers to choose the scene's bands (e.g. --bands 1,2,3) or use a model trained on 4-band imagery"
    )
    # Explicit band choices work: from the user, or from the checkpoint's training config.
    predict_scene(scene, Constant(), meta, bands=(2, 3, 4), polygons=False, **CPU)
    explicit = oracle_meta(bands=(1, 2, 3), config={"data": {"bands": [1, 2, 3]}})
    predict_scene(scene, Constant(), explicit, polygons=False, **CPU)
    with pytest.raises(CheckpointError, match="has 4 bands, no band 5"):
        predict_scene(scene, Constant(), meta, bands=(1, 2, 5), **CPU)


def test_resolution_far_from_training_warns_with_both(tmp_path, caplog):
    scene = write_scene(tmp_path / "r.tif", np.zeros((80, 90), np.uint8))  # 0.5 m pixels (UTM)
    with caplog.at_level(logging.WARNING, logger="geoseg.inference.pipeline"):
        # A background model: an all-rooftop one would add the warning of a mostly-rooftop prediction.
        predict_scene(scene, Constant((0.7, 0.0)), oracle_meta(resolution=0.3), polygons=False,
                      resolution="native", **CPU)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == (
        f"{scene}: ground resolution 0.5 m/px differs from the model's training data (0.3 m/px) by more "
        "than 25%; predictions may be poor (predict with --resolution auto to read it at the model's resolution)"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoseg.inference.pipeline"):
        predict_scene(scene, Constant((0.7, 0.0)), oracle_meta(resolution=0.45), polygons=False,
                      resolution="native", **CPU)
    assert caplog.records == []


def test_existing_output_is_refused_before_any_work(tmp_path):
    scene = write_scene(tmp_path / "x.tif", np.zeros((80, 90), np.uint8))
    (tmp_path / "m.tif").write_bytes(b"old")
    model = Oracle()
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        predict_scene(scene, model, oracle_meta(), mask_out=tmp_path / "p_new.tif", prob_out=tmp_path / "m.tif",
                      **CPU)
    assert model.calls == 0
    assert sorted(os.listdir(tmp_path)) == ["m.tif", "x.tif"]
    assert (tmp_path / "m.tif").read_bytes() == b"old"


class _Explodes(Oracle):
    def forward(self, x):
        if self.calls >= 3:
            raise RuntimeError("boom")
        return super().forward(x)


def test_failure_midway_leaves_no_output(tmp_path):
    scene = write_scene(tmp_path / "f.tif", draw_rectangles(300, 517, [(10, 10, 40, 40)]))
    with pytest.raises(RuntimeError, match="boom"):
        predict_scene(scene, _Explodes(), oracle_meta(), mask_out=tmp_path / "out" / "m.tif",
                      prob_out=tmp_path / "p.tif", block_size=128, batch_size=2, **CPU)
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert leftovers == ["f.tif"]


def test_bad_overlap_is_a_config_error(tmp_path):
    scene = write_scene(tmp_path / "o.tif", np.zeros((80, 90), np.uint8))
    with pytest.raises(ConfigError, match="overlap should be from 0 to 63 pixels"):
        predict_scene(scene, Oracle(), oracle_meta(), overlap=64, **CPU)


# --- throughput hook ----------------------------------------------------------------------------


def test_model_throughput_runs_the_predictor_on_preloaded_chips():
    model = Oracle()
    tp = model_throughput(model, in_channels=4, chip_size=32, classes=2, batch_size=4, repeats=3, warmup=1,
                          device="cpu", precision="32")
    assert model.calls == 4 and model.chips == 16
    assert tp.chips_per_s > 0 and tp.batch_size == 4 and tp.precision == "32" and tp.device == "cpu"


def test_model_throughput_feeds_inference_tensors_as_prediction_does(monkeypatch):
    """A compiled graph guards on it: chips made outside inference mode would compile it twice."""
    from geoseg.inference import runtime

    seen: list[bool] = []
    call = runtime.ChipPredictor.__call__

    def recording(self, x):
        seen.append(x.is_inference())
        return call(self, x)

    monkeypatch.setattr(runtime.ChipPredictor, "__call__", recording)
    model_throughput(Oracle(), in_channels=4, chip_size=32, classes=2, batch_size=2, repeats=2, warmup=1,
                     device="cpu", precision="32")
    assert seen == [True, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_gpu_path_stitches_exactly(tmp_path):
    label = draw_rectangles(1000, 777, _rects_for(1000, 777, seed=9))
    scene = write_scene(tmp_path / "gpu.tif", label)
    res = predict_scene(scene, Oracle(), oracle_meta(chip_size=128), mask_out=tmp_path / "m.tif",
                        prob_out=tmp_path / "p.tif", overlap=32, block_size=256, device="cuda", precision="bf16")
    np.testing.assert_array_equal(_read(tmp_path / "m.tif"), label)
    assert res.device.startswith("cuda") and res.precision == "bf16" and len(res.polygons) > 0


def test_compiled_model_runs_full_batches_and_stitches_exactly(tmp_path):
    """torch.compile path (a real compile): the mask still equals the label."""
    label = draw_rectangles(300, 517, _rects_for(300, 517, seed=7))
    scene = write_scene(tmp_path / "scene.tif", label)
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif", polygons=False,
                        overlap=32, block_size=256, batch_size=8, compile_model=True, **CPU)
    assert res.compiled
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)
    n_chips = len(chip_grid(517, 300, size=128, stride=96))
    assert res.chips_predicted == n_chips and n_chips % 8 != 0  # the last batch is partial


def test_compiled_graph_sees_only_full_batches_the_last_runs_eager(tmp_path, monkeypatch):
    """The compiled graph gets every full batch and only those (one shape, never padded); the
    run's last, partial batch goes through the eager model, chip for chip."""
    from geoseg.inference import runtime

    compiled_shapes: list[int] = []

    def recording(model, _device):
        def call(x):
            compiled_shapes.append(x.shape[0])
            return model(x)
        return call

    monkeypatch.setattr(runtime, "compiled_model", recording)
    label = draw_rectangles(300, 517, _rects_for(300, 517, seed=7))
    scene = write_scene(tmp_path / "scene.tif", label)
    model = Oracle()
    res = predict_scene(scene, model, oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif", polygons=False,
                        overlap=32, block_size=256, batch_size=8, compile_model=True, **CPU)
    n_chips = len(chip_grid(517, 300, size=128, stride=96))
    assert (n_chips, res.compiled, res.batches) == (18, True, 3)
    assert compiled_shapes == [8, 8]  # the 2 chips left ran eager, not padded to 8
    assert (model.calls, model.chips) == (3, 18)  # every chip once, no padding chip
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)


def test_compile_failure_falls_back_to_the_eager_model(tmp_path, monkeypatch, caplog):
    from geoseg.inference import runtime

    def broken(*_args):
        def call(_x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(runtime, "compiled_model", broken)
    label = draw_rectangles(200, 260, [(10, 10, 50, 60)])
    scene = write_scene(tmp_path / "scene.tif", label)
    with caplog.at_level(logging.WARNING):
        res = predict_scene(scene, Oracle(), oracle_meta(chip_size=64), mask_out=tmp_path / "mask.tif",
                            polygons=False, batch_size=8, compile_model=True, **CPU)
    assert not res.compiled
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)
    assert ("torch.compile failed (InvalidCxxCompiler: No working C++ compiler found); "
            "predicting with the eager model") in caplog.text


@pytest.mark.parametrize("amx, least", [(False, 20000), (True, 4000)])
def test_compile_is_automatic_only_for_big_cpu_scenes(monkeypatch, amx, least):
    from geoseg import devices
    from geoseg.inference.runtime import compile_wanted

    monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)  # AMX: compiling pays from fewer chips
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted(None, cpu, least) and not compile_wanted(None, cpu, least - 1)
    assert not compile_wanted(None, cuda, 10**6)  # opt in on GPUs: --compile
    assert compile_wanted(True, cpu, 1) and not compile_wanted(False, cpu, 10**6)


def _randomise_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with statistics and affine weights far from the identity, as a trained model has."""
    gen = torch.Generator().manual_seed(3)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def test_batch_norms_fold_into_the_convolutions_and_the_callers_model_is_untouched():
    import segmentation_models_pytorch as smp

    from geoseg.inference.runtime import ChipPredictor

    model = _randomise_batch_norms(smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x)
    predictor = ChipPredictor(model, mean=[0.0] * 3, std=[1.0] * 3, classes=2, device=torch.device("cpu"),
                              autocast_dtype=None)
    bn = torch.nn.BatchNorm2d
    assert sum(type(m) is bn for m in predictor.eager.modules()) == 0  # all 29 folded
    assert sum(type(m) is bn for m in model.modules()) == 29  # the caller's model keeps them ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... and its weights
    with torch.inference_mode():
        got = predictor.eager(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # One fold per model, shared by every scene's predictor (the compiled model is cached on it) ...
    again = ChipPredictor(model, mean=[0.0] * 3, std=[1.0] * 3, classes=2, device=torch.device("cpu"),
                          autocast_dtype=None)
    assert again.eager is predictor.eager
    # ... until its weights change (a training step between two predictions)
    with torch.no_grad():
        model.encoder.conv1.weight.mul_(2.0)
    changed = ChipPredictor(model, mean=[0.0] * 3, std=[1.0] * 3, classes=2, device=torch.device("cpu"),
                            autocast_dtype=None)
    assert changed.eager is not predictor.eager
    with torch.inference_mode():
        torch.testing.assert_close(changed.eager(x), model(x), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_model_is_prepared_once_for_every_scene_until_it_changes(monkeypatch):
    """Eval mode, device and memory format are set by the first scene's predictor; the next ones find them so
    (no walk over every module), unless a module went back to training, or the weights changed."""
    import segmentation_models_pytorch as smp

    from geoseg.inference.runtime import ChipPredictor

    model = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=2)
    moved: list[int] = []
    real_to = torch.nn.Module.to

    def counting_to(self, *args, **kwargs):
        if self is model:
            moved.append(1)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", counting_to)

    def predictor() -> ChipPredictor:
        return ChipPredictor(model, mean=[0.0] * 3, std=[1.0] * 3, classes=2, device=torch.device("cpu"),
                             autocast_dtype=None)

    first = predictor()
    assert len(moved) == 1 and not any(m.training for m in model.modules())
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    again = predictor()
    assert len(moved) == 1 and again.eager is first.eager
    model.decoder.train()  # one part back in training mode (its batch norms would use batch statistics)
    predictor()
    assert len(moved) == 2 and not any(m.training for m in model.modules())
    with torch.no_grad():
        model.segmentation_head[0].bias.add_(1.0)
    changed = predictor()
    assert len(moved) == 3 and changed.eager is not first.eager


class _ConvFeedsTwo(torch.nn.Module):
    """A convolution whose output goes to its batch norm and around it: folding would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(self.bn(y) + y)


def test_a_fold_that_would_change_the_output_is_not_made(caplog):
    from geoseg.inference.runtime import fold_batchnorm

    model = _randomise_batch_norms(_ConvFeedsTwo())
    with caplog.at_level(logging.INFO, logger="geoseg.inference.runtime"):
        assert fold_batchnorm(model, in_channels=3) is model
    assert "batch norms left unfolded: the folded model's output differs" in caplog.text


_HEAP_PROBE = """
import sys, torch
from geoseg.inference.runtime import prefer_heap
if not prefer_heap():
    print("no glibc"); sys.exit(0)
activations = torch.ones(40 << 20, dtype=torch.uint8)  # a model call's: far above glibc's mmap threshold
address = activations.data_ptr()
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= address < high:
        print(rest[-1] if len(rest) == 5 else "anonymous", high - low)
"""


def test_prediction_serves_large_allocations_from_the_heap():
    """A model call's 40 MB activations come from the C heap, where the next call reuses them, not
    from a mapping of their own that freeing hands back and the next call faults in again."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True).stdout
    if out.strip() == "no glibc":
        pytest.skip("the C library is not glibc")
    name, size = out.split()
    assert name == "[heap]", out


def test_free_heap_is_handed_back_once_a_default_block_of_output_is_written(monkeypatch):
    """The writer reports every block it writes; the pages go back once 2048² core pixels have been written
    since the last time (what they hold includes the model's freed activations, which its next call would
    fault in again): after each default block of a big scene, after every 16 tiles of 512 px."""
    from geoseg.inference import runtime

    trims: list[int] = []
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(runtime, "_heap_pixels", 0)
    assert runtime.HEAP_RELEASE_PIXELS == 2048 * 2048
    assert [runtime.release_free_heap(2048 * 2048) for _ in range(3)] == [True] * 3
    tiles = [runtime.release_free_heap(512 * 512) for _ in range(40)]
    assert [i for i, done in enumerate(tiles) if done] == [15, 31]
    assert runtime.release_free_heap(2048 * 2048 - 8 * 512 * 512) is True  # 8 tiles' worth were left
    # A scene's end: a tile's hands nothing back; a big scene's does, whatever is counted since the last time.
    assert runtime.release_free_heap(512 * 512, scene_end=512 * 512) is False
    assert runtime.release_free_heap(1568 * 1568, scene_end=20000 * 20000) is True
    assert runtime.release_free_heap(2048 * 2048 - 1, scene_end=2048 * 2048 - 1) is False
    assert trims == [0] * 7
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: None)  # no malloc_trim (not glibc): nothing to do
    assert runtime.release_free_heap(10**9) is False


def test_the_writer_reports_each_block_it_wrote_with_its_pixels(tmp_path, monkeypatch):
    """A 700 x 620 scene in 256-px blocks (3 x 3, edge blocks smaller): one report per block, its core pixels,
    then the scene's end with all of them."""
    from geoseg.inference import streams

    reports: list[tuple[int, int | None]] = []
    monkeypatch.setattr(streams, "release_free_heap",
                        lambda pixels, scene_end=None: reports.append((pixels, scene_end)) or False)
    label = draw_rectangles(700, 620, _rects_for(700, 620, seed=3))
    scene = write_scene(tmp_path / "scene.tif", label)
    predict_scene(scene, Oracle(), oracle_meta(chip_size=128), device="cpu", precision="32", block_size=256,
                  overlap=32, mask_out=tmp_path / "mask.tif", polygons=False)
    blocks = sorted(h * w for h in (256, 256, 188) for w in (256, 256, 108))
    assert sorted(pixels for pixels, _ in reports if _ is None) == blocks  # one report per block
    assert [end for _, end in reports if end is not None] == [700 * 620]  # and the scene's end, last
    assert reports[-1] == (0, 700 * 620)


def test_a_block_is_written_in_tile_rows_as_they_become_final(tmp_path, monkeypatch):
    """One 1024-px block (tiles of 256 rows), chips of 128 every 96 px, batches of 4: the writer gets the
    core's tile rows while the model is still running on the rows below, in order and without a gap,
    each one only once no chip still to come reaches it; mask and polygons as predicted whole."""
    from geoseg.inference import batching, streams

    monkeypatch.setattr(batching, "OWN_MODEL_THREAD", False)  # the calls counted below: the model in this thread

    label = draw_rectangles(700, 620, _rects_for(700, 620, seed=3))
    scene = write_scene(tmp_path / "scene.tif", label)
    model = Oracle()
    handed: list[tuple[int, int, int, bool]] = []  # rows, model calls so far, block done
    put = streams.CoreWriter.put

    def recording(self, item):
        if item is not None:
            win = item.window
            handed.append((int(win.row_off), int(win.row_off + win.height), model.calls, item.block_done))
        return put(self, item)

    monkeypatch.setattr(streams.CoreWriter, "put", recording)
    res = predict_scene(scene, model, oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif", overlap=32,
                        block_size=1024, batch_size=4, min_area=0.0, simplify=0.0, **CPU)
    # Rows of chips start at 0, 96, ..., 480 and 572, 7 chips each; a row of pixels is final once every
    # chip starting above it is through: rows 0-255 once the 21 chips of rows 0-192 are (call 6),
    # 256-511 once the 42 of rows 0-480 are (call 11); the rest as the block closes (call 13 of 13).
    starts = sorted({int(c.window.row_off) for c in chip_grid(620, 700, size=128, stride=96)})
    assert starts == [0, 96, 192, 288, 384, 480, 572] and res.batches == 13
    assert handed == [(0, 256, 6, False), (256, 512, 11, False), (512, 700, 13, True)]
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)
    whole = predict_scene(scene, Oracle(), oracle_meta(chip_size=128), overlap=32, block_size=1024,
                          batch_size=64, min_area=0.0, simplify=0.0, **CPU)
    assert len(res.polygons) == len(whole.polygons)
    assert all(a.equals_exact(b, 0) for a, b in zip(res.polygons.geometry, whole.polygons.geometry))


def test_reader_threads_serve_every_scene_of_the_process(tmp_path, monkeypatch):
    """Scenes share the reader threads: a thread's first GDAL open pays GDAL's set-up for it,
    which a new thread per scene paid again for every tile. A forked child starts its own."""
    import threading

    from geoseg.inference import streams

    readers: list[tuple[str, int, str]] = []
    read = streams.BlockReader._read

    def recording(self, block):
        readers.append((Path(self.path).stem, threading.get_native_id(), threading.current_thread().name))
        return read(self, block)

    monkeypatch.setattr(streams.BlockReader, "_read", recording)
    for name in ("a", "b"):
        label = draw_rectangles(300, 300, _rects_for(300, 300, seed=len(name)))
        scene = write_scene(tmp_path / f"{name}.tif", label)
        predict_scene(scene, Oracle(), oracle_meta(chip_size=128), mask_out=tmp_path / f"{name}_mask.tif",
                      polygons=False, overlap=32, block_size=256, **CPU)
        np.testing.assert_array_equal(_read(tmp_path / f"{name}_mask.tif"), label)
    threads = {scene: {(tid, thread) for s, tid, thread in readers if s == scene} for scene in ("a", "b")}
    assert threads["a"] == threads["b"] and len(threads["a"]) == 1, threads  # one reader on a CPU, kept
    assert next(iter(threads["a"]))[1].startswith("geoseg-read")
    assert streams._READ_POOLS
    pid = os.fork()
    if pid == 0:  # the child: its parent's threads are not here, nor may their pool be
        os._exit(0 if not streams._READ_POOLS else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("limit, files", [(None, []), (517 * 300 - 1, ["mask", "prob"])])
def test_a_small_scene_keeps_its_scratch_rasters_in_memory(tmp_path, monkeypatch, limit, files):
    """A scene of at most MEMORY_SCRATCH_PIXELS holds the mask and probabilities only its polygons read
    in memory: no file, no scratch folder; a larger one writes them; the polygons are the same."""
    from geoseg.inference import outputs

    made: list[str] = []
    init = outputs.RasterSink.__init__

    def recording(self, path, **kwargs):
        made.append(kwargs["kind"])
        init(self, path, **kwargs)

    monkeypatch.setattr(outputs.RasterSink, "__init__", recording)
    if limit is not None:
        monkeypatch.setattr(pipeline, "MEMORY_SCRATCH_PIXELS", limit)
    label = draw_rectangles(300, 517, _rects_for(300, 517, seed=11))
    scene = write_scene(tmp_path / "scene.tif", label)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    seen: list[list[str]] = []
    writer_put = pipeline.CoreWriter.put

    def looking(self, item):  # while the pass runs: what is in its scratch folder
        seen.append(sorted(p.name for p in scratch.rglob("*") if p.is_file()))
        writer_put(self, item)

    monkeypatch.setattr(pipeline.CoreWriter, "put", looking)
    res = predict_scene(scene, Oracle(), oracle_meta(chip_size=128), polygons=True, overlap=32, block_size=256,
                        temp_dir=scratch, min_area=0.0, simplify=0.0, **CPU)
    assert made == files
    assert {name for names in seen for name in names} == {f"{kind}.tif" for kind in files}
    assert not any(scratch.iterdir())  # nothing left, either way
    assert res.polygons.is_valid.all()
    on_scene = rasterize([(g, 1) for g in res.polygons.geometry], out_shape=label.shape,
                         transform=rasterio.open(scene).transform, fill=0, dtype="uint8")
    np.testing.assert_array_equal(on_scene, label)
    np.testing.assert_allclose(res.polygons["confidence"], 1.0, atol=1e-2)


def test_memory_sink_reads_what_was_written_and_nodata_elsewhere():
    from rasterio.windows import Window

    from geoseg.encoding import MASK_NODATA, PROB_NODATA
    from geoseg.inference.outputs import MemorySink

    mask = MemorySink(kind="mask", width=5, height=4)
    mask.write(Window(1, 2, 3, 2), np.arange(6, dtype=np.uint8).reshape(2, 3))
    got = mask.read(Window(0, 1, 5, 3))
    expected = np.full((3, 5), MASK_NODATA, np.uint8)
    expected[1:, 1:4] = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(got, expected)
    got[:] = 0  # a copy: the sink keeps its pixels
    assert mask.read(Window(1, 2, 1, 1))[0, 0] == 0 and mask.read(Window(0, 0, 1, 1))[0, 0] == MASK_NODATA
    prob = MemorySink(kind="prob", width=4, height=3, bands=3)
    prob.write(Window(0, 0, 2, 3), np.full((3, 3, 2), 7, np.uint8))
    back = prob.read(Window(1, 1, 2, 2))
    assert back.shape == (3, 2, 2) and (back[:, :, 0] == 7).all() and (back[:, :, 1] == PROB_NODATA).all()
    prob.finish(overviews=True)
    with pytest.raises(AssertionError, match="closed"):
        prob.read(Window(0, 0, 1, 1))


def test_scratch_rasters_are_fast_to_write_and_outputs_keep_deflate(tmp_path, monkeypatch):
    """The rasters behind the polygons that nobody asked for are read back and deleted: ZSTD level 1
    (about 5x faster to write than deflate); a raster the user asked for stays deflate."""
    from geoseg.inference import outputs

    if not outputs.zstd_available():
        pytest.skip("this GDAL has no ZSTD")
    made: list[tuple[str, str]] = []
    close = outputs.RasterSink.close

    def recording(self):
        if not self._dst.closed:  # what the blocks written were compressed with
            with rasterio.open(self.path) as written:
                made.append((self.kind, written.compression.name.lower()))
        close(self)

    monkeypatch.setattr(outputs.RasterSink, "close", recording)
    monkeypatch.setattr(pipeline, "MEMORY_SCRATCH_PIXELS", 0)  # a scene too large for scratch in memory
    label = draw_rectangles(300, 517, _rects_for(300, 517, seed=7))
    scene = write_scene(tmp_path / "scene.tif", label)
    res = predict_scene(scene, Oracle(), oracle_meta(chip_size=128), mask_out=tmp_path / "mask.tif", polygons=True,
                        overlap=32, block_size=256, **CPU)
    assert made == [("mask", "deflate"), ("prob", "zstd")]  # the mask was asked for, the probabilities not
    with rasterio.open(tmp_path / "mask.tif") as src:
        assert src.compression == Compression.deflate
    np.testing.assert_array_equal(_read(tmp_path / "mask.tif"), label)
    made.clear()
    monkeypatch.setattr(outputs, "zstd_available", lambda: False)  # a GDAL without ZSTD: deflate throughout
    again = predict_scene(scene, Oracle(), oracle_meta(chip_size=128), polygons=True, overlap=32, block_size=256,
                          **CPU)
    assert made == [("mask", "deflate"), ("prob", "deflate")]
    assert list(again.polygons.geometry.to_wkb()) == list(res.polygons.geometry.to_wkb())
