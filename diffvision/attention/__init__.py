"""diffvision.attention: the one differential attention implementation every model uses.

``functional`` holds the kernels, ``maps`` the one mask -> bias rule and softmax-map helper, ``modules`` the softmax layers, ``linear`` the linear-attention layers (LiT, DyDiLA), ``registry`` the attention kinds (the names
``attn_kind`` takes everywhere, their head rules, backends and options).
"""
from .maps import attention_bias, softmax_maps
from .functional import BACKENDS, V2_BACKENDS, available_backends, differential_attention, differential_attention_v2
from .linear import DYDILA_OPTIONS, LINEAR_OPTIONS, DynamicDifferentialLinearAttention, LinearAttention
from .modules import (
    LAMBDA_MODES,
    DifferentialAttention,
    DifferentialAttentionV2,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    lambda_init_schedule,
    resolve_lambda_init,
)
from .registry import (
    ATTN_KINDS,
    LAMBDA_OPTIONS,
    PAPER_OPTIONS,
    VISION_OPTIONS,
    AttnKind,
    attention_layers,
    check_attn_backend,
    create_attention,
    get_attn_kind,
    layer_heads,
    set_attention_backend,
    twin_heads,
)

__all__ = [
    "ATTN_KINDS",
    "LAMBDA_OPTIONS",
    "PAPER_OPTIONS",
    "VISION_OPTIONS",
    "AttnKind",
    "BACKENDS",
    "LAMBDA_MODES",
    "V2_BACKENDS",
    "DifferentialAttention",
    "DifferentialAttentionV2",
    "DYDILA_OPTIONS",
    "DynamicDifferentialLinearAttention",
    "LINEAR_OPTIONS",
    "LinearAttention",
    "GroupedDifferentialAttention",
    "MultiHeadAttention",
    "attention_layers",
    "attention_bias",
    "available_backends",
    "check_attn_backend",
    "create_attention",
    "differential_attention",
    "differential_attention_v2",
    "get_attn_kind",
    "lambda_init_schedule",
    "layer_heads",
    "resolve_lambda_init",
    "set_attention_backend",
    "softmax_maps",
    "twin_heads",
]
