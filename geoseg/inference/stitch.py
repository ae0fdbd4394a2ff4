"""Blend chip probabilities into block accumulators and carry the halos from block to block.

Every chip of the global grid belongs to exactly one block (``tiling.block_grid``).
A block's accumulator covers its extent: its core plus the halo its chips reach
into to the right and downwards. When the block's chips are done, the halo parts
are handed to the neighbours they lie in (processed later in row-major order) and
the pieces earlier blocks left for this core are added: the core is then final.
Accumulators hold ``sum(w * p)``; the weight sum is the product of two 1-D sums
(``blending.axis_weight_sum``), so no weight channel is accumulated.
"""

from __future__ import annotations

import numpy as np
import torch
from rasterio.windows import Window

from geoseg.inference.blending import axis_weight_sum, taper_window
from geoseg.encoding import MASK_NODATA, PROB_NODATA, PROB_SCALE, ProbDtype
from geoseg.tiling import Block, Chip, axis_starts


def _intersect(a: Window, b: Window) -> Window | None:
    c0, r0 = max(int(a.col_off), int(b.col_off)), max(int(a.row_off), int(b.row_off))
    c1 = min(int(a.col_off + a.width), int(b.col_off + b.width))
    r1 = min(int(a.row_off + a.height), int(b.row_off + b.height))
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


