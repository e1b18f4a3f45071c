"""Independent float64 differential attention, shared by the kernel tests."""
import math

import torch


def reference(q1, k1, q2, k2, v, lam, mask=None, causal=False, scale=None):
    """Head by head in float64: (softmax(q1 k1ᵀ s + m) − λ softmax(q2 k2ᵀ s + m)) v."""
    q1, k1, q2, k2, v = (t.double() for t in (q1, k1, q2, k2, v))
    lam = lam.double()
    B, Hs, N, d = q1.shape
    Hn, M = q2.shape[1], k1.shape[2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    bias = torch.zeros(B, Hs, N, M, dtype=torch.float64)
    if causal:
        bias = bias.masked_fill(~torch.ones(N, M, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask.expand(B, Hs, N, M), -math.inf)
        else:
            bias = bias + mask.double().expand(B, Hs, N, M)
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
