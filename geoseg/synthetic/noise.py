"""Hash noise: pseudo-random values that are pure functions of the global pixel position.

A pixel gets the same value whatever window it is rendered in, so scenes are
rendered block by block with identical bytes for any block size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1


def hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
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


def value_noise(rows: np.ndarray, cols: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features ``scale`` pixels across (global pixel coords)."""
    gy, gx = rows / scale, cols / scale
    iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    fy, fx = gy - iy, gx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    v00 = hash01(iy, ix, salt)
    v01 = hash01(iy, ix + 1, salt)
    v10 = hash01(iy + 1, ix, salt)
    v11 = hash01(iy + 1, ix + 1, salt)
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    return top + (bottom - top) * fy


def fbm(rows: np.ndarray, cols: np.ndarray, scales: Sequence[float], salt: int) -> np.ndarray:
    """Fractal noise in about [0, 1): octaves at ``scales`` pixels, weights halving."""
    total = np.zeros(np.broadcast_shapes(rows.shape, cols.shape))
    weight, norm = 1.0, 0.0
    for k, scale in enumerate(scales):
        total += weight * value_noise(rows, cols, max(scale, 1.0), salt * 31 + k)
        norm += weight
        weight *= 0.5
    return total / norm
