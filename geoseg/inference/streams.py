"""Background threads around the model: block readers ahead of it, a writer (and polygoniser) behind it."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from geoseg.encoding import stored_to_probability
from geoseg.inference.outputs import RasterSink
from geoseg.inference.runtime import release_free_heap
from geoseg.raster_io import SceneInfo, read_window
from geoseg.remote import remote_env
from geoseg.resample import read_resampled, same_grid
from geoseg.tiling import Block

if TYPE_CHECKING:
    from geoseg.inference.aoi import AoiPixels
    from geoseg.instances import InstanceSplitter
    from geoseg.vectorize import PolygonBuilder, StripPolygonizer

#: Finished block cores queued for the writer.
WRITE_QUEUE = 2
#: GDAL threads a reader's dataset decodes compressed tiles with.
DECODE_THREADS = min(4, os.cpu_count() or 1)

#: Reader threads shared by every scene of the process, one pool per thread count. A thread's
#: first GDAL open pays GDAL's set-up for that thread (its PROJ context among it): a 512-px tile
#: opened and read in a new thread took 12 ms, in a thread that had opened one before 4 ms, and
#: every scene used to start threads of its own.
_READ_POOLS: dict[int, ThreadPoolExecutor] = {}
_READ_POOLS_LOCK = threading.Lock()


def _reader_pool(workers: int) -> ThreadPoolExecutor:
    with _READ_POOLS_LOCK:
        pool = _READ_POOLS.get(workers)
        if pool is None:
            pool = _READ_POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geoseg-read")
        return pool


# A forked child has none of its parent's threads: it starts pools of its own.
os.register_at_fork(after_in_child=_READ_POOLS.clear)


@dataclass
class BlockData:
    """One block's pixels, read ahead of the model (nothing read for a block outside the AOI)."""

    block: Block
    data: torch.Tensor | None  # (H, W, C) raw pixels of the block extent (pixel-interleaved); None: not read
    valid: torch.Tensor  # (H, W) bool: the scene has data (all False when not read)
    all_valid: bool
    chip_ok: list[bool]  # chip has at least one valid pixel (inside the AOI, with one)
    seconds: float
    inside: torch.Tensor | None = None  # (H, W) bool: pixels inside the AOI; None: no AOI


