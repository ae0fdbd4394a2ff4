"""Tests for geoseg.datasets: layouts, chip samples (exact pixels and georeference), splits."""

from __future__ import annotations

import pickle
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.datasets import (
    ChipDataset,
    ScenePair,
    collate_samples,
    detect_layout,
    find_pairs,
    split_counts,
    split_pairs,
)
from geoseg.errors import ConfigError, DatasetError, InputFileError, LabelError
from geoseg.labels import IGNORE_INDEX
from geoseg.tiling import chip_grid


def _read(path, window=None):
    with rasterio.open(path) as src:
        return src.read(window=window)


# ---- finding pairs


def test_seed_layout(seed_dataset):
    pairs = find_pairs(seed_dataset.root)
    assert detect_layout(seed_dataset.root) == "seed"
    root = seed_dataset.root
    assert pairs == [
        ScenePair(root / "images/images" / f"scene_00{i}.tif", root / "label/label" / f"scene_00{i}_label.tif")
        for i in range(3)
    ]
    assert [p.name for p in pairs] == ["scene_000", "scene_001", "scene_002"]
    assert find_pairs(root, layout="seed") == pairs


def test_flat_and_vector_layouts(flat_dataset, vector_dataset):
    pairs = find_pairs(flat_dataset.root)
    assert [(p.image.name, p.label.name, p.vector) for p in pairs] == [
        ("scene_000.tif", "scene_000.tif", None), ("scene_001.tif", "scene_001.tif", None)
    ]
    vpairs = find_pairs(vector_dataset.root)
    assert detect_layout(vector_dataset.root) == "vector"
    assert [(p.image.name, p.label, p.vector) for p in vpairs] == [
        ("scene_000.tif", None, vector_dataset.vector), ("scene_001.tif", None, vector_dataset.vector)
    ]
    # A vector file given explicitly labels the images of any layout.
    forced = find_pairs(flat_dataset.root, vector_labels=vector_dataset.vector)
    assert all(p.vector == vector_dataset.vector and p.label is None for p in forced)
    # A single image file with a vector file.
    single = find_pairs(vpairs[0].image, vector_labels=vector_dataset.vector)
    assert single == [ScenePair(vpairs[0].image, vector=vector_dataset.vector)]


def test_image_without_label(seed_dataset):
    label = seed_dataset.root / "label/label/scene_001_label.tif"
    label.unlink()
    image = seed_dataset.root / "images/images/scene_001.tif"
    with pytest.raises(DatasetError) as err:
        find_pairs(seed_dataset.root)
    assert str(err.value) == (
        f"{image}: has no label (expected {label}); add the label raster or remove the image"
    )


def test_empty_and_unknown_folders(tmp_path):
    (tmp_path / "ds" / "images" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "label" / "label").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        find_pairs(tmp_path / "ds")
    assert str(err.value).startswith(
        f"{tmp_path / 'ds'}: has no images ({tmp_path / 'ds/images/images'}/*.tif); "
        "put the GeoTIFF scenes there or pass another folder; use one of the layouts: seed "
    )
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError) as err:
        find_pairs(tmp_path / "other")
    assert str(err.value).startswith(f"{tmp_path / 'other'}: is not a dataset folder; use one of the layouts")
    with pytest.raises(InputFileError) as err:
        find_pairs(tmp_path / "missing")
    assert str(err.value) == f"{tmp_path / 'missing'}: folder does not exist; check the path"
    with pytest.raises(ConfigError, match="layout should be one of"):
        find_pairs(tmp_path, layout="nested")


def test_several_vector_files(vector_dataset):
    shutil.copy(vector_dataset.vector, vector_dataset.root / "more.gpkg")
    with pytest.raises(DatasetError) as err:
        find_pairs(vector_dataset.root, layout="vector")
    assert str(err.value) == (
        f"{vector_dataset.root}: needs exactly one vector label file, found more.gpkg, roofs.gpkg; "
        "pass the label file with --labels / data.vector_labels"
    )


# ---- samples


