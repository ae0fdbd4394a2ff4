"""Tests for geoseg.models (model factory, encoder weight files) and geoseg.checkpoints (self-describing checkpoints)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from geoseg import __version__
from geoseg.checkpoints import CheckpointMeta, load_checkpoint, read_checkpoint, save_checkpoint
from geoseg.errors import CheckpointError, ModelError
from geoseg.models import check_chip_size, create_model, unwrap_model


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=None, in_channels=3, classes=2)


def _meta(**changes) -> CheckpointMeta:
    meta = CheckpointMeta(
        arch="deeplabv3plus", encoder="resnet18", in_channels=3, classes=2,
        class_names=("background", "rooftop"), bands=(1, 2, 3),
        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), chip_size=64,
        resolution=0.3, config={"train": {"lr": 0.001}, "data": {"root": ["dataset"]}},
        version=__version__, epoch=3, metrics={"val_iou": 0.5, "val_loss": 0.25},
    )
    return dataclasses.replace(meta, **changes)


def test_create_model_outputs_logits_per_class(tiny):
    tiny.eval()
    with torch.no_grad():
        out = tiny(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 2, 64, 64)
    model = create_model(arch="unet", encoder="resnet18", in_channels=4, classes=3)
    assert model.encoder.conv1.weight.shape[1] == 4
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 4, 64, 64)).shape == (1, 3, 64, 64)


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(ModelError) as err:
        create_model(arch="deeplab", encoder="resnet18")
    msg = str(err.value)
    assert msg.startswith("unknown architecture 'deeplab'; use one of: unet, ")
    assert "deeplabv3plus" in msg and "fpn" in msg and "\n" not in msg


def test_unknown_encoder_lists_valid_ones():
    with pytest.raises(ModelError) as err:
        create_model(arch="deeplabv3plus", encoder="resnet5")
    msg = str(err.value)
    assert msg.startswith("unknown encoder 'resnet5'; use one of: resnet18, resnet34, resnet50, ")
    assert "efficientnet-b0" in msg and msg.endswith("or 'tu-<name>' for any timm model")


def test_local_weights_file_is_loaded_into_the_encoder(tmp_path):
    torch.manual_seed(1)
    source = create_model(arch="unet", encoder="resnet18")
    path = tmp_path / "resnet18_encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    model = create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_whole_smp_model_state_dict_works_as_encoder_weights(tmp_path):
    torch.manual_seed(2)
    source = create_model(arch="unet", encoder="resnet18")
    path = tmp_path / "whole.pth"
    torch.save(source.state_dict(), path)  # keys "encoder.*", "decoder.*", ...
    model = create_model(arch="fpn", encoder="resnet18", encoder_weights=path)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_safetensors_weights_and_first_conv_adapted_to_more_bands(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = create_model(arch="unet", encoder="resnet18")
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    model = create_model(arch="unet", encoder="resnet18", encoder_weights=path, in_channels=4)
    w, w3 = model.encoder.conv1.weight, source.encoder.conv1.weight
    assert w.shape == (64, 4, 7, 7)
    assert torch.allclose(w[:, 3], w3[:, 0] * 3 / 4) and torch.allclose(w[:, 1], w3[:, 1] * 3 / 4)


def test_weights_file_of_another_encoder_is_refused(tmp_path):
    import segmentation_models_pytorch as smp

    other = smp.encoders.get_encoder("mobilenet_v2", weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelError) as err:
        create_model(arch="deeplabv3plus", encoder="resnet18", encoder_weights=str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: does not match encoder 'resnet18': ")
    assert "encoder keys missing (e.g. conv1.weight, bn1.weight, bn1.bias)" in msg
    assert "unexpected keys (e.g. features.0.0.weight" in msg
    assert msg.endswith("pass weights saved from a 'resnet18' encoder or set model.encoder to the file's encoder")


def test_weights_file_with_other_shapes_names_the_mismatch(tmp_path):
    source = create_model(arch="unet", encoder="resnet34")
    path = tmp_path / "r34.pth"
    state = source.encoder.state_dict()
    state["fc.weight"] = torch.zeros(1)  # extra key too
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"does not match encoder 'resnet18': .*unexpected keys \(e\.g\. layer1\.2\."):
        create_model(arch="unet", encoder="resnet18", encoder_weights=path)


def test_missing_and_unreadable_weights_files(tmp_path):
    with pytest.raises(ModelError, match=r"missing\.pth: encoder weights file does not exist; check model.encoder_weights"):
        create_model(encoder="resnet18", encoder_weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=r"junk\.pth: is not a readable weights file \(.*\); pass a \.pth"):
        create_model(encoder="resnet18", encoder_weights=junk)


def test_imagenet_download_failure_is_a_model_error(monkeypatch):
    import segmentation_models_pytorch.encoders as enc

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(enc, "hf_hub_download", offline)
    with pytest.raises(ModelError) as err:
        create_model(encoder="resnet18", encoder_weights="imagenet")
    assert str(err.value) == (
        "encoder weights 'imagenet' for 'resnet18' could not be downloaded (no network); connect to "
        "the internet once, or set model.encoder_weights to a local weights file or null"
    )
    with pytest.raises(ModelError, match="encoder weights 'nonsense' are not available for encoder 'resnet18'"):
        create_model(encoder="resnet18", encoder_weights="nonsense")


def test_chip_size_must_fit_the_output_stride(tiny):
    check_chip_size(tiny, 64)
    check_chip_size(tiny, 16)
    with pytest.raises(ModelError) as err:
        check_chip_size(tiny, 24, arch="deeplabv3plus")
    assert str(err.value) == (
        "chip size 24 px is too small or not a multiple of the output stride (16 px) of deeplabv3plus; "
        "set data.chip_size to a multiple of 16 (e.g. 32) of at least 16"
    )
    with pytest.raises(ModelError, match=r"chip size 8 px .* \(16 px\)"):
        check_chip_size(tiny, 8)
    fpn = create_model(arch="fpn", encoder="resnet18")
    with pytest.raises(ModelError, match=r"chip size 48 px .* output stride \(32 px\) of fpn; .*\(e\.g\. 64\)"):
        check_chip_size(fpn, 48, arch="fpn")


def test_checkpoint_round_trip_restores_model_and_meta(tiny, tmp_path):
    path = tmp_path / "ckpt" / "best_iou.pt"
    meta = _meta()
    save_checkpoint(path, nn.DataParallel(tiny), meta, extra_state={"epoch": 3, "rng": torch.arange(5)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["best_iou.pt"]  # atomic: no temp left
    raw = torch.load(path, weights_only=True)
    assert raw["geoseg_checkpoint"] == 1 and raw["meta"]["bands"] == [1, 2, 3]
    assert all(not k.startswith("module.") for k in raw["state_dict"])
    model, loaded = load_checkpoint(path)
    assert loaded == meta
    assert not model.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tiny.eval()(x))
    data = read_checkpoint(path)
    assert data.extra["epoch"] == 3 and torch.equal(data.extra["rng"], torch.arange(5))


def test_missing_corrupt_and_foreign_checkpoints(tiny, tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "none.pt")
    assert str(err.value) == (
        f"{tmp_path / 'none.pt'}: checkpoint does not exist; run geoseg train first or pass the path of a checkpoint"
    )
    good = save_checkpoint(tmp_path / "good.pt", tiny, _meta())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: is not a readable checkpoint \(truncated, corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": tiny.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: is not a geoseg checkpoint; pass a checkpoint written by geoseg train"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a pickled module: refused by weights_only
    with pytest.raises(CheckpointError, match=r"pickled\.pt: holds Python objects or code, which geoseg never loads"):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_checkpoint_whose_weights_do_not_fit_its_architecture(tiny, tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", tiny, _meta(encoder="resnet34"))
    with pytest.raises(CheckpointError, match=r"x\.pt: weights do not fit deeplabv3plus/resnet34"):
        load_checkpoint(path)


def test_unwrap_model_sees_through_wrappers(tiny):
    assert unwrap_model(nn.DataParallel(nn.DataParallel(tiny))) is tiny
    assert unwrap_model(tiny) is tiny
