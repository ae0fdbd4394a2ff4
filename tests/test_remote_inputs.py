"""Remote scenes and STAC items: ``geoseg predict URL`` reads only what it needs and predicts as the local file.

Every test serves its files from its own HTTP server on 127.0.0.1 (``_range_server.py``:
byte ranges, bytes served counted, 403/404/503 and a server that never answers on
request): no test needs the network.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.windows import Window

import cli
from _prediction_helpers import UTM, UTM_TRANSFORM, draw_rectangles
from test_predict_cli import oracle  # noqa: F401 - the fixture: geoseg predict with the oracle model
from geoseg import inputs, raster_io, remote, stac
from geoseg.errors import InputFileError, OutputError
from geoseg.inference import checks, streams
from geoseg.tiling import block_grid

RECTS = [(10, 10, 30, 40), (100, 90, 70, 80), (200, 400, 60, 50), (330, 600, 90, 70)]
HEIGHT, WIDTH = 450, 700
#: Seconds a test waits at most for a server that never answers (GDAL and urllib are told 1 s, 2 tries).
BOUNDED_S = 20


class Served:
    """A ``_range_server.py`` process over a folder: its URLs, and what it sent and was asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_range_server.py")),
                                         str(root)], stdout=subprocess.PIPE, text=True)
        port, self.token = self.process.stdout.readline().split()
        self.base = f"http://127.0.0.1:{port}/{self.token}/"

    def url(self, name: str) -> str:
        return self.base + name

    def _control(self, command: str) -> dict:
        with urllib.request.urlopen(self.base + "_control/" + command, timeout=10) as answer:
            return json.loads(answer.read())

    @property
    def sent(self) -> int:
        """Bytes of file content sent so far (since :meth:`reset`)."""
        return self._control("stats")["sent"]

    @property
    def failed(self) -> int:
        """503s answered."""
        return self._control("stats")["failed"]

    @property
    def requests(self) -> list[list]:
        """(method, path, Range) of every request so far (since :meth:`reset`)."""
        return self._control("stats")["requests"]

    def reset(self) -> None:
        self._control("reset")

    def fail_first(self, n: int) -> None:
        """Answer 503 to the first ``n`` requests under ``flaky/``."""
        self._control(f"flaky/{n}")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def served(tmp_path):
    """A range server over ``tmp_path/served``, stopped after the test."""
    root = tmp_path / "served"
    root.mkdir()
    srv = Served(root)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    """GDAL and the STAC reader give up on a silent server after 1 s, asked twice."""
    monkeypatch.setattr(remote, "REMOTE", remote.RemoteSettings(
        timeout_s=1, connect_timeout_s=1, retries=1, retry_delay_s=0.05))


def write_cog(path: Path, label: np.ndarray, *, seed: int = 0) -> Path:
    """A cloud-optimised GeoTIFF (256 px tiles, overviews) with 3 noise bands and the label as band 4."""
    rng = np.random.default_rng(seed)
    h, w = label.shape
    data = np.concatenate([rng.integers(1, 255, (3, h, w), dtype=np.uint8), label[None]], axis=0)
    with rasterio.open(path, "w", driver="COG", width=w, height=h, count=4, dtype="uint8", crs=UTM,
                       transform=UTM_TRANSFORM, blocksize=256, compress="deflate") as dst:
        dst.write(data)
    return path


def uncompressed_cog(path: Path, data: np.ndarray) -> Path:
    """An uncompressed COG of ``data`` (bands, h, w) on the UTM grid: 256-px tiles, overviews 2, 4, ..."""
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=count, dtype="uint8", crs=UTM,
                       transform=UTM_TRANSFORM, blocksize=256, compress="NONE") as dst:
        dst.write(data)
    with rasterio.open(path) as src:
        assert src.overviews(1)[:2] == [2, 4]
    return path


@pytest.fixture(scope="module")
def big_cog(tmp_path_factory) -> Path:
    """A 3100 x 3050 px one-band COG (uncompressed noise) with overviews down to 1/16."""
    data = np.random.default_rng(5).integers(0, 256, (1, 3050, 3100), dtype=np.uint8)
    return uncompressed_cog(tmp_path_factory.mktemp("big") / "big.tif", data)


