"""Export a checkpoint's model for other runtimes: ONNX with its self-description, or TorchScript.

Not to be confused with :mod:`geoseg.export`, which writes rooftop polygons. The
exported graph is the model alone: it takes normalised chips ``(raw - mean) / std``
of the checkpoint's bands, (N, bands, chip, chip) float32 with any batch size N,
and returns logits (N, out_channels, chip, chip). A checkpoint trained with a percentile
stretch (``data.stretch``) wants ``raw`` stretched first, ``clip((raw - low) / (high - low), 0, 1)``
per band: the stretch is part of the preprocessing the caller does, like the
normalisation (it is not baked into the graph, so that every exported model takes the
same kind of input; ``geoseg predict`` does it itself). Everything needed to feed it
(bands, stretch, normalisation, chip size, ground resolution, classes, target, value range)
travels inside the file: ONNX ``metadata_props`` (:mod:`geoseg.onnx_model`), or a
TorchScript archive's extra file :data:`TORCHSCRIPT_META`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from geoseg.checkpoints import CheckpointMeta
from geoseg.errors import ConfigError, ModelError, file_error
from geoseg.onnx_model import INPUT_NAME, METADATA_KEY, ONNX_SUFFIX, OUTPUT_NAME, metadata_props

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
#: Formats :func:`export_model` writes.
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
#: Extra file of a TorchScript archive holding the JSON self-description (as in ONNX metadata_props).
TORCHSCRIPT_META = "geoseg.json"
#: Chips in the example batch the model is traced with (the batch axis stays dynamic; 2, not 1,
#: so that no exporter takes the batch size for a constant).
EXAMPLE_BATCH = 2
#: What to install for ONNX export.
ONNX_EXPORT_HINT = "pip install 'geoseg[onnx]' (onnx, onnxscript and onnxruntime)"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        path: The exported file.
        format: ``"onnx"`` or ``"torchscript"``.
        meta: The self-description stored in it (the checkpoint's).
        seconds: Time the export took.
    """

    path: Path
    format: str
    meta: CheckpointMeta
    seconds: float


