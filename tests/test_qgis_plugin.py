"""geoseg inside QGIS: the Processing plugin, ``geoseg qgis install|uninstall|package``, ``--progress json``.

The QGIS checks run real QGIS (Debian ``python3-qgis``) in a ``/usr/bin/python3``
subprocess with an offscreen Qt, as tests/test_qgis.py does, and skip, saying why,
only when that Python cannot import ``qgis.core``. All of them share one QGIS
session (one start of QGIS) that installs the plugin with ``geoseg qgis install``
into a temporary ``QGIS_CUSTOM_CONFIG_PATH`` and runs the algorithms, each of
which starts this environment's geoseg in a subprocess. The ``qgis_process``
check skips, saying why, when QGIS's ``qgis_process`` (Debian package ``qgis``)
is not installed. The model is a tiny random DeepLabV3+ (``encoder_weights=None``)
whose head is scaled up so that its rooftops are blobs, not all or nothing: the
point is that QGIS gets exactly what ``geoseg predict`` writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from configparser import ConfigParser
from fnmatch import fnmatch
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner
from PIL import Image
from shapely.geometry import box

import cli
import geoseg
from _prediction_helpers import draw_rectangles, stand_in_model, write_scene
from geoseg import qgis_install
from geoseg.export import default_style
from geoseg.progress import JsonProgress
from geoseg.qgis_plugin import runner
from geoseg.synthetic import make_scene
from test_qgis import SYSTEM_PYTHON, _qgis_env, _qgis_missing

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = REPO / "geoseg" / "qgis_plugin"
SESSION_TIMEOUT = 400
#: Find rooftops options of the comparisons (not geoseg's defaults, so that a dropped option shows).
#: The scene's own resolution and bands by name: the same pixels and chips, through both options.
FIND_OPTIONS = {"THRESHOLD": 0.4, "MIN_AREA": 5.0, "SIMPLIFY": 0.5, "OVERLAP": 16, "DEVICE": 1, "RESOLUTION": "0.25",
                "BANDS": "red,green,blue"}
CLI_OPTIONS = ["--threshold", "0.4", "--min-area", "5.0", "--simplify", "0.5", "--overlap", "16", "--device", "cpu",
               "--resolution", "0.25", "--bands", "red,green,blue"]
YELLOW = (255, 221, 0)  # the outline colour of geoseg/rooftops.qml
MASK_COLOURS = {0: (0x2B, 0x2B, 0x2B), 1: YELLOW}  # geoseg/qgis_plugin/layers.py MASK_CLASSES
#: Find rooftops' ground resolution and bands, and the arguments they add after --device (and --precision):
#: none for geoseg's defaults (auto, or empty).
RESOLUTION_CASES = [
    ({}, []), ({"RESOLUTION": "auto"}, []), ({"RESOLUTION": ""}, []), ({"RESOLUTION": None}, []),
    ({"RESOLUTION": " Native "}, ["--resolution", "native"]), ({"RESOLUTION": "0.3"}, ["--resolution", "0.3"]),
    ({"RESOLUTION": 2}, ["--resolution", "2.0"]), ({"RESOLUTION": "1e-1"}, ["--resolution", "0.1"]),
    ({"BANDS": "red,green,blue"}, ["--bands", "red,green,blue"]),
    ({"BANDS": " 4,near infrared "}, ["--bands", "4,near infrared"]), ({"BANDS": "  "}, []),
    ({"RESOLUTION": "AUTO", "BANDS": "3,2,1", "PRECISION": 1}, ["--precision", "32", "--bands", "3,2,1"]),
    ({"RESOLUTION": "native", "BANDS": "nir,red,green"},
     ["--resolution", "native", "--bands", "nir,red,green"]),
]
BAD_RESOLUTIONS = ["0", "-0.5", "0,3", "fine", "nan", "inf"]


def bad_resolution(text: str) -> str:
    return f"Ground resolution should be auto, native or metres per pixel above 0 (e.g. 0.3), got {text!r}"


NOT_A_FILE = ("not a file on this computer; geoseg reads raster and vector files only: save the layer as a file "
              "(right-click the layer > Export > Save As...) and run on that file")


def qgis(*args: str, env: dict[str, str]):
    return CliRunner(env=env).invoke(cli.cli, ["qgis", *args])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- fixtures: a QGIS config folder, a tiny model, scenes ------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from geoseg.checkpoints import CheckpointMeta, save_checkpoint

    from geoseg.models import create_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    with torch.no_grad():  # random logits are all near 0: scaled up, the probability varies over the scene
        model.segmentation_head[0].weight.mul_(200.0)
        model.segmentation_head[0].bias.zero_()
    meta = CheckpointMeta(arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2,
                          class_names=("background", "rooftop"), bands=(1, 2, 3), mean=(120.0,) * 3,
                          std=(60.0,) * 3, chip_size=128, resolution=0.25)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", model, meta)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scenes")
    # 0.25 m pixels: exact in binary, so that QGIS maps the scene's pixels 1:1 onto a picture's (at 0.3 m
    # its map-to-pixel rounding shifts half the rows of a rendered raster by one)
    tiny = make_scene(folder, name="tiny", width=317, height=229, seed=3, nodata_border=10, resolution=0.25)
    big = folder / "big.tif"  # ~220 chips of 128 px: minutes of work, cancelled after the first batch
    with rasterio.open(big, "w", driver="GTiff", width=1500, height=1300, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 4650000, 0.3, 0.3)) as dst:
        dst.write(np.random.default_rng(5).integers(0, 255, (3, 1300, 1500), dtype=np.uint8))
    nocrs = write_scene(folder / "nocrs.tif", draw_rectangles(100, 120, []), crs=None)
    empty = folder / "empty"
    empty.mkdir()
    # An area of interest over part of the tiny scene, in another CRS (EPSG:4326) than the scene's.
    with rasterio.open(tiny.image) as src:
        left, bottom, right, top = src.bounds
    part = box(left + 10, bottom + 12, (left + right) / 2, top - 8)
    aoi = folder / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[part], crs="EPSG:32633").to_crs("EPSG:4326").to_file(aoi)
    return {"tiny": tiny.image, "roofs": tiny.roofs, "big": big, "nocrs": nocrs, "empty": empty, "aoi": aoi}


@pytest.fixture(scope="module")
def qgis_home(tmp_path_factory) -> Path:
    """A QGIS settings folder with a 'default' profile and geoseg's plugin installed by ``geoseg qgis install``."""
    home = tmp_path_factory.mktemp("qgis_home")
    (home / "profiles" / "default").mkdir(parents=True)
    result = qgis("install", env={"QGIS_CUSTOM_CONFIG_PATH": str(home)})
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture(scope="module")
def session(tmp_path_factory, qgis_home, checkpoint, scenes) -> dict:
    """One QGIS session that loads the plugin and runs every QGIS check (see QGIS_SCRIPT); its JSON record."""
    missing = _qgis_missing()
    if missing:
        pytest.skip(missing)
    work = tmp_path_factory.mktemp("session")
    plan = {
        "plugins": str(qgis_home / "profiles" / "default" / "python" / "plugins"),
        "model": str(checkpoint), **{k: str(v) for k, v in scenes.items()}, "out": str(work),
        "find_options": FIND_OPTIONS, "command_cases": [case for case, _ in RESOLUTION_CASES],
        "bad_resolutions": BAD_RESOLUTIONS,
    }
    (work / "plan.json").write_text(json.dumps(plan))
    (work / "session.py").write_text(QGIS_SCRIPT)
    env = {**_qgis_env(), "QGIS_CUSTOM_CONFIG_PATH": str(qgis_home)}
    run = subprocess.run([str(SYSTEM_PYTHON), str(work / "session.py"), str(work / "plan.json")],
                         capture_output=True, text=True, env=env, timeout=SESSION_TIMEOUT)
    record = work / "record.json"
    assert run.returncode == 0 and record.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return {**json.loads(record.read_text()), "work": work}


