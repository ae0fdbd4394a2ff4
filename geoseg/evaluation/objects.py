"""Object metrics as in the SpaceNet building challenge: one-to-one polygon matching at IoU >= 0.5.

Matching rule (the "tie rule"): every pair of a predicted and a true polygon
whose IoU reaches the threshold is a candidate; candidates are taken greedily
by descending IoU, ties (IoUs equal to 1e-9) broken by the lower truth index,
then the lower prediction index; a pair is kept when neither polygon is
already matched. For thresholds above 0.5 and polygons that do not overlap
their own kind (the case for polygons from a mask), every polygon has at most
one candidate partner, so the matching is unique and any rule gives the same
result: IoU(P, T) > 0.5 implies area(P ∩ T) > area(P) / 2, and two disjoint
truths cannot both cover more than half of P. At exactly 0.5 it is not unique:
a prediction made of exactly two truths of equal area has IoU 0.5 with both;
the tie rule then matches the truth with the lower index.

Empty cases: every ratio whose denominator is zero is 1.0 when the prediction
and the truth are both empty (perfect agreement on nothing) and 0.0 otherwise.
So an empty prediction against a non-empty truth has precision 0, recall 0,
F1 0; a prediction against an empty truth has precision 0, recall 0, F1 0;
both empty give precision = recall = F1 = 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import shapely
from affine import Affine

from geoseg.errors import ConfigError
from geoseg.encoding import IGNORE_INDEX  # mask value ignored by losses and metrics
from geoseg.vector_io import object_array
from geoseg.vectorize import StripPolygonizer, apply_affine, label_components

logger = logging.getLogger(__name__)

#: SpaceNet's matching threshold: a prediction matches a truth at IoU >= 0.5.
DEFAULT_IOU_THRESHOLD = 0.5
#: IoUs closer than this are equal (float rounding in intersections), both for
#: the threshold test and for the tie rule.
IOU_TOLERANCE = 1e-9
#: Rooftop class id in geoseg masks.
ROOFTOP_CLASS = 1


def safe_ratio(numerator: float, denominator: float, *, both_empty: bool) -> float:
    """``numerator / denominator``, or the empty-case convention when the denominator is 0.

    Args:
        numerator: Count above the line.
        denominator: Count below the line.
        both_empty: Whether prediction and truth are both empty (then 1.0, else 0.0).

    Returns:
        The ratio as a float.
    """
    if denominator > 0:
        return float(numerator) / float(denominator)
    return 1.0 if both_empty else 0.0


def object_scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    """Object precision, recall and F1 from match counts (e.g. summed over batches).

    Args:
        tp: Matched pairs.
        fp: Predicted polygons without a match (false).
        fn: True polygons without a match (missed).

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}`` with the empty-case
        convention of this module (1.0 when there are neither predictions nor truths).

    Raises:
        ConfigError: If a count is negative.
    """
    if min(tp, fp, fn) < 0:
        raise ConfigError(f"object counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    both_empty = tp + fp + fn == 0
    return {
        "precision": safe_ratio(tp, tp + fp, both_empty=both_empty),
        "recall": safe_ratio(tp, tp + fn, both_empty=both_empty),
        "f1": safe_ratio(2 * tp, 2 * tp + fp + fn, both_empty=both_empty),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
    }


@dataclass(frozen=True)
class ObjectMatch:
    """The one-to-one matching of predicted and true polygons.

    Attributes:
        pairs: ``(pred_index, true_index, iou)`` of each match, in the order
            they were taken (descending IoU, then the tie rule).
        n_pred: Number of predicted polygons.
        n_true: Number of true polygons.
        iou_threshold: The IoU a pair needed to match.
    """

    pairs: tuple[tuple[int, int, float], ...]
    n_pred: int
    n_true: int
    iou_threshold: float = DEFAULT_IOU_THRESHOLD

    @property
    def tp(self) -> int:
        """Matched pairs."""
        return len(self.pairs)

    @property
    def fp(self) -> int:
        """Predicted polygons without a match (false buildings)."""
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        """True polygons without a match (missed buildings)."""
        return self.n_true - self.tp

    @property
    def false_positives(self) -> tuple[int, ...]:
        """Indexes of the predicted polygons without a match, ascending."""
        matched = {p for p, _, _ in self.pairs}
        return tuple(i for i in range(self.n_pred) if i not in matched)

    @property
    def false_negatives(self) -> tuple[int, ...]:
        """Indexes of the true polygons without a match, ascending."""
        matched = {t for _, t, _ in self.pairs}
        return tuple(i for i in range(self.n_true) if i not in matched)

    def scores(self) -> dict[str, Any]:
        """``{"precision", "recall", "f1", "tp", "fp", "fn"}`` (see :func:`object_scores`)."""
        return object_scores(self.tp, self.fp, self.fn)

    @property
    def precision(self) -> float:
        """tp / (tp + fp); 1.0 when both sides are empty, 0.0 with no prediction."""
        return self.scores()["precision"]

    @property
    def recall(self) -> float:
        """tp / (tp + fn); 1.0 when both sides are empty, 0.0 with an empty truth."""
        return self.scores()["recall"]

    @property
    def f1(self) -> float:
        """2 tp / (2 tp + fp + fn); 1.0 when both sides are empty."""
        return self.scores()["f1"]


def _check_threshold(iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ConfigError(
            f"iou_threshold should be in (0, 1], got {iou_threshold!r}; pass e.g. 0.5 (SpaceNet)"
        )


def _geometry_array(polys: Iterable[Any] | None) -> np.ndarray:
    arr = object_array(() if polys is None else polys)
    missing = shapely.is_missing(arr)
    if missing.any():
        arr = arr.copy()
        arr[missing] = shapely.Polygon()
    bad = ~shapely.is_valid(arr)
    if bad.any():  # intersections of invalid geometries raise in GEOS
        arr = arr.copy()
        arr[bad] = shapely.make_valid(arr[bad])
    return arr


def match_objects(
    pred_polys: Sequence[Any] | Iterable[Any],
    true_polys: Sequence[Any] | Iterable[Any],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> ObjectMatch:
    """Match predicted to true polygons one-to-one at IoU >= ``iou_threshold`` (SpaceNet).

    Candidate pairs come from an STRtree (only intersecting polygons are
    compared). Pairs are taken greedily by descending IoU; ties (IoUs equal to
    1e-9) go to the lower truth index, then the lower prediction index. With
    a threshold above 0.5 and non-overlapping polygons on each side the
    matching is unique (see the module docstring); the tie rule matters only
    at exactly 0.5 or for overlapping polygons.

    Both sides must be in the same CRS (IoU is a ratio of areas, so any
    CRS works, also degrees for building-sized polygons). Empty or missing
    geometries count as objects that never match.

    Args:
        pred_polys: Predicted polygons (shapely geometries, a GeoSeries, ...).
        true_polys: True polygons, same CRS.
        iou_threshold: IoU a pair needs to match, in (0, 1].

    Returns:
        The matching with counts and scores.

    Raises:
        ConfigError: If ``iou_threshold`` is not in (0, 1].
    """
    _check_threshold(iou_threshold)
    pred = _geometry_array(pred_polys)
    true = _geometry_array(true_polys)
    if len(pred) == 0 or len(true) == 0:
        return ObjectMatch((), len(pred), len(true), iou_threshold)
    tree = shapely.STRtree(true)
    pi, ti = tree.query(pred, predicate="intersects")
    if len(pi) == 0:
        return ObjectMatch((), len(pred), len(true), iou_threshold)
    inter = shapely.area(shapely.intersection(pred[pi], true[ti]))
    union = shapely.area(pred[pi]) + shapely.area(true[ti]) - inter
    return _greedy_match(pi, ti, inter, union, len(pred), len(true), iou_threshold)


def _greedy_match(
    pi: np.ndarray,
    ti: np.ndarray,
    inter: np.ndarray,
    union: np.ndarray,
    n_pred: int,
    n_true: int,
    iou_threshold: float,
) -> ObjectMatch:
    """One-to-one matching of candidate pairs: descending IoU, then lower truth, lower prediction."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    keep = iou >= iou_threshold - IOU_TOLERANCE
    pi, ti, iou = pi[keep], ti[keep], iou[keep]
    # Quantise so that IoUs equal up to rounding sort as equal and the tie rule applies.
    key = np.round(iou / IOU_TOLERANCE)
    order = np.lexsort((pi, ti, -key))
    used_pred: set[int] = set()
    used_true: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for k in order:
        p, t = int(pi[k]), int(ti[k])
        if p in used_pred or t in used_true:
            continue
        used_pred.add(p)
        used_true.add(t)
        pairs.append((p, t, float(iou[k])))
    return ObjectMatch(tuple(pairs), n_pred, n_true, iou_threshold)


