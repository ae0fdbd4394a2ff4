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
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from geoseg.errors import ConfigError
from geoseg.raster_io import GTIFF_PROFILE, atomic_output, check_output, ground_pixel_size

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
#: Roof side lengths in ground metres (long side, short side).
ROOF_LONG_M = (7.0, 15.0)
ROOF_SHORT_M = (5.0, 10.5)
#: Road width in ground metres; a road every ``ROAD_EVERY`` lattice columns/rows.
ROAD_WIDTH_M = (5.0, 7.5)
ROAD_EVERY = (4, 5)
#: Trees per 1000 m² of ground, and their crown radius in metres.
TREE_DENSITY = 1.6
TREE_RADIUS_M = (1.5, 4.0)
#: Pixels rendered beyond each window so that the blur is seamless between windows.
_HALO = 3
#: Window size (pixels) used when rendering large scenes block by block.
RENDER_BLOCK = 1024
#: Pixels a roof keeps from the scene edge (beyond ``nodata_border``).
EDGE_MARGIN_PX = 2

#: Roof base colours (RGB): terracotta, brown, slate, concrete, metal, blue metal, beige.
ROOF_COLOURS: tuple[tuple[int, int, int], ...] = (
    (172, 82, 58),
    (138, 70, 52),
    (74, 76, 86),
    (156, 154, 148),
    (188, 192, 198),
    (92, 112, 142),
    (192, 170, 132),
)
ROOF_KINDS = ("gable", "hip", "flat")
_GRASS = np.array([88.0, 118.0, 62.0])
_SOIL = np.array([138.0, 118.0, 86.0])
_DRY = np.array([150.0, 146.0, 100.0])
_ASPHALT = np.array([92.0, 94.0, 98.0])
_TREE = np.array([38.0, 72.0, 36.0])


@dataclass(frozen=True)
class SyntheticScene:
    """A generated scene on disk and its ground truth.

    Attributes:
        name: Scene name (file stem of the image).
        image: 3-band uint8 RGB GeoTIFF.
        mask: uint8 GeoTIFF on the image grid, 255 on roofs and 0 elsewhere.
        roofs: GeoPackage with layer ``"roofs"`` of the roof polygons (None when
            not written, e.g. in a raster-labelled dataset).
        polygons: The roof polygons in CRS units.
        crs: The scene CRS.
        transform: The scene's pixel-to-CRS transform.
        width: Width in pixels.
        height: Height in pixels.
    """

    name: str
    image: Path
    mask: Path | None
    roofs: Path | None
    polygons: list[Polygon] = field(repr=False)
    crs: CRS
    transform: Affine
    width: int
    height: int


@dataclass(frozen=True)
class SyntheticDataset:
    """A generated dataset on disk (see :func:`make_dataset`).

    Attributes:
        root: The dataset folder (what ``geoseg train --data`` takes).
        layout: ``"seed"``, ``"flat"`` or ``"vector"``.
        scenes: The scenes, with ``image`` and ``mask`` at their places in the layout.
        vector: The roof GeoPackage of the vector layout, else None.
    """

    root: Path
    layout: str
    scenes: list[SyntheticScene] = field(repr=False)
    vector: Path | None = None


@dataclass
class _Layout:
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


# --------------------------------------------------------------------------- noise


_MASK64 = (1 << 64) - 1


def _hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) values, a pure function of integer arrays ``a``, ``b`` and ``salt``.

    splitmix64 finaliser over a mix of the inputs: the same pixel always gets
    the same value, whatever window it is rendered in.
    """
    ua = np.asarray(a, dtype=np.int64).view(np.uint64)
    ub = np.asarray(b, dtype=np.int64).view(np.uint64)
    s = np.uint64((salt * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    x = ua * np.uint64(0xBF58476D1CE4E5B9) ^ (ub * np.uint64(0x94D049BB133111EB) + s)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _value_noise(rows: np.ndarray, cols: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features ``scale`` pixels across (global pixel coords)."""
    gy, gx = rows / scale, cols / scale
    iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    fy, fx = gy - iy, gx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    v00 = _hash01(iy, ix, salt)
    v01 = _hash01(iy, ix + 1, salt)
    v10 = _hash01(iy + 1, ix, salt)
    v11 = _hash01(iy + 1, ix + 1, salt)
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    return top + (bottom - top) * fy


