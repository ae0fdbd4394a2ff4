"""What the geoseg algorithms share: running geoseg, optional parameters, output paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
)

from .runner import GeosegRunError, geoseg_command, run_geoseg

PLUGIN_DIR = Path(__file__).resolve().parent
#: ``--device`` choices, in the order of the Device parameter's options.
DEVICES = ["auto", "cpu", "cuda"]
#: Output formats geoseg writes (geoseg/export.py: the extension picks the format; rasters are GeoTIFFs).
VECTOR_EXTENSIONS = ["gpkg", "geojson", "fgb", "shp"]
RASTER_EXTENSIONS = ["tif"]


def advanced(parameter: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """``parameter``, shown under "Advanced parameters"."""
    parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return parameter


def number_text(value: float) -> str:
    """A number as geoseg's command line reads it back exactly (``0.25``, ``4.0``)."""
    return repr(float(value))


class GeosegAlgorithm(QgsProcessingAlgorithm):
    """A Processing algorithm that runs one geoseg command in a subprocess."""

    def createInstance(self) -> "GeosegAlgorithm":  # noqa: N802 (QGIS's names)
        return type(self)()

    def helpUrl(self) -> str:  # noqa: N802
        return ""

    def is_set(self, parameters: dict[str, Any], name: str) -> bool:
        """Whether an optional parameter has a value (else geoseg's own default applies)."""
        value = parameters.get(name)
        return value is not None and value != ""

    def output_file(self, parameters: dict[str, Any], name: str, context: QgsProcessingContext,
                    extensions: list[str]) -> str | None:
        """The file chosen for output ``name`` (None when skipped).

        Raises:
            QgsProcessingException: Not a file with one of ``extensions`` (geoseg writes files).
        """
        path = self.parameterAsOutputLayer(parameters, name, context)
        if not path:
            return None
        if Path(path).suffix.lower().lstrip(".") not in extensions:
            raise QgsProcessingException(
                f"{path}: {self.parameterDefinition(name).description()} should be a file ending in "
                + " or ".join(f".{e}" for e in extensions) + " (geoseg writes files only)")
        return path

    def run_geoseg(self, args: list[str], feedback: QgsProcessingFeedback) -> list[str]:
        """Run ``geoseg ARGS --progress json`` in the recorded environment; return its stdout lines.

        Raises:
            QgsProcessingException: geoseg's one-line error, or the cancel.
        """
        try:
            return run_geoseg([*args, "--progress", "json"], feedback, command=geoseg_command(PLUGIN_DIR))
        except GeosegRunError as exc:
            raise QgsProcessingException(str(exc)) from None
