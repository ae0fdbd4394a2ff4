"""DistributedDataParallel on CPU with gloo: 2 ranks x batch 2 train like 1 process x batch 4."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from geoseg.config import Config, load_config
from geoseg.synthetic import make_dataset

SETTINGS = [
    "model.encoder=resnet18", "model.encoder_weights=null", "data.chip_size=64", "train.epochs=2",
    "train.device=cpu", "train.precision=32", "augment.enabled=false", "train.lr=0.01",
    # the Dice term is computed over a whole batch, so per-rank Dice means differ from the
    # global one; cross-entropy over equally sized chips without ignored pixels averages exactly
    "train.dice_weight=0.0", "train.ce_weight=1.0",
]


class _NoBatchNormNet(nn.Module):
    """Stand-in model without BatchNorm: BatchNorm statistics over 2 chips per rank differ from
    those over 4 chips, and SyncBatchNorm only runs on GPUs, so DDP can match a single process
    exactly only for a model without it."""

    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _stand_in(**kwargs) -> nn.Module:
    return _NoBatchNormNet(kwargs["in_channels"], kwargs["classes"])


def _config(root: Path, out: Path, batch: int) -> Config:
    c = load_config(None, [*SETTINGS, f"data.batch_size={batch}"])
    return dataclasses.replace(c, data=dataclasses.replace(c.data, root=(str(root),)),
                               train=dataclasses.replace(c.train, out_dir=str(out)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: Config, report: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import geoseg.engine.training as engine

    saved: list[str] = []
    real_save = engine.save_checkpoint

    def counting_save(path, *args, **kwargs):
        saved.append(Path(path).name)
        return real_save(path, *args, **kwargs)

    engine.create_model = _stand_in
    engine.save_checkpoint = counting_save
    result = engine.fit(config)
    Path(report.format(rank=rank)).write_text(json.dumps({"history": result.history, "saved": saved}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "ds"
    make_dataset(root, layout="seed", n_scenes=3, width=128, height=128, seed=5)  # 8 train chips, 4 val
    return root


def test_two_gloo_ranks_match_one_process(data, tmp_path, monkeypatch):
    report = str(tmp_path / "rank{rank}.json")
    mp.spawn(_rank_main, args=(2, _free_port(), _config(data, tmp_path / "ddp", 2), report), nprocs=2, join=True)
    ranks = [json.loads(Path(report.format(rank=r)).read_text()) for r in (0, 1)]

    import geoseg.engine.training as engine

    monkeypatch.setattr(engine, "create_model", _stand_in)
    single = engine.fit(_config(data, tmp_path / "single", 4))

    assert ranks[0]["saved"] and ranks[1]["saved"] == []  # only rank 0 writes checkpoints
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "best_iou.pt", "best_loss.pt", "history.csv", "last.pt", "learning_curves.png", "split.json"]
    timing = ("seconds", "train_seconds", "train_chips_per_s")
    untimed = [[{k: v for k, v in row.items() if k not in timing} for row in r["history"]] for r in ranks]
    assert untimed[0] == untimed[1]  # metrics are reduced over ranks: every rank sees the same
    for got, want in zip(ranks[0]["history"], single.history, strict=True):
        assert got["epoch"] == want["epoch"] and got["lr"] == want["lr"]
        for key in ("train_loss", "val_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
        for key in ("train_pixel_accuracy", "train_iou", "val_pixel_accuracy", "val_iou", "val_f1"):
            assert got[key] == pytest.approx(want[key], abs=1e-3), key
    assert single.history[1]["train_loss"] < single.history[0]["train_loss"]  # it did learn


def test_torchrun_runs_the_train_command(data, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "geoseg.train", "--data", str(data), "--out-dir", str(out), "--device", "cpu",
        *[arg for s in [*SETTINGS, "train.epochs=1", "data.batch_size=2"] for arg in ("--set", s)],
    ]
    (tmp_path / "tmp").mkdir()  # torchrun leaves a torchelastic_* folder in TMPDIR: keep it in the test's own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1: train loss ") == 1  # rank 0 reports, rank 1 is quiet
    assert proc.stdout.count("checkpoints in ") == 1
    assert {"best_iou.pt", "last.pt", "history.csv"} <= {p.name for p in out.iterdir()}
