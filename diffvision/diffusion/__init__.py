"""diffvision.diffusion: DIFF-DiT as a diffusers model and pipeline, and the diffusion pieces around it.

* ``transformer_diff_dit``: the model, ``DiffDiTTransformer2DModel`` (and its ``DiffDiTBlock``).
* ``config``: DiT's sizes by name (``DIT_PRESETS``) and the model's config checks.
* ``convert_dit``: a standard DiT (diffusers' or the original) onto any attention kind
  (``load_standard_dit_weights``, ``convert_dit_to_diff_dit``), and back to diffusers.
* ``pipeline_diff_dit``: ``DiffDiTPipeline``, class-conditional sampling with any diffusers scheduler.
* ``sampling``: the samplers on the training noise schedule (``SAMPLERS``, ``build_sampler``) and the
  class-balanced labels that sample grids and FID use.
* ``gaussian_diffusion``: DiT's variational-bound term for learned sigma (``GaussianDiffusionTerms``).
* ``ema``: the EMA of the weights (``ModelEMA``), with diffusers' warm-up decay.

Training itself (the LightningModule, FID during validation) is in :mod:`diffvision.lightning`.
"""
from .transformer_diff_dit import DIT_PRESETS, DiffDiTBlock, DiffDiTTransformer2DModel
from .convert_dit import (
    StandardDiTMapping,
    convert_diff_dit_to_dit,
    convert_dit_to_diff_dit,
    diff_dit_state_dict_to_dit,
    dit_state_dict_to_diff_dit,
    load_standard_dit_weights,
)
from .ema import ModelEMA
from .gaussian_diffusion import GaussianDiffusionTerms
from .pipeline_diff_dit import DiffDiTPipeline
from .sampling import SAMPLERS, balanced_class_labels, build_sampler

__all__ = [
    "DIT_PRESETS",
    "SAMPLERS",
    "DiffDiTBlock",
    "DiffDiTPipeline",
    "DiffDiTTransformer2DModel",
    "GaussianDiffusionTerms",
    "ModelEMA",
    "StandardDiTMapping",
    "balanced_class_labels",
    "build_sampler",
    "convert_diff_dit_to_dit",
    "convert_dit_to_diff_dit",
    "diff_dit_state_dict_to_dit",
    "dit_state_dict_to_diff_dit",
    "load_standard_dit_weights",
]
