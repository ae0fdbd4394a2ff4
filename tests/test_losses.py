"""Tests for geoseg.losses: 0.6 CE + 0.4 soft Dice, ignore index, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geoseg.errors import ConfigError
from geoseg.losses import SegmentationLoss


def _by_hand(logits: torch.Tensor, target: torch.Tensor, ce_w: float, dice_w: float) -> torch.Tensor:
    """CE over kept pixels + (1 - mean Dice over classes present in the truth), batch-wide."""
    keep = target != 255
    ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    probs = logits.softmax(1).permute(0, 2, 3, 1)[keep]  # (P, K)
    onehot = F.one_hot(target[keep], logits.shape[1]).float()
    losses = []
    for k in range(logits.shape[1]):
        inter = (probs[:, k] * onehot[:, k]).sum()
        card = probs[:, k].sum() + onehot[:, k].sum()
        dice = 2 * inter / card.clamp_min(1e-7)
        losses.append((1 - dice) * (onehot[:, k].sum() > 0))
    return ce_w * ce + dice_w * torch.stack(losses).mean()


def test_loss_is_weighted_ce_plus_soft_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))
    target[0, :2] = 255
    loss = SegmentationLoss()(logits, target)
    assert loss.item() == pytest.approx(_by_hand(logits, target, 0.6, 0.4).item(), rel=1e-5)
    only_ce = SegmentationLoss(ce_weight=1.0, dice_weight=0.0)(logits, target)
    assert only_ce.item() == pytest.approx(_by_hand(logits, target, 1.0, 0.0).item(), rel=1e-6)


def test_ignored_pixels_do_not_count():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 6, 6)
    target = torch.randint(0, 2, (1, 6, 6))
    target[0, 3:] = 255
    changed = logits.clone()
    changed[:, :, 3:] = torch.randn(1, 2, 3, 6) * 50
    loss = SegmentationLoss()
    assert loss(logits, target).item() == pytest.approx(loss(changed, target).item(), abs=1e-6)


def test_perfect_prediction_has_near_zero_loss_and_wrong_one_high():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 40 - 20
    assert SegmentationLoss()(perfect, target).item() < 1e-6
    assert SegmentationLoss()(-perfect, target).item() > 10


def test_dice_term_is_differentiable():
    torch.manual_seed(2)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8))
    SegmentationLoss(ce_weight=0.0, dice_weight=1.0)(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = SegmentationLoss()(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bf16_logits_are_computed_in_float32():
    torch.manual_seed(3)
    logits = torch.randn(1, 2, 8, 8)
    target = torch.randint(0, 2, (1, 8, 8))
    loss = SegmentationLoss()(logits.bfloat16(), target)
    assert loss.dtype == torch.float32


def test_bad_weights_are_refused():
    with pytest.raises(ConfigError, match=r"loss weights should be >= 0 and not both 0, got train.ce_weight=-1"):
        SegmentationLoss(ce_weight=-1)
    with pytest.raises(ConfigError, match="train.dice_weight=0"):
        SegmentationLoss(ce_weight=0, dice_weight=0)
