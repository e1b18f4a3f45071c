"""Attention modules with one interface, so a model swaps attention with one config value.

All three take ``(B, N, dim)`` tokens and return ``(B, N, dim)``, accept timm's ``Block``
constructor keywords (``qkv_bias``, ``qk_norm``, ``scale_norm``, ``proj_bias``, ``attn_drop``,
``proj_drop``, ``norm_layer``, ``depth``, ``device``, ``dtype``) and ``forward(x, attn_mask=None,
is_causal=False)``. Each has exactly a standard MHA's projections: ``qkv: dim -> 3*dim`` and
``proj: dim -> dim``; the differential ones add λ vectors and a per-head RMSNorm scale.
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .functional import _additive_mask, _safe_softmax, differential_attention

__all__ = [
    "lambda_init_schedule",
    "MultiHeadAttention",
    "GroupedDifferentialAttention",
    "DifferentialAttention",
    "ATTENTION_LAYERS",
    "create_attention",
]


def lambda_init_schedule(depth: int) -> float:
    """λinit = 0.8 − 0.6·exp(−0.3·depth), depth 0-based (Ye et al., 2025, Sec. 2.1)."""
    if depth < 0:
        raise ValueError(f"depth must be a 0-based layer index >= 0, got {depth}")
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def _check_divisible(dim: int, by: int, what: str) -> None:
    if by <= 0 or dim % by != 0:
        raise ValueError(f"dim={dim} must be divisible by {what}={by}")


def _softmax_map(q: Tensor, k: Tensor, scale: float, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """softmax(q kᵀ·scale + mask) as an explicit map, in float32 or wider (for the attention_maps
    methods; the masking is the kernel's, so a fully masked row is zeros as in SDPA)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    scores = (q @ k.transpose(-2, -1)) * scale
    bias = _additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], dtype, q.device)
    return _safe_softmax(scores if bias is None else scores + bias)


