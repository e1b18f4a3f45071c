"""ESPFormer's cats-vs-dogs ViT and its "DiffTransformer" attention, rebuilt for one experiment (issue 17).

**An experiment replica, not the Differential Transformer paper's module** and not one of diffvision's
attention kinds (it is in no registry of ``diffvision.attention``). It rebuilds, from a reading of the
public repository Anon4142/ESPFormer (``experiments/catsdogs/vit.py``, ``attentions/dif.py``,
``attentions/vanilla.py``), what that repository trains and reports as "Transformer" and
"DiffTransformer", so that the reported gap can be reproduced and taken apart. Every way in which its
differential attention departs from the paper (Ye et al., arXiv:2410.05258) is a named switch of
:class:`ESPFormerDifAttention`; the defaults (``ESPFORMER_SWITCHES``) are ESPFormer's:

======================  ===================  ====================================================================
switch                  ESPFormer            the other setting
======================  ===================  ====================================================================
``widen``               ``True``: q/k        ``False``: parameter-matched, the baseline's projections (q, k, v
                        ``dim -> 2·H·dim``   ``dim -> H·dim_head``, out ``H·dim_head -> dim``): each head's two
                        (128 -> 2048), v     maps are ``dim_head/2`` wide, its value ``dim_head`` (the paper's
                        ``dim -> H·dim``     layout)
                        (128 -> 1024)
``view_split``          ``True``: heads cut  ``False``: the usual split, ``(B, N, H, w) -> (B, H, N, w)``, every
                        by a ``.view`` to    head sees every token; heads merged back the same way
                        ``(B, H, N, w)``
                        without a transpose
``lambda_init``         ``"uniform"``: one   a number: λinit (and the learnable λ's start) set to it
                        λinit per layer
                        ~ U(0, 1); λ one
                        learnable scalar
                        starting there, no
                        re-parameterisation
``lambda_init_in_state`` ``False``: λinit a  ``True``: a buffer, saved and restored with the weights
                        plain attribute, not
                        in the state dict
``head_norm``           ``"group"``:         ``"rms"``: per-head, per-token RMSNorm (the paper's), or ``"none"``
                        GroupNorm(H, H) over (no norm, no ``(1 − λinit)`` factor)
                        all tokens and
                        features of a head,
                        then × (1 − λinit)
``attn_drop``           ``0.1`` on the       ``0.0`` (the baseline has no dropout)
                        difference map
``qkv_bias``            ``True``             ``False`` (the baseline's q/k/v have none; out has a bias in both)
``scale``               ``"dim_head"``:      ``"width"``: 1/sqrt(width of the maps' q/k)
                        1/sqrt(64) whatever
                        the maps' width
======================  ===================  ====================================================================

What the ``.view`` split does: the ``(B, N, H·w)`` projections are reinterpreted as ``(B, H, N, w)``, so
"head" ``h``, "token" ``m`` is the ``(h·N + m) mod H``-th ``w``-chunk of token ``(h·N + m) // H``: each head
attends within a group of about ``N/H`` consecutive tokens (8 of 65 at 32 px / patch 4, 25 of 197 at 224 /
16), each token appearing as ``H`` chunks. The head outputs are put back by a transpose and another
``.view``, which does not undo the first, so a token's output comes from other tokens' queries
(:func:`view_split_source` gives the map).

:class:`ESPFormerViT` (timm name ``espformer_vit_patch4_32``, registered when this module is imported:
:mod:`diffvision.lightning.classifier` imports it the first time a ``espformer_*`` name is asked for) is
ESPFormer's ViT: pre-norm blocks of width 128, depth 6, MLP 128 (ratio 1), CLS pooling, no dropout,
PyTorch's default initialisation (``init="espformer"``: Linear / LayerNorm defaults, position embedding and
class token ~ N(0, 1)), with one of three attentions:

* ``attention="standard"``: ESPFormer's baseline, softmax MHA with ``H = 8`` heads of ``dim_head = 64``
  (inner width 512), no q/k/v bias (timm's ``Attention``);
* ``attention="replica"``: :class:`ESPFormerDifAttention`, switches in ``replica={...}``;
* ``attention="diff"``: diffvision's DIFF (:class:`~diffvision.attention.DifferentialAttention`, the vision
  defaults) at the baseline's projections: ``H/2`` differential heads, q/k ``H`` sub-heads of ``dim_head``,
  v ``H/2`` heads of ``2·dim_head`` (the same parameters as the baseline, + the head-norm scales).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..attention import VISION_OPTIONS, DifferentialAttention
from ..choices import check_choice

__all__ = ["ATTENTIONS", "ESPFORMER_SWITCHES", "ESPFormerDifAttention", "ESPFormerViT", "ReplicaLambdaMonitor",
           "WideDifferentialAttention", "view_split_source"]

# ESPFormer's settings of every switch of the replica
ESPFORMER_SWITCHES: dict[str, Any] = dict(widen=True, view_split=True, lambda_init="uniform",
                                          lambda_init_in_state=False, head_norm="group", attn_drop=0.1,
                                          qkv_bias=True, scale="dim_head")
HEAD_NORMS = ("group", "rms", "none")
SCALES = ("dim_head", "width")
ATTENTIONS = ("standard", "replica", "diff")
INITS = ("espformer", "timm")


def view_split_source(num_tokens: int, num_heads: int, head: int, position: int) -> tuple[int, int]:
    """(token, chunk) of the input that the ``.view`` split puts at (``head``, ``position``): the
    ``(B, N, H·w)`` memory read as ``(B, H, N, w)``."""
    flat = head * num_tokens + position
    return flat // num_heads, flat % num_heads


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class ESPFormerDifAttention(nn.Module):
    """ESPFormer's "DiffTransformer" attention (see the module docstring), each departure a switch.

    Head ``i``: ``(softmax(q1 k1ᵀ·s) − λ·softmax(q2 k2ᵀ·s)) v``, dropout on the difference map, the head
    norm, × (1 − λinit), heads concatenated and projected back to ``dim``. q and k of a head are ``2w``
    wide, ``q1``/``k1`` their first ``w`` features, ``q2``/``k2`` the rest.
    """

    def __init__(self, dim: int, num_heads: int = 8, dim_head: int = 64, *, widen: bool = True,
                 view_split: bool = True, lambda_init="uniform", lambda_init_in_state: bool = False,
                 head_norm: str = "group", attn_drop: float = 0.1, qkv_bias: bool = True,
                 scale: str = "dim_head") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("dim_head", dim_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.widen = _check_bool("widen", widen)
        self.view_split = _check_bool("view_split", view_split)
        self.head_norm = check_choice("head_norm", head_norm, HEAD_NORMS)
        self.scale_rule = check_choice("scale", scale, SCALES)
        if not widen and dim_head % 2:
            raise ValueError(f"widen=False splits each head's dim_head={dim_head} into two maps: it must be even")
        if isinstance(attn_drop, bool) or not isinstance(attn_drop, (int, float)) or not 0 <= attn_drop < 1:
            raise ValueError(f"attn_drop must be a number in [0, 1), got {attn_drop!r}")
        self.num_heads = num_heads
        # one map's q/k width per head, and a head's value width
        self.width = dim if widen else dim_head // 2
        self.value_width = dim if widen else dim_head
        self.scale = dim_head ** -0.5 if scale == "dim_head" else self.width ** -0.5
        H = num_heads
        self.q_proj = nn.Linear(dim, 2 * H * self.width, bias=_check_bool("qkv_bias", qkv_bias))
        self.k_proj = nn.Linear(dim, 2 * H * self.width, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, H * self.value_width, bias=qkv_bias)
        self.out_proj = nn.Linear(H * self.value_width, dim)
        self.attn_drop = nn.Dropout(float(attn_drop))
        if head_norm == "group":
            self.norm = nn.GroupNorm(H, H)  # a head is one group: its mean / variance over all tokens and features
        elif head_norm == "rms":
            self.norm = nn.RMSNorm(self.value_width, eps=1e-5)
        else:
            self.norm = None
        start = self._draw_lambda_init(lambda_init)
        if _check_bool("lambda_init_in_state", lambda_init_in_state):
            self.register_buffer("lambda_init", torch.tensor(start))
        else:
            # ESPFormer: a plain attribute, so a reload draws it again (the CLI seeds before it builds the model, so a
            # resumed run draws the same value)
            self.lambda_init = start
        self.lam = nn.Parameter(torch.tensor([start]))

    @staticmethod
    def _draw_lambda_init(lambda_init) -> float:
        if lambda_init == "uniform":
            return float(torch.rand(()))  # from the global RNG, as ESPFormer's torch.rand(1)
        if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)) or not math.isfinite(lambda_init):
            raise ValueError(f"lambda_init must be 'uniform' (ESPFormer: one draw from U(0, 1)) or a finite number, "
                             f"got {lambda_init!r}")
        return float(lambda_init)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, H·w)`` -> ``(B, H, N, w)``: ESPFormer's ``.view`` (``view_split``) or the usual split."""
        B, N, D = t.shape
        if self.view_split:
            return t.reshape(B, self.num_heads, N, D // self.num_heads)
        return t.reshape(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, w)`` head outputs -> ``(B, N, H·w)``, through the head norm and × (1 − λinit)."""
        B, H, N, w = out.shape
        if self.view_split:
            out = out.transpose(1, 2).reshape(B, H, N, w)  # ESPFormer's transpose + .view: no inverse of the split
        if self.norm is not None:  # GroupNorm: channel dim 1 = the head; RMSNorm: each token's w features
            out = self.norm(out) * (1 - self.lambda_init)
        return out.transpose(1, 2).reshape(B, N, H * w)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two softmax maps ``(B, H, N, N)`` of ``x`` (after the split, before λ and dropout)."""
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        w = self.width
        signal = torch.softmax(q[..., :w] @ k[..., :w].transpose(-1, -2) * self.scale, dim=-1)
        noise = torch.softmax(q[..., w:] @ k[..., w:].transpose(-1, -2) * self.scale, dim=-1)
        return signal, noise

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ESPFormerDifAttention takes no attention mask (ESPFormer's ViT uses none)")
        signal, noise = self.maps(x)
        difference = self.attn_drop(signal - self.lam.to(signal.dtype) * noise)
        return self.out_proj(self.merge_heads(difference @ self.split_heads(self.v_proj(x))))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, width={self.width}, value_width={self.value_width}, "
                f"view_split={self.view_split}, lambda_init={float(self.lambda_init):.4f}, "
                f"head_norm={self.head_norm!r}, scale={self.scale:.4f}")


class ReplicaLambdaMonitor(pl.Callback):
    """Logs the replica's learned λ per layer as ``lambda/layer_<i>`` (the key ``LambdaMonitor`` uses for
    diffvision's layers, so a run's ``result.json`` gets ``lambda_per_layer``) and the drawn λinit as
    ``lambda_init/layer_<i>``, at the end of every ``every_n_epochs``-th training epoch and the last one.
    A model without replica layers logs nothing."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        layers = [m for m in pl_module.modules() if isinstance(m, ESPFormerDifAttention)]
        values = {}
        for i, layer in enumerate(layers):
            values[f"lambda/layer_{i}"] = float(layer.lam.detach().float())
            values[f"lambda_init/layer_{i}"] = float(layer.lambda_init)
        if values:
            pl_module.log_dict(values, on_step=False, on_epoch=True, rank_zero_only=True)


class WideDifferentialAttention(DifferentialAttention):
    """diffvision's DIFF with an attention width ``inner_dim`` other than the token width ``dim``:
    ``qkv: dim -> 3·inner_dim`` and ``proj: inner_dim -> dim``, as a standard MHA with ``2h`` heads of
    ``inner_dim / 2h`` has. Everything else (λ, head norm, kernels) is :class:`DifferentialAttention`'s."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, qkv_bias: bool = False, proj_bias: bool = True,
                 **kwargs) -> None:
        super().__init__(inner_dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, **kwargs)
        self.qkv = nn.Linear(dim, 3 * inner_dim, bias=qkv_bias)
        self.proj = nn.Linear(inner_dim, dim, bias=proj_bias)


