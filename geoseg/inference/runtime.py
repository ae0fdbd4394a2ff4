"""Run a segmentation model on batches of chips: normalisation, autocast, compile, TTA, throughput.

Device, precision and thread choices come from :mod:`geoseg.devices`. Everything
here is shared by the streamed scene prediction and by the model-only throughput
measurement, so that both run the model the same way:
eval mode, ``torch.inference_mode``, channels_last, autocast to bf16 (CPUs
with native bf16, and GPUs) or fp16 (GPUs, when asked), fp32 otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from geoseg.devices import precision_name, resolve_device, resolve_precision, torch_threads
from geoseg.errors import ConfigError

log = logging.getLogger(__name__)

#: Flips averaged by test-time augmentation: (flip rows, flip columns).
TTA_FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))

#: Name of the class whose probability is written to ``--prob-out``.
ROOFTOP_CLASS = "rooftop"

#: With ``compile`` left to "auto", CPU scenes of at least this many chips are predicted by a
#: ``torch.compile``d model (inductor, frozen weights). Measured on a 2-core AVX-512 bf16 CPU with
#: the heap as prediction sets it (:func:`prefer_heap`), three interleaved runs each, batch 16:
#: ResNet50 15.4-15.9 chips/s compiled against 13.8-15.9 eager, ResNet18 31.4-33.9 against
#: 29.8-32.0 (2-5% faster), for a compile of 13-17 s with a warm cache and about 30-40 s cold: it
#: pays from about 20,000 chips (a 27000² scene). Before the heap fix compiling gained 20-25%
#: (its memory planning spared the page faults) and the threshold was 2000.
COMPILE_MIN_CHIPS = 20000
#: The same on a CPU with AMX, where compiling gains far more: 2-core Xeon with AMX, one process,
#: four interleaved pairs of batches of 16 after the batch norms were folded (:func:`fold_batchnorm`):
#: ResNet50 38.4-39.7 chips/s compiled against 25.4-29.4 eager, ResNet18 98.6-113.5 against
#: 69.7-77.0, for a compile of 20.7 / 13.2 s with a warm cache and 32.5 / 27.0 s cold: ResNet50
#: pays from 1500-4000 chips, ResNet18 from about 3000 (warm) to 6000 (cold). 4000 chips is a
#: 12000² scene at 256-px chips and 64 px of overlap.
COMPILE_MIN_CHIPS_AMX = 4000


def compile_min_chips(device: torch.device) -> int | None:
    """Chips from which ``compile`` "auto" compiles on ``device``: None on a GPU (opt in there)."""
    from geoseg.devices import cpu_has_amx

    if device.type != "cpu":
        return None
    return COMPILE_MIN_CHIPS_AMX if cpu_has_amx() else COMPILE_MIN_CHIPS


_M_MMAP_MAX = -4  # mallopt parameter number in glibc's malloc.h


@functools.lru_cache(maxsize=1)
def prefer_heap() -> bool:
    """Serve every allocation from the C heap, none from a memory mapping of its own.

    A mapped chunk goes back to the OS when it is freed, so each model call
    page-faults its activations in again: with glibc's large allocations mapped (a
    1 MB threshold, as geoseg had to keep the heap from fragmenting), a fresh
    ``geoseg predict`` process spent 6.0-7.8 s of system time in page faults on one
    2048² scene (ResNet50 bf16, 2-core AVX-512: model stage 11.4-13.7 s); from the
    heap, freed activations are reused by the next batch (0.4-1.5 s, model stage
    8.0-8.8 s). The writer hands the heap's free pages back after each block
    (:func:`release_free_heap`), which keeps peak memory flat (ResNet18, random weights:
    1523 MB at 10000², 1521 MB at 20000²). Leaving the heap's top in place too
    (``M_TRIM_THRESHOLD`` 1 GB) was tried and dropped: threads' arenas then never
    shrink, and a 20000² run peaked at 4.7 GB.
    Process-wide and harmless; a no-op where the C library is not glibc.

    Returns:
        Whether the setting was applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6").malloc_trim
    return None


#: Core pixels written (by any scene of the process) between two hand-backs of the heap's free
#: pages (:func:`release_free_heap`): the core of one default 2048-px block.
HEAP_RELEASE_PIXELS = 2048 * 2048
_heap_lock = threading.Lock()
_heap_pixels = 0  # written since the last hand-back


