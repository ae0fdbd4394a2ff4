"""Tests for geoseg.plots: learning curves and prediction panels are written as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from geoseg.plots import display_image, plot_learning_curves, plot_prediction_panel


def test_learning_curves_png(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "train_pixel_accuracy": 0.7, "val_pixel_accuracy": 0.72,
         "train_iou": 0.3, "val_iou": 0.35},
        {"epoch": 2, "train_loss": 0.5, "val_loss": None, "train_pixel_accuracy": 0.8, "val_pixel_accuracy": "",
         "train_iou": 0.5, "val_iou": None},
    ]
    path = plot_learning_curves(history, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 2 * img.height
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_prediction_panel_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (3, 32, 32)).astype(np.float32)
    truth = np.zeros((32, 32), np.uint8)
    truth[5:20, 5:20] = 1
    pred = np.zeros((32, 32), np.uint8)
    pred[8:22, 8:22] = 1
    pred[0] = 255
    path = plot_prediction_panel([(image, truth, pred)] * 2, tmp_path / "panel.png", row_labels=["a", "b"])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.height > img.width / 3


def test_display_image_stretches_each_band():
    img = np.stack([np.linspace(0, 1000, 100).reshape(10, 10)] * 3, axis=-1)
    out = display_image(img)
    assert out.shape == (10, 10, 3) and out.min() == 0.0 and out.max() == 1.0
    grey = display_image(np.full((1, 10, 10), 5.0))
    assert grey.shape == (10, 10, 3) and grey.max() == 0.0
