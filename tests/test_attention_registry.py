"""The attention registry: one vocabulary (attn_kind, attn_backend) and one place for the head rules,
backends and options that every model family, config and tool reads."""
import inspect

import pytest
import torch
import torch.nn as nn

from diffvision.attention import (
    ATTN_KINDS,
    PAPER_OPTIONS,
    VISION_OPTIONS,
    BACKENDS,
    MultiHeadAttention,
    check_attn_backend,
    create_attention,
    layer_heads,
    set_attention_backend,
    twin_heads,
)
from diffvision.attention.registry import rename_legacy_keywords


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_every_kind_names_its_layer_and_backends():
    assert list(ATTN_KINDS) == ["standard", "diff", "gda", "diffv2", "linear", "dydila"]
    for name, kind in ATTN_KINDS.items():
        assert kind.layer.attn_kind == name
        assert set(kind.backends) <= set(BACKENDS)
        layer = create_attention(name, 192, **layer_heads(name, **twin_heads(name, 192, 3)))
        assert isinstance(layer, kind.layer) and layer.layout["attn_kind"] == name
    assert ATTN_KINDS["diffv2"].backends == ("auto", "math", "sdpa")  # one SDPA call, no Triton kernel of ours
    assert ATTN_KINDS["standard"].backends == ATTN_KINDS["linear"].backends == ATTN_KINDS["dydila"].backends == ()


def test_one_keyword_for_the_kind_and_one_for_the_backend_in_both_families():
    from diffvision.diffusion import DiffDiTTransformer2DModel
    from diffvision.lightning import DiffusionModule
    from diffvision.models import DiffVisionTransformer

    # the ViTs default to the vision choices of the variant study, the DiT (not yet studied) to the paper's
    for init, options in ((DiffVisionTransformer.__init__, VISION_OPTIONS),
                          (DiffDiTTransformer2DModel.__init__, PAPER_OPTIONS)):
        params = inspect.signature(init).parameters
        assert params["attn_kind"].default == "diff" and params["attn_backend"].default == "auto"
        assert {k: params[k].default for k in options} == options
    assert "attn_kind" in inspect.signature(DiffusionModule.__init__).parameters


# Parameter-twin rule, written out by hand: (kind, width, standard heads) -> head arguments
TWINS = [
    ("standard", 192, 3, {"num_heads": 3}),
    ("diff", 384, 6, {"num_heads": 3}),            # H/2 differential heads
    ("diff", 192, 3, {"num_heads": 3}),            # odd H: H heads of half width
    ("gda", 384, 6, {"num_heads": 4, "noise_heads": 2}),   # 2:1 with signal + noise = H
    ("gda", 192, 3, {"num_heads": 2, "noise_heads": 1}),
    ("diffv2", 384, 6, {"num_heads": 6, "num_kv_heads": 3}),    # H output heads on H/2 key/value heads
    ("diffv2", 768, 12, {"num_heads": 12, "num_kv_heads": 6}),
    ("diffv2", 192, 3, {"num_heads": 4, "num_kv_heads": 2}),    # odd H: 4 heads of 48 (closest width to 64)
    ("diffv2", 1152, 16, {"num_heads": 16, "num_kv_heads": 8}),  # DiT-XL, heads of 72
]


@pytest.mark.parametrize("kind,dim,H,expected", TWINS)
def test_twin_rule(kind, dim, H, expected):
    assert twin_heads(kind, dim, H) == expected


# the softmax kinds; the linear kinds' twin rule (few heads, + conv / banks) is tests/test_linear_attention.py's
SOFTMAX_KINDS = [k for k in ATTN_KINDS if k not in ("linear", "dydila")]


@pytest.mark.parametrize("kind", SOFTMAX_KINDS)
@pytest.mark.parametrize("dim,H", [(192, 3), (384, 6), (768, 12), (1024, 16)])
def test_twins_have_the_standard_models_parameters_within_one_percent(kind, dim, H):
    if kind == "gda" and H % 3:
        pytest.skip("no 2:1 split of H (explicit counts needed; see test_gda_rule_errors_propose_splits)")
    std = MultiHeadAttention(dim, num_heads=H, qkv_bias=True)
    twin = create_attention(kind, dim, qkv_bias=True, **layer_heads(kind, **twin_heads(kind, dim, H)))
    assert abs(n_params(twin) - n_params(std)) <= 0.01 * n_params(std)
    assert twin.qkv.weight.shape == std.qkv.weight.shape and twin.proj.weight.shape == std.proj.weight.shape