@pytest.fixture(scope="module")
def cli_prediction(tmp_path_factory, checkpoint, scenes) -> Path:
    """``geoseg predict`` with the options of FIND_OPTIONS, in this process: the reference."""
    out = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(cli.cli, ["predict", str(scenes["tiny"]), "--model", str(checkpoint), "--out",
                                          str(out / "roofs.gpkg"), *CLI_OPTIONS, "--mask-out", str(out / "mask.tif")])
    assert result.exit_code == 0, result.output
    return out


def same_layer(a: Path, b: Path) -> None:
    """Two rooftop layers with the same features: geometries byte for byte, attributes, CRS."""
    ga, gb = gpd.read_file(a, layer="rooftops"), gpd.read_file(b, layer="rooftops")
    assert ga.crs == gb.crs == "EPSG:32633"
    assert len(ga) == len(gb) >= 5
    assert [g.wkb for g in ga.geometry] == [g.wkb for g in gb.geometry]
    assert ga.drop(columns="geometry").equals(gb.drop(columns="geometry"))


# --- the QGIS session -----------------------------------------------------------------------------------------

QGIS_SCRIPT = textwrap.dedent(
    r'''
    import json, os, sys, time
    from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProcessingFeedback,
                           QgsProcessingOutputLayerDefinition, QgsProcessingParameterDefinition, QgsProject,
                           QgsRasterLayer, QgsVectorFileWriter, QgsVectorLayer)
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    plan = json.load(open(sys.argv[1]))
    out = plan["out"]
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    Processing.initialize()
    import processing
    import qgis.utils
    from processing.gui.Postprocessing import handleAlgorithmResults

    # Load the plugin the way QGIS and qgis_process do: from the profile's plugin folder, metadata first.
    qgis.utils.plugin_paths = [plan["plugins"]]
    sys.path.insert(0, plan["plugins"])
    qgis.utils.updateAvailablePlugins()
    record = {"metadata": dict(qgis.utils.plugins_metadata_parser["geoseg"]["general"]),
              "loaded": qgis.utils.loadPlugin("geoseg"), "started": qgis.utils.startProcessingPlugin("geoseg")}
    provider = QgsApplication.processingRegistry().providerById("geoseg")
    optional, advanced = QgsProcessingParameterDefinition.FlagOptional, QgsProcessingParameterDefinition.FlagAdvanced
    record["algorithms"] = {
        a.id(): {"name": a.displayName(),
                 "parameters": [[p.name(), p.type(), bool(p.flags() & optional), bool(p.flags() & advanced),
                                 p.defaultValue()] for p in a.parameterDefinitions()],
                 "outputs": [[o.name(), o.type()] for o in a.outputDefinitions()]}
        for a in provider.algorithms()}

    # Find rooftops' command lines, built (and its parameters checked as the dialog does) without running.
    from qgis.core import QgsProcessingContext, QgsProcessingException
    find_alg = QgsApplication.processingRegistry().createAlgorithmById("geoseg:findrooftops")
    context = QgsProcessingContext()
    base = {"INPUT": plan["tiny"], "MODEL": plan["model"], "OUTPUT": os.path.join(out, "c.gpkg")}
    record["commands"] = []
    for case in plan["command_cases"]:
        ok, message = find_alg.checkParameterValues({**base, **case}, context)
        record["commands"].append([ok, find_alg.command({**base, **case}, context)[0]])
    record["bad_resolutions"] = [list(find_alg.checkParameterValues({**base, "RESOLUTION": text}, context))
                                 for text in plan["bad_resolutions"]]
    try:
        find_alg.command({**base, "RESOLUTION": "0"}, context)
    except QgsProcessingException as exc:
        record["bad_command"] = str(exc)


    class Feedback(QgsProcessingFeedback):
        def __init__(self, cancel_on_progress=False):
            super().__init__()
            self.log, self.progress, self.pid, self.cancel_on_progress = [], [], None, cancel_on_progress

        def setProgress(self, value):
            self.progress.append(value)
            super().setProgress(value)
            if self.cancel_on_progress and not self.isCanceled():
                self.cancel()

        def pushInfo(self, text):
            self.log.append(["info", text])

        def pushCommandInfo(self, text):
            self.log.append(["command", text])

        def pushDebugInfo(self, text):
            self.log.append(["debug", text])
            if text.startswith("geoseg process "):
                self.pid = int(text.split()[-1])

        def pushConsoleInfo(self, text):
            self.log.append(["console", text])

        def pushWarning(self, text):
            self.log.append(["warning", text])


    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


    def run(algorithm, parameters, feedback=None, load=False):
        feedback = feedback or Feedback()
        done = {}
        began = time.monotonic()
        try:
            if load:  # as the Toolbox does: outputs go to the project, then Processing loads and styles them
                parameters = {k: QgsProcessingOutputLayerDefinition(v, QgsProject.instance())
                              if k in ("OUTPUT", "MASK") else v for k, v in parameters.items()}
                done["results"] = processing.run(algorithm, parameters, feedback=feedback,
                                                 onFinish=handleAlgorithmResults)
            else:
                done["results"] = processing.run(algorithm, parameters, feedback=feedback)
        except Exception as exc:
            done["error"] = [type(exc).__name__, str(exc)]
        done.update(log=feedback.log, progress=feedback.progress, pid=feedback.pid,
                    seconds=time.monotonic() - began)
        if feedback.pid is not None:
            done["alive"] = alive(feedback.pid)
        return done


    def folder(name):
        path = os.path.join(out, name)
        os.makedirs(path)
        return path


    # Find rooftops inside an area of interest (an ogr layer of a GeoPackage).
    find_aoi = folder("find_aoi")
    record["find_aoi"] = run("geoseg:findrooftops", {
        "INPUT": plan["tiny"], "MODEL": plan["model"], **plan["find_options"],
        "AOI": QgsVectorLayer(plan["aoi"], "aoi", "ogr"), "OUTPUT": os.path.join(find_aoi, "roofs.gpkg")})

    # Find rooftops, loaded into the project with its styles.
    find = folder("find")
    record["find"] = run("geoseg:findrooftops", {
        "INPUT": plan["tiny"], "MODEL": plan["model"], **plan["find_options"],
        "OUTPUT": os.path.join(find, "roofs.gpkg"), "MASK": os.path.join(find, "mask.tif")}, load=True)
    layers, layer = {}, None
    for layer in QgsProject.instance().mapLayers().values():
        info = {"name": layer.name(), "source": layer.source(), "crs": layer.crs().authid(),
                "renderer": layer.renderer().type()}
        if isinstance(layer, QgsVectorLayer):
            symbol = layer.renderer().symbol().symbolLayer(0)
            info.update(features=layer.featureCount(), stroke=symbol.strokeColor().name(),
                        no_brush=symbol.brushStyle() == 0, stroke_width=symbol.strokeWidth(),
                        valid=all(f.geometry().isGeosValid() for f in layer.getFeatures()))
            layers["rooftops"] = (layer, info)
        else:
            info.update(classes=[[c.value, c.color.name(), c.label] for c in layer.renderer().classes()],
                        nodata=layer.dataProvider().sourceNoDataValue(1),
                        use_nodata=layer.dataProvider().useSourceNoDataValue(1))
            layers["mask"] = (layer, info)
    record["loaded_layers"] = {k: v[1] for k, v in layers.items()}

    # A format without a style of its own (GeoJSON) gets the plugin's copy of geoseg's style.
    from geoseg.layers import style_rooftops  # "geoseg" is the plugin package in QGIS's Python
    geojson = os.path.join(out, "roofs.geojson")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GeoJSON"
    QgsVectorFileWriter.writeAsVectorFormatV2(layers["rooftops"][0], geojson,
                                              QgsProject.instance().transformContext(), options)
    plain = QgsVectorLayer(geojson, "plain", "ogr")
    record["geojson_style"] = [style_rooftops(plain),
                               plain.renderer().symbol().symbolLayer(0).strokeColor().name()]
    del plain

    # Pictures by QGIS's own renderer, one map pixel per scene pixel.
    scene = QgsRasterLayer(plan["tiny"], "scene")


    def render(map_layers, path):
        settings = QgsMapSettings()
        settings.setLayers(map_layers)
        settings.setDestinationCrs(scene.crs())
        settings.setExtent(scene.extent())
        settings.setOutputSize(QSize(scene.width(), scene.height()))
        settings.setBackgroundColor(QColor("white"))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        job.renderedImage().save(path, "PNG")
        return path


    if "rooftops" in layers and "mask" in layers:
        record["renders"] = {
            "roofs": render([layers["rooftops"][0], scene], os.path.join(out, "roofs.png")),
            "scene": render([scene], os.path.join(out, "scene.png")),
            "mask": render([layers["mask"][0]], os.path.join(out, "mask.png"))}

    # Cancel after the first progress event of a scene of ~220 chips.
    cancel = folder("cancel")
    record["cancel"] = run("geoseg:findrooftops", {
        "INPUT": plan["big"], "MODEL": plan["model"], "DEVICE": 1, "OUTPUT": os.path.join(cancel, "roofs.gpkg"),
        "MASK": os.path.join(cancel, "mask.tif")}, feedback=Feedback(cancel_on_progress=True))
    record["cancel"]["left"] = sorted(os.listdir(cancel))

    # A raster without a CRS: geoseg's message.
    nocrs = folder("nocrs")
    record["nocrs"] = run("geoseg:findrooftops", {
        "INPUT": plan["nocrs"], "MODEL": plan["model"], "OUTPUT": os.path.join(nocrs, "roofs.gpkg")})
    record["nocrs"]["left"] = sorted(os.listdir(nocrs))

    # A ground resolution of 0: refused before anything runs.
    bad = folder("bad_resolution")
    record["bad_resolution"] = run("geoseg:findrooftops", {
        "INPUT": plan["tiny"], "MODEL": plan["model"], "RESOLUTION": "0", "OUTPUT": os.path.join(bad, "roofs.gpkg")})
    record["bad_resolution"]["left"] = sorted(os.listdir(bad))

    # Layers that are not files are refused before anything runs.
    tiles = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0",
                           "tiles", "wms")
    sketch = QgsVectorLayer("Polygon?crs=EPSG:32633", "sketch", "memory")
    record["tiles_valid"], record["sketch_valid"] = tiles.isValid(), sketch.isValid()
    QgsProject.instance().addMapLayers([tiles, sketch])
    record["tiles"] = run("geoseg:findrooftops", {
        "INPUT": tiles, "MODEL": plan["model"], "OUTPUT": os.path.join(out, "tiles.gpkg")})
    record["sketch"] = run("geoseg:evaluaterooftops", {
        "PRED": sketch, "TRUTH": plan["roofs"], "OUTPUT": os.path.join(out, "sketch_metrics.gpkg")})

    # Evaluate the found rooftops against the scene's true buildings.
    metrics = os.path.join(folder("evaluate"), "metrics.gpkg")
    record["evaluate"] = run("geoseg:evaluaterooftops", {
        "PRED": os.path.join(find, "roofs.gpkg"), "TRUTH": plan["roofs"], "OUTPUT": metrics})
    table = QgsVectorLayer(metrics, "metrics", "ogr")
    record["evaluate"]["table"] = [[f["group"], f["metric"], f["value"]] for f in table.getFeatures()]

    # Training on a folder with no data: geoseg's message; the options reach the command line.
    record["train"] = run("geoseg:trainmodel", {
        "DATA": plan["empty"], "CONFIG": "quickstart", "EPOCHS": 2, "DEVICE": 1, "SETTINGS": "data.chip_size=64\n",
        "OUTPUT": os.path.join(out, "train")})
    record["train"]["out_exists"] = os.path.exists(os.path.join(out, "train"))

    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(record, f, default=str)
    QgsProject.instance().clear()
    del scene, table, tiles, sketch, layers, layer  # before exitQgis, or Python frees them after QGIS: a crash
    app.exitQgis()
    '''
)


