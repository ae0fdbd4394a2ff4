"""Prediction with an ``instances`` model: touching buildings split by a seeded watershed, streamed.

The instance oracle reads the true footprint, border and contact targets from
extra bands of the scene, so the polygons must equal the true buildings one to
one, whatever the block size and overlap, and equal a single whole-scene run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from shapely.geometry import box
from torch import nn

from _prediction_helpers import UTM, UTM_TRANSFORM, oracle_meta
from geoseg.errors import ConfigError
from geoseg.inference import predict_scene
from geoseg.instances import InstanceSplitter, seeds_and_elevation
from geoseg.targets import instance_targets
from geoseg.vectorize import PolygonBuilder, StripPolygonizer

# Polygons as traced (no area filter, no simplification: predict_scene's defaults are predict's, 4 m² and 0.25 m).
CPU = dict(device="cpu", precision="32", min_area=0.0, simplify=0.0)
BORDER_PX, CONTACT_PX = 2.0, 2.0

# (row, col, height, width) of each building. Block seams (block 128) at x, y = 128, 256, 384.
HOUSES = [
    # a terrace of four houses sharing walls, of different depths
    (20, 20, 30, 24), (22, 44, 26, 20), (20, 64, 34, 22), (24, 86, 28, 18),
    # a row with one-pixel gaps
    (70, 20, 20, 20), (70, 41, 20, 20), (70, 62, 24, 20),
    # a terrace across the vertical block seam x=128, one house straddling it
    (30, 112, 26, 30), (30, 142, 26, 24),
    # two houses meeting exactly on the vertical seam x=128 and one on the horizontal seam y=128
    (100, 100, 20, 28), (100, 128, 20, 30), (108, 180, 20, 26), (128, 180, 22, 26),
    # a building across both seams at (256, 256), with a neighbour sharing its wall
    (240, 236, 40, 36), (240, 272, 40, 20),
    # a free-standing house and an L of two touching houses near the right edge
    (200, 40, 24, 24), (300, 420, 30, 40), (330, 420, 16, 20),
]
HEIGHT, WIDTH = 389, 467


def _instance_ids() -> np.ndarray:
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    for k, (r, c, h, w) in enumerate(HOUSES, 1):
        assert not ids[r:r + h, c:c + w].any(), "houses must not overlap"
        ids[r:r + h, c:c + w] = k
    return ids


def _write_instance_scene(path: Path, ids: np.ndarray) -> Path:
    border, contact = instance_targets(ids, border_px=BORDER_PX, contact_px=CONTACT_PX)
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.integers(1, 255, (3, HEIGHT, WIDTH), dtype=np.uint8),
                           np.stack([(ids > 0), border, contact]).astype(np.uint8)])
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=6, dtype="uint8",
                       crs=UTM, transform=UTM_TRANSFORM) as dst:
        dst.write(data)
    return path


class InstanceOracle(nn.Module):
    """Logits (background, rooftop, border, contact) +-10 from bands 4, 5, 6 of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        roof, border, contact = (x[:, k].round().clamp(0, 1) for k in (3, 4, 5))
        sign = lambda t: t * 20.0 - 10.0  # noqa: E731
        return torch.stack([sign(1 - roof), sign(roof), sign(border), sign(contact)], dim=1) + self.bias


def _meta(**changes):
    meta = oracle_meta(bands=(1, 2, 3, 4, 5, 6))
    return dataclasses.replace(meta, target="instances",
                               target_settings={"border_width": 1.0, "contact_width": 1.0}, **changes)


def _expected() -> list[shapely.Polygon]:
    t = UTM_TRANSFORM
    return [box(*(t @ (c, r + h)), *(t @ (c + w, r))) for r, c, h, w in HOUSES]


def _sorted_wkb(gdf) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(g)) for g in gdf.geometry)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return _write_instance_scene(tmp_path_factory.mktemp("inst") / "terraces.tif", _instance_ids())


@pytest.fixture(scope="module")
def whole(scene):
    """One block covering the whole scene: the watershed of the whole scene at once."""
    res = predict_scene(scene, InstanceOracle(), _meta(), block_size=1024, overlap=16, **CPU)
    assert res.blocks == 1
    return res.polygons


