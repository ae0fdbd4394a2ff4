"""What fit() writes and remembers per epoch: history rows, summaries, best values."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from geoseg.engine.loop import EpochStats

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
#: Metrics of the instance channels (``instances`` models only; ChannelCounts.compute()).
INSTANCE_METRIC_KEYS = ("border_iou", "contact_iou")


def history_row(
    epoch: int, lr: float, train: EpochStats, val: EpochStats | None, seconds: float, train_seconds: float
) -> dict[str, Any]:
    """One history.csv row: loss and metrics of both splits, learning rate, timings."""
    row: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": train.loss}
    row.update({f"train_{k}": float(train.metrics[k]) for k in METRIC_KEYS})
    row["val_loss"] = val.loss if val else None
    row.update({f"val_{k}": (float(val.metrics[k]) if val else None) for k in METRIC_KEYS})
    row["val_object_f1"] = val.object_f1 if val else None
    for k in INSTANCE_METRIC_KEYS:
        if k in train.metrics:
            row[f"train_{k}"] = float(train.metrics[k])
            row[f"val_{k}"] = float(val.metrics[k]) if val else None
    row.update({
        "skipped_steps": train.skipped, "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
        "train_chips_per_s": round(train.chips / train_seconds, 3) if train_seconds > 0 else None,
    })
    return row


def epoch_summary(row: dict[str, Any], epochs: int) -> str:
    """The one-line summary of a history row, as the CLI prints it."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    text = (
        f"epoch {row['epoch']}/{epochs}: train loss {fmt(row['train_loss'])} IoU {fmt(row['train_iou'])}"
        f" | val loss {fmt(row['val_loss'])} IoU {fmt(row['val_iou'])} PA {fmt(row['val_pixel_accuracy'])}"
        f" F1 {fmt(row['val_f1'])}"
    )
    if row.get("val_object_f1") is not None:
        text += f" object F1 {fmt(row['val_object_f1'])}"
    if "train_border_iou" in row:
        split = "val" if row.get("val_border_iou") is not None else "train"
        text += f" border IoU {fmt(row[f'{split}_border_iou'])} contact IoU {fmt(row[f'{split}_contact_iou'])}"
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


@dataclass
class Tracker:
    """Best values so far and the early-stopping counter (stored for --resume)."""

    best_iou: float = -math.inf
    best_loss: float = math.inf
    best_object_f1: float = -math.inf
    best_monitor: float = -math.inf
    bad_epochs: int = 0
    best_row: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """Plain values to store in last.pt (``Tracker(**state)`` restores them)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def update(self, stats: EpochStats, row: dict[str, Any], *, monitor: str) -> list[str]:
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
