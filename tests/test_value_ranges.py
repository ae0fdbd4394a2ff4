"""16-bit and float imagery end to end, and the percentile stretch (``data.stretch``) with exact numbers:
the same stretch and normalisation in the training transform, in prediction and in the int8 calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from torch import nn

import cli
from _band_helpers import roof_label, sixteen_bit, write_dataset, write_raster
from geoseg.augment import IMAGENET_MEAN, IMAGENET_STD, build_transform, raw_normalisation, stretch_bounds
from geoseg.checkpoints import CheckpointMeta, read_checkpoint
from geoseg.config import load_config
from geoseg.datasets import ChipDataset, find_pairs
from geoseg.engine import fit
from geoseg.inference import predict_scene
from geoseg.inference.checks import ValueMap
from geoseg.quantize import calibration_chips

TINY = ["model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "data.batch_size=4",
        "train.epochs=1", "train.device=cpu", "train.precision=32", "data.split=[1.0, 0.0, 0.0]",
        "augment.enabled=false"]
#: A 40 x 50 two-band scene: band 1 holds 0..1999, band 2 holds 1000, 1002, ..., 4998 (row by row).
RAMP = np.stack([np.arange(2000), 1000 + 2 * np.arange(2000)]).reshape(2, 40, 50).astype(np.uint16)
#: Its 2nd and 98th percentiles (numpy's linear interpolation): 0.02 * 1999 = 39.98 and 0.98 * 1999 = 1959.02.
RAMP_STRETCH = ((39.98, 1959.02), (1079.96, 4918.04))
MEAN, STD = (0.5, 0.25), (0.25, 0.5)


def _by_hand(raw: np.ndarray) -> np.ndarray:
    """The stretch then the normalisation of RAMP-like (2, H, W) raw values, in float64."""
    out = np.empty(raw.shape, np.float64)
    for b, ((lo, hi), m, s) in enumerate(zip(RAMP_STRETCH, MEAN, STD)):
        out[b] = (np.clip((raw[b].astype(np.float64) - lo) / (hi - lo), 0, 1) - m) / s
    return out


def _stretched_meta() -> CheckpointMeta:
    return CheckpointMeta(
        arch="recorder", encoder="none", in_channels=2, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2), mean=MEAN, std=STD, chip_size=64, stretch=RAMP_STRETCH,
    )


def test_stretch_bounds_are_the_percentiles_of_the_valid_training_pixels(tmp_path):
    root = write_dataset(tmp_path / "ds", [RAMP], [np.zeros((40, 50), np.uint8)])
    chips = ChipDataset(find_pairs(root), chip_size=64)  # one chip, padded beyond the 40 x 50 scene
    bounds = stretch_bounds(chips, (2.0, 98.0))
    np.testing.assert_allclose(bounds, RAMP_STRETCH, rtol=0, atol=1e-9)
    # A bounded sample: every 2000th pixel is none but the first and the last (0 and 1999).
    assert stretch_bounds(chips, (0.0, 100.0), max_pixels=2) == ((0.0, 1999.0), (1000.0, 4998.0))
    # A constant band spans 1 raw unit (no division by zero).
    flat = write_dataset(tmp_path / "flat", [np.full((1, 40, 50), 7, np.uint16)], [np.zeros((40, 50), np.uint8)])
    assert stretch_bounds(ChipDataset(find_pairs(flat), chip_size=64), (2.0, 98.0)) == ((7.0, 8.0),)


def test_the_training_transform_stretches_then_normalises_exactly():
    image = np.moveaxis(RAMP, 0, -1)  # (H, W, C) as ChipDataset hands it to the transform
    out, _ = build_transform(mean=MEAN, std=STD, stretch=RAMP_STRETCH, scale=1.0)(image, np.zeros((40, 50), np.uint8))
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), _by_hand(RAMP), rtol=0, atol=1e-6)
    # Hand numbers: below the 2nd percentile is 0, above the 98th 1, then (x - mean) / std.
    assert out[0, 0].tolist() == [pytest.approx(-2.0), pytest.approx(-0.5)]  # raw 0 and 1000
    assert out[-1, -1].tolist() == [pytest.approx(2.0), pytest.approx(1.5)]  # raw 1999 and 4998
    assert out[20, 0, 0] == pytest.approx(((1000 - 39.98) / 1919.04 - 0.5) / 0.25, abs=1e-6)  # raw 1000


def test_the_stretch_folds_into_raw_units():
    mean, std, clip = raw_normalisation(MEAN, STD, RAMP_STRETCH)
    assert mean == pytest.approx((39.98 + 0.5 * 1919.04, 1079.96 + 0.25 * 3838.08))
    assert std == pytest.approx((0.25 * 1919.04, 0.5 * 3838.08))
    assert clip == RAMP_STRETCH
    assert raw_normalisation(MEAN, STD, None) == (MEAN, STD, None)
    # --rescale's linear map runs before the stretch: it moves the stretch's bounds, not mean and std.
    mapped = ValueMap(scale=(2.0, 0.5), offset=(10.0, 0.0)).applied_to(_stretched_meta())
    np.testing.assert_allclose(mapped.stretch, ((14.99, 974.51), (2159.92, 9836.08)), rtol=1e-12)
    assert (mapped.mean, mapped.std) == (MEAN, STD)


class Recorder(nn.Module):
    """Records the chips it is given; logits 0."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:]) + self.bias