def test_oracle_buildings_come_out_one_to_one(whole):
    expected = _expected()
    assert len(whole) == len(HOUSES)
    assert whole.is_valid.all()
    for geom in whole.geometry:
        match = [e for e in expected if e.intersection(geom).area > 0]
        assert len(match) == 1, geom.wkt
        assert geom.symmetric_difference(match[0]).area == 0
    # Two houses that share a wall are two polygons that share an edge.
    a, b = (whole.geometry[[g.equals(_expected()[k]) for g in whole.geometry]].iloc[0] for k in (0, 1))
    shared = a.intersection(b)
    assert shared.geom_type in ("LineString", "MultiLineString") and shared.length == pytest.approx(26 * 0.5)
    np.testing.assert_allclose(whole["confidence"], 1.0, atol=1e-3)


@pytest.mark.parametrize("block_size,overlap", [(128, 16), (128, 40), (256, 24), (144, 8)])
def test_streamed_run_equals_whole_scene_run(scene, whole, block_size, overlap):
    res = predict_scene(scene, InstanceOracle(), _meta(), block_size=block_size, overlap=overlap, **CPU)
    assert res.blocks > 1
    assert _sorted_wkb(res.polygons) == _sorted_wkb(whole)


def test_no_instances_gives_the_footprint_blobs(scene):
    res = predict_scene(scene, InstanceOracle(), _meta(), block_size=128, overlap=16, instances=False, **CPU)
    # Touching houses merge: 1 terrace + 3 in the gap row (apart) + 1 across x=128 + 1 at x=128
    # + 1 at y=128 + 1 at the (256, 256) seams + 1 free-standing + 1 L = 10 blobs.
    assert len(res.polygons) == 10
    union = shapely.union_all(_expected())
    assert shapely.union_all(list(res.polygons.geometry)).symmetric_difference(union).area == 0


def test_prob_out_has_rooftop_border_and_contact_bands(scene, tmp_path):
    out = tmp_path / "p.tif"
    predict_scene(scene, InstanceOracle(), _meta(), prob_out=out, polygons=False, block_size=128, **CPU)
    ids = _instance_ids()
    border, contact = instance_targets(ids, border_px=BORDER_PX, contact_px=CONTACT_PX)
    with rasterio.open(out) as src:
        assert src.count == 3
        assert src.descriptions == ("rooftop probability (value / 254)", "border probability (value / 254)",
                                    "contact probability (value / 254)")
        data = src.read()
    np.testing.assert_array_equal(data[0] > 127, ids > 0)
    np.testing.assert_array_equal(data[1] > 127, border > 0)
    np.testing.assert_array_equal(data[2] > 127, contact > 0)


def test_instances_on_a_footprint_checkpoint_is_refused(scene):
    with pytest.raises(ConfigError, match=r"^--instances needs a model trained with model.target=instances; "
                                          r"this checkpoint learned footprints only"):
        predict_scene(scene, InstanceOracle(), dataclasses.replace(_meta(), target="footprint"),
                      instances=True, **CPU)


def test_simplified_neighbours_keep_their_shared_wall(scene):
    """Coverage simplification: a jagged shared wall stays one edge, no gap, no overlap."""
    ids = np.zeros((40, 60), dtype=np.int32)
    ids[5:35, 5:30] = 1
    ids[5:35, 30:55] = 2
    ids[10:20, 28:30] = 2  # a jagged wall: B reaches into A
    ids[25:30, 30:33] = 1
    border, contact = instance_targets(ids, border_px=2, contact_px=2)
    prob = np.stack([(ids > 0), border, contact]).astype(np.float32)
    splitter = InstanceSplitter()
    poly = StripPolygonizer(width=60, height=40, keep_pixels=("seed", "elevation"))
    poly.add_strip(0, (ids > 0).astype(np.uint8), prob[0], splitter.strip_values(prob))
    records = splitter(poly.finish())
    assert len(records) == 2 and records[0].group == records[1].group > 0
    builder = PolygonBuilder(transform=UTM_TRANSFORM, crs=rasterio.crs.CRS.from_string(UTM), width=60, height=40,
                             scene="s", simplify=1.0)
    builder.add(records)
    a, b = builder.frame().geometry
    assert a.is_valid and b.is_valid
    assert a.intersection(b).area == 0
    assert a.union(b).area == pytest.approx(box(0, 0, 25, 30).area * 2 * 0.25, rel=0.03)
    assert a.intersection(b).length > 10  # still one shared wall, 30 px * 0.5 m long with its jogs


