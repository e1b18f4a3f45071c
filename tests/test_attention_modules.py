"""Attention modules against the paper's formulas, re-derived here in float64."""
import math

import pytest
import torch
import torch.nn as nn

from diffvision.attention import (
    DifferentialAttention,
    GroupedDifferentialAttention,
    MultiHeadAttention,
    create_attention,
    lambda_init_schedule,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def official_diff_attn_forward(m: DifferentialAttention, x: torch.Tensor) -> torch.Tensor:
    """Float64 re-statement of the official multihead_diffattn forward (unilm/Diff-Transformer):
    q, k viewed as 2h heads of d, attention weights viewed (h, 2), w[:, :, 0] − λ w[:, :, 1], then
    RMSNorm over 2d with learnable scale, × (1 − λinit), output projection."""
    x = x.double()
    B, N, C = x.shape
    h, d = m.num_heads, C // (2 * m.num_heads)
    W, b = m.qkv.weight.double(), None if m.qkv.bias is None else m.qkv.bias.double()
    q, k, v = torch.nn.functional.linear(x, W, b).split(C, dim=-1)
    q = q.view(B, N, 2 * h, d).transpose(1, 2)
    k = k.view(B, N, 2 * h, d).transpose(1, 2)
    v = v.view(B, N, h, 2 * d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).view(B, h, 2, N, N)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * m.depth)
    lam = (torch.exp((m.lambda_q1.double() * m.lambda_k1.double()).sum())
           - torch.exp((m.lambda_q2.double() * m.lambda_k2.double()).sum()) + lam_init)
    o = (w[:, :, 0] - lam * w[:, :, 1]) @ v
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.sub_norm.weight.double()
    o = (o * (1 - lam_init)).transpose(1, 2).reshape(B, N, C)
    return torch.nn.functional.linear(o, m.proj.weight.double(), m.proj.bias.double())


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (p.dim() == 1) * 0.2)
    return module


@pytest.mark.parametrize("depth", [0, 3, 11])
def test_lambda_init_schedule_is_the_paper_formula(depth):
    assert lambda_init_schedule(depth) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * depth), abs=1e-15)
    assert DifferentialAttention(32, 2, depth=depth).lambda_init == pytest.approx(lambda_init_schedule(depth))
    assert lambda_init_schedule(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="depth"):
        lambda_init_schedule(-1)


def test_lambda_reparameterisation_and_init_distribution():
    torch.manual_seed(0)
    m = DifferentialAttention(512, num_heads=2, depth=4, lambda_init=0.5)  # d = 128
    assert m.lambda_init == 0.5  # a configured constant overrides the schedule
    for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2):
        assert p.dtype == torch.float32 and p.shape == (128,)
    stds = torch.stack([p.detach() for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2)]).std()
    assert 0.08 < stds.item() < 0.12  # N(0, 0.1)
    with torch.no_grad():
        expected = (math.exp(float((m.lambda_q1 * m.lambda_k1).sum()))
                    - math.exp(float((m.lambda_q2 * m.lambda_k2).sum())) + 0.5)
    assert m.lam().item() == pytest.approx(expected, rel=1e-6)
    m.lam().backward()
    assert all(p.grad is not None for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2))


@pytest.mark.parametrize("depth,qkv_bias", [(0, False), (5, True)])
def test_diff_module_matches_official_formulation(depth, qkv_bias):
    m = randomise(DifferentialAttention(48, num_heads=3, depth=depth, qkv_bias=qkv_bias)).double()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    assert torch.allclose(m(x), official_diff_attn_forward(m, x), rtol=1e-10, atol=1e-12)


def test_gda_with_equal_heads_equals_diff():
    diff = randomise(DifferentialAttention(64, num_heads=4, depth=2)).double()
    gda = GroupedDifferentialAttention(64, signal_heads=4, noise_heads=4, depth=2).double()
    gda.load_state_dict(diff.state_dict())
    x = torch.randn(3, 10, 64, dtype=torch.float64)
    assert torch.allclose(gda(x), diff(x), rtol=1e-12, atol=1e-13)
    assert torch.allclose(gda(x), official_diff_attn_forward(diff, x), rtol=1e-10, atol=1e-12)


