"""Training losses (smp.losses): CE + soft Dice for the footprint; focal/BCE + Dice per instance channel."""

from __future__ import annotations

import torch
from torch import nn

from geoseg.encoding import IGNORE_INDEX
from geoseg.errors import ConfigError



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


#: Names of the per-channel losses (``train.border_loss``, ``train.contact_loss``).
CHANNEL_LOSSES = ("focal_dice", "bce_dice")


class BinaryChannelLoss(nn.Module):
    """Loss of one sigmoid channel (border or contact): a per-pixel term + soft Dice, 1:1.

    ``focal_dice``: smp's binary ``FocalLoss`` (gamma 2) + binary ``DiceLoss``, the
    loss solaris ships for selimsef's SpaceNet-4 footprint/boundary/contact model;
    ``bce_dice``: binary cross-entropy + the same Dice. Pixels labelled
    ``ignore_index`` count in neither term (the BCE is averaged over the other
    pixels only, which smp's ``SoftBCEWithLogitsLoss`` does not do). Dice is summed
    over the batch, and is 0 for a batch without a positive pixel (smp), so thin
    rare targets are not drowned by the background. Computed in float32.
    """

    def __init__(self, kind: str = "focal_dice", *, ignore_index: int = IGNORE_INDEX) -> None:
        """Build the loss.

        Raises:
            ConfigError: An unknown ``kind``.
        """
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss, FocalLoss

        if kind not in CHANNEL_LOSSES:
            raise ConfigError(f"channel loss should be one of {', '.join(CHANNEL_LOSSES)}, got {kind!r}")
        self.kind = kind
        self.ignore_index = ignore_index
        self.focal = FocalLoss("binary", ignore_index=ignore_index) if kind == "focal_dice" else None
        self.dice = DiceLoss("binary", from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, H, W) against 0/1 ``target`` (N, H, W), ``ignore_index`` skipped."""
        logits = logits.float()
        target = target.float()
        keep = target != self.ignore_index
        if not bool(keep.any()):
            return logits.sum() * 0.0
        if self.focal is not None:
            pixel = self.focal(logits, target)
        else:
            pixel = nn.functional.binary_cross_entropy_with_logits(logits[keep], target[keep])
        return pixel + self.dice(logits.unsqueeze(1), target.unsqueeze(1))


class InstanceSegmentationLoss(nn.Module):
    """Loss of an ``instances`` model: footprint loss + weighted border and contact losses.

    The logits are (N, classes + 2, H, W): ``classes`` class logits, trained with
    ``footprint`` (a :class:`SegmentationLoss`, exactly as a footprint model), then
    the ``border`` and ``contact`` logits (sigmoid channels, see
    ``geoseg.models.output_channels``), each trained with its own
    :class:`BinaryChannelLoss` against ``targets`` (N, 2, H, W) 0/1, 255 ignored.
    """

    def __init__(
        self,
        *,
        classes: int,
        footprint: SegmentationLoss,
        border_loss: str = "focal_dice",
        border_weight: float = 1.0,
        contact_loss: str = "focal_dice",
        contact_weight: float = 1.0,
    ) -> None:
        """Build the loss.

        Args:
            classes: Number of class logits before the instance channels.
            footprint: The loss of the class logits.
            border_loss: ``train.border_loss`` (``focal_dice`` or ``bce_dice``).
            border_weight: ``train.border_weight`` (>= 0).
            contact_loss: ``train.contact_loss``.
            contact_weight: ``train.contact_weight`` (>= 0).

        Raises:
            ConfigError: A negative weight or an unknown loss name.
        """
        super().__init__()
        for key, value in (("train.border_weight", border_weight), ("train.contact_weight", contact_weight)):
            if not value >= 0:
                raise ConfigError(f"{key} should be >= 0 (0 leaves that channel untrained), got {value}")
        for key, value in (("train.border_loss", border_loss), ("train.contact_loss", contact_loss)):
            if value not in CHANNEL_LOSSES:
                raise ConfigError(f"{key} should be one of {', '.join(CHANNEL_LOSSES)}, got {value!r}")
        self.classes = int(classes)
        self.footprint = footprint
        self.border = BinaryChannelLoss(border_loss)
        self.contact = BinaryChannelLoss(contact_loss)
        self.weights = (float(border_weight), float(contact_weight))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, classes + 2, H, W) against class ids ``mask`` (N, H, W)
        and instance ``targets`` (N, 2, H, W)."""
        k = self.classes
        if logits.shape[1] != k + 2 or targets.shape[1] != 2:
            raise ValueError(
                f"an instances loss needs {k} + 2 logit channels and 2 target channels, "
                f"got {logits.shape[1]} and {targets.shape[1]}"
            )
        loss = self.footprint(logits[:, :k], mask)
        for c, (channel_loss, weight) in enumerate(zip((self.border, self.contact), self.weights)):
            if weight:
                loss = loss + weight * channel_loss(logits[:, k + c], targets[:, c])
        return loss