def _command(run_record: dict) -> list[str]:
    import shlex

    commands = [text for kind, text in run_record["log"] if kind == "command"]
    assert len(commands) == 1, run_record["log"]
    return shlex.split(commands[0])


def test_provider_lists_its_algorithms_and_parameters(session):
    meta = session["metadata"]
    assert (meta["name"], meta["qgisminimumversion"], meta["hasprocessingprovider"], meta["version"]) == (
        "geoseg", "3.22", "yes", geoseg.__version__)
    assert session["loaded"] and session["started"]
    algs = session["algorithms"]
    assert sorted(algs) == ["geoseg:evaluaterooftops", "geoseg:findrooftops", "geoseg:trainmodel"]
    assert algs["geoseg:findrooftops"]["name"] == "Find rooftops"
    # [name, type, optional, advanced, default]
    assert algs["geoseg:findrooftops"]["parameters"] == [
        ["INPUT", "raster", False, False, None], ["MODEL", "file", False, False, None],
        ["AOI", "vector", True, False, None], ["THRESHOLD", "number", True, False, None], ["MIN_AREA", "number", True, False, None],
        ["SIMPLIFY", "number", True, False, None], ["REGULARIZE", "boolean", False, False, False],
        ["TTA", "boolean", False, False, False], ["OVERLAP", "number", True, True, None],
        ["DEVICE", "enum", False, True, 0], ["PRECISION", "enum", False, True, 0],
        ["RESOLUTION", "string", True, True, "auto"], ["BANDS", "string", True, True, None],
        ["OUTPUT", "vectorDestination", False, False, None],
        ["MASK", "rasterDestination", True, False, None], ["PROBABILITY", "rasterDestination", True, False, None]]
    assert algs["geoseg:findrooftops"]["outputs"] == [
        ["OUTPUT", "outputVector"], ["MASK", "outputRaster"], ["PROBABILITY", "outputRaster"],
        ["ROOFTOPS", "outputNumber"]]
    assert algs["geoseg:evaluaterooftops"]["name"] == "Evaluate rooftops"
    assert algs["geoseg:evaluaterooftops"]["parameters"] == [
        ["PRED", "layer", False, False, None], ["TRUTH", "layer", False, False, None],
        ["AOI", "vector", True, False, None], ["IOU_THRESHOLD", "number", True, True, None],
        ["OUTPUT", "sink", False, False, None]]
    assert algs["geoseg:evaluaterooftops"]["outputs"] == [
        ["OUTPUT", "outputVector"], ["PIXEL_IOU", "outputNumber"], ["PIXEL_F1", "outputNumber"],
        ["OBJECT_PRECISION", "outputNumber"], ["OBJECT_RECALL", "outputNumber"], ["OBJECT_F1", "outputNumber"]]
    assert algs["geoseg:trainmodel"]["name"] == "Train a rooftop model"
    assert algs["geoseg:trainmodel"]["parameters"] == [
        ["DATA", "file", False, False, None], ["CONFIG", "string", True, False, None],
        ["EPOCHS", "number", True, False, None], ["DEVICE", "enum", False, True, 0],
        ["SETTINGS", "string", True, True, None], ["OUTPUT", "folderDestination", False, False, None]]
    assert algs["geoseg:trainmodel"]["outputs"] == [["OUTPUT", "outputFolder"], ["MODEL", "outputFile"]]