def release_free_heap(pixels: int, *, scene_end: int | None = None) -> bool:
    """Count ``pixels`` more core pixels written; hand the C heap's free pages back to the system
    once :data:`HEAP_RELEASE_PIXELS` have been written since the last time, and at the end of a
    scene of at least that many (``scene_end``: the scene's core pixels, given at its end).

    The writer's strips, the split's per-building arrays and the polygons are many
    medium-sized allocations made by several threads; glibc keeps the memory they
    free in its arenas, so without this a long scene's resident memory creeps up with
    its length (about 250 MB retained after an 8000² instances run, measured) although
    the live data stays bounded; and with :func:`prefer_heap` every block's arrays come
    from the heap too. The writer calls it after each block it writes.

    Not after every block whatever its size: what it hands back includes the model's freed
    activations, which the next model call faults in again, and a scene of one small block
    (every 512-px tile) paid that at almost every batch. Handed back about once per
    2048² of output, a big scene's memory stays where it was with a hand-back per block;
    every ten seconds instead, a 20000² scene peaked 320 MB higher, and so it did whenever the
    scene's last block did not hand back: the scene's finish then ran beside the model's freed
    activations (its own thread allocates from an arena of its own). So the writer also hands
    back when a scene of at least that size ends.

    Returns:
        Whether the pages were handed back now (False: not enough written yet, or no
        ``malloc_trim``: not glibc).
    """
    global _heap_pixels
    trim = _malloc_trim()
    if trim is None:
        return False
    with _heap_lock:
        _heap_pixels += int(pixels)
        big_end = scene_end is not None and scene_end >= HEAP_RELEASE_PIXELS
        if _heap_pixels < HEAP_RELEASE_PIXELS and not big_end:
            return False
        _heap_pixels = 0
    trim(0)
    return True


def rooftop_index(class_names: Sequence[str], classes: int) -> int:
    """Index of the class whose probability goes to the probability raster."""
    names = [n.lower() for n in class_names]
    if ROOFTOP_CLASS in names:
        return names.index(ROOFTOP_CLASS)
    return 1 if classes > 1 else 0


def compile_wanted(setting: bool | None, device: torch.device, chips: int) -> bool:
    """Whether to ``torch.compile`` the model: as asked, or ("auto", None) for big CPU scenes
    (:func:`compile_min_chips`)."""
    if setting is not None:
        return bool(setting)
    least = compile_min_chips(device)
    return least is not None and chips >= least


#: Compiled models, reused by every scene of a run (compiling again would cost the compile again).
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]]" = weakref.WeakKeyDictionary()


def compiled_model(model: nn.Module, device: torch.device) -> Any:
    """``torch.compile(model)`` for inference (static shapes, frozen weights), cached per model."""
    per_model = _COMPILED.setdefault(model, {})
    key = (str(device),)
    if key not in per_model:
        per_model[key] = torch.compile(model, dynamic=False, options={"freezing": True})
    return per_model[key]


#: Batch-norm folds, one per model: the model, its weights' version stamps, the folded copy.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]]" = weakref.WeakKeyDictionary()
#: Side of the random input that finds the convolution -> batch-norm pairs and checks the fold.
FOLD_PROBE_SIZE = 128


#: Models put in eval mode on a device and memory format by :func:`_prepared`: the device, the
#: format and the weights' stamp they were left with.
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, torch.memory_format, tuple[int, ...]]]" = (
    weakref.WeakKeyDictionary())


def _prepared(
    model: nn.Module, device: torch.device, memory_format: torch.memory_format
) -> tuple[nn.Module, tuple[int, ...]]:
    """``model.eval().to(device, memory_format)``, skipped when this model was left so and is unchanged;
    with its weights' stamp (:func:`_weights_stamp`, which :func:`fold_batchnorm` checks too).

    A run shares one predictor among its scenes (``Batches.predictor``), but each scene's own
    :func:`~geoseg.inference.pipeline.predict_scene` call makes one: both walk every module and
    parameter (about 3 ms for a ResNet18, as much as reading a 512-px tile), for nothing after the first. Any
    module back in training mode, a parameter elsewhere or any in-place change to the weights
    (their version counters) prepares it again.
    """
    param = next(model.parameters(), None)
    done = _PREPARED.get(model)
    if (done is not None and done[0] == str(device) and done[1] == memory_format
            and (param is None or param.device == device) and not any(m.training for m in model.modules())):
        stamp = _weights_stamp(model)
        if done[2] == stamp:
            return model, stamp
    model = model.eval().to(device=device, memory_format=memory_format)
    stamp = _weights_stamp(model)
    _PREPARED[model] = (str(device), memory_format, stamp)
    return model, stamp


