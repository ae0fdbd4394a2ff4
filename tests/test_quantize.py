"""int8 models: calibration chips from the scenes, ONNX Runtime static quantisation, the int8 OnnxModel.

One small DeepLabV3+ (resnet18, random weights made decisive, 64 px chips) is exported and
quantised once per module; the int8 graph must really be int8 (QDQ nodes, int8 weights), keep
the geoseg description, record its calibration, and give nearly the fp32 model's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from geoseg.errors import ModelError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from geoseg.model_export import export_model  # noqa: E402
from geoseg.onnx_model import load_onnx_model, meta_from_props  # noqa: E402
import geoseg.quantize as quantize  # noqa: E402
from geoseg.quantize import (  # noqa: E402
    QUANT_KEY, WEIGHTS_7BIT, WEIGHTS_FULL, Calibration, _grid, calibration_chips, int8_model, quantize_onnx,
    u8s8_saturates,
)
from test_model_export import CHIP, decisive_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, _scene_cache):
    """(checkpoint, fp32 onnx, torch model, meta, scene) of a decisive random model."""
    folder = tmp_path_factory.mktemp("quant")
    scene = _scene_cache["synthetic"][0].image
    ckpt, model, meta = decisive_checkpoint(folder, scene)
    out = export_model(ckpt, out=folder / "model.onnx", format="onnx").path
    return ckpt, out, model.eval(), meta, scene


@pytest.fixture(scope="module")
def int8(fp32, tmp_path_factory):
    """(int8 onnx, its calibration) quantised into a folder of its own."""
    _, onnx_path, _, meta, scene = fp32
    folder = tmp_path_factory.mktemp("int8")
    calibration = calibration_chips([scene], meta, count=8)
    return quantize_onnx(onnx_path, folder / "model.int8.onnx", calibration), calibration


def test_grid_spreads_chips_over_the_whole_scene():
    # 2 x 2 for a 3:2 scene: the corners (the last chips touch the right and bottom edges).
    assert _grid(300, 200, 64, 4) == [(0, 0), (0, 236), (136, 0), (136, 236)]
    # A tall strip: one column, centred, rows from top to bottom.
    assert _grid(64, 1000, 64, 3) == [(0, 0), (468, 0), (936, 0)]
    # A scene smaller than a chip: one chip at the origin (read with padding).
    assert _grid(50, 40, 64, 8) == [(0, 0)]
    # Never more chips than asked for.
    assert len(_grid(4096, 2048, 256, 64)) <= 64 and len(_grid(4096, 2048, 256, 64)) >= 48


def test_calibration_chips_are_normalised_exactly_as_prediction_feeds_them(fp32):
    _, _, _, meta, scene = fp32
    calibration = calibration_chips([scene], meta, count=4)
    with rasterio.open(scene) as src:
        width, height = src.width, src.height
        offsets = _grid(width, height, CHIP, 4)
        want = []
        for row, col in offsets:
            raw = src.read(list(meta.bands), window=((row, row + CHIP), (col, col + CHIP))).astype(np.float32)
            want.append((raw - np.array(meta.mean, np.float32)[:, None, None]) / np.array(meta.std, np.float32)[:, None, None])
    assert calibration.chips.dtype == np.float32 and calibration.chips.shape == (4, 3, CHIP, CHIP)
    np.testing.assert_allclose(calibration.chips, np.stack(want), rtol=1e-6, atol=1e-6)
    assert calibration.sources == (scene.name,) * 4


def test_calibration_at_a_resolution_reads_the_model_grid(fp32):
    """A scene predicted on a model grid (--resolution) is calibrated with chips read there."""
    from rasterio.enums import Resampling

    _, _, _, meta, scene = fp32
    with rasterio.open(scene) as src:
        metres = 2 * (src.res[0] / 0.9996)  # the scene's ground resolution, twice (UTM, central meridian)
        width, height = round(src.width / 2), round(src.height / 2)
        whole = src.read(list(meta.bands), out_shape=(len(meta.bands), height, width),
                         resampling=Resampling.bilinear).astype(np.float32)
    calibration = calibration_chips([scene], meta, count=4, resolutions=[metres])
    want = [(whole[:, r:r + CHIP, c:c + CHIP] - np.array(meta.mean, np.float32)[:, None, None])
            / np.array(meta.std, np.float32)[:, None, None] for r, c in _grid(width, height, CHIP, 4)]
    np.testing.assert_allclose(calibration.chips, np.stack(want), rtol=1e-6, atol=1e-6)


def test_calibration_skips_chips_of_nodata(fp32, tmp_path):
    _, _, _, meta, scene = fp32
    with rasterio.open(scene) as src:
        profile, data = src.profile, src.read()
    data[:, :, : data.shape[2] * 3 // 5] = 0  # the left three fifths are nodata
    half = tmp_path / "half.tif"
    with rasterio.open(half, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(data)
    offsets = _grid(data.shape[2], data.shape[1], CHIP, 16)
    valid = [(data[:, r:r + CHIP, c:c + CHIP] != 0).all(0).mean() >= 0.5 for r, c in offsets]
    assert 0 < sum(valid) < len(valid)  # the scene has both kinds of chip
    calibration = calibration_chips([half], meta, count=16)
    assert calibration.chips.shape[0] == sum(valid)
    # A scene of nodata only still gives its chips (prediction feeds them too).
    data[:] = 0
    with rasterio.open(tmp_path / "empty.tif", "w", **{**profile, "nodata": 0}) as dst:
        dst.write(data)
    assert calibration_chips([tmp_path / "empty.tif"], meta, count=16).chips.shape[0] == len(offsets)


def test_calibration_shares_the_chips_among_scenes(fp32, small_scene):
    _, _, _, meta, scene = fp32
    calibration = calibration_chips([scene, small_scene.image], meta, count=8)
    assert calibration.sources.count(scene.name) == 4
    assert calibration.sources.count(small_scene.image.name) == 4


def test_int8_graph_is_quantised_and_keeps_its_description(fp32, int8):
    _, onnx_path, _, meta, scene = fp32
    path, calibration = int8
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every convolution's weights (resnet18 + decoder)
    props = {p.key: p.value for p in graph.metadata_props}
    assert meta_from_props(props, path) == meta
    record = json.loads(props[QUANT_KEY])
    weights = WEIGHTS_7BIT if u8s8_saturates() else WEIGHTS_FULL  # this CPU's kernel decides
    assert record == {"precision": "int8", "chips": 8, "scenes": [scene.name], "method": "minmax",
                      "format": "QDQ", "weights": weights, "activations": "uint8"}
    assert _largest_weight(graph) == (64 if u8s8_saturates() else 127)
    # Only the model was written: no pre-processed or calibration graphs left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.int8.onnx"]
    assert path.stat().st_size < onnx_path.stat().st_size / 2.5  # int8 weights: about a quarter


def _largest_weight(graph) -> int:
    """The largest |value| of the graph's int8 convolution weights (per channel: each reaches its range's end)."""
    from onnx import numpy_helper

    return max(int(np.abs(numpy_helper.to_array(i).astype(np.int16)).max())
               for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8)


def test_u8s8_probe_sees_the_kernel_onnx_runtime_runs():
    """The probe's answer is ONNX Runtime's: every sum exact, or every pair of products clipped to int16."""
    out = quantize._u8s8_probe()
    assert out.shape == (16, 16) and out.dtype == np.int32
    exact, clipped = 64 * 255 * 127, 32 * 32_767  # 2,072,640 and 1,048,544
    assert (out == exact).all() or (out == clipped).all(), np.unique(out)
    u8s8_saturates.cache_clear()
    try:
        assert u8s8_saturates() is bool((out == clipped).all())
        assert u8s8_saturates.cache_info().hits == 0
        u8s8_saturates()
        assert u8s8_saturates.cache_info().hits == 1  # asked once a process
    finally:
        u8s8_saturates.cache_clear()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if "avx512_vnni" in flags or "avx_vnni" in flags:  # VNNI instructions add in int32: exact
        assert (out == exact).all()


def test_seven_bit_weights_where_products_saturate_and_a_warning_for_a_full_range_model(
        fp32, int8, tmp_path, monkeypatch, caplog):
    """Both sides of the rule on any CPU: the probe's answer decides the weights' range and the record."""
    import logging

    _, onnx_path, model, _, scene = fp32
    calibration = calibration_chips([scene], fp32[3], count=8)
    seven_path, full = tmp_path / "seven.onnx", tmp_path / "full.onnx"
    for saturates, out, weights, largest in ((True, seven_path, WEIGHTS_7BIT, 64), (False, full, WEIGHTS_FULL, 127)):
        monkeypatch.setattr(quantize, "u8s8_saturates", lambda s=saturates: s)
        quantize_onnx(onnx_path, out, calibration)
        graph = onnx.load(str(out))
        assert json.loads({p.key: p.value for p in graph.metadata_props}[QUANT_KEY])["weights"] == weights
        assert _largest_weight(graph) == largest
    seven = load_onnx_model(seven_path)[0]
    x = torch.from_numpy(calibration.chips)
    with torch.inference_mode():
        want, got = model(x), seven(x)
    assert float((got - want).abs().mean() / want.std()) < 0.1  # 7-bit weights: still close to fp32
    # A full-range model loaded where products saturate (quantised on another machine): a warning.
    monkeypatch.setattr(quantize, "u8s8_saturates", lambda: True)
    with caplog.at_level(logging.WARNING, logger="geoseg.onnx_model"):
        load_onnx_model(seven_path)
        assert caplog.messages == []  # a 7-bit model: nothing to say
        load_onnx_model(full)
    assert caplog.messages == [
        f"{full}: quantised with full-range int8 weights, which this CPU (no VNNI) multiplies with saturating "
        "products, so its masks may differ more from fp32; quantise it on this machine (geoseg export "
        "--int8) or predict the .pt with --precision int8"]


def test_int8_model_gives_nearly_the_fp32_logits(fp32, int8):
    _, _, model, meta, _ = fp32
    path, calibration = int8
    wrapped, loaded = load_onnx_model(path)
    assert wrapped.precision == "int8" and loaded == meta
    assert "int8" in repr(wrapped)
    x = torch.from_numpy(calibration.chips)
    with torch.inference_mode():
        want = model(x)
        got = wrapped(x)
    # Quantisation error: small against the spread of the logits, and the decisions agree.
    error = (got - want).abs().mean() / want.std()
    assert error < 0.1, float(error)
    agree = ((got[:, 1] > got[:, 0]) == (want[:, 1] > want[:, 0])).float().mean()
    assert agree > 0.95, float(agree)


def test_int8_model_from_a_checkpoint_leaves_only_its_work_files(fp32, tmp_path):
    ckpt, onnx_path, _, meta, scene = fp32
    model, loaded = int8_model(ckpt, [scene], tmp_path, count=4)
    assert model.precision == "int8" and loaded == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]
    # An int8 ONNX model is used as it is; an fp32 one is quantised.
    again, _ = int8_model(model.path, [scene], tmp_path / "unused")
    assert again.path == model.path and not (tmp_path / "unused").exists()
    (tmp_path / "fp32").mkdir()
    from_onnx, _ = int8_model(onnx_path, [scene], tmp_path / "fp32", count=4)
    assert from_onnx.precision == "int8" and from_onnx.path.parent == tmp_path / "fp32"


def test_float_onnx_model_says_fp32(fp32):
    wrapped, _ = load_onnx_model(fp32[1])
    assert wrapped.precision == "32" and "fp32" in repr(wrapped)


def test_missing_quantiser_is_one_line(fp32, tmp_path, monkeypatch):
    _, onnx_path, _, meta, _ = fp32
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    calibration = Calibration(np.zeros((1, 3, CHIP, CHIP), np.float32), ("x.tif",))
    with pytest.raises(ModelError) as err:
        quantize_onnx(onnx_path, tmp_path / "q.onnx", calibration)
    assert str(err.value) == (f"{onnx_path}: cannot be quantised to int8: ONNX Runtime's quantiser is not "
                              "installed; pip install 'geoseg[onnx]' (onnx and onnxruntime)")
    assert list(tmp_path.iterdir()) == []


def test_no_readable_chip_is_one_line(fp32):
    _, _, _, meta, _ = fp32
    with pytest.raises(ModelError, match="^no chip could be read from the scenes to calibrate the int8 model"):
        calibration_chips([], meta)


# --- --precision int8 in predict and benchmark ------------------------------------------------------


def _predict(scene: Path, model: Path, folder: Path, precision: str) -> tuple[np.ndarray, str]:
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, [
        "predict", str(scene), "--model", str(model), "--out", str(folder / "roofs.gpkg"),
        "--mask-out", str(folder / "mask.tif"), "--device", "cpu", "--precision", precision, "--batch-size", "8",
    ])
    assert r.exit_code == 0, r.output
    with rasterio.open(folder / "mask.tif") as m:
        return m.read(1), r.output


def test_predict_int8_agrees_with_fp32_and_leaves_nothing_behind(fp32, tmp_path):
    import os
    import tempfile

    ckpt, _, _, _, scene = fp32
    own = f".geoseg-tmp-{os.getpid()}-*"  # this process's temporaries (other processes may make theirs)
    scratch_before = set(Path(tempfile.gettempdir()).glob(own))
    mask32, _ = _predict(scene, ckpt, tmp_path / "fp32", "32")
    mask8, said = _predict(scene, ckpt, tmp_path / "int8", "int8")
    assert ", cpu, int8" in said  # the summary names the precision that really ran
    assert 0.2 < (mask32 == 1).mean() < 0.8  # both classes: the agreement means something
    agree = (mask8 == mask32).mean()
    inter, union = ((mask8 == 1) & (mask32 == 1)).sum(), ((mask8 == 1) | (mask32 == 1)).sum()
    # A random (if decisive) model puts many pixels near the threshold: measured 0.956 and 0.931 here;
    # a trained model agrees far better (README: >= 0.99 on real scenes). Chance would be about 0.5.
    assert agree >= 0.92 and inter / union >= 0.88, (agree, inter / union)
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["mask.tif", "roofs.gpkg"]
    assert set(Path(tempfile.gettempdir()).glob(own)) == scratch_before  # the int8 scratch is gone


def test_benchmark_int8_runs_the_quantised_model(fp32):
    from geoseg.benchmarks import run_benchmark

    ckpt, _, _, _, _ = fp32
    r = run_benchmark(model_path=ckpt, size=(256, 192), batch_size=4, device="cpu", precision="int8", repeats=1,
                      baseline_chips=2)
    assert r.precision == "int8" and r.chips > 0 and r.e2e_chips_per_s > 0 and r.model_chips_per_s > 0


def test_int8_rule(monkeypatch):
    import geoseg.devices as devices
    from geoseg.errors import ConfigError

    cpu = torch.device("cpu")
    big, small = devices.INT8_AUTO_MIN_CHIPS, devices.INT8_AUTO_MIN_CHIPS - 1
    assert devices.wants_int8("int8", cpu, 1)  # asked for by name: always, on the CPU
    with pytest.raises(ConfigError, match=r"^precision 'int8' runs on the CPU \(ONNX Runtime\); on a GPU use "
                                          r"bf16 or 16, or pass --device cpu$"):
        devices.wants_int8("int8", torch.device("cuda"), big)
    for name in ("32", "bf16"):
        assert not devices.wants_int8(name, cpu, big)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert devices.wants_int8("auto", cpu, big) and not devices.wants_int8("auto", cpu, small)
    assert not devices.wants_int8("auto", torch.device("cuda"), big)
    monkeypatch.setattr(devices, "int8_available", lambda: False)
    assert not devices.wants_int8("auto", cpu, big)  # without geoseg[onnx], auto stays fp32
    monkeypatch.setattr(devices, "int8_available", lambda: True)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert not devices.wants_int8("auto", cpu, big)  # native bf16 stays bf16 under auto
    with pytest.raises(ConfigError, match="^train.precision 'int8' is a quantised model for prediction on the CPU"):
        devices.resolve_precision("int8", cpu)


def test_training_refuses_int8(tmp_path):
    from geoseg.config import load_config
    from geoseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.precision.*'int8'"):
        load_config(None, overrides=["train.precision=int8"])


def test_calibration_spreads_over_many_scenes(fp32, small_scene):
    _, _, _, meta, scene = fp32
    scenes = [scene if i % 2 else small_scene.image for i in range(10)]
    calibration = calibration_chips(scenes, meta, count=4)
    # One chip from each of scenes 0, 2, 5 and 7 (spread over the list, not the first four).
    assert calibration.sources == (small_scene.image.name, small_scene.image.name, scene.name, scene.name)


def test_export_model_int8_writes_a_quantised_model_predict_runs_as_it_is(fp32, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    ckpt, _, _, meta, scene = fp32
    out = tmp_path / "model.int8.onnx"
    r = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(out), "--int8", str(scene)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out} (onnx, int8, deeplabv3plus/resnet18, 3 bands, 64 px chips, ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]  # no scratch left
    model, loaded = load_onnx_model(out)
    assert model.precision == "int8" and loaded == meta
    record = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[QUANT_KEY])
    assert record["scenes"] == [scene.name] and record["chips"] == 32
    mask, said = _predict(scene, out, tmp_path / "run", "auto")
    assert ", cpu, int8" in said
    bad = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(tmp_path / "m.ts"), "--format",
                                   "torchscript", "--int8", str(scene)])
    assert bad.exit_code != 0 and bad.output.strip().splitlines()[-1] == (
        "Error: --int8 quantises an ONNX model; use --format onnx (and an .onnx --out)")
    missing = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(tmp_path / "n.onnx"),
                                       "--int8", str(tmp_path / "nothing.tif")])
    assert missing.exit_code != 0 and "nothing.tif" in missing.output and not (tmp_path / "n.onnx").exists()


def test_int8_with_rescale_calibrates_on_the_mapped_values(fp32, tmp_path):
    """A 16-bit copy of the scene, mapped onto the model's range by --rescale: int8 agrees with fp32 as on 8 bits."""
    from click.testing import CliRunner

    from cli import cli

    ckpt, _, _, _, scene = fp32
    with rasterio.open(scene) as src:
        profile, data = src.profile, src.read()
    wide = tmp_path / "wide.tif"
    with rasterio.open(wide, "w", **{**profile, "dtype": "uint16"}) as dst:
        dst.write(data.astype(np.uint16) * 40)
    masks = {}
    for precision in ("32", "int8"):
        folder = tmp_path / precision
        r = CliRunner().invoke(cli, [
            "predict", str(wide), "--model", str(ckpt), "--out", str(folder / "roofs.gpkg"),
            "--mask-out", str(folder / "mask.tif"), "--device", "cpu", "--precision", precision,
            "--batch-size", "8", "--rescale",
        ])
        assert r.exit_code == 0, r.output
        with rasterio.open(folder / "mask.tif") as m:
            masks[precision] = m.read(1)
    assert 0.2 < (masks["32"] == 1).mean() < 0.8
    # As on the 8-bit scene (test_predict_int8_agrees_with_fp32...): calibrated on raw 16-bit values
    # normalised with the 8-bit statistics, the activation ranges would be 40x too wide.
    assert (masks["int8"] == masks["32"]).mean() >= 0.92, (masks["int8"] == masks["32"]).mean()


def test_onnx_runtime_leaves_no_telemetry_file_in_the_temporary_folder(tmp_path):
    """ONNX Runtime writes a ".ses" telemetry session id into TMPDIR when imported; under geoseg it does not."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    plain, with_geoseg = tmp_path / "plain", tmp_path / "geoseg"
    plain.mkdir()
    with_geoseg.mkdir()
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env={**env, "TMPDIR": str(plain)}, check=True)
    if not list(plain.iterdir()):
        pytest.skip("this ONNX Runtime writes no telemetry file")
    subprocess.run([sys.executable, "-c", "import geoseg.quantize, onnxruntime; "
                    "geoseg.quantize.u8s8_saturates()"], env={**env, "TMPDIR": str(with_geoseg)}, check=True)
    assert list(with_geoseg.iterdir()) == []
