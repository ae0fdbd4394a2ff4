"""Tests for geoseg.benchmarks.scaling: one fresh process per scene size, its peak memory its own."""

from __future__ import annotations

import os

import numpy as np
import pytest

from geoseg.benchmarks.scaling import in_fresh_process
from geoseg.benchmarks.workload import peak_rss_mb
from geoseg.errors import ConfigError


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc only")
def test_peak_rss_of_a_fresh_process_is_its_own_not_its_parents() -> None:
    """ru_maxrss survives exec, so a child spawned by a big parent would report the parent's peak;
    the scaling runs measure each size in a fresh process and must see only that process."""
    import subprocess
    import sys

    from geoseg.benchmarks.workload import peak_rss_mb as _peak_rss_mb

    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # 600 MB touched in this process
    parent = _peak_rss_mb()
    child = subprocess.run([sys.executable, "-c", "from geoseg.benchmarks.workload import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert parent > 600 and float(child.stdout) < 300
    del ballast


def test_scaling_runs_each_size_in_a_fresh_process_as_predict_does(tmp_path, monkeypatch) -> None:
    """One point per size, polygons streamed and written as `geoseg predict` writes them, nothing left."""
    import tempfile

    from geoseg.benchmarks.scaling import scaling

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    points = scaling([300], encoder="resnet18", batch_size=4, precision="32", device="cpu")
    assert [(p.width, p.height) for p in points] == [(300, 300)]
    p = points[0]
    assert p.chips == 4 and p.seconds > 0 and p.peak_rss_mb > 100 and p.polygons >= 0
    assert set(p.stages) >= {"read", "model", "blend_write", "vectorise"}
    assert p.resolution is None and p.grid is None
    assert list(tmp_path.iterdir()) == []
    # At 0.6 m the 0.3 m scene is predicted on a 150x150 grid: one chip.
    (q,) = scaling([300], encoder="resnet18", batch_size=4, precision="32", device="cpu", resolution=0.6)
    assert (q.width, q.height, q.grid, q.resolution, q.chips) == (300, 300, (150, 150), 0.6, 1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_a_spawned_child_measures_its_own_peak_not_its_parents(tmp_path) -> None:
    """The scaling runs' process start (multiprocessing spawn): nothing of the parent's heap comes along."""
    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # 600 MB touched in this process
    assert peak_rss_mb() > 600
    assert in_fresh_process(peak_rss_mb, log=tmp_path / "child.log", what="peak") < 300
    del ballast


def test_a_spawned_child_prints_nothing_to_its_parents_output(tmp_path, capfd) -> None:
    """What the child writes on its stdout and stderr goes to its log, never into --json output."""
    assert in_fresh_process(print, "child noise", log=tmp_path / "child.log", what="print") is None
    out, err = capfd.readouterr()
    assert "child noise" not in out + err
    assert (tmp_path / "child.log").read_text() == "child noise\n"


def test_a_failed_or_dead_child_comes_back_as_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        in_fresh_process(int, "x", log=tmp_path / "a.log", what="scaling run at 9x9")
    assert str(err.value) == "scaling run at 9x9 failed: ValueError: invalid literal for int() with base 10: 'x'"
    assert "Traceback" in (tmp_path / "a.log").read_text()  # the whole traceback stays in the log
    with pytest.raises(ConfigError) as err:
        in_fresh_process(os._exit, 3, log=tmp_path / "b.log", what="scaling run at 9x9")
    assert str(err.value) == "scaling run at 9x9 failed: no output (exit code 3)"
