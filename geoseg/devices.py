"""Device, precision and CPU thread choices: the one owner for training, prediction and the benchmarks.

``train``, ``predict``, ``evaluate`` and every benchmark turn the same
``--device`` and ``--precision`` values into a torch device and an autocast
choice here, so that the same words mean the same thing everywhere. The
``setting`` argument is only the option's name in error messages: the training
config keys by default (``train.device``, ``train.precision``); prediction and
its benchmarks pass ``"device"`` and ``"precision"``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple

import torch

from geoseg.errors import ConfigError

#: The precision values every command accepts (``geoseg.config.Precision``).
PRECISIONS: tuple[str, ...] = ("auto", "32", "bf16", "16")
#: Prediction's values (``geoseg.config.PredictPrecision``): also ``int8``, a quantised model
#: (:mod:`geoseg.quantize`) rather than an autocast, for prediction on the CPU only.
PREDICT_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "int8")
#: With ``--precision auto``, a CPU without native bf16 predicts runs of at least this many chips
#: with an int8 model: the export and calibration (about 20-40 s) then cost a few per cent.
INT8_AUTO_MIN_CHIPS = 2000
#: What int8 prediction imports (``pip install 'geoseg[onnx]'``).
_INT8_MODULES = ("onnx", "onnxscript", "onnxruntime")

#: CPUs with more logical cores than this keep one core free for reading and writing.
_RESERVE_CORE_ABOVE = 4


def resolve_device(
    name: str = "auto", *, local_rank: int | None = None, setting: str = "train.device"
) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a torch device.

    Args:
        name: The device asked for; ``"auto"`` is CUDA when available, else the CPU.
        local_rank: Under torchrun, this process's local rank: a bare ``"cuda"`` (or
            ``"auto"`` on a GPU machine) becomes that rank's GPU (``cuda:local_rank``
            modulo the GPU count). None leaves the index to torch's current device.
        setting: The option's name in error messages (``"device"`` for prediction).

    Raises:
        ConfigError: Unknown name, or CUDA asked for where there is none.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} is {name!r} but no CUDA GPU is available; use --device cpu or auto")
        if name == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device(name)
    raise ConfigError(f"device should be one of 'auto', 'cpu', 'cuda', got {name!r}")


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, check, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                if fn():
                    return True
    return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids): bf16 and int8 matrix units."""
    fn = getattr(torch.cpu, "_is_amx_tile_supported", None)
    with contextlib.suppress(Exception):
        return bool(fn()) if fn is not None else False
    return False


class Amp(NamedTuple):
    """A resolved precision: the autocast dtype and whether training needs a GradScaler.

    A tuple, so training unpacks it (``amp_dtype, use_scaler = resolve_precision(...)``);
    prediction reads ``.dtype`` only (it computes no gradients).

    Attributes:
        dtype: Autocast dtype (bf16 or fp16), or None for plain fp32.
        scaler: Whether a GradScaler is needed (fp16 only: its small exponent range
            underflows small gradients; bf16 has fp32's range).
    """

    dtype: torch.dtype | None
    scaler: bool

    @property
    def name(self) -> str:
        """``"32"``, ``"bf16"`` or ``"16"``: the ``--precision`` value that means this choice."""
        return precision_name(self.dtype)


def resolve_precision(precision: str, device: torch.device, *, setting: str = "train.precision") -> Amp:
    """Autocast dtype and GradScaler need for ``precision`` on ``device``.

    ``"auto"``: bf16 on GPUs that support it (fp16 + GradScaler on older GPUs),
    bf16 on CPUs with native bf16, else fp32. ``"32"`` is always fp32.

    Args:
        precision: ``"auto"``, ``"32"``, ``"bf16"`` or ``"16"``.
        device: The resolved device.
        setting: The option's name in error messages (``"precision"`` for prediction).

    Raises:
        ConfigError: Unknown precision, or fp16 asked for on a CPU.
    """
    p = str(precision)
    if p == "int8":
        raise ConfigError(f"{setting} 'int8' is a quantised model for prediction on the CPU (geoseg predict, "
                          "geoseg benchmark); use '32', 'bf16' or auto here")
    if p not in PRECISIONS:
        raise ConfigError(f"precision should be one of {', '.join(repr(x) for x in PRECISIONS)}, got {p!r}")
    if p == "32":
        return Amp(None, False)
    cuda = device.type == "cuda"
    if p == "16":
        if not cuda:
            raise ConfigError(f"{setting} '16' (fp16) needs a CUDA GPU; use 'bf16' or '32' on CPU")
        return Amp(torch.float16, True)
    if p == "bf16":
        return Amp(torch.bfloat16, False)
    if cuda:  # auto
        return Amp(torch.bfloat16, False) if torch.cuda.is_bf16_supported() else Amp(torch.float16, True)
    return Amp(torch.bfloat16, False) if cpu_supports_bf16() else Amp(None, False)


def int8_available() -> bool:
    """Whether ONNX export, ONNX Runtime and its quantiser are installed (``geoseg[onnx]``)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in _INT8_MODULES)


def wants_int8(precision: str, device: torch.device, chips: int, *, setting: str = "precision") -> bool:
    """Whether a prediction runs an int8 model (:mod:`geoseg.quantize`) instead of the checkpoint's.

    ``"int8"``: yes (on the CPU only). ``"auto"``: on a CPU without native bf16 (where the
    alternative is fp32, which int8 beats by well over 2x), for a run of at least
    :data:`INT8_AUTO_MIN_CHIPS` chips (so that the export and calibration pay), where ONNX
    Runtime is installed. A CPU with native bf16 keeps bf16 under ``auto``: closer to fp32
    (see the README's Speed section); int8 is then asked for by name.

    Raises:
        ConfigError: ``int8`` asked for on a CUDA device.
    """
    if str(precision) == "int8":
        if device.type != "cpu":
            raise ConfigError(f"{setting} 'int8' runs on the CPU (ONNX Runtime); on a GPU use bf16 or 16, "
                              "or pass --device cpu")
        return True
    return (str(precision) == "auto" and device.type == "cpu" and chips >= INT8_AUTO_MIN_CHIPS
            and not cpu_supports_bf16() and int8_available())


def precision_name(dtype: torch.dtype | None) -> str:
    """``"32"``, ``"bf16"`` or ``"16"`` for an autocast dtype."""
    return {None: "32", torch.bfloat16: "bf16", torch.float16: "16"}[dtype]


def usable_cores() -> int:
    """Logical cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cpu_threads() -> int:
    """Intra-op threads for CPU inference: every core on small machines, one spare on larger ones.

    On 2-4 cores the model needs them all; on more cores one is left to the work
    around the model (normalising, blending, reading, writing, polygons), which then
    runs beside it (``inference.batching``: the model gets a thread of its own).
    """
    cores = usable_cores()
    return cores if cores <= _RESERVE_CORE_ABOVE else cores - 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for a block of work, then restore it.

    Args:
        threads: Threads to use; None picks :func:`default_cpu_threads`.

    Yields:
        The thread count in effect.
    """
    before = torch.get_num_threads()
    n = default_cpu_threads() if threads is None else max(1, int(threads))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
