"""``geoseg benchmark`` as one library call: prediction speed (and scaling), training throughput or agreement."""

from __future__ import annotations

import os
from typing import Sequence

from geoseg.benchmarks.agreement import AgreementResult
from geoseg.benchmarks.speed import BenchmarkResult
from geoseg.benchmarks.training import TrainBenchmark
from geoseg.benchmarks.workload import DEFAULT_SCENE_SIZE, ProgressFn, parse_size, parse_sizes
from geoseg.errors import ConfigError


def benchmark(
    *,
    model_path: str | os.PathLike[str] | None = None,
    encoder: str = "resnet50",
    scene: str | os.PathLike[str] | None = None,
    size: str | tuple[int, int] = DEFAULT_SCENE_SIZE,
    batch_size: int = 16,
    overlap: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    repeats: int = 3,
    threads: int | None = None,
    scaling: str | Sequence[int] | None = None,
    compile: bool = False,
    train: bool = False,
    agreement: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    progress: ProgressFn | None = None,
    resolution: str | float = "native",
    tiles: int = 1,
) -> BenchmarkResult | TrainBenchmark | AgreementResult:
    """Measure what ``geoseg benchmark`` measures, chosen as the command chooses it.

    - ``train``: the real training step of a DeepLabV3+ ``encoder`` in fp32 and
      ``precision`` (``"auto"``: every mixed precision the device has), by
      :func:`geoseg.benchmarks.training.train_throughput`.
    - else ``agreement`` (scenes: files, folders or globs): the masks of
      ``model_path`` in fp32 and in ``precision`` (``"auto"`` or ``"32"``: bf16)
      compared pixel by pixel, by :func:`geoseg.benchmarks.agreement.mask_agreement`.
    - else prediction speed, model only and end to end, on ``scene`` or a generated
      scene of ``size``, then a fresh process per ``scaling`` size, by
      :func:`geoseg.benchmarks.speed.run_benchmark`.

    Args:
        model_path: Checkpoint or exported ONNX model (None: ``encoder`` with random weights).
        encoder: smp encoder of the DeepLabV3+ benchmarked without ``model_path``.
        scene: Scene to predict (None: generated).
        size: (width, height) in pixels of the generated scene, or ``"WxH"``.
        batch_size: Chips per model call (training: per step).
        overlap: Chip overlap in pixels (None: a quarter of the chip).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"``, ``"32"``, ``"bf16"``, ``"16"`` or ``"int8"`` (prediction).
        repeats: Timed repeats (medians are reported).
        threads: Torch CPU threads (None: geoseg's default).
        scaling: Sides in pixels of the square scenes predicted in fresh processes, or ``"N,N,..."``.
        compile: ``torch.compile`` the model of the speed measurements.
        train: Measure training throughput instead.
        agreement: Measure the agreement of fp32 and mixed-precision masks on these scenes instead.
        progress: Called with a short description before each stage.
        resolution: Ground resolution the ``scaling`` runs read their scenes at (``auto``,
            ``native`` or metres; the generated scenes are 0.3 m).
        tiles: Predict this many generated scenes of ``size`` as one run, batches shared by the
            scenes, and each with batches of its own, for comparison.

    Returns:
        The training throughput, the agreement, or the prediction speed (with its scaling points).

    Raises:
        ConfigError: Bad sizes, batch size, repeats, device or precision; ``agreement``
            without ``model_path``; a scaling run that failed.
        CheckpointError: Unreadable checkpoint.
        InputFileError: Unreadable scene.
    """
    if train:
        from geoseg.benchmarks.training import train_throughput

        precisions = None if precision == "auto" else list(dict.fromkeys(["32", precision]))
        return train_throughput(encoder=encoder, batch_size=batch_size, device=device,
                                precisions=precisions, repeats=repeats, threads=threads, progress=progress)
    if agreement is not None:
        from geoseg.benchmarks.agreement import mask_agreement

        if model_path is None:
            raise ConfigError("--agreement compares the masks of a trained model; pass --model CKPT")
        scenes = [agreement] if isinstance(agreement, (str, os.PathLike)) else list(agreement)
        return mask_agreement(scenes, model_path, precision="bf16" if precision in ("auto", "32") else precision,
                              device=device, batch_size=batch_size, progress=progress)
    from geoseg.benchmarks.speed import run_benchmark

    sizes = parse_sizes(scaling) if isinstance(scaling, str) else list(scaling or ())
    return run_benchmark(
        model_path=model_path, encoder=encoder, scene=scene,
        size=parse_size(size) if isinstance(size, str) else size, batch_size=batch_size, device=device,
        precision=precision, overlap=overlap, repeats=repeats, threads=threads, compile=compile,
        scaling=sizes, scaling_resolution=resolution, progress=progress, tiles=tiles,
    )
