"""Tests of geoseg.quickstart and `geoseg quickstart`: outputs, refusals, and the accuracy of the real run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from click.testing import CliRunner
from matplotlib.image import imread

import cli
from geoseg import quickstart
from geoseg.errors import ConfigError, OutputError
from geoseg.preview import preview_layout
from geoseg.quickstart import MARKER, TEST_SCENE_SIZE, run_quickstart

#: A quickstart small enough for a unit test (seconds): it checks the plumbing, not the accuracy.
TINY = dict(epochs=1, train_scenes=2, train_scene_size=128, test_scene_size=96,
            overrides=("data.chip_size=64", "data.batch_size=2", "data.split=[0.5,0.5,0.0]",
                       "data.split_block=128"))
OUTPUTS = ["evaluation.json", "mask.tif", "preview.png", "roofs.gpkg"]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_tiny_quickstart_writes_every_output_and_reruns_with_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "qs"
    runs: list = []

    def tiny(*args, **kwargs):
        runs.append(run_quickstart(*args, **{**kwargs, **TINY}))
        return runs[-1]

    monkeypatch.setattr(quickstart, "run_quickstart", tiny)
    result = CliRunner().invoke(cli.cli, ["quickstart", "--dir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    r = runs[0]
    messages = [line[4:] for line in result.stderr.splitlines() if line.startswith("... ")]
    assert listing(out) == [
        MARKER, "data/buildings.gpkg", "data/images/scene_000.tif", "data/images/scene_001.tif",
        "data/labels/scene_000.tif", "data/labels/scene_001.tif",
        *OUTPUTS[:2], "model/best_iou.pt", "model/history.csv", "model/learning_curves.png",
        "model/split.json", *OUTPUTS[2:],
        "test/test_scene.tif", "test/test_scene_mask.tif", "test/test_scene_roofs.gpkg",
    ]
    assert (r.roofs, r.mask, r.preview, r.evaluation) == tuple(out / n for n in
                                                               ("roofs.gpkg", "mask.tif", "preview.png", "evaluation.json"))
    from geoseg.checkpoints import read_checkpoint

    assert read_checkpoint(r.checkpoint).meta.target == "instances"  # terraces: split touching houses
    assert r.epochs == 1 and set(r.seconds) == {"data", "train", "predict", "preview", "evaluate", "total"}
    assert messages[0] == f"generating 2 training scenes of 128 x 128 px and a test scene of 96 x 96 px in {out}"
    assert any(m.startswith("epoch 1/1: train loss") for m in messages)
    # evaluation.json is `geoseg evaluate --json` of what the user gets, roofs.gpkg, against the
    # true buildings (one polygon each): the printed counts are the GeoPackage's
    saved = json.loads(r.evaluation.read_text())
    assert saved == json.loads(json.dumps(r.metrics))
    assert saved["pred"] == str(r.roofs) and saved["truth"] == str(r.truth_roofs)
    assert saved["object"]["tp"] + saved["object"]["fp"] == r.polygons
    assert len(gpd.read_file(r.roofs, layer="rooftops")) == r.polygons
    assert gpd.read_file(r.checkpoint.parent.parent / "data" / "buildings.gpkg").geometry.is_valid.all()
    assert saved["pixel"]["iou"] == r.iou and saved["object"]["f1"] == r.object_f1
    with rasterio.open(r.mask) as m, rasterio.open(r.scene) as s:
        assert (m.crs, m.transform, m.shape) == (s.crs, s.transform, s.shape) == (s.crs, s.transform, (96, 96))
    assert gpd.read_file(r.roofs, layer="rooftops").crs == "EPSG:32633"
    layout = preview_layout(96, 96)
    assert imread(r.preview).shape[:2] == (layout.height, layout.width)
    # stdout: the evaluation table, the metrics, every output and how to open it in QGIS
    assert result.stdout.startswith(f"prediction  {r.roofs}\ntruth       {r.truth_roofs}\n")
    assert f"rooftop IoU {r.iou:.4f}, object F1 {r.object_f1:.4f} on {r.scene}" in result.stdout
    for path in (r.roofs, r.mask, r.preview, r.evaluation, r.scene, r.checkpoint, r.data_dir):
        assert f"  {path} " in result.stdout
    assert f"{r.polygons} rooftop polygons (layer 'rooftops', QGIS style included)" in result.stdout
    assert "Layer > Add Layer > Add Vector Layer" in result.stdout

    # a second run needs --overwrite, then replaces everything (a stale extra training scene too)
    with pytest.raises(OutputError):
        run_quickstart(out, device="cpu", **TINY)
    stale = out / "data/images/scene_009.tif"
    stale.write_bytes(b"stale")
    run_quickstart(out, device="cpu", overwrite=True, **TINY)
    assert not stale.exists() and "model/last.pt" not in listing(out)


def test_non_empty_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli.cli, ["quickstart", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {tmp_path}: folder is not empty; pass --overwrite to replace the "
                             "quickstart outputs in it, or choose another --dir\n")
    assert listing(tmp_path) == ["notes.txt"]


def test_overwrite_never_deletes_folders_it_did_not_write(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.tif").write_bytes(b"x")
    with pytest.raises(OutputError) as err:
        run_quickstart(tmp_path, device="cpu", overwrite=True, **TINY)
    assert str(err.value) == (f"{tmp_path / 'data'}: exists and was not written by geoseg quickstart; "
                              "choose another --dir")
    assert listing(tmp_path) == ["data/precious.tif"]


def test_bad_settings_fail_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="epochs should be a positive integer, got 0"):
        run_quickstart(tmp_path / "a", epochs=0)
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        run_quickstart(tmp_path / "b", overrides=["train.nope=1"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(cli.cli, ["quickstart", "--dir", str(tmp_path / "c"), "--device", "cuda"])
    assert result.exit_code == 1 and result.output.startswith("Error: train.device is 'cuda' but no CUDA GPU")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quickstart_finds_the_roofs_of_an_unseen_scene(tmp_path):
    """The real thing, as the README runs it: IoU >= 0.85 on the second scene, in a few CPU minutes."""
    out = tmp_path / "geoseg-quickstart"
    began = time.perf_counter()
    result = CliRunner().invoke(cli.cli, ["quickstart", "--dir", str(out), "--device", "cpu"])
    seconds = time.perf_counter() - began
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "evaluation.json").read_text())
    iou, f1 = metrics["pixel"]["iou"], metrics["object"]["f1"]
    print(f"quickstart: {seconds:.0f} s, rooftop IoU {iou:.4f}, object F1 {f1:.4f}")
    assert iou >= 0.85, result.output
    assert f1 >= 0.85, result.output
    for name in OUTPUTS:
        assert f"{out / name} " in result.stdout
    assert "rooftop IoU" in result.stdout and "Layer > Add Layer > Add Vector Layer" in result.stdout
    roofs = gpd.read_file(out / "roofs.gpkg", layer="rooftops")
    truth = gpd.read_file(out / "test" / "test_scene_roofs.gpkg", layer="roofs")
    assert abs(len(roofs) - len(truth)) <= 0.1 * len(truth)
    layout = preview_layout(TEST_SCENE_SIZE, TEST_SCENE_SIZE)
    assert imread(out / "preview.png").shape[:2] == (layout.height, layout.width)
