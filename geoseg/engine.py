"""fit(): the training loop — AMP, clipping, scheduler, early stopping, checkpoints, curves, DDP."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from geoseg import __version__
from geoseg.config import Config
from geoseg.errors import CheckpointError, ConfigError, DatasetError
from geoseg.metrics import ConfusionMatrix
from geoseg.models import (
    CheckpointMeta,
    check_chip_size,
    create_model,
    read_checkpoint,
    save_checkpoint,
    unwrap_model,
)

logger = logging.getLogger(__name__)

#: Checkpoint and output file names inside ``train.out_dir``.
BEST_IOU = "best_iou.pt"
BEST_LOSS = "best_loss.pt"
BEST_OBJECT_F1 = "best_object_f1.pt"
LAST = "last.pt"
HISTORY = "history.csv"
CURVES = "learning_curves.png"
SPLIT = "split.json"
#: Metrics written per split to history.csv (keys of ConfusionMatrix.compute()).
METRIC_KEYS = ("pixel_accuracy", "miou", "iou", "precision", "recall", "f1")
#: Training scenes whose ground resolution is measured (the median is stored).
RESOLUTION_SAMPLE = 16

ProgressCallback = Callable[["FitEvent"], None]


@dataclass(frozen=True)
class FitEvent:
    """What ``fit`` reports to its progress callback (rank 0 only).

    ``kind`` is ``"start"`` once before training (``message`` says what is
    trained where), ``"batch"`` after every batch of a stage (``step`` of
    ``steps``, running ``loss`` and ``iou``), ``"epoch"`` after each epoch
    (``message`` is the one-line summary, ``row`` the history row).
    """

    kind: Literal["start", "batch", "epoch"]
    epoch: int
    epochs: int
    stage: Literal["train", "val"] | None = None
    step: int = 0
    steps: int = 0
    loss: float | None = None
    iou: float | None = None
    message: str = ""
    row: dict[str, Any] | None = None


@dataclass(frozen=True)
class FitResult:
    """Outcome of a training run.

    Attributes:
        out_dir: Folder with checkpoints, history.csv and learning_curves.png.
        best_iou: Checkpoint with the best validation rooftop IoU.
        best_loss: Checkpoint with the lowest validation loss.
        last: Checkpoint of the last epoch (with the state to resume).
        history: One row per epoch (as in history.csv).
        best_metrics: The history row of the best-IoU epoch.
        epochs_run: Epochs trained in this call.
        stopped_early: Whether early stopping ended the run.
    """

    out_dir: Path
    best_iou: Path
    best_loss: Path
    last: Path
    history: list[dict[str, Any]]
    best_metrics: dict[str, Any]
    epochs_run: int
    stopped_early: bool


# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` refuses a machine without GPU.

    Raises:
        ConfigError: CUDA asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA GPU is available; use --device cpu or auto")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device should be one of 'auto', 'cpu', 'cuda', got {name!r}")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """Autocast dtype (None: full fp32) and whether to use a GradScaler.

    ``"auto"``: bf16 on GPUs that support it (fp16 + GradScaler on older GPUs),
    bf16 on CPUs with native bf16, else fp32. ``"32"`` is always fp32.

    Raises:
        ConfigError: fp16 asked for on a CPU, or an unknown value.
    """
    if precision == "32":
        return None, False
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
        return (torch.bfloat16, False) if cpu_supports_bf16() else (None, False)
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "16":
        if not cuda:
            raise ConfigError("train.precision '16' (fp16) needs a CUDA GPU; use 'bf16' or '32' on CPU")
        return torch.float16, True
    raise ConfigError(f"precision should be one of 'auto', '32', 'bf16', '16', got {precision!r}")


def _setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the torchrun process group when RANK/WORLD_SIZE say so."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local_rank)
    if world <= 1:
        return _Dist(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owned = True
    logger.info("distributed training: rank %d of %d on %s", rank, world, device)
    return _Dist(rank=rank, world=world, local_rank=local_rank, owned=owned), device


def _all_reduce_sum(values: Sequence[float], ctx: _Dist, device: torch.device) -> list[float]:
    if not ctx.active:
        return [float(v) for v in values]
    import torch.distributed as dist

    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data


def _scene_name(item: Any) -> str:
    pair = item[0] if isinstance(item, tuple) else item
    return str(getattr(pair, "name", pair))


def _split_record(splits: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for key, items in splits.items():
        rows: list[Any] = []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and hasattr(item[1], "col_off"):
                w = item[1]
                rows.append({"scene": _scene_name(item), "window": [int(w.col_off), int(w.row_off), int(w.width), int(w.height)]})
            else:
                rows.append(_scene_name(item))
        out[key] = rows
    return out


def _missing_root_error(root: str) -> DatasetError:
    return DatasetError(
        f"{root}: training data folder does not exist; put scenes in {root}/images/images/NAME.tif "
        f"with masks in {root}/label/label/NAME_label.tif (seed layout), or images/NAME.tif + "
        "labels/NAME.tif, or pass --data PATH"
    )


def _discover(config: Config) -> tuple[list[Any], dict[str, list[Any]], tuple[int, ...], str, float | None]:
    from geoseg import datasets
    from geoseg.raster_io import ground_resolution, open_scene

    d = config.data
    pairs: list[Any] = []
    for root in d.root:
        if not Path(root).exists():
            raise _missing_root_error(root)
        pairs.extend(datasets.find_pairs(root, layout=d.layout, vector_labels=d.vector_labels))
    if not pairs:
        raise DatasetError(f"{', '.join(d.root)}: no image/label pairs found; check data.root and data.layout")
    splits = datasets.split_pairs(
        pairs, fractions=tuple(d.split), by=d.split_by, block=d.split_block,
        seed=config.train.seed, split_file=d.split_file,
    )
    train_items = splits.get("train") or []
    if not train_items:
        raise DatasetError(
            f"{', '.join(d.root)}: the split left no training scenes; check data.split / data.split_file"
        )
    infos = {}
    for item in list(train_items) + list(splits.get("val") or []):
        pair = item[0] if isinstance(item, tuple) else item
        if pair.image not in infos:
            infos[pair.image] = open_scene(pair.image, assume_crs=d.assume_crs, check_blocks=False)
    first = next(iter(infos.values()))
    bands = tuple(d.bands) if d.bands else tuple(range(1, first.count + 1))
    for info in infos.values():
        if max(bands) > info.count:
            raise DatasetError(
                f"{info.path}: has {info.count} bands, data.bands asks for band {max(bands)}; "
                "set data.bands to bands every scene has"
            )
    res = []
    for info in list(infos.values())[:RESOLUTION_SAMPLE]:
        try:
            res.append(ground_resolution(info))
        except Exception as exc:  # resolution is informative only: never fail training on it
            logger.warning("%s: ground resolution not measurable (%s)", info.path, exc)
    resolution = float(np.median(res)) if res else None
    return pairs, splits, bands, first.dtype, resolution


def _dataset(items: list[Any], config: Config, *, bands: tuple[int, ...], train: bool, transform: Any) -> Any:
    from geoseg import datasets

    d = config.data
    kwargs: dict[str, Any] = {"mode": "grid"}
    if train and d.train_chips_per_epoch:
        kwargs = {"mode": "random", "chips_per_scene": max(1, math.ceil(d.train_chips_per_epoch / len(items)))}
    return datasets.ChipDataset(
        items, chip_size=d.chip_size, stride=d.stride, bands=bands, transform=transform,
        seed=config.train.seed, assume_crs=d.assume_crs, classes=d.classes,
        label_values=d.label_values, **kwargs,
    )


class _ShardSampler(torch.utils.data.Sampler[int]):
    """Every rank takes indexes rank, rank+world, ... with no padding (exact validation counts)."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indexes = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indexes)

    def __len__(self) -> int:
        return len(self.indexes)


