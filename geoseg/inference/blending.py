"""Blending weights for overlapping chips: a smooth taper that is never zero.

A chip's prediction is weighted by ``w(row) * w(col)``; ``w`` rises from a
small floor to 1 over the overlap with a squared sine, stays 1 in the middle
and falls again at the far edge. Overlapping chips are averaged with these
weights, so predictions fade into each other instead of meeting at a seam.
Because the window is separable and every valid pixel is covered by all the
chips that reach it, the per-pixel weight sum is the product of two 1-D sums
that depend only on the chip grid; the accumulator then needs no weight
channel (see :func:`axis_weight_sum`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Weight at the very edge of a chip. Not zero, so that a pixel covered by a
#: single chip (scene borders) still has a defined average.
WEIGHT_FLOOR = 0.01


def taper_window(size: int, overlap: int, *, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D blending weights for a chip of ``size`` pixels.

    Args:
        size: Chip size in pixels.
        overlap: Taper length in pixels at each end (0: flat window of ones).
            Clamped to ``size // 2``.
        floor: Smallest weight, at the outermost pixels (0 < floor <= 1).

    Returns:
        float64 array of shape (size,), symmetric, in [floor, 1].

    Raises:
        ValueError: On a non-positive size, negative overlap or a floor outside (0, 1].
    """
    if size < 1:
        raise ValueError(f"chip size should be positive, got {size}")
    if overlap < 0:
        raise ValueError(f"overlap should be >= 0 pixels, got {overlap}")
    if not 0 < floor <= 1:
        raise ValueError(f"weight floor should be in (0, 1], got {floor}")
    w = np.ones(size, dtype=np.float64)
    ramp = min(int(overlap), size // 2)
    if ramp:
        t = (np.arange(ramp, dtype=np.float64) + 0.5) / ramp
        rise = floor + (1.0 - floor) * np.sin(0.5 * np.pi * t) ** 2
        w[:ramp] = rise
        w[size - ramp:] = rise[::-1]
    return w


def axis_weight_sum(
    starts: Sequence[int], window: np.ndarray, first: int, stop: int
) -> np.ndarray:
    """Sum of the 1-D weights of all chips along one axis, for pixels ``first..stop-1``.

    Args:
        starts: Chip start offsets along the axis (as from ``tiling.axis_starts``).
        window: The 1-D chip weights (length = chip size).
        first: First pixel of the range.
        stop: One past the last pixel of the range.

    Returns:
        float64 array of length ``stop - first``; zero where no chip covers a pixel.
    """
    size = len(window)
    out = np.zeros(stop - first, dtype=np.float64)
    for s in starts:
        lo, hi = max(s, first), min(s + size, stop)
        if lo < hi:
            out[lo - first:hi - first] += window[lo - s:hi - s]
    return out
