"""differential_attention against an independent float64 implementation written here.

Tolerances (relative, ‖out − ref‖ / ‖ref‖): float64 inputs 1e-10; float32 2e-5; bfloat16 3e-2.
"""
import pytest
import torch

from diffvision.attention import BACKENDS, differential_attention
from reference_attention import make_inputs, reference, rel_err

CPU_BACKENDS = ["math", "sdpa"]
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_mask(kind, B, Hs, N, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool_2d":  # (N, M), every row keeps at least its first key
        m = torch.rand(N, M, generator=g) > 0.3
        m[:, 0] = True
        return m
    if kind == "bool_per_batch":
        m = torch.rand(B, 1, N, M, generator=g) > 0.5
        m[..., 0] = True
        return m
    if kind == "float_per_head":  # (1, Hs, 1, M): an additive key bias per head
        return torch.randn(1, Hs, 1, M, generator=g, dtype=torch.float64)
    if kind == "float_full":
        return torch.randn(B, Hs, N, M, generator=g, dtype=torch.float64)
    raise AssertionError(kind)


# (B, Hs, Hn, N, M, d, dv, mask, causal, per-head λ)
CASES = [
    (2, 2, 2, 7, 7, 16, 32, None, False, False),
    (1, 3, 1, 1, 1, 8, 16, None, False, False),
    (2, 4, 2, 197, 197, 32, 64, None, False, True),
    (1, 3, 3, 9, 13, 64, 128, "bool_2d", False, False),
    (2, 4, 1, 7, 11, 16, 48, "float_per_head", False, True),
    (2, 2, 1, 12, 12, 8, 16, None, True, False),
    (1, 4, 4, 10, 6, 32, 32, None, True, True),
    (2, 4, 2, 5, 9, 16, 32, "bool_per_batch", False, False),
    (1, 6, 2, 8, 8, 8, 16, "float_full", False, True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hs{}Hn{}N{}M{}d{}dv{}-{}-causal{}-lam{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_grads_match_float64_reference(backend, case, dtype):
    B, Hs, Hn, N, M, d, dv, mask_kind, causal, per_head = case
    inputs = make_inputs(B, Hs, Hn, N, M, d, dv, dtype, per_head)
    mask = make_mask(mask_kind, B, Hs, N, M)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = differential_attention(*leaves, attn_mask=mask, is_causal=causal, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = reference(*ref_leaves, mask=mask, causal=causal)
    assert out.shape == (B, Hs, N, dv) and out.dtype == dtype
    assert rel_err(out, ref) < REL_TOL[dtype]

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for name, got, want in zip(["q1", "k1", "q2", "k2", "v", "lam"], leaves, ref_leaves):
        assert got.grad is not None, name
        assert rel_err(got.grad, want.grad) < 10 * REL_TOL[dtype], name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_close_to_reference(backend):
    inputs = make_inputs(2, 4, 2, 33, 33, 32, 64, torch.bfloat16, per_head_lam=True)
    out = differential_attention(*inputs, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(*inputs)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Hs,Hn,causal", [(2, 2, False), (2, 1, True), (3, 1, False)])
def test_gradcheck_float64(backend, Hs, Hn, causal):
    inputs = [t.requires_grad_(True) for t in make_inputs(1, Hs, Hn, 4, 5 if not causal else 4, 3, 4,
                                                       torch.float64, per_head_lam=Hs == 3)]
    fn = lambda *a: differential_attention(*a, is_causal=causal, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lambda_zero_is_softmax_attention_of_signal_path(backend):
    q1, k1, q2, k2, v, _ = make_inputs(2, 3, 1, 11, 11, 16, 32, torch.float64)
    out = differential_attention(q1, k1, q2, k2, v, torch.tensor(0.0, dtype=torch.float64), backend=backend)
    expected = torch.softmax(q1 @ k1.transpose(-1, -2) / 4.0, dim=-1) @ v  # d = 16 -> s = 1/4
    assert rel_err(out, expected) < 1e-12
    # and λ = 1 with identical maps cancels exactly: common-mode noise is removed
    same = differential_attention(q1, k1, q1, k1, v, torch.tensor(1.0, dtype=torch.float64), backend=backend)
    assert same.abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_explicit_scale(backend):
    inputs = make_inputs(1, 2, 2, 6, 6, 8, 16, torch.float64)
    out = differential_attention(*inputs, scale=0.05, backend=backend)
    assert rel_err(out, reference(*inputs, scale=0.05)) < 1e-12
    assert rel_err(out, reference(*inputs)) > 1e-3  # the scale really changed something


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_row_gives_zeros_not_nan(backend):
    q1, k1, q2, k2, v, lam = make_inputs(1, 2, 1, 4, 5, 8, 8, torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    out = differential_attention(q1, k1, q2, k2, v, lam, attn_mask=mask, backend=backend)
    assert torch.isfinite(out).all()
    assert out[:, :, 2].abs().max().item() == 0.0
    keep = [0, 1, 3]
    ref = reference(q1, k1, q2, k2, v, lam, mask=mask)
    assert rel_err(out[:, :, keep], ref[:, :, keep]) < 1e-12
    # gradients stay finite, and the masked-out query row gets none
    leaves = [t.clone().requires_grad_(True) for t in (q1, k1, q2, k2, v, lam)]
    differential_attention(*leaves, attn_mask=mask, backend=backend).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert leaves[0].grad[:, :, 2].abs().max().item() == 0.0


def test_backends_agree_with_each_other():
    inputs = make_inputs(2, 4, 2, 50, 40, 32, 64, torch.float32, per_head_lam=True, seed=3)
    outs = {b: differential_attention(*inputs, backend=b) for b in CPU_BACKENDS + ["auto"]}
    assert rel_err(outs["math"], outs["sdpa"]) < 2e-5
    assert rel_err(outs["auto"], outs["sdpa"]) < 2e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_is_unbiased_and_random(backend):
    torch.manual_seed(0)
    inputs = make_inputs(1, 2, 1, 6, 6, 8, 8, torch.float64, seed=5)
    clean = differential_attention(*inputs, backend=backend)
    a = differential_attention(*inputs, dropout_p=0.3, backend=backend)
    b = differential_attention(*inputs, dropout_p=0.3, backend=backend)
    assert not torch.allclose(a, b) and not torch.allclose(a, clean)
    mean = torch.stack([differential_attention(*inputs, dropout_p=0.3, backend=backend)
                        for _ in range(3000)]).mean(0)
    # inverted dropout keeps the expectation: the mean of many draws approaches the clean output
    assert rel_err(mean, clean) < 0.05


def test_triton_backend_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the Triton path is checked by train/check_kernels.py on the GPU")
    inputs = make_inputs(1, 2, 2, 4, 4, 8, 16)
    with pytest.raises((RuntimeError, ValueError), match="triton"):
        differential_attention(*inputs, backend="triton")


# ---------------------------------------------------------------------------------------------
# Errors name the argument, the shape received and the shape expected.
# ---------------------------------------------------------------------------------------------

def _good():
    return list(make_inputs(2, 4, 2, 5, 6, 8, 16))


def _call(args, **kw):
    return differential_attention(*args, **kw)


@pytest.mark.parametrize("index,bad,match", [
    (0, torch.randn(4, 5, 8), r"q1 must have 4 dims .*\(4, 5, 8\)"),
    (1, torch.randn(2, 4, 6, 9), r"k1 has shape \(2, 4, 6, 9\), expected \(2, 4, 6, 8\)"),
    (2, torch.randn(3, 2, 5, 8), r"q2 has shape \(3, 2, 5, 8\), expected \(2, 2, 5, 8\)"),
    (3, torch.randn(2, 2, 7, 8), r"k2 has shape \(2, 2, 7, 8\), expected \(2, 2, 6, 8\)"),
    (4, torch.randn(2, 3, 6, 16), r"v has shape \(2, 3, 6, 16\), expected \(2, 4, 6, 16\)"),
    (4, torch.randn(2, 4, 6, 16, dtype=torch.float64), r"one dtype"),
    (0, torch.randint(0, 3, (2, 4, 5, 8)), r"q1 must be a floating-point tensor"),
    (5, torch.randn(3), r"lam has shape \(3\), expected \(\) or \(4,\)"),
    (5, 0.5, r"lam must be a torch.Tensor"),
])
def test_bad_shapes_and_dtypes(index, bad, match):
    args = _good()
    args[index] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        _call(args)


def test_heads_not_divisible():
    q1, k1, _, _, v, lam = make_inputs(1, 4, 3, 5, 5, 8, 8)
    q2, k2 = torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match=r"Hs=4 .* multiple of noise heads Hn=3"):
        differential_attention(q1, k1, q2, k2, v, lam)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(5, 7, dtype=torch.bool), r"attn_mask has shape \(5, 7\), expected .*\(2, 4, 5, 6\)"),
    (torch.ones(3, 4, 5, 6, dtype=torch.bool), r"attn_mask has shape \(3, 4, 5, 6\)"),
    (torch.ones(1, 1, 2, 4, 5, 6, dtype=torch.bool), r"attn_mask has shape"),
    (torch.ones(5, 6, dtype=torch.int64), r"attn_mask must be bool .* or floating"),
])
def test_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        _call(_good(), attn_mask=mask)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown backend .flash.; accepted: \[.auto., .math., .sdpa., .triton.\]"):
        _call(_good(), backend="flash")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        _call(_good(), dropout_p=1.5)
    with pytest.raises(ValueError, match="scale must be a positive"):
        _call(_good(), scale=-1.0)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        _call(_good(), attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True)
    assert set(BACKENDS) == {"auto", "math", "sdpa", "triton"}


def test_mixed_devices():
    args = _good()
    args[4] = args[4].to("meta")  # any second device; the check runs before any compute
    with pytest.raises(ValueError, match="one device"):
        _call(args)


def _sdpa_gradient_layouts(monkeypatch):
    """For each sdpa-backend call shape, whether every SDPA output received a contiguous gradient when the
    caller's own gradient is transposed (what a head merge's backward hands back)."""
    import diffvision.attention.functional as functional
    from diffvision.attention import differential_attention_v2

    seen = []
    real = functional.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        out.register_hook(lambda grad: seen.append(grad.is_contiguous()))
        return out

    monkeypatch.setattr(functional.F, "scaled_dot_product_attention", recording)

    def leaves(*tensors):
        return [t.requires_grad_(True) for t in tensors]

    per_head_mask = torch.ones(1, 4, 5, 6, dtype=torch.bool)
    calls = {  # DIFF, GDA (grouped values), GDA with a per-head mask (noise heads expanded), DIFF V2
        "diff": lambda: differential_attention(*leaves(*make_inputs(2, 2, 2, 5, 6, 8, 16)), backend="sdpa"),
        "gda": lambda: differential_attention(*leaves(*make_inputs(2, 4, 2, 5, 6, 8, 16)), backend="sdpa"),
        "gda per-head mask": lambda: differential_attention(*leaves(*make_inputs(2, 4, 2, 5, 6, 8, 16)),
                                                            attn_mask=per_head_mask, backend="sdpa"),
        "diffv2": lambda: differential_attention_v2(*leaves(torch.randn(2, 4, 5, 8), torch.randn(2, 1, 6, 8),
                                                            torch.randn(2, 1, 6, 8), torch.rand(2, 2, 5)),
                                                    backend="sdpa"),
    }
    layouts = {}
    for name, call in calls.items():
        seen.clear()
        out = call()  # merged heads as a module does it: the gradient coming back is transposed
        out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1).square().sum().backward()
        layouts[name] = list(seen)
    return layouts


def test_every_sdpa_output_hands_sdpa_a_contiguous_gradient(monkeypatch):
    """cuDNN's SDPA backward (torch 2.11, H200) gave wrong q/k/v gradients for the second of two output-gradient
    layouts at one shape in a process (see _ContiguousGrad): each SDPA call of the sdpa backends, DIFF V2's
    included, receives its gradient contiguous, whatever layout the layers above hand back."""
    layouts = _sdpa_gradient_layouts(monkeypatch)
    assert layouts == {"diff": [True, True], "gda": [True, True], "gda per-head mask": [True, True],
                       "diffv2": [True]}
    import diffvision.attention.functional as functional  # the control: without it, the layout leaks through
    monkeypatch.setattr(functional._ContiguousGrad, "apply", lambda x: x)
    assert False in _sdpa_gradient_layouts(monkeypatch)["diff"]
