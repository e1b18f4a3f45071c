"""The ``timm`` augmentation preset: training images through ``timm.data.create_transform``.

``ImageDataModule(augment="timm")`` trains on timm's ImageNet training pipeline (random resized crop,
flip, colour jitter or an auto-augment / RandAugment policy, normalisation, random erasing), with the
options named as timm's ``train.py`` names them. It runs on PIL images in the loader's CPU workers;
the on-device path (``augment_on_device``) runs only the array presets of :mod:`.transforms`.

Evaluation with this preset is what evaluation is for every preset: the image at the decode size,
normalised (timm's evaluation transform at ``crop_pct=1.0``, which exports record).

Like the array presets, a sample's randomness is a function of (seed, epoch, dataset index) alone: the
transform runs with Python's ``random``, numpy's and torch's CPU generators seeded from the sample's generator
(and restored afterwards), so a resumed run or another worker count repeats the same images.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["TIMM_OPTIONS", "TimmTransform", "timm_options", "check_timm_options", "keep_posterize_zero_bits"]

# ImageDataModule argument -> timm.data.create_transform keyword. None (the default of each) leaves
# create_transform's own default in place.
TIMM_OPTIONS = {
    "auto_augment": "auto_augment",   # "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original", ...
    "color_jitter": "color_jitter",   # strength (timm: 0.4); off when an auto_augment policy is given
    "scale": "scale",                 # random resized crop area range (timm: (0.08, 1.0))
    "ratio": "ratio",                 # its aspect ratio range (timm: (3/4, 4/3))
    "hflip": "hflip",                 # horizontal flip probability (timm: 0.5)
    "interpolation": "interpolation",  # "bilinear" (timm's create_transform), "bicubic", "random", ...
    "reprob": "re_prob",              # random erasing probability (timm: 0)
    "remode": "re_mode",              # its fill: "const", "rand" or "pixel"
    "recount": "re_count",            # erased boxes per image (timm: 1)
}


def timm_options(**values: Any) -> dict[str, Any]:
    """The given (not None) timm options as ``create_transform`` keywords."""
    unknown = set(values) - set(TIMM_OPTIONS)
    if unknown:
        raise ValueError(f"unknown timm augmentation option(s) {sorted(unknown)}; accepted: {list(TIMM_OPTIONS)}")
    return {TIMM_OPTIONS[k]: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}


def check_timm_options(augment: str, augment_on_device: bool, **values: Any) -> None:
    """The rule of where augmentation runs: the ``timm`` preset on the CPU workers only, its options
    with that preset only. Anything else is an error naming the option, never an option ignored."""
    given = {k: v for k, v in values.items() if v is not None}
    if augment != "timm" and given:
        name, value = next(iter(given.items()))
        raise ValueError(f"{name}={value!r} is a timm augmentation option: it needs augment='timm' (got "
                         f"augment={augment!r}, whose fixed recipe has no {name})")
    if augment == "timm" and augment_on_device:
        raise ValueError("augment='timm' runs timm's transforms on PIL images in the loader's CPU workers; "
                         "augment_on_device runs only the presets none / flip / basic / diffusion: drop "
                         "augment_on_device or pick one of those presets")


def options_text(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "timm's defaults"


def _posterize(img, bits_to_keep, **_):
    """timm's ``posterize`` op, where 0 bits (timm's RandAugment at magnitude 10, e.g. ``mstd0.5`` around
    m9) gives the black image Pillow gave when the policies were written; Pillow 13 refuses 0 bits
    ("bits must be between or equal to 1 and 8"), which would stop a training run in a loader worker."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def keep_posterize_zero_bits(transform) -> None:
    """Give the posterize ops of ``transform``'s auto-augment policy (RandAugment ``ops``, AutoAugment
    ``policy``) :func:`_posterize` as their function (their public ``aug_fn``)."""
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []) or []) + [op for sub in getattr(t, "policy", []) or [] for op in sub]
        for op in ops:
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize


class TimmTransform:
    """A uint8 ``(H, W, C)`` array or an image file (+ generator) -> float ``(C, H, W)`` tensor, through
    ``timm.data.create_transform(is_training=True, ...)``; the interface of
    :class:`~diffvision.data.transforms.ImageTransform`."""

    random = True
    preset = "timm"
    train = True
    minus_one_one = False  # normalised by mean / std (DiffusionModule, which needs [-1, 1], refuses it)

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], **options: Any) -> None:
        from timm.data import create_transform

        self.img_size, self.mean, self.std = int(img_size), tuple(mean), tuple(std)
        self.options = timm_options(**options)
        try:
            self.transform = create_transform(self.img_size, is_training=True, mean=self.mean, std=self.std,
                                              **self.options)
        except (AssertionError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"timm cannot build its training transform from {options_text(self.options)}: "
                             f"{type(err).__name__}: {err}") from err
        keep_posterize_zero_bits(self.transform)

    def _pil(self, image: Union[np.ndarray, str, Path]):
        from PIL import Image

        if isinstance(image, (str, Path)):
            with Image.open(image) as img:
                return img.convert("RGB" if len(self.mean) == 3 else "L")
        array = np.asarray(image)
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def __call__(self, image: Union[np.ndarray, str, Path], rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        if rng is None:
            raise ValueError("a random augmentation needs a generator (rng=)")
        seed = int(rng.integers(0, 2**32))
        state, np_state = random.getstate(), np.random.get_state()
        try:
            # timm's transforms draw from Python's random (crops, flips, policies), numpy's global
            # generator (RandAugment's choice of ops) and torch's CPU generator (random erasing)
            random.seed(seed)
            np.random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues a seed for every lazy device
                # backend, recording a Python stack each time (~1 ms, half of this call at 32 px)
                torch.default_generator.manual_seed(seed)
                return self.transform(self._pil(image))
        finally:
            random.setstate(state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, {self.options})"
