"""Tests for ``geoseg evaluate``: table, JSON, panels, exit codes and exact error messages."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import geopandas
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from click.testing import CliRunner
from shapely.geometry import box

import cli
from geoseg.raster_io import write_geotiff

W, H = 40, 30
X0, Y0 = 500000.0, 4000030.0
GRID = Affine(1, 0, X0, 0, -1, Y0)
UTM = rasterio.crs.CRS.from_epsg(32633)
# truth A, B, C; prediction A, B shifted 3 px (IoU 70/130), D false; C missed
A, B, C = (2, 12, 2, 12), (2, 12, 20, 30), (18, 28, 2, 12)
B_SHIFTED, D = (2, 12, 23, 33), (18, 28, 25, 35)


def draw(rects, *, value: int = 1) -> np.ndarray:
    a = np.zeros((H, W), dtype=np.uint8)
    for r0, r1, c0, c1 in rects:
        a[r0:r1, c0:c1] = value
    return a


def mask(path: Path, array: np.ndarray, *, transform: Affine = GRID) -> str:
    write_geotiff(path, array, crs=UTM, transform=transform)
    return str(path)


@pytest.fixture
def case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)  # relative paths in messages, as a user types them
    aoi = geopandas.GeoSeries([shapely.segmentize(box(X0, Y0 - 30, X0 + 15, Y0), 0.5)], crs=UTM)
    geopandas.GeoDataFrame(geometry=aoi.to_crs("EPSG:4326")).to_file("aoi.geojson")
    return {
        "truth": mask(Path("truth.tif"), draw([A, B, C], value=255)),
        "pred": mask(Path("pred.tif"), draw([A, B_SHIFTED, D])),
        "image": mask(Path("image.tif"), np.stack([draw([A, B, C], value=200) + 20] * 3)),
        "aoi": "aoi.geojson",
    }


def run(*args: str):
    return CliRunner().invoke(cli.cli, ["evaluate", *args])


def test_table_shows_the_hand_computed_numbers(case) -> None:
    res = run("--pred", case["pred"], "--truth", case["truth"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    for expected in (
        "prediction  pred.tif",
        "truth       truth.tif",
        "grid        EPSG:32633, 40 x 30 px of 1 x 1 CRS units (1 m on the ground), 1200 px "
        "evaluated",
        f"  IoU              {170 / 430:.4f}",
        f"  precision        {170 / 300:.4f}",
        f"  pixel accuracy   {940 / 1200:.4f}",
        f"  mIoU             {(170 / 430 + 770 / 1030) / 2:.4f}",
        "object metrics (one-to-one matching at IoU >= 0.5)",
        f"  F1               {2 / 3:.4f}",
        "  matched (tp)          2",
        "  false (fp)            1",
        "  missed (fn)           1",
    ):
        assert expected in lines
    assert res.stderr == ""


def test_json_is_one_object_equal_to_the_table(case) -> None:
    table = run("--pred", case["pred"], "--truth", case["truth"]).stdout
    res = run("--pred", case["pred"], "--truth", case["truth"], "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # the whole of stdout is one JSON object
    assert set(d["pixel"]) >= {"iou", "precision", "recall", "f1", "accuracy", "miou"}
    assert set(d["object"]) >= {"precision", "recall", "f1", "tp", "fp", "fn"}
    px = d["pixel"]
    assert (px["tp"], px["fp"], px["fn"], px["tn"]) == (170, 130, 130, 770)
    assert (d["object"]["tp"], d["object"]["fp"], d["object"]["fn"]) == (2, 1, 1)
    assert d["pixel"]["iou"] == pytest.approx(170 / 430)
    labels = {
        ("pixel", "iou"): "IoU", ("pixel", "precision"): "precision", ("pixel", "recall"): "recall",
        ("pixel", "f1"): "F1", ("pixel", "accuracy"): "pixel accuracy", ("pixel", "miou"): "mIoU",
        ("object", "precision"): "precision", ("object", "recall"): "recall", ("object", "f1"): "F1",
        ("object", "tp"): "matched (tp)", ("object", "fp"): "false (fp)",
        ("object", "fn"): "missed (fn)",
    }
    sections = dict(zip(("pixel", "object"), table.split("object metrics")))
    for (section, key), label in labels.items():
        found = re.search(rf"^  {re.escape(label)} +(\S+)$", sections[section], re.MULTILINE)
        assert found, (section, label)
        value = d[section][key]
        shown = found.group(1)
        assert shown == (f"{value:.4f}" if isinstance(value, float) else str(value)), (section, key)


def test_aoi_in_another_crs(case) -> None:
    res = run("--pred", case["pred"], "--truth", case["truth"], "--aoi", case["aoi"], "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["aoi"] == "aoi.geojson"
    assert (d["pixel"]["tp"], d["pixel"]["fp"], d["pixel"]["fn"], d["pixel"]["tn"]) == (100, 0, 100, 250)
    assert (d["object"]["tp"], d["object"]["fp"], d["object"]["fn"]) == (1, 0, 1)


def test_iou_threshold_option(case) -> None:
    mask(Path("pred4.tif"), draw([(2, 12, 24, 34)]))  # B shifted 4 px: IoU 60/140
    mask(Path("truthB.tif"), draw([B]))
    strict = json.loads(run("--pred", "pred4.tif", "--truth", "truthB.tif", "--json").stdout)
    loose = json.loads(run("--pred", "pred4.tif", "--truth", "truthB.tif", "--json",
                           "--iou-threshold", "0.4").stdout)
    assert (strict["object"]["tp"], strict["object"]["fp"], strict["object"]["fn"]) == (0, 1, 1)
    assert (loose["object"]["tp"], loose["object"]["fp"], loose["object"]["fn"]) == (1, 0, 0)
    res = run("--pred", "pred4.tif", "--truth", "truthB.tif", "--iou-threshold", "0")
    assert res.exit_code == 2
    assert "0<x<=1" in res.stderr


def test_missing_file_is_one_line_and_exit_1(case) -> None:
    res = run("--pred", "nope.tif", "--truth", case["truth"])
    assert res.exit_code == 1
    assert res.stderr == "Error: nope.tif: file does not exist; check the path\n"
    assert res.stdout == ""


def test_not_a_raster_or_vector(case) -> None:
    Path("notes.txt").write_text("hello\n")
    res = run("--pred", "notes.txt", "--truth", case["truth"], "--json")
    assert res.exit_code == 1
    assert res.stderr == (
        "Error: notes.txt: is neither a raster nor a vector file GDAL can read; pass a mask GeoTIFF "
        "or a vector file (GeoPackage, GeoJSON, Shapefile)\n"
    )
    assert res.stdout == ""


def test_inputs_that_do_not_overlap(case) -> None:
    mask(Path("far.tif"), draw([A]), transform=Affine(1, 0, 600000, 0, -1, Y0))
    res = run("--pred", "far.tif", "--truth", case["truth"])
    assert res.exit_code == 1
    assert res.stderr == (
        "Error: far.tif: does not overlap the truth truth.tif (prediction extent (600000.00, "
        "4000000.00, 600040.00, 4000030.00), truth extent (500000.00, 4000000.00, 500040.00, "
        "4000030.00) in EPSG:32633); pass a prediction and a truth of the same area\n"
    )
    assert "Traceback" not in res.output


def test_empty_truth_warns_and_still_reports(case, caplog) -> None:
    mask(Path("empty.tif"), draw([]))
    with caplog.at_level(logging.WARNING):
        res = run("--pred", case["pred"], "--truth", "empty.tif", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["pixel"]["iou"], d["object"]["precision"], d["object"]["fp"]) == (0.0, 0.0, 3)
    assert d["warnings"] == [
        "empty.tif: the truth has no rooftops in the evaluated area; recall, IoU and F1 are "
        "1.0 if the prediction is empty too, else 0.0"
    ]
    assert d["warnings"][0] in caplog.text


def test_empty_truth_warning_reaches_stderr_of_the_real_command(case) -> None:
    mask(Path("empty.tif"), draw([]))
    proc = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "evaluate", "--pred", case["pred"],
         "--truth", "empty.tif", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["object"]["fp"] == 3
    assert proc.stderr.strip().endswith("empty.tif: the truth has no rooftops in the evaluated "
                                        "area; recall, IoU and F1 are 1.0 if the prediction is "
                                        "empty too, else 0.0")
    assert proc.stderr.startswith("WARNING ")


def test_panels_are_written_and_never_overwritten_silently(case) -> None:
    args = ["--pred", case["pred"], "--truth", case["truth"], "--panels", "out/panels.png",
            "--image", case["image"]]
    res = run(*args)
    assert res.exit_code == 0, res.output
    png = Path("out/panels.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.stdout.splitlines()[-1] == "panels      out/panels.png"
    before = png.stat().st_mtime_ns
    res = run(*args)
    assert res.exit_code == 1
    assert res.stderr == "Error: out/panels.png: already exists; pass --overwrite to replace it\n"
    assert res.stdout == ""
    assert png.stat().st_mtime_ns == before
    res = run(*args, "--overwrite", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["panels"] == "out/panels.png"


def test_panels_without_image_and_bad_image(case) -> None:
    res = run("--pred", case["pred"], "--truth", case["truth"], "--panels", "p.png")
    assert res.exit_code == 0, res.output
    assert Path("p.png").exists()
    res = run("--pred", case["pred"], "--truth", case["truth"], "--panels", "q.png",
              "--image", "nope.tif")
    assert res.exit_code == 1
    assert res.stderr == "Error: nope.tif: file does not exist; check the path\n"
    assert not Path("q.png").exists() and res.stdout == ""
    assert sorted(p.name for p in Path(".").iterdir() if p.suffix == ".png") == ["p.png"]


def test_image_needs_panels(case) -> None:
    res = run("--pred", case["pred"], "--truth", case["truth"], "--image", case["image"])
    assert res.exit_code == 2
    assert "--image is only used with --panels; add --panels panels.png" in res.stderr


def test_help_lists_the_options() -> None:
    res = CliRunner().invoke(cli.cli, ["evaluate", "--help"])
    assert res.exit_code == 0
    for option in ("--pred", "--truth", "--aoi", "--json", "--panels", "--image",
                   "--iou-threshold", "--overwrite"):
        assert option in res.stdout