def test_find_rooftops_writes_what_geoseg_predict_writes(session, cli_prediction, checkpoint, scenes):
    find = session["find"]
    assert "error" not in find, find
    out = session["work"] / "find"
    assert _command(find) == [sys.executable, "-m", "geoseg", "predict", str(scenes["tiny"]), "--model",
                              str(checkpoint), "--out", str(out / "roofs.gpkg"), *CLI_OPTIONS, "--mask-out",
                              str(out / "mask.tif"), "--overwrite", "--progress", "json"]
    assert find["results"]["OUTPUT"] == str(out / "roofs.gpkg") and find["results"]["MASK"] == str(out / "mask.tif")
    assert find["results"]["PROBABILITY"] is None
    # (QGIS itself adds mask.tif.aux.xml, GDAL's statistics, when it draws the mask)
    assert sorted(n for n in os.listdir(out) if not n.endswith(".aux.xml")) == ["mask.tif", "roofs.gpkg"]
    same_layer(out / "roofs.gpkg", cli_prediction / "roofs.gpkg")
    with rasterio.open(out / "mask.tif") as a, rasterio.open(cli_prediction / "mask.tif") as b:
        assert (a.crs, a.transform) == (b.crs, b.transform)
        assert np.array_equal(a.read(), b.read())
    assert find["results"]["ROOFTOPS"] == len(gpd.read_file(out / "roofs.gpkg", layer="rooftops"))
    # progress: percentages up to 100, the subprocess gone
    assert find["progress"] and find["progress"][-1] == 100.0 and find["progress"] == sorted(find["progress"])
    assert find["alive"] is False
    assert ["info", "predict tiny: 6 chips"] in find["log"]


def test_find_rooftops_in_an_area_of_interest_is_geoseg_predict_with_aoi(session, checkpoint, scenes, tmp_path):
    find = session["find_aoi"]
    assert "error" not in find, find
    out = session["work"] / "find_aoi"
    assert _command(find) == [sys.executable, "-m", "geoseg", "predict", str(scenes["tiny"]), "--model",
                              str(checkpoint), "--out", str(out / "roofs.gpkg"), *CLI_OPTIONS, "--aoi",
                              str(scenes["aoi"]), "--overwrite", "--progress", "json"]
    result = CliRunner().invoke(cli.cli, ["predict", str(scenes["tiny"]), "--model", str(checkpoint), "--out",
                                          str(tmp_path / "roofs.gpkg"), *CLI_OPTIONS, "--aoi", str(scenes["aoi"])])
    assert result.exit_code == 0, result.output
    whole = gpd.read_file(session["work"] / "find" / "roofs.gpkg", layer="rooftops")
    inside = gpd.read_file(out / "roofs.gpkg", layer="rooftops")
    assert 0 < len(inside) < len(whole)  # the area holds some of the scene's roofs, not all
    assert [g.wkb for g in inside.geometry] == [g.wkb for g in gpd.read_file(tmp_path / "roofs.gpkg",
                                                                             layer="rooftops").geometry]


def test_find_rooftops_passes_resolution_and_bands_only_when_not_the_defaults(session, checkpoint, scenes):
    base = ["predict", str(scenes["tiny"]), "--model", str(checkpoint), "--out", str(session["work"] / "c.gpkg"),
            "--device", "auto"]
    assert session["commands"] == [[True, [*base, *extra, "--overwrite"]] for _, extra in RESOLUTION_CASES]


def test_a_bad_ground_resolution_is_one_message_before_geoseg_starts(session):
    assert session["bad_resolutions"] == [[False, bad_resolution(text)] for text in BAD_RESOLUTIONS]
    assert session["bad_command"] == bad_resolution("0")
    bad = session["bad_resolution"]
    assert bad["error"] == ["QgsProcessingException", "Unable to execute algorithm\n" + bad_resolution("0")]
    assert bad["pid"] is None and bad["left"] == []  # no geoseg process, nothing written


def test_results_load_with_geosegs_styles(session, scenes):
    with rasterio.open(scenes["tiny"]) as src:
        crs = src.crs.to_string()
    roofs, mask = session["loaded_layers"]["rooftops"], session["loaded_layers"]["mask"]
    assert roofs["crs"] == crs == "EPSG:32633" and roofs["valid"] and roofs["features"] >= 5
    assert roofs["renderer"] == "singleSymbol" and roofs["stroke"] == "#ffdd00" and roofs["no_brush"]
    assert roofs["stroke_width"] == 0.6
    assert mask["crs"] == "EPSG:32633" and mask["renderer"] == "paletted"
    assert mask["classes"] == [[0, "#2b2b2b", "background"], [1, "#ffdd00", "rooftop"]]
    assert mask["nodata"] == 255 and mask["use_nodata"] is True
    assert session["geojson_style"] == [True, "#ffdd00"]


