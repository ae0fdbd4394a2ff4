"""Class mask -> valid, merged, simplified (and optionally regularised) polygons with ground attributes (no torch).

Three steps, one module each:

- :mod:`~geoseg.vectorize.strips`: the mask in full-width strips -> 4-connected
  components merged across strips and blocks, in exact pixel coordinates
  (:class:`StripPolygonizer`, the one polygoniser of a mask in pieces).
- :mod:`~geoseg.vectorize.metric`: ground metres in any CRS (:class:`MetricFrame`),
  cleaning and regularising there.
- :mod:`~geoseg.vectorize.build`: finished components -> polygons in the scene CRS
  with their attributes (:class:`PolygonBuilder`, :func:`mask_to_polygons`).
"""

from geoseg.vectorize.build import PolygonBuilder, mask_to_polygons, polygons_to_frame
from geoseg.vectorize.metric import (
    REGULARIZE_PARALLEL_THRESHOLD,
    REGULARIZE_SIMPLIFY,
    MetricFrame,
    ground_area_perimeter,
    metric_frame,
)
from geoseg.vectorize.strips import (
    FOUR_CONNECTED,
    PREFILTER_MARGIN,
    STRIP_PIXELS,
    PixelPolygon,
    StripPolygonizer,
    apply_affine,
    label_components,
    min_pixels_for,
    strip_height,
)

__all__ = [
    "FOUR_CONNECTED",
    "PREFILTER_MARGIN",
    "REGULARIZE_PARALLEL_THRESHOLD",
    "REGULARIZE_SIMPLIFY",
    "STRIP_PIXELS",
    "MetricFrame",
    "PixelPolygon",
    "PolygonBuilder",
    "StripPolygonizer",
    "apply_affine",
    "ground_area_perimeter",
    "label_components",
    "mask_to_polygons",
    "metric_frame",
    "min_pixels_for",
    "polygons_to_frame",
    "strip_height",
]
