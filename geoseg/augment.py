"""Training augmentation (albumentations), per-band normalisation statistics, stretch and value ranges.

The callables built here match the ``transform`` argument of
``geoseg.datasets.ChipDataset``: ``f(image_hwc float32 raw values, mask_hw) ->
(image_hwc normalised float32, mask_hw)``. The mask may also be (H, W, K): the
class ids and the instance targets stacked, moved alike (nearest, 255 where a
transform brings in padding). Augmentation is for training only; validation and
prediction only normalise, with statistics stored in the checkpoint.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from geoseg.config import AugmentConfig
from geoseg.encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: ImageNet statistics for RGB in [0, 1]; multiplied by the value range of the data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Ranges of the random transforms (the probabilities come from AugmentConfig).
BRIGHTNESS_LIMIT = 0.2
CONTRAST_LIMIT = 0.2
HUE_SHIFT_LIMIT = 10
SAT_SHIFT_LIMIT = 20
VAL_SHIFT_LIMIT = 10
SCALE_RANGE = (0.9, 1.1)
SHIFT_FRACTION = 0.0625
ROTATE_DEGREES = 15.0
#: How many training chips ``dataset_stats`` reads at most (evenly spaced).
MAX_STATS_CHIPS = 256
#: Percentiles of the valid pixels that make a band's value range: close to the extremes, yet
#: blind to the 1% of outliers most scenes have (clouds, glints, dead pixels, an undeclared fill).
VALUE_PERCENTILES = (1.0, 99.0)
#: Pixels per band read at most to measure a value range (decimated reads, over all scenes).
VALUE_SAMPLE_PIXELS = 1_000_000
#: Scenes read at most to measure the value range of training data (evenly spaced).
VALUE_SAMPLE_SCENES = 32


def value_scale(dtype: str | np.dtype) -> float:
    """Raw value of "full brightness" for a raster dtype: 255 for uint8, the max for
    other integer types, 1.0 for floats (assumed to be reflectance in [0, 1])."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return float(np.iinfo(dt).max)
    return 1.0


