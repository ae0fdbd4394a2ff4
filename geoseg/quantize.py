"""int8 models for the CPU: post-training static quantisation of an exported model with ONNX Runtime.

``predict --precision int8`` (and ``benchmark``, and ``export --int8``) turn a
checkpoint into an int8 ONNX graph: the fp32 graph of :mod:`geoseg.model_export`,
calibrated on chips of the scenes being predicted, quantised by ONNX Runtime's
maintained static quantiser (QDQ format, int8 weights per output channel, uint8
activations, min/max calibration) and run by :class:`geoseg.onnx_model.OnnxModel`.

Why ONNX Runtime: measured against PyTorch's own paths on the same machine, it was
the fastest (see the README's Speed section), and it needs no C++ compiler at run time
(PyTorch's PT2E x86 quantiser runs through ``torch.compile``/inductor).

Why 7-bit weights on some CPUs: without VNNI (AVX2 only, or AVX-512 without VNNI) ONNX
Runtime multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds each
pair of products in int16 and clips the sum, and ONNX Runtime's documentation advises
quantising the weights to 7 bits there (``reduce_range``). Measured with a ResNet18 trained on
the OpenAerialMap tiles, all 56 tiles against fp32, on one AMX Xeon with its CPUID masked to
AVX2 (``examples/as_avx2_cpu.sh``): full-range weights 27,286 differing pixels (rooftop IoU
0.9820); 7-bit 24,973 (0.9836) at the same speed; full range on the unmasked CPU (AMX, VNNI)
or masked to AVX2 + AVX-VNNI 17,187 (0.9887). Which kernel runs is found by asking ONNX
Runtime (:func:`u8s8_saturates`), not by reading CPU flags, so the rule follows the kernel.

Why the scenes' own chips for calibration: they work with every checkpoint ever
written (none stores training chips), they calibrate the activation ranges on the
imagery actually predicted (its brightness and value range), and they cost a few
seconds. The chips are spread evenly over the scenes (a regular grid, skipping chips
that are mostly nodata), so the result depends only on the model and the scenes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geoseg.errors import ModelError, file_error
from geoseg.checkpoints import CheckpointMeta

log = logging.getLogger(__name__)

#: ``metadata_props`` key that marks a quantised geoseg model (JSON: precision, calibration).
QUANT_KEY = "geoseg_quantization"
#: Chips the activation ranges are calibrated on (ONNX Runtime's examples use tens to hundreds).
CALIBRATION_CHIPS = 32
#: Chips per calibration batch.
_CALIBRATION_BATCH = 4
#: A calibration chip is skipped when less than this share of it is valid data.
_MIN_VALID = 0.5
#: The fix for a missing quantiser.
INSTALL_HINT = "pip install 'geoseg[onnx]' (onnx and onnxruntime)"


@dataclass(frozen=True)
class Calibration:
    """What an int8 model was calibrated on.

    Attributes:
        chips: Normalised chips (N, bands, chip, chip) float32, as the model sees them.
        sources: Name of the scene of each chip.
    """

    chips: np.ndarray
    sources: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """What the quantised model's metadata records of its calibration."""
        names = sorted(set(self.sources))
        return {"chips": int(self.chips.shape[0]), "scenes": names[:20], "method": "minmax"}


#: The quantisation record's ``weights``: full 8-bit range, or 7 bits for CPUs whose products saturate.
WEIGHTS_FULL = "int8 per channel"
WEIGHTS_7BIT = "int8 per channel, 7-bit range"
#: Probe size: the products of one output sum over _PROBE_K pairs of (255 × 127).
_PROBE_K = 64


