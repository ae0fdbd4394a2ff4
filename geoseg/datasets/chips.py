"""ChipDataset: chips cut from georeferenced scenes as samples that keep their georeference."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.datasets.pairs import PairItem, ScenePair
from geoseg.errors import ConfigError, DatasetError, InputFileError, file_error
from geoseg.labels import IGNORE_INDEX, LabelValues, VectorLabels, open_label_raster, to_class_ids
from geoseg.raster_io import SceneInfo, ground_resolution, open_scene, read_window
from geoseg.tiling import DEFAULT_CHIP_SIZE, chip_grid, random_chips

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- chips


@dataclass(frozen=True)
class _Source:
    """A validated scene of the dataset (one per distinct item)."""

    pair: ScenePair
    info: SceneInfo
    region: Window  # the pixels chips may use, within the scene
    label_mode: str | None  # resolved value mode of a raster label
    label_nodata: float | None


def _clip_region(region: Window, info: SceneInfo) -> Window:
    c0 = max(0, int(region.col_off))
    r0 = max(0, int(region.row_off))
    c1 = min(info.width, int(region.col_off + region.width))
    r1 = min(info.height, int(region.row_off + region.height))
    return Window(c0, r0, max(0, c1 - c0), max(0, r1 - r0))


def _offset_windows(chips: Sequence[Any], region: Window) -> list[Window]:
    return [
        Window(int(c.window.col_off + region.col_off), int(c.window.row_off + region.row_off),
               int(c.window.width), int(c.window.height))
        for c in chips
    ]


class ChipDataset:
    """A torch Dataset of chips cut from georeferenced scenes.

    Every image is opened and validated when the dataset is built (band count,
    CRS, label grid and label values), so a bad file fails before training
    starts. Rasters are opened lazily per worker process when read.

    Scenes larger than a chip yield several chips: a regular grid
    (``mode="grid"``, for validation and testing; overlap = size - stride) or
    ``chips_per_scene`` windows at random positions (``mode="random"``, for
    training; new positions each epoch via :meth:`set_epoch`). Chips of a
    scene smaller than a chip are padded. Items restricted to a region (from
    :func:`split_pairs` with ``by="block"``) only ever read pixels inside it:
    everything outside the region is padding.

    Padding and image nodata get mask :data:`~geoseg.labels.IGNORE_INDEX` and
    ``valid`` False; padded image pixels are 0.

    Args:
        pairs: ScenePair items, or (ScenePair, region Window) items.
        chip_size: Chip side in pixels.
        stride: Grid step in pixels (default: ``chip_size``).
        mode: ``"grid"`` or ``"random"``.
        chips_per_scene: Random chips per item and epoch (default: as many as
            the grid has for that item).
        bands: 1-based band indexes to read (default: all; every scene must
            then have the same band count).
        transform: ``f(image_hwc float32, mask_hw uint8) -> (image_hwc, mask_hw)``
            applied before conversion to tensors (augmentation, normalisation).
            With a transform, ``valid`` is taken from the transformed mask
            (``mask != 255``), since geometric transforms move pixels.
        seed: Seed of the random windows.
        assume_crs: CRS for scenes that have none.
        classes: Number of classes (for label value checks).
        label_values: How raster label values map to classes (see
            :func:`geoseg.labels.resolve_label_values`).
        class_column: Attribute of vector labels holding class ids (None: binary).

    Raises:
        InputFileError: Missing, unreadable or truncated image or label.
        GeoreferenceError: A scene without CRS (and none assumed).
        LabelError: Label grid differs from the image, or disallowed label values.
        DatasetError: No pairs, bands out of range, band counts that differ, no chips.
        ConfigError: Bad chip size, stride or mode.
    """

    def __init__(
        self,
        pairs: Sequence[PairItem],
        *,
        chip_size: int = DEFAULT_CHIP_SIZE,
        stride: int | None = None,
        mode: Literal["grid", "random"] = "grid",
        chips_per_scene: int | None = None,
        bands: Sequence[int] | None = None,
        transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
        seed: int = 0,
        assume_crs: str | None = None,
        classes: int = 2,
        label_values: LabelValues = "auto",
        class_column: str | None = None,
    ) -> None:
        if int(chip_size) != chip_size or chip_size < 1:
            raise ConfigError(f"chip size should be a positive number of pixels, got {chip_size!r}")
        stride = chip_size if stride is None else stride
        if int(stride) != stride or not 1 <= stride <= chip_size:
            raise ConfigError(
                f"stride should be between 1 and the chip size ({chip_size} px), got {stride!r}"
            )
        if mode not in ("grid", "random"):
            raise ConfigError(f"mode should be 'grid' or 'random', got {mode!r}")
        if chips_per_scene is not None and (int(chips_per_scene) != chips_per_scene
                                            or chips_per_scene < 1):
            raise ConfigError(f"chips_per_scene should be a positive integer, got {chips_per_scene!r}")
        if not pairs:
            raise DatasetError("no scenes to cut chips from; check the dataset folder and the split")
        self.chip_size = int(chip_size)
        self.stride = int(stride)
        self.mode = mode
        self.chips_per_scene = chips_per_scene
        self.bands = tuple(int(b) for b in bands) if bands is not None else None
        self.transform = transform
        self.seed = int(seed)
        self.classes = int(classes)
        self.epoch = 0

        infos: dict[Path, SceneInfo] = {}
        labels: dict[Path, tuple[SceneInfo, str]] = {}
        self.vectors: dict[Path, VectorLabels] = {}
        self.sources: list[_Source] = []
        count = None
        for item in pairs:
            pair, region = (item, None) if isinstance(item, ScenePair) else item
            info = infos.get(pair.image)
            if info is None:
                info = infos[pair.image] = open_scene(pair.image, assume_crs=assume_crs)
                self._check_bands(info, count)
                count = info.count if count is None else count
            mode_, nodata = None, None
            if pair.label is not None:
                if pair.label not in labels:
                    labels[pair.label] = open_label_raster(
                        pair.label, info, classes=classes, label_values=label_values
                    )
                linfo, mode_ = labels[pair.label]
                nodata = linfo.nodata
            elif pair.vector is not None:
                if pair.vector not in self.vectors:
                    self.vectors[pair.vector] = VectorLabels(
                        pair.vector, class_column=class_column, classes=classes,
                        assume_crs=assume_crs,
                    )
            else:
                raise file_error(DatasetError, pair.image, "has no label",
                                 "pair it with a label raster or a vector label file")
            full = Window(0, 0, info.width, info.height)
            reg = full if region is None else _clip_region(region, info)
            if reg.width < 1 or reg.height < 1:
                log.warning("%s: region %s lies outside the scene; skipped", pair.image, region)
                continue
            self.sources.append(_Source(pair, info, reg, mode_, nodata))
        self.in_channels = len(self.bands) if self.bands is not None else int(count or 0)
        self._handles: dict[Path, Any] = {}
        self._pid = os.getpid()
        self.chips: list[tuple[int, Window]] = []
        self.set_epoch(0)
        if not self.chips:
            raise DatasetError("the dataset yields no chips; check the split and the regions")

    def _check_bands(self, info: SceneInfo, count: int | None) -> None:
        if self.bands is not None:
            bad = [b for b in self.bands if not 1 <= b <= info.count]
            if bad:
                raise file_error(
                    DatasetError, info.path,
                    f"has {info.count} bands, band(s) {', '.join(map(str, bad))} were asked for",
                    f"choose bands between 1 and {info.count} (data.bands)",
                )
        elif count is not None and info.count != count:
            raise file_error(
                DatasetError, info.path,
                f"has {info.count} bands where the other scenes have {count}",
                "select common bands with data.bands, e.g. [1, 2, 3]",
            )

    # ---- windows

    def _grid(self, src: _Source) -> list[Window]:
        reg = src.region
        return _offset_windows(
            chip_grid(int(reg.width), int(reg.height), size=self.chip_size, stride=self.stride), reg
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's random windows (a no-op for ``mode="grid"``).

        The windows depend only on (seed, epoch, item), so runs are reproducible.
        Call it before creating the epoch's DataLoader iterator (workers that
        persist across epochs do not see it).
        """
        self.epoch = int(epoch)
        chips: list[tuple[int, Window]] = []
        for k, src in enumerate(self.sources):
            if self.mode == "grid":
                wins = self._grid(src)
            else:
                n = self.chips_per_scene or len(self._grid(src))
                rng = np.random.default_rng([self.seed, self.epoch, k])
                reg = src.region
                wins = _offset_windows(
                    random_chips(int(reg.width), int(reg.height), n, size=self.chip_size, rng=rng),
                    reg,
                )
            chips.extend((k, w) for w in wins)
        self.chips = chips

    def __len__(self) -> int:
        return len(self.chips)

    # ---- reading

    @property
    def scenes(self) -> list[SceneInfo]:
        """The distinct scenes, in order of first appearance."""
        seen: dict[Path, SceneInfo] = {}
        for s in self.sources:
            seen.setdefault(s.info.path, s.info)
        return list(seen.values())

    def ground_resolution(self) -> float:
        """Median ground metres per pixel over the scenes (for the checkpoint)."""
        return float(np.median([ground_resolution(i) for i in self.scenes]))

    def _open(self, path: Path) -> Any:
        if os.getpid() != self._pid:  # a forked worker: never share GDAL handles
            self._handles = {}
            self._pid = os.getpid()
        src = self._handles.get(path)
        if src is None:
            try:
                src = rasterio.open(path)
            except rasterio.errors.RasterioError as exc:
                raise file_error(InputFileError, path, f"cannot be opened ({exc})",
                                 "check that the file was not moved or changed") from None
            self._handles[path] = src
        return src

    def close(self) -> None:
        """Close the open rasters of this process."""
        for src in self._handles.values():
            src.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def read_chip(self, index: int) -> dict[str, Any]:
        """Read chip ``index`` as numpy arrays (no transform, no tensors).

        Returns:
            A dict with ``image`` (C, H, W) float32 raw values, ``mask`` (H, W)
            uint8 class ids (255 ignore), ``valid`` (H, W) bool, ``window``,
            ``transform``, ``crs`` (WKT) and ``scene``.
        """
        k, window = self.chips[index]
        src = self.sources[k]
        info = src.info
        data, valid = read_window(self._open(info.path), window, bands=self.bands)
        h, w = int(window.height), int(window.width)
        reg = src.region
        # Only the item's region may be read (a block split): everything else is padding.
        rows = np.arange(int(window.row_off), int(window.row_off) + h)
        cols = np.arange(int(window.col_off), int(window.col_off) + w)
        in_rows = (rows >= reg.row_off) & (rows < reg.row_off + reg.height)
        in_cols = (cols >= reg.col_off) & (cols < reg.col_off + reg.width)
        inside = in_rows[:, None] & in_cols[None, :]
        if not inside.all():
            data[:, ~inside] = 0
            valid &= inside
        if src.pair.label is not None:
            lab, lab_valid = read_window(self._open(src.pair.label), window, bands=[1])
            mask = to_class_ids(lab[0], mode=src.label_mode or "auto", nodata=src.label_nodata,
                                classes=self.classes, path=src.pair.label)
            mask[~lab_valid] = IGNORE_INDEX
        else:
            mask = self.vectors[src.pair.vector].rasterize(  # type: ignore[index]
                crs=info.crs, transform=info.window_transform(window), shape=(h, w)
            )
        mask[~valid] = IGNORE_INDEX
        return {
            "image": data.astype(np.float32),
            "mask": mask,
            "valid": valid,
            "window": window,
            "transform": info.window_transform(window),
            "crs": info.crs.to_wkt(),
            "scene": src.pair.name,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"chip index {index} out of range for {len(self)} chips")
        s = self.read_chip(index % len(self))
        image, mask, valid = s["image"], s["mask"], s["valid"]
        if self.transform is not None:
            img_hwc, mask = self.transform(np.ascontiguousarray(image.transpose(1, 2, 0)), mask)
            image = np.asarray(img_hwc, dtype=np.float32).transpose(2, 0, 1)
            mask = np.asarray(mask)
            valid = mask != IGNORE_INDEX
        s["image"] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        s["mask"] = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        s["valid"] = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool))
        return s


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: stack ``image``, ``mask`` and ``valid``; lists for everything else.

    Raises:
        DatasetError: If the batch is empty.
    """
    import torch

    if not samples:
        raise DatasetError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("image", "mask", "valid"):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
