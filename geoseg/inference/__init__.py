"""Sliding-window inference over whole scenes: blocks, blending, streamed outputs; ``predict`` is ``geoseg predict``."""

from __future__ import annotations

import torch

from geoseg import devices
from geoseg.devices import default_cpu_threads
from geoseg.inference.blending import WEIGHT_FLOOR, axis_weight_sum, taper_window
from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, stored_to_probability
from geoseg.inference.checks import check_resolution, effective_block_size, scene_bands
from geoseg.inference.pipeline import PredictionResult, predict_scene
from geoseg.inference.job import PredictSummary, predict
from geoseg.inference.runtime import ChipPredictor, Throughput, model_throughput


# Deprecated shims over geoseg.devices, kept while geoseg.benchmark and examples/gpu_check.py import
# them from here (with prediction's option names in the messages); new code imports geoseg.devices.


def resolve_device(device: str = "auto") -> torch.device:
    """:func:`geoseg.devices.resolve_device` for prediction.

    Raises:
        ConfigError: Unknown name, or CUDA asked for where there is none.
    """
    return devices.resolve_device(device, setting="device")


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
    "default_cpu_threads",
    "effective_block_size",
    "model_throughput",
    "predict",
    "predict_scene",
    "resolve_device",
    "resolve_precision",
    "scene_bands",
    "stored_to_probability",
    "taper_window",
]