def _pixels(polygons: gpd.GeoDataFrame, transform) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of points along every ring, mid-segment, away from corners."""
    points = []
    for geom in polygons.geometry:
        for poly in getattr(geom, "geoms", [geom]):
            for ring in [poly.exterior, *poly.interiors]:
                xy = np.asarray(ring.coords)
                for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
                    length = math.hypot(x1 - x0, y1 - y0) / transform.a
                    for t in np.linspace(0, 1, max(int(length), 2) + 1)[1:-1]:
                        if min(t, 1 - t) * length >= 2:  # at least 2 px from a corner (mitred joins)
                            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                            points.append(((y - transform.f) / transform.e, (x - transform.c) / transform.a))
    rc = np.asarray(points)
    return rc[:, 0], rc[:, 1]


def test_rendering_draws_outlines_on_the_roofs(session, scenes):
    from scipy import ndimage

    renders = session["renders"]
    roofs = np.asarray(Image.open(renders["roofs"]).convert("RGB")).astype(int)
    scene = np.asarray(Image.open(renders["scene"]).convert("RGB")).astype(int)
    polygons = gpd.read_file(session["work"] / "find" / "roofs.gpkg", layer="rooftops")
    with rasterio.open(scenes["tiny"]) as src:
        transform, shape = src.transform, src.shape
    assert roofs.shape == scene.shape == (*shape, 3)
    rows, cols = _pixels(polygons, transform)
    assert len(rows) > 50
    # On every ring, mid-segment: the outline's yellow (within a pixel of the exact line).
    yellow = np.all(np.abs(roofs - YELLOW) <= 40, axis=2)
    near_yellow = ndimage.maximum_filter(yellow, size=3)
    r, c = np.floor(rows).astype(int).clip(0, shape[0] - 1), np.floor(cols).astype(int).clip(0, shape[1] - 1)
    on_line = near_yellow[r, c]
    assert on_line.all(), f"{(~on_line).sum()} of {len(on_line)} boundary points without an outline"
    # Farther than 6 px from every outline (2.3 px wide, mitred corners): exactly the scene as QGIS draws it
    # without the rooftops.
    edges = np.zeros(shape, bool)
    edges[r, c] = True
    for geom in polygons.boundary:  # corners and short edges too
        for x, y in np.asarray(shapely.get_coordinates(shapely.segmentize(geom, transform.a / 2))):
            r, c = (y - transform.f) / transform.e, (x - transform.c) / transform.a
            edges[min(max(int(r), 0), shape[0] - 1), min(max(int(c), 0), shape[1] - 1)] = True
    far = ndimage.distance_transform_edt(~edges) > 6
    assert far.mean() > 0.7
    assert np.array_equal(roofs[far], scene[far])
    assert (roofs[~far] != scene[~far]).any(axis=1).mean() > 0.3


def test_mask_renders_in_two_colours_with_nodata_transparent(session):
    picture = np.asarray(Image.open(session["renders"]["mask"]).convert("RGB"))
    with rasterio.open(session["work"] / "find" / "mask.tif") as src:
        mask = src.read(1)
    assert set(np.unique(mask)) == {0, 1, 255}
    expected = np.zeros((*mask.shape, 3), np.uint8)
    expected[mask == 255] = (255, 255, 255)  # the white map background shows through
    for value, colour in MASK_COLOURS.items():
        expected[mask == value] = colour
    assert np.array_equal(picture, expected)


def test_cancel_after_the_first_progress_event_stops_geoseg_and_leaves_nothing(session):
    cancel = session["cancel"]
    assert cancel["error"] == ["QgsProcessingException",
                               "canceled: geoseg stopped (interrupted by SIGTERM; nothing was written)"]
    assert len(cancel["progress"]) == 1 and 0 < cancel["progress"][0] < 50
    assert cancel["pid"] is not None and cancel["alive"] is False
    assert cancel["left"] == []  # no output, no temporary
    assert ["info", "canceling: asking geoseg to stop"] in cancel["log"]


def test_a_raster_without_crs_fails_with_geosegs_message(session, scenes):
    nocrs = session["nocrs"]
    assert nocrs["error"] == ["QgsProcessingException", f"{scenes['nocrs']}: has no CRS; georeference it "
                              "(gdal_edit.py -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX"]
    assert nocrs["alive"] is False and nocrs["left"] == []
    assert not any("Traceback" in text for _, text in nocrs["log"])


def test_layers_that_are_not_files_are_refused(session):
    assert session["tiles_valid"] and session["sketch_valid"]
    assert session["tiles"]["error"] == [
        "QgsProcessingException", f"tiles: is a web map layer (WMS/WMTS/XYZ tiles), {NOT_A_FILE}"]
    assert session["sketch"]["error"] == [
        "QgsProcessingException", f"sketch: is a temporary scratch layer, {NOT_A_FILE}"]
    assert session["tiles"]["pid"] is None and session["sketch"]["pid"] is None  # refused before any process


def test_evaluate_rooftops_gives_geoseg_evaluates_metrics(session, scenes):
    ev = session["evaluate"]
    assert "error" not in ev, ev
    pred = session["work"] / "find" / "roofs.gpkg"
    assert _command(ev) == [sys.executable, "-m", "geoseg", "evaluate", "--pred", str(pred), "--truth",
                            str(scenes["roofs"]), "--json", "--progress", "json"]
    result = CliRunner().invoke(cli.cli, ["evaluate", "--pred", str(pred), "--truth", str(scenes["roofs"]), "--json"])
    assert result.exit_code == 0, result.output
    want = json.loads(result.stdout)
    rows = [[g, k, float(v)] for g in ("pixel", "object") for k, v in want[g].items() if not isinstance(v, bool)]
    assert ev["table"] == rows
    assert ev["results"]["PIXEL_IOU"] == want["pixel"]["iou"] and ev["results"]["OBJECT_F1"] == want["object"]["f1"]
    assert ["info", f"pixel iou: {want['pixel']['iou']:.4f}"] in ev["log"]


def test_train_passes_its_options_and_fails_with_geosegs_message(session, scenes):
    train = session["train"]
    out = session["work"] / "train"
    assert _command(train) == [sys.executable, "-m", "geoseg", "train", "--data", str(scenes["empty"]), "--out-dir",
                               str(out), "--config", "quickstart", "--set", "train.epochs=2", "--device", "cpu",
                               "--set", "data.chip_size=64", "--progress", "json"]
    result = CliRunner().invoke(cli.cli, ["train", "--data", str(scenes["empty"]), "--out-dir", str(out)])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert train["error"] == ["QgsProcessingException", result.output.strip()[len("Error: "):]]
    assert train["error"][1].startswith(f"{scenes['empty']}: is not a dataset folder; use one of the layouts")


def _qgis_process() -> str | None:
    found = shutil.which("qgis_process")
    if found is None:
        return None
    # Debian's qgis_process is a shell wrapper that adds --noversioncheck from /etc/default/qgis, which
    # qgis_process.bin (3.22) refuses ("Command --noversioncheck not known!"): call the binary beside it.
    binary = Path(found).with_name("qgis_process.bin")
    return str(binary) if binary.exists() else found


def _outside_venv(env: dict[str, str]) -> dict[str, str]:
    """``env`` without this virtual environment's folders on PATH: qgis_process's embedded Python
    finds its home through ``python3`` on PATH, and an activated venv (as in .ci/run) would give
    it the venv's interpreter and standard library instead of the system's (no ``qgis`` module)."""
    venv = Path(sys.prefix).resolve()
    keep = [p for p in env.get("PATH", "").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(venv)]
    return {**env, "PATH": os.pathsep.join(keep)}


def test_qgis_process_runs_find_rooftops(tmp_path, qgis_home, checkpoint, scenes, cli_prediction):
    missing = _qgis_missing()
    if missing:
        pytest.skip(missing)
    program = _qgis_process()
    if program is None:
        pytest.skip("qgis_process not installed (Debian package qgis: apt-get install qgis)")
    args = [f"{k}={v}" for k, v in FIND_OPTIONS.items()]
    run = subprocess.run(
        [program, "--json", "run", "geoseg:findrooftops", "--", f"INPUT={scenes['tiny']}", f"MODEL={checkpoint}",
         *args, f"OUTPUT={tmp_path / 'roofs.gpkg'}"],
        capture_output=True, text=True, env={**_outside_venv(_qgis_env()), "QGIS_CUSTOM_CONFIG_PATH": str(qgis_home)},
        timeout=SESSION_TIMEOUT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["results"]["OUTPUT"] == str(tmp_path / "roofs.gpkg")
    assert report["results"]["ROOFTOPS"] == len(gpd.read_file(tmp_path / "roofs.gpkg", layer="rooftops"))
    same_layer(tmp_path / "roofs.gpkg", cli_prediction / "roofs.gpkg")
    assert sorted(os.listdir(tmp_path)) == ["roofs.gpkg"]


# --- the runner, without QGIS ---------------------------------------------------------------------------------

class RecordingFeedback:
    """The QgsProcessingFeedback methods the runner calls, recorded."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.log: list[tuple[str, str]] = []
        self.progress: list[float] = []
        self.texts: list[str] = []
        self.canceled = False
        self.cancel_after = cancel_after

    def isCanceled(self) -> bool:  # noqa: N802
        return self.canceled

    def setProgress(self, value: float) -> None:  # noqa: N802
        self.progress.append(value)
        if self.cancel_after is not None and len(self.progress) >= self.cancel_after:
            self.canceled = True

    def setProgressText(self, text: str) -> None:  # noqa: N802
        self.texts.append(text)

    def __getattr__(self, name: str):
        if name.startswith("push"):
            return lambda text: self.log.append((name, text))
        raise AttributeError(name)


