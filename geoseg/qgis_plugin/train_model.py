"""geoseg:trainmodel: ``geoseg train`` on a data folder, with epochs as progress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from .algorithm import DEVICES, GeosegAlgorithm, advanced

#: The checkpoint geoseg train keeps for prediction (the best validation IoU).
BEST_MODEL = "best_iou.pt"


class TrainModel(GeosegAlgorithm):
    """Train a rooftop model: ``geoseg train --data FOLDER --config PRESET --out-dir OUTPUT``."""

    DATA, CONFIG, EPOCHS, DEVICE, SETTINGS, OUTPUT, MODEL = (
        "DATA", "CONFIG", "EPOCHS", "DEVICE", "SETTINGS", "OUTPUT", "MODEL")

    def name(self) -> str:
        return "trainmodel"

    def displayName(self) -> str:  # noqa: N802 (QGIS's names)
        return "Train a rooftop model"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Trains a rooftop segmentation model on a data folder (images/ and labels/, or the seed "
                "layout, or images with one buildings.gpkg: see geoseg's README) with a preset of geoseg's "
                "configs/ folder (e.g. quickstart, oam_cpu) or a YAML file. Writes best_iou.pt "
                "(the model for Find rooftops), last.pt, history.csv and learning_curves.png into the output "
                "folder. Runs geoseg train in a separate process; Cancel keeps last.pt of the last finished "
                "epoch. Use a GPU environment (geoseg qgis install --python) for real data.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(
            self.DATA, "Training data folder", QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterString(
            self.CONFIG, "Preset name or config YAML file (empty: default)", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.EPOCHS, "Epochs (empty: the preset's)", QgsProcessingParameterNumber.Integer, optional=True,
            minValue=1))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            self.DEVICE, "Device (auto: a GPU when the environment has one)", options=DEVICES, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterString(
            self.SETTINGS, "More settings, one KEY=VALUE per line (as geoseg train --set, e.g. "
            "model.encoder=resnet18)", multiLine=True, optional=True)))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, "Output folder"))
        self.addOutput(QgsProcessingOutputFile(self.MODEL, "Model checkpoint (best_iou.pt)"))

    def command(self, parameters: dict[str, Any], context: QgsProcessingContext) -> tuple[list[str], str]:
        """The ``geoseg train`` arguments for ``parameters``, and the output folder."""
        data = self.parameterAsFile(parameters, self.DATA, context)
        out_dir = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        args = ["train", "--data", data, "--out-dir", out_dir]
        preset = self.parameterAsString(parameters, self.CONFIG, context).strip()
        if preset:
            args += ["--config", preset]
        if self.is_set(parameters, self.EPOCHS):
            args += ["--set", f"train.epochs={self.parameterAsInt(parameters, self.EPOCHS, context)}"]
        args += ["--device", DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]]
        for line in self.parameterAsString(parameters, self.SETTINGS, context).splitlines():
            if line.strip():
                args += ["--set", line.strip()]
        return args, out_dir

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        args, out_dir = self.command(parameters, context)
        self.run_geoseg(args, feedback)
        return {self.OUTPUT: out_dir, self.MODEL: str(Path(out_dir) / BEST_MODEL)}
