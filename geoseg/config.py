"""Configuration: one frozen dataclass per YAML section; defaults < YAML < flags.

``load_config(path, overrides)`` is the only way a Config is built from user
input. Unknown keys and wrong types are ConfigErrors that list what is
allowed. Only cli.py and ``engine.fit`` unpack a whole Config; everything else
takes explicit arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from geoseg.encoding import DEFAULT_CLASS_NAMES
from geoseg.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Folder of the YAML presets shipped with geoseg: ``geoseg/presets`` in an installed wheel,
#: the top-level ``configs/`` folder in a source tree or an editable install.
PRESETS_DIR = (
    _PACKAGE_DIR / "presets" if (_PACKAGE_DIR / "presets").is_dir() else _PACKAGE_DIR.parent / "configs"
)

Precision = Literal["auto", "32", "bf16", "16"]
#: Prediction also runs int8 models (geoseg.quantize), on the CPU.
PredictPrecision = Literal["auto", "32", "bf16", "16", "int8"]
#: What a model learns (the same names as geoseg.models.TARGETS).
Target = Literal["footprint", "instances"]
#: Loss of one instance channel (border or contact): a per-pixel term plus soft Dice, 1:1.
ChannelLoss = Literal["focal_dice", "bce_dice"]


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how it is cut into chips.

    Sizes are in pixels. ``bands``: 1-based band numbers and/or band names (matched to
    descriptions, then colour interpretations: ``geoseg.bands``); null: every band.
    ``stretch``: ``[low, high]`` percentiles (e.g. ``[2, 98]``) of the training pixels per
    band; values are mapped to ``clip((raw - p_low) / (p_high - p_low), 0, 1)`` before
    normalisation, in training and prediction alike; null: no stretch.
    """

    root: tuple[str, ...] = ("dataset",)
    layout: Literal["auto", "seed", "flat", "vector"] = "auto"
    vector_labels: str | None = None
    chip_size: int = 256
    stride: int | None = None
    bands: tuple[int | str, ...] | None = None
    classes: int = 2
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    label_values: Literal["auto", "binary255", "binary01", "classes"] = "auto"
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    split_by: Literal["scene", "block"] = "scene"
    split_block: int = 1024
    split_file: str | None = None
    train_chips_per_epoch: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    assume_crs: str | None = None
    normalization: Literal["imagenet", "dataset"] = "imagenet"
    # Ground metres per pixel every scene is resampled to on read (bilinear imagery, nearest or
    # rasterised-at-target labels); ``native``: each scene as it is.
    resolution: float | Literal["native"] = "native"
    # Scale jitter of training chips (random windows): each reads a window of between
    # 1/(1+j) and (1+j) times the chip's ground extent into the chip (log-uniform), i.e. a
    # ground resolution around ``resolution``; 0: none.
    scale_jitter: float = 0.0
    stretch: tuple[float, float] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The segmentation model (segmentation-models-pytorch) and what it learns.

    ``target``: ``footprint`` (class ids only) or ``instances`` (the same class
    logits plus sigmoid ``border`` and ``contact`` channels, built per chip from
    vector labels with one polygon per building; see ``geoseg.targets``).
    ``border_width`` and ``contact_width`` are in ground metres (converted per
    scene with its ground resolution; each must be at least one pixel). The
    defaults fit 0.075-0.3 m imagery: a 0.5 m border is 2-7 px, about a roof's
    edge and eaves; a 1.0 m contact distance marks gaps up to about 2 m (the
    passages between houses that merge into blobs) and reaches 1 m into
    touching roofs, leaving a seed core in houses 3 m wide or more.
    """

    arch: str = "deeplabv3plus"
    encoder: str = "resnet50"
    encoder_weights: str | None = "imagenet"
    target: Target = "footprint"
    border_width: float = 0.5
    contact_width: float = 1.0


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (albumentations); probabilities in [0, 1]."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: float = 0.5
    brightness_contrast: float = 0.3
    hue_saturation: float = 0.2
    shift_scale_rotate: float = 0.3


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, loss, schedule, precision and checkpointing.

    The footprint loss is ``ce_weight * CE + dice_weight * Dice`` (any target).
    An ``instances`` model adds ``border_weight * L(border) + contact_weight *
    L(contact)``, ``L`` one of ``focal_dice`` (binary focal + soft Dice, 1:1, as
    solaris' SpaceNet-4 configs of selimsef's footprint/boundary/contact model)
    or ``bce_dice`` (binary cross-entropy + soft Dice, 1:1).
    """

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ce_weight: float = 0.6
    dice_weight: float = 0.4
    border_loss: ChannelLoss = "focal_dice"
    border_weight: float = 1.0
    contact_loss: ChannelLoss = "focal_dice"
    contact_weight: float = 1.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    early_stopping: int = 10
    precision: Precision = "auto"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "saved_models"
    object_f1_every: int = 0
    monitor: Literal["iou", "object_f1"] = "iou"
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class PredictConfig:
    """Sliding-window inference and vectorisation: the defaults of ``geoseg predict`` and of the library.

    ``batch_size`` is in chips (None: 16 on a CPU, 128 on a GPU); ``overlap`` in
    pixels (None: a quarter of the chip); ``min_area`` in m²; ``simplify`` in
    metres; ``block_size`` in pixels; ``min_seed_area`` in m².
    """

    batch_size: int | None = None
    overlap: int | None = None
    block_size: int = 2048
    tta: bool = False
    threshold: float = 0.5
    min_area: float = 4.0
    simplify: float = 0.25
    regularize: bool = False
    precision: PredictPrecision = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | None = None  # torch.compile; null: on a CPU for scenes of 20000 chips or more (4000 with AMX)
    instances: bool | None = None  # split touching buildings; null: when the checkpoint learned instances
    seed_threshold: float = 0.5
    min_seed_area: float = 0.5
    # Ground metres per pixel the model reads the scene at: ``auto`` (the checkpoint's, when
    # the scene's differs by more than 5%), ``native`` (the scene's own) or metres.
    resolution: float | Literal["auto", "native"] = "auto"


