"""Training data for fit(): scene discovery, splits, chip datasets with their transforms."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from geoseg.config import Config
from geoseg.encoding import IGNORE_INDEX
from geoseg.errors import DatasetError

logger = logging.getLogger(__name__)

#: Training scenes whose ground resolution is measured (the median is stored).
RESOLUTION_SAMPLE = 16
#: Training chips read before training to find out whether any pixel is labelled.
USABLE_SAMPLE = 64


def zero_usable_error(config: Config) -> DatasetError:
    """The error for training data in which no pixel is labelled."""
    return DatasetError(
        f"{', '.join(config.data.root)}: zero usable training chips: every training pixel is nodata, "
        "padding or unlabelled (255); check the images' nodata and the masks"
    )


def check_usable(dataset: Any, config: Config) -> None:
    """Read up to USABLE_SAMPLE training chips (evenly spaced); stop at the first labelled pixel.

    When the sample is the whole dataset and nothing is labelled, training
    cannot learn anything: refuse before it starts. (Larger datasets are
    checked after the first epoch instead, from its confusion counts.)

    Raises:
        DatasetError: No labelled pixel in any training chip.
    """
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, USABLE_SAMPLE)).round().astype(int))
    read = getattr(dataset, "read_chip", dataset.__getitem__)
    for i in idx:
        if (np.asarray(read(int(i))["mask"]) != IGNORE_INDEX).any():
            return
    if len(idx) == n:
        raise zero_usable_error(config)

def scene_name(item: Any) -> str:
    """Name of a split item (a ScenePair or a (ScenePair, region) pair)."""
    pair = item[0] if isinstance(item, tuple) else item
    return str(getattr(pair, "name", pair))


def split_record(splits: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The split as plain JSON: scene names, or {scene, window [col, row, width, height]} for blocks."""
    out: dict[str, list[Any]] = {}
    for key, items in splits.items():
        rows: list[Any] = []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and hasattr(item[1], "col_off"):
                w = item[1]
                rows.append({"scene": scene_name(item), "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)]})
            else:
                rows.append(scene_name(item))
        out[key] = rows
    return out


def missing_root_error(root: str) -> DatasetError:
    """The error for a data folder that does not exist: says which layouts geoseg reads."""
    return DatasetError(
        f"{root}: training data folder does not exist; put scenes in {root}/images/images/NAME.tif "
        f"with masks in {root}/label/label/NAME_label.tif (seed layout), or images/NAME.tif + "
        "labels/NAME.tif, or pass --data PATH"
    )


def raster_only_error(root: str) -> DatasetError:
    """The error for ``model.target=instances`` on a dataset folder that has only raster masks."""
    from geoseg.vector_io import VECTOR_SUFFIXES

    folder = Path(root)
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES) if folder.is_dir() else []
    example = f"{files[0]} (in {root})" if len(files) == 1 else "a GeoPackage, GeoJSON or Shapefile of the buildings"
    return DatasetError(
        f"{root}: has only raster masks, but model.target=instances needs vector labels with one polygon "
        f"per building; set data.vector_labels to {example}, or train model.target=footprint"
    )


def discover(config: Config) -> tuple[list[Any], dict[str, list[Any]], tuple[int, ...], str, float | None]:
    """Find the scene pairs, split them, and read what the model needs from their headers.

    Returns:
        ``(pairs, splits, bands, dtype, resolution)``: all pairs, the split
        (``datasets.split_pairs``), the 1-based bands read, the raster dtype,
        and the median ground resolution (m/px) of up to RESOLUTION_SAMPLE
        training scenes (None if not measurable).

    Raises:
        DatasetError: A missing data folder, no pairs, no training scenes, bands
            a scene lacks.
        InputFileError: A data folder given as a URL.
    """
    from geoseg import datasets
    from geoseg.raster_io import ground_resolution, open_scene
    from geoseg.remote import check_local
    from geoseg.resample import parse_resolution

    d = config.data
    target = parse_resolution(d.resolution, setting="data.resolution", allow_auto=False)
    pairs: list[Any] = []
    for root in d.root:
        check_local(root)  # before Path(), which collapses the // of a URL
        if not Path(root).exists():
            raise missing_root_error(root)
        found = datasets.find_pairs(root, layout=d.layout, vector_labels=d.vector_labels)
        if config.model.target == "instances" and any(p.vector is None for p in found):
            raise raster_only_error(root)
        pairs.extend(found)
    if not pairs:
        raise DatasetError(f"{', '.join(d.root)}: no image/label pairs found; check data.root and data.layout")
    splits = datasets.split_pairs(
        pairs, fractions=tuple(d.split), by=d.split_by, block=d.split_block,
        seed=config.train.seed, split_file=d.split_file,
    )
    train_items = splits.get("train") or []
    if not train_items:
        raise DatasetError(
            f"{', '.join(d.root)}: the split left no training scenes; check data.split / data.split_file"
        )
    infos = {}
    for item in list(train_items) + list(splits.get("val") or []):
        pair = item[0] if isinstance(item, tuple) else item
        if pair.image not in infos:
            infos[pair.image] = open_scene(pair.image, assume_crs=d.assume_crs, check_blocks=False)
    first = next(iter(infos.values()))
    bands = training_bands(d.bands, list(infos.values()))
    if isinstance(target, float):  # every scene is resampled to it: the model learns at exactly this
        return pairs, splits, bands, first.dtype, target
    res = []
    for info in list(infos.values())[:RESOLUTION_SAMPLE]:
        try:
            res.append(ground_resolution(info))
        except Exception as exc:  # resolution is informative only: never fail training on it
            logger.warning("%s: ground resolution not measurable (%s)", info.path, exc)
    resolution = float(np.median(res)) if res else None
    return pairs, splits, bands, first.dtype, resolution


def training_bands(spec: Sequence[int | str] | None, infos: Sequence[Any]) -> tuple[int, ...]:
    """The 1-based bands ``data.bands`` picks, the same in every scene (``infos``: their SceneInfos).

    Numbers are kept; names are matched in each scene (``geoseg.bands``) and must pick the
    same bands in all of them. None: every band of the first scene.

    Raises:
        ConfigError: An empty name or a number below 1.
        DatasetError: A band a scene lacks, a name it lacks or has twice, or names that pick
            other bands in another scene.
    """
    from geoseg.bands import band_spec, by_name, resolve_bands
    from geoseg.errors import ConfigError

    if not spec:
        return tuple(range(1, infos[0].count + 1))
    try:
        wanted = band_spec(spec)
    except ValueError as exc:
        raise ConfigError(f"data.bands {list(spec)}: {exc}; give 1-based band numbers or band names") from None
    if not by_name(wanted):
        bands = tuple(int(b) for b in wanted)
        for info in infos:
            if max(bands) > info.count:
                raise DatasetError(
                    f"{info.path}: has {info.count} bands, data.bands asks for band {max(bands)}; "
                    "set data.bands to bands every scene has"
                )
        return bands
    fix = "set data.bands to band names (or numbers) every scene has"
    found = [(info, resolve_bands(info, wanted, error=DatasetError, fix=fix, what="data.bands")) for info in infos]
    (first, bands), listed = found[0], ",".join(map(str, wanted))
    for info, got in found[1:]:
        if got != bands:
            raise DatasetError(
                f"{info.path}: data.bands {listed} are bands {','.join(map(str, got))} here but "
                f"{','.join(map(str, bands))} in {first.path}; give the scenes the same band names, or set "
                "data.bands to numbers"
            )
    return bands


def chip_dataset(items: list[Any], config: Config, *, bands: tuple[int, ...], train: bool, transform: Any) -> Any:
    """A ChipDataset over ``items``: random windows for training when ``data.train_chips_per_epoch``
    is set, else the chip grid; instance targets for ``model.target=instances``. Training data
    must have label polygons in its images' area (validation scenes may all be empty)."""
    from geoseg import datasets

    d, m = config.data, config.model
    kwargs: dict[str, Any] = {"mode": "grid"}
    if train and d.train_chips_per_epoch:
        kwargs = {"mode": "random", "chips_per_scene": max(1, math.ceil(d.train_chips_per_epoch / len(items)))}
    return datasets.ChipDataset(
        items, chip_size=d.chip_size, stride=d.stride, bands=bands, transform=transform,
        seed=config.train.seed, assume_crs=d.assume_crs, classes=d.classes,
        label_values=d.label_values, target=m.target, border_width=m.border_width,
        contact_width=m.contact_width, require_polygons=train,
        resolution=None if d.resolution == "native" else float(d.resolution),
        scale_jitter=d.scale_jitter if train else 0.0, **kwargs,
    )


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every rank takes indexes rank, rank+world, ... with no padding (exact validation counts)."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indexes = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indexes)

    def __len__(self) -> int:
        return len(self.indexes)


def build_datasets(
    config: Config, splits: dict[str, list[Any]], *, bands: tuple[int, ...], dtype: str,
    stats: tuple[Sequence[float], Sequence[float], Sequence[tuple[float, float]] | None] | None,
) -> tuple[Any, Any | None, Any, tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, float], ...] | None]]:
    """Training and validation datasets with their transforms, and the normalisation used.

    ``stats`` (mean, std, stretch) are reused when given (resume), else computed as
    ``data.stretch`` and ``data.normalization`` say: the stretch's percentiles first
    (``augment.stretch_bounds``), then the statistics of the stretched values.

    Raises:
        ConfigError: ``data.stretch`` not two percentiles 0 <= low < high <= 100.
        DatasetError: No usable training chip, or no valid pixel to measure the stretch or statistics on.
    """
    from geoseg.augment import build_transform, normalization_stats, stretch_bounds, value_scale
    from geoseg.errors import ConfigError

    d = config.data
    zero = DatasetError(f"{', '.join(d.root)}: zero usable training chips; check the images, masks and nodata")
    if stats is None:
        raw = stretch = None
        if d.stretch is not None and not 0 <= d.stretch[0] < d.stretch[1] <= 100:
            raise ConfigError(f"data.stretch should be [low, high] percentiles with 0 <= low < high <= 100 "
                              f"(e.g. [2, 98]), got {list(d.stretch)}")
        if d.normalization == "dataset" or d.stretch is not None:
            raw = chip_dataset(splits["train"], config, bands=bands, train=False, transform=None)
            if len(raw) == 0:
                raise zero
        try:
            if d.stretch is not None:
                stretch = stretch_bounds(raw, (float(d.stretch[0]), float(d.stretch[1])))
            mean_std = normalization_stats(d.normalization, num_bands=len(bands), dtype=dtype, dataset=raw,
                                           stretch=stretch)
        except ValueError:  # no valid pixel to measure: nothing to learn from either
            raise zero_usable_error(config) from None
        stats = (*mean_std, stretch)
    mean, std = tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1])
    stretch = tuple((float(lo), float(hi)) for lo, hi in stats[2]) if stats[2] is not None else None
    scale = 1.0 if stretch is not None else value_scale(dtype)
    train_tf = build_transform(mean=mean, std=std, augment=config.augment, scale=scale, seed=config.train.seed,
                               stretch=stretch)
    val_tf = build_transform(mean=mean, std=std, augment=None, scale=scale, stretch=stretch)
    train_ds = chip_dataset(splits["train"], config, bands=bands, train=True, transform=train_tf)
    if len(train_ds) == 0:
        raise zero
    check_usable(train_ds, config)
    val_items = splits.get("val") or []
    val_ds = chip_dataset(val_items, config, bands=bands, train=False, transform=val_tf) if val_items else None
    if val_ds is None or len(val_ds) == 0:
        logger.warning("no validation chips: best checkpoints, scheduler and early stopping follow the training metrics")
        val_ds = None
    return train_ds, val_ds, train_tf, (mean, std, stretch)
