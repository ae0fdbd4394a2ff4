"""Tests for ``geoseg predict``: outputs, several scenes, exact polygons, one-line errors, no partial files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
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
from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg import inputs, raster_io
from geoseg.checkpoints import CheckpointMeta, save_checkpoint
from geoseg.config import PredictConfig
from geoseg.errors import OutputError
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
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
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
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    for name in ("a", "b"):
        write_scene(tmp_path / f"{name}.tif", draw_rectangles(100, 120, [(5, 5, 30, 30)]))
    before = files(tmp_path)
    result = run(str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--out", str(tmp_path / "r.gpkg"),
                 "--mask-out", str(tmp_path / "m"), "--batch-size", "4", "--device", "cpu")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert files(tmp_path) == before
    assert not (tmp_path / "m").exists() or os.listdir(tmp_path / "m") == []


# --- one set of defaults, one library call -------------------------------------------------------


def test_library_and_command_give_the_same_polygons_with_default_options(tmp_path, oracle):
    """`geoseg predict`, job.predict and predict_scene all default to PredictConfig (4 m², 0.25 m)."""
    label = draw_rectangles(200, 260, [*RECTS[:2], (170, 200, 3, 3)])  # the 3 x 3 px speck is 2.25 m²
    for i in range(40):  # a staircase roof: its 1-px steps lie within 0.25 m of the diagonal
        label[150 + i, 20:20 + 40 - i] = 1
    scene = write_scene(tmp_path / "scene.tif", label)
    result = run(str(scene), "--out", str(tmp_path / "cli.gpkg"))
    assert result.exit_code == 0, result.output
    job.predict([str(scene)], out=str(tmp_path / "lib.gpkg"))
    alone = job.predict_scene(scene, oracle, oracle_meta(chip_size=64)).polygons
    raw = job.predict_scene(scene, oracle, oracle_meta(chip_size=64), min_area=0.0, simplify=0.0).polygons
    cli_gdf = gpd.read_file(tmp_path / "cli.gpkg", layer="rooftops")
    lib_gdf = gpd.read_file(tmp_path / "lib.gpkg", layer="rooftops")
    assert len(cli_gdf) == 3 and len(raw) == 4  # the speck is dropped by default
    assert cli_gdf.drop(columns="geometry").equals(lib_gdf.drop(columns="geometry"))
    for got in (lib_gdf.geometry, alone.geometry):
        assert len(got) == len(cli_gdf) and all(a.equals_exact(b, 0) for a, b in zip(cli_gdf.geometry, got))
    vertices = [len(g.exterior.coords) for g in cli_gdf.geometry]
    assert sum(vertices) < sum(len(g.exterior.coords) for g in raw.geometry if g.area > 4)  # simplified


def test_config_and_flags_reach_the_library_call(tmp_path, oracle, monkeypatch):
    """Defaults < --config's predict section < flags, in the one PredictConfig handed to job.predict."""
    scene = write_scene(tmp_path / "s.tif", draw_rectangles(100, 120, RECTS[:1]))
    (tmp_path / "p.yaml").write_text("predict: {threshold: 0.4, min_area: 9.0, block_size: 512}\n")
    seen = {}
    real = job.predict

    def spy(scenes, **kwargs):
        seen.update(kwargs)
        return real(scenes, **kwargs)

    monkeypatch.setattr(job, "predict", spy)
    result = run(str(scene), "--out", str(tmp_path / "r.gpkg"), "--config", str(tmp_path / "p.yaml"),
                 "--min-area", "2", "--no-tta", "--device", "cpu", "--preview", str(tmp_path / "p.png"))
    assert result.exit_code == 0, result.output
    assert seen["config"] == PredictConfig(threshold=0.4, min_area=2.0, block_size=512, tta=False, device="cpu")
    assert seen["preview"] == str(tmp_path / "p.png") and seen["config_file"] == str(tmp_path / "p.yaml")
    assert files(tmp_path) == ["p.png", "p.yaml", "r.gpkg", "s.tif"]


# --- every output name checked for collisions before anything is read -----------------------------


def test_two_scenes_whose_masks_are_one_file_are_refused_before_any_work(tmp_path, oracle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(raster_io, "is_case_insensitive", lambda folder: True)  # as on macOS or Windows
    for name in ("a/s.tif", "A/s.tif"):
        Path(name).parent.mkdir()
        write_scene(Path(name), draw_rectangles(60, 70, RECTS[:1]))
    before = files(tmp_path)
    result = run("a/s.tif", "A/s.tif", "--out", "o.gpkg", "--mask-out", "masks", "--preview", "pv")
    assert result.exit_code == 1
    assert result.output == ("Error: masks/A/s_mask.tif: --mask-out is the same file as --mask-out "
                             "masks/a/s_mask.tif; give every output its own path\n")
    assert files(tmp_path) == before and oracle.calls == 0


def test_a_scenes_preview_on_another_scenes_mask_is_refused_before_any_work(tmp_path, oracle, monkeypatch):
    """Scene a's preview pv/a_preview.png is also the mask of scene a_preview (--mask-out pv/{scene}.png)."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "a_preview"):
        write_scene(Path(f"{name}.tif"), draw_rectangles(60, 70, RECTS[:1]))
    before = files(tmp_path)
    result = run("a.tif", "a_preview.tif", "--out", "o.gpkg", "--mask-out", "pv/{scene}.png", "--preview", "pv")
    assert result.exit_code == 1
    assert result.output == ("Error: pv/a_preview.png: --preview is the same file as --mask-out pv/a_preview.png; "
                             "give every output its own path\n")
    assert files(tmp_path) == before and oracle.calls == 0 and not Path("pv").exists()


def test_library_refuses_colliding_previews_before_loading_the_model(tmp_path, monkeypatch):
    """The preview is an argument of job.predict: checked with the other outputs, before any work."""
    def never(*args, **kwargs):
        raise AssertionError("read before the outputs were checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "load_model", never)
    monkeypatch.setattr(job, "open_scene", never)
    monkeypatch.setattr(inputs, "check_model_path", lambda path: path)
    for name in ("a", "b"):
        write_scene(Path(f"{name}.tif"), draw_rectangles(60, 70, RECTS[:1]))
    before = files(tmp_path)
    with pytest.raises(OutputError) as err:
        job.predict(["a.tif", "b.tif"], out="o.gpkg", preview="pv/{scene}/../p.png")
    assert str(err.value) == "pv/b/../p.png: --preview is the same file as --preview pv/a/../p.png; " \
                             "give every output its own path"
    with pytest.raises(OutputError) as err:
        job.predict(["a.tif", "b.tif"], out="o.gpkg", preview="p.png")
    assert str(err.value) == "p.png: is one preview file for 2 scenes; pass a folder or a template such as " \
                             "{scene}.png"
    assert files(tmp_path) == before


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nimport cli\n"
            "for args in ([\"--help\"], [\"predict\", \"--help\"], [\"benchmark\", \"--help\"]):\n"
            "    assert CliRunner().invoke(cli.cli, args).exit_code == 0\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
