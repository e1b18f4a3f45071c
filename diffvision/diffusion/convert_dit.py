"""Weight conversion between diffusers' ``DiTTransformer2DModel`` and ``DiffDiTTransformer2DModel``.

Both directions, for whole models (:func:`convert_dit_to_diff_dit`, :func:`convert_diff_dit_to_dit`)
and for state dicts (:func:`dit_state_dict_to_diff_dit`, :func:`diff_dit_state_dict_to_dit`). Only
``attn_kind="standard"`` has a diffusers counterpart; the converted model computes the same outputs.
Kept apart from the model file, as diffusers keeps its conversions apart from its models.

diffusers' DiT keeps one CombinedTimestepLabelEmbeddings per block (norm1.emb) and uses block 0's
for the final layer; DiT (and DiffDiTTransformer2DModel) share one. Checkpoints converted from the
official DiT hold identical copies, so the conversion takes block 0's copy and refuses blocks that
differ. diffusers also splits qkv into to_q / to_k / to_v; DiffDiTTransformer2DModel keeps the fused
qkv of timm / DiT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from diffvision.diffusion.config import ACTIVATIONS
from diffvision.diffusion.transformer_diff_dit import DiffDiTTransformer2DModel

__all__ = ["convert_dit_to_diff_dit", "convert_diff_dit_to_dit", "dit_state_dict_to_diff_dit",
           "diff_dit_state_dict_to_dit"]

_EMB_PREFIX = "transformer_blocks.{i}.norm1.emb."
_SHARED_EMB = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
               "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
               "class_embedder.embedding_table.weight")
_BLOCK_RENAMES = {  # diffusers name -> ours, within transformer_blocks.{i}.
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "attn1.to_out.0.weight": "attn.proj.weight",
    "attn1.to_out.0.bias": "attn.proj.bias",
    "ff.net.0.proj.weight": "ff.net.0.proj.weight",
    "ff.net.0.proj.bias": "ff.net.0.proj.bias",
    "ff.net.2.weight": "ff.net.2.weight",
    "ff.net.2.bias": "ff.net.2.bias",
}
_TOP_LEVEL = ("pos_embed.proj.weight", "pos_embed.proj.bias", "proj_out_1.weight", "proj_out_1.bias",
              "proj_out_2.weight", "proj_out_2.bias")


def dit_state_dict_to_diff_dit(state_dict: dict[str, Tensor], num_layers: int,
                               attention_bias: bool = True) -> dict[str, Tensor]:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to this model's (standard attention).

    Raises ``ValueError`` if the per-block conditioning embeddings differ (see the module docstring).
    """
    sd = dict(state_dict)
    out: dict[str, Tensor] = {k: sd.pop(k) for k in _TOP_LEVEL}
    for name in _SHARED_EMB:
        first = sd.pop(_EMB_PREFIX.format(i=0) + name)
        for i in range(1, num_layers):
            other = sd.pop(_EMB_PREFIX.format(i=i) + name)
            if not torch.equal(first, other):
                raise ValueError(
                    f"transformer_blocks.{i}.norm1.emb.{name} differs from block 0's: this DiT has per-block "
                    f"conditioning embeddings, which DiT (and DiffDiTTransformer2DModel) share; only block 0's "
                    f"copy drives diffusers' final layer, so no exact conversion exists")
        out[name] = first
    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        for src, dst in _BLOCK_RENAMES.items():
            out[pre + dst] = sd.pop(pre + src)
        out[pre + "attn.qkv.weight"] = torch.cat(
            [sd.pop(pre + f"attn1.to_{n}.weight") for n in "qkv"], dim=0)
        if attention_bias:
            out[pre + "attn.qkv.bias"] = torch.cat([sd.pop(pre + f"attn1.to_{n}.bias") for n in "qkv"], dim=0)
    if sd:
        raise ValueError(f"unexpected keys in the DiT state dict (not convertible): {sorted(sd)[:8]}")
    return out


