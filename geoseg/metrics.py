"""Pixel metrics from confusion counts accumulated over a whole epoch (and across DDP ranks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from geoseg.encoding import IGNORE_INDEX
from geoseg.errors import LabelError

#: The class whose IoU, precision, recall and F1 are reported (rooftop in binary masks).
POSITIVE_CLASS = 1


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(np.asarray(value))


def _ratio(num: float, den: float, *, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


class ConfusionMatrix:
    """Confusion counts (rows: truth, columns: prediction) over many batches.

    Counts are summed, never averaged per batch, so the metrics of an epoch are
    those of all its pixels together. Pixels whose truth is ``ignore_index``
    are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        """Start with zero counts.

        Args:
            num_classes: K, the number of classes (2 for background/rooftop).
            ignore_index: Truth value to skip.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes should be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._counts = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    @property
    def counts(self) -> np.ndarray:
        """int64 array (K, K): ``counts[t, p]`` pixels of truth t predicted as p."""
        return self._counts.cpu().numpy().copy()

    def reset(self) -> None:
        """Set all counts to zero."""
        self._counts.zero_()

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """Add a batch.

        Args:
            pred: Class ids (N, H, W) or (H, W), or logits/probabilities with a
                class axis (N, K, H, W) (argmax is taken). Tensor or array.
            target: Class ids of the same shape as the class ids of ``pred``.

        Raises:
            ValueError: Shapes that do not match.
            LabelError: Truth values outside ``0..K-1`` that are not ``ignore_index``.
        """
        p, t = _as_tensor(pred), _as_tensor(target)
        if p.dim() == t.dim() + 1:
            p = p.argmax(dim=1 if p.dim() == 4 else 0)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} does not match truth {tuple(t.shape)}")
        p, t = p.reshape(-1).long(), t.reshape(-1).to(p.device).long()
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        k = self.num_classes
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
            bad = int(t.max()) if int(t.max()) >= k else int(t.min())
            raise LabelError(
                f"mask holds class id {bad} but the model has {k} classes; "
                "set data.classes (and data.class_names) to match the labels"
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
            raise ValueError(f"prediction holds class ids outside 0..{k - 1}")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self._counts += counts.to(self._counts.device)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts to this one (returns self)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._counts += other._counts.to(self._counts.device)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all DDP ranks (no-op outside torch.distributed); returns self.

        Every rank must call this at the same point.
        """
        self._counts = _sum_over_ranks(self._counts)
        return self

    def compute(self) -> dict[str, Any]:
        """Metrics of all counts so far.

        ``iou``, ``precision``, ``recall`` and ``f1`` are for the rooftop class
        (class 1; class 0 when K == 1). A ratio whose denominator is zero is 1.0
        when there was nothing to find and nothing was found, else 0.0. ``miou``
        averages the IoU of the classes that occur in truth or prediction.

        Returns:
            Dict with pixel_accuracy, miou, iou, precision, recall, f1 (floats),
            iou_per_class (list of floats) and pixels (int, counted pixels).
        """
        c = self._counts.double()
        total = float(c.sum())
        tp_all = torch.diag(c)
        union = c.sum(0) + c.sum(1) - tp_all
        ious = [_ratio(float(tp_all[i]), float(union[i]), empty=1.0) for i in range(self.num_classes)]
        present = [ious[i] for i in range(self.num_classes) if union[i] > 0]
        k = POSITIVE_CLASS if self.num_classes > POSITIVE_CLASS else 0
        tp = float(c[k, k])
        fp = float(c[:, k].sum()) - tp
        fn = float(c[k, :].sum()) - tp
        return {
            "pixel_accuracy": _ratio(float(tp_all.sum()), total, empty=1.0),
            "miou": float(np.mean(present)) if present else 1.0,
            "iou": ious[k],
            "precision": _ratio(tp, tp + fp, empty=1.0 if fn == 0 else 0.0),
            "recall": _ratio(tp, tp + fn, empty=1.0 if fp == 0 else 0.0),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0),
            "iou_per_class": ious,
            "pixels": int(total),
        }


class ChannelCounts:
    """True/false positives and false negatives of sigmoid channels (``border``, ``contact``).

    A pixel is predicted positive where its logit is > 0 (probability > 0.5);
    pixels whose truth is ``ignore_index`` are skipped. Counts are summed over
    batches (and DDP ranks), as in :class:`ConfusionMatrix`.
    """

    def __init__(self, names: tuple[str, ...], ignore_index: int = IGNORE_INDEX) -> None:
        """Start with zero counts for channels ``names`` (in order)."""
        self.names = tuple(names)
        self.ignore_index = ignore_index
        self._counts = torch.zeros((len(self.names), 3), dtype=torch.int64)  # tp, fp, fn

    @torch.no_grad()
    def update(self, logits: Any, truth: Any) -> None:
        """Add a batch: ``logits`` and 0/1 ``truth`` (255 ignored), both (N, C, H, W).

        Raises:
            ValueError: Shapes that differ or a channel count other than ``len(names)``.
        """
        p, t = _as_tensor(logits), _as_tensor(truth)
        if p.shape != t.shape or p.dim() != 4 or p.shape[1] != len(self.names):
            raise ValueError(f"logits {tuple(p.shape)} and truth {tuple(t.shape)} should both be "
                             f"(N, {len(self.names)}, H, W)")
        t = t.to(p.device)
        keep = t != self.ignore_index
        pred = (p > 0) & keep
        pos = (t == 1) & keep
        dims = (0, 2, 3)
        tp = (pred & pos).sum(dims)
        fp = (pred & ~pos).sum(dims)
        fn = (~pred & pos).sum(dims)
        self._counts += torch.stack([tp, fp, fn], dim=1).to(self._counts.device, torch.int64)

    def all_reduce(self) -> "ChannelCounts":
        """Sum the counts over all DDP ranks (no-op outside torch.distributed); returns self."""
        self._counts = _sum_over_ranks(self._counts)
        return self

    def compute(self) -> dict[str, float]:
        """``{NAME}_iou`` per channel: tp / (tp + fp + fn), 1.0 when both truth and prediction are empty."""
        out = {}
        for name, (tp, fp, fn) in zip(self.names, self._counts.tolist()):
            out[f"{name}_iou"] = _ratio(tp, tp + fp + fn, empty=1.0)
        return out


def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over all DDP ranks (unchanged outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        buf = counts.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()
    return counts
