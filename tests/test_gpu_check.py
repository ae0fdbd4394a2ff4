"""examples/gpu_check.py runs end to end in its --tiny CPU mode, so that the first GPU run cannot rot.

The GPU run itself (a fresh GPU machine, 8 minutes) is the same code with bigger sizes, CUDA and fp16.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "gpu_check.py"
#: Seconds the tiny run may take on a busy 2-core CPU (it takes about 25).
TINY_TIMEOUT = 240


def _run(*args: str, timeout: float = TINY_TIMEOUT) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_tiny_run_prints_one_json_object_with_every_figure():
    code, out = _run("--tiny")
    assert out["errors"] == {} and code == 0
    assert list(out) == ["mode", "device", "model_only", "end_to_end", "tiles", "training", "ddp", "targets",
                         "seconds", "errors"]
    assert out["mode"] == "tiny"
    assert {"gpus", "torch", "cuda", "cudnn", "python", "cpu_count", "cpu_flags"} <= set(out["device"])

    model_only = out["model_only"]
    assert set(model_only) == {"bf16", "fp32", "settings"}  # on the GPU: bf16 and fp16 at 64/128/256
    for precision in ("bf16", "fp32"):
        assert set(model_only[precision]) == {"2", "4"}
        for point in model_only[precision].values():
            assert _positive(point["chips_per_s"]) and _positive(point["batch_seconds"])
            assert point["peak_gpu_mb"] is None  # the CPU has no GPU memory to report
    assert model_only["settings"]["chip_size"] == 32

    e2e = out["end_to_end"]
    for key in ("chips", "model_chips_per_s", "e2e_chips_per_s", "ratio", "e2e_seconds", "peak_rss_mb",
                "baseline_chips_per_s", "flops_per_chip", "matmul_tflops", "mfu", "scene_write_seconds"):
        assert _positive(e2e[key]), key
    assert e2e["scene_size"] == [128, 128] and e2e["peak_gpu_mb"] is None
    assert set(e2e["stages"]) >= {"read", "preprocess", "model", "blend_write", "vectorise", "wait_read"}
    assert all(v >= 0 for v in e2e["stages"].values()) and _positive(e2e["stages"]["model"])

    tiles = out["tiles"]  # 4 tiles of 64 px, 9 chips of 32 px each, batch 8: 36 chips in 5 calls, alone 4 x 2
    assert (tiles["tiles"], tiles["chips"], tiles["model_calls"], tiles["own_batches_calls"]) == (4, 36, 5, 8)
    for key in ("model_chips_per_s", "e2e_chips_per_s", "own_batches_chips_per_s", "replay_chips_per_s", "ratio"):
        assert _positive(tiles[key]), key
    assert "replay_chips_per_s" not in e2e  # the 8192² scene is not run twice more (its time budget)

    training = out["training"]
    assert set(training) == {"fp32", "bf16", "settings"}  # on the GPU: fp16 (GradScaler) and bf16 at batch 32
    for precision in ("fp32", "bf16"):
        assert _positive(training[precision]["chips_per_s"]) and training[precision]["peak_gpu_mb"] is None
    assert training["settings"]["batch_size"] == 2

    ddp = out["ddp"]  # two CPU processes with gloo (on the GPU machine: NCCL, one process per GPU)
    assert (ddp["world"], ddp["backend"], ddp["steps"], ddp["chips"]) == (2, "gloo", 2, 8)
    assert ddp["weights_equal_on_all_ranks"] is True and _positive(ddp["seconds"])

    assert set(out["targets"]) == {"model_only_bf16_chips_per_s", "e2e_over_model_only", "train_chips_per_s"}
    for target in out["targets"].values():
        assert _positive(target["target"]) and _positive(target["measured"]) and target["met"] is None
    assert set(out["seconds"]) == {"model_only", "end_to_end", "tiles", "training", "ddp", "total"}
    assert all(_positive(v) for v in out["seconds"].values())


FAKE_WORKER = """
import json, sys, time
parts = sys.argv[sys.argv.index("--parts") + 1].split(",")
def emit(kind, part, path=(), value=None):
    print(json.dumps({"gpu_check_event": kind, "part": part, "path": list(path), "value": value}), flush=True)
emit("result", "startup", ["device"], {"gpus": []})
for part in parts:
    emit("start", part)
    if part == "model_only":
        emit("result", part, ["bf16", "64"], {"chips_per_s": 10.0})
        time.sleep(60)  # hangs: the parent must kill it and go on in a fresh worker
    elif part == "training":
        sys.exit(3)  # dies inside the part
    emit("result", part, [], {"world": 2})
    emit("done", part)
"""


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_part_over_its_time_limit_is_cut_and_the_next_part_runs_in_a_fresh_worker(tmp_path):
    gpu_check = _load_script()
    fake = tmp_path / "worker.py"
    fake.write_text(FAKE_WORKER)
    budgets = {**gpu_check.BUDGETS, "model_only": 1.0}
    out = gpu_check.run_parts(["model_only", "training", "ddp"], tiny=True, budgets=budgets, total=30.0,
                              worker_command=[sys.executable, str(fake)])
    assert out["model_only"] == {"bf16": {"64": {"chips_per_s": 10.0}}}  # measured before the cut: kept
    assert out["errors"]["model_only"] == "timed out after 1 s (limit 1 s); figures measured before are kept"
    assert out["errors"]["training"] == "the worker died (exit status 3); see its stderr"
    assert set(out["errors"]) == {"model_only", "training"} and out["ddp"] == {"world": 2}
    assert out["targets"]["model_only_bf16_chips_per_s"]["measured"] == 10.0
    assert 1.0 <= out["seconds"]["model_only"] < 5 and out["seconds"]["total"] < 10
    # Out of time altogether: the parts not started are named.
    out = gpu_check.run_parts(["model_only", "ddp"], tiny=True, budgets=budgets, total=0.5,
                              worker_command=[sys.executable, str(fake)])
    assert out["errors"]["model_only"].startswith("timed out after 0 s (limit 0 s)")
    assert out["errors"]["ddp"] == "not run: the total budget of 0 s was spent"