def _fbm(rows: np.ndarray, cols: np.ndarray, scales: Sequence[float], salt: int) -> np.ndarray:
    """Fractal noise in about [0, 1): octaves at ``scales`` pixels, weights halving."""
    total = np.zeros(np.broadcast_shapes(rows.shape, cols.shape))
    weight, norm = 1.0, 0.0
    for k, scale in enumerate(scales):
        total += weight * _value_noise(rows, cols, max(scale, 1.0), salt * 31 + k)
        norm += weight
        weight *= 0.5
    return total / norm


# --------------------------------------------------------------------------- layout


def _lattice_rect(u0: float, v0: float, u1: float, v1: float, rot: Affine) -> Polygon:
    return affinity.affine_transform(
        box(u0, v0, u1, v1), [rot.a, rot.b, rot.d, rot.e, rot.c, rot.f]
    )


def _roof_shape(
    rng: np.random.Generator, unit: float
) -> tuple[Polygon, list[tuple[float, float, float, float]], str]:
    """A roof footprint in a local frame centred near the origin (CRS units).

    Returns:
        The footprint, its parts as (cx, cy, half_long_x, half_short_y) axis-aligned
        rectangles in the local frame (a wing's long axis may be along y: then
        half_long < half_short and the shading swaps axes), and the shape name.
    """
    long_ = rng.uniform(*ROOF_LONG_M) * unit
    short = min(rng.uniform(*ROOF_SHORT_M) * unit, long_ * 0.85)
    if rng.random() < 0.35:
        wing_w = rng.uniform(0.35, 0.55) * long_
        wing_l = rng.uniform(3.0, 7.0) * unit
        main = box(0, 0, long_, short)
        wing = box(0, short, wing_w, short + wing_l)
        shape = shapely.union(main, wing)
        shape = shapely.normalize(shapely.simplify(shape, 0))
        # The wing part spans the whole wing incl. its overlap with the main block so
        # that its ridge runs along the wing.
        parts = [
            (long_ / 2, short / 2, long_ / 2, short / 2),
            (wing_w / 2, (short + wing_l) / 2 + short / 4, wing_w / 2, (wing_l + short / 2) / 2),
        ]
        cx, cy = shape.centroid.x, shape.centroid.y
        shape = affinity.translate(shape, -cx, -cy)
        parts = [(px - cx, py - cy, hl, hs) for px, py, hl, hs in parts]
        return shape, parts, "L"
    shape = box(-long_ / 2, -short / 2, long_ / 2, short / 2)
    return shape, [(0.0, 0.0, long_ / 2, short / 2)], "rect"