FAKE_GEOSEG = textwrap.dedent(
    r'''
    import json, signal, sys, time
    def say(**event):
        sys.stderr.write(json.dumps(event) + "\n"); sys.stderr.flush()
    def stop(signum, frame):
        sys.stderr.write("interrupted by SIGTERM; nothing was written\n"); sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    mode = sys.argv[1]
    print("hello from geoseg", flush=True)
    if mode == "ok":
        say(stage="predict", done=5, total=10, unit="chip", scene="a")
        sys.stderr.write("WARNING geoseg.x: a warning\n")
        say(stage="predict", done=10, total=10, unit="chip", scene="a")
        say(stage="done")
    elif mode == "fail":
        sys.stderr.write("Error: a.tif: has no CRS; pass --assume-crs EPSG:32633\n"); sys.exit(1)
    elif mode == "crash":
        sys.stderr.write("Traceback (most recent call last):\nRuntimeError: boom\n"); sys.exit(1)
    elif mode == "slow":
        say(stage="predict", done=1, total=100, unit="chip", scene="a")
        time.sleep(60)
    '''
)


@pytest.fixture
def fake_geoseg(tmp_path) -> list[str]:
    script = tmp_path / "fake_geoseg.py"
    script.write_text(FAKE_GEOSEG)
    return [sys.executable, str(script)]


def test_runner_turns_events_into_progress_and_log(fake_geoseg):
    fb = RecordingFeedback()
    assert runner.run_geoseg(["ok"], fb, command=fake_geoseg) == ["hello from geoseg"]
    assert fb.progress == [50.0, 100.0, 100.0]
    assert fb.texts == ["predict a: 5/10 chips", "predict a: 10/10 chips"]
    # stderr's lines in their order; stdout's line, read by another thread, somewhere among them
    assert [entry for entry in fb.log if entry[0] != "pushConsoleInfo"] == [
        ("pushCommandInfo", " ".join([*fake_geoseg, "ok"])), fb.log[1], ("pushInfo", "predict a: 10 chips"),
        ("pushWarning", "WARNING geoseg.x: a warning")]
    assert [entry for entry in fb.log if entry[0] == "pushConsoleInfo"] == [("pushConsoleInfo", "hello from geoseg")]
    assert fb.log[1][0] == "pushDebugInfo" and fb.log[1][1].startswith("geoseg process ")


def test_runner_error_is_geosegs_line(fake_geoseg):
    with pytest.raises(runner.GeosegRunError) as info:
        runner.run_geoseg(["fail"], RecordingFeedback(), command=fake_geoseg)
    assert str(info.value) == "a.tif: has no CRS; pass --assume-crs EPSG:32633"
    with pytest.raises(runner.GeosegRunError) as info:  # no Error: line: the last line said
        runner.run_geoseg(["crash"], RecordingFeedback(), command=fake_geoseg)
    assert str(info.value) == "RuntimeError: boom"
    with pytest.raises(runner.GeosegRunError) as info:
        runner.run_geoseg(["x"], RecordingFeedback(), command=["/nonexistent/python"])
    assert str(info.value) == ("cannot start /nonexistent/python (No such file or directory); in the environment "
                               "where geoseg is installed, run: geoseg qgis install")


