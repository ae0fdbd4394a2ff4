"""Realistic synthetic scenes: georeferenced RGB GeoTIFF, exact roof mask, roof polygons.

The generator lays out a suburb on a (rotated) lattice of lots: roads run along
some lattice columns and rows, each remaining lot may hold one roof (a rotated
rectangle or an L-shape, with gable, hip or flat shading lit by one sun), trees
are scattered between roofs, and everything sits on textured ground with
shadows. Roof polygons are generated in the scene CRS first; the roof pixels
of the image and the mask are both ``rasterio.features.rasterize`` of those
polygons, so the mask *is* the rasterised polygons.

Pixels are rendered window by window from functions of the global pixel
position (hash noise), so a scene of any size is written with bounded memory
and the same seed gives the same bytes whatever the block size.

Modules: :mod:`~geoseg.synthetic.layout` (where things are, in CRS units),
:mod:`~geoseg.synthetic.render` (pixels of a window), :mod:`~geoseg.synthetic.noise`
(position-hash noise) and :mod:`~geoseg.synthetic.scenes` (files on disk).
"""

from geoseg.synthetic.layout import (
    LOT_SIZE_M,
    ROOF_COLOURS,
    ROOF_GAP_M,
    ROOF_GAP_PX,
    ROOF_KINDS,
)
from geoseg.synthetic.scenes import (
    RENDER_BLOCK,
    SyntheticDataset,
    SyntheticScene,
    make_dataset,
    make_scene,
)

__all__ = [
    "LOT_SIZE_M",
    "RENDER_BLOCK",
    "ROOF_COLOURS",
    "ROOF_GAP_M",
    "ROOF_GAP_PX",
    "ROOF_KINDS",
    "SyntheticDataset",
    "SyntheticScene",
    "make_dataset",
    "make_scene",
]
