"""Benchmarks: prediction speed and memory, scaling with the scene, training throughput, precision agreement.

``benchmark`` is ``geoseg benchmark`` (:mod:`~geoseg.benchmarks.job`). Modules:
:mod:`~geoseg.benchmarks.workload` (the model and generated scenes they run on,
peak memory), :mod:`~geoseg.benchmarks.speed` (model-only vs end-to-end
prediction, stages, FLOP use, the per-chip baseline),
:mod:`~geoseg.benchmarks.scaling` (one fresh process per scene size; its
function ``scaling`` is not named here, where the name is the module's),
:mod:`~geoseg.benchmarks.training` (the training step per precision) and
:mod:`~geoseg.benchmarks.agreement` (fp32 vs mixed-precision masks). Nothing
here imports torch until a benchmark runs.
"""

from geoseg.benchmarks.agreement import AgreementResult, SceneAgreement, compare_masks, mask_agreement
from geoseg.benchmarks.job import benchmark
from geoseg.benchmarks.scaling import ScalingPoint
from geoseg.benchmarks.speed import BenchmarkResult, baseline_loop, matmul_flops, model_flops, run_benchmark
from geoseg.benchmarks.training import TrainBenchmark, TrainPoint, synthetic_batch, train_throughput
from geoseg.benchmarks.workload import (
    DEFAULT_SCENE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_large_scene,
    parse_size,
    parse_sizes,
    peak_rss_mb,
)

__all__ = [
    "DEFAULT_SCENE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AgreementResult",
    "BenchmarkResult",
    "ScalingPoint",
    "SceneAgreement",
    "TrainBenchmark",
    "TrainPoint",
    "baseline_loop",
    "benchmark",
    "compare_masks",
    "make_large_scene",
    "mask_agreement",
    "matmul_flops",
    "model_flops",
    "parse_size",
    "parse_sizes",
    "peak_rss_mb",
    "run_benchmark",
    "synthetic_batch",
    "train_throughput",
]