class BlockStitcher:
    """Weighted accumulation of chip probabilities, block by block, on one device.

    Attributes:
        channels: Probability channels accumulated per pixel.
    """

    def __init__(
        self,
        blocks: list[Block],
        *,
        width: int,
        height: int,
        chip_size: int,
        overlap: int,
        channels: int,
        device: torch.device,
    ) -> None:
        """Prepare weights and the halo bookkeeping.

        Args:
            blocks: The scene's blocks (``tiling.block_grid``).
            width: Scene width in pixels.
            height: Scene height in pixels.
            chip_size: Chip size in pixels.
            overlap: Chip overlap in pixels (the blending taper length).
            channels: Probability channels per pixel.
            device: Where the accumulators live.
        """
        self.chip, self.channels, self.device = int(chip_size), int(channels), device
        stride = self.chip - int(overlap)
        win = taper_window(self.chip, overlap)
        # 1-D, scene-length weight sums: a few kB even for the largest scenes.
        self.wsum_x = torch.from_numpy(
            axis_weight_sum(axis_starts(width, self.chip, stride), win, 0, width).astype(np.float32)).to(device)
        self.wsum_y = torch.from_numpy(
            axis_weight_sum(axis_starts(height, self.chip, stride), win, 0, height).astype(np.float32)).to(device)
        self.w2d = torch.from_numpy(np.outer(win, win).astype(np.float32)).to(device)
        self._cores = {(b.row, b.col): b.core for b in blocks}
        self._pending: dict[tuple[int, int], list[tuple[Window, torch.Tensor]]] = {}
        self._base: dict[int, torch.Tensor] = {}

    def new_buffer(self, block: Block) -> torch.Tensor:
        """A zeroed accumulator for the block's extent, (extent pixels, channels)."""
        ext = block.extent
        return torch.zeros((int(ext.height) * int(ext.width), self.channels), dtype=torch.float32,
                           device=self.device)

    def chip_index(self, block: Block, chips: list[Chip]) -> torch.Tensor:
        """Flat extent-pixel indexes of the chips' pixels, (len(chips) * chip * chip,), chip-major.

        Used both to gather chip pixels from the normalised block and to add the
        chips' probabilities back (one vectorised op each, also on a GPU).
        """
        ext = block.extent
        ew = int(ext.width)
        base = self._base.get(ew)
        if base is None:
            ar = torch.arange(self.chip, device=self.device)
            base = self._base.setdefault(ew, (ar[:, None] * ew + ar[None, :]).reshape(-1))
        offs = torch.tensor(
            [(int(c.window.row_off) - int(ext.row_off)) * ew + int(c.window.col_off) - int(ext.col_off)
             for c in chips], dtype=torch.int64,
        ).to(self.device, non_blocking=True)
        return (offs[:, None] + base[None, :]).reshape(-1)

    def add(self, buffer: torch.Tensor, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Add weighted chip probabilities (N, channels, chip, chip) at ``index`` into ``buffer``."""
        weighted = (probs * self.w2d).permute(0, 2, 3, 1).reshape(-1, self.channels)
        buffer.index_add_(0, index, weighted)

    def take_halos(self, block: Block, buffer: torch.Tensor) -> None:
        """Add the halo pieces earlier blocks left for this core (once; later calls add nothing).

        Every earlier block must be closed: blocks close in grid order, so a block's first
        rows are released (:meth:`core_rows`) only when it is the first block still open.
        """
        ext = block.extent
        buf3 = buffer.view(int(ext.height), int(ext.width), self.channels)
        for win, piece in self._pending.pop((block.row, block.col), []):
            r, c = int(win.row_off - ext.row_off), int(win.col_off - ext.col_off)
            buf3[r:r + int(win.height), c:c + int(win.width)] += piece

    def core_rows(self, block: Block, buffer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Probabilities of the core's rows ``start:stop`` (core pixels), final once no chip still to
        come reaches them and :meth:`take_halos` has run: (rows, core width, channels) float32."""
        ext, core = block.extent, block.core
        buf3 = buffer.view(int(ext.height), int(ext.width), self.channels)
        r0, c0, cw = int(core.row_off), int(core.col_off), int(core.width)
        wsum = self.wsum_y[r0 + start:r0 + stop, None] * self.wsum_x[None, c0:c0 + cw]
        return buf3[start:stop, :cw] / wsum[..., None]

    def close_block(self, block: Block, buffer: torch.Tensor, *, start: int = 0) -> torch.Tensor:
        """Take in the halos left for this core, pass this block's halos on; return the core's probabilities.

        Args:
            start: Core rows already released (:meth:`core_rows`): only the rows from here are returned.

        Returns:
            (core height - start, core width, channels) float32 probabilities.
        """
        ext = block.extent
        self.take_halos(block, buffer)
        buf3 = buffer.view(int(ext.height), int(ext.width), self.channels)
        for nb in ((block.row, block.col + 1), (block.row + 1, block.col), (block.row + 1, block.col + 1)):
            if nb not in self._cores:
                continue
            inter = _intersect(ext, self._cores[nb])
            if inter is not None:
                r, c = int(inter.row_off - ext.row_off), int(inter.col_off - ext.col_off)
                piece = buf3[r:r + int(inter.height), c:c + int(inter.width)].clone()
                self._pending.setdefault(nb, []).append((inter, piece))
        return self.core_rows(block, buffer, start, int(block.core.height))

    @property
    def pending_pixels(self) -> int:
        """Pixels of halo waiting for later blocks (memory diagnostics)."""
        return sum(int(p.shape[0]) * int(p.shape[1]) for v in self._pending.values() for _, p in v)


def finish_core(
    probs: torch.Tensor,
    valid: torch.Tensor,
    *,
    roof: int,
    threshold: float,
    prob_dtype: ProbDtype,
    extra: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Class mask and stored rooftop probability of a core, nodata where the input was.

    Args:
        probs: (H, W, channels) probabilities (1 channel: rooftop, binary model), the
            last ``extra`` of them from an ``instances`` model's extra channels.
        valid: (H, W) bool, True where the scene has data.
        roof: Channel of the rooftop class (multi-class).
        threshold: Rooftop probability threshold (binary).
        prob_dtype: ``"uint8"`` or ``"float16"``.
        extra: Extra probability channels (border, contact), stored after the rooftop one.

    Returns:
        (uint8 mask with 255 nodata, stored probability) as numpy arrays; the
        probability is (H, W), or (1 + extra, H, W) with extra channels.
    """
    if extra:
        probs, more = probs[..., :-extra], probs[..., -extra:]
        mask, stored = finish_core(probs, valid, roof=roof, threshold=threshold, prob_dtype=prob_dtype)
        return mask, np.concatenate([stored[None], _store(more.permute(2, 0, 1), ~valid, prob_dtype)])
    if probs.shape[-1] == 1:
        prob = probs[..., 0]
        mask = (prob >= threshold).to(torch.uint8)
    else:
        prob = probs[..., roof]
        mask = probs.argmax(dim=-1).to(torch.uint8)
    nodata = ~valid
    mask = mask.masked_fill(nodata, MASK_NODATA)
    return mask.cpu().numpy(), _store(prob, nodata, prob_dtype)


def _store(prob: torch.Tensor, nodata: torch.Tensor, prob_dtype: ProbDtype) -> np.ndarray:
    """Probabilities (..., H, W) to their stored form (see ``encoding.quantise_probability``)."""
    if prob_dtype == "uint8":
        stored = torch.round(prob * PROB_SCALE).clamp_(0, PROB_SCALE).to(torch.uint8)
        stored = stored.masked_fill(nodata, PROB_NODATA)
    else:
        stored = prob.to(torch.float16).to(torch.float32).masked_fill(nodata, float("nan"))
    return stored.cpu().numpy()
