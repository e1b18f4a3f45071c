"""A short CPU demo of the shared kernel: every backend against a float64 reference, and timings.

    .venv/bin/python train/demo_kernel.py
"""
from __future__ import annotations

import time

import torch

from diffvision.attention import DifferentialAttention, available_backends, differential_attention


def main() -> None:
    torch.manual_seed(0)
    B, H, N, d = 8, 3, 197, 64  # a DIFF-ViT-S block: 3 differential heads, d = 64, dv = 128
    q1, k1, q2, k2 = (torch.randn(B, H, N, d) for _ in range(4))
    v = torch.randn(B, H, N, 2 * d)
    lam = torch.tensor(0.5)
    ref = differential_attention(*(t.double() for t in (q1, k1, q2, k2, v)), lam.double(), backend="math")
    print(f"differential attention, B={B} heads={H} N={N} d={d} dv={2 * d}, float32 on CPU")
    print(f"{'backend':8} {'rel. error vs float64':>22} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    for backend in available_backends("cpu"):
        leaves = [t.clone().requires_grad_(True) for t in (q1, k1, q2, k2, v)]
        out = differential_attention(*leaves, lam, backend=backend)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        t0 = time.perf_counter()
        for _ in range(5):
            with torch.no_grad():
                differential_attention(q1, k1, q2, k2, v, lam, backend=backend)
        fwd = (time.perf_counter() - t0) / 5 * 1e3
        t0 = time.perf_counter()
        for _ in range(5):
            differential_attention(*leaves, lam, backend=backend).sum().backward()
        both = (time.perf_counter() - t0) / 5 * 1e3
        print(f"{backend:8} {err:22.2e} {fwd:8.1f} {both:11.1f}")
    layer = DifferentialAttention(384, num_heads=3, depth=5)
    x = torch.randn(2, N, 384)
    print(f"\nDifferentialAttention(384, num_heads=3, depth=5): lambda_init={layer.lambda_init:.4f}, "
          f"lambda={layer.lam().item():.4f}, out {tuple(layer(x).shape)}")


if __name__ == "__main__":
    main()
