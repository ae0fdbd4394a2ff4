"""The first GPU run in one command: prediction and training speed, memory and a DDP smoke run, as ONE JSON object.

What it measures (DeepLabV3+ with a ResNet50 encoder and random weights, 256 px chips, 3 bands):

- ``model_only``: chips/s of geoseg's ChipPredictor on tensors already on the GPU, in bf16 and
  fp16 autocast, at batch 64, 128 and 256 (``geoseg.inference.model_throughput``), with the
  peak GPU memory of each; one more bf16 point at batch 128 with ``cudnn.benchmark`` on.
- ``end_to_end``: ``geoseg.benchmarks.run_benchmark`` on a generated 8192 x 8192 scene
  (``make_large_scene``): model-only vs end-to-end chips/s and their ratio, the time of each stage
  (read, preprocess, model, blend_write, vectorise, wait_read), peak GPU memory
  (``torch.cuda.max_memory_allocated``) and peak RSS, in bf16 at batch 128 (predict's GPU default).
- ``tiles``: 64 generated 512 x 512 tiles (9 chips each) as one run, ``run_benchmark(tiles=...)``:
  end to end with the batches shared by the tiles (as ``geoseg predict`` on a tile folder, which on a
  GPU sets the next tiles up and reads them ahead) and with each tile's own batches, the model calls
  of each, the shared batches without reading ahead (``no_ahead_chips_per_s``) and with the model's
  outputs replayed (``replay_chips_per_s``: the model's time zero, what the CPU side sustains), bf16
  at batch 128 (random weights).
- ``training``: chips/s of the real training step (``geoseg.benchmarks.train_throughput``)
  with fp16 + GradScaler and with bf16, batch 32, ``cudnn.benchmark`` on as ``geoseg train`` sets
  it, with the peak GPU memory of each.
- ``ddp``: two DistributedDataParallel training steps (NCCL) on two GPUs, when there are two or more.
- ``targets``: the issue's targets on an H100 (model-only bf16 >= 8000 chips/s, end to end
  >= 0.9 x model-only, training >= 1500 chips/s) against the figures measured.

It finishes within 8 minutes: each part runs under its own time limit (``BUDGETS``, seconds)
and all of them under ``TOTAL_BUDGET``, in a worker process that this script kills when a part
overruns (then the next parts go on in a fresh worker); the JSON says which parts were cut
short and keeps what they had measured. Progress goes to stderr, the JSON alone to stdout;
the exit status is 1 when a part failed or ran out of time.

On the GPU machine (Python 3.12 with torch, torchvision, timm, scipy, scikit-image, opencv,
numpy, click, tqdm, pyyaml; no network; no rasterio, segmentation-models-pytorch,
albumentations, shapely, geopandas, pyogrio or pyproj): first, on the development machine, from
the project root, download the wheels it lacks into ``.whl/`` (about 58 MiB, under the 64 MiB a
call carries with the working tree; all of them are needed: the end-to-end part writes polygons)::

    ../shared/device/wheels.sh

then run, from the project root on the GPU machine, carrying ``.whl``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    python3 examples/gpu_check.py > gpu_check.json

(``bash examples/gpu_check.sh`` does both steps and prints the JSON.) geoseg itself is not
installed there: it is imported from the checkout through ``PYTHONPATH``. ``--parts`` runs a
subset, ``--budget end_to_end=300`` changes one part's time limit (mind the 8 minutes).

``--tiny`` runs every part on the CPU in seconds (ResNet18, 32 px chips, a 128 x 128 scene, one
thread, a few steps, fp32 and bf16 instead of fp16 and bf16, and the DDP smoke run on two CPU
processes with gloo), so that the test suite runs this script (tests/test_gpu_check.py) and it
cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

#: Order in which the parts run.
PARTS = ("model_only", "end_to_end", "tiles", "training", "ddp")
#: Seconds each part may take on the GPU machine (``startup``: the worker's imports and CUDA
#: initialisation until the first part starts). Expected on an H100: about 10, 20, 60-120, 30, 20, 30.
BUDGETS = {"startup": 60.0, "model_only": 75.0, "end_to_end": 160.0, "tiles": 60.0, "training": 75.0, "ddp": 60.0}
#: Seconds for everything: under the 8 minutes the check is allowed, with room to start Python.
TOTAL_BUDGET = 450.0
#: The issue's targets on an H100.
TARGETS = {"model_only_bf16_chips_per_s": 8000.0, "e2e_over_model_only": 0.9, "train_chips_per_s": 1500.0}
#: Share of rooftop pixels the end-to-end model is calibrated to (see calibrated_checkpoint).
ROOF_SHARE = 0.2
#: Marker of the worker's JSON lines on its stdout (anything else there is ignored).
EVENT = "gpu_check_event"


def settings(tiny: bool) -> dict[str, Any]:
    """Sizes of every part: the GPU run, or the CPU run of ``--tiny``."""
    if tiny:
        return dict(
            device="cpu", threads=1, encoder="resnet18", chip=32, precisions=("bf16", "32"), batches=(2, 4),
            repeats=1, warmup=1, scene=128, e2e_batch=8, e2e_precision="32", baseline_chips=1, tiles=4, tile=64,
            train_batch=2, train_precisions=("32", "bf16"), train_steps=1, train_repeats=1,
            ddp_world=2, ddp_batch=2,
        )
    return dict(
        device="cuda", threads=None, encoder="resnet50", chip=256, precisions=("bf16", "16"), batches=(64, 128, 256),
        repeats=10, warmup=2, scene=8192, e2e_batch=128, e2e_precision="bf16", baseline_chips=4, tiles=64, tile=512,
        train_batch=32, train_precisions=("16", "bf16"), train_steps=10, train_repeats=3,
        ddp_world=None, ddp_batch=32,
    )


def precision_key(name: str) -> str:
    """JSON key of a geoseg precision name: ``16`` -> ``fp16``, ``32`` -> ``fp32``, ``bf16``."""
    return {"16": "fp16", "32": "fp32"}.get(name, name)


# --- the worker: runs the parts, one JSON line per finished measurement -----------------------------

def emit(part: str, kind: str, path: tuple[str, ...] = (), value: Any = None) -> None:
    """One event line on stdout for the parent (start, result, done)."""
    line = {EVENT: kind, "part": part, "path": list(path), "value": value}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def say(message: str) -> None:
    """Progress on stderr."""
    sys.stderr.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _peak_gpu_mb(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def device_info() -> dict[str, Any]:
    """The machine the figures come from."""
    import torch

    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            words = set(next((line for line in f if line.startswith("flags")), "").split())
        flags = sorted(w for w in words if w.startswith(("avx", "amx")))
    except OSError:
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_mb": round(p.total_memory / 2**20),
                         "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    return {
        "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu_flags": flags,
    }


def part_model_only(s: dict[str, Any]) -> None:
    """Chips/s per precision and batch size on pre-loaded tensors, peak GPU memory of each."""
    import torch

    from geoseg.devices import resolve_device
    from geoseg.inference import model_throughput
    from geoseg.models import create_model

    dev = resolve_device(s["device"], setting="device")
    model = create_model(arch="deeplabv3plus", encoder=s["encoder"], encoder_weights=None, in_channels=3, classes=2)
    points = [(p, b, False) for p in s["precisions"] for b in s["batches"]]
    if dev.type == "cuda":
        points.append((s["precisions"][0], s["e2e_batch"], True))
    for precision, batch, cudnn_benchmark in points:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        say(f"model only: {precision_key(precision)} batch {batch}{' cudnn.benchmark' if cudnn_benchmark else ''}")
        _reset_peak(dev)
        tp = model_throughput(model, in_channels=3, chip_size=s["chip"], classes=2, batch_size=batch,
                              device=str(dev), precision=precision, repeats=s["repeats"], warmup=s["warmup"],
                              threads=s["threads"])
        value = {"chips_per_s": round(tp.chips_per_s, 2), "batch_seconds": round(tp.seconds, 5),
                 "peak_gpu_mb": _peak_gpu_mb(dev), "repeats": tp.repeats}
        key = f"{precision_key(precision)}_cudnn_benchmark" if cudnn_benchmark else precision_key(precision)
        emit("model_only", "result", (key, str(batch)), value)
    torch.backends.cudnn.benchmark = False
    emit("model_only", "result", ("settings",), {"model": f"deeplabv3plus/{s['encoder']} (random weights)",
                                                 "chip_size": s["chip"], "device": str(dev)})


def calibrated_checkpoint(path: Path, scene: Path, s: dict[str, Any]) -> Path:
    """A checkpoint of the random-weight model whose rooftop logit is shifted so that about
    :data:`ROOF_SHARE` of the scene's pixels come out rooftop.

    Left as it is, a random model calls nearly every pixel rooftop (or none): the vectoriser
    would see one scene-sized polygon (or nothing), and its stage time would say nothing about
    a real run.
    """
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window

    from geoseg.benchmarks import IMAGENET_MEAN, IMAGENET_STD
    from geoseg.checkpoints import CheckpointMeta, save_checkpoint
    from geoseg.devices import resolve_device
    from geoseg.models import create_model

    chip = s["chip"]
    torch.manual_seed(0)
    model = create_model(arch="deeplabv3plus", encoder=s["encoder"], encoder_weights=None, in_channels=3, classes=2)
    meta = CheckpointMeta(arch="deeplabv3plus", encoder=s["encoder"], in_channels=3, classes=2,
                          class_names=("background", "rooftop"), bands=(1, 2, 3), mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, chip_size=chip)
    side = min(4 * chip, s["scene"]) // chip * chip
    with rasterio.open(scene) as src:
        raw = torch.from_numpy(src.read(window=Window(0, 0, side, side)).astype(np.float32))
    x = (raw - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[:, None, None]
    chips = x.unfold(1, chip, chip).unfold(2, chip, chip).permute(1, 2, 0, 3, 4).reshape(-1, 3, chip, chip)
    dev = resolve_device(s["device"], setting="device")
    with torch.inference_mode():
        logits = model.eval().to(dev)(chips.to(dev)).float().cpu()
    diff = (logits[:, 1] - logits[:, 0]).flatten()
    cut = float(torch.quantile(diff[:: max(1, diff.numel() // 2**20)], 1.0 - ROOF_SHARE))
    with torch.no_grad():
        model.segmentation_head[0].bias[1] -= cut
    return save_checkpoint(path, model.cpu(), meta)


def part_end_to_end(s: dict[str, Any]) -> None:
    """geoseg.benchmarks on a generated scene: model-only vs end to end, stages, memory."""
    from geoseg.benchmarks import make_large_scene, run_benchmark

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        n = s["scene"]
        say(f"end to end: writing a {n}x{n} scene")
        t0 = time.perf_counter()
        scene = make_large_scene(Path(tmp) / "scene.tif", n, n)
        written = time.perf_counter() - t0
        checkpoint = calibrated_checkpoint(Path(tmp) / "model.pt", scene, s)
        say(f"end to end: predicting it ({precision_key(s['e2e_precision'])}, batch {s['e2e_batch']})")
        r = run_benchmark(model_path=checkpoint, scene=scene, batch_size=s["e2e_batch"], device=s["device"],
                          precision=s["e2e_precision"], repeats=1, chip_size=s["chip"],
                          baseline_chips=s["baseline_chips"], threads=s["threads"], replay=False,
                          progress=lambda m: say(f"end to end: {m}"))
    d = r.to_dict()
    keep = ("device", "precision", "batch_size", "chip_size", "overlap", "scene_size", "chips",
            "model_chips_per_s", "e2e_chips_per_s", "ratio", "stages", "e2e_seconds", "peak_gpu_mb",
            "peak_rss_mb", "baseline_chips_per_s", "flops_per_chip", "matmul_tflops", "mfu")
    emit("end_to_end", "result", (), {
        **{k: d[k] for k in keep}, "scene_write_seconds": round(written, 2),
        "model": f"deeplabv3plus/{s['encoder']} (random weights, rooftop logit shifted to {ROOF_SHARE:.0%} rooftop)",
    })


def part_tiles(s: dict[str, Any]) -> None:
    """Many small tiles in one run: batches shared by the tiles against each tile's own, and their model calls."""
    from geoseg.benchmarks import run_benchmark

    n, side = s["tiles"], s["tile"]
    say(f"tiles: {n} tiles of {side}x{side} ({precision_key(s['e2e_precision'])}, batch {s['e2e_batch']})")
    r = run_benchmark(encoder=s["encoder"], size=(side, side), tiles=n, batch_size=s["e2e_batch"],
                      device=s["device"], precision=s["e2e_precision"], repeats=1, chip_size=s["chip"],
                      baseline_chips=s["baseline_chips"], threads=s["threads"],
                      progress=lambda m: say(f"tiles: {m}"))
    d = r.to_dict()
    keep = ("tiles", "scene_size", "chips", "batch_size", "precision", "model_chips_per_s", "e2e_chips_per_s",
            "ratio", "model_calls", "own_batches_chips_per_s", "own_batches_calls", "replay_chips_per_s",
            "peak_gpu_mb", "stages")
    # Where runs read ahead (a GPU): the same shared batches without it, in the same run.
    ahead = {k: d[k] for k in ("no_ahead_chips_per_s",) if k in d}
    emit("tiles", "result", (), {**{k: d[k] for k in keep}, **ahead,
                                 "model": f"deeplabv3plus/{s['encoder']} (random weights)"})


