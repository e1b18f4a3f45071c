"""diffvision.models: timm models with differential attention (registered on import)."""
from ..checkpoints import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint_file
from .diff_vit import (
    DiffBlock,
    DiffVisionTransformer,
    StandardViTMapping,
    checkpoint_filter_fn,
    load_standard_vit_weights,
    twin_model,
)

__all__ = [
    "CorruptCheckpointError",
    "DiffBlock",
    "DiffVisionTransformer",
    "StandardViTMapping",
    "UnsafeCheckpointError",
    "checkpoint_filter_fn",
    "load_checkpoint_file",
    "load_standard_vit_weights",
    "twin_model",
]
