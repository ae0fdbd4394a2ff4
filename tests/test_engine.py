"""Tests for geoseg.engine.fit on generated scenes: outputs, reproducibility, resume, AMP safety."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from geoseg.augment import imagenet_stats
from geoseg.checkpoints import load_checkpoint, read_checkpoint
from geoseg.config import Config, load_config
from geoseg.devices import resolve_device, resolve_precision
from geoseg.engine import BEST_IOU, FitEvent, fit
from geoseg.engine.loop import EpochLoop
from geoseg.errors import CheckpointError, ConfigError, DatasetError, ModelError
from geoseg.synthetic import make_dataset

TINY = [
    "model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "data.batch_size=4",
    "train.epochs=1", "train.device=cpu", "train.precision=32",
]
#: History columns that must repeat exactly between identical runs (not the timings).
TIMING = {"seconds", "train_seconds", "train_chips_per_s"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """3 scenes of 128 x 128 px: by scene 2 train (8 chips of 64 px) and 1 val (4 chips)."""
    root = tmp_path_factory.mktemp("engine") / "ds"
    make_dataset(root, layout="seed", n_scenes=3, width=128, height=128, seed=5)
    return root


def _config(root: Path, out: Path, *overrides: str) -> Config:
    config = load_config(None, [*TINY, *overrides])
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, root=(str(root),)),
        train=dataclasses.replace(config.train, out_dir=str(out)),
    )


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.fixture(scope="module")
def two_epochs(tiny_data, tmp_path_factory) -> tuple:
    events: list[FitEvent] = []
    out = tmp_path_factory.mktemp("two") / "out"
    return fit(_config(tiny_data, out, "train.epochs=2"), progress=events.append), events


@pytest.fixture(scope="module")
def one_epoch(tiny_data, tmp_path_factory):
    return fit(_config(tiny_data, tmp_path_factory.mktemp("one") / "out"))


def test_fit_writes_self_describing_checkpoints_history_and_curves(two_epochs):
    result, events = two_epochs
    out = result.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "best_iou.pt", "best_loss.pt", "history.csv", "last.pt", "learning_curves.png", "split.json"]
    assert result.epochs_run == 2 and not result.stopped_early
    with open(out / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["val_iou"]) == pytest.approx(result.history[1]["val_iou"])
    assert {"train_loss", "val_loss", "train_pixel_accuracy", "val_pixel_accuracy", "train_iou", "val_iou",
            "val_f1", "val_precision", "val_recall", "val_miou", "lr"} <= set(rows[0])
    assert json.loads((out / "split.json").read_text()) == {
        "train": ["scene_001", "scene_002"], "val": ["scene_000"], "test": []}

    model, meta = load_checkpoint(result.best_iou)
    best_epoch = max(result.history, key=lambda r: r["val_iou"])["epoch"]
    assert meta.epoch == best_epoch and meta.metrics["val_iou"] == result.best_metrics["val_iou"]
    assert (meta.arch, meta.encoder, meta.in_channels, meta.classes) == ("deeplabv3plus", "resnet18", 3, 2)
    assert meta.bands == (1, 2, 3) and meta.chip_size == 64
    assert meta.class_names == ("background", "rooftop")
    assert meta.mean == pytest.approx(imagenet_stats(3)[0]) and meta.std == pytest.approx(imagenet_stats(3)[1])
    assert meta.resolution == pytest.approx(0.3, rel=1e-3)  # synthetic scenes: 0.3 m UTM pixels
    assert meta.config["model"]["encoder"] == "resnet18" and meta.config["train"]["epochs"] == 2
    assert meta.version and read_checkpoint(result.best_iou).extra is None
    assert read_checkpoint(result.last).extra["epoch"] == 2
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)

    assert events[0].kind == "start" and events[0].message == (
        f"training deeplabv3plus/resnet18 on cpu (fp32): 8 train chips, 4 val chips, batch 4 x 1 process(es), "
        f"epochs 1-2; outputs in {out}")
    batches = [e for e in events if e.kind == "batch"]
    assert [(e.stage, e.step, e.steps) for e in batches[:3]] == [("train", 1, 2), ("train", 2, 2), ("val", 1, 1)]
    summaries = [e.message for e in events if e.kind == "epoch"]
    assert len(summaries) == 2 and summaries[0].startswith("epoch 1/2: train loss ")
    assert " | val loss " in summaries[0] and " IoU " in summaries[0]


def test_same_seed_gives_same_metrics(one_epoch, two_epochs):
    assert _metrics(one_epoch.history) == _metrics(two_epochs[0].history[:1])


def test_resume_continues_exactly_where_the_run_stopped(tiny_data, one_epoch, two_epochs, tmp_path):
    resumed = fit(_config(tiny_data, tmp_path / "run", "train.epochs=2"), resume=one_epoch.last)
    assert resumed.epochs_run == 1
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert _metrics(resumed.history) == _metrics(two_epochs[0].history)
    with open(tmp_path / "run" / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_resume_from_another_architecture_is_refused(tiny_data, one_epoch, tmp_path):
    with pytest.raises(CheckpointError) as err:
        fit(_config(tiny_data, tmp_path / "run", "model.arch=unet", "train.epochs=2"), resume=one_epoch.last)
    assert str(err.value) == (
        f"{one_epoch.last}: was trained as deeplabv3plus/resnet18 with 3 bands and 2 classes, the config asks for "
        "unet/resnet18 with 3 bands and 2 classes; resume with the same model settings or start a new run "
        "without --resume"
    )
    with pytest.raises(CheckpointError, match=r"best_iou\.pt: holds no training state to resume from; resume from the run's last\.pt"):
        fit(_config(tiny_data, tmp_path / "run", "train.epochs=2"), resume=one_epoch.best_iou)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_skips_the_step_and_warns(tiny_data, tmp_path, monkeypatch, caplog):
    from geoseg import losses

    original = losses.SegmentationLoss.forward
    calls = {"n": 0}

    def nan_first(self, logits, target):
        calls["n"] += 1
        loss = original(self, logits, target)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(losses.SegmentationLoss, "forward", nan_first)
    with caplog.at_level(logging.WARNING, logger="geoseg.engine"):
        result = fit(_config(tiny_data, tmp_path / "out"))
    assert "epoch 1 step 1: loss is not finite (nan); step skipped" in caplog.text
    assert result.history[0]["skipped_steps"] == 1
    model, _ = load_checkpoint(result.last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_early_stopping_and_best_checkpoint(tiny_data, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.6, 0.55, 0.9])
    original = EpochLoop.val_epoch

    def scripted_iou(self, loader, epoch, *, object_f1):
        stats = original(self, loader, epoch, object_f1=object_f1)
        stats.metrics["iou"] = next(scripted)
        return stats

    monkeypatch.setattr(EpochLoop, "val_epoch", scripted_iou)
    result = fit(_config(tiny_data, tmp_path / "out", "train.epochs=4", "train.early_stopping=1"))
    assert result.stopped_early and result.epochs_run == 3
    assert [r["val_iou"] for r in result.history] == [0.5, 0.6, 0.55]
    assert load_checkpoint(tmp_path / "out" / BEST_IOU)[1].epoch == 2


def test_dataset_normalisation_augmentation_and_object_f1(tiny_data, tmp_path):
    from geoseg.augment import dataset_stats
    from geoseg.datasets import ChipDataset, find_pairs

    result = fit(_config(tiny_data, tmp_path / "out", "data.normalization=dataset", "augment.enabled=true",
                         "augment.shift_scale_rotate=1.0", "train.object_f1_every=1"))
    meta = read_checkpoint(result.last).meta
    train = [p for p in find_pairs(tiny_data) if p.name in ("scene_001", "scene_002")]
    expected = dataset_stats(ChipDataset(train, chip_size=64))
    assert meta.mean == pytest.approx(expected[0]) and meta.std == pytest.approx(expected[1])
    assert meta.mean != pytest.approx(imagenet_stats(3)[0])
    assert math.isfinite(result.history[0]["train_loss"])
    f1 = result.history[0]["val_object_f1"]
    assert f1 is not None and 0.0 <= f1 <= 1.0
    assert read_checkpoint(tmp_path / "out" / "best_object_f1.pt").meta.metrics["val_object_f1"] == f1


def test_last_batch_of_one_is_dropped_and_batch_of_one_refused(tiny_data, tmp_path):
    events: list[FitEvent] = []
    fit(_config(tiny_data, tmp_path / "a", "data.batch_size=7"), progress=events.append)  # 8 chips: 7 + 1
    assert {e.steps for e in events if e.kind == "batch" and e.stage == "train"} == {1}
    with pytest.raises(ConfigError, match=r"data.batch_size 1 cannot train deeplabv3plus \(BatchNorm needs at least 2"):
        fit(_config(tiny_data, tmp_path / "b", "data.batch_size=1"))
    with pytest.raises(DatasetError, match=r"only 8 training chips for 1 process\(es\), fewer than data.batch_size 9"):
        fit(_config(tiny_data, tmp_path / "c", "data.batch_size=9"))


def test_bad_model_settings_fail_before_training(tiny_data, tmp_path):
    with pytest.raises(ModelError, match=r"chip size 40 px is too small or not a multiple of the output stride \(16 px\)"):
        fit(_config(tiny_data, tmp_path / "a", "data.chip_size=40"))
    with pytest.raises(ModelError, match=r"^unknown encoder 'resnet1'; use one of: "):
        fit(_config(tiny_data, tmp_path / "a", "model.encoder=resnet1"))
    assert not (tmp_path / "a").exists()


def test_missing_data_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        fit(_config(tmp_path / "nowhere", tmp_path / "out"))
    assert str(err.value).startswith(f"{tmp_path / 'nowhere'}: training data folder does not exist; put scenes in ")


def test_all_nodata_training_data_has_zero_usable_chips(tmp_path, monkeypatch):
    import numpy as np
    from rasterio.transform import from_origin

    from geoseg.raster_io import write_geotiff

    root = tmp_path / "ds"
    for name in ("a", "b"):
        tf = from_origin(500000, 4650000, 0.3, 0.3)
        write_geotiff(root / "images" / f"{name}.tif", np.zeros((3, 64, 64), np.uint8), crs="EPSG:32633",
                      transform=tf, nodata=0)
        write_geotiff(root / "labels" / f"{name}.tif", np.zeros((64, 64), np.uint8), crs="EPSG:32633", transform=tf)
    config = _config(root, tmp_path / "out", "data.batch_size=2", "data.split=[1.0, 0.0, 0.0]")
    with pytest.raises(DatasetError, match="zero usable training chips: every training pixel is nodata"):
        fit(config)  # found before training: the sample of chips read up front is the whole dataset
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("geoseg.engine.data.USABLE_SAMPLE", 1)  # a sample too small to decide
    with pytest.raises(DatasetError, match="zero usable training chips: every training pixel is nodata"):
        fit(config)  # found from the confusion counts of the first epoch


def test_precision_and_device_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("32", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    monkeypatch.setattr("geoseg.devices.cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == (torch.bfloat16, False)
    monkeypatch.setattr("geoseg.devices.cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == (None, False)
    with pytest.raises(ConfigError, match=r"train.precision '16' \(fp16\) needs a CUDA GPU"):
        resolve_precision("16", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="train.device is 'cuda' but no CUDA GPU is available"):
            resolve_device("cuda")


def test_fit_records_the_dtype_and_value_range_of_the_training_scenes(one_epoch, tiny_data):
    """What prediction checks scenes against: the training scenes' dtype and 1st-99th percentiles per band."""
    from geoseg.augment import value_range

    meta = read_checkpoint(one_epoch.best_iou).meta
    train = [tiny_data / "images" / "images" / f"scene_00{i}.tif" for i in (1, 2)]  # split.json: 001, 002
    assert meta.input_dtype == "uint8"
    assert meta.value_range == value_range(train, (1, 2, 3))
    assert len(meta.value_range) == 3 and all(0 <= lo < hi <= 255 for lo, hi in meta.value_range)