@dataclass(frozen=True)
class Config:
    """The whole configuration, one attribute per YAML section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), e.g. to store in a checkpoint."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in args or (isinstance(value, int) and str(value) in args):
            return value if value in args else str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item_types = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
            if len(item_types) == 1 or len(item_types) == len(value):
                its = item_types * len(value) if len(item_types) == 1 else item_types
                return tuple(_coerce(v, t, key) for v, t in zip(value, its))
        elif isinstance(value, str) and args[:1] == (str,) and args[1:] == (Ellipsis,):
            return (value,)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' should be {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown config key '{section}.{key}'; allowed keys in '{section}': "
                + ", ".join(allowed)
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} should look like section.key=value, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} should look like section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    return parts[0], parts[1], value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a nested dict (as read from YAML or a checkpoint).

    Raises:
        ConfigError: Unknown section or key, or a value of the wrong type.
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(
                f"unknown config section '{name}'; allowed sections: " + ", ".join(sections)
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' should be a mapping, got {values!r}")
        built[name] = _build(hints[name], values, name)
    return Config(**built)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides.

    Args:
        path: YAML file, or the name of a preset in ``configs/`` (``"quickstart"``).
            None gives the built-in defaults.
        overrides: Items like ``"train.lr=1e-4"``; values are parsed as YAML.

    Returns:
        The resolved configuration.

    Raises:
        ConfigError: Missing or malformed file, unknown key, wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists() and (PRESETS_DIR / f"{p}.yaml").exists():
            p = PRESETS_DIR / f"{p}.yaml"
        if not p.exists():
            presets = ", ".join(sorted(q.stem for q in PRESETS_DIR.glob("*.yaml")))
            raise ConfigError(
                f"{p}: config file does not exist; pass a YAML file or a preset ({presets})"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}; fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: should be a mapping of sections (data, model, ...); fix the file")
        raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in loaded.items()}
    for item in overrides:
        section, key, value = _parse_override(item)
        sect = raw.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"config section '{section}' should be a mapping, got {sect!r}")
        sect[key] = value
    return config_from_dict(raw)
