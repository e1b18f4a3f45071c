"""Fused differential attention in Triton: one pass over K/V for both maps, forward and backward.

    out[:, i] = softmax(q1_i k1_iᵀ·s + mask) v_i − λ_i · softmax(q2_g k2_gᵀ·s + mask) v_i

Forward (one program per query tile of one signal head): for every K/V tile it computes both score
maps, keeps a separate online-softmax state (running max m, running sum l) per map, and feeds ONE
load of the V tile into both accumulators O1 += P1·V and O2 += P2·V. The epilogue writes
O1/l1 − λ·O2/l2. For the backward it keeps only O(N) statistics (the log-sum-exp of each map's
rows) and the normalised noise output O2/l2, from which both softmax row terms follow:
D2 = rowsum(dO ⊙ O2/l2) and D1 = rowsum(dO ⊙ O1/l1) = rowsum(dO ⊙ out) + λ·D2.

Backward (FlashAttention-2 style, one program per key tile of one signal head, looping over query
tiles): with dPv = dO·vᵀ shared by both maps,
    dV  += (P1 − λP2)ᵀ dO
    dS1  = P1 ⊙ (dPv − D1)            dS2 = −λ · P2 ⊙ (dPv − D2)
    dK1 += s·dS1ᵀ Q1,  dK2 += s·dS2ᵀ Q2  (in registers)
    dQ1 += s·dS1 K1,   dQ2 += s·dS2 K2   (fp32 atomics: several key tiles add to one query row)
    dλ_i = −Σ_rows D2_i.
The backward does as many matrix products as a standard attention backward of equal width (dPv is
shared), the forward 1.5×: that is the floor this kernel aims at. Holding dK1, dK2 and dV at once
is heavy on registers, so there is a second schedule: one pass for dK1, dK2, dQ1, dQ2, a second
for dV (the scores are recomputed once more). The faster of the two is picked per shape by timing
on first use, as are the tile sizes (a small tuner, ``_launch``; ``DIFFVISION_TRITON_AUTOTUNE=0``
takes the first candidate of each list instead).

Grouped differential attention (Hs > Hn): a program works for one signal head and recomputes its
group's noise map; dQ2 atomics of the group's heads meet in one buffer, dK2 is written per signal
head and summed over the group afterwards.

Head dims that are not a power of two (d = 72, dv = 96 or 144) are split into two power-of-two
column chunks (64 + 16, 64 + 32, 128 + 16) instead of being padded to the next power of two, so
DiT-XL's d = 72 does not pay for 128 columns.

Eager calls go through a ``torch.autograd.Function``; under ``torch.compile`` the same kernels are
two custom operators (``torch.ops.diffvision.differential_attention_fwd/_bwd``) so that Dynamo
keeps one graph. Measurements and what limits them: docs/benchmarks.md.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .maps import attention_bias

__all__ = ["unsupported_reason", "triton_differential_attention", "MAX_HEAD_DIM", "MAX_VALUE_DIM"]

MAX_HEAD_DIM = 128    # q/k head dim d
MAX_VALUE_DIM = 256   # value head dim dv
_LOG2E = 1.4426950408889634


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit at import, too


def _interpreting() -> bool:
    return _INTERPRET


def _autotune_enabled() -> bool:
    return os.environ.get("DIFFVISION_TRITON_AUTOTUNE", "1") != "0" and not _interpreting()


_BWD_MODE: dict = {}  # shape key -> "bwd_fused" or "bwd_split" (see _bwd_kernel), by timing


def _split_dim(n: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two column chunks (A, B), B = 0 when one suffices.

    n is first rounded up to a multiple of 16 (the smallest tl.dot width); A is the largest power
    of two <= that, B the rest rounded up to a power of two: 72 -> (64, 16), 96 -> (64, 32),
    144 -> (128, 16), 64 -> (64, 0), 8 -> (16, 0).
    """
    n16 = max(16, -(-n // 16) * 16)
    a = 1 << (n16.bit_length() - 1)
    rest = n16 - a
    b = 0 if rest == 0 else max(16, triton.next_power_of_2(rest))
    return a, b


# ---------------------------------------------------------------------------------------------
# Tile helpers: a tile is rows x columns [C0, C0 + W) of a matrix whose last dim is contiguous.
# Columns past the true width D read as zero and are never written.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, row_ok, stride_row, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    cols = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if C0 + W > D:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return x


@triton.jit
def _store_tile(base, rows, row_ok, stride_row, x, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    cols = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if C0 + W > D:
        tl.store(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < D))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _atomic_add_tile(base, rows, row_ok, stride_row, x, C0: tl.constexpr, W: tl.constexpr,
                     D: tl.constexpr):
    cols = C0 + tl.arange(0, W)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if C0 + W > D:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < D), sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    Q1, K1, Q2, K2, V, LAM, BIAS, OUT, O2N, LSE1, LSE2,
    s_q1b, s_q1h, s_q1n, s_k1b, s_k1h, s_k1n,
    s_q2b, s_q2h, s_q2n, s_k2b, s_k2h, s_k2n,
    s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_pb, s_ph, s_pn,
    s_bb, s_bh, s_bn, s_bm,
    N, M, GROUP, lam_stride, qk_scale,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    DV: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_heads = tl.num_programs(1)
    g = h // GROUP
    dtype = OUT.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    q1_base = Q1 + b * s_q1b + h * s_q1h
    q2_base = Q2 + b * s_q2b + g * s_q2h
    k1_base = K1 + b * s_k1b + h * s_k1h
    k2_base = K2 + b * s_k2b + g * s_k2h
    v_base = V + b * s_vb + h * s_vh

    q1a = _load_tile(q1_base, offs_m, m_ok, s_q1n, 0, DA, D)
    q2a = _load_tile(q2_base, offs_m, m_ok, s_q2n, 0, DA, D)
    if DB > 0:
        q1b = _load_tile(q1_base, offs_m, m_ok, s_q1n, DA, DB, D)
        q2b = _load_tile(q2_base, offs_m, m_ok, s_q2n, DA, DB, D)

    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc1a = tl.zeros([BLOCK_M, DVA], tl.float32)
    acc2a = tl.zeros([BLOCK_M, DVA], tl.float32)
    if DVB > 0:
        acc1b = tl.zeros([BLOCK_M, DVB], tl.float32)
        acc2b = tl.zeros([BLOCK_M, DVB], tl.float32)

    hi = M
    if IS_CAUSAL:  # top-left aligned: query i sees keys j <= i
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < M
        ok = n_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
        if HAS_BIAS:
            bias_ptrs = BIAS + b * s_bb + h * s_bh + offs_m[:, None] * s_bn + offs_n[None, :] * s_bm
            bias = tl.load(bias_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            bias = bias.to(tl.float32) * 1.4426950408889634
        va = _load_tile(v_base, offs_n, n_ok, s_vn, 0, DVA, DV)  # one read of V feeds both maps
        if DVB > 0:
            vb = _load_tile(v_base, offs_n, n_ok, s_vn, DVA, DVB, DV)

        # Signal map. The two maps are handled one after the other so that only one score tile
        # is live at a time (two accumulators already take most of the registers).
        k1a = _load_tile(k1_base, offs_n, n_ok, s_k1n, 0, DA, D)
        s1 = tl.dot(q1a, tl.trans(k1a))
        if DB > 0:
            k1b = _load_tile(k1_base, offs_n, n_ok, s_k1n, DA, DB, D)
            s1 = tl.dot(q1b, tl.trans(k1b), s1)
        s1 = s1 * qk_scale
        if HAS_BIAS:
            s1 = s1 + bias
        s1 = tl.where(ok, s1, float("-inf"))
        m1_new = tl.maximum(m1, tl.max(s1, 1))
        if HAS_BIAS:  # a row masked out so far has max -inf: shift by 0 instead (no NaN)
            m1_use = tl.where(m1_new == float("-inf"), 0.0, m1_new)
        else:
            m1_use = m1_new
        alpha1 = tl.exp2(m1 - m1_use)
        p1 = tl.exp2(s1 - m1_use[:, None])
        l1 = l1 * alpha1 + tl.sum(p1, 1)
        m1 = m1_new
        p1 = p1.to(dtype)
        acc1a = tl.dot(p1, va, acc1a * alpha1[:, None])
        if DVB > 0:
            acc1b = tl.dot(p1, vb, acc1b * alpha1[:, None])

        # Noise map.
        k2a = _load_tile(k2_base, offs_n, n_ok, s_k2n, 0, DA, D)
        s2 = tl.dot(q2a, tl.trans(k2a))
        if DB > 0:
            k2b = _load_tile(k2_base, offs_n, n_ok, s_k2n, DA, DB, D)
            s2 = tl.dot(q2b, tl.trans(k2b), s2)
        s2 = s2 * qk_scale
        if HAS_BIAS:
            s2 = s2 + bias
        s2 = tl.where(ok, s2, float("-inf"))
        m2_new = tl.maximum(m2, tl.max(s2, 1))
        if HAS_BIAS:
            m2_use = tl.where(m2_new == float("-inf"), 0.0, m2_new)
        else:
            m2_use = m2_new
        alpha2 = tl.exp2(m2 - m2_use)
        p2 = tl.exp2(s2 - m2_use[:, None])
        l2 = l2 * alpha2 + tl.sum(p2, 1)
        m2 = m2_new
        p2 = p2.to(dtype)
        acc2a = tl.dot(p2, va, acc2a * alpha2[:, None])
        if DVB > 0:
            acc2b = tl.dot(p2, vb, acc2b * alpha2[:, None])

    lam = tl.load(LAM + h * lam_stride).to(tl.float32)
    if HAS_BIAS:  # a fully masked row gives zeros, as SDPA does
        l1_safe = tl.where(l1 == 0.0, 1.0, l1)
        l2_safe = tl.where(l2 == 0.0, 1.0, l2)
    else:
        l1_safe = l1
        l2_safe = l2
    inv1 = 1.0 / l1_safe
    inv2 = 1.0 / l2_safe

    out_base = OUT + b * s_ob + h * s_oh
    o2_base = O2N + b * s_pb + h * s_ph
    o2a = acc2a * inv2[:, None]
    _store_tile(out_base, offs_m, m_ok, s_on, (acc1a * inv1[:, None] - lam * o2a).to(dtype), 0, DVA, DV)
    if STORE_STATS:
        _store_tile(o2_base, offs_m, m_ok, s_pn, o2a.to(dtype), 0, DVA, DV)
    if DVB > 0:
        o2b = acc2b * inv2[:, None]
        _store_tile(out_base, offs_m, m_ok, s_on, (acc1b * inv1[:, None] - lam * o2b).to(dtype),
                    DVA, DVB, DV)
        if STORE_STATS:
            _store_tile(o2_base, offs_m, m_ok, s_pn, o2b.to(dtype), DVA, DVB, DV)
    if STORE_STATS:  # log2-domain log-sum-exp of each map's rows; +inf marks a fully masked row
        lse1 = m1 + tl.log2(l1_safe)
        lse2 = m2 + tl.log2(l2_safe)
        if HAS_BIAS:
            lse1 = tl.where(l1 == 0.0, float("inf"), lse1)
            lse2 = tl.where(l2 == 0.0, float("inf"), lse2)
        row = (b * n_heads + h) * N + offs_m
        tl.store(LSE1 + row, lse1, mask=m_ok)
        tl.store(LSE2 + row, lse2, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_pre_kernel(
    OUT, O2N, DO, LAM, DEL1, DEL2, DQ1, DQ2,
    s_ob, s_oh, s_on, s_pb, s_ph, s_pn, s_db, s_dh, s_dn,
    s_dq1b, s_dq1h, s_dq1n, s_dq2b, s_dq2h, s_dq2n,
    N, GROUP, lam_stride,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    DV: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """D2 = rowsum(dO ⊙ O2/l2), D1 = rowsum(dO ⊙ O1/l1) = rowsum(dO ⊙ out) + λ·D2; and zeroes
    the float32 dQ accumulators of these rows (saves two memset launches)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_heads = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    out_base = OUT + b * s_ob + h * s_oh
    o2_base = O2N + b * s_pb + h * s_ph
    do_base = DO + b * s_db + h * s_dh
    do = _load_tile(do_base, offs_m, m_ok, s_dn, 0, DVA, DV).to(tl.float32)
    d1 = tl.sum(do * _load_tile(out_base, offs_m, m_ok, s_on, 0, DVA, DV).to(tl.float32), 1)
    d2 = tl.sum(do * _load_tile(o2_base, offs_m, m_ok, s_pn, 0, DVA, DV).to(tl.float32), 1)
    if DVB > 0:
        do = _load_tile(do_base, offs_m, m_ok, s_dn, DVA, DVB, DV).to(tl.float32)
        d1 += tl.sum(do * _load_tile(out_base, offs_m, m_ok, s_on, DVA, DVB, DV).to(tl.float32), 1)
        d2 += tl.sum(do * _load_tile(o2_base, offs_m, m_ok, s_pn, DVA, DVB, DV).to(tl.float32), 1)
    lam = tl.load(LAM + h * lam_stride).to(tl.float32)
    row = (b * n_heads + h) * N + offs_m
    tl.store(DEL1 + row, d1 + lam * d2, mask=m_ok)
    tl.store(DEL2 + row, d2, mask=m_ok)

    dq1_base = DQ1 + b * s_dq1b + h * s_dq1h
    _store_tile(dq1_base, offs_m, m_ok, s_dq1n, tl.zeros([BLOCK_M, DA], tl.float32), 0, DA, D)
    if DB > 0:
        _store_tile(dq1_base, offs_m, m_ok, s_dq1n, tl.zeros([BLOCK_M, DB], tl.float32), DA, DB, D)
    if h % GROUP == 0:  # one signal head per group zeroes the group's shared dQ2 rows
        dq2_base = DQ2 + b * s_dq2b + (h // GROUP) * s_dq2h
        _store_tile(dq2_base, offs_m, m_ok, s_dq2n, tl.zeros([BLOCK_M, DA], tl.float32), 0, DA, D)
        if DB > 0:
            _store_tile(dq2_base, offs_m, m_ok, s_dq2n, tl.zeros([BLOCK_M, DB], tl.float32), DA, DB, D)


@triton.jit
def _bwd_kernel(
    Q1, K1, Q2, K2, V, LAM, BIAS, DO, LSE1, LSE2, DEL1, DEL2,
    DQ1, DQ2, DK1, DK2, DV,
    s_q1b, s_q1h, s_q1n, s_k1b, s_k1h, s_k1n,
    s_q2b, s_q2h, s_q2n, s_k2b, s_k2h, s_k2n,
    s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    s_dq1b, s_dq1h, s_dq1n, s_dq2b, s_dq2h, s_dq2n,
    s_dk1b, s_dk1h, s_dk1n, s_dk2b, s_dk2h, s_dk2n, s_dvb, s_dvh, s_dvn,
    s_bb, s_bh, s_bn, s_bm,
    N, M, GROUP, lam_stride, qk_scale, sm_scale,
    D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
    DV_: tl.constexpr, DVA: tl.constexpr, DVB: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    DO_DKDQ: tl.constexpr, DO_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one signal head; loops over the query tiles that see it.

    DO_DKDQ: dK1, dK2 (registers) and dQ1, dQ2 (atomics); DO_DV: dV. Both in one pass is the
    fewest FLOPs but holds three accumulators (dK1, dK2, dV); two passes (dK/dQ, then dV)
    recompute the scores once more but each holds at most two.
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_heads = tl.num_programs(1)
    g = h // GROUP
    dtype = Q1.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < M
    q1_base = Q1 + b * s_q1b + h * s_q1h
    q2_base = Q2 + b * s_q2b + g * s_q2h
    k1_base = K1 + b * s_k1b + h * s_k1h
    k2_base = K2 + b * s_k2b + g * s_k2h
    v_base = V + b * s_vb + h * s_vh
    do_base = DO + b * s_db + h * s_dh
    dq1_base = DQ1 + b * s_dq1b + h * s_dq1h
    dq2_base = DQ2 + b * s_dq2b + g * s_dq2h
    row_base = (b * n_heads + h) * N

    k1a = _load_tile(k1_base, offs_n, n_ok, s_k1n, 0, DA, D)
    k2a = _load_tile(k2_base, offs_n, n_ok, s_k2n, 0, DA, D)
    if DB > 0:
        k1b = _load_tile(k1_base, offs_n, n_ok, s_k1n, DA, DB, D)
        k2b = _load_tile(k2_base, offs_n, n_ok, s_k2n, DA, DB, D)
    if DO_DKDQ:
        va = _load_tile(v_base, offs_n, n_ok, s_vn, 0, DVA, DV_)
        if DVB > 0:
            vb = _load_tile(v_base, offs_n, n_ok, s_vn, DVA, DVB, DV_)
        dk1a = tl.zeros([BLOCK_N, DA], tl.float32)
        dk2a = tl.zeros([BLOCK_N, DA], tl.float32)
        if DB > 0:
            dk1b = tl.zeros([BLOCK_N, DB], tl.float32)
            dk2b = tl.zeros([BLOCK_N, DB], tl.float32)
    if DO_DV:
        dva = tl.zeros([BLOCK_N, DVA], tl.float32)
        if DVB > 0:
            dvb = tl.zeros([BLOCK_N, DVB], tl.float32)
    lam = tl.load(LAM + h * lam_stride).to(tl.float32)
    # Key rows past M are loaded as zeros, so their scores are 0 (plus a bias read as 0), and
    # exp2(0 − lse) = 2^−lse is not 0: with few keys the log-sum-exp can be far below 0 (N = M = 1:
    # lse is the one score), and 2^−lse·(dPv − D) then overflows float16 in dS (float32 itself
    # past lse < −128); inf × the zero key rows is NaN in dQ. -inf scores give those columns P = 0.
    key_pad = tl.where(n_ok, 0.0, float("-inf"))

    lo = 0
    if IS_CAUSAL:  # only queries i >= the tile's first key see it
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        # Rows past N (and fully masked rows) carry lse = +inf, so their probabilities are 0.
        lse1 = tl.load(LSE1 + row_base + offs_m, mask=m_ok, other=float("inf"))
        lse2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=float("inf"))
        if IS_CAUSAL:
            ok = offs_m[None, :] >= offs_n[:, None]
        if HAS_BIAS:
            bias_ptrs = BIAS + b * s_bb + h * s_bh + offs_n[:, None] * s_bm + offs_m[None, :] * s_bn
            bias = tl.load(bias_ptrs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            bias = bias.to(tl.float32) * 1.4426950408889634
        # Everything below is transposed: keys x queries.
        doa = _load_tile(do_base, offs_m, m_ok, s_dn, 0, DVA, DV_)
        if DVB > 0:
            dob = _load_tile(do_base, offs_m, m_ok, s_dn, DVA, DVB, DV_)
        if DO_DKDQ:  # dO·vᵀ, shared by both maps
            d1 = tl.load(DEL1 + row_base + offs_m, mask=m_ok, other=0.0)
            d2 = tl.load(DEL2 + row_base + offs_m, mask=m_ok, other=0.0)
            dp = tl.dot(va, tl.trans(doa))
            if DVB > 0:
                dp = tl.dot(vb, tl.trans(dob), dp)

        # Signal map: P1; dS1 = P1 ⊙ (dPv − D1), dK1, dQ1.
        q1a = _load_tile(q1_base, offs_m, m_ok, s_q1n, 0, DA, D)
        s1 = tl.dot(k1a, tl.trans(q1a))
        if DB > 0:
            q1b = _load_tile(q1_base, offs_m, m_ok, s_q1n, DA, DB, D)
            s1 = tl.dot(k1b, tl.trans(q1b), s1)
        s1 = s1 * qk_scale + key_pad[:, None]
        if HAS_BIAS:
            s1 = s1 + bias
        p1 = tl.exp2(s1 - lse1[None, :])
        if IS_CAUSAL:
            p1 = tl.where(ok, p1, 0.0)
        if DO_DKDQ:
            ds1 = (p1 * (dp - d1[None, :])).to(dtype)
            dk1a = tl.dot(ds1, q1a, dk1a)
            ds1t = tl.trans(ds1)
            _atomic_add_tile(dq1_base, offs_m, m_ok, s_dq1n, tl.dot(ds1t, k1a) * sm_scale, 0, DA, D)
            if DB > 0:
                dk1b = tl.dot(ds1, q1b, dk1b)
                _atomic_add_tile(dq1_base, offs_m, m_ok, s_dq1n, tl.dot(ds1t, k1b) * sm_scale,
                                 DA, DB, D)

        # Noise map: P2; dS2 = −λ·P2 ⊙ (dPv − D2), dK2, dQ2.
        q2a = _load_tile(q2_base, offs_m, m_ok, s_q2n, 0, DA, D)
        s2 = tl.dot(k2a, tl.trans(q2a))
        if DB > 0:
            q2b = _load_tile(q2_base, offs_m, m_ok, s_q2n, DA, DB, D)
            s2 = tl.dot(k2b, tl.trans(q2b), s2)
        s2 = s2 * qk_scale + key_pad[:, None]
        if HAS_BIAS:
            s2 = s2 + bias
        p2 = tl.exp2(s2 - lse2[None, :])
        if IS_CAUSAL:
            p2 = tl.where(ok, p2, 0.0)
        if DO_DKDQ:
            ds2 = ((-lam) * p2 * (dp - d2[None, :])).to(dtype)
            dk2a = tl.dot(ds2, q2a, dk2a)
            ds2t = tl.trans(ds2)
            _atomic_add_tile(dq2_base, offs_m, m_ok, s_dq2n, tl.dot(ds2t, k2a) * sm_scale, 0, DA, D)
            if DB > 0:
                dk2b = tl.dot(ds2, q2b, dk2b)
                _atomic_add_tile(dq2_base, offs_m, m_ok, s_dq2n, tl.dot(ds2t, k2b) * sm_scale,
                                 DA, DB, D)

        if DO_DV:  # dV += (P1 − λP2)ᵀ dO: one product for both maps
            pdiff = (p1 - lam * p2).to(dtype)
            dva = tl.dot(pdiff, doa, dva)
            if DVB > 0:
                dvb = tl.dot(pdiff, dob, dvb)

    if DO_DKDQ:
        dk1_base = DK1 + b * s_dk1b + h * s_dk1h
        dk2_base = DK2 + b * s_dk2b + h * s_dk2h  # per signal head; summed over the group outside
        dk_dtype = DK2.dtype.element_ty
        _store_tile(dk1_base, offs_n, n_ok, s_dk1n, (dk1a * sm_scale).to(dtype), 0, DA, D)
        _store_tile(dk2_base, offs_n, n_ok, s_dk2n, (dk2a * sm_scale).to(dk_dtype), 0, DA, D)
        if DB > 0:
            _store_tile(dk1_base, offs_n, n_ok, s_dk1n, (dk1b * sm_scale).to(dtype), DA, DB, D)
            _store_tile(dk2_base, offs_n, n_ok, s_dk2n, (dk2b * sm_scale).to(dk_dtype), DA, DB, D)
    if DO_DV:
        dv_base = DV + b * s_dvb + h * s_dvh
        _store_tile(dv_base, offs_n, n_ok, s_dvn, dva.to(dtype), 0, DVA, DV_)
        if DVB > 0:
            _store_tile(dv_base, offs_n, n_ok, s_dvn, dvb.to(dtype), DVA, DVB, DV_)


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

Config = tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _configs(kind: str, d: int, dv: int) -> list[Config]:
    """Launch configurations to try, best guess first (the only one used without autotuning).

    Chosen from sm_90 register/shared-memory reports (no spills) and an H100 sweep over the
    benchmark shapes (notes in docs/benchmarks.md).
    """
    width = sum(_split_dim(d)) + sum(_split_dim(dv))
    if kind == "fwd":
        if width <= 256:
            return [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3)]
        return [(64, 32, 8, 2), (64, 64, 8, 2)]
    if kind == "bwd_fused":
        if width <= 256:
            return [(32, 64, 4, 3), (32, 128, 8, 3), (16, 64, 4, 3)]
        return [(16, 64, 8, 2), (32, 64, 8, 2)]
    if kind == "bwd_dkdq":
        if width <= 256:
            return [(64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)]
        return [(16, 64, 8, 2), (32, 64, 8, 2)]
    if kind == "bwd_dv":
        if width <= 256:
            return [(32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2)]
        return [(32, 64, 8, 2), (64, 64, 8, 2)]
    raise ValueError(kind)


_BEST: dict = {}  # tuning key -> (best Config, its median time in ms or None)


def _launch(kind: str, kernel, grid_fn, args, meta, key, reset=(), launch=True):
    """Launch with the best configuration for ``key``, timing the candidates on first use.

    A small tuner instead of ``triton.autotune``: it keys on what matters (kind, dims, N, M, flags,
    dtype), skips configurations that do not fit the GPU, and costs one dict lookup per call.
    ``reset`` lists tensors that are accumulated into (zeroed before every trial run). Returns
    the best configuration's time (None when it was not timed).
    """
    best = _BEST.get(key)
    if best is None:
        d, dv = meta["D"], meta.get("DV", meta.get("DV_"))
        cands = _configs(kind, d, dv)
        forced = os.environ.get(f"DIFFVISION_TRITON_{kind.upper()}")
        if forced:  # e.g. DIFFVISION_TRITON_FWD=128,64,8,3 (experiments)
            cands = [tuple(int(x) for x in forced.split(","))]
        if len(cands) == 1 or not _autotune_enabled():
            best = (cands[0], None)
        else:
            best = _tune(kind, kernel, grid_fn, args, meta, cands, reset)
        _BEST[key] = best
    if launch:
        bm, bn, w, st = best[0]
        kernel[grid_fn(bm, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    return best[1]


def _tune(kind, kernel, grid_fn, args, meta, cands, reset):
    from triton.testing import do_bench

    timings = {}
    for cfg in cands:
        bm, bn, w, st = cfg

        def run():
            for t in reset:
                t.zero_()
            kernel[grid_fn(bm, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        try:
            run()
            timings[cfg] = do_bench(run, warmup=5, rep=25, return_mode="median")
        except Exception as err:  # out of shared memory / registers on this GPU: skip it
            if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err):
                raise
    for t in reset:
        t.zero_()
    if not timings:
        raise RuntimeError(f"no launch configuration of the Triton {kind} kernel fits this GPU")
    best = min(timings, key=timings.get)
    if os.environ.get("DIFFVISION_TRITON_VERBOSE"):
        print(f"[diffvision triton] {kind} d={meta['D']} "
              + "; ".join(f"{c}: {t:.3f} ms" for c, t in timings.items()) + f" -> {best}", flush=True)
    return best, timings[best]


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def _empty_bnhd(B, H, N, D, like: Tensor, dtype=None) -> Tensor:
    """A (B, H, N, D) tensor laid out as (B, N, H, D) in memory (not a view)."""
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), device=like.device,
                               dtype=dtype or like.dtype)


def _is_dense(t: Tensor) -> bool:
    """True when t's elements fill its storage span exactly (some permutation is contiguous)."""
    expect = 1
    for i in sorted(range(t.dim()), key=t.stride):
        if t.shape[i] != 1 and t.stride(i) != expect:
            return False
        expect *= t.shape[i]
    return True


def _grad_like(t: Tensor) -> Tensor:
    """Gradient buffer for input t: t's own layout when dense (autograd then keeps it as is), else
    (B, S, H, D) in memory, like the projection that strided views such as t come from."""
    if _is_dense(t):
        return torch.empty_like(t)
    B, H, S, D = t.shape
    return _empty_bnhd(B, H, S, D, t)


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_args(bias: Optional[Tensor], like: Tensor):
    if bias is None:
        return like, (0, 0, 0, 0)
    return bias, tuple(bias.stride())


def _forward(q1, k1, q2, k2, v, lam, bias, is_causal: bool, scale: float, store_stats: bool):
    B, Hs, N, d = q1.shape
    Hn, M, dv = q2.shape[1], k1.shape[2], v.shape[3]
    da, db = _split_dim(d)
    dva, dvb = _split_dim(dv)
    dev, dtype = q1.device, q1.dtype
    # The output is laid out (B, N, Hs, dv) so that merging the heads back is a free view.
    out = _empty_bnhd(B, Hs, N, dv, q1)
    if store_stats:
        o2n = torch.empty(B, Hs, N, dv, device=dev, dtype=dtype)
        lse1 = torch.empty(B, Hs, N, device=dev, dtype=torch.float32)
        lse2 = torch.empty(B, Hs, N, device=dev, dtype=torch.float32)
    else:
        o2n, lse1, lse2 = out, lam, lam  # never written (STORE_STATS=False)
    bias_t, bias_strides = _bias_args(bias, q1)
    args = (q1, k1, q2, k2, v, lam, bias_t, out, o2n, lse1, lse2,
            *_strides3(q1), *_strides3(k1), *_strides3(q2), *_strides3(k2), *_strides3(v),
            *_strides3(out), *_strides3(o2n), *bias_strides,
            N, M, Hs // Hn, 1 if lam.dim() == 1 else 0, scale * _LOG2E)
    meta = dict(D=d, DA=da, DB=db, DV=dv, DVA=dva, DVB=dvb, IS_CAUSAL=is_causal,
                HAS_BIAS=bias is not None, STORE_STATS=store_stats)
    key = ("fwd", d, dv, N, M, Hs // Hn, triton.next_power_of_2(B * Hs), is_causal, bias is not None,
           store_stats, dtype)
    _launch("fwd", _fwd_kernel, lambda bm, bn: (triton.cdiv(N, bm), Hs, B), args, meta, key)
    return out, o2n, lse1, lse2


def _backward(dout, q1, k1, q2, k2, v, lam, bias, out, o2n, lse1, lse2, is_causal: bool, scale: float,
              grad_like=None):
    B, Hs, N, d = q1.shape
    Hn, M, dv = q2.shape[1], k1.shape[2], v.shape[3]
    group = Hs // Hn
    da, db = _split_dim(d)
    dva, dvb = _split_dim(dv)
    dev, dtype = q1.device, q1.dtype
    lam_stride = 1 if lam.dim() == 1 else 0

    delta1 = torch.empty(B, Hs, N, device=dev, dtype=torch.float32)
    delta2 = torch.empty(B, Hs, N, device=dev, dtype=torch.float32)
    dq1_acc = torch.empty(B, Hs, N, d, device=dev, dtype=torch.float32)  # zeroed by the pre kernel
    dq2_acc = torch.empty(B, Hn, N, d, device=dev, dtype=torch.float32)
    pre_block = 64 if dv <= 128 else 32
    _bwd_pre_kernel[(triton.cdiv(N, pre_block), Hs, B)](
        out, o2n, dout, lam, delta1, delta2, dq1_acc, dq2_acc,
        *_strides3(out), *_strides3(o2n), *_strides3(dout), *_strides3(dq1_acc), *_strides3(dq2_acc),
        N, group, lam_stride,
        D=d, DA=da, DB=db, DV=dv, DVA=dva, DVB=dvb, BLOCK_M=pre_block, num_warps=4)

    grad_like = grad_like or _grad_like
    dk1 = grad_like(k1)
    dv_ = grad_like(v)
    if group == 1:
        dk2 = grad_like(k2)
    else:  # one partial dK2 per signal head, summed over the group below
        dk2 = torch.empty(B, Hs, M, d, device=dev, dtype=torch.float32)
    bias_t, bias_strides = _bias_args(bias, q1)
    args = (q1, k1, q2, k2, v, lam, bias_t, dout, lse1, lse2, delta1, delta2,
            dq1_acc, dq2_acc, dk1, dk2, dv_,
            *_strides3(q1), *_strides3(k1), *_strides3(q2), *_strides3(k2), *_strides3(v),
            *_strides3(dout), *_strides3(dq1_acc), *_strides3(dq2_acc),
            *_strides3(dk1), *_strides3(dk2), *_strides3(dv_), *bias_strides,
            N, M, group, lam_stride, scale * _LOG2E, scale)
    grid = lambda bm, bn: (triton.cdiv(M, bn), Hs, B)  # noqa: E731
    base_key = (d, dv, N, M, group, triton.next_power_of_2(B * Hs), is_causal, bias is not None, dtype)
    flags = dict(D=d, DA=da, DB=db, DV_=dv, DVA=dva, DVB=dvb, IS_CAUSAL=is_causal,
                 HAS_BIAS=bias is not None)
    passes = {"bwd_fused": [dict(flags, DO_DKDQ=True, DO_DV=True)],  # one pass, three accumulators
              "bwd_split": [dict(flags, DO_DKDQ=True, DO_DV=False),  # dK1, dK2, dQ1, dQ2
                            dict(flags, DO_DKDQ=False, DO_DV=True)]}  # then dV
    forced = os.environ.get("DIFFVISION_TRITON_BWD")  # "fused" or "split" (experiments)
    mode = _BWD_MODE.get(base_key) or (f"bwd_{forced}" if forced else None)
    if mode is None:  # first call for this shape: time both ways, keep the faster
        if _autotune_enabled():
            t_fused = _launch("bwd_fused", _bwd_kernel, grid, args, passes["bwd_fused"][0],
                              ("bwd_fused",) + base_key, reset=(dq1_acc, dq2_acc), launch=False)
            t_dkdq = _launch("bwd_dkdq", _bwd_kernel, grid, args, passes["bwd_split"][0],
                             ("bwd_dkdq",) + base_key, reset=(dq1_acc, dq2_acc), launch=False)
            t_dv = _launch("bwd_dv", _bwd_kernel, grid, args, passes["bwd_split"][1],
                           ("bwd_dv",) + base_key, launch=False)
            t_split = (t_dkdq or 0.0) + (t_dv or 0.0)
            mode = "bwd_fused" if t_fused is None or t_fused <= t_split else "bwd_split"
        else:
            mode = "bwd_split" if d + dv > 192 or N > 2048 else "bwd_fused"
        _BWD_MODE[base_key] = mode
    kinds = ["bwd_fused"] if mode == "bwd_fused" else ["bwd_dkdq", "bwd_dv"]
    for kind, meta in zip(kinds, passes[mode]):
        _launch(kind, _bwd_kernel, grid, args, meta, (kind,) + base_key,
                reset=(dq1_acc, dq2_acc) if meta["DO_DKDQ"] else ())

    dq1 = grad_like(q1)
    dq1.copy_(dq1_acc)
    dq2 = grad_like(q2)
    dq2.copy_(dq2_acc)
    if group > 1:
        dk2 = grad_like(k2).copy_(dk2.view(B, Hn, group, M, d).sum(2))
    # dλ_i = −Σ_rows rowsum(dO_i ⊙ O2_i/l2_i)
    dlam = -delta2.sum(dim=(0, 2)) if lam.dim() == 1 else -delta2.sum()
    return dq1, dk1, dq2, dk2, dv_, dlam


class _DifferentialAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, k1, q2, k2, v, lam, bias, is_causal, scale):
        lam32 = lam.detach().float().contiguous()
        out, o2n, lse1, lse2 = _forward(q1, k1, q2, k2, v, lam32, bias, is_causal, scale, True)
        ctx.save_for_backward(q1, k1, q2, k2, v, lam32, bias, out, o2n, lse1, lse2)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.lam_meta = (lam.shape, lam.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q1, k1, q2, k2, v, lam32, bias, out, o2n, lse1, lse2 = ctx.saved_tensors
        dout = _last_contiguous(dout)
        with torch.cuda.device(q1.device) if q1.is_cuda else contextlib.nullcontext():
            dq1, dk1, dq2, dk2, dv, dlam = _backward(
                dout, q1, k1, q2, k2, v, lam32, bias, out, o2n, lse1, lse2, ctx.is_causal, ctx.scale)
        lam_shape, lam_dtype = ctx.lam_meta
        return dq1, dk1, dq2, dk2, dv, dlam.reshape(lam_shape).to(lam_dtype), None, None, None


# ---------------------------------------------------------------------------------------------
# torch.compile: the same kernels as custom operators, so Dynamo keeps one graph around them
# (an autograd.Function that launches Triton kernels would break the graph at every layer).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("diffvision::differential_attention_fwd", mutates_args=())
def _op_fwd(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor,
            bias: Optional[Tensor], is_causal: bool, scale: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.cuda.device(q1.device) if q1.is_cuda else contextlib.nullcontext():
        return _forward(q1, k1, q2, k2, v, lam.detach().float().contiguous(), bias, is_causal, scale,
                        True)


@_op_fwd.register_fake
def _(q1, k1, q2, k2, v, lam, bias, is_causal, scale):
    B, Hs, N, _ = q1.shape
    dv = v.shape[3]
    return (_empty_bnhd(B, Hs, N, dv, q1), q1.new_empty(B, Hs, N, dv),
            q1.new_empty(B, Hs, N, dtype=torch.float32), q1.new_empty(B, Hs, N, dtype=torch.float32))


@torch.library.custom_op("diffvision::differential_attention_bwd", mutates_args=())
def _op_bwd(dout: Tensor, q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor,
            bias: Optional[Tensor], out: Tensor, o2n: Tensor, lse1: Tensor, lse2: Tensor,
            is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.cuda.device(q1.device) if q1.is_cuda else contextlib.nullcontext():
        grads = _backward(_last_contiguous(dout), q1, k1, q2, k2, v, lam.detach().float().contiguous(),
                          bias, out, o2n, lse1, lse2, is_causal, scale, grad_like=_bnhd_like)
    return grads[:5] + (grads[5].reshape(lam.shape).to(lam.dtype),)


def _bnhd_like(t: Tensor) -> Tensor:
    """(B, S, H, D)-in-memory buffer shaped like t: strides fixed by the shape alone, so the
    fake (traced) and real outputs of the operator always agree."""
    B, H, S, D = t.shape
    return _empty_bnhd(B, H, S, D, t)


@_op_bwd.register_fake
def _(dout, q1, k1, q2, k2, v, lam, bias, out, o2n, lse1, lse2, is_causal, scale):
    return (_bnhd_like(q1), _bnhd_like(k1), _bnhd_like(q2), _bnhd_like(k2), _bnhd_like(v),
            torch.empty_like(lam))


def _op_setup_context(ctx, inputs, output):
    q1, k1, q2, k2, v, lam, bias, is_causal, scale = inputs
    out, o2n, lse1, lse2 = output
    ctx.save_for_backward(q1, k1, q2, k2, v, lam, bias, out, o2n, lse1, lse2)
    ctx.is_causal, ctx.scale = is_causal, scale


def _op_backward(ctx, dout, _do2n, _dlse1, _dlse2):
    q1, k1, q2, k2, v, lam, bias, out, o2n, lse1, lse2 = ctx.saved_tensors
    grads = _op_bwd(dout, q1, k1, q2, k2, v, lam, bias, out, o2n, lse1, lse2, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None)


torch.library.register_autograd("diffvision::differential_attention_fwd", _op_backward,
                                setup_context=_op_setup_context)


def _mask_to_bias(attn_mask: Optional[Tensor], B, Hs, N, M, dtype) -> Optional[Tensor]:
    """attn_mask (bool: True = attend, or additive) as an additive bias viewed as (B, Hs, N, M).

    A bool mask becomes a bias in ``dtype``; a float32/bf16/fp16 mask is read as it is and added in
    float32 (float64 is cast to float32). Broadcast dims stay broadcast (stride 0): a (N, M) mask is
    not copied B·Hs times.
    """
    if attn_mask is None:
        return None
    if attn_mask.is_floating_point():
        dtype = torch.float32 if attn_mask.dtype == torch.float64 else attn_mask.dtype
    bias = attention_bias(attn_mask, False, N, M, dtype, attn_mask.device)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias.expand(B, Hs, N, M)


# ---------------------------------------------------------------------------------------------
# Public entry points (called by diffvision.attention.functional)
# ---------------------------------------------------------------------------------------------

_CAPABILITY: dict = {}


@torch._dynamo.assume_constant_result  # torch.compile: a constant, not a graph break
def _capability(index: Optional[int]) -> tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def unsupported_reason(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor,
                       attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Optional[str]:
    """None when the Triton kernel can run this (already validated) call, else a short reason."""
    if not q1.is_cuda and not (_interpreting() and q1.device.type == "cpu"):
        return f"the inputs are on {q1.device}; the Triton kernel needs CUDA tensors"
    if q1.is_cuda and _capability(q1.device.index) < (8, 0):
        cap = _capability(q1.device.index)
        return f"the GPU has compute capability {cap[0]}.{cap[1]}; the Triton kernel needs 8.0 or newer"
    allowed = (torch.float16, torch.bfloat16) + ((torch.float32,) if _interpreting() else ())
    if q1.dtype not in allowed:
        return f"dtype {q1.dtype} is not supported by the Triton kernel (bfloat16 or float16 only)"
    d, dv = q1.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"head dim d={d} is larger than the Triton kernel's maximum {MAX_HEAD_DIM}"
    if dv > MAX_VALUE_DIM:
        return f"value head dim dv={dv} is larger than the Triton kernel's maximum {MAX_VALUE_DIM}"
    if dropout_p > 0.0:
        return f"dropout_p={dropout_p}: the Triton kernel has no attention dropout"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad; the Triton kernel gives no gradient to the mask"
    return None


def triton_differential_attention(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor,
                                  lam: Tensor, is_causal: bool = False, scale: Optional[float] = None,
                                  attn_mask: Optional[Tensor] = None) -> Tensor:
    """Differential attention through the fused kernel; inputs validated by the caller.

    Same contract as ``differential_attention`` (see functional.py); gradients flow to
    q1, k1, q2, k2, v and lam.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q1.shape[-1])
    q1, k1, q2, k2, v = (_last_contiguous(t) for t in (q1, k1, q2, k2, v))
    B, Hs, N, _ = q1.shape
    bias = _mask_to_bias(attn_mask, B, Hs, N, k1.shape[2], q1.dtype)
    if torch.compiler.is_compiling():  # one opaque operator in the graph, with its own backward
        return torch.ops.diffvision.differential_attention_fwd(
            q1, k1, q2, k2, v, lam, bias, bool(is_causal), float(scale))[0]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q1, k1, q2, k2, v, lam))
    with torch.cuda.device(q1.device) if q1.is_cuda else contextlib.nullcontext():
        if needs_grad:
            return _DifferentialAttentionFn.apply(q1, k1, q2, k2, v, lam, bias, bool(is_causal),
                                                  float(scale))
        lam32 = lam.detach().float().contiguous()
        return _forward(q1, k1, q2, k2, v, lam32, bias, bool(is_causal), float(scale), False)[0]