# ----------------------------------------------------------------------------- loops


@dataclass
class _EpochStats:
    loss: float
    metrics: dict[str, Any]
    chips: int
    skipped: int = 0
    object_f1: float | None = None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["mask"].to(device, non_blocking=True)


@dataclass
class _Loop:
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    ctx: _Dist
    classes: int
    grad_clip: float
    channels_last: bool
    epochs: int
    progress: ProgressCallback | None

    def _report(self, stage: Literal["train", "val"], epoch: int, step: int, steps: int,
                loss_sum: float, chips: int, cm: ConfusionMatrix) -> None:
        if self.progress is None or not self.ctx.main:
            return
        self.progress(FitEvent(
            kind="batch", epoch=epoch, epochs=self.epochs, stage=stage, step=step, steps=steps,
            loss=loss_sum / max(chips, 1), iou=cm.compute()["iou"],
        ))

    def train_epoch(self, loader: Any, epoch: int) -> _EpochStats:
        import torch.distributed as dist

        self.model.train()
        cm = ConfusionMatrix(self.classes)
        loss_sum, chips, skipped = 0.0, 0, 0
        steps = len(loader)
        for step, batch in enumerate(loader, 1):
            images, masks = _to_device(batch, self.device, self.channels_last)
            with _autocast(self.device, self.amp_dtype):
                logits = self.model(images)
            loss = self.criterion(logits, masks)
            finite = torch.isfinite(loss.detach()).float()
            if self.ctx.active:  # every rank must skip together, or backward's all-reduce hangs
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            self.optimizer.zero_grad(set_to_none=True)
            if not bool(finite):
                skipped += 1
                logger.warning("epoch %d step %d: loss is not finite (%s); step skipped",
                               epoch, step, loss.item())
                continue
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
                    skipped += 1
                    logger.warning("epoch %d step %d: gradient is not finite; step skipped", epoch, step)
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            cm.update(logits.detach().argmax(1), masks)
            loss_sum += float(loss.detach()) * images.shape[0]
            chips += images.shape[0]
            self._report("train", epoch, step, steps, loss_sum, chips, cm)
        loss_sum, chips, skipped = _all_reduce_sum([loss_sum, chips, skipped], self.ctx, self.device)
        cm.all_reduce()
        return _EpochStats(loss=loss_sum / max(chips, 1), metrics=cm.compute(), chips=int(chips), skipped=int(skipped))

    @torch.inference_mode()
    def val_epoch(self, loader: Any, epoch: int, *, object_f1: bool) -> _EpochStats:
        model = unwrap_model(self.model)  # no DDP collectives: ranks may have different batch counts
        model.eval()
        cm = ConfusionMatrix(self.classes)
        loss_sum, chips = 0.0, 0
        counts = [0.0, 0.0, 0.0]  # object tp, fp, fn
        scorer = _object_scorer() if object_f1 else None
        steps = len(loader)
        for step, batch in enumerate(loader, 1):
            images, masks = _to_device(batch, self.device, self.channels_last)
            with _autocast(self.device, self.amp_dtype):
                logits = model(images)
            loss = self.criterion(logits, masks)
            pred = logits.argmax(1)
            cm.update(pred, masks)
            loss_sum += float(loss) * images.shape[0]
            chips += images.shape[0]
            if scorer is not None:
                for i, counted in enumerate(scorer(pred.cpu().numpy(), masks.cpu().numpy(), batch)):
                    counts[i] += counted
            self._report("val", epoch, step, steps, loss_sum, chips, cm)
        loss_sum, chips, *counts = _all_reduce_sum([loss_sum, chips, *counts], self.ctx, self.device)
        cm.all_reduce()
        f1 = None
        if scorer is not None:
            tp, fp, fn = counts
            f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
        return _EpochStats(loss=loss_sum / max(chips, 1), metrics=cm.compute(), chips=int(chips), object_f1=f1)


