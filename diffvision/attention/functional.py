"""The differential attention function shared by every diffvision model.

    out[:, i] = (softmax(q1_i k1_iᵀ·s + mask) − lam_i · softmax(q2_g k2_gᵀ·s + mask)) @ v_i,
    g = i // (Hs // Hn)

Hs == Hn is DIFF attention (Ye et al., 2025); Hs > Hn is Grouped Differential Attention, where
each noise map is shared by a group of Hs // Hn consecutive signal heads (like GQA shares K/V).

:func:`differential_attention_v2` is DIFF V2 (the authors' 2026 successor, microsoft/unilm
``Diff-Transformer/Diff-Transformer-V2``): ``2h`` query heads on ``h_kv`` key/value heads (GQA), one
softmax-attention call, and output head ``i`` = ``A(q_2i) − lam_i · A(q_2i+1)`` with ``lam`` per token.

Backends compute the same function:
  * ``"math"``: materialises both maps; the readable reference.
  * ``"sdpa"``: two ``F.scaled_dot_product_attention`` calls, no N×M map kept.
  * ``"triton"``: the fused kernel in :mod:`diffvision.attention.triton_kernel` (CUDA only).
  * ``"auto"``: the fastest backend that supports the call: ``"sdpa"`` under ``torch.compile``,
    ``"triton"`` for eager CUDA calls it supports, else ``"sdpa"`` (the measurements: ``_auto_backend``).

While a model is recorded for deployment (:func:`exporting`: ``torch.onnx.export``, ``torch.export``,
``torch.jit.trace`` / ``script``) ``"auto"`` and ``"triton"`` run ``"sdpa"``: no exporter can record the
Triton launch. ``torch.jit.script`` cannot compile the keyword-only signatures and the input checks of the
public functions; the layers call :func:`differential_attention_unchecked` /
:func:`differential_attention_v2_unchecked` (positional, no checks) when scripted.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..choices import check_choice
from .maps import attention_bias, no_key_rows, softmax_maps

__all__ = ["differential_attention", "differential_attention_v2", "BACKENDS", "V2_BACKENDS",
           "available_backends", "exporting"]

BACKENDS = ("auto", "math", "sdpa", "triton")
V2_BACKENDS = ("auto", "math", "sdpa")  # DIFF V2 is one SDPA call: flash / cuDNN kernels, no Triton kernel of ours


# --------------------------------------------------------------------------------------------
# Input validation: every error names the argument, what it got and what is accepted.
# --------------------------------------------------------------------------------------------

def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensors(tensors: dict[str, Tensor]) -> None:
    """Each a 4-d floating tensor; all of one dtype and on one device."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    names = ", ".join(tensors)
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"{names} must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{names} must be on one device, got {devices}")


def _check_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple], meaning: dict[str, str]) -> None:
    for name, exp in expected.items():
        if tuple(tensors[name].shape) != exp:
            raise ValueError(f"{name} has shape {_shape(tensors[name])}, expected {exp} = {meaning[name]}")


def _check_lam_tensor(lam, device, what: str) -> None:
    if not isinstance(lam, Tensor):
        raise TypeError(f"lam must be a torch.Tensor ({what}), got {type(lam).__name__}")
    if not lam.is_floating_point():
        raise ValueError(f"lam must be a floating-point tensor, got dtype {lam.dtype}")
    if lam.device != device:
        raise ValueError(f"lam is on {lam.device}, expected the inputs' device {device}")


def _broadcasts_to(shape: torch.Size, target: tuple) -> bool:
    return len(shape) <= len(target) and all(
        got in (1, want) for got, want in zip(reversed(shape), reversed(target)))


