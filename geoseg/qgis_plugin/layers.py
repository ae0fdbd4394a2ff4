"""Layers in and out of the geoseg algorithms: local files only in, geoseg's styles on what comes out.

geoseg reads files, so an input layer must be a file on this computer, read
whole: a web layer (WMS, XYZ, WCS, WFS), a memory or virtual layer, a database
table, a ``/vsicurl/`` URL or a filtered layer is refused with one line that
says how to make a file of it (Export ▸ Save As...). Exporting such a layer
automatically would silently fetch and write a whole web layer at some
resolution; the user should choose the extent and resolution, so this first
version refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

from qgis.core import (
    QgsDataProvider,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

#: The layer ``geoseg predict`` writes into a GeoPackage, which geoseg reads first from a file that has it.
ROOFTOPS_LAYER = "rooftops"
#: The style file ``geoseg qgis install`` copies beside the plugin (geoseg/rooftops.qml), for non-GeoPackage outputs.
ROOFTOPS_QML = "rooftops.qml"
#: The mask's classes: (value, colour, label); other values (255, nodata) are not drawn.
MASK_CLASSES = ((0, "#2b2b2b", "background"), (1, "#ffdd00", "rooftop"))
#: Providers of a layer that may be a local file.
FILE_PROVIDERS = {"gdal": "raster", "ogr": "vector"}
_KINDS = {"wms": "a web map layer (WMS/WMTS/XYZ tiles)", "wcs": "a web coverage layer (WCS)",
          "wfs": "a web feature layer (WFS)", "memory": "a temporary scratch layer",
          "virtual": "a virtual layer", "virtualraster": "a virtual raster layer",
          "postgres": "a database table", "spatialite": "a database table", "mssql": "a database table",
          "oracle": "a database table", "arcgismapserver": "a web map layer (ArcGIS)",
          "arcgisfeatureserver": "a web feature layer (ArcGIS)", "vectortile": "a vector tile layer",
          "delimitedtext": "a delimited text layer"}


def not_a_file(layer: QgsMapLayer, what: str) -> QgsProcessingException:
    """The refusal of a layer that is not a local file."""
    return QgsProcessingException(
        f"{layer.name()}: is {what}, not a file on this computer; geoseg reads raster and vector files only: "
        "save the layer as a file (right-click the layer > Export > Save As...) and run on that file")


def layer_file(layer: QgsMapLayer) -> str:
    """The local file behind ``layer``, which geoseg reads whole.

    Raises:
        QgsProcessingException: A layer that is not a local file (see the module), a
            filtered layer, or a layer of a multi-layer file that geoseg would not read.
    """
    provider = layer.providerType()
    if provider not in FILE_PROVIDERS:
        raise not_a_file(layer, _KINDS.get(provider, f"a '{provider}' layer"))
    parts = QgsProviderRegistry.instance().decodeUri(provider, layer.source())
    path = parts.get("path") or ""
    if not path or path.startswith("/vsi") or not os.path.isfile(path):
        raise not_a_file(layer, f"read from {path or layer.source()}")
    if isinstance(layer, QgsVectorLayer) and layer.subsetString():
        raise QgsProcessingException(
            f"{layer.name()}: has a filter ({layer.subsetString()}), which geoseg would not see (it reads "
            "the whole file); remove the filter, or save the filtered features as a file and run on that")
    sublayer = parts.get("layerName") or None
    if isinstance(layer, QgsRasterLayer) and sublayer:
        raise not_a_file(layer, f"the raster table '{sublayer}' of {path}")
    layer_id = parts.get("layerId")
    if isinstance(layer, QgsVectorLayer) and (sublayer or layer_id not in (None, "")):
        names = geometry_layers(path)
        if not sublayer:
            index = int(layer_id)
            sublayer = names[index] if 0 <= index < len(names) else str(layer_id)
        read = ROOFTOPS_LAYER if ROOFTOPS_LAYER in names else (names[0] if names else sublayer)
        if sublayer != read:
            raise QgsProcessingException(
                f"{layer.name()}: is the layer '{sublayer}' of {path}, but geoseg reads '{read}' from that "
                "file; save the layer as a file of its own and run on that")
    return str(Path(path))


def geometry_layers(path: str) -> list[str]:
    """Names of the layers with geometry in a vector file, in the file's order."""
    probe = QgsVectorLayer(path, "probe", "ogr")
    names = []
    for item in probe.dataProvider().subLayers() if probe.isValid() else []:
        fields = item.split(QgsDataProvider.SUBLAYER_SEPARATOR)
        if len(fields) >= 4 and fields[3] not in ("NoGeometry", "None", ""):
            names.append(fields[1])
    return names


def style_mask(layer: QgsRasterLayer) -> None:
    """Two colours for the class mask (background, rooftop); nodata (255) and other values transparent."""
    provider = layer.dataProvider()
    provider.setUseSourceNoDataValue(1, True)
    classes = [QgsPalettedRasterRenderer.Class(value, QColor(colour), label) for value, colour, label in MASK_CLASSES]
    layer.setRenderer(QgsPalettedRasterRenderer(provider, 1, classes))
    layer.triggerRepaint()


def style_rooftops(layer: QgsVectorLayer) -> bool:
    """geoseg's rooftop style: the GeoPackage's default style (``layer_styles``), else the plugin's copy.

    Returns:
        Whether a geoseg style was applied.
    """
    _, ok = layer.loadDefaultStyle()
    if not ok:
        qml = Path(__file__).with_name(ROOFTOPS_QML)
        if qml.is_file():
            _, ok = layer.loadNamedStyle(str(qml))
    layer.triggerRepaint()
    return bool(ok)


class RooftopsStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles the rooftops layer when Processing adds it to the map."""

    instance: "RooftopsStyler | None" = None

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext, feedback: object) -> None:
        if isinstance(layer, QgsVectorLayer):
            style_rooftops(layer)

    @staticmethod
    def create() -> "RooftopsStyler":
        # Processing keeps a plain pointer: Python must hold the object (QGIS's documented pattern).
        RooftopsStyler.instance = RooftopsStyler()
        return RooftopsStyler.instance


class MaskStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles the class mask when Processing adds it to the map."""

    instance: "MaskStyler | None" = None

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext, feedback: object) -> None:
        if isinstance(layer, QgsRasterLayer):
            style_mask(layer)

    @staticmethod
    def create() -> "MaskStyler":
        MaskStyler.instance = MaskStyler()
        return MaskStyler.instance


def style_on_load(context: QgsProcessingContext, path: str, styler: QgsProcessingLayerPostProcessorInterface) -> None:
    """Have Processing apply ``styler`` when it loads the output ``path`` (GUI, runAndLoadResults)."""
    if path and context.willLoadLayerOnCompletion(path):
        context.layerToLoadOnCompletionDetails(path).setPostProcessor(styler)
