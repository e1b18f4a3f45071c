"""Correctness of the Triton differential attention kernel on a CUDA GPU, against float64.

    PYTHONPATH=. python train/check_kernels.py            # every case, bf16 and fp16
    PYTHONPATH=. python train/check_kernels.py --quick    # a handful of cases
    PYTHONPATH=. python train/check_kernels.py --tiny     # shapes far below the tiles only (N = M = 1, ...)

For each case: fresh random inputs; the CUDA caching allocator is poisoned with NaN before the
kernel runs, so any output element the kernel fails to write shows up as NaN; the output and
every gradient (q1, k1, q2, k2, v, λ) are compared with an independent float64 implementation
written below (materialised softmax maps, head by head) by ‖x − ref‖ / ‖ref‖. For scale, the
same error of the ``sdpa`` backend on the same low-precision inputs is printed beside it. The λ
column is |dλ − ref| / Σ|terms| (dλ = −Σ rowsum(dO ⊙ O2) sums terms of both signs, so its plain
relative error says more about cancellation than about the kernel). Exits
non-zero if any case fails. Cases include the benchmark shapes (batch reduced so the float64
reference fits), odd N, M != N, causal, GDA 2:1 and 4:1, per-head λ, head dims 32/64/72/128 with
value dims 2d, 96 and 144, boolean and additive masks (one row fully masked), no-grad calls, and
tiny shapes (N = M = 1, 1x17, 17x1, 2x2, 3x5, ...; issue 18) in fp16 and bf16 under both backward
schedules, some with an additive mask 40 below zero: the softmax is unchanged but the log-sum-exp
is far below 0, where key columns past M once got probability 2^-lse (inf in fp16) instead of 0.
With one visible key per query the q/k gradients are zero in exact arithmetic; where the reference
gradient is that small, the error is measured against the size of the terms that cancel in it
(s·(P ⊙ (|dO·vᵀ| + |D|))·|K|, and the same for dK) instead.

Then the modules (bf16 autocast, forward + backward, against the same layer in float32 on ``math``):
DIFF and GDA with every ``lambda_mode`` and ``head_norm`` setting on Triton, with ``sdpa`` beside it for
scale; DIFF V2 (one SDPA call with ``enable_gqa``), with the SDPA kernels (flash, cuDNN, efficient) that
accept it.
``--max-cases 0`` runs the modules only.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from diffvision.attention import DifferentialAttention, differential_attention, set_attention_backend

TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # float32: interpreter runs
GRAD_NAMES = ("q1", "k1", "q2", "k2", "v", "lam")


@dataclass
class Case:
    name: str
    B: int
    Hs: int
    Hn: int
    N: int
    M: int
    d: int
    dv: int
    causal: bool = False
    per_head_lam: bool = False
    mask: Optional[str] = None  # "bool" (N, M) with a fully masked row, "add" (B, 1, N, M), "bool_head",
    #                             "add_low" ("add" − 40: the same softmax, log-sum-exps far below 0)
    dtype: torch.dtype = torch.bfloat16
    grad: bool = True
    layout: str = "bhnd"  # "bhnd" contiguous, or "module" (strided views, as the modules pass)
    bwd: Optional[str] = None  # "fused" / "split": force that backward schedule (default: timed)
    tags: list = field(default_factory=list)


def bench_cases() -> list[Case]:
    """The benchmark shapes in the DIFF layout (h = H/2, d = D/H, dv = 2d), batch reduced."""
    shapes = [("ViT-S/16-224", 256, 197, 384, 6), ("ViT-B/16-224", 128, 197, 768, 12),
              ("DiT-S/2-32px", 256, 256, 384, 6), ("DiT-B/2", 64, 256, 768, 12),
              ("ViT-B/16-512", 16, 1025, 768, 12), ("DiT-XL/2-512", 8, 1024, 1152, 16),
              ("long", 4, 4096, 1024, 16)]
    cases = []
    for name, B, N, D, H in shapes:
        h, d = H // 2, D // H
        b = max(1, min(B, (1 << 26) // (h * N * N)))  # keep the float64 maps ~0.5 GB each
        cases.append(Case(f"bench {name} (B={b})", b, h, h, N, N, d, 2 * d, layout="module"))
    return cases


def feature_cases() -> list[Case]:
    c = [
        Case("odd N=257 d=32", 4, 4, 4, 257, 257, 32, 64),
        Case("M>N 100x300", 3, 2, 2, 100, 300, 64, 128),
        Case("M<N 300x77", 3, 2, 2, 300, 77, 64, 128),
        Case("causal N=M=333", 2, 3, 3, 333, 333, 64, 128, causal=True),
        Case("causal N=200 M=150", 2, 2, 2, 200, 150, 64, 128, causal=True),
        Case("causal N=150 M=200", 2, 2, 2, 150, 200, 32, 64, causal=True),
        Case("GDA 2:1 dv=96 λ/head", 2, 4, 2, 197, 197, 64, 96, per_head_lam=True),
        Case("GDA 4:1 d=32", 2, 8, 2, 129, 129, 32, 64, per_head_lam=True),
        Case("GDA 2:1 causal", 2, 4, 2, 260, 260, 64, 128, causal=True, per_head_lam=True),
        Case("d=128 dv=256", 2, 2, 2, 197, 197, 128, 256),
        Case("d=128 dv=256 causal", 1, 2, 2, 300, 300, 128, 256, causal=True),
        Case("d=72 dv=144", 2, 2, 2, 200, 200, 72, 144),
        Case("d=32 dv=64 N=1025", 1, 3, 3, 1025, 1025, 32, 64),
        Case("d=16 dv=32", 2, 2, 2, 100, 100, 16, 32),
        Case("bool mask + empty row", 2, 2, 2, 150, 170, 64, 128, mask="bool"),
        Case("additive mask", 2, 4, 2, 150, 150, 64, 96, mask="add"),
        Case("per-head bool mask GDA", 2, 4, 2, 77, 90, 32, 64, mask="bool_head"),
        Case("no grad (inference)", 4, 3, 3, 197, 197, 64, 128, grad=False),
        Case("module layout DIFF", 4, 3, 3, 197, 197, 64, 128, layout="module"),
    ]
    fp16 = [
        Case("fp16 ViT-B-like", 8, 6, 6, 197, 197, 64, 128, dtype=torch.float16),
        Case("fp16 causal d=128", 1, 2, 2, 257, 257, 128, 256, causal=True, dtype=torch.float16),
        Case("fp16 GDA 2:1 dv=96", 2, 4, 2, 197, 197, 64, 96, dtype=torch.float16, per_head_lam=True),
        Case("fp16 bool mask", 2, 2, 2, 64, 200, 32, 64, mask="bool", dtype=torch.float16),
    ]
    return c + fp16


def tiny_cases() -> list[Case]:
    """Shapes far below the tile sizes (issue 18), fp16 and bf16, each backward schedule."""
    shapes = [  # name, B, Hs, Hn, N, M, d, dv, extra
        ("N=M=1", 2, 4, 4, 1, 1, 64, 128, {}),
        ("N=M=1 GDA λ/head", 2, 4, 2, 1, 1, 64, 96, dict(per_head_lam=True)),
        ("N=M=1 low lse", 2, 4, 4, 1, 1, 64, 128, dict(mask="add_low")),
        ("1x17", 2, 3, 3, 1, 17, 64, 128, {}),
        ("17x1", 2, 3, 3, 17, 1, 64, 128, {}),
        ("17x1 low lse", 2, 3, 3, 17, 1, 32, 64, dict(mask="add_low")),
        ("2x2", 2, 3, 3, 2, 2, 32, 64, {}),
        ("2x2 causal", 2, 3, 3, 2, 2, 32, 64, dict(causal=True)),
        ("3x5", 2, 3, 3, 3, 5, 72, 144, {}),
        ("5x3 causal", 2, 3, 3, 5, 3, 64, 128, dict(causal=True)),
        ("5x3 low lse", 2, 3, 3, 5, 3, 64, 128, dict(mask="add_low")),
        ("3x5 bool mask", 2, 2, 2, 3, 5, 16, 32, dict(mask="bool")),
        ("1x5 low lse", 2, 2, 2, 1, 5, 128, 256, dict(mask="add_low")),
    ]
    cases = []
    for dtype, dt in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for bwd in ("fused", "split"):
            for name, B, Hs, Hn, N, M, d, dv, extra in shapes:
                cases.append(Case(f"tiny {name} {dt} {bwd}", B, Hs, Hn, N, M, d, dv, dtype=dtype,
                                  bwd=bwd, **extra))
    return cases


def quick_cases() -> list[Case]:
    all_ = {c.name: c for c in feature_cases() + tiny_cases()}
    names = ["odd N=257 d=32", "causal N=200 M=150", "GDA 2:1 dv=96 λ/head", "d=72 dv=144",
             "bool mask + empty row", "fp16 ViT-B-like", "tiny N=M=1 low lse fp16 fused",
             "tiny N=M=1 bf16 split"]
    return [all_[n] for n in names] + bench_cases()[:1]


# ---------------------------------------------------------------------------------------------
# Independent float64 reference
# ---------------------------------------------------------------------------------------------

def reference(q1, k1, q2, k2, v, lam, bias, scale):
    """(softmax(q1 k1ᵀ s + bias) − λ softmax(q2 k2ᵀ s + bias)) v head by head, in float64.

    bias is (B|1, Hs|1, N, M) additive (−inf = masked); a fully masked row gives zeros, with zero
    (not NaN) gradients.
    """
    B, Hs, N, _ = q1.shape
    Hn = q2.shape[1]
    outs, noise = [], []
    for i in range(Hs):
        g = i // (Hs // Hn)
        lam_i = lam if lam.dim() == 0 else lam[i]
        b_i = 0.0 if bias is None else bias[:, min(i, bias.shape[1] - 1)]
        maps = []
        for q, k in ((q1[:, i], k1[:, i]), (q2[:, g], k2[:, g])):
            s = q @ k.transpose(-1, -2) * scale + b_i
            empty = torch.isneginf(s).all(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
            maps.append(p)
        outs.append((maps[0] - lam_i * maps[1]) @ v[:, i])
        noise.append(maps[1].detach() @ v[:, i].detach())
    return torch.stack(outs, 1), torch.stack(noise, 1)


def grad_magnitudes(q1, k1, q2, k2, v, lam, bias, scale, dout):
    """The q1, k1, q2, k2 gradients with every term by its magnitude, in float64 (no autograd).

    dS = P ⊙ (G − D), D = rowsum(P ⊙ G), G = dO·vᵀ (−λ·dO·vᵀ for the noise map) cancels exactly
    when a query sees one key (P = 1, zero gradient): s·(P ⊙ (|G| + |D|))·|K| (dQ) and
    s·(P ⊙ (|G| + |D|))ᵀ·|Q| (dK) are the sizes rounding acts on, the scale for such a gradient.
    """
    q1, k1, q2, k2, v, lam, dout = (t.detach().double() for t in (q1, k1, q2, k2, v, lam, dout))
    Hs, Hn = q1.shape[1], q2.shape[1]
    mags = [torch.zeros_like(t) for t in (q1, k1, q2, k2)]
    for i in range(Hs):
        g = i // (Hs // Hn)
        lam_i = lam if lam.dim() == 0 else lam[i]
        b_i = 0.0 if bias is None else bias[:, min(i, bias.shape[1] - 1)]
        dp = dout[:, i] @ v[:, i].transpose(-1, -2)
        for q, k, iq, ik, h, c in ((q1, k1, 0, 1, i, 1.0), (q2, k2, 2, 3, g, -lam_i)):
            s = q[:, h] @ k[:, h].transpose(-1, -2) * scale + b_i
            empty = torch.isneginf(s).all(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
            G = c * dp
            m = p * (G.abs() + (p * G).sum(-1, keepdim=True).abs())
            mags[iq][:, h] += scale * m @ k[:, h].abs()
            mags[ik][:, h] += scale * m.transpose(-1, -2) @ q[:, h].abs()
    return mags


def make_bias(case: Case, gen, device):
    B, Hs, N, M = case.B, case.Hs, case.N, case.M
    if case.causal:
        keep = torch.ones(N, M, dtype=torch.bool, device=device).tril()
        return None, torch.zeros(1, 1, N, M, dtype=torch.float64, device=device).masked_fill(~keep, -math.inf)
    if case.mask is None:
        return None, None
    if case.mask in ("bool", "bool_head"):
        shape = (N, M) if case.mask == "bool" else (B, Hs, N, M)
        keep = torch.rand(shape, generator=gen, device=device) > 0.4
        keep[..., 0] = True
        keep[..., N // 3, :] = False  # one row sees no key at all: output and gradients are zero
        bias = torch.zeros(shape, dtype=torch.float64, device=device).masked_fill(~keep, -math.inf)
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        return keep, bias
    add = torch.randn(B, 1, N, M, generator=gen, device=device) * 2.0
    if case.mask == "add_low":  # a constant shift: same softmax, log-sum-exp ~58 below 0 (log2)
        add = add - 40.0
    return add, add.double()


def make_inputs(case: Case, gen, device):
    """(bases, build, lam): leaf tensors, a function making (q1, k1, q2, k2, v) from them, and λ."""
    B, Hs, Hn, N, M, d, dv = case.B, case.Hs, case.Hn, case.N, case.M, case.d, case.dv
    dt = case.dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    if case.layout == "module":  # strided views of one projection, as DifferentialAttention passes
        G = Hs // Hn
        bases = [rnd(B, N, Hn, G + 1, d), rnd(B, M, Hn, G + 1, d), rnd(B, M, Hs, dv)]

        def build(q, k, vv):
            q1 = q[:, :, :, :G].reshape(B, N, Hs, d).transpose(1, 2)
            k1 = k[:, :, :, :G].reshape(B, M, Hs, d).transpose(1, 2)
            return [q1, k1, q[:, :, :, G].transpose(1, 2), k[:, :, :, G].transpose(1, 2),
                    vv.transpose(1, 2)]
    else:
        bases = [rnd(B, Hs, N, d), rnd(B, Hs, M, d), rnd(B, Hn, N, d), rnd(B, Hn, M, d), rnd(B, Hs, M, dv)]

        def build(*ts):
            return list(ts)
    shape = (Hs,) if case.per_head_lam else ()
    lam = (torch.rand(shape, generator=gen, device=device) * 0.8 + 0.1).float()
    return bases, build, lam


NAN_BITS = 0x7FC07FC0  # NaN as float32, and each half NaN as bfloat16 and as float16


def poison_allocator(device) -> None:
    """Refill the caching allocator with NaN-filled free blocks, so unwritten outputs read NaN."""
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    blocks = [torch.full(((1 << 30) // 4,), NAN_BITS, dtype=torch.int32, device=device)]
    for _ in range(64):  # the small-block pool (allocations under 1 MiB)
        blocks.append(torch.full(((1 << 20) // 4,), NAN_BITS, dtype=torch.int32, device=device))
    del blocks
    torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rel_to(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """‖a − b‖ / ‖scale‖."""
    a = a.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b.double()).norm() / scale.double().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def backward_schedule(bwd: Optional[str]):
    """Force the Triton backward schedule ("fused" / "split") for the calls inside; None: as timed."""
    if bwd is None:
        yield
        return
    from diffvision.attention import triton_kernel as tk
    saved_env, saved_modes = os.environ.get("DIFFVISION_TRITON_BWD"), dict(tk._BWD_MODE)
    os.environ["DIFFVISION_TRITON_BWD"] = bwd
    tk._BWD_MODE.clear()  # a schedule already picked for this shape would win over the variable
    try:
        yield
    finally:
        tk._BWD_MODE.clear()
        tk._BWD_MODE.update(saved_modes)
        if saved_env is None:
            os.environ.pop("DIFFVISION_TRITON_BWD", None)
        else:
            os.environ["DIFFVISION_TRITON_BWD"] = saved_env


def run_backend(backend, bases, build, lam, mask, case, dout):
    """Output and gradients (w.r.t. q1, k1, q2, k2, v, λ as passed to the kernel)."""
    bases = [t.detach().clone().requires_grad_(case.grad) for t in bases]
    lam = lam.detach().clone().requires_grad_(case.grad)
    with torch.set_grad_enabled(case.grad):
        tensors = build(*bases)
        out = differential_attention(*tensors, lam, attn_mask=mask, is_causal=case.causal,
                                     backend=backend)
    if not case.grad:
        return out, []
    grads = torch.autograd.grad(out, tensors + [lam], dout)
    return out.detach(), list(grads)


def check_case(case: Case, seed: int, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    bases, build, lam = make_inputs(case, gen, device)
    mask, bias64 = make_bias(case, gen, device)
    dout = torch.randn((case.B, case.Hs, case.N, case.dv), generator=gen, device=device).to(case.dtype)

    ref_leaves = [t.detach().double().requires_grad_(case.grad) for t in build(*bases) + [lam]]
    with torch.set_grad_enabled(case.grad):
        ref, ref_o2 = reference(*ref_leaves, bias64, 1.0 / math.sqrt(case.d))
    ref_grads = list(torch.autograd.grad(ref, ref_leaves, dout.double())) if case.grad else []
    ref = ref.detach()
    # dλ = −Σ_rows rowsum(dO ⊙ O2) is a sum of terms of both signs: its error is measured against
    # the sum of the terms' magnitudes (per head), the scale that rounding errors grow with.
    terms = (dout.double() * ref_o2).sum(-1).abs()
    lam_scale = terms.sum(dim=(0, 2)) if lam.dim() == 1 else terms.sum()
    # A q/k gradient that is zero in exact arithmetic (every query sees one key: P = 1) has no
    # relative error; it is measured against the size of the terms that cancel in it instead.
    scales = {}
    if case.grad:
        mags = grad_magnitudes(*ref_leaves, bias64, 1.0 / math.sqrt(case.d), dout)
        for name, rg, mg in zip(GRAD_NAMES, ref_grads, mags):
            if rg.norm() <= 1e-6 * mg.norm():
                scales[name] = mg
    del ref_leaves, ref_o2

    poison_allocator(device)
    with backward_schedule(case.bwd):
        out, grads = run_backend("triton", bases, build, lam, mask, case, dout)
    s_out, s_grads = run_backend("sdpa", bases, build, lam, mask, case, dout)

    errs = {"out": rel(out, ref)}
    sdpa = {"out": rel(s_out, ref)}
    for name, g, sg, rg in zip(GRAD_NAMES, grads, s_grads, ref_grads):
        if name == "lam" or name in scales:
            scale = lam_scale if name == "lam" else scales[name]
            errs[name] = rel_to(g, rg, scale)
            sdpa[name] = rel_to(sg, rg, scale)
        else:
            errs[name] = rel(g, rg)
            sdpa[name] = rel(sg, rg)
    tol = TOL[case.dtype]
    worst = max(errs.values())
    ok = all(math.isfinite(e) and e <= tol for e in errs.values())
    return dict(errs=errs, sdpa=sdpa, ok=ok, worst=worst, tol=tol)


MODULE_TOL = 3e-2  # bf16 module forward + backward against float32: rounding stays near 1e-2


def _module_run(layer, x, backend, autocast=True):
    """Output and gradients (of the input and of each parameter) of one forward + backward, under bf16
    autocast or (``autocast=False``) in the layer's own float32."""
    set_attention_backend(layer, backend)
    layer.zero_grad()
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer(xx)
    y.float().square().mean().backward()
    grads = {"x": xx.grad.float()}
    grads.update({n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None})
    return y.float(), grads