def _check_call(attn_mask, target: tuple, target_name: str, device, is_causal, dropout_p, scale, backend,
                backends: tuple[str, ...]) -> None:
    """The mask (broadcastable to ``target``), is_causal, dropout_p, scale and the backend name."""
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, expected {device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
        if not _broadcasts_to(attn_mask.shape, target):
            raise ValueError(
                f"attn_mask has shape {_shape(attn_mask)}, expected a shape broadcastable to "
                f"{target_name} = {target}")
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    check_choice("backend", backend, backends)


def _validate(q1, k1, q2, k2, v, lam, attn_mask, is_causal, dropout_p, scale, backend) -> None:
    tensors = {"q1": q1, "k1": k1, "q2": q2, "k2": k2, "v": v}
    _check_tensors(tensors)
    B, Hs, N, d = q1.shape
    Hn, M, dv = q2.shape[1], k1.shape[2], v.shape[3]
    _check_shapes(tensors, {
        "k1": (B, Hs, M, d),
        "q2": (B, Hn, N, d),
        "k2": (B, Hn, M, d),
        "v": (B, Hs, M, dv),
    }, {
        "k1": "(B, Hs, M, d) with B, Hs, d from q1",
        "q2": "(B, Hn, N, d) with B, N, d from q1",
        "k2": "(B, Hn, M, d) with Hn from q2 and M from k1",
        "v": "(B, Hs, M, dv) with B, Hs from q1 and M from k1",
    })
    if Hn == 0 or Hs % Hn != 0:
        raise ValueError(
            f"signal heads Hs={Hs} (q1.shape[1]) must be a multiple of noise heads Hn={Hn} "
            f"(q2.shape[1]); accepted: Hn in the divisors of Hs")
    if N == 0 or M == 0 or d == 0 or dv == 0:
        raise ValueError(f"empty attention: q1 {_shape(q1)}, k1 {_shape(k1)}, v {_shape(v)}")
    _check_lam_tensor(lam, q1.device, f"0-d or shape ({Hs},)")
    if not (lam.dim() == 0 or tuple(lam.shape) == (Hs,)):
        raise ValueError(f"lam has shape {_shape(lam)}, expected () or ({Hs},) (one per signal head)")
    _check_call(attn_mask, (B, Hs, N, M), "(B, Hs, N, M)", q1.device, is_causal, dropout_p, scale, backend,
                BACKENDS)


def _validate_v2(q, k, v, lam, attn_mask, is_causal, dropout_p, scale, backend) -> None:
    tensors = {"q": q, "k": k, "v": v}
    _check_tensors(tensors)
    B, Q, N, d = q.shape
    Hkv, M, dv = k.shape[1], k.shape[2], v.shape[3]
    _check_shapes(tensors, {"k": (B, Hkv, M, d), "v": (B, Hkv, M, dv)}, {
        "k": "(B, h_kv, M, d) with B, d from q",
        "v": "(B, h_kv, M, dv) with h_kv, M from k",
    })
    if Q % 2 != 0:
        raise ValueError(f"q has {Q} query heads (q.shape[1]); DIFF V2 needs an even number 2h of them "
                         f"(query heads 2i and 2i+1 are subtracted)")
    if Hkv == 0 or (Q // 2) % Hkv != 0:
        raise ValueError(
            f"q has 2h={Q} query heads and k, v have h_kv={Hkv} heads (k.shape[1]): the subtracted pair 2i, 2i+1 "
            f"must share one key/value head, so 2h/h_kv must be an even integer; accepted: h_kv dividing h={Q // 2}")
    if N == 0 or M == 0 or d == 0 or dv == 0:
        raise ValueError(f"empty attention: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    h = Q // 2
    _check_lam_tensor(lam, q.device, f"broadcastable to (B, h, N) = {(B, h, N)}")
    if not _broadcasts_to(lam.shape, (B, h, N)):
        raise ValueError(f"lam has shape {_shape(lam)}, expected a shape broadcastable to (B, h, N) = "
                         f"{(B, h, N)} (one value per output head and query token)")
    if backend == "triton":
        raise ValueError(f"backend 'triton' has no DIFF V2 kernel (DIFF V2 is one SDPA call, which reaches the "
                         f"flash / cuDNN kernels on CUDA); accepted: {list(V2_BACKENDS)}")
    _check_call(attn_mask, (B, Q, N, M), "(B, 2h, N, M)", q.device, is_causal, dropout_p, scale, backend,
                V2_BACKENDS)


# --------------------------------------------------------------------------------------------
# Backends (TorchScript's subset of Python: scripted layers compile them)
# --------------------------------------------------------------------------------------------

def exporting() -> bool:
    """True while the model is recorded for deployment: ``torch.onnx.export`` (either exporter),
    ``torch.export``, ``torch.jit.trace`` or ``torch.jit.script``. The layers then take ops that every one
    of them can represent: SDPA, never the Triton kernel; RMSNorm written out; GQA heads expanded."""
    if torch.jit.is_scripting():
        return True
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()


def _at_least_2d(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A 0-d or (M,) mask as (1, 1) / (1, M): it broadcasts the same, and SDPA indexes a mask's last two dims."""
    if attn_mask is None or attn_mask.dim() >= 2:
        return attn_mask
    return attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16: the maps' logits and softmax overflow or round badly in half
    precision (q·k of 1e4 is inf in float16), where SDPA's kernels accumulate in float32 too."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def _lam_view(lam: Tensor, dtype: torch.dtype) -> Tensor:
    """lam as a (1, Hs, 1, 1) or 0-d tensor in the output dtype."""
    lam = lam.to(dtype)
    return lam.view(1, -1, 1, 1) if lam.dim() == 1 else lam


def _math(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor],
          is_causal: bool, dropout_p: float, scale: float) -> Tensor:
    dtype, compute = q1.dtype, _compute_dtype(q1.dtype)
    q1, k1, q2, k2, v = q1.to(compute), k1.to(compute), q2.to(compute), k2.to(compute), v.to(compute)
    group = q1.shape[1] // q2.shape[1]
    q2 = q2.repeat_interleave(group, dim=1)
    k2 = k2.repeat_interleave(group, dim=1)
    bias = attention_bias(attn_mask, is_causal, q1.shape[2], k1.shape[2], compute, q1.device)
    a1, a2 = softmax_maps(q1, k1, scale, bias), softmax_maps(q2, k2, scale, bias)
    if dropout_p > 0.0:
        # Each map is dropped independently, exactly as two SDPA calls with dropout do.
        a1, a2 = F.dropout(a1, dropout_p), F.dropout(a2, dropout_p)
    return ((a1 - _lam_view(lam, compute) * a2) @ v).to(dtype)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient.

    Why: on an H200 (torch 2.11), cuDNN's SDPA backward gave q/k/v gradients with 0.8 to 1.7 relative
    error when one process fed it output gradients of two stride layouts at one shape (a DIFF layer with
    and without the per-head norm: the norm's backward gives a contiguous gradient, the head merge's a
    transposed one; whichever came second was wrong, the first right; train/check_kernels.py). Handing
    every SDPA output of this module its gradient in one layout keeps cuDNN on the layout it planned for.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _sdpa_call(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
               scale: float, enable_gqa: bool = False) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
    if torch.jit.is_scripting():
        return out  # TorchScript has no autograd.Function
    # a recorded model keeps plain ops (torch.jit.trace would record, and fail to save, a Python op)
    return _ContiguousGrad.apply(out) if out.requires_grad and not exporting() else out


def _sdpa(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor],
          is_causal: bool, dropout_p: float, scale: float) -> Tensor:
    B, Hs, M, dv = v.shape
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q1.dtype)  # SDPA wants an additive mask in the query dtype
    Hn = q2.shape[1]
    group = Hs // Hn
    o1 = _sdpa_call(q1, k1, v, attn_mask, dropout_p, is_causal, scale)
    mask_per_head = attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1
    if group == 1:
        o2 = _sdpa_call(q2, k2, v, attn_mask, dropout_p, is_causal, scale)
    elif mask_per_head:
        # A per-signal-head mask makes each head's noise map different: expand the noise heads.
        o2 = _sdpa_call(q2.repeat_interleave(group, dim=1), k2.repeat_interleave(group, dim=1), v,
                        attn_mask, dropout_p, is_causal, scale)
    else:
        # One noise map per group multiplies the group's values side by side: stack the group's
        # value heads along the feature dim so each noise map is computed once, not `group` times.
        v_grouped = v.reshape(B, Hn, group, M, dv).transpose(2, 3).reshape(B, Hn, M, group * dv)
        o2 = _sdpa_call(q2, k2, v_grouped, attn_mask, dropout_p, is_causal, scale)
        N = q2.shape[2]
        o2 = o2.reshape(B, Hn, N, group, dv).transpose(2, 3).reshape(B, Hs, N, dv)
    out = o1 - _lam_view(lam, o1.dtype) * o2
    if attn_mask is not None:
        # SDPA's CPU path gives zeros for a query row with no visible key, but some CUDA kernels do
        # not (a finite average of the masked keys was seen on an H100): make it zeros everywhere.
        no_key = no_key_rows(attn_mask)
        out = out.masked_fill(no_key.unsqueeze(-1), 0.0)  # no .any() check: it would sync the GPU
    return out


def _triton(q1, k1, q2, k2, v, lam, attn_mask, is_causal, dropout_p, scale) -> Tensor:
    try:
        from . import triton_kernel
    except ImportError as err:
        raise RuntimeError(f"backend='triton' needs the triton package and a CUDA GPU ({err})") from err
    reason = triton_kernel.unsupported_reason(q1, k1, q2, k2, v, attn_mask, dropout_p)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run this call: {reason}; use backend='sdpa' or 'auto'")
    return triton_kernel.triton_differential_attention(
        q1, k1, q2, k2, v, lam, is_causal, scale, attn_mask=attn_mask)


def differential_attention_unchecked(
        q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor],
        is_causal: bool, dropout_p: float, scale: Optional[float], backend: str) -> Tensor:
    """:func:`differential_attention` with every argument positional and no input checks: what scripted
    layers call (TorchScript compiles neither keyword-only arguments nor the checks). ``"math"`` maps the
    attention out, any other backend is ``"sdpa"`` (TorchScript cannot launch the Triton kernel)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q1.shape[-1])
    if backend == "math":
        return _math(q1, k1, q2, k2, v, lam, attn_mask, is_causal, dropout_p, scale)
    return _sdpa(q1, k1, q2, k2, v, lam, attn_mask, is_causal, dropout_p, scale)


def _auto_backend(q1, k1, q2, k2, v, attn_mask, dropout_p) -> str:
    """``"auto"``'s choice. Under ``torch.compile`` it is ``"sdpa"``: inductor knows SDPA and fuses the
    work around it, while the Triton kernel is one opaque custom operator to it; measured on ViT-S/16-224
    training (bf16, batch 256), the compiled model ran at 0.80x of timm's compiled ViT-S with ``sdpa``
    and 0.64x with Triton (H200), 0.73x and 0.72x (H100; docs/benchmarks.md). Eager CUDA calls the
    kernel supports use Triton (its GPU time is the lower one; eager model-level numbers were mixed:
    0.76x vs 0.81x on the H200, 0.78-0.87x vs 0.81x on the H100)."""
    if torch.compiler.is_compiling():
        return "sdpa"
    if q1.is_cuda and not exporting():
        try:
            from . import triton_kernel
        except ImportError:  # triton not installed
            return "sdpa"
        if triton_kernel.unsupported_reason(q1, k1, q2, k2, v, attn_mask, dropout_p) is None:
            return "triton"
    return "sdpa"


# --------------------------------------------------------------------------------------------
# DIFF V2
# --------------------------------------------------------------------------------------------

def _v2_math(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
             dropout_p: float, scale: float) -> Tensor:
    dtype, compute = q.dtype, _compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    maps = softmax_maps(q, k, scale, attention_bias(attn_mask, is_causal, q.shape[2], k.shape[2], compute, q.device))
    if dropout_p > 0.0:
        maps = F.dropout(maps, dropout_p)  # each query head's map on its own, as one SDPA call drops them
    # heads 2i and 2i+1 read the same value head (they share a GQA group)
    return ((maps[:, 0::2] - lam.unsqueeze(-1).to(compute) * maps[:, 1::2]) @ v[:, 0::2]).to(dtype)


def _v2_sdpa(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
             dropout_p: float, scale: float) -> Tensor:
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants an additive mask in the query dtype
    gqa = not exporting()
    if not gqa:
        # the TorchScript-based ONNX exporter has no SDPA with enable_gqa: give each query head its k/v head
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = _sdpa_call(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa=gqa)
    if attn_mask is not None:
        # zeros for a query head's row with no visible key (some CUDA kernels give an average instead)
        out = out.masked_fill(no_key_rows(attn_mask).unsqueeze(-1), 0.0)  # no .any(): it would sync the GPU
    # heads (2i, 2i+1) as one pair axis: unbind's backward stacks the two gradients in one write, where
    # strided slices (out[:, 0::2]) would each fill a zero tensor of out's size and copy into it
    signal, noise = out.unflatten(1, (-1, 2)).unbind(2)
    return signal - lam.unsqueeze(-1).to(out.dtype) * noise


def differential_attention_v2_unchecked(
        q: Tensor, k: Tensor, v: Tensor, lam: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
        dropout_p: float, scale: Optional[float], backend: str) -> Tensor:
    """:func:`differential_attention_v2` with every argument positional and no input checks (what scripted
    layers call); ``"math"`` maps the attention out, any other backend is ``"sdpa"``."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    lam = lam.expand(q.shape[0], q.shape[1] // 2, q.shape[2])
    if backend == "math":
        return _v2_math(q, k, v, lam, attn_mask, is_causal, dropout_p, scale)
    return _v2_sdpa(q, k, v, lam, attn_mask, is_causal, dropout_p, scale)


