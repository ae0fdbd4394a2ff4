"""Self-describing checkpoints: the weights with everything ``predict`` needs, loaded weights-only.

A checkpoint is a ``torch.save`` of plain types and tensors only (format marker, description,
state dict, training state), so it loads with ``torch.load(weights_only=True)`` and never runs
code (as smp's hub mixin stores ``_model_class`` beside the weights). The models themselves are
built by :mod:`geoseg.models`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from geoseg.errors import CheckpointError, ModelError, file_error
from geoseg.models import create_model, load_weights_only, output_channels, unwrap_model, weights_load_error

#: Marker key (and format version) of a geoseg checkpoint file.
CHECKPOINT_FORMAT = "geoseg_checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything ``predict`` needs beside the weights.

    Attributes:
        arch: smp architecture name.
        encoder: smp encoder name.
        in_channels: Number of input bands.
        classes: Number of output classes.
        class_names: One name per class.
        bands: 1-based band indexes of the scene read as model input, in order.
        mean: Per-band mean in raw pixel units (in stretched units, [0, 1], with ``stretch``).
        std: Per-band standard deviation in raw pixel units (stretched units with ``stretch``).
            Preprocessing is ``(raw_float - mean) / std`` per band, after the stretch if any
            (``augment.raw_normalisation`` gives the same in raw units).
        chip_size: Chip size of the training data in pixels.
        resolution: Ground metres per pixel of the training data (None if unknown).
        config: The resolved training configuration (``Config.to_dict()``).
        version: geoseg version that wrote the checkpoint.
        epoch: Epoch the weights come from (1-based).
        metrics: Validation (or training) metrics of that epoch.
        target: ``"footprint"`` or ``"instances"`` (see :func:`output_channels`); checkpoints
            written before targets existed are ``footprint``.
        target_settings: How the instance targets were built: ``border_width`` and
            ``contact_width`` in ground metres (empty for ``footprint``).
        input_dtype: Numpy dtype name of the training scenes (e.g. ``uint8``); None in
            checkpoints written before it was recorded.
        value_range: Per band, the (low, high) raw values the model learned: the 1st and
            99th percentiles of the valid pixels of a decimated read of the training scenes
            (``augment.value_range``). Prediction refuses scenes far outside it and maps
            scenes onto it with ``rescale``; None in older checkpoints (no check).
        stretch: Per band, the (low, high) raw values of the percentile stretch
            (``data.stretch``): the model's input is ``clip((raw - low) / (high - low), 0, 1)``
            normalised with ``mean`` and ``std``. None: no stretch (and older checkpoints).
        band_names: The name of each training band (its description, else its colour
            interpretation; ``geoseg.bands``) when every band had one; None otherwise (and in
            older checkpoints). A model whose ``data.bands`` named its bands finds them by
            name in every scene it predicts.
    """

    arch: str
    encoder: str
    in_channels: int
    classes: int
    class_names: tuple[str, ...]
    bands: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    chip_size: int
    resolution: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    target: str = "footprint"
    target_settings: dict[str, Any] = field(default_factory=dict)
    input_dtype: str | None = None
    value_range: tuple[tuple[float, float], ...] | None = None
    stretch: tuple[tuple[float, float], ...] | None = None
    band_names: tuple[str, ...] | None = None

    @property
    def out_channels(self) -> int:
        """Output channels of the model this checkpoint holds."""
        return output_channels(self.classes, self.target)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples), as stored in the checkpoint."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "CheckpointMeta":
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError, TypeError: Missing or unknown keys.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise TypeError(f"unknown keys {sorted(unknown)}")
        values = dict(raw)
        for key in ("class_names", "bands", "mean", "std"):
            values[key] = tuple(values[key])
        for key in ("value_range", "stretch"):
            if values.get(key) is not None:
                values[key] = tuple((float(lo), float(hi)) for lo, hi in values[key])
        if values.get("band_names") is not None:
            values["band_names"] = tuple(str(n) for n in values["band_names"])
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class CheckpointData:
    """A checkpoint as read from disk, before a model is built from it."""

    meta: CheckpointMeta
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] | None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: CheckpointMeta,
    *,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write model weights and their description atomically (replacing ``path``).

    Only plain types and tensors are stored, so the file loads with
    ``torch.load(weights_only=True)``.

    Args:
        path: Target file (``.pt``).
        model: The model (DDP / compiled wrappers are unwrapped).
        meta: The model's description.
        extra_state: Training state for ``--resume`` (optimizer, scheduler, ...),
            plain types and tensors only.

    Returns:
        The final path.

    Raises:
        OutputError: The folder cannot be written.
    """
    from geoseg.raster_io import atomic_output

    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in unwrap_model(model).state_dict().items()
    }
    payload = {
        CHECKPOINT_FORMAT: CHECKPOINT_VERSION,
        "meta": meta.to_dict(),
        "state_dict": state,
        "extra": dict(extra_state) if extra_state is not None else None,
    }
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> CheckpointData:
    """Read and validate a checkpoint file without building the model.

    Raises:
        CheckpointError: Missing, a URL, unreadable, corrupt or foreign file, or one that
            holds Python objects or code (never loaded).
    """
    from geoseg.remote import check_local

    check_local(path, error=CheckpointError)
    p = Path(path)
    fix = "pass a checkpoint written by geoseg train (e.g. saved_models/best_iou.pt)"
    if not p.exists():
        raise file_error(
            CheckpointError, p, "checkpoint does not exist",
            "run geoseg train first or pass the path of a checkpoint",
        )
    if p.is_dir():
        raise file_error(CheckpointError, p, "is a folder, not a checkpoint file", fix)
    try:
        payload = load_weights_only(p, map_location=map_location)
    except Exception as exc:  # any failure means: not a readable checkpoint
        raise weights_load_error(exc, p, error=CheckpointError, what="checkpoint", fix=fix) from None
    if not isinstance(payload, dict) or CHECKPOINT_FORMAT not in payload:
        raise file_error(CheckpointError, p, "is not a geoseg checkpoint", fix)
    if payload[CHECKPOINT_FORMAT] != CHECKPOINT_VERSION:
        raise file_error(
            CheckpointError, p,
            f"has checkpoint format {payload[CHECKPOINT_FORMAT]}, this geoseg reads {CHECKPOINT_VERSION}",
            "use the geoseg version that wrote it",
        )
    try:
        meta = CheckpointMeta.from_dict(payload["meta"])
        state = payload["state_dict"]
        if not isinstance(state, dict):
            raise TypeError("state_dict is not a dict")
    except (KeyError, TypeError, ValueError) as exc:
        raise file_error(
            CheckpointError, p, f"has an incomplete description ({exc})",
            "use the geoseg version that wrote it",
        ) from None
    return CheckpointData(meta=meta, state_dict=state, extra=payload.get("extra"))


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model a checkpoint describes and load its weights.

    Args:
        path: A file written by :func:`save_checkpoint`.
        map_location: Device for the weights (``torch.load``'s argument).

    Returns:
        ``(model, meta)``; the model is in eval mode on ``map_location``.

    Raises:
        CheckpointError: Missing, corrupt or foreign file, or weights that do not
            fit the architecture it names.
    """
    data = read_checkpoint(path, map_location=map_location)
    meta = data.meta
    try:
        model = create_model(
            arch=meta.arch, encoder=meta.encoder, encoder_weights=None,
            in_channels=meta.in_channels, classes=meta.out_channels,
        )
    except (ModelError, ValueError) as exc:
        raise file_error(CheckpointError, path, f"names a model this geoseg cannot build ({exc})",
                         "use the geoseg version that wrote it") from None
    try:
        model.load_state_dict(data.state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().split("\n")[0][:200]
        raise file_error(
            CheckpointError, path,
            f"weights do not fit {meta.arch}/{meta.encoder} ({detail})", "the file is damaged; retrain",
        ) from None
    model.to(map_location)
    model.eval()
    return model, meta
