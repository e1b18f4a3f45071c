"""Attention maps out of a model's attention layers, and the measures taken on their rows.

* ``attention_maps_of``: the maps a layer applies to its values: diffvision's layers give their own
  (``attention``; or ``signal``, ``noise``, ``difference`` and ``lambda`` for the differential kinds),
  timm's ``Attention`` its softmax map, with the package's one mask rule (``diffvision.attention.maps``).
* ``AttentionRecorder``: forward pre-hooks that keep each chosen block's attention input, so the maps
  are computed from exactly what the model's forward saw.
* ``query_rows`` / ``patch_rows``: the class token's row (or the mean over patch queries for models
  without one), over all keys or over the patches only.
* ``entropy``, ``top_k_mass``, ``to_distribution``, ``measure_rows``: the summary measures. Entropy and
  top-k mass are taken on a row restricted to the patches and renormalised to sum to 1; a difference
  map (signal − λ·noise, with negative entries) becomes a distribution by its normalised positive part
  (``positive``) or ``|d| / Σ|d|`` (``abs``).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from diffvision.attention.maps import attention_bias, softmax_maps

__all__ = [
    "DIFFERENCE_MODES", "AttentionRecorder", "attention_maps_of", "entropy", "map_names", "measure_rows",
    "num_top_k", "patch_rows", "query_rows", "to_distribution", "top_k_mass",
]

DIFFERENCE_MODES = ("positive", "abs")


# ---------------------------------------------------------------------------------------------
# Measures on attention rows
# ---------------------------------------------------------------------------------------------

def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of distributions along ``dim``, with 0·log 0 = 0."""
    p = p.double()
    return torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim)


def top_k_mass(p: Tensor, k: int, dim: int = -1) -> Tensor:
    """Mass of distributions along ``dim`` on their ``k`` largest entries."""
    if not 1 <= k <= p.shape[dim]:
        raise ValueError(f"k must be in [1, {p.shape[dim]}] (the number of entries), got {k}")
    return p.double().topk(k, dim=dim).values.sum(dim)


def num_top_k(num_patches: int, fraction: float = 0.05) -> int:
    """k = fraction of the patches, rounded, at least 1."""
    return max(1, min(num_patches, int(round(fraction * num_patches))))


def to_distribution(row: Tensor, mode: str = "renormalize") -> Tensor:
    """Rows over the patches -> distributions (sum 1 along the last dim); NaN where nothing is left.

    ``renormalize``: a non-negative (softmax) row divided by its sum; ``positive``: the positive
    part ``max(row, 0)`` normalised; ``abs``: ``|row|`` normalised.
    """
    row = row.double()
    if mode == "renormalize":
        if (row < 0).any():
            raise ValueError("mode 'renormalize' takes non-negative rows; use 'positive' or 'abs' for differences")
    elif mode == "positive":
        row = row.clamp_min(0)
    elif mode == "abs":
        row = row.abs()
    else:
        raise ValueError(f"unknown mode {mode!r}; accepted: 'renormalize', 'positive', 'abs'")
    total = row.sum(-1, keepdim=True)
    return torch.where(total > 0, row / total.clamp_min(1e-300), torch.full_like(row, math.nan))


# ---------------------------------------------------------------------------------------------
# Maps out of attention modules
# ---------------------------------------------------------------------------------------------

def _timm_attention_maps(attn: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                         is_causal: bool = False) -> dict[str, Tensor]:
    """The softmax map of timm's ``Attention`` (what its forward applies to v), in float32 or wider."""
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dtype = torch.promote_types(q.dtype, torch.float32)
    bias = attention_bias(attn_mask, is_causal, N, N, dtype, x.device)
    return {"attention": softmax_maps(q.to(dtype), k.to(dtype), attn.scale, bias)}


def attention_maps_of(attn: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False) -> dict[str, Tensor]:
    """``attn.attention_maps`` for diffvision's modules, the same for timm's ``Attention``."""
    if hasattr(attn, "attention_maps"):
        return attn.attention_maps(x, attn_mask=attn_mask, is_causal=is_causal)
    from timm.layers import Attention
    if isinstance(attn, Attention):
        return _timm_attention_maps(attn, x, attn_mask, is_causal)
    raise TypeError(f"cannot read attention maps from {type(attn).__name__}; accepted: diffvision's attention "
                    f"layers (diffvision.attention.ATTN_KINDS) and timm's Attention")


def map_names(kind: str) -> tuple[str, ...]:
    """The maps an attention kind gives (``lambda`` aside)."""
    return ("attention",) if kind == "standard" else ("signal", "noise", "difference")


def query_rows(maps: Tensor, num_prefix: int, query: str = "cls") -> Tensor:
    """(B, H, N, N) maps -> (B, H, N) attention rows over all keys: the class token's row (``cls``) or
    the mean over the patch queries (``mean``, for models without a class token)."""
    if query == "cls":
        if num_prefix < 1:
            raise ValueError("query 'cls' needs a class token (num_prefix >= 1)")
        return maps[:, :, 0, :]
    if query == "mean":
        return maps[:, :, num_prefix:, :].mean(2)
    raise ValueError(f"unknown query {query!r}; accepted: 'cls', 'mean'")


def patch_rows(maps: Tensor, num_prefix: int, query: str = "cls") -> Tensor:
    """(B, H, N, N) maps -> (B, H, P) query rows over the P patches (class / register columns dropped)."""
    return query_rows(maps, num_prefix, query)[..., num_prefix:]


def measure_rows(maps: dict[str, Tensor], num_prefix: int, query: str, k: int,
                 difference_mode: str = "positive") -> dict[str, dict[str, Tensor]]:
    """Per map: (B, H) entropy, top-k mass, prefix mass and (difference) negative fraction."""
    out = {}
    for name, full in maps.items():
        if name == "lambda":
            continue
        row = query_rows(full, num_prefix, query)
        patches = row[..., num_prefix:]
        mode = difference_mode if name == "difference" else "renormalize"
        p = to_distribution(patches, mode)
        stats = {"entropy": entropy(p), "top_k_mass": top_k_mass(p, k),
                 "prefix_mass": row[..., :num_prefix].double().sum(-1)}
        if name == "difference":
            absolute = patches.double().abs().sum(-1)
            stats["negative_fraction"] = patches.double().clamp_max(0).abs().sum(-1) / absolute.clamp_min(1e-300)
        out[name] = stats
    return out


class AttentionRecorder:
    """Forward pre-hooks on ``model.blocks[i].attn``: keep each chosen layer's attention input."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self.inputs: dict[int, tuple[Tensor, Optional[Tensor], bool]] = {}
        self.handles = [model.blocks[i].attn.register_forward_pre_hook(partial(self._hook, i), with_kwargs=True)
                        for i in layers]

    def _hook(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        is_causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
        self.inputs[layer] = (x.detach(), attn_mask, bool(is_causal))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> "AttentionRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
