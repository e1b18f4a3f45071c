"""DIFF V2: differential_attention_v2 against an independent float64 implementation, and the module against
the official formulation (microsoft/unilm Diff-Transformer-V2, multihead_flashdiffv2.py) re-stated here.

Tolerances (relative, ‖out − ref‖ / ‖ref‖) as for the DIFF kernel: float64 1e-10, float32 2e-5, bfloat16 3e-2.
"""
import math

import pytest
import torch
import torch.nn as nn

from diffvision.attention import DifferentialAttentionV2, MultiHeadAttention, differential_attention_v2
from reference_attention import make_inputs_v2, reference_v2, rel_err

BACKENDS = ["math", "sdpa"]
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_mask(kind, B, Q, N, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool_2d":  # (N, M), every row keeps its first key
        m = torch.rand(N, M, generator=g) > 0.3
        m[:, 0] = True
        return m
    if kind == "bool_per_batch":  # (B, 1, N, M)
        m = torch.rand(B, 1, N, M, generator=g) > 0.5
        m[..., 0] = True
        return m
    if kind == "float_per_query_head":  # (1, 2h, 1, M): a key bias per query head
        return torch.randn(1, Q, 1, M, generator=g, dtype=torch.float64)
    if kind == "float_full":
        return torch.randn(B, Q, N, M, generator=g, dtype=torch.float64)
    raise AssertionError(kind)


# (B, h, h_kv, N, M, d, dv, mask, causal, λ shape): GQA ratios 2h/h_kv of 2, 4 and 8
CASES = [
    (2, 2, 2, 7, 7, 16, 16, None, False, "per_token"),       # 2h/h_kv = 2
    (1, 4, 2, 9, 13, 8, 8, "bool_2d", False, "per_token"),    # 4, N != M
    (2, 4, 1, 6, 6, 8, 12, None, True, "per_head"),           # 8, causal, dv != d
    (2, 6, 3, 5, 11, 16, 16, "float_per_query_head", False, "scalar"),  # 4
    (1, 8, 2, 10, 10, 8, 8, "bool_per_batch", False, "per_token"),      # 8
    (2, 2, 1, 12, 9, 4, 4, "float_full", False, "per_batch"),           # 4
    (1, 1, 1, 1, 1, 8, 8, None, False, "per_token"),          # one query, one key
]
LAM_SHAPES = {"per_token": lambda B, h, N: (B, h, N), "per_head": lambda B, h, N: (h, 1),
              "scalar": lambda B, h, N: (), "per_batch": lambda B, h, N: (B, 1, 1)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}kv{}N{}M{}d{}dv{}-{}-causal{}-lam_{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_grads_match_float64_reference(backend, case, dtype):
    B, h, Hkv, N, M, d, dv, mask_kind, causal, lam_kind = case
    inputs = make_inputs_v2(B, h, Hkv, N, M, d, dv, LAM_SHAPES[lam_kind](B, h, N), dtype)
    mask = make_mask(mask_kind, B, 2 * h, N, M)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = differential_attention_v2(*leaves, attn_mask=mask, is_causal=causal, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = reference_v2(*ref_leaves, mask=mask, causal=causal)
    assert out.shape == (B, h, N, dv) and out.dtype == dtype
    assert rel_err(out, ref) < REL_TOL[dtype]

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for name, got, want in zip(["q", "k", "v", "lam"], leaves, ref_leaves):
        assert got.grad is not None and got.grad.shape == got.shape, name
        assert rel_err(got.grad, want.grad) < 10 * REL_TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_close_to_reference(backend):
    inputs = make_inputs_v2(2, 6, 3, 33, 33, 32, 32, (2, 6, 33), torch.bfloat16)
    out = differential_attention_v2(*inputs, backend=backend)
    assert out.dtype == torch.bfloat16 and rel_err(out, reference_v2(*inputs)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_zero_is_ordinary_gqa_attention_of_the_even_query_heads(backend):
    """With λ = 0 the output is the softmax attention of query heads 0, 2, 4, ... alone (an identity the
    formula implies, checked against torch's own SDPA on the expanded key/value heads)."""
    q, k, v, _ = make_inputs_v2(2, 4, 2, 9, 9, 16, 16, (), torch.float64)
    out = differential_attention_v2(q, k, v, torch.zeros((), dtype=torch.float64), backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, 0::2], k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_query_row_with_no_visible_key_gives_zeros_and_finite_grads(backend):
    q, k, v, lam = make_inputs_v2(1, 2, 1, 4, 5, 8, 8, (1, 2, 4), torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, lam)]
    out = differential_attention_v2(*leaves, attn_mask=mask, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = reference_v2(q, k, v, lam, mask=mask)
    keep = torch.tensor([0, 1, 3])
    assert rel_err(out[:, :, keep], ref[:, :, keep]) < 1e-10
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_dropout_drops_in_training_and_is_off_at_zero():
    q, k, v, lam = make_inputs_v2(2, 2, 1, 16, 16, 8, 8, (2, 2, 16))
    clean = differential_attention_v2(q, k, v, lam)
    torch.manual_seed(0)
    dropped = differential_attention_v2(q, k, v, lam, dropout_p=0.5)
    assert dropped.shape == clean.shape and torch.isfinite(dropped).all() and not torch.allclose(dropped, clean)
    torch.testing.assert_close(differential_attention_v2(q, k, v, lam, dropout_p=0.0), clean)


def _good():
    return list(make_inputs_v2(2, 4, 2, 5, 6, 8, 8, (2, 4, 5)))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(0, torch.randn(2, 7, 5, 8)), r"q has 7 query heads .*even number 2h"),
    (lambda a: a.__setitem__(0, torch.randn(2, 6, 5, 8)), r"2h=6 query heads and k, v have h_kv=2 heads .*h_kv dividing h=3"),
    (lambda a: a.__setitem__(1, torch.randn(2, 2, 6, 4)), r"k has shape \(2, 2, 6, 4\), expected \(2, 2, 6, 8\)"),
    (lambda a: a.__setitem__(2, torch.randn(2, 2, 7, 8)), r"v has shape \(2, 2, 7, 8\), expected \(2, 2, 6, 8\)"),
    (lambda a: a.__setitem__(3, torch.rand(2, 5, 5)), r"lam has shape \(2, 5, 5\), expected a shape broadcastable to \(B, h, N\) = \(2, 4, 5\)"),
    (lambda a: a.__setitem__(3, 0.5), r"lam must be a torch.Tensor"),
    (lambda a: a.__setitem__(2, torch.randn(2, 2, 6, 8, dtype=torch.float64)), r"must share one dtype"),
    (lambda a: a.__setitem__(1, torch.randn(2, 2, 6)), r"k must have 4 dims"),
])
def test_bad_arguments_name_what_is_wrong(change, match):
    args = _good()
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        differential_attention_v2(*args)


def test_bad_options_name_what_is_accepted():
    args = _good()
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 5, 6\), expected a shape broadcastable to \(B, 2h, N, M\)"):
        differential_attention_v2(*args, attn_mask=torch.ones(3, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"backend 'triton' has no DIFF V2 kernel.*accepted: \['auto', 'math', 'sdpa'\]"):
        differential_attention_v2(*args, backend="triton")
    with pytest.raises(ValueError, match=r"unknown backend 'flsh'"):
        differential_attention_v2(*args, backend="flsh")
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        differential_attention_v2(*args, attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------

def official_forward(m: DifferentialAttentionV2, x: torch.Tensor) -> torch.Tensor:
    """Float64 re-statement of the official MultiheadFlashDiffV2.forward without rotary embeddings and
    without the causal mask (a vision encoder): q/k/v projections (here: the rows of the fused qkv), q
    viewed (B, N, 2h, d), flash attention with GQA (query head j reads key/value head j // (2h / h_kv)),
    attn[:, :, 0::2] − sigmoid(lambda_proj(x)) · attn[:, :, 1::2], o_proj."""
    x = x.double()
    B, N, _ = x.shape
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    W, b = m.qkv.weight.double(), (None if m.qkv.bias is None else m.qkv.bias.double())
    q, k, v = torch.nn.functional.linear(x, W, b).split([2 * h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(B, N, 2 * h, d), k.view(B, N, hkv, d), v.view(B, N, hkv, d)
    attn = torch.empty(B, N, 2 * h, d, dtype=torch.float64)
    for j in range(2 * h):
        g = j // (2 * h // hkv)
        w = torch.softmax(torch.einsum("bnd,bmd->bnm", q[:, :, j], k[:, :, g]) / math.sqrt(d), dim=-1)
        attn[:, :, j] = w @ v[:, :, g]
    lam = torch.sigmoid(torch.nn.functional.linear(x, m.lambda_proj.weight.double()))  # (B, N, h)
    out = attn[:, :, 0::2] - lam.unsqueeze(-1) * attn[:, :, 1::2]
    return torch.nn.functional.linear(out.reshape(B, N, h * d), m.proj.weight.double(), m.proj.bias.double())


def randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,heads,kv,qkv_bias", [(48, 6, None, False), (48, 4, 1, True), (64, 4, 4, False)])
def test_module_matches_the_official_formulation(backend, dim, heads, kv, qkv_bias):
    m = randomise(DifferentialAttentionV2(dim, num_heads=heads, num_kv_heads=kv, qkv_bias=qkv_bias,
                                          backend=backend)).double()
    x = torch.randn(2, 9, dim, dtype=torch.float64)
    torch.testing.assert_close(m(x), official_forward(m, x), rtol=1e-10, atol=1e-12)


def test_parameter_matched_layout_has_the_standard_twins_projections():
    std, v2 = MultiHeadAttention(384, num_heads=6, qkv_bias=True), DifferentialAttentionV2(384, 6, qkv_bias=True)
    assert (v2.num_heads, v2.num_kv_heads, v2.head_dim) == (6, 3, 64)
    assert v2.qkv.weight.shape == std.qkv.weight.shape == (3 * 384, 384)  # 2h·d + 2·h_kv·d = 3·dim
    assert v2.proj.weight.shape == std.proj.weight.shape
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(v2) - n(std) == 384 * 6  # W_λ only (no bias, no norm, no λ vectors)
    free = DifferentialAttentionV2(384, 6, num_kv_heads=1, head_dim=32)  # as the official code allows
    assert free.qkv.weight.shape == ((12 + 2) * 32, 384) and free.proj.weight.shape == (384, 6 * 32)


def test_module_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"num_heads=3 is odd: the parameter-matched layout uses num_kv_heads = num_heads/2"):
        DifferentialAttentionV2(48, num_heads=3)
    with pytest.raises(ValueError, match=r"num_kv_heads=4 must divide num_heads=6"):
        DifferentialAttentionV2(48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"dim=50 must be divisible by num_heads=4"):
        DifferentialAttentionV2(50, num_heads=4)
    assert DifferentialAttentionV2(48, num_heads=3, num_kv_heads=1).num_kv_heads == 1


def test_attention_maps_are_what_forward_applies():
    m = randomise(DifferentialAttentionV2(32, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    maps = m.attention_maps(x)
    assert maps["signal"].shape == maps["noise"].shape == maps["difference"].shape == (2, 4, 7, 7)
    assert maps["lambda"].shape == (2, 4, 7) and ((maps["lambda"] > 0) & (maps["lambda"] < 1)).all()
    torch.testing.assert_close(maps["signal"].sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    _, _, v = m.split_qkv(x)
    v_pairs = v.repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)  # output head i reads value head i // 2
    out = (maps["difference"] @ v_pairs).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(m(x), m.proj(m.norm(out)), rtol=1e-10, atol=1e-12)
    causal = m.attention_maps(x, is_causal=True)["signal"]
    assert torch.equal(causal.triu(1), torch.zeros_like(causal))


def test_init_weights_restores_the_official_lambda_projection_init():
    torch.manual_seed(0)
    m = DifferentialAttentionV2(768, num_heads=12)
    nn.init.zeros_(m.lambda_proj.weight)  # what a model-wide init might do
    m.init_weights()
    w = m.lambda_proj.weight
    assert w.abs().max() <= 1 / math.sqrt(768) and w.std().item() == pytest.approx(1 / math.sqrt(3 * 768), rel=0.05)


def test_module_trains_through_lambda():
    m = DifferentialAttentionV2(32, num_heads=4)
    m(torch.randn(2, 5, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
