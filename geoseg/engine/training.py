"""fit(): the training run — model, optimiser, schedule, early stopping, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn

from geoseg import __version__
from geoseg.checkpoints import CheckpointData, CheckpointMeta, read_checkpoint, save_checkpoint
from geoseg.config import Config
from geoseg.engine.data import ShardSampler, build_datasets, discover, split_record, zero_usable_error
from geoseg.devices import resolve_precision
from geoseg.engine.devices import DistContext, seed_everything, setup_distributed
from geoseg.engine.loop import EpochLoop, EpochStats, FitEvent, ProgressCallback
from geoseg.engine.records import (
    BEST_IOU,
    BEST_LOSS,
    BEST_OBJECT_F1,
    CURVES,
    HISTORY,
    LAST,
    SPLIT,
    Tracker,
    epoch_summary,
    history_row,
    write_history,
)
from geoseg.errors import CheckpointError, ConfigError, DatasetError
from geoseg.models import INSTANCE_CHANNELS, check_chip_size, create_model, is_weights_file, output_channels
from geoseg.publish import atomic_output
from geoseg.raster_io import check_not_inputs

logger = logging.getLogger(__name__)

#: What fit() writes into ``train.out_dir``.
OUTPUT_NAMES = (BEST_IOU, BEST_LOSS, BEST_OBJECT_F1, LAST, HISTORY, CURVES, SPLIT)
#: Training scenes whose band names are read for the checkpoint (they must all agree).
BAND_NAME_SAMPLE = 16


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


def check_resume(data: Any, path: str, config: Config, bands: tuple[int, ...]) -> None:
    """Refuse a resume checkpoint of another model, target or bands, or without training state.

    Raises:
        CheckpointError: Naming what differs.
    """
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
    if meta.target != config.model.target:
        raise CheckpointError(
            f"{path}: was trained with model.target={meta.target}, the config asks for "
            f"model.target={config.model.target}; resume with --set model.target={meta.target} or start "
            "a new run without --resume"
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


def check_run_out_dir(
    config: Config, pairs: Sequence[Any], *, config_file: str | os.PathLike[str] | None = None
) -> None:
    """Refuse a ``train.out_dir`` that is a training data folder or whose files would overwrite an input.

    Inputs are the scenes and labels, their folders and the data roots, the
    split file, a local encoder weights file and the config file. The resume
    checkpoint is not one: continuing a run in its own folder (``--resume
    run/last.pt``) is what it is for, and it is read whole before anything is written.

    Raises:
        OutputError: Naming the output, the input and the fix.
    """
    d, weights = config.data, config.model.encoder_weights
    scenes = [pair.image for pair in pairs]
    labels = [p for pair in pairs for p in (pair.label, pair.vector) if p is not None]
    rasters = scenes + [pair.label for pair in pairs if pair.label is not None]
    folders = dict.fromkeys([*map(Path, d.root), *(p.parent for p in rasters)])  # the data folders, once each
    out = Path(config.train.out_dir)
    check_not_inputs(
        [("train.out_dir", out), *(("train.out_dir", out / name) for name in OUTPUT_NAMES)],
        [*(("training data folder", f) for f in folders), *(("training scene", p) for p in scenes),
         *(("training label", p) for p in labels), ("split file", d.split_file), ("config file", config_file),
         ("encoder weights", weights if is_weights_file(weights) else None)],
    )


def target_settings(config: Config) -> dict[str, Any]:
    """What the checkpoint records about how an ``instances`` model's targets and losses were made.

    ``border_width`` and ``contact_width`` in ground metres, the instance ``channels``
    in output order, and the loss of each channel (name and weight); empty for ``footprint``.
    """
    m, t = config.model, config.train
    if m.target != "instances":
        return {}
    return {
        "border_width": m.border_width, "contact_width": m.contact_width, "channels": list(INSTANCE_CHANNELS),
        "border_loss": t.border_loss, "border_weight": t.border_weight,
        "contact_loss": t.contact_loss, "contact_weight": t.contact_weight,
    }


def training_value_range(
    splits: dict[str, list[Any]], bands: tuple[int, ...]
) -> tuple[tuple[float, float], ...] | None:
    """The value range the model learns, recorded in the checkpoint: ``augment.value_range`` of
    the training scenes (decimated reads of a sample of them, about 1M pixels per band)."""
    from geoseg.augment import value_range

    scenes = [(item[0] if isinstance(item, tuple) else item).image for item in splits.get("train") or []]
    return value_range(list(dict.fromkeys(scenes)), bands)


def training_band_names(
    splits: dict[str, list[Any]], bands: tuple[int, ...], *, assume_crs: str | None
) -> tuple[str, ...] | None:
    """The names of the training bands, recorded in the checkpoint (``bands.names_of``): from up to
    BAND_NAME_SAMPLE training scenes' headers, when every band has a name and the scenes agree."""
    from geoseg.bands import canonical_name, names_of
    from geoseg.raster_io import open_scene

    scenes = [(item[0] if isinstance(item, tuple) else item).image for item in splits.get("train") or []]
    found = None
    for scene in list(dict.fromkeys(scenes))[:BAND_NAME_SAMPLE]:
        names = names_of(open_scene(scene, assume_crs=assume_crs, check_blocks=False), bands)
        if names is None:
            return None
        if found is not None and [canonical_name(n) for n in names] != [canonical_name(n) for n in found]:
            logger.info("training scenes name their bands differently (%s, %s): no band names recorded",
                        ",".join(found), ",".join(names))
            return None
        found = found or names
    return found


