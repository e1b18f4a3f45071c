"""Weights from a standard DiT into ``DiffDiTTransformer2DModel`` of any attention kind, and back to diffusers.

* :func:`load_standard_dit_weights`: a standard DiT's weights into a model of any kind (``"standard"``,
  ``"diff"``, ``"gda"``, ``"diffv2"``), with a report of what was copied, converted, kept at its init and
  dropped, as :func:`diffvision.models.load_standard_vit_weights` does for ViTs.
* :func:`convert_dit_to_diff_dit`: that model built from the DiT's own config; with ``attn_kind="standard"``
  it computes what the DiT computes, or it refuses.
* :func:`convert_diff_dit_to_dit`, :func:`dit_state_dict_to_diff_dit`, :func:`diff_dit_state_dict_to_dit`:
  ``attn_kind="standard"`` to diffusers' ``DiTTransformer2DModel`` and the state-dict renamings.

Sources: diffusers' ``DiTTransformer2DModel`` (module or state dict), the original facebookresearch/DiT
(module or state dict: ``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.N``, ``final_layer``), or a
standard ``DiffDiTTransformer2DModel``. Kept apart from the model file, as diffusers keeps its conversions
apart from its models.

diffusers' DiT keeps one timestep + label embedding (``CombinedTimestepLabelEmbeddings``) per block
(``norm1.emb``) and uses block 0's for the final layer; DiT (and this model) share one. Checkpoints converted
from the official DiT hold identical copies and convert exactly. A DiT built or trained in diffusers has
independent ones, which a shared embedding cannot hold: block 0's is loaded, the others are reported as
dropped, and the standard conversion refuses. diffusers also splits qkv into to_q / to_k / to_v; this model
keeps the fused qkv of timm / DiT.

Attention: the model's ``num_attention_heads`` is the standard DiT's head count ``H`` (the registry's
parameter-twin rule), so DIFF and GDA have a standard MHA's q/k/v/proj shapes with q/k sub-heads in the
standard heads' order and load them unchanged; DIFF V2 takes qkv GQA-style
(``DifferentialAttentionV2.qkv_from_standard``). λ, the per-head RMSNorm and ``W_λ`` keep their init.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from diffvision.attention import get_attn_kind
from diffvision.attention.registry import rename_legacy_keywords
from diffvision.checkpoints import WeightMapping, load_checkpoint_file, model_state_dict
from diffvision.diffusion.config import ACTIVATIONS, DIT_PRESETS
from diffvision.diffusion.transformer_diff_dit import DiffDiTTransformer2DModel

__all__ = ["StandardDiTMapping", "convert_dit_to_diff_dit", "convert_diff_dit_to_dit", "dit_state_dict_to_diff_dit",
           "diff_dit_state_dict_to_dit", "load_standard_dit_weights"]

_logger = logging.getLogger(__name__)


class StandardDiTMapping(WeightMapping):
    """What ``load_standard_dit_weights`` did with a checkpoint: ``copied``, ``converted`` (DIFF V2's qkv),
    ``kept_init`` (λ, head norm, W_λ), ``dropped`` (checkpoint tensors not loaded), ``rules`` (how heads
    map) and ``notes`` (what else differs from the checkpoint's model)."""


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
_FACEBOOK_RENAMES = {  # facebookresearch/DiT name -> ours
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
_FACEBOOK_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")  # blocks.N.mlp.fc1 -> transformer_blocks.N.ff.net.0.proj
_FACEBOOK_MLP = {"mlp.fc1.": "ff.net.0.proj.", "mlp.fc2.": "ff.net.2."}
# Parameters only differential attention has: nothing in a standard DiT supplies them.
# (+ the linear kinds' own: the conv on V, projector banks, routers, γ / λ banks, out norm; LiT's weight
# inheritance loads everything else from the standard DiT)
_DIFF_ONLY_KEY = re.compile(r"\.attn\.(lambda_(q1|k1|q2|k2|scalar)|sub_norm\.weight|lambda_proj\.weight|"
                            r"dwc\.(weight|bias)|[qk]_bank|[qk]_router\.weight|(kernel|lambda)_routers\.\d+\.weight|"
                            r"gammas|lambda_bank|out_norm\.weight)$")
# What each layout fixes that its state dict does not record (diffusers hard-codes the timestep shift;
# the original DiT also uses LayerNorm eps 1e-6 and tanh-GELU everywhere).
_LAYOUT_CONFIG = {"diffusers": dict(timestep_freq_shift=1),
                  "facebookresearch": dict(timestep_freq_shift=0, norm_eps=1e-6, activation_fn="gelu-approximate")}
# The config values a shape mismatch of a key points to.
_SHAPE_HINTS = {"pos_embed.proj": "hidden size, in_channels, patch_size", "class_embedder": "num_classes "
                "(+1 null-class row when class_dropout_prob > 0)", "proj_out_2": "out_channels (learned sigma "
                "doubles it), patch_size", "ff.net": "mlp_ratio", "attn": "attention_bias, qk_norm, heads"}


# --------------------------------------------------------------------------------------------
# Reading a standard DiT: any layout -> this model's key names, plus what the source tells about itself
# --------------------------------------------------------------------------------------------

@dataclass
class _Source:
    layout: str                                   # "diffusers", "facebookresearch" or "diffvision"
    state: dict[str, Tensor]                      # this model's key names, standard attention
    config: dict[str, Any] = field(default_factory=dict)   # config values known from the source
    dropped: list[str] = field(default_factory=list)       # checkpoint keys with no place in this model
    notes: list[str] = field(default_factory=list)
    pos_embed: Optional[Tensor] = None            # the original DiT's fixed table (a parameter there)
    own_embeddings: list[int] = field(default_factory=list)  # diffusers blocks whose embedding is not block 0's

    def per_block_problem(self) -> str:
        blocks = ", ".join(str(i) for i in self.own_embeddings)
        return (f"the timestep/label embeddings (norm1.emb) of transformer_blocks {blocks} differ from block 0's: "
                f"this DiT has per-block conditioning embeddings, which DiT (and DiffDiTTransformer2DModel) share")


def _num_blocks(state: Mapping[str, Any], prefix: str) -> int:
    return len({m.group(1) for k in state for m in [re.match(rf"^{prefix}\.(\d+)\.", k)] if m})


def _pop(state: dict, key: str, layout: str) -> Tensor:
    if key not in state:
        raise ValueError(f"incomplete {layout} DiT state dict: {key} is missing")
    return state.pop(key)


def _check_consumed(rest: Mapping[str, Any], layout: str) -> None:
    if rest:
        raise ValueError(f"keys with no place in a standard DiT of the {layout} layout: {sorted(rest)[:8]}"
                         + (f" (+{len(rest) - 8} more)" if len(rest) > 8 else ""))


def _from_diffusers(state_dict: Mapping[str, Tensor]) -> _Source:
    sd = dict(state_dict)
    depth = _num_blocks(sd, "transformer_blocks")
    out = {k: _pop(sd, k, "diffusers") for k in _TOP_LEVEL}
    first = {name: _pop(sd, _EMB_PREFIX.format(i=0) + name, "diffusers") for name in _SHARED_EMB}
    out.update(first)
    source = _Source("diffusers", out, dict(_LAYOUT_CONFIG["diffusers"]))
    for i in range(1, depth):  # copies of block 0's embedding (the official DiT's one) carry nothing new
        block = {name: _pop(sd, _EMB_PREFIX.format(i=i) + name, "diffusers") for name in _SHARED_EMB}
        if any(not torch.equal(first[name], t) for name, t in block.items()):
            source.own_embeddings.append(i)
            source.dropped += [_EMB_PREFIX.format(i=i) + name for name in _SHARED_EMB]
    if source.own_embeddings:
        source.notes.append(source.per_block_problem() + "; block 0's (the one diffusers' final layer uses) was "
                            "loaded and the others dropped, so the model does not compute what the DiT computes")
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for src, dst in _BLOCK_RENAMES.items():
            out[pre + dst] = _pop(sd, pre + src, "diffusers")
        for kind in ("weight", "bias"):
            if f"{pre}attn1.to_q.{kind}" in sd:
                out[f"{pre}attn.qkv.{kind}"] = torch.cat(
                    [_pop(sd, f"{pre}attn1.to_{n}.{kind}", "diffusers") for n in "qkv"], dim=0)
    _check_consumed(sd, "diffusers")
    return source


def _from_facebookresearch(state_dict: Mapping[str, Tensor]) -> _Source:
    sd = dict(state_dict)
    pos_embed = sd.pop("pos_embed", None)
    out, rest = {}, {}
    for key, value in sd.items():
        match = _FACEBOOK_BLOCK.match(key)
        if key in _FACEBOOK_RENAMES:
            out[_FACEBOOK_RENAMES[key]] = value
        elif match:
            inner = match.group(2)
            for old, new in _FACEBOOK_MLP.items():
                inner = inner.replace(old, new) if inner.startswith(old) else inner
            out[f"transformer_blocks.{match.group(1)}.{inner}"] = value
        else:
            rest[key] = value
    _check_consumed(rest, "facebookresearch")
    config = dict(_LAYOUT_CONFIG["facebookresearch"])
    if pos_embed is not None and "pos_embed.proj.weight" in out:
        side = round(pos_embed.shape[-2] ** 0.5)  # the table has one row per patch of a square grid
        config["sample_size"] = side * out["pos_embed.proj.weight"].shape[-1]
    return _Source("facebookresearch", out, config, pos_embed=pos_embed)


def _read_source(checkpoint) -> tuple[_Source, Optional[int]]:
    """The checkpoint in this model's key names, and its head count where it records one."""
    heads, config = None, {}
    if isinstance(checkpoint, nn.Module):
        module = checkpoint
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "attn_kind", "standard") != "standard":
            raise ValueError(f"the checkpoint is a DiffDiTTransformer2DModel with attn_kind={cfg.attn_kind!r}, not a "
                             f"standard DiT: load it with from_pretrained or load_state_dict")
        heads = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None)
        config = _module_config(module)
        state = module.state_dict()
    elif isinstance(checkpoint, (str, os.PathLike)):
        if os.path.isdir(checkpoint):
            raise ValueError(f"{checkpoint} is a folder: load a saved diffusers DiT with "
                             f"DiTTransformer2DModel.from_pretrained({str(checkpoint)!r}) and pass the model")
        state = _unwrap(load_checkpoint_file(checkpoint), checkpoint)
    elif isinstance(checkpoint, Mapping):
        state = _unwrap(checkpoint, "checkpoint")
    else:
        raise TypeError(f"checkpoint must be a DiT module, a state dict or a checkpoint file, got "
                        f"{type(checkpoint).__name__}")
    if any(_DIFF_ONLY_KEY.search(k) for k in state):
        raise ValueError("the checkpoint has differential-attention parameters (λ, head norm or W_λ): it is not "
                         "a standard DiT; load a DiffDiTTransformer2DModel checkpoint with from_pretrained")
    if any(".attn1.to_q." in k for k in state):
        source = _from_diffusers(state)
    elif "x_embedder.proj.weight" in state:
        source = _from_facebookresearch(state)
    elif "pos_embed.proj.weight" in state and "timestep_embedder.linear_1.weight" in state:
        source = _Source("diffvision", dict(state))
    else:
        raise ValueError(
            f"not a DiT state dict: expected diffusers DiTTransformer2DModel keys "
            f"(transformer_blocks.0.attn1.to_q.weight, ...), facebookresearch DiT keys (x_embedder.proj.weight, "
            f"blocks.0.attn.qkv.weight, ...) or DiffDiTTransformer2DModel keys; got {sorted(state)[:4]}")
    source.config.update(config)  # a module's own config outranks its layout's conventions
    return source, heads


def _unwrap(checkpoint: Mapping, name) -> dict[str, Tensor]:
    # the original DiT's training checkpoints hold {"model", "ema", "opt", "args"}; its sample.py uses "ema"
    if isinstance(checkpoint.get("ema"), Mapping):
        checkpoint = checkpoint["ema"]
    return model_state_dict(dict(checkpoint), prefix="transformer.", source=name)


def _module_config(module: nn.Module) -> dict[str, Any]:
    """What a DiT module's config fixes beyond its tensor shapes."""
    cfg = getattr(module, "config", None)
    if cfg is None and hasattr(module, "y_embedder"):  # the original DiT
        return dict(num_classes=module.y_embedder.num_classes, class_dropout_prob=module.y_embedder.dropout_prob)
    if cfg is None:
        return {}
    if "num_embeds_ada_norm" in cfg:  # diffusers' DiTTransformer2DModel
        if cfg.norm_type != "ada_norm_zero" or cfg.norm_elementwise_affine:
            raise ValueError(f"only DiT blocks with norm_type='ada_norm_zero' and norm_elementwise_affine=False "
                             f"convert, got norm_type={cfg.norm_type!r}, "
                             f"norm_elementwise_affine={cfg.norm_elementwise_affine}")
        if cfg.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn={cfg.activation_fn!r} has no counterpart; accepted: {ACTIVATIONS}")
        emb = module.transformer_blocks[0].norm1.emb
        return dict(sample_size=cfg.sample_size, activation_fn=cfg.activation_fn, norm_eps=cfg.norm_eps,
                    dropout=cfg.dropout, class_dropout_prob=emb.class_embedder.dropout_prob,
                    timestep_freq_shift=emb.time_proj.downscale_freq_shift)
    keys = ("sample_size", "activation_fn", "norm_eps", "dropout", "num_classes", "class_dropout_prob",
            "timestep_freq_shift", "qk_norm")
    return {k: cfg[k] for k in keys if k in cfg}


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_fits(source: _Source, model_sd: Mapping[str, Tensor], model: DiffDiTTransformer2DModel) -> None:
    """Refuse a checkpoint of another width, depth or layout, naming the tensors and the config values."""
    got, want = source.state.get("pos_embed.proj.weight"), model_sd["pos_embed.proj.weight"]
    if got is not None and got.shape[0] != want.shape[0]:
        raise ValueError(f"checkpoint hidden size {got.shape[0]} does not match the model's {want.shape[0]} "
                         f"(num_attention_heads * attention_head_dim); load a standard DiT of the same width")
    src_depth, depth = _num_blocks(source.state, "transformer_blocks"), model.config.num_layers
    if src_depth != depth:
        raise ValueError(f"checkpoint has {src_depth} blocks, the model has num_layers={depth}; load a standard "
                         f"DiT of the same depth")
    lines = []
    for key, value in source.state.items():
        if key not in model_sd:
            lines.append(f"  {key}: not in the model")
        elif key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            continue  # DIFF V2's qkv has its own shape; checked when converted
        elif value.shape != model_sd[key].shape:
            hint = next((h for part, h in _SHAPE_HINTS.items() if part in key), "")
            lines.append(f"  {key}: checkpoint {_shape(value)}, model {_shape(model_sd[key])}"
                         + (f" (check {hint})" if hint else ""))
    missing = [k for k in model_sd if k not in source.state and not _DIFF_ONLY_KEY.search(k)]
    lines += [f"  {k}: in the model, not in the checkpoint" for k in missing]
    if lines:
        raise ValueError(f"the {source.layout} DiT checkpoint does not fit this DiffDiTTransformer2DModel:\n"
                         + "\n".join(lines[:12]) + (f"\n  ... ({len(lines) - 12} more)" if len(lines) > 12 else ""))


def _head_rule(attn: nn.Module, heads: int, dim: int) -> Optional[str]:
    """How the standard heads land in ``attn`` when its qkv is copied unchanged (DIFF, GDA)."""
    width = dim // heads
    if attn.attn_kind not in ("diff", "gda"):
        return None
    if attn.head_dim == width and attn.attn_kind == "diff":
        return ("qkv copied: standard q/k heads 2i, 2i+1 are the signal and noise maps of differential head i, "
                "standard value heads 2i, 2i+1 its value head")
    if attn.head_dim == width:
        return (f"qkv copied: q/k sub-heads are laid out group by group ({attn.group} signal heads, then their "
                f"noise head), so standard head j is sub-head j; value channels regroup into {attn.signal_heads} "
                f"heads of {attn.value_head_dim}")
    if attn.attn_kind == "diff" and 2 * attn.head_dim == width:
        return ("qkv copied: the q/k channels of standard head i split into signal (first half) and noise "
                "(second half) of differential head i; value head i is standard value head i")
    return (f"qkv copied channel for channel: q/k sub-heads of {attn.head_dim} do not match the standard heads "
            f"of {width} (explicit head counts), so no standard head maps onto one sub-head")


def _check_pos_embed(source: _Source, model: DiffDiTTransformer2DModel, report: WeightMapping) -> None:
    """The original DiT stores its fixed sin-cos position table; this model computes the same one."""
    theirs, ours = source.pos_embed, model.pos_embed.pos_embed
    if theirs.shape != ours.shape:
        report.notes.append(f"pos_embed: the checkpoint's fixed table has {theirs.shape[-2]} positions, the model "
                            f"computes its own for {ours.shape[-2]} (sample_size={model.config.sample_size})")
        return
    diff = (theirs.to(ours) - ours).abs().max().item()
    if diff > 1e-5:
        raise ValueError(f"the checkpoint's pos_embed is not DiT's fixed 2-D sin-cos table (max difference {diff:.3g}); "
                         f"this model's position table is fixed and cannot take it")
    report.notes.append("pos_embed: equal to the model's own fixed sin-cos table")


def _load(model: DiffDiTTransformer2DModel, source: _Source, source_heads: Optional[int]) -> StandardDiTMapping:
    cfg, dim = model.config, model.inner_dim
    model_sd = model.state_dict()
    report = StandardDiTMapping(dropped=list(source.dropped), notes=list(source.notes))
    if source_heads is None:
        source_heads = cfg.num_attention_heads
        report.notes.append(f"the checkpoint does not record its head count: {source_heads} (the model's "
                            f"num_attention_heads) assumed; pass source_num_heads if it differs")
    elif source_heads != cfg.num_attention_heads:
        raise ValueError(f"the checkpoint has {source_heads} attention heads, the model is built as the twin of a "
                         f"DiT with num_attention_heads={cfg.num_attention_heads}: build it with "
                         f"num_attention_heads={source_heads}")
    first = model.transformer_blocks[0].attn if len(model.transformer_blocks) else None
    if first is not None and first.attn_kind == "diffv2" and (
            first.num_heads != source_heads or first.num_heads * first.head_dim != dim):
        raise ValueError(
            f"no sound mapping from a standard DiT with {source_heads} heads of {dim // source_heads} onto DIFF V2's "
            f"{first.num_heads} output heads of {first.head_dim}: the GQA mapping needs one output head per standard "
            f"head of the same width (an even num_attention_heads)")
    _check_fits(source, model_sd, model)
    out = dict(source.state)
    for i, block in enumerate(model.transformer_blocks):
        attn = block.attn
        if attn.attn_kind != "diffv2":
            continue
        for kind in ("weight", "bias"):
            key = f"transformer_blocks.{i}.attn.qkv.{kind}"
            if key in out:
                out[key] = attn.qkv_from_standard(out[key])
                report.converted.append(key)
    if first is not None and first.attn_kind == "diffv2":
        report.rules.append(f"qkv converted: query heads 2i <- standard heads i, noise query heads 2i+1 kept their "
                            f"init, key/value heads <- mean of {first.num_heads // first.num_kv_heads} standard heads")
    elif first is not None and (rule := _head_rule(first, source_heads, dim)):
        report.rules.append(rule)
    for key, value in out.items():
        if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            if value.shape != model_sd[key].shape:
                raise ValueError(f"{key}: checkpoint {_shape(value)}, model {_shape(model_sd[key])}")
        if key not in report.converted:
            report.copied.append(key)
    for key, value in model_sd.items():
        if key not in out:  # _check_fits let only the differential-only parameters through
            out[key] = value
            report.kept_init.append(key)
    if source.pos_embed is not None:
        _check_pos_embed(source, model, report)
    for key, theirs in source.config.items():
        if key in cfg and theirs != cfg[key]:
            report.notes.append(f"{key}: the checkpoint's DiT used {theirs!r}, this model {cfg[key]!r}")
    model.load_state_dict(out, strict=True)
    return report


def load_standard_dit_weights(
        model: DiffDiTTransformer2DModel,
        checkpoint: Union[nn.Module, Mapping[str, Tensor], str, os.PathLike],
        source_num_heads: Optional[int] = None,
) -> StandardDiTMapping:
    """Initialise a DiffDiTTransformer2DModel of any attention kind from a standard DiT of the same width and depth.

    Args:
        model: the model to load into; its ``num_attention_heads`` is the standard DiT's head count.
        checkpoint: diffusers' ``DiTTransformer2DModel`` or the original DiT (a module or its state dict), a
            standard ``DiffDiTTransformer2DModel``, or a checkpoint file of one of them (``.pt``, ``.bin``,
            ``.safetensors``; wrappers ``{'ema' | 'state_dict' | 'model': ...}`` and Lightning checkpoints
            are unwrapped). For a ``save_pretrained`` folder, load it with diffusers first.
        source_num_heads: the checkpoint's head count when it does not record one (state dicts); else
            the model's ``num_attention_heads`` is assumed.

    Embeddings, adaLN modulations, MLPs, the final layer and attention q/k/v/proj are copied (onto DIFF V2,
    qkv converted GQA-style); λ, the per-head RMSNorm scales and W_λ keep their init; a diffusers DiT's
    per-block embeddings that differ from block 0's are dropped. Config values that differ from the
    checkpoint's model (timestep frequency shift, LayerNorm eps, activation, sample size) are listed in
    ``notes``. Raises ``ValueError`` naming the tensors when the checkpoint does not fit.
    """
    if not isinstance(model, DiffDiTTransformer2DModel):
        raise TypeError(f"model must be a DiffDiTTransformer2DModel, got {type(model).__name__}")
    source, heads = _read_source(checkpoint)
    report = _load(model, source, source_num_heads if source_num_heads is not None else heads)
    _logger.info(f"standard DiT ({source.layout}) mapped onto {model.config.attn_kind!r} DiffDiTTransformer2DModel: "
                 f"{report}")
    return report


def _model_config(source: _Source, heads: Optional[int], overrides: dict) -> dict[str, Any]:
    """A DiffDiTTransformer2DModel config for the checkpoint: sizes from its tensors, the rest from its config
    or layout, then ``overrides``."""
    sd = {k: source.state.get(k) for k in ("pos_embed.proj.weight", "proj_out_2.weight",
                                           "class_embedder.embedding_table.weight",
                                           "transformer_blocks.0.ff.net.0.proj.weight")}
    if any(v is None for v in sd.values()):
        raise ValueError(f"incomplete {source.layout} DiT state dict: {[k for k, v in sd.items() if v is None]} missing")
    patch = sd["pos_embed.proj.weight"]
    dim, in_channels, p = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = _num_blocks(source.state, "transformer_blocks")
    heads = overrides.pop("num_attention_heads", heads)
    if heads is None:  # a state dict: DiT's own sizes name their heads
        heads = next((c["num_attention_heads"] for c in DIT_PRESETS.values() if c["num_layers"] == depth
                      and c["num_attention_heads"] * c["attention_head_dim"] == dim), None)
    if heads is None:
        raise ValueError(f"cannot tell the head count of a DiT of width {dim} and depth {depth} (not a DiT preset): "
                         f"pass num_attention_heads")
    if dim % heads:
        raise ValueError(f"num_attention_heads={heads} does not divide the checkpoint's width {dim}")
    classes = sd["class_embedder.embedding_table.weight"].shape[0]
    config = dict(num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=in_channels,
                  out_channels=sd["proj_out_2.weight"].shape[0] // (p * p), num_layers=depth, patch_size=p,
                  attention_bias="transformer_blocks.0.attn.qkv.bias" in source.state,
                  mlp_ratio=sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / dim,
                  num_classes=classes - 1)  # the null-class row of classifier-free guidance (class_dropout_prob > 0)
    config.update(source.config)
    config.update(overrides)
    if "sample_size" not in config:
        raise ValueError(f"a {source.layout} DiT state dict does not record its sample_size: pass sample_size (or "
                         f"the DiT module itself)")
    return config


def convert_dit_to_diff_dit(dit, attn_kind: Optional[str] = None, output_loading_info: bool = False, **overrides):
    """A ``DiffDiTTransformer2DModel`` with the config and weights of a standard DiT.

    ``dit`` is anything :func:`load_standard_dit_weights` takes: diffusers' ``DiTTransformer2DModel``, the original
    DiT (module, state dict or file; its released sizes name their heads, else pass ``num_attention_heads``) or
    a standard ``DiffDiTTransformer2DModel``. With ``attn_kind="standard"`` (the default; the old name
    ``attention_type`` is accepted) the result computes what ``dit``
    computes in eval mode, or ``ValueError`` says why it cannot (a diffusers DiT with per-block embeddings); with
    ``"diff"``, ``"gda"`` or ``"diffv2"`` it is that kind's twin, initialised from ``dit``. ``overrides`` set or
    replace config values (``class_dropout_prob``, λ options, ...). ``output_loading_info=True`` returns
    ``(model, report)``, the report of :func:`load_standard_dit_weights`.
    """
    overrides = rename_legacy_keywords({"attn_kind": attn_kind, **overrides}, "convert_dit_to_diff_dit")
    kind = get_attn_kind(overrides.pop("attn_kind") or "standard").name  # checked before a checkpoint is read
    source, heads = _read_source(dit)
    if kind == "standard" and source.own_embeddings:
        raise ValueError(f"{source.per_block_problem()}; no exact conversion exists (load_standard_dit_weights("
                         f"model, dit) loads block 0's embedding and reports the rest)")
    model = DiffDiTTransformer2DModel(**_model_config(source, heads, {"attn_kind": kind, **overrides}))
    report = _load(model, source, heads)
    if isinstance(dit, nn.Module):
        model = _match_dtype_device(model, dit)
    return (model, report) if output_loading_info else model


# --------------------------------------------------------------------------------------------
# State dicts, and back to diffusers
# --------------------------------------------------------------------------------------------

def dit_state_dict_to_diff_dit(state_dict: dict[str, Tensor], num_layers: Optional[int] = None,
                               attention_bias: Optional[bool] = None) -> dict[str, Tensor]:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to this model's (standard attention).

    Raises ``ValueError`` if the per-block conditioning embeddings differ (see the module docstring).
    ``num_layers`` and ``attention_bias``, read from the keys, are checked when given.
    """
    source = _from_diffusers(state_dict)
    if source.own_embeddings:
        raise ValueError(f"{source.per_block_problem()}; no exact conversion exists")
    depth, bias = _num_blocks(source.state, "transformer_blocks"), "transformer_blocks.0.attn.qkv.bias" in source.state
    if (num_layers is not None and num_layers != depth) or (attention_bias is not None and attention_bias != bias):
        raise ValueError(f"the state dict has num_layers={depth}, attention_bias={bias}; got num_layers={num_layers}, "
                         f"attention_bias={attention_bias}")
    return source.state


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
    like_param = next(like.parameters(), None)
    if like_param is None:
        return model
    model = model.to(like_param.device)
    return model if model.dtype == like_param.dtype else model.to(like_param.dtype)


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
