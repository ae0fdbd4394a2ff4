"""What geoseg promises a user, whatever they type: one section per promise, one test per way to break it.

Inputs are never written: no output of any command (predict, train, chip,
evaluate) is one of its inputs (scene, label, AOI, checkpoint, config or split
file, data folder), however the path is spelled (symlink, ``..``, hard link,
other case on a case-insensitive file system) and with or without
``--overwrite``. The refusal is one line that names the output, the input and
the fix; it comes before any input is read and leaves every file as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

import cli
from _prediction_helpers import Oracle, UTM, UTM_TRANSFORM, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg import inputs
from geoseg import publish, raster_io
from geoseg.remote import is_url
from geoseg.errors import OutputError
from geoseg.inference import job
from geoseg.temporaries import HOST_TAG, TEMP_PREFIX
from geoseg.synthetic import make_dataset

TESTS = Path(__file__).parent

#: Training settings that make a (wrongly started) run take seconds, not minutes.
TINY = ["model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "data.batch_size=4",
        "train.epochs=1", "train.precision=32", "train.device=cpu"]


def run(*args: str | os.PathLike[str]):
    return CliRunner().invoke(cli.cli, [os.fspath(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links as their target) -> the SHA-256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(result, message: str) -> None:
    """Exit 1 with exactly ``Error: message`` on one line, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output == f"Error: {message}\n"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in ``tmp_path``, so that paths in messages are short and relative, as a user types them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> Oracle:
    """``predict`` with the oracle model, whatever the checkpoint path."""
    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    return model