def check_format(format: str, out: str | os.PathLike[str]) -> str:
    """Refuse an unknown format, and an ONNX output that ``predict`` would not recognise as one.

    Raises:
        ConfigError: The format is not one of :data:`FORMATS`; ONNX to a file not ending in
            ``.onnx``, or TorchScript to one that does.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format should be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    suffix = Path(out).suffix.lower()
    if format == "onnx" and suffix != ONNX_SUFFIX:
        raise file_error(ConfigError, out, "an ONNX model needs the .onnx extension (geoseg predict "
                         "recognises it by it)", f"use --out {Path(out).with_suffix(ONNX_SUFFIX)}")
    if format == "torchscript" and suffix == ONNX_SUFFIX:
        raise file_error(ConfigError, out, "a TorchScript model must not end in .onnx (geoseg predict "
                         "would read it as ONNX)", f"use --out {Path(out).with_suffix('.ts')}")
    return format


def _check_onnx_exporter(out: str | os.PathLike[str]) -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise file_error(ModelError, out, f"writing ONNX needs {' and '.join(missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed", ONNX_EXPORT_HINT)


def export_model(
    checkpoint: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    format: ExportFormat = "onnx",
    overwrite: bool = False,
    int8: Sequence[str | os.PathLike[str]] | None = None,
) -> ExportResult:
    """Write the model of a geoseg checkpoint as ONNX or TorchScript, its self-description inside.

    Everything is checked before the checkpoint is read (format, output path), and the
    file appears only when complete (:func:`geoseg.raster_io.atomic_output`).

    Args:
        checkpoint: A ``.pt`` written by ``geoseg train``.
        out: The file to write (``.onnx`` for ONNX).
        format: ``"onnx"`` (ONNX Runtime, TensorRT, OpenVINO, ...; ``geoseg predict`` runs it) or
            ``"torchscript"`` (LibTorch/C++; PyTorch has deprecated TorchScript).
        overwrite: Replace an existing ``out``.
        int8: Scenes (files, folders, globs) to calibrate on: the ONNX model is then
            quantised to int8 (:mod:`geoseg.quantize`; ``predict --model`` runs it as it is).

    Returns:
        What was written.

    Raises:
        ConfigError: Unknown format, or an extension that does not fit it.
        OutputError: ``out`` is the checkpoint, exists without ``overwrite``, or cannot be written.
        CheckpointError: ``checkpoint`` is missing or not a geoseg checkpoint.
        ModelError: The ONNX exporter is not installed, or the model cannot be exported.
    """
    from geoseg.checkpoints import load_checkpoint
    from geoseg.raster_io import atomic_output, check_not_inputs, check_output

    t0 = time.perf_counter()
    check_format(format, out)
    if int8 is not None and format != "onnx":
        raise ConfigError("--int8 quantises an ONNX model; use --format onnx (and an .onnx --out)")
    scenes = _calibration_scenes(int8, checkpoint) if int8 is not None else None
    check_not_inputs([("--out", out)], [("checkpoint", checkpoint), *(("scene", s) for s in scenes or ())])
    out_path = check_output(out, overwrite=overwrite)
    if format == "onnx":
        _check_onnx_exporter(out)
    model, meta = load_checkpoint(checkpoint, map_location="cpu")
    if scenes is not None:
        from geoseg.inference.job import check_scenes

        bands = check_scenes(scenes, meta, bands=None, assume_crs=None, rescale=False).bands
    with atomic_output(out_path, overwrite=overwrite) as tmp:
        if scenes is not None:
            _write_int8(model, meta, tmp, scenes, bands)
        elif format == "onnx":
            write_onnx(model, meta, tmp)
        else:
            _write_torchscript(model, meta, tmp)
    log.info("exported %s to %s (%s)", checkpoint, out_path, format)
    return ExportResult(path=out_path, format=format, meta=meta, seconds=time.perf_counter() - t0)


def _calibration_scenes(specs: Sequence[str | os.PathLike[str]], checkpoint: Any) -> list[Path]:
    """The scene files of ``--int8`` (files, folders, globs), checked before any work."""
    from geoseg.inputs import resolve_scenes

    if not specs:
        raise ConfigError("--int8 needs scenes to calibrate on (files, folders or globs of the imagery "
                          f"{Path(checkpoint).name} will predict)")
    return resolve_scenes(specs)


def _write_int8(model: Any, meta: CheckpointMeta, path: Path, scenes: Sequence[Path],
                bands: Sequence[Sequence[int]]) -> None:
    """The fp32 graph in a scratch folder beside ``path``, then its int8 copy calibrated on ``scenes`` at ``path``."""
    from geoseg.quantize import calibration_chips, quantize_onnx
    from geoseg.temporaries import temporary_folder

    with temporary_folder(path.parent, name="export") as work:
        write_onnx(model, meta, work / "model.onnx")
        quantize_onnx(work / "model.onnx", path, calibration_chips(scenes, meta, bands=bands))


def _example(meta: CheckpointMeta) -> Any:
    import torch

    return torch.zeros(EXAMPLE_BATCH, meta.in_channels, meta.chip_size, meta.chip_size)


def _fail(meta: CheckpointMeta, what: str, exc: Exception) -> ModelError:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ModelError(f"{meta.arch}/{meta.encoder} could not be exported to {what} ({detail}); "
                      "export a model of a supported architecture and encoder (deeplabv3plus/resnet50 is)")


def write_onnx(model: Any, meta: CheckpointMeta, path: Path) -> None:
    """Write ``model`` to ``path`` as ONNX with ``meta`` inside (no checks: :func:`export_model` checks).

    torch.onnx's maintained (torch.export-based) exporter; batch axis dynamic, chip size fixed.

    Raises:
        ModelError: The model cannot be exported.
    """
    import onnx
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        # The exporter reports its steps on stdout; a library keeps stdout for its caller.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (_example(meta),), None, dynamo=True, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False,
            )
    except Exception as exc:  # torch.export raises many kinds for unsupported code
        raise _fail(meta, "ONNX", exc) from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata_props(meta))
    proto.doc_string = (
        f"geoseg {meta.arch}/{meta.encoder}: input {INPUT_NAME!r} float32 (N, {meta.in_channels}, "
        f"{meta.chip_size}, {meta.chip_size}) = ("
        f"{'clip((raw - low) / (high - low), 0, 1) of ' if meta.stretch else 'raw '}scene bands "
        f"{list(meta.bands)} - mean) / std; output "
        f"{OUTPUT_NAME!r} float32 logits (N, {meta.out_channels}, {meta.chip_size}, {meta.chip_size}); "
        f"everything else as JSON in metadata_props[{METADATA_KEY!r}]"
    )
    onnx.save_model(proto, os.fspath(path))


def _write_torchscript(model: Any, meta: CheckpointMeta, path: Path) -> None:
    """A traced TorchScript module; the description in the archive's extra file :data:`TORCHSCRIPT_META`."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for TorchScript, tracer notes
        try:
            traced = torch.jit.trace(model, _example(meta), check_trace=False)
        except Exception as exc:  # the tracer raises many kinds for unsupported code
            raise _fail(meta, "TorchScript", exc) from None
        description = metadata_props(meta)[METADATA_KEY]
        torch.jit.save(traced, os.fspath(path), _extra_files={TORCHSCRIPT_META: description})
