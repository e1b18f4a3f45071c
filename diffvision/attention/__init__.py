"""diffvision.attention: the one differential attention implementation every model uses."""
from .functional import BACKENDS, available_backends, differential_attention
from .modules import (
    ATTENTION_LAYERS,
    DifferentialAttention,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    create_attention,
    lambda_init_schedule,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "differential_attention",
    "ATTENTION_LAYERS",
    "DifferentialAttention",
    "GroupedDifferentialAttention",
    "MultiHeadAttention",
    "create_attention",
    "lambda_init_schedule",
]
