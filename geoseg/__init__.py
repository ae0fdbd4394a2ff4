"""geoseg: rooftop segmentation for georeferenced aerial and satellite imagery."""

import os as _os

# ONNX Runtime (1.32 at least) writes a telemetry session-id file (".ses") into the temporary folder
# when it is imported; geoseg leaves nothing behind and sends nothing, so it is off unless set.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
