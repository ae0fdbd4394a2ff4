"""Training at one ground resolution: every source is resampled on read (data.resolution), scale jitter."""

from __future__ import annotations

import dataclasses

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling

from geoseg.config import load_config
from geoseg.datasets import ChipDataset, ScenePair
from geoseg.engine import fit
from geoseg.errors import ConfigError
from geoseg.labels import IGNORE_INDEX
from geoseg.synthetic import make_dataset

from _prediction_helpers import UTM, draw_rectangles

#: 0.25 m pixels; the rectangles' edges are on even pixels, so a factor-2 grid keeps them.
FINE = Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 4650000.0)
RECTS = [(8, 8, 40, 60), (60, 20, 100, 24), (60, 46, 100, 40), (150, 130, 64, 100), (20, 150, 80, 90)]


def _write(path, array, transform=FINE, dtype=None):
    array = array if array.ndim == 3 else array[None]
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                       count=array.shape[0], dtype=dtype or array.dtype.name, crs=UTM, transform=transform) as dst:
        dst.write(array)
    return path


@pytest.fixture()
def fine_pair(tmp_path):
    label = draw_rectangles(256, 256, RECTS)
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 50, (3, 256, 256)) + label[None] * 180).astype(np.uint8)
    img = _write(tmp_path / "img.tif", image)
    lab = _write(tmp_path / "lab.tif", label * 255)
    boxes = [shapely.box(500000 + c * 0.25, 4650000 - (r + h) * 0.25, 500000 + (c + w) * 0.25, 4650000 - r * 0.25)
             for r, c, h, w in RECTS]
    vec = tmp_path / "roofs.gpkg"
    gpd.GeoDataFrame(geometry=boxes, crs=UTM).to_file(vec)
    return img, lab, vec, image, label


def test_chips_are_cut_on_the_grid_at_the_resolution(fine_pair):
    img, lab, vec, image, label = fine_pair
    with rasterio.open(img) as src:  # GDAL's own resampled read of the whole scene
        whole = src.read(out_shape=(3, 128, 128), resampling=Resampling.bilinear).astype(np.float32)
    expected_mask = label[::2, ::2]
    for pair in (ScenePair(img, lab), ScenePair(img, None, vec)):
        ds = ChipDataset([pair], chip_size=64, resolution=0.5)
        assert len(ds) == 4 and ds.ground_resolution() == pytest.approx(0.5, rel=1e-3)  # whole pixels: 0.5 CRS m
        for i in range(4):
            s = ds.read_chip(i)
            w = s["window"]
            rows = slice(int(w.row_off), int(w.row_off) + 64)
            cols = slice(int(w.col_off), int(w.col_off) + 64)
            np.testing.assert_array_equal(s["image"], whole[:, rows, cols])
            np.testing.assert_array_equal(s["mask"], expected_mask[rows, cols])
            assert s["transform"] == Affine(0.5, 0.0, 500000 + int(w.col_off) * 0.5, 0.0, -0.5,
                                            4650000 - int(w.row_off) * 0.5)


