"""The attention kinds: one registry that the timm models, the DiT model, the Lightning modules, the
configs, the sweeps and the tools all read.

A kind is a name, the value of ``attn_kind`` everywhere (timm models, ``DiffDiTTransformer2DModel``,
``DiffusionModule``, YAML configs), bound to

* its module class (``layer``) and the formula it computes;
* its **head-layout rule** (:func:`layer_heads`): the model's head arguments -> the module's keywords;
* its **parameter-twin rule** (:func:`twin_heads`): a standard model's ``H`` heads of ``dim / H`` -> this
  kind's head arguments at (almost) the same parameter count;
* the kernel backends it runs on (``attn_backend``) and the options it takes (λ, head norm; the linear
  kinds' ``linear_options``).

Head arguments are spelled as the timm models take them: ``num_heads`` is the module's own head count
(softmax heads, differential heads, GDA signal heads, DIFF V2 output heads), plus ``noise_heads`` (gda)
or ``num_kv_heads`` (diffv2). The DiT model's ``num_attention_heads`` is the standard twin's ``H`` and goes
through :func:`twin_heads`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from ..choices import check_choice
from .functional import BACKENDS, V2_BACKENDS
from .linear import DynamicDifferentialLinearAttention, LinearAttention
from .modules import (
    DifferentialAttention,
    DifferentialAttentionV2,
    GroupedDifferentialAttention,
    MultiHeadAttention,
)

__all__ = [
    "ATTN_KINDS",
    "AttnKind",
    "LAMBDA_OPTIONS",
    "LEGACY_KEYWORDS",
    "OPTION_DEFAULTS",
    "attention_layers",
    "PAPER_OPTIONS",
    "VISION_OPTIONS",
    "check_attn_backend",
    "create_attention",
    "get_attn_kind",
    "layer_heads",
    "rename_legacy_keywords",
    "set_attention_backend",
    "twin_heads",
]

# λ and head-norm choices of DIFF / GDA. The paper's are the attention modules' defaults (they compute the
# paper's formula), and were the models' defaults before issue 16; VISION_OPTIONS are the models' defaults
# since then, chosen by the variant study (docs/variant_study.md). A checkpoint that records no choice was
# saved under PAPER_OPTIONS (see ImageClassifier.on_load_checkpoint).
PAPER_OPTIONS: dict[str, Any] = {"lambda_init": "schedule", "lambda_mode": "reparam", "head_norm": True}
VISION_OPTIONS: dict[str, Any] = {"lambda_init": 0.8, "lambda_mode": "fixed", "head_norm": True}
LAMBDA_OPTIONS = tuple(PAPER_OPTIONS)
# Options a kind may take besides its heads, at the models' defaults. A model passes them to every kind; a
# kind that does not take one accepts it only at a default (the models' today or the paper's).
# ``linear_options``: the options of the linear kinds (diffvision.attention.linear.LINEAR_OPTIONS /
# DYDILA_OPTIONS) as one dict; None (or {}) = their defaults.
OPTION_DEFAULTS: dict[str, Any] = {**VISION_OPTIONS, "backend": "auto", "linear_options": None}

# Keyword names used before the vocabulary was unified (saved DiT configs, Lightning hparams, YAML).
LEGACY_KEYWORDS = {"attention_type": "attn_kind", "diff_attention_backend": "attn_backend"}


@dataclass(frozen=True)
class AttnKind:
    name: str
    layer: type[nn.Module]
    formula: str
    backends: tuple[str, ...]   # accepted attn_backend values; () = always SDPA, no choice
    head_args: tuple[str, ...]  # head arguments besides num_heads
    options: tuple[str, ...]    # keys of OPTION_DEFAULTS the layer takes
    twin: Callable[[int, int, dict], dict]  # (dim, H, explicit head args) -> head arguments


# --------------------------------------------------------------------------------------------
# Parameter-twin rules: a standard model with H heads of dim / H -> this kind's head arguments
# --------------------------------------------------------------------------------------------

def _twin_standard(dim: int, H: int, explicit: dict) -> dict:
    return {"num_heads": H}


def _twin_diff(dim: int, H: int, explicit: dict) -> dict:
    """H/2 differential heads (q/k keep H sub-heads of dim/H, v heads are 2·dim/H); odd H: H heads of half width."""
    h = H // 2 if H % 2 == 0 else H
    if dim % (2 * h) != 0:
        raise ValueError(
            f"attn_kind='diff' with {H} standard heads uses {h} differential heads, which needs width {dim} "
            f"divisible by 2*{h}={2 * h}; use an even attention_head_dim or an even number of heads")
    return {"num_heads": h}


def _gda_splits(dim: int, max_heads: int = 64) -> list[tuple[int, int]]:
    """All (signal, noise) head counts with signal = G·noise (G ≥ 2) that tile ``dim`` exactly."""
    splits = []
    for noise in range(1, max_heads + 1):
        for group in range(2, max_heads // noise + 1):
            signal = group * noise
            if signal + noise <= max_heads and dim % (signal + noise) == 0 and dim % signal == 0:
                splits.append((signal, noise))
    return splits


def _gda_suggestions(dim: int, num_heads: int) -> str:
    splits = _gda_splits(dim)
    if not splits:
        return (f"width {dim} admits no split with signal_heads > noise_heads (both "
                f"{dim}/(signal_heads+noise_heads) and {dim}/signal_heads must be integers); use "
                f"attn_kind='diff' (the 1:1 case) or a different width")
    # Closest total head count to H first, then the 2:1 ratio the default uses.
    splits.sort(key=lambda s: (abs(s[0] + s[1] - num_heads), abs(s[0] // s[1] - 2), s[1]))
    shown = ", ".join(
        f"signal_heads={s}, noise_heads={n} ({s // n}:1, d={dim // (s + n)}, dv={dim // s})"
        for s, n in splits[:4])
    return f"valid choices for width {dim} include: {shown}"


def _twin_gda(dim: int, H: int, explicit: dict) -> dict:
    """signal:noise = 2:1 with signal + noise = H (q/k sub-heads keep dim/H, v heads are dim/signal);
    or the explicit ``signal_heads`` / ``noise_heads``."""
    signal_heads, noise_heads = explicit.get("signal_heads"), explicit.get("noise_heads")
    if (signal_heads is None) != (noise_heads is None):
        raise ValueError(
            f"attn_kind='gda' needs both signal_heads and noise_heads or neither, got "
            f"signal_heads={signal_heads}, noise_heads={noise_heads}")
    if signal_heads is None:
        if H % 3 != 0:
            raise ValueError(
                f"attn_kind='gda' defaults to signal:noise = 2:1 with signal_heads + noise_heads = {H} (the "
                f"standard heads), which needs that number divisible by 3; pass signal_heads and noise_heads "
                f"explicitly: {_gda_suggestions(dim, H)}")
        signal_heads, noise_heads = 2 * H // 3, H // 3
    Hs, Hn = int(signal_heads), int(noise_heads)
    if Hs <= 0 or Hn <= 0 or Hs % Hn != 0:
        raise ValueError(f"signal_heads={Hs} must be a positive multiple of noise_heads={Hn}; "
                         f"{_gda_suggestions(dim, H)}")
    if dim % (Hs + Hn) != 0 or dim % Hs != 0:
        raise ValueError(
            f"signal_heads={Hs}, noise_heads={Hn} do not tile width {dim} (need {dim} divisible by "
            f"signal_heads + noise_heads = {Hs + Hn} and by signal_heads = {Hs}); {_gda_suggestions(dim, H)}")
    return {"num_heads": Hs, "noise_heads": Hn}


def _twin_diffv2(dim: int, H: int, explicit: dict) -> dict:
    """h = H output heads of dim/H on h_kv = H/2 key/value heads: qkv dim -> 3·dim, proj dim -> dim, the
    twin's 4·dim² (plus dim·h for W_λ). Odd H (ViT-Ti: 3 heads of 64) has no h_kv = H/2: the even h with
    ``dim % h == 0`` whose head width dim/h is closest to the twin's is used instead (ViT-Ti: 4 heads of
    48, h_kv = 2, again exactly 4·dim²)."""
    if H % 2 == 0:
        h = H
    else:
        candidates = [h for h in range(2, 2 * H + 2, 2) if dim % h == 0]
        if not candidates:
            raise ValueError(f"attn_kind='diffv2' needs an even number of heads that divides width {dim}; "
                             f"there is none near {H}: choose another width")
        h = min(candidates, key=lambda c: (abs(dim / c - dim / H), -c))
    if dim % h != 0:
        raise ValueError(f"attn_kind='diffv2' uses {h} heads of width {dim}/{h}: {dim} must be divisible by {h}")
    num_kv_heads = explicit.get("num_kv_heads")
    return {"num_heads": h, "num_kv_heads": h // 2 if num_kv_heads is None else int(num_kv_heads)}


def _twin_linear(dim: int, H: int, explicit: dict) -> dict:
    """Few heads, as LiT: min(H, 2) heads of dim / heads (or the explicit ``linear_heads``). The projections keep
    a standard MHA's shapes; ``linear`` adds only the depthwise conv (``conv_size²·d_h + d_h``: +1.7 % of the
    attention at ViT-Ti, +0.8 % at DiT-S, +0.18 % of the whole DiT-S/4); ``dydila`` adds its projector banks
    (``2·n_P·dim²``: 1.5× the attention at n_P = 3), routers and γ / λ banks, which a parameter-matched model
    pays for elsewhere (README, "Linear attention (LiT, DyDiLA)")."""
    heads = explicit.get("linear_heads", min(H, 2))
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or dim % heads != 0:
        raise ValueError(f"linear_heads={heads!r} must be a positive int dividing the width {dim}")
    return {"num_heads": heads}


ATTN_KINDS: dict[str, AttnKind] = {
    "standard": AttnKind(
        "standard", MultiHeadAttention, "softmax(Q Kᵀ·s) V", backends=(), head_args=(), options=(),
        twin=_twin_standard),
    "diff": AttnKind(
        "diff", DifferentialAttention,
        "(softmax(Q1 K1ᵀ·s) − λ·softmax(Q2 K2ᵀ·s)) V, per-head RMSNorm × (1 − λinit)",
        backends=BACKENDS, head_args=(), options=("lambda_init", "lambda_mode", "head_norm", "backend"),
        twin=_twin_diff),
    "gda": AttnKind(
        "gda", GroupedDifferentialAttention,
        "DIFF with Hs signal maps sharing Hn < Hs noise maps (GQA-like groups)",
        backends=BACKENDS, head_args=("noise_heads",),
        options=("lambda_init", "lambda_mode", "head_norm", "backend"), twin=_twin_gda),
    "diffv2": AttnKind(
        "diffv2", DifferentialAttentionV2,
        "A(q_2i) − σ(W_λ x)_i·A(q_2i+1): 2h query heads on h_kv key/value heads, one SDPA call",
        backends=V2_BACKENDS, head_args=("num_kv_heads",), options=("backend",), twin=_twin_diffv2),
    "linear": AttnKind(
        "linear", LinearAttention,
        "LiT: φ(Q)(φ(K)ᵀV) / φ(Q)Σφ(K), φ = ReLU + ε, + 5×5 depthwise conv on V; O(N·d²)",
        backends=(), head_args=(), options=("linear_options",), twin=_twin_linear),
    "dydila": AttnKind(
        "dydila", DynamicDifferentialLinearAttention,
        "DyDiLA (reconstruction): routed projectors Q', K', routed power kernel φ_γ, "
        "(φ(Q) − λφ(Q'))((φ(K) − λφ(K'))ᵀV), normalised; O(N·d²)",
        backends=(), head_args=(), options=("linear_options",), twin=_twin_linear),
}

# The twin rules' explicit head arguments, and the kinds that take them (DiT config keys).
_EXPLICIT = {"signal_heads": ("gda",), "noise_heads": ("gda",), "num_kv_heads": ("diffv2",),
             "linear_heads": ("linear", "dydila")}


def _kinds_text(kinds: tuple) -> str:
    return " or ".join(f"attn_kind={k!r}" for k in kinds)


def get_attn_kind(name: Any) -> AttnKind:
    """The registry entry of ``name``, or a ``ValueError`` naming the closest kinds and all of them."""
    return ATTN_KINDS[check_choice("attn_kind", name, ATTN_KINDS)]


def twin_heads(attn_kind: str, dim: int, num_heads: int, **explicit: Optional[int]) -> dict:
    """Head arguments of ``attn_kind`` at the parameters of a standard model with ``num_heads`` heads of
    ``dim / num_heads`` (the parameter-twin rule). ``explicit`` may set ``signal_heads`` / ``noise_heads``
    (gda), ``num_kv_heads`` (diffv2) or ``linear_heads`` (linear, dydila); ``None`` values are ignored.

    >>> twin_heads("gda", 384, 6)
    {'num_heads': 4, 'noise_heads': 2}
    """
    kind = get_attn_kind(attn_kind)
    given = {k: v for k, v in explicit.items() if v is not None}
    for key in given:
        if key not in _EXPLICIT:
            raise TypeError(f"twin_heads() got an unexpected head argument {key!r}; accepted: {sorted(_EXPLICIT)}")
        if kind.name not in _EXPLICIT[key]:
            raise ValueError(f"{key}={given[key]} only applies to {_kinds_text(_EXPLICIT[key])}, got "
                             f"attn_kind={kind.name!r}; leave it None")
    return kind.twin(dim, num_heads, given)


def layer_heads(attn_kind: str, num_heads: int, *, noise_heads: Optional[int] = None,
                num_kv_heads: Optional[int] = None) -> dict:
    """The module keywords of ``attn_kind`` for the model head arguments (the head-layout rule)."""
    kind = get_attn_kind(attn_kind)
    extra = {"noise_heads": noise_heads, "num_kv_heads": num_kv_heads}
    for key, value in extra.items():
        if value is not None and key not in kind.head_args:
            owner = next(k.name for k in ATTN_KINDS.values() if key in k.head_args)
            raise ValueError(f"{key}={value} only applies to attn_kind={owner!r}, got attn_kind={kind.name!r}")
    if kind.name == "gda":
        if noise_heads is None:
            raise ValueError("attn_kind='gda' needs noise_heads (num_heads is the number of signal heads)")
        return {"signal_heads": num_heads, "noise_heads": noise_heads}
    if kind.name == "diffv2":
        return {"num_heads": num_heads, "num_kv_heads": num_kv_heads}
    return {"num_heads": num_heads}


def _kinds_taking(option: str) -> list[str]:
    return [k.name for k in ATTN_KINDS.values() if option in k.options]


def _is_default(option: str, value: Any) -> bool:
    return (value == OPTION_DEFAULTS[option] or value == PAPER_OPTIONS.get(option, OPTION_DEFAULTS[option])
            or (option == "lambda_init" and value is None) or (option == "linear_options" and value == {}))


def check_attn_backend(backend: Any, attn_kind: Optional[str] = None) -> str:
    """``backend`` if ``attn_kind`` (default: any kind) runs on it, else a ``ValueError`` saying which do."""
    check_choice("attn_backend", backend, BACKENDS)
    if attn_kind is None:
        return backend
    kind = get_attn_kind(attn_kind)
    if not kind.backends:
        if backend != OPTION_DEFAULTS["backend"]:
            raise ValueError(f"attn_kind={kind.name!r} has no kernel backends (one implementation), got "
                             f"attn_backend={backend!r}; backends apply to {_kinds_taking('backend')}")
    elif backend not in kind.backends:
        raise ValueError(f"attn_kind={kind.name!r} does not run on attn_backend={backend!r}; accepted: "
                         f"{list(kind.backends)}")
    return backend


def create_attention(attn_kind: str, dim: int, **kwargs) -> nn.Module:
    """Build an attention layer by kind: ``"standard"`` / ``"diff"`` / ``"linear"`` / ``"dydila"`` (``num_heads``),
    ``"gda"`` (``signal_heads``, ``noise_heads``) or ``"diffv2"`` (``num_heads``, ``num_kv_heads``), with timm
    ``Block`` keywords and the kind's options (``lambda_init``, ``lambda_mode``, ``head_norm``,
    ``backend``, ``linear_options``). Options a kind does not take are accepted at their defaults only, so a model can pass
    them to every kind and a real setting is never silently dropped."""
    kind = get_attn_kind(attn_kind)
    for option in OPTION_DEFAULTS:
        if option in kind.options or option not in kwargs:
            continue
        value = kwargs.pop(option)
        if not _is_default(option, value):
            raise ValueError(f"attn_kind={kind.name!r} takes no {option} (got {option}={value!r}); "
                             f"{option} applies to {_kinds_taking(option)}")
    if "backend" in kwargs:
        check_attn_backend(kwargs["backend"], kind.name)
    return kind.layer(dim, **kwargs)


def attention_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The diffvision attention layers inside ``model``."""
    layers = tuple(k.layer for k in ATTN_KINDS.values())
    return (m for m in model.modules() if isinstance(m, layers))


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Switch the kernel backend of every attention layer of ``model`` (a timm DIFF-ViT, a DIFF-DiT or any
    module holding diffvision attention layers). A model whose config records ``attn_backend`` (the DiT
    model) records the new value. Raises ``ValueError`` when no layer has a backend to choose or one of its
    kinds does not run on ``backend``."""
    layers = [m for m in attention_layers(model) if get_attn_kind(m.attn_kind).backends]
    check_choice("attn_backend", backend, BACKENDS)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer with a kernel backend to choose "
                         f"(standard attention is always SDPA); backends apply to {_kinds_taking('backend')}")
    for kind in sorted({m.attn_kind for m in layers}):
        check_attn_backend(backend, kind)
    for m in layers:
        m.backend = backend
    config = getattr(model, "config", None)
    if hasattr(model, "register_to_config") and config is not None and "attn_backend" in config:
        model.register_to_config(attn_backend=backend)


def rename_legacy_keywords(values: dict, where: str = "config") -> dict:
    """``values`` with the keywords of :data:`LEGACY_KEYWORDS` renamed to today's; both spellings at once
    must agree (a saved config, checkpoint or pipeline from before the rename loads as it was saved)."""
    out = dict(values)
    for old, new in LEGACY_KEYWORDS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        if new in out and out[new] is not None and out[new] != value:
            raise ValueError(f"{where} sets both {old}={value!r} (the old name) and {new}={out[new]!r}; "
                             f"keep {new} only")
        out[new] = value
    return out