def _weights_stamp(model: nn.Module) -> tuple[int, ...]:
    """Version counters of every parameter and buffer: any in-place change (an optimiser step) moves one."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def _conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Convolutions whose output goes straight into a batch norm, each of the two called once.

    Found by one forward pass with hooks (the graph, not the module tree, says what feeds what):
    a batch norm whose input is the very tensor a convolution returned.
    """
    outputs: dict[int, tuple[torch.Tensor, nn.Module]] = {}
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def conv_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = (output, module)

    def bn_hook(module: nn.Module, inputs: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        hit = outputs.get(id(inputs[0])) if inputs else None
        if hit is not None and hit[0] is inputs[0]:
            pairs.append((hit[1], module))  # type: ignore[arg-type]

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Exactly BatchNorm2d: subclasses (timm's BatchNormAct2d, ...) do more than normalise.
    handles += [m.register_forward_pre_hook(bn_hook) for m in model.modules() if type(m) is nn.BatchNorm2d]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in pairs
            if calls[c] == 1 and calls[b] == 1 and b.running_mean is not None and b.running_var is not None]


def fold_batchnorm(model: nn.Module, *, in_channels: int, stamp: tuple[int, ...] | None = None) -> nn.Module:
    """The model with each batch norm that follows a convolution folded into that convolution.

    In eval mode a batch norm is a per-channel scale and shift, which the convolution before it
    can apply itself (``w * s``, ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``): the
    same function in one pass over memory instead of two. Eager bf16 on a 2-core Xeon with AMX:
    ResNet50 DeepLabV3+ 22.4-22.7 -> 25.3-26.2 chips/s, ResNet18 55 -> 68 (its 62 and 29 batch
    norms all folded). ``torch.compile`` with frozen weights folds them too.

    A copy is folded (the caller's model keeps its batch norms and can go on training); the copy
    is cached per model until its weights change. The fold is checked on a random input in fp32
    (the outputs of both must agree to 1e-4 of their scale); a model where a convolution's output
    also feeds something else, or that the probe cannot run, is returned unchanged.

    Args:
        model: A torch model in eval mode.
        in_channels: Bands the model reads (for the probe input).
        stamp: The model's :func:`_weights_stamp`, where the caller has it already.

    Returns:
        The folded copy, or ``model`` itself when nothing folds or the fold does not check out.
    """
    stamp = _weights_stamp(model) if stamp is None else stamp
    cached = _FOLDED.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    folded = model
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):  # nothing to fold: no copy
        _FOLDED[model] = (stamp, folded)
        return folded
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        probe = torch.randn((1, in_channels, FOLD_PROBE_SIZE, FOLD_PROBE_SIZE),
                            generator=torch.Generator().manual_seed(0)).to(device)
        copy_ = copy.deepcopy(model).eval()
        pairs = _conv_bn_pairs(copy_, probe)
        if pairs:
            parents = {child: (parent, name) for parent in copy_.modules() for name, child in parent.named_children()}
            with torch.no_grad():
                for conv, bn in pairs:
                    scale = torch.rsqrt(bn.running_var + bn.eps)
                    shift = -bn.running_mean * scale
                    if bn.affine:
                        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
                    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
                    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
                    parent, name = parents[bn]
                    setattr(parent, name, nn.Identity())
                with torch.autocast(device_type=device.type, enabled=False):
                    want, got = model(probe), copy_(probe)
            if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape:
                tolerance = 1e-4 * (1.0 + float(want.abs().max()))
                if float((want - got).abs().max()) <= tolerance:
                    folded = copy_
                else:
                    log.info("batch norms left unfolded: the folded model's output differs")
    except Exception as exc:  # noqa: BLE001 - an optimisation: any model it cannot handle runs as it is
        log.debug("batch norms left unfolded: %s", exc)
        folded = model
    _FOLDED[model] = (stamp, folded)
    return folded


