"""Exported ONNX models: their geoseg self-description, and ONNX Runtime behind the model interface predict uses.

An ONNX file written by ``geoseg export`` carries the checkpoint's
:class:`~geoseg.checkpoints.CheckpointMeta` as JSON in its ``metadata_props`` (key
:data:`METADATA_KEY`), so ``geoseg predict --model model.onnx`` needs nothing
else, exactly as with a ``.pt`` checkpoint. :class:`OnnxModel` answers the calls
``ChipPredictor`` makes on a torch model (``eval``, ``to``, a forward on a batch
tensor) and runs the graph with ONNX Runtime: the CPU provider, or the CUDA
provider for inputs on a GPU where ``onnxruntime-gpu`` is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from geoseg.checkpoints import CheckpointMeta
from geoseg.errors import CheckpointError, ModelError, file_error

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: File suffix by which ``predict`` tells an ONNX model from a ``.pt`` checkpoint.
ONNX_SUFFIX = ".onnx"
#: ``metadata_props`` key whose value is the JSON self-description (:func:`metadata_props`).
METADATA_KEY = "geoseg"
#: Version of that JSON's layout.
METADATA_VERSION = 1
#: Names of the graph's one input (normalised chips, N x bands x chip x chip, float32) and one output
#: (logits, N x out_channels x chip x chip, float32).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: ONNX Runtime log level: 3 = errors only (its warnings, e.g. about nodes placed on the CPU next to
#: the CUDA provider, are not the user's to act on).
_ORT_LOG_ERRORS = 3
#: The fix for a missing ONNX Runtime, given in every message that needs it.
INSTALL_HINT = "pip install 'geoseg[onnx]' (or onnxruntime-gpu, for the CUDA provider)"


def metadata_props(meta: CheckpointMeta) -> dict[str, str]:
    """The ``metadata_props`` entries that describe a geoseg model (one key, JSON).

    The JSON holds ``format`` (:data:`METADATA_VERSION`), the graph's ``input`` and
    ``output`` names, ``out_channels`` (for readers that do not know geoseg's targets)
    and ``meta``: :meth:`CheckpointMeta.to_dict` unchanged, so that :func:`meta_from_props`
    gives back an equal CheckpointMeta.
    """
    payload = {
        "format": METADATA_VERSION,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "out_channels": meta.out_channels,
        "meta": meta.to_dict(),
    }
    return {METADATA_KEY: json.dumps(payload, sort_keys=True)}


def meta_from_props(props: Mapping[str, str], path: str | os.PathLike[str]) -> CheckpointMeta:
    """The CheckpointMeta stored by :func:`metadata_props`.

    Raises:
        CheckpointError: No geoseg description (an ONNX file geoseg did not export), or one
            that cannot be read.
    """
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise file_error(
            CheckpointError, path,
            f"has no geoseg description (metadata_props key {METADATA_KEY!r}), so predict does not know "
            "its bands, normalisation or chip size",
            "export the model from its checkpoint with geoseg export CKPT --format onnx --out MODEL.onnx",
        )
    try:
        payload = json.loads(raw)
        if payload.get("format") != METADATA_VERSION:
            raise ValueError(f"format {payload.get('format')!r}, this geoseg reads {METADATA_VERSION}")
        return CheckpointMeta.from_dict(payload["meta"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise file_error(
            CheckpointError, path, f"has a geoseg description this geoseg cannot read ({exc})",
            "export it again with this geoseg (geoseg export CKPT --format onnx --out MODEL.onnx)",
        ) from None


def _ort(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise file_error(ModelError, path, "is an ONNX model, and ONNX Runtime, which runs it, is not installed",
                         INSTALL_HINT) from None
    return onnxruntime


def _session(path: Path, *, cuda_device: int | None, threads: int) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session on the CPU (``threads`` intra-op threads) or on CUDA device ``cuda_device``."""
    ort = _ort(path)
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_ERRORS
    options.intra_op_num_threads = max(1, int(threads))
    # Between two batches the reader, blending and writer threads need the cores; ORT's default
    # busy-waiting of idle intra-op threads would take them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda_device is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": cuda_device}))
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for any unreadable graph
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise file_error(
            CheckpointError, path, f"is not a readable ONNX model ({detail})",
            "pass a model written by geoseg export, or a .pt checkpoint",
        ) from None


def _autocast_on(device: torch.device) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # torch < 2.4 takes no device type
        return bool(torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled())


class OnnxModel(nn.Module):
    """An exported geoseg model run by ONNX Runtime, called like the torch model it was exported from.

    ``model(x)`` takes normalised chips (N, bands, chip, chip) on any device and returns
    float32 logits (N, out_channels, chip, chip) on the same device. It runs in ONNX
    Runtime's precision (fp32): torch autocast does not reach into it. Inputs on a CUDA
    device run on the CUDA provider when ``onnxruntime-gpu`` provides one (inputs and
    outputs stay on the GPU), else on the CPU with a warning. CPU sessions use as many
    intra-op threads as torch has at the call, so geoseg's thread setting holds.

    Attributes:
        path: The ONNX file.
        meta: Its self-description.
        runs_own_precision: True: ``ChipPredictor`` neither autocasts nor compiles it, and
            a prediction reports the precision it really runs in.
        precision: ``"32"`` (fp32), or ``"int8"`` for a model quantised by :mod:`geoseg.quantize`.
    """

    runs_own_precision = True

    def __init__(self, path: str | os.PathLike[str], *, meta: CheckpointMeta,
                 session: "onnxruntime.InferenceSession | None" = None, precision: str = "32") -> None:
        """Wrap an ONNX file (see :func:`load_onnx_model`, which checks it first)."""
        super().__init__()
        self.path = Path(path)
        self.meta = meta
        self.precision = precision
        self._sessions: dict[tuple[str, int], Any] = {}
        if session is not None:
            self._sessions[("cpu", session.get_session_options().intra_op_num_threads)] = session
        self._warned: set[str] = set()
        self.eval()

    def to(self, *args: Any, **kwargs: Any) -> "OnnxModel":
        """Accepted and ignored: the session follows the device of each input (ONNX Runtime keeps
        its own weights, in fp32, in its own memory layout)."""
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        """Only evaluation exists for an exported graph.

        Raises:
            ModelError: ``mode`` is True.
        """
        if mode:
            raise file_error(ModelError, self.path, "is an exported inference graph and cannot be trained",
                             "train from the .pt checkpoint it was exported from")
        return super().train(False)

    def _session_for(self, device: torch.device) -> tuple[Any, bool, int]:
        """(session, on CUDA, CUDA device index) for inputs on ``device``; kept for later batches."""
        cuda = device.type == "cuda"
        if cuda and "CUDAExecutionProvider" not in _ort(self.path).get_available_providers():
            if "cuda" not in self._warned:
                self._warned.add("cuda")
                log.warning("%s: ONNX Runtime has no CUDA provider here, so the model runs on the CPU; "
                            "install onnxruntime-gpu to run it on the GPU", self.path)
            cuda = False
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else -1
        key = (f"cuda:{index}", 0) if cuda else ("cpu", torch.get_num_threads())
        if key not in self._sessions:
            if not cuda:  # a new thread count replaces the CPU session (one set of weights in memory)
                for old in [k for k in self._sessions if k[0] == "cpu"]:
                    del self._sessions[old]
            self._sessions[key] = _session(self.path, cuda_device=index if cuda else None,
                                           threads=torch.get_num_threads())
        return self._sessions[key], cuda, max(index, 0)

    @torch.compiler.disable  # ONNX Runtime is opaque to torch.compile: a compiled wrapper runs this as it is
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised chips.

        Raises:
            ModelError: Chips of another band count or size than the model was exported for.
        """
        meta = self.meta
        want = (meta.in_channels, meta.chip_size, meta.chip_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise file_error(
                ModelError, self.path,
                f"takes chips of {want[0]} bands x {want[1]} x {want[2]} px, got shape {tuple(x.shape)}",
                "predict with the chip size and bands of the model (they are in its metadata)",
            )
        if _autocast_on(x.device) and "autocast" not in self._warned:
            self._warned.add("autocast")
            log.info("%s: ONNX Runtime runs the model in %s; the mixed precision asked for applies to "
                     "torch models only", self.path, "int8" if self.precision == "int8" else "fp32")
        session, cuda, index = self._session_for(x.device)
        chips = x.detach().to(dtype=torch.float32, device=x.device if cuda else "cpu").contiguous()
        out = torch.empty((chips.shape[0], meta.out_channels, *chips.shape[2:]), dtype=torch.float32,
                          device=chips.device)
        # IO binding: ONNX Runtime reads the torch input and writes into the torch output in place
        # (no numpy copies; on the GPU the data never leaves it).
        kind = "cuda" if cuda else "cpu"
        binding = session.io_binding()
        binding.bind_input(INPUT_NAME, kind, index, np.float32, tuple(chips.shape), chips.data_ptr())
        binding.bind_output(OUTPUT_NAME, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        if cuda:  # the input was written on torch's stream; ONNX Runtime computes on its own
            torch.cuda.synchronize(chips.device)
        session.run_with_iobinding(binding)  # returns when the outputs are written (also on CUDA)
        return out.to(x.device)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        m = self.meta
        return (f"{self.path}, {m.arch}/{m.encoder}, {m.in_channels} bands, {m.chip_size} px chips, "
                f"{m.out_channels} outputs, {'int8' if self.precision == 'int8' else 'fp32'}")


def _check_graph(session: Any, meta: CheckpointMeta, path: Path) -> None:
    """Refuse a graph whose input and output do not fit its description."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    want_in = [meta.in_channels, meta.chip_size, meta.chip_size]
    want_out = [meta.out_channels, meta.chip_size, meta.chip_size]
    shape_in, shape_out = inputs.get(INPUT_NAME), outputs.get(OUTPUT_NAME)
    if (len(inputs) != 1 or len(outputs) != 1 or shape_in is None or shape_out is None
            or list(shape_in[1:]) != want_in or list(shape_out[1:]) != want_out):
        raise file_error(
            CheckpointError, path,
            f"graph ({', '.join(f'{k} {v}' for k, v in inputs.items())} -> "
            f"{', '.join(f'{k} {v}' for k, v in outputs.items())}) does not fit its geoseg description "
            f"({INPUT_NAME} [N, {', '.join(map(str, want_in))}] -> {OUTPUT_NAME} [N, {', '.join(map(str, want_out))}])",
            "export it again with geoseg export",
        )


def load_onnx_model(path: str | os.PathLike[str]) -> tuple[OnnxModel, CheckpointMeta]:
    """Open an ONNX model exported by geoseg: ``(model, meta)``, as ``load_checkpoint`` gives for a ``.pt``.

    Raises:
        ModelError: ONNX Runtime is not installed.
        CheckpointError: Not a readable ONNX file, no geoseg description in its metadata, or a
            graph that does not fit the description.
    """
    p = Path(path)
    if p.is_dir():
        raise file_error(CheckpointError, p, "is a folder, not an ONNX model",
                         "pass a model written by geoseg export")
    from geoseg.quantize import WEIGHTS_FULL, quantization_of, u8s8_saturates

    session = _session(p, cuda_device=None, threads=torch.get_num_threads())
    props = session.get_modelmeta().custom_metadata_map
    meta = meta_from_props(props, p)
    _check_graph(session, meta, p)
    quantized = quantization_of(props)
    precision = "int8" if quantized and quantized.get("precision") == "int8" else "32"
    if precision == "int8" and quantized.get("weights") == WEIGHTS_FULL and u8s8_saturates():
        log.warning("%s: quantised with full-range int8 weights, which this CPU (no VNNI) multiplies with "
                    "saturating products, so its masks may differ more from fp32; quantise it on this "
                    "machine (geoseg export --int8) or predict the .pt with --precision int8", p)
    return OnnxModel(p, meta=meta, session=session, precision=precision), meta


def read_onnx_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """The self-description of an ONNX model exported by geoseg.

    Raises:
        GeosegError: As :func:`load_onnx_model`.
    """
    return load_onnx_model(path)[1]