def test_gda_shares_noise_maps_across_its_group():
    """GDA 4:2 by hand: signal heads 0,1 use noise head 0; heads 2,3 use noise head 1."""
    m = randomise(GroupedDifferentialAttention(96, signal_heads=4, noise_heads=2, depth=1)).double()
    assert (m.head_dim, m.value_head_dim) == (16, 24)
    x = torch.randn(2, 7, 96, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = torch.nn.functional.linear(x, m.qkv.weight).split(C, dim=-1)
    # layout per group: [signal, signal, noise] sub-heads of 16
    q, k = q.view(B, N, 2, 3, 16), k.view(B, N, 2, 3, 16)
    v = v.view(B, N, 4, 24)
    lam = m.lam().double()
    outs = []
    for i in range(4):
        g, j = divmod(i, 2)
        a1 = torch.softmax(q[:, :, g, j] @ k[:, :, g, j].transpose(-1, -2) / 4.0, -1)
        a2 = torch.softmax(q[:, :, g, 2] @ k[:, :, g, 2].transpose(-1, -2) / 4.0, -1)
        o = (a1 - lam * a2) @ v[:, :, i]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.sub_norm.weight
        outs.append(o * (1 - m.lambda_init))
    expected = torch.nn.functional.linear(torch.cat(outs, -1), m.proj.weight, m.proj.bias)
    assert torch.allclose(m(x), expected, rtol=1e-10, atol=1e-12)


def test_parameter_counts_match_standard_mha():
    std = MultiHeadAttention(384, num_heads=6)
    diff = DifferentialAttention(384, num_heads=3)
    gda = GroupedDifferentialAttention(384, signal_heads=4, noise_heads=2)
    # extra: 4 λ vectors of d and one RMSNorm scale of dv
    assert n_params(diff) - n_params(std) == 4 * 64 + 128
    assert n_params(gda) - n_params(std) == 4 * 64 + 96
    assert std.qkv.weight.shape == diff.qkv.weight.shape == gda.qkv.weight.shape


def test_standard_twin_is_softmax_mha():
    m = randomise(MultiHeadAttention(32, num_heads=4, qkv_bias=True)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ref = nn.MultiheadAttention(32, 4, bias=True, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    assert torch.allclose(m(x), ref(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,kwargs", [
    ("standard", dict(num_heads=4)),
    ("diff", dict(num_heads=2, depth=3)),
    ("gda", dict(signal_heads=4, noise_heads=2)),
])
def test_one_interface(kind, kwargs):
    m = create_attention(kind, 48, qkv_bias=True, qk_norm=True, scale_norm=True, attn_drop=0.1,
                         proj_drop=0.1, norm_layer=nn.LayerNorm, **kwargs)
    x = torch.randn(2, 6, 48, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    m.eval()
    causal = m(x, is_causal=True)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.allclose(causal, m(x, attn_mask=mask), atol=1e-6)
    # causal: the first token cannot see the others
    y = x.detach().clone()
    y[:, 1:] += 1.0
    assert torch.allclose(m(y, is_causal=True)[:, 0], causal[:, 0], atol=1e-6)


def test_module_errors():
    with pytest.raises(ValueError, match="divisible by 2 \\* num_heads=6"):
        DifferentialAttention(40, num_heads=3)
    with pytest.raises(ValueError, match="multiple of noise_heads"):
        GroupedDifferentialAttention(60, signal_heads=4, noise_heads=3)
    with pytest.raises(ValueError, match="signal_heads \\+ noise_heads"):
        GroupedDifferentialAttention(64, signal_heads=4, noise_heads=2)
    with pytest.raises(ValueError, match="attn_kind='standard' takes no backend .*applies to \\['diff', 'gda', 'diffv2'\\]"):
        create_attention("standard", 32, num_heads=2, backend="math")
    with pytest.raises(ValueError, match="attn_kind='diffv2' takes no lambda_init"):
        create_attention("diffv2", 32, num_heads=2, lambda_init=0.5)
    with pytest.raises(ValueError, match="attn_kind='diffv2' takes no lambda_mode"):
        create_attention("diffv2", 32, num_heads=2, lambda_mode="scalar")
    # the defaults of options a kind does not take (the models' and the paper's) are accepted, so a model can
    # pass them to every kind and configs saved under either still load
    assert isinstance(create_attention("standard", 32, num_heads=2, lambda_init=None, lambda_mode="reparam",
                                       head_norm=True, backend="auto"), MultiHeadAttention)
    assert isinstance(create_attention("standard", 32, num_heads=2, lambda_init=0.8, lambda_mode="fixed",
                                       head_norm=True), MultiHeadAttention)
    with pytest.raises(ValueError, match="unknown attn_kind 'flash'"):
        create_attention("flash", 32, num_heads=2)
