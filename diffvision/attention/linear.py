"""Linear attention: LiT's ReLU linear attention (``linear``) and a reconstruction of DyDiLA (``dydila``).

Both cost O(N·d²) in time and O(N·d) in memory: the keys and values are first reduced to one ``d_h × d_h``
state per head, ``S = Σ_j φ(k_j) v_jᵀ``, which every query then reads; no ``N × N`` tensor exists.

``linear`` (LiT, Wang et al. 2025, arXiv:2501.12976): ``φ(x) = ReLU(x) + ε``, the normalised kernel attention
``out_i = φ(q_i)·S / φ(q_i)·Σ_j φ(k_j)`` per head, plus a depthwise ``conv_size × conv_size`` conv on V over the
token grid (weights shared across heads), then the output projection. Few heads (the twin rule gives 2).

``dydila`` is a **reconstruction** of "Dynamic Differential Linear Attention" (Cao et al. 2026, arXiv
2601.13683) from the sources in ``shared/design/dydila.md``; the paper's full text and code were not available.
Per token ``i``, with ``X_i`` the layer's input token:

* dynamic projection: ``Q = X W_Q``, ``K = X W_K``, ``V = X W_V`` (shared) and redundancy terms
  ``Q'_i = X_i W_Q^{u_i}``, ``K'_i = X_i W_K^{v_i}`` from banks of ``projectors`` d×d matrices, ``u_i`` / ``v_i``
  the argmax of a bias-free router on ``X_i``;
* dynamic measure kernel: the norm-preserving power map ``φ_γ(z) = ‖r‖·r^γ/‖r^γ‖``, ``r = ReLU(z) + ε``, with
  ``γ`` routed per token from a learnable bank of ``kernels`` values (applied to Q, K, Q', K');
* token differential operator: ``Q̂ = φ(Q) − λ^Q φ(Q')``, ``K̂ = φ(K) − λ^K φ(K')``, ``λ`` routed per token from a
  learnable bank of ``lambdas`` values; then ``out = normalise(Q̂ (K̂ᵀ V))`` per head, + the conv on V, projection.

What the sources leave open is an option (:data:`DYDILA_OPTIONS`, README "Linear attention (LiT, DyDiLA)"),
never a silent guess. Switching the three parts off (``projectors=0, kernels=0, differential=False``) gives
``linear`` exactly, with the same parameters.

fp16 / bf16 safety: LiT scales Kᵀ and V by ``N^-½``. Here the core also divides each query (per token), the
keys and the values (per head) by their detached maxima before the products and multiplies the values'
scale back after: the normalised result does not depend on those positive scales (its gradient neither), and
every intermediate stays within ``[−d_h, d_h]``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..choices import check_choice, did_you_mean

__all__ = [
    "DYDILA_OPTIONS",
    "LINEAR_OPTIONS",
    "DynamicDifferentialLinearAttention",
    "LinearAttention",
    "check_linear_options",
    "linear_attention",
    "power_kernel",
    "route",
]

# Options of ``linear`` and their defaults (README "Linear attention (LiT, DyDiLA)").
LINEAR_OPTIONS: dict[str, Any] = {
    "conv_size": 5,        # LiT's 5×5 depthwise conv on V over the token grid; 0: no conv (no grid needed)
    "eps": 1e-6,           # φ(x) = ReLU(x) + eps (LiT)
}
# Options of ``dydila``: the paper's parts, then the choices the sources leave open (UNKNOWN in the design note).
DYDILA_OPTIONS: dict[str, Any] = {
    **LINEAR_OPTIONS,
    "projectors": 3,           # n_P: 0 = no redundancy terms, 1 = one static projector, >= 2 routed (S6 "Small": 3)
    "kernels": 9,              # n_M: 0 = plain ReLU, 1 = one power map for all tokens, >= 2 routed (S6 "Small": 9)
    "differential": True,      # subtract λ·redundancy (needs projectors >= 1)
    "lambdas": 9,              # n_D: λ values in the bank; 1 = one λ for all tokens (S6 "Small": 9)
    "router_grad": "ste",      # how routers learn through argmax: straight-through softmax, or Gumbel-softmax
    "gumbel_tau": 1.0,         # Gumbel-softmax temperature (router_grad="gumbel"); fixed, no annealing
    "normaliser": "positive",  # divide by φ(q)·Σφ(k) (the non-subtracted mass), or per-head RMSNorm, or nothing
    "gamma_init": "spread",    # γ bank: "spread" = evenly over [1, 3], or one number for every entry (S6: 3.0)
    "lambda_bank_init": "spread",  # λ bank: "spread" = evenly over [0.01, 0.1], or one number (S6: 0.01)
    "kernel_routing": "token",     # "token": one router on X_i, one γ for the token's four vectors;
                                   # "per_tensor": a γ bank and router each for Q, K, Q', K', routed on it (S6)
    "lambda_routing": "token",     # "token": routers on X_i; "per_tensor": on [φ(Q_i), φ(Q'_i)] (S6)
    "kernel_norm": "head",         # the power map's norm per head (S6) or over all channels (FLatten)
}
ROUTER_GRADS = ("ste", "gumbel")
NORMALISERS = ("positive", "rmsnorm", "none")
ROUTINGS = ("token", "per_tensor")
KERNEL_NORMS = ("head", "channel")
GAMMA_SPREAD = (1.0, 3.0)      # γ = 1 is the plain ReLU kernel; 3 is FLatten's focusing factor
LAMBDA_SPREAD = (0.01, 0.1)    # small, as S6 ("to prevent over-differencing"), yet distinct for the router


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any, low: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_linear_options(attn_kind: str, options: Optional[dict]) -> dict:
    """The full option dict of ``attn_kind`` (``linear`` / ``dydila``): ``options`` over the defaults, each value
    checked; an unknown key or a bad value is a ``ValueError`` naming it and what is accepted."""
    defaults = DYDILA_OPTIONS if attn_kind == "dydila" else LINEAR_OPTIONS
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"linear_options must be a dict of {attn_kind} options, got {options!r}")
    for key in options:
        if key not in defaults:
            raise ValueError(f"unknown {attn_kind} option {key!r}{did_you_mean(key, defaults)}; "
                             f"accepted: {list(defaults)}")
    out = {**defaults, **options}
    if not _is_int(out["conv_size"]) or out["conv_size"] < 0 or (out["conv_size"] and out["conv_size"] % 2 == 0):
        raise ValueError(f"conv_size must be an odd int >= 1 (the conv keeps the grid) or 0 (no conv), "
                         f"got {out['conv_size']!r}")
    _check_number("eps", out["eps"], 0.0, "a number >= 0")
    if attn_kind != "dydila":
        return out
    for key in ("projectors", "kernels"):
        if not _is_int(out[key]) or out[key] < 0:
            raise ValueError(f"{key} must be an int >= 0, got {out[key]!r}")
    if not _is_int(out["lambdas"]) or out["lambdas"] < 1:
        raise ValueError(f"lambdas must be an int >= 1 (the λ bank), got {out['lambdas']!r}")
    if not isinstance(out["differential"], bool):
        raise ValueError(f"differential must be True or False, got {out['differential']!r}")
    if out["differential"] and out["projectors"] == 0:
        raise ValueError("differential=True subtracts the redundancy terms Q', K', which come from the projector "
                         "banks: projectors=0 needs differential=False")
    if not out["differential"] and out["projectors"]:
        raise ValueError(f"projectors={out['projectors']} make the redundancy terms Q', K', which only the "
                         f"differential operator uses: differential=False needs projectors=0")
    check_choice("router_grad", out["router_grad"], ROUTER_GRADS)
    _check_number("gumbel_tau", out["gumbel_tau"], 1e-6, "a positive number")
    check_choice("normaliser", out["normaliser"], NORMALISERS)
    check_choice("kernel_routing", out["kernel_routing"], ROUTINGS)
    check_choice("lambda_routing", out["lambda_routing"], ROUTINGS)
    check_choice("kernel_norm", out["kernel_norm"], KERNEL_NORMS)
    for key in ("gamma_init", "lambda_bank_init"):
        if out[key] != "spread":
            low = 1.0 if key == "gamma_init" else 0.0
            _check_number(key, out[key], low, f"'spread' or a number >= {low:g}")
    return out


# --------------------------------------------------------------------------------------------
# Functional pieces
# --------------------------------------------------------------------------------------------

def route(logits: Tensor, grad: str = "ste", tau: float = 1.0, training: bool = True) -> Tensor:
    """A one-hot choice per row of ``logits`` (``(..., n)``): exactly one-hot in the forward pass (top-1 argmax),
    with the gradient of a softmax in the backward pass (straight-through: ``hard + (soft − soft.detach())``).
    ``grad="gumbel"`` adds Gumbel noise (scaled by ``1/tau``) while training, so the choice explores."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if grad == "gumbel" and training:
        gumbel = -torch.empty_like(logits).exponential_().log()
        logits = (logits + gumbel) / tau
    soft = logits.softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # bracketed: exactly `hard` in the forward pass (hard + soft would round)


