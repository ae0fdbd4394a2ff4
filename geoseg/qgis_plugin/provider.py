"""The "geoseg" Processing provider: Find rooftops, Evaluate rooftops, Train a rooftop model."""

from __future__ import annotations

import configparser

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithm import PLUGIN_DIR, RASTER_EXTENSIONS, VECTOR_EXTENSIONS
from .evaluate_rooftops import EvaluateRooftops
from .find_rooftops import FindRooftops
from .train_model import TrainModel


def plugin_version() -> str:
    """The version in metadata.txt (geoseg's, written by ``geoseg qgis install``)."""
    parser = configparser.ConfigParser()
    parser.read(PLUGIN_DIR / "metadata.txt", encoding="utf-8")
    return parser.get("general", "version", fallback="")


class GeosegProvider(QgsProcessingProvider):
    """geoseg's algorithms; outputs are files only (geoseg writes files)."""

    def id(self) -> str:
        return "geoseg"

    def name(self) -> str:
        return "geoseg"

    def longName(self) -> str:  # noqa: N802 (QGIS's names below too)
        return f"geoseg {plugin_version()}".strip()

    def icon(self) -> QIcon:
        return QIcon(str(PLUGIN_DIR / "icon.svg"))

    def loadAlgorithms(self) -> None:
        for algorithm in (FindRooftops(), EvaluateRooftops(), TrainModel()):
            self.addAlgorithm(algorithm)

    def supportsNonFileBasedOutput(self) -> bool:
        return False

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:
        return "gpkg"

    def defaultRasterFileExtension(self) -> str:
        return "tif"

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return list(VECTOR_EXTENSIONS)

    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        return list(RASTER_EXTENSIONS)
