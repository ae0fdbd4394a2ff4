"""Find image/label pairs in dataset folders: the seed, flat and vector layouts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, Union

from rasterio.windows import Window

from geoseg.errors import ConfigError, DatasetError, InputFileError, file_error
from geoseg.vector_io import VECTOR_SUFFIXES
from geoseg.remote import check_local

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


def detect_layout(root: str | os.PathLike[str]) -> Literal["seed", "flat", "vector"]:
    """Which layout a dataset folder uses: ``"seed"``, ``"flat"`` or ``"vector"``.

    Raises:
        InputFileError: If ``root`` does not exist or is a URL.
        DatasetError: If the folder matches no layout.
    """
    check_local(root)
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

    ``vector_labels`` given with any layout labels every image with that file
    (e.g. the flat layout's ``images/`` with ``buildings.gpkg``: one polygon per
    building, as ``model.target=instances`` needs). A relative ``vector_labels``
    that exists inside ``root`` is read from there (so ``buildings.gpkg`` names
    each dataset folder's own file when training on several), else from the
    working directory. ``root`` may also be a single image file (then
    ``vector_labels`` is needed).

    Args:
        root: Dataset folder (or one image).
        layout: A layout above, or ``"auto"`` to detect it.
        vector_labels: A vector label file for all images.

    Returns:
        The pairs.

    Raises:
        InputFileError: ``root`` or ``vector_labels`` does not exist or is a URL.
        DatasetError: No layout matches, no images, an image without its label,
            or several vector files to choose from.
        ConfigError: Unknown layout name.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout should be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    for given in (root, vector_labels):  # before Path(), which collapses the // of a URL
        if given is not None:
            check_local(given)
    r = Path(root)
    if not r.exists():
        raise file_error(InputFileError, r, "folder does not exist", "check the path")
    vec = Path(vector_labels) if vector_labels is not None else None
    if vec is not None and not vec.is_absolute() and r.is_dir() and (r / vec).is_file():
        vec = r / vec
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
            layout = detect_layout(r)

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
