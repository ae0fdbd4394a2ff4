"""geoseg export: ONNX (and TorchScript) with the checkpoint's self-description; predict --model MODEL.onnx.

One small DeepLabV3+ (resnet18, random weights, 64 px chips) is exported once per module;
ONNX Runtime's logits are compared with PyTorch's, the description must come back equal,
and predicting a generated scene with the .onnx must give the .pt's mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from cli import cli
from geoseg import __version__
from geoseg.checkpoints import CheckpointMeta, read_checkpoint, save_checkpoint
from geoseg.models import create_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from geoseg.onnx_model import (  # noqa: E402  (after the skips: needs onnxruntime to be useful)
    METADATA_KEY, OnnxModel, load_onnx_model, meta_from_props, metadata_props, read_onnx_meta,
)

#: ONNX Runtime vs PyTorch, fp32 on the CPU: the same arithmetic in another order. Measured
#: differences are below 1e-6 on logits of magnitude ~0.1-1; the bound leaves room for other CPUs.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4
#: Masks from the .onnx and the .pt may differ only where the rooftop probability is this close to
#: the threshold (where a 1e-7 difference in the logits can fall either side).
THRESHOLD_BAND = 1e-3
CHIP = 64


def _meta(**changes) -> CheckpointMeta:
    base = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2,
        class_names=("background", "rooftop"), bands=(1, 2, 3), mean=(120.0, 115.5, 100.25),
        std=(60.0, 55.0, 50.125), chip_size=CHIP, resolution=0.3,
        config={"model": {"encoder": "resnet18", "chip": [CHIP, CHIP]}, "train": {"lr": 0.001}},
        version=__version__, epoch=3, metrics={"val_iou": 0.5, "val_loss": 0.25}, input_dtype="uint8",
        value_range=((1.0, 250.0), (2.0, 249.5), (0.0, 255.0)),
    )
    return CheckpointMeta(**{**base.__dict__, **changes})


def _decisive(model: torch.nn.Module, scene: Path, meta: CheckpointMeta) -> None:
    """Spread a random model's rooftop probabilities over (0, 1), half of the scene's pixels above 0.5.

    Untrained, it says about 0.494 everywhere: every pixel would be within 1e-3 of the threshold
    and a comparison of masks would test nothing.
    """
    with rasterio.open(scene) as src:
        raw = torch.from_numpy(src.read(window=((0, 4 * CHIP), (0, 4 * CHIP))).astype(np.float32))
    x = (raw - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[:, None, None]
    chips = x.unfold(1, CHIP, CHIP).unfold(2, CHIP, CHIP).permute(1, 2, 0, 3, 4).reshape(-1, 3, CHIP, CHIP)
    head = model.segmentation_head[0]
    with torch.no_grad():
        for m in model.modules():  # BatchNorm statistics that are not the identity: eval mode matters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        logits = model.eval()(chips)
        diff = logits[:, 1] - logits[:, 0]
        scale = 3.0 / float(diff.std())
        head.weight.mul_(scale)
        head.bias.mul_(scale)
        head.bias[1] -= float((diff * scale).median())


def decisive_checkpoint(folder: Path, scene: Path) -> tuple[Path, torch.nn.Module, CheckpointMeta]:
    """(checkpoint, torch model, meta) of a random resnet18 DeepLabV3+ made decisive on ``scene``."""
    torch.manual_seed(0)
    model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)
    meta = _meta()
    _decisive(model, scene, meta)
    return save_checkpoint(folder / "model.pt", model, meta), model, meta


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _scene_cache):
    """(checkpoint, onnx file, torch model, meta, CLI output) of one export through the command."""
    folder = tmp_path_factory.mktemp("export")
    ckpt, model, meta = decisive_checkpoint(folder, _scene_cache["synthetic"][0].image)
    out = folder / "model.onnx"
    r = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return ckpt, out, model.eval(), meta, r.output


def test_export_command_says_what_it_wrote(exported):
    ckpt, out, _, _, output = exported
    lines = output.strip().splitlines()
    assert lines[0].startswith(f"wrote {out} (onnx, deeplabv3plus/resnet18, 3 bands, 64 px chips, 2 outputs, "
                               "any batch size) in ")
    assert lines[1] == f"predict with: geoseg predict SCENE.tif --model {out} --out roofs.gpkg"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.pt"]  # no temporaries left


def test_the_command_is_geoseg_export_and_its_earlier_name_still_works_unlisted(exported, tmp_path):
    """``geoseg export`` (as documented); ``export-model``, its name before, gives the same model and is not
    in the command list."""
    ckpt, first, _, _, _ = exported
    listed = CliRunner().invoke(cli, ["--help"]).output
    assert "  export " in listed and "export-model" not in listed
    out = tmp_path / "again.onnx"
    r = CliRunner().invoke(cli, ["export-model", str(ckpt), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out} (onnx, deeplabv3plus/resnet18, 3 bands, 64 px chips, ")
    assert read_onnx_meta(out) == read_onnx_meta(first)


def test_onnx_runtime_logits_match_pytorch_for_any_batch(exported):
    _, out, model, _, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("image", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, CHIP, CHIP]  # dynamic batch axis
    assert outp.shape[1:] == [2, CHIP, CHIP]
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # the example batch of the export was 2
        x = torch.randn(batch, 3, CHIP, CHIP, generator=gen)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_wrapper_is_called_like_the_torch_model(exported):
    from geoseg.inference import ChipPredictor

    _, out, model, meta, _ = exported
    wrapped, loaded_meta = load_onnx_model(out)
    assert isinstance(wrapped, OnnxModel) and loaded_meta == meta
    # What ChipPredictor does to a model: eval, to(device, channels_last), calls in inference mode.
    assert wrapped.eval().to(device=torch.device("cpu"), memory_format=torch.channels_last) is wrapped
    x = torch.randn(3, 3, CHIP, CHIP, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(x)
        got = wrapped(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    # Through ChipPredictor, also with torch.compile asked for (auto on big CPU scenes): the compiled
    # wrapper runs ONNX Runtime as it is, and the padded last batch is cut off again.
    kw = dict(mean=meta.mean, std=meta.std, classes=2, device=torch.device("cpu"), autocast_dtype=None)
    with torch.inference_mode():
        ref = ChipPredictor(model, **kw)(x)
        plain = ChipPredictor(wrapped, **kw)(x)
        compiled = ChipPredictor(wrapped, **kw, compile=True, batch_size=4)(x)
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled, plain, atol=0, rtol=0)
    with pytest.raises(Exception, match=r"takes chips of 3 bands x 64 x 64 px, got shape \(1, 3, 32, 32\)"):
        wrapped(torch.zeros(1, 3, 32, 32))


def test_metadata_round_trips_exactly(exported):
    ckpt, out, _, meta, _ = exported
    assert read_onnx_meta(out) == read_checkpoint(ckpt).meta == meta
    proto = onnx.load(str(out), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert list(props) == [METADATA_KEY]
    payload = json.loads(props[METADATA_KEY])
    assert payload == {"format": 1, "input": "image", "output": "logits", "out_channels": 2,
                       "meta": meta.to_dict()}
    assert payload["meta"]["value_range"] == [[1.0, 250.0], [2.0, 249.5], [0.0, 255.0]]
    assert payload["meta"]["input_dtype"] == "uint8" and payload["meta"]["resolution"] == 0.3


def test_instances_description_round_trips():
    meta = _meta(target="instances", target_settings={"border_width": 0.5, "contact_width": 1.0},
                 value_range=None, input_dtype=None, resolution=None)
    props = metadata_props(meta)
    assert json.loads(props[METADATA_KEY])["out_channels"] == 4 == meta.out_channels
    assert meta_from_props(props, "m.onnx") == meta


def test_predict_with_onnx_gives_the_checkpoints_mask(exported, synthetic_scene, tmp_path):
    ckpt, out, _, _, _ = exported
    results = {}
    for name, model_file in (("pt", ckpt), ("onnx", out)):
        folder = tmp_path / name
        r = CliRunner().invoke(cli, [
            "predict", str(synthetic_scene.image), "--model", str(model_file), "--out", str(folder / "roofs.gpkg"),
            "--mask-out", str(folder / "mask.tif"), "--prob-out", str(folder / "prob.tif"),
            "--prob-dtype", "float16", "--device", "cpu", "--precision", "32", "--batch-size", "8",
        ])
        assert r.exit_code == 0, r.output
        with rasterio.open(folder / "mask.tif") as m, rasterio.open(folder / "prob.tif") as p:
            results[name] = (m.read(1), p.read(1).astype(np.float32), r.output)
    mask_pt, prob_pt, _ = results["pt"]
    mask_onnx, prob_onnx, said = results["onnx"]
    assert 0 < (mask_pt == 1).sum() < mask_pt.size  # a mask with both classes: the comparison means something
    differ = mask_pt != mask_onnx
    assert not (differ & (np.abs(prob_pt - 0.5) >= THRESHOLD_BAND)).any()
    assert differ.sum() == 0, f"{differ.sum()} pixels differ, all within {THRESHOLD_BAND} of the threshold"
    assert np.abs(prob_pt - prob_onnx).max() <= THRESHOLD_BAND
    assert 0.2 < (mask_pt == 1).mean() < 0.8 and np.abs(prob_pt - 0.5).min() < 0.1
    assert (np.abs(prob_pt - 0.5) < THRESHOLD_BAND).mean() < 0.01  # the tolerance excuses almost nothing
    polygons = [line.split(" to ")[0] for line in said.splitlines() if line.startswith("wrote ")]
    assert polygons == [line.split(" to ")[0] for line in results["pt"][2].splitlines() if line.startswith("wrote ")]
    assert polygons[0] != "wrote 0 polygons"



def test_onnx_prediction_reports_the_fp32_it_runs_in_and_is_not_compiled(exported, synthetic_scene, tmp_path):
    """ONNX Runtime runs fp32 whatever --precision says, and torch.compile cannot reach into it."""
    from geoseg.inference import predict_scene
    from geoseg.inference.job import load_model

    _, out, _, _, _ = exported
    model, meta = load_model(out)
    assert isinstance(model, OnnxModel) and model.runs_own_precision
    res = predict_scene(synthetic_scene.image, model, meta, mask_out=tmp_path / "mask.tif", polygons=False,
                        device="cpu", precision="bf16", compile_model=True, batch_size=8)
    assert res.precision == "32"
    assert not res.compiled

# --- bad input: one line naming the file and the fix, exit 1, nothing written ------------------------

def _error(args: list[str]) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    return r.output.strip().splitlines()[-1]


def test_export_refuses_bad_input_and_writes_nothing(exported, tmp_path):
    ckpt = exported[0]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "m.onnx"
    assert _error(["export", str(junk), "--out", str(out)]) == (
        f"Error: {junk}: is not a readable checkpoint (truncated, corrupt, or of another format); "
        "pass a checkpoint written by geoseg train (e.g. saved_models/best_iou.pt)"
    )
    assert _error(["export", str(tmp_path / "none.pt"), "--out", str(out)]) == (
        f"Error: {tmp_path / 'none.pt'}: checkpoint does not exist; run geoseg train first or pass the path "
        "of a checkpoint"
    )
    assert _error(["export", str(ckpt), "--format", "tflite", "--out", str(out)]) == (
        "Error: --format should be one of 'onnx', 'torchscript', got 'tflite'"
    )
    assert _error(["export", str(ckpt), "--out", str(tmp_path / "m.pt")]) == (
        f"Error: {tmp_path / 'm.pt'}: an ONNX model needs the .onnx extension (geoseg predict recognises it "
        f"by it); use --out {tmp_path / 'm.onnx'}"
    )
    assert _error(["export", str(ckpt), "--format", "torchscript", "--out", str(out)]) == (
        f"Error: {out}: a TorchScript model must not end in .onnx (geoseg predict would read it as ONNX); "
        f"use --out {tmp_path / 'm.ts'}"
    )
    assert _error(["export", str(ckpt), "--format", "torchscript", "--out", str(ckpt), "--overwrite"]) == (
        f"Error: {ckpt}: --out would overwrite the input checkpoint {ckpt}; choose another output path"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]
    out.write_bytes(b"old")
    assert _error(["export", str(ckpt), "--out", str(out)]) == (
        f"Error: {out}: already exists; pass --overwrite to replace it"
    )
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "m.onnx"]


def test_missing_onnx_packages_are_named_with_the_install_command(exported, synthetic_scene, tmp_path, monkeypatch):
    import importlib.util
    import sys

    ckpt, onnx_file = exported[0], exported[1]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "m.onnx"
    assert _error(["export", str(ckpt), "--out", str(out)]) == (
        f"Error: {out}: writing ONNX needs onnxscript, which is not installed; pip install 'geoseg[onnx]' "
        "(onnx, onnxscript and onnxruntime)"
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    roofs = tmp_path / "roofs.gpkg"
    assert _error(["predict", str(synthetic_scene.image), "--model", str(onnx_file), "--out", str(roofs)]) == (
        f"Error: {onnx_file}: is an ONNX model, and ONNX Runtime, which runs it, is not installed; "
        "pip install 'geoseg[onnx]' (or onnxruntime-gpu, for the CUDA provider)"
    )
    assert not out.exists() and not roofs.exists()


def _identity_onnx(path: Path, props: dict[str, str] | None) -> Path:
    """A valid ONNX graph (image -> logits, identity) that geoseg did not export."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])], "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, CHIP, CHIP])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, CHIP, CHIP])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if props:
        helper.set_model_props(model, props)
    onnx.save_model(model, str(path))
    return path


