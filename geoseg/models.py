"""Segmentation model factory (segmentation-models-pytorch): architectures, encoders, encoder weights files.

The checkpoint format that stores these models lives in :mod:`geoseg.checkpoints`.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoseg.errors import GeosegError, ModelError, file_error

logger = logging.getLogger(__name__)

#: File suffixes that make ``encoder_weights`` a local file rather than a weight name.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Prefixes stripped from state-dict keys: a whole smp model, DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: How many mismatching key names an error message shows.
_SHOW_KEYS = 3
#: What a model learns: ``footprint`` (class ids only) or ``instances`` (class ids plus one
#: sigmoid channel per entry of :data:`INSTANCE_CHANNELS`, used to split touching buildings).
TARGETS = ("footprint", "instances")
#: Extra output channels of an ``instances`` model, after the ``classes`` class logits, in order.
INSTANCE_CHANNELS = ("border", "contact")


def output_channels(classes: int, target: str = "footprint") -> int:
    """Output channels of a model: the class logits, plus the instance channels for ``instances``.

    Layout of an ``instances`` model's output: channels ``0..classes-1`` are class logits
    (softmax, CE + Dice, exactly as a ``footprint`` model), then one logit per
    :data:`INSTANCE_CHANNELS` name (sigmoid, multi-label: border and contact overlap the footprint).

    Raises:
        ValueError: An unknown target.
    """
    if target not in TARGETS:
        raise ValueError(f"target should be one of {', '.join(TARGETS)}, got {target!r}")
    return int(classes) + (len(INSTANCE_CHANNELS) if target == "instances" else 0)


def architectures() -> list[str]:
    """Architecture names that smp accepts (lower case), e.g. ``deeplabv3plus``."""
    import segmentation_models_pytorch as smp

    return list(smp.MODEL_ARCHITECTURES_MAPPING)


def encoders() -> list[str]:
    """smp's own encoder names; any timm model also works as ``tu-<name>``."""
    import segmentation_models_pytorch as smp

    return list(smp.encoders.get_encoder_names())


def _check_names(arch: str, encoder: str) -> None:
    valid_archs = architectures()
    if arch.lower() not in valid_archs:
        raise ModelError(
            f"unknown architecture {arch!r}; use one of: {', '.join(valid_archs)}"
        )
    if encoder.startswith("tu-"):
        import timm

        if timm.is_model(encoder[3:]):
            return
    elif encoder in encoders():
        return
    raise ModelError(
        f"unknown encoder {encoder!r}; use one of: {', '.join(encoders())}, "
        "or 'tu-<name>' for any timm model"
    )


def is_weights_file(value: str | os.PathLike[str] | None) -> bool:
    """Whether ``encoder_weights`` names a local file rather than smp weights (``imagenet``)."""
    if value is None:
        return False
    text = os.fspath(value)
    return (
        os.sep in text
        or "/" in text
        or text.lower().endswith(WEIGHT_FILE_SUFFIXES)
        or Path(text).is_file()
    )


def create_model(
    *,
    arch: str = "deeplabv3plus",
    encoder: str = "resnet50",
    encoder_weights: str | os.PathLike[str] | None = None,
    in_channels: int = 3,
    classes: int = 2,
) -> nn.Module:
    """Build a segmentation model with ``smp.create_model``.

    Args:
        arch: smp architecture name (``deeplabv3plus``, ``unet``, ``fpn``, ...).
        encoder: smp encoder name (``resnet50``, ``efficientnet-b0``, ``tu-<timm name>``).
        encoder_weights: ``"imagenet"`` (or another smp weight name; smp downloads
            them, so this needs the network the first time), None for random
            initialisation, or the path of a local ``.pth``/``.safetensors`` state
            dict of the encoder (for offline machines).
        in_channels: Number of input bands.
        classes: Number of output classes (2 for background/rooftop).

    Returns:
        The model; it outputs logits of shape (N, classes, H, W).

    Raises:
        ModelError: Unknown architecture or encoder, weights that cannot be
            downloaded, or a weights file that does not fit the encoder.
    """
    import segmentation_models_pytorch as smp

    _check_names(arch, encoder)
    if in_channels < 1 or classes < 1:
        raise ModelError(
            f"in_channels ({in_channels}) and classes ({classes}) should be positive; "
            "check data.bands and data.classes"
        )
    local = encoder_weights if is_weights_file(encoder_weights) else None
    named = None if local is not None else encoder_weights
    if local is not None:
        from geoseg.remote import check_local

        check_local(local, error=ModelError)
    if local is not None and not Path(local).is_file():
        raise file_error(
            ModelError, local, "encoder weights file does not exist",
            "check model.encoder_weights (a file, 'imagenet' or null)",
        )
    try:
        model = smp.create_model(
            arch, encoder_name=encoder, encoder_weights=named,
            in_channels=in_channels, classes=classes,
        )
    except KeyError as exc:  # smp: wrong pretrained weight name for this encoder
        raise ModelError(
            f"encoder weights {named!r} are not available for encoder {encoder!r} "
            f"({exc.args[0] if exc.args else exc}); use null or a local weights file"
        ) from None
    except (OSError, ValueError, RuntimeError) as exc:  # no network, hub errors
        if named is None:
            raise
        detail = str(exc).split("\n")[0][:200]
        raise ModelError(
            f"encoder weights {named!r} for {encoder!r} could not be downloaded ({detail}); "
            "connect to the internet once, or set model.encoder_weights to a local weights "
            "file or null"
        ) from None
    if local is not None:
        _load_encoder_file(model.encoder, Path(local), encoder=encoder, in_channels=in_channels)
    return model