def test_scale_jitter_reads_a_scaled_window_into_the_chip(tmp_path, fine_pair):
    _, _, vec, _, label = fine_pair
    ramp = np.tile(np.arange(512, dtype=np.float32), (512, 1))  # value = scene column
    img = _write(tmp_path / "ramp.tif", np.stack([ramp, ramp.T, ramp]))
    kwargs = dict(chip_size=64, resolution=0.5, mode="random", chips_per_scene=12, seed=3)
    ds = ChipDataset([ScenePair(img, None, vec)], scale_jitter=0.5, **kwargs)
    steps = []
    for i in range(len(ds)):
        s = ds.read_chip(i)
        step = s["transform"].a / 0.5  # grid pixels per chip pixel
        steps.append(step)
        assert 1 / 1.5 - 1e-9 <= step <= 1.5 + 1e-9
        # Each chip pixel holds the ramp at its centre's scene column (GDAL's scaled bilinear kernel
        # is sampled on whole scene pixels: within a quarter pixel), inside the scene.
        xs, _ = s["transform"] * (np.arange(64) + 0.5, np.full(64, 0.5))
        expected = (np.asarray(xs) - 500000) / 0.25 - 0.5
        inside = (expected > 4) & (expected < 507)
        got = s["image"][0, 32]
        assert np.abs(got[inside] - expected[inside]).max() < 0.25
        assert np.abs(np.diff(got[inside]).mean() - 2 * step) < 0.01
        # The label is rasterised on the same scaled grid as the image is read.
        ids = rasterio.features.rasterize(
            [(g, 1) for g in gpd.read_file(vec).geometry], out_shape=(64, 64), transform=s["transform"])
        mask = s["mask"].copy()
        np.testing.assert_array_equal(mask[mask != IGNORE_INDEX], ids[mask != IGNORE_INDEX])
    assert len({round(x, 6) for x in steps}) == len(steps) and min(steps) < 0.9 and max(steps) > 1.1
    again = ChipDataset([ScenePair(img, None, vec)], scale_jitter=0.5, **kwargs)
    assert [again.read_chip(i)["transform"] for i in range(len(again))] == [
        ds.read_chip(i)["transform"] for i in range(len(ds))]


@pytest.mark.parametrize("jitter", [-0.1, 1.5, "x"])
def test_bad_jitter_is_refused(fine_pair, jitter):
    img, lab, *_ = fine_pair
    with pytest.raises(ConfigError, match=r"^data.scale_jitter should be from 0 \(none\) to 1"):
        ChipDataset([ScenePair(img, lab)], chip_size=64, scale_jitter=jitter)


def test_training_at_a_resolution_records_it_in_the_checkpoint(tmp_path):
    import torch

    root = tmp_path / "ds"
    make_dataset(root, layout="seed", n_scenes=3, width=128, height=128, seed=5)  # 0.3 m scenes
    config = load_config(None, [
        "model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=32", "data.batch_size=2",
        "train.epochs=1", "train.device=cpu", "train.precision=32", "data.resolution=0.6",
    ])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=(str(root),)),
                                 train=dataclasses.replace(config.train, out_dir=str(tmp_path / "out")))
    result = fit(config)
    meta = torch.load(result.best_iou, weights_only=True)["meta"]
    assert meta["resolution"] == 0.6 and meta["config"]["data"]["resolution"] == 0.6
    bad = dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=0.0),
                              train=dataclasses.replace(config.train, out_dir=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match=r"^data.resolution should be a ground resolution above 0 metres"):
        fit(bad)
    assert not (tmp_path / "bad").exists()


def test_geoseg_chip_at_a_resolution_writes_chips_of_the_grid(fine_pair, tmp_path):
    from click.testing import CliRunner

    import cli

    img, lab, vec, image, label = fine_pair
    result = CliRunner().invoke(cli.cli, ["chip", str(img), "--labels", str(lab), "--out", str(tmp_path / "c"),
                                          "--size", "64", "--resolution", "0.5"])
    assert result.exit_code == 0, result.output
    with rasterio.open(img) as src:
        whole = src.read(out_shape=(3, 128, 128), resampling=Resampling.bilinear)
    names = sorted(p.name for p in (tmp_path / "c" / "images").iterdir())
    assert names == ["img_0_0.tif", "img_0_64.tif", "img_64_0.tif", "img_64_64.tif"]
    for name in names:
        row, col = (int(v) for v in name[:-4].split("_")[1:])
        with rasterio.open(tmp_path / "c" / "images" / name) as chip, \
                rasterio.open(tmp_path / "c" / "labels" / name) as lchip:
            assert chip.transform == Affine(0.5, 0.0, 500000 + col * 0.5, 0.0, -0.5, 4650000 - row * 0.5)
            np.testing.assert_array_equal(chip.read(), whole[:, row:row + 64, col:col + 64])
            np.testing.assert_array_equal(lchip.read(1), label[::2, ::2][row:row + 64, col:col + 64])
    bad = CliRunner().invoke(cli.cli, ["chip", str(img), "--out", str(tmp_path / "d"), "--resolution", "0"])
    assert bad.exit_code == 2 and "--resolution" in bad.output and not (tmp_path / "d").exists()
