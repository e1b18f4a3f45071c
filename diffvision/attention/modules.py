"""Attention modules with one interface, so a model swaps attention with one config value.

All take ``(B, N, dim)`` tokens and return ``(B, N, dim)``, accept timm's ``Block`` constructor
keywords (``qkv_bias``, ``qk_norm``, ``scale_norm``, ``proj_bias``, ``attn_drop``, ``proj_drop``,
``norm_layer``, ``depth``, ``device``, ``dtype``) and ``forward(x, attn_mask=None, is_causal=False)``,
and name their kind in ``attn_kind`` (the registry key, :mod:`diffvision.attention.registry`). At their
default (parameter-matched) layouts each has exactly a standard MHA's projections, ``qkv: dim -> 3*dim``
and ``proj: dim -> dim``; DIFF / GDA add λ (vectors, a scalar per head, or nothing) and a per-head
RMSNorm scale, DIFF V2 a ``dim -> h`` λ projection.

The layers compile with ``torch.jit.script`` (their ``forward`` calls the kernels' positional, unchecked
form there) and export to ONNX with either exporter (:func:`~diffvision.attention.functional.exporting`
picks the export-friendly ops).
"""
from __future__ import annotations

import math
from typing import Optional, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..choices import check_choice
from .functional import (
    differential_attention,
    differential_attention_unchecked,
    differential_attention_v2,
    differential_attention_v2_unchecked,
    exporting,
)
from .maps import attention_bias, softmax_maps

__all__ = [
    "LAMBDA_MODES",
    "lambda_init_schedule",
    "resolve_lambda_init",
    "MultiHeadAttention",
    "GroupedDifferentialAttention",
    "DifferentialAttention",
    "DifferentialAttentionV2",
]

# How DIFF / GDA get λ: the paper's re-parameterisation exp(λq1·λk1) − exp(λq2·λk2) + λinit, a constant
# λ = λinit (no parameter), or one learnable scalar per head initialised to λinit.
LAMBDA_MODES = ("reparam", "fixed", "scalar")


def lambda_init_schedule(depth: int) -> float:
    """λinit = 0.8 − 0.6·exp(−0.3·depth), depth 0-based (Ye et al., 2025, Sec. 2.1)."""
    if depth < 0:
        raise ValueError(f"depth must be a 0-based layer index >= 0, got {depth}")
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def resolve_lambda_init(lambda_init, depth: int) -> float:
    """The λinit of the layer at ``depth``: ``"schedule"`` (or ``None``, the setting's old spelling) is the
    paper's depth rule, a number is a constant."""
    if lambda_init is None or lambda_init == "schedule":
        return lambda_init_schedule(depth)
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)) or not math.isfinite(lambda_init):
        raise ValueError(f"lambda_init must be a finite number or 'schedule' (the paper's depth rule "
                         f"0.8 - 0.6*exp(-0.3*depth)), got {lambda_init!r}")
    return float(lambda_init)


def _check_divisible(dim: int, by: int, what: str) -> None:
    if by <= 0 or dim % by != 0:
        raise ValueError(f"dim={dim} must be divisible by {what}={by}")


