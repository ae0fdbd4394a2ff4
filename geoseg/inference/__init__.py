"""Sliding-window inference over whole scenes: blocks, blending, streamed outputs, throughput hooks."""

from geoseg.inference.blending import WEIGHT_FLOOR, axis_weight_sum, taper_window
from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, stored_to_probability
from geoseg.inference.checks import check_resolution, effective_block_size, scene_bands
from geoseg.inference.pipeline import PredictionResult, predict_scene
from geoseg.inference.runtime import (
    ChipPredictor,
    Throughput,
    cpu_has_native_bf16,
    default_cpu_threads,
    model_throughput,
    resolve_device,
    resolve_precision,
)

__all__ = [
    "MASK_NODATA",
    "PROB_NODATA",
    "PROB_SCALE",
    "WEIGHT_FLOOR",
    "ChipPredictor",
    "PredictionResult",
    "Throughput",
    "axis_weight_sum",
    "check_resolution",
    "cpu_has_native_bf16",
    "default_cpu_threads",
    "effective_block_size",
    "model_throughput",
    "predict_scene",
    "resolve_device",
    "resolve_precision",
    "scene_bands",
    "stored_to_probability",
    "taper_window",
]