def _components(mask: np.ndarray, min_area_px: float) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components: labels (0 background, 1..n) and pixel areas of labels 1..n."""
    labels, n = label_components(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    if min_area_px > 0:
        keep = areas >= min_area_px
        remap = np.zeros(n + 1, dtype=np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels, areas = remap[labels], areas[keep]
    return labels, areas


def _match_masks(
    pred: np.ndarray, true: np.ndarray, *, min_area_px: float, iou_threshold: float
) -> ObjectMatch:
    """:func:`match_objects` of the 4-connected regions of two boolean masks, by pixel counts.

    A region's polygon (:func:`mask_polygons`) is exactly the union of its
    pixels, and both number the regions alike (raster order of their first
    pixel), so the matching equals that of the polygons; counting is much
    faster than polygon intersections on many small chips.
    """
    pl, pa = _components(pred, min_area_px)
    tl, ta = _components(true, min_area_px)
    both = (pl > 0) & (tl > 0)
    code = pl[both].astype(np.int64) * (len(ta) + 1) + tl[both]
    uniq, inter = np.unique(code, return_counts=True)
    pi, ti = uniq // (len(ta) + 1) - 1, uniq % (len(ta) + 1) - 1
    union = pa[pi] + ta[ti] - inter
    return _greedy_match(pi, ti, inter.astype(float), union.astype(float), len(pa), len(ta),
                         iou_threshold)


def mask_polygons(mask: np.ndarray, *, transform: Affine = Affine.identity()) -> np.ndarray:
    """Polygons of the True regions of a 2-D mask (4-connected), in the transform's units.

    The mask is polygonised by :class:`geoseg.vectorize.StripPolygonizer` as one strip.

    Args:
        mask: Boolean (or 0/1) array (H, W).
        transform: Pixel-to-CRS transform of the mask's grid.

    Returns:
        Object array of shapely Polygons, one per connected region (holes kept),
        in raster order of each region's first pixel.
    """
    m = np.ascontiguousarray(mask, dtype=bool)
    if not m.any():
        return np.empty(0, dtype=object)
    polygonizer = StripPolygonizer(width=m.shape[1], height=m.shape[0])
    polygonizer.add_strip(0, m.view(np.uint8))
    return apply_affine(object_array([r.geometry for r in polygonizer.finish()]), transform)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def object_scores_from_masks(
    pred_mask: Any,
    true_mask: Any,
    *,
    transform: Affine,
    crs: Any = None,
    min_area_px: float = 0,
    class_id: int = ROOFTOP_CLASS,
    ignore_index: int | None = IGNORE_INDEX,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> dict[str, Any]:
    """Object precision, recall and F1 of class-id masks, for training validation.

    Objects are the 4-connected regions of ``class_id`` in each mask (the
    polygons :func:`mask_polygons` makes; their IoUs are computed from pixel
    counts, which is exact for pixel polygons and fast); pixels where the
    truth is ``ignore_index`` are ignored on both sides. A batch
    (N, H, W) is matched chip by chip (objects never match across chips) and
    the counts are summed; sum ``tp``, ``fp``, ``fn`` over batches yourself and
    call :func:`object_scores` for an epoch score.

    Args:
        pred_mask: Predicted class ids (H, W) or (N, H, W): numpy array or tensor.
        true_mask: True class ids of the same shape.
        transform: Pixel-to-CRS transform of the chips (not needed: IoU is a
            ratio of areas; accepted so that callers pass the georeference).
        crs: The masks' CRS; not needed (IoU is unitless), accepted for symmetry.
        min_area_px: Polygons smaller than this many pixels are dropped on both sides.
        class_id: The class whose objects are matched (rooftop = 1).
        ignore_index: Truth value to ignore; None ignores nothing.
        iou_threshold: IoU a pair needs to match.

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``.

    Raises:
        ConfigError: Masks of different shapes or not 2-D/3-D, or a bad threshold.
    """
    del crs
    _check_threshold(iou_threshold)
    pred = _to_numpy(pred_mask)
    true = _to_numpy(true_mask)
    if pred.shape != true.shape or pred.ndim not in (2, 3):
        raise ConfigError(
            f"pred_mask and true_mask should both be (H, W) or (N, H, W), got {pred.shape} "
            f"and {true.shape}; pass masks of the same chips"
        )
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    del transform  # regions are matched by pixel counts: same IoUs as their polygons
    tp = fp = fn = 0
    for p, t in zip(pred, true):
        valid = np.ones(t.shape, dtype=bool) if ignore_index is None else t != ignore_index
        m = _match_masks((p == class_id) & valid, (t == class_id) & valid,
                         min_area_px=min_area_px, iou_threshold=iou_threshold)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return object_scores(tp, fp, fn)