def scene(path: str | Path) -> Path:
    """A 90 x 70 px 4-band scene (the oracle's label as band 4) with one roof."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_scene(p, draw_rectangles(70, 90, [(5, 5, 20, 30)]))


# ---------------------------------------------------------------------------------------------
# Inputs are never written
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_predict_mask_out_that_is_the_scene_is_refused(here, oracle, overwrite):
    scene("in.tif")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "in.tif", *overwrite)
    refused(result, "in.tif: --mask-out would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before and oracle.calls == 0


def test_predict_mask_out_through_a_symlink_to_the_scene_is_refused(here, oracle):
    scene("in.tif")
    os.symlink("in.tif", "link.tif")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "link.tif", "--overwrite")
    refused(result, "link.tif: --mask-out would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before


def test_predict_scene_through_a_symlink_and_mask_out_on_its_target_is_refused(here, oracle):
    scene("data/real.tif")
    os.symlink("data/real.tif", "in.tif")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "data/real.tif", "--overwrite")
    refused(result, "data/real.tif: --mask-out would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before


def test_predict_prob_out_spelled_with_dotdot_is_refused(here, oracle):
    scene("in.tif")
    Path("sub").mkdir()
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--prob-out", "sub/../in.tif", "--overwrite")
    refused(result, "sub/../in.tif: --prob-out would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before


def test_predict_mask_out_that_is_a_hard_link_of_the_scene_is_refused(here, oracle):
    scene("in.tif")
    os.link("in.tif", "same.tif")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "same.tif", "--overwrite")
    refused(result, "same.tif: --mask-out would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before


def test_predict_prob_out_that_is_the_checkpoint_is_refused(here, oracle):
    scene("in.tif")
    Path("model.tif").write_bytes(b"stands for the checkpoint: never read, the check comes first")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--model", "model.tif", "--prob-out", "model.tif",
                 "--overwrite")
    refused(result, "model.tif: --prob-out would overwrite the input checkpoint model.tif; "
                    "choose another output path")
    assert snapshot(here) == before


def test_predict_scene_template_that_lands_on_an_input_scene_is_refused(here, oracle):
    scene("scenes/a.tif")
    scene("scenes/b.tif")
    before = snapshot(here)
    result = run("predict", "scenes", "--out", "o.gpkg", "--mask-out", "scenes/{scene}.tif", "--overwrite")
    refused(result, "scenes/a.tif: --mask-out would overwrite the input scene scenes/a.tif; "
                    "choose another output path")
    assert snapshot(here) == before


def test_predict_per_scene_output_that_lands_on_another_input_scene_is_refused(here, oracle):
    # The folder form gives x.tif the mask x_mask.tif: the second input scene.
    scene("x.tif")
    scene("x_mask.tif")
    before = snapshot(here)
    result = run("predict", "x.tif", "x_mask.tif", "--out", "o.gpkg", "--mask-out", ".", "--overwrite")
    refused(result, "x_mask.tif: --mask-out would overwrite the input scene x_mask.tif; "
                    "choose another output path")
    assert snapshot(here) == before


def test_predict_preview_that_lands_on_the_scene_is_refused(here, oracle):
    scene("in.tif")
    before = snapshot(here)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--preview", "{scene}.tif", "--overwrite")
    refused(result, "in.tif: --preview would overwrite the input scene in.tif; choose another output path")
    assert snapshot(here) == before


def test_write_preview_refuses_to_draw_over_its_scene(here):
    from geoseg.preview import write_preview

    scene("in.tif")
    before = snapshot(here)
    with pytest.raises(OutputError) as err:
        write_preview("in.tif", None, "./in.tif", overwrite=True)
    assert str(err.value) == "./in.tif: --preview would overwrite the input scene in.tif; choose another output path"
    assert snapshot(here) == before


def test_predict_files_refuses_before_loading_the_model_or_reading_a_scene(here, monkeypatch):
    """Library callers get the same refusal as the command line, before any work."""
    def never(*args, **kwargs):
        raise AssertionError("read before the outputs were checked")

    monkeypatch.setattr(job, "load_model", never)
    monkeypatch.setattr(inputs, "check_model_path", lambda path: path)  # no file: a stand-in model
    monkeypatch.setattr(job, "open_scene", never)
    scene("in.tif")
    Path("in.yaml").write_text("predict: {threshold: 0.4}\n")
    before = snapshot(here)
    with pytest.raises(OutputError) as err:
        job.predict(["in.tif"], out="o.gpkg", mask_out="in.tif", overwrite=True)
    assert str(err.value) == "in.tif: --mask-out would overwrite the input scene in.tif; choose another output path"
    with pytest.raises(OutputError) as err:
        job.predict(["in.tif"], out="o.gpkg", prob_out="{scene}.yaml", config_file="in.yaml", overwrite=True)
    assert str(err.value) == ("in.yaml: --prob-out would overwrite the input config file in.yaml; "
                              "choose another output path")
    assert snapshot(here) == before


def test_evaluate_panels_that_are_the_vector_truth_or_the_aoi_are_refused(here, synthetic_scene):
    shutil.copy(synthetic_scene.roofs, "truth.gpkg")
    shutil.copy(synthetic_scene.mask, "pred.tif")
    shutil.copy(synthetic_scene.roofs, "aoi.gpkg")
    before = snapshot(here)
    common = ["evaluate", "--pred", "pred.tif", "--truth", "truth.gpkg", "--aoi", "aoi.gpkg", "--overwrite"]
    refused(run(*common, "--panels", "truth.gpkg"),
            "truth.gpkg: --panels would overwrite the input truth truth.gpkg; choose another output path")
    refused(run(*common, "--panels", "./aoi.gpkg"),
            "./aoi.gpkg: --panels would overwrite the input AOI aoi.gpkg; choose another output path")
    refused(run(*common, "--panels", "pred.tif"),
            "pred.tif: --panels would overwrite the input prediction pred.tif; choose another output path")
    assert snapshot(here) == before


def test_write_panels_refuses_an_input_of_the_evaluation(here, synthetic_scene):
    from geoseg.evaluation import evaluate, write_panels

    shutil.copy(synthetic_scene.roofs, "truth.gpkg")
    shutil.copy(synthetic_scene.mask, "pred.tif")
    result = evaluate("pred.tif", "truth.gpkg")
    before = snapshot(here)
    with pytest.raises(OutputError, match=r"^truth\.gpkg: --panels would overwrite the input truth truth\.gpkg; "):
        write_panels(result, "truth.gpkg", overwrite=True)
    assert snapshot(here) == before


@pytest.fixture(scope="module")
def training_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "ds"
    make_dataset(root, layout="seed", n_scenes=3, width=128, height=128, seed=5)
    return root


def train_args(*extra: str) -> list[str]:
    return ["train", *extra, *(a for item in TINY for a in ("--set", item))]


def test_train_out_dir_that_is_the_data_folder_is_refused(here, training_data):
    shutil.copytree(training_data, "ds")
    before = snapshot(here)
    result = run(*train_args("--data", "ds", "--out-dir", "ds"))
    refused(result, "ds: train.out_dir would write into the input training data folder ds; "
                    "choose another output folder")
    result = run(*train_args("--data", "ds", "--out-dir", "ds/images/../images/images"))
    refused(result, "ds/images/../images/images: train.out_dir would write into the input training data folder "
                    "ds/images/images; choose another output folder")
    assert snapshot(here) == before


def test_train_out_dir_that_would_replace_the_split_file_is_refused(here, training_data):
    shutil.copytree(training_data, "ds")
    Path("run").mkdir()
    names = sorted(p.stem for p in Path("ds/images/images").glob("*.tif"))
    Path("run/split.json").write_text(f'{{"train": ["{names[0]}", "{names[1]}"], "val": ["{names[2]}"]}}\n')
    before = snapshot(here)
    result = run(*train_args("--data", "ds", "--out-dir", "run", "--set", "data.split_file=run/split.json"))
    refused(result, "run/split.json: train.out_dir would overwrite the input split file run/split.json; "
                    "choose another output path")
    assert snapshot(here) == before


def test_chip_out_that_is_the_input_dataset_folder_is_refused(here, flat_dataset):
    ds = Path(os.path.relpath(flat_dataset.root))
    before = snapshot(here)
    refused(run("chip", ds, "--out", ds, "--overwrite"),
            f"{ds}: --out would write into the input dataset folder {ds}; choose another output folder")
    image, label = (Path(os.path.relpath(p)) for p in (flat_dataset.scenes[0].image, flat_dataset.scenes[0].mask))
    refused(run("chip", image, "--labels", label, "--out", ds, "--overwrite"),
            f"{ds / 'images'}: --out would write into the input scene folder {image.parent}; "
            "choose another output folder")
    assert snapshot(here) == before


def test_chip_index_that_is_the_vector_labels_is_refused(here, synthetic_scene):
    shutil.copy(synthetic_scene.image, "s.tif")
    Path("out").mkdir()
    shutil.copy(synthetic_scene.roofs, "out/index.gpkg")
    before = snapshot(here)
    refused(run("chip", "s.tif", "--labels", "out/index.gpkg", "--out", "out", "--overwrite"),
            "out/index.gpkg: --out would overwrite the input label out/index.gpkg; choose another output path")
    assert snapshot(here) == before


def test_an_output_in_other_case_is_the_input_where_the_file_system_ignores_case(here, monkeypatch):
    """Case-insensitive file systems (macOS, Windows): IN.TIF is in.tif, existing or not."""
    Path("in.tif").write_bytes(b"scene")
    # What this machine's file system says, probed, must agree with what the check decides.
    ignores_case = os.path.exists("IN.TIF")
    assert raster_io.is_case_insensitive(here) == ignores_case
    if not ignores_case:
        raster_io.check_not_inputs([("--mask-out", "IN.TIF")], [("scene", "in.tif")])  # two files here
        monkeypatch.setattr(raster_io, "is_case_insensitive", lambda folder: True)
    with pytest.raises(OutputError, match=r"^IN\.TIF: --mask-out would overwrite the input scene in\.tif; "):
        raster_io.check_not_inputs([("--mask-out", "IN.TIF")], [("scene", "in.tif")])


# ---------------------------------------------------------------------------------------------
# Failures are one line in geoseg's own words
# ---------------------------------------------------------------------------------------------

#: The end of every refusal of a file that holds Python objects: what to pass instead.
CHECKPOINT_FIX = "pass a checkpoint written by geoseg train (e.g. saved_models/best_iou.pt)"
HOLDS_CODE = ("holds Python objects or code, which geoseg never loads (loading them could run code; "
              "a checkpoint holds only weights and plain values)")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle is ever run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path, *, shaped: bool) -> Path:
    """A torch.save file whose unpickling creates ``marker``; ``shaped``: laid out like a geoseg checkpoint."""
    import torch

    from geoseg.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    payload = Payload(marker)
    content = ({CHECKPOINT_FORMAT: CHECKPOINT_VERSION, "meta": {}, "state_dict": {}, "extra": payload}
               if shaped else {"state_dict": payload})
    torch.save(content, path)
    return path


def test_the_payload_of_the_malicious_checkpoint_is_live(here):
    """The control: a plain unpickler runs the payload, so its marker proves what geoseg did not do."""
    import pickle

    pickle.loads(pickle.dumps(Payload(here / "ran.txt")))
    assert (here / "ran.txt").exists()


@pytest.mark.parametrize("shaped", [False, True], ids=["payload", "geoseg-shaped"])
def test_predict_with_a_checkpoint_that_holds_code_runs_nothing_and_says_so(here, shaped):
    scene("s.tif")
    malicious_checkpoint(here / "evil.pt", here / "pwned.txt", shaped=shaped)
    before = snapshot(here)
    result = run("predict", "s.tif", "--model", "evil.pt", "--out", "o.gpkg")
    refused(result, f"evil.pt: {HOLDS_CODE}; {CHECKPOINT_FIX}")
    assert "weights_only" not in result.output and "trusted source" not in result.output
    assert not (here / "pwned.txt").exists()
    assert snapshot(here) == before  # no o.gpkg, nothing else


def test_checkpoint_failures_are_told_apart_without_torch_advice(here, monkeypatch):
    """Holds objects, damaged, not ours, unreadable: each in geoseg's words, never torch's."""
    import torch
    from torch import nn

    from geoseg.errors import CheckpointError
    from geoseg.checkpoints import read_checkpoint

    torch.save(nn.Linear(2, 2), "module.pt")  # a pickled module: a class to import and build
    torch.save({"state_dict": {"w": torch.zeros(2)}}, "foreign.pt")  # safe, but not geoseg's
    whole = Path("foreign.pt").read_bytes()
    Path("truncated.pt").write_bytes(whole[: len(whole) // 2])
    Path("empty.pt").write_bytes(b"")
    Path("text.pt").write_bytes(b"not a checkpoint at all\n")
    unreadable = f"is not a readable checkpoint (truncated, corrupt, or of another format); {CHECKPOINT_FIX}"
    expected = {
        "module.pt": f"module.pt: {HOLDS_CODE}; {CHECKPOINT_FIX}",
        "foreign.pt": f"foreign.pt: is not a geoseg checkpoint; {CHECKPOINT_FIX}",
        "truncated.pt": f"truncated.pt: {unreadable}",
        "empty.pt": f"empty.pt: {unreadable}",
        "text.pt": f"text.pt: {unreadable}",
    }
    for name, message in expected.items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(name)
        assert str(err.value) == message
    # An OSError while reading (here: permissions) names the cause, not a format.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint("foreign.pt")
    assert str(err.value) == ("foreign.pt: cannot be read (Permission denied); "
                              "check that the file is readable (permissions, disk)")


def test_an_encoder_weights_file_that_holds_code_runs_nothing_and_says_so(here):
    from geoseg.errors import ModelError
    from geoseg.models import create_model

    malicious_checkpoint(here / "encoder.pth", here / "pwned.txt", shaped=False)
    with pytest.raises(ModelError) as err:
        create_model(encoder="resnet18", encoder_weights="encoder.pth")
    assert str(err.value) == (
        "encoder.pth: holds Python objects or code, which geoseg never loads (loading them could run code; "
        "a weights file holds only weights and plain values); pass a .pth or .safetensors state dict of "
        "the encoder"
    )
    assert not (here / "pwned.txt").exists()


def remote(url: str) -> str:
    return f"{url}: remote inputs (URLs) are not read yet; download the file and pass its local path"


def test_every_command_refuses_a_url_input_with_the_url_intact(here, training_data):
    """Scenes, labels, checkpoints, AOIs, evaluation inputs, data folders, wherever they are given."""
    scene("s.tif")
    write_scene(here / "m.tif", draw_rectangles(70, 90, [(5, 5, 20, 30)]), rgb=False)  # a class mask
    shutil.copytree(training_data, "ds")
    url = "https://example.com/x/input.tif"
    before = snapshot(here)
    for args in [
        ["predict", "s.tif", "--model", "https://example.com/m.pt", "--out", "o.gpkg"],
        ["chip", url, "--out", "chips"],
        ["chip", "s.tif", "--labels", "s3://bucket/roofs.gpkg", "--out", "chips"],
        ["evaluate", "--pred", url, "--truth", "m.tif"],
        ["evaluate", "--pred", "m.tif", "--truth", "gs://bucket/truth.gpkg"],
        ["evaluate", "--pred", "m.tif", "--truth", "m.tif", "--aoi", "https://example.com/aoi.geojson"],
        ["benchmark", "--scene", url],
        train_args("--data", "https://example.com/ds", "--out-dir", "run"),
        train_args("--data", "ds", "--resume", "https://example.com/last.pt", "--out-dir", "run"),
    ]:
        given = next(a for a in args if "://" in a)
        refused(run(*args), remote(given))
    assert snapshot(here) == before


@pytest.mark.parametrize("path, remote_", [
    ("http://127.0.0.1:8765/s.tif", True), ("HTTPS://example.com/s.tif", True), ("s3://b/k.tif", True),
    ("gs://b/k.tif", True), ("/vsicurl/http://h/s.tif", True), ("/vsis3_streaming/b/k.tif", True),
    ("/vsizip//vsicurl/http://h/a.zip/s.tif", True),
    ("s.tif", False), ("data/s.tif", False), ("/data/http/s.tif", False), ("C://data/s.tif", False),
    ("C:/data/s.tif", False), ("/vsizip/local.zip/s.tif", False), ("./http://x", False),
    (Path("s.tif"), False),
])
def test_is_url(path, remote_):
    assert is_url(path) is remote_


# ---------------------------------------------------------------------------------------------
# Degenerate shapes cost what they should
# ---------------------------------------------------------------------------------------------
#
# A scene thinner than a chip gets one row (or column) of padded chips along its length, the
# fewest that cover it: ceil((length - chip) / stride) + 1. The 1042 chips the issue counted
# for a 10 x 100000 strip are that one row for a 128 px model (stride 96).

STRIP_RECTS = {  # (row, col, height, width): roofs that touch the strip's edges and cross chips
    "wide": [(1, 10, 4, 30), (0, 700, 7, 150), (2, 2950, 5, 50)],
    "tall": [(10, 1, 30, 4), (700, 0, 150, 7), (2950, 2, 50, 5)],
}


def strip_chips(length: int, chip: int = 64) -> int:
    """The fewest chips along a strip of ``length`` px at the default overlap (a quarter)."""
    stride = chip - chip // 4
    return math.ceil((length - chip) / stride) + 1


@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("block_size", [2048, 128])
def test_a_thin_strip_is_one_row_of_chips_and_stitches_exactly(tmp_path, shape, block_size):
    from shapely.geometry import box

    from geoseg.inference import predict_scene

    height, width = (7, 3000) if shape == "wide" else (3000, 7)
    rects = STRIP_RECTS[shape]
    label = draw_rectangles(height, width, rects)
    path = write_scene(tmp_path / "strip.tif", label)
    model = Oracle()
    res = predict_scene(path, model, oracle_meta(chip_size=64), mask_out=tmp_path / "m.tif",
                        block_size=block_size, device="cpu", precision="32")
    assert res.chips_total == res.chips_predicted == model.chips == strip_chips(3000) == 63
    with rasterio.open(tmp_path / "m.tif") as src:
        np.testing.assert_array_equal(src.read(1), label)
        t = src.transform
    expected = sorted((box(*(t @ (c, r + h)), *(t @ (c + w, r))) for r, c, h, w in rects), key=lambda g: g.bounds)
    found = sorted(res.polygons.geometry, key=lambda g: g.bounds)
    assert len(found) == len(expected)
    assert all(f.symmetric_difference(e).area == 0 for f, e in zip(found, expected))


def test_predict_cli_on_a_thin_strip_reports_one_row_of_chips(here, oracle):
    write_scene(here / "strip.tif", draw_rectangles(10, 1000, [(2, 100, 5, 40)]))
    result = run("predict", "strip.tif", "--out", "o.gpkg")
    assert result.exit_code == 0, result.output
    assert f"strip: 1 polygons, {strip_chips(1000)} chips in " in result.output
    assert oracle.chips == strip_chips(1000) == 21


def test_chip_pads_a_thin_strip_instead_of_multiplying_chips(here):
    import geopandas as gpd

    from geoseg.labels import IGNORE_INDEX

    label = draw_rectangles(7, 300, [(1, 10, 4, 30)])
    write_scene(here / "strip.tif", label)
    write_scene(here / "strip_label.tif", label, rgb=False)
    result = run("chip", "strip.tif", "--labels", "strip_label.tif", "--out", "chips", "--size", "64")
    assert result.exit_code == 0, result.output
    index = gpd.read_file("chips/index.gpkg", layer="chips")
    assert list(index["row_off"]) == [0] * 5 and list(index["col_off"]) == [0, 64, 128, 192, 236]
    for image, lab in zip(index["image"], index["label"]):
        with rasterio.open(Path("chips") / image) as c:
            assert (c.width, c.height) == (64, 64)
            inside = c.dataset_mask() > 0  # the padding is masked out
            assert inside[:7].all() and not inside[7:].any()
        with rasterio.open(Path("chips") / lab) as c:
            assert (c.read(1)[7:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("mode", ["grid", "random"])
def test_training_chips_of_a_thin_strip_are_one_padded_row(here, mode):
    from geoseg.datasets import ChipDataset, ScenePair

    label = draw_rectangles(300, 7, [(10, 1, 30, 4)])  # tall this time
    write_scene(here / "strip.tif", label)
    write_scene(here / "strip_label.tif", label, rgb=False)
    ds = ChipDataset([ScenePair(here / "strip.tif", label=here / "strip_label.tif")], chip_size=64, mode=mode)
    assert len(ds) == 5  # ceil((300 - 64) / 64) + 1, one column
    for i in range(len(ds)):
        s = ds[i]
        assert tuple(s["image"].shape) == (4, 64, 64) and int(s["window"].col_off) == 0
        assert s["valid"][:, :7].all() and not s["valid"][:, 7:].any()


# ---------------------------------------------------------------------------------------------
# Never hand back garbage
# ---------------------------------------------------------------------------------------------
#
# A checkpoint records the dtype and the value range (1st-99th percentiles per band) of its
# training scenes. A scene far outside that range is refused before any work, with both ranges
# and the fix; --rescale maps it onto the range instead. A prediction in which more than 90% of
# the valid pixels are rooftop gets a warning. Checkpoints written before the range was recorded
# predict as they did, without a word.

#: The value range a uint8 model of these tests learned: 0-255 in each of 3 bands.
UINT8_RANGE = ((0.0, 255.0),) * 3
#: The issue's refusal, for uint16_scene("s.tif") on a model that learned UINT8_RANGE.
UINT16_REFUSAL = ("s.tif: values up to 10000 (uint16) but the model learned 0-255 (uint8); rescale the scene "
                  "to 0-255 (gdal_translate -scale 500 10000 0 255 -ot Byte) or pass --rescale to map it "
                  "on the fly")
#: The same for the oracle, whose 4th band (its label, 0-1 in the scene too) is in range: named bands.
ORACLE_REFUSAL = UINT16_REFUSAL.replace("s.tif: values", "s.tif: bands 1,2,3 have values")
ROOF = (5, 5, 20, 30)


def uint16_scene(path: str | Path, *, low: int = 500, high: int = 10000) -> Path:
    """The issue's scene: 4 uint16 bands with values up to 10000, 90 x 70 px, band 4 the oracle's label.

    Bands 1-3 are noise from ``low`` to ``high`` with a bright roof (600 px at ``high``) and a
    shadow (100 px at ``low``): each more than 1% of the pixels, so the scene's 1st and 99th
    percentiles are exactly ``low`` and ``high``.
    """
    from _prediction_helpers import UTM, UTM_TRANSFORM

    label = draw_rectangles(70, 90, [ROOF])
    data = np.random.default_rng(0).integers(low, high, (4, 70, 90)).astype(np.uint16)
    r, c, h, w = ROOF
    data[:3, r:r + h, c:c + w] = high
    data[:3, 50:60, 60:70] = low
    data[3] = label
    with rasterio.open(path, "w", driver="GTiff", width=90, height=70, count=4, dtype="uint16", crs=UTM,
                       transform=UTM_TRANSFORM) as dst:
        dst.write(data)
    return Path(path)


@pytest.fixture(scope="module")
def uint8_checkpoint(tmp_path_factory) -> Path:
    """A real (tiny, random) 3-band checkpoint that learned uint8 values 0-255 (outside the tests' folders)."""
    from geoseg.checkpoints import CheckpointMeta, save_checkpoint
    from geoseg.models import create_model

    model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=(120.0,) * 3, std=(60.0,) * 3, chip_size=64, resolution=0.5,
        input_dtype="uint8", value_range=UINT8_RANGE,
    )
    return save_checkpoint(tmp_path_factory.mktemp("uint8") / "model.pt", model, meta)


