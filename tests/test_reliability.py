"""What geoseg promises a user, whatever they type: one section per promise, one test per way to break it.

Inputs are never written: no output of any command (predict, train, chip,
evaluate) is one of its inputs (scene, label, AOI, checkpoint, config or split
file, data folder), however the path is spelled (symlink, ``..``, hard link,
other case on a case-insensitive file system) and with or without
``--overwrite``. The refusal is one line that names the output, the input and
the fix; it comes before any input is read and leaves every file as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, write_scene
from geoseg import raster_io
from geoseg.errors import OutputError
from geoseg.inference import job
from geoseg.synthetic import make_dataset

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
    monkeypatch.setattr(job, "load_model", lambda path, **kw: (model, oracle_meta(chip_size=64)))
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
    monkeypatch.setattr(job, "open_scene", never)
    scene("in.tif")
    Path("in.yaml").write_text("predict: {threshold: 0.4}\n")
    before = snapshot(here)
    with pytest.raises(OutputError) as err:
        job.predict_files(["in.tif"], out="o.gpkg", mask_out="in.tif", overwrite=True)
    assert str(err.value) == "in.tif: --mask-out would overwrite the input scene in.tif; choose another output path"
    with pytest.raises(OutputError) as err:
        job.predict_files(["in.tif"], out="o.gpkg", prob_out="{scene}.yaml", config_file="in.yaml", overwrite=True)
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
