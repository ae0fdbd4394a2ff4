"""Pure window maths: chip grids, strides, edge and small-scene cover.

Nothing here reads a file. Windows are ``rasterio.windows.Window`` objects in
scene pixel coordinates (column offset, row offset, width, height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from rasterio.windows import Window

DEFAULT_CHIP_SIZE = 256


@dataclass(frozen=True)
class Chip:
    """One chip of a grid.

    Attributes:
        window: The chip's full extent in scene pixels, always ``size`` x ``size``.
            It reaches outside the scene only along an axis where the scene is
            smaller than a chip; there it starts at 0 and the rest is padding.
        pad_right: Pixels of padding beyond the scene's right edge.
        pad_bottom: Pixels of padding beyond the scene's bottom edge.
    """

    window: Window
    pad_right: int = 0
    pad_bottom: int = 0

    @property
    def valid(self) -> Window:
        """The part of the chip that lies inside the scene, in scene pixels."""
        w = self.window
        return Window(w.col_off, w.row_off, w.width - self.pad_right, w.height - self.pad_bottom)

    @property
    def padded(self) -> bool:
        """Whether any part of the chip lies outside the scene."""
        return bool(self.pad_right or self.pad_bottom)


def _check_sizes(size: int, stride: int) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"chip size should be a positive integer number of pixels, got {size!r}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride should be a positive integer number of pixels, got {stride!r}")
    if stride > size:
        raise ValueError(
            f"stride ({stride} px) should not exceed the chip size ({size} px): "
            "pixels between chips would never be covered"
        )


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of chips along one axis of ``length`` pixels.

    Offsets step by ``stride`` from 0; the last chip is moved back so that it
    ends flush with the edge. An axis shorter than a chip has one start, 0.

    Args:
        length: Axis length in pixels (>= 1).
        size: Chip size in pixels.
        stride: Step between chip starts in pixels (<= size).

    Returns:
        Sorted, unique start offsets in pixels.

    Raises:
        ValueError: If a size or stride is not a positive integer, or
            stride > size, or length < 1.
    """
    _check_sizes(size, stride)
    if int(length) != length or length < 1:
        raise ValueError(f"axis length should be a positive integer number of pixels, got {length!r}")
    if length <= size:
        return [0]
    last = length - size
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def chip_grid(
    width: int, height: int, *, size: int = DEFAULT_CHIP_SIZE, stride: int | None = None
) -> list[Chip]:
    """Chips that cover a ``width`` x ``height`` scene, row-major.

    Every pixel is covered; overlap between neighbours is ``size - stride``
    (except at the last row/column, which sits flush with the edge and may
    overlap more). Scenes smaller than a chip along an axis get one padded chip
    along that axis.

    Args:
        width: Scene width in pixels.
        height: Scene height in pixels.
        size: Chip size in pixels.
        stride: Step between chips in pixels; defaults to ``size`` (no overlap).

    Returns:
        The chips, in row-major order.

    Raises:
        ValueError: On non-positive sizes or stride > size.
    """
    stride = size if stride is None else stride
    cols = axis_starts(width, size, stride)
    rows = axis_starts(height, size, stride)
    pad_r = max(0, size - width)
    pad_b = max(0, size - height)
    return [Chip(Window(c, r, size, size), pad_r, pad_b) for r in rows for c in cols]


def random_chips(
    width: int,
    height: int,
    count: int,
    *,
    size: int = DEFAULT_CHIP_SIZE,
    rng: np.random.Generator,
) -> list[Chip]:
    """``count`` chips at uniformly random positions inside the scene.

    Used for training, where fresh windows each epoch act as augmentation.
    Along an axis shorter than a chip the chip starts at 0 and is padded.

    Args:
        width: Scene width in pixels.
        height: Scene height in pixels.
        count: Number of chips.
        size: Chip size in pixels.
        rng: Random generator (seeded by the caller for reproducibility).

    Returns:
        The chips.
    """
    _check_sizes(size, size)
    cols = rng.integers(0, max(0, width - size) + 1, size=count)
    rows = rng.integers(0, max(0, height - size) + 1, size=count)
    pad_r = max(0, size - width)
    pad_b = max(0, size - height)
    return [Chip(Window(int(c), int(r), size, size), pad_r, pad_b) for c, r in zip(cols, rows)]


def iter_windows(chips: list[Chip]) -> Iterator[Window]:
    """The valid (in-scene) window of each chip."""
    for chip in chips:
        yield chip.valid
