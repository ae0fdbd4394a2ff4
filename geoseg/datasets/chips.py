"""ChipDataset: chips cut from georeferenced scenes as samples that keep their georeference."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.config import ModelConfig
from geoseg.datasets.pairs import PairItem, ScenePair
from geoseg.errors import ConfigError, DatasetError, InputFileError, LabelError, file_error
from geoseg.labels import (
    IGNORE_INDEX, LabelValues, VectorLabels, crs_text, grid_bounds, open_label_raster, to_class_ids,
)
from geoseg.raster_io import SceneInfo, ground_resolution, open_scene
from geoseg.resample import grid_at, parse_resolution, read_resampled, same_grid
from geoseg.targets import check_target, widths_in_pixels
from geoseg.tiling import DEFAULT_CHIP_SIZE, chip_grid, random_chips

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- chips


@dataclass(frozen=True)
class _Source:
    """A validated scene of the dataset (one per distinct item)."""

    pair: ScenePair
    info: SceneInfo  # the grid chips are cut from: the scene's own, or its grid at data.resolution
    region: Window  # the pixels chips may use, within that grid
    label_mode: LabelValues | None  # resolved value mode of a raster label
    label_nodata: float | None
    widths_px: tuple[float, float] | None = None  # border, contact in pixels of this scene (instances)
    scene: SceneInfo | None = None  # the scene's own grid, when ``info`` is another (resampled reads)


def _clip_region(region: Window, info: SceneInfo) -> Window:
    c0 = max(0, int(region.col_off))
    r0 = max(0, int(region.row_off))
    c1 = min(info.width, int(region.col_off + region.width))
    r1 = min(info.height, int(region.row_off + region.height))
    return Window(c0, r0, max(0, c1 - c0), max(0, r1 - r0))


def _region_on(region: Window, scene: SceneInfo, grid: SceneInfo) -> Window:
    """A region of the scene's pixels as the pixels of ``grid`` whose centres lie in it."""
    if grid is scene:
        return region
    sx, sy = scene.width / grid.width, scene.height / grid.height
    c0, r0 = round(float(region.col_off) / sx), round(float(region.row_off) / sy)
    c1 = round(float(region.col_off + region.width) / sx)
    r1 = round(float(region.row_off + region.height) / sy)
    return Window(c0, r0, c1 - c0, r1 - r0)