def part_training(s: dict[str, Any]) -> None:
    """The real training step per precision (fp16 + GradScaler, bf16), peak GPU memory of each."""
    import torch

    from geoseg.benchmarks import train_throughput

    torch.backends.cudnn.benchmark = s["device"] == "cuda"  # as geoseg train sets it on a GPU
    res = train_throughput(encoder=s["encoder"], batch_size=s["train_batch"], chip_size=s["chip"],
                           device=s["device"], precisions=list(s["train_precisions"]), steps=s["train_steps"],
                           repeats=s["train_repeats"], threads=s["threads"],
                           progress=lambda m: say(f"training: {m}"))
    dev = torch.device(res.device)
    for p in res.points:
        emit("training", "result", (precision_key(p.precision),),
             {"chips_per_s": p.chips_per_s, "step_seconds": p.step_seconds, "peak_gpu_mb": p.peak_gpu_mb,
              "final_loss": p.final_loss})
    emit("training", "result", ("settings",), {
        "model": res.model, "device": res.device, "batch_size": res.batch_size, "chip_size": res.chip_size,
        "steps": res.steps, "repeats": res.repeats, "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "peak_gpu_mb_total": _peak_gpu_mb(dev),
    })


def _ddp_rank(rank: int, world: int, port: int, s: dict[str, Any], report: str) -> None:
    """One DDP rank: geoseg's torchrun set-up from the environment, two real training steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from geoseg.benchmarks import synthetic_batch
    from geoseg.devices import resolve_precision
    from geoseg.engine.devices import setup_distributed
    from geoseg.engine.loop import EpochLoop
    from geoseg.losses import SegmentationLoss
    from geoseg.models import create_model

    if s["device"] == "cpu":
        torch.set_num_threads(1)
    ctx, dev = setup_distributed(s["device"])
    try:
        torch.manual_seed(0)
        model = create_model(arch="deeplabv3plus", encoder=s["encoder"], encoder_weights=None, in_channels=3,
                             classes=2).to(dev).to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        amp_dtype, use_scaler = resolve_precision("bf16", dev)
        loop = EpochLoop(model=ddp, criterion=SegmentationLoss().to(dev),
                         optimizer=torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=1e-4),
                         scaler=torch.amp.GradScaler(dev.type, enabled=use_scaler), device=dev,
                         amp_dtype=amp_dtype, ctx=ctx, classes=2, grad_clip=1.0, channels_last=True,
                         epochs=1, progress=None)
        batch = synthetic_batch(s["ddp_batch"], s["chip"], 3, 2, seed=rank)
        t0 = time.perf_counter()
        stats = loop.train_epoch([batch, batch], 1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        # The ranks must hold the same weights after the steps: DDP averaged their gradients.
        total = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
        sums = [torch.zeros_like(total) for _ in range(world)]
        dist.all_gather(sums, total)
        if rank == 0:
            Path(report).write_text(json.dumps({
                "world": world, "backend": dist.get_backend(), "steps": 2, "batch_per_rank": s["ddp_batch"],
                "seconds": round(seconds, 3), "loss": round(stats.loss, 4), "chips": stats.chips,
                "weights_equal_on_all_ranks": len({float(x) for x in sums}) == 1,
            }))
    finally:
        if ctx.owned:
            dist.destroy_process_group()


def part_ddp(s: dict[str, Any]) -> None:
    """Two DDP training steps on every GPU (at least two), or on two CPU processes in ``--tiny``."""
    import socket

    import torch
    import torch.multiprocessing as mp

    world = s["ddp_world"] or (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if world < 2:
        emit("ddp", "result", (), {"skipped": f"{world} GPU: DistributedDataParallel needs two or more"})
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        report = str(Path(tmp) / "rank0.json")
        say(f"ddp: 2 training steps on {world} {'GPUs' if s['device'] == 'cuda' else 'CPU processes'}")
        # CUDA needs fresh processes; CPU ranks are forked (no second import of torch: seconds, not tens).
        mp.start_processes(_ddp_rank, args=(world, port, s, report), nprocs=world, join=True,
                           start_method="spawn" if s["device"] == "cuda" else "fork")
        emit("ddp", "result", (), json.loads(Path(report).read_text()))


PART_FUNCTIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "model_only": part_model_only, "end_to_end": part_end_to_end, "tiles": part_tiles, "training": part_training,
    "ddp": part_ddp,
}


def worker(parts: list[str], tiny: bool) -> int:
    """Run ``parts`` in order; a failed part is reported and the next one runs."""
    s = settings(tiny)
    if not tiny:
        import torch

        if not torch.cuda.is_available():
            emit("startup", "error", (), "no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                                         "run this on the GPU machine, or pass --tiny for the CPU check")
            return 1
    emit("startup", "result", ("device",), device_info())
    for part in parts:
        emit(part, "start")
        try:
            PART_FUNCTIONS[part](s)
        except Exception as exc:  # noqa: BLE001 - report it in the JSON and go on with the next part
            lines = str(exc).strip().splitlines() or [""]
            emit(part, "error", (), f"{type(exc).__name__}: {lines[0][:300]}")
        emit(part, "done")
    return 0


# --- the parent: starts workers, enforces the time limits, prints the one JSON object --------------

def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path:
        tree[path[-1]] = value
    elif isinstance(value, dict):
        tree.update(value)


def _kill(proc: subprocess.Popen) -> None:
    """End the worker and the processes it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_parts(parts: list[str], *, tiny: bool, budgets: dict[str, float], total: float,
              worker_command: list[str] | None = None) -> dict[str, Any]:
    """Run the parts in worker processes under their time limits; the JSON object as a dict.

    ``worker_command``: the worker to start (default: this script with ``--worker``); it gets
    ``--parts A,B`` (and ``--tiny``) appended and answers with event lines (:func:`emit`).
    """
    base = worker_command or [sys.executable, os.path.abspath(__file__), "--worker"]
    t_start = time.monotonic()
    deadline = t_start + total
    out: dict[str, Any] = {"mode": "tiny" if tiny else "gpu", "device": None}
    out.update({p: {} for p in parts})
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    todo = list(parts)
    while todo:
        if time.monotonic() >= deadline:
            for p in todo:
                errors[p] = f"not run: the total budget of {total:.0f} s was spent"
            break
        cmd = [*base, "--parts", ",".join(todo)]
        if tiny:
            cmd.append("--tiny")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: Any = proc.stdout, sink: queue.Queue = lines) -> None:
            for line in stream:
                sink.put(line)
            sink.put(None)

        threading.Thread(target=pump, daemon=True).start()
        current, started = "startup", time.monotonic()
        while True:
            limit = min(started + budgets.get(current, budgets["startup"]), deadline)
            try:
                line = lines.get(timeout=max(0.0, limit - time.monotonic()))
            except queue.Empty:
                _kill(proc)
                errors[current] = (f"timed out after {time.monotonic() - started:.0f} s "
                                   f"(limit {limit - started:.0f} s); figures measured before are kept")
                if current in todo:
                    seconds[current] = round(time.monotonic() - started, 1)
                    todo.remove(current)
                elif current == "startup":  # a fresh worker would not start any faster
                    todo = []
                break
            if line is None:  # the worker ended
                proc.wait()
                if current != "startup" and current in todo:  # it died inside a part
                    errors[current] = f"the worker died (exit status {proc.returncode}); see its stderr"
                    todo.remove(current)
                elif current == "startup" and "startup" not in errors and todo:
                    errors["startup"] = f"the worker ended before any part (exit status {proc.returncode})"
                    todo = []
                break
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict) or EVENT not in event:
                continue
            kind, part = event[EVENT], event["part"]
            if kind == "start":
                current, started = part, time.monotonic()
            elif kind == "result" and part == "startup":
                out["device"] = event["value"]
            elif kind == "result":
                _put(out[part], event["path"], event["value"])
            elif kind == "error":
                errors[part] = event["value"]
                if part == "startup":
                    todo = []
            elif kind == "done":
                seconds[part] = round(time.monotonic() - started, 1)
                if part in todo:
                    todo.remove(part)
                current, started = "between parts", time.monotonic()
    seconds["total"] = round(time.monotonic() - t_start, 1)
    out["targets"] = targets(out, tiny=tiny)
    out["seconds"] = seconds
    out["errors"] = errors
    return out


