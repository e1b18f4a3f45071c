"""diffvision: differential attention for vision models (timm, diffusers, Lightning)."""
from .attention import (
    DifferentialAttention,
    DifferentialAttentionV2,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    create_attention,
    differential_attention,
    differential_attention_v2,
    set_attention_backend,
)
from .diffusion import DiffDiTPipeline, DiffDiTTransformer2DModel
from . import models  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"

__all__ = [
    "DiffDiTPipeline",
    "DiffDiTTransformer2DModel",
    "DifferentialAttention",
    "DifferentialAttentionV2",
    "GroupedDifferentialAttention",
    "MultiHeadAttention",
    "create_attention",
    "differential_attention",
    "differential_attention_v2",
    "set_attention_backend",
]
