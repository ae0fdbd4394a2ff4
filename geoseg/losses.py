"""Training loss: weighted cross-entropy + soft Dice on softmax probabilities (smp.losses)."""

from __future__ import annotations

import torch
from torch import nn

from geoseg.errors import ConfigError

#: Label value that loss and metrics skip (padding, nodata); same as geoseg.labels.IGNORE_INDEX.
IGNORE_INDEX = 255


class SegmentationLoss(nn.Module):
    """``ce_weight * CrossEntropy + dice_weight * soft Dice``.

    The Dice term is smp's multiclass ``DiceLoss`` on softmax probabilities, so it
    is differentiable (a Dice on argmax, as in the seed notebook, has no gradient).
    Pixels labelled ``ignore_index`` count in neither term. Both terms are
    computed in float32, also under autocast.
    """

    def __init__(
        self,
        *,
        ce_weight: float = 0.6,
        dice_weight: float = 0.4,
        ignore_index: int = IGNORE_INDEX,
        class_weights: tuple[float, ...] | None = None,
    ) -> None:
        """Build the loss.

        Args:
            ce_weight: Weight of the cross-entropy term (>= 0).
            dice_weight: Weight of the soft Dice term (>= 0).
            ignore_index: Label value excluded from both terms.
            class_weights: Optional per-class weights for the cross-entropy term.

        Raises:
            ConfigError: Negative weights, or both zero.
        """
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss

        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight <= 0:
            raise ConfigError(
                f"loss weights should be >= 0 and not both 0, got train.ce_weight={ce_weight}, "
                f"train.dice_weight={dice_weight}"
            )
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ignore_index = ignore_index
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, K, H, W) against class ids ``target`` (N, H, W)."""
        logits = logits.float()
        target = target.long()
        if not bool((target != self.ignore_index).any()):
            # every pixel ignored: CE would be 0/0 = NaN; a zero that keeps the graph instead
            return logits.sum() * 0.0
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * self.ce(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