def test_runner_cancel_sends_sigterm_and_waits(fake_geoseg):
    import time

    fb = RecordingFeedback(cancel_after=1)
    began = time.monotonic()
    with pytest.raises(runner.GeosegCanceled) as info:
        runner.run_geoseg(["slow"], fb, command=fake_geoseg)
    assert time.monotonic() - began < 20
    assert str(info.value) == "canceled: geoseg stopped (interrupted by SIGTERM; nothing was written)"
    pid = int(next(text for kind, text in fb.log if kind == "pushDebugInfo").split()[-1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_runner_finds_geoseg(tmp_path, monkeypatch):
    assert runner.geoseg_command(tmp_path, environ={"GEOSEG_PYTHON": "/x/python", "PATH": ""}) == [
        "/x/python", "-m", "geoseg"]
    with pytest.raises(runner.GeosegRunError) as info:
        runner.geoseg_command(tmp_path, environ={"PATH": str(tmp_path)})
    assert str(info.value) == runner.NO_ENVIRONMENT
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "geoseg"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert runner.geoseg_command(tmp_path, environ={"PATH": str(tmp_path / "bin")}) == [str(exe)]
    (tmp_path / "environment.json").write_text(json.dumps({"python": sys.executable}))
    assert runner.geoseg_command(tmp_path, environ={"PATH": str(tmp_path / "bin")}) == [sys.executable, "-m", "geoseg"]
    (tmp_path / "environment.json").write_text(json.dumps({"python": "/gone/python"}))
    with pytest.raises(runner.GeosegRunError) as info:
        runner.geoseg_command(tmp_path, environ={})
    assert str(info.value) == (f"{tmp_path / 'environment.json'}: names /gone/python, which does not exist any more; "
                               "in the environment where geoseg is installed, run: geoseg qgis install")
    env = runner.child_environment({"PYTHONPATH": "/q", "PYTHONHOME": "/q", "PROJ_LIB": "/q", "GDAL_DATA": "/q",
                                    "HOME": "/h"})
    assert env == {"HOME": "/h", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


def test_runner_reads_events():
    assert runner.parse_event('{"stage": "predict", "done": 1, "total": 4}') == {
        "stage": "predict", "done": 1, "total": 4}
    assert runner.parse_event("{not json") is None and runner.parse_event('{"done": 1}') is None
    assert runner.parse_event("Error: x") is None
    assert runner.percent({"stage": "evaluate", "done": 3, "total": 4}) == 75.0
    assert runner.percent({"stage": "train", "done": 5, "total": 10, "epoch": 2, "epochs": 4}) == 37.5
    assert runner.percent({"stage": "val", "done": 5, "total": 10, "epoch": 2, "epochs": 4}) is None
    assert runner.percent({"stage": "log", "message": "m", "epoch": 3, "epochs": 4}) == 75.0
    assert runner.percent({"stage": "log", "message": "m"}) is None
    assert runner.percent({"stage": "done"}) == 100.0
    assert runner.describe({"stage": "train", "done": 3, "total": 10, "unit": "batch", "epoch": 2, "epochs": 5}) == (
        "epoch 2/5 train: 3/10 batches")


# --- --progress json -----------------------------------------------------------------------------------------

def _events(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), stderr
    return [json.loads(line) for line in lines]


def test_predict_progress_json(tmp_path, monkeypatch):
    from _prediction_helpers import Oracle, oracle_meta

    stand_in_model(monkeypatch, Oracle(), oracle_meta(chip_size=64))
    scene = write_scene(tmp_path / "a.tif", draw_rectangles(150, 170, [(10, 10, 30, 40)]))
    result = CliRunner().invoke(cli.cli, ["predict", str(scene), "--out", str(tmp_path / "r.gpkg"), "--device", "cpu",
                                          "--precision", "32", "--batch-size", "4", "--progress", "json"])
    assert result.exit_code == 0, result.output
    events = _events(result.stderr)
    assert events[-1] == {"stage": "done"}
    chips = int(result.stdout.split(" chips in ")[0].rsplit(" ", 1)[-1])
    assert [e["done"] for e in events[:-1]] == list(range(4, chips, 4)) + [chips]
    assert all(e == {"stage": "predict", "done": e["done"], "total": chips, "unit": "chip", "scene": "a"}
               for e in events[:-1])


def test_evaluate_progress_json(tmp_path):
    from geoseg.raster_io import write_geotiff
    from _prediction_helpers import UTM, UTM_TRANSFORM

    label = draw_rectangles(60, 70, [(5, 5, 20, 20)])
    for name in ("pred", "truth"):
        write_geotiff(tmp_path / f"{name}.tif", label, crs=UTM, transform=UTM_TRANSFORM)
    result = CliRunner().invoke(cli.cli, ["evaluate", "--pred", str(tmp_path / "pred.tif"), "--truth",
                                          str(tmp_path / "truth.tif"), "--json", "--progress", "json"])
    assert result.exit_code == 0, result.output
    assert _events(result.stderr) == [{"stage": "evaluate", "done": 1, "total": 1, "unit": "block"}, {"stage": "done"}]
    assert json.loads(result.stdout)["pixel"]["iou"] == 1.0


def _fake_fit(config, *, resume, progress, config_file):
    from types import SimpleNamespace

    from geoseg.engine.loop import FitEvent

    progress(FitEvent(kind="start", epoch=1, epochs=1, message="training x on cpu"))
    for step in (1, 2):
        progress(FitEvent(kind="batch", epoch=1, epochs=1, stage="train", step=step, steps=2, loss=0.5, iou=0.25))
    progress(FitEvent(kind="batch", epoch=1, epochs=1, stage="val", step=1, steps=1, loss=float("nan"), iou=0.5))
    progress(FitEvent(kind="epoch", epoch=1, epochs=1, message="epoch 1/1 done"))
    out = Path(config.train.out_dir)
    return SimpleNamespace(best_metrics={}, out_dir=out, best_iou=out / "best_iou.pt", best_loss=out / "best_loss.pt",
                           last=out / "last.pt")


def test_train_progress_json_and_bars(tmp_path, monkeypatch):
    import geoseg.engine

    monkeypatch.setattr(geoseg.engine, "fit", _fake_fit)
    args = ["train", "--config", "quickstart", "--out-dir", str(tmp_path)]
    result = CliRunner().invoke(cli.cli, [*args, "--progress", "json"])
    assert result.exit_code == 0, result.output
    assert _events(result.stderr) == [
        {"stage": "log", "message": "training x on cpu"},
        {"stage": "train", "done": 1, "total": 2, "unit": "batch", "epoch": 1, "epochs": 1, "loss": 0.5, "iou": 0.25},
        {"stage": "train", "done": 2, "total": 2, "unit": "batch", "epoch": 1, "epochs": 1, "loss": 0.5, "iou": 0.25},
        {"stage": "val", "done": 1, "total": 1, "unit": "batch", "epoch": 1, "epochs": 1, "loss": None, "iou": 0.5},
        {"stage": "log", "message": "epoch 1/1 done", "epoch": 1, "epochs": 1},
        {"stage": "done"}]
    assert "training x on cpu" not in result.stdout
    bars = CliRunner().invoke(cli.cli, args)  # default: bars (hidden off a terminal), messages on stdout as before
    assert bars.exit_code == 0, bars.output
    assert bars.stdout.splitlines()[:2] == ["training x on cpu", "epoch 1/1 done"] and bars.stderr == ""


def test_json_progress_lines():
    stream = io.StringIO()
    reporter = JsonProgress(stream)
    reporter.update("predict", 3, 9, unit="chip", scene="a", skipped=None, ratio=float("inf"))
    reporter.message("hello", epoch=2)
    reporter.finish()
    assert stream.getvalue().splitlines() == [
        '{"stage": "predict", "done": 3, "total": 9, "unit": "chip", "scene": "a", "ratio": null}',
        '{"stage": "log", "message": "hello", "epoch": 2}', '{"stage": "done"}']


# --- geoseg qgis install / uninstall / package -----------------------------------------------------------------

@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "QGIS3" / "profiles" / "default").mkdir(parents=True)
    return tmp_path / "QGIS3"


def _shipped() -> list[str]:
    return sorted([p.name for p in PLUGIN_SOURCE.iterdir() if p.is_file() and p.suffix in (".py", ".txt", ".svg")]
                  + ["rooftops.qml"])


def test_install_copies_records_and_enables(home):
    env = {"QGIS_CUSTOM_CONFIG_PATH": str(home)}
    result = qgis("install", env=env)
    assert result.exit_code == 0, result.output
    profile = home / "profiles" / "default"
    plugin = profile / "python" / "plugins" / "geoseg"
    ini = profile / "QGIS" / "QGIS3.ini"
    python = os.path.abspath(sys.executable)
    assert result.stdout.splitlines() == [
        f"installed geoseg's QGIS plugin in {plugin}", f"it runs geoseg {geoseg.__version__} with {python}",
        f"enabled in {ini}; restart QGIS (if QGIS is open, it may turn this off when it closes: enable geoseg in "
        "Plugins > Manage and Install Plugins)",
        "algorithms: Processing > Toolbox > geoseg (Find rooftops, Evaluate rooftops, Train a rooftop model); "
        "qgis_process run geoseg:findrooftops"]
    assert files(profile) == sorted(["QGIS", "QGIS/QGIS3.ini", "python", "python/plugins", "python/plugins/geoseg",
                                     *(f"python/plugins/geoseg/{n}" for n in [*_shipped(), "environment.json"])])
    assert json.loads((plugin / "environment.json").read_text()) == {"python": python,
                                                                     "geoseg_version": geoseg.__version__}
    assert (plugin / "rooftops.qml").read_text() == default_style()
    assert (plugin / "runner.py").read_bytes() == (PLUGIN_SOURCE / "runner.py").read_bytes()
    assert ini.read_text() == "[PythonPlugins]\ngeoseg=true\n"
    # again: replaced whole, other settings untouched, no temporaries left
    ini.write_bytes(b"[General]\r\nfoo=bar\r\n[PythonPlugins]\r\nother=true\r\ngeoseg=false\r\n[Qgis]\r\nx=1\r\n")
    (plugin / "stale.py").write_text("")
    again = qgis("install", env=env)
    assert again.exit_code == 0 and again.stdout.startswith(f"replaced geoseg's QGIS plugin in {plugin}\n")
    assert ini.read_bytes() == (
        b"[General]\r\nfoo=bar\r\n[PythonPlugins]\r\nother=true\r\ngeoseg=true\r\n[Qgis]\r\nx=1\r\n")
    assert sorted(os.listdir(plugin)) == sorted([*_shipped(), "environment.json"])
    assert sorted(os.listdir(plugin.parent)) == ["geoseg"]


def test_install_records_another_python(home, tmp_path):
    # another name of this environment's python (python3 beside python): a venv's python is a link to the
    # base interpreter, so it is recorded as given, never resolved
    other = Path(sys.executable).with_name("python3" if Path(sys.executable).name != "python3" else "python")
    assert other.is_symlink() and other.exists()
    result = qgis("install", "--python", str(other), env={"QGIS_CUSTOM_CONFIG_PATH": str(home)})
    assert result.exit_code == 0, result.output
    record = home / "profiles" / "default" / "python" / "plugins" / "geoseg" / "environment.json"
    assert json.loads(record.read_text())["python"] == str(other)


@pytest.mark.parametrize("case", ["unknown profile", "no settings folder", "unwritable", "missing python",
                                  "python without geoseg"])
def test_install_refuses_bad_input_and_writes_nothing(home, tmp_path, case):
    env = {"QGIS_CUSTOM_CONFIG_PATH": str(home)}
    args, profile = [], home / "profiles" / "default"
    if case == "unknown profile":
        args = ["--profile", "work"]
        message = (f"{home / 'profiles' / 'work'}: no QGIS profile 'work' (profiles there: default); pass --profile "
                   "NAME of one of them, or start QGIS once with that profile (Settings > User Profiles > New Profile)")
    elif case == "no settings folder":
        env = {"QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "nothing")}
        message = (f"{tmp_path / 'nothing'}: is not a QGIS settings folder (QGIS makes it when it first starts); "
                   "start QGIS once, or set QGIS_CUSTOM_CONFIG_PATH to the folder your QGIS uses")
    elif case == "unwritable":
        (profile / "python").write_text("")  # a file where the plugins folder should be
        message = (f"{profile / 'python' / 'plugins'}: cannot be written ({profile / 'python'} is a file, not a "
                   "folder); check its permissions, or pass another --profile")
    elif case == "missing python":
        args = ["--python", str(tmp_path / "nope" / "python")]
        message = (f"{tmp_path / 'nope' / 'python'}: does not exist; pass --python the python of the environment "
                   "where geoseg is installed (e.g. .venv/bin/python)")
    else:
        other = tmp_path / "other-python"  # a Python without geoseg
        other.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'geoseg'\" >&2\nexit 1\n")
        other.chmod(0o755)
        args = ["--python", str(other)]
        message = (f"{other}: cannot import geoseg (ModuleNotFoundError: No module named 'geoseg'); pass "
                   "--python the python of the environment where geoseg is installed (e.g. .venv/bin/python)")
    before = files(home)
    result = qgis("install", *args, env=env)
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
    assert files(home) == before and not (tmp_path / "nothing").exists()


def test_uninstall_removes_plugin_and_setting(home):
    env = {"QGIS_CUSTOM_CONFIG_PATH": str(home)}
    assert qgis("install", env=env).exit_code == 0
    profile = home / "profiles" / "default"
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.write_text("[PythonPlugins]\nother=true\ngeoseg=true\n")
    result = qgis("uninstall", env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"removed {profile / 'python' / 'plugins' / 'geoseg'}; restart QGIS\n"
    assert os.listdir(profile / "python" / "plugins") == []
    assert ini.read_text() == "[PythonPlugins]\nother=true\n"
    again = qgis("uninstall", env=env)
    assert again.exit_code == 1 and again.output == (
        f"Error: {profile / 'python' / 'plugins' / 'geoseg'}: geoseg's plugin is not installed in QGIS profile "
        "'default'; pass --profile NAME of the profile it was installed in\n")


def test_package_zips_the_plugin(tmp_path):
    out = tmp_path / "geoseg.zip"
    result = qgis("package", "--out", str(out), env={})
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == [f"geoseg/{n}" for n in _shipped()]
        metadata = zf.read("geoseg/metadata.txt").decode()
    assert f"\nversion={geoseg.__version__}\n" in metadata
    assert os.listdir(tmp_path) == ["geoseg.zip"]
    again = qgis("package", "--out", str(out), env={})
    assert again.exit_code == 1 and again.output == f"Error: {out}: already exists; pass --overwrite to replace it\n"
    assert qgis("package", "--out", str(out), "--overwrite", env={}).exit_code == 0
    bad = qgis("package", "--out", str(tmp_path / "geoseg.tar"), env={})
    assert bad.exit_code == 1 and bad.output == (
        f"Error: {tmp_path / 'geoseg.tar'}: should end in .zip; QGIS's plugin manager installs zip files: "
        "pass --out geoseg.zip\n")


def test_settings_folder_per_platform(tmp_path):
    home = Path("/home/u")
    f = qgis_install.qgis_settings_dir
    assert f(environ={}, platform="linux", home=home) == home / ".local/share/QGIS/QGIS3"
    assert f(environ={"XDG_DATA_HOME": "/data"}, platform="linux", home=home) == Path("/data/QGIS/QGIS3")
    assert f(environ={}, platform="darwin", home=home) == home / "Library/Application Support/QGIS/QGIS3"
    assert f(environ={"APPDATA": "C:/Users/u/AppData/Roaming"}, platform="win32", home=home) == Path(
        "C:/Users/u/AppData/Roaming/QGIS/QGIS3")
    assert f(environ={"QGIS_CUSTOM_CONFIG_PATH": "/custom", "APPDATA": "x"}, platform="win32", home=home) == Path(
        "/custom")


def test_enable_in_settings_changes_one_line():
    enable = qgis_install.set_plugin_enabled
    assert enable("", True) == "[PythonPlugins]\ngeoseg=true\n"
    assert enable("[General]\na=1", True) == "[General]\na=1\n\n[PythonPlugins]\ngeoseg=true\n"
    assert enable("[PythonPlugins]\ngeoseg=false\ngeoseg=true\nx=1\n", True) == "[PythonPlugins]\ngeoseg=true\nx=1\n"
    assert enable("[PythonPlugins]\nx=1\n[B]\ngeoseg=1\n", None) == "[PythonPlugins]\nx=1\n[B]\ngeoseg=1\n"
    assert enable("[PythonPlugins]\ngeoseg2=true\n", True) == "[PythonPlugins]\ngeoseg=true\ngeoseg2=true\n"


def test_plugin_metadata_and_package_data():
    meta = ConfigParser()
    meta.read(PLUGIN_SOURCE / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    assert (general["name"], general["qgisMinimumVersion"], general["hasProcessingProvider"], general["version"]) == (
        "geoseg", "3.22", "yes", geoseg.__version__)
    assert (PLUGIN_SOURCE / general["icon"]).is_file()
    setup = ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "geoseg.qgis_plugin" in setup["options"]["packages"].split()
    patterns = [p.strip() for p in setup["options.package_data"]["geoseg.qgis_plugin"].split(",")]
    data = [p.name for p in PLUGIN_SOURCE.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data and all(any(fnmatch(name, pat) for pat in patterns) for name in data), (data, patterns)
    # QGIS's Python never imports geoseg or torch: the plugin stands alone.
    for source in PLUGIN_SOURCE.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source.read_text(), re.M)
        assert not [m for m in imports if m.split(".")[0] in ("geoseg", "torch", "cli")], (source, imports)
