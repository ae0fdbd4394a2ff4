"""The real client: QGIS itself opens the GeoPackage and the mask that ``predict`` writes.

QGIS's Python bindings (Debian ``python3-qgis``) belong to the system Python,
so the checks run in a ``/usr/bin/python3`` subprocess with an offscreen Qt.
The test skips, saying why, when QGIS is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio

from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, write_scene
from geoseg.export import write_polygons
from geoseg.inference import predict_scene

SYSTEM_PYTHON = Path("/usr/bin/python3")
QGIS_TIMEOUT = 120


def _qgis_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


def _qgis_missing() -> str | None:
    if not SYSTEM_PYTHON.exists():
        return f"QGIS not installed: {SYSTEM_PYTHON} does not exist (apt-get install python3-qgis)"
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import qgis.core; print(qgis.core.Qgis.QGIS_VERSION)"],
        capture_output=True, text=True, env=_qgis_env(), timeout=QGIS_TIMEOUT,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"QGIS not installed: system python cannot import qgis.core ({last}); apt-get install python3-qgis"
    return None


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer
    app = QgsApplication([], False)
    app.initQgis()
    gpkg, mask = sys.argv[1], sys.argv[2]
    out = {}
    vl = QgsVectorLayer(gpkg + "|layername=rooftops", "rooftops", "ogr")
    out["vector_valid"] = vl.isValid()
    out["vector_crs"] = vl.crs().authid()
    out["features"] = vl.featureCount()
    e = vl.extent()
    out["vector_extent"] = [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()]
    out["geometries_valid"] = all(f.geometry().isGeosValid() for f in vl.getFeatures())
    out["fields"] = [f.name() for f in vl.fields()]
    symbol = vl.renderer().symbol()
    layer = symbol.symbolLayer(0)
    out["renderer"] = vl.renderer().type()
    out["stroke"] = layer.strokeColor().name()
    out["brush_none"] = layer.brushStyle() == 0
    styles = vl.listStylesInDatabase()
    out["styles"] = list(styles[2]) if styles[0] else []
    rl = QgsRasterLayer(mask, "mask")
    out["raster_valid"] = rl.isValid()
    out["raster_crs"] = rl.crs().authid()
    r = rl.extent()
    out["raster_extent"] = [r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()]
    out["raster_size"] = [rl.width(), rl.height()]
    out["raster_nodata"] = rl.dataProvider().sourceNoDataValue(1)
    print("RESULT " + json.dumps(out), flush=True)
    del vl, rl, layer, symbol
    app.exitQgis()
    """
)


def test_qgis_opens_geopackage_and_mask(tmp_path):
    missing = _qgis_missing()
    if missing:
        pytest.skip(missing)
    rects = [(10, 10, 30, 40), (100, 90, 70, 80), (200, 400, 60, 50)]
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(300, 517, rects))
    res = predict_scene(scene, Oracle(), oracle_meta(), mask_out=tmp_path / "mask.tif", block_size=128,
                        device="cpu", precision="32")
    gpkg = write_polygons(res.polygons, tmp_path / "roofs.gpkg")
    (tmp_path / "check.py").write_text(SCRIPT)
    run = subprocess.run(
        [str(SYSTEM_PYTHON), str(tmp_path / "check.py"), str(gpkg), str(tmp_path / "mask.tif")],
        capture_output=True, text=True, env=_qgis_env(), timeout=QGIS_TIMEOUT,
    )
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-2000:]
    got = json.loads(lines[-1][len("RESULT "):])
    with rasterio.open(scene) as src:
        left, bottom, right, top = src.bounds
    assert got["vector_valid"] and got["geometries_valid"]
    assert got["vector_crs"] == "EPSG:32633" and got["features"] == 3
    assert got["fields"] == ["fid", "id", "scene", "area_m2", "perimeter_m", "confidence"]
    np.testing.assert_allclose(got["vector_extent"], res.polygons.total_bounds, atol=1e-6)
    # QGIS applied the default style stored in the GeoPackage: yellow outlines, no fill.
    assert got["renderer"] == "singleSymbol" and got["stroke"] == "#ffdd00" and got["brush_none"]
    assert got["styles"] == ["geoseg rooftops"]
    assert got["raster_valid"] and got["raster_crs"] == "EPSG:32633"
    np.testing.assert_allclose(got["raster_extent"], [left, bottom, right, top], atol=1e-6)
    assert got["raster_size"] == [517, 300] and got["raster_nodata"] == 255


def test_skip_reason_names_qgis(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SYSTEM_PYTHON", Path("/nonexistent/python3"))
    assert _qgis_missing().startswith("QGIS not installed: /nonexistent/python3 does not exist")
