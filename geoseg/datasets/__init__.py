"""Datasets of georeferenced chips: find image/label pairs, cut chips, split without leaks.

A sample is a dict that keeps its place on the earth: ``image`` (raw pixel
values as float), ``mask`` (class ids, 255 = ignore), ``valid``, ``window``,
``transform``, ``crs`` and ``scene`` (as torchgeo's GeoDataset samples do).

- :mod:`geoseg.datasets.pairs`: layouts and :func:`find_pairs`.
- :mod:`geoseg.datasets.chips`: :class:`ChipDataset` and :func:`collate_samples`.
- :mod:`geoseg.datasets.splits`: :func:`split_pairs` by scene, by block or from a file.
"""

from geoseg.datasets.chips import ChipDataset, collate_samples
from geoseg.datasets.pairs import (
    LAYOUTS,
    RASTER_SUFFIXES,
    SPLITS,
    Layout,
    PairItem,
    ScenePair,
    detect_layout,
    find_pairs,
)
from geoseg.datasets.splits import split_counts, split_pairs

__all__ = [
    "LAYOUTS",
    "RASTER_SUFFIXES",
    "SPLITS",
    "ChipDataset",
    "Layout",
    "PairItem",
    "ScenePair",
    "collate_samples",
    "detect_layout",
    "find_pairs",
    "split_counts",
    "split_pairs",
]