def _object_scorer() -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], tuple[float, float, float]] | None:
    """Object tp/fp/fn per batch via geoseg.evaluation, or None while that module is missing."""
    try:
        from geoseg.evaluation import object_scores_from_masks
    except ImportError:
        logger.warning("object F1 skipped: geoseg.evaluation is not available")
        return None

    def score(pred: np.ndarray, truth: np.ndarray, batch: dict[str, Any]) -> tuple[float, float, float]:
        tp = fp = fn = 0.0
        for i in range(pred.shape[0]):
            result = object_scores_from_masks(
                pred[i].astype(np.uint8), truth[i].astype(np.uint8),
                transform=batch["transform"][i], crs=batch["crs"][i],
            )
            get = (lambda k: result[k]) if isinstance(result, dict) else (lambda k: getattr(result, k))
            tp, fp, fn = tp + float(get("tp")), fp + float(get("fp")), fn + float(get("fn"))
        return tp, fp, fn

    return score


# ----------------------------------------------------------------------------- outputs


def _row(epoch: int, lr: float, train: _EpochStats, val: _EpochStats | None, seconds: float,
         train_seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train.loss}
    row.update({f"train_{k}": float(train.metrics[k]) for k in METRIC_KEYS})
    row["val_loss"] = val.loss if val else None
    row.update({f"val_{k}": (float(val.metrics[k]) if val else None) for k in METRIC_KEYS})
    row["val_object_f1"] = val.object_f1 if val else None
    row.update({
        "skipped_steps": train.skipped, "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
        "train_chips_per_s": round(train.chips / train_seconds, 3) if train_seconds > 0 else None,
    })
    return row


