"""Training: ``fit(config)`` with AMP, clipping, LR schedule, early stopping, checkpoints and DDP.

- :mod:`geoseg.engine.training`: :func:`fit` and :class:`FitResult`.
- :mod:`geoseg.engine.loop`: one epoch of training or validation, :class:`FitEvent`.
- :mod:`geoseg.engine.data`: scene discovery, splits and chip datasets for a run.
- :mod:`geoseg.engine.devices`: torch.distributed set-up (devices and precision: :mod:`geoseg.devices`).
- :mod:`geoseg.engine.records`: history.csv rows, epoch summaries, best values.
"""

from geoseg.engine.loop import FitEvent, ProgressCallback
from geoseg.engine.records import BEST_IOU, BEST_LOSS, BEST_OBJECT_F1, CURVES, HISTORY, LAST, SPLIT, write_history
from geoseg.engine.training import FitResult, fit

__all__ = [
    "BEST_IOU", "BEST_LOSS", "BEST_OBJECT_F1", "CURVES", "HISTORY", "LAST", "SPLIT",
    "FitEvent", "FitResult", "ProgressCallback", "fit", "write_history",
]
