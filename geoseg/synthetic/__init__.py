"""Realistic synthetic scenes: georeferenced RGB GeoTIFF, exact roof mask, roof polygons.

The generator lays out a suburb on a (rotated) lattice of lots: roads run along
some lattice columns and rows, each remaining lot may hold one roof (a rotated
rectangle or an L-shape, with gable, hip or flat shading lit by one sun), trees
are scattered between roofs, and everything sits on textured ground with
shadows. With ``terraces`` some pairs of lots hold a row of houses instead: neighbours
share a wall (their polygons share that edge) or stand 1 to 3 pixels apart,
and each house has its own roof colour and a darker rim along its walls.
Roof polygons (one per building, with a ``building_id``) are generated in the
scene CRS first; the roof pixels of the image and the mask are both
``rasterio.features.rasterize`` of those polygons, so the mask *is* the
rasterised polygons, and :func:`instance_ids` rasterises them with their ids.

Pixels are rendered window by window from functions of the global pixel
position (hash noise), so a scene of any size is written with bounded memory
and the same seed gives the same bytes whatever the block size.

Modules: :mod:`~geoseg.synthetic.roofs` (the shape of a roof or a terrace row),
:mod:`~geoseg.synthetic.layout` (where things are, in CRS units),
:mod:`~geoseg.synthetic.render` (pixels of a window), :mod:`~geoseg.synthetic.noise`
(position-hash noise) and :mod:`~geoseg.synthetic.scenes` (files on disk, instance ids).
"""

from geoseg.synthetic.layout import LOT_SIZE_M, ROOF_GAP_M, ROOF_GAP_PX
from geoseg.synthetic.roofs import ROOF_COLOURS, ROOF_KINDS, TERRACE_GAP_PX
from geoseg.synthetic.scenes import (
    BUILDINGS_LAYER,
    DATASET_LAYOUTS,
    RENDER_BLOCK,
    SyntheticDataset,
    SyntheticScene,
    instance_ids,
    make_dataset,
    make_scene,
)

__all__ = [
    "BUILDINGS_LAYER",
    "DATASET_LAYOUTS",
    "LOT_SIZE_M",
    "RENDER_BLOCK",
    "ROOF_COLOURS",
    "ROOF_GAP_M",
    "ROOF_GAP_PX",
    "ROOF_KINDS",
    "SyntheticDataset",
    "SyntheticScene",
    "TERRACE_GAP_PX",
    "instance_ids",
    "make_dataset",
    "make_scene",
]
