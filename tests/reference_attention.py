"""Independent float64 differential attention, shared by the kernel tests."""
import math

import torch


def reference_bias(B, H, N, M, mask=None, causal=False):
    """The additive float64 bias (B, H, N, M) of a bool / additive mask and a top-left causal mask."""
    bias = torch.zeros(B, H, N, M, dtype=torch.float64)
    if causal:
        bias = bias.masked_fill(~torch.ones(N, M, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask.expand(B, H, N, M), -math.inf)
        else:
            bias = bias + mask.double().expand(B, H, N, M)
    return bias


def reference(q1, k1, q2, k2, v, lam, mask=None, causal=False, scale=None):
    """Head by head in float64: (softmax(q1 k1ᵀ s + m) − λ softmax(q2 k2ᵀ s + m)) v."""
    q1, k1, q2, k2, v = (t.double() for t in (q1, k1, q2, k2, v))
    lam = lam.double()
    B, Hs, N, d = q1.shape
    Hn, M = q2.shape[1], k1.shape[2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    bias = reference_bias(B, Hs, N, M, mask, causal)
    out = torch.empty(B, Hs, N, v.shape[-1], dtype=torch.float64)
    for i in range(Hs):
        g = i // (Hs // Hn)
        lam_i = lam if lam.dim() == 0 else lam[i]
        a1 = torch.softmax(torch.einsum("bnd,bmd->bnm", q1[:, i], k1[:, i]) * s + bias[:, i], -1)
        a2 = torch.softmax(torch.einsum("bnd,bmd->bnm", q2[:, g], k2[:, g]) * s + bias[:, i], -1)
        out[:, i] = torch.einsum("bnm,bme->bne", a1 - lam_i * a2, v[:, i])
    return out


def make_inputs(B, Hs, Hn, N, M, d, dv, dtype=torch.float32, per_head_lam=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    lam = (torch.rand(Hs if per_head_lam else (), generator=g, dtype=torch.float64) * 0.8 + 0.1).to(dtype)
    return rnd(B, Hs, N, d), rnd(B, Hs, M, d), rnd(B, Hn, N, d), rnd(B, Hn, M, d), rnd(B, Hs, M, dv), lam


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_v2(q, k, v, lam, mask=None, causal=False, scale=None):
    """DIFF V2 head by head in float64: output head i = softmax(q_2i k_gᵀ s + m) v_g − λ_i softmax(q_2i+1 k_gᵀ s + m) v_g,
    g = 2i // (2h / h_kv); the mask broadcasts over the 2h query heads; λ broadcasts to (B, h, N)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Q, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    h, group = Q // 2, Q // Hkv
    lam = lam.double().expand(B, h, N)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    bias = reference_bias(B, Q, N, M, mask, causal)
    out = torch.empty(B, h, N, v.shape[-1], dtype=torch.float64)
    for i in range(h):
        g = (2 * i) // group
        assert g == (2 * i + 1) // group  # the pair shares its key/value head
        a1 = torch.softmax(torch.einsum("bnd,bmd->bnm", q[:, 2 * i], k[:, g]) * s + bias[:, 2 * i], -1)
        a2 = torch.softmax(torch.einsum("bnd,bmd->bnm", q[:, 2 * i + 1], k[:, g]) * s + bias[:, 2 * i + 1], -1)
        out[:, i] = torch.einsum("bnm,bme->bne", a1 - lam[:, i, :, None] * a2, v[:, g])
    return out


def make_inputs_v2(B, h, Hkv, N, M, d, dv, lam_shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    lam = torch.rand(tuple(lam_shape), generator=g, dtype=torch.float64).to(dtype)  # already squashed: in [0, 1]
    return rnd(B, 2 * h, N, d), rnd(B, Hkv, M, d), rnd(B, Hkv, M, dv), lam


def reference_grad_magnitudes(q1, k1, q2, k2, v, lam, dout, mask=None, causal=False, scale=None):
    """The q1, k1, q2, k2 gradients with every term taken by its magnitude, in float64.

    dS = P ⊙ (G − D) with D = rowsum(P ⊙ G) cancels exactly when a query sees one key (then P = 1
    and the reference gradient is zero), so a relative error means nothing there; s·(P ⊙ (|G| + |D|))|K|
    (and the same for dK) is the size of what rounding acts on, the scale to measure such a
    gradient's error against.
    """
    q1, k1, q2, k2, v, dout = (t.detach().double() for t in (q1, k1, q2, k2, v, dout))
    lam = lam.detach().double()
    B, Hs, N, d = q1.shape
    Hn, M = q2.shape[1], k1.shape[2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    bias = reference_bias(B, Hs, N, M, mask, causal)
    mags = [torch.zeros_like(t) for t in (q1, k1, q2, k2)]
    for i in range(Hs):
        g = i // (Hs // Hn)
        lam_i = lam if lam.dim() == 0 else lam[i]
        dp = dout[:, i] @ v[:, i].transpose(-1, -2)
        for q, k, iq, ik, h, c in ((q1, k1, 0, 1, i, 1.0), (q2, k2, 2, 3, g, -lam_i)):
            sc = q[:, h] @ k[:, h].transpose(-1, -2) * s + bias[:, i]
            empty = torch.isneginf(sc).all(-1, keepdim=True)
            p = torch.softmax(sc.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
            G = c * dp
            m = p * (G.abs() + (p * G).sum(-1, keepdim=True).abs())
            mags[iq][:, h] += s * m @ k[:, h].abs()
            mags[ik][:, h] += s * m.transpose(-1, -2) @ q[:, h].abs()
    return mags
