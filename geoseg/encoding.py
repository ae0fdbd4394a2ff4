"""The values geoseg writes into files and reads back: one home, at the ground floor (no torch).

Every module that writes or reads a mask, a label, a probability raster or a
loss target takes its codes from here, so "nodata" means one number everywhere.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

#: Label and mask value of pixels that carry no class: nodata in a predicted mask (the input
#: was nodata there), and the ignore index of labels, losses and metrics.
IGNORE_INDEX = 255
MASK_NODATA = IGNORE_INDEX
#: A uint8 probability raster stores ``round(p * PROB_SCALE)``; ``PROB_NODATA`` marks nodata.
PROB_SCALE = 254
PROB_NODATA = 255
#: GDAL block cache (bytes) while reading or writing scene-sized rasters. GDAL keeps
#: every tile it touches up to its cache limit (5% of RAM by default); capping it
#: keeps memory flat in raster size. The limit is process-wide: set it once, in the
#: thread that drives the work (``rasterio.Env(GDAL_CACHEMAX=...)`` takes bytes).
GDAL_CACHE_BYTES = 64 << 20
#: Class names of a binary rooftop model (class id = position).
DEFAULT_CLASS_NAMES: tuple[str, ...] = ("background", "rooftop")

ProbDtype = Literal["uint8", "float16"]


def quantise_probability(prob: np.ndarray, valid: np.ndarray, prob_dtype: ProbDtype) -> np.ndarray:
    """Probability in [0, 1] to the stored representation, nodata where not valid.

    Args:
        prob: float32 probabilities.
        valid: bool, same shape.
        prob_dtype: ``"uint8"`` or ``"float16"``.

    Returns:
        uint8 ``round(p * 254)`` (255 nodata) or float32 values rounded to
        float16 precision (NaN nodata).
    """
    if prob_dtype == "uint8":
        out = np.rint(prob * PROB_SCALE).astype(np.uint8)
        out[~valid] = PROB_NODATA
        return out
    out = prob.astype(np.float16).astype(np.float32)
    out[~valid] = np.nan
    return out


def stored_to_probability(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`quantise_probability`: (float32 probability, valid mask)."""
    if stored.dtype == np.uint8:
        valid = stored != PROB_NODATA
        return stored.astype(np.float32) / PROB_SCALE, valid
    valid = ~np.isnan(stored)
    return np.where(valid, stored, 0).astype(np.float32), valid