class BlockReader:
    """Read block extents in worker threads (one dataset handle per thread), in order, ahead of use.

    With an AOI, a block whose extent it does not touch is not read: it comes out with no
    data, every pixel invalid and every chip to skip, as do the chips of a read block that
    have no valid pixel inside the AOI. With a model ``grid`` other than the ``scene``'s own,
    blocks are windows of that grid, read resampled (bilinear; ``resample.read_resampled``).
    """

    def __init__(
        self, path: Path | str, bands: Sequence[int], *, workers: int, prefetch: int, pin: bool,
        aoi: AoiPixels | None = None, scene: SceneInfo | None = None, grid: SceneInfo | None = None,
    ) -> None:
        self.path, self.bands, self.pin, self.aoi = path, list(bands), pin, aoi
        resampled = scene is not None and grid is not None and not same_grid(scene, grid)
        self.grids = (scene, grid) if resampled else None
        self.prefetch = max(1, prefetch)
        self._pool = _reader_pool(max(1, workers))
        self._pending: set[Future[BlockData]] = set()  # this reader's reads not yet handed out
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def _src(self) -> Any:
        src = getattr(self._local, "src", None)
        if src is None:
            # Compressed tiles decoded in GDAL threads (GeoTIFF, COG): a 2048-px deflate RGB block in
            # 20 ms instead of 42 (2-core Xeon); the first block of a scene is read while the model waits.
            with rasterio.Env(GDAL_NUM_THREADS=str(DECODE_THREADS)):
                src = rasterio.open(self.path)
            self._local.src = src
            with self._lock:
                self._handles.append(src)
        return src

    def _read(self, block: Block) -> BlockData:
        t0 = time.perf_counter()
        inside = self.aoi.pixels(block.extent) if self.aoi is not None else None
        if inside is not None and not inside.any():
            return self._outside(block)
        # A remote scene is opened and read under its GDAL settings in this thread too: rasterio's
        # environment (and GDAL's options outside the main thread) are per thread.
        with remote_env(self.path):
            src = self._src()
            data, valid = self._read_extent(src, block.extent, inside)
        keep = valid if inside is None else valid & inside  # where chips have something to predict
        r0, c0 = int(block.extent.row_off), int(block.extent.col_off)
        chip_ok = []
        for chip in block.chips:
            w = chip.window
            r, c = int(w.row_off) - r0, int(w.col_off) - c0
            chip_ok.append(bool(keep[r:r + int(w.height), c:c + int(w.width)].any()))
        # Pixel-interleaved (read so, off the model's thread): a gather of chip pixels from an
        # (H, W, C) block is already channels_last.
        data_t = torch.from_numpy(data)
        valid_t = torch.from_numpy(valid)
        inside_t = torch.from_numpy(inside) if inside is not None else None
        if self.pin:
            data_t, valid_t = data_t.pin_memory(), valid_t.pin_memory()
            inside_t = inside_t.pin_memory() if inside_t is not None else None
        return BlockData(block, data_t, valid_t, bool(valid.all()), chip_ok, time.perf_counter() - t0,
                         inside=inside_t)

    def _read_extent(self, src: Any, extent: Window, inside: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Read a block extent, (H, W, C) and its validity; with an AOI, only the box of its pixels
        inside the AOI (the rest is nodata anyway), so a small AOI in a large block reads only the
        tiles under it."""
        part = extent
        if inside is not None:
            rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
            part = Window(int(extent.col_off) + int(cols[0]), int(extent.row_off) + int(rows[0]),
                          int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))
        if self.grids is None:
            data, valid = read_window(src, part, bands=self.bands, fill=0, pixel_interleaved=True)
        else:
            data, valid = read_resampled(src, *self.grids, part, bands=self.bands, fill=0)
            data = np.ascontiguousarray(data.transpose(1, 2, 0))
        if part is extent:
            return data, valid
        h, w = int(extent.height), int(extent.width)
        r, c = int(part.row_off - extent.row_off), int(part.col_off - extent.col_off)
        full = np.zeros((h, w, data.shape[2]), dtype=data.dtype)
        full_valid = np.zeros((h, w), dtype=bool)
        full[r:r + data.shape[0], c:c + data.shape[1]] = data
        full_valid[r:r + data.shape[0], c:c + data.shape[1]] = valid
        return full, full_valid

    @staticmethod
    def _outside(block: Block) -> BlockData:
        """A block outside the AOI: nothing read, no valid pixel, no chip to predict."""
        ext = block.extent
        none = torch.zeros((int(ext.height), int(ext.width)), dtype=torch.bool)
        return BlockData(block, None, none, False, [False] * len(block.chips), 0.0, inside=none)

    def _submit(self, block: Block) -> Future[BlockData]:
        if self.aoi is not None and not self.aoi.touches(block.extent):
            done: Future[BlockData] = Future()
            done.set_result(self._outside(block))
            return done
        future = self._pool.submit(self._read, block)
        self._pending.add(future)
        return future

    def iterate(self, blocks: Sequence[Block]) -> Iterator[BlockData]:
        """The blocks' data in order, reading up to ``prefetch`` blocks ahead: the first reads start
        now (a scene set up ahead of its turn is read while the model runs the scenes before it)."""
        ahead: deque[Future[BlockData]] = deque()
        it = iter(blocks)
        for block in it:
            ahead.append(self._submit(block))
            if len(ahead) >= self.prefetch:
                break
        return self._hand_out(ahead, it)

    def _hand_out(self, ahead: deque[Future[BlockData]], it: Iterator[Block]) -> Iterator[BlockData]:
        while ahead:
            future = ahead.popleft()
            item = future.result()
            self._pending.discard(future)
            nxt = next(it, None)
            if nxt is not None:
                ahead.append(self._submit(nxt))
            yield item

    def close(self) -> None:
        """Cancel this reader's reads not started, wait for those running, close its datasets.

        The threads stay for the next scene (:func:`_reader_pool`).
        """
        pending, self._pending = self._pending, set()
        for future in pending:
            future.cancel()
        wait(pending)
        for src in self._handles:
            src.close()
        self._handles.clear()


# --- the writer --------------------------------------------------------------------------------


@dataclass
class FinishedCore:
    """Final class mask and stored probability of a block's core, or of its first rows, for the writer."""

    window: Window  # the scene pixels these are: a core, or whole tile rows of it
    mask: np.ndarray
    prob: np.ndarray
    row_done: bool  # last block of its row: the scene's rows up to the bottom of ``window`` are complete
    block_done: bool = True  # the block's last rows: its arrays are all free once written


class CoreWriter(threading.Thread):
    """Write finished cores; polygonise complete rows of blocks while the model runs on."""

    def __init__(
        self,
        *,
        mask_sink: RasterSink | None,
        prob_sink: RasterSink | None,
        polygonizer: "StripPolygonizer | None",
        builder: "PolygonBuilder | None",
        strip_rows: int,
        width: int,
        splitter: "InstanceSplitter | None" = None,
    ) -> None:
        """Prepare the thread (not started).

        Args:
            mask_sink: Class-mask raster, or None.
            prob_sink: Probability raster, or None.
            polygonizer: Polygonises complete rows (needs ``mask_sink``), or None.
            builder: Turns finished components into polygons as they complete, or None.
            strip_rows: Rows per polygonisation strip.
            width: Scene width in pixels.
            splitter: Splits finished footprint components into buildings (the probability
                raster then has rooftop, border and contact bands), or None.
        """
        super().__init__(name="geoseg-write", daemon=True)
        self.queue: queue.Queue[FinishedCore | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self.mask_sink, self.prob_sink = mask_sink, prob_sink
        self.polygonizer, self.builder = polygonizer, builder
        self.strip_rows, self.width = strip_rows, width
        self.splitter = splitter
        self.error: BaseException | None = None
        self.abort = threading.Event()  # set by the main thread on failure: stop without writing
        self.write_s = 0.0
        self.vector_s = 0.0
        self._written_px = 0  # core pixels written since the last block was done
        self._scene_px = 0  # core pixels written in all
        self._next_row = 0

    def run(self) -> None:
        try:
            # One GDAL environment for the thread's life (rasterio would make one per call).
            with rasterio.Env():
                self._serve()
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a main thread waiting on a full queue
                    self.queue.get_nowait()

    def _serve(self) -> None:
        while True:
            item = self.queue.get()
            if self.abort.is_set():
                return
            if item is None:  # the scene's end
                release_free_heap(self._written_px, scene_end=self._scene_px)
                return
            t0 = time.perf_counter()
            core = item.window
            if self.mask_sink is not None:
                self.mask_sink.write(core, item.mask)
            if self.prob_sink is not None:
                self.prob_sink.write(core, item.prob)
            t1 = time.perf_counter()
            self.write_s += t1 - t0
            if item.row_done and self.polygonizer is not None:
                self._polygonise(int(core.row_off + core.height))
                self.vector_s += time.perf_counter() - t1
            self._written_px += int(core.width) * int(core.height)
            self._scene_px += int(core.width) * int(core.height)
            if item.block_done:  # the block's arrays are free now (the heap is not mapped per array)
                release_free_heap(self._written_px)
                self._written_px = 0

    def _polygonise(self, stop: int) -> None:
        if self.mask_sink is None or self.polygonizer is None:  # polygons always come with a mask sink
            return
        height = self.polygonizer.height
        while self._next_row < stop:
            r0 = self._next_row
            h = min(self.strip_rows, height - r0)
            if r0 + h > stop:  # strips are polygonised whole: where they meet never depends on when rows came
                return
            win = Window(0, r0, self.width, h)
            mask = self.mask_sink.read(win)
            prob = values = None
            if self.prob_sink is not None:
                prob, _ = stored_to_probability(self.prob_sink.read(win))
                if prob.ndim == 3:  # rooftop, border, contact
                    values = self.splitter.strip_values(prob) if self.splitter is not None else None
                    prob = prob[0]
            self.polygonizer.add_strip(r0, mask, prob, values)
            if self.builder is not None:  # finished polygons leave pixel space at once
                finished = self.polygonizer.take_finished()
                self.builder.add(self.splitter(finished) if self.splitter is not None else finished)
            self._next_row = r0 + h

    def stop(self) -> None:
        """Abandon the work (after a failure elsewhere): drop queued cores and wait for the thread."""
        self.abort.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wakes a writer waiting for work
        if self.is_alive():
            self.join()

    def finish(self) -> None:
        """Wait for every queued core to be written; raise the writer's error if it failed."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def put(self, item: FinishedCore | None) -> None:
        """Queue an item; raise the writer's error if it has died."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
