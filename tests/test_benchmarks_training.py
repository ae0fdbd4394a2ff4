"""geoseg benchmark --train: the real training step timed per precision, in one run."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from click.testing import CliRunner

from cli import cli
from geoseg.benchmarks.training import synthetic_batch, train_throughput
from geoseg.errors import ConfigError


def test_each_precision_trains_the_same_model_and_is_timed():
    res = train_throughput(encoder="resnet18", batch_size=2, chip_size=64, device="cpu",
                           precisions=["32", "bf16"], steps=2, repeats=2)
    assert [p.precision for p in res.points] == ["32", "bf16"]
    assert (res.device, res.batch_size, res.chip_size, res.steps, res.repeats) == ("cpu", 2, 64, 2, 2)
    for p in res.points:
        assert len(p.step_seconds) == 2 and all(t > 0 for t in p.step_seconds)
        assert p.chips_per_s == pytest.approx(2 / statistics.median(p.step_seconds), rel=1e-2)
        assert p.peak_gpu_mb is None and math.isfinite(p.final_loss)
    # Same initial weights and data: the bf16 step follows the fp32 one closely.
    fp32, bf16 = (p.final_loss for p in res.points)
    assert bf16 == pytest.approx(fp32, rel=0.1)
    d = res.to_dict()
    assert d["speedup_vs_fp32"]["32"] == 1.0 and set(d["speedup_vs_fp32"]) == {"32", "bf16"}


def test_synthetic_batch_is_fixed_and_has_both_classes():
    a, b = synthetic_batch(2, 64, 3, 2), synthetic_batch(2, 64, 3, 2)
    assert a["image"].equal(b["image"]) and a["mask"].equal(b["mask"])
    assert a["image"].shape == (2, 3, 64, 64) and set(a["mask"].unique().tolist()) == {0, 1}


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigError) as err:
        train_throughput(encoder="resnet18", batch_size=2, device="cpu", precisions=["16"])
    assert str(err.value) == "train.precision '16' (fp16) needs a CUDA GPU; use 'bf16' or '32' on CPU"
    with pytest.raises(ConfigError, match=r"^--batch-size 1 cannot train"):
        train_throughput(encoder="resnet18", batch_size=1, device="cpu")


def test_cli_train_json(monkeypatch):
    import geoseg.benchmarks.training as bt

    real = bt.train_throughput
    monkeypatch.setattr(bt, "train_throughput",
                        lambda **kw: real(**{**kw, "chip_size": 64, "steps": 1}))
    r = CliRunner().invoke(cli, ["benchmark", "--train", "--encoder", "resnet18", "--batch-size", "2",
                                 "--device", "cpu", "--precision", "bf16", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [p["precision"] for p in out["points"]] == ["32", "bf16"]
    assert out["model"] == "deeplabv3plus resnet18" and out["batch_size"] == 2
    r = CliRunner().invoke(cli, ["benchmark", "--train", "--encoder", "resnet18", "--batch-size", "2",
                                 "--device", "cpu", "--precision", "16"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "Error: train.precision '16' (fp16) needs a CUDA GPU; use 'bf16' or '32' on CPU"
    )
