"""diffvision.diffusion: DIFF-DiT as a diffusers model (DiffDiTTransformer2DModel) and pipeline (DiffDiTPipeline)."""
from .transformer_diff_dit import (
    DIT_PRESETS,
    DiffDiTBlock,
    DiffDiTTransformer2DModel,
    convert_diff_dit_to_dit,
    convert_dit_to_diff_dit,
    diff_dit_state_dict_to_dit,
    dit_state_dict_to_diff_dit,
)
from .pipeline_diff_dit import DiffDiTPipeline

__all__ = [
    "DIT_PRESETS",
    "DiffDiTBlock",
    "DiffDiTPipeline",
    "DiffDiTTransformer2DModel",
    "convert_diff_dit_to_dit",
    "convert_dit_to_diff_dit",
    "diff_dit_state_dict_to_dit",
    "dit_state_dict_to_diff_dit",
]
