"""What to sample with: the samplers (diffusers schedulers) built on the training noise schedule, and
which classes to ask for.

``SAMPLERS`` names the schedulers a ``DiffusionModule`` and ``train/fid_eval.py`` sample with;
:func:`build_sampler` builds one from the training ``DDPMScheduler``'s config, so that sampling walks the
same ᾱ table the model was trained on. :func:`balanced_class_labels` is the class-balanced label
sequence that sample grids and every FID (during validation and of a checkpoint) sample.
"""
from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffvision.choices import check_choice

__all__ = ["SAMPLERS", "balanced_class_labels", "build_sampler", "sampler_class"]

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


def sampler_class(name: str):
    """``SAMPLERS[name]``, or a ValueError that names the accepted samplers."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)]


def build_sampler(name: str, train_config, clip_denoised: bool = True):
    """The sampler ``name`` (``SAMPLERS``) on a training ``DDPMScheduler``'s config.

    ``clip_denoised`` clips each step's predicted x̂_0 to the data range [-1, 1], as DDPM / ADM sample in
    pixel space: an ε-model's x̂_0 = (x_t − √(1−ᾱ)ε)/√ᾱ amplifies its errors by 1/√ᾱ at high noise, and
    without the clip a short-trained model's samples drift out of range and come out saturated. DDPM and
    DDIM have ``clip_sample``; DPM-Solver gets the same clip as thresholding with ``sample_max_value=1``
    (its dynamic threshold is then always 1).
    """
    cls = sampler_class(name)
    if cls is DPMSolverMultistepScheduler:
        return cls.from_config(train_config, thresholding=clip_denoised, sample_max_value=1.0)
    return cls.from_config(train_config, clip_sample=clip_denoised, clip_sample_range=1.0)


def balanced_class_labels(num_classes: int, start: int, stop: int) -> list[int]:
    """The labels of samples ``start .. stop - 1`` of a class-balanced set: sample ``i`` is of class
    ``i % num_classes``. A set cut into pieces (batches, DDP ranks) by ``start`` / ``stop`` is then
    balanced as a whole, and any ``num_classes`` consecutive samples hold every class once."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return [i % num_classes for i in range(start, stop)]