def test_gda_rule_errors_propose_splits():
    with pytest.raises(ValueError, match="divisible by 3.*no split with signal_heads > noise_heads"):
        twin_heads("gda", 1024, 16)  # DiT-L: no 2:1 split of 16 heads, and no Hs > Hn split tiles 1024
    with pytest.raises(ValueError, match="signal_heads=12, noise_heads=4"):
        twin_heads("gda", 1152, 16)  # DiT-XL: the error proposes working splits, 12:4 keeps d = 72
    assert twin_heads("gda", 1152, 16, signal_heads=12, noise_heads=4) == {"num_heads": 12, "noise_heads": 4}
    with pytest.raises(ValueError, match="do not tile width 1024"):
        twin_heads("gda", 1024, 16, signal_heads=12, noise_heads=4)
    with pytest.raises(ValueError, match="positive multiple"):
        twin_heads("gda", 48, 6, signal_heads=4, noise_heads=3)
    with pytest.raises(ValueError, match="both signal_heads and noise_heads"):
        twin_heads("gda", 48, 6, signal_heads=4)
    with pytest.raises(ValueError, match="signal_heads=4 only applies to attn_kind='gda'"):
        twin_heads("diff", 48, 6, signal_heads=4, noise_heads=2)
    with pytest.raises(ValueError, match="even attention_head_dim"):
        twin_heads("diff", 15, 3)
    with pytest.raises(ValueError, match=r"unknown attn_kind 'lineaer' \(did you mean 'linear'"):
        twin_heads("lineaer", 48, 6)
    assert twin_heads("diffv2", 384, 6, num_kv_heads=1) == {"num_heads": 6, "num_kv_heads": 1}


def test_head_layout_rule():
    assert layer_heads("diff", 3) == {"num_heads": 3}
    assert layer_heads("gda", 4, noise_heads=2) == {"signal_heads": 4, "noise_heads": 2}
    assert layer_heads("diffv2", 6) == {"num_heads": 6, "num_kv_heads": None}
    with pytest.raises(ValueError, match="needs noise_heads"):
        layer_heads("gda", 4)
    with pytest.raises(ValueError, match="noise_heads=1 only applies to attn_kind='gda', got attn_kind='diffv2'"):
        layer_heads("diffv2", 4, noise_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads=2 only applies to attn_kind='diffv2'"):
        layer_heads("standard", 4, num_kv_heads=2)


def test_one_backend_check():
    assert check_attn_backend("triton", "diff") == "triton"
    with pytest.raises(ValueError, match=r"unknown attn_backend 'sdp' \(did you mean 'sdpa'"):
        check_attn_backend("sdp")
    with pytest.raises(ValueError, match=r"attn_kind='diffv2' does not run on attn_backend='triton'; accepted: \['auto', 'math', 'sdpa'\]"):
        check_attn_backend("triton", "diffv2")
    with pytest.raises(ValueError, match="attn_kind='standard' has no kernel backends"):
        check_attn_backend("math", "standard")
    assert check_attn_backend("auto", "standard") == "auto"


def test_set_attention_backend_on_any_module_tree():
    mixed = nn.Sequential(create_attention("diff", 32, num_heads=2), create_attention("diffv2", 32, num_heads=4),
                          create_attention("standard", 32, num_heads=4))
    set_attention_backend(mixed, "math")
    assert [getattr(m, "backend", None) for m in mixed] == ["math", "math", None]
    with pytest.raises(ValueError, match="attn_kind='diffv2' does not run on attn_backend='triton'"):
        set_attention_backend(mixed, "triton")
    assert [getattr(m, "backend", None) for m in mixed] == ["math", "math", None]  # nothing half-switched
    with pytest.raises(ValueError, match="Sequential has no attention layer with a kernel backend"):
        set_attention_backend(nn.Sequential(MultiHeadAttention(32, 4)), "sdpa")


def test_legacy_keywords_are_renamed_and_a_disagreement_is_an_error():
    assert rename_legacy_keywords({"attention_type": "gda", "diff_attention_backend": "sdpa", "x": 1}) == \
        {"attn_kind": "gda", "attn_backend": "sdpa", "x": 1}
    assert rename_legacy_keywords({"attention_type": None, "attn_kind": "diff"}) == {"attn_kind": "diff"}
    assert rename_legacy_keywords({"attention_type": "gda", "attn_kind": "gda"}) == {"attn_kind": "gda"}
    with pytest.raises(ValueError, match="sets both attention_type='gda' .* and attn_kind='diff'"):
        rename_legacy_keywords({"attention_type": "gda", "attn_kind": "diff"})


def test_create_attention_runs_every_kind_through_one_interface():
    x = torch.randn(2, 6, 48, requires_grad=True)
    for kind in SOFTMAX_KINDS:  # masks need an N×N map: the linear kinds refuse them (test_linear_attention.py)
        m = create_attention(kind, 48, qkv_bias=True, qk_norm=True, scale_norm=True, attn_drop=0.1, proj_drop=0.1,
                             norm_layer=nn.LayerNorm, **layer_heads(kind, **twin_heads(kind, 48, 6)))
        out = m(x)
        assert out.shape == x.shape
        out.sum().backward()
        m.eval()
        mask = torch.ones(6, 6, dtype=torch.bool).tril()
        torch.testing.assert_close(m(x, is_causal=True), m(x, attn_mask=mask), atol=1e-6, rtol=1e-6)
