"""geoseg:evaluaterooftops: ``geoseg evaluate --json`` of two layers, as a table and in the log."""

from __future__ import annotations

import json
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from .algorithm import GeosegAlgorithm, advanced, number_text
from .layers import layer_file

#: (JSON group, key, output name) of the metrics also given as numeric outputs (for the modeller).
NUMBERS = (("pixel", "iou", "PIXEL_IOU"), ("pixel", "f1", "PIXEL_F1"), ("object", "precision", "OBJECT_PRECISION"),
           ("object", "recall", "OBJECT_RECALL"), ("object", "f1", "OBJECT_F1"))


class EvaluateRooftops(GeosegAlgorithm):
    """Pixel and object (SpaceNet) metrics of predicted rooftops against the truth."""

    PRED, TRUTH, AOI, IOU_THRESHOLD, OUTPUT = "PRED", "TRUTH", "AOI", "IOU_THRESHOLD", "OUTPUT"

    def name(self) -> str:
        return "evaluaterooftops"

    def displayName(self) -> str:  # noqa: N802 (QGIS's names)
        return "Evaluate rooftops"

    def shortHelpString(self) -> str:  # noqa: N802
        return ("Compares predicted rooftops (geoseg's rooftops layer or mask) with the true buildings (a "
                "polygon layer or mask, any CRS): pixel metrics (rooftop IoU, precision, recall, F1) and object "
                "metrics (SpaceNet one-to-one matching at IoU >= 0.5), as a table and in the log. Runs "
                "geoseg evaluate in a separate process. Layers must be files on this computer.")

    def initAlgorithm(self, config: Any = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterMapLayer(
            self.PRED, "Predicted rooftops (polygon layer or mask raster)"))
        self.addParameter(QgsProcessingParameterMapLayer(
            self.TRUTH, "True buildings (polygon layer or mask raster)"))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.AOI, "Area of interest (evaluate only inside it)", [QgsProcessing.TypeVectorPolygon],
            optional=True))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            self.IOU_THRESHOLD, "IoU a predicted and a true building need to match (empty: geoseg's default, 0.5)",
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0)))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Metrics", QgsProcessing.TypeVector))
        for group, key, name in NUMBERS:
            self.addOutput(QgsProcessingOutputNumber(name, f"{group} {key}"))

    def command(self, parameters: dict[str, Any], context: QgsProcessingContext) -> list[str]:
        """The ``geoseg evaluate`` arguments for ``parameters``."""
        args = ["evaluate", "--pred", layer_file(self.parameterAsLayer(parameters, self.PRED, context)),
                "--truth", layer_file(self.parameterAsLayer(parameters, self.TRUTH, context))]
        aoi = self.parameterAsVectorLayer(parameters, self.AOI, context) if self.is_set(parameters, self.AOI) else None
        if aoi is not None:
            args += ["--aoi", layer_file(aoi)]
        if self.is_set(parameters, self.IOU_THRESHOLD):
            args += ["--iou-threshold", number_text(self.parameterAsDouble(parameters, self.IOU_THRESHOLD, context))]
        return [*args, "--json"]

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        stdout = self.run_geoseg(self.command(parameters, context), feedback)
        try:
            result = json.loads("\n".join(stdout))
        except ValueError:
            raise QgsProcessingException("geoseg evaluate did not print its metrics as JSON") from None
        fields = QgsFields()
        fields.append(QgsField("group", QVariant.String))
        fields.append(QgsField("metric", QVariant.String))
        fields.append(QgsField("value", QVariant.Double))
        sink, dest = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.NoGeometry,
                                          QgsCoordinateReferenceSystem())
        for group in ("pixel", "object"):
            for key, value in result[group].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    feature = QgsFeature(fields)
                    feature.setAttributes([group, key, float(value)])
                    sink.addFeature(feature, QgsFeatureSink.FastInsert)
                    feedback.pushInfo(f"{group} {key}: {value:.4f}" if isinstance(value, float)
                                      else f"{group} {key}: {value}")
        for warning in result.get("warnings", []):
            feedback.pushWarning(str(warning))
        return {self.OUTPUT: dest, **{name: result[group][key] for group, key, name in NUMBERS}}
