"""Tests for geoseg.metrics: confusion counts accumulated over an epoch, never averaged per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.errors import LabelError
from geoseg.metrics import ConfusionMatrix


def test_counts_and_metrics_by_hand():
    truth = np.array([[0, 0, 1, 1], [0, 1, 1, 255]])
    pred = np.array([[0, 1, 1, 0], [0, 1, 1, 1]])
    cm = ConfusionMatrix(2)
    cm.update(pred, truth)
    # truth 0: predicted 0 twice, 1 once; truth 1: predicted 0 once, 1 three times; one ignored
    assert cm.counts.tolist() == [[2, 1], [1, 3]]
    assert cm.counts.dtype == np.int64
    m = cm.compute()
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    assert m["iou"] == pytest.approx(3 / 5)
    assert m["iou_per_class"] == pytest.approx([2 / 4, 3 / 5])
    assert m["miou"] == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["pixels"] == 7


def test_logits_are_reduced_by_argmax():
    truth = torch.tensor([[[0, 1]]])
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2): predicts [0, 1]
    cm = ConfusionMatrix(2)
    cm.update(logits, truth)
    assert cm.counts.tolist() == [[1, 0], [0, 1]]


def test_epoch_metrics_are_not_a_mean_of_batch_metrics():
    cm = ConfusionMatrix(2)
    # batch 1: a big roof, all found (IoU 1); batch 2: one roof pixel, missed (IoU 0)
    cm.update(torch.ones(1, 10, 10, dtype=torch.long), torch.ones(1, 10, 10, dtype=torch.long))
    t2 = torch.zeros(1, 10, 10, dtype=torch.long)
    t2[0, 0, 0] = 1
    cm.update(torch.zeros(1, 10, 10, dtype=torch.long), t2)
    assert cm.compute()["iou"] == pytest.approx(100 / 101)  # per-batch mean would give 0.5


def test_merge_equals_one_matrix_over_everything():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 3, size=(4, 8, 8))
    truths = rng.integers(0, 3, size=(4, 8, 8))
    whole = ConfusionMatrix(3)
    whole.update(preds, truths)
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(preds[:1], truths[:1])
    b.update(preds[1:], truths[1:])
    assert np.array_equal(a.merge(b).counts, whole.counts)
    expected = np.zeros((3, 3), dtype=np.int64)
    np.add.at(expected, (truths.ravel(), preds.ravel()), 1)
    assert np.array_equal(whole.counts, expected)
    whole.all_reduce()  # outside torch.distributed: unchanged
    assert np.array_equal(whole.counts, expected)
    whole.reset()
    assert whole.counts.sum() == 0


def test_empty_cases():
    nothing = ConfusionMatrix(2)
    nothing.update(np.zeros((4, 4), int), np.zeros((4, 4), int))
    m = nothing.compute()
    assert (m["iou"], m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0
    missed = ConfusionMatrix(2)
    missed.update(np.zeros((2, 2), int), np.ones((2, 2), int))
    m = missed.compute()
    assert (m["iou"], m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0, 0.0)
    all_ignored = ConfusionMatrix(2)
    all_ignored.update(np.ones((2, 2), int), np.full((2, 2), 255))
    assert all_ignored.counts.sum() == 0 and all_ignored.compute()["pixels"] == 0


def test_truth_class_beyond_the_model_is_a_label_error():
    cm = ConfusionMatrix(2)
    with pytest.raises(LabelError) as err:
        cm.update(np.zeros((2, 2), int), np.array([[0, 3], [1, 255]]))
    assert str(err.value) == (
        "mask holds class id 3 but the model has 2 classes; set data.classes (and data.class_names) to match the labels"
    )
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) does not match truth \(2, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