def learned_uint8(bands: tuple[int, ...] = (1, 2, 3, 4)):
    """The oracle's description with a recorded uint8 range: 0-255, and 0-1 for its label band."""
    import dataclasses

    ranges = UINT8_RANGE[:3] + ((0.0, 1.0),)
    return dataclasses.replace(oracle_meta(chip_size=64, bands=bands), input_dtype="uint8",
                               value_range=ranges[:len(bands)])


class Spy(Oracle):
    """The oracle, remembering the lowest and highest value it was given in the bands before the label."""

    low = high = None

    def forward(self, x):
        seen = x[:, :-1]
        self.low = min(float(seen.min()), self.low if self.low is not None else float("inf"))
        self.high = max(float(seen.max()), self.high if self.high is not None else float("-inf"))
        return super().forward(x)


def test_the_issue_uint16_scene_outside_the_learned_values_is_refused_with_the_numbers_and_the_fix(
        here, uint8_checkpoint):
    uint16_scene("s.tif")
    before = snapshot(here)
    result = run("predict", "s.tif", "--model", uint8_checkpoint, "--bands", "1,2,3", "--out", "o.gpkg",
                 "--mask-out", "m.tif")
    refused(result, UINT16_REFUSAL)
    assert snapshot(here) == before


def test_rescale_predicts_the_uint16_scene_and_logs_the_mapping(here, uint8_checkpoint, caplog):
    uint16_scene("s.tif")
    with caplog.at_level("WARNING"):
        result = run("predict", "s.tif", "--model", uint8_checkpoint, "--bands", "1,2,3", "--out", "o.gpkg",
                     "--mask-out", "m.tif", "--rescale", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote " in result.output and Path("o.gpkg").exists() and Path("m.tif").exists()
    maps = [r.getMessage() for r in caplog.records if "--rescale maps" in r.getMessage()]
    assert maps == ["s.tif: --rescale maps the values linearly onto the model's (1st-99th percentiles): "
                    "band 1 500-10000 -> 0-255, band 2 500-10000 -> 0-255, band 3 500-10000 -> 0-255"]


def test_rescaled_values_land_in_the_learned_range_and_the_oracle_finds_the_roof(tmp_path):
    from geoseg.errors import CheckpointError
    from geoseg.inference import predict_scene

    path = uint16_scene(tmp_path / "s.tif")
    with pytest.raises(CheckpointError) as err:
        predict_scene(path, Oracle(), learned_uint8(), device="cpu")
    assert str(err.value) == ORACLE_REFUSAL.replace("s.tif", str(path), 1)
    model = Spy()
    res = predict_scene(path, model, learned_uint8(), mask_out=tmp_path / "m.tif", rescale=True, device="cpu",
                        precision="32")
    # 500 -> 0 and 10000 -> 255: the model sees what it learned, not 40x more.
    assert model.low == pytest.approx(0.0, abs=0.01) and model.high == pytest.approx(255.0, abs=0.01)
    with rasterio.open(tmp_path / "m.tif") as src:  # the label band (0-1 on both sides) is unchanged
        np.testing.assert_array_equal(src.read(1), draw_rectangles(70, 90, [ROOF]))
    assert len(res.polygons) == 1


def test_several_scenes_one_outside_the_learned_values_is_refused_before_any_is_predicted(here, monkeypatch):
    model = Oracle()
    stand_in_model(monkeypatch, model, learned_uint8())
    scene("a.tif")  # uint8, in range
    uint16_scene("b.tif")
    refused(run("predict", "a.tif", "b.tif", "--out", "o.gpkg"), ORACLE_REFUSAL.replace("s.tif", "b.tif"))
    assert model.calls == 0 and not Path("o.gpkg").exists()


@pytest.mark.parametrize("case", ["float reflectance", "uint16 that fits", "dark uint8"])
def test_value_range_rule(tmp_path, case):
    """Another encoding is refused in either direction; a dtype whose values fit, or a darker scene, is not."""
    from _prediction_helpers import UTM, UTM_TRANSFORM

    from geoseg.errors import CheckpointError
    from geoseg.inference.checks import check_value_range
    from geoseg.raster_io import open_scene

    rng = np.random.default_rng(1)
    reflectance = rng.uniform(0, 1, (3, 40, 50))
    reflectance[:, :2] = 0.0  # 2 of 40 rows at each end: the 1st and 99th percentiles are 0 and 1
    reflectance[:, -2:] = 1.0
    data, dtype = {
        "float reflectance": (reflectance, "float32"),  # 255x darker than 0-255
        "uint16 that fits": (rng.integers(0, 256, (3, 40, 50)), "uint16"),
        "dark uint8": (rng.integers(0, 60, (3, 40, 50)), "uint8"),  # 99th percentile about 59: 4.3x darker
    }[case]
    path = tmp_path / "s.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=3, dtype=dtype, crs=UTM,
                       transform=UTM_TRANSFORM) as dst:
        dst.write(data.astype(dtype))
    info, meta = open_scene(path), learned_uint8((1, 2, 3))
    if case != "float reflectance":
        assert check_value_range(info, meta, (1, 2, 3)) is None
        return
    with pytest.raises(CheckpointError) as err:
        check_value_range(info, meta, (1, 2, 3))
    assert str(err.value) == (
        f"{path}: values up to 1 (float32) but the model learned 0-255 (uint8); rescale the scene to 0-255 "
        "(gdal_translate -scale 0 1 0 255 -ot Byte) or pass --rescale to map it on the fly")


