"""Property tests for geoseg.tiling: chip grids cover every pixel, stay inside, sit flush."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from geoseg.tiling import (
    DEFAULT_CHIP_SIZE, Chip, axis_starts, block_grid, chip_grid, fitted_length, iter_windows, random_chips,
)

sizes = st.integers(min_value=1, max_value=96)


@st.composite
def grids(draw):
    size = draw(st.integers(min_value=1, max_value=96))
    # Small strides only with small scenes, so that a grid stays a few thousand chips.
    stride = draw(st.integers(min_value=max(1, size // 8), max_value=size))
    width = draw(st.integers(min_value=1, max_value=min(400, 40 * stride)))
    height = draw(st.integers(min_value=1, max_value=min(400, 40 * stride)))
    return width, height, size, stride


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 5000), size=sizes, data=st.data())
def test_axis_starts(length, size, data):
    stride = data.draw(st.integers(1, size))
    starts = axis_starts(length, size, stride)
    assert starts == sorted(set(starts)) and starts[0] == 0
    if length <= size:
        assert starts == [0]
        return
    # Inside, flush with the far edge, regular steps of `stride` but the last.
    assert all(0 <= s <= length - size for s in starts)
    assert starts[-1] == length - size
    steps = np.diff(starts)
    assert (steps[:-1] == stride).all() and 0 < steps[-1] <= stride
    # Every pixel covered.
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all()


@settings(max_examples=200, deadline=None)
@given(grids())
def test_chip_grid_properties(args):
    width, height, size, stride = args
    chips = chip_grid(width, height, size=size, stride=stride)
    covered = np.zeros((height, width), np.int32)
    for chip in chips:
        w = chip.window
        assert (w.width, w.height) == (size, size)
        # Inside the scene, except along an axis shorter than a chip: then at 0 and padded.
        if width >= size:
            assert 0 <= w.col_off and w.col_off + size <= width and chip.pad_right == 0
        else:
            assert w.col_off == 0 and chip.pad_right == size - width
        if height >= size:
            assert 0 <= w.row_off and w.row_off + size <= height and chip.pad_bottom == 0
        else:
            assert w.row_off == 0 and chip.pad_bottom == size - height
        assert chip.padded == bool(chip.pad_right or chip.pad_bottom)
        v = chip.valid
        assert (v.col_off, v.row_off) == (w.col_off, w.row_off)
        assert v.width == min(size, width) and v.height == min(size, height)
        covered[int(v.row_off):int(v.row_off + v.height), int(v.col_off):int(v.col_off + v.width)] += 1
    assert covered.min() >= 1  # full coverage
    cols = sorted({int(c.window.col_off) for c in chips})
    rows = sorted({int(c.window.row_off) for c in chips})
    assert cols == axis_starts(width, size, stride) and rows == axis_starts(height, size, stride)
    # Flush: the last column/row ends on the scene edge (or the scene is smaller).
    assert cols[-1] + size == max(width, size) and rows[-1] + size == max(height, size)
    # Row-major, one chip per (row, col).
    assert [(int(c.window.row_off), int(c.window.col_off)) for c in chips] == [
        (r, c) for r in rows for c in cols
    ]
    # Overlap between regular neighbours is size - stride.
    if len(cols) > 2:
        assert cols[1] - cols[0] == stride and size - (cols[1] - cols[0]) == size - stride
    assert list(iter_windows(chips)) == [c.valid for c in chips]


def test_chip_grid_517_by_300_default():
    chips = chip_grid(517, 300)
    assert [(int(c.window.row_off), int(c.window.col_off)) for c in chips] == [
        (0, 0), (0, 256), (0, 261), (44, 0), (44, 256), (44, 261)
    ]
    assert not any(c.padded for c in chips)


def test_small_scene_is_one_padded_chip():
    assert chip_grid(200, 150) == [Chip(Window(0, 0, 256, 256), pad_right=56, pad_bottom=106)]
    assert chip_grid(200, 150)[0].valid == Window(0, 0, 200, 150)


@settings(max_examples=100, deadline=None)
@given(grids(), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_random_chips_inside(args, count, seed):
    width, height, size, _ = args
    chips = random_chips(width, height, count, size=size, rng=np.random.default_rng(seed))
    assert len(chips) == count
    for chip in chips:
        w = chip.window
        assert (w.width, w.height) == (size, size)
        assert 0 <= w.col_off <= max(0, width - size) and 0 <= w.row_off <= max(0, height - size)
        assert chip.pad_right == max(0, size - width) and chip.pad_bottom == max(0, size - height)
    again = random_chips(width, height, count, size=size, rng=np.random.default_rng(seed))
    assert again == chips


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=0), "chip size should be a positive integer number of pixels, got 0"),
        (dict(size=64, stride=65), r"stride \(65 px\) should not exceed the chip size \(64 px\)"),
        (dict(size=64, stride=0), "stride should be a positive integer number of pixels, got 0"),
        (dict(size=2.5), "chip size should be a positive integer number of pixels, got 2.5"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        chip_grid(100, 100, **kwargs)


def test_bad_length():
    with pytest.raises(ValueError, match="axis length should be a positive integer number of pixels, got 0"):
        axis_starts(0, 16, 16)


# --- degenerate shapes cost what they should: one row of chips along a thin scene ---------------

#: The stride of the default overlap (a quarter of the chip).
DEFAULT_STRIDE = DEFAULT_CHIP_SIZE - DEFAULT_CHIP_SIZE // 4


def fewest_starts(length: int, size: int, stride: int) -> int:
    """The fewest chips of ``size`` that cover ``length`` pixels stepping at most ``stride``, flush."""
    return 1 if length <= size else math.ceil((length - size) / stride) + 1


@pytest.mark.parametrize(
    "width, height, chips",
    [
        (100000, 10, math.ceil((100000 - 256) / 192) + 1),  # 521: one row
        (10, 100000, math.ceil((100000 - 256) / 192) + 1),  # one column
        (1, 1, 1),
        (255, 257, 2),  # one column of 2: the second flush with the bottom edge
    ],
)
def test_thin_and_tiny_scenes_get_the_fewest_chips(width, height, chips):
    grid = chip_grid(width, height, stride=DEFAULT_STRIDE)
    assert len(grid) == chips
    assert all(c.window.width == c.window.height == DEFAULT_CHIP_SIZE for c in grid)
    # Along an axis thinner than a chip: every chip starts at 0 and the rest is padding.
    if height < DEFAULT_CHIP_SIZE:
        assert {int(c.window.row_off) for c in grid} == {0}
        assert {c.pad_bottom for c in grid} == {DEFAULT_CHIP_SIZE - height}
    if width < DEFAULT_CHIP_SIZE:
        assert {int(c.window.col_off) for c in grid} == {0}
        assert {c.pad_right for c in grid} == {DEFAULT_CHIP_SIZE - width}
    # The streamed prediction cuts exactly these chips, each once.
    blocks = block_grid(width, height, block_size=2048, stride=DEFAULT_STRIDE)
    assert sorted(c.window.flatten() for b in blocks for c in b.chips) == sorted(c.window.flatten() for c in grid)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), size=sizes, data=st.data())
def test_chip_count_is_the_fewest_that_cover_each_axis(width, height, size, data):
    stride = data.draw(st.integers(max(1, size // 4), size))
    assert len(axis_starts(width, size, stride)) == fewest_starts(width, size, stride)
    assert len(axis_starts(height, size, stride)) == fewest_starts(height, size, stride)
    fewest = fewest_starts(width, size, stride) * fewest_starts(height, size, stride)
    if fewest <= 20000:  # build only grids that stay small
        assert len(chip_grid(width, height, size=size, stride=stride)) == fewest


@pytest.mark.parametrize("length, fitted", [
    (257, 256), (258, 256), (261, 256),  # 256-px chips, stride 192: one chip, not two (<= 2% shorter)
    (262, 262),  # 2.3% shorter: kept (two chips)
    (256, 256), (100, 100), (1, 1),  # one chip already (a shorter axis is padded)
    (448, 448), (455, 448), (460, 460),  # two chips exactly; 455 -> 448 (1.5%); 460 -> 448 is 2.6%: kept
    (514, 514),  # 448 is 13% shorter
    (1027, 1024), (1033, 1024),  # five chips, not six
])
def test_fitted_length_examples(length, fitted):
    assert fitted_length(length, 256, 192, tolerance=0.02) == fitted


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 5000), size=sizes, data=st.data())
def test_fitted_length_saves_a_chip_within_the_tolerance(length, size, data):
    stride = data.draw(st.integers(1, size))
    tolerance = data.draw(st.sampled_from([0.0, 0.01, 0.02, 0.1]))
    fitted = fitted_length(length, size, stride, tolerance=tolerance)
    assert length - tolerance * length <= fitted <= length
    before, after = len(axis_starts(length, size, stride)), len(axis_starts(fitted, size, stride))
    # The overshoot past the last whole stride goes, nothing more: at most one chip fewer.
    overshoot = length - (size + (length - size) // stride * stride) if length > size else 0
    if fitted == length:
        # Whole strides already, or an overshoot over the tolerance (without it: a chip fewer).
        assert overshoot == 0 or overshoot > tolerance * length
        if overshoot:
            assert len(axis_starts(length - overshoot, size, stride)) == before - 1
    else:
        assert fitted == length - overshoot
        # One chip fewer, and the longest length that takes that many.
        assert after == before - 1
        assert len(axis_starts(fitted + 1, size, stride)) == before
    with pytest.raises(ValueError, match="positive integer"):
        fitted_length(0, size, stride, tolerance=tolerance)
