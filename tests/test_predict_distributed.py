"""Prediction under torchrun: scenes sharded by rank, partial layers merged by rank 0.

Two gloo ranks on CPU must write exactly what one process writes (same polygons,
same attributes, same order, same masks), leave no partial file behind, and fail
together, writing nothing, when one rank fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import torch.multiprocessing as mp
from affine import Affine

from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg.config import PredictConfig
from geoseg.inference.distributed import assign_scenes
from geoseg.temporaries import TEMP_PREFIX

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_scenes_go_largest_first_to_the_least_loaded_rank():
    assert assign_scenes([100, 400, 50, 300, 200], 2) == [0, 0, 0, 1, 1]
    assert assign_scenes([100, 400, 50, 300, 200], 3) == [2, 0, 1, 1, 2]
    assert assign_scenes([5, 5], 4) == [0, 1]  # more ranks than scenes: some ranks idle
    assert assign_scenes([7, 3, 9], 1) == [0, 0, 0]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    """Three scenes of different sizes; b is in Web Mercator (its polygons are reprojected)."""
    root = tmp_path_factory.mktemp("scenes")
    a = write_scene(root / "a.tif", draw_rectangles(200, 300, [(10, 10, 30, 40), (100, 90, 70, 80)]))
    b = write_scene(root / "b.tif", draw_rectangles(260, 320, [(20, 30, 40, 50), (150, 200, 60, 60)]),
                    crs="EPSG:3857", transform=Affine(0.5, 0, 1113194.9, 0, -0.5, 4865942.3), seed=1)
    c = write_scene(root / "c.tif", draw_rectangles(120, 140, [(5, 5, 20, 20)]), seed=2)
    return [a, b, c]


def _rank_main(rank: int, world: int, port: int, kwargs: dict, fail_scene: str | None, report: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(TESTS))
    import torch

    from geoseg.inference import job

    torch.set_num_threads(1)

    model = Oracle()
    job.load_model = lambda path, **kw: (model, oracle_meta(chip_size=64))
    if fail_scene is not None:
        real = job.predict_scene

        def predict_scene(path, *args, **kw):
            if Path(path).stem == fail_scene:
                raise RuntimeError(f"CUDA out of memory on {Path(path).name}")
            return real(path, *args, **kw)

        job.predict_scene = predict_scene
    try:
        summary = job.predict(**kwargs)
        out = {"features": summary.features, "scenes": [r.name for r in summary.results],
               "rank": summary.shard.rank, "world": summary.shard.world}
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank raised
        out = {"error": f"{type(exc).__name__}: {exc}"}
    Path(report.format(rank=rank)).write_text(json.dumps(out))


def _spawn(kwargs: dict, tmp_path: Path, fail_scene: str | None = None) -> list[dict]:
    report = str(tmp_path / "rank{rank}.json")
    mp.spawn(_rank_main, args=(2, _free_port(), kwargs, fail_scene, report), nprocs=2, join=True)
    return [json.loads(Path(report.format(rank=r)).read_text()) for r in (0, 1)]


def _kwargs(scenes: list[Path], out: Path) -> dict:
    return dict(scenes=[str(s) for s in scenes], out=str(out / "roofs.gpkg"), mask_out=str(out / "masks"),
                config=PredictConfig(device="cpu", precision="32", min_area=0.0, block_size=128))


def test_two_ranks_write_what_one_process_writes(scenes, tmp_path, monkeypatch):
    ranks = _spawn(_kwargs(scenes, tmp_path / "ddp"), tmp_path)
    # b (83200 px) is largest and goes to rank 0; a (60000 px) to rank 1; c (16800 px) to rank 1.
    assert ranks == [
        {"features": 5, "scenes": ["b"], "rank": 0, "world": 2},
        {"features": 5, "scenes": ["a", "c"], "rank": 1, "world": 2},
    ]

    from geoseg.inference import job

    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    single = job.predict(**_kwargs(scenes, tmp_path / "one"))
    assert single.features == 5 and single.shard.world == 1

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert _files(ddp) == _files(one) == ["masks/a_mask.tif", "masks/b_mask.tif", "masks/c_mask.tif", "roofs.gpkg"]
    assert [n for n, _ in pyogrio.list_layers(ddp / "roofs.gpkg")] == ["rooftops", "layer_styles"]
    got = gpd.read_file(ddp / "roofs.gpkg", layer="rooftops")
    want = gpd.read_file(one / "roofs.gpkg", layer="rooftops")
    assert got.crs == want.crs == "EPSG:32633"  # the first scene's CRS, as in one process
    assert list(got["scene"]) == ["a", "a", "b", "b", "c"] and list(got["id"]) == [1, 2, 3, 4, 5]
    assert list(got.columns) == list(want.columns)
    assert got.drop(columns="geometry").equals(want.drop(columns="geometry"))
    assert all(g.equals_exact(w, 0) for g, w in zip(got.geometry, want.geometry))
    for name in ("a", "b", "c"):
        with rasterio.open(ddp / "masks" / f"{name}_mask.tif") as x, rasterio.open(one / "masks" / f"{name}_mask.tif") as y:
            assert (x.crs, x.transform) == (y.crs, y.transform) and np.array_equal(x.read(), y.read())
    assert not any(p.name.startswith(TEMP_PREFIX) for p in ddp.rglob("*"))  # no partial layers, no temporaries


def test_one_failing_rank_fails_every_rank_and_writes_nothing(scenes, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    ranks = _spawn(_kwargs(scenes, out), tmp_path, fail_scene="c")  # c is rank 1's second scene
    assert ranks == [
        {"error": "GeosegError: rank 1 of 2 failed: CUDA out of memory on c.tif"},
        {"error": "RuntimeError: CUDA out of memory on c.tif"},
    ]
    assert _files(out) == []  # no layer, no partial layer, no mask


@pytest.mark.slow
def test_torchrun_runs_the_predict_command(scenes, tmp_path):
    """The real entry point: torchrun -m geoseg predict with a real (tiny, random) checkpoint."""
    from geoseg.checkpoints import CheckpointMeta, save_checkpoint
    from geoseg.models import create_model

    model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2, class_names=("background", "rooftop"),
        bands=(1, 2, 3), mean=(120.0,) * 3, std=(60.0,) * 3, chip_size=64, resolution=0.5,
    )
    ckpt = save_checkpoint(tmp_path / "model.pt", model, meta)
    out = tmp_path / "out" / "roofs.gpkg"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "geoseg", "predict", *map(str, scenes), "--out", str(out),
           "--model", str(ckpt), "--bands", "1,2,3", "--device", "cpu", "--min-area", "0", "--simplify", "0"]
    (tmp_path / "tmp").mkdir()  # torchrun leaves a torchelastic_* folder in TMPDIR: keep it in the test's own
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    per_scene = sorted(line.split(":")[0] for line in lines if " polygons, " in line)
    assert per_scene == ["a", "b", "c"]  # each scene predicted once, by one rank
    merged = [line for line in lines if line.startswith("wrote ")]
    n = sum(int(line.split(": ")[1].split()[0]) for line in lines if " polygons, " in line)
    assert merged == [f"wrote {n} polygons to {out} (merged from 2 ranks)"]
    assert pyogrio.read_info(out, layer="rooftops")["features"] == n
    assert _files(out.parent) == ["roofs.gpkg"]


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_polygons_streamed_to_disk_make_the_layer_kept_polygons_make(scenes, tmp_path, monkeypatch, suffix):
    """One process streams polygons into a spool batch by batch (memory flat in buildings);
    the layer equals the one written from polygons kept in memory, appends and chunked
    copy included (batches of 1 feature, chunks of 2), reprojected scene included."""
    from geoseg import export
    from geoseg.inference import job

    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    monkeypatch.setattr(export, "SPOOL_BATCH", 1)
    monkeypatch.setattr(export, "SPOOL_CHUNK", 2)
    kept = job.predict(**{**_kwargs(scenes, tmp_path / "kept"), "out": str(tmp_path / "kept" / f"r{suffix}")},
                             keep_polygons=True)
    streamed = job.predict(**{**_kwargs(scenes, tmp_path / "st"), "out": str(tmp_path / "st" / f"r{suffix}")})
    assert [len(r.polygons) for r in kept.results] == [r.polygon_count for r in streamed.results] == [2, 2, 1]
    assert all(r.polygons is None for r in streamed.results)
    assert kept.features == streamed.features == 5
    assert _files(tmp_path / "st") == ["masks/a_mask.tif", "masks/b_mask.tif", "masks/c_mask.tif", f"r{suffix}"]
    got = gpd.read_file(tmp_path / "st" / f"r{suffix}")
    want = gpd.read_file(tmp_path / "kept" / f"r{suffix}")
    assert got.crs == want.crs == "EPSG:32633"
    assert list(got["id"]) == [1, 2, 3, 4, 5] and list(got["scene"]) == ["a", "a", "b", "b", "c"]
    assert got.drop(columns="geometry").equals(want.drop(columns="geometry"))
    assert all(g.equals_exact(w, 0) for g, w in zip(got.geometry, want.geometry))
    if suffix == ".gpkg":
        info = pyogrio.read_info(tmp_path / "st" / f"r{suffix}", layer="rooftops")
        assert info["geometry_type"] == pyogrio.read_info(tmp_path / "kept" / f"r{suffix}", layer="rooftops")[
            "geometry_type"] == "Polygon"
        assert [n for n, _ in pyogrio.list_layers(tmp_path / "st" / f"r{suffix}")] == ["rooftops", "layer_styles"]


def test_a_streamed_run_without_buildings_writes_an_empty_layer(tmp_path, monkeypatch):
    from geoseg.inference import job

    empty = write_scene(tmp_path / "e.tif", draw_rectangles(100, 120, []))
    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    summary = job.predict([str(empty)], out=str(tmp_path / "o.gpkg"), config=PredictConfig(device="cpu", precision="32"))
    assert summary.features == 0 and summary.results[0].polygon_count == 0
    gdf = gpd.read_file(tmp_path / "o.gpkg", layer="rooftops")
    assert len(gdf) == 0 and gdf.crs == "EPSG:32633"
    assert list(gdf.columns) == ["id", "scene", "area_m2", "perimeter_m", "confidence", "geometry"]
    assert sorted(os.listdir(tmp_path)) == ["e.tif", "o.gpkg"]
