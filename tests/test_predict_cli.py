"""Tests for ``geoseg predict``: outputs, several scenes, exact polygons, one-line errors, no partial files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from shapely.geometry import box

import cli
from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, write_scene
from geoseg import inputs
from geoseg.checkpoints import CheckpointMeta, save_checkpoint
from geoseg.inference import job
from geoseg.models import create_model

RECTS = [(10, 10, 30, 40), (100, 90, 70, 80), (200, 400, 60, 50)]


def run(*args: str):
    return CliRunner().invoke(cli.cli, ["predict", *args])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (tiny, random) DeepLabV3+ checkpoint on 3 bands."""
    torch_model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3,
                               classes=2)
    meta = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2,
        class_names=("background", "rooftop"), bands=(1, 2, 3), mean=(120.0, 120.0, 120.0),
        std=(60.0, 60.0, 60.0), chip_size=128, resolution=0.3,
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", torch_model, meta)


@pytest.fixture
def oracle(monkeypatch):
    """``geoseg predict`` with the oracle model instead of a checkpoint."""
    model = Oracle()
    monkeypatch.setattr(job, "load_model", lambda path, **kw: (model, oracle_meta(chip_size=64)))
    monkeypatch.setattr(inputs, "check_model_path", lambda path: path)  # no file: a stand-in model
    return model


def test_real_checkpoint_writes_polygons_mask_and_probability(tmp_path, synthetic_scene, checkpoint):
    image = synthetic_scene.image
    out = tmp_path / "out"
    result = run(str(image), "--out", str(out / "roofs.gpkg"), "--model", str(checkpoint),
                 "--mask-out", str(out / "mask.tif"), "--prob-out", str(out / "prob.tif"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert files(out) == ["mask.tif", "prob.tif", "roofs.gpkg"]
    assert "wrote " in result.output and "roofs.gpkg" in result.output
    assert [n for n, _ in pyogrio.list_layers(out / "roofs.gpkg")] == ["rooftops", "layer_styles"]
    with rasterio.open(image) as src:
        grid = (src.crs, src.transform, src.shape)
    for name in ("mask.tif", "prob.tif"):
        with rasterio.open(out / name) as r:
            assert (r.crs, r.transform, r.shape) == grid


def test_oracle_polygons_are_the_drawn_roofs(tmp_path, oracle):
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(300, 517, RECTS))
    # Default --min-area (4 m²) and --simplify (0.25 m): rectangles come out exactly as drawn.
    result = run(str(scene), "--out", str(tmp_path / "roofs.gpkg"), "--block-size", "128", "--device", "cpu",
                 "--precision", "32")
    assert result.exit_code == 0, result.output
    assert "scene: 3 polygons" in result.output
    gdf = gpd.read_file(tmp_path / "roofs.gpkg", layer="rooftops")
    with rasterio.open(scene) as src:
        t = src.transform
    expected = [box(*(t @ (c, r + h)), *(t @ (c + w, r))) for r, c, h, w in RECTS]
    assert len(gdf) == 3 and gdf.is_valid.all() and set(gdf["scene"]) == {"scene"}
    for geom in gdf.geometry:
        assert min(geom.symmetric_difference(e).area for e in expected) == 0


def test_several_scenes_folder_and_glob_into_one_layer(tmp_path, oracle):
    a = tmp_path / "in" / "a.tif"
    a.parent.mkdir()
    write_scene(a, draw_rectangles(200, 300, RECTS[:2]))
    # Scene b in Web Mercator: its polygons are reprojected to scene a's CRS.
    t_wm = Affine(0.5, 0, 1113194.9, 0, -0.5, 4865942.3)
    write_scene(tmp_path / "in" / "b.tif", draw_rectangles(200, 300, [(20, 30, 40, 50)]), crs="EPSG:3857",
                transform=t_wm, seed=1)
    write_scene(tmp_path / "c.tif", draw_rectangles(120, 140, [(5, 5, 20, 20)]), seed=2)
    result = run(str(tmp_path / "in"), str(tmp_path / "c*.tif"), "--out", str(tmp_path / "all.fgb"),
                 "--mask-out", str(tmp_path / "masks"), "--prob-out", str(tmp_path / "p" / "{scene}.tif"),
                 "--min-area", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    gdf = gpd.read_file(tmp_path / "all.fgb")
    assert gdf.crs == "EPSG:32633"
    assert sorted(gdf["scene"]) == ["a", "a", "b", "c"]
    assert sorted(gdf["id"]) == [1, 2, 3, 4]
    assert files(tmp_path / "masks") == ["a_mask.tif", "b_mask.tif", "c_mask.tif"]
    assert files(tmp_path / "p") == ["a.tif", "b.tif", "c.tif"]
    with rasterio.open(tmp_path / "masks" / "b_mask.tif") as r:
        assert r.crs == "EPSG:3857" and r.transform == t_wm


def test_one_mask_file_for_several_scenes_is_refused(tmp_path, oracle):
    for name in ("a", "b"):
        write_scene(tmp_path / f"{name}.tif", np.zeros((50, 60), np.uint8))
    result = run(str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(tmp_path / "r.gpkg"),
                 "--mask-out", str(tmp_path / "m.tif"))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'm.tif'}: is one file for 2 scenes; pass a folder or a template such as "
        f"{tmp_path / '{scene}_mask.tif'}\n"
    )
    assert oracle.calls == 0


