"""Datasets of georeferenced chips: find image/label pairs, cut chips, split without leaks.

A sample is a dict that keeps its place on the earth: ``image`` (raw pixel
values as float), ``mask`` (class ids, 255 = ignore), ``valid``, ``window``,
``transform``, ``crs`` and ``scene`` (as torchgeo's GeoDataset samples do).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.errors import ConfigError, DatasetError, InputFileError, file_error
from geoseg.labels import (
    IGNORE_INDEX,
    VECTOR_SUFFIXES,
    LabelValues,
    VectorLabels,
    open_label_raster,
    to_class_ids,
)
from geoseg.raster_io import SceneInfo, ground_resolution, open_raster, open_scene, read_window
from geoseg.tiling import DEFAULT_CHIP_SIZE, chip_grid, random_chips

log = logging.getLogger(__name__)

#: File suffixes of raster scenes in dataset folders (case-insensitive).
RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")

Layout = Literal["auto", "seed", "flat", "vector"]
LAYOUTS: tuple[str, ...] = ("auto", "seed", "flat", "vector")
SPLITS: tuple[str, str, str] = ("train", "val", "test")

_LAYOUT_HELP = (
    "use one of the layouts: seed ROOT/images/images/NAME.tif + ROOT/label/label/NAME_label.tif, "
    "flat ROOT/images/NAME.tif + ROOT/labels/NAME.tif, "
    "or vector ROOT/images/NAME.tif + one label file (.gpkg, .geojson, .shp)"
)


@dataclass(frozen=True)
class ScenePair:
    """One scene and its labels.

    Attributes:
        image: The image raster.
        label: A label raster on the image grid, or None.
        vector: A vector label file (any CRS), or None.
        name: Scene name (the image file stem unless given).
    """

    image: Path
    label: Path | None = None
    vector: Path | None = None
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", Path(self.image))
        if self.label is not None:
            object.__setattr__(self, "label", Path(self.label))
        if self.vector is not None:
            object.__setattr__(self, "vector", Path(self.vector))
        if not self.name:
            object.__setattr__(self, "name", self.image.stem)


#: A split item: a whole scene, or a scene restricted to a region (pixels of the scene).
PairItem = Union[ScenePair, tuple[ScenePair, Window]]


# --------------------------------------------------------------------------- finding pairs


def _rasters(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir()
         if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


def _vector_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in VECTOR_SUFFIXES and not p.name.startswith(".")
    )


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Which layout a dataset folder uses: ``"seed"``, ``"flat"`` or ``"vector"``.

    Raises:
        InputFileError: If ``root`` does not exist.
        DatasetError: If the folder matches no layout.
    """
    r = Path(root)
    if not r.exists():
        raise file_error(InputFileError, r, "folder does not exist", "check the path")
    if (r / "images" / "images").is_dir():
        return "seed"
    if (r / "images").is_dir() and (r / "labels").is_dir():
        return "flat"
    if r.is_dir() and (_vector_files(r) and ((r / "images").is_dir() or _rasters(r))):
        return "vector"
    if (r / "images").is_dir():
        raise file_error(
            DatasetError, r, "has images/ but no labels/ folder and no vector label file",
            "add ROOT/labels/NAME.tif for each image, or a vector label file in ROOT",
        )
    raise file_error(DatasetError, r, "is not a dataset folder", _LAYOUT_HELP)