def test_a_prediction_that_is_mostly_rooftop_is_flagged_as_likely_garbage(tmp_path, caplog):
    """The share counts valid pixels only (nodata rows are not background), over every block."""
    from geoseg.inference import predict_scene

    label = draw_rectangles(80, 100, [(0, 0, 70, 100)])  # rows 0-69 rooftop, 70-74 background
    nodata = np.zeros((80, 100), bool)
    nodata[75:] = True
    path = write_scene(tmp_path / "roofs.tif", label, nodata_mask=nodata)
    with caplog.at_level("WARNING"):
        predict_scene(path, Oracle(), oracle_meta(chip_size=64), block_size=64, device="cpu", precision="32")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 93.3% of the valid pixels are rooftop, which is rarely real; check the bands (--bands) and "
        "the scene's value range against the model's (--rescale)"]  # 7000 of 7500
    caplog.clear()
    with caplog.at_level("WARNING"):
        predict_scene(write_scene(tmp_path / "one.tif", draw_rectangles(80, 100, [(5, 5, 20, 30)])), Oracle(),
                      oracle_meta(chip_size=64), device="cpu", precision="32")
    assert caplog.records == []


def test_an_old_checkpoint_without_a_value_range_predicts_without_a_word(here, monkeypatch, uint8_checkpoint,
                                                                        caplog):
    import torch

    from geoseg.checkpoints import read_checkpoint

    # A checkpoint file written before the fields existed loads, without them.
    payload = torch.load(uint8_checkpoint, weights_only=True)
    for key in ("input_dtype", "value_range"):
        del payload["meta"][key]
    torch.save(payload, here / "old.pt")
    meta = read_checkpoint("old.pt").meta
    assert meta.input_dtype is None and meta.value_range is None and meta.bands == (1, 2, 3)
    # Such a model predicts the scene a recorded range refuses, as before: no check, no message.
    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    uint16_scene("s.tif")
    with caplog.at_level("WARNING"):
        result = run("predict", "s.tif", "--out", "o.gpkg")
    assert result.exit_code == 0, result.output
    assert "s: 1 polygons" in result.output and caplog.records == []
    # --rescale cannot map onto a range that is not recorded: it says so rather than guess.
    refused(run("predict", "s.tif", "--out", "o2.gpkg", "--rescale"),
            "s.tif: --rescale needs the value range the model learned, and this (older) checkpoint does not "
            "record it; retrain the model with this geoseg, or rescale the scene to the training data's range "
            "yourself (gdal_translate -scale)")


