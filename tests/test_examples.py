"""examples/oam_holdout.py runs its geoseg commands and sums the held-out city's counts correctly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from geoseg.evaluation import evaluate
from geoseg.synthetic import make_dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_oam_holdout_on_generated_cities(tmp_path, capsys):
    root = tmp_path / "data"
    make_dataset(root, layout="buildings", n_scenes=4, width=192, height=192, seed=3, terraces=0.5)
    names = ["kampala_a", "catanduanes_a", "catanduanes_b", "zanzibar_a"]
    for i, name in enumerate(names):  # the city names of the shipped hold-out split files
        for folder in ("images", "labels"):
            (root / folder / f"scene_{i:03d}.tif").rename(root / folder / f"{name}.tif")
    out = tmp_path / "runs"
    quick = ["data.chip_size=64", "data.train_chips_per_epoch=8", "data.batch_size=4", "train.epochs=1",
             "train.object_f1_every=0", "train.device=cpu"]
    code = _load("oam_holdout").main(["--data", str(root), "--out", str(out), "--cities", "catanduanes",
                                      *[a for s in quick for a in ("--set", s)]])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["catanduanes"]
    city = summary["catanduanes"]
    assert city["tiles"] == 2 and city["epochs"] == 1 and city["overrides"] == quick
    # Pixel counts are the sums of the per-tile evaluations of the masks geoseg predict wrote.
    want = {k: 0 for k in ("tp", "fp", "fn", "tn")}
    for name in ("catanduanes_a", "catanduanes_b"):
        px = evaluate(out / "catanduanes" / "masks" / f"{name}_mask.tif", root / "labels" / f"{name}.tif").pixel
        for k in want:
            want[k] += getattr(px, k)
    assert {k: city["pixel"][k] for k in want} == want and sum(want.values()) == 2 * 192 * 192
    tp, fp, fn = want["tp"], want["fp"], want["fn"]
    assert city["pixel"]["iou"] == (tp / (tp + fp + fn) if tp + fp + fn else 1.0)
    o = city["object"]
    assert o["f1"] == (2 * o["tp"] / (2 * o["tp"] + o["fp"] + o["fn"]) if o["tp"] + o["fp"] + o["fn"] else 1.0)
    # Objects are scored against buildings.gpkg (one polygon per building, clipped to each tile).
    import geopandas as gpd
    import rasterio
    import shapely

    assert city["object_truth"] == "buildings.gpkg"
    buildings = gpd.read_file(root / "buildings.gpkg")
    true_objects = 0
    for name in ("catanduanes_a", "catanduanes_b"):
        with rasterio.open(root / "images" / f"{name}.tif") as src:
            tile = shapely.box(*src.bounds)
        true_objects += int((buildings.geometry.intersection(tile).area > 0).sum())
    assert true_objects > 0 and o["tp"] + o["fn"] == true_objects
    printed = capsys.readouterr().out
    assert "$ " in printed and " train --config oam_cpu " in printed and "--set data.split_file=oam_val_catanduanes" in printed
    assert f"| catanduanes | 2 | {city['pixel']['iou']:.3f} |" in printed