def run(*args: str):
    return CliRunner().invoke(cli.cli, ["predict", *args])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def predict_to(folder: Path, scene: str, *extra: str) -> tuple[bytes, object]:
    """Predict ``scene`` into ``folder`` (mask and GeoPackage): the mask's bytes and the polygons."""
    result = run(scene, "--out", str(folder / "roofs.gpkg"), "--mask-out", str(folder / "mask.tif"), *extra)
    assert result.exit_code == 0, result.output
    return (folder / "mask.tif").read_bytes(), pyogrio.read_dataframe(folder / "roofs.gpkg", layer="rooftops")


def polygons_equal(a, b, *, scene: str | None = None) -> None:
    """The same polygons with the same attributes (``scene`` apart when it is given for ``b``)."""
    assert len(a) == len(b) > 0
    assert [g.wkb for g in a.geometry] == [g.wkb for g in b.geometry]
    columns = [c for c in a.columns if c != "geometry" and (scene is None or c != "scene")]
    assert a[columns].equals(b[columns])
    if scene is not None:
        assert set(b["scene"]) == {scene}


def stac_item(item_id: str, assets: dict[str, pystac.Asset]) -> pystac.Item:
    item = pystac.Item(id=item_id, geometry={"type": "Point", "coordinates": [15.0, 42.0]},
                       bbox=[15.0, 42.0, 15.0, 42.0], datetime=datetime(2024, 5, 1, tzinfo=timezone.utc),
                       properties={})
    for key, asset in assets.items():
        item.add_asset(key, asset)
    return item


def cog_asset(href: str, **kw) -> pystac.Asset:
    return pystac.Asset(href, media_type=pystac.MediaType.COG, **kw)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- remote rasters ----------------------------------------------------------------------------


def test_a_remote_cog_predicts_exactly_as_the_local_file(tmp_path, served, oracle):
    scene = write_cog(served.root / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    local_mask, local_polygons = predict_to(tmp_path / "local", str(scene))
    urls = (served.url("scene.tif"), "/vsicurl/" + served.url("scene.tif"), served.url("scene.tif") + "?sig=1")
    for i, url in enumerate(urls):
        mask, polygons = predict_to(tmp_path / f"remote{i}", url)
        assert mask == local_mask  # byte for byte
        polygons_equal(local_polygons, polygons)  # the scene attribute too: "scene", from the URL
    assert served.sent > 0


@pytest.fixture(scope="module")
def wide_cog(tmp_path_factory) -> Path:
    """A 1536 x 1536 px 4-band COG (uncompressed noise, label band 4) with overviews 2, 4."""
    label = draw_rectangles(1536, 1536, [(r, c, 40, 60) for r in range(20, 1500, 190) for c in range(30, 1480, 170)])
    data = np.concatenate([np.random.default_rng(2).integers(1, 255, (3, 1536, 1536), dtype=np.uint8), label[None]])
    return uncompressed_cog(tmp_path_factory.mktemp("wide") / "wide.tif", data)


def test_a_remote_cog_with_an_aoi_reads_only_the_tiles_near_it(tmp_path, served, oracle, wide_cog):
    import geopandas as gpd
    import shapely

    (served.root / wide_cog.name).symlink_to(wide_cog)
    x0, y0 = UTM_TRANSFORM * (100, 1400)  # a 150 m x 75 m area near the lower-left corner
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0, x0 + 150, y0 + 75)], crs=UTM).to_crs("EPSG:4326").to_file(aoi)
    local_mask, local_polygons = predict_to(tmp_path / "local", str(wide_cog), "--aoi", str(aoi))
    served.reset()
    mask, polygons = predict_to(tmp_path / "remote", served.url(wide_cog.name), "--aoi", str(aoi))
    assert mask == local_mask
    polygons_equal(local_polygons, polygons, scene="wide")
    size = wide_cog.stat().st_size
    # The scene is one block (2048 px blocks), of which only the box of the AOI is read: the tiles
    # under it (and the value check's overview), well under a fifth of the file.
    assert 0 < served.sent < size / 5, (served.sent, size)