def build_criterion(config: Config) -> nn.Module:
    """The training loss: the footprint's CE + Dice, plus the border and contact losses for ``instances``."""
    from geoseg.losses import InstanceSegmentationLoss, SegmentationLoss

    t = config.train
    footprint = SegmentationLoss(ce_weight=t.ce_weight, dice_weight=t.dice_weight)
    if config.model.target != "instances":
        return footprint
    return InstanceSegmentationLoss(
        classes=config.data.classes, footprint=footprint, border_loss=t.border_loss,
        border_weight=t.border_weight, contact_loss=t.contact_loss, contact_weight=t.contact_weight,
    )


def fit(
    config: Config,
    *,
    resume: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    config_file: str | os.PathLike[str] | None = None,
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
        config_file: The YAML file ``config`` was read from, if any (never overwritten).

    Returns:
        Paths of the checkpoints and the per-epoch history.

    Raises:
        DatasetError: Missing data folder, no pairs, no usable chips.
        ModelError: Unknown architecture/encoder, bad weights file, chips too small.
        CheckpointError: A resume checkpoint that does not fit this run.
        ConfigError: Invalid combinations (fp16 on CPU, batch size 1 with BatchNorm, ...).
        OutputError: ``train.out_dir`` is a training data folder, or a file written there
            would overwrite an input (see :func:`check_run_out_dir`).
    """
    ctx, device = setup_distributed(config.train.device)
    try:
        return _fit(config, ctx=ctx, device=device, resume=resume, progress=progress, config_file=config_file)
    finally:
        if ctx.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fit(config: Config, *, ctx: DistContext, device: torch.device, resume: Any, progress: ProgressCallback | None,
         config_file: str | os.PathLike[str] | None = None) -> FitResult:
    """:func:`fit` on this rank, step by step (the steps follow below)."""
    t, d = config.train, config.data
    _check_settings(config)
    amp = resolve_precision(t.precision, device, setting="train.precision")
    seed_everything(t.seed)

    pairs, splits, bands, dtype, resolution = discover(config)
    check_run_out_dir(config, pairs, config_file=config_file)
    resumed = read_checkpoint(resume, map_location="cpu") if resume is not None else None
    if resumed is not None:
        check_resume(resumed, str(resume), config, bands)
    model = _build_model(config, in_channels=len(bands), resumed=resumed is not None)

    stats = (resumed.meta.mean, resumed.meta.std, resumed.meta.stretch) if resumed is not None else None
    train_ds, val_ds, train_tf, (mean, std, stretch) = build_datasets(config, splits, bands=bands, dtype=dtype,
                                                                      stats=stats)
    learned_range = training_value_range(splits, bands)
    names = training_band_names(splits, bands, assume_crs=d.assume_crs)
    loaders = _loaders(config, train_ds, val_ds, ctx=ctx, cuda=device.type == "cuda")

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    state = _training_state(config, model, device=device, use_scaler=amp.scaler)
    if resumed is not None:
        state.restore(model, resumed)
        logger.info("resuming from %s at epoch %d", resume, state.start)
    train_model = _parallel(model, config, ctx=ctx, device=device)

    out_dir = Path(t.out_dir)
    paths = {name: out_dir / name for name in OUTPUT_NAMES}
    if ctx.main:
        _prepare_out_dir(out_dir, splits, fresh=resumed is None)
    start_message = (
        f"training {config.model.arch}/{config.model.encoder} on {device} ({_PRECISION_LABELS[amp.name]}): "
        f"{len(train_ds)} train chips, {len(val_ds) if val_ds is not None else 0} val chips, "
        f"batch {d.batch_size} x {ctx.world} process(es), epochs {state.start}-{t.epochs}; outputs in {out_dir}"
    )
    logger.info(start_message)
    if progress is not None and ctx.main:
        progress(FitEvent(kind="start", epoch=state.start, epochs=t.epochs, message=start_message))
    meta = CheckpointMeta(
        arch=config.model.arch, encoder=config.model.encoder, in_channels=len(bands), classes=d.classes,
        class_names=tuple(d.class_names), bands=bands, mean=tuple(mean), std=tuple(std),
        chip_size=d.chip_size, resolution=resolution, config=config.to_dict(), version=__version__,
        target=config.model.target, target_settings=target_settings(config),
        input_dtype=str(dtype), value_range=learned_range, stretch=stretch, band_names=names,
    )
    loop = EpochLoop(model=train_model, criterion=state.criterion, optimizer=state.optimizer, scaler=state.scaler,
                     device=device, amp_dtype=amp.dtype, ctx=ctx, classes=d.classes, grad_clip=t.grad_clip,
                     channels_last=t.channels_last, epochs=t.epochs, progress=progress,
                     instance_channels=INSTANCE_CHANNELS if config.model.target == "instances" else ())
    epochs_run, stopped = _train_epochs(config, state, loop, loaders, train_tf=train_tf, model=model, meta=meta,
                                        paths=paths, main=ctx.main, progress=progress)
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()
    return FitResult(
        out_dir=out_dir, best_iou=paths[BEST_IOU], best_loss=paths[BEST_LOSS], last=paths[LAST],
        history=state.history, best_metrics=dict(state.tracker.best_row), epochs_run=epochs_run,
        stopped_early=stopped,
    )


# --- the steps of a run -------------------------------------------------------------------------

#: How the start message names each precision.
_PRECISION_LABELS = {"32": "fp32", "bf16": "bf16", "16": "fp16"}


def _check_settings(config: Config) -> None:
    """Refuse setting combinations that no data can make right, before any data is read.

    Raises:
        ConfigError: A target the classes do not allow, ``object_f1`` monitored but never
            computed, or class names that do not match the classes.
    """
    from geoseg.targets import check_target

    t, d = config.train, config.data
    check_target(config.model.target, classes=d.classes)
    if t.monitor == "object_f1" and not t.object_f1_every:
        raise ConfigError("train.monitor 'object_f1' needs train.object_f1_every >= 1")
    if len(d.class_names) != d.classes:
        raise ConfigError(f"data.class_names has {len(d.class_names)} names for data.classes {d.classes}; give one per class")


def _build_model(config: Config, *, in_channels: int, resumed: bool) -> nn.Module:
    """The model of ``config`` (encoder weights only for a new run: a resumed one loads its own).

    Raises:
        ModelError: Unknown architecture/encoder, bad weights file, chips too small.
        ConfigError: A BatchNorm model with batches of one chip.
    """
    d = config.data
    model = create_model(arch=config.model.arch, encoder=config.model.encoder,
                         encoder_weights=None if resumed else config.model.encoder_weights,
                         in_channels=in_channels, classes=output_channels(d.classes, config.model.target))
    check_chip_size(model, d.chip_size, arch=config.model.arch)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and d.batch_size < 2:
        raise ConfigError(
            f"data.batch_size {d.batch_size} cannot train {config.model.arch} (BatchNorm needs at least 2 chips per batch); use 2 or more"
        )
    return model


@dataclass(frozen=True)
class _Loaders:
    """The run's data loaders; ``train_sampler`` shards and shuffles the training chips per epoch."""

    train_sampler: torch.utils.data.DistributedSampler[int]
    train: torch.utils.data.DataLoader[Any]
    val: torch.utils.data.DataLoader[Any] | None


def _loaders(config: Config, train_ds: Any, val_ds: Any | None, *, ctx: DistContext, cuda: bool) -> _Loaders:
    """Loaders over this rank's share of the chips (full batches only in training).

    Raises:
        DatasetError: Fewer training chips per process than a batch.
    """
    from geoseg.datasets import collate_samples

    d, t = config.data, config.train
    if len(train_ds) // ctx.world < d.batch_size:
        raise DatasetError(
            f"{', '.join(d.root)}: only {len(train_ds)} training chips for {ctx.world} process(es), fewer than "
            f"data.batch_size {d.batch_size} per process; lower data.batch_size or add data"
        )
    train_sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=t.seed, drop_last=True)
    loader_kw: dict[str, Any] = {
        "batch_size": d.batch_size, "num_workers": d.num_workers, "collate_fn": collate_samples,
        "pin_memory": cuda,
    }
    # drop_last: a last batch of one chip would crash BatchNorm (and skews its statistics)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=train_sampler, drop_last=True, **loader_kw)
    val_loader = (torch.utils.data.DataLoader(val_ds, sampler=ShardSampler(len(val_ds), ctx.rank, ctx.world), **loader_kw)
                  if val_ds is not None else None)
    return _Loaders(train_sampler, train_loader, val_loader)