def _u8s8_probe() -> np.ndarray | None:
    """ONNX Runtime's answer to one ``MatMulInteger`` of 255s (uint8) by 127s (int8) over
    :data:`_PROBE_K`, as int32 (16, 16); None where ONNX Runtime is missing or fails."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    rows = cols = 16
    weights = helper.make_tensor("b", TensorProto.INT8, (_PROBE_K, cols), [127] * (_PROBE_K * cols))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, (rows, _PROBE_K))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, (rows, cols))], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"a": np.full((rows, _PROBE_K), 255, np.uint8)})
    except Exception as exc:  # any ORT failure: no answer (quantised as on a VNNI CPU)
        log.debug("u8s8 probe failed: %s", exc)
        return None
    return np.asarray(out)


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's uint8 × int8 products saturate on this CPU (x86 without VNNI).

    Asked of ONNX Runtime itself (:func:`_u8s8_probe`): the exact sums are 64 × 255 × 127
    = 2,072,640; a kernel that adds product pairs in int16 clips each pair (64,770) to
    32,767 and answers 32 × 32,767 = 1,048,544. False where the probe cannot run.
    """
    out = _u8s8_probe()
    saturates = out is not None and bool((out != _PROBE_K * 255 * 127).any())
    log.debug("ONNX Runtime's uint8 x int8 products %s on this CPU", "saturate" if saturates else "are exact")
    return saturates


