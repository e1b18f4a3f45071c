"""Augmentation presets on uint8 ``(H, W, C)`` arrays, with randomness from an explicit generator.

These presets run in the loader's CPU workers or, with ``augment_on_device``, batch-wise on the device
(:class:`BatchImageTransform`); timm's pipeline is the ``timm`` preset of :mod:`.timm_augment`, CPU
workers only.

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

``random_resized_crop`` trains on a random resized crop (area 8-100 %, aspect ratio 3/4-4/3, sampled as
torchvision's ``RandomResizedCrop``) scaled back to the image's size, then a horizontal flip, then normalises;
evaluation only normalises. It is ESPFormer's training transform, and runs on the CPU only (not with
``augment_on_device``).
``ImageDataModule(normalize=False)`` sets mean 0 and std 1: pixels in ``[0, 1]``, as ``ToTensor()`` alone.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["PRESETS", "ImageTransform", "BatchImageTransform", "augmentation_draws", "build_transforms",
           "random_resized_crop", "resized_crop_box"]

PRESETS = ("none", "flip", "basic", "diffusion", "random_resized_crop")
CPU_ONLY_PRESETS = ("random_resized_crop",)


def resized_crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
                     ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop as torchvision's ``RandomResizedCrop.get_params`` samples it: up to 10
    tries of an area fraction ~ U(scale) and a log-uniform aspect ratio that fit the image, else the largest
    centred crop of an aspect ratio within ``ratio``; here drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A :func:`resized_crop_box` crop of a uint8 ``(H, W, C)`` image, resized (bilinear) back to ``(H, W)``, uint8."""
    height, width = image.shape[:2]
    top, left, h, w = resized_crop_box(height, width, rng)
    crop = torch.from_numpy(np.array(image[top:top + h, left:left + w], dtype=np.float32)).permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False,
                                              antialias=True)[0]
    return resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


class ImageTransform:
    """uint8 ``(H, W, C)`` array (+ generator) -> float ``(C, H, W)`` tensor."""

    def __init__(self, preset: str, train: bool, mean: Sequence[float], std: Sequence[float],
                 padding: Optional[int] = None) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; accepted: {list(PRESETS)}")
        self.preset, self.train = preset, train
        self.flip = train and preset in ("flip", "basic", "diffusion", "random_resized_crop")
        self.crop = train and preset == "basic"
        self.resized_crop = train and preset == "random_resized_crop"
        self.padding = padding
        self.minus_one_one = preset == "diffusion"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def random(self) -> bool:
        return self.flip or self.crop or self.resized_crop

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
            if self.resized_crop:
                image = random_resized_crop(image, rng)
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


# ---------------------------------------------------------------------------------------------
# The same presets on whole uint8 batches, on the training device (ImageDataModule(augment_on_device=True))
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (two multiply-xorshift rounds) on int64 tensors holding values < 2**32;
    products stay below 2**59, so nothing overflows on any device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def augmentation_draws(seed: int, epochs: torch.Tensor, indices: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` pseudo-random 32-bit draws per sample, a function of (seed, epoch, dataset index)
    alone: int64 ``(B, count)``. The batch analogue of ``default_rng([seed, epoch, index])``."""
    seed = int(seed)
    h = _hash32(torch.full_like(indices, seed & _MASK32)) ^ _hash32(torch.full_like(indices, (seed >> 32) & _MASK32) + 1)
    h = _hash32(_hash32(h ^ (epochs & _MASK32)) ^ (indices & _MASK32))
    return torch.stack([_hash32(h + 0x9E3779B9 * (k + 1)) for k in range(count)], dim=1)


class BatchImageTransform:
    """uint8 ``(B, H, W, C)`` batch + ``(epoch, index)`` keys -> float ``(B, C, H, W)``, on any device.

    The batch twin of :class:`ImageTransform`: the same presets (crop with ``img_size // 8`` zero
    padding, flip with p = 1/2, the same normalisation), applied where the batch lives, so a GPU run
    needs no CPU workers for augmentation. Each sample's crop offsets and flip come from
    :func:`augmentation_draws` of (seed, epoch, dataset index): like the CPU path they depend on
    nothing but the seed, the epoch and the image (the two paths draw different, equally uniform,
    offsets).
    """

    def __init__(self, preset: str, train: bool, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0, padding: Optional[int] = None) -> None:
        self.cpu = ImageTransform(preset, train, mean, std, padding)  # validates the preset
        self.seed = int(seed)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std) per device

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # copied to a device once: a copy from pageable CPU memory synchronises the device each time
        if device not in self._stats:
            self._stats[device] = (self.cpu.mean.to(device), self.cpu.std.to(device))
        return self._stats[device]

    @property
    def random(self) -> bool:
        return self.cpu.random

    def params(self, keys: torch.Tensor, height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(top, left, flip, padding) per sample for ``keys`` = int64 ``(B, 2)`` of (epoch, index)."""
        p = self.cpu.padding if self.cpu.padding is not None else max(1, height // 8)
        draws = augmentation_draws(self.seed, keys[:, 0], keys[:, 1], 3)
        top, left = draws[:, 0] % (2 * p + 1), draws[:, 1] % (2 * p + 1)
        flip = (draws[:, 2] & 1).bool() if self.cpu.flip else torch.zeros_like(top, dtype=torch.bool)
        if not self.cpu.crop:
            top, left, p = torch.zeros_like(top), torch.zeros_like(left), 0
        return top, left, flip, p

    def __call__(self, images: torch.Tensor, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 (B, H, W, C) batch, got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
        if self.random:
            if keys is None:
                raise ValueError("a random augmentation needs the batch's (epoch, index) keys")
            b, _, h, w = x.shape
            top, left, flip, p = self.params(keys.to(x.device), h)
            if p:
                padded = torch.nn.functional.pad(x, (p, p, p, p))
                rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]   # (B, H, 1)
                cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
                x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.float()
        if self.cpu.minus_one_one:
            return x / 127.5 - 1.0
        mean, std = self._mean_std(x.device)
        return (x / 255.0 - mean) / std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(preset={self.cpu.preset!r}, train={self.cpu.train})"
