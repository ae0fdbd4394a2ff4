"""Input paths checked before any heavy import: scenes (files, folders, globs, URLs, STAC items) and checkpoints.

``geoseg predict`` calls these before torch and the model stack are imported, so a
missing scene or checkpoint is answered at once (no torch import here).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from geoseg.errors import CheckpointError, InputFileError, file_error
from geoseg.remote import as_source, check_local, is_url
from geoseg.stac import is_stac, stac_assets

#: Default checkpoint, as written by ``geoseg train``.
DEFAULT_MODEL = Path("saved_models") / "best_iou.pt"
#: Raster extensions picked up from a scene folder.
SCENE_EXTENSIONS = (".tif", ".tiff")


class Scene(NamedTuple):
    """One scene to predict.

    Attributes:
        source: A local file (a Path) or a remote raster (its URL or GDAL path, as text).
        name: Its name when it came from a STAC Item (the Item's id); None: named after its file.
    """

    source: Path | str
    name: str | None = None


def find_scenes(specs: Sequence[str | os.PathLike[str]], *, asset: str | None = None) -> list[Scene]:
    """Files, folders (their .tif/.tiff files), glob patterns, URLs and STAC items -> scenes, in order, no repeats.

    A URL or GDAL network path (``https://``, ``s3://``, ``gs://``, ``/vsicurl/``, ...) is taken as it
    is: nothing is asked of its server here. A ``.json`` SCENE (a local file, a glob's match or a URL)
    is a STAC Item or ItemCollection: each Item gives its chosen asset (:mod:`geoseg.stac`).

    Args:
        specs: The SCENE arguments.
        asset: The asset key to take from every STAC Item (``--asset``).

    Raises:
        InputFileError: A path that does not exist, a glob or folder with no rasters, no scene at
            all; a STAC document that cannot be read or an Item without a usable asset; ``asset``
            without any STAC item among ``specs``.
    """
    found: list[Scene] = []
    stac_given = False

    def add(text: str | os.PathLike[str]) -> None:
        nonlocal stac_given
        if is_stac(text):
            stac_given = True
            found.extend(Scene(as_source(a.href), a.item_id) for a in stac_assets(text, asset=asset))
        else:
            found.append(Scene(as_source(text)))

    for spec in specs:
        text = os.fspath(spec)
        if is_url(text):
            add(text)
            continue
        p = Path(text)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in SCENE_EXTENSIONS and f.is_file())
            if not files:
                raise file_error(InputFileError, p, "folder holds no .tif/.tiff scenes", "pass scene files")
            found.extend(Scene(f) for f in files)
        elif p.exists():
            add(text)
        elif glob.has_magic(text):
            matches = sorted(Path(f) for f in glob.glob(text) if Path(f).is_file())
            if not matches:
                raise file_error(InputFileError, text, "matches no files", "check the pattern")
            for f in matches:
                add(f)
        else:
            raise file_error(InputFileError, p, "file does not exist", "check the path")
    if asset is not None and not stac_given:
        raise InputFileError(f"--asset {asset} picks an asset of a STAC item, and no SCENE is one; "
                             "pass a STAC item (.json) or leave out --asset")
    unique: list[Scene] = []
    seen: set[Path | str] = set()
    for scene in found:
        key = scene.source if isinstance(scene.source, str) else scene.source.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(scene)
    if not unique:
        raise InputFileError("no scenes given; pass one or more GeoTIFFs, folders or globs")
    return unique


def resolve_scenes(specs: Sequence[str | os.PathLike[str]], *, asset: str | None = None) -> list[Path | str]:
    """The scenes of :func:`find_scenes`, without their names: local files as Paths, remote ones as text.

    Raises:
        InputFileError: As :func:`find_scenes`.
    """
    return [scene.source for scene in find_scenes(specs, asset=asset)]


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
