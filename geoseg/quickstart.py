"""``geoseg quickstart``: generate scenes, train a small model, predict an unseen scene, evaluate it.

From a fresh install to a styled GeoPackage in a few minutes on a CPU: a
training dataset with terraces of touching houses is generated with
:mod:`geoseg.synthetic` (images, label rasters and one polygon per building in
``buildings.gpkg``), a small DeepLabV3+ is trained on it with
``configs/quickstart.yaml`` (:func:`geoseg.engine.fit`; ``model.target:
instances``: footprint, border and contact), a second scene with another seed,
never seen in training, is predicted (:func:`geoseg.inference.job.predict`;
touching houses are split by the seeded watershed), drawn
(:func:`geoseg.preview.write_preview`), and the polygons the user gets are
compared with the true buildings (:func:`geoseg.evaluation.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from geoseg import __version__
from geoseg.errors import OutputError, file_error
from geoseg.raster_io import atomic_output

log = logging.getLogger(__name__)

#: Default output folder of ``geoseg quickstart``.
DEFAULT_DIR = "geoseg-quickstart"
#: Preset in ``configs/`` that sets the model and the training schedule.
CONFIG_PRESET = "quickstart"
#: Training data: this many generated scenes of this many pixels a side (0.3 m pixels, EPSG:32633).
TRAIN_SCENES = 6
TRAIN_SCENE_SIZE = 768
TRAIN_SEED = 1
#: The scene that is predicted and evaluated: another seed, another place, never seen in training.
TEST_SCENE_SIZE = 1024
TEST_SEED = 2
TEST_NAME = "test_scene"
#: Share of neighbouring lots that hold a terrace of touching or nearly touching houses.
TERRACES = 0.5
#: The training data's vector labels (one polygon per building), inside the data folder.
BUILDINGS = "buildings.gpkg"
RESOLUTION_M = 0.3
CRS = "EPSG:32633"
TRAIN_ORIGIN = (500000.0, 4650000.0)
TEST_ORIGIN = (520000.0, 4640000.0)
#: Names inside the output folder.
DATA_DIR = "data"
TEST_DIR = "test"
MODEL_DIR = "model"
ROOFS = "roofs.gpkg"
MASK = "mask.tif"
PREVIEW = "preview.png"
EVALUATION = "evaluation.json"
#: Marks a folder written by the quickstart, so that ``overwrite`` may clear its sub-folders.
MARKER = ".geoseg-quickstart"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class QuickstartResult:
    """What :func:`run_quickstart` wrote and measured.

    Attributes:
        out_dir: The output folder.
        roofs: Predicted rooftop polygons of the test scene (GeoPackage, layer ``rooftops``, styled).
        mask: Predicted class mask of the test scene (0 background, 1 rooftop, 255 nodata).
        preview: The test scene with the predicted polygons drawn over it.
        evaluation: The metrics as JSON (the format of ``geoseg evaluate --json``).
        scene: The predicted test scene (RGB GeoTIFF).
        truth_mask: The test scene's true mask (0/255).
        truth_roofs: The test scene's true roof polygons (GeoPackage, layer ``roofs``).
        data_dir: The generated training dataset (images/, labels/, buildings.gpkg).
        checkpoint: The trained model (best validation rooftop IoU).
        curves: The learning curves of the training run.
        metrics: The evaluation of ``roofs`` against ``truth_roofs`` (one polygon per
            building) as a nested dict (``pixel``, ``object``, ...): what the user gets.
        table: The evaluation as the human-readable table of ``geoseg evaluate``.
        polygons: Number of predicted polygons.
        epochs: Epochs trained.
        seconds: Wall-clock seconds per stage (``data``, ``train``, ``predict``,
            ``preview``, ``evaluate``) and ``total``.
    """

    out_dir: Path
    roofs: Path
    mask: Path
    preview: Path
    evaluation: Path
    scene: Path
    truth_mask: Path
    truth_roofs: Path
    data_dir: Path
    checkpoint: Path
    curves: Path
    metrics: dict[str, Any] = field(repr=False)
    table: str = field(repr=False)
    polygons: int = 0
    epochs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def iou(self) -> float:
        """Rooftop pixel IoU on the test scene."""
        return float(self.metrics["pixel"]["iou"])

    @property
    def object_f1(self) -> float:
        """Object F1 (one-to-one matching at IoU >= 0.5) on the test scene."""
        return float(self.metrics["object"]["f1"])


def _check_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; with it, clear what an earlier quickstart wrote."""
    if out_dir.exists() and not out_dir.is_dir():
        raise file_error(OutputError, out_dir, "is a file, not a folder", "choose another --dir")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if not entries:
        return
    if not overwrite:
        raise file_error(
            OutputError, out_dir, "folder is not empty",
            "pass --overwrite to replace the quickstart outputs in it, or choose another --dir",
        )
    ours = (out_dir / MARKER).exists()
    for name in (DATA_DIR, TEST_DIR, MODEL_DIR):
        sub = out_dir / name
        if not sub.exists():
            continue
        if not ours:
            # never delete a folder the quickstart did not write: stale training scenes would be
            # picked up again, so refuse rather than mix them in
            raise file_error(
                OutputError, sub, "exists and was not written by geoseg quickstart",
                "choose another --dir",
            )
        shutil.rmtree(sub)