@dataclass
class _TrainingState:
    """What training updates and carries from epoch to epoch (and into ``last.pt`` for --resume)."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    tracker: Tracker = field(default_factory=Tracker)
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 1  # the first epoch to train

    def restore(self, model: nn.Module, resumed: CheckpointData) -> None:
        """Continue where ``resumed`` (a ``last.pt``, checked by :func:`check_resume`) stopped."""
        extra = resumed.extra or {}
        model.load_state_dict(resumed.state_dict)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.tracker = Tracker(**extra["tracker"])
        self.history = list(extra.get("history") or [])
        self.start = int(extra["epoch"]) + 1
        if extra.get("rng_torch") is not None:
            torch.set_rng_state(extra["rng_torch"].cpu())

    def resume_state(self, epoch: int) -> dict[str, Any]:
        """The training state ``last.pt`` keeps after ``epoch``, for :meth:`restore`."""
        return {
            "epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "tracker": self.tracker.state(), "history": self.history,
            "rng_torch": torch.get_rng_state(),
        }


def _training_state(config: Config, model: nn.Module, *, device: torch.device, use_scaler: bool) -> _TrainingState:
    """Loss, AdamW, the plateau schedule and the GradScaler of a new run (on ``device``)."""
    t = config.train
    criterion = build_criterion(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return _TrainingState(criterion, optimizer, scheduler, scaler)


def _parallel(model: nn.Module, config: Config, *, ctx: DistContext, device: torch.device) -> nn.Module:
    """The model as training runs it: DistributedDataParallel under torchrun, compiled if asked."""
    cuda = device.type == "cuda"
    train_model: nn.Module = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if config.train.compile:
        train_model = cast(nn.Module, torch.compile(train_model))
    if cuda:
        torch.backends.cudnn.benchmark = True
    return train_model


def _prepare_out_dir(out_dir: Path, splits: dict[str, list[Any]], *, fresh: bool) -> None:
    """Create ``train.out_dir`` and write the split record (rank 0 only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh and (out_dir / LAST).exists():
        logger.warning("%s: replacing the checkpoints of an earlier run", out_dir)
    with atomic_output(out_dir / SPLIT, overwrite=True) as tmp:  # also clears temporaries of killed runs
        tmp.write_text(json.dumps(split_record(splits), indent=1))


def _run_epoch(
    config: Config, loop: EpochLoop, loaders: _Loaders, epoch: int, *, train_tf: Any
) -> tuple[dict[str, Any], EpochStats]:
    """Train one epoch and validate it: its history row, and the stats the schedule and the bests follow.

    The epoch's shuffle, augmentation seed and random windows are drawn first (in its time).

    Raises:
        DatasetError: No usable (labelled, valid) pixel in the training chips.
    """
    t = config.train
    began = time.perf_counter()
    loaders.train_sampler.set_epoch(epoch)
    train_tf.set_epoch(epoch)
    train_ds = loaders.train.dataset
    if hasattr(train_ds, "set_epoch"):
        train_ds.set_epoch(epoch)
    train_stats = loop.train_epoch(loaders.train, epoch)
    train_seconds = time.perf_counter() - began
    if train_stats.metrics["pixels"] == 0:
        raise zero_usable_error(config)
    want_obj = bool(t.object_f1_every) and epoch % t.object_f1_every == 0
    val_stats = loop.val_epoch(loaders.val, epoch, object_f1=want_obj) if loaders.val is not None else None
    seconds = time.perf_counter() - began
    row = history_row(epoch, loop.optimizer.param_groups[0]["lr"], train_stats, val_stats, seconds, train_seconds)
    return row, val_stats or train_stats


def _train_epochs(
    config: Config, state: _TrainingState, loop: EpochLoop, loaders: _Loaders, *, train_tf: Any, model: nn.Module,
    meta: CheckpointMeta, paths: dict[str, Path], main: bool, progress: ProgressCallback | None,
) -> tuple[int, bool]:
    """The epochs from ``state.start`` on, each scheduled, tracked and (on rank 0) saved and reported.

    Returns:
        The epochs run and whether early stopping ended them.
    """
    t = config.train
    epochs_run, stopped = 0, False
    for epoch in range(state.start, t.epochs + 1):
        row, ref = _run_epoch(config, loop, loaders, epoch, train_tf=train_tf)
        state.history.append(row)
        epochs_run += 1
        state.scheduler.step(ref.loss)
        improved = state.tracker.update(ref, row, monitor=t.monitor)
        stopped = bool(t.early_stopping) and state.tracker.bad_epochs >= t.early_stopping
        if main:
            _save_epoch(state, model, replace(meta, epoch=epoch, metrics={k: v for k, v in row.items() if v is not None}),
                        paths, improved=improved)
            message = epoch_summary(row, t.epochs)
            logger.info(message)
            if progress is not None:
                progress(FitEvent(kind="epoch", epoch=epoch, epochs=t.epochs, message=message, row=row))
        if stopped:
            logger.info("early stopping: no improvement of %s for %d epochs", t.monitor, state.tracker.bad_epochs)
            break
    return epochs_run, stopped


def _save_epoch(
    state: _TrainingState, model: nn.Module, meta: CheckpointMeta, paths: dict[str, Path], *, improved: Sequence[str]
) -> None:
    """Write the epoch's checkpoints (the improved bests, ``last.pt`` with the state to resume), history and curves."""
    from geoseg.plots import plot_learning_curves

    for name in improved:
        save_checkpoint(paths[name], model, meta)
    save_checkpoint(paths[LAST], model, meta, extra_state=state.resume_state(meta.epoch))
    write_history(state.history, paths[HISTORY])
    plot_learning_curves(state.history, paths[CURVES])