def _plan(
    *,
    width: int,
    height: int,
    seed: int,
    crs: CRS,
    transform: Affine,
    n_roofs: int | None,
    nodata_border: int,
) -> _Layout:
    """Place roads, roofs, shadows and trees (CRS units); draws no pixel."""
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

    roofs: list[Polygon] = []
    kinds: list[str] = []
    colours: list[np.ndarray] = []
    parts: list[Polygon] = []
    part_roof: list[int] = []
    frames: list[tuple[float, ...]] = []
    shadows: list[Polygon] = []
    for k in order:
        if wanted is not None and len(roofs) >= wanted:
            break
        i, j = lots[k]
        occupied = rng.random() < ROOF_OCCUPANCY
        if wanted is None and not occupied:
            continue
        lot_poly = _lattice_rect(i * lot + gap / 2, j * lot + gap / 2,
                                 (i + 1) * lot - gap / 2, (j + 1) * lot - gap / 2, rot)
        if not lot_poly.intersects(interior):
            continue
        for _attempt in range(ROOF_ATTEMPTS):
            shape, shape_parts, shape_name = _roof_shape(rng, unit)
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
            ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            for (qx, qy, hl, hs) in shape_parts:
                wx, wy = place @ (qx, qy)
                if hl >= hs:
                    frames.append((wx, wy, ca, sa, hl, hs))
                else:  # a wing whose long axis is the local y axis
                    frames.append((wx, wy, -sa, ca, hs, hl))
                parts.append(affinity.affine_transform(box(qx - hl, qy - hs, qx + hl, qy + hs), coeffs))
                part_roof.append(roof_idx)
            h = rng.uniform(3.0, 7.0) * unit * 0.45
            dx, dy = -sun * h
            steps = [affinity.translate(roof, dx * t, dy * t) for t in (0.34, 0.67, 1.0)]
            swept = shapely.union_all([roof, *steps])
            # The sweep of a convex roof is exactly the hull of its copies.
            shadows.append(swept.convex_hull if shape_name == "rect" else swept)
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

    return _Layout(
        crs=crs, transform=transform, width=width, height=height, seed=seed, unit_m=unit_m,
        sun=sun, ground_mix=ground_mix, roofs=roofs, roof_kind=kinds,
        roof_colour=np.array(colours, dtype=float).reshape(-1, 3), parts=parts,
        part_roof=np.array(part_roof, dtype=np.int64),
        part_frame=np.array(frames, dtype=float).reshape(-1, 6), shadows=shadows,
        trees=np.array(trees, dtype=float).reshape(-1, 3), roads=roads,
        nodata_border=nodata_border,
    )


# --------------------------------------------------------------------------- render


def _burn(
    shapes: Sequence[Polygon], shape: tuple[int, int], transform: Affine,
    tree: shapely.STRtree, bounds: Polygon,
) -> np.ndarray:
    """Rasterise the polygons that meet ``bounds`` (value i+1 for polygon i) onto a grid; int32."""
    idx = sorted(tree.query(bounds))
    if not idx:
        return np.zeros(shape, dtype=np.int32)
    return rasterio.features.rasterize(
        [(shapes[i], i + 1) for i in idx], out_shape=shape, transform=transform, fill=0,
        dtype="int32",
    )


