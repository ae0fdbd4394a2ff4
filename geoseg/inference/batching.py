"""The model's thread of one scene: blocks in, chips gathered into full batches across blocks, cores out.

Chips fill batches across blocks: the chips left over at the end of one block go
through the model with the first chips of the next, so only a scene's last batch
is partial (or padded, when compiled). Blocks close in grid order.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from geoseg.encoding import MASK_NODATA, ProbDtype
from geoseg.inference.runtime import ChipPredictor
from geoseg.inference.stitch import BlockStitcher, finish_core
from geoseg.inference.streams import BlockData, CoreWriter, FinishedCore

ProgressFn = Callable[[int, int], None]


@dataclass
class OpenBlock:
    """A block whose chips are gathered but not all through the model yet (its accumulator is open)."""

    block: Any
    buffer: torch.Tensor
    valid: torch.Tensor
    pending: int = 0


class BlockWork:
    """The model's thread: blocks in, their finished cores out to the writer, in block order.

    Chips fill batches across blocks: the chips left over at the end of one block
    (fewer than a batch) go through the model together with the first chips of the
    next, so only the last batch of a scene is partial (or padded, when compiled). A
    block closes when all its chips are through; blocks close in grid order, so at most
    the blocks a batch spans (two, unless blocks hold fewer chips than a batch) are open.
    """

    def __init__(
        self,
        predictor: ChipPredictor,
        stitcher: BlockStitcher,
        writer: CoreWriter,
        *,
        batch_size: int,
        roof: int,
        threshold: float,
        prob_dtype: ProbDtype,
        last_col: int,
        chips_total: int,
        progress: ProgressFn | None,
        extra: int = 0,
    ) -> None:
        self.predictor, self.stitcher, self.writer = predictor, stitcher, writer
        self.extra = extra
        self.batch_size, self.roof, self.threshold, self.prob_dtype = batch_size, roof, threshold, prob_dtype
        self.last_col, self.chips_total, self.progress = last_col, chips_total, progress
        self.stages = dict.fromkeys(("read", "preprocess", "model", "blend_write", "vectorise", "wait_read"), 0.0)
        self.done = self.skipped = 0
        self.valid_pixels = self.rooftop_pixels = 0  # of the finished cores: the rooftop share
        self.batches = 0  # model calls, full or not
        self.read_blocks = 0  # blocks read (with an AOI, those it touches)
        self._open: collections.deque[OpenBlock] = collections.deque()
        self._queue: list[tuple[OpenBlock, torch.Tensor, torch.Tensor]] = []  # (block, pixel index, chips)
        self._queued = 0

    def run(self, item: BlockData) -> None:
        """Normalise, gather the block's chips into batches (run each one that fills), close finished blocks."""
        predictor, stitcher, stages = self.predictor, self.stitcher, self.stages
        dev, chip = stitcher.device, stitcher.chip
        t0 = time.perf_counter()
        stages["read"] += item.seconds
        blk = item.block
        valid = item.valid.to(dev, non_blocking=True)
        if item.data is None:  # outside the AOI: nothing read, nothing to predict, a nodata core
            self._open.append(OpenBlock(blk, stitcher.new_buffer(blk), valid))
            self.skipped += len(blk.chips)
            self._close_ready()
            return
        self.read_blocks += 1
        x = item.data.to(dev, non_blocking=True).to(torch.float32)  # (H, W, C) raw pixels
        if predictor.low is not None:  # the checkpoint's percentile stretch
            x.clamp_(min=predictor.low, max=predictor.high)
        x.sub_(predictor.mean).mul_(predictor.inv_std)
        if not item.all_valid:
            x.masked_fill_(~valid[..., None], 0.0)
        pixels = x.view(-1, x.shape[-1])
        # The model sees every pixel with data; outside the AOI its answer is nodata.
        keep = valid if item.inside is None else valid & item.inside.to(dev, non_blocking=True)
        entry = OpenBlock(blk, stitcher.new_buffer(blk), keep)
        self._open.append(entry)
        todo = [c for c, ok in zip(blk.chips, item.chip_ok) if ok]
        self.skipped += len(blk.chips) - len(todo)
        stages["preprocess"] += time.perf_counter() - t0
        i = 0
        while i < len(todo):
            t1 = time.perf_counter()
            batch = todo[i:i + self.batch_size - self._queued]  # what fits in the batch being filled
            i += len(batch)
            index = stitcher.chip_index(blk, batch)
            # Gathered (copied) from an (H, W, C) block, the chips are channels_last already.
            chips = pixels.index_select(0, index).view(len(batch), chip, chip, -1).permute(0, 3, 1, 2)
            self._queue.append((entry, index, chips))
            self._queued += len(batch)
            entry.pending += len(batch)
            stages["preprocess"] += time.perf_counter() - t1
            if self._queued == self.batch_size:
                self._predict()
        self._close_ready()

    def flush(self) -> None:
        """Run the last, partial batch of the scene and close every block still open."""
        if self._queued:
            self._predict()
        self._close_ready()

    def _predict(self) -> None:
        """The queued chips through the model as one batch, blended into their blocks."""
        t1 = time.perf_counter()
        pieces = self._queue
        chips = pieces[0][2] if len(pieces) == 1 else torch.cat([c for _, _, c in pieces])
        t2 = time.perf_counter()
        probs = self.predictor(chips)
        t3 = time.perf_counter()
        start = 0
        for entry, index, piece in pieces:
            n = piece.shape[0]
            self.stitcher.add(entry.buffer, index, probs[start:start + n])
            entry.pending -= n
            start += n
        self.stages["preprocess"] += t2 - t1
        self.stages["model"] += t3 - t2
        self.stages["blend_write"] += time.perf_counter() - t3
        self.done += self._queued
        self.batches += 1
        self._queue, self._queued = [], 0
        if self.progress is not None:
            self.progress(self.done, self.chips_total - self.skipped)

    def _close_ready(self) -> None:
        """Close, in grid order, the leading blocks whose chips are all through the model."""
        while self._open and self._open[0].pending == 0:
            self._close(self._open.popleft())

    def _close(self, entry: OpenBlock) -> None:
        """Finish a block's core (halos handed on) and give it to the writer."""
        t4 = time.perf_counter()
        blk = entry.block
        core = self.stitcher.close_block(blk, entry.buffer)
        ch, cw = int(blk.core.height), int(blk.core.width)
        mask, prob = finish_core(core, entry.valid[:ch, :cw], roof=self.roof, threshold=self.threshold,
                                 prob_dtype=self.prob_dtype, extra=self.extra)
        valid_here = int(np.count_nonzero(mask != MASK_NODATA))
        self.valid_pixels += valid_here
        self.rooftop_pixels += valid_here - int(np.count_nonzero(mask == 0))  # any class but background
        self.stages["blend_write"] += time.perf_counter() - t4
        self.writer.put(FinishedCore(blk, mask, prob, row_done=blk.col == self.last_col))
