"""What a ``DiffDiTTransformer2DModel`` config may hold: the DiT sizes by name and the config checks.

``DIT_PRESETS`` names DiT's model sizes (``"DiT-S/2"``, ...; ``DiffDiTTransformer2DModel.from_preset``),
``ACTIVATIONS`` the MLP activations the model (and diffusers' DiT, for the conversion) builds, and
:func:`validate_config` refuses a config the model cannot be built from, with a message that names the
value. Kept apart from the model file so that it holds the model only, as diffusers' model files do.
"""
from __future__ import annotations

from typing import Any, Mapping

from diffvision.attention import check_attn_backend
from diffvision.choices import check_choice

__all__ = ["ACTIVATIONS", "DIT_PRESETS", "validate_config"]

ACTIVATIONS = ("gelu-approximate", "gelu")

# DiT model sizes (Peebles & Xie, 2023, Table 1) × patch sizes 2 / 4 / 8.
_DIT_SIZES = {
    "S": dict(num_layers=12, hidden_size=384, num_heads=6),
    "B": dict(num_layers=12, hidden_size=768, num_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "XL": dict(num_layers=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(
        num_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        patch_size=patch,
    )
    for size, cfg in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}


def validate_config(cfg: Mapping[str, Any], dim: int) -> None:
    """Raise ``ValueError`` for a ``DiffDiTTransformer2DModel`` config (hidden size ``dim``) that cannot be built."""
    positive = {k: cfg[k] for k in ("num_attention_heads", "attention_head_dim", "in_channels",
                                    "num_layers", "sample_size", "patch_size", "num_classes")}
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cfg["out_channels"] is not None and (not isinstance(cfg["out_channels"], int) or cfg["out_channels"] <= 0):
        raise ValueError(f"out_channels must be None or a positive int, got {cfg['out_channels']!r}")
    if cfg["sample_size"] % cfg["patch_size"] != 0:
        raise ValueError(f"sample_size={cfg['sample_size']} must be divisible by patch_size={cfg['patch_size']}")
    if dim % 4 != 0:
        raise ValueError(
            f"hidden size num_attention_heads*attention_head_dim = {dim} must be divisible by 4 "
            f"(the 2-D sin-cos position table splits it in four)")
    if not 0.0 <= cfg["class_dropout_prob"] < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {cfg['class_dropout_prob']}")
    check_choice("activation_fn", cfg["activation_fn"], ACTIVATIONS)
    check_attn_backend(cfg["attn_backend"], cfg["attn_kind"])  # the kind first, then its backends
