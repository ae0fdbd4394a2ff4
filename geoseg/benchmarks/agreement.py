"""Does mixed precision change the predicted masks? fp32 against bf16 (or fp16) on real scenes.

Each scene is predicted twice with the same checkpoint and settings, once in
fp32 and once in the mixed precision, and the two class masks are compared
pixel by pixel (nodata excluded), block by block so memory stays bounded.
Agreement over all pixels is dominated by easy background, so the rooftop IoU
between the two masks is reported as well.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from geoseg.benchmarks.workload import ProgressFn
from geoseg.encoding import MASK_NODATA
from geoseg.temporaries import temporary_folder

if TYPE_CHECKING:
    from geoseg.checkpoints import CheckpointMeta

#: Rows read at a time when comparing two masks.
COMPARE_ROWS = 1024


@dataclass
class SceneAgreement:
    """How one scene's masks compare."""

    scene: str
    pixels: int
    agree: int
    rooftop_fp32: int
    rooftop_other: int
    rooftop_both: int

    @property
    def agreement(self) -> float:
        return self.agree / self.pixels if self.pixels else 1.0


@dataclass
class AgreementResult:
    """Pixel agreement of fp32 and ``precision`` masks over a set of scenes."""

    model: str
    device: str
    precision: str
    scenes: list[SceneAgreement]

    def totals(self) -> dict[str, float]:
        """Agreement and rooftop IoU over all scenes (counts summed)."""
        pixels = sum(s.pixels for s in self.scenes)
        agree = sum(s.agree for s in self.scenes)
        a = sum(s.rooftop_fp32 for s in self.scenes)
        b = sum(s.rooftop_other for s in self.scenes)
        both = sum(s.rooftop_both for s in self.scenes)
        union = a + b - both
        return {
            "pixels": pixels, "agreement": agree / pixels if pixels else 1.0,
            "rooftop_iou": both / union if union else 1.0, "differing_pixels": pixels - agree,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": self.device, "precision": self.precision,
            **self.totals(),
            "scenes": [{**asdict(s), "agreement": s.agreement} for s in self.scenes],
        }


def compare_masks(a: str | os.PathLike[str], b: str | os.PathLike[str], *, rooftop: int = 1) -> tuple[int, int, int, int, int]:
    """(valid pixels, equal pixels, rooftop in a, rooftop in b, rooftop in both) of two masks on one grid."""
    import rasterio
    from rasterio.windows import Window

    counts = np.zeros(5, dtype=np.int64)
    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        if (ra.width, ra.height, ra.transform) != (rb.width, rb.height, rb.transform):
            raise ValueError(f"{a} and {b} are not on the same grid")
        for row in range(0, ra.height, COMPARE_ROWS):
            win = Window(0, row, ra.width, min(COMPARE_ROWS, ra.height - row))
            x, y = ra.read(1, window=win), rb.read(1, window=win)
            valid = (x != MASK_NODATA) & (y != MASK_NODATA)
            xr, yr = (x == rooftop) & valid, (y == rooftop) & valid
            counts += [valid.sum(), ((x == y) & valid).sum(), xr.sum(), yr.sum(), (xr & yr).sum()]
    n_valid, n_equal, n_a, n_b, n_both = (int(c) for c in counts)
    return n_valid, n_equal, n_a, n_b, n_both


def mask_agreement(
    scenes: Sequence[str | os.PathLike[str]],
    model_path: str | os.PathLike[str],
    *,
    precision: str = "bf16",
    device: str = "auto",
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
) -> AgreementResult:
    """Predict every scene in fp32 and in ``precision`` and count the pixels whose class agrees.

    Raises:
        GeosegError: Bad scenes, checkpoint, device or precision (as ``geoseg predict``).
    """
    from geoseg.inference.job import load_model, resolve_scenes
    from geoseg.inference.pipeline import predict_scene
    from geoseg.devices import resolve_device, resolve_precision, wants_int8

    say = progress or (lambda _msg: None)
    paths = resolve_scenes(scenes)
    # a torch module or an exported ONNX model (both run in predict_scene), and its description
    model, meta = cast("tuple[Any, CheckpointMeta]", load_model(model_path))
    dev = resolve_device(device, setting="device")
    int8 = wants_int8(precision, dev, 0) if precision == "int8" else False
    resolve_precision("32" if int8 else precision, dev, setting="precision")  # refuse fp16 on a CPU before any work
    rooftop = 1  # class 1 is the rooftop class of geoseg checkpoints
    out: list[SceneAgreement] = []
    with temporary_folder(name="agreement") as tmp:
        models = {"32": model, precision: model}
        if int8:  # as geoseg predict: one int8 model, calibrated on chips of all the scenes
            from geoseg.quantize import int8_model

            say("int8: export, calibration on the scenes, quantisation")
            (Path(tmp) / "int8").mkdir()
            models[precision] = int8_model((model, meta), paths, Path(tmp) / "int8")[0]
        for path in paths:
            masks = {}
            for prec in ("32", precision):
                masks[prec] = Path(tmp) / f"{path.stem}_{prec}.tif"
                say(f"{path.name}: predicting in {prec}")
                predict_scene(path, models[prec], meta, mask_out=masks[prec], polygons=False,
                              batch_size=batch_size, device=str(dev), precision="32" if int8 else prec,
                              overwrite=True)
            pixels, agree, a, b, both = compare_masks(masks["32"], masks[precision], rooftop=rooftop)
            out.append(SceneAgreement(path.stem, pixels, agree, a, b, both))
            for m in masks.values():
                m.unlink()
    return AgreementResult(model=str(model_path), device=str(dev), precision=precision, scenes=out)
