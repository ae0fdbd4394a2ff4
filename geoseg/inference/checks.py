"""Checks of a scene against the checkpoint: bands, ground resolution, value range (before any work),
and of the prediction's rooftop share (after it)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import TYPE_CHECKING, Sequence

from geoseg.errors import CheckpointError, ConfigError, file_error
from geoseg.raster_io import SceneInfo
from geoseg.remote import source_key

if TYPE_CHECKING:
    from geoseg.checkpoints import CheckpointMeta

log = logging.getLogger(__name__)

#: A scene whose ground resolution differs from the training data's by more than this gets a warning.
RESOLUTION_TOLERANCE = 0.25
#: Block sizes are rounded up to a multiple of this (the output tile), or of 16 below it.
BLOCK_ALIGN = 256
#: A scene band whose values reach more than this many times as high as the training data's
#: (magnitudes of the 1st-99th percentile ranges) is refused: values the model never saw (uint16
#: 0-10000 on a uint8 model is 40x; a brighter scene of the same kind rarely reaches 2x).
VALUE_TOO_HIGH = 4.0
#: ... or less than 1/this as high: another encoding (0-1 reflectance on a uint8 model is 255x,
#: uint8 on a 16-bit 0-3000 model 12x). Laxer than VALUE_TOO_HIGH: dark scenes (water, shadow,
#: dusk) are of the same kind and often 2-4x darker.
VALUE_TOO_LOW = 8.0
#: A prediction in which more than this share of the valid pixels is rooftop gets a warning.
ROOFTOP_SHARE_WARNING = 0.9
#: numpy dtype name -> GDAL type name, for the gdal_translate command a refusal suggests.
_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def _wanted(meta: "CheckpointMeta") -> str:
    """What the model was trained on, for messages: band names (when recorded) or numbers."""
    return ",".join(meta.band_names) if meta.band_names else ",".join(str(b) for b in meta.bands)


def _names_fix(meta: "CheckpointMeta") -> str:
    n = len(meta.bands)
    return (f"pass --bands with the {n} of this scene's bands (numbers or names) that are the model's "
            f"{_wanted(meta)}, e.g. --bands {','.join(str(i) for i in range(1, n + 1))}")


def scene_bands(
    info: SceneInfo, meta: "CheckpointMeta", bands: Sequence[int | str] | None = None
) -> tuple[int, ...]:
    """The scene bands to feed the model, checked against the checkpoint.

    A checkpoint trained on bands chosen by name (``data.bands: [red, green, blue]`` in its
    config) finds those names in every scene (``geoseg.bands``: descriptions, then colour
    interpretations); one trained on bands chosen by number reads those bands from any scene
    that has them; one trained on all the bands of its images wants a scene with the same
    number of bands (and logs a warning when the scene's band names differ from the ones it
    recorded).

    Args:
        info: The scene.
        meta: The checkpoint description.
        bands: 1-based scene bands or band names chosen by the user (overrides the checkpoint's).

    Returns:
        1-based band indexes.

    Raises:
        CheckpointError: Bands that do not fit, or names the scene lacks, with the scene's bands
            and the fix.
    """
    from geoseg.bands import band_spec, by_name, resolve_bands

    expected = tuple(int(b) for b in meta.bands)
    listed = ",".join(str(b) for b in expected)
    if bands is not None:
        try:
            spec = band_spec(bands)
        except ValueError as exc:
            raise ConfigError(f"--bands {','.join(map(str, bands))}: {exc}; pass band numbers or names") from None
        if len(spec) != len(expected):
            raise file_error(
                CheckpointError, info.path,
                f"--bands {','.join(map(str, spec))} gives {len(spec)} bands, the model takes "
                f"{len(expected)} (bands {_wanted(meta) if by_name(spec) else listed})",
                f"pass {len(expected)} band {'numbers or names' if by_name(spec) else 'numbers'}",
            )
        if by_name(spec):
            return resolve_bands(info, spec, error=CheckpointError, fix=_names_fix(meta), what="--bands")
        chosen = tuple(int(b) for b in spec)
        bad = [b for b in chosen if not 1 <= b <= info.count]
        if bad:
            raise file_error(
                CheckpointError, info.path, f"has {info.count} bands, no band {bad[0]}",
                f"pass --bands with numbers from 1 to {info.count}",
            )
        return chosen
    data_cfg = meta.config.get("data", {}) if isinstance(meta.config, dict) else {}
    explicit = isinstance(data_cfg, dict) and data_cfg.get("bands") is not None
    if explicit and by_name(data_cfg["bands"]):
        return resolve_bands(info, data_cfg["bands"], error=CheckpointError, fix=_names_fix(meta),
                             what="the model wants bands")
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
    _warn_renamed(info, meta, expected)
    return expected


def _warn_renamed(info: SceneInfo, meta: "CheckpointMeta", bands: tuple[int, ...]) -> None:
    """Warn when the scene names the model's bands (chosen by number) otherwise than the training data."""
    from geoseg.bands import canonical_name, names_of

    found = names_of(info, bands)
    if meta.band_names is None or found is None:
        return
    if [canonical_name(n) for n in found] != [canonical_name(n) for n in meta.band_names]:
        log.warning("%s: bands %s are %s here, the model learned %s; if they are not the same bands, %s",
                    info.path, ",".join(map(str, bands)), ",".join(found), ",".join(meta.band_names),
                    _names_fix(meta))


def model_resolution(info: SceneInfo, meta: "CheckpointMeta", setting: str | float = "auto") -> float | None:
    """The ground resolution (m/px) to read the scene at, or None to read it on its own grid.

    ``auto`` reads at the checkpoint's resolution when the scene's differs from it by more
    than ``resample.AUTO_TOLERANCE`` (on its own grid when either is unknown); ``native``
    reads the scene as it is (with a warning when it differs from the model's by more than
    25%); metres read at those metres.

    Args:
        info: The scene.
        meta: The checkpoint description (``resolution``: ground metres it learned at).
        setting: ``"auto"``, ``"native"`` or ground metres per pixel (> 0).

    Returns:
        Ground metres per pixel of the model grid, or None (the scene's own grid).

    Raises:
        ConfigError: A setting that is not auto, native or metres above 0.
        GeoreferenceError: Metres asked for on a scene whose CRS has no ground metres.
    """
    from geoseg.raster_io import ground_resolution
    from geoseg.resample import AUTO_TOLERANCE, parse_resolution

    wanted = parse_resolution(setting)
    if isinstance(wanted, float):
        res = float(ground_resolution(info))
        return None if abs(res - wanted) <= 1e-9 * wanted else wanted
    try:
        res = float(ground_resolution(info))
    except Exception as exc:  # a CRS without ground metres: nothing to compare
        log.debug("%s: ground resolution unknown (%s)", info.path, exc)
        return None
    model = float(meta.resolution) if meta.resolution else None
    if model is None:
        return None
    off = abs(res - model) / model
    if wanted == "auto":
        if off <= AUTO_TOLERANCE:
            return None
        log.info("%s: ground resolution %.3g m/px, read at the model's %.3g m/px", info.path, res, model)
        return model
    if off > RESOLUTION_TOLERANCE:
        log.warning(
            "%s: ground resolution %.3g m/px differs from the model's training data (%.3g m/px) by more "
            "than %.0f%%; predictions may be poor (predict with --resolution auto to read it at the "
            "model's resolution)", info.path, res, model, RESOLUTION_TOLERANCE * 100,
        )
    return None


@dataclasses.dataclass(frozen=True)
class ValueMap:
    """A linear per-band map of a scene's raw values onto the range a model learned.

    Attributes:
        scale: Per band, the factor (positive).
        offset: Per band, added after the factor: ``mapped = scale * raw + offset``.
    """

    scale: tuple[float, ...]
    offset: tuple[float, ...]

    def applied_to(self, meta: "CheckpointMeta") -> "CheckpointMeta":
        """``meta`` whose normalisation applies the map first: ``(scale * raw + offset - mean) / std``
        is ``(raw - mean') / std'`` with ``mean' = (mean - offset) / scale`` and ``std' = std / scale``,
        so the normaliser maps every block at no extra cost. With a stretch, the map moves the
        stretch's bounds instead (``low' = (low - offset) / scale``), the scale being positive;
        mean and std stay in stretched units."""
        if meta.stretch is not None:
            stretch = tuple(((lo - o) / k, (hi - o) / k) for (lo, hi), o, k in zip(meta.stretch, self.offset, self.scale))
            return dataclasses.replace(meta, stretch=stretch)
        mean = tuple((m - o) / k for m, o, k in zip(meta.mean, self.offset, self.scale))
        std = tuple(s / k for s, k in zip(meta.std, self.scale))
        return dataclasses.replace(meta, mean=mean, std=std)


@functools.lru_cache(maxsize=4096)  # every scene of a run: checked before any work, then as it is predicted
def _sampled_range(
    path: str, bands: tuple[int, ...], stamp: tuple[int, int]
) -> tuple[tuple[float, float], ...] | None:
    from geoseg.augment import value_range

    return value_range([path], bands)


def scene_value_range(
    path: str | os.PathLike[str], bands: Sequence[int]
) -> tuple[tuple[float, float], ...] | None:
    """``augment.value_range`` of one scene (a decimated read), remembered while the file is unchanged:
    ``predict_files`` checks every scene before any work, ``predict_scene`` checks again."""
    key, stamp = source_key(path)
    return _sampled_range(key, tuple(int(b) for b in bands), stamp)


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _span(low: float, high: float) -> str:
    return f"{_num(low)}-{_num(high)}" if low >= 0 else f"{_num(low)} to {_num(high)}"


def _magnitude(low: float, high: float) -> float:
    return max(abs(low), abs(high))


def check_value_range(
    info: SceneInfo, meta: "CheckpointMeta", bands: Sequence[int], *, rescale: bool = False
) -> ValueMap | None:
    """Refuse a scene whose values are far outside the range the model learned, or map it onto it.

    The scene's range is ``augment.value_range`` of a decimated read (about 1M
    pixels per band, an overview where the file has one): the same estimate that
    training records in the checkpoint (``meta.value_range``). A band is far
    outside when the magnitude of its range (max of |low|, |high|) is more than
    VALUE_TOO_HIGH times the learned one, or less than 1/VALUE_TOO_LOW of it.
    Checkpoints without a recorded range (older ones) are not checked.

    Args:
        info: The scene.
        meta: The checkpoint description.
        bands: 1-based scene bands fed to the model, in the checkpoint's order.
        rescale: Instead of refusing, return the map of each band's range onto the
            learned one (linear, not clipped: like the training data, about 1% of
            the pixels fall beyond each end); it is logged in one line.

    Returns:
        The map with ``rescale`` (None when the scene has no valid pixel), else None.

    Raises:
        CheckpointError: A scene far outside the learned range (without ``rescale``),
            with the numbers and the fix; ``rescale`` with a checkpoint that records no range.
    """
    learned = meta.value_range
    if learned is None or len(learned) != len(bands):
        if rescale:
            raise file_error(
                CheckpointError, info.path,
                "--rescale needs the value range the model learned, and this (older) checkpoint does not "
                "record it", "retrain the model with this geoseg, or rescale the scene to the training "
                "data's range yourself (gdal_translate -scale)",
            )
        return None
    found = scene_value_range(info.path, bands)
    if found is None:  # every pixel is nodata: the prediction says so
        return None
    if rescale:
        scale, offset, parts = [], [], []
        for band, (s_lo, s_hi), (m_lo, m_hi) in zip(bands, found, learned):
            k = (m_hi - m_lo) / (s_hi - s_lo) if s_hi > s_lo else 1.0
            o = m_lo - k * s_lo if s_hi > s_lo else (m_lo + m_hi) / 2 - s_lo
            scale.append(k)
            offset.append(o)
            parts.append(f"band {band} {_span(s_lo, s_hi)} -> {_span(m_lo, m_hi)}")
        log.warning("%s: --rescale maps the values linearly onto the model's (1st-99th percentiles): %s",
                    info.path, ", ".join(parts))
        return ValueMap(tuple(scale), tuple(offset))
    bad = []
    for i, (s, m) in enumerate(zip(found, learned)):
        if _magnitude(*m) == 0:  # a band that was 0 in training: nothing to compare with
            continue
        if not 1 / VALUE_TOO_LOW <= _magnitude(*s) / _magnitude(*m) <= VALUE_TOO_HIGH:
            bad.append(i)
    if not bad:
        return None
    s_lo, s_hi = min(found[i][0] for i in bad), max(found[i][1] for i in bad)
    m_lo, m_hi = min(learned[i][0] for i in bad), max(learned[i][1] for i in bad)
    names = ",".join(str(bands[i]) for i in bad)
    which = "" if len(bad) == len(bands) else f"bands {names} have " if len(bad) > 1 else f"band {names} has "
    gdal_type = _GDAL_TYPES.get(str(meta.input_dtype))
    raise file_error(
        CheckpointError, info.path,
        f"{which}values up to {_num(s_hi)} ({info.dtype}) but the model learned {_span(m_lo, m_hi)} "
        f"({meta.input_dtype or 'dtype not recorded'})",
        f"rescale the scene to {_span(m_lo, m_hi)} (gdal_translate -scale {_num(s_lo)} {_num(s_hi)} "
        f"{_num(m_lo)} {_num(m_hi)}{f' -ot {gdal_type}' if gdal_type else ''}) or pass --rescale to map it "
        "on the fly",
    )


def check_rooftop_share(path: str | os.PathLike[str], rooftop: int, valid: int) -> None:
    """Warn when more than ROOFTOP_SHARE_WARNING of a prediction's valid pixels are rooftop:
    real scenes are never that full of roofs; wrong bands or values outside the model's range are."""
    if valid and rooftop > ROOFTOP_SHARE_WARNING * valid:
        log.warning(
            "%s: %.1f%% of the valid pixels are rooftop, which is rarely real; check the bands (--bands) "
            "and the scene's value range against the model's (--rescale)", path, 100.0 * rooftop / valid,
        )


def effective_block_size(block_size: int, chip_size: int) -> int:
    """Block size actually used: at least a chip, aligned to the output tiles."""
    size = max(int(block_size), int(chip_size))
    unit = BLOCK_ALIGN if size >= BLOCK_ALIGN else 16
    return -(-size // unit) * unit
