"""Tests for geoseg.benchmarks.speed and `geoseg benchmark` (correctness of the report, not speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

import cli
from geoseg.benchmarks import make_large_scene, parse_size, run_benchmark
from geoseg.errors import ConfigError
from geoseg.inference.batching import Batches


def test_parse_size() -> None:
    assert parse_size("2048x1024") == (2048, 1024)
    assert parse_size("300") == (300, 300)
    with pytest.raises(ConfigError, match=r"size should look like WIDTHxHEIGHT in pixels .* got 'ax2'"):
        parse_size("ax2")
    with pytest.raises(ConfigError):
        parse_size("0x10")


def test_make_large_scene_repeats_the_tile_exactly(tmp_path) -> None:
    path = make_large_scene(tmp_path / "big.tif", 700, 450, tile=256, seed=3)
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (700, 450, 3, "uint8")
        assert src.crs is not None and src.block_shapes[0] == (256, 256)
        data = src.read()
    tile = data[:, :256, :256]
    assert np.array_equal(data[:, 256:450, 512:700], tile[:, : 450 - 256, : 700 - 512])
    assert np.array_equal(data[:, :256, 256:512], tile)
    assert tile.std() > 5  # a real generated texture, not a constant


def test_run_benchmark_reports_consistent_numbers(tmp_path) -> None:
    res = run_benchmark(
        encoder="resnet18", size=(300, 280), batch_size=4, repeats=1, precision="32",
        threads=1, baseline_chips=2,
    )
    d = res.to_dict()
    for key in ("model_chips_per_s", "e2e_chips_per_s", "ratio", "baseline_chips_per_s",
                "peak_rss_mb", "peak_gpu_mb", "mfu", "stages"):
        assert key in d
    assert d["peak_gpu_mb"] is None
    assert d["chips"] == 4  # 300x280 with 256-px chips and 64-px overlap: 2 x 2
    assert d["ratio"] == pytest.approx(d["e2e_chips_per_s"] / d["model_chips_per_s"], rel=1e-2)
    assert set(d["stages"]) >= {"read", "preprocess", "model", "blend_write", "vectorise"}
    # DeepLabV3+ ResNet18 on one 256-px chip: torch's counter gives about 9 GFLOP.
    assert 5e9 < d["flops_per_chip"] < 15e9
    assert d["mfu"] == pytest.approx(
        d["model_chips_per_s"] * d["flops_per_chip"] / (d["matmul_tflops"] * 1e12), rel=0.02)
    assert d["precision"] == "32"


def test_benchmark_cli_json_and_errors(tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli.cli, ["benchmark", "--encoder", "resnet18", "--size", "260x260",
                                  "--batch-size", "2", "--repeats", "1", "--precision", "32",
                                  "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["scene_size"] == [260, 260] and out["batch_size"] == 2
    bad = runner.invoke(cli.cli, ["benchmark", "--size", "big"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1] == (
        "Error: size should look like WIDTHxHEIGHT in pixels (e.g. 2048x2048), got 'big'"
    )
    missing = runner.invoke(cli.cli, ["benchmark", "--model", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 1 and "nope.pt" in missing.output and "Traceback" not in missing.output


def test_tiles_share_batches_and_compare_with_batches_of_their_own(tmp_path) -> None:
    """3 scenes of 2 x 2 chips at batch 3: shared, 12 chips make 4 full calls; alone, each scene makes 3 + 1."""
    res = run_benchmark(
        encoder="resnet18", size=(300, 280), batch_size=3, repeats=1, precision="32", threads=1,
        baseline_chips=2, tiles=3,
    )
    d = res.to_dict()
    assert (d["tiles"], d["chips"], d["scene_size"]) == (3, 12, (300, 280))
    assert d["model_calls"] == 4 and d["own_batches_calls"] == 6
    assert d["own_batches_chips_per_s"] > 0 and d["ratio"] == pytest.approx(
        d["e2e_chips_per_s"] / d["model_chips_per_s"], rel=1e-2)
    assert "no_ahead_chips_per_s" not in d  # a CPU run does not read ahead: nothing to compare
    single = run_benchmark(encoder="resnet18", size=(300, 280), batch_size=3, repeats=1, precision="32",
                           threads=1, baseline_chips=2).to_dict()
    assert single["model_calls"] == 2 and "own_batches_calls" not in single


def test_tiles_where_runs_read_ahead_are_also_run_without(monkeypatch) -> None:
    """On a device where runs set scenes up ahead (a GPU; here the CPU told so), the tiles run once more
    with shared batches and no look-ahead: the same 4 calls, its speed reported beside."""
    from geoseg.inference import job

    ahead: list[int] = []
    real = Batches.__init__

    def recording(self, batch_size, **kwargs):
        if "ahead" in kwargs:  # the benchmark's shared batches (a scene's own batches never read ahead)
            ahead.append(kwargs["ahead"])
        real(self, batch_size, **kwargs)

    monkeypatch.setattr(job, "scenes_ahead", lambda device: 2)
    monkeypatch.setattr(Batches, "__init__", recording)
    d = run_benchmark(encoder="resnet18", size=(300, 280), batch_size=3, repeats=1, precision="32", threads=1,
                      baseline_chips=2, tiles=3, replay=False).to_dict()
    assert d["model_calls"] == 4 and d["no_ahead_chips_per_s"] > 0
    assert sorted(ahead) == [0, 2]  # the run as predict makes it (2 ahead), and once without


def test_the_replayed_run_gives_the_same_masks_and_polygons_at_no_model_cost(tmp_path) -> None:
    """The model's outputs of one run, replayed to a run of the same scenes, make exactly its masks and
    polygons (its calls in the same order and sizes), with no time in the model."""
    from geoseg.benchmarks import speed
    from geoseg.benchmarks.workload import benchmark_model

    model, meta, _ = benchmark_model(None, arch="deeplabv3plus", encoder="resnet18", chip_size=256)
    scenes = [make_large_scene(tmp_path / f"s{i}.tif", 300, 280, seed=i) for i in range(3)]
    options = dict(batch_size=3, overlap=64, device="cpu", precision="32", threads=1, temp_dir=tmp_path,
                   compile_model=False, min_area=0.0, simplify=0.0)
    tape = speed._Tape()
    (tmp_path / "real").mkdir()
    (tmp_path / "again").mkdir()
    real = speed._predict_run(scenes, speed._taping(model, tape), meta, tmp_path / "real", shared=True, **options)
    speed._TAPES.pop(id(tape))
    # Only prediction's calls (the probes that check folded batch norms are not on it).
    assert [c.shape[0] for c in tape.calls] == [3, 3, 3, 3] and real.calls == 4
    again = speed._predict_run(scenes, speed._replay(tape), meta, tmp_path / "again", shared=True, **options)
    assert tape.position == 4 and again.chips == real.chips == 12 and again.stages["model"] < real.stages["model"]
    for i in range(3):
        with rasterio.open(tmp_path / "real" / f"mask{i}.tif") as a, rasterio.open(tmp_path / "again" / f"mask{i}.tif") as b:
            np.testing.assert_array_equal(a.read(), b.read())
    # Replayed to other chip counts (each scene its own batches: 3 + 1 chips), it refuses.
    tape.position = 0
    with pytest.raises(RuntimeError, match="replayed model call 1 had 3 chips, this one 1: the runs differ"):
        speed._predict_run(scenes, speed._replay(tape), meta, tmp_path / "again", shared=False, **options)
    d = run_benchmark(encoder="resnet18", size=(300, 280), batch_size=3, repeats=1, precision="32", threads=1,
                      baseline_chips=2, tiles=3).to_dict()
    assert d["replay_chips_per_s"] > 0 and not speed._TAPES  # the tape is let go
    off = run_benchmark(encoder="resnet18", size=(300, 280), batch_size=3, repeats=1, precision="32", threads=1,
                        baseline_chips=2, replay=False).to_dict()
    assert off["replay_chips_per_s"] is None


def test_tiles_cli_lines_and_errors(tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli.cli, ["benchmark", "--encoder", "resnet18", "--size", "260x260", "--tiles", "2",
                                  "--batch-size", "3", "--repeats", "1", "--precision", "32", "--threads", "1"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(ln.startswith("scene      2 scenes of generated 260x260 px, 8 chips of 256 px") for ln in lines)
    assert any(ln.startswith("end to end") and ln.endswith("3 model calls") for ln in lines)
    assert any(ln.startswith("own batches") and "4 model calls; shared batches are " in ln for ln in lines)
    bad = runner.invoke(cli.cli, ["benchmark", "--tiles", "2", "--scene", str(tmp_path / "s.tif")])
    assert bad.exit_code == 1 and bad.output.strip().splitlines()[-1] == (
        "Error: --tiles predicts generated scenes of --size; leave out --scene")


def test_the_random_benchmark_model_is_the_same_in_every_process():
    """Without a checkpoint the benchmark's weights are seeded: what they predict (and so the polygons' work)
    is the same from run to run; the caller's random stream is left as it was."""
    import subprocess
    import sys

    import torch

    from geoseg.benchmarks.workload import benchmark_model

    code = ("from geoseg.benchmarks.workload import benchmark_model; import torch; "
            "m, _, _ = benchmark_model(None, arch='unet', encoder='resnet18', chip_size=64); "
            "print(float(sum(p.double().sum() for p in m.parameters())))")
    sums = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
            for _ in range(2)}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model, _, _ = benchmark_model(None, arch="unet", encoder="resnet18", chip_size=64)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream untouched
    assert sums == {str(float(sum(p.double().sum() for p in model.parameters())))}