class MultiHeadAttention(nn.Module):
    """Standard softmax multi-head self-attention (SDPA): the twin of the differential modules."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        depth: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_divisible(dim, num_heads, "num_heads")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.depth = depth
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))

    def attention_maps(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False) -> dict[str, Tensor]:
        """The softmax maps ``forward`` applies to ``x``, for inspection (attention dropout left out).

        Returns ``{"attention": (B, heads, N, N)}`` in float32 (or the input's dtype if wider):
        ``forward(x)`` equals ``proj(norm(merge_heads(attention @ v)))``.
        """
        B, N, C = x.shape
        q, k, _ = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        return {"attention": _softmax_map(q, k, self.head_dim ** -0.5, attn_mask, is_causal)}


class GroupedDifferentialAttention(nn.Module):
    """Grouped Differential Attention: ``signal_heads`` signal maps, ``noise_heads`` noise maps.

    Each noise map is shared by ``signal_heads // noise_heads`` consecutive signal heads (like GQA).
    Widths keep a standard MHA's parameter count: q and k each hold ``signal_heads + noise_heads``
    sub-heads of ``d = dim / (signal_heads + noise_heads)``; v holds ``signal_heads`` heads of
    ``dv = dim / signal_heads``. With ``signal_heads == noise_heads == h`` this is the paper's DIFF
    attention (``d = dim / 2h``, ``dv = 2d``).

    The q/k sub-heads are laid out group by group, ``[s_0 .. s_{G-1}, n]`` per noise head; for DIFF
    that is the official interleaving ``[s_0, n_0, s_1, n_1, ...]``, so a standard MHA with ``2h``
    heads maps onto it weight for weight (standard head ``2i`` = signal ``i``, ``2i+1`` = noise ``i``,
    standard value heads ``2i, 2i+1`` = differential value head ``i``).

    λ = exp(λq1·λk1) − exp(λq2·λk2) + λinit, with λ vectors ~ N(0, 0.1) kept in float32; each head's
    output goes through RMSNorm (learnable scale) and is multiplied by ``1 − λinit``.
    """

    def __init__(
        self,
        dim: int,
        signal_heads: int = 8,
        noise_heads: int = 4,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        depth: int = 0,
        lambda_init: Optional[float] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if signal_heads <= 0 or noise_heads <= 0 or signal_heads % noise_heads != 0:
            raise ValueError(
                f"signal_heads={signal_heads} must be a positive multiple of noise_heads={noise_heads}")
        _check_divisible(dim, signal_heads + noise_heads, "signal_heads + noise_heads")
        _check_divisible(dim, signal_heads, "signal_heads")
        norm_layer = norm_layer or nn.LayerNorm
        self.signal_heads, self.noise_heads = signal_heads, noise_heads
        self.group = signal_heads // noise_heads
        self.head_dim = dim // (signal_heads + noise_heads)
        self.value_head_dim = dim // signal_heads
        self.backend = backend
        self.depth = depth
        self.lambda_init = lambda_init_schedule(depth) if lambda_init is None else float(lambda_init)

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        lam_dd = {"device": device, "dtype": torch.float32}  # λ stays float32, as in the paper
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
        self.sub_norm = nn.RMSNorm(self.value_head_dim, eps=1e-5, **dd)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_lambda()

    def reset_lambda(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def init_weights(self) -> None:
        """Re-draw λ after a model-wide init (e.g. timm's ``init_weights``) touched every param."""
        self.reset_lambda()
        self.sub_norm.reset_parameters()

    def lam(self) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λinit, a scalar in float32 (float64 if the module is)."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        lambda_1 = torch.exp(torch.sum(self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)))
        return lambda_1 - lambda_2 + self.lambda_init

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Project tokens to (q1, k1, q2, k2, v) in the kernel's ``(B, heads, N, dim)`` layout."""
        B, N, C = x.shape
        Hs, Hn, G, d = self.signal_heads, self.noise_heads, self.group, self.head_dim
        q, k, v = self.qkv(x).split([C, C, C], dim=-1)
        q = self.q_norm(q.view(B, N, Hn, G + 1, d))
        k = self.k_norm(k.view(B, N, Hn, G + 1, d))
        # split (not slicing) so the backward assembles the qkv gradient with one cat per tensor
        # instead of a zero-filled full-size buffer per slice; for DIFF (G == 1) all are views.
        q1, q2 = q.split([G, 1], dim=3)
        k1, k2 = k.split([G, 1], dim=3)
        q1 = q1.reshape(B, N, Hs, d).transpose(1, 2)
        k1 = k1.reshape(B, N, Hs, d).transpose(1, 2)
        q2 = q2.squeeze(3).transpose(1, 2)
        k2 = k2.squeeze(3).transpose(1, 2)
        v = v.view(B, N, Hs, self.value_head_dim).transpose(1, 2)
        return q1, k1, q2, k2, v

    def head_norm(self, out: Tensor) -> Tensor:
        """Per-head RMSNorm (learnable scale), then × (1 − λinit): one fused ``rms_norm`` call.

        The scale is folded into the weight and cast to the activations' dtype: with a float32
        weight on bf16 activations (autocast) PyTorch leaves its fused kernel for a slow path.
        """
        weight = (self.sub_norm.weight * (1.0 - self.lambda_init)).to(out.dtype)
        return F.rms_norm(out, (self.value_head_dim,), weight, self.sub_norm.eps)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        q1, k1, q2, k2, v = self.split_qkv(x)
        out = differential_attention(
            q1, k1, q2, k2, v, self.lam(), attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop if self.training else 0.0, backend=self.backend)
        out = self.head_norm(out)
        out = self.norm(out.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(out))

    def attention_maps(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False) -> dict[str, Tensor]:
        """The maps ``forward`` applies to ``x``, for inspection (attention dropout left out).

        Returns float32 tensors (or the input's dtype if wider), maps of shape ``(B, Hs, N, N)``:

        * ``"signal"``: softmax(q1 k1ᵀ·s + mask), one per signal head;
        * ``"noise"``: softmax(q2 k2ᵀ·s + mask), expanded to the signal heads it serves (for GDA,
          signal heads ``i`` with the same ``i // (Hs // Hn)`` share a noise map, unless the mask
          differs per head);
        * ``"difference"``: signal − λ·noise, the map that multiplies v;
        * ``"lambda"``: λ per signal head, shape ``(Hs,)``.

        ``forward(x)`` equals ``proj(norm(merge_heads(head_norm(difference @ v))))``.
        """
        q1, k1, q2, k2, _ = self.split_qkv(x)
        scale = self.head_dim ** -0.5
        signal = _softmax_map(q1, k1, scale, attn_mask, is_causal)
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1:
            # a per-signal-head mask makes each head's noise map its own (as in the kernel)
            q2, k2 = q2.repeat_interleave(self.group, dim=1), k2.repeat_interleave(self.group, dim=1)
            noise = _softmax_map(q2, k2, scale, attn_mask, is_causal)
        else:
            noise = _softmax_map(q2, k2, scale, attn_mask, is_causal).repeat_interleave(self.group, dim=1)
        lam = self.lam().to(signal.dtype).expand(self.signal_heads).clone()
        return {"signal": signal, "noise": noise, "difference": signal - lam.view(1, -1, 1, 1) * noise,
                "lambda": lam}

    def extra_repr(self) -> str:
        return (f"signal_heads={self.signal_heads}, noise_heads={self.noise_heads}, "
                f"head_dim={self.head_dim}, value_head_dim={self.value_head_dim}, "
                f"lambda_init={self.lambda_init:.4f}, backend={self.backend!r}")


class DifferentialAttention(GroupedDifferentialAttention):
    """The paper's DIFF attention with ``num_heads`` differential heads ``h``.

    q and k are projected to ``2h`` sub-heads of ``d = dim / (2h)`` and v to ``h`` heads of ``2d``:
    the same parameters as a standard MHA with ``2h`` heads (plus 4·d λ values and a 2d RMSNorm
    scale). So a DIFF twin of a standard model with ``H`` heads uses ``num_heads = H / 2``.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        _check_divisible(dim, 2 * num_heads, "2 * num_heads")
        super().__init__(dim, signal_heads=num_heads, noise_heads=num_heads, **kwargs)
        self.num_heads = num_heads


ATTENTION_LAYERS: dict[str, type[nn.Module]] = {
    "standard": MultiHeadAttention,
    "diff": DifferentialAttention,
    "gda": GroupedDifferentialAttention,
}


def create_attention(kind: str, dim: int, **kwargs) -> nn.Module:
    """Build an attention layer by name: ``"standard"`` (``num_heads``), ``"diff"`` (``num_heads``
    = differential heads) or ``"gda"`` (``signal_heads``, ``noise_heads``); other kwargs as above."""
    if kind not in ATTENTION_LAYERS:
        raise ValueError(f"unknown attention kind {kind!r}; accepted: {sorted(ATTENTION_LAYERS)}")
    if kind == "standard":
        # Models pass the differential-only settings unconditionally; drop them only while they
        # are at their defaults, so a real setting is never silently ignored.
        lambda_init, backend = kwargs.pop("lambda_init", None), kwargs.pop("backend", "auto")
        if lambda_init is not None or backend != "auto":
            raise ValueError(
                f"attention kind 'standard' takes no lambda_init/backend (got lambda_init={lambda_init!r}, "
                f"backend={backend!r}); they apply to 'diff' and 'gda'")
    return ATTENTION_LAYERS[kind](dim, **kwargs)
