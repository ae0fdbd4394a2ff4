"""The model's thread: chips gathered into full batches across blocks and scenes, cores out.

A :class:`Batches` is shared by every scene of a run (``inference.job``) or owned by one
:func:`~geoseg.inference.pipeline.predict_scene` call. Each scene's :class:`BlockWork`
normalises its blocks and adds their chips; a batch goes through the model as soon as it
is full, whatever blocks or scenes its chips come from, so only the run's last batch is
partial (run by the eager model, when compiled). After each batch every scene with chips in it blends
them and closes its blocks that are complete (in grid order); a scene whose blocks have
all been fed finishes as soon as its last chips are through, scenes in the order they
were fed. On a CPU whose cores the model's threads do not all take (above four cores geoseg
leaves one), the model runs in a thread of its own: while it runs a batch, the feeding thread
blends the batch before, closes blocks, hands their cores to the writers and gathers the next
batch, so that this work, serial with the model otherwise, runs beside it (at most one batch in
the model and one being filled; the bookkeeping stays in the feeding thread), until the feeding
thread proves the slower of the two (``OWN_THREAD_*``). The finish
(waiting for the scene's writer, its last polygons, publishing) runs in a thread of its own
while the model goes on with the next scene's chips; polygons handed to a run's shared sink
still arrive scene after scene.
"""

from __future__ import annotations

import collections
import logging
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as concurrent_wait
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np
import torch
from rasterio.windows import Window

from geoseg.devices import default_cpu_threads, torch_threads, usable_cores
from geoseg.encoding import MASK_NODATA, ProbDtype
from geoseg.inference.runtime import ChipPredictor
from geoseg.inference.stitch import BlockStitcher, finish_core
from geoseg.inference.streams import BlockData, CoreWriter, FinishedCore

ProgressFn = Callable[[int, int], None]

log = logging.getLogger(__name__)


class Finishing(Protocol):
    """A scene pass as :class:`Batches` holds it: finished when its chips are through, aborted on failure."""

    def feed(self) -> None: ...

    def finish(self) -> None: ...

    def abort(self, exc: BaseException | None) -> None: ...

    def waited(self, seconds: float) -> None: ...


class _Held(NamedTuple):
    """A scene pass the batches hold until it has finished."""

    work: "BlockWork"
    scene_pass: Finishing
    finished: threading.Event  # set once its finish has ended (or the run is aborted)
    pixels: int = 0  # the scene's pixels (on the model's grid)


#: Scenes whose finish may wait in the finishing thread's queue (one running, one queued) whatever
#: their size: the model does not wait for a finish unless the finishes fall this far behind it.
MIN_PENDING_FINISHES = 2
#: More may wait while the pending scenes have at most MAX_PENDING_FINISH_PIXELS pixels in all,
#: up to MAX_PENDING_FINISHES of them: the scenes held open (writer threads, buffers, files) stay
#: bounded. A batch of 16 chips completes up to 16 small tiles at once; with two pending, the
#: model's thread stood waiting for the finishes of most of them before it read the next tiles.
MAX_PENDING_FINISHES = 32
MAX_PENDING_FINISH_PIXELS = 2048 * 2048
#: With look-ahead (``Batches(ahead=...)``), scenes set up (outputs open, first blocks being read)
#: before their turn to be fed hold at most this many pixels in all (one always may).
MAX_AHEAD_PIXELS = 2 * 2048 * 2048
#: Whether the model runs in a thread of its own (see the module's text). None: on a CPU, when the
#: model's threads leave a core free; True or False: always, never (tests, measurements).
OWN_MODEL_THREAD: bool | None = None
#: With the model in its own thread (chosen by the rule), the feeding thread's CPU seconds per batch
#: (normalising, gathering, blending, closing blocks, on the spare cores' threads) are compared with
#: the model's seconds per batch, medians of the last OWN_THREAD_WINDOW batches once there are
#: OWN_THREAD_MIN_BATCHES (the first OWN_THREAD_SKIP_BATCHES left out: warm-up, compiling). Where
#: the feeding thread takes longer, it cannot keep the model busy (a fast model on many cores): the
#: model goes back to the feeding thread, whose work then runs on every thread, for the rest of the run.
OWN_THREAD_SKIP_BATCHES = 2
OWN_THREAD_MIN_BATCHES = 4
OWN_THREAD_WINDOW = 8


