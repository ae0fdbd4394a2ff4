"""Checks done before any work: the scene's bands and ground resolution against the checkpoint."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from geoseg.errors import CheckpointError, file_error
from geoseg.raster_io import SceneInfo

if TYPE_CHECKING:
    from geoseg.models import CheckpointMeta

log = logging.getLogger(__name__)

#: A scene whose ground resolution differs from the training data's by more than this gets a warning.
RESOLUTION_TOLERANCE = 0.25
#: Block sizes are rounded up to a multiple of this (the output tile), or of 16 below it.
BLOCK_ALIGN = 256


def scene_bands(info: SceneInfo, meta: "CheckpointMeta", bands: Sequence[int] | None = None) -> tuple[int, ...]:
    """The scene bands to feed the model, checked against the checkpoint.

    A checkpoint trained on explicitly chosen bands (``data.bands`` in its
    config) reads those bands from any scene that has them; one trained on all
    the bands of its images wants a scene with the same number of bands.

    Args:
        info: The scene.
        meta: The checkpoint description.
        bands: 1-based scene bands chosen by the user (overrides the checkpoint's).

    Returns:
        1-based band indexes.

    Raises:
        CheckpointError: Bands that do not fit, with the fix.
    """
    expected = tuple(int(b) for b in meta.bands)
    listed = ",".join(str(b) for b in expected)
    if bands is not None:
        chosen = tuple(int(b) for b in bands)
        if len(chosen) != len(expected):
            raise file_error(
                CheckpointError, info.path,
                f"--bands {','.join(map(str, chosen))} gives {len(chosen)} bands, the model takes "
                f"{len(expected)} (bands {listed})", f"pass {len(expected)} band numbers",
            )
        bad = [b for b in chosen if not 1 <= b <= info.count]
        if bad:
            raise file_error(
                CheckpointError, info.path, f"has {info.count} bands, no band {bad[0]}",
                f"pass --bands with numbers from 1 to {info.count}",
            )
        return chosen
    data_cfg = meta.config.get("data", {}) if isinstance(meta.config, dict) else {}
    explicit = isinstance(data_cfg, dict) and data_cfg.get("bands") is not None
    fits = max(expected) <= info.count and (explicit or info.count == len(expected))
    if not fits:
        raise file_error(
            CheckpointError, info.path,
            f"scene has {info.count} band{'s' if info.count != 1 else ''}, model expects bands {listed} "
            f"({len(expected)} band{'s' if len(expected) != 1 else ''})",
            f"pass --bands with {len(expected)} band numbers to choose the scene's bands "
            f"(e.g. --bands {','.join(str(i) for i in range(1, len(expected) + 1))}) "
            f"or use a model trained on {info.count}-band imagery",
        )
    return expected


def check_resolution(info: SceneInfo, meta: "CheckpointMeta") -> float | None:
    """Warn when the scene's ground resolution differs from the training data's by > 25%.

    Returns:
        The scene's ground resolution (m/px), or None if it cannot be measured.
    """
    from geoseg.raster_io import ground_resolution

    try:
        res = float(ground_resolution(info))
    except Exception as exc:  # a CRS without ground metres: nothing to compare
        log.debug("%s: ground resolution unknown (%s)", info.path, exc)
        return None
    if meta.resolution and abs(res - meta.resolution) / meta.resolution > RESOLUTION_TOLERANCE:
        message = (
            f"{info.path}: ground resolution {res:.3g} m/px differs from the model's training data "
            f"({meta.resolution:.3g} m/px) by more than {RESOLUTION_TOLERANCE:.0%}; "
            "predictions may be poor (resample the scene to the training resolution)"
        )
        log.warning(message)
    return res


def effective_block_size(block_size: int, chip_size: int) -> int:
    """Block size actually used: at least a chip, aligned to the output tiles."""
    size = max(int(block_size), int(chip_size))
    unit = BLOCK_ALIGN if size >= BLOCK_ALIGN else 16
    return -(-size // unit) * unit
