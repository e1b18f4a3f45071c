"""diffvision.models: timm models with differential attention (registered on import)."""
from .diff_vit import (
    DiffBlock,
    DiffVisionTransformer,
    StandardViTMapping,
    checkpoint_filter_fn,
    load_standard_vit_weights,
)

__all__ = [
    "DiffBlock",
    "DiffVisionTransformer",
    "StandardViTMapping",
    "checkpoint_filter_fn",
    "load_standard_vit_weights",
]
