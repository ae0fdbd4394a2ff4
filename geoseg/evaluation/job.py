"""``geoseg evaluate`` as one library call: the metrics, and the panels PNG when one is asked for."""

from __future__ import annotations

import os
from typing import Callable

from rasterio.crs import CRS

from geoseg.evaluation.core import EvaluationResult, evaluate
from geoseg.evaluation.inputs import DEFAULT_BLOCK_SIZE, DEFAULT_VECTOR_RESOLUTION
from geoseg.evaluation.objects import DEFAULT_IOU_THRESHOLD, ROOFTOP_CLASS
from geoseg.evaluation.panels import check_panels_output, write_panels
from geoseg.raster_io import open_scene


def evaluate_files(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    aoi: str | os.PathLike[str] | None = None,
    panels: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    class_id: int = ROOFTOP_CLASS,
    resolution: float = DEFAULT_VECTOR_RESOLUTION,
    assume_crs: str | CRS | None = None,
    overwrite: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """:func:`~geoseg.evaluation.evaluate` the prediction, then :func:`~geoseg.evaluation.write_panels` to ``panels``.

    The panels file and the image are checked before any work, so that a refused
    run writes nothing.

    Args:
        pred, truth, aoi, iou_threshold, class_id, resolution, assume_crs, block_size,
            progress: As :func:`~geoseg.evaluation.evaluate`.
        panels: PNG of image / truth / prediction with missed and false buildings coloured (None: none).
        image: Scene for the image column of ``panels`` (used only with ``panels``).
        overwrite: Replace an existing ``panels`` file.

    Returns:
        The metrics, counts and polygons.

    Raises:
        OutputError: ``panels`` is an input, exists without ``overwrite`` or cannot be written.
        InputFileError: As :func:`~geoseg.evaluation.evaluate`; ``image`` missing or not a raster.
        GeoreferenceError: As :func:`~geoseg.evaluation.evaluate`; ``image`` without a CRS or off the area.
        ConfigError: As :func:`~geoseg.evaluation.evaluate`.
    """
    if panels is not None:
        check_panels_output(panels, pred=pred, truth=truth, aoi=aoi, image=image, overwrite=overwrite)
        if image is not None:
            open_scene(image, assume_crs=assume_crs)
    result = evaluate(pred, truth, aoi=aoi, iou_threshold=iou_threshold, class_id=class_id,
                      assume_crs=assume_crs, resolution=resolution, block_size=block_size, progress=progress)
    if panels is not None:
        write_panels(result, panels, image=image, assume_crs=assume_crs, overwrite=overwrite)
    return result
