"""Attention maps written out: the one mask -> additive-bias rule and the one softmax-map helper.

Every path that materialises ``softmax(q kᵀ·s + mask)`` (the ``math`` backends, the modules'
``attention_maps``, the Triton kernel's bias input, the attention-map analysis of timm's layers) goes
through these, so masks mean the same thing everywhere: bool True = attend, floats are added, causal is
top-left aligned as in SDPA, and a query row that sees no key gives zeros, not NaN.

They are written in TorchScript's subset of Python, with ops every ONNX exporter knows (``x == -inf``,
not ``torch.isneginf``, which the TorchScript-based exporter lacks): scripted and exported layers use them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["attention_bias", "no_key_rows", "safe_softmax", "softmax_maps"]


def attention_bias(attn_mask: Optional[Tensor], is_causal: bool, N: int, M: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """``attn_mask`` (or the causal mask of ``N`` queries on ``M`` keys) as an additive bias in ``dtype``:
    bool True -> 0, False -> -inf; a float mask is cast. ``None`` when there is no mask."""
    if is_causal:
        attn_mask = torch.ones(N, M, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def safe_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim; a row masked out entirely gives zeros (as SDPA does), not NaN,
    and zero gradients: the row is made finite before the softmax so its backward is finite too."""
    fully_masked = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=-1)
    return probs.masked_fill(fully_masked, 0.0)


def softmax_maps(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """softmax(q kᵀ·scale + bias) as explicit maps; a row with no visible key is zeros (``safe_softmax``)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    return safe_softmax(scores if bias is None else scores + bias)


def no_key_rows(attn_mask: Tensor) -> Tensor:
    """True where a query row sees no key at all (its output is defined as zeros, as in SDPA)."""
    return ~attn_mask.any(dim=-1) if attn_mask.dtype == torch.bool else (attn_mask == float("-inf")).all(dim=-1)