def test_value_range_is_the_percentiles_of_a_decimated_read_of_valid_pixels(tmp_path):
    from geoseg.augment import value_range
    from geoseg.raster_io import read_decimated

    path = uint16_scene(tmp_path / "s.tif")
    assert value_range([path], (1, 2, 3)) == ((500.0, 10000.0),) * 3
    assert value_range([path], (4,)) == ((0.0, 1.0),)
    data, valid = read_decimated(path, bands=(1, 2), max_pixels=1000)  # never more than asked
    assert data.shape == (2, 24, 30) and data.dtype == np.uint16 and valid.shape == (24, 30) and valid.all()
    # Nodata pixels are no values: a 0-filled border would otherwise make the low end 0.
    label = draw_rectangles(70, 90, [ROOF])
    nodata = np.zeros((70, 90), bool)
    nodata[:, :20] = True
    holed = write_scene(tmp_path / "holed.tif", label, nodata_mask=nodata)
    (low, high), = value_range([holed], (1,))
    assert low >= 1 and high <= 254  # write_scene's noise is 1-254
    # Training: a sample of at most max_scenes scenes (evenly spaced), their pixels pooled.
    assert value_range([holed, path], (1,), max_scenes=1)[0][1] <= 254  # holed.tif only
    assert value_range([holed, path], (1,), max_scenes=2)[0][1] == 10000  # 600 of 11200 pixels
    assert value_range([], (1,)) is None