def power_kernel(z: Tensor, gamma: Tensor, eps: float, dim: Sequence[int] = (-1,)) -> Tensor:
    """FLatten's norm-preserving power map ``‖r‖·r^γ / ‖r^γ‖`` with ``r = ReLU(z) + eps``, norms over ``dim``;
    ``gamma`` broadcasts against ``z`` (one exponent per token). ``γ = 1`` is ``r`` itself.

    Computed on ``s = r / max(r)`` (a detached positive scale the map does not depend on), so ``s^γ`` cannot
    overflow in fp16 / bf16 whatever the activations."""
    dim = tuple(dim)
    r = F.relu(z.to(torch.promote_types(z.dtype, torch.float32))) + eps  # float32 or wider: γ and s^γ keep precision
    peak = r.detach().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    s = (r / peak).clamp_min(torch.finfo(r.dtype).tiny)  # > 0: log(s) in the γ gradient stays finite
    powered = s.pow(gamma.to(s.dtype))
    return (peak * _norm(s, dim) * powered / _norm(powered, dim)).to(z.dtype)


def _norm(x: Tensor, dim: tuple) -> Tensor:
    return x.pow(2).sum(dim=dim, keepdim=True).sqrt()


def _peak(x: Tensor, dim: Sequence[int]) -> Tensor:
    """Detached positive max |x| over ``dim`` (a scale the normalised attention does not depend on)."""
    return x.detach().abs().amax(dim=tuple(dim), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, q_mass: Optional[Tensor] = None,
                     k_mass: Optional[Tensor] = None, normaliser: str = "positive") -> Tensor:
    """Kernelised attention in linear form, per head: ``q, k, q_mass, k_mass (B, h, N, d)``, ``v (B, h, N, e)``.

    * ``"positive"``: ``out_i = q_i·Σ_j k_j v_jᵀ / q_mass_i·Σ_j k_mass_j`` (``q_mass``/``k_mass`` default to
      ``q``/``k``: the normalised kernel attention; DyDiLA passes the non-subtracted φ(Q), φ(K));
    * ``"none"`` (and ``"rmsnorm"``, whose norm the caller applies): ``out_i = q_i·Σ_j k_j v_jᵀ / N``.

    ``S = kᵀv`` is ``(B, h, d, e)``: no ``N × N`` tensor. Each query (per token), the keys and the values (per
    head) are divided by their detached maxima first: the ``"positive"`` result does not depend on them, the
    others get the scales multiplied back, and the products stay small in fp16 / bf16."""
    n = q.shape[-2]
    q_mass = q if q_mass is None else q_mass
    k_mass = k if k_mass is None else k_mass
    q_scale = torch.maximum(_peak(q, (-1,)), _peak(q_mass, (-1,)))
    k_scale = torch.maximum(_peak(k, (-2, -1)), _peak(k_mass, (-2, -1)))
    v_scale = _peak(v, (-2, -1))
    root_n = math.sqrt(n)
    # Kᵀ and V each scaled by N^-½ (LiT), so S is the mean over keys
    state = (k / (k_scale * root_n)).transpose(-2, -1) @ (v / (v_scale * root_n))
    out = (q / q_scale) @ state
    if normaliser == "positive":
        mass = (q_mass / q_scale) @ (k_mass / k_scale).mean(dim=-2, keepdim=True).transpose(-2, -1)
        return out / mass.clamp_min(torch.finfo(mass.dtype).tiny) * v_scale
    return out * (q_scale * k_scale * v_scale)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class LinearAttention(nn.Module):
    """LiT's linear attention (``attn_kind="linear"``): ReLU kernel, normalised, depthwise conv on V.

    Projections as a standard MHA (``qkv: dim -> 3·dim``, ``proj: dim -> dim``) plus the conv's
    ``conv_size²·d_h + d_h`` weights (shared across heads). The conv runs over the patch tokens, which must form
    the grid ``grid_size`` (or a square when it is ``None``) after ``num_prefix_tokens`` tokens (a ViT's class
    token), which get no conv term. Masks are not supported: there is no ``N × N`` map to mask.
    """

    attn_kind = "linear"

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        depth: int = 0,
        linear_options: Optional[dict] = None,
        num_prefix_tokens: int = 0,
        grid_size: Optional[tuple[int, int]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not _is_int(num_heads) or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing dim={dim}")
        if attn_drop:
            raise ValueError(f"attn_kind={self.attn_kind!r} has no attention map to drop out; attn_drop must be 0, "
                             f"got {attn_drop}")
        self.options = check_linear_options(self.attn_kind, linear_options)
        norm_layer = norm_layer or nn.LayerNorm
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.depth = depth
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size
        self.eps = float(self.options["eps"])
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        size = self.options["conv_size"]
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, size, padding=size // 2, groups=self.head_dim,
                             **dd) if size else None
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    # ---- shared steps ----------------------------------------------------------------------

    def heads(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, h, N, d_h)."""
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _check_call(self, attn_mask: Optional[Tensor], is_causal: bool) -> None:
        if attn_mask is not None or is_causal:
            raise ValueError(f"attn_kind={self.attn_kind!r} computes no N×N attention map, so it takes no attn_mask "
                             f"or is_causal; use a softmax kind (standard, diff, gda, diffv2) for masked attention")

    def grid(self, n: int) -> tuple[int, int]:
        """The (H, W) grid of the ``n − num_prefix_tokens`` patch tokens, or a ``ValueError`` saying why not."""
        patches = n - self.num_prefix_tokens
        if self.grid_size is not None:
            H, W = self.grid_size
            if H * W == patches:
                return H, W
            raise ValueError(f"attn_kind={self.attn_kind!r}: {n} tokens minus {self.num_prefix_tokens} prefix tokens "
                             f"= {patches} do not fill the grid {H}x{W} its depthwise conv runs on")
        side = math.isqrt(max(patches, 0))
        if patches <= 0 or side * side != patches:
            raise ValueError(
                f"attn_kind={self.attn_kind!r} applies its {self.options['conv_size']}x{self.options['conv_size']} "
                f"depthwise conv on the token grid, but {n} tokens minus {self.num_prefix_tokens} prefix tokens = "
                f"{patches} form no square grid; set the layer's grid_size=(H, W) and num_prefix_tokens, or "
                f"linear_options={{'conv_size': 0}} for no conv")
        return side, side

    def conv_on_values(self, v: Tensor) -> Tensor:
        """The depthwise conv of the value heads ``(B, h, N, d_h)`` over the patch grid (prefix tokens: 0)."""
        B, h, N, d = v.shape
        H, W = self.grid(N)
        p = self.num_prefix_tokens
        patches = v[:, :, p:].reshape(B * h, H, W, d).permute(0, 3, 1, 2)
        conv = self.dwc(patches).permute(0, 2, 3, 1).reshape(B, h, H * W, d)
        return F.pad(conv, (0, 0, p, 0)) if p else conv

    def project_out(self, out: Tensor, v: Tensor) -> Tensor:
        """+ conv(V), merge heads, scale norm, output projection."""
        if self.dwc is not None:
            out = out + self.conv_on_values(v)
        B, h, N, d = out.shape
        out = self.norm(out.transpose(1, 2).reshape(B, N, h * d))
        return self.proj_drop(self.proj(out))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        self._check_call(attn_mask, is_causal)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = self.q_norm(self.heads(q)), self.k_norm(self.heads(k)), self.heads(v)
        phi_q, phi_k = F.relu(q) + self.eps, F.relu(k) + self.eps
        return self.project_out(linear_attention(phi_q, phi_k, v).to(v.dtype), v)

    @property
    def layout(self) -> dict:
        return {"attn_kind": self.attn_kind, "num_heads": self.num_heads, "head_dim": self.head_dim, **self.options}

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, options={self.options}"


def _spread(init: Any, low_high: tuple[float, float], n: int) -> Tensor:
    """A bank's initial values: ``"spread"`` evenly over ``low_high`` (one entry: its upper end), or one number."""
    if init == "spread":
        return torch.linspace(*low_high, n) if n > 1 else torch.tensor([low_high[1]])
    return torch.full((n,), float(init))


