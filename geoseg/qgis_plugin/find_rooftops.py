"""geoseg:findrooftops: ``geoseg predict`` on one raster layer or file, rooftops loaded styled."""

from __future__ import annotations

import math
import re
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
)

from .algorithm import DEVICES, RASTER_EXTENSIONS, VECTOR_EXTENSIONS, GeosegAlgorithm, advanced, number_text
from .layers import MaskStyler, RooftopsStyler, layer_file, style_on_load

#: geoseg predict's --precision values offered (auto first: geoseg's default).
PRECISIONS = ("auto", "32", "bf16", "int8")
#: geoseg predict's last line: "wrote N polygons to PATH".
_WROTE = re.compile(r"^wrote (\d+) polygons to ")
#: The Ground resolution parameter's text for geoseg's default (``--resolution auto``).
AUTO_RESOLUTION = "auto"


def resolution_argument(text: str) -> str | None:
    """``--resolution``'s value for the Ground resolution parameter's text; None for geoseg's default (auto).

    geoseg checks it again (geoseg/resample.py ``parse_resolution`` owns the rule); this copy exists
    because QGIS's Python cannot import geoseg, and a bad value should be refused in the dialog,
    before geoseg starts, in words about the parameter rather than ``--resolution``.

    Raises:
        QgsProcessingException: Not auto, native or ground metres per pixel above 0 (empty is auto).
    """
    value = text.strip().lower()
    if value in ("", AUTO_RESOLUTION):
        return None
    if value == "native":
        return value
    try:
        metres = float(value)
    except ValueError:
        metres = math.nan
    if not math.isfinite(metres) or metres <= 0:
        raise QgsProcessingException(f"Ground resolution should be auto, native or metres per pixel above 0 "
                                     f"(e.g. 0.3), got {text!r}")
    return number_text(metres)