# ---------------------------------------------------------------------------------------------
# Outputs appear whole or not at all
# ---------------------------------------------------------------------------------------------
# A run publishes its outputs together when all are written (geoseg.publish.Publication):
# without --overwrite none replaces a file, even one another run published a moment ago, and
# a failure part-way takes back what the run had published.

def temporaries(folder: Path) -> list[str]:
    """Every geoseg temporary (file or folder) under ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(TEMP_PREFIX + "*"))


#: A ``predict`` process for the race: the oracle model, and both processes meet right before
#: they publish, so that both passed every existence check and both try to publish.
RACE_CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from click.testing import CliRunner
import cli
from _prediction_helpers import Oracle, oracle_meta
from geoseg import publish
from geoseg.inference import job

me, rounds = int(sys.argv[2]), int(sys.argv[3])
job.load_model = lambda path, **kw: (Oracle(), oracle_meta(chip_size=64))
from geoseg import inputs
inputs.check_model_path = lambda path: path  # no checkpoint file: the stand-in model
commit, now = publish.Publication.commit, {"round": 0}

def meet_then_commit(self):
    if self.outputs:
        Path(f"sync/{now['round']}.{me}").touch()
        other, deadline = Path(f"sync/{now['round']}.{1 - me}"), time.monotonic() + 120
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
    return commit(self)

publish.Publication.commit = meet_then_commit
results = []
for k in range(rounds):
    now["round"] = k
    r = CliRunner().invoke(cli.cli, ["predict", "in.tif", "--out", f"o{k}.gpkg", "--mask-out", f"m{k}.tif"])
    results.append([r.exit_code, r.output])
print(json.dumps(results))
"""


