"""Progress of long commands: tqdm bars for people, or one JSON object per line for programs.

The commands (predict, evaluate, train) turn their library callbacks into
:meth:`ProgressReporter.update` and :meth:`ProgressReporter.message` calls on
one reporter; the reporter decides how progress looks. ``bar`` draws tqdm bars
(the default, as before); ``json`` writes one JSON object per line to stderr,
which the QGIS plugin (``geoseg/qgis_plugin``) reads from its subprocess:

    {"stage": "predict", "done": 12, "total": 40, "unit": "chip", "scene": "a"}
    {"stage": "train", "done": 3, "total": 10, "unit": "batch", "epoch": 1, "epochs": 5, "loss": 0.51, "iou": 0.2}
    {"stage": "log", "message": "epoch 1/5 ...", "epoch": 1, "epochs": 5}
    {"stage": "done"}

``done`` and ``total`` count the stage's ``unit`` (chip, block, batch);
``{"stage": "done"}`` is written once, last, when the command succeeded (a failed
command ends with its ``Error: ...`` line instead).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from typing import IO, Any, Literal

#: The values of ``--progress``.
PROGRESS_FORMATS = ("bar", "json")
ProgressFormat = Literal["bar", "json"]
#: The ``stage`` of a message line and of the last line of a successful command (``json``).
LOG_STAGE = "log"
DONE_STAGE = "done"


class ProgressReporter:
    """Where a command reports its progress; the base class reports nothing."""

    def update(self, stage: str, done: int, total: int, *, label: str | None = None, unit: str = "it",
               **fields: Any) -> None:
        """``done`` of ``total`` units of ``stage``.

        Args:
            stage: What is counted (``predict``, ``evaluate``, ``train``, ``val``).
            done: Units done so far.
            total: Units in the stage.
            label: What a bar is called (default: ``stage``); a new label starts a new bar.
            unit: What ``done`` counts (singular: ``chip``, ``block``, ``batch``).
            **fields: More about the step (``scene``, ``epoch``, ``loss``...): JSON keys;
                bars show the float ones.
        """

    def message(self, text: str, **fields: Any) -> None:
        """A line for the user (e.g. an epoch's summary); ``fields`` are JSON keys beside it."""

    def finish(self) -> None:
        """The command succeeded: close what is open and, in JSON, write ``{"stage": "done"}``."""


class BarProgress(ProgressReporter):
    """tqdm bars on stderr (hidden when stderr is not a terminal), one at a time; messages via tqdm.write."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._key: str | None = None
        self._closed: str | None = None  # the label of the bar last closed because it was full

    def update(self, stage: str, done: int, total: int, *, label: str | None = None, unit: str = "it",
               **fields: Any) -> None:
        from tqdm import tqdm

        key = label or stage
        if self._bar is None and key == self._closed and done >= total:
            return  # a repeated last step of a bar already closed
        if self._bar is None or key != self._key or done < self._bar.n:
            self._close()
            self._bar = tqdm(total=total, desc=key, unit=unit, leave=False, disable=None, dynamic_ncols=True)
            self._key, self._closed = key, None
        self._bar.total = total
        self._bar.update(done - self._bar.n)
        shown = {k: f"{v:.4f}" for k, v in fields.items() if isinstance(v, float)}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        if done >= total:
            self._close()
            self._closed = key

    def message(self, text: str, **fields: Any) -> None:
        from tqdm import tqdm

        tqdm.write(text)

    def finish(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


class JsonProgress(ProgressReporter):
    """One JSON object per line on ``stream`` (default stderr), flushed at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # callbacks may come from worker threads: whole lines only

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False, default=str) + "\n"
        stream = self._stream if self._stream is not None else sys.stderr
        with self._lock:
            stream.write(line)
            stream.flush()

    def update(self, stage: str, done: int, total: int, *, label: str | None = None, unit: str = "it",
               **fields: Any) -> None:
        self._write({"stage": stage, "done": int(done), "total": int(total), "unit": unit, **_plain(fields)})

    def message(self, text: str, **fields: Any) -> None:
        self._write({"stage": LOG_STAGE, "message": text, **_plain(fields)})

    def finish(self) -> None:
        self._write({"stage": DONE_STAGE})


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as JSON can hold them: None dropped, NaN and infinity as null."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def progress_reporter(kind: ProgressFormat = "bar", *, stream: IO[str] | None = None) -> ProgressReporter:
    """The reporter for ``--progress KIND``.

    Args:
        kind: ``"bar"`` (tqdm bars) or ``"json"`` (JSON lines).
        stream: Where JSON lines go (default: stderr at the time of writing).

    Raises:
        ValueError: An unknown ``kind``.
    """
    if kind == "bar":
        return BarProgress()
    if kind == "json":
        return JsonProgress(stream)
    raise ValueError(f"progress should be one of {', '.join(PROGRESS_FORMATS)}, got {kind!r}")
