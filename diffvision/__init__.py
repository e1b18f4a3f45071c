"""diffvision: differential attention for vision models (timm, diffusers, Lightning).

``import diffvision`` registers the timm models (``timm.create_model("diff_vit_small_patch16_224")``)
and gives the attention kernels and layers. The diffusers classes (``DiffDiTPipeline``,
``DiffDiTTransformer2DModel``) are imported on first use, so ``import diffvision.attention`` does not
import diffusers.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import models  # noqa: F401  (registers the timm models)
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

__version__ = "0.1.0"

_LAZY = {"DiffDiTPipeline": "diffvision.diffusion", "DiffDiTTransformer2DModel": "diffvision.diffusion"}

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


def __getattr__(name: str) -> Any:
    # PEP 562: the diffusers classes load when first named, not when diffvision is imported
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffvision' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