def test_seeds_and_elevation():
    fp = np.array([0.9, 0.9, 0.9, 0.4])
    border = np.array([0.1, 0.6, 0.0, 0.0])
    contact = np.array([0.2, 0.0, 0.5, 0.0])
    seed, elev = seeds_and_elevation(fp, border, contact)
    assert seed.tolist() == [True, False, False, False]
    assert elev.tolist() == [round(254 * (0.25 * 0.1 + 0.75 * 0.2)), round(254 * 0.25 * 0.6), round(254 * 0.375), 0]


def test_a_component_over_the_pixel_limit_is_kept_whole(caplog):
    ids = np.zeros((20, 30), dtype=np.int32)
    ids[2:18, 2:14], ids[2:18, 14:28] = 1, 2
    border, contact = instance_targets(ids, border_px=2, contact_px=2)
    prob = np.stack([(ids > 0), border, contact]).astype(np.float32)
    splitter = InstanceSplitter()
    for limit, expected in ((1000, 2), (100, 1)):
        poly = StripPolygonizer(width=30, height=20, keep_pixels=("seed", "elevation"), pixel_limit=limit)
        for r0 in (0, 7, 13):  # three strips: the component's pixels are carried across them
            rows = slice(r0, {0: 7, 7: 13, 13: 20}[r0])
            poly.add_strip(r0, (ids[rows] > 0).astype(np.uint8), prob[0, rows],
                           splitter.strip_values(prob[:, rows]))
        with caplog.at_level("WARNING", logger="geoseg.instances"):
            records = splitter(poly.finish())
        assert len(records) == expected
    assert caplog.messages == ["a rooftop area of 416 pixels is too large to split into buildings (memory); "
                               "it is kept as one polygon"]
    assert sorted(r.count for r in splitter(_split_once(ids, prob))) == [16 * 12, 16 * 14]


def _split_once(ids, prob):
    poly = StripPolygonizer(width=ids.shape[1], height=ids.shape[0], keep_pixels=("seed", "elevation"))
    poly.add_strip(0, (ids > 0).astype(np.uint8), prob[0], InstanceSplitter().strip_values(prob))
    return poly.finish()


@pytest.mark.parametrize("seed", [2, 3])
def test_generated_terraces_split_one_to_one_and_streamed_equals_whole(tmp_path, seed):
    """Rotated terraces from the scene generator: one polygon per house, whatever the blocks.

    On rotated walls the flood may hand a few staircase pixels of a wall to the neighbour,
    so each house is matched at IoU >= 0.99 rather than pixel for pixel.
    """
    from rasterio import features

    from geoseg.synthetic import instance_ids, make_scene

    s = make_scene(tmp_path, name="t", width=301, height=263, seed=seed, terraces=1.0)
    ids = instance_ids(s)
    with rasterio.open(s.image) as src:
        profile, image, res = src.profile, src.read(), src.res[0]
    border, contact = instance_targets(ids, border_px=BORDER_PX, contact_px=CONTACT_PX)
    profile.update(count=6)
    path = tmp_path / "oracle.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([image, np.stack([ids > 0, border, contact]).astype(np.uint8)]))
    meta = _meta(resolution=res)
    whole = predict_scene(path, InstanceOracle(), meta, block_size=1024, overlap=16, **CPU).polygons
    truth = [shapely.geometry.shape(g) for g, _ in
             features.shapes(ids, mask=ids > 0, connectivity=4, transform=profile["transform"])]
    touching = sum(a.touches(b) and a.intersection(b).length > 0 for i, a in enumerate(truth) for b in truth[i + 1:])
    assert touching >= 3  # terraces with shared walls
    assert len(whole) == len(truth) == len(s.polygons) and whole.is_valid.all()
    for t in truth:
        ious = sorted((g.intersection(t).area / g.union(t).area for g in whole.geometry), reverse=True)
        assert ious[0] >= 0.99 and ious[1] < 0.01
    for block_size, overlap in ((128, 24), (256, 40)):
        streamed = predict_scene(path, InstanceOracle(), meta, block_size=block_size, overlap=overlap, **CPU).polygons
        assert len(streamed) == len(whole)
        assert all(any(a.equals(b) for b in streamed.geometry) for a in whole.geometry)