def find_pairs(
    root: str | os.PathLike[str],
    *,
    layout: Layout = "auto",
    vector_labels: str | os.PathLike[str] | None = None,
) -> list[ScenePair]:
    """Find the image/label pairs of a dataset folder, sorted by scene name.

    Layouts:

    - ``"seed"``: ``ROOT/images/images/NAME.tif`` + ``ROOT/label/label/NAME_label.tif``.
    - ``"flat"``: ``ROOT/images/NAME.tif`` + ``ROOT/labels/NAME.tif`` (or ``NAME_label.tif``).
    - ``"vector"``: ``ROOT/images/NAME.tif`` (or ``ROOT/NAME.tif``) + one vector file,
      ``vector_labels`` or the only ``.gpkg``/``.geojson``/``.shp`` in ROOT.

    ``vector_labels`` given with any layout labels every image with that file.
    ``root`` may also be a single image file (then ``vector_labels`` is needed).

    Args:
        root: Dataset folder (or one image).
        layout: A layout above, or ``"auto"`` to detect it.
        vector_labels: A vector label file for all images.

    Returns:
        The pairs.

    Raises:
        InputFileError: ``root`` or ``vector_labels`` does not exist.
        DatasetError: No layout matches, no images, an image without its label,
            or several vector files to choose from.
        ConfigError: Unknown layout name.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout should be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    r = Path(root)
    if not r.exists():
        raise file_error(InputFileError, r, "folder does not exist", "check the path")
    vec = Path(vector_labels) if vector_labels is not None else None
    if vec is not None and not vec.exists():
        raise file_error(InputFileError, vec, "file does not exist", "check the path")
    if r.is_file():
        if vec is None:
            raise file_error(DatasetError, r, "has no label",
                             "pass a vector label file (--labels FILE) or a dataset folder")
        return [ScenePair(image=r, vector=vec)]

    if layout == "auto":
        if vec is not None and not (r / "images").is_dir():
            layout = "vector"
        else:
            layout = detect_layout(r)  # type: ignore[assignment]

    if layout == "seed":
        image_dir = r / "images" / "images"
    elif layout == "flat" or (r / "images").is_dir():
        image_dir = r / "images"
    else:
        image_dir = r
    images = _rasters(image_dir)
    if not images:
        raise file_error(
            DatasetError, r, f"has no images ({image_dir}/*.tif)",
            "put the GeoTIFF scenes there or pass another folder; " + _LAYOUT_HELP,
        )

    if layout == "vector" or vec is not None:
        if vec is None:
            candidates = _vector_files(r)
            if len(candidates) != 1:
                found = ", ".join(p.name for p in candidates) or "none"
                raise file_error(
                    DatasetError, r, f"needs exactly one vector label file, found {found}",
                    "pass the label file with --labels / data.vector_labels",
                )
            vec = candidates[0]
        return [ScenePair(image=p, vector=vec) for p in images]

    pairs = []
    for img in images:
        stem = img.stem
        if layout == "seed":
            base = r / "label" / "label"
            candidates = [base / f"{stem}_label{s}" for s in (".tif", ".tiff", ".TIF")]
        else:
            base = r / "labels"
            candidates = [base / f"{stem}{s}" for s in (".tif", ".tiff", ".TIF")]
            candidates += [base / f"{stem}_label{s}" for s in (".tif", ".tiff")]
        label = _first_existing(candidates)
        if label is None:
            raise file_error(
                DatasetError, img, f"has no label (expected {candidates[0]})",
                "add the label raster or remove the image",
            )
        pairs.append(ScenePair(image=img, label=label))
    return pairs


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


# --------------------------------------------------------------------------- splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(
            f"split fractions should be three non-negative numbers (train, val, test) summing "
            f"to 1, got {list(fractions)!r}"
        )
    if fr[0] == 0:
        raise ConfigError(f"the train fraction should be above 0, got {list(fractions)!r}")
    return fr  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """How many of ``n`` units (scenes or blocks) go to train, val and test.

    Largest-remainder rounding of ``n * fractions``, then small-``n`` care: a
    split with a fraction above 0 gets at least one unit as long as train
    keeps one (val is served before test), and test gets its first unit only
    when train keeps two. With 3 scenes and 0.9/0.05/0.05 that gives 2/1/0;
    with 4 scenes 2/1/1; with 20 scenes 18/1/1.

    Raises:
        ConfigError: Bad fractions.
    """
    fr = _check_fractions(fractions)
    exact = [n * f for f in fr]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if fr[1] > 0 and counts[1] == 0 and counts[0] >= 2:
        counts[0] -= 1
        counts[1] += 1
    if fr[2] > 0 and counts[2] == 0 and counts[0] >= 3:
        counts[0] -= 1
        counts[2] += 1
    return counts[0], counts[1], counts[2]


def _read_split_file(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise file_error(InputFileError, p, "split file does not exist", "check the path")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            raw = yaml.safe_load(text) if p.suffix.lower() != ".json" else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise file_error(DatasetError, p, f"is not valid {p.suffix[1:].upper()} ({exc})".split("\n")[0],
                             "fix the syntax") from None
        if not isinstance(raw, dict):
            raise file_error(DatasetError, p, "should map split names to lists of scene names",
                             "write e.g. {train: [a, b], val: [c], test: [d]}")
        return {str(k): [str(v) for v in (vals or [])] if isinstance(vals, list) else [str(vals)]
                for k, vals in raw.items()}
    # Text: one "NAME SPLIT" (or "NAME,SPLIT") per line; '#' starts a comment.
    out: dict[str, list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise file_error(DatasetError, p, f"line {n} should be 'NAME SPLIT', got {line!r}",
                             "write one scene name and its split (train, val or test) per line")
        out.setdefault(parts[1], []).append(parts[0])
    return out


def _split_from_lists(
    pairs: Sequence[ScenePair], lists: Mapping[str, Sequence[str]], source: str
) -> dict[str, list[PairItem]]:
    unknown_splits = [k for k in lists if k not in SPLITS]
    if unknown_splits:
        raise DatasetError(
            f"{source}: unknown split(s) {', '.join(map(repr, unknown_splits))}; "
            "use train, val and test"
        )
    by_name: dict[str, ScenePair] = {}
    for p in pairs:
        by_name[p.name] = p
        by_name.setdefault(p.image.name, p)
    out: dict[str, list[PairItem]] = {k: [] for k in SPLITS}
    placed: dict[str, str] = {}
    unknown: list[str] = []
    for split in SPLITS:
        for name in lists.get(split, []):
            pair = by_name.get(name)
            if pair is None:
                unknown.append(name)
                continue
            if pair.name in placed and placed[pair.name] != split:
                raise DatasetError(
                    f"{source}: scene {pair.name!r} is listed in both {placed[pair.name]!r} and "
                    f"{split!r}; list each scene once"
                )
            if pair.name not in placed:
                placed[pair.name] = split
                out[split].append(pair)
    if unknown:
        raise DatasetError(
            f"{source}: scene(s) {', '.join(map(repr, unknown[:10]))} are not in the dataset; "
            "check the names (scene names are the image file stems)"
        )
    rest = [p for p in pairs if p.name not in placed]
    if rest:
        if "train" in lists:
            log.warning("%s: %d scenes are in no split and are not used", source, len(rest))
        else:
            out["train"].extend(rest)
    return out


def split_pairs(
    pairs: Sequence[ScenePair],
    *,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    by: Literal["scene", "block"] = "scene",
    block: int = 1024,
    seed: int = 42,
    split_file: str | os.PathLike[str] | Mapping[str, Sequence[str]] | None = None,
    sizes: Mapping[Path, tuple[int, int]] | None = None,
) -> dict[str, list[PairItem]]:
    """Split scenes into train/val/test so that no chip of one split overlaps another.

    - ``by="scene"``: whole scenes are shuffled (seeded) and dealt out with
      :func:`split_counts` (with 3 scenes: 2 train, 1 val, 0 test).
    - ``by="block"``: every scene is cut into square blocks of ``block`` pixels
      (the last row/column may be smaller); blocks of all scenes are shuffled
      and dealt out; each item is ``(ScenePair, block Window)``.
      :class:`ChipDataset` cuts chips only inside an item's block, so chips of
      different splits never share a pixel. Use a block of at least the chip
      size (blocks smaller than a chip give padded chips).
    - ``split_file`` (YAML/JSON mapping ``{train: [...], val: [...], test: [...]}``,
      a text file of ``NAME SPLIT`` lines, or such a mapping itself) names the
      scenes of each split; scenes it does not list go to train when it has no
      ``train`` entry, else are left out.

    Args:
        pairs: The scenes.
        fractions: Train, val and test fractions (sum 1, train > 0).
        by: ``"scene"`` or ``"block"``.
        block: Block side in pixels (``by="block"``).
        seed: Shuffle seed.
        split_file: Explicit assignment (overrides ``fractions`` and ``by``).
        sizes: (width, height) per image path, to skip opening the images for
            ``by="block"``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ConfigError: Bad fractions, ``by`` or block size.
        DatasetError: No pairs; a split file naming unknown scenes or splits.
        InputFileError: A split file or image that cannot be read.
    """
    if not pairs:
        raise DatasetError("no scenes to split; check the dataset folder")
    if split_file is not None:
        if isinstance(split_file, Mapping):
            lists, source = {str(k): list(v) for k, v in split_file.items()}, "split"
        else:
            lists, source = _read_split_file(split_file), os.fspath(split_file)
        return _split_from_lists(pairs, lists, source)
    if by not in ("scene", "block"):
        raise ConfigError(f"split 'by' should be 'scene' or 'block', got {by!r}")
    ordered = sorted(pairs, key=lambda p: (p.name, str(p.image)))
    rng = np.random.default_rng(seed)
    if by == "scene":
        units: list[PairItem] = list(ordered)
    else:
        if int(block) != block or block < 1:
            raise ConfigError(f"split block should be a positive number of pixels, got {block!r}")
        units = []
        for p in ordered:
            if sizes is not None and p.image in sizes:
                width, height = sizes[p.image]
            else:
                with open_raster(p.image) as src:
                    width, height = src.width, src.height
            for r in range(0, height, block):
                for c in range(0, width, block):
                    units.append((p, Window(c, r, min(block, width - c), min(block, height - r))))
    perm = rng.permutation(len(units))
    n_train, n_val, _ = split_counts(len(units), fractions)
    shuffled = [units[i] for i in perm]
    out = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train:n_train + n_val],
        "test": shuffled[n_train + n_val:],
    }
    for k in SPLITS:  # stable, readable order inside each split
        out[k].sort(key=lambda u: (u.name, 0, 0) if isinstance(u, ScenePair)
                    else (u[0].name, int(u[1].row_off), int(u[1].col_off)))
    fr = _check_fractions(fractions)
    if fr[1] > 0 and not out["val"]:
        log.warning("only %d %s(s): the validation split is empty", len(units), by)
    if fr[2] > 0 and not out["test"]:
        log.info("only %d %s(s): the test split is empty", len(units), by)
    return out