def test_all_nodata_scene_gives_an_empty_layer_and_a_warning(tmp_path, oracle, caplog):
    label = np.zeros((80, 90), np.uint8)
    scene = write_scene(tmp_path / "void.tif", label, nodata_mask=np.ones_like(label, dtype=bool))
    with caplog.at_level(logging.WARNING):
        result = run(str(scene), "--out", str(tmp_path / "r.gpkg"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "every pixel is nodata" in caplog.text
    info = pyogrio.read_info(tmp_path / "r.gpkg", layer="rooftops")
    assert info["features"] == 0 and info["crs"] == "EPSG:32633"


# --- bad input: one line, exit 1, nothing written ----------------------------------------------


def _bad_case(name: str, tmp: Path, checkpoint: Path) -> tuple[list[str], str]:
    """Arguments for a failing run and the exact expected message."""
    rgb = tmp / "rgb.tif"
    write_scene(rgb, np.zeros((60, 70), np.uint8), rgb=True)  # 4 bands
    out = str(tmp / "roofs.gpkg")
    if name == "no checkpoint":
        return [str(rgb), "--out", out], (
            "saved_models/best_iou.pt: no checkpoint there; run `geoseg train` first or pass --model CKPT")
    if name == "corrupt checkpoint":
        bad = tmp / "bad.pt"
        bad.write_bytes(b"this is not a checkpoint")
        return [str(rgb), "--out", out, "--model", str(bad)], f"{bad}: "
    if name == "band mismatch":
        return [str(rgb), "--out", out, "--model", str(checkpoint)], (
            f"{rgb}: scene has 4 bands, model expects bands 1,2,3 (3 bands); pass --bands with 3 band numbers "
            "to choose the scene's bands (e.g. --bands 1,2,3) or use a model trained on 4-band imagery")
    if name == "no crs":
        nocrs = write_scene(tmp / "nocrs.tif", np.zeros((60, 70), np.uint8), crs=None)
        return [str(nocrs), "--out", out, "--model", str(checkpoint), "--bands", "1,2,3"], (
            f"{nocrs}: has no CRS; georeference it (gdal_edit.py -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX")
    if name == "unwritable folder":
        (tmp / "afile").write_text("x")
        target = tmp / "afile" / "roofs.gpkg"
        return [str(rgb), "--out", str(target), "--model", str(checkpoint)], (
            f"{target}: cannot be written (folder {tmp / 'afile'} is not writable); choose another output folder")
    if name == "output exists":
        Path(out).write_text("old")
        return [str(rgb), "--out", out, "--model", str(checkpoint)], (
            f"{out}: already exists; pass --overwrite to replace it")
    if name == "mask exists":
        (tmp / "m.tif").write_text("old")
        return [str(rgb), "--out", out, "--model", str(checkpoint), "--bands", "1,2,3", "--mask-out",
                str(tmp / "m.tif")], f"{tmp / 'm.tif'}: already exists; pass --overwrite to replace it"
    if name == "missing scene":
        return [str(tmp / "nope.tif"), "--out", out], f"{tmp / 'nope.tif'}: file does not exist; check the path"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["no checkpoint", "corrupt checkpoint", "band mismatch", "no crs",
                                  "unwritable folder", "output exists", "mask exists", "missing scene"])
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, monkeypatch, checkpoint, name):
    monkeypatch.chdir(tmp_path)
    args, message = _bad_case(name, tmp_path, checkpoint)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = run(*args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    if message.endswith(": "):
        assert result.output.startswith("Error: " + message)
    else:
        assert result.output == f"Error: {message}\n"
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before


def test_failure_in_second_scene_removes_the_first_scenes_rasters(tmp_path, monkeypatch):
    class FailsLater(Oracle):
        def forward(self, x):
            if self.calls >= 2:
                raise RuntimeError("out of memory")
            return super().forward(x)

    model = FailsLater()
    monkeypatch.setattr(job, "load_model", lambda path, **kw: (model, oracle_meta(chip_size=64)))
    monkeypatch.setattr(inputs, "check_model_path", lambda path: path)  # no file: a stand-in model
    for name in ("a", "b"):
        write_scene(tmp_path / f"{name}.tif", draw_rectangles(100, 120, [(5, 5, 30, 30)]))
    before = files(tmp_path)
    result = run(str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(tmp_path / "r.gpkg"),
                 "--mask-out", str(tmp_path / "m"), "--batch-size", "4", "--device", "cpu")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert files(tmp_path) == before
    assert not (tmp_path / "m").exists() or os.listdir(tmp_path / "m") == []
