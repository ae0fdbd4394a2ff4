"""Footprint components -> one polygon per building, by a seeded watershed (no torch).

An ``instances`` model predicts, besides the rooftop probability, the
probability that a pixel lies on a building's **border** (its inner ring) and
in a **contact** zone (near two different buildings). Seeds are the confident
building interiors (rooftop, not border, not contact); the footprint is then
flooded from the seeds over an elevation that is high on borders and contacts
(``skimage.segmentation.watershed``), so two houses that share a wall meet
along it and become two polygons sharing an edge.

Streaming: the watershed of a pixel depends only on the footprint component
(4-connected) it belongs to, since flooding never leaves the mask and seeds and
elevation are per-pixel functions of the probabilities. So the strip
polygoniser (``vectorize.StripPolygonizer`` with ``keep_pixels``) carries the
pixels of each open footprint component across strips and blocks; when a
component is complete it is split here, on its own bounding box. The result
equals a whole-scene watershed exactly, for any block and strip layout, and a
building across a block seam stays one polygon. Memory holds the open
components only (:data:`MAX_SPLIT_PIXELS` caps one component; a larger one
keeps its footprint outline, with a warning).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import shapely
from affine import Affine

from geoseg.vectorize.strips import FOUR_CONNECTED as _CROSS  # 4-connectivity, as the footprint components
from geoseg.vectorize.strips import PixelPolygon, _geojson_polygon

log = logging.getLogger(__name__)

#: Per-pixel values the strip polygoniser keeps for open components (see :func:`seeds_and_elevation`).
SPLIT_VALUES = ("seed", "elevation")
#: A footprint component with more pixels than this is not split (memory bound: 14 bytes a pixel).
MAX_SPLIT_PIXELS = 1 << 25
#: Elevation scale: ``round(ELEVATION_SCALE * (BORDER_WEIGHT * border + CONTACT_WEIGHT * contact))``, uint8.
ELEVATION_SCALE = 254
#: Weights of the two probabilities in the elevation. Contact dominates: the flood first fills
#: each building's own border from its seed, and crosses a contact band (symmetric about the
#: wall between two buildings) last, so neighbours meet on their wall.
BORDER_WEIGHT = 0.25
CONTACT_WEIGHT = 0.75


def seeds_and_elevation(
    footprint: np.ndarray,
    border: np.ndarray,
    contact: np.ndarray,
    *,
    threshold: float = 0.5,
    seed_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Watershed seeds and elevation from the three probabilities (any shape, values in [0, 1]).

    Args:
        footprint: Rooftop probability.
        border: Border probability.
        contact: Contact probability.
        threshold: Rooftop probability at or above which a pixel is rooftop.
        seed_threshold: A rooftop pixel is a seed where both border and contact
            probabilities are below this.

    Returns:
        ``seed`` (bool) and ``elevation`` (uint8 ``round(254 * (0.25 * border + 0.75 * contact))``:
        0 in roof interiors, higher on borders, highest where buildings touch).
    """
    seed = (footprint >= threshold) & (border < seed_threshold) & (contact < seed_threshold)
    level = BORDER_WEIGHT * border.astype(np.float32) + CONTACT_WEIGHT * contact.astype(np.float32)
    elevation = np.rint(np.clip(level, 0.0, 1.0) * ELEVATION_SCALE).astype(np.uint8)
    return seed, elevation


