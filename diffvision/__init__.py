"""diffvision: differential attention for vision models (timm, diffusers, Lightning)."""
from .attention import (
    DifferentialAttention,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    create_attention,
    differential_attention,
)

__version__ = "0.1.0"

__all__ = [
    "DifferentialAttention",
    "GroupedDifferentialAttention",
    "MultiHeadAttention",
    "create_attention",
    "differential_attention",
]
