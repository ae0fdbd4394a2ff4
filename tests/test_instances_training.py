"""Training an ``instances`` model (footprint + border + contact) from one polygon per building.

The data is written here: a flat layout (images/ + labels/ raster masks) with a
GeoPackage of terraces (rows of touching and nearly touching houses), as the
OAM development sets ship them.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
import torch
from affine import Affine
from click.testing import CliRunner

import cli
from geoseg.augment import build_transform
from geoseg.checkpoints import load_checkpoint, read_checkpoint
from geoseg.config import AugmentConfig, load_config
from geoseg.datasets import ChipDataset, collate_samples, find_pairs
from geoseg.engine import fit
from geoseg.errors import CheckpointError, ConfigError
from geoseg.labels import IGNORE_INDEX, VectorLabels
from geoseg.models import INSTANCE_CHANNELS
from geoseg.targets import instance_targets, padding_px

PIXEL = 0.3  # metres
SIZE = 128
TINY = [
    "model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "data.batch_size=4",
    "train.epochs=1", "train.device=cpu", "train.precision=32", "data.layout=flat",
]
INSTANCES = ["model.target=instances", "data.vector_labels=buildings.gpkg"]


def _terraces(rng: np.random.Generator, transform: Affine) -> list[shapely.Polygon]:
    """Two rows of houses 10-16 px wide, 14 px deep, touching or 2 px apart, in scene CRS units."""
    polygons = []
    for row in (20, 70):
        col = 8
        while col < SIZE - 24:
            width = int(rng.integers(10, 17))
            x0, y0 = transform @ (col, row)
            x1, y1 = transform @ (col + width, row + 14)
            polygons.append(shapely.box(x0, y1, x1, y0))
            col += width + int(rng.choice([0, 0, 2]))
    return polygons


def _write_dataset(root: Path, n_scenes: int = 3) -> Path:
    """A flat dataset: images/NAME.tif (RGB), labels/NAME.tif (0/255) and buildings.gpkg (one polygon per house)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(7)
    polygons = []
    for i in range(n_scenes):
        transform = Affine(PIXEL, 0, 500_000 + i * 100, 0, -PIXEL, 4_000_000)
        houses = _terraces(rng, transform)
        polygons += houses
        ids = rasterio.features.rasterize(
            [(g, k + 1) for k, g in enumerate(houses)], out_shape=(SIZE, SIZE), transform=transform, dtype="int32")
        image = rng.normal(100, 12, size=(3, SIZE, SIZE))
        colours = rng.uniform(140, 220, size=(len(houses) + 1, 3))
        image[:, ids > 0] = colours[ids[ids > 0]].T
        border, _ = instance_targets(ids, border_px=1, contact_px=1)
        image[:, border > 0] *= 0.7  # darker eaves, so that walls are visible
        profile = dict(driver="GTiff", width=SIZE, height=SIZE, crs="EPSG:32633", transform=transform)
        with rasterio.open(root / "images" / f"scene_{i}.tif", "w", count=3, dtype="uint8", **profile) as dst:
            dst.write(np.clip(image, 0, 255).astype(np.uint8))
        with rasterio.open(root / "labels" / f"scene_{i}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(np.where(ids > 0, 255, 0).astype(np.uint8), 1)
    gpd.GeoDataFrame({"geometry": polygons}, crs="EPSG:32633").to_file(root / "buildings.gpkg", layer="buildings")
    return root


@pytest.fixture(scope="module")
def terraces(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("instances") / "ds")


@pytest.fixture(scope="module")
def trained(terraces, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return fit(_config(terraces, out, *INSTANCES))


def _config(root: Path, out: Path, *overrides: str):
    config = load_config(None, [*TINY, *overrides])
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, root=(str(root),)),
        train=dataclasses.replace(config.train, out_dir=str(out)),
    )


def _dataset(root: Path, **kwargs) -> ChipDataset:
    pairs = find_pairs(root, layout="flat", vector_labels="buildings.gpkg")
    return ChipDataset(pairs, chip_size=64, stride=48, target="instances", **kwargs)


# ---- samples


