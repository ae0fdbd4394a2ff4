"""Every preset in configs/ loads, and the presets hold the values they promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from geoseg.config import PRESETS_DIR, Config, load_config
from geoseg.errors import ConfigError
from geoseg.models import architectures, encoders

PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"default", "quickstart", "oam"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_and_names_a_real_model(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.arch in architectures() and config.model.encoder in encoders()
    assert config.data.chip_size % 16 == 0
    assert load_config(path.stem) == config  # presets load by name too


def test_default_holds_the_seed_values():
    c = load_config("default")
    assert (c.model.arch, c.model.encoder, c.model.encoder_weights) == ("deeplabv3plus", "resnet50", "imagenet")
    assert (c.data.batch_size, c.data.chip_size, c.data.root, c.data.split) == (32, 256, ("dataset",), (0.9, 0.05, 0.05))
    t = c.train
    assert (t.epochs, t.lr, t.weight_decay) == (50, 1e-3, 1e-4)
    assert (t.plateau_factor, t.plateau_patience, t.min_lr) == (0.5, 5, 1e-6)
    assert (t.grad_clip, t.early_stopping, t.ce_weight, t.dice_weight) == (1.0, 10, 0.6, 0.4)
    assert t.out_dir == "saved_models"
    assert c == Config()  # the file spells out the built-in defaults


def test_quickstart_is_small_and_offline():
    c = load_config("quickstart")
    assert c.model.encoder in ("resnet18", "mobilenet_v2", "efficientnet-b0", "timm-efficientnet-b0")
    assert c.model.encoder_weights is None
    assert c.train.epochs <= 20


def test_oam_reads_the_flat_layout():
    c = load_config("oam")
    assert c.data.layout == "flat" and c.data.root[0].endswith("hotosm-oam-buildings")


def test_overrides_and_wrong_types():
    c = load_config("quickstart", ["train.epochs=3", "model.encoder=resnet34"])
    assert (c.train.epochs, c.model.encoder) == (3, "resnet34")
    with pytest.raises(ConfigError, match=r"config key 'train.epochs' should be int, got 'many'"):
        load_config("default", ["train.epochs=many"])


def test_presets_and_splits_ship_inside_the_package():
    """setup.cfg maps configs/ to geoseg.presets and lists every package, so a wheel carries them."""
    import configparser

    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "geoseg").rglob("__init__.py")
    }
    assert listed == on_disk | {"geoseg.presets"}
    assert cfg["options"]["package_dir"].split() == ["geoseg.presets", "=", "configs"]
    patterns = cfg["options.package_data"]["geoseg.presets"].replace(",", " ").split()
    shipped = {p for pat in patterns for p in (root / "configs").glob(pat)}
    assert shipped == set((root / "configs").rglob("*.yaml")) and PRESETS_DIR == root / "configs"


def test_split_files_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from geoseg.datasets.splits import _read_split_file
    from geoseg.errors import InputFileError

    monkeypatch.chdir(tmp_path)  # not the repository root: the relative path in oam.yaml still works
    assert _read_split_file("oam_val_zanzibar") == {"val": ["zanzibar_*"]}
    assert _read_split_file("configs/splits/oam_val_zanzibar.yaml") == {"val": ["zanzibar_*"]}
    assert _read_split_file(load_config("oam").data.split_file) == {"val": ["kampala_*"]}
    with pytest.raises(InputFileError) as err:
        _read_split_file("oam_val_nairobi")
    assert str(err.value) == (
        "oam_val_nairobi: split file does not exist; check the path, or name a shipped split "
        "(oam_val_catanduanes, oam_val_kampala, oam_val_zanzibar)"
    )