def diff_dit_state_dict_to_dit(state_dict: dict[str, Tensor], num_layers: int,
                               attention_bias: bool = True) -> dict[str, Tensor]:
    """Inverse of :func:`dit_state_dict_to_diff_dit` (standard attention only): copies the shared
    conditioning embedding into every diffusers block and splits qkv."""
    sd = dict(state_dict)
    out: dict[str, Tensor] = {k: sd.pop(k) for k in _TOP_LEVEL}
    shared = {name: sd.pop(name) for name in _SHARED_EMB}
    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        for name, value in shared.items():
            out[_EMB_PREFIX.format(i=i) + name] = value.clone()
        for src, dst in _BLOCK_RENAMES.items():
            out[pre + src] = sd.pop(pre + dst)
        for n, w in zip("qkv", sd.pop(pre + "attn.qkv.weight").chunk(3, dim=0)):
            out[pre + f"attn1.to_{n}.weight"] = w.clone()
        if attention_bias:
            for n, b in zip("qkv", sd.pop(pre + "attn.qkv.bias").chunk(3, dim=0)):
                out[pre + f"attn1.to_{n}.bias"] = b.clone()
    if sd:
        raise ValueError(f"keys with no DiTTransformer2DModel counterpart: {sorted(sd)[:8]} "
                         f"(only attn_kind='standard' without qk_norm converts)")
    return out


def _match_dtype_device(model: nn.Module, like: nn.Module) -> nn.Module:
    # Only cast when needed: ModelMixin.to(dtype) logs a warning on every dtype cast.
    model = model.to(like.device)
    return model if model.dtype == like.dtype else model.to(like.dtype)


def convert_dit_to_diff_dit(dit: nn.Module, **overrides) -> DiffDiTTransformer2DModel:
    """A ``DiffDiTTransformer2DModel(attn_kind="standard")`` that computes what ``dit`` (a diffusers
    ``DiTTransformer2DModel``) computes in eval mode. ``overrides`` set runtime-only config values
    (e.g. ``class_dropout_prob`` is fixed at 0.1 in diffusers' DiT)."""
    cfg = dit.config
    if cfg.norm_type != "ada_norm_zero" or cfg.norm_elementwise_affine:
        raise ValueError(f"only DiT blocks with norm_type='ada_norm_zero' and norm_elementwise_affine=False "
                         f"convert, got norm_type={cfg.norm_type!r}, "
                         f"norm_elementwise_affine={cfg.norm_elementwise_affine}")
    if cfg.activation_fn not in ACTIVATIONS:
        raise ValueError(f"activation_fn={cfg.activation_fn!r} has no counterpart; accepted: {ACTIVATIONS}")
    config = dict(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
        dropout=cfg.dropout, attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, activation_fn=cfg.activation_fn, num_classes=cfg.num_embeds_ada_norm,
        class_dropout_prob=dit.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob,
        norm_eps=cfg.norm_eps, timestep_freq_shift=dit.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift,
        attn_kind="standard")
    config.update(overrides)
    model = DiffDiTTransformer2DModel(**config)
    sd = dit_state_dict_to_diff_dit(dit.state_dict(), cfg.num_layers, cfg.attention_bias)
    model.load_state_dict(sd, strict=True)
    return _match_dtype_device(model, dit)


def convert_diff_dit_to_dit(model: DiffDiTTransformer2DModel):
    """A diffusers ``DiTTransformer2DModel`` with ``model``'s weights (``attn_kind="standard"`` only)."""
    from diffusers import DiTTransformer2DModel

    cfg = model.config
    problems = []
    if cfg.attn_kind != "standard":
        problems.append(f"attn_kind={cfg.attn_kind!r} (diffusers' DiT has standard attention only)")
    if cfg.qk_norm:
        problems.append("qk_norm=True")
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={cfg.mlp_ratio} (diffusers' DiT uses 4)")
    if cfg.timestep_freq_shift != 1:
        problems.append(f"timestep_freq_shift={cfg.timestep_freq_shift} (diffusers' DiT uses 1)")
    if cfg.class_dropout_prob <= 0:
        problems.append("class_dropout_prob=0 (diffusers' DiT always has the null-class row)")
    if problems:
        raise ValueError("no DiTTransformer2DModel counterpart for " + ", ".join(problems))
    dit = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
        dropout=cfg.dropout, attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, activation_fn=cfg.activation_fn, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=cfg.norm_eps)
    for block in dit.transformer_blocks:  # diffusers hard-codes 0.1; it only matters in training mode
        block.norm1.emb.class_embedder.dropout_prob = cfg.class_dropout_prob
    dit.load_state_dict(diff_dit_state_dict_to_dit(model.state_dict(), cfg.num_layers, cfg.attention_bias),
                        strict=True)
    return _match_dtype_device(dit, model)