def test_flat_layout_with_a_vector_file_gives_exact_instance_targets(terraces):
    pairs = find_pairs(terraces, layout="flat", vector_labels="buildings.gpkg")
    assert [p.vector for p in pairs] == [terraces / "buildings.gpkg"] * 3  # found inside the dataset folder
    ds = _dataset(terraces)
    labels = VectorLabels(terraces / "buildings.gpkg")
    border_px, contact_px = 0.5 / PIXEL, 1.0 / PIXEL  # the default widths in metres
    pad = padding_px(border_px, contact_px)
    contact_seen = 0
    for i in range(len(ds)):
        s = ds[i]
        window = s["window"]
        ids = labels.rasterize_instances(crs=rasterio.crs.CRS.from_wkt(s["crs"]), transform=s["transform"],
                                         shape=(64, 64), pad=pad)
        border, contact = instance_targets(ids, border_px=border_px, contact_px=contact_px)
        crop = (slice(pad, pad + 64), slice(pad, pad + 64))
        assert s["targets"].dtype == torch.uint8 and s["targets"].shape == (2, 64, 64)
        np.testing.assert_array_equal(s["targets"][0].numpy(), border[crop])
        np.testing.assert_array_equal(s["targets"][1].numpy(), contact[crop])
        with rasterio.open(terraces / "labels" / f"{s['scene']}.tif") as src:
            np.testing.assert_array_equal(s["mask"].numpy(), src.read(1, window=window) // 255)
        contact_seen += int(contact[crop].sum())
    assert contact_seen > 100


def test_targets_are_ignored_where_the_mask_is_and_move_with_it(terraces):
    raw = _dataset(terraces)[0]
    flip = AugmentConfig(hflip=1.0, vflip=0.0, rotate90=0.0, brightness_contrast=0.0, hue_saturation=0.0,
                         shift_scale_rotate=0.0)
    tf = build_transform(mean=(0, 0, 0), std=(1, 1, 1), augment=flip, scale=255.0)
    flipped = _dataset(terraces, transform=tf)[0]
    np.testing.assert_array_equal(flipped["targets"].numpy(), raw["targets"].numpy()[:, :, ::-1])
    np.testing.assert_array_equal(flipped["mask"].numpy(), raw["mask"].numpy()[:, ::-1])
    # every geometric transform at once: border stays inside the roofs, ignore is shared
    heavy = AugmentConfig(hflip=1.0, vflip=1.0, rotate90=1.0, shift_scale_rotate=1.0)
    ds = _dataset(terraces, transform=build_transform(mean=(0, 0, 0), std=(1, 1, 1), augment=heavy, seed=3))
    for i in range(4):
        s = ds[i]
        mask, targets = s["mask"].numpy(), s["targets"].numpy()
        ignored = mask == IGNORE_INDEX
        assert ignored.any()  # the rotation brings in padding
        assert (targets[:, ignored] == IGNORE_INDEX).all() and not (targets[:, ~ignored] == IGNORE_INDEX).any()
        assert (mask[targets[0] == 1] == 1).all()
    batch = collate_samples([ds[0], ds[1], ds[2]])
    assert batch["targets"].shape == (3, 2, 64, 64) and batch["targets"].dtype == torch.uint8


# ---- training


def test_fit_trains_and_records_the_instances_target(trained):
    model, meta = load_checkpoint(trained.best_iou)
    assert meta.target == "instances" and meta.out_channels == 4
    assert meta.target_settings == {
        "border_width": 0.5, "contact_width": 1.0, "channels": ["border", "contact"],
        "border_loss": "focal_dice", "border_weight": 1.0, "contact_loss": "focal_dice", "contact_weight": 1.0,
    }
    assert meta.config["model"]["target"] == "instances"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2 + len(INSTANCE_CHANNELS), 64, 64)
    with open(trained.out_dir / "history.csv") as fh:
        row = next(csv.DictReader(fh))
    for key in ("train_iou", "val_iou", "train_border_iou", "train_contact_iou", "val_border_iou", "val_contact_iou"):
        assert 0.0 <= float(row[key]) <= 1.0, key
    assert np.isfinite(trained.history[0]["train_loss"])


def test_resume_refuses_a_checkpoint_of_another_target(terraces, trained, tmp_path):
    with pytest.raises(CheckpointError) as err:
        fit(_config(terraces, tmp_path / "run", "train.epochs=2"), resume=trained.last)
    assert str(err.value) == (
        f"{trained.last}: was trained with model.target=instances, the config asks for model.target=footprint; "
        "resume with --set model.target=instances or start a new run without --resume"
    )
    assert not (tmp_path / "run").exists()
    assert read_checkpoint(trained.last).meta.target == "instances"


