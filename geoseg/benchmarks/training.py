"""Training throughput by precision, measured in one run with the real training step.

Each precision gets its own model (same initial weights), AdamW, GradScaler and
:class:`geoseg.engine.loop.EpochLoop`, so a timed step is exactly what
``geoseg train`` runs: autocast forward, CE + Dice loss, non-finite check,
backward, unscale and gradient clipping, optimiser step, confusion counts.
Batches are pre-made tensors (data loading is not timed), precisions are
interleaved over the repeats and medians reported, so the ratios hold on a
noisy machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from geoseg.benchmarks.workload import ProgressFn
from geoseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: Precision names in the order they are reported.
PRECISIONS = ("32", "16", "bf16")


@dataclass
class TrainPoint:
    """One precision's training throughput."""

    precision: str
    chips_per_s: float
    step_seconds: list[float]
    peak_gpu_mb: float | None
    final_loss: float


@dataclass
class TrainBenchmark:
    """Training throughput for each precision, from one run."""

    model: str
    device: str
    threads: int
    batch_size: int
    chip_size: int
    steps: int
    repeats: int
    points: list[TrainPoint]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``speedup`` is each precision's chips/s over fp32's."""
        out = asdict(self)
        base = next((p.chips_per_s for p in self.points if p.precision == "32"), None)
        out["speedup_vs_fp32"] = {
            p.precision: round(p.chips_per_s / base, 3) for p in self.points if base
        }
        return out


def default_precisions(device: torch.device) -> list[str]:
    """fp32 and every mixed precision the device runs natively."""
    import torch

    from geoseg.devices import cpu_supports_bf16

    if device.type == "cuda":
        return ["32", "16", "bf16"] if torch.cuda.is_bf16_supported() else ["32", "16"]
    return ["32", "bf16"] if cpu_supports_bf16() else ["32"]


def synthetic_batch(batch_size: int, chip_size: int, in_channels: int, classes: int,
                    *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A normalised image batch and a mask of random rectangles (a fixed, learnable target)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, in_channels, chip_size, chip_size, generator=g)
    masks = torch.zeros(batch_size, chip_size, chip_size, dtype=torch.long)
    for b in range(batch_size):
        for _ in range(6):
            r, c = torch.randint(0, chip_size - 16, (2,), generator=g).tolist()
            h, w = torch.randint(8, chip_size // 3, (2,), generator=g).tolist()
            masks[b, r:r + h, c:c + w] = int(torch.randint(1, classes, (1,), generator=g))
            images[b, :, r:r + h, c:c + w] += 1.0  # the rectangles are visible in the image
    return {"image": images, "mask": masks}


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held between steps: parameters, gradients and optimiser state."""
    import torch

    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def train_throughput(
    *,
    arch: str = "deeplabv3plus",
    encoder: str = "resnet50",
    batch_size: int = 8,
    chip_size: int = 256,
    device: str = "auto",
    precisions: Sequence[str] | None = None,
    steps: int = 4,
    repeats: int = 3,
    threads: int | None = None,
    in_channels: int = 3,
    classes: int = 2,
    progress: ProgressFn | None = None,
) -> TrainBenchmark:
    """Chips/s of the real training step for each precision, interleaved over ``repeats``.

    Raises:
        ConfigError: Unknown precision, fp16 on a CPU, batch size below 2 (BatchNorm),
            or no CUDA GPU when ``device`` is ``"cuda"``.
    """
    import torch

    from geoseg.devices import resolve_device, resolve_precision
    from geoseg.engine.devices import DistContext
    from geoseg.engine.loop import EpochLoop
    from geoseg.losses import SegmentationLoss
    from geoseg.models import create_model

    say = progress or (lambda _msg: None)
    if batch_size < 2:
        raise ConfigError(f"--batch-size {batch_size} cannot train (BatchNorm needs at least 2 chips); use 2 or more")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device, local_rank=0, setting="train.device")
    names = list(precisions) if precisions else default_precisions(dev)
    for name in names:
        if name not in PRECISIONS:
            raise ConfigError(f"precision should be one of {', '.join(PRECISIONS)}, got {name!r}")
        resolve_precision(name, dev, setting="train.precision")  # fp16 on a CPU is refused here, before any work
    cuda = dev.type == "cuda"
    batch = synthetic_batch(batch_size, chip_size, in_channels, classes)
    loader = [batch] * steps

    loops: dict[str, EpochLoop] = {}
    for name in names:
        torch.manual_seed(0)  # the same initial weights for every precision
        model = create_model(arch=arch, encoder=encoder, encoder_weights=None,
                             in_channels=in_channels, classes=classes).to(dev)
        model = model.to(memory_format=torch.channels_last)
        amp_dtype, use_scaler = resolve_precision(name, dev, setting="train.precision")
        loops[name] = EpochLoop(
            model=model, criterion=SegmentationLoss().to(dev),
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4),
            scaler=torch.amp.GradScaler(dev.type, enabled=use_scaler), device=dev,
            amp_dtype=amp_dtype, ctx=DistContext(), classes=classes, grad_clip=1.0,
            channels_last=True, epochs=1, progress=None,
        )
        say(f"warming up {encoder} training in {name}")
        loops[name].train_epoch([batch] * 2, 0)

    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = {}
    losses: dict[str, float] = {}
    for r in range(repeats):
        for name in names:
            say(f"repeat {r + 1}/{repeats}: {steps} training steps in {name}")
            loop = loops[name]
            if cuda:
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev) - _state_bytes(loop.model, loop.optimizer)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            stats = loop.train_epoch(loader, r + 1)
            if cuda:
                torch.cuda.synchronize(dev)
                peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                peaks[name] = max(peaks.get(name, 0.0), peak)
            times[name].append((time.perf_counter() - t0) / steps)
            losses[name] = stats.loss
    points = [
        TrainPoint(
            precision=n, chips_per_s=round(batch_size / statistics.median(times[n]), 3),
            step_seconds=[round(t, 4) for t in times[n]],
            peak_gpu_mb=round(peaks[n], 1) if cuda else None, final_loss=round(losses[n], 4),
        )
        for n in names
    ]
    return TrainBenchmark(
        model=f"{arch} {encoder}", device=str(dev), threads=torch.get_num_threads(),
        batch_size=batch_size, chip_size=chip_size, steps=steps, repeats=repeats, points=points,
    )
