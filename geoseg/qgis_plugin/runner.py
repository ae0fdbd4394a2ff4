"""Run the geoseg command line of the recorded Python environment in a subprocess, for QGIS.

QGIS's own Python usually cannot import torch, so the algorithms never import
geoseg: they start ``PYTHON -m geoseg COMMAND ... --progress json`` and read its
streams. stderr carries one JSON object per line (geoseg/progress.py), turned
into ``QgsProcessingFeedback`` progress and log lines, and, when the command
fails, click's ``Error: ...`` line, which becomes the algorithm's one-line
error. A cancel in QGIS sends SIGTERM: geoseg removes its temporaries and exits
(outputs are published only when complete, so nothing is left at the output
paths); a process that has not stopped after :data:`TERMINATE_GRACE_S` is killed.

No QGIS import here: ``feedback`` is any object with QgsProcessingFeedback's
methods, so this module is tested in geoseg's own environment too.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

#: The file ``geoseg qgis install`` writes into the plugin folder: {"python": ..., "geoseg_version": ...}.
ENVIRONMENT_FILE = "environment.json"
#: Environment variable naming the Python that runs geoseg; it wins over the recorded one.
PYTHON_ENV_VAR = "GEOSEG_PYTHON"
#: Seconds a cancelled geoseg gets to remove its temporaries before it is killed.
TERMINATE_GRACE_S = 30.0
#: Seconds between two looks at the cancel button while geoseg is quiet.
POLL_S = 0.1
#: Seconds to wait for the last output once the process has exited (a forked worker may hold the pipes).
DRAIN_S = 5.0
#: Variables of QGIS's own Python, GDAL and PROJ that would break another Python environment's
#: packages (rasterio and pyproj wheels bring their own GDAL and PROJ data).
DROPPED_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV",
                     "GDAL_DATA", "GDAL_DRIVER_PATH", "PROJ_LIB", "PROJ_DATA")
#: click's prefix of a failed command's message, and geoseg's line after SIGTERM or Ctrl-C.
ERROR_PREFIX = "Error: "
INTERRUPTED_PREFIX = "interrupted by "
#: The message of a cancelled run (geoseg's own line follows in brackets when it wrote one).
CANCELED = "canceled: geoseg stopped"
NO_ENVIRONMENT = (
    "no Python environment with geoseg is known to this plugin; in a terminal, in the environment where "
    "geoseg is installed, run: geoseg qgis install (or set " + PYTHON_ENV_VAR + " to that environment's python)"
)


class GeosegRunError(Exception):
    """geoseg could not be started or failed; the message is one line for the Processing log."""


class GeosegCanceled(GeosegRunError):
    """The user cancelled; the subprocess is gone."""


def recorded_python(plugin_dir: str | os.PathLike[str]) -> str | None:
    """The Python ``geoseg qgis install`` recorded in ``plugin_dir``, or None.

    Raises:
        GeosegRunError: The record is unreadable or names a Python that no longer exists.
    """
    record = Path(plugin_dir) / ENVIRONMENT_FILE
    if not record.is_file():
        return None
    try:
        python = json.loads(record.read_text(encoding="utf-8"))["python"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GeosegRunError(f"{record}: cannot be read ({exc}); run geoseg qgis install again") from None
    if not Path(python).is_file():
        raise GeosegRunError(f"{record}: names {python}, which does not exist any more; in the environment "
                             "where geoseg is installed, run: geoseg qgis install") from None
    return str(python)


def geoseg_command(plugin_dir: str | os.PathLike[str], *, environ: dict[str, str] | None = None) -> list[str]:
    """The command that runs geoseg: ``$GEOSEG_PYTHON -m geoseg``, the recorded Python, or ``geoseg`` on PATH.

    Raises:
        GeosegRunError: None of them is there.
    """
    env = os.environ if environ is None else environ
    if env.get(PYTHON_ENV_VAR):
        return [env[PYTHON_ENV_VAR], "-m", "geoseg"]
    python = recorded_python(plugin_dir)
    if python is not None:
        return [python, "-m", "geoseg"]
    found = shutil.which("geoseg", path=env.get("PATH"))
    if found:
        return [found]
    raise GeosegRunError(NO_ENVIRONMENT)


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the geoseg process: QGIS's minus :data:`DROPPED_VARIABLES`, unbuffered UTF-8 streams."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in DROPPED_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def parse_event(line: str) -> dict[str, Any] | None:
    """The progress event on a stderr line (``{"stage": ...}``), or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("stage"), str) else None


def percent(event: dict[str, Any]) -> float | None:
    """Progress in percent for an event, or None when it tells nothing about it.

    Training (events with ``epoch`` and ``epochs``) counts epochs, a training epoch's
    batches filling its share; other stages count ``done`` of ``total``.
    """
    stage = event["stage"]
    if stage == "done":
        return 100.0
    epoch, epochs = event.get("epoch"), event.get("epochs")
    done, total = event.get("done"), event.get("total")
    if isinstance(epoch, int) and isinstance(epochs, int) and epochs > 0:
        if stage == "log":
            return 100.0 * epoch / epochs
        if stage == "train" and isinstance(done, int) and isinstance(total, int) and total > 0:
            return 100.0 * (epoch - 1 + min(done, total) / total) / epochs
        return None
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        return 100.0 * min(done, total) / total
    return None


