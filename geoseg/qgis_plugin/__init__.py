"""geoseg's QGIS plugin: a Processing provider whose algorithms run the geoseg CLI in a subprocess.

Shipped inside the geoseg package as data; ``geoseg qgis install`` copies this folder
into a QGIS profile (as ``plugins/geoseg``) and ``geoseg qgis package`` zips it for
the plugin manager. QGIS's Python imports it, never geoseg itself: nothing here
imports geoseg or torch. Only :func:`classFactory` touches QGIS, so
:mod:`.runner` also imports where QGIS is missing.
"""


def classFactory(iface):  # noqa: N802 (the name QGIS calls)
    """The plugin object QGIS loads (QGIS's entry point for every Python plugin)."""
    from .plugin import GeosegPlugin

    return GeosegPlugin(iface)