def _render(layout: _Layout, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Render one window: (3, h, w) uint8 RGB and (h, w) uint8 0/255 mask."""
    col0, row0 = int(window.col_off), int(window.row_off)
    w, h = int(window.width), int(window.height)
    # Render with a halo so that the blur sees the same neighbours in any window.
    hc0, hr0, hw, hh = col0 - _HALO, row0 - _HALO, w + 2 * _HALO, h + 2 * _HALO
    shape = (hh, hw)
    t_win = layout.transform @ Affine.translation(hc0, hr0)
    rows = np.arange(hr0, hr0 + hh, dtype=np.float64)[:, None]
    cols = np.arange(hc0, hc0 + hw, dtype=np.float64)[None, :]
    res = (abs(layout.transform.a) + abs(layout.transform.e)) / 2
    px_m = res * layout.unit_m  # ground metres per pixel
    seed = layout.seed
    (x0, y0), (x1, y1) = t_win @ (0, 0), t_win @ (hw, hh)
    win_poly = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    # Ground: grass/soil/dry mix from low-frequency noise, plus fine texture.
    low = _fbm(rows, cols, [40 / px_m, 18 / px_m, 8 / px_m], seed * 7 + 1)
    mid = _fbm(rows, cols, [3 / px_m, 1.2 / px_m], seed * 7 + 2)
    fine = _hash01(rows.astype(np.int64), cols.astype(np.int64), seed * 7 + 3)
    t = np.clip((low - 0.5) * 2.5 + 0.5, 0, 1)[..., None]
    other = _SOIL * (1 - layout.ground_mix) + _DRY * layout.ground_mix
    img = _GRASS * (1 - t) + other * t
    img = img * (0.82 + 0.3 * mid[..., None]) + (fine[..., None] - 0.5) * 18

    # Roads.
    if layout.roads:
        road = _burn(layout.roads, shape, t_win, layout.index["roads"], win_poly) > 0
        if road.any():
            tex = (0.9 + 0.2 * mid[road])[:, None]
            img[road] = _ASPHALT * tex + (fine[road, None] - 0.5) * 10

    x = layout.transform.c + (cols + 0.5) * layout.transform.a + (rows + 0.5) * layout.transform.b
    y = layout.transform.f + (cols + 0.5) * layout.transform.d + (rows + 0.5) * layout.transform.e
    x = np.broadcast_to(x, shape)
    y = np.broadcast_to(y, shape)
    sun = layout.sun
    unit = 1.0 / layout.unit_m

    # Shadows of trees and roofs darken the ground.
    if layout.shade:
        shadow = _burn(layout.shade, shape, t_win, layout.index["shade"], win_poly) > 0
        img[shadow] *= 0.58

    # Trees: dark green domes lit from the sun side.
    if len(layout.trees):
        tid = _burn(layout.crowns, shape, t_win, layout.index["crowns"], win_poly)
        sel = tid > 0
        if sel.any():
            k = tid[sel] - 1
            tcx, tcy, tr = layout.trees[k, 0], layout.trees[k, 1], layout.trees[k, 2]
            rx, ry = (x[sel] - tcx) / tr, (y[sel] - tcy) / tr
            light = 1.0 + 0.35 * (rx * sun[0] + ry * sun[1]) - 0.25 * (rx * rx + ry * ry)
            leaf = _value_noise(rows, cols, 0.7 / px_m, seed * 7 + 4)[sel]
            img[sel] = _TREE * (light * (0.75 + 0.5 * leaf))[:, None]

    # Roofs: rasterised polygons; facets shaded by their slope direction vs the sun.
    mask = np.zeros(shape, dtype=np.uint8)
    if layout.roofs:
        rid = _burn(layout.roofs, shape, t_win, layout.index["roofs"], win_poly)
        sel = rid > 0
        if sel.any():
            mask[sel] = 255
            pid = _burn(layout.parts, shape, t_win, layout.index["parts"], win_poly)[sel] - 1
            roof = rid[sel] - 1
            # A roof pixel outside its own parts (only on part boundaries) uses the roof's
            # first part.
            first_part = np.searchsorted(layout.part_roof, np.arange(len(layout.roofs)))
            wrong = (pid < 0) | (layout.part_roof[np.maximum(pid, 0)] != roof)
            pid = np.where(wrong, first_part[roof], pid)
            f = layout.part_frame[pid]
            dx, dy = x[sel] - f[:, 0], y[sel] - f[:, 1]
            u = dx * f[:, 2] + dy * f[:, 3]  # along the ridge
            v = -dx * f[:, 3] + dy * f[:, 2]  # across the ridge
            kind = np.array([ROOF_KINDS.index(k) for k in layout.roof_kind])[roof]
            to_side = f[:, 5] - np.abs(v)
            to_end = f[:, 4] - np.abs(u)
            # Outward horizontal normal of the facet the pixel lies on (local frame).
            end = (kind == 1) & (to_end < to_side)
            nu = np.where(end, np.sign(u), 0.0)
            nv = np.where(end, 0.0, np.sign(v))
            nx = nu * f[:, 2] - nv * f[:, 3]
            ny = nu * f[:, 3] + nv * f[:, 2]
            light = 1.0 + 0.3 * (nx * sun[0] + ny * sun[1])
            flat = kind == 2
            light = np.where(flat, 1.0, light)
            rim = flat & (np.minimum(to_side, to_end) < 0.5 * unit)
            light = np.where(rim, 0.8, light)
            ridge = (kind == 0) & (np.abs(v) < 0.2 * unit)
            light = np.where(ridge, 1.08, light)
            grain = 0.94 + 0.12 * mid[sel]
            img[sel] = layout.roof_colour[roof] * (light * grain)[:, None] + (
                fine[sel, None] - 0.5
            ) * 8

    import cv2  # opencv: the blur (a tiny optical PSF) is the only thing it does here

    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=0.6, borderType=cv2.BORDER_REFLECT)
    sensor = _hash01(rows.astype(np.int64) + 7919, cols.astype(np.int64), seed * 7 + 5)
    img = img + (sensor[..., None] - 0.5) * 6
    # 1..255: 0 is kept for nodata.
    rgb = np.clip(np.rint(img), 1, 255).astype(np.uint8).transpose(2, 0, 1)
    rgb = rgb[:, _HALO:-_HALO, _HALO:-_HALO]
    mask = mask[_HALO:-_HALO, _HALO:-_HALO]
    b = layout.nodata_border
    if b:
        r_idx = np.arange(row0, row0 + h)[:, None]
        c_idx = np.arange(col0, col0 + w)[None, :]
        outside = (r_idx < b) | (r_idx >= layout.height - b) | (c_idx < b) | (c_idx >= layout.width - b)
        rgb[:, outside] = 0
        mask[outside] = 0
    return np.ascontiguousarray(rgb), np.ascontiguousarray(mask)


# --------------------------------------------------------------------------- write


def _profile(layout: _Layout, count: int, nodata: float | None) -> dict:
    profile = {
        **GTIFF_PROFILE, "count": count, "width": layout.width, "height": layout.height,
        "dtype": "uint8", "crs": layout.crs, "transform": layout.transform, "nodata": nodata,
    }
    if layout.width < 256 or layout.height < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    return profile


def _write_rasters(
    layout: _Layout, image: Path, mask: Path | None, *, overwrite: bool, block: int
) -> None:
    nodata = 0 if layout.nodata_border else None
    windows = [
        Window(c, r, min(block, layout.width - c), min(block, layout.height - r))
        for r in range(0, layout.height, block)
        for c in range(0, layout.width, block)
    ]
    with atomic_output(image, overwrite=overwrite) as tmp_img:
        with rasterio.open(tmp_img, "w", **_profile(layout, 3, nodata)) as dimg:
            dimg.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                rasterio.enums.ColorInterp.blue]
            if mask is None:
                for win in windows:
                    dimg.write(_render(layout, win)[0], window=win)
            else:
                with atomic_output(mask, overwrite=overwrite) as tmp_mask:
                    with rasterio.open(tmp_mask, "w", **_profile(layout, 1, None)) as dmask:
                        for win in windows:
                            rgb, m = _render(layout, win)
                            dimg.write(rgb, window=win)
                            dmask.write(m, 1, window=win)


def _write_roofs(
    path: Path, polygons: Sequence[Polygon], kinds: Sequence[str], crs: CRS, *,
    scene: str | Sequence[str], overwrite: bool,
) -> None:
    import geopandas as gpd

    scenes = [scene] * len(polygons) if isinstance(scene, str) else list(scene)
    gdf = gpd.GeoDataFrame(
        {"id": np.arange(1, len(polygons) + 1, dtype=np.int64), "scene": scenes,
         "roof": list(kinds)},
        geometry=list(polygons), crs=crs.to_wkt(),
    )
    with atomic_output(path, overwrite=overwrite) as tmp:
        gdf.to_file(tmp, layer="roofs", driver="GPKG", engine="pyogrio")


def _check_args(width: int, height: int, resolution: float, nodata_border: int) -> None:
    for key, val in (("width", width), ("height", height)):
        if int(val) != val or val < 1:
            raise ConfigError(f"scene {key} should be a positive number of pixels, got {val!r}")
    if not resolution > 0:
        raise ConfigError(f"resolution should be positive (CRS units per pixel), got {resolution!r}")
    if int(nodata_border) != nodata_border or nodata_border < 0 or 2 * nodata_border >= min(width, height):
        raise ConfigError(
            f"nodata_border should be 0 or a few pixels, less than half the scene, got {nodata_border!r}"
        )


def _layout_for(
    *, width: int, height: int, seed: int, crs: str | CRS, resolution: float,
    origin: tuple[float, float], n_roofs: int | None, nodata_border: int,
) -> _Layout:
    _check_args(width, height, resolution, nodata_border)
    if n_roofs is not None and (int(n_roofs) != n_roofs or n_roofs < 0):
        raise ConfigError(f"n_roofs should be a non-negative integer or None, got {n_roofs!r}")
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception:
        raise ConfigError(f"crs {crs!r} is not a CRS; pass e.g. 'EPSG:32633'") from None
    transform = Affine(resolution, 0.0, origin[0], 0.0, -resolution, origin[1])
    return _plan(width=int(width), height=int(height), seed=int(seed), crs=crs_obj,
                 transform=transform, n_roofs=n_roofs, nodata_border=int(nodata_border))


def make_scene(
    out_dir: str | os.PathLike[str],
    *,
    name: str = "scene",
    width: int = 517,
    height: int = 300,
    seed: int = 0,
    crs: str | CRS = "EPSG:32633",
    resolution: float = 0.3,
    origin: tuple[float, float] = (500000.0, 4650000.0),
    n_roofs: int | None = None,
    nodata_border: int = 0,
    write_roofs: bool = True,
    overwrite: bool = False,
) -> SyntheticScene:
    """Generate a realistic scene and write ``NAME.tif``, ``NAME_mask.tif``, ``NAME_roofs.gpkg``.

    Roof, tree and road sizes are in ground metres (converted to CRS units at
    the scene centre, so a scene in EPSG:4326 or EPSG:3857 looks the same on
    the ground as one in UTM when its resolution is given in CRS units).

    Args:
        out_dir: Folder for the outputs (created if needed).
        name: File stem of the outputs.
        width: Width in pixels.
        height: Height in pixels.
        seed: Random seed; the same seed gives identical pixels and polygons.
        crs: Scene CRS.
        resolution: Pixel size in CRS units (metres for a projected CRS).
        origin: CRS coordinates (x, y) of the top-left corner.
        n_roofs: At most this many roofs (None: about 80% of the lots, one roof
            per 18 m lot); fewer are placed when the scene has no room.
        nodata_border: Width in pixels of a nodata frame (value 0 in every band,
            declared as the image's nodata); 0 for none. No roof touches it.
        write_roofs: Write the roof GeoPackage (layer ``"roofs"``).
        overwrite: Replace existing outputs.

    Returns:
        The written scene with its roof polygons.

    Raises:
        ConfigError: Non-positive sizes, an unknown CRS, a border too wide.
        OutputError: An output exists without ``overwrite`` (nothing is written).
    """
    out = Path(out_dir)
    layout = _layout_for(width=width, height=height, seed=seed, crs=crs, resolution=resolution,
                         origin=origin, n_roofs=n_roofs, nodata_border=nodata_border)
    image, mask, roofs = out / f"{name}.tif", out / f"{name}_mask.tif", out / f"{name}_roofs.gpkg"
    for p in (image, mask, roofs) if write_roofs else (image, mask):
        check_output(p, overwrite=overwrite)
    _write_rasters(layout, image, mask, overwrite=overwrite, block=RENDER_BLOCK)
    if write_roofs:
        _write_roofs(roofs, layout.roofs, layout.roof_kind, layout.crs, scene=name,
                     overwrite=overwrite)
    log.info("wrote synthetic scene %s (%dx%d px, %d roofs)", image, width, height,
             len(layout.roofs))
    return SyntheticScene(
        name=name, image=image, mask=mask, roofs=roofs if write_roofs else None,
        polygons=list(layout.roofs), crs=layout.crs, transform=layout.transform,
        width=int(width), height=int(height),
    )


def make_dataset(
    root: str | os.PathLike[str],
    *,
    layout: Literal["seed", "flat", "vector"] = "seed",
    n_scenes: int = 3,
    width: int = 517,
    height: int = 300,
    seed: int = 0,
    crs: str | CRS = "EPSG:32633",
    resolution: float = 0.3,
    origin: tuple[float, float] = (500000.0, 4650000.0),
    nodata_border: int = 0,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write a whole labelled dataset of generated scenes in one of the layouts geoseg reads.

    Layouts (scene names ``scene_000``, ``scene_001``, ...):

    - ``"seed"``: ``ROOT/images/images/NAME.tif`` + ``ROOT/label/label/NAME_label.tif`` (0/255).
    - ``"flat"``: ``ROOT/images/NAME.tif`` + ``ROOT/labels/NAME.tif`` (0/255).
    - ``"vector"``: ``ROOT/images/NAME.tif`` + one ``ROOT/roofs.gpkg`` (layer ``"roofs"``,
      attribute ``scene``); the masks go to ``ROOT/masks/NAME.tif`` for reference.

    Scenes lie side by side in the CRS (with a gap), so they never overlap.

    Args:
        root: Dataset folder.
        layout: Which layout to write.
        n_scenes: Number of scenes.
        width: Width of each scene in pixels.
        height: Height of each scene in pixels.
        seed: Base seed; scene ``i`` uses a seed derived from it.
        crs: CRS of every scene.
        resolution: Pixel size in CRS units.
        origin: Top-left corner of the first scene.
        nodata_border: As in :func:`make_scene`.
        overwrite: Replace existing files.

    Returns:
        The dataset: its root, layout, scenes and (vector layout) roof file.

    Raises:
        ConfigError: Unknown layout, n_scenes < 1, or bad scene arguments.
        OutputError: An output exists without ``overwrite``.
    """
    if layout not in ("seed", "flat", "vector"):
        raise ConfigError(f"layout should be one of 'seed', 'flat', 'vector', got {layout!r}")
    if int(n_scenes) != n_scenes or n_scenes < 1:
        raise ConfigError(f"n_scenes should be a positive integer, got {n_scenes!r}")
    root = Path(root)
    names = [f"scene_{i:03d}" for i in range(n_scenes)]
    if layout == "seed":
        paths = [(root / "images" / "images" / f"{n}.tif", root / "label" / "label" / f"{n}_label.tif")
                 for n in names]
    elif layout == "flat":
        paths = [(root / "images" / f"{n}.tif", root / "labels" / f"{n}.tif") for n in names]
    else:
        paths = [(root / "images" / f"{n}.tif", root / "masks" / f"{n}.tif") for n in names]
    vector = root / "roofs.gpkg" if layout == "vector" else None
    for img, msk in paths:
        check_output(img, overwrite=overwrite)
        check_output(msk, overwrite=overwrite)
    if vector is not None:
        check_output(vector, overwrite=overwrite)

    scenes: list[SyntheticScene] = []
    all_polys: list[Polygon] = []
    all_kinds: list[str] = []
    all_scenes: list[str] = []
    step = width * resolution * 1.25  # scenes side by side with a gap of a quarter scene
    for i, (name, (img, msk)) in enumerate(zip(names, paths)):
        lay = _layout_for(width=width, height=height, seed=seed * 1_000_003 + i, crs=crs,
                          resolution=resolution, origin=(origin[0] + i * step, origin[1]),
                          n_roofs=None, nodata_border=nodata_border)
        _write_rasters(lay, img, msk, overwrite=overwrite, block=RENDER_BLOCK)
        all_polys += lay.roofs
        all_kinds += lay.roof_kind
        all_scenes += [name] * len(lay.roofs)
        scenes.append(SyntheticScene(
            name=name, image=img, mask=msk, roofs=vector, polygons=list(lay.roofs), crs=lay.crs,
            transform=lay.transform, width=int(width), height=int(height),
        ))
    if vector is not None:
        _write_roofs(vector, all_polys, all_kinds, scenes[0].crs, scene=all_scenes,
                     overwrite=overwrite)
    log.info("wrote a %s-layout dataset of %d scenes to %s", layout, n_scenes, root)
    return SyntheticDataset(root=root, layout=layout, scenes=scenes, vector=vector)