class ESPFormerBlock(Block):
    """timm's pre-norm ``Block`` with the attention built by ``make_attention(dim)``."""

    def __init__(self, dim: int, num_heads: int, make_attention: Callable[[int], nn.Module], **kwargs) -> None:
        kwargs.pop("attn_layer", None)
        super().__init__(dim, num_heads, attn_layer=nn.Identity, **kwargs)  # placeholder, replaced below
        self.attn = make_attention(dim)


def _attention_factory(attention: str, num_heads: int, dim_head: int, replica: Optional[dict],
                       diff_options: dict) -> Callable[[int], nn.Module]:
    check_choice("attention", attention, ATTENTIONS)
    if replica and attention != "replica":
        raise ValueError(f"replica switches {sorted(replica)} are for attention='replica', not {attention!r}")
    if diff_options and attention != "diff":
        raise ValueError(f"{sorted(diff_options)} are options of attention='diff', not {attention!r}")
    if attention == "standard":
        return partial(Attention, num_heads=num_heads, attn_head_dim=dim_head, qkv_bias=False)
    if attention == "replica":
        unknown = set(replica or {}) - set(ESPFORMER_SWITCHES)
        if unknown:
            raise ValueError(f"unknown replica switch(es) {sorted(unknown)}; accepted: {list(ESPFORMER_SWITCHES)}")
        switches = {**ESPFORMER_SWITCHES, **(replica or {})}
        return partial(ESPFormerDifAttention, num_heads=num_heads, dim_head=dim_head, **switches)
    if num_heads % 2:
        raise ValueError(f"attention='diff' needs an even number of heads (H/2 differential heads), got {num_heads}")
    return partial(WideDifferentialAttention, inner_dim=num_heads * dim_head, num_heads=num_heads // 2,
                   **{**VISION_OPTIONS, **diff_options})


