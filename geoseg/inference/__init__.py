"""Sliding-window inference over whole scenes: blocks, blending, streamed outputs; ``predict`` is ``geoseg predict``."""

from __future__ import annotations

import torch

from geoseg import devices
from geoseg.inference.blending import WEIGHT_FLOOR, axis_weight_sum, taper_window
from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, stored_to_probability
from geoseg.inference.checks import check_resolution, effective_block_size, scene_bands
from geoseg.inference.pipeline import PredictionResult, predict_scene
from geoseg.inference.job import PredictSummary, predict
from geoseg.inference.runtime import ChipPredictor, Throughput, model_throughput


# Kept only because tests/test_inference.py imports it from here and asserts its plain-dtype
# answer; code calls geoseg.devices.resolve_precision(..., setting="precision").dtype itself.


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of :func:`geoseg.devices.resolve_precision` for prediction (None: fp32).

    Raises:
        ConfigError: Unknown precision, or fp16 asked for on a CPU.
    """
    return devices.resolve_precision(precision, device, setting="precision").dtype


__all__ = [
    "MASK_NODATA",
    "PROB_NODATA",
    "PROB_SCALE",
    "WEIGHT_FLOOR",
    "ChipPredictor",
    "PredictSummary",
    "PredictionResult",
    "Throughput",
    "axis_weight_sum",
    "check_resolution",
    "effective_block_size",
    "model_throughput",
    "predict",
    "predict_scene",
    "resolve_precision",
    "scene_bands",
    "stored_to_probability",
    "taper_window",
]