def _summary(row: dict[str, Any], epochs: int) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    text = (
        f"epoch {row['epoch']}/{epochs}: train loss {fmt(row['train_loss'])} IoU {fmt(row['train_iou'])}"
        f" | val loss {fmt(row['val_loss'])} IoU {fmt(row['val_iou'])} PA {fmt(row['val_pixel_accuracy'])}"
        f" F1 {fmt(row['val_f1'])}"
    )
    if row.get("val_object_f1") is not None:
        text += f" object F1 {fmt(row['val_object_f1'])}"
    text += f" | lr {row['lr']:.2e} | {row['seconds']:.1f} s (training {row['train_chips_per_s']:.1f} chips/s)"
    if row.get("skipped_steps"):
        text += f" | {row['skipped_steps']} steps skipped (non-finite)"
    return text


def write_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the epoch rows as CSV (atomically, replacing ``path``)."""
    from geoseg.raster_io import atomic_output

    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})
    with atomic_output(path, overwrite=True) as tmp:
        Path(tmp).write_text(buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------- fit


@dataclass
class _Tracker:
    """Best values so far and the early-stopping counter (stored for --resume)."""

    best_iou: float = -math.inf
    best_loss: float = math.inf
    best_object_f1: float = -math.inf
    best_monitor: float = -math.inf
    bad_epochs: int = 0
    best_row: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def update(self, stats: _EpochStats, row: dict[str, Any], *, monitor: str) -> list[str]:
        """Record an epoch; return the names of the best-checkpoints it improves."""
        improved: list[str] = []
        if stats.metrics["iou"] > self.best_iou:
            self.best_iou, self.best_row = stats.metrics["iou"], row
            improved.append(BEST_IOU)
        if stats.loss < self.best_loss:
            self.best_loss = stats.loss
            improved.append(BEST_LOSS)
        if stats.object_f1 is not None and stats.object_f1 > self.best_object_f1:
            self.best_object_f1 = stats.object_f1
            improved.append(BEST_OBJECT_F1)
        # early stopping counts only epochs where the monitored value was measured
        monitored = stats.object_f1 if monitor == "object_f1" else stats.metrics["iou"]
        if monitored is not None:
            if monitored > self.best_monitor:
                self.best_monitor, self.bad_epochs = monitored, 0
            else:
                self.bad_epochs += 1
        return improved


def _check_resume(data: Any, path: str, config: Config, bands: tuple[int, ...]) -> None:
    meta = data.meta
    in_channels = len(bands)
    want = (config.model.arch.lower(), config.model.encoder, in_channels, config.data.classes)
    have = (meta.arch.lower(), meta.encoder, meta.in_channels, meta.classes)
    if want != have:
        raise CheckpointError(
            f"{path}: was trained as {meta.arch}/{meta.encoder} with {meta.in_channels} bands and "
            f"{meta.classes} classes, the config asks for {config.model.arch}/{config.model.encoder} "
            f"with {in_channels} bands and {config.data.classes} classes; resume with the same model "
            "settings or start a new run without --resume"
        )
    if tuple(meta.bands) != tuple(bands):
        raise CheckpointError(
            f"{path}: was trained on bands {list(meta.bands)}, the data gives bands {list(bands)}; "
            "set data.bands to the checkpoint's bands or start a new run without --resume"
        )
    if not data.extra or "optimizer" not in data.extra:
        raise CheckpointError(
            f"{path}: holds no training state to resume from; resume from the run's {LAST}"
        )


def fit(
    config: Config,
    *,
    resume: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Train a segmentation model as ``config`` says and write its checkpoints.

    Under torchrun (RANK / WORLD_SIZE set) this joins the process group (NCCL
    on GPUs, gloo on CPU) and trains with DistributedDataParallel; only rank 0
    writes files, and metrics are summed over all ranks.

    Args:
        config: The resolved configuration (data, model, augment, train).
        resume: A ``last.pt`` of an earlier run with the same model settings:
            continue from its epoch with its optimizer, scheduler, scaler and
            early-stopping state.
        progress: Called on rank 0 after every batch and epoch (see FitEvent).

    Returns:
        Paths of the checkpoints and the per-epoch history.

    Raises:
        DatasetError: Missing data folder, no pairs, no usable chips.
        ModelError: Unknown architecture/encoder, bad weights file, chips too small.
        CheckpointError: A resume checkpoint that does not fit this run.
        ConfigError: Invalid combinations (fp16 on CPU, batch size 1 with BatchNorm, ...).
    """
    ctx, device = _setup_distributed(config.train.device)
    try:
        return _fit(config, ctx=ctx, device=device, resume=resume, progress=progress)
    finally:
        if ctx.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _datasets(
    config: Config, splits: dict[str, list[Any]], *, bands: tuple[int, ...], dtype: str,
    stats: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[Any, Any | None, Any, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Training and validation datasets with their transforms, and the normalisation used.

    ``stats`` (mean, std) are reused when given (resume), else computed as
    ``data.normalization`` says.
    """
    from geoseg.augment import build_transform, normalization_stats, value_scale

    d = config.data
    zero = DatasetError(f"{', '.join(d.root)}: zero usable training chips; check the images, masks and nodata")
    if stats is None:
        raw = None
        if d.normalization == "dataset":
            raw = _dataset(splits["train"], config, bands=bands, train=False, transform=None)
            if len(raw) == 0:
                raise zero
        stats = normalization_stats(d.normalization, num_bands=len(bands), dtype=dtype, dataset=raw)
    mean, std = tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1])
    scale = value_scale(dtype)
    train_tf = build_transform(mean=mean, std=std, augment=config.augment, scale=scale, seed=config.train.seed)
    val_tf = build_transform(mean=mean, std=std, augment=None, scale=scale)
    train_ds = _dataset(splits["train"], config, bands=bands, train=True, transform=train_tf)
    if len(train_ds) == 0:
        raise zero
    val_items = splits.get("val") or []
    val_ds = _dataset(val_items, config, bands=bands, train=False, transform=val_tf) if val_items else None
    if val_ds is None or len(val_ds) == 0:
        logger.warning("no validation chips: best checkpoints, scheduler and early stopping follow the training metrics")
        val_ds = None
    return train_ds, val_ds, train_tf, (mean, std)


def _fit(config: Config, *, ctx: _Dist, device: torch.device, resume: Any, progress: ProgressCallback | None) -> FitResult:
    from geoseg.datasets import collate_samples
    from geoseg.losses import SegmentationLoss
    from geoseg.plots import plot_learning_curves

    t, d = config.train, config.data
    if t.monitor == "object_f1" and not t.object_f1_every:
        raise ConfigError("train.monitor 'object_f1' needs train.object_f1_every >= 1")
    if len(d.class_names) != d.classes:
        raise ConfigError(f"data.class_names has {len(d.class_names)} names for data.classes {d.classes}; give one per class")
    amp_dtype, use_scaler = resolve_precision(t.precision, device)
    _seed_everything(t.seed)

    _, splits, bands, dtype, resolution = _discover(config)
    in_channels = len(bands)
    resumed = read_checkpoint(resume, map_location="cpu") if resume is not None else None
    if resumed is not None:
        _check_resume(resumed, str(resume), config, bands)

    model = create_model(arch=config.model.arch, encoder=config.model.encoder,
                         encoder_weights=None if resumed else config.model.encoder_weights,
                         in_channels=in_channels, classes=d.classes)
    check_chip_size(model, d.chip_size, arch=config.model.arch)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and d.batch_size < 2:
        raise ConfigError(
            f"data.batch_size {d.batch_size} cannot train {config.model.arch} (BatchNorm needs at least 2 chips per batch); use 2 or more"
        )

    stats = (resumed.meta.mean, resumed.meta.std) if resumed is not None else None
    train_ds, val_ds, train_tf, (mean, std) = _datasets(config, splits, bands=bands, dtype=dtype, stats=stats)
    if len(train_ds) // ctx.world < d.batch_size:
        raise DatasetError(
            f"{', '.join(d.root)}: only {len(train_ds)} training chips for {ctx.world} process(es), fewer than "
            f"data.batch_size {d.batch_size} per process; lower data.batch_size or add data"
        )
    cuda = device.type == "cuda"
    train_sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=t.seed, drop_last=True)
    loader_kw: dict[str, Any] = {
        "batch_size": d.batch_size, "num_workers": d.num_workers, "collate_fn": collate_samples,
        "pin_memory": cuda,
    }
    # drop_last: a last batch of one chip would crash BatchNorm (and skews its statistics)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=train_sampler, drop_last=True, **loader_kw)
    val_loader = (torch.utils.data.DataLoader(val_ds, sampler=_ShardSampler(len(val_ds), ctx.rank, ctx.world), **loader_kw)
                  if val_ds is not None else None)

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = SegmentationLoss(ce_weight=t.ce_weight, dice_weight=t.dice_weight).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    tracker = _Tracker()
    history: list[dict[str, Any]] = []
    start = 1
    if resumed is not None:
        extra = resumed.extra
        model.load_state_dict(resumed.state_dict)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        tracker = _Tracker(**extra["tracker"])
        history = list(extra.get("history") or [])
        start = int(extra["epoch"]) + 1
        if extra.get("rng_torch") is not None:
            torch.set_rng_state(extra["rng_torch"].cpu())
        logger.info("resuming from %s at epoch %d", resume, start)

    train_model: nn.Module = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if t.compile:
        train_model = torch.compile(train_model)
    if cuda:
        torch.backends.cudnn.benchmark = True

    out_dir = Path(t.out_dir)
    paths = {name: out_dir / name for name in (BEST_IOU, BEST_LOSS, BEST_OBJECT_F1, LAST, HISTORY, CURVES, SPLIT)}
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed is None and paths[LAST].exists():
            logger.warning("%s: replacing the checkpoints of an earlier run", out_dir)
        (out_dir / SPLIT).write_text(json.dumps(_split_record(splits), indent=1))
    precision_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")  # type: ignore[arg-type]
    start_message = (
        f"training {config.model.arch}/{config.model.encoder} on {device} ({precision_name}): "
        f"{len(train_ds)} train chips, {len(val_ds) if val_ds is not None else 0} val chips, "
        f"batch {d.batch_size} x {ctx.world} process(es), epochs {start}-{t.epochs}; outputs in {out_dir}"
    )
    logger.info(start_message)
    if progress is not None and ctx.main:
        progress(FitEvent(kind="start", epoch=start, epochs=t.epochs, message=start_message))
    meta = CheckpointMeta(
        arch=config.model.arch, encoder=config.model.encoder, in_channels=in_channels, classes=d.classes,
        class_names=tuple(d.class_names), bands=bands, mean=tuple(mean), std=tuple(std),
        chip_size=d.chip_size, resolution=resolution, config=config.to_dict(), version=__version__,
    )
    loop = _Loop(model=train_model, criterion=criterion, optimizer=optimizer, scaler=scaler, device=device,
                 amp_dtype=amp_dtype, ctx=ctx, classes=d.classes, grad_clip=t.grad_clip,
                 channels_last=t.channels_last, epochs=t.epochs, progress=progress)

    epochs_run, stopped = 0, False
    for epoch in range(start, t.epochs + 1):
        began = time.perf_counter()
        train_sampler.set_epoch(epoch)
        train_tf.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        train_stats = loop.train_epoch(train_loader, epoch)
        train_seconds = time.perf_counter() - began
        if train_stats.metrics["pixels"] == 0:
            raise DatasetError(
                f"{', '.join(d.root)}: zero usable training chips: every training pixel is nodata, "
                "padding or unlabelled (255); check the images' nodata and the masks"
            )
        want_obj = bool(t.object_f1_every) and epoch % t.object_f1_every == 0
        val_stats = loop.val_epoch(val_loader, epoch, object_f1=want_obj) if val_loader is not None else None
        seconds = time.perf_counter() - began
        row = _row(epoch, optimizer.param_groups[0]["lr"], train_stats, val_stats, seconds, train_seconds)
        history.append(row)
        epochs_run += 1
        ref = val_stats or train_stats
        scheduler.step(ref.loss)

        improved = tracker.update(ref, row, monitor=t.monitor)
        stopped = bool(t.early_stopping) and tracker.bad_epochs >= t.early_stopping

        if ctx.main:
            epoch_meta = replace(meta, epoch=epoch, metrics={k: v for k, v in row.items() if v is not None})
            for name in improved:
                save_checkpoint(paths[name], model, epoch_meta)
            save_checkpoint(paths[LAST], model, epoch_meta, extra_state={
                "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "tracker": tracker.state(), "history": history,
                "rng_torch": torch.get_rng_state(),
            })
            write_history(history, paths[HISTORY])
            plot_learning_curves(history, paths[CURVES])
            message = _summary(row, t.epochs)
            logger.info(message)
            if progress is not None:
                progress(FitEvent(kind="epoch", epoch=epoch, epochs=t.epochs, message=message, row=row))
        if stopped:
            logger.info("early stopping: no improvement of %s for %d epochs", t.monitor, tracker.bad_epochs)
            break
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()
    return FitResult(
        out_dir=out_dir, best_iou=paths[BEST_IOU], best_loss=paths[BEST_LOSS], last=paths[LAST],
        history=history, best_metrics=dict(tracker.best_row), epochs_run=epochs_run, stopped_early=stopped,
    )


__all__ = ["FitEvent", "FitResult", "fit", "resolve_device", "resolve_precision", "cpu_supports_bf16",
           "write_history"]