def test_prediction_and_int8_calibration_feed_the_model_the_training_values(tmp_path):
    scene = write_raster(tmp_path / "ramp.tif", RAMP)
    model, meta = Recorder(), _stretched_meta()
    predict_scene(scene, model, meta, mask_out=tmp_path / "mask.tif", polygons=False, device="cpu",
                  precision="32")
    (chips,) = model.seen
    assert chips.shape == (1, 2, 64, 64)
    np.testing.assert_allclose(chips[0, :, :40, :50].numpy(), _by_hand(RAMP), rtol=0, atol=1e-5)
    assert (chips[0, :, 40:, :] == 0).all() and (chips[0, :, :, 50:] == 0).all()  # padding: nodata
    calibration = calibration_chips([scene], meta, count=1)
    np.testing.assert_allclose(calibration.chips[0, :, :40, :50], _by_hand(RAMP), rtol=0, atol=1e-5)


def _train(tmp_path: Path, root: Path, *overrides: str):
    config = load_config(None, [*TINY, *overrides])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=(str(root),)),
                                 train=dataclasses.replace(config.train, out_dir=str(tmp_path / "out")))
    return read_checkpoint(fit(config).last).meta


def _predict(out: Path, scene: Path, meta_path: Path, *args: str):
    return out, CliRunner().invoke(cli.cli, [
        "predict", str(scene), "--model", str(meta_path), "--out", str(out / "roofs.gpkg"),
        "--mask-out", str(out / "mask.tif"), "--device", "cpu", *args])


@pytest.mark.parametrize("kind", ["uint16", "float32"])
def test_16_bit_and_float_scenes_train_and_predict(tmp_path, kind):
    """4-band uint16 0-10000 (and the same as float32 reflectance 0-1): dataset statistics per band in the
    checkpoint, equal to numpy's over the training pixels; predict writes a mask on the scene's grid."""
    labels = [roof_label(128, 192, seed) for seed in (1, 2)]
    scenes = [sixteen_bit(label, seed) for seed, label in enumerate(labels)]
    assert max(int(s.max()) for s in scenes) == 10000
    if kind == "float32":
        scenes = [(s / 10000.0).astype(np.float32) for s in scenes]
    root = write_dataset(tmp_path / "ds", scenes, labels)
    meta = _train(tmp_path, root, "data.normalization=dataset")

    pixels = np.concatenate([s.reshape(4, -1).astype(np.float64) for s in scenes], axis=1)  # 2 x 6 chips, no padding
    assert meta.input_dtype == kind and meta.bands == (1, 2, 3, 4) and meta.stretch is None
    assert meta.mean == pytest.approx(tuple(pixels.mean(axis=1)), rel=1e-6)
    assert meta.std == pytest.approx(tuple(pixels.std(axis=1)), rel=1e-6)
    assert meta.band_names is None  # GDAL's defaults: gray, undefined, ...

    data = sixteen_bit(roof_label(110, 150, 9), 9)
    scene = write_raster(tmp_path / "scene.tif", (data / 10000.0).astype(np.float32) if kind == "float32" else data)
    out, result = _predict(tmp_path / "pred", scene, tmp_path / "out" / "last.pt")
    assert result.exit_code == 0, result.output
    with rasterio.open(scene) as src, rasterio.open(out / "mask.tif") as mask:
        assert (mask.crs, mask.transform, mask.shape) == (src.crs, src.transform, src.shape)
        assert mask.dtypes[0] == "uint8" and set(np.unique(mask.read(1))) <= {0, 1}


