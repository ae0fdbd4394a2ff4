"""Helpers shared by the prediction tests: label-carrying scenes and stand-in models.

An "oracle" scene carries its label as an extra band, and the oracle model
turns that band into logits, so a correct sliding-window pipeline must
reproduce the label exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import torch
from affine import Affine
from torch import nn

from geoseg.checkpoints import CheckpointMeta

UTM = "EPSG:32633"
UTM_TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0)


def geodesic_area(geom, crs: str) -> float:
    """Area in m² on the WGS84 ellipsoid of a polygon given in ``crs`` (densified edges)."""
    import pyproj
    import shapely

    to_ll = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    dense = shapely.segmentize(geom, geom.length / 400)
    ll = shapely.transform(dense, lambda xy: np.column_stack(to_ll.transform(xy[:, 0], xy[:, 1])))
    area, _ = pyproj.Geod(ellps="WGS84").geometry_area_perimeter(ll)
    return abs(area)


def draw_rectangles(
    height: int, width: int, rects: Sequence[tuple[int, int, int, int]], value: int = 1
) -> np.ndarray:
    """A uint8 label with ``value`` in each (row, col, height, width) rectangle."""
    label = np.zeros((height, width), dtype=np.uint8)
    for r, c, h, w in rects:
        label[r:r + h, c:c + w] = value
    return label


def write_scene(
    path: Path,
    label: np.ndarray,
    *,
    crs: str | None = UTM,
    transform: Affine = UTM_TRANSFORM,
    nodata_mask: np.ndarray | None = None,
    seed: int = 0,
    rgb: bool = True,
) -> Path:
    """A scene with 3 noise bands and the label as band 4 (or the label alone with ``rgb=False``).

    Where ``nodata_mask`` is True every band is 0, the declared nodata.
    """
    rng = np.random.default_rng(seed)
    h, w = label.shape
    bands = [rng.integers(1, 255, (3, h, w), dtype=np.uint8)] if rgb else []
    data = np.concatenate(bands + [label[None].astype(np.uint8)], axis=0)
    nodata = None
    if nodata_mask is not None:
        data[:, nodata_mask] = 0
        nodata = 0
    profile = dict(driver="GTiff", width=w, height=h, count=data.shape[0], dtype="uint8",
                   transform=transform, photometric="MINISBLACK", nodata=nodata)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def oracle_meta(
    *, chip_size: int = 64, classes: int = 2, bands: tuple[int, ...] = (1, 2, 3, 4),
    resolution: float | None = 0.5, config: dict | None = None,
) -> CheckpointMeta:
    """A checkpoint description for the oracle: the last band passes through unnormalised."""
    names = ("background", "rooftop") if classes == 2 else tuple(f"class{i}" for i in range(classes))
    return CheckpointMeta(
        arch="oracle", encoder="none", in_channels=len(bands), classes=classes, class_names=names,
        bands=bands, mean=(0.0,) * len(bands), std=(1.0,) * len(bands), chip_size=chip_size,
        resolution=resolution, config=config or {},
    )


class Oracle(nn.Module):
    """Logits +10 for the class in the last input band, -10 for the others."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.classes = classes
        self.calls = 0
        self.chips = 0
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.chips += x.shape[0]
        label = x[:, -1].round().long().clamp(0, self.classes - 1)
        onehot = nn.functional.one_hot(label, self.classes).permute(0, 3, 1, 2).float()
        return onehot * 20.0 - 10.0 + self.bias


class Constant(nn.Module):
    """The same logits everywhere, whatever the input."""

    def __init__(self, logits: Sequence[float] = (0.0, 0.7)) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.logits[None, :, None, None].expand(n, -1, h, w).clone()


def stand_in_model(monkeypatch, model: nn.Module, meta: CheckpointMeta) -> nn.Module:
    """``geoseg predict`` (``inference.job``) runs ``model``, described by ``meta``, instead of loading a checkpoint."""
    from geoseg import inputs
    from geoseg.inference import job

    monkeypatch.setattr(job, "load_model", lambda path, **kw: (model, meta))
    monkeypatch.setattr(inputs, "check_model_path", lambda path: path)  # no file: a stand-in model
    return model