def describe(event: dict[str, Any], *, start: bool = False) -> str:
    """The progress text of an event: ``predict scene: 12/40 chips``, ``epoch 2/5 train: 3/10 batches``.

    With ``start``, what the stage holds: ``predict scene: 40 chips``.
    """
    stage = event["stage"]
    if isinstance(event.get("epoch"), int) and isinstance(event.get("epochs"), int):
        name = f"epoch {event['epoch']}/{event['epochs']} {stage}"
    else:
        name = f"{stage} {event['scene']}" if event.get("scene") else stage
    count = f"{event.get('total')}" if start else f"{event.get('done')}/{event.get('total')}"
    unit = str(event.get("unit") or "step")
    return f"{name}: {count} {unit + 'es' if unit.endswith(('s', 'ch', 'sh', 'x')) else unit + 's'}"


def _pump(stream: Any, name: str, lines: "queue.Queue[tuple[str, str | None]]") -> None:
    for line in stream:
        lines.put((name, line.rstrip("\r\n")))
    lines.put((name, None))


def _popen(command: list[str], *, cwd: str | None) -> subprocess.Popen:
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0  # no console window
    try:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=child_environment(), cwd=cwd, creationflags=flags,
        )
    except OSError as exc:
        raise GeosegRunError(f"cannot start {command[0]} ({exc.strerror or exc}); in the environment where geoseg "
                             "is installed, run: geoseg qgis install") from None


def run_geoseg(
    args: Sequence[str], feedback: Any, *, command: Sequence[str], cwd: str | None = None,
) -> list[str]:
    """Run ``command + args`` to its end, reporting to ``feedback``; return its stdout lines.

    Args:
        args: The geoseg command and its options (``["predict", "scene.tif", ...]``),
            ``--progress json`` included.
        feedback: A QgsProcessingFeedback (or any object with its methods).
        command: What runs geoseg (:func:`geoseg_command`).
        cwd: Working folder of the process.

    Raises:
        GeosegCanceled: ``feedback`` was cancelled (the process got SIGTERM and is gone).
        GeosegRunError: geoseg failed (its ``Error:`` line) or could not be started.
    """
    full = [*command, *args]
    feedback.pushCommandInfo(" ".join(shlex.quote(a) for a in full))
    proc = _popen(full, cwd=cwd)
    feedback.pushDebugInfo(f"geoseg process {proc.pid}")
    lines: "queue.Queue[tuple[str, str | None]]" = queue.Queue()
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, "stdout", lines), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, "stderr", lines), daemon=True)]
    for t in pumps:
        t.start()
    stdout: list[str] = []
    error: str | None = None
    interrupted: str | None = None
    last_line: str | None = None
    shown: tuple[Any, ...] | None = None
    open_streams, canceled_at, exited_at = len(pumps), None, None
    try:
        while open_streams:
            if canceled_at is None and feedback.isCanceled():
                canceled_at = time.monotonic()
                feedback.pushInfo("canceling: asking geoseg to stop")
                _terminate(proc)
            elif canceled_at is not None and proc.poll() is None and time.monotonic() - canceled_at > TERMINATE_GRACE_S:
                proc.kill()
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            elif exited_at is not None and time.monotonic() - exited_at > DRAIN_S:
                break  # geoseg is gone; a process it forked still holds the pipes
            try:
                name, line = lines.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            if name == "stdout":
                stdout.append(line)
                feedback.pushConsoleInfo(line)
                continue
            event = parse_event(line)
            if event is not None:
                shown = _report(event, feedback, shown)
            elif line.startswith(ERROR_PREFIX):
                error = line[len(ERROR_PREFIX):].strip()
            elif line.startswith(INTERRUPTED_PREFIX):
                interrupted = line.strip()
                feedback.pushInfo(interrupted)
            elif line.strip():
                last_line = line.strip()
                (feedback.pushWarning if line.startswith("WARNING ") else feedback.pushConsoleInfo)(line)
        returncode = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if returncode == 0:
        if canceled_at is not None:
            feedback.pushInfo("geoseg had finished before it could stop: its outputs are complete")
        return stdout
    if canceled_at is not None:
        raise GeosegCanceled(f"{CANCELED} ({interrupted})" if interrupted else CANCELED)
    raise GeosegRunError(error or last_line or f"geoseg exited with status {returncode}")


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (geoseg removes its temporaries and exits 143); on Windows, TerminateProcess."""
    try:
        if sys.platform == "win32":
            proc.terminate()
        else:
            proc.send_signal(signal.SIGTERM)
    except OSError:  # already gone
        pass


def _report(event: dict[str, Any], feedback: Any, shown: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Turn one progress event into feedback; return what the log last announced."""
    stage = event["stage"]
    if stage == "log":
        feedback.pushInfo(str(event.get("message", "")))
    elif stage != "done":
        feedback.setProgressText(describe(event))
        key = (stage, event.get("scene"), event.get("epoch"))
        if key != shown:  # one log line when a stage (or scene, or epoch) starts, not one per step
            feedback.pushInfo(describe(event, start=True))
            shown = key
    value = percent(event)
    if value is not None:
        feedback.setProgress(value)
    return shown