def _rms_norm_written_out(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``F.rms_norm`` over the last dim in elementary ops (as PyTorch computes it: in float32 or wider, cast
    back, then scaled): the TorchScript-based ONNX exporter has no ``aten::rms_norm``."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def _softmax_map(q: Tensor, k: Tensor, scale: float, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """softmax(q kᵀ·scale + mask) as an explicit map, in float32 or wider (for the attention_maps
    methods; the masking is the kernel's, so a fully masked row is zeros as in SDPA)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    return softmax_maps(q, k, scale, attention_bias(attn_mask, is_causal, q.shape[-2], k.shape[-2], dtype, q.device))


class MultiHeadAttention(nn.Module):
    """Standard softmax multi-head self-attention (SDPA): the twin of the differential modules."""

    attn_kind = "standard"
    __jit_unused_properties__ = ["layout"]  # Python-only: torch.jit.script leaves it out

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
        # unbind: TorchScript cannot unpack a tensor
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
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

    @property
    def layout(self) -> dict:
        return {"attn_kind": self.attn_kind, "num_heads": self.num_heads, "head_dim": self.head_dim}


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

    λ and the head norm (the paper's choices are the defaults):

    * ``lambda_init``: λinit, a number or ``"schedule"`` (the paper's ``0.8 − 0.6·exp(−0.3·depth)``);
    * ``lambda_mode``: ``"reparam"`` λ = exp(λq1·λk1) − exp(λq2·λk2) + λinit with four λ vectors of ``d``
      ~ N(0, 0.1); ``"scalar"`` one learnable λ per signal head, initialised to λinit; ``"fixed"``
      λ = λinit, no λ parameter. λ parameters are kept in float32, as in the paper;
    * ``head_norm``: each head's output goes through RMSNorm (learnable scale) and is multiplied by
      ``1 − λinit`` (``True``), or through neither (``False``).
    """

    attn_kind = "gda"
    __jit_unused_properties__ = ["head_norm_enabled", "layout"]  # Python-only: torch.jit.script leaves them out

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
        lambda_init: Union[float, str, None] = "schedule",
        lambda_mode: str = "reparam",
        head_norm: bool = True,
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
        if not isinstance(head_norm, bool):
            raise ValueError(f"head_norm must be True or False, got {head_norm!r}")
        norm_layer = norm_layer or nn.LayerNorm
        self.signal_heads, self.noise_heads = signal_heads, noise_heads
        self.group = signal_heads // noise_heads
        self.head_dim = dim // (signal_heads + noise_heads)
        self.value_head_dim = dim // signal_heads
        self.backend = backend
        self.depth = depth
        self.lambda_init = resolve_lambda_init(lambda_init, depth)
        self.lambda_mode = check_choice("lambda_mode", lambda_mode, LAMBDA_MODES)

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        lam_dd = {"device": device, "dtype": torch.float32}  # λ stays float32, as in the paper
        if self.lambda_mode == "reparam":
            self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
            self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
            self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
            self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim, **lam_dd))
        elif self.lambda_mode == "scalar":
            self.lambda_scalar = nn.Parameter(torch.empty(signal_heads, **lam_dd))
        self.sub_norm = nn.RMSNorm(self.value_head_dim, eps=1e-5, **dd) if head_norm else None
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_lambda()

    @property
    def head_norm_enabled(self) -> bool:
        return self.sub_norm is not None

    def reset_lambda(self) -> None:
        if self.lambda_mode == "reparam":
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                nn.init.normal_(p, mean=0.0, std=0.1)
        elif self.lambda_mode == "scalar":
            nn.init.constant_(self.lambda_scalar, self.lambda_init)

    def init_weights(self) -> None:
        """Re-draw λ after a model-wide init (e.g. timm's ``init_weights``) touched every param."""
        self.reset_lambda()
        if self.sub_norm is not None:
            self.sub_norm.reset_parameters()

    def lam(self) -> Tensor:
        """λ in float32 (float64 if the module is): a 0-d tensor (``reparam``, ``fixed``) or one per signal
        head (``scalar``)."""
        dtype = torch.promote_types(self.qkv.weight.dtype, torch.float32)
        # The mode read from which λ parameters exist: torch.jit.script resolves hasattr while compiling, so
        # it never compiles a branch that reads a parameter this layer's mode lacks.
        if hasattr(self, "lambda_scalar"):  # "scalar"
            return self.lambda_scalar.to(dtype)
        if hasattr(self, "lambda_q1"):  # "reparam"
            lambda_1 = torch.exp(torch.sum(self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)))
            lambda_2 = torch.exp(torch.sum(self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)))
            return lambda_1 - lambda_2 + self.lambda_init
        return torch.full((), self.lambda_init, dtype=dtype, device=self.qkv.weight.device)  # "fixed"

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Project tokens to (q1, k1, q2, k2, v) in the kernel's ``(B, heads, N, dim)`` layout."""
        B, N, C = x.shape
        Hs, Hn, G, d = self.signal_heads, self.noise_heads, self.group, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # q, k, v of the attention's width (not necessarily C)
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
        """Per-head RMSNorm (learnable scale), then × (1 − λinit): one fused ``rms_norm`` call (written out
        in elementary ops while exporting); the identity with ``head_norm=False``.

        The scale is folded into the weight and cast to the activations' dtype: with a float32
        weight on bf16 activations (autocast) PyTorch leaves its fused kernel for a slow path.
        """
        if self.sub_norm is None:
            return out
        weight = (self.sub_norm.weight * (1.0 - self.lambda_init)).to(out.dtype)
        eps = self.sub_norm.eps  # 1e-5, set in __init__ (None would mean the dtype's machine epsilon)
        if exporting() and eps is not None:
            return _rms_norm_written_out(out, weight, eps)
        return F.rms_norm(out, (self.value_head_dim,), weight, eps)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        q1, k1, q2, k2, v = self.split_qkv(x)
        dropout_p = self.attn_drop if self.training else 0.0
        if torch.jit.is_scripting():  # TorchScript compiles neither keyword-only arguments nor the checks
            out = differential_attention_unchecked(
                q1, k1, q2, k2, v, self.lam(), attn_mask, is_causal, dropout_p, None, self.backend)
        else:
            out = differential_attention(q1, k1, q2, k2, v, self.lam(), attn_mask=attn_mask, is_causal=is_causal,
                                         dropout_p=dropout_p, backend=self.backend)
        # Heads back to the token layout first, then the per-head norm (over the last dim, so the order does
        # not change the result): the Triton kernel writes (B, N, heads, dv) in memory and the SDPA path
        # inherits SDPA's layout, so the transpose is contiguous and the norm and the merge copy nothing; the
        # norm before the transpose made one copy in the fused norm and another in the merge.
        out = self.head_norm(out.transpose(1, 2))
        out = self.norm(out.reshape(B, N, -1))
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

    @property
    def layout(self) -> dict:
        return {"attn_kind": self.attn_kind, "signal_heads": self.signal_heads, "noise_heads": self.noise_heads,
                "head_dim": self.head_dim, "value_head_dim": self.value_head_dim,
                "lambda_init": self.lambda_init, "lambda_mode": self.lambda_mode,
                "head_norm": self.head_norm_enabled, "backend": self.backend}

    def extra_repr(self) -> str:
        return (f"signal_heads={self.signal_heads}, noise_heads={self.noise_heads}, "
                f"head_dim={self.head_dim}, value_head_dim={self.value_head_dim}, "
                f"lambda_init={self.lambda_init:.4f}, lambda_mode={self.lambda_mode!r}, "
                f"head_norm={self.head_norm_enabled}, backend={self.backend!r}")


class DifferentialAttention(GroupedDifferentialAttention):
    """The paper's DIFF attention with ``num_heads`` differential heads ``h``.

    q and k are projected to ``2h`` sub-heads of ``d = dim / (2h)`` and v to ``h`` heads of ``2d``:
    the same parameters as a standard MHA with ``2h`` heads (plus, by default, 4·d λ values and a 2d
    RMSNorm scale). So a DIFF twin of a standard model with ``H`` heads uses ``num_heads = H / 2``.
    """

    attn_kind = "diff"

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        _check_divisible(dim, 2 * num_heads, "2 * num_heads")
        super().__init__(dim, signal_heads=num_heads, noise_heads=num_heads, **kwargs)
        self.num_heads = num_heads

    @property
    def layout(self) -> dict:
        return {**super().layout, "num_heads": self.num_heads}


class DifferentialAttentionV2(nn.Module):
    """DIFF V2 (Ye et al., 2026; microsoft/unilm ``Diff-Transformer/Diff-Transformer-V2``).

    ``2h`` query heads and ``h_kv`` key/value heads of ``d`` (GQA), one attention call
    (:func:`~diffvision.attention.differential_attention_v2`), output head ``i`` =
    ``A(q_2i) − σ(λ_i(x))·A(q_2i+1)`` with ``λ(x) = W_λ x`` (``dim -> h``, no bias) per token and head; no
    per-head norm, no ``(1 − λinit)`` factor; the output projection takes ``h·d``.

    Projections are one fused ``qkv: dim -> (2h + 2·h_kv)·d`` (queries, then keys, then values) and
    ``proj: h·d -> dim``. The default layout is parameter-matched to a standard MHA with ``h`` heads of
    ``d = dim / h``: ``h_kv = h / 2`` gives ``qkv: dim -> 3·dim`` and ``proj: dim -> dim`` (4·dim² weights, as
    the twin), plus ``dim·h`` for ``W_λ``. ``num_kv_heads`` (a divisor of ``h``) and ``head_dim`` can be set
    freely, as the official code allows, at other parameter counts.

    ``W_λ`` is initialised as the official code's ``nn.Linear`` (``init_weights`` re-draws it after a
    model-wide init), so λ starts around σ(0) = 0.5 whatever the model's own init.
    """

    attn_kind = "diffv2"
    __jit_unused_properties__ = ["layout"]  # Python-only: torch.jit.script leaves it out

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        depth: int = 0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int (output heads h), got {num_heads!r}")
        if head_dim is None:
            _check_divisible(dim, num_heads, "num_heads")
            head_dim = dim // num_heads
        if num_kv_heads is None:
            if num_heads % 2 != 0:
                raise ValueError(
                    f"num_heads={num_heads} is odd: the parameter-matched layout uses num_kv_heads = num_heads/2; "
                    f"pass an even num_heads, or num_kv_heads (a divisor of {num_heads})")
            num_kv_heads = num_heads // 2
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
                or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads={num_kv_heads!r} must divide num_heads={num_heads}: the 2h={2 * num_heads} query "
                f"heads form groups of 2h/h_kv per key/value head, and each subtracted pair 2i, 2i+1 must share one")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.backend = backend
        self.depth = depth
        self.qkv = nn.Linear(dim, (2 * num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.lambda_proj = nn.Linear(dim, num_heads, bias=False, **dd)
        self.norm = norm_layer(num_heads * head_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_weights(self) -> None:
        """Re-draw ``W_λ`` as the official code's ``nn.Linear`` after a model-wide init."""
        self.lambda_proj.reset_parameters()

    def qkv_from_standard(self, tensor: Tensor) -> Tensor:
        """This layer's ``qkv.weight`` (or ``qkv.bias``) built from a standard MHA's with ``h`` heads of
        ``head_dim`` (GQA-style, Ainslie et al. 2023): query head ``2i`` (the signal of output head ``i``) is
        standard query head ``i``; query head ``2i+1`` (its noise) keeps this layer's current values;
        key/value head ``g`` is the mean of the ``h / h_kv`` standard key/value heads of its group, which
        are exactly the output heads that read it. The standard ``proj`` (``h·d -> dim``) fits as it is."""
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        own = self.qkv.weight if tensor.dim() == 2 else self.qkv.bias
        if own is None or tensor.shape != (3 * h * d, *own.shape[1:]):
            want = "nothing (this layer's qkv has no bias)" if own is None else f"shape {(3 * h * d, *own.shape[1:])}"
            raise ValueError(f"a standard MHA qkv tensor for this layer ({h} heads of {d}) has {want}, got "
                             f"shape {tuple(tensor.shape)}")
        own = own.detach()
        rest = tensor.shape[1:]
        q, k, v = tensor.split(h * d)
        new_q = own[:2 * h * d].clone().view(2 * h, d, *rest)
        new_q[0::2] = q.view(h, d, *rest).to(own)
        pooled = [t.view(hkv, h // hkv, d, *rest).mean(dim=1).reshape(hkv * d, *rest).to(own) for t in (k, v)]
        return torch.cat([new_q.reshape(2 * h * d, *rest), *pooled])

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project tokens to q ``(B, 2h, N, d)``, k and v ``(B, h_kv, N, d)``."""
        B, N, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([2 * h * d, hkv * d, hkv * d], dim=-1)
        q = self.q_norm(q.view(B, N, 2 * h, d)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, hkv, d)).transpose(1, 2)
        return q, k, v.view(B, N, hkv, d).transpose(1, 2)

    def lam(self, x: Tensor) -> Tensor:
        """λ = σ(W_λ x), one per output head and token: ``(B, h, N)``."""
        return torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.split_qkv(x)
        dropout_p = self.attn_drop if self.training else 0.0
        if torch.jit.is_scripting():  # TorchScript compiles neither keyword-only arguments nor the checks
            out = differential_attention_v2_unchecked(q, k, v, self.lam(x), attn_mask, is_causal, dropout_p, None,
                                                      self.backend)
        else:
            out = differential_attention_v2(q, k, v, self.lam(x), attn_mask=attn_mask, is_causal=is_causal,
                                            dropout_p=dropout_p, backend=self.backend)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        return self.proj_drop(self.proj(out))

    def attention_maps(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False) -> dict[str, Tensor]:
        """The maps ``forward`` applies to ``x``, for inspection (attention dropout left out).

        Float32 tensors (or the input's dtype if wider); maps of shape ``(B, h, N, M)``:

        * ``"signal"``: the softmax map of query head ``2i`` (output head ``i``);
        * ``"noise"``: the softmax map of query head ``2i+1`` (same key head);
        * ``"difference"``: signal − λ·noise, λ per query token, the map that multiplies v;
        * ``"lambda"``: λ = σ(W_λ x), ``(B, h, N)``: one per output head and token.

        ``forward(x)`` equals ``proj(norm(merge_heads(difference @ v_g)))``, ``g`` the pair's key/value head.
        """
        q, k, _ = self.split_qkv(x)
        maps = _softmax_map(q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1), self.head_dim ** -0.5,
                            attn_mask, is_causal)
        signal, noise = maps[:, 0::2], maps[:, 1::2]
        lam = self.lam(x).to(maps.dtype)
        return {"signal": signal, "noise": noise, "difference": signal - lam.unsqueeze(-1) * noise, "lambda": lam}

    @property
    def layout(self) -> dict:
        return {"attn_kind": self.attn_kind, "num_heads": self.num_heads, "query_heads": 2 * self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "backend": self.backend}

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads} (query heads {2 * self.num_heads}), num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, backend={self.backend!r}")


