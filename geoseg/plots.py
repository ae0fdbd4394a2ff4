"""Pictures: learning curves and image/truth/prediction panels (matplotlib, Agg, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from geoseg.encoding import IGNORE_INDEX

#: Learning-curve panels: (title, history key without the train_/val_ prefix).
CURVES = (("loss", "loss"), ("pixel accuracy", "pixel_accuracy"), ("rooftop IoU", "iou"))
#: Colours shared by every geoseg picture.
TRAIN_COLOUR = "#1f77b4"
VAL_COLOUR = "#d62728"
ROOF_COLOUR = (1.0, 0.85, 0.0)
#: Percentiles that map raw imagery to display brightness.
DISPLAY_PERCENTILES = (2.0, 98.0)
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], *, tight: bool = True, overwrite: bool = True) -> Path:
    from geoseg.publish import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight" if tight else None)
    return Path(path)


def _values(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is None or value == "":
            continue
        xs.append(int(row["epoch"]))
        ys.append(float(value))
    return xs, ys


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write loss, pixel accuracy and rooftop IoU per epoch, train and validation.

    Args:
        history: One mapping per epoch with ``epoch`` and ``train_<key>`` /
            ``val_<key>`` entries (as in ``history.csv``); missing values are skipped.
        path: Output PNG (replaced atomically).

    Returns:
        The path written.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * len(CURVES), 3.4)
    axes = fig.subplots(1, len(CURVES))
    for ax, (title, key) in zip(axes, CURVES):
        for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
            xs, ys = _values(history, f"{split}_{key}")
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if key != "loss":
            ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    # fixed margins: tight layout would triple the drawing time, and this runs every epoch
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
    return _save(fig, path, tight=False)


def display_image(image: np.ndarray) -> np.ndarray:
    """Raw (H, W, C) or (C, H, W) imagery to displayable RGB floats in [0, 1].

    The first three bands are shown (one band as grey), stretched between the
    2nd and 98th percentile of each band.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[0] <= 4 and img.shape[2] > 4:  # (C, H, W)
        img = np.moveaxis(img, 0, -1)
    img = img[:, :, :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 2:
        img = np.concatenate([img, img[:, :, :1]], axis=2)
    out = np.empty_like(img)
    for b in range(3):
        band = img[:, :, b]
        lo, hi = np.percentile(band, DISPLAY_PERCENTILES)
        out[:, :, b] = np.clip((band - lo) / (hi - lo), 0, 1) if hi > lo else 0.0
    return out


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    rgb = np.zeros((*m.shape, 3))
    rgb[m > 0] = ROOF_COLOUR
    if m.max(initial=0) > 1:  # several classes: grey levels, ignore (IGNORE_INDEX) stays dark grey
        classes = np.where(m == IGNORE_INDEX, 0, m).astype(float)
        rgb[:] = (classes / max(classes.max(), 1))[..., None]
    rgb[m == IGNORE_INDEX] = 0.3
    return rgb


def plot_prediction_panel(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    titles: Sequence[str] = ("image", "truth", "prediction"),
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write image / truth / prediction side by side, one row per sample.

    Args:
        rows: ``(image, truth, prediction)`` per row: raw image (H, W, C) or
            (C, H, W), class-id masks (H, W); 255 in masks is shown grey.
        path: Output PNG (replaced atomically).
        titles: Column titles.
        row_labels: Optional label per row (e.g. the scene name).

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("a prediction panel needs at least one row")
    fig = _figure(3.0 * len(titles), 3.0 * len(rows))
    axes = np.atleast_2d(fig.subplots(len(rows), len(titles), squeeze=False))
    for r, (image, truth, pred) in enumerate(rows):
        for c, (pic, title) in enumerate(zip((display_image(image), _mask_rgb(truth), _mask_rgb(pred)), titles)):
            ax = axes[r, c]
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


#: Evaluation panels: colours of matched, missed (false negative) and false (false positive) buildings.
MATCHED_COLOUR = (0.17, 0.63, 0.17)
MISSED_COLOUR = (1.0, 0.5, 0.05)
FALSE_COLOUR = (0.9, 0.1, 0.9)
#: Values of the status masks drawn by :func:`plot_evaluation_panels`.
STATUS_COLOURS = {1: MATCHED_COLOUR, 2: MISSED_COLOUR, 3: FALSE_COLOUR}


def plot_evaluation_panels(
    rows: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write image / truth / prediction per window with matched, missed and false buildings coloured.

    Args:
        rows: ``(image, truth_status, pred_status)`` per window: raw image
            (H, W, C) or (C, H, W), or None for no image column (when every row
            has None); status masks (H, W) with 0 background, 1 matched,
            2 missed (truth only), 3 false (prediction only). Truth and
            prediction are drawn over the dimmed grey image, or on white.
        path: Output PNG (replaced atomically).
        row_labels: Optional label per row (e.g. the window's position).
        title: Optional figure title.
        overwrite: Replace an existing ``path`` (else it is refused, also when another
            run writes it first).

    Returns:
        The path written.
    """
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("an evaluation panel needs at least one row")
    with_image = any(r[0] is not None for r in rows)
    titles = (("image",) if with_image else ()) + ("truth", "prediction")
    aspect = np.asarray(rows[0][1]).shape[0] / max(np.asarray(rows[0][1]).shape[1], 1)
    cell = 3.0
    legend_h = 0.5
    fig = _figure(cell * len(titles), cell * aspect * len(rows) + legend_h + (0.3 if title else 0))
    axes = np.atleast_2d(fig.subplots(len(rows), len(titles), squeeze=False))
    for r, (image, truth, pred) in enumerate(rows):
        shape = np.asarray(truth).shape
        if image is not None:
            shown = display_image(image)
            base = 0.35 + 0.4 * shown.mean(axis=2, keepdims=True).repeat(3, axis=2)
        else:
            shown, base = None, np.ones((*shape, 3))
        pictures = [shown] if with_image else []
        for status in (truth, pred):
            pic = base.copy()
            for value, colour in STATUS_COLOURS.items():
                pic[np.asarray(status) == value] = colour
            pictures.append(pic)
        for c, (pic, name) in enumerate(zip(pictures, titles)):
            ax = axes[r, c]
            if pic is not None:
                ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    handles = [Patch(color=MATCHED_COLOUR, label="matched"),
               Patch(color=MISSED_COLOUR, label="missed (truth only)"),
               Patch(color=FALSE_COLOUR, label="false (prediction only)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 1))
    return _save(fig, path, overwrite=overwrite)