class ChipPredictor:
    """Normalise raw pixels and turn batches of chips into class probabilities.

    The model is put in eval mode, moved to ``device`` and converted to
    channels_last (in place: the caller's module is changed); what runs is a copy with its
    batch norms folded into the convolutions before them (:func:`fold_batchnorm`). A model with
    a true ``runs_own_precision`` attribute (:class:`geoseg.onnx_model.OnnxModel`: ONNX
    Runtime runs fp32) is neither folded, autocast nor compiled, whatever was asked.

    Attributes:
        device: Where the model runs.
        autocast_dtype: bf16/fp16 autocast dtype, or None for fp32 (what the model really runs in).
        compiled: Whether a ``torch.compile``d model runs.
        channels: Probability channels returned per chip: 1 (rooftop
            probability) for a binary model, else one per class.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        classes: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        tta: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        batch_size: int | None = None,
        extra_channels: int = 0,
        stretch: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        """Prepare the model.

        Args:
            model: Segmentation model returning logits (N, classes, H, W).
            mean: Per-band mean in raw pixel units (stretched units with ``stretch``).
            std: Per-band standard deviation in raw pixel units (stretched units with ``stretch``).
            classes: Number of classes the model outputs.
            device: Device to run on.
            autocast_dtype: Autocast dtype, or None for fp32.
            tta: Average the predictions of the four flips of each chip.
            channels_last: Use the channels_last memory format (faster convolutions).
            compile: Run a ``torch.compile``d model (static shapes, frozen weights; falls back
                to the eager model with a warning if compiling fails).
            batch_size: With ``compile``, the one batch size the compiled graph runs (a new shape
                would compile again); a smaller batch (a run's last) runs in the eager model.
            extra_channels: Sigmoid channels the model outputs after its ``classes`` class
                logits (an ``instances`` model: border, contact); their probabilities follow
                the class probabilities.
            stretch: Per band ``(low, high)`` raw values of the checkpoint's percentile stretch:
                raw blocks are clipped to it, then normalised with the mean and std folded into
                raw units (``augment.raw_normalisation``; the same as the training transform's
                ``clip((raw - low) / (high - low), 0, 1)`` then ``(x - mean) / std``).

        Raises:
            ConfigError: A zero standard deviation.
        """
        from geoseg.augment import raw_normalisation

        if any(float(s) == 0 for s in std):
            raise ConfigError(f"normalisation std {tuple(std)} has a zero; the checkpoint is broken")
        if getattr(model, "runs_own_precision", False):  # autocast cannot reach it; compiling gains nothing
            if autocast_dtype is not None or compile:
                log.info("%s: runs in its own precision (%s); the mixed precision and "
                         "torch.compile asked for apply to torch models only",
                         getattr(model, "path", type(model).__name__), getattr(model, "precision", "32"))
            autocast_dtype, compile = None, False
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.classes = int(classes)
        self.binary = self.classes == 2
        self.extra = int(extra_channels)
        self.channels = (1 if self.classes <= 2 else self.classes) + self.extra
        self.tta = bool(tta)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model, stamp = _prepared(model, device, self.memory_format)
        if not getattr(model, "runs_own_precision", False):
            self.model = fold_batchnorm(self.model, in_channels=len(mean), stamp=stamp)
        self.eager = self.model
        self.compiled = bool(compile)
        self.compiled_batch = int(batch_size) if compile and batch_size else None
        if compile:
            self.model = compiled_model(self.eager, device)
        mean, std, clip = raw_normalisation(mean, std, stretch)
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32, device=device)
        self.inv_std = 1.0 / torch.tensor([float(s) for s in std], dtype=torch.float32, device=device)
        #: Per band, the raw values the stretch clips to (None: no stretch).
        self.low = self.high = None
        if clip is not None:
            self.low = torch.tensor([lo for lo, _ in clip], dtype=torch.float32, device=device)
            self.high = torch.tensor([hi for _, hi in clip], dtype=torch.float32, device=device)

    @property
    def precision(self) -> str:
        """The precision the model really runs in: ``"32"``, ``"bf16"``, ``"16"`` or ``"int8"``."""
        if getattr(self.eager, "runs_own_precision", False):
            return str(getattr(self.eager, "precision", "32"))
        return precision_name(self.autocast_dtype)

    def batch_key(self) -> tuple[Any, ...]:
        """What two predictors share when chips normalised by each may go through one model call:
        the same model run the same way (device, precision, compiled batch size, TTA, outputs)."""
        return (id(self.model), str(self.device), self.autocast_dtype, self.compiled_batch, self.tta, self.classes,
                self.extra, self.memory_format)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _logits(self, chips: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            full = self.compiled_batch is None or chips.shape[0] == self.compiled_batch
            if self.model is self.eager or not full:
                # A smaller batch (a run's last, or a scene smaller than a batch) runs eager:
                # padded to the compiled shape it would cost a whole batch, eager only its
                # chips (ResNet50 bf16, 2-core AVX-512: 9 of 16 chips 0.61-0.72 s eager,
                # 1.05-1.15 s compiled and padded), and a new shape would compile again.
                return self.eager(chips)
            try:
                return self.model(chips)
            except Exception as exc:  # noqa: BLE001 - compiling can fail (no C++ compiler, ...)
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("torch.compile failed (%s); predicting with the eager model", reason[:200])
                self.model, self.compiled, self.compiled_batch = self.eager, False, None
                return self.model(chips)

    def _probabilities(self, chips: torch.Tensor) -> torch.Tensor:
        logits = self._logits(chips).float()
        if self.extra:
            extra = torch.sigmoid(logits[:, self.classes:])
            logits = logits[:, :self.classes]
        if self.classes == 1:
            probs = torch.sigmoid(logits)
        elif self.binary:  # softmax of two logits = sigmoid of their difference; one channel kept
            probs = torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])
        else:
            probs = torch.softmax(logits, dim=1)
        return torch.cat([probs, extra], dim=1) if self.extra else probs

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        """Probabilities for a batch of normalised chips.

        Args:
            chips: (N, C, H, W) float32 on ``device``, ideally channels_last.

        Returns:
            (N, channels, H, W) float32 probabilities.
        """
        if not self.tta:
            return self._probabilities(chips)
        total = self._probabilities(chips)  # TTA_FLIPS[0] is the identity
        for flip_rows, flip_cols in TTA_FLIPS[1:]:
            dims = [d for d, on in ((2, flip_rows), (3, flip_cols)) if on]
            x = chips.flip(dims).contiguous(memory_format=self.memory_format)
            total.add_(self._probabilities(x).flip(dims))
        return total.mul_(1.0 / len(TTA_FLIPS))


@dataclass(frozen=True)
class Throughput:
    """Model-only throughput measured on pre-loaded tensors.

    Attributes:
        chips_per_s: Median chips per second over the timed repeats.
        seconds: Median seconds per batch.
        batch_size: Chips per batch.
        repeats: Number of timed batches.
        device: Device name.
        precision: ``"32"``, ``"bf16"`` or ``"16"``.
        threads: Torch intra-op threads (CPU).
    """

    chips_per_s: float
    seconds: float
    batch_size: int
    repeats: int
    device: str
    precision: str
    threads: int


def model_throughput(
    model: nn.Module,
    *,
    in_channels: int,
    chip_size: int,
    classes: int,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    compile: bool = False,
) -> Throughput:
    """Model-only throughput: chips/s of :class:`ChipPredictor` on tensors already on the device.

    Same settings as :func:`geoseg.inference.predict_scene` (eval, inference
    mode, channels_last, autocast, thread count), so the two numbers compare.

    Args:
        model: The model.
        in_channels: Input bands.
        chip_size: Chip size in pixels.
        classes: Classes the model outputs.
        batch_size: Chips per batch.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"``, ``"32"``, ``"bf16"`` or ``"16"``.
        tta: Include flip test-time augmentation.
        repeats: Timed batches (the median is reported).
        warmup: Untimed batches first.
        threads: CPU threads (None: :func:`geoseg.devices.default_cpu_threads`).
        seed: Seed of the random input.

    Returns:
        The measurement.

    Raises:
        ConfigError: Bad device or precision.
    """
    dev = resolve_device(device, setting="device")
    predictor = ChipPredictor(
        model, mean=[0.0] * in_channels, std=[1.0] * in_channels, classes=classes,
        device=dev, autocast_dtype=resolve_precision(precision, dev, setting="precision").dtype, tta=tta,
        compile=compile, batch_size=batch_size,
    )
    gen = torch.Generator().manual_seed(seed)
    times = []
    with torch_threads(threads if dev.type == "cpu" else torch.get_num_threads()) as n, torch.inference_mode():
        # Made in inference mode as prediction's chips are: a compiled graph's guards check it,
        # and chips made outside would leave prediction a second compile (8 s on 2 cores).
        chips = torch.randn((batch_size, in_channels, chip_size, chip_size), generator=gen)
        chips = chips.to(dev).contiguous(memory_format=predictor.memory_format)
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            predictor(chips)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return Throughput(
        chips_per_s=batch_size / med, seconds=med, batch_size=batch_size, repeats=repeats,
        device=str(dev), precision=predictor.precision, threads=n,
    )