# The weights-only loading and its errors live here rather than in geoseg.checkpoints: the encoder
# weights files below need them too, and geoseg.checkpoints imports this module (never the reverse).


def load_weights_only(path: Path, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, without torch's warnings about a refused file.

    The one torch file loader of geoseg: encoder weights files and checkpoints. It never runs
    code from the file; turn its failures into messages with :func:`weights_load_error`.
    """
    with warnings.catch_warnings():
        # e.g. "Detected pickle protocol 4": torch's words about a file refused anyway
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def weights_load_error(
    exc: Exception, path: Path, *, error: type[GeosegError], what: str, fix: str
) -> GeosegError:
    """A failed :func:`load_weights_only` (or safetensors) load in geoseg's own words.

    torch's text for a file that holds Python objects advises loading it with
    ``weights_only=False``, which can run the file's code: it is never shown,
    and nothing here suggests it.
    """
    text = str(exc).lower()
    # A class or function the weights-only unpickler refused ("Unsupported global: GLOBAL ...");
    # bytes that are no pickle at all fail as "Unsupported operand" and are merely unreadable.
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text and "global" in text:
        problem = (f"holds Python objects or code, which geoseg never loads (loading them could run "
                   f"code; a {what} holds only weights and plain values)")
    elif isinstance(exc, OSError):
        problem = f"cannot be read ({exc.strerror or type(exc).__name__})"
        fix = "check that the file is readable (permissions, disk)"
    else:  # a truncated zip, an empty file, another format
        problem = f"is not a readable {what} (truncated, corrupt, or of another format)"
    return file_error(error, path, problem, fix)


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    state: Any
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = load_weights_only(path)
    except Exception as exc:  # any failure means: not a readable state dict
        raise weights_load_error(exc, path, error=ModelError, what="weights file",
                                 fix="pass a .pth or .safetensors state dict of the encoder") from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise file_error(
            ModelError, path, "does not hold a state dict of tensors",
            "pass a .pth or .safetensors state dict of the encoder",
        )
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole smp model: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn a 3-band first-conv weight into ``in_channels`` bands (as smp does for imagenet)."""
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    idx = torch.arange(in_channels) % weight.shape[1]
    return weight[:, idx] * (weight.shape[1] / in_channels)


def _load_encoder_file(encoder_module: nn.Module, path: Path, *, encoder: str, in_channels: int) -> None:
    state = _read_state_file(path)
    own = encoder_module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = []
    for key in own.keys() & state.keys():
        mine, theirs = own[key].shape, state[key].shape
        if mine == theirs:
            continue
        is_first_conv = len(mine) == 4 and mine[1] == in_channels and theirs[:1] + theirs[2:] == mine[:1] + mine[2:]
        if is_first_conv and in_channels != theirs[1]:
            state[key] = _adapt_first_conv(state[key], in_channels)
            logger.info("adapted %s from %d to %d input bands", key, theirs[1], in_channels)
        else:
            wrong.append(f"{key} {tuple(theirs)} in the file vs {tuple(mine)} in the model")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder keys missing (e.g. {', '.join(missing[:_SHOW_KEYS])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:_SHOW_KEYS])})")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ (e.g. {'; '.join(wrong[:_SHOW_KEYS])})")
        raise file_error(
            ModelError, path, f"does not match encoder {encoder!r}: " + ", ".join(parts),
            f"pass weights saved from a {encoder!r} encoder or set model.encoder to the file's encoder",
        )
    encoder_module.load_state_dict(state, strict=True)
    logger.info("loaded encoder weights from %s", path)


def output_stride(model: nn.Module) -> int:
    """The factor by which the model's encoder downsamples its input (pixels)."""
    encoder = getattr(unwrap_model(model), "encoder", None)
    return int(getattr(encoder, "output_stride", 1) or 1)


def check_chip_size(model: nn.Module, chip_size: int, *, arch: str | None = None) -> None:
    """Refuse chips the model cannot process (smaller than, or not a multiple of, its stride).

    Raises:
        ModelError: With the smallest valid chip size in the message.
    """
    stride = output_stride(model)
    base = unwrap_model(model)
    divisible = getattr(base, "requires_divisible_input_shape", True)
    name = arch or type(base).__name__
    if chip_size < stride or (divisible and chip_size % stride):
        nearest = max(stride, -(-chip_size // stride) * stride)
        raise ModelError(
            f"chip size {chip_size} px is too small or not a multiple of the output stride "
            f"({stride} px) of {name}; set data.chip_size to a multiple of {stride} "
            f"(e.g. {nearest}) of at least {stride}"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
