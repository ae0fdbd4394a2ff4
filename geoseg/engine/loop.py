"""One epoch of training or validation: AMP, non-finite steps, clipping, confusion counts."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from geoseg.engine.devices import DistContext, all_reduce_sum
from geoseg.metrics import ChannelCounts, ConfusionMatrix
from geoseg.models import unwrap_model

logger = logging.getLogger(__name__)

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


@dataclass
class EpochStats:
    """Loss (mean per chip), metrics and counts of one epoch of one stage, reduced over ranks."""

    loss: float
    metrics: dict[str, Any]
    chips: int
    skipped: int = 0
    object_f1: float | None = None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast in ``dtype``, or nothing for full fp32 (``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (channels_last if asked) and masks of a batch on ``device``."""
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["mask"].to(device, non_blocking=True)


def targets_to_device(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """The instance targets (N, 2, H, W) of a batch on ``device``, or None for footprint batches."""
    targets = batch.get("targets")
    return None if targets is None else targets.to(device, non_blocking=True)


@dataclass
class EpochLoop:
    """Runs training and validation epochs with fixed model, optimiser and settings.

    ``classes`` is the number of class logits; an ``instances`` model has one more
    output channel per name of ``instance_channels`` after them. Its criterion is
    then called as ``criterion(logits, masks, targets)`` (see
    ``losses.InstanceSegmentationLoss``), the pixel metrics come from the class
    logits alone, and ``{name}_iou`` of each instance channel joins the metrics.
    """

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    ctx: DistContext
    classes: int
    grad_clip: float
    channels_last: bool
    epochs: int
    progress: ProgressCallback | None
    instance_channels: tuple[str, ...] = ()

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if self.instance_channels:
            if targets is None:
                raise ValueError("an instances model needs batches with 'targets'")
            return self.criterion(logits, masks, targets)
        return self.criterion(logits, masks)

    def _counts(self) -> ChannelCounts | None:
        return ChannelCounts(self.instance_channels) if self.instance_channels else None

    def _metrics(self, cm: ConfusionMatrix, counts: ChannelCounts | None) -> dict[str, Any]:
        metrics = cm.compute()
        if counts is not None:
            metrics.update(counts.all_reduce().compute())
        return metrics

    def _report(self, stage: Literal["train", "val"], epoch: int, step: int, steps: int,
                loss_sum: float, chips: int, cm: ConfusionMatrix) -> None:
        if self.progress is None or not self.ctx.main:
            return
        self.progress(FitEvent(
            kind="batch", epoch=epoch, epochs=self.epochs, stage=stage, step=step, steps=steps,
            loss=loss_sum / max(chips, 1), iou=cm.compute()["iou"],
        ))

    def train_epoch(self, loader: Any, epoch: int) -> EpochStats:
        """One pass over ``loader`` with optimiser steps.

        A non-finite loss (or, without a GradScaler, a non-finite gradient norm)
        skips the step on every rank and logs a warning; clipping unscales first.
        """
        import torch.distributed as dist

        self.model.train()
        cm = ConfusionMatrix(self.classes)
        counts = self._counts()
        loss_sum, chips, skipped = 0.0, 0, 0
        steps = len(loader)
        for step, batch in enumerate(loader, 1):
            images, masks = to_device(batch, self.device, self.channels_last)
            targets = targets_to_device(batch, self.device)
            with autocast(self.device, self.amp_dtype):
                logits = self.model(images)
            loss = self._loss(logits, masks, targets)
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
            cm.update(logits.detach()[:, :self.classes].argmax(1), masks)
            if counts is not None:
                counts.update(logits.detach()[:, self.classes:], targets)
            loss_sum += float(loss.detach()) * images.shape[0]
            chips += images.shape[0]
            self._report("train", epoch, step, steps, loss_sum, chips, cm)
        loss_sum, chips, skipped = all_reduce_sum([loss_sum, chips, skipped], self.ctx, self.device)
        cm.all_reduce()
        return EpochStats(loss=loss_sum / max(chips, 1), metrics=self._metrics(cm, counts), chips=int(chips),
                          skipped=int(skipped))

    @torch.inference_mode()
    def val_epoch(self, loader: Any, epoch: int, *, object_f1: bool) -> EpochStats:
        """One pass over ``loader`` without gradients; object F1 too when asked (and available)."""
        model = unwrap_model(self.model)  # no DDP collectives: ranks may have different batch counts
        model.eval()
        cm = ConfusionMatrix(self.classes)
        channel_counts = self._counts()
        loss_sum, chips = 0.0, 0
        counts = [0.0, 0.0, 0.0]  # object tp, fp, fn
        scorer = object_scorer() if object_f1 else None
        steps = len(loader)
        for step, batch in enumerate(loader, 1):
            images, masks = to_device(batch, self.device, self.channels_last)
            targets = targets_to_device(batch, self.device)
            with autocast(self.device, self.amp_dtype):
                logits = model(images)
            loss = self._loss(logits, masks, targets)
            pred = logits[:, :self.classes].argmax(1)
            cm.update(pred, masks)
            if channel_counts is not None:
                channel_counts.update(logits[:, self.classes:], targets)
            loss_sum += float(loss) * images.shape[0]
            chips += images.shape[0]
            if scorer is not None:
                for i, counted in enumerate(scorer(pred.cpu().numpy(), masks.cpu().numpy(), batch)):
                    counts[i] += counted
            self._report("val", epoch, step, steps, loss_sum, chips, cm)
        loss_sum, chips, *counts = all_reduce_sum([loss_sum, chips, *counts], self.ctx, self.device)
        cm.all_reduce()
        f1 = None
        if scorer is not None:
            tp, fp, fn = counts
            f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
        return EpochStats(loss=loss_sum / max(chips, 1), metrics=self._metrics(cm, channel_counts), chips=int(chips),
                          object_f1=f1)


def object_scorer() -> Callable[[np.ndarray, np.ndarray, dict[str, Any]], tuple[float, float, float]] | None:
    """Object tp/fp/fn per batch via geoseg.evaluation, or None (with a warning) where it is missing."""
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
