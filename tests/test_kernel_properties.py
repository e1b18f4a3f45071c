"""Property tests: random shapes, dtypes, masks and head groupings against the float64 reference;
NaN behaviour; numerical safety at long sequence length and large logits."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffvision.attention import differential_attention
from reference_attention import make_inputs, reference, rel_err

TOL = {torch.float64: 1e-9, torch.float32: 5e-5}


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2), Hn=st.integers(1, 3), group=st.integers(1, 3),
    N=st.integers(1, 24), M=st.integers(1, 24), d=st.sampled_from([4, 8, 16, 32]),
    dv=st.sampled_from([4, 12, 16, 64]), dtype=st.sampled_from([torch.float32, torch.float64]),
    mask_kind=st.sampled_from([None, "bool", "float", "causal"]), per_head=st.booleans(),
    backend=st.sampled_from(["math", "sdpa", "auto"]), seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_random_calls(B, Hn, group, N, M, d, dv, dtype, mask_kind, per_head, backend, seed):
    Hs = Hn * group
    inputs = make_inputs(B, Hs, Hn, N, M, d, dv, dtype, per_head, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = None
    if mask_kind == "bool":
        shape = [(B, 1, N, M), (N, M), (1, Hs, N, M), (B, Hs, 1, M)][seed % 4]
        mask = torch.rand(shape, generator=g) > 0.4
        mask[..., 0] = True  # every query keeps a key: fully masked rows are tested elsewhere
    elif mask_kind == "float":
        mask = torch.randn(B, 1, N, M, generator=g, dtype=torch.float64).to(dtype)
    out = differential_attention(*inputs, attn_mask=mask, is_causal=mask_kind == "causal", backend=backend)
    ref = reference(*inputs, mask=mask, causal=mask_kind == "causal")
    assert out.shape == (B, Hs, N, dv) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("which", [0, 1, 2, 3, 4])
def test_nan_input_never_gives_a_finite_wrong_result(backend, which):
    inputs = list(make_inputs(1, 2, 1, 6, 6, 8, 16, torch.float32))
    poisoned = inputs[which].clone()
    poisoned[0, 0, 2, 3] = float("nan")
    inputs[which] = poisoned
    out = differential_attention(*inputs, backend=backend)
    # a NaN query row poisons that row; a NaN key or value reaches every row that reads it
    assert torch.isnan(out).any()
    if which in (0, 2):  # q1 / q2 row 2 of head 0 (q2's head 0 feeds both signal heads: group of 2)
        rows_hit = torch.isnan(out).any(dim=-1)[0]
        assert rows_hit[:, 2].any() and not rows_hit[:, [0, 1, 3, 4, 5]].any()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_nan_lambda_gives_nan(backend):
    inputs = list(make_inputs(1, 2, 2, 4, 4, 8, 16))
    inputs[5] = torch.tensor(float("nan"))
    assert torch.isnan(differential_attention(*inputs, backend=backend)).all()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_bf16_long_sequence_and_large_logits_stay_finite(backend):
    """N = 4096 in bfloat16 with logits of several hundred: no NaN/inf, close to float64."""
    q1, k1, q2, k2, v, lam = make_inputs(1, 2, 1, 4096, 4096, 64, 128, torch.float32, seed=11)
    q1, q2 = q1 * 12.0, q2 * 12.0  # scores ~ 12 * sqrt(64) / 8 * N(0,1)-scale: |s| up to ~500
    args = [t.to(torch.bfloat16) for t in (q1, k1, q2, k2, v)] + [lam.to(torch.bfloat16)]
    out = differential_attention(*args, backend=backend)
    assert torch.isfinite(out).all()
    ref = reference(*[t.double() for t in args])
    assert rel_err(out, ref) < 5e-2
