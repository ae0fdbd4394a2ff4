"""geoseg benchmark --agreement: fp32 and bf16 masks of the same model compared pixel by pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from cli import cli
from geoseg.benchmarks.agreement import compare_masks, mask_agreement
from geoseg.checkpoints import CheckpointMeta, save_checkpoint
from geoseg.inference.job import load_model
from geoseg.inference.pipeline import predict_scene
from geoseg.models import create_model


def _mask(path, data, transform=rasterio.Affine(1, 0, 0, 0, -1, 0)):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="uint8", transform=transform, nodata=255) as dst:
        dst.write(data, 1)
    return path


def test_compare_masks_counts_by_hand(tmp_path):
    a = np.array([[0, 1, 1, 255], [0, 0, 1, 1]], np.uint8)
    b = np.array([[0, 1, 0, 1], [255, 0, 1, 0]], np.uint8)
    # valid where neither is 255: 6 pixels; equal at (0,0) (0,1) (1,1) (1,2) -> 4
    # rooftop a: (0,1) (0,2) (1,2) (1,3) -> 4; b: (0,1) (1,2) -> 2; both: 2
    assert compare_masks(_mask(tmp_path / "a.tif", a), _mask(tmp_path / "b.tif", b)) == (6, 4, 4, 2, 2)
    with pytest.raises(ValueError, match="not on the same grid"):
        compare_masks(tmp_path / "a.tif", _mask(tmp_path / "c.tif", a, rasterio.Affine(2, 0, 0, 0, -2, 0)))


@pytest.fixture
def checkpoint(tmp_path):
    model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=(120.0,) * 3, std=(60.0,) * 3, chip_size=128, resolution=0.3,
    )
    return save_checkpoint(tmp_path / "model.pt", model, meta)


def test_agreement_equals_comparing_the_two_predictions(tmp_path, synthetic_scene, checkpoint):
    res = mask_agreement([synthetic_scene.image], checkpoint, precision="bf16", device="cpu")
    model, meta = load_model(checkpoint)
    masks = {}
    for prec in ("32", "bf16"):
        predict_scene(synthetic_scene.image, model, meta, mask_out=tmp_path / f"{prec}.tif", polygons=False,
                      device="cpu", precision=prec)
        with rasterio.open(tmp_path / f"{prec}.tif") as r:
            masks[prec] = r.read(1)
    a, b = masks["32"], masks["bf16"]
    [s] = res.scenes
    assert (s.scene, s.pixels) == (synthetic_scene.image.stem, 517 * 300)
    assert s.agree == int((a == b).sum())
    assert (s.rooftop_fp32, s.rooftop_other, s.rooftop_both) == (
        int((a == 1).sum()), int((b == 1).sum()), int(((a == 1) & (b == 1)).sum()))
    totals = res.totals()
    assert totals["agreement"] == s.agree / s.pixels and totals["differing_pixels"] == s.pixels - s.agree


def test_cli_agreement_needs_a_model_and_a_mixed_precision_the_device_has(tmp_path, synthetic_scene, checkpoint):
    r = CliRunner().invoke(cli, ["benchmark", "--agreement", str(synthetic_scene.image)])
    assert r.exit_code == 1
    assert r.output == "Error: --agreement compares the masks of a trained model; pass --model CKPT\n"
    r = CliRunner().invoke(cli, ["benchmark", "--agreement", str(synthetic_scene.image), "--model", str(checkpoint),
                                 "--device", "cpu", "--precision", "16"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "fp16" in r.output
    r = CliRunner().invoke(cli, ["benchmark", "--agreement", str(synthetic_scene.image.parent / "sc*e.tif"), "--model",
                                 str(checkpoint), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["precision"] == "bf16" and [s["scene"] for s in out["scenes"]] == [synthetic_scene.image.stem]
    assert 0.0 <= out["agreement"] <= 1.0 and out["pixels"] == 517 * 300