class ESPFormerViT(VisionTransformer):
    """ESPFormer's ViT (see the module docstring) as a timm ``VisionTransformer``.

    Args:
        attention: ``"standard"``, ``"replica"`` or ``"diff"``.
        dim_head: head width of the standard attention (ESPFormer: 64; inner width ``num_heads·dim_head``),
            the ``d_k`` of the replica's scale, and the sub-head width of ``"diff"``.
        replica: switches of :class:`ESPFormerDifAttention` (``ESPFORMER_SWITCHES`` are the defaults).
        lambda_init, lambda_mode, head_norm: options of ``"diff"`` (default: ``VISION_OPTIONS``).
        init: ``"espformer"`` (PyTorch's defaults, position embedding and class token ~ N(0, 1)) or ``"timm"``.
        Everything else is ``VisionTransformer``'s (defaults: width 128, depth 6, 8 heads, MLP ratio 1).
    """

    def __init__(self, attention: str = "standard", dim_head: int = 64, replica: Optional[dict] = None,
                 init: str = "espformer", embed_dim: int = 128, depth: int = 6, num_heads: int = 8,
                 mlp_ratio: float = 1.0, **kwargs: Any) -> None:
        for arg in ("block_fn", "attn_layer"):
            if arg in kwargs:
                raise ValueError(f"ESPFormerViT builds its own blocks; choose attention={list(ATTENTIONS)}, "
                                 f"not {arg}={kwargs[arg]!r}")
        diff_options = {k: kwargs.pop(k) for k in ("lambda_init", "lambda_mode", "head_norm") if k in kwargs}
        make_attention = _attention_factory(attention, num_heads, dim_head, replica, diff_options)
        check_choice("init", init, INITS)
        kwargs.setdefault("norm_layer", nn.LayerNorm)  # torch's eps (1e-5), as ESPFormer's
        if init == "espformer":
            kwargs["weight_init"] = "skip"  # the modules keep the defaults PyTorch gave them at construction
        super().__init__(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=False, global_pool="token", class_token=True,
                         block_fn=partial(ESPFormerBlock, make_attention=make_attention), **kwargs)
        if init == "espformer":
            with torch.no_grad():  # ESPFormer draws both with torch.randn
                self.pos_embed.normal_(0.0, 1.0)
                self.cls_token.normal_(0.0, 1.0)
        self.attention = attention


def _cfg(description: str) -> dict:
    """32 x 32 inputs, no normalisation (ESPFormer feeds ToTensor() images), 2 classes; no released weights."""
    return {"url": "", "num_classes": 2, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "fixed_input_size": True, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "first_conv": "patch_embed.proj", "classifier": "head", "description": description}


default_cfgs = generate_default_cfgs({
    "espformer_vit_patch4_32": _cfg("experiment replica of ESPFormer's cats-vs-dogs ViT (issue 17), at 32 px / "
                                    "patch 4; not a diffvision model; untrained"),
})


@register_model
def espformer_vit_patch4_32(pretrained: bool = False, **kwargs) -> ESPFormerViT:
    """ Experiment replica (issue 17): ESPFormer's ViT at 32 px, patch 4 (64 tokens + CLS); not a diffvision model. """
    return build_model_with_cfg(ESPFormerViT, "espformer_vit_patch4_32", pretrained,
                                **dict(dict(img_size=32, patch_size=4), **kwargs))