class DynamicDifferentialLinearAttention(LinearAttention):
    """DyDiLA (``attn_kind="dydila"``), a **reconstruction** of Cao et al. 2026 (arXiv 2601.13683): see the module
    docstring for the formula and :data:`DYDILA_OPTIONS` for every option.

    Parameters beyond ``linear``'s (``d = dim``): projector banks ``2·n_P·d²`` (``n_P >= 1``) and their routers
    ``2·d·n_P`` (``n_P >= 2``); the γ bank ``n_M`` and its router ``d·n_M`` (``n_M >= 2``; four of each with
    ``kernel_routing="per_tensor"``); the λ bank ``n_D`` and two routers ``2·d·n_D`` (``n_D >= 2``; ``4·d·n_D``
    per tensor); a per-head RMSNorm scale ``d_h`` with ``normaliser="rmsnorm"``. With the default ``n_P = 3``
    the banks are 1.5× a standard attention's weights: see README for the parameter-matched DiT.
    γ and λ are kept in float32. Routers are bias-free linear maps (the paper's, for the projectors).
    """

    attn_kind = "dydila"

    def __init__(self, dim: int, num_heads: int = 2, *, device=None, dtype=None, **kwargs) -> None:
        super().__init__(dim, num_heads, device=device, dtype=dtype, **kwargs)
        o = self.options
        dd = {"device": device, "dtype": dtype}
        f32 = {"device": device, "dtype": torch.float32}
        self.projectors, self.kernels, self.lambdas = o["projectors"], o["kernels"], o["lambdas"]
        self.differential = o["differential"]
        tensors = 4 if o["kernel_routing"] == "per_tensor" else 1
        if self.projectors:
            self.q_bank = nn.Parameter(torch.empty(self.projectors, dim, dim, **dd))
            self.k_bank = nn.Parameter(torch.empty(self.projectors, dim, dim, **dd))
        if self.projectors >= 2:
            self.q_router = nn.Linear(dim, self.projectors, bias=False, **dd)
            self.k_router = nn.Linear(dim, self.projectors, bias=False, **dd)
        if self.kernels:
            self.gammas = nn.Parameter(torch.empty(tensors, self.kernels, **f32))
        if self.kernels >= 2:
            self.kernel_routers = nn.ModuleList(
                nn.Linear(dim, self.kernels, bias=False, **dd) for _ in range(tensors))
        if self.differential:
            self.lambda_bank = nn.Parameter(torch.empty(self.lambdas, **f32))
            if self.lambdas >= 2:
                width = 2 * dim if o["lambda_routing"] == "per_tensor" else dim
                self.lambda_routers = nn.ModuleList(
                    nn.Linear(width, self.lambdas, bias=False, **dd) for _ in range(2))
        self.out_norm = nn.RMSNorm(self.head_dim, **dd) if o["normaliser"] == "rmsnorm" else None
        self.init_weights()

    def init_weights(self) -> None:
        """The banks' inits (again after a model-wide init): each projector as an ``nn.Linear`` weight, routers
        likewise, γ and λ from ``gamma_init`` / ``lambda_bank_init``."""
        for name in ("q_bank", "k_bank"):
            bank = getattr(self, name, None)
            if bank is not None:
                for w in bank.data:
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for name in ("q_router", "k_router"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()
        for routers in (getattr(self, "kernel_routers", ()), getattr(self, "lambda_routers", ())):
            for r in routers:
                r.reset_parameters()
        with torch.no_grad():
            if self.kernels:
                self.gammas.copy_(_spread(self.options["gamma_init"], GAMMA_SPREAD, self.kernels).expand_as(self.gammas))
            if self.differential:
                self.lambda_bank.copy_(_spread(self.options["lambda_bank_init"], LAMBDA_SPREAD, self.lambdas))
        if self.out_norm is not None:
            self.out_norm.reset_parameters()

    # ---- routing -----------------------------------------------------------------------------

    def choose(self, logits: Tensor) -> Tensor:
        """One-hot (forward) routing weights with a gradient, by ``router_grad``."""
        return route(logits, self.options["router_grad"], self.options["gumbel_tau"], self.training)

    def redundancy(self, x: Tensor, bank: Tensor, router: Optional[nn.Module]) -> Tensor:
        """``X_i W^{u_i}``: every projector's output weighted by the one-hot choice (the straight-through
        gradient needs each projector's output for the router)."""
        if router is None:  # one static projector
            return x @ bank[0]
        weights = self.choose(router(x)).to(x.dtype)                           # (B, N, n_P)
        each = (x @ bank.transpose(0, 1).reshape(bank.shape[1], -1))             # (B, N, n_P·d)
        return (each.view(*x.shape[:-1], bank.shape[0], -1) * weights.unsqueeze(-1)).sum(dim=-2)

    def routed_value(self, bank: Tensor, logits: Optional[Tensor], shape: tuple) -> Tensor:
        """The bank value chosen per token, ``(B, N, 1)`` (or the bank's only value)."""
        if logits is None:
            return bank[0].expand(*shape, 1)
        return (self.choose(logits) * bank).sum(dim=-1, keepdim=True)

    def kernel(self, z: Tensor, gamma: Optional[Tensor]) -> Tensor:
        """φ of ``z`` (B, N, dim): ReLU + ε without kernels, else the power map per head or over all channels."""
        if gamma is None:
            return F.relu(z) + self.eps
        if self.options["kernel_norm"] == "channel":
            return power_kernel(z, gamma, self.eps)
        B, N, _ = z.shape
        out = power_kernel(z.view(B, N, self.num_heads, self.head_dim), gamma.unsqueeze(-1), self.eps)
        return out.view(B, N, -1)

    def gamma_for(self, index: int, source: Tensor) -> Optional[Tensor]:
        """γ per token, ``(B, N, 1)``: "token" routing routes on ``X_i`` (one γ for the token's four vectors),
        "per_tensor" routes tensor ``index`` (0 Q, 1 K, 2 Q', 3 K') on its own detached vector (S6)."""
        if not self.kernels:
            return None
        routers = getattr(self, "kernel_routers", None)
        source = source if self.options["kernel_routing"] == "token" else source.detach()
        logits = None if routers is None else routers[index](source)
        return self.routed_value(self.gammas[index], logits, source.shape[:-1]).clamp(min=1.0)

    def normed(self, z: Tensor, norm: nn.Module) -> Tensor:
        """``qk_norm``'s per-head norm of the shared Q or K, ``(B, N, dim)`` (the identity without it)."""
        if isinstance(norm, nn.Identity):
            return z
        B, N, _ = z.shape
        return norm(z.view(B, N, self.num_heads, self.head_dim)).view(B, N, -1)

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        self._check_call(attn_mask, is_causal)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.normed(q, self.q_norm), self.normed(k, self.k_norm)
        if self.options["kernel_routing"] == "token":
            gamma = self.gamma_for(0, x)
            gammas = (gamma, gamma, gamma, gamma)
        else:
            gammas = None
        phi_q = self.kernel(q, gammas[0] if gammas else self.gamma_for(0, q))
        phi_k = self.kernel(k, gammas[1] if gammas else self.gamma_for(1, k))
        q_hat, k_hat = phi_q, phi_k
        if self.differential:
            q_red = self.redundancy(x, self.q_bank, getattr(self, "q_router", None))
            k_red = self.redundancy(x, self.k_bank, getattr(self, "k_router", None))
            phi_qr = self.kernel(q_red, gammas[2] if gammas else self.gamma_for(2, q_red))
            phi_kr = self.kernel(k_red, gammas[3] if gammas else self.gamma_for(3, k_red))
            lam_q, lam_k = self.token_lambdas(x, phi_q, phi_qr, phi_k, phi_kr)
            q_hat = phi_q - lam_q.to(phi_q.dtype) * phi_qr
            k_hat = phi_k - lam_k.to(phi_k.dtype) * phi_kr
        v = self.heads(v)
        out = linear_attention(self.heads(q_hat), self.heads(k_hat), v, self.heads(phi_q), self.heads(phi_k),
                               self.options["normaliser"])
        if self.out_norm is not None:  # in float32: the RMS of a low-precision product is coarse
            wide = torch.promote_types(out.dtype, torch.float32)
            out = F.rms_norm(out.to(wide), (self.head_dim,), self.out_norm.weight.to(wide), self.out_norm.eps)
        return self.project_out(out.to(v.dtype), v)

    def token_lambdas(self, x: Tensor, phi_q: Tensor, phi_qr: Tensor, phi_k: Tensor,
                      phi_kr: Tensor) -> tuple[Tensor, Tensor]:
        """λ^Q and λ^K per token, ``(B, N, 1)`` each."""
        routers = getattr(self, "lambda_routers", None)
        shape = x.shape[:-1]
        if routers is None:
            one = self.routed_value(self.lambda_bank, None, shape)
            return one, one
        if self.options["lambda_routing"] == "per_tensor":
            inputs = (torch.cat([phi_q, phi_qr], -1).detach(), torch.cat([phi_k, phi_kr], -1).detach())
        else:
            inputs = (x, x)
        return tuple(self.routed_value(self.lambda_bank, r(i), shape) for r, i in zip(routers, inputs))

    def token_routers(self) -> dict[str, nn.Linear]:
        """The routers that choose from the layer's input ``x``, by name: ``q_router`` / ``k_router`` (the
        projectors), ``kernel`` (γ) and ``lambda_q`` / ``lambda_k`` (λ) with the ``token`` routings. The
        ``per_tensor`` routers choose from intermediate vectors and are not listed."""
        out = {}
        for name in ("q_router", "k_router"):
            if hasattr(self, name):
                out[name] = getattr(self, name)
        if hasattr(self, "kernel_routers") and self.options["kernel_routing"] == "token":
            out["kernel"] = self.kernel_routers[0]
        if hasattr(self, "lambda_routers") and self.options["lambda_routing"] == "token":
            out["lambda_q"], out["lambda_k"] = self.lambda_routers
        return out

    def routing(self, x: Tensor) -> dict[str, Tensor]:
        """The choices the routers make for ``x`` (indices per token), for inspection and utilisation logs
        (:class:`diffvision.lightning.RouterMonitor`)."""
        with torch.no_grad():
            return {name: router(x).argmax(-1) for name, router in self.token_routers().items()}
