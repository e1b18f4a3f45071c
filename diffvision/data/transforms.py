"""Augmentation presets on uint8 ``(H, W, C)`` arrays, with randomness from an explicit generator.

Each training sample's randomness comes from ``numpy.random.default_rng([seed, epoch, index])``
(see :class:`~diffvision.data.datamodule.ArrayImageDataset`), not from a global RNG: the same
epoch gives the same augmented images in any process, with any number of workers, and after a
resume.

=============  ===================================================  ==========================
preset         training                                             evaluation
=============  ===================================================  ==========================
``none``       normalise with the dataset mean / std                same
``flip``       horizontal flip (p = 1/2), normalise                 normalise
``basic``      random crop with ``img_size // 8`` zero padding,     normalise
               horizontal flip, normalise (the CIFAR recipe)
``diffusion``  horizontal flip, scale to ``[-1, 1]``                scale to ``[-1, 1]``
=============  ===================================================  ==========================
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["PRESETS", "ImageTransform", "build_transforms"]

PRESETS = ("none", "flip", "basic", "diffusion")


class ImageTransform:
    """uint8 ``(H, W, C)`` array (+ generator) -> float ``(C, H, W)`` tensor."""

    def __init__(self, preset: str, train: bool, mean: Sequence[float], std: Sequence[float],
                 padding: Optional[int] = None) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; accepted: {list(PRESETS)}")
        self.preset, self.train = preset, train
        self.flip = train and preset in ("flip", "basic", "diffusion")
        self.crop = train and preset == "basic"
        self.padding = padding
        self.minus_one_one = preset == "diffusion"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def random(self) -> bool:
        return self.flip or self.crop

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        if self.random:
            if rng is None:
                raise ValueError("a random augmentation needs a generator (rng=)")
            if self.crop:
                h, w = image.shape[:2]
                p = self.padding if self.padding is not None else max(1, h // 8)
                padded = np.pad(image, ((p, p), (p, p), (0, 0)))
                top, left = rng.integers(0, 2 * p + 1, size=2)
                image = padded[top:top + h, left:left + w]
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        # a copy: the source may be a read-only memory map
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
        if self.minus_one_one:
            return x / 127.5 - 1.0
        return (x / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preset={self.preset!r}, train={self.train})"


def build_transforms(preset: str, mean: Sequence[float], std: Sequence[float]) -> tuple[ImageTransform, ImageTransform]:
    """(training transform, evaluation transform) of a preset."""
    return ImageTransform(preset, True, mean, std), ImageTransform(preset, False, mean, std)
