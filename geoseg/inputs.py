"""Input paths checked before any heavy import: scenes (files, folders, globs) and checkpoints.

``geoseg predict`` calls these before torch and the model stack are imported, so a
missing scene or checkpoint is answered at once (no torch import here).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from geoseg.errors import CheckpointError, InputFileError, file_error
from geoseg.raster_io import check_local

#: Default checkpoint, as written by ``geoseg train``.
DEFAULT_MODEL = Path("saved_models") / "best_iou.pt"
#: Raster extensions picked up from a scene folder.
SCENE_EXTENSIONS = (".tif", ".tiff")


def resolve_scenes(specs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files, folders (their .tif/.tiff files) and glob patterns -> scene files, in order, no repeats.

    Raises:
        InputFileError: A path that does not exist, a URL, a glob or folder with no rasters, or no
            scene at all.
    """
    found: list[Path] = []
    for spec in specs:
        text = os.fspath(spec)
        check_local(text)
        p = Path(text)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in SCENE_EXTENSIONS and f.is_file())
            if not files:
                raise file_error(InputFileError, p, "folder holds no .tif/.tiff scenes", "pass scene files")
            found.extend(files)
        elif p.exists():
            found.append(p)
        elif glob.has_magic(text):
            files = sorted(Path(f) for f in glob.glob(text) if Path(f).is_file())
            if not files:
                raise file_error(InputFileError, text, "matches no files", "check the pattern")
            found.extend(files)
        else:
            raise file_error(InputFileError, p, "file does not exist", "check the path")
    unique: list[Path] = []
    seen: set[Path] = set()
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise InputFileError("no scenes given; pass one or more GeoTIFFs, folders or globs")
    return unique


def check_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """The checkpoint to load (default ``saved_models/best_iou.pt``), refused at once if it is missing.

    Raises:
        CheckpointError: A URL, or no file there (with the hint to train one).
    """
    if model_path is not None:
        check_local(model_path, error=CheckpointError)
    path = Path(model_path) if model_path is not None else DEFAULT_MODEL
    if not path.exists():
        raise file_error(
            CheckpointError, path, "no checkpoint there",
            "run `geoseg train` first or pass --model CKPT",
        )
    return path