def targets(out: dict[str, Any], *, tiny: bool) -> dict[str, Any]:
    """The issue's H100 targets against what was measured (``met`` is None in ``--tiny`` or when unmeasured)."""
    bf16 = out.get("model_only", {}).get("bf16", {})
    model_best = max((v["chips_per_s"] for v in bf16.values()), default=None)
    ratio = out.get("end_to_end", {}).get("ratio")
    train = [v["chips_per_s"] for k, v in out.get("training", {}).items() if k != "settings"]
    train_best = max(train, default=None)

    def check(measured: float | None, target: float) -> dict[str, Any]:
        met = None if tiny or measured is None else measured >= target
        return {"target": target, "measured": measured, "met": met}

    return {
        "model_only_bf16_chips_per_s": check(model_best, TARGETS["model_only_bf16_chips_per_s"]),
        "e2e_over_model_only": check(ratio, TARGETS["e2e_over_model_only"]),
        "train_chips_per_s": check(train_best, TARGETS["train_chips_per_s"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the one JSON object; exit status 1 when a part failed or ran out of time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="every part on the CPU in seconds (for the tests)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every time limit (e.g. 0.5 for a quicker, riskier run)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="time limit of one part (or startup), e.g. end_to_end=300 (repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.worker:
        return worker(parts, args.tiny)
    budgets = {k: v * args.budget_scale for k, v in BUDGETS.items()}
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            budgets[name] = float(value)
        except ValueError:
            parser.error(f"--budget should look like end_to_end=300, got {item!r}")
        if name not in BUDGETS:
            parser.error(f"--budget: unknown part {name!r}; choose from {', '.join(BUDGETS)}")
    result = run_parts(parts, tiny=args.tiny, budgets=budgets, total=TOTAL_BUDGET * args.budget_scale)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
