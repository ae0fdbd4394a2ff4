"""Sliding-window inference over whole scenes: blocks, blending, streamed outputs; ``predict`` is ``geoseg predict``."""

from __future__ import annotations

from geoseg.inference.blending import WEIGHT_FLOOR, axis_weight_sum, taper_window
from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, stored_to_probability
from geoseg.inference.checks import effective_block_size, model_resolution, scene_bands
from geoseg.inference.pipeline import PredictionResult, predict_scene
from geoseg.inference.job import PredictSummary, predict
from geoseg.inference.runtime import ChipPredictor, Throughput, model_throughput


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
    "model_resolution",
    "effective_block_size",
    "model_throughput",
    "predict",
    "predict_scene",
    "scene_bands",
    "stored_to_probability",
    "taper_window",
]
