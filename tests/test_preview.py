"""Tests of geoseg.preview: size, outline placement, nodata, reprojection, memory, `predict --preview`."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from click.testing import CliRunner
from matplotlib.image import imread
from shapely.geometry import box

import cli
from _prediction_helpers import Oracle, draw_rectangles, oracle_meta, stand_in_model, write_scene
from geoseg import preview
from geoseg.errors import ConfigError, OutputError
from geoseg.plots import ROOF_COLOUR
from geoseg.preview import preview_layout, preview_paths, write_preview
from geoseg.raster_io import write_geotiff

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0)
WIDTH, HEIGHT = 400, 250  # 200 m x 125 m
#: Roofs in CRS units (metres): away from each other and from the scene edges.
ROOFS = [box(500020, 4649900, 500060, 4649950), box(500120, 4649920, 500170, 4649980)]
OUTLINE = np.round(np.array(ROOF_COLOUR) * 255)


def smooth_scene(path: Path, *, width: int = WIDTH, height: int = HEIGHT, nodata_border: int = 0) -> Path:
    """A grey gradient scene: after the per-band stretch every pixel is grey, never the outline colour."""
    rows, cols = np.mgrid[0:height, 0:width]
    grey = 60 * cols / width + 60 * rows / height
    data = np.stack([40 + grey, 80 + grey, 50 + grey]).astype(np.uint8)
    nodata = None
    if nodata_border:
        b = nodata_border
        data[:, :b], data[:, -b:], data[:, :, :b], data[:, :, -b:] = 0, 0, 0, 0
        nodata = 0
    write_geotiff(path, data, crs=CRS, transform=TRANSFORM, nodata=nodata, overwrite=False)
    return path


def png_rgb(path: Path) -> np.ndarray:
    return np.round(imread(path)[:, :, :3] * 255)


def to_png(layout: preview.PreviewLayout, x: float, y: float) -> tuple[float, float]:
    """CRS coordinates -> continuous (col, row) in the PNG of a WIDTH x HEIGHT scene."""
    col = layout.left + (x - TRANSFORM.c) / (TRANSFORM.a * WIDTH) * layout.image_width
    row = layout.top + (TRANSFORM.f - y) / (-TRANSFORM.e * HEIGHT) * layout.image_height
    return col, row


def outline_pixels(rgb: np.ndarray, tol: float = 3) -> np.ndarray:
    return np.all(np.abs(rgb - OUTLINE) <= tol, axis=2)


def roofs_in_png(layout: preview.PreviewLayout) -> list:
    return [shapely.transform(r, lambda xy: np.column_stack(to_png(layout, xy[:, 0], xy[:, 1])))
            for r in ROOFS]


def test_layout_downsamples_the_longer_side_and_never_upsamples():
    big = preview_layout(20000, 10000, max_size=1600)
    assert (big.image_width, big.image_height, big.scale) == (1600, 800, (12.5, 12.5))
    assert (big.width, big.height) == (1600 + preview.MARGIN_LEFT_PX + preview.MARGIN_RIGHT_PX,
                                       800 + preview.MARGIN_TOP_PX + preview.MARGIN_BOTTOM_PX)
    small = preview_layout(300, 200, max_size=1600)
    assert (small.image_width, small.image_height, small.scale) == (300, 200, (1.0, 1.0))
    with pytest.raises(ConfigError, match="max_size should be a positive number of pixels, got 0"):
        preview_layout(300, 200, max_size=0)


def test_outlines_lie_exactly_on_the_polygon_edges(tmp_path):
    scene = smooth_scene(tmp_path / "scene.tif")
    gdf = gpd.GeoDataFrame({"id": [1, 2]}, geometry=ROOFS, crs=CRS)
    out = write_preview(scene, gdf, tmp_path / "p.png", max_size=200)
    layout = preview_layout(WIDTH, HEIGHT, max_size=200)
    rgb = png_rgb(out)
    # one drawn pixel per PNG pixel: the scene is 200 x 125 px inside fixed margins
    assert rgb.shape[:2] == (layout.height, layout.width) == (125 + 34 + 56, 200 + 90 + 20)

    roofs = roofs_in_png(layout)
    # on each edge's midpoint, the 2 px wide line is pure outline colour
    for roof in roofs:
        coords = np.asarray(roof.exterior.coords)
        for (x0, y0), (x1, y1) in zip(coords[:-1], coords[1:]):
            col, row = (x0 + x1) / 2, (y0 + y1) / 2
            near = outline_pixels(rgb[int(row) - 1:int(row) + 2, int(col) - 1:int(col) + 2], tol=0)
            assert near.any(), (col, row)
    # and nowhere else: every outline-coloured pixel is within 1.5 px of an edge
    rows, cols = np.nonzero(outline_pixels(rgb))
    centres = shapely.points(cols + 0.5, rows + 0.5)
    dist = np.min([shapely.distance(centres, r.exterior) for r in roofs], axis=0)
    assert len(rows) > 100 and dist.max() <= 1.5
    # far from any roof (the scene centre between them, a roof's middle) the scene shows through
    for x, y in ((500090, 4649940), (500040, 4649925), (500190, 4649880)):
        col, row = to_png(layout, x, y)
        assert not outline_pixels(rgb[int(row):int(row) + 1, int(col):int(col) + 1]).any()


def test_polygons_in_another_crs_are_reprojected(tmp_path):
    scene = smooth_scene(tmp_path / "scene.tif")
    utm = gpd.GeoDataFrame({"id": [1, 2]}, geometry=ROOFS, crs=CRS)
    utm.to_crs("EPSG:4326").to_file(tmp_path / "roofs.gpkg", layer="rooftops", driver="GPKG")
    a = png_rgb(write_preview(scene, utm, tmp_path / "a.png", max_size=200))
    b = png_rgb(write_preview(scene, tmp_path / "roofs.gpkg", tmp_path / "b.png", max_size=200))
    assert outline_pixels(a).sum() > 100
    assert np.sum(outline_pixels(a) != outline_pixels(b)) <= 4


def test_nodata_is_white_and_the_title_counts_polygons(tmp_path):
    scene = smooth_scene(tmp_path / "scene.tif", nodata_border=10)
    out = write_preview(scene, gpd.GeoSeries(ROOFS[:1], crs=CRS), tmp_path / "p.png")
    layout = preview_layout(WIDTH, HEIGHT)
    rgb = png_rgb(out)
    assert rgb.shape[:2] == (layout.height, layout.width)
    frame = rgb[layout.top + 2:layout.top + 8, layout.left + 2:layout.left + 8]
    inside = rgb[layout.top + 20, layout.left + 20]
    assert (frame == 255).all() and not (inside == 255).all()


def test_existing_png_is_refused_without_overwrite(tmp_path):
    scene = smooth_scene(tmp_path / "scene.tif")
    target = tmp_path / "p.png"
    target.write_bytes(b"old")
    with pytest.raises(OutputError) as err:
        write_preview(scene, None, target)
    assert str(err.value) == f"{target}: already exists; pass --overwrite to replace it"
    assert target.read_bytes() == b"old"
    write_preview(scene, None, target, overwrite=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_scene_is_never_read_at_full_resolution(tmp_path):
    width, height = 6000, 4000  # 72 MB of uint8 RGB, 576 MB as float64
    data = np.zeros((3, height, width), dtype=np.uint8)
    data[0] = np.arange(width, dtype=np.uint32)[None, :] % 200
    data[1] = 90
    t = Affine(0.5, 0, 500000.0, 0, -0.5, 4650000.0)
    write_geotiff(tmp_path / "big.tif", data, crs=CRS, transform=t, nodata=None, overwrite=False)
    del data
    tracemalloc.start()
    try:
        write_preview(tmp_path / "big.tif", gpd.GeoSeries(ROOFS, crs=CRS), tmp_path / "p.png", max_size=400)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30e6, peak  # matplotlib's drawing buffers, well below the scene's 72 MB
    assert imread(tmp_path / "p.png").shape[:2] == (267 + 34 + 56, 400 + 90 + 20)


def test_preview_paths_for_one_and_several_scenes(tmp_path):
    assert preview_paths("p.png", ["a/x.tif"]) == [Path("p.png")]
    assert preview_paths("out/{scene}.png", ["a/x.tif", "y.tif"]) == [Path("out/x.png"), Path("out/y.png")]
    assert preview_paths("out", ["a/x.tif", "y.tif"]) == [Path("out/x_preview.png"), Path("out/y_preview.png")]
    with pytest.raises(OutputError) as err:
        preview_paths("p.png", ["x.tif", "y.tif"])
    assert str(err.value) == "p.png: is one preview file for 2 scenes; pass a folder or a template such as {scene}.png"


RECTS = [(20, 30, 40, 60), (120, 200, 50, 70)]  # (row, col, height, width) in scene pixels


@pytest.fixture
def oracle(monkeypatch):
    model = Oracle()
    stand_in_model(monkeypatch, model, oracle_meta(chip_size=64))
    return model


def test_predict_preview_draws_the_predicted_roofs(tmp_path, oracle):
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    result = CliRunner().invoke(cli.cli, [
        "predict", str(scene), "--out", str(tmp_path / "roofs.gpkg"), "--preview", str(tmp_path / "p.png"),
        "--min-area", "0", "--simplify", "0", "--device", "cpu", "--precision", "32"])
    assert result.exit_code == 0, result.output
    assert f"preview {tmp_path / 'p.png'}" in result.output
    layout = preview_layout(WIDTH, HEIGHT)
    rgb = png_rgb(tmp_path / "p.png")
    assert rgb.shape[:2] == (layout.height, layout.width)
    for r, c, h, w in RECTS:  # left edge, half-way down: the outline colour
        row, col = layout.top + r + h // 2, layout.left + c
        assert outline_pixels(rgb[row - 1:row + 2, col - 1:col + 2], tol=0).any()


def test_predict_refuses_an_existing_preview_before_any_work(tmp_path, oracle):
    scene = write_scene(tmp_path / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    (tmp_path / "p.png").write_bytes(b"old")
    result = CliRunner().invoke(cli.cli, [
        "predict", str(scene), "--out", str(tmp_path / "roofs.gpkg"), "--preview", str(tmp_path / "p.png")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'p.png'}: already exists; pass --overwrite to replace it\n"
    assert not (tmp_path / "roofs.gpkg").exists() and oracle.calls == 0
