"""Scene layout: roads, roofs, shadows and trees placed in CRS units before any pixel is drawn."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from affine import Affine
from rasterio.crs import CRS
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from geoseg.raster_io import ground_pixel_size
from geoseg.synthetic.roofs import (
    ROOF_COLOURS,
    ROOF_KINDS,
    TERRACE_RIM_M,
    roof_shape,
    terrace_row,
)

log = logging.getLogger(__name__)

#: Side of a lot of the suburb lattice, in ground metres.
LOT_SIZE_M = 18.0
#: Probability that a lot (not on a road) holds a roof when ``n_roofs`` is None.
ROOF_OCCUPANCY = 0.85
#: Smallest gap between two roofs (ground metres); also at least this many pixels.
ROOF_GAP_M = 1.5
ROOF_GAP_PX = 3
#: Tries to fit a roof into a lot before leaving it empty.
ROOF_ATTEMPTS = 8
#: Road width in ground metres; a road every ``ROAD_EVERY`` lattice columns/rows.
ROAD_WIDTH_M = (5.0, 7.5)
ROAD_EVERY = (4, 5)
#: Trees per 1000 m² of ground, and their crown radius in metres.
TREE_DENSITY = 1.6
TREE_RADIUS_M = (1.5, 4.0)
#: Pixels a roof keeps from the scene edge (beyond ``nodata_border``).
EDGE_MARGIN_PX = 2


@dataclass
class Layout:
    """Everything placed in a scene, in CRS units, before any pixel is drawn."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    seed: int
    unit_m: float  # ground metres per CRS unit
    sun: np.ndarray  # unit vector (east, north) towards the sun
    ground_mix: float
    roofs: list[Polygon]
    roof_kind: list[str]
    roof_colour: np.ndarray  # (n, 3) float
    parts: list[Polygon]  # rectangles a roof is made of (1 or 2 per roof), for shading
    part_roof: np.ndarray  # (p,) roof index of each part
    part_frame: np.ndarray  # (p, 6): cx, cy, cos, sin, half_long, half_short (CRS units)
    shadows: list[Polygon]
    trees: np.ndarray  # (t, 3): cx, cy, radius (CRS units)
    roads: list[Polygon]
    nodata_border: int
    roof_rim: np.ndarray  # (n,) width of the darker rim along the walls (CRS units), 0: none
    roof_terrace: np.ndarray  # (n,) terrace row of each roof (1, 2, ...), 0: free-standing
    first_id: int = 1  # building id of roofs[0]; roof i has id first_id + i
    crowns: list[Polygon] = field(default_factory=list)  # tree crowns, derived
    shade: list[Polygon] = field(default_factory=list)  # roof and tree shadows, derived
    index: dict[str, shapely.STRtree] = field(default_factory=dict)  # per kind, derived

    def __post_init__(self) -> None:
        sun = self.sun
        self.crowns = [Point(cx, cy).buffer(r, quad_segs=6) for cx, cy, r in self.trees]
        self.shade = list(self.shadows) + [
            Point(cx - sun[0] * r * 0.9, cy - sun[1] * r * 0.9).buffer(r) for cx, cy, r in self.trees
        ]
        for key, polys in (("roofs", self.roofs), ("parts", self.parts), ("crowns", self.crowns),
                           ("shade", self.shade), ("roads", self.roads)):
            if polys:
                self.index[key] = shapely.STRtree(polys)

    @property
    def building_ids(self) -> np.ndarray:
        """The building id of each roof (int64), ``first_id``, ``first_id + 1``, ..."""
        return np.arange(self.first_id, self.first_id + len(self.roofs), dtype=np.int64)


def _lattice_rect(u0: float, v0: float, u1: float, v1: float, rot: Affine) -> Polygon:
    return affinity.affine_transform(
        box(u0, v0, u1, v1), [rot.a, rot.b, rot.d, rot.e, rot.c, rot.f]
    )