class FindRooftops(GeosegAlgorithm):
    """Find rooftops in a scene with a geoseg checkpoint: ``geoseg predict`` with these options."""

    INPUT, MODEL, THRESHOLD, MIN_AREA, SIMPLIFY = "INPUT", "MODEL", "THRESHOLD", "MIN_AREA", "SIMPLIFY"
    REGULARIZE, TTA, OVERLAP, DEVICE = "REGULARIZE", "TTA", "OVERLAP", "DEVICE"
    AOI, PRECISION, RESOLUTION, BANDS = "AOI", "PRECISION", "RESOLUTION", "BANDS"
    OUTPUT, MASK, PROBABILITY, ROOFTOPS = "OUTPUT", "MASK", "PROBABILITY", "ROOFTOPS"

    def name(self) -> str:
        return "findrooftops"

    def displayName(self) -> str:  # noqa: N802 (QGIS's names)
        return "Find rooftops"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Finds the rooftops in a scene (a GeoTIFF on this computer) with a geoseg model and writes "
                "them as polygons in the scene's CRS, styled as roof outlines, with optional class-mask and "
                "probability rasters. Runs geoseg predict of the Python environment recorded by "
                "'geoseg qgis install' in a separate process: QGIS stays responsive, Cancel stops it and "
                "leaves no output behind. Empty optional values take geoseg's defaults. Web, memory and "
                "virtual layers are refused: save them as a GeoTIFF first.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Scene (raster layer or file)"))
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, "Model checkpoint (geoseg train's best_iou.pt)", QgsProcessingParameterFile.File,
            fileFilter="geoseg checkpoints (*.pt);;All files (*.*)"))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.AOI, "Area of interest (predict only inside it; empty: the whole scene)",
            [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, "Rooftop probability threshold (empty: geoseg's default, 0.5)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.MIN_AREA, "Smallest rooftop in m² (empty: geoseg's default)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.SIMPLIFY, "Simplification tolerance in metres, 0 for none (empty: geoseg's default)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0))
        self.addParameter(QgsProcessingParameterBoolean(
            self.REGULARIZE, "Square the outlines to their main directions (regularise)", defaultValue=False))
        self.addParameter(QgsProcessingParameterBoolean(
            self.TTA, "Test-time augmentation (average flipped chips; slower)", defaultValue=False))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.OVERLAP, "Overlap between chips in pixels (empty: a quarter of a chip)",
            QgsProcessingParameterNumber.Integer, optional=True, minValue=0)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            self.DEVICE, "Device (auto: a GPU when the environment has one)", options=DEVICES, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            self.PRECISION, "Precision (auto: bf16 where the CPU/GPU has it; int8: quantised, CPU only)",
            options=PRECISIONS, defaultValue=0)))
        # One text field, as the command line's one option: auto, native or metres typed the same way
        # (also in qgis_process and the modeller). An enum (auto/native/metres) plus a number would be two
        # fields that can disagree (metres without a number, a number with auto); checkParameterValues
        # refuses a bad text before anything runs, and the dialog shows its message.
        self.addParameter(advanced(QgsProcessingParameterString(
            self.RESOLUTION, "Ground resolution the model reads the scene at: auto (the model's, when the "
            "scene's differs by more than 5%), native (the scene's own) or metres per pixel, e.g. 0.3",
            defaultValue=AUTO_RESOLUTION, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterString(
            self.BANDS, "Scene bands for the model, by number and/or name, e.g. 1,2,3 or red,green,blue "
            "(empty: the model's)", optional=True)))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, "Rooftops", QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.MASK, "Rooftop mask (0 background, 1 rooftop, 255 nodata)", optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.PROBABILITY, "Rooftop probability (value/254, 255 nodata)", optional=True,
            createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(self.ROOFTOPS, "Number of rooftops"))

    def command(self, parameters: dict[str, Any], context: QgsProcessingContext) -> tuple[list[str], dict[str, Any]]:
        """The ``geoseg predict`` arguments for ``parameters``, and the outputs they write."""
        scene = layer_file(self.parameterAsRasterLayer(parameters, self.INPUT, context))
        model = self.parameterAsFile(parameters, self.MODEL, context)
        out = self.output_file(parameters, self.OUTPUT, context, VECTOR_EXTENSIONS)
        mask = self.output_file(parameters, self.MASK, context, RASTER_EXTENSIONS)
        prob = self.output_file(parameters, self.PROBABILITY, context, RASTER_EXTENSIONS)
        args = ["predict", scene, "--model", model, "--out", out]
        for name, option in ((self.THRESHOLD, "--threshold"), (self.MIN_AREA, "--min-area"),
                             (self.SIMPLIFY, "--simplify")):
            if self.is_set(parameters, name):
                args += [option, number_text(self.parameterAsDouble(parameters, name, context))]
        if self.is_set(parameters, self.OVERLAP):
            args += ["--overlap", str(self.parameterAsInt(parameters, self.OVERLAP, context))]
        if self.parameterAsBool(parameters, self.REGULARIZE, context):
            args.append("--regularize")
        if self.parameterAsBool(parameters, self.TTA, context):
            args.append("--tta")
        args += ["--device", DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]]
        precision = PRECISIONS[self.parameterAsEnum(parameters, self.PRECISION, context)]
        if precision != "auto":
            args += ["--precision", precision]
        resolution = resolution_argument(self.parameterAsString(parameters, self.RESOLUTION, context))
        if resolution is not None:
            args += ["--resolution", resolution]
        bands = self.parameterAsString(parameters, self.BANDS, context).strip()
        if bands:
            args += ["--bands", bands]
        aoi = self.parameterAsVectorLayer(parameters, self.AOI, context) if self.is_set(parameters, self.AOI) else None
        if aoi is not None:
            args += ["--aoi", layer_file(aoi)]
        if mask:
            args += ["--mask-out", mask]
        if prob:
            args += ["--prob-out", prob]
        # A Processing output replaces the file chosen for it, as every QGIS algorithm does.
        args.append("--overwrite")
        return args, {self.OUTPUT: out, self.MASK: mask, self.PROBABILITY: prob}

    def checkParameterValues(self, parameters: dict[str, Any],  # noqa: N802
                             context: QgsProcessingContext) -> tuple[bool, str]:
        """QGIS's checks, then the ground resolution's (the dialog shows the message; nothing runs)."""
        ok, message = super().checkParameterValues(parameters, context)
        if ok:
            try:
                resolution_argument(self.parameterAsString(parameters, self.RESOLUTION, context))
            except QgsProcessingException as exc:
                return False, str(exc)
        return ok, message

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        args, outputs = self.command(parameters, context)
        stdout = self.run_geoseg(args, feedback)
        counts = [int(m.group(1)) for m in map(_WROTE.match, stdout) if m]
        style_on_load(context, outputs[self.OUTPUT], RooftopsStyler.create())
        if outputs[self.MASK]:
            style_on_load(context, outputs[self.MASK], MaskStyler.create())
        return {**outputs, self.ROOFTOPS: counts[-1] if counts else None}