def test_predict_refuses_an_onnx_without_geoseg_description(synthetic_scene, tmp_path):
    foreign = _identity_onnx(tmp_path / "foreign.onnx", None)
    out = tmp_path / "out" / "roofs.gpkg"
    base = ["predict", str(synthetic_scene.image), "--out", str(out), "--device", "cpu"]
    assert _error([*base, "--model", str(foreign)]) == (
        f"Error: {foreign}: has no geoseg description (metadata_props key 'geoseg'), so predict does not know "
        "its bands, normalisation or chip size; export the model from its checkpoint with geoseg export "
        "CKPT --format onnx --out MODEL.onnx"
    )
    # A description that does not fit the graph (3 outputs where it says 2).
    misfit = _identity_onnx(tmp_path / "misfit.onnx", metadata_props(_meta()))
    assert _error([*base, "--model", str(misfit)]) == (
        f"Error: {misfit}: graph (image ['N', 3, 64, 64] -> logits ['N', 3, 64, 64]) does not fit its geoseg "
        "description (image [N, 3, 64, 64] -> logits [N, 2, 64, 64]); export it again with geoseg export"
    )
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    line = _error([*base, "--model", str(broken)])
    assert line.startswith(f"Error: {broken}: is not a readable ONNX model (")
    assert line.endswith("); pass a model written by geoseg export, or a .pt checkpoint")
    assert not out.parent.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_carries_the_description(exported, tmp_path):
    from geoseg.model_export import TORCHSCRIPT_META, export_model

    ckpt, _, model, meta, _ = exported
    result = export_model(ckpt, out=tmp_path / "model.ts", format="torchscript")
    assert result.path == tmp_path / "model.ts" and result.format == "torchscript"
    extra = {TORCHSCRIPT_META: ""}
    loaded = torch.jit.load(str(result.path), _extra_files=extra)
    assert meta_from_props({METADATA_KEY: extra[TORCHSCRIPT_META]}, result.path) == meta
    x = torch.randn(3, 3, CHIP, CHIP, generator=torch.Generator().manual_seed(3))  # traced with batch 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