def _errors(out, grads, ref_out, ref_grads) -> dict:
    errs = {"out": rel(out, ref_out)}
    errs.update({n: rel(g, ref_grads[n]) for n, g in grads.items()})
    return errs


def check_modules(device) -> list[dict]:
    """The attention modules on CUDA, forward + backward under bf16 autocast, against the same layer in
    float32 on the 'math' backend: DIFF and GDA with every λ mode and head-norm setting on Triton (what 'auto'
    picks) and, for scale, on 'sdpa'; DIFF V2's one SDPA call (flash / cuDNN with enable_gqa), and which SDPA
    kernels accept it. A row passes when every error of the tested backend is within the bf16 tolerance or
    within twice the other bf16 backend's error on the same inputs (bf16 rounding, not a wrong result), and
    no error of either backend exceeds MODULE_TOL (a wrong gradient is off by order 1, not 1e-2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffvision.attention import DifferentialAttentionV2, GroupedDifferentialAttention

    rows = []
    x = torch.randn(8, 197, 384, device=device, generator=torch.Generator(device).manual_seed(0))

    def row(name, layer, tested, other, note=""):
        ref_out, ref_grads = _module_run(layer, x, "math", autocast=False)
        runs = {b: _module_run(layer, x, b) for b in (tested, other, "auto")}
        errs = {b: _errors(*runs[b], ref_out, ref_grads) for b in (tested, other)}
        ok = all(e <= max(TOL[torch.bfloat16], 2 * errs[other][k]) for k, e in errs[tested].items())
        ok &= all(e <= MODULE_TOL for b in errs for e in errs[b].values())  # no backend is far off
        same = rel(runs["auto"][0], runs[tested][0]) == 0.0
        rows.append(dict(name=name, tested=tested, other=other, errs=errs, same=same, ok=ok and same, note=note))

    for kind in ("diff", "gda"):
        for mode in ("reparam", "fixed", "scalar"):
            # both orders: cuDNN's SDPA once gave wrong gradients for the second of two gradient layouts
            for head_norm in ((True, False) if kind == "diff" else (False, True)):
                torch.manual_seed(0)
                layer = (DifferentialAttention(384, num_heads=3, depth=4, lambda_mode=mode, head_norm=head_norm)
                         if kind == "diff" else
                         GroupedDifferentialAttention(384, 4, 2, depth=4, lambda_mode=mode, head_norm=head_norm))
                row(f"{kind} {mode} head_norm={head_norm}", layer.to(device), "triton", "sdpa")
    torch.manual_seed(0)
    v2 = DifferentialAttentionV2(384, num_heads=6).to(device)
    kernels = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                _module_run(v2, x, "sdpa")
            kernels.append(f"{name.split('_')[0].lower()} runs it")
        except RuntimeError:
            kernels.append(f"{name.split('_')[0].lower()} refuses it")
    row("diffv2 (6 heads, 3 kv heads)", v2, "sdpa", "math", "; ".join(kernels))
    return rows


def _run_job(job):
    i, case, seed, device = job
    t0 = time.time()
    try:
        r = check_case(case, seed, torch.device(device))
    except Exception as err:  # a crash is a failure, reported, not a stop
        r = dict(ok=False, errs={}, sdpa={}, worst=float("nan"), tol=TOL[case.dtype],
                 error=f"{type(err).__name__}: {err}")
    return i, (r, time.time() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a handful of cases")
    parser.add_argument("--tiny", action="store_true",
                        help="only the tiny shapes (N = M = 1, 1x17, 17x1, ...), fp16 and bf16, both schedules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda",
                        help="'cpu' runs the kernels in the Triton interpreter (TRITON_INTERPRET=1, "
                             "float32 only, small shapes): for developing this script")
    parser.add_argument("--dtype", choices=["float32", "float16"], default=None,
                        help="override every case's dtype (interpreter runs; it has no bfloat16)")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N kernel cases (0: modules only)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run cases in this many processes (compilation dominates; the GPU is shared)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("check_kernels.py needs a CUDA GPU (the Triton kernel is CUDA only)")
        return 2
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}")
    if args.tiny:
        cases = tiny_cases()
    else:
        cases = quick_cases() if args.quick else feature_cases() + tiny_cases() + bench_cases()
    if args.dtype:
        for c in cases:
            c.dtype = getattr(torch, args.dtype)
    cases = cases[:args.max_cases]
    rows, failed = [], 0
    head = f"{'case':32} {'dtype':5} {'out':>8} " + " ".join(f"{n:>8}" for n in GRAD_NAMES)
    jobs = [(i, case, args.seed + i, str(device)) for i, case in enumerate(cases)]
    if args.jobs > 1:  # cases in parallel processes: mostly Triton compilation, which is single-threaded
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = dict(pool.imap_unordered(_run_job, jobs))
    else:
        results = dict(map(_run_job, jobs))
    for i, case in enumerate(cases):
        r, elapsed = results[i]
        failed += not r["ok"]
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(case.dtype, "fp32")
        cells = " ".join(f"{r['errs'].get(n, float('nan')):8.1e}" if n in r["errs"] else f"{'-':>8}"
                         for n in ("out",) + GRAD_NAMES)
        sd = " ".join(f"{r['sdpa'].get(n, float('nan')):8.1e}" if n in r["sdpa"] else f"{'-':>8}"
                      for n in ("out",) + GRAD_NAMES)
        line = f"{case.name:32} {dt:5} {cells}  {'PASS' if r['ok'] else 'FAIL'}"
        rows.append((line, f"{'   (sdpa backend, same inputs)':32} {'':5} {sd}", r.get("error")))
        print(line, f"[{elapsed:.1f}s]", flush=True)
        if r.get("error"):
            print("   ", r["error"], flush=True)
    modules = check_modules(device) if device.type == "cuda" else []
    failed += sum(not m["ok"] for m in modules)

    print("\n=== Triton differential attention vs float64 reference: ‖x − ref‖/‖ref‖ "
          f"(tolerance bf16 {TOL[torch.bfloat16]:g}, fp16 {TOL[torch.float16]:g}) ===")
    print(head)
    for line, sd, err in rows:
        print(line)
        print(sd)
        if err:
            print("   ", err)
    print("\n=== attention modules (B=8, N=197, dim=384), bf16 autocast vs the float32 'math' layer: "
          "‖x − ref‖/‖ref‖ of the output and of each gradient; 'auto' must pick the tested backend ===")
    for m in modules:
        for b in (m["tested"], m["other"]):
            errs = m["errs"][b]
            worst = max(errs, key=errs.get)
            cells = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            verdict = ("PASS" if m["ok"] else "FAIL") if b == m["tested"] else ""
            print(f"{m['name'] if b == m['tested'] else '':36} {b:7} worst {worst}={errs[worst]:.1e}  {verdict}")
            print(f"{'':36}         {cells}")
        print(f"{'':36} auto picks {m['tested']}: {m['same']}" + (f"; {m['note']}" if m["note"] else ""))
    total = len(cases) + len(modules)
    print(f"{total - failed}/{total} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