def test_two_runs_racing_on_one_output_exactly_one_wins_and_the_other_leaves_nothing(here):
    scene("in.tif")
    Path("sync").mkdir()
    rounds = 5
    children = [subprocess.Popen([sys.executable, "-c", RACE_CHILD, str(TESTS), str(i), str(rounds)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [child.communicate(timeout=300) for child in children]
    assert [c.returncode for c in children] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    for k in range(rounds):
        codes = sorted(results[i][k][0] for i in (0, 1))
        assert codes == [0, 1], results
        loser = next(results[i][k][1] for i in (0, 1) if results[i][k][0] == 1)
        assert re.fullmatch(rf"Error: (o{k}\.gpkg|m{k}\.tif): already exists; pass --overwrite to replace it\n",
                            loser), loser
    assert sorted(p.name for p in here.iterdir() if p.is_file()) == sorted(
        ["in.tif", *(f"o{k}.gpkg" for k in range(rounds)), *(f"m{k}.tif" for k in range(rounds))])
    assert temporaries(here) == []


def test_publishing_never_replaces_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """The move itself refuses: renameat2(RENAME_NOREPLACE), a hard link, or, without either, a check."""
    for how in ("renameat2", "link", "neither"):
        if how != "renameat2":
            monkeypatch.setattr(publish, "_RENAMEAT2", None)
        if how == "neither":
            def no_links(*args, **kwargs):
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            monkeypatch.setattr(os, "link", no_links)
        src, dst = tmp_path / f"{how}.new", tmp_path / f"{how}.out"
        src.write_text("mine")
        dst.write_text("theirs")
        with pytest.raises(FileExistsError):
            publish.move_no_replace(src, dst)
        assert (src.read_text(), dst.read_text()) == ("mine", "theirs")
        dst.unlink()
        publish.move_no_replace(src, dst)
        assert dst.read_text() == "mine" and not src.exists()


def test_a_run_that_loses_part_way_takes_back_what_it_published(here, monkeypatch):
    """Another run publishes the second output between our two moves: our first one goes too."""
    real = publish.move_no_replace

    def other_run_first(src, dst):
        if Path(dst).name == "b.tif":
            Path(dst).write_text("the other run's")
        return real(src, dst)

    monkeypatch.setattr(publish, "move_no_replace", other_run_first)
    with pytest.raises(OutputError) as err:
        with publish.publishing(overwrite=False) as pub:
            pub.file("out/a.tif").write_text("a")
            pub.file("out/b.tif").write_text("b")
    assert str(err.value) == "out/b.tif: already exists; pass --overwrite to replace it"
    assert snapshot(here) == {"out/b.tif": hashlib.sha256(b"the other run's").hexdigest()}
    assert temporaries(here) == []


def test_with_overwrite_a_failure_part_way_restores_the_files_it_replaced(here, monkeypatch):
    Path("a.tif").write_text("old a")
    real = os.replace

    def second_fails(src, dst):
        if Path(dst).name == "b.tif":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OutputError, match=r"^b\.tif: cannot be written \(no space left on device\); "):
        with publish.publishing(overwrite=True) as pub:
            pub.file("a.tif").write_text("new a")
            pub.file("b.tif").write_text("new b")
    assert sorted(p.name for p in here.iterdir()) == ["a.tif"] and Path("a.tif").read_text() == "old a"


# ---------------------------------------------------------------------------------------------
# A killed run leaves nothing a second run trips over
# ---------------------------------------------------------------------------------------------
# Every temporary is named .geoseg-tmp-<pid>-<host>-<random>-<name> (never nested); SIGTERM
# cleans up as Ctrl-C does; the next run removes the temporaries of a killed run and says so.

@pytest.fixture(scope="module")
def slow_job(tmp_path_factory) -> tuple[Path, Path]:
    """A real tiny checkpoint and a scene that keeps it busy for many seconds."""
    from geoseg.checkpoints import CheckpointMeta, save_checkpoint
    from geoseg.models import create_model

    root = tmp_path_factory.mktemp("slow")
    model = create_model(arch="unet", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch="unet", encoder="resnet18", in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=(120.0,) * 3, std=(60.0,) * 3, chip_size=64, resolution=0.5,
    )
    ckpt = save_checkpoint(root / "model.pt", model, meta)
    size = 2000
    pixels = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(root / "big.tif", "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs=UTM, transform=UTM_TRANSFORM) as dst:
        dst.write(pixels)
    return ckpt, root / "big.tif"


#: ``python -m geoseg`` with Ctrl-C delivered as an interactive shell does (a test runner
#: started in the background may pass SIGINT on ignored).
GEOSEG = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "sys.argv[0] = 'geoseg'; runpy.run_module('geoseg', run_name='__main__')")


def start_predict(folder: Path, slow_job: tuple[Path, Path]) -> subprocess.Popen:
    """Start ``geoseg predict`` of the big scene in ``folder`` (the mask beside the layer)."""
    ckpt, big = slow_job
    return subprocess.Popen(
        [sys.executable, "-c", GEOSEG, "predict", str(big), "--out", "o.gpkg", "--mask-out", "m.tif",
         "--model", str(ckpt), "--device", "cpu", "--block-size", "512"],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_blocks(runs: list[tuple[Path, subprocess.Popen]]) -> None:
    """Until each run predicts blocks: its mask's temporary and the scratch folder of its probability exist."""
    deadline = time.monotonic() + 120
    for folder, proc in runs:
        while len(list(folder.glob(TEMP_PREFIX + "*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(1.0)  # a block or two
    for _, proc in runs:
        assert proc.poll() is None, proc.communicate()


def test_sigterm_and_ctrl_c_exit_143_and_130_say_so_and_leave_the_folder_as_it_was(tmp_path, slow_job):
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):  # both at once: half the wall time
        folder = tmp_path / sig.name
        folder.mkdir()
        runs[sig] = (folder, start_predict(folder, slow_job))
    wait_for_blocks(list(runs.values()))
    for sig, (folder, proc) in runs.items():
        proc.send_signal(sig)
    for sig, (folder, proc) in runs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
        assert "Traceback" not in err
        said = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}[sig]
        assert err.splitlines()[-1] == f"interrupted by {said}; nothing was written"
        assert sorted(os.listdir(folder)) == []


def test_a_run_killed_with_sigkill_leaves_temporaries_the_next_run_removes_and_reports(
        tmp_path, slow_job, oracle, monkeypatch, caplog):
    folder = tmp_path / "k"
    folder.mkdir()
    proc = start_predict(folder, slow_job)
    wait_for_blocks([(folder, proc)])
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(os.listdir(folder))
    assert left and all(name.startswith(f"{TEMP_PREFIX}{proc.pid}-") and name.count(TEMP_PREFIX) == 1
                        for name in left), left
    files = sum(1 for name in left if (folder / name).is_file())
    monkeypatch.chdir(folder)
    scene("in.tif")
    with caplog.at_level(logging.WARNING, logger="geoseg.temporaries"):
        result = run("predict", "in.tif", "--out", "o.gpkg")
    assert result.exit_code == 0, result.output
    what = " and ".join(f"{n} temporary {noun}{'s' if n != 1 else ''}"
                        for n, noun in ((files, "file"), (len(left) - files, "folder")) if n)
    assert [r.getMessage() for r in caplog.records if r.name == "geoseg.temporaries"] == [
        f"removed {what} left in the current folder by an earlier run that was killed (pid {proc.pid})"]
    assert sorted(os.listdir(folder)) == ["in.tif", "o.gpkg"]


def dead_pid() -> int:
    """The id of a process that has just ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_checkpoint_save_removes_what_a_killed_save_left(tmp_path, caplog):
    """``train`` killed while saving leaves a temporary last.pt; the next save removes it."""
    import torch

    from geoseg.checkpoints import save_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid = dead_pid()
    stale = run_dir / f"{TEMP_PREFIX}{pid}-{HOST_TAG}-0123abcd-last.pt"
    stale.write_bytes(b"\0" * 4096)
    alive = run_dir / f"{TEMP_PREFIX}{os.getppid()}-{HOST_TAG}-0123abcd-last.pt"  # a run still working
    alive.write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="geoseg.temporaries"):
        save_checkpoint(run_dir / "last.pt", torch.nn.Conv2d(3, 2, 1), oracle_meta(chip_size=64))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([alive.name, "last.pt"])
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 1 temporary file left in {run_dir} by an earlier run that was killed (pid {pid})"]


@pytest.mark.parametrize("stop_in_epoch, interrupt, code, said, kept", [
    (2, "sigterm", 143, "SIGTERM", "kept run/last.pt of epoch 1 (continue with --resume run/last.pt)"),
    (1, "ctrl-c", 130, "Ctrl-C (SIGINT)", "no epoch finished, no checkpoint was written"),
])
def test_an_interrupted_train_says_which_checkpoint_it_kept(here, training_data, monkeypatch, stop_in_epoch,
                                                            interrupt, code, said, kept):
    from geoseg.engine.loop import EpochLoop

    real, calls = EpochLoop.train_epoch, []

    def train_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_in_epoch:
            raise cli.Terminated() if interrupt == "sigterm" else KeyboardInterrupt()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EpochLoop, "train_epoch", train_epoch)
    result = run(*train_args("--data", training_data, "--out-dir", "run"), "--set", "train.epochs=2")
    assert result.exit_code == code, result.output
    assert result.stderr == f"interrupted by {said}; {kept}\n"
    assert temporaries(here) == []
    if stop_in_epoch == 2:
        import torch

        assert torch.load("run/last.pt", weights_only=True)["extra"]["epoch"] == 1


def test_sigterm_unwinds_the_main_thread_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated):
        with cli.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# Every failure is one line: a full disk, a folder gone, two outputs that are one file
# ---------------------------------------------------------------------------------------------
# A full disk, a folder removed mid-run or an output two ways are one line that names the
# output and the fix, found before any scene is read where it can be; nothing is left behind.

ENOSPC_FIX = "free some space on that disk or choose another output folder"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["mask", "layer", "preview"])
def test_a_full_disk_while_predicting_is_one_line_and_writes_nothing(here, oracle, monkeypatch, writer):
    import matplotlib.figure
    import pyogrio

    scene("in.tif")
    before = snapshot(here)
    target, failing = {
        "mask": ("m.tif", (rasterio.io.DatasetWriter, "write")),
        "layer": ("o.gpkg", (pyogrio, "write_dataframe")),
        "preview": ("p.png", (matplotlib.figure.Figure, "savefig")),
    }[writer]
    monkeypatch.setattr(*failing, no_space)
    result = run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "m.tif", "--preview", "p.png")
    refused(result, f"{target}: cannot be written (no space left on device); {ENOSPC_FIX}")
    assert snapshot(here) == before and temporaries(here) == []


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    import torch

    from geoseg.checkpoints import save_checkpoint

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OutputError) as err:
        save_checkpoint(tmp_path / "last.pt", torch.nn.Conv2d(3, 2, 1), oracle_meta(chip_size=64))
    assert str(err.value) == f"{tmp_path / 'last.pt'}: cannot be written (no space left on device); {ENOSPC_FIX}"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_chipping_is_one_line_and_writes_nothing(here, monkeypatch):
    scene("s.tif")
    before = snapshot(here)
    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", no_space)
    refused(run("chip", "s.tif", "--out", "chips", "--size", "32"),
            f"chips: cannot be written (no space left on device); {ENOSPC_FIX}")
    assert snapshot(here) == before and not Path("chips").exists()


def test_an_output_folder_removed_during_the_run_is_one_line(here, oracle, monkeypatch):
    scene("in.tif")
    real = job.predict_scene

    def then_remove_the_folder(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.rmtree("out")
        return result

    monkeypatch.setattr(job, "predict_scene", then_remove_the_folder)
    result = run("predict", "in.tif", "--out", "out/o.gpkg", "--mask-out", "out/m.tif")
    # The polygons are spooled into out/ as they are found: the layer is the first output found missing.
    refused(result, "out/o.gpkg: cannot be written (no such file or directory); check that the folder still "
                    "exists (was it removed during the run?) or choose another one")
    assert sorted(os.listdir(here)) == ["in.tif"]


@pytest.fixture
def full_disk(here) -> Path:
    """A 4 MiB tmpfs with 48 KiB free (skipped where mounting is not permitted)."""
    mnt = here / "full"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (mnt / "filler").write_bytes(b"\0" * (4 * 1024 * 1024 - 48 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_really_full_disk_is_one_line_and_leaves_nothing(here, oracle, full_disk):
    write_scene(here / "in.tif", draw_rectangles(300, 400, [(5, 5, 20, 30)]))
    result = run("predict", "in.tif", "--out", "full/o.gpkg", "--mask-out", "full/m.tif", "--prob-out", "full/p.tif",
                 "--prob-dtype", "float16")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert re.fullmatch(rf"Error: full/(o\.gpkg|m\.tif|p\.tif): cannot be written \(no space left on device\); "
                        rf"{re.escape(ENOSPC_FIX)}\n", result.output), result.output
    assert sorted(os.listdir(full_disk)) == ["filler"]


def test_two_scenes_with_one_name_get_their_own_names_outputs_and_previews(here, oracle):
    """a/s.tif and b/s.tif: scene 'a/s' and 'b/s' in the layer, each its own mask and preview."""
    scene("a/s.tif")
    scene("b/s.tif")
    result = run("predict", "a/s.tif", "b/s.tif", "--out", "o.gpkg", "--mask-out", "masks", "--preview", "pv")
    assert result.exit_code == 0, result.output
    assert sorted(gpd.read_file("o.gpkg", layer="rooftops")["scene"]) == ["a/s", "b/s"]
    assert sorted(p.relative_to(here).as_posix() for p in here.rglob("*") if p.is_file()) == [
        "a/s.tif", "b/s.tif", "masks/a/s_mask.tif", "masks/b/s_mask.tif", "o.gpkg",
        "pv/a/s_preview.png", "pv/b/s_preview.png"]


def test_scenes_that_share_a_stem_are_named_by_what_tells_them_apart():
    assert job.scene_names([Path("a/s.tif"), Path("b/s.tif"), Path("t.tif")]) == ["a/s", "b/s", "t"]
    assert job.scene_names([Path("x/s.tif"), Path("x/s.tiff")]) == ["s.tif", "s.tiff"]


def test_two_outputs_that_are_one_file_are_refused_before_any_scene_is_read(here, oracle):
    scene("in.tif")
    before = snapshot(here)
    refused(run("predict", "in.tif", "--out", "o.gpkg", "--mask-out", "pv/{scene}.png", "--preview", "pv/{scene}.png"),
            "pv/in.png: --preview is the same file as --mask-out pv/in.png; give every output its own path")
    assert snapshot(here) == before and oracle.calls == 0


def test_previews_that_are_one_file_where_case_is_ignored_are_refused_before_any_work(here, oracle, monkeypatch):
    monkeypatch.setattr(raster_io, "is_case_insensitive", lambda folder: True)
    scene("a/s.tif")
    scene("A/s.tif")
    before = snapshot(here)
    refused(run("predict", "a/s.tif", "A/s.tif", "--out", "o.gpkg", "--preview", "pv"),
            "pv/A/s_preview.png: --preview is the same file as --preview pv/a/s_preview.png; "
            "give every output its own path")
    assert snapshot(here) == before and oracle.calls == 0


def test_an_existing_preview_is_refused_before_any_scene_is_read(here, oracle):
    scene("a/s.tif")
    scene("b/s.tif")
    Path("pv/b").mkdir(parents=True)
    Path("pv/b/s_preview.png").write_bytes(b"an earlier preview")
    before = snapshot(here)
    refused(run("predict", "a/s.tif", "b/s.tif", "--out", "o.gpkg", "--preview", "pv"),
            "pv/b/s_preview.png: already exists; pass --overwrite to replace it")
    assert snapshot(here) == before and oracle.calls == 0


# --- first contact: a missing input is answered at once ------------------------------------------


def test_a_missing_scene_or_checkpoint_is_answered_before_torch_is_imported(tmp_path):
    """The paths are checked before torch and the model stack are imported (seconds on a laptop)."""
    scene = write_scene(tmp_path / "s.tif", draw_rectangles(40, 40, [(5, 5, 10, 10)]))
    code = ("import sys\nfrom click.testing import CliRunner\nimport cli\n"
            "r = CliRunner().invoke(cli.cli, sys.argv[1:])\n"
            "print(r.exit_code, r.output.strip(), 'torch' in sys.modules, sep='|')\n")
    cases = [
        (["predict", "nothere.tif", "--out", "o.gpkg"], "Error: nothere.tif: file does not exist; check the path"),
        (["predict", str(scene), "--model", "none.pt", "--out", "o.gpkg"],
         "Error: none.pt: no checkpoint there; run `geoseg train` first or pass --model CKPT"),
        (["predict", str(scene), "--out", "o.gpkg"],  # the default checkpoint, absent here
         "Error: saved_models/best_iou.pt: no checkpoint there; run `geoseg train` first or pass --model CKPT"),
    ]
    for args, message in cases:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.strip().split("|") == ["1", message, "False"], done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]
