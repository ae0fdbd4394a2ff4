"""Tests for geoseg.augment: albumentations pipelines, normalisation stats, mask handling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.augment import (
    IMAGENET_MEAN,
    build_transform,
    dataset_stats,
    imagenet_stats,
    normalization_stats,
    value_scale,
)
from geoseg.config import AugmentConfig

OFF = dict(hflip=0.0, vflip=0.0, rotate90=0.0, brightness_contrast=0.0, hue_saturation=0.0, shift_scale_rotate=0.0)
MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)


def _chip(bands: int = 3, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(size, size, bands)).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.int64)
    mask[4:12, 6:20] = 1
    return image, mask


def test_without_augmentation_only_normalises():
    image, mask = _chip()
    out, out_mask = build_transform(mean=MEAN, std=STD)(image, mask)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, (image - np.array(MEAN)) / np.array(STD), rtol=1e-6)
    assert np.array_equal(out_mask, mask) and out_mask.dtype == np.int64
    disabled = build_transform(mean=MEAN, std=STD, augment=AugmentConfig(enabled=False))
    assert disabled.pipeline is None


def test_flip_moves_image_and_mask_together():
    image, mask = _chip()
    tf = build_transform(mean=MEAN, std=STD, augment=AugmentConfig(**{**OFF, "hflip": 1.0}))
    out, out_mask = tf(image, mask)
    np.testing.assert_allclose(out, (image[:, ::-1] - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5)
    assert np.array_equal(out_mask, mask[:, ::-1])


def test_rotation_keeps_mask_values_and_fills_padding_with_ignore():
    image = np.full((64, 64, 3), 100.0, dtype=np.float32)
    mask = np.ones((64, 64), dtype=np.uint8)
    tf = build_transform(mean=(0, 0, 0), std=(1, 1, 1), augment=AugmentConfig(**{**OFF, "shift_scale_rotate": 1.0}), seed=3)
    seen_padding = False
    for epoch in range(4):
        tf.set_epoch(epoch)
        out, out_mask = tf(image, mask)
        assert set(np.unique(out_mask)) <= {1, 255}  # nearest: no interpolated class ids
        seen_padding |= bool((out_mask == 255).any())
        # ignored pixels are where padding came in: darker than the constant image
        assert (out[out_mask == 255] < 100 - 1e-3).any(axis=-1).all()
        assert np.allclose(out[out_mask == 1][:, 0][(out[out_mask == 1][:, 0] > 99.9)], 100.0, atol=1e-3)
    assert seen_padding


def test_colour_augmentation_keeps_raw_value_range():
    image, mask = _chip()
    tf = build_transform(mean=(0, 0, 0), std=(1, 1, 1), augment=AugmentConfig(**{**OFF, "brightness_contrast": 1.0, "hue_saturation": 1.0}))
    out, out_mask = tf(image, mask)
    assert out.max() > 100 and out.max() <= 255 + 1e-3  # worked on raw/255, scaled back
    assert not np.allclose(out, image)
    assert np.array_equal(out_mask, mask)


def test_same_seed_and_epoch_repeat_and_other_epochs_differ():
    image, mask = _chip()
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate90=0.5, brightness_contrast=0.5, hue_saturation=0.5, shift_scale_rotate=0.5)
    a = build_transform(mean=MEAN, std=STD, augment=aug, seed=7)
    b = build_transform(mean=MEAN, std=STD, augment=aug, seed=7)
    first = [a(image, mask)[0] for _ in range(3)]
    second = [b(image, mask)[0] for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    a.set_epoch(1)
    assert not all(np.array_equal(x, a(image, mask)[0]) for x in first[:1])


def test_four_band_chips_skip_hue_and_survive_pickling():
    image, mask = _chip(bands=4)
    tf = build_transform(mean=(1, 2, 3, 4), std=(1, 1, 1, 1), augment=AugmentConfig(hue_saturation=1.0))
    names = [type(t).__name__ for t in tf.pipeline.transforms]
    assert "HueSaturationValue" not in names and "Affine" in names
    out, _ = pickle.loads(pickle.dumps(tf))(image, mask)
    assert out.shape == (32, 32, 4)
    with pytest.raises(ValueError, match="chip has 4 bands but normalisation has 3 values"):
        build_transform(mean=MEAN, std=STD)(image, mask)


def test_imagenet_stats_in_raw_units():
    mean, std = imagenet_stats(3)
    assert mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    assert std == pytest.approx((0.229 * 255, 0.224 * 255, 0.225 * 255))
    mean4, _ = imagenet_stats(4)
    assert mean4[3] == pytest.approx(np.mean(IMAGENET_MEAN) * 255)
    assert imagenet_stats(1, dtype="uint16")[0][0] == pytest.approx(0.485 * 65535)
    assert value_scale("uint8") == 255 and value_scale("float32") == 1.0


def test_dataset_stats_use_valid_pixels_only():
    a = np.zeros((2, 4, 4), np.float32)
    a[0], a[1] = 10, 7
    valid = np.ones((4, 4), bool)
    b = np.zeros((2, 4, 4), np.float32)
    b[0, :2], b[0, 2:] = 30, 999
    b[1] = 7
    vb = np.zeros((4, 4), bool)
    vb[:2] = True
    samples = [{"image": a, "valid": valid}, {"image": b, "valid": vb}]
    mean, std = dataset_stats(samples)
    # band 1: sixteen 10s and eight 30s; band 2 constant (std set to 1)
    assert mean == pytest.approx(((16 * 10 + 8 * 30) / 24, 7.0))
    assert std[0] == pytest.approx(np.std([10] * 16 + [30] * 8))
    assert std[1] == 1.0
    assert normalization_stats("dataset", num_bands=2, dataset=samples) == (mean, std)
    with pytest.raises(ValueError, match="empty dataset"):
        dataset_stats([])


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16, np.int32]),
    n=st.integers(1, 2000),
    bands=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    q=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=4),
    narrow=st.booleans(),
)
def test_band_percentiles_are_numpys_exactly(dtype, n, bands, seed, q, narrow):
    """Counted from a histogram (integers) or not (a span too wide), the percentiles are numpy's, bit for bit."""
    from geoseg.augment import band_percentiles

    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    low, high = (int(info.min), int(info.max)) if not narrow else (max(int(info.min), -50), min(int(info.max), 300))
    values = rng.integers(low, high, size=(bands, n), dtype=dtype, endpoint=True)
    np.testing.assert_array_equal(band_percentiles(values, q), np.percentile(values.astype(np.float64), q, axis=1))


def test_value_range_of_integer_and_float_scenes_is_numpys(tmp_path):
    """value_range counts integer imagery in a histogram: the same (1, 99) percentiles as numpy on float64."""
    import rasterio
    from affine import Affine

    from geoseg.augment import value_range

    rng = np.random.default_rng(3)
    for dtype in ("uint8", "uint16", "float32"):
        data = (rng.gamma(2.0, 40.0, size=(3, 90, 110)) * (30 if dtype == "uint16" else 1)).astype(dtype)
        path = tmp_path / f"{dtype}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=110, height=90, count=3, dtype=dtype, crs="EPSG:32633",
                           transform=Affine(0.5, 0, 500000, 0, -0.5, 4650000)) as dst:
            dst.write(data)
        want = np.percentile(data.reshape(3, -1).astype(np.float64), (1.0, 99.0), axis=1)
        assert value_range([path], (1, 2, 3)) == tuple((float(lo), float(hi)) for lo, hi in zip(*want))