def _bounds_text(bounds: Sequence[float], crs: Any) -> str:
    """Bounds for a message: degrees to 6 decimals (~0.1 m), projected units to 1 decimal."""
    return ", ".join(f"{float(v):.{6 if crs.is_geographic else 1}f}" for v in bounds)


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

    With ``resolution`` (ground metres per pixel), every scene is cut on its grid at that
    resolution (``resample.grid_at``: same CRS and extent): images are read resampled
    (bilinear), label rasters with nearest, vector labels rasterised on that grid; windows
    and regions are in its pixels. With ``scale_jitter`` j > 0, each random chip reads a
    window of s x the chip (s log-uniform in [1/(1+j), 1+j], drawn from seed, epoch and
    chip) into the chip: a ground resolution around ``resolution``.

    With ``target="instances"`` every scene needs vector labels with one polygon
    per building; each sample then also holds ``targets``: (2, H, W) uint8, the
    ``border`` and ``contact`` maps (:func:`geoseg.targets.instance_targets`) of
    the chip's buildings rasterised with instance ids on the chip padded as the
    targets need (``VectorLabels.rasterize_targets``), 0/1, and 255 wherever the
    mask is 255. The mask is then exactly ``ids > 0``. ``border_width`` and
    ``contact_width`` (ground metres) become pixels per scene with its ground
    resolution. A transform gets the mask and the targets stacked as one
    (H, W, 3) mask, so that geometric augmentation moves them together.

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
        target: ``"footprint"`` (class ids only) or ``"instances"`` (plus ``targets``).
        border_width: Border width in ground metres (``instances``; ``model.border_width``).
        contact_width: Contact distance in ground metres (``instances``; ``model.contact_width``).
        require_polygons: Refuse a vector label file none of whose polygons meets
            the scenes (regions) that use it (for training data; a validation
            split may well hold only empty scenes).
        resolution: Ground metres per pixel to cut every scene at (None: each as it is).
        scale_jitter: Scale jitter of random chips (0: none).

    Raises:
        InputFileError: Missing, unreadable or truncated image or label.
        GeoreferenceError: A scene without CRS (and none assumed).
        LabelError: Label grid differs from the image, or disallowed label values; a
            vector file without polygons in its images' area (``require_polygons``).
        DatasetError: No pairs, bands out of range, band counts that differ, no chips;
            ``instances`` with a raster label.
        ConfigError: Bad chip size, stride, mode or target; ``instances`` with more
            than 2 classes or a class column; a width below one pixel of a scene.
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
        target: Literal["footprint", "instances"] = "footprint",
        border_width: float = ModelConfig.border_width,
        contact_width: float = ModelConfig.contact_width,
        require_polygons: bool = False,
        resolution: float | None = None,
        scale_jitter: float = 0.0,
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
        check_target(target, classes=classes, class_column=class_column)
        if resolution is not None:
            parse_resolution(resolution, setting="data.resolution", allow_auto=False)
        if not (isinstance(scale_jitter, (int, float)) and 0 <= scale_jitter <= 1):
            raise ConfigError(f"data.scale_jitter should be from 0 (none) to 1 (chips of half to twice the "
                              f"ground extent), got {scale_jitter!r}")
        self.resolution = None if resolution is None else float(resolution)
        self.scale_jitter = float(scale_jitter)
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
        self.target = target
        self.epoch = 0

        infos: dict[Path, SceneInfo] = {}
        grids: dict[Path, SceneInfo] = {}
        labels: dict[Path, tuple[SceneInfo, LabelValues]] = {}
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
                grid = grid_at(info, self.resolution) if self.resolution is not None else info
                grids[pair.image] = info if same_grid(info, grid) else grid
            grid = grids[pair.image]
            mode_, nodata, widths = None, None, None
            if target == "instances":
                if pair.vector is None:
                    raise file_error(
                        DatasetError, pair.label or pair.image,
                        "is a raster mask, but model.target=instances needs vector labels with one "
                        "polygon per building",
                        "set data.vector_labels to a GeoPackage, GeoJSON or Shapefile of the buildings, "
                        "or train model.target=footprint",
                    )
                widths = widths_in_pixels(border_width=border_width, contact_width=contact_width,
                                          resolution=ground_resolution(grid), path=info.path)
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
            full = Window(0, 0, grid.width, grid.height)
            reg = full if region is None else _clip_region(_region_on(region, info, grid), grid)
            if reg.width < 1 or reg.height < 1:
                log.warning("%s: region %s lies outside the scene; skipped", pair.image, region)
                continue
            self.sources.append(_Source(pair, grid, reg, mode_, nodata, widths,
                                        scene=None if grid is info else info))
        if require_polygons:
            self._check_polygons()
        self.in_channels = len(self.bands) if self.bands is not None else int(count or 0)
        self._handles: dict[Path, Any] = {}
        self._pid = os.getpid()
        self.chips: list[tuple[int, Window]] = []
        self.set_epoch(0)
        if not self.chips:
            raise DatasetError("the dataset yields no chips; check the split and the regions")

    def _check_polygons(self) -> None:
        """Refuse a vector label file that has no polygon in the area of its scenes' regions."""
        from rasterio.warp import transform_bounds

        def region_bounds(s: _Source) -> tuple[float, float, float, float]:
            return grid_bounds(s.info.window_transform(s.region), (int(s.region.height), int(s.region.width)))

        for path, labels in self.vectors.items():
            sources = [s for s in self.sources if s.pair.vector == path]
            if not sources:
                continue
            if sum(labels.count(s.info.crs, region_bounds(s)) for s in sources):
                continue
            if len(labels) == 0:
                raise file_error(LabelError, path, "has no label polygons",
                                 "pass the vector file with the building polygons of these images "
                                 "(data.vector_labels)")
            crs = sources[0].info.crs
            boxes = [transform_bounds(s.info.crs, crs, *region_bounds(s)) if s.info.crs != crs
                     else region_bounds(s) for s in sources]
            area = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                    max(b[2] for b in boxes), max(b[3] for b in boxes))
            own = labels.frame(labels.crs).total_bounds
            n = len({s.info.path for s in sources})
            raise file_error(
                LabelError, path,
                f"has no polygons in the area of its {n} image(s) ({crs_text(crs)} bounds "
                f"{_bounds_text(area, crs)}); its {len(labels)} polygons lie within "
                f"{_bounds_text(own, labels.crs)} ({crs_text(labels.crs)})",
                "pass the label file of these images (data.vector_labels), or fix the file's CRS "
                "(ogr2ogr -a_srs EPSG:XXXX)",
            )

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
            ``transform``, ``crs`` (WKT) and ``scene``; for ``target="instances"``
            also ``targets`` (2, H, W) uint8: border, contact (0/1, 255 where the
            mask is 255).
        """
        k, window = self.chips[index]
        src = self.sources[k]
        info = src.info
        h, w = int(window.height), int(window.width)
        read, step = self._jittered(index, window)
        scene = src.scene or info
        data, valid = read_resampled(self._open(info.path), scene, info, read, out_shape=(h, w), bands=self.bands)
        reg = src.region
        # Only the item's region may be read (a block split): everything else is padding.
        rows = float(read.row_off) + (np.arange(h) + 0.5) * step
        cols = float(read.col_off) + (np.arange(w) + 0.5) * step
        in_rows = (rows >= reg.row_off) & (rows < reg.row_off + reg.height)
        in_cols = (cols >= reg.col_off) & (cols < reg.col_off + reg.width)
        inside = in_rows[:, None] & in_cols[None, :]
        if not inside.all():
            data[:, ~inside] = 0
            valid &= inside
        chip_transform = info.window_transform(read) @ Affine.scale(step)
        if src.pair.label is not None:
            lab, lab_valid = read_resampled(self._open(src.pair.label), scene, info, read, out_shape=(h, w),
                                            bands=[1], resampling=Resampling.nearest)
            mask = to_class_ids(lab[0], mode=src.label_mode or "auto", nodata=src.label_nodata,
                                classes=self.classes, path=src.pair.label)
            mask[~lab_valid] = IGNORE_INDEX
        elif src.pair.vector is not None:  # every pair without a label raster has one (__init__)
            vector_labels = self.vectors[src.pair.vector]
            if src.widths_px is not None:
                ids, targets = vector_labels.rasterize_targets(
                    crs=info.crs, transform=chip_transform, shape=(h, w),
                    border_px=src.widths_px[0] / step, contact_px=src.widths_px[1] / step,
                )
                mask = (ids > 0).astype(np.uint8)
            else:
                mask = vector_labels.rasterize(crs=info.crs, transform=chip_transform, shape=(h, w))
        mask[~valid] = IGNORE_INDEX
        sample = {
            "image": data.astype(np.float32),
            "mask": mask,
            "valid": valid,
            "window": window,
            "transform": chip_transform,
            "crs": info.crs.to_wkt(),
            "scene": src.pair.name,
        }
        if src.widths_px is not None:
            targets[:, mask == IGNORE_INDEX] = IGNORE_INDEX
            sample["targets"] = targets
        return sample

    def _jittered(self, index: int, window: Window) -> tuple[Window, float]:
        """The window read into chip ``index`` (its own, or scaled about its centre) and the scale."""
        if self.scale_jitter <= 0 or self.mode != "random":
            return window, 1.0
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        step = float(np.exp(rng.uniform(-np.log1p(self.scale_jitter), np.log1p(self.scale_jitter))))
        w, h = float(window.width) * step, float(window.height) * step
        col = float(window.col_off) + float(window.width) / 2 - w / 2
        row = float(window.row_off) + float(window.height) / 2 - h / 2
        return Window(col, row, w, h), step

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"chip index {index} out of range for {len(self)} chips")
        s = self.read_chip(index % len(self))
        image, mask, valid = s["image"], s["mask"], s["valid"]
        targets = s.get("targets")
        if self.transform is not None:
            # the targets ride along as extra mask layers, so that geometry moves them alike
            layers = mask if targets is None else np.concatenate([mask[None], targets]).transpose(1, 2, 0)
            img_hwc, layers = self.transform(np.ascontiguousarray(image.transpose(1, 2, 0)),
                                             np.ascontiguousarray(layers))
            image = np.asarray(img_hwc, dtype=np.float32).transpose(2, 0, 1)
            layers = np.asarray(layers)
            if targets is None:
                mask = layers
            else:
                mask, targets = layers[:, :, 0], layers[:, :, 1:].transpose(2, 0, 1)
            valid = mask != IGNORE_INDEX
        if targets is not None:
            targets = np.array(targets, dtype=np.uint8)
            targets[:, mask == IGNORE_INDEX] = IGNORE_INDEX
            s["targets"] = torch.from_numpy(targets)
        s["image"] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        s["mask"] = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        s["valid"] = torch.from_numpy(np.ascontiguousarray(valid, dtype=bool))
        return s


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: stack ``image``, ``mask``, ``valid`` and ``targets``; lists for everything else.

    ``targets`` (instance models) becomes (N, 2, H, W) uint8.

    Raises:
        DatasetError: If the batch is empty.
    """
    import torch

    if not samples:
        raise DatasetError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("image", "mask", "valid", "targets"):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
