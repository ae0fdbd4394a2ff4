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


def fitted_length(length: int, size: int, stride: int, *, tolerance: float) -> int:
    """An axis length at most ``tolerance`` (relative) shorter than ``length`` that takes one chip fewer.

    :func:`axis_starts` places a chip every ``stride`` pixels and one more flush with the
    end: a length of ``size + k * stride`` takes ``k + 1`` chips, one pixel more takes
    ``k + 2``. A grid that may be drawn at a slightly coarser pixel size (a scene read at a
    model's resolution) is drawn at that shorter length when it is close enough: a 257-px
    axis becomes 256 (one chip, not two).

    Args:
        length: Axis length in pixels (>= 1).
        size: Chip size in pixels.
        stride: Step between chip starts in pixels (<= size).
        tolerance: Largest relative shortening (0.02: 2%).

    Returns:
        ``size + k * stride`` (the longest such length below ``length``) when it is within
        ``tolerance`` of ``length``; else ``length``.

    Raises:
        ValueError: As :func:`axis_starts`.
    """
    _check_sizes(size, stride)
    if int(length) != length or length < 1:
        raise ValueError(f"axis length should be a positive integer number of pixels, got {length!r}")
    if length <= size:
        return int(length)
    fitted = size + (length - size) // stride * stride
    return fitted if length - fitted <= tolerance * length else int(length)


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


def chips_about(pixels: int, chip: int, overlap: int | None = None) -> int:
    """About how many chips of ``chip`` px (``overlap``, default a quarter) cover ``pixels`` pixels.

    For decisions that need a run's size before its grids exist (``geoseg.devices.wants_int8``).
    """
    stride = max(1, int(chip) - (int(chip) // 4 if overlap is None else int(overlap)))
    return -(-int(pixels) // (stride * stride))


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


# --- Blocks: the unit of streamed prediction ---------------------------------------------------
#
# A scene too large for memory is predicted block by block. The cores of the blocks partition
# the scene on a grid aligned to ``block_size`` (a multiple of the output GeoTIFF tile size, so
# each core is written as whole tiles). Every chip of the one global chip grid belongs to the
# block whose core holds its top-left pixel, so no chip is ever computed twice. A chip reaches
# at most ``chip_size - 1`` pixels past its block's core, to the right and downwards only: that
# halo is carried to the right, lower and lower-right neighbour, which are processed later in
# row-major order. A core is therefore final (all chips touching it accumulated) as soon as its
# own chips are done, which is why ``block_size >= chip_size`` is required.


@dataclass(frozen=True)
class Block:
    """One block of a streamed prediction.

    Attributes:
        row: Block row index (0 at the top).
        col: Block column index (0 at the left).
        core: The pixels this block finalises, in scene pixels. Cores of all
            blocks partition the scene.
        extent: The core plus the halo its chips reach into (right and down),
            in scene pixels. It reaches outside the scene only where a chip is
            padded (a scene smaller than a chip along an axis).
        chips: The chips of the global grid whose top-left pixel lies in the core.
    """

    row: int
    col: int
    core: Window
    extent: Window
    chips: tuple[Chip, ...]


def block_starts(length: int, block_size: int) -> list[int]:
    """Start offsets of block cores along one axis: multiples of ``block_size``.

    Raises:
        ValueError: On a non-positive length or block size.
    """
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block size should be a positive integer number of pixels, got {block_size!r}")
    if int(length) != length or length < 1:
        raise ValueError(f"axis length should be a positive integer number of pixels, got {length!r}")
    return list(range(0, length, block_size))


def block_grid(
    width: int,
    height: int,
    *,
    block_size: int,
    chip_size: int = DEFAULT_CHIP_SIZE,
    stride: int | None = None,
) -> list[Block]:
    """Blocks covering a ``width`` x ``height`` scene, row-major, with their chips.

    The chips are exactly those of :func:`chip_grid` with the same size and
    stride, each assigned to one block (the one whose core holds its top-left
    pixel). See the comment above :class:`Block` for why this needs
    ``block_size >= chip_size``.

    Args:
        width: Scene width in pixels.
        height: Scene height in pixels.
        block_size: Block core size in pixels (the last row/column of blocks
            may be smaller).
        chip_size: Chip size in pixels.
        stride: Step between chips in pixels; defaults to ``chip_size``.

    Returns:
        The blocks in row-major order (row, then column).

    Raises:
        ValueError: On non-positive sizes, stride > chip size, or
            block_size < chip_size.
    """
    if int(block_size) != block_size or block_size < chip_size:
        raise ValueError(
            f"block size ({block_size!r} px) should be an integer of at least the chip size "
            f"({chip_size} px): a chip may only reach into the next block"
        )
    chips = chip_grid(width, height, size=chip_size, stride=stride)
    rows = block_starts(height, block_size)
    cols = block_starts(width, block_size)
    by_block: dict[tuple[int, int], list[Chip]] = {}
    for chip in chips:
        key = (int(chip.window.row_off) // block_size, int(chip.window.col_off) // block_size)
        by_block.setdefault(key, []).append(chip)
    blocks = []
    for bi, r0 in enumerate(rows):
        r1 = min(r0 + block_size, height)
        for bj, c0 in enumerate(cols):
            c1 = min(c0 + block_size, width)
            own = tuple(by_block.get((bi, bj), ()))
            r_end = max([r1] + [int(c.window.row_off + c.window.height) for c in own])
            c_end = max([c1] + [int(c.window.col_off + c.window.width) for c in own])
            blocks.append(
                Block(
                    row=bi, col=bj, core=Window(c0, r0, c1 - c0, r1 - r0),
                    extent=Window(c0, r0, c_end - c0, r_end - r0), chips=own,
                )
            )
    return blocks


def strip_rows(height: int, rows: int, *, start: int = 0) -> list[tuple[int, int]]:
    """Row ranges ``(first, stop)`` of horizontal strips of ``rows`` pixels from ``start``.

    Raises:
        ValueError: On a non-positive strip height.
    """
    if int(rows) != rows or rows < 1:
        raise ValueError(f"strip height should be a positive integer number of pixels, got {rows!r}")
    return [(r, min(r + rows, height)) for r in range(start, height, rows)]
