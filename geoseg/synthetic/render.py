"""Pixels of a window of a planned scene: ground, roads, shadows, trees and shaded roofs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window
from shapely.geometry import Polygon, box

from geoseg.synthetic.layout import Layout
from geoseg.synthetic.noise import fbm, hash01, value_noise
from geoseg.synthetic.roofs import ROOF_KINDS

#: Pixels rendered beyond each window so that the blur is seamless between windows.
_HALO = 3
_GRASS = np.array([88.0, 118.0, 62.0])
_SOIL = np.array([138.0, 118.0, 86.0])
_DRY = np.array([150.0, 146.0, 100.0])
_ASPHALT = np.array([92.0, 94.0, 98.0])
_TREE = np.array([38.0, 72.0, 36.0])
#: Light on the rim along a terrace house's walls (1: as the roof).
_RIM_LIGHT = 0.8


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


def render(layout: Layout, window: Window) -> tuple[np.ndarray, np.ndarray]:
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
    low = fbm(rows, cols, [40 / px_m, 18 / px_m, 8 / px_m], seed * 7 + 1)
    mid = fbm(rows, cols, [3 / px_m, 1.2 / px_m], seed * 7 + 2)
    fine = hash01(rows.astype(np.int64), cols.astype(np.int64), seed * 7 + 3)
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
            leaf = value_noise(rows, cols, 0.7 / px_m, seed * 7 + 4)[sel]
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
            if layout.roof_rim.any():  # terrace houses: a darker line along every wall
                wall = np.minimum(to_side, to_end) < layout.roof_rim[roof]
                light = np.where(wall, light * _RIM_LIGHT, light)
            grain = 0.94 + 0.12 * mid[sel]
            img[sel] = layout.roof_colour[roof] * (light * grain)[:, None] + (
                fine[sel, None] - 0.5
            ) * 8

    import cv2  # opencv: the blur (a tiny optical PSF) is the only thing it does here

    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=0.6, borderType=cv2.BORDER_REFLECT)
    sensor = hash01(rows.astype(np.int64) + 7919, cols.astype(np.int64), seed * 7 + 5)
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
