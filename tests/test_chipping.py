"""Tests for geoseg.chipping and the `geoseg chip` command."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from affine import Affine
from click.testing import CliRunner
from rasterio.crs import CRS
from rasterio.windows import Window, from_bounds

import cli
from geoseg.chipping import chip_scenes
from geoseg.datasets import ChipDataset, find_pairs
from geoseg.labels import IGNORE_INDEX
from geoseg.tiling import chip_grid


def _run(*args):
    result = CliRunner().invoke(cli.cli, ["chip", *map(str, args)])
    return result


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_chips_are_the_scene_pixels_at_their_bounds(synthetic_scene, tmp_path):
    out = tmp_path / "chips"
    result = _run(synthetic_scene.image, "--labels", synthetic_scene.mask, "--out", out)
    assert result.exit_code == 0, result.output
    grid = chip_grid(517, 300)
    assert result.output == (
        f"wrote {len(grid)} chips from 1 scene(s) to {out} (index: {out / 'index.gpkg'}, layer 'chips')\n"
    )
    with rasterio.open(synthetic_scene.image) as scene, rasterio.open(synthetic_scene.mask) as mask:
        for chip in grid:
            w = chip.window
            name = f"scene_{int(w.row_off)}_{int(w.col_off)}.tif"
            with rasterio.open(out / "images" / name) as c:
                assert c.crs == scene.crs and (c.width, c.height, c.count) == (256, 256, 3)
                assert c.transform == scene.transform @ Affine.translation(w.col_off, w.row_off)
                # Read the scene where the chip says it is on the ground.
                at = from_bounds(*c.bounds, transform=scene.transform)
                at = Window(round(at.col_off), round(at.row_off), round(at.width), round(at.height))
                assert at == w
                np.testing.assert_array_equal(c.read(), scene.read(window=at))
            with rasterio.open(out / "labels" / name) as lab:
                assert lab.transform == scene.transform @ Affine.translation(w.col_off, w.row_off)
                assert lab.nodata == IGNORE_INDEX and lab.dtypes[0] == "uint8"
                np.testing.assert_array_equal(lab.read(1), mask.read(1, window=w) // 255)
    index = gpd.read_file(out / "index.gpkg", layer="chips")
    assert index.crs == CRS.from_epsg(32633) and len(index) == len(grid)
    row = index.iloc[1]
    assert (row["scene"], row["col_off"], row["row_off"], row["width"], row["height"]) == ("scene", 256, 0, 256, 256)
    assert row["image"] == "images/scene_0_256.tif" and row["label"] == "labels/scene_0_256.tif"
    with rasterio.open(out / row["image"]) as c:
        assert row.geometry.bounds == pytest.approx(tuple(c.bounds))
    # The output is a flat-layout dataset.
    ds = ChipDataset(find_pairs(out), chip_size=256)
    assert len(ds) == len(grid)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging left


def test_stride_and_small_scene_padding(small_scene, tmp_path):
    out = tmp_path / "small"
    res = chip_scenes([small_scene.image], labels=[small_scene.mask], out_dir=out, size=128, stride=100)
    assert [p.name for p in res.images] == [
        "small_0_0.tif", "small_0_72.tif", "small_22_0.tif", "small_22_72.tif"
    ]
    big = chip_scenes([small_scene.image], labels=[small_scene.mask], out_dir=tmp_path / "big")
    assert [p.name for p in big.images] == ["small_0_0.tif"]
    with rasterio.open(big.images[0]) as c, rasterio.open(small_scene.image) as s:
        assert (c.width, c.height) == (256, 256) and c.transform == s.transform
        np.testing.assert_array_equal(c.read()[:, :150, :200], s.read())
        inside = c.dataset_mask() > 0  # the padding is masked out
        assert inside[:150, :200].all() and not inside[150:].any() and not inside[:, 200:].any()
    with rasterio.open(big.labels[0]) as lab:
        labels = lab.read(1)
        assert (labels[150:] == IGNORE_INDEX).all() and (labels[:, 200:] == IGNORE_INDEX).all()
    sample = ChipDataset(find_pairs(tmp_path / "big"), chip_size=256)[0]
    assert sample["valid"][:150, :200].all() and not sample["valid"][150:].any()


def test_vector_labels_in_another_crs(synthetic_scene, tmp_path):
    vec = tmp_path / "roofs.geojson"
    gpd.read_file(synthetic_scene.roofs).to_crs("EPSG:4326").to_file(vec)
    res = _run(synthetic_scene.image, "--labels", vec, "--out", tmp_path / "out", "--size", 200)
    assert res.exit_code == 0, res.output
    stored = gpd.read_file(vec).to_crs("EPSG:32633").geometry
    for path in sorted((tmp_path / "out" / "labels").iterdir()):
        with rasterio.open(path) as lab:
            expected = rasterio.features.rasterize([(g, 1) for g in stored], out_shape=(200, 200),
                                                   transform=lab.transform, dtype="uint8")
            np.testing.assert_array_equal(lab.read(1), expected)


def test_dataset_folder_as_scene(seed_dataset, tmp_path):
    out = tmp_path / "out"
    res = _run(seed_dataset.root, "--out", out, "--size", 256)
    assert res.exit_code == 0, res.output
    index = gpd.read_file(out / "index.gpkg")
    assert list(index["scene"].unique()) == ["scene_000", "scene_001", "scene_002"]
    assert len(index) == 18 and index["label"].notna().all()
    with rasterio.open(out / "labels/scene_002_44_261.tif") as lab:
        mask = seed_dataset.scenes[2].mask
        with rasterio.open(mask) as m:
            np.testing.assert_array_equal(lab.read(1), m.read(1, window=Window(261, 44, 256, 256)) // 255)


def test_demo(tmp_path):
    res = _run("--demo", tmp_path / "demo")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "demo" / "demo.tif").exists() and (tmp_path / "demo/chips/index.gpkg").exists()
    assert res.output.startswith(f"generated {tmp_path / 'demo' / 'demo.tif'}\nwrote 12 chips from 1 scene(s)")
    again = _run("--demo", tmp_path / "demo")
    assert again.exit_code == 1
    assert again.output == f"Error: {tmp_path / 'demo' / 'demo.tif'}: already exists; pass --overwrite to replace it\n"


# ---- bad input: one line, exit 1, nothing written


def _bad(args, out, message):
    res = _run(*args, "--out", out)
    assert res.exit_code == 1, res.output
    assert res.output == f"Error: {message}\n"
    assert not out.exists()


def test_missing_scene(tmp_path):
    missing = tmp_path / "nope.tif"
    _bad([missing], tmp_path / "out", f"{missing}: file does not exist; check the path")


def test_not_a_raster(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("hello")
    res = _run(p, "--out", tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith(f"Error: {p}: is not a raster GDAL can read (")
    assert res.output.count("\n") == 1 and not (tmp_path / "out").exists()


def test_truncated_scene_among_good_ones(synthetic_scene, tmp_path):
    cut = tmp_path / "cut.tif"
    cut.write_bytes(synthetic_scene.image.read_bytes()[:20000])
    res = _run(synthetic_scene.image, cut, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert res.output.startswith(f"Error: {cut}: cannot be read, the file looks truncated or corrupt (")
    assert res.output.endswith("; re-export or re-download it\n") and res.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_no_crs_needs_assume_crs(synthetic_scene, tmp_path):
    with rasterio.open(synthetic_scene.image) as src:
        profile, data = src.profile, src.read()
    profile.update(crs=None)
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", **profile) as dst:
        dst.write(data)
    _bad([nocrs], tmp_path / "out", f"{nocrs}: has no CRS; georeference it (gdal_edit.py -a_srs EPSG:XXXX) "
         "or pass --assume-crs EPSG:XXXX")
    res = _run(nocrs, "--out", tmp_path / "out", "--assume-crs", "EPSG:32633")
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "out/images/nocrs_0_0.tif") as c:
        assert c.crs == CRS.from_epsg(32633)


def test_label_grid_and_values(synthetic_scene, tmp_path):
    with rasterio.open(synthetic_scene.mask) as src:
        profile, mask = src.profile, src.read(1)
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", **{**profile, "transform": synthetic_scene.transform @ Affine.translation(3, 0)}) as d:
        d.write(mask, 1)
    res = _run(synthetic_scene.image, "--labels", shifted, "--out", tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith(
        f"Error: {shifted}: label grid (EPSG:32633, 517x300 px, origin (500001, 4.65e+06), pixel (0.3, -0.3)) "
        f"differs from the grid of image {synthetic_scene.image} (EPSG:32633, 517x300 px"
    )
    bad = tmp_path / "bad.tif"
    mask[0, :3] = [5, 6, 7]
    with rasterio.open(bad, "w", **profile) as d:
        d.write(mask, 1)
    _bad([synthetic_scene.image, "--labels", bad], tmp_path / "out",
         f"{bad}: has label values 5, 6, 7 outside the allowed set {{0, 255}} (0/255 binary) or "
         "{0, 1} (0/1 binary); recode the labels, or set data.classes / data.label_values to match them")


def test_dataset_errors(seed_dataset, tmp_path):
    empty = tmp_path / "empty"
    (empty / "images" / "images").mkdir(parents=True)
    res = _run(empty, "--out", tmp_path / "out")
    assert res.exit_code == 1 and res.output.startswith(f"Error: {empty}: has no images (")
    (seed_dataset.root / "label/label/scene_002_label.tif").unlink()
    _bad([seed_dataset.root], tmp_path / "out",
         f"{seed_dataset.root / 'images/images/scene_002.tif'}: has no label "
         f"(expected {seed_dataset.root / 'label/label/scene_002_label.tif'}); add the label raster or remove the image")


def test_label_count_mismatch(seed_dataset, tmp_path):
    s = seed_dataset.scenes
    _bad([s[0].image, s[1].image, "--labels", s[0].mask], tmp_path / "out",
         "--labels: 1 label raster(s) for 2 image scene(s); pass one label raster per image, "
         "in the same order, or one vector file")


def test_existing_output_needs_overwrite(synthetic_scene, tmp_path):
    out = tmp_path / "out"
    assert _run(synthetic_scene.image, "--out", out).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    res = _run(synthetic_scene.image, "--out", out)
    assert res.exit_code == 1
    assert res.output == f"Error: {out / 'index.gpkg'}: already exists; pass --overwrite to replace it\n"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # A chip that is in the way is refused too, before anything is written.
    (out / "index.gpkg").unlink()
    res = _run(synthetic_scene.image, "--out", out)
    assert res.output == f"Error: {out / 'images/scene_0_0.tif'}: already exists; pass --overwrite to replace it\n"
    res = _run(synthetic_scene.image, "--out", out, "--overwrite")
    assert res.exit_code == 0 and (out / "index.gpkg").exists()


def test_usage_errors(tmp_path):
    assert _run().exit_code == 2
    res = CliRunner().invoke(cli.cli, ["chip", str(tmp_path / "x.tif")])
    assert res.exit_code == 2 and "missing option '--out'" in res.output


def test_failure_midway_leaves_nothing(synthetic_scene, tmp_path, monkeypatch):
    import geoseg.chipping as chipping
    from geoseg.errors import InputFileError

    calls = []
    real = chipping.read_resampled

    def flaky(src, scene, grid, window, **kw):
        calls.append(window)
        if len(calls) == 4:
            raise InputFileError(f"{src.name}: cannot read window; re-export it")
        return real(src, scene, grid, window, **kw)

    monkeypatch.setattr(chipping, "read_resampled", flaky)
    out = tmp_path / "new"
    with pytest.raises(InputFileError):
        chip_scenes([synthetic_scene.image], out_dir=out)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    calls.clear()
    with pytest.raises(InputFileError):
        chip_scenes([synthetic_scene.image], out_dir=existing)
    assert _files(existing) == ["keep.txt"]


def test_scenes_in_several_crss_share_a_4326_index(tmp_path):
    from geoseg.synthetic import make_scene

    a = make_scene(tmp_path, name="utm", width=120, height=100, seed=1)
    b = make_scene(tmp_path, name="merc", width=120, height=100, seed=2, crs="EPSG:3857",
                   origin=(1_669_792.0, 5_160_979.0))
    res = chip_scenes([a.image, b.image], out_dir=tmp_path / "out", size=64)
    index = gpd.read_file(res.index)
    assert index.crs == CRS.from_epsg(4326)
    assert list(index["crs"].unique()) == ["EPSG:32633", "EPSG:3857"]
    for _, row in index.iterrows():
        with rasterio.open(tmp_path / "out" / row["image"]) as c:
            corners = gpd.GeoSeries(gpd.points_from_xy(
                [c.bounds.left, c.bounds.right], [c.bounds.bottom, c.bounds.top]), crs=c.crs)
            for p in corners.to_crs("EPSG:4326"):
                assert row.geometry.distance(p) < 1e-9
