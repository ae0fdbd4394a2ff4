"""Tests for geoseg.raster_io: validation errors, windowed reads, atomic writes, ground resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from geoseg.errors import GeoreferenceError, InputFileError, OutputError
from geoseg.raster_io import (
    atomic_output,
    check_output,
    ground_pixel_size,
    ground_resolution,
    open_raster,
    open_scene,
    read_window,
    write_geotiff,
)

UTM = CRS.from_epsg(32633)
T = Affine(0.5, 0, 500000.0, 0, -0.5, 4650000.0)


def _write(path, array, *, crs=UTM, transform=T, nodata=None, **kw):
    arr = array[None] if array.ndim == 2 else array
    with rasterio.open(path, "w", driver="GTiff", count=arr.shape[0], height=arr.shape[1],
                       width=arr.shape[2], dtype=arr.dtype, crs=crs, transform=transform,
                       nodata=nodata, **kw) as dst:
        dst.write(arr)
    return path


def test_open_scene_reads_the_header(synthetic_scene):
    info = open_scene(synthetic_scene.image)
    assert (info.width, info.height, info.count, info.dtype) == (517, 300, 3, "uint8")
    assert info.crs == UTM and info.transform == synthetic_scene.transform
    assert info.nodata is None and info.res == (0.3, 0.3)
    assert info.bounds == pytest.approx((500000.0, 4650000.0 - 90.0, 500000.0 + 155.1, 4650000.0))
    assert info.window_transform(Window(10, 20, 5, 5)) == synthetic_scene.transform @ Affine.translation(10, 20)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.tif"
    with pytest.raises(InputFileError) as err:
        open_scene(p)
    assert str(err.value) == f"{p}: file does not exist; check the path"


def test_folder_is_not_a_raster(tmp_path):
    with pytest.raises(InputFileError) as err:
        open_scene(tmp_path)
    assert str(err.value) == f"{tmp_path}: is a folder, not a raster file; pass a GeoTIFF file"


def test_text_file_named_tif(tmp_path):
    p = tmp_path / "notes.tif"
    p.write_text("these are not pixels\n")
    with pytest.raises(InputFileError) as err:
        open_scene(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: is not a raster GDAL can read (")
    assert "not recognized as being in a supported file format" in msg
    assert msg.endswith("; pass a GeoTIFF (or another GDAL raster)") and "\n" not in msg


def test_empty_file(tmp_path):
    p = tmp_path / "empty.tif"
    p.write_bytes(b"")
    with pytest.raises(InputFileError) as err:
        open_scene(p)
    assert str(err.value) == (
        f"{p}: is not a raster GDAL can read (the file is empty); pass a GeoTIFF (or another GDAL raster)"
    )


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02, 8])
def test_truncated_tiff(synthetic_scene, tmp_path, keep):
    data = synthetic_scene.image.read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(InputFileError) as err:
        open_scene(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: cannot be read, the file looks truncated or corrupt (")
    assert msg.endswith("; re-export or re-download it") and "\n" not in msg
    assert "previous exception" not in msg


def test_truncated_tiff_fails_on_read_without_block_check(synthetic_scene, tmp_path):
    data = synthetic_scene.image.read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(data[: len(data) // 2])
    open_scene(p, check_blocks=False)  # the header is intact
    with open_raster(p) as src, pytest.raises(InputFileError) as err:
        read_window(src, Window(256, 256, 261, 44))
    msg = str(err.value)
    assert msg.startswith(f"{p}: cannot read window ")
    assert msg.endswith("; the file looks truncated or corrupt; re-export it")


def test_no_crs_refused_unless_assumed(tmp_path):
    p = _write(tmp_path / "nocrs.tif", np.ones((8, 8), np.uint8), crs=None)
    with pytest.raises(GeoreferenceError) as err:
        open_scene(p)
    assert str(err.value) == (
        f"{p}: has no CRS; georeference it (gdal_edit.py -a_srs EPSG:XXXX) or pass --assume-crs EPSG:XXXX"
    )
    assert open_scene(p, assume_crs="EPSG:32633").crs == UTM
    with pytest.raises(GeoreferenceError, match=r"--assume-crs 'EPSG:0' is not a CRS; pass e.g. EPSG:32633"):
        open_scene(p, assume_crs="EPSG:0")


def test_no_geotransform(tmp_path):
    p = _write(tmp_path / "pix.tif", np.ones((8, 8), np.uint8), transform=Affine.identity())
    with pytest.raises(GeoreferenceError) as err:
        open_scene(p)
    assert str(err.value).startswith(f"{p}: has no geotransform (pixel coordinates only); ")


def test_complex_band_type_refused(tmp_path):
    p = _write(tmp_path / "c.tif", np.ones((4, 4), np.complex64))
    with pytest.raises(InputFileError, match=r"c\.tif: has band type complex64, expected integer or float"):
        open_scene(p)


def test_read_window_outside_bands_and_nodata(tmp_path):
    arr = np.arange(3 * 6 * 5, dtype=np.uint16).reshape(3, 6, 5) + 1
    arr[:, 0, 0] = 0  # nodata in every band
    p = _write(tmp_path / "a.tif", arr, nodata=0)
    with open_raster(p) as src:
        data, valid = read_window(src, Window(-2, -1, 4, 4), bands=[3, 1], fill=7)
    assert data.dtype == np.uint16 and data.shape == (2, 4, 4)
    np.testing.assert_array_equal(data[:, 1:, 2:], arr[[2, 0], 0:3, 0:2])
    assert (data[:, 0, :] == 7).all() and (data[:, :, :2] == 7).all()
    expected = np.zeros((4, 4), bool)
    expected[1:, 2:] = True
    expected[1, 2] = False  # the nodata pixel
    np.testing.assert_array_equal(valid, expected)
    with open_raster(p) as src:
        data, valid = read_window(src, Window(10, 10, 3, 3))
    assert not valid.any() and (data == 0).all()


@pytest.mark.parametrize("window", [Window(-2, -1, 4, 4), Window(1, 2, 3, 4), Window(0, 0, 5, 6), Window(10, 10, 3, 3)])
def test_read_window_pixel_interleaved_is_the_same_read(tmp_path, window):
    """(H, W, C) written so by GDAL (no transposed copy): the band-first read, transposed, fill and validity alike."""
    arr = np.arange(3 * 6 * 5, dtype=np.uint16).reshape(3, 6, 5) + 1
    arr[:, 0, 0] = 0
    p = _write(tmp_path / "a.tif", arr, nodata=0)
    with open_raster(p) as src:
        want, want_valid = read_window(src, window, bands=[3, 1], fill=7)
        got, valid = read_window(src, window, bands=[3, 1], fill=7, pixel_interleaved=True)
    assert got.shape == (int(window.height), int(window.width), 2) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want.transpose(1, 2, 0))
    np.testing.assert_array_equal(valid, want_valid)


def test_check_output_and_atomic_output(tmp_path):
    target = tmp_path / "out.tif"
    target.write_text("old")
    with pytest.raises(OutputError) as err:
        check_output(target, overwrite=False)
    assert str(err.value) == f"{target}: already exists; pass --overwrite to replace it"
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]
    with atomic_output(target, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".tif"
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_write_geotiff_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (2, 300, 270), dtype=np.uint8)
    p = write_geotiff(tmp_path / "sub" / "w.tif", arr, crs=UTM, transform=T, nodata=0)
    with rasterio.open(p) as src:
        assert src.crs == UTM and src.transform == T and src.nodata == 0
        assert src.profile["tiled"] and src.compression.name == "deflate"
        np.testing.assert_array_equal(src.read(), arr)
    with pytest.raises(OutputError):
        write_geotiff(p, arr, crs=UTM, transform=T)


def test_ground_resolution_in_metres_for_any_crs():
    # UTM on the central meridian: grid metres are 0.9996 ground metres.
    dx, dy = ground_pixel_size(UTM, Affine(0.3, 0, 500000, 0, -0.3, 4650000), 100, 100)
    assert dx == pytest.approx(0.3 / 0.9996, rel=2e-5) and dy == pytest.approx(0.3 / 0.9996, rel=2e-5)
    # Web Mercator at 40 degrees N: a CRS metre is cos(40°) ground metres.
    y40 = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(40) / 2))
    merc = ground_pixel_size(CRS.from_epsg(3857), Affine(0.5, 0, 1e6, 0, -0.5, y40 + 25), 100, 100)
    assert merc[0] == pytest.approx(0.5 * math.cos(math.radians(40)), rel=5e-3)
    # Degrees: 1e-5° of latitude is about 1.11 m; of longitude at 40° N about 0.85 m.
    deg = ground_pixel_size(CRS.from_epsg(4326), Affine(1e-5, 0, 10, 0, -1e-5, 40.0005), 100, 100)
    assert deg[0] == pytest.approx(0.853, rel=2e-3) and deg[1] == pytest.approx(1.110, rel=2e-3)


def test_ground_metres_reuse_one_transformer_per_crs_and_thread():
    """The transformer to lon/lat is made once per CRS in a thread (making one costs more than the measurement),
    never shared across threads, and gives the same metres as a fresh one."""
    import threading

    import pyproj

    from geoseg import raster_io

    utm = Affine(0.3, 0, 500000, 0, -0.3, 4650000)
    fresh = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(UTM.to_wkt()), "EPSG:4326", always_xy=True)
    cached = raster_io._to_lonlat(UTM.to_wkt())
    assert raster_io._to_lonlat(UTM.to_wkt()) is cached
    assert raster_io._to_lonlat(CRS.from_epsg(3857).to_wkt()) is not cached
    assert cached.transform(500015.0, 4649985.0) == fresh.transform(500015.0, 4649985.0)
    assert ground_pixel_size(UTM, utm, 100, 100) == ground_pixel_size(UTM, utm, 100, 100)
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(raster_io._to_lonlat(UTM.to_wkt())))
    thread.start()
    thread.join()
    assert other and other[0] is not cached


def test_ground_resolution_of_a_scene(synthetic_scene):
    res = ground_resolution(open_scene(synthetic_scene.image))
    assert res == pytest.approx(0.3 / 0.9996, rel=1e-4)