def _grid(width: int, height: int, chip: int, count: int) -> list[tuple[int, int]]:
    """At most ``count`` chip offsets ``(row, col)`` on a regular grid spread over the whole scene.

    The grid has about the scene's aspect ratio; its first and last chips touch the scene's
    edges (a scene smaller than a chip gives one chip at the origin, read with padding).
    """
    span_y, span_x = max(height - chip, 0), max(width - chip, 0)
    rows = max(1, min(count, round(math.sqrt(count * (span_y + chip) / (span_x + chip)))))
    cols = max(1, count // rows)
    ys = np.linspace(0, span_y, rows).round().astype(int) if rows > 1 else np.array([span_y // 2])
    xs = np.linspace(0, span_x, cols).round().astype(int) if cols > 1 else np.array([span_x // 2])
    return sorted({(int(y), int(x)) for y in ys for x in xs})


def calibration_chips(
    scenes: Sequence[str | os.PathLike[str]],
    meta: CheckpointMeta,
    *,
    count: int = CALIBRATION_CHIPS,
    bands: Sequence[Sequence[int]] | None = None,
    normalisations: Sequence[tuple[Sequence[float], Sequence[float], Sequence[tuple[float, float]] | None]]
    | None = None,
    resolutions: Sequence[float | None] | None = None,
    assume_crs: str | None = None,
) -> Calibration:
    """Normalised chips spread evenly over ``scenes`` (each scene gives its share), for calibration.

    Each scene gives a regular grid of about ``count / len(scenes)`` chips over its whole
    extent (with more scenes than ``count``, one chip from each of ``count`` scenes spread
    evenly over the list), read with the model's bands and normalised with its mean and std, exactly as
    prediction feeds them; chips with less than half valid pixels are skipped unless the
    scene has no other. ``bands``: each scene's bands, where they are not the model's
    (``geoseg predict --bands``); ``normalisations``: each scene's (mean, std, stretch), where they
    are not the model's (``geoseg predict --rescale`` folds its value map into them). A stretch is
    applied as prediction applies it (``augment.raw_normalisation``: clip, then normalise).
    ``resolutions``: each scene's ground resolution where prediction reads it on a model grid
    (``predict --resolution``; None: its own grid): its chips are read there, resampled, as
    prediction reads them (``assume_crs`` for scenes without a CRS).

    Raises:
        GeosegError: A scene cannot be read (the reader's own one-line errors).
        ModelError: No scene gives a single chip.
    """
    from rasterio.windows import Window

    from geoseg.augment import raw_normalisation
    from geoseg.raster_io import open_raster, open_scene, read_window
    from geoseg.resample import grid_at, read_resampled

    chip = int(meta.chip_size)
    per_scene = max(1, math.ceil(count / max(len(scenes), 1)))
    # More scenes than chips: one chip from each of ``count`` scenes spread evenly over the list.
    picked_scenes = (range(len(scenes)) if len(scenes) <= count
                     else sorted({int(i * len(scenes) / count) for i in range(count)}))
    chips: list[np.ndarray] = []
    sources: list[str] = []
    for i in picked_scenes:
        scene = scenes[i]
        read_bands = list(bands[i]) if bands is not None else list(meta.bands)
        mean_i, std_i, clip = raw_normalisation(
            *(normalisations[i] if normalisations is not None else (meta.mean, meta.std, meta.stretch)))
        mean = np.asarray(mean_i, np.float32)[:, None, None]
        inv_std = (1.0 / np.asarray(std_i, np.float32))[:, None, None]
        low = np.asarray([lo for lo, _ in clip], np.float32)[:, None, None] if clip is not None else None
        high = np.asarray([hi for _, hi in clip], np.float32)[:, None, None] if clip is not None else None
        kept: list[np.ndarray] = []
        empty: list[np.ndarray] = []
        metres = resolutions[i] if resolutions is not None else None
        with open_raster(scene) as src:
            info = grid = None
            if metres is not None:  # the model grid prediction reads (the CRS as the caller resolved it)
                info = open_scene(scene, check_blocks=False, assume_crs=assume_crs)
                grid = grid_at(info, metres)
            for row, col in _grid(grid.width if grid else src.width, grid.height if grid else src.height,
                                  chip, per_scene):
                win = Window(col, row, chip, chip)
                data, valid = (read_resampled(src, info, grid, win, bands=read_bands) if grid is not None
                               else read_window(src, win, bands=read_bands))
                values = data.astype(np.float32)
                if low is not None:
                    np.clip(values, low, high, out=values)
                normalised = (values - mean) * inv_std
                (kept if valid.mean() >= _MIN_VALID else empty).append(normalised)
        picked = kept or empty  # a scene of nodata only still calibrates what prediction will feed
        chips.extend(picked)
        sources.extend([Path(scene).name] * len(picked))
        if len(chips) >= count:
            break
    if not chips:
        raise ModelError("no chip could be read from the scenes to calibrate the int8 model; "
                         "pass at least one readable scene")
    return Calibration(np.ascontiguousarray(np.stack(chips[:count]), dtype=np.float32), tuple(sources[:count]))


def _quantiser(path: Path) -> Any:
    try:
        import onnx
        import onnxruntime.quantization as quantization
    except ImportError:
        raise file_error(ModelError, path, "cannot be quantised to int8: ONNX Runtime's quantiser is not installed",
                         INSTALL_HINT) from None
    return onnx, quantization


def quantize_onnx(
    fp32_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration: Calibration,
) -> Path:
    """Write an int8 (QDQ) copy of a geoseg fp32 ONNX model, calibrated on ``calibration``.

    The geoseg description of the fp32 model is kept, and :data:`QUANT_KEY` records the
    precision and what it was calibrated on. ``out``'s folder must exist; ``out`` is written
    directly (callers write into a temporary folder and publish); the quantiser's own
    intermediate graphs go to a scratch folder beside it, removed whatever happens.

    Raises:
        ModelError: The quantiser is missing or fails on this graph.
    """
    from geoseg.onnx_model import INPUT_NAME

    from geoseg.temporaries import temporary_folder

    src, dst = Path(fp32_path), Path(out)
    onnx, quantization = _quantiser(src)
    chips = calibration.chips

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc]  # untyped base class
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: chips[i:i + _CALIBRATION_BATCH]}
                                  for i in range(0, len(chips), _CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    seven_bit = u8s8_saturates()
    start = time.perf_counter()
    with temporary_folder(dst.parent, name="quantize") as scratch:
        prepared = scratch / "prepared.onnx"
        try:
            # Graph clean-up (constant folding, shape inference) before quantising, as ORT recommends.
            quantization.shape_inference.quant_pre_process(os.fspath(src), os.fspath(prepared),
                                                           skip_symbolic_shape=True)
            quantization.quantize_static(
                os.fspath(prepared), os.fspath(dst), Reader(),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax, reduce_range=seven_bit,
            )
        except Exception as exc:  # the quantiser raises whatever its graph passes raise
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise file_error(ModelError, src, f"could not be quantised to int8 ({detail})",
                             "predict with --precision 32 or bf16") from None
        # (The calibrator's augmented graph lives in ONNX Runtime's own temporary folder.)
    described = onnx.load(os.fspath(src), load_external_data=False).metadata_props
    model = onnx.load(os.fspath(dst))
    del model.metadata_props[:]
    for prop in described:
        if prop.key != QUANT_KEY:
            model.metadata_props.add(key=prop.key, value=prop.value)
    record = {"precision": "int8", **calibration.describe(), "format": "QDQ",
              "weights": WEIGHTS_7BIT if seven_bit else WEIGHTS_FULL, "activations": "uint8"}
    model.metadata_props.add(key=QUANT_KEY, value=json.dumps(record, sort_keys=True))
    onnx.save(model, os.fspath(dst))
    log.info("quantised %s to int8 in %.1f s (%d calibration chips%s)", src.name, time.perf_counter() - start,
             len(chips), "; 7-bit weights: this CPU's uint8 x int8 products saturate" if seven_bit else "")
    return dst


def quantization_of(props: dict[str, str]) -> dict[str, Any] | None:
    """The quantisation record of a model's ``metadata_props`` (None: a float model)."""
    raw = props.get(QUANT_KEY)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def int8_model(
    source: "str | os.PathLike[str] | tuple[Any, CheckpointMeta]",
    scenes: Sequence[str | os.PathLike[str]],
    workdir: str | os.PathLike[str],
    *,
    count: int = CALIBRATION_CHIPS,
    bands: Sequence[Sequence[int]] | None = None,
    normalisations: Sequence[tuple[Sequence[float], Sequence[float]]] | None = None,
    resolutions: Sequence[float | None] | None = None,
    assume_crs: str | None = None,
) -> tuple[Any, CheckpointMeta]:
    """An int8 :class:`~geoseg.onnx_model.OnnxModel`, calibrated on ``scenes``.

    ``source`` is a checkpoint (exported to ONNX first), an ONNX model (used as it is when
    already int8) or a torch model with its description ``(model, meta)``. The files are
    written in ``workdir`` (a temporary folder the caller removes). ``bands``,
    ``normalisations``, ``resolutions`` and ``assume_crs``: as :func:`calibration_chips`.

    Returns:
        ``(model, meta)`` as ``load_checkpoint`` gives them.

    Raises:
        ModelError: The model cannot be exported or quantised, or no chip can be read.
        CheckpointError: Not a geoseg checkpoint or ONNX model.
    """
    from geoseg.model_export import write_onnx
    from geoseg.onnx_model import ONNX_SUFFIX, load_onnx_model

    work = Path(workdir)
    if isinstance(source, tuple) and getattr(source[0], "runs_own_precision", False):
        source = source[0].path  # an ONNX model already: quantise its file
    if isinstance(source, tuple):
        module, meta = source
        fp32 = work / "model.onnx"
        write_onnx(module, meta, fp32)
    elif Path(source).suffix.lower() == ONNX_SUFFIX:
        onnx_model, meta = load_onnx_model(source)
        if onnx_model.precision == "int8":
            return onnx_model, meta
        fp32 = Path(source)
    else:
        from geoseg.checkpoints import load_checkpoint

        module, meta = load_checkpoint(source, map_location="cpu")
        fp32 = work / "model.onnx"
        write_onnx(module, meta, fp32)
    calibration = calibration_chips(scenes, meta, count=count, bands=bands, normalisations=normalisations,
                                    resolutions=resolutions, assume_crs=assume_crs)
    quantized = quantize_onnx(fp32, work / "model.int8.onnx", calibration)
    return load_onnx_model(quantized)