class InstanceSplitter:
    """Split finished footprint components (with their pixels) into buildings.

    Each call takes the components the strip polygoniser finished and returns
    their buildings as :class:`~geoseg.vectorize.PixelPolygon` records in
    scene pixel coordinates. A component with at most one seed (after
    dropping seeds under ``min_seed_pixels``) is returned unchanged, so its
    polygon is exactly the footprint model's. The buildings of one split
    component form a coverage: they share edges exactly, their vertices
    are on every pixel corner of their outlines (so that simplification can
    keep the shared edges shared), and they carry the same ``group``.
    """

    def __init__(self, *, threshold: float = 0.5, seed_threshold: float = 0.5, min_seed_pixels: int = 1) -> None:
        """Set up the split.

        Args:
            threshold: Rooftop probability threshold (as for the footprint mask).
            seed_threshold: See :func:`seeds_and_elevation`.
            min_seed_pixels: Seeds (4-connected) with fewer pixels are ignored (noise).
        """
        self.threshold, self.seed_threshold = float(threshold), float(seed_threshold)
        self.min_seed_pixels = max(1, int(min_seed_pixels))
        self._next_group = 1
        self.components_split = 0
        self.too_large = 0
        self.seconds = 0.0  # spent in strip_values and splitting (the ``split`` stage)

    def strip_values(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """The per-pixel values the polygoniser keeps (:data:`SPLIT_VALUES`) from a strip's
        (3, h, w) rooftop, border and contact probabilities."""
        t0 = time.perf_counter()
        seed, elevation = seeds_and_elevation(probs[0], probs[1], probs[2], threshold=self.threshold,
                                              seed_threshold=self.seed_threshold)
        self.seconds += time.perf_counter() - t0
        return {"seed": seed, "elevation": elevation}

    def __call__(self, records: Sequence[PixelPolygon]) -> list[PixelPolygon]:
        """Buildings of the finished components ``records``, in their order."""
        t0 = time.perf_counter()
        out: list[PixelPolygon] = []
        for rec in records:
            if rec.pixels is None:  # over the polygoniser's pixel_limit: its pixels were not kept
                self.too_large += 1
                log.warning("a rooftop area of %d pixels is too large to split into buildings (memory); "
                            "it is kept as one polygon", rec.count)
                out.append(rec)
                continue
            out.extend(self._split(rec))
        self.seconds += time.perf_counter() - t0
        return out

    def _split(self, rec: PixelPolygon) -> list[PixelPolygon]:
        from scipy import ndimage
        from skimage.segmentation import watershed

        pix = rec.pixels or {}
        rows, cols = pix["row"], pix["col"]
        seed = pix["seed"]
        if int(seed.sum()) < 2 * self.min_seed_pixels:  # at most one seed: nothing to split
            rec.pixels = None
            return [rec]
        r0, c0 = int(rows.min()), int(cols.min())
        h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
        rr, cc = rows - r0, cols - c0
        mask = np.zeros((h, w), dtype=bool)
        mask[rr, cc] = True
        seeds = np.zeros((h, w), dtype=bool)
        seeds[rr, cc] = seed
        markers, n = ndimage.label(seeds, structure=_CROSS, output=np.int32)
        if n and self.min_seed_pixels > 1:
            sizes = np.bincount(markers.ravel(), minlength=n + 1)
            big = sizes >= self.min_seed_pixels
            big[0] = False
            ids = np.cumsum(big).astype(np.int32) * big  # renumber the kept seeds 1..k
            markers = ids[markers]
            n = int(big.sum())
        if n < 2:
            rec.pixels = None
            return [rec]
        elevation = np.zeros((h, w), dtype=np.uint8)
        elevation[rr, cc] = pix["elevation"]
        labels = watershed(elevation, markers=markers, mask=mask, connectivity=1).astype(np.int32)
        self.components_split += 1
        return self._polygons(rec, labels, n, rr, cc, r0, c0)

    def _polygons(
        self, rec: PixelPolygon, labels: np.ndarray, n: int, rr: np.ndarray, cc: np.ndarray, r0: int, c0: int,
    ) -> list[PixelPolygon]:
        from rasterio import features

        lab = labels[rr, cc]
        counts = np.bincount(lab, minlength=n + 1)
        prob = rec.pixels.get("prob") if rec.pixels else None
        sums = np.bincount(lab, weights=prob, minlength=n + 1) if prob is not None else np.full(n + 1, np.nan)
        pieces: dict[int, list[shapely.Polygon]] = {}
        for geom, value in features.shapes(labels, mask=labels > 0, connectivity=4,
                                           transform=Affine.translation(c0, r0)):
            pieces.setdefault(int(value), []).append(_geojson_polygon(geom))
        group = self._next_group
        self._next_group += 1
        out = []
        for k in sorted(pieces):
            geom = pieces[k][0] if len(pieces[k]) == 1 else shapely.union_all(pieces[k])
            # A vertex on every pixel corner: neighbours' shared edges have the same vertices
            # (an edge-matched coverage), so coverage simplification keeps them shared.
            geom = shapely.segmentize(geom, 1.0)
            out.append(PixelPolygon(pieces=[geom], cls=rec.cls, prob_sum=float(sums[k]), count=int(counts[k]),
                                    group=group))
        return out