def differential_attention_v2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lam: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """DIFF V2 attention: ``2h`` query heads on ``h_kv`` key/value heads, one softmax-attention call.

    Args:
        q: queries ``(B, 2h, N, d)``; heads ``2i`` and ``2i+1`` form output head ``i``.
        k: keys ``(B, h_kv, M, d)``; query head ``j`` attends with key/value head ``j // (2h / h_kv)``
            (GQA), and ``2h / h_kv`` must be even so that each subtracted pair shares one.
        v: values ``(B, h_kv, M, dv)``.
        lam: λ, already squashed (the module passes ``sigmoid(W_λ x)``), broadcastable to ``(B, h, N)``:
            one value per output head and query token; receives gradients.
        attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, 2h, N, M)``.
        is_causal: top-left aligned causal mask, as in SDPA.
        dropout_p: dropout on each query head's map (pass 0.0 in eval, like SDPA).
        scale: score scale; defaults to ``1/sqrt(d)``.
        backend: ``"auto"`` (= ``"sdpa"``: ``F.scaled_dot_product_attention(..., enable_gqa=True)``, which
            reaches the flash / cuDNN kernels on CUDA), ``"sdpa"`` or ``"math"`` (maps materialised).

    Returns:
        ``(B, h, N, dv)`` with ``out[:, i] = A(q[:, 2i]) − lam[:, i, :, None] · A(q[:, 2i+1])``, ``A(q_j)`` the
        ordinary softmax attention ``softmax(q_j k_gᵀ·scale + mask) v_g``. A query row whose keys are all
        masked out gives zeros.
    """
    _validate_v2(q, k, v, lam, attn_mask, is_causal, dropout_p, scale, backend)
    return differential_attention_v2_unchecked(
        q, k, v, lam, _at_least_2d(attn_mask), is_causal, float(dropout_p), None if scale is None else float(scale),
        backend)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (``"triton"`` needs CUDA and the triton package)."""
    names = ["math", "sdpa"]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        try:
            from . import triton_kernel  # noqa: F401
            names.append("triton")
        except ImportError:
            pass
    return names


def differential_attention(
    q1: Tensor,
    k1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v: Tensor,
    lam: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Differential attention, laid out like ``F.scaled_dot_product_attention``.

    Args:
        q1, k1: signal queries/keys, ``(B, Hs, N, d)`` and ``(B, Hs, M, d)``.
        q2, k2: noise queries/keys, ``(B, Hn, N, d)`` and ``(B, Hn, M, d)``; ``Hs % Hn == 0``.
        v: values ``(B, Hs, M, dv)`` (the paper uses ``dv = 2d``).
        lam: λ, a 0-d tensor or one per signal head ``(Hs,)``; receives gradients.
        attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, Hs, N, M)``.
        is_causal: top-left aligned causal mask, as in SDPA.
        dropout_p: dropout on each attention map (pass 0.0 in eval, like SDPA).
        scale: score scale ``s``; defaults to ``1/sqrt(d)``.
        backend: ``"auto"``, ``"math"``, ``"sdpa"`` or ``"triton"``.

    Returns:
        ``(B, Hs, N, dv)``. A query row whose keys are all masked out gives zeros.
    """
    _validate(q1, k1, q2, k2, v, lam, attn_mask, is_causal, dropout_p, scale, backend)
    attn_mask = _at_least_2d(attn_mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q1.shape[-1])
    if backend == "auto":
        backend = _auto_backend(q1, k1, q2, k2, v, attn_mask, dropout_p)
    elif backend == "triton" and exporting():
        backend = "sdpa"  # the same function; no exporter can record the Triton launch
    if backend == "triton":
        return _triton(q1, k1, q2, k2, v, lam, attn_mask, is_causal, float(dropout_p), float(scale))
    return differential_attention_unchecked(
        q1, k1, q2, k2, v, lam, attn_mask, is_causal, float(dropout_p), float(scale), backend)