def test_bands_by_name_and_stretch_train_and_predict(tmp_path):
    """data.bands by description and data.stretch: the checkpoint records the bands found, their names and
    the percentiles of the training pixels; prediction finds the names in another band order."""
    labels = [roof_label(128, 192, seed) for seed in (1, 2)]
    scenes = [sixteen_bit(label, seed) for seed, label in enumerate(labels)]
    root = write_dataset(tmp_path / "ds", scenes, labels, descriptions=("blue", "green", "red", "nir"))
    meta = _train(tmp_path, root, "data.bands=[red, green, blue]", "data.stretch=[2, 98]")

    assert meta.bands == (3, 2, 1) and meta.band_names == ("red", "green", "blue")
    pixels = np.concatenate([s[[2, 1, 0]].reshape(3, -1).astype(np.float64) for s in scenes], axis=1)
    low, high = np.percentile(pixels, (2, 98), axis=1)
    np.testing.assert_allclose(meta.stretch, np.stack([low, high], axis=1), rtol=0, atol=1e-9)
    assert meta.mean == pytest.approx(IMAGENET_MEAN) and meta.std == pytest.approx(IMAGENET_STD)  # scale 1

    rgbn = sixteen_bit(roof_label(110, 150, 9), 9)[[2, 1, 0, 3]]  # red, green, blue, nir
    scene = write_raster(tmp_path / "rgbn.tif", rgbn, descriptions=("Red", "Green", "Blue", "NIR"))
    out, result = _predict(tmp_path / "pred", scene, tmp_path / "out" / "last.pt")
    assert result.exit_code == 0, result.output
    with rasterio.open(out / "mask.tif") as mask:
        assert mask.shape == (110, 150)

    unnamed = write_raster(tmp_path / "unnamed.tif", rgbn)
    out, result = _predict(tmp_path / "refused", unnamed, tmp_path / "out" / "last.pt")
    assert result.exit_code == 1 and not out.exists()
    assert result.output == (
        f"Error: {unnamed}: has no band named 'red' (the model wants bands red,green,blue); its bands are "
        "1:gray, 2:undefined, 3:undefined, 4:undefined; pass --bands with the 3 of this scene's bands (numbers or "
        "names) that are the model's red,green,blue, e.g. --bands 1,2,3\n")
    out, result = _predict(tmp_path / "by_number", unnamed, tmp_path / "out" / "last.pt", "--bands", "1,2,3")
    assert result.exit_code == 0, result.output and (out / "mask.tif").exists()


def test_a_bad_stretch_or_no_valid_pixel_is_one_error_and_nothing_is_written(tmp_path):
    from geoseg.errors import ConfigError, DatasetError

    labels = [roof_label(128, 192, 1)]
    root = write_dataset(tmp_path / "ds", [sixteen_bit(labels[0], 1)], labels)
    with pytest.raises(ConfigError) as err:
        _train(tmp_path, root, "data.stretch=[98, 2]")
    assert str(err.value) == (
        "data.stretch should be [low, high] percentiles with 0 <= low < high <= 100 (e.g. [2, 98]), got [98.0, 2.0]")
    assert not (tmp_path / "out").exists()
    empty = write_dataset(tmp_path / "nodata", [np.zeros((4, 128, 192), np.uint16)], labels, nodata=0)
    with pytest.raises(DatasetError, match="zero usable training chips"):
        _train(tmp_path, empty, "data.stretch=[2, 98]")
    assert not (tmp_path / "out").exists()