# ---- bad input: one line, exit 1, nothing written


def _train(root: Path, out: Path, *sets: str):
    args = ["train", "--data", str(root), "--out-dir", str(out)]
    for item in [*TINY, *sets]:
        args += ["--set", item]
    return CliRunner().invoke(cli.cli, args)


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_instances_on_raster_masks_only(terraces, tmp_path):
    out = tmp_path / "out"
    line = _one_line_error(_train(terraces, out, "model.target=instances"))
    assert line == (
        f"Error: {terraces}: has only raster masks, but model.target=instances needs vector labels with one "
        f"polygon per building; set data.vector_labels to buildings.gpkg (in {terraces}), or train "
        "model.target=footprint"
    )
    assert not out.exists()


def test_width_smaller_than_a_pixel(terraces, tmp_path):
    out = tmp_path / "out"
    line = _one_line_error(_train(terraces, out, *INSTANCES, "model.border_width=0.1"))
    # UTM: 0.3 grid units are 0.30012 ground metres at the central meridian (scale factor 0.9996)
    assert line == (
        f"Error: model.border_width 0.1 m is less than one pixel (0.3 m) of {terraces / 'images' / 'scene_1.tif'}; "
        "set it to at least 0.301"
    )
    assert not out.exists()


def test_vector_file_without_polygons_in_the_images_area(terraces, tmp_path):
    far = tmp_path / "elsewhere.gpkg"
    gpd.read_file(terraces / "buildings.gpkg").translate(xoff=10_000).to_frame("geometry").to_file(far)
    out = tmp_path / "out"
    line = _one_line_error(_train(terraces, out, "model.target=instances", f"data.vector_labels={far}"))
    assert line.startswith(f"Error: {far}: has no polygons in the area of its 2 image(s) (EPSG:32633 bounds ")
    assert line.endswith("(EPSG:32633); pass the label file of these images (data.vector_labels), or fix the "
                         "file's CRS (ogr2ogr -a_srs EPSG:XXXX)")
    assert not out.exists()
    # the same for a footprint model trained from that file
    line = _one_line_error(_train(terraces, out, f"data.vector_labels={far}"))
    assert f"{far}: has no polygons in the area of its 2 image(s)" in line and not out.exists()


def test_multi_class_instances(terraces, tmp_path):
    out = tmp_path / "out"
    line = _one_line_error(_train(terraces, out, *INSTANCES, "data.classes=3",
                                  "data.class_names=[background, roof, shed]"))
    assert line == (
        "Error: model.target=instances needs binary building labels (data.classes 2, no class column), "
        "got data.classes 3; train multi-class data with model.target=footprint"
    )
    assert not out.exists()


# ---- loss


def test_instance_loss_is_the_footprint_loss_plus_the_weighted_channel_losses():
    from geoseg.losses import BinaryChannelLoss, InstanceSegmentationLoss, SegmentationLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=gen, requires_grad=True)
    mask = torch.randint(0, 2, (2, 16, 16), generator=gen)
    targets = torch.randint(0, 2, (2, 2, 16, 16), generator=gen).to(torch.uint8)
    mask[:, :4] = IGNORE_INDEX
    targets[:, :, :4] = IGNORE_INDEX
    footprint = SegmentationLoss()
    loss = InstanceSegmentationLoss(classes=2, footprint=footprint, border_weight=0.5, contact_loss="bce_dice",
                                    contact_weight=2.0)
    value = loss(logits, mask, targets)
    want = (footprint(logits[:, :2], mask) + 0.5 * BinaryChannelLoss("focal_dice")(logits[:, 2], targets[:, 0])
            + 2.0 * BinaryChannelLoss("bce_dice")(logits[:, 3], targets[:, 1]))
    assert torch.allclose(value, want)
    value.backward()
    assert logits.grad[:, :, :4].abs().max() == 0  # ignored pixels teach nothing
    changed = logits.detach().clone()
    changed[:, :, :4] = 50.0
    assert torch.allclose(loss(changed, mask, targets), value.detach())
    everything_ignored = torch.full_like(targets, IGNORE_INDEX)
    assert float(loss(logits, torch.full_like(mask, IGNORE_INDEX), everything_ignored).detach()) == 0.0
    with pytest.raises(ConfigError, match=r"train.border_weight should be >= 0"):
        InstanceSegmentationLoss(classes=2, footprint=footprint, border_weight=-1)