def test_a_coarser_resolution_reads_an_overview_of_a_remote_cog(tmp_path, served, oracle, wide_cog):
    (served.root / wide_cog.name).symlink_to(wide_cog)
    local_mask, local_polygons = predict_to(tmp_path / "local", str(wide_cog), "--resolution", "2.0")
    served.reset()
    mask, polygons = predict_to(tmp_path / "remote", served.url(wide_cog.name), "--resolution", "2.0")
    assert mask == local_mask
    polygons_equal(local_polygons, polygons, scene="wide")
    # 2.0 m on a 0.5 m scene: the blocks are read from the 1/4 overview (384² px in 4 tiles of 256²,
    # 1/12 of the file) and the value check from the 1/8 one; the 1/2 overview alone is 1/4 of it.
    size = wide_cog.stat().st_size
    assert 0 < served.sent < size / 6, (served.sent, size)
    with rasterio.open(tmp_path / "local" / "mask.tif") as src:
        assert (src.width, src.height, src.transform) == (1536, 1536, UTM_TRANSFORM)


def test_reader_threads_read_a_remote_scene_under_the_remote_settings(served, monkeypatch):
    write_cog(served.root / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    url = served.url("scene.tif")
    seen: list[tuple[str, str | None]] = []
    real = streams.read_window

    def recording(src, window, **kw):
        seen.append((threading.current_thread().name, rasterio.env.get_gdal_config("GDAL_HTTP_TIMEOUT")))
        return real(src, window, **kw)

    monkeypatch.setattr(streams, "read_window", recording)
    blocks = block_grid(WIDTH, HEIGHT, chip_size=64, stride=48, block_size=256)
    reader = streams.BlockReader(url, [1, 2, 3, 4], workers=2, prefetch=3, pin=False)
    try:
        got = list(reader.iterate(blocks))
    finally:
        reader.close()
    with rasterio.open(write_cog(served.root / "copy.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))) as src:
        for item in got:
            data, _ = raster_io.read_window(src, item.block.extent, bands=[1, 2, 3, 4])
            assert np.array_equal(item.data.numpy().transpose(2, 0, 1), data)
    assert seen and all(name.startswith("geoseg-read") and value == 1 for name, value in seen)


def test_the_value_range_check_reads_an_overview_of_a_remote_cog(tmp_path, served, big_cog):
    (served.root / big_cog.name).symlink_to(big_cog)
    url = served.url(big_cog.name)
    size = big_cog.stat().st_size
    served.reset()
    found = checks.scene_value_range(url, [1])
    assert found == checks.scene_value_range(big_cog, [1])
    # The 1M-pixel look at a 9.5M-pixel scene reads the 1/4 overview (775 x 763 px), not the scene.
    assert 0 < served.sent < size / 8, (served.sent, size)


def test_a_window_of_a_remote_cog_reads_its_tiles_only(served, big_cog):
    (served.root / big_cog.name).symlink_to(big_cog)
    served.reset()
    window = Window(1000, 1000, 300, 200)
    with raster_io.open_raster(served.url(big_cog.name)) as src:
        data, valid = raster_io.read_window(src, window)
    with rasterio.open(big_cog) as src:
        assert np.array_equal(data, src.read(window=window))
    assert valid.all()
    assert 0 < served.sent < big_cog.stat().st_size / 20, served.sent


def test_a_server_that_answers_503_at_first_is_asked_again(served, monkeypatch):
    monkeypatch.setattr(remote, "REMOTE", remote.RemoteSettings(timeout_s=5, retries=3, retry_delay_s=0.05))
    write_cog(served.root / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    served.fail_first(2)
    info = raster_io.open_scene(served.url("flaky/scene.tif"))
    assert (info.width, info.height, info.count) == (WIDTH, HEIGHT, 4)
    assert info.path == served.url("flaky/scene.tif")
    assert served.failed == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["404", "404 vsicurl", "403", "no answer", "nothing listens", "stac 404",
                                  "stac no answer"])
def test_a_remote_scene_that_fails_is_one_line_naming_the_url_and_writes_nothing(tmp_path, served, oracle, case):
    write_cog(served.root / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    check_address, retry = "check the address", "check the address and the network, or try again later"
    url, message = {
        "404": (served.url("missing.tif"), f"answered 404 (not found); {check_address}"),
        "404 vsicurl": ("/vsicurl/" + served.url("gone.tif"), f"answered 404 (not found); {check_address}"),
        "403": (served.url("403/scene.tif"),
                "answered 403 (access denied); check the address and the credentials (a signed URL may have expired)"),
        "no answer": (served.url("hang/scene.tif"), f"did not answer within 1 s (asked 2 times); {retry}"),
        "nothing listens": (f"http://127.0.0.1:{_free_port()}/scene.tif",
                            "could not be reached (no connection to its server); check the address and the network"),
        "stac 404": (served.url("item.json"), f"answered 404 (not found); {check_address}"),
        "stac no answer": (served.url("hang/item.json"), f"did not answer within 1 s (asked 2 times); {retry}"),
    }[case]
    out = tmp_path / "out"
    start = time.perf_counter()
    result = run(url, "--out", str(out / "roofs.gpkg"), "--mask-out", str(out / "mask.tif"))
    assert time.perf_counter() - start < BOUNDED_S
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {url}: {message}"]
    assert not out.exists()


# --- STAC items --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--asset", "role visual", "first RGB GeoTIFF", "item served, relative href"])
def test_a_stac_item_predicts_its_asset_as_the_local_scene(tmp_path, served, oracle, how):
    scene = write_cog(served.root / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    local_mask, local_polygons = predict_to(tmp_path / "local", str(scene))
    url = served.url("scene.tif")
    four_bands = {"eo:bands": [{"name": n} for n in ("red", "green", "blue", "label")]}
    extra: tuple[str, ...] = ()
    if how == "--asset":
        item = stac_item("item-a", {"visual": cog_asset(served.url("missing.tif"), roles=["visual"]),
                                    "image": cog_asset(url, roles=["data"])})
        extra = ("--asset", "image")
    elif how == "role visual":
        item = stac_item("item-a", {"nir": cog_asset(served.url("missing.tif"), roles=["data"]),
                                    "rgb": cog_asset(url, roles=["visual", "data"])})
    elif how == "first RGB GeoTIFF":
        item = stac_item("item-a", {
            "thumbnail": pystac.Asset(served.url("thumb.png"), media_type=pystac.MediaType.PNG, roles=["thumbnail"]),
            "b01": cog_asset(served.url("missing.tif"), extra_fields={"eo:bands": [{"name": "coastal"}]}),
            "image": cog_asset(url, extra_fields=four_bands),
        })
    else:
        item = stac_item("item-a", {"visual": cog_asset("./scene.tif")})
    item_json = write_json((served.root if how.startswith("item served") else tmp_path) / "item.json",
                           item.to_dict(include_self_link=False))
    spec = served.url("item.json") if how.startswith("item served") else str(item_json)
    mask, polygons = predict_to(tmp_path / "stac", spec, *extra)
    assert mask == local_mask
    polygons_equal(local_polygons, polygons, scene="item-a")


def test_an_item_collection_predicts_each_item(tmp_path, served, oracle):
    write_cog(served.root / "one.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    write_cog(served.root / "two.tif", draw_rectangles(300, 517, RECTS[:2]), seed=1)
    items = [stac_item(i, {"visual": cog_asset(served.url(f"{n}.tif"))}) for i, n in (("a-1", "one"), ("b-2", "two"))]
    collection = write_json(tmp_path / "items.json", pystac.ItemCollection(items).to_dict())
    out = tmp_path / "out"
    result = run(str(collection), "--out", str(out / "roofs.gpkg"), "--mask-out", str(out / "masks"))
    assert result.exit_code == 0, result.output
    assert files(out) == ["masks/a-1_mask.tif", "masks/b-2_mask.tif", "roofs.gpkg"]
    frame = pyogrio.read_dataframe(out / "roofs.gpkg", layer="rooftops")
    assert sorted(set(frame["scene"])) == ["a-1", "b-2"]
    assert result.output.startswith("a-1: ") and "\nb-2: " in result.output


def test_a_stac_item_without_a_usable_asset_lists_its_assets_and_writes_nothing(tmp_path, served, oracle):
    item = stac_item("only-thumb", {
        "thumbnail": pystac.Asset(served.url("thumb.png"), media_type=pystac.MediaType.PNG, roles=["thumbnail"]),
        "metadata": pystac.Asset(served.url("meta.xml"), media_type=pystac.MediaType.XML, roles=["metadata"]),
    })
    item_json = write_json(tmp_path / "item.json", item.to_dict(include_self_link=False))
    out = tmp_path / "out"
    assets = "thumbnail (image/png), metadata (application/xml)"
    for extra, message in [
        ((), f"STAC item 'only-thumb' has no GeoTIFF asset to predict (its assets: {assets}); "
             "pass --asset NAME to choose one"),
        (("--asset", "visual"), f"STAC item 'only-thumb' has no asset 'visual' (its assets: {assets}); "
                                "pass --asset with one of them"),
    ]:
        result = run(str(item_json), "--out", str(out / "roofs.gpkg"), *extra)
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [f"Error: {item_json}: {message}"]
    assert not out.exists()
    assert served.requests == []  # refused from the item alone


def test_asset_without_any_stac_item_is_refused(tmp_path, served, oracle):
    scene = write_cog(tmp_path / "scene.tif", draw_rectangles(HEIGHT, WIDTH, RECTS))
    result = run(str(scene), "--out", str(tmp_path / "out" / "roofs.gpkg"), "--asset", "visual")
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --asset visual picks an asset of a STAC item, and no SCENE is one; "
                                     "pass a STAC item (.json) or leave out --asset")


def test_stac_documents_that_are_no_items_are_refused(tmp_path):
    collection = {"type": "Collection", "id": "c", "stac_version": "1.0.0", "description": "d", "links": [],
                  "license": "proprietary", "extent": {}}
    cases = {
        "collection.json": (collection, "is a STAC Collection, not an Item; pass one of its Items, or an "
                                        "ItemCollection"),
        "empty.json": ({"type": "FeatureCollection", "features": []},
                       "holds no STAC Items; pass an Item or an ItemCollection with Items"),
        "number.json": (3, "is not a STAC Item or ItemCollection (JSON of type 'int'); pass a STAC Item (.json), "
                           "an ItemCollection, or a GeoTIFF"),
    }
    for name, (data, message) in cases.items():
        path = write_json(tmp_path / name, data)
        with pytest.raises(InputFileError) as err:
            inputs.find_scenes([path])
        assert str(err.value) == f"{path}: {message}"


# --- names, collisions -------------------------------------------------------------------------


@pytest.mark.parametrize("spec, name", [
    ("https://h.example/a/scene.tif", "scene"), ("https://h.example/a/scene.tif?X-Amz-Signature=ab/c", "scene"),
    ("s3://bucket/k/tile_3.tiff", "tile_3"), ("/vsicurl/https://h.example/dl/b.tif", "b"), ("local/x.tif", "x"),
])
def test_a_scene_is_named_after_the_last_component_of_its_url(spec, name):
    assert remote.source_stem(spec) == name


def test_urls_are_kept_as_text_and_stac_files_are_recognised(tmp_path):
    url = "https://h.example/a//b/scene.tif?sig=1"
    assert remote.as_source(url) == url
    assert remote.as_source(str(tmp_path / "s.tif")) == tmp_path / "s.tif"
    assert inputs.resolve_scenes([url, url]) == [url]
    assert [stac.is_stac(s) for s in ("i.json", "https://h/i.JSON?t=1", "s.tif", "https://h/x.json/s.tif")] == [
        True, True, False, False]


def test_a_url_input_never_collides_with_a_local_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # "https:/h/s.tif" is where Path("https://h/s.tif") would point: a local file, not the URL.
    raster_io.check_not_inputs([("--mask-out", "https:/h/s.tif")], [("scene", "https://h/s.tif")])
    with pytest.raises(OutputError):
        raster_io.check_not_inputs([("--mask-out", "s.tif")], [("scene", "s.tif")])


def test_a_cloud_path_without_credentials_says_so_without_asking_anyone(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_NO_SIGN_REQUEST", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("CPL_AWS_AUTODETECT_EC2", "NO")
    url = "s3://geoseg-test-bucket/scene.tif"
    with pytest.raises(InputFileError) as err:
        raster_io.open_scene(url)
    message = str(err.value)
    assert message.startswith(f"{url}: cannot be read without credentials (")
    assert message.endswith("; set them as GDAL reads them, or AWS_NO_SIGN_REQUEST=YES (GS_NO_SIGN_REQUEST=YES) "
                            "for a public bucket")
