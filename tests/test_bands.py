"""Bands chosen by name (geoseg.bands): descriptions first, then colour interpretations; the checkpoint's
band names; one-line refusals that name the scene, its bands, what the model wants and the fix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from _band_helpers import write_raster
from geoseg.bands import band_names, band_spec, canonical_name, describe_bands, resolve_bands
from geoseg.checkpoints import CheckpointMeta, save_checkpoint
from geoseg.errors import CheckpointError, DatasetError
from geoseg.inference.checks import scene_bands
from geoseg.models import create_model
from geoseg.raster_io import open_scene

def _scene(tmp_path: Path, name: str, **names):
    """A 40 x 50 uint16 scene with one band per given description or colour interpretation."""
    count = len(names.get("descriptions") or names["colorinterp"])
    return open_scene(write_raster(tmp_path / name, np.zeros((count, 40, 50), np.uint16), **names))


def _meta(bands=(1, 2, 3), *, data_bands=None, band_names=None) -> CheckpointMeta:
    return CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=len(bands), classes=2,
        class_names=("background", "rooftop"), bands=tuple(bands), mean=(0.0,) * len(bands),
        std=(1.0,) * len(bands), chip_size=64, config={"data": {"bands": data_bands}},
        band_names=band_names,
    )


def test_names_match_descriptions_case_insensitively_then_colour_interpretations(tmp_path):
    described = _scene(tmp_path, "s2.tif", descriptions=("Blue", "Green", "Red", "Near Infrared"))
    assert band_names(described) == ("Blue", "Green", "Red", "Near Infrared")
    assert describe_bands(described) == "1:Blue, 2:Green, 3:Red, 4:Near Infrared"
    # nir is the one alias: "near infrared", "Near-Infrared", "NIR" are the same name.
    assert canonical_name("Near-Infrared") == canonical_name("near_infrared") == canonical_name("NIR") == "nir"
    assert resolve_bands(described, ["red", "GREEN", "blue", "nir"], error=DatasetError, fix="f") == (3, 2, 1, 4)

    rgb = _scene(tmp_path, "rgb.tif", colorinterp=("red", "green", "blue"))
    assert band_names(rgb) == ("red", "green", "blue")
    assert resolve_bands(rgb, ["blue", "Red"], error=DatasetError, fix="f") == (3, 1)
    # A description wins over every colour interpretation: band 3 is described "red".
    both = _scene(tmp_path, "both.tif", colorinterp=("red", "green", "blue"), descriptions=(None, None, "red"))
    assert resolve_bands(both, ["red"], error=DatasetError, fix="f") == (3,)
    # GDAL's default interpretations name band 1 only (gray); the rest are undefined.
    plain = _scene(tmp_path, "plain.tif", colorinterp=("gray", "undefined", "undefined", "undefined"))
    assert band_names(plain) == ("gray", None, None, None)
    assert describe_bands(plain) == "1:gray, 2:undefined, 3:undefined, 4:undefined"


def test_numbers_and_names_mix_only_when_unambiguous(tmp_path):
    rgb = _scene(tmp_path, "rgb.tif", colorinterp=("red", "green", "blue"))
    assert band_spec(["1", " green ", 3]) == (1, "green", 3)
    assert resolve_bands(rgb, band_spec(["3", "green", "red"]), error=CheckpointError, fix="the fix") == (3, 2, 1)
    with pytest.raises(CheckpointError) as err:
        resolve_bands(rgb, band_spec(["1", "red"]), error=CheckpointError, fix="the fix")
    assert str(err.value) == (
        f"{rgb.path}: --bands 1,red picks band 1 twice (1 and red); its bands are 1:red, 2:green, 3:blue; the fix")
    twice = _scene(tmp_path, "twice.tif", descriptions=("red", "red", "blue"))
    with pytest.raises(CheckpointError) as err:
        resolve_bands(twice, ["red"], error=CheckpointError, fix="the fix")
    assert str(err.value) == (
        f"{twice.path}: has 2 bands (1, 2) named 'red' (--bands red); its bands are 1:red, 2:red, 3:blue; the fix")
    with pytest.raises(ValueError, match="band numbers start at 1, got 0"):
        band_spec(["0", "red"])


def test_a_model_trained_on_named_bands_finds_them_in_any_order(tmp_path):
    meta = _meta((3, 2, 1), data_bands=["red", "green", "blue"], band_names=("red", "green", "blue"))
    bgr = _scene(tmp_path, "bgr.tif", descriptions=("blue", "green", "red", "nir"))
    assert scene_bands(bgr, meta) == (3, 2, 1)
    rgb = _scene(tmp_path, "rgb.tif", colorinterp=("red", "green", "blue"))
    assert scene_bands(rgb, meta) == (1, 2, 3)
    # --bands overrides, by number or by name.
    assert scene_bands(bgr, meta, ["nir", "green", "blue"]) == (4, 2, 1)
    assert scene_bands(bgr, meta, [4, 2, 1]) == (4, 2, 1)


def test_a_scene_without_the_model_band_names_is_refused_with_its_bands_and_the_fix(tmp_path):
    meta = _meta((3, 2, 1), data_bands=["red", "green", "blue"], band_names=("red", "green", "blue"))
    plain = _scene(tmp_path, "plain.tif", colorinterp=("gray", "undefined", "undefined", "undefined"))
    with pytest.raises(CheckpointError) as err:
        scene_bands(plain, meta)
    assert str(err.value) == (
        f"{plain.path}: has no band named 'red' (the model wants bands red,green,blue); its bands are 1:gray, "
        "2:undefined, 3:undefined, 4:undefined; pass --bands with the 3 of this scene's bands (numbers or names) "
        "that are the model's red,green,blue, e.g. --bands 1,2,3")
    with pytest.raises(CheckpointError) as err:
        scene_bands(plain, meta, ["red", "green"])
    assert str(err.value) == (
        f"{plain.path}: --bands red,green gives 2 bands, the model takes 3 (bands red,green,blue); "
        "pass 3 band numbers or names")


def test_bands_chosen_by_number_warn_when_the_scene_names_them_otherwise(tmp_path, caplog):
    meta = _meta(band_names=("red", "green", "blue"))
    bgr = _scene(tmp_path, "bgr.tif", descriptions=("blue", "green", "red"))
    with caplog.at_level(logging.WARNING, logger="geoseg.inference.checks"):
        assert scene_bands(bgr, meta) == (1, 2, 3)
    assert [r.getMessage() for r in caplog.records] == [
        f"{bgr.path}: bands 1,2,3 are blue,green,red here, the model learned red,green,blue; if they are not the "
        "same bands, pass --bands with the 3 of this scene's bands (numbers or names) that are the model's "
        "red,green,blue, e.g. --bands 1,2,3"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoseg.inference.checks"):
        scene_bands(_scene(tmp_path, "rgb.tif", colorinterp=("red", "green", "blue")), meta)
        scene_bands(_scene(tmp_path, "plain.tif", colorinterp=("gray", "undefined", "undefined")), meta)
    assert caplog.records == []


def test_checkpoints_without_band_names_or_stretch_still_load():
    meta = _meta(band_names=("red", "green", "blue"))
    stored = meta.to_dict()
    assert stored["band_names"] == ["red", "green", "blue"] and stored["stretch"] is None
    assert CheckpointMeta.from_dict(stored) == meta
    older = {k: v for k, v in stored.items() if k not in ("band_names", "stretch")}
    old = CheckpointMeta.from_dict(older)
    assert old.band_names is None and old.stretch is None and old.bands == (1, 2, 3)
    stretched = CheckpointMeta.from_dict({**stored, "stretch": [[10, 200], [0, 1], [5, 6]]})
    assert stretched.stretch == ((10.0, 200.0), (0.0, 1.0), (5.0, 6.0))


def test_predict_cli_bands_by_name_one_line_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch_model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3,
                               classes=2)
    ckpt = save_checkpoint(tmp_path / "model.pt", torch_model, _meta(band_names=("red", "green", "blue")))
    scene = write_raster(tmp_path / "s.tif", np.zeros((4, 70, 90), np.uint8),
                         descriptions=("blue", "green", "red", "nir"))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = CliRunner().invoke(cli.cli, ["predict", str(scene), "--out", str(tmp_path / "roofs.gpkg"),
                                          "--model", str(ckpt), "--bands", "red,green,swir"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {scene}: has no band named 'swir' (--bands red,green,swir); its bands are 1:blue, 2:green, 3:red, "
        "4:nir; pass --bands with the 3 of this scene's bands (numbers or names) that are the model's "
        "red,green,blue, e.g. --bands 1,2,3\n")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    result = CliRunner().invoke(cli.cli, ["predict", str(scene), "--out", str(tmp_path / "roofs.gpkg"),
                                          "--model", str(ckpt), "--bands", "red,0,blue"])
    assert result.exit_code == 2 and "band numbers start at 1, got 0" in result.output
    result = CliRunner().invoke(cli.cli, ["predict", str(scene), "--out", str(tmp_path / "roofs.gpkg"),
                                          "--model", str(ckpt), "--bands", "red,green,blue",
                                          "--mask-out", str(tmp_path / "mask.tif"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mask.tif").exists() and (tmp_path / "roofs.gpkg").exists()


def test_training_bands_by_name_must_be_the_same_bands_in_every_scene(tmp_path):
    from geoseg.engine.data import training_bands

    bgrn = _scene(tmp_path, "a.tif", descriptions=("blue", "green", "red", "nir"))
    also = _scene(tmp_path, "b.tif", descriptions=("Blue", "Green", "Red", "Near infrared"))
    rgbn = _scene(tmp_path, "c.tif", descriptions=("red", "green", "blue", "nir"))
    assert training_bands(["nir", "red", 2], [bgrn, also]) == (4, 3, 2)
    assert training_bands(None, [bgrn]) == (1, 2, 3, 4) and training_bands([3, 1], [bgrn, rgbn]) == (3, 1)
    with pytest.raises(DatasetError) as err:
        training_bands(["red", "green"], [bgrn, rgbn])
    assert str(err.value) == (
        f"{rgbn.path}: data.bands red,green are bands 1,2 here but 3,2 in {bgrn.path}; give the scenes the same "
        "band names, or set data.bands to numbers")
    with pytest.raises(DatasetError) as err:
        training_bands(["red", "swir"], [bgrn])
    assert str(err.value) == (
        f"{bgrn.path}: has no band named 'swir' (data.bands red,swir); its bands are 1:blue, 2:green, 3:red, "
        "4:nir; set data.bands to band names (or numbers) every scene has")