def test_grid_samples_are_the_scene_pixels(seed_dataset):
    pairs = find_pairs(seed_dataset.root)
    ds = ChipDataset(pairs, chip_size=256)
    grid = chip_grid(517, 300, size=256)
    assert len(ds) == 3 * len(grid) == 18
    for i in (0, 4, 5, 7, 17):
        s = ds[i]
        scene = seed_dataset.scenes[i // len(grid)]
        window = grid[i % len(grid)].window
        assert s["window"] == window and s["scene"] == scene.name
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 256, 256)
        np.testing.assert_array_equal(s["image"].numpy(), _read(scene.image, window).astype(np.float32))
        assert s["mask"].dtype == torch.int64
        np.testing.assert_array_equal(s["mask"].numpy(), _read(scene.mask, window)[0] // 255)
        assert s["valid"].all()
        # Georeference: the scene transform shifted by the window; the scene CRS.
        assert s["transform"] == scene.transform @ Affine.translation(window.col_off, window.row_off)
        assert CRS.from_wkt(s["crs"]) == CRS.from_epsg(32633)
    assert ds.in_channels == 3
    assert ds.ground_resolution() == pytest.approx(0.3 / 0.9996, rel=1e-4)


def test_small_scene_is_padded_and_ignored(small_scene):
    ds = ChipDataset([ScenePair(small_scene.image, label=small_scene.mask)], chip_size=256)
    assert len(ds) == 1
    s = ds[0]
    assert s["window"] == Window(0, 0, 256, 256)
    image, mask, valid = s["image"].numpy(), s["mask"].numpy(), s["valid"].numpy()
    np.testing.assert_array_equal(image[:, :150, :200], _read(small_scene.image).astype(np.float32))
    assert (image[:, 150:, :] == 0).all() and (image[:, :, 200:] == 0).all()
    assert valid[:150, :200].all() and not valid[150:, :].any() and not valid[:, 200:].any()
    np.testing.assert_array_equal(mask[:150, :200], _read(small_scene.mask)[0] // 255)
    assert (mask[~valid] == IGNORE_INDEX).all()


def test_nodata_pixels_are_ignored(nodata_scene):
    ds = ChipDataset([ScenePair(nodata_scene.image, label=nodata_scene.mask)], chip_size=128)
    s = ds[0]
    valid, mask = s["valid"].numpy(), s["mask"].numpy()
    assert not valid[:12].any() and not valid[:, :12].any() and valid[12:, 12:].all()
    assert (mask[:12] == IGNORE_INDEX).all() and set(np.unique(mask[12:, 12:])) <= {0, 1}


def test_vector_labels_give_the_raster_masks(vector_dataset):
    ds = ChipDataset(find_pairs(vector_dataset.root), chip_size=128, stride=100)
    grid = chip_grid(300, 260, size=128, stride=100)
    for i in range(len(ds)):
        s = ds[i]
        scene = vector_dataset.scenes[i // len(grid)]
        np.testing.assert_array_equal(s["mask"].numpy(), _read(scene.mask, s["window"])[0] // 255)


def test_vector_labels_in_4326_for_a_utm_scene(synthetic_scene, tmp_path):
    path = tmp_path / "roofs_4326.gpkg"
    gpd.read_file(synthetic_scene.roofs).to_crs("EPSG:4326").to_file(path)
    ds = ChipDataset([ScenePair(synthetic_scene.image, vector=path)], chip_size=256)
    stored = gpd.read_file(path).to_crs("EPSG:32633").geometry
    for i in range(len(ds)):
        s = ds[i]
        expected = rasterio.features.rasterize(
            [(g, 1) for g in stored], out_shape=(256, 256), transform=s["transform"], dtype="uint8"
        )
        np.testing.assert_array_equal(s["mask"].numpy(), expected)
        assert s["mask"].sum() > 100


def test_random_windows(seed_dataset):
    pairs = find_pairs(seed_dataset.root)
    ds = ChipDataset(pairs, chip_size=128, mode="random", chips_per_scene=5, seed=3)
    assert len(ds) == 15
    first = [w for _, w in ds.chips]
    for k, w in ds.chips:
        assert 0 <= w.col_off <= 517 - 128 and 0 <= w.row_off <= 300 - 128
    again = ChipDataset(pairs, chip_size=128, mode="random", chips_per_scene=5, seed=3)
    assert [w for _, w in again.chips] == first
    ds.set_epoch(1)
    assert [w for _, w in ds.chips] != first
    ds.set_epoch(0)
    assert [w for _, w in ds.chips] == first
    s = ds[7]
    scene = seed_dataset.scenes[1]
    np.testing.assert_array_equal(s["image"].numpy(), _read(scene.image, s["window"]).astype(np.float32))
    # Default count: as many as the grid has.
    assert len(ChipDataset(pairs, chip_size=128, mode="random")) == len(ChipDataset(pairs, chip_size=128))


def test_bands_and_transform(synthetic_scene):
    pair = ScenePair(synthetic_scene.image, label=synthetic_scene.mask)
    ds = ChipDataset([pair], chip_size=256, bands=[3, 1])
    s = ds[0]
    full = _read(synthetic_scene.image, s["window"]).astype(np.float32)
    np.testing.assert_array_equal(s["image"].numpy(), full[[2, 0]])
    assert ds.in_channels == 2

    def flip_and_scale(image, mask):
        assert image.shape == (256, 256, 3) and image.dtype == np.float32 and mask.dtype == np.uint8
        out_mask = mask[:, ::-1].copy()
        out_mask[:10] = IGNORE_INDEX
        return image[:, ::-1] / 255.0, out_mask

    t = ChipDataset([pair], chip_size=256, transform=flip_and_scale)[0]
    np.testing.assert_allclose(t["image"].numpy(), full[:, :, ::-1] / 255.0, rtol=1e-6)
    assert not t["valid"][:10].any() and t["valid"][10:].all()
    with pytest.raises(DatasetError) as err:
        ChipDataset([pair], bands=[1, 4])
    assert str(err.value) == (
        f"{synthetic_scene.image}: has 3 bands, band(s) 4 were asked for; "
        "choose bands between 1 and 3 (data.bands)"
    )


def test_bad_labels_fail_when_the_dataset_is_built(synthetic_scene, tmp_path):
    with rasterio.open(synthetic_scene.mask) as src:
        profile, mask = src.profile, src.read(1)
    mask[5, 5] = 3
    bad = tmp_path / "bad.tif"
    with rasterio.open(bad, "w", **profile) as dst:
        dst.write(mask, 1)
    with pytest.raises(LabelError, match=r"bad\.tif: has label values 3 outside the allowed set"):
        ChipDataset([ScenePair(synthetic_scene.image, label=bad)])
    profile.update(transform=synthetic_scene.transform @ Affine.translation(0, 2))
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", **profile) as dst:
        dst.write(mask, 1)
    with pytest.raises(LabelError, match=r"shifted\.tif: label grid .* differs from the grid of image"):
        ChipDataset([ScenePair(synthetic_scene.image, label=shifted)])
    with pytest.raises(DatasetError, match="no scenes to cut chips from"):
        ChipDataset([])


def test_collate_and_pickle(seed_dataset):
    ds = ChipDataset(find_pairs(seed_dataset.root), chip_size=128)
    ds[0]  # opens handles; pickling must drop them
    clone = pickle.loads(pickle.dumps(ds))
    batch = collate_samples([clone[0], clone[1], clone[2]])
    assert batch["image"].shape == (3, 3, 128, 128) and batch["mask"].shape == (3, 128, 128)
    assert batch["valid"].dtype == torch.bool
    assert batch["window"] == [ds[i]["window"] for i in range(3)] and len(batch["crs"]) == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    assert sum(b["image"].shape[0] for b in loader) == len(ds)
    ds.close()


# ---- splits


@pytest.mark.parametrize(
    "n, expected",
    [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (2, 1, 0)), (4, (2, 1, 1)), (10, (8, 1, 1)), (20, (18, 1, 1)),
     (100, (90, 5, 5))],
)
def test_split_counts(n, expected):
    assert split_counts(n, (0.9, 0.05, 0.05)) == expected
    assert sum(split_counts(n, (0.7, 0.2, 0.1))) == n


def test_split_by_scene(seed_dataset):
    pairs = find_pairs(seed_dataset.root)
    split = split_pairs(pairs)
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 1, 0]
    assert sorted(p.name for k in split for p in split[k]) == [p.name for p in pairs]
    assert split_pairs(list(reversed(pairs))) == split  # independent of input order
    other = [split_pairs(pairs, seed=s)["val"][0].name for s in range(10)]
    assert len(set(other)) > 1  # the seed matters
    with pytest.raises(ConfigError, match=r"split fractions should be three non-negative numbers"):
        split_pairs(pairs, fractions=(0.5, 0.2, 0.2))


def _coverage(dataset, split_index, cover):
    for i in range(len(dataset)):
        s = dataset.read_chip(i)
        w = s["window"]
        valid = s["valid"]
        rows, cols = np.nonzero(valid)
        cover[s["scene"]][rows + int(w.row_off), cols + int(w.col_off)] |= 1 << split_index


def test_split_by_block_never_overlaps(seed_dataset):
    pairs = find_pairs(seed_dataset.root)
    split = split_pairs(pairs, by="block", block=200, fractions=(0.6, 0.2, 0.2), seed=1)
    blocks = [(p.name, w) for k in split for p, w in split[k]]
    assert len(blocks) == len(set((n, w.col_off, w.row_off) for n, w in blocks)) == 3 * 3 * 2
    assert all(split[k] for k in ("train", "val", "test"))
    cover = {p.name: np.zeros((300, 517), np.uint8) for p in pairs}
    for idx, name in enumerate(("train", "val", "test")):
        for mode in ("grid", "random"):
            ds = ChipDataset(split[name], chip_size=128, stride=64, mode=mode, chips_per_scene=6)
            for k, w in ds.chips:  # chips start inside their block
                reg = ds.sources[k].region
                assert reg.col_off <= w.col_off < reg.col_off + reg.width
            _coverage(ds, idx, cover)
    for c in cover.values():
        assert set(np.unique(c)) <= {0, 1, 2, 4}  # no pixel read by two splits
    # Pixels outside the item's block are padding: zero image, ignored mask.
    ds = ChipDataset(split["val"], chip_size=256)
    s = ds.read_chip(0)
    region = ds.sources[ds.chips[0][0]].region
    w = s["window"]
    outside = np.ones((256, 256), bool)
    outside[int(region.row_off - w.row_off):int(region.row_off - w.row_off + region.height),
            int(region.col_off - w.col_off):int(region.col_off - w.col_off + region.width)] = False
    assert outside.any() and (s["image"][:, outside] == 0).all() and (s["mask"][outside] == IGNORE_INDEX).all()


def test_split_file(seed_dataset, tmp_path):
    pairs = find_pairs(seed_dataset.root)
    yaml_file = tmp_path / "split.yaml"
    yaml_file.write_text("train: [scene_000, scene_002]\nval: [scene_001]\n")
    split = split_pairs(pairs, split_file=yaml_file)
    assert [[p.name for p in split[k]] for k in ("train", "val", "test")] == [
        ["scene_000", "scene_002"], ["scene_001"], []
    ]
    txt = tmp_path / "split.txt"
    txt.write_text("# name split\nscene_001 val\nscene_002, test\n")
    split = split_pairs(pairs, split_file=txt)
    assert [[p.name for p in split[k]] for k in ("train", "val", "test")] == [
        ["scene_000"], ["scene_001"], ["scene_002"]
    ]
    assert split_pairs(pairs, split_file={"val": ["scene_000.tif"]})["val"] == [pairs[0]]
    with pytest.raises(DatasetError) as err:
        split_pairs(pairs, split_file={"val": ["scene_009"]})
    assert str(err.value) == (
        "split: scene(s) 'scene_009' are not in the dataset; check the names (scene names are "
        "the image file stems; globs like 'city_*' work)"
    )
    # Globs name many scenes at once (a whole city held out); a glob that matches nothing is unknown.
    split = split_pairs(pairs, split_file={"val": ["scene_00[12]"], "test": ["scene_000*"]})
    assert [[p.name for p in split[k]] for k in ("train", "val", "test")] == [
        [], ["scene_001", "scene_002"], ["scene_000"]
    ]
    with pytest.raises(DatasetError, match=r"scene\(s\) 'town_\*' are not in the dataset"):
        split_pairs(pairs, split_file={"val": ["town_*"]})
    with pytest.raises(DatasetError, match=r"unknown split\(s\) 'validation'"):
        split_pairs(pairs, split_file={"validation": ["scene_000"]})
