"""Roof shapes: one free-standing roof in its local frame, or a terrace row of houses on a lattice strip."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from shapely import affinity
from shapely.geometry import Polygon, box

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
#: Roof side lengths in ground metres (long side, short side).
ROOF_LONG_M = (7.0, 15.0)
ROOF_SHORT_M = (5.0, 10.5)

#: Terrace houses: mean frontage (width along the row) and depth, in ground metres.
TERRACE_FRONTAGE_M = (5.0, 7.5)
TERRACE_DEPTH_M = (7.5, 11.0)
#: Houses per row (fewer where the row leaves the scene).
TERRACE_HOUSES = (2, 8)
#: Fraction of the strip's length that a row covers.
TERRACE_FILL = (0.72, 0.95)
#: Walls between neighbours: all shared, all narrow gaps, or each one either (probabilities).
TERRACE_WALLS: dict[str, float] = {"shared": 0.4, "gaps": 0.3, "mixed": 0.3}
#: Width of a narrow gap between two houses, in whole pixels of the scene (inclusive range).
TERRACE_GAP_PX = (1, 3)
#: Width (ground metres) of the darker rim along each terrace house's walls: the
#: parapet or gutter line that tells two houses apart in real imagery.
TERRACE_RIM_M = 0.35


@dataclass(frozen=True)
class House:
    """One building of a terrace row, in CRS units.

    Attributes:
        polygon: Footprint (a rectangle; extra vertices where a neighbour's
            corner lies on a shared wall, so that both share that edge exactly).
        frame: Shading frame ``(cx, cy, cos, sin, half_long, half_short)``: the
            centre, the ridge direction and the half sizes along and across it.
        kind: One of :data:`ROOF_KINDS`.
        colour: RGB base colour (floats).
        height: Shadow length (CRS units).
    """

    polygon: Polygon
    frame: tuple[float, float, float, float, float, float]
    kind: str
    colour: np.ndarray
    height: float


def roof_shape(
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


def _house_colours(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Base colours of ``n`` neighbours: each differs from the previous one in material or tone."""
    palette = int(rng.integers(len(ROOF_COLOURS)))
    tone = float(rng.uniform(0.9, 1.05))
    colours = []
    for k in range(n):
        if k and rng.random() < 0.4:  # another material
            palette = (palette + int(rng.integers(1, len(ROOF_COLOURS)))) % len(ROOF_COLOURS)
        if k:  # another tone, at least 10% brighter or darker than the neighbour
            step = float(rng.uniform(0.1, 0.2)) * (1 if rng.random() < 0.5 else -1)
            if not 0.8 <= tone + step <= 1.15:
                step = -step
            tone += step
        colours.append(np.array(ROOF_COLOURS[palette], dtype=float) * tone + rng.normal(0, 4, 3))
    return colours


def terrace_row(
    rng: np.random.Generator, strip: tuple[float, float, float, float], rot: Affine, *,
    unit: float, res: float,
) -> list[House]:
    """A row of houses along the lattice ``u`` axis inside a strip of the lattice.

    Neighbours either share a wall (the two polygons have that edge in common,
    with identical vertices) or stand 1 to 3 pixels apart; all houses of a
    row share their front line, their backs may differ. Each house has its own
    colour (material or tone), roof kind and ridge direction may vary, and a
    darker rim along its walls.

    Args:
        rng: The scene's random generator.
        strip: ``(u0, v0, u1, v1)`` in lattice coordinates (CRS units); the row stays inside.
        rot: Lattice to CRS transform (a rotation and a translation).
        unit: CRS units per ground metre.
        res: Pixel size in CRS units (gaps are whole pixels).

    Returns:
        The houses, in row order.
    """
    u0, v0, u1, v1 = strip
    length = float(rng.uniform(*TERRACE_FILL)) * (u1 - u0)
    frontage = float(rng.uniform(*TERRACE_FRONTAGE_M)) * unit
    walls = list(TERRACE_WALLS)[int(rng.choice(len(TERRACE_WALLS), p=list(TERRACE_WALLS.values())))]
    most = TERRACE_HOUSES[1]
    gap_px = rng.integers(TERRACE_GAP_PX[0], TERRACE_GAP_PX[1], size=most - 1, endpoint=True)
    if walls == "shared":
        gap_px[:] = 0
    elif walls == "mixed":
        gap_px[rng.random(most - 1) < 0.5] = 0
    # As many houses as fit at the drawn mean frontage once the gaps are taken out,
    # so the narrowest house (share 0.85 of 1.2) is still about 4 m wide.
    n = int(np.clip(length // frontage, *TERRACE_HOUSES))
    while n > TERRACE_HOUSES[0] and (length - gap_px[:n - 1].sum() * res) / n < frontage:
        n -= 1
    gaps = gap_px[:n - 1] * res
    shares = rng.uniform(0.85, 1.2, n)
    widths = shares / shares.sum() * (length - gaps.sum())
    depth = min(float(rng.uniform(*TERRACE_DEPTH_M)) * unit, 0.9 * (v1 - v0))
    uneven = rng.random() < 0.5
    depths = depth * (rng.uniform(0.85, 1.0, n) if uneven else np.ones(n))
    front = v0 + float(rng.uniform(0, (v1 - v0) - depth))
    backs = [front + float(d) for d in depths]
    start = u0 + float(rng.uniform(0, (u1 - u0) - length))
    lefts, rights = [], []
    u = start
    for k in range(n):
        lefts.append(u)
        u = u + float(widths[k])
        rights.append(u)
        u = u + float(gaps[k]) if k < n - 1 else u  # a shared wall adds 0.0: the same float
    kinds_p = [0.55, 0.15, 0.3]
    row_kind = ROOF_KINDS[int(rng.choice(3, p=kinds_p))]
    along = rng.random() < 0.7  # ridges along the row (one long roofline) or across each house
    height = float(rng.uniform(5.0, 8.0)) * unit * 0.45
    colours = _house_colours(rng, n)
    ua, ud, va, vd = rot.a, rot.d, rot.b, rot.e  # lattice u and v axes in the CRS

    houses = []
    for k in range(n):
        a, b, back = lefts[k], rights[k], backs[k]
        right_wall = [(b, front)]
        left_wall = [(a, back)]
        # A neighbour's back corner on a shared wall becomes a vertex here too, so both
        # polygons hold that edge with the very same coordinates.
        if k < n - 1 and gaps[k] == 0 and front < backs[k + 1] < back:
            right_wall.append((b, backs[k + 1]))
        if k > 0 and gaps[k - 1] == 0 and front < backs[k - 1] < back:
            left_wall.append((a, backs[k - 1]))
        ring = [(a, front), *right_wall, (b, back), *left_wall]
        polygon = Polygon([rot @ p for p in ring])
        kind = row_kind if rng.random() >= 0.2 else ROOF_KINDS[int(rng.choice(3, p=kinds_p))]
        own_along = along != (rng.random() < 0.15)
        cx, cy = rot @ ((a + b) / 2, (front + back) / 2)
        half_w, half_d = (b - a) / 2, (back - front) / 2
        frame = (cx, cy, ua, ud, half_w, half_d) if own_along else (cx, cy, va, vd, half_d, half_w)
        houses.append(House(polygon=polygon, frame=frame, kind=kind, colour=colours[k],
                            height=height * float(rng.uniform(0.92, 1.08))))
    return houses