def plan(
    *,
    width: int,
    height: int,
    seed: int,
    crs: CRS,
    transform: Affine,
    n_roofs: int | None,
    nodata_border: int,
    terraces: float = 0.0,
    first_id: int = 1,
) -> Layout:
    """Place roads, roofs, terraces, shadows and trees (CRS units); draws no pixel.

    ``terraces`` is the chance that a pair of neighbouring lots holds a terrace
    row instead of two free-standing roofs (0: none, the layout of old); roofs
    get the building ids ``first_id``, ``first_id + 1``, ... in placing order.
    """
    rng = np.random.default_rng(seed)
    gx, gy = ground_pixel_size(crs, transform, width, height)
    res = (abs(transform.a) + abs(transform.e)) / 2.0
    unit_m = (gx + gy) / 2.0 / res  # ground metres per CRS unit
    unit = 1.0 / unit_m  # CRS units per ground metre
    gap = max(ROOF_GAP_M * unit, ROOF_GAP_PX * res)

    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    xmin, xmax = min(left, right), max(left, right)
    ymin, ymax = min(top, bottom), max(top, bottom)
    inset = (nodata_border + EDGE_MARGIN_PX) * res
    interior = box(xmin + inset, ymin + inset, xmax - inset, ymax - inset)
    scene_box = box(xmin, ymin, xmax, ymax)

    azimuth = rng.uniform(0, 2 * math.pi)
    sun = np.array([math.sin(azimuth), math.cos(azimuth)])
    ground_mix = float(rng.uniform(0.0, 1.0))

    # A lattice of lots, rotated by theta about the scene centre.
    theta = float(rng.uniform(0, 90))
    lot = LOT_SIZE_M * unit
    cx0, cy0 = (xmin + xmax) / 2, (ymin + ymax) / 2
    rot = Affine.translation(cx0, cy0) @ Affine.rotation(theta)
    radius = math.hypot(xmax - xmin, ymax - ymin) / 2
    n_half = int(math.ceil(radius / lot)) + 1
    every_u, every_v = int(rng.integers(*ROAD_EVERY, endpoint=True)), int(
        rng.integers(*ROAD_EVERY, endpoint=True)
    )
    road_u, road_v = int(rng.integers(0, every_u)), int(rng.integers(0, every_v))
    roads: list[Polygon] = []
    extent = (n_half + 1) * lot
    for i in range(-n_half, n_half):
        if i % every_u == road_u:
            w = rng.uniform(*ROAD_WIDTH_M) * unit
            c = (i + 0.5) * lot
            road = _lattice_rect(c - w / 2, -extent, c + w / 2, extent, rot).intersection(scene_box)
            if not road.is_empty:
                roads.append(road)
    for j in range(-n_half, n_half):
        if j % every_v == road_v:
            w = rng.uniform(*ROAD_WIDTH_M) * unit
            c = (j + 0.5) * lot
            road = _lattice_rect(-extent, c - w / 2, extent, c + w / 2, rot).intersection(scene_box)
            if not road.is_empty:
                roads.append(road)

    lots = [
        (i, j)
        for i in range(-n_half, n_half)
        for j in range(-n_half, n_half)
        if i % every_u != road_u and j % every_v != road_v
    ]
    order = rng.permutation(len(lots))
    wanted = n_roofs
    # Terraces: pairs of neighbouring lots along u (inside one block between roads)
    # given to a row of houses. Decided only when asked, so that the default
    # draws the same random numbers as before terraces existed.
    strip_of: dict[tuple[int, int], tuple[int, int]] = {}
    if terraces > 0:
        for i, j in lots:
            pos = (i - road_u) % every_u  # 1 .. every_u - 1 between two roads
            if pos % 2 == 1 and pos + 1 < every_u and rng.random() < terraces:
                strip_of[(i, j)] = strip_of[(i + 1, j)] = (i, j)
    strips_done: set[tuple[int, int]] = set()

    roofs: list[Polygon] = []
    kinds: list[str] = []
    colours: list[np.ndarray] = []
    parts: list[Polygon] = []
    part_roof: list[int] = []
    frames: list[tuple[float, ...]] = []
    shadows: list[Polygon] = []
    rims: list[float] = []
    rows: list[int] = []

    def cast_shadow(roof: Polygon, h: float, convex: bool) -> None:
        dx, dy = -sun * h
        steps = [affinity.translate(roof, dx * t, dy * t) for t in (0.34, 0.67, 1.0)]
        swept = shapely.union_all([roof, *steps])
        # The sweep of a convex roof is exactly the hull of its copies.
        shadows.append(swept.convex_hull if convex else swept)

    for k in order:
        if wanted is not None and len(roofs) >= wanted:
            break
        i, j = lots[k]
        strip = strip_of.get((i, j))
        if strip is not None:
            if strip in strips_done:
                continue
            strips_done.add(strip)
            si, sj = strip
            bounds = (si * lot + gap / 2, sj * lot + gap / 2,
                      (si + 2) * lot - gap / 2, (sj + 1) * lot - gap / 2)
            if not _lattice_rect(*bounds, rot).intersects(interior):
                continue
            row = max(rows, default=0) + 1
            for house in terrace_row(rng, bounds, rot, unit=unit, res=res):
                if wanted is not None and len(roofs) >= wanted:
                    break
                if not interior.contains(house.polygon):  # a house beyond the scene edge: an empty plot
                    continue
                part_roof.append(len(roofs))
                roofs.append(house.polygon)
                kinds.append(house.kind)
                colours.append(house.colour)
                frames.append(house.frame)
                parts.append(house.polygon)
                rims.append(TERRACE_RIM_M * unit)
                rows.append(row)
                cast_shadow(house.polygon, house.height, convex=True)
            continue
        occupied = rng.random() < ROOF_OCCUPANCY
        if wanted is None and not occupied:
            continue
        lot_poly = _lattice_rect(i * lot + gap / 2, j * lot + gap / 2,
                                 (i + 1) * lot - gap / 2, (j + 1) * lot - gap / 2, rot)
        if not lot_poly.intersects(interior):
            continue
        for _attempt in range(ROOF_ATTEMPTS):
            shape, shape_parts, shape_name = roof_shape(rng, unit)
            aligned = rng.random() < 0.6
            angle = theta + (rng.normal(0, 4) if aligned else rng.uniform(0, 180))
            angle += 90 * int(rng.integers(0, 4))
            u = (i + rng.uniform(0.3, 0.7)) * lot
            v = (j + rng.uniform(0.3, 0.7)) * lot
            px, py = rot @ (u, v)
            place = Affine.translation(px, py) @ Affine.rotation(angle)
            coeffs = [place.a, place.b, place.d, place.e, place.c, place.f]
            roof = affinity.affine_transform(shape, coeffs)
            if not (lot_poly.contains(roof) and interior.contains(roof)):
                continue
            roof = shapely.set_precision(roof, 0)  # plain floats, no tiny slivers
            kind = ROOF_KINDS[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
            base = np.array(ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))], dtype=float)
            base = base * rng.uniform(0.88, 1.1) + rng.normal(0, 6, 3)
            roof_idx = len(roofs)
            roofs.append(roof)
            kinds.append(kind)
            colours.append(base)
            rims.append(0.0)
            rows.append(0)
            ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            for (qx, qy, hl, hs) in shape_parts:
                wx, wy = place @ (qx, qy)
                if hl >= hs:
                    frames.append((wx, wy, ca, sa, hl, hs))
                else:  # a wing whose long axis is the local y axis
                    frames.append((wx, wy, -sa, ca, hs, hl))
                parts.append(affinity.affine_transform(box(qx - hl, qy - hs, qx + hl, qy + hs), coeffs))
                part_roof.append(roof_idx)
            cast_shadow(roof, rng.uniform(3.0, 7.0) * unit * 0.45, convex=shape_name == "rect")
            break
    if wanted is not None and len(roofs) < wanted:
        log.warning("placed %d of %d requested roofs: the scene has no room for more",
                    len(roofs), wanted)

    # Trees: scattered, never touching a roof (so every roof pixel is visible).
    area_m2 = interior.area * unit_m * unit_m
    n_trees = int(rng.poisson(TREE_DENSITY * area_m2 / 1000.0))
    trees: list[tuple[float, float, float]] = []
    tree_tree = shapely.STRtree(roofs) if roofs else None
    road_union = shapely.union_all(roads) if roads else None
    ixmin, iymin, ixmax, iymax = interior.bounds
    for _ in range(n_trees):
        r = rng.uniform(*TREE_RADIUS_M) * unit
        x = rng.uniform(ixmin, ixmax)
        y = rng.uniform(iymin, iymax)
        crown = Point(x, y).buffer(r + 0.6 * unit)
        if tree_tree is not None and len(tree_tree.query(crown, predicate="intersects")):
            continue
        if road_union is not None and road_union.intersects(Point(x, y).buffer(r * 0.3)):
            continue
        trees.append((x, y, r))

    return Layout(
        crs=crs, transform=transform, width=width, height=height, seed=seed, unit_m=unit_m,
        sun=sun, ground_mix=ground_mix, roofs=roofs, roof_kind=kinds,
        roof_colour=np.array(colours, dtype=float).reshape(-1, 3), parts=parts,
        part_roof=np.array(part_roof, dtype=np.int64),
        part_frame=np.array(frames, dtype=float).reshape(-1, 6), shadows=shadows,
        trees=np.array(trees, dtype=float).reshape(-1, 3), roads=roads,
        nodata_border=nodata_border, roof_rim=np.array(rims, dtype=float),
        roof_terrace=np.array(rows, dtype=np.int64), first_id=first_id,
    )