def imagenet_stats(
    num_bands: int, *, dtype: str | np.dtype = "uint8", stretched: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean and std in raw pixel units for ``num_bands`` bands.

    Bands beyond the third get the average of the RGB statistics.

    Args:
        num_bands: Bands.
        dtype: The rasters' dtype: the statistics are scaled by :func:`value_scale`.
        stretched: The values are stretched to [0, 1] first (``data.stretch``): scale 1.

    Returns:
        ``(mean, std)``, one value per band, in raw pixel units (stretched units with ``stretched``).
    """
    scale = 1.0 if stretched else value_scale(dtype)
    if np.dtype(dtype) != np.uint8 and not stretched:
        logger.warning(
            "ImageNet normalisation assumes 0-%g for %s imagery; "
            "data.normalization: dataset fits other value ranges better", scale, np.dtype(dtype).name,
        )
    mean = [IMAGENET_MEAN[i] if i < 3 else float(np.mean(IMAGENET_MEAN)) for i in range(num_bands)]
    std = [IMAGENET_STD[i] if i < 3 else float(np.mean(IMAGENET_STD)) for i in range(num_bands)]
    return tuple(m * scale for m in mean), tuple(s * scale for s in std)


def _sampled_chips(dataset: Sequence[Any], max_chips: int, what: str) -> list[int]:
    """Indexes of up to ``max_chips`` chips evenly spaced over ``dataset``.

    Raises:
        ValueError: An empty dataset.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot compute {what} of an empty dataset")
    return [int(i) for i in np.unique(np.linspace(0, n - 1, num=min(n, max_chips)).round().astype(int))]


def _valid_pixels(sample: Mapping[str, Any]) -> np.ndarray:
    """A chip's valid pixels, (bands, pixels) float64 raw values (all of them without ``valid``)."""
    image = np.asarray(sample["image"], dtype=np.float64)
    flat = image.reshape(image.shape[0], -1)
    valid = sample.get("valid")
    return flat if valid is None else flat[:, np.asarray(valid).reshape(-1).astype(bool)]


def dataset_stats(
    dataset: Sequence[Mapping[str, Any]],
    *,
    max_chips: int = MAX_STATS_CHIPS,
    stretch: Sequence[tuple[float, float]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of valid pixels over (up to ``max_chips``) training chips.

    Args:
        dataset: Samples with ``image`` (C, H, W raw values, tensor or array) and
            optionally ``valid`` (H, W bool); built without a transform.
        max_chips: Chips read at most, evenly spaced over the dataset.
        stretch: Per band ``(low, high)``: the statistics are those of the stretched
            values (:func:`apply_stretch`), in [0, 1].

    Returns:
        ``(mean, std)`` in raw pixel units (stretched units with ``stretch``); a constant band gets std 1.

    Raises:
        ValueError: An empty dataset or no valid pixel.
    """
    total = sq = None
    count = 0
    for i in _sampled_chips(dataset, max_chips, "normalisation statistics"):
        flat = _valid_pixels(dataset[i])
        if stretch is not None:
            flat = apply_stretch(flat, stretch, channel_axis=0).astype(np.float64)
        if total is None:
            total, sq = np.zeros(flat.shape[0]), np.zeros(flat.shape[0])
        total += flat.sum(axis=1)
        sq += (flat**2).sum(axis=1)
        count += flat.shape[1]
    if not count:
        raise ValueError("cannot compute normalisation statistics: no valid pixel in the training chips")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    if (std == 0).any():
        logger.warning("band(s) %s are constant in the training chips; their std is set to 1",
                       [int(b) + 1 for b in np.flatnonzero(std == 0)])
    std[std == 0] = 1.0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def apply_stretch(
    image: np.ndarray, stretch: Sequence[tuple[float, float]], *, channel_axis: int
) -> np.ndarray:
    """The percentile stretch of training and prediction: ``clip((raw - low) / (high - low), 0, 1)`` per band.

    Args:
        image: Raw values, the bands along ``channel_axis``.
        stretch: Per band ``(low, high)`` raw values (``high > low``).
        channel_axis: Axis of the bands (0 for C, H, W; -1 for H, W, C).

    Returns:
        float32 values in [0, 1].
    """
    shape = [1] * image.ndim
    shape[channel_axis] = len(stretch)
    low = np.asarray([lo for lo, _ in stretch], dtype=np.float32).reshape(shape)
    span = np.asarray([hi - lo for lo, hi in stretch], dtype=np.float32).reshape(shape)
    return np.clip((np.asarray(image, dtype=np.float32) - low) / span, 0.0, 1.0)


def stretch_bounds(
    dataset: Sequence[Mapping[str, Any]],
    percentiles: tuple[float, float],
    *,
    max_chips: int = MAX_STATS_CHIPS,
    max_pixels: int = VALUE_SAMPLE_PIXELS,
) -> tuple[tuple[float, float], ...]:
    """Per band, the ``percentiles`` (low, high) of the valid pixels of (up to ``max_chips``) training chips.

    The chips are those :func:`dataset_stats` reads (evenly spaced); each gives at most
    ``max_pixels / chips`` of its valid, finite pixels (evenly spaced), so the sample is
    bounded. Percentiles interpolate linearly (``numpy.percentile``'s default).

    Args:
        dataset: Samples with ``image`` (C, H, W raw values) and optionally ``valid`` (H, W bool).
        percentiles: ``(low, high)`` in [0, 100], low < high (``data.stretch``).
        max_chips: Chips read at most.
        max_pixels: Pixels per band read at most, over all chips.

    Returns:
        One ``(low, high)`` per band in raw units; a band where they are equal gets ``high = low + 1``.

    Raises:
        ValueError: An empty dataset or no valid pixel.
    """
    idx = _sampled_chips(dataset, max_chips, "the stretch")
    per_chip = max(1, max_pixels // len(idx))
    samples = []
    for i in idx:
        flat = _valid_pixels(dataset[i])
        flat = flat[:, np.isfinite(flat).all(axis=0)]
        if flat.shape[1] > per_chip:
            flat = flat[:, np.linspace(0, flat.shape[1] - 1, num=per_chip).round().astype(int)]
        samples.append(flat)
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:
        raise ValueError("cannot compute the stretch: no valid pixel in the training chips")
    low, high = np.percentile(values, percentiles, axis=1)
    flat_bands = [int(b) + 1 for b in np.flatnonzero(high <= low)]
    if flat_bands:
        logger.warning("band(s) %s have equal %g and %g percentiles in the training chips; their stretch "
                       "spans 1 raw unit", flat_bands, *percentiles)
    high = np.where(high <= low, low + 1.0, high)
    return tuple((float(lo), float(hi)) for lo, hi in zip(low, high))


def raw_normalisation(
    mean: Sequence[float], std: Sequence[float], stretch: Sequence[tuple[float, float]] | None
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, float], ...] | None]:
    """A model's input recipe in raw units: clip to ``clip`` (when not None), then ``(raw - mean) / std``.

    Without a stretch that is ``mean`` and ``std`` as they are. With one, the stretch
    ``clip((raw - lo) / (hi - lo), 0, 1)`` followed by ``(x - mean) / std`` equals clipping
    the raw values to ``[lo, hi]`` followed by ``(raw - (lo + mean (hi - lo))) / (std (hi - lo))``:
    prediction (``ChipPredictor``), the int8 calibration and the benchmarks normalise raw
    blocks this way, in place, and linear value maps (``--rescale``) fold into it.

    Returns:
        ``(mean, std, clip)``: per band, in raw units; ``clip`` per band ``(low, high)`` or None.
    """
    if stretch is None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std), None
    raw_mean = tuple(lo + m * (hi - lo) for m, (lo, hi) in zip(mean, stretch))
    raw_std = tuple(s * (hi - lo) for s, (lo, hi) in zip(std, stretch))
    return raw_mean, raw_std, tuple((float(lo), float(hi)) for lo, hi in stretch)


def value_range(
    scenes: Sequence[str | os.PathLike[str]],
    bands: Sequence[int],
    *,
    max_pixels: int = VALUE_SAMPLE_PIXELS,
    max_scenes: int = VALUE_SAMPLE_SCENES,
) -> tuple[tuple[float, float], ...] | None:
    """Per-band value range of scenes: the VALUE_PERCENTILES of their valid pixels.

    Reads each scene decimated (``raster_io.read_decimated``; an overview where
    the file has one), ``max_pixels`` in all: the same cheap estimate for the
    training data (recorded in the checkpoint) and for a scene to predict, so the
    two compare like with like.

    Args:
        scenes: Raster paths; up to ``max_scenes`` of them (evenly spaced) are read.
        bands: 1-based bands, in the order of the result.
        max_pixels: Pixels per band read at most, over all scenes read.
        max_scenes: Scenes read at most.

    Returns:
        One ``(low, high)`` per band in raw units, or None when no pixel is valid.

    Raises:
        InputFileError: An unreadable scene.
    """
    from geoseg.raster_io import read_decimated

    if not scenes:
        return None
    idx = np.unique(np.linspace(0, len(scenes) - 1, num=min(len(scenes), max_scenes)).round().astype(int))
    per_scene = max(1, max_pixels // len(idx))
    samples = []
    for i in idx:
        data, valid = read_decimated(scenes[int(i)], bands=bands, max_pixels=per_scene)
        # (bands, n), band-contiguous: boolean indexing on the pixel axes gives a pixel-major
        # copy (strides (1, bands)) that is slow to make and ~15x slower to reduce per band.
        flat = data.reshape(data.shape[0], -1)
        pixels = flat if valid.all() else flat.compress(valid.ravel(), axis=1)
        if not np.issubdtype(pixels.dtype, np.integer):
            pixels = pixels.astype(np.float64)
            pixels = pixels[:, np.isfinite(pixels).all(axis=0)]  # undeclared NaN is no value
        samples.append(pixels)
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:
        return None
    low, high = band_percentiles(values, VALUE_PERCENTILES)
    return tuple((float(lo), float(hi)) for lo, hi in zip(low, high))


#: Widest span of integer values whose percentiles :func:`band_percentiles` counts in a histogram.
HISTOGRAM_SPAN = 1 << 17


def band_percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(values, q, axis=1)`` (linear), from a histogram per band for integer values.

    Integer imagery (8 and 16 bit) is counted rather than converted to float and
    partitioned: several times faster, and the same numbers (the order statistics
    are read off the cumulative counts and interpolated as numpy does).

    Args:
        values: (bands, n) pixel values, n > 0.
        q: Percentiles in [0, 100].

    Returns:
        (len(q), bands) float64.
    """
    if not np.issubdtype(values.dtype, np.integer) or values.size == 0:
        return np.percentile(values.astype(np.float64), q, axis=1)
    lows, highs = values.min(axis=1).astype(np.int64), values.max(axis=1).astype(np.int64)
    if int((highs - lows).max()) >= HISTOGRAM_SPAN:
        return np.percentile(values.astype(np.float64), q, axis=1)
    n = values.shape[1]
    positions = np.asarray(q, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(positions).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    t = positions - below
    out = np.empty((len(positions), values.shape[0]), dtype=np.float64)
    for b in range(values.shape[0]):
        cum = np.cumsum(np.bincount((values[b].astype(np.int64) - lows[b])))
        a = (lows[b] + np.searchsorted(cum, below, side="right")).astype(np.float64)
        c = (lows[b] + np.searchsorted(cum, above, side="right")).astype(np.float64)
        diff = c - a
        # numpy's lerp: from the lower value below t = 0.5, from the upper one from there on.
        out[:, b] = np.where(t >= 0.5, c - diff * (1.0 - t), a + diff * t)
    return out


def _pipeline(augment: AugmentConfig, num_bands: int) -> Any:
    import albumentations as A
    import cv2

    steps = [
        A.HorizontalFlip(p=augment.hflip),
        A.VerticalFlip(p=augment.vflip),
        A.RandomRotate90(p=augment.rotate90),
        A.RandomBrightnessContrast(
            brightness_limit=BRIGHTNESS_LIMIT, contrast_limit=CONTRAST_LIMIT, p=augment.brightness_contrast
        ),
    ]
    if num_bands == 3:  # hue/saturation are defined for RGB only
        steps.append(A.HueSaturationValue(
            hue_shift_limit=HUE_SHIFT_LIMIT, sat_shift_limit=SAT_SHIFT_LIMIT,
            val_shift_limit=VAL_SHIFT_LIMIT, p=augment.hue_saturation,
        ))
    elif augment.hue_saturation > 0:
        logger.info("hue/saturation augmentation skipped: it needs 3 bands, the data has %d", num_bands)
    steps.append(A.Affine(
        scale=SCALE_RANGE, translate_percent=(-SHIFT_FRACTION, SHIFT_FRACTION),
        rotate=(-ROTATE_DEGREES, ROTATE_DEGREES),
        interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX, p=augment.shift_scale_rotate,
    ))
    steps = [s for s in steps if s.p > 0]
    return A.Compose(steps, p=1.0) if steps else None


class ChipTransform:
    """Augment (optionally) and normalise one chip; picklable for DataLoader workers.

    Call :meth:`set_epoch` before each epoch: the random draws then depend only
    on (seed, epoch, worker), so runs with the same seed are identical.
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        scale: float = 255.0,
        seed: int = 0,
        stretch: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        """See :func:`build_transform`."""
        self.stretch = tuple((float(lo), float(hi)) for lo, hi in stretch) if stretch is not None else None
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if (self.std <= 0).any():
            raise ValueError(f"normalisation std should be positive, got {tuple(std)}")
        self.scale = float(scale)
        self.seed = int(seed)
        self.epoch = 0
        self._seeded_for: tuple[int, int] | None = None
        self.pipeline = (
            _pipeline(augment, len(self.mean)) if augment is not None and augment.enabled else None
        )

    def set_epoch(self, epoch: int) -> None:
        """Make the random draws of the coming epoch depend on ``epoch``."""
        self.epoch = int(epoch)

    def _reseed(self) -> None:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if self._seeded_for != (self.epoch, worker):
            key = f"{self.seed}/{self.epoch}/{worker}".encode()
            self.pipeline.set_random_seed(zlib.crc32(key))
            self._seeded_for = (self.epoch, worker)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transform ``image`` (H, W, C raw values) and ``mask`` (H, W class ids, or (H, W, K)).

        A (H, W, K) mask is K label layers (class ids, then instance targets, see
        ``ChipDataset``) that move together: albumentations applies the same
        geometry to every layer of a multi-channel mask.

        Returns:
            ``(image, mask)``: normalised float32 (H, W, C) and the mask in its
            dtype and shape; geometric transforms move both alike (nearest for
            the mask) and fill every mask layer with 255 where they bring in padding.
        """
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] != len(self.mean):
            raise ValueError(
                f"chip has {img.shape[2]} bands but normalisation has {len(self.mean)} values"
            )
        if self.stretch is not None:  # before augmentation: the colour transforms work on [0, 1]
            img = apply_stretch(img, self.stretch, channel_axis=-1)
        if self.pipeline is not None:
            self._reseed()
            dtype = mask.dtype
            out = self.pipeline(image=img / self.scale, mask=np.asarray(mask).astype(np.uint8))
            img = out["image"] * self.scale
            mask = out["mask"].astype(dtype, copy=False)
        img = (img - self.mean) / self.std
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(mask)


def build_transform(
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentConfig | None = None,
    scale: float = 255.0,
    seed: int = 0,
    stretch: Sequence[tuple[float, float]] | None = None,
) -> ChipTransform:
    """Build the chip transform for a dataset.

    Args:
        mean: Per-band mean in raw pixel units.
        std: Per-band std in raw pixel units.
        augment: Augmentation settings; None (or ``enabled: false``) only normalises,
            as for validation.
        scale: Raw value of full brightness (:func:`value_scale`); colour
            augmentations work on ``raw / scale``.
        seed: Seed of the random draws.
        stretch: Per band ``(low, high)`` raw values: chips are stretched to [0, 1]
            (:func:`apply_stretch`) before anything else; ``mean``, ``std`` are then in
            stretched units and ``scale`` should be 1.

    Returns:
        A callable ``f(image_hwc, mask_hw) -> (image_hwc, mask_hw)``.
    """
    return ChipTransform(mean=mean, std=std, augment=augment, scale=scale, seed=seed, stretch=stretch)


def normalization_stats(
    kind: str,
    *,
    num_bands: int,
    dtype: str | np.dtype = "uint8",
    dataset: Sequence[Mapping[str, Any]] | None = None,
    stretch: Sequence[tuple[float, float]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std in raw pixel units: ``"imagenet"`` or ``"dataset"`` (from ``dataset``).

    With ``stretch`` (per band ``(low, high)``), of the stretched values in [0, 1] instead.

    Raises:
        ValueError: Unknown kind, or ``"dataset"`` without a dataset.
    """
    if kind == "imagenet":
        return imagenet_stats(num_bands, dtype=dtype, stretched=stretch is not None)
    if kind == "dataset":
        if dataset is None:
            raise ValueError("dataset normalisation needs the training dataset")
        return dataset_stats(dataset, stretch=stretch)
    raise ValueError(f"normalization should be 'imagenet' or 'dataset', got {kind!r}")
