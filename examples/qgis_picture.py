"""Draw the README's QGIS picture: geoseg's plugin finds the rooftops of a generated scene, QGIS renders them.

    geoseg quickstart --dir geoseg-quickstart          # trains the model (a few minutes on a CPU)
    python examples/qgis_picture.py --model geoseg-quickstart/model/best_iou.pt --out docs/qgis.png

Installs the plugin (``geoseg qgis install``) into a temporary QGIS settings folder,
then, in QGIS's own Python (``/usr/bin/python3`` with Debian's python3-qgis,
offscreen), runs ``processing.run("geoseg:findrooftops", ...)`` as the Toolbox does
(results loaded with geoseg's styles) and renders the rooftops and the mask over
the scene with ``QgsMapRendererParallelJob``. The PNG is reduced to 256 colours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"

QGIS_SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings,
                           QgsProcessingOutputLayerDefinition, QgsProject, QgsRasterLayer)
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    plan = json.loads(sys.argv[1])
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    Processing.initialize()
    import processing
    import qgis.utils
    from processing.gui.Postprocessing import handleAlgorithmResults

    qgis.utils.plugin_paths = [plan["plugins"]]
    sys.path.insert(0, plan["plugins"])
    qgis.utils.updateAvailablePlugins()
    qgis.utils.loadPlugin("geoseg")
    qgis.utils.startProcessingPlugin("geoseg")
    project = QgsProject.instance()
    processing.run("geoseg:findrooftops", {
        "INPUT": plan["scene"], "MODEL": plan["model"],
        "OUTPUT": QgsProcessingOutputLayerDefinition(plan["roofs"], project),
        "MASK": QgsProcessingOutputLayerDefinition(plan["mask"], project)}, onFinish=handleAlgorithmResults)
    layers = {layer.source(): layer for layer in project.mapLayers().values()}
    roofs, mask = layers[plan["roofs"]], layers[plan["mask"]]
    mask.setOpacity(0.35)
    scene = QgsRasterLayer(plan["scene"], "scene")
    settings = QgsMapSettings()
    settings.setLayers([roofs, mask, scene])
    settings.setDestinationCrs(scene.crs())
    settings.setExtent(scene.extent())
    settings.setOutputSize(QSize(scene.width(), scene.height()))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(plan["png"], "PNG")
    del roofs, mask, scene, layers
    project.clear()
    app.exitQgis()
    '''
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A geoseg checkpoint (the quickstart's best_iou.pt).")
    parser.add_argument("--out", default="docs/qgis.png", help="The PNG to write.")
    parser.add_argument("--size", default="560x360", help="Scene size in pixels, WxH.")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    from PIL import Image

    from geoseg.qgis_install import install_plugin
    from geoseg.synthetic import make_scene

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene = make_scene(work, name="scene", width=width, height=height, seed=args.seed, resolution=0.3,
                           terraces=0.3)
        (work / "qgis" / "profiles" / "default").mkdir(parents=True)
        os.environ["QGIS_CUSTOM_CONFIG_PATH"] = str(work / "qgis")
        install_plugin()
        plan = {"plugins": str(work / "qgis" / "profiles" / "default" / "python" / "plugins"),
                "scene": str(scene.image), "model": str(Path(args.model).resolve()),
                "roofs": str(work / "roofs.gpkg"), "mask": str(work / "mask.tif"), "png": str(work / "map.png")}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["QT_QPA_PLATFORM"] = "offscreen"
        subprocess.run([SYSTEM_PYTHON, "-c", QGIS_SCRIPT, json.dumps(plan)], env=env, check=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(work / "map.png").convert("RGB").quantize(256).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
