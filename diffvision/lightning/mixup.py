"""Mixup / CutMix for the classifier: timm's ``Mixup`` on the device batch, label smoothing folded in,
and timm's ``SoftTargetCrossEntropy`` on the mixed targets."""
from __future__ import annotations

from typing import Optional

import torch
from timm.loss import SoftTargetCrossEntropy

__all__ = ["MIXUP_MODES", "build_mixup", "mix_batch", "soft_target_cross_entropy"]

MIXUP_MODES = ("batch", "pair", "elem")
soft_target_cross_entropy = SoftTargetCrossEntropy()  # no state: one instance serves every module


def build_mixup(num_classes: int, label_smoothing: float, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                cutmix_minmax: Optional[tuple[float, float]] = None, prob: float = 1.0, switch_prob: float = 0.5,
                mode: str = "batch"):
    """``timm.data.Mixup`` with these settings (timm's ``train.py`` builds it the same way), or None when
    neither Mixup nor CutMix is on. The targets it makes carry ``label_smoothing``."""
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: off), got {value}")
    for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if mode not in MIXUP_MODES:
        raise ValueError(f"unknown mixup_mode {mode!r}; accepted: {list(MIXUP_MODES)}")
    if cutmix_minmax is not None and (len(cutmix_minmax) != 2 or not 0.0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1.0):
        raise ValueError(f"cutmix_minmax must be (min, max) box-size ratios with 0 < min < max <= 1, got {cutmix_minmax}")
    if mixup_alpha <= 0 and cutmix_alpha <= 0 and cutmix_minmax is None:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                 cutmix_minmax=tuple(cutmix_minmax) if cutmix_minmax is not None else None, prob=prob,
                 switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)


def mix_batch(mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mixed images, their labels, soft targets)``. timm's Mixup pairs image i with image B-1-i and
    needs an even batch (timm's loaders drop the last, odd, batch): an odd batch here, the last of an
    epoch, trains on its first B-1 images."""
    if len(images) % 2:
        images, labels = images[:-1], labels[:-1]
    mixed, soft = mixup(images.clone(), labels)  # timm mixes in place: the loader's tensor is left as it was
    return mixed, labels, soft
