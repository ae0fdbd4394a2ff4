"""Tests for `geoseg train` (cli.py) and `python -m geoseg.train`: success and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from geoseg import __version__
from geoseg.checkpoints import CheckpointMeta, save_checkpoint
from geoseg.models import create_model
from geoseg.synthetic import make_dataset

TINY = ["model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "data.batch_size=4",
        "train.epochs=1", "train.precision=32"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "ds"
    make_dataset(root, layout="seed", n_scenes=3, width=128, height=128, seed=5)
    return root


def _run(*args: str):
    return CliRunner().invoke(cli.cli, ["train", *args])


def _one_line_error(result, expected_start: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {expected_start}"), lines[0]
    return lines[0]


def test_train_command_trains_and_reports(data, tmp_path):
    out = tmp_path / "models"
    # the quickstart preset learns instances; these raster masks train footprints
    result = _run("--config", "quickstart", "--data", str(data), "--out-dir", str(out), "--device", "cpu",
                  *_sets(*TINY, "model.target=footprint"))
    assert result.exit_code == 0, result.output
    assert "training deeplabv3plus/resnet18 on cpu (fp32): 8 train chips, 4 val chips" in result.output
    assert "epoch 1/1: train loss " in result.output
    assert "best val rooftop IoU " in result.output and "at epoch 1" in result.output
    assert f"checkpoints in {out}: best_iou.pt, best_loss.pt, last.pt" in result.output
    assert {"best_iou.pt", "best_loss.pt", "last.pt", "history.csv", "learning_curves.png"} <= {p.name for p in out.iterdir()}


def test_no_arguments_without_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(_run(), "dataset: training data folder does not exist; ")
    assert line == (
        "Error: dataset: training data folder does not exist; put scenes in dataset/images/images/NAME.tif with "
        "masks in dataset/label/label/NAME_label.tif (seed layout), or images/NAME.tif + labels/NAME.tif, "
        "or pass --data PATH"
    )


def test_unknown_encoder_and_architecture(data, tmp_path):
    line = _one_line_error(_run("--data", str(data), "--out-dir", str(tmp_path / "o"), *_sets(*TINY, "model.encoder=resnet5")),
                           "unknown encoder 'resnet5'; use one of: resnet18, resnet34, ")
    assert "efficientnet-b0" in line
    line = _one_line_error(_run("--data", str(data), *_sets(*TINY, "model.arch=deeplab")),
                           "unknown architecture 'deeplab'; use one of: ")
    assert "deeplabv3plus" in line and "unet" in line
    assert not (tmp_path / "o").exists()


def test_weights_file_of_another_encoder(data, tmp_path):
    import segmentation_models_pytorch as smp

    path = tmp_path / "mobilenet.pth"
    torch.save(smp.encoders.get_encoder("mobilenet_v2", weights=None).state_dict(), path)
    _one_line_error(_run("--data", str(data), *_sets(*TINY, f"model.encoder_weights={path}")),
                    f"{path}: does not match encoder 'resnet18': ")


def test_zero_usable_chips(tmp_path):
    from rasterio.transform import from_origin

    from geoseg.raster_io import write_geotiff

    root = tmp_path / "nodata"
    tf = from_origin(500000, 4650000, 0.3, 0.3)
    for name in ("a", "b"):
        write_geotiff(root / "images" / f"{name}.tif", np.zeros((3, 64, 64), np.uint8), crs="EPSG:32633",
                      transform=tf, nodata=0)
        write_geotiff(root / "labels" / f"{name}.tif", np.zeros((64, 64), np.uint8), crs="EPSG:32633", transform=tf)
    _one_line_error(
        _run("--data", str(root), "--out-dir", str(tmp_path / "o"),
             *_sets(*TINY, "data.batch_size=2", "data.split=[1.0, 0.0, 0.0]")),
        f"{root}: zero usable training chips: every training pixel is nodata",
    )


def test_chips_smaller_than_the_output_stride(data):
    _one_line_error(_run("--data", str(data), *_sets(*TINY, "data.chip_size=8")),
                    "chip size 8 px is too small or not a multiple of the output stride (16 px) of deeplabv3plus; ")


def test_config_with_a_wrong_type_or_key(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    line = _one_line_error(_run("--config", str(bad), "--data", str(data)), "config key 'train.lr' should be float")
    assert line == "Error: config key 'train.lr' should be float, got 'fast'"
    _one_line_error(_run("--data", str(data), *_sets("train.epochs=many")),
                    "config key 'train.epochs' should be int, got 'many'")
    _one_line_error(_run("--data", str(data), *_sets("train.epoch=3")),
                    "unknown config key 'train.epoch'; allowed keys in 'train': epochs, lr, ")


def test_resume_checkpoint_of_another_architecture(data, tmp_path):
    model = create_model(arch="deeplabv3plus", encoder="resnet18")
    meta = CheckpointMeta(arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2,
                          class_names=("background", "rooftop"), bands=(1, 2, 3), mean=(0.0,) * 3, std=(1.0,) * 3,
                          chip_size=64, version=__version__, epoch=1)
    last = save_checkpoint(tmp_path / "last.pt", model, meta, extra_state={"epoch": 1, "optimizer": {}})
    _one_line_error(
        _run("--data", str(data), "--resume", str(last), *_sets(*TINY, "model.arch=unet")),
        f"{last}: was trained as deeplabv3plus/resnet18 with 3 bands and 2 classes, the config asks for unet/resnet18",
    )
    _one_line_error(
        _run("--data", str(data), "--resume", str(last), *_sets(*TINY, "data.bands=[3, 2, 1]")),
        f"{last}: was trained on bands [1, 2, 3], the data gives bands [3, 2, 1]; set data.bands",
    )
    _one_line_error(_run("--data", str(data), "--resume", str(tmp_path / "gone.pt"), *_sets(*TINY)),
                    f"{tmp_path / 'gone.pt'}: checkpoint does not exist")


def test_module_entry_point_has_the_same_options():
    proc = subprocess.run([sys.executable, "-m", "geoseg.train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: geoseg train [OPTIONS]")
    for option in ("--config", "--data", "--out-dir", "--set", "--resume", "--device"):
        assert option in proc.stdout
