"""diffvision: differential attention for vision models (timm, diffusers, Lightning)."""
from .attention import (
    DifferentialAttention,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    create_attention,
    differential_attention,
)
from .diffusion import DiffDiTPipeline, DiffDiTTransformer2DModel
from . import models  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"

__all__ = [
    "DiffDiTPipeline",
    "DiffDiTTransformer2DModel",
    "DifferentialAttention",
    "GroupedDifferentialAttention",
    "MultiHeadAttention",
    "create_attention",
    "differential_attention",
]
