"""Evaluation of predicted rooftops: pixel metrics and SpaceNet object metrics, panels.

``evaluate(pred, truth)`` compares a mask GeoTIFF or vector file with the
truth on one grid; ``match_objects`` and ``object_scores_from_masks`` are the
object metrics on their own (training validation uses the latter);
``write_panels`` draws image / truth / prediction for sample windows;
``evaluate_files`` is ``geoseg evaluate``: both, the panels checked before any work.
"""

from geoseg.evaluation.core import EvaluationResult, PixelScores, evaluate
from geoseg.evaluation.inputs import DEFAULT_BLOCK_SIZE, DEFAULT_VECTOR_RESOLUTION, Grid
from geoseg.evaluation.job import evaluate_files
from geoseg.evaluation.objects import (
    DEFAULT_IOU_THRESHOLD,
    ObjectMatch,
    mask_polygons,
    match_objects,
    object_scores,
    object_scores_from_masks,
    safe_ratio,
)
from geoseg.evaluation.panels import write_panels

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_IOU_THRESHOLD",
    "DEFAULT_VECTOR_RESOLUTION",
    "EvaluationResult",
    "Grid",
    "ObjectMatch",
    "PixelScores",
    "evaluate",
    "evaluate_files",
    "mask_polygons",
    "match_objects",
    "object_scores",
    "object_scores_from_masks",
    "safe_ratio",
    "write_panels",
]