def _report(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


def run_quickstart(
    out_dir: str | os.PathLike[str] = DEFAULT_DIR,
    *,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    overwrite: bool = False,
    epochs: int | None = None,
    progress: Progress | None = None,
    train_scenes: int = TRAIN_SCENES,
    train_scene_size: int = TRAIN_SCENE_SIZE,
    test_scene_size: int = TEST_SCENE_SIZE,
    overrides: Sequence[str] = (),
) -> QuickstartResult:
    """Generate data, train a small model, predict and evaluate an unseen scene, draw it.

    Writes into ``out_dir``: ``data/`` (the generated training scenes:
    ``images/``, ``labels/`` and ``buildings.gpkg``), ``model/`` (``best_iou.pt``, ``history.csv``,
    ``learning_curves.png``), ``test/`` (the test scene with its true mask and
    roofs), and the outputs ``roofs.gpkg``, ``mask.tif``, ``preview.png`` and
    ``evaluation.json``. The training run's ``last.pt`` and ``best_loss.pt``
    are not kept.

    Args:
        out_dir: Output folder; must be empty or absent unless ``overwrite``.
        device: Where to train and predict (``"auto"``: a CUDA GPU if there is one).
        overwrite: Replace the outputs of an earlier quickstart in ``out_dir``.
        epochs: Training epochs (None: the preset's ``train.epochs``).
        progress: Called with a one-line message at each stage and after each epoch.
        train_scenes: Generated training scenes.
        train_scene_size: Side of each training scene in pixels.
        test_scene_size: Side of the test scene in pixels.
        overrides: Config overrides applied to the preset (``"section.key=value"``).

    Returns:
        The paths written, the metrics and the stage timings.

    Raises:
        OutputError: ``out_dir`` is not empty (without ``overwrite``), or holds
            ``data/``, ``test/`` or ``model/`` folders that an earlier quickstart did not write.
        ConfigError: A bad override, epoch count or device (e.g. ``"cuda"`` without a GPU).
    """
    from geoseg.config import load_config
    from geoseg.devices import resolve_device
    from geoseg.engine import BEST_LOSS, CURVES, LAST, fit
    from geoseg.errors import ConfigError
    from geoseg.evaluation import evaluate
    from geoseg.inference.job import predict
    from geoseg.preview import write_preview
    from geoseg.synthetic import make_dataset, make_scene

    if epochs is not None and (int(epochs) != epochs or epochs < 1):
        raise ConfigError(f"epochs should be a positive integer, got {epochs!r}")
    out = Path(out_dir)
    data_dir, test_dir, model_dir = out / DATA_DIR, out / TEST_DIR, out / MODEL_DIR
    outputs = {name: out / name for name in (ROOFS, MASK, PREVIEW, EVALUATION)}
    extra = [f"train.epochs={epochs}"] if epochs is not None else []
    config = load_config(CONFIG_PRESET, [*overrides, *extra])  # bad overrides fail before any work
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, root=(str(data_dir),), layout="flat", vector_labels=BUILDINGS),
        train=dataclasses.replace(config.train, out_dir=str(model_dir), device=device),
    )
    where = resolve_device(device, local_rank=0, setting="train.device").type  # "cuda" without a GPU fails here, before anything is written
    _check_out_dir(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"geoseg": __version__}) + "\n")
    seconds: dict[str, float] = {}
    began = time.perf_counter()

    _report(progress, f"generating {train_scenes} training scenes of {train_scene_size} x {train_scene_size} px "
                      f"and a test scene of {test_scene_size} x {test_scene_size} px in {out}")
    make_dataset(data_dir, layout="buildings", n_scenes=train_scenes, width=train_scene_size,
                 height=train_scene_size, seed=TRAIN_SEED, crs=CRS, resolution=RESOLUTION_M,
                 origin=TRAIN_ORIGIN, overwrite=overwrite, terraces=TERRACES)
    test = make_scene(test_dir, name=TEST_NAME, width=test_scene_size, height=test_scene_size,
                      seed=TEST_SEED, crs=CRS, resolution=RESOLUTION_M, origin=TEST_ORIGIN,
                      overwrite=overwrite, terraces=TERRACES)
    seconds["data"] = time.perf_counter() - began

    t0 = time.perf_counter()
    _report(progress, f"training {config.model.arch}/{config.model.encoder} for {config.train.epochs} epochs "
                      f"on {config.data.chip_size} px chips ({where})")
    def on_epoch(event: Any) -> None:  # fit logs the epoch summary itself
        if progress is not None and event.kind == "epoch":
            progress(event.message)

    fit_result = fit(config, progress=on_epoch)
    for name in (LAST, BEST_LOSS):  # resume state and a second model: 150 MB the quickstart does not need
        (model_dir / name).unlink(missing_ok=True)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _report(progress, f"predicting {test.image}")
    summary = predict(
        [test.image], out=outputs[ROOFS], config=dataclasses.replace(config.predict, device=device),
        model_path=fit_result.best_iou, mask_out=outputs[MASK], overwrite=overwrite,
        keep_polygons=True,  # for the preview
    )
    seconds["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    polygons = summary.results[0].polygons
    write_preview(test.image, polygons, outputs[PREVIEW], overwrite=overwrite)
    seconds["preview"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Score what the user gets: the polygons of roofs.gpkg against the true buildings.
    _report(progress, f"evaluating {outputs[ROOFS]} against {test.roofs}")
    evaluation = evaluate(outputs[ROOFS], test.roofs)
    metrics = evaluation.to_dict()
    with atomic_output(outputs[EVALUATION], overwrite=overwrite) as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n")
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - began

    return QuickstartResult(
        out_dir=out, roofs=outputs[ROOFS], mask=outputs[MASK], preview=outputs[PREVIEW],
        evaluation=outputs[EVALUATION], scene=test.image, truth_mask=test.mask,
        truth_roofs=test.roofs, data_dir=data_dir, checkpoint=fit_result.best_iou,
        curves=model_dir / CURVES, metrics=metrics, table=evaluation.table(),
        polygons=summary.features, epochs=fit_result.epochs_run, seconds=seconds,
    )