def _frozen(value: Any) -> Any:
    """A setting as a dictionary key: lists (of lists) as tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass
class OpenBlock:
    """A block whose chips are gathered but not all through the model yet (its accumulator is open)."""

    block: Any
    buffer: torch.Tensor
    valid: torch.Tensor
    pending: int = 0
    feeding: bool = False  # its chips are still being added: not closable yet
    #: Per chip to predict, in feeding order: the lowest first core row (core pixels) of it and every
    #: chip after it. The core's rows above that of the first chip not through are final.
    reach: list[int] = field(default_factory=list)
    through: int = 0  # chips blended, in feeding order
    released: int = 0  # core rows already handed to the writer


@dataclass
class _Piece:
    """Consecutive chips of one block in the batch being filled."""

    work: "BlockWork"
    entry: OpenBlock
    index: torch.Tensor
    chips: torch.Tensor


@dataclass
class _Call:
    """A batch handed to the model: its chips' pieces and the probabilities (with the model's seconds) to come."""

    pieces: list[_Piece]
    chips: int
    result: "Future[tuple[torch.Tensor, float]]"
    gather_s: float  # the pieces joined into one batch (the feeding thread's)
    late: bool  # the run's last batch, made outside any scene's feed
    number: int = 0  # of the batches handed to the model's own thread, from 1 (0: run in the feeding thread)

    def owners(self) -> list[tuple["BlockWork", int]]:
        """The scenes its chips are from, in feeding order, each with its number of chips."""
        counts: dict[int, tuple[BlockWork, int]] = {}
        for piece in self.pieces:
            work, count = counts.get(id(piece.work), (piece.work, 0))
            counts[id(piece.work)] = (work, count + piece.chips.shape[0])
        return list(counts.values())


class Batches:
    """Full model batches from the chips of consecutive blocks and scenes.

    Chips join the batch being filled in the order they are added; a scene's chips may
    share a batch with another scene's only when both run the same model the same way
    (:meth:`ChipPredictor.batch_key`: model, precision, TTA, compiled batch size, outputs); otherwise
    the batch is run as it is first. Used as a context manager: on a failure every scene
    pass it holds that has not finished is aborted (its outputs discarded, its threads
    stopped), the latest first.

    Attributes:
        batch_size: Chips per model call.
        calls: Model calls made.
    """

    def __init__(self, batch_size: int, *, ahead: int = 0) -> None:
        """``ahead``: scenes given to :meth:`take` wait to be fed until this many more have been set up
        after them (while they hold at most :data:`MAX_AHEAD_PIXELS`; :meth:`flush` feeds the rest):
        their first blocks are read while the model runs the scenes before them. 0: each is fed at once."""
        if batch_size < 1:
            raise ValueError(f"batch size should be a positive number of chips, got {batch_size}")
        if ahead < 0:
            raise ValueError(f"scenes set up ahead should be 0 or more, got {ahead}")
        self.batch_size = int(batch_size)
        self.ahead = int(ahead)
        self._waiting: collections.deque[_Held] = collections.deque()  # held, set up, not fed yet
        self.calls = 0
        self._pieces: list[_Piece] = []
        self._queued = 0
        self._key: tuple[Any, ...] | None = None
        self._threads: int | None = None
        #: The scene whose blocks are being fed: the time other scenes take to finish inside
        #: its feed is theirs, not its (``BlockWork.nested_s``).
        self.feeding: "BlockWork | None" = None
        self._held: list[_Held] = []  # scene passes not finished, in feeding order
        self._ended: collections.deque[_Held] = collections.deque()
        #: Finishes handed to the finishing thread and not yet taken back, in feeding order.
        self._finishing: collections.deque[tuple[_Held, Future[None]]] = collections.deque()
        self._finisher: ThreadPoolExecutor | None = None
        self._model_thread: ThreadPoolExecutor | None = None
        self._in_model: _Call | None = None  # the batch the model's own thread is running
        self._own_off = False  # the feeding thread could not keep up with the model: no own thread any more
        self._feed_cpu: collections.deque[float] = collections.deque(maxlen=OWN_THREAD_WINDOW)
        self._model_s: collections.deque[float] = collections.deque(maxlen=OWN_THREAD_WINDOW)
        self._own_calls = 0  # batches handed to the model's own thread
        self._cpu_mark: float | None = None  # the feeding thread's CPU time at its last hand-over
        self._predictors: dict[tuple[Any, ...], tuple[Any, ChipPredictor]] = {}

    def predictor(self, model: Any, **settings: Any) -> ChipPredictor:
        """The :class:`ChipPredictor` of ``model`` run with ``settings`` (its keywords), made once for
        every scene that runs it so: a run's tiles share one, and the model is prepared (eval mode,
        device, memory format, folded batch norms) and checked for changes once a run, not once a
        tile (about 1 ms a tile of one core, ResNet18)."""
        key = (id(model), *sorted((name, _frozen(value)) for name, value in settings.items()))
        if key not in self._predictors:  # the model is kept with it: its id stays its own
            self._predictors[key] = (model, ChipPredictor(model, **settings))
        return self._predictors[key][1]

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.abort(exc)
            return
        try:
            self._reap(wait=True)  # finishes handed over since the last flush
        except BaseException as err:
            self.abort(err)
            raise
        self._close_finisher()
        self._close_model_thread()

    @property
    def room(self) -> int:
        """Chips the batch being filled still takes."""
        return self.batch_size - self._queued

    def hold(self, work: "BlockWork", scene_pass: Finishing, *, threads: int | None, pixels: int = 0) -> None:
        """Take a scene pass whose chips ``work`` will add: finished by :meth:`end`, aborted on failure.

        ``threads``: torch CPU threads for the model calls the scene's chips end up in (the
        last batch of a run may run outside any scene's own loop). ``pixels``: the scene's size,
        which bounds how many finishes may wait (:data:`MAX_PENDING_FINISH_PIXELS`).
        """
        self._held.append(_Held(work, scene_pass, threading.Event(), int(pixels)))
        self._threads = threads

    def take(self, scene_pass: Finishing) -> None:
        """A scene pass set up (and held): fed now, or once enough scenes are set up after it (``ahead``)."""
        self._waiting.append(next(h for h in reversed(self._held) if h.scene_pass is scene_pass))
        while self._waiting and (len(self._waiting) > self.ahead or (
                len(self._waiting) > 1 and sum(h.pixels for h in self._waiting) > MAX_AHEAD_PIXELS)):
            self._waiting.popleft().scene_pass.feed()

    def in_turn(self, sink: Callable[[Any], None]) -> Callable[[Any], None]:
        """``sink`` for the scene to be held next: it takes that scene's polygons only once every
        scene held before it has finished, so a run's shared sink gets them scene after scene
        (a scene's writer polygonises while an earlier scene may still be finishing)."""
        if not self._held:  # every earlier scene has finished
            return sink
        after = self._held[-1].finished

        def put(frame: Any) -> None:
            after.wait()
            sink(frame)

        return put

    def add(self, work: "BlockWork", entry: OpenBlock, index: torch.Tensor, chips: torch.Tensor) -> None:
        """Queue chips (at most :attr:`room`) of ``entry``'s block; run the batch once it is full."""
        key = work.predictor.batch_key()
        if self._queued and key != self._key:  # another model or way of running it: no sharing
            self._predict()
        self._key = key
        self._pieces.append(_Piece(work, entry, index, chips))
        self._queued += chips.shape[0]
        entry.pending += chips.shape[0]
        if self._queued >= self.batch_size:
            self._predict()

    def end(self, work: "BlockWork") -> None:
        """``work``'s scene has added all its chips: finish it once they are through (in feeding order)."""
        for held in self._held:
            if held.work is work:
                self._ended.append(held)
                break
        self._finish_ready()

    def flush(self) -> None:
        """Feed the scenes still waiting, run the last, partial batch; every ended scene finishes (waited
        for; the first failure raised)."""
        while self._waiting:
            self._waiting.popleft().scene_pass.feed()
        with torch_threads(self._threads), torch.inference_mode():
            if self._queued:
                self._predict(late=True)
            self._through()
            self._finish_ready()
        self._reap(wait=True)
        self._close_finisher()
        self._close_model_thread()

    def abort(self, exc: BaseException | None = None) -> None:
        """Abort every held scene pass not finished, the latest first (outputs discarded, threads stopped).

        The first error an abort raises (a failed write named by its output) is raised once all are aborted.
        """
        self._pieces, self._queued = [], 0
        in_model, self._in_model = self._in_model, None
        if in_model is not None:  # the model's thread is let finish its batch (its error already on its way)
            concurrent_wait([in_model.result])
        self._close_model_thread()
        self._waiting.clear()  # held too: aborted below
        self._ended.clear()
        for h in self._held:  # writers waiting for their turn go on (to be stopped)
            h.finished.set()
        finishing, self._finishing = list(self._finishing), collections.deque()
        for _, future in finishing:
            future.cancel()  # not started yet: never starts
        finished = set()
        for h, future in finishing:  # the one running is waited for: a pass is finished or aborted, not both
            if not future.cancelled() and future.exception() is None:
                finished.add(h.work)
        self._close_finisher()
        held, self._held = [h for h in self._held if h.work not in finished], []
        raised: BaseException | None = None
        for h in reversed(held):
            try:
                h.scene_pass.abort(exc)
            except BaseException as err:  # noqa: BLE001 - every pass is aborted before anything is raised
                raised = raised or err
        if raised is not None:
            raise raised

    def _predict(self, *, late: bool = False) -> None:
        """The queued chips through the model as one batch; each scene blends its own and closes blocks.

        With the model in its own thread (:meth:`_own_thread`) the batch is handed to it and
        the batch before is taken through meanwhile; else it runs here and is taken through.
        ``late``: outside any scene's feed (the run's last batch): its time is added to each
        scene's ``late_s`` by its share of the chips.
        """
        t1 = time.perf_counter()
        pieces, n = self._pieces, self._queued
        self._pieces, self._queued = [], 0
        chips = pieces[0].chips if len(pieces) == 1 else torch.cat([p.chips for p in pieces])
        predictor = pieces[0].work.predictor
        t2 = time.perf_counter()
        self.calls += 1
        if self._own_thread(chips):
            if self._in_model is not None and self._in_model.result.done() \
                    and self._in_model.result.exception() is not None:
                self._through()  # the batch before failed: raised here, no batch goes after it
            if self._model_thread is None:
                self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoseg-model")
            self._watch_feeding()
            model_threads = self._model_threads()
            call = _Call(pieces, n, self._model_thread.submit(_run_model, predictor, chips, model_threads),
                         t2 - t1, late, number=self._own_calls)
            # This thread's own torch work (blending, gathering) runs on the cores the model leaves:
            # with as many threads as the model's, the two crowd the cores (forced on a 2-core CPU,
            # both at two threads: a 2048² scene 3.09 s against 2.80 s with the model in this thread).
            spare = max(1, usable_cores() - model_threads)
            if torch.get_num_threads() != spare:
                torch.set_num_threads(spare)
            if late:
                self._account_late(call, time.perf_counter() - t1)
            before, self._in_model = self._in_model, call
            if before is not None:
                self._take_through(before)  # while the model runs this batch
            return
        self._through()  # a batch the model's own thread ran before (given up, or another way of running) first
        if self._cpu_mark is not None:  # the model ran in its own thread: this thread's torch threads back to its
            self._cpu_mark = None
            torch.set_num_threads(self._model_threads())
        done: Future[tuple[torch.Tensor, float]] = Future()
        probs = predictor(chips)
        done.set_result((probs, time.perf_counter() - t2))
        self._take_through(_Call(pieces, n, done, t2 - t1, late), spent=time.perf_counter() - t1)

    def _own_thread(self, chips: torch.Tensor) -> bool:
        """Whether the model runs in its own thread (:data:`OWN_MODEL_THREAD`)."""
        if OWN_MODEL_THREAD is not None:
            return OWN_MODEL_THREAD
        return not self._own_off and chips.device.type == "cpu" and self._model_threads() < usable_cores()

    def _watch_feeding(self) -> None:
        """At a hand-over to the model's own thread: note the feeding thread's CPU seconds since the last
        one; give the own thread up once the feeding thread is the slower (see OWN_THREAD_SKIP_BATCHES)."""
        now = time.thread_time()
        if self._cpu_mark is not None and self._own_calls > OWN_THREAD_SKIP_BATCHES:
            self._feed_cpu.append(now - self._cpu_mark)
        self._cpu_mark = now
        self._own_calls += 1
        if (OWN_MODEL_THREAD is None and min(len(self._feed_cpu), len(self._model_s)) >= OWN_THREAD_MIN_BATCHES
                and statistics.median(self._feed_cpu) > statistics.median(self._model_s)):
            log.debug("the feeding thread (%.1f ms of CPU a batch) is slower than the model (%.1f ms): "
                      "the model runs in the feeding thread from here", 1000 * statistics.median(self._feed_cpu),
                      1000 * statistics.median(self._model_s))
            self._own_off = True

    def _model_threads(self) -> int:
        """The torch threads the model's calls run with (the held scenes' setting)."""
        return default_cpu_threads() if self._threads is None else max(1, int(self._threads))

    def _through(self) -> None:
        """Take the batch in the model's own thread through, if there is one (waiting for it)."""
        call, self._in_model = self._in_model, None
        if call is not None:
            self._take_through(call)

    def _account_late(self, call: _Call, seconds: float) -> None:
        """``seconds`` of this thread spent on ``call`` outside any feed: the scenes' ``late_s``, by share."""
        for work, count in call.owners():
            work.late_s += seconds * count / call.chips

    def _take_through(self, call: _Call, *, spent: float = 0.0) -> None:
        """A batch's probabilities blended by the scenes its chips are from, their complete blocks closed.

        ``spent``: seconds already spent on it in this thread (counted as late if it is the run's last
        batch or is taken through outside any scene's feed).
        """
        t3 = time.perf_counter()
        probs, model_s = call.result.result()  # the model's failure is raised here
        if call.number > OWN_THREAD_SKIP_BATCHES:
            self._model_s.append(model_s)
        start = 0
        for piece in call.pieces:
            k = piece.chips.shape[0]
            piece.work.blend(piece.entry, piece.index, probs[start:start + k])
            start += k
        owners = call.owners()
        late = call.late or self.feeding is None
        if late:
            self._account_late(call, spent + time.perf_counter() - t3)
        for work, count in owners:  # the model's time shared by chips; blending is each scene's own
            share = count / call.chips
            work.stages["preprocess"] += call.gather_s * share
            work.stages["model"] += model_s * share
            work.batches += 1
        for work, count in owners:  # scenes in feeding order: an earlier one finishes first
            t5 = time.perf_counter()
            work.chips_through(count)  # closes its blocks: the scene's own time, before its finish starts
            if late:
                work.late_s += time.perf_counter() - t5
            self._finish_ready()

    def _finish_ready(self) -> None:
        """Hand the finishing thread, in feeding order, the leading ended scenes whose blocks are all
        closed; take back the finishes that have ended (the first failure is raised)."""
        while self._ended and self._ended[0].work.complete:
            held = self._ended.popleft()
            t0 = time.perf_counter()
            while self._finishes_full(held):  # the finishes fall behind: wait for one
                self._reap_first()
            # The wait is the finished scene's (``waited``), not that of the scene being fed; handing
            # the finish over is the fed scene's own time (it may include the GIL's hand-over).
            if self.feeding is not None and self.feeding is not held.work:  # inside another's feed
                self.feeding.nested_s += time.perf_counter() - t0
            if self._finisher is None:
                self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoseg-finish")
            self._finishing.append((held, self._finisher.submit(self._finish, held)))
        self._reap(wait=False)

    def _finishes_full(self, held: _Held) -> bool:
        """Whether ``held`` must wait for a pending finish to end before it is handed over."""
        pending = len(self._finishing)
        if pending < MIN_PENDING_FINISHES:
            return False
        pixels = held.pixels + sum(h.pixels for h, _ in self._finishing)
        return pending >= MAX_PENDING_FINISHES or pixels > MAX_PENDING_FINISH_PIXELS

    @staticmethod
    def _finish(held: _Held) -> None:
        """In the finishing thread: finish a scene; the next scene's polygons may then go to the sink."""
        try:
            held.scene_pass.finish()
        finally:
            held.finished.set()

    def _reap(self, *, wait: bool) -> None:
        """Take back the leading finishes that have ended (with ``wait``: all, waiting for them)."""
        while self._finishing and (wait or self._finishing[0][1].done()):
            self._reap_first()

    def _reap_first(self) -> None:
        """Take back the first finish, waiting for it; its failure is raised (the pass stays held: aborted)."""
        held, future = self._finishing[0]
        t0 = time.perf_counter()
        error = future.exception()
        waited = time.perf_counter() - t0
        if error is not None:
            raise error
        self._finishing.popleft()
        self._held = [h for h in self._held if h is not held]
        held.scene_pass.waited(waited)  # the time the model's thread stood still for it is the scene's

    def _close_finisher(self) -> None:
        if self._finisher is not None:
            self._finisher.shutdown(wait=True)
            self._finisher = None

    def _close_model_thread(self) -> None:
        if self._model_thread is not None:
            self._model_thread.shutdown(wait=True)
            self._model_thread = None


def _run_model(predictor: ChipPredictor, chips: torch.Tensor, threads: int) -> tuple[torch.Tensor, float]:
    """In the model's own thread: a batch's probabilities and the seconds the model took.

    Torch's thread count and inference mode are per thread: set here as the feeding thread has them.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        probs = predictor(chips)
    return probs, time.perf_counter() - t0


class BlockWork:
    """One scene's part of the model's thread: its blocks in, their finished cores out to its writer, in block order.

    Each block is normalised with the scene's own normalisation and its chips added to the
    shared :class:`Batches`; a block closes when all its chips are through, and blocks close
    in grid order, so at most the blocks a batch spans are open.
    """

    def __init__(
        self,
        predictor: ChipPredictor,
        stitcher: BlockStitcher,
        writer: CoreWriter,
        batches: Batches,
        *,
        roof: int,
        threshold: float,
        prob_dtype: ProbDtype,
        last_col: int,
        chips_total: int,
        progress: ProgressFn | None,
        extra: int = 0,
        release_rows: int = 0,
    ) -> None:
        """``release_rows``: the first open block's core goes to the writer in whole multiples of
        this many rows (the outputs' tile height) as they become final, before the block closes
        (0: whole cores only, as it closes)."""
        self.predictor, self.stitcher, self.writer, self.shared = predictor, stitcher, writer, batches
        self.release_rows = int(release_rows)
        self.extra = extra
        self.roof, self.threshold, self.prob_dtype = roof, threshold, prob_dtype
        self.last_col, self.chips_total, self.progress = last_col, chips_total, progress
        self.stages = dict.fromkeys(("read", "preprocess", "model", "blend_write", "vectorise", "wait_read"), 0.0)
        self.done = self.skipped = 0
        self.valid_pixels = self.rooftop_pixels = 0  # of the finished cores: the rooftop share
        self.batches = 0  # model calls that carried this scene's chips
        self.read_blocks = 0  # blocks read (with an AOI, those it touches)
        self.ended = False  # every block has been fed
        self.nested_s = 0.0  # seconds other scenes took to finish during this one's feed
        self.late_s = 0.0  # this scene's share of the batches run after every scene was fed
        self._open: collections.deque[OpenBlock] = collections.deque()

    @property
    def complete(self) -> bool:
        """Every block fed, through the model and closed."""
        return self.ended and not self._open

    def run(self, item: BlockData) -> None:
        """Normalise the block and add its chips to the batches (full ones run); close finished blocks."""
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
        todo = [c for c, ok in zip(blk.chips, item.chip_ok) if ok]
        reach, low = [], int(blk.core.height)
        for c in reversed(todo):
            low = min(low, int(c.window.row_off - blk.core.row_off))
            reach.append(low)
        entry = OpenBlock(blk, stitcher.new_buffer(blk), keep, feeding=True, reach=reach[::-1])
        self._open.append(entry)
        self.skipped += len(blk.chips) - len(todo)
        stages["preprocess"] += time.perf_counter() - t0
        i = 0
        while i < len(todo):
            t1 = time.perf_counter()
            batch = todo[i:i + self.shared.room]  # what fits in the batch being filled
            i += len(batch)
            index = stitcher.chip_index(blk, batch)
            # Gathered (copied) from an (H, W, C) block, the chips are channels_last already.
            chips = pixels.index_select(0, index).view(len(batch), chip, chip, -1).permute(0, 3, 1, 2)
            stages["preprocess"] += time.perf_counter() - t1
            self.shared.add(self, entry, index, chips)  # runs the batch once it is full
        entry.feeding = False
        self._close_ready()

    def end(self) -> None:
        """Every block is fed: the scene finishes once its last chips are through (maybe in a later scene's batch)."""
        self.ended = True
        self._close_ready()
        self.shared.end(self)

    def blend(self, entry: OpenBlock, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Blend a batch's probabilities for chips of ``entry``'s block into its accumulator."""
        t0 = time.perf_counter()
        self.stitcher.add(entry.buffer, index, probs)
        entry.pending -= probs.shape[0]
        entry.through += probs.shape[0]
        self.stages["blend_write"] += time.perf_counter() - t0

    def chips_through(self, count: int) -> None:
        """``count`` more chips of this scene are through the model: report, close the blocks now complete."""
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.chips_total - self.skipped)
        self._close_ready()

    def _close_ready(self) -> None:
        """Close, in grid order, the leading blocks whose chips are all through the model; hand
        the writer the final rows of the first block still open."""
        while self._open and self._open[0].pending == 0 and not self._open[0].feeding:
            self._close(self._open.popleft())
        if self._open and self.release_rows:
            self._release(self._open[0])

    def _release(self, entry: OpenBlock) -> None:
        """Give the writer the core rows no chip still to come reaches, in whole tile rows.

        Only the first open block: every earlier block is closed, so the halos they leave
        in its core are all there. The writer writes them (and, in the last column,
        polygonises them) while the model runs on: a scene one block wide is no longer
        written and polygonised all at once after its last batch.
        """
        blk, height = entry.block, int(entry.block.core.height)
        final = entry.reach[entry.through] if entry.through < len(entry.reach) else height
        stop = min(final, height - 1) // self.release_rows * self.release_rows  # the last rows: at close
        if stop <= entry.released:
            return
        t0 = time.perf_counter()
        self.stitcher.take_halos(blk, entry.buffer)
        rows = self.stitcher.core_rows(blk, entry.buffer, entry.released, stop)
        self._hand_over(entry, rows, stop, block_done=False)
        self.stages["blend_write"] += time.perf_counter() - t0

    def _close(self, entry: OpenBlock) -> None:
        """Finish a block's core (halos handed on) and give the writer its rows not yet released."""
        t4 = time.perf_counter()
        blk = entry.block
        rows = self.stitcher.close_block(blk, entry.buffer, start=entry.released)
        self._hand_over(entry, rows, int(blk.core.height), block_done=True)
        self.stages["blend_write"] += time.perf_counter() - t4

    def _hand_over(self, entry: OpenBlock, probs: torch.Tensor, stop: int, *, block_done: bool) -> None:
        """Core rows ``entry.released:stop`` (their probabilities) to mask and stored probability, to the writer."""
        blk, start = entry.block, entry.released
        core, cw = blk.core, int(blk.core.width)
        mask, prob = finish_core(probs, entry.valid[start:stop, :cw], roof=self.roof, threshold=self.threshold,
                                 prob_dtype=self.prob_dtype, extra=self.extra)
        valid_here = int(np.count_nonzero(mask != MASK_NODATA))
        self.valid_pixels += valid_here
        self.rooftop_pixels += valid_here - int(np.count_nonzero(mask == 0))  # any class but background
        entry.released = stop
        self.writer.put(FinishedCore(Window(core.col_off, core.row_off + start, cw, stop - start), mask, prob,
                                     row_done=blk.col == self.last_col, block_done=block_done))
