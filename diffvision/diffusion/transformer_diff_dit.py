"""DIFF-DiT: a class-conditional DiT (Peebles & Xie, 2023) whose attention is chosen by one config value.

The architecture is DiT's: patchify + fixed 2-D sin-cos positions, a timestep embedding plus a class
embedding (with a null class for classifier-free guidance) summed into one conditioning vector,
adaLN-Zero blocks, an adaLN final layer and unpatchify, with optional learned sigma
(``out_channels = 2 * in_channels``). Attention is built by :func:`diffvision.attention.create_attention`
(``"standard"``, ``"diff"`` or ``"gda"``); this file holds no attention math of its own.

With ``attention_type="standard"`` the model is diffusers' ``DiTTransformer2DModel`` with the
conditioning embedding stored once instead of once per block; :func:`convert_dit_to_diff_dit` and
:func:`convert_diff_dit_to_dit` copy weights across and give the same outputs.

Head conventions, with ``H = num_attention_heads`` the head count of the standard model and
``D = H * attention_head_dim`` the hidden size:

* ``"standard"``: ``H`` heads of ``D / H``.
* ``"diff"``: ``H / 2`` differential heads, i.e. ``H`` query/key sub-heads of ``D / H`` and ``H / 2``
  value heads of ``2D / H`` (same parameters as the standard model). For odd ``H`` it uses ``H``
  differential heads (sub-heads of ``D / 2H``).
* ``"gda"``: ``signal_heads : noise_heads = 2 : 1`` with ``signal_heads + noise_heads = H`` by default
  (sub-heads keep the standard head dim, value heads are ``D / signal_heads``); explicit counts via
  ``signal_heads`` / ``noise_heads``.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import LabelEmbedding, PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from diffvision.attention import BACKENDS, GroupedDifferentialAttention, create_attention
from diffvision.models._helpers import checkpoint_errors, did_you_mean

__all__ = [
    "DIT_PRESETS",
    "ATTENTION_TYPES",
    "DiffDiTBlock",
    "DiffDiTTransformer2DModel",
    "resolve_attention_heads",
    "convert_dit_to_diff_dit",
    "convert_diff_dit_to_dit",
    "dit_state_dict_to_diff_dit",
    "diff_dit_state_dict_to_dit",
]

ATTENTION_TYPES = ("standard", "diff", "gda")
ACTIVATIONS = ("gelu-approximate", "gelu")

# DiT model sizes (Peebles & Xie, 2023, Table 1) × patch sizes 2 / 4 / 8.
_DIT_SIZES = {
    "S": dict(num_layers=12, hidden_size=384, num_heads=6),
    "B": dict(num_layers=12, hidden_size=768, num_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "XL": dict(num_layers=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(
        num_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        patch_size=patch,
    )
    for size, cfg in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}


# --------------------------------------------------------------------------------------------
# Head counts: one place that turns (attention_type, H, D) into create_attention's keywords.
# --------------------------------------------------------------------------------------------

def _gda_splits(dim: int, max_heads: int = 64) -> list[tuple[int, int]]:
    """All (signal, noise) head counts with signal = G·noise (G ≥ 2) that tile ``dim`` exactly."""
    splits = []
    for noise in range(1, max_heads + 1):
        for group in range(2, max_heads // noise + 1):
            signal = group * noise
            if signal + noise <= max_heads and dim % (signal + noise) == 0 and dim % signal == 0:
                splits.append((signal, noise))
    return splits


def _gda_suggestions(dim: int, num_heads: int) -> str:
    splits = _gda_splits(dim)
    if not splits:
        return (f"hidden size {dim} admits no split with signal_heads > noise_heads (both "
                f"{dim}/(signal_heads+noise_heads) and {dim}/signal_heads must be integers); use "
                f"attention_type='diff' (the 1:1 case) or a different hidden size")
    # Closest total head count to H first, then the 2:1 ratio the default uses.
    splits.sort(key=lambda s: (abs(s[0] + s[1] - num_heads), abs(s[0] // s[1] - 2), s[1]))
    shown = ", ".join(
        f"signal_heads={s}, noise_heads={n} ({s // n}:1, d={dim // (s + n)}, dv={dim // s})"
        for s, n in splits[:4])
    return f"valid choices for hidden size {dim} include: {shown}"


def resolve_attention_heads(
    attention_type: str,
    num_attention_heads: int,
    hidden_size: int,
    signal_heads: Optional[int] = None,
    noise_heads: Optional[int] = None,
) -> dict[str, int]:
    """Head-count keywords for :func:`create_attention` from the standard model's head count ``H``.

    ``"standard"`` -> ``{"num_heads": H}``; ``"diff"`` -> ``{"num_heads": H // 2}`` (``H`` for odd
    ``H``); ``"gda"`` -> ``{"signal_heads": Hs, "noise_heads": Hn}``, by default ``2:1`` with
    ``Hs + Hn = H``. Raises ``ValueError`` naming what is wrong and what would work.
    """
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type={attention_type!r} is not supported"
                         f"{did_you_mean(attention_type, ATTENTION_TYPES)}; accepted: {ATTENTION_TYPES}")
    H, D = num_attention_heads, hidden_size
    if attention_type != "gda" and (signal_heads is not None or noise_heads is not None):
        raise ValueError(
            f"signal_heads/noise_heads (got {signal_heads}/{noise_heads}) only apply to "
            f"attention_type='gda', got attention_type={attention_type!r}; leave them None")
    if attention_type == "standard":
        return {"num_heads": H}
    if attention_type == "diff":
        h = H // 2 if H % 2 == 0 else H
        if D % (2 * h) != 0:
            raise ValueError(
                f"attention_type='diff' with num_attention_heads={H} uses {h} differential heads, "
                f"which needs hidden size {D} divisible by 2*{h}={2 * h}; use an even "
                f"attention_head_dim or an even num_attention_heads")
        return {"num_heads": h}
    # gda
    if (signal_heads is None) != (noise_heads is None):
        raise ValueError(
            f"attention_type='gda' needs both signal_heads and noise_heads or neither, got "
            f"signal_heads={signal_heads}, noise_heads={noise_heads}")
    if signal_heads is None:
        if H % 3 != 0:
            raise ValueError(
                f"attention_type='gda' defaults to signal:noise = 2:1 with signal_heads + noise_heads = "
                f"num_attention_heads, which needs num_attention_heads divisible by 3, got {H}; pass "
                f"signal_heads and noise_heads explicitly: {_gda_suggestions(D, H)}")
        signal_heads, noise_heads = 2 * H // 3, H // 3
    Hs, Hn = int(signal_heads), int(noise_heads)
    if Hs <= 0 or Hn <= 0 or Hs % Hn != 0:
        raise ValueError(
            f"signal_heads={Hs} must be a positive multiple of noise_heads={Hn}; "
            f"{_gda_suggestions(D, H)}")
    if D % (Hs + Hn) != 0 or D % Hs != 0:
        raise ValueError(
            f"signal_heads={Hs}, noise_heads={Hn} do not tile hidden size {D} (need {D} divisible by "
            f"signal_heads + noise_heads = {Hs + Hn} and by signal_heads = {Hs}); "
            f"{_gda_suggestions(D, H)}")
    return {"signal_heads": Hs, "noise_heads": Hn}


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiffDiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; attention built by ``create_attention``.

    ``x + gate_msa·attn(modulate(LN(x)))`` then ``x + gate_mlp·mlp(modulate(LN(x)))``; the six
    modulation vectors come from ``SiLU -> Linear(c)``, zero-initialised so the block starts as
    the identity.
    """

    def __init__(
        self,
        dim: int,
        attention_type: str,
        head_kwargs: dict[str, int],
        depth: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_bias: bool = True,
        qk_norm: bool = False,
        activation_fn: str = "gelu-approximate",
        norm_eps: float = 1e-5,
        lambda_init: Optional[float] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # eps 1e-6 before attention, norm_eps before the MLP: diffusers' DiT block (DiT used 1e-6 for both).
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        attn_kwargs: dict[str, Any] = dict(
            qkv_bias=attention_bias, qk_norm=qk_norm, proj_bias=True, proj_drop=dropout, depth=depth,
            **head_kwargs)
        if attention_type != "standard":
            attn_kwargs.update(lambda_init=lambda_init, backend=backend)
        self.attn = create_attention(attention_type, dim, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn,
                              inner_dim=int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.ff(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class DiffDiTTransformer2DModel(ModelMixin, ConfigMixin):
    r"""Class-conditional DiT with standard, differential (DIFF) or grouped differential (GDA) attention.

    Parameters:
        num_attention_heads (`int`, defaults to 16): Head count ``H`` of the *standard* model; DIFF
            uses ``H/2`` differential heads (``H`` if ``H`` is odd), GDA ``2H/3 : H/3`` by default.
        attention_head_dim (`int`, defaults to 72): Standard head width; hidden size ``D = H * attention_head_dim``.
        in_channels (`int`, defaults to 4): Input channels (4 for SD-VAE latents, 3 for RGB pixels).
        out_channels (`int`, *optional*): Output channels, ``in_channels`` if None; ``2 * in_channels``
            gives DiT's learned sigma (noise prediction then the variance interpolation ``v``).
        num_layers (`int`, defaults to 28): Number of DiT blocks.
        dropout (`float`, defaults to 0.0): Dropout on attention and MLP outputs (diffusers' placement).
        attention_bias (`bool`, defaults to True): Bias on the qkv projection.
        sample_size (`int`, defaults to 32): Height = width of the input; fixed by the position table.
        patch_size (`int`, defaults to 2): Patch size.
        activation_fn (`str`, defaults to "gelu-approximate"): MLP activation, "gelu-approximate" or "gelu".
        num_classes (`int`, defaults to 1000): Number of classes; index ``num_classes`` is the null class.
        class_dropout_prob (`float`, defaults to 0.1): Label dropout during training (classifier-free
            guidance); > 0 creates the null-class embedding, 0 gives a model that cannot be guided.
        norm_eps (`float`, defaults to 1e-5): LayerNorm eps before the MLP (1e-6 in the original DiT).
        timestep_freq_shift (`float`, defaults to 1.0): diffusers' ``downscale_freq_shift`` of the
            sinusoidal timestep features; 1 as in diffusers' DiT, 0 as in the original DiT code.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width / ``D``.
        attention_type (`str`, defaults to "diff"): "standard", "diff" or "gda".
        signal_heads, noise_heads (`int`, *optional*): Explicit GDA head counts (only with "gda").
        qk_norm (`bool`, defaults to False): LayerNorm on per-head queries and keys.
        lambda_init (`float`, *optional*): Constant λinit for differential attention; None uses the
            paper's depth schedule ``0.8 - 0.6·exp(-0.3·depth)``.
        diff_attention_backend (`str`, defaults to "auto"): Backend of the differential kernel
            ("auto", "math", "sdpa", "triton"); see :meth:`set_differential_attention_backend`.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _no_split_modules = ["DiffDiTBlock"]
    _repeated_blocks = ["DiffDiTBlock"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        norm_eps: float = 1e-5,
        timestep_freq_shift: float = 1.0,
        mlp_ratio: float = 4.0,
        attention_type: str = "diff",
        signal_heads: Optional[int] = None,
        noise_heads: Optional[int] = None,
        qk_norm: bool = False,
        lambda_init: Optional[float] = None,
        diff_attention_backend: str = "auto",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self._validate_config(dim)
        head_kwargs = resolve_attention_heads(
            attention_type, num_attention_heads, dim, signal_heads, noise_heads)

        self.inner_dim = dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.gradient_checkpointing = False

        self.pos_embed = PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=dim)
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True,
                                   downscale_freq_shift=timestep_freq_shift)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.class_embedder = LabelEmbedding(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList([
            DiffDiTBlock(
                dim, attention_type, head_kwargs, depth=i, mlp_ratio=mlp_ratio, dropout=dropout,
                attention_bias=attention_bias, qk_norm=qk_norm, activation_fn=activation_fn,
                norm_eps=norm_eps, lambda_init=lambda_init, backend=diff_attention_backend)
            for i in range(num_layers)
        ])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)  # final adaLN: shift, scale
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    # ---- construction helpers -------------------------------------------------------------

    def _validate_config(self, dim: int) -> None:
        cfg = self.config
        positive = {k: cfg[k] for k in ("num_attention_heads", "attention_head_dim", "in_channels",
                                        "num_layers", "sample_size", "patch_size", "num_classes")}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if cfg.out_channels is not None and (not isinstance(cfg.out_channels, int) or cfg.out_channels <= 0):
            raise ValueError(f"out_channels must be None or a positive int, got {cfg.out_channels!r}")
        if cfg.sample_size % cfg.patch_size != 0:
            raise ValueError(f"sample_size={cfg.sample_size} must be divisible by patch_size={cfg.patch_size}")
        if dim % 4 != 0:
            raise ValueError(
                f"hidden size num_attention_heads*attention_head_dim = {dim} must be divisible by 4 "
                f"(the 2-D sin-cos position table splits it in four)")
        if not 0.0 <= cfg.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {cfg.class_dropout_prob}")
        if cfg.activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn={cfg.activation_fn!r} is not supported"
                             f"{did_you_mean(cfg.activation_fn, ACTIVATIONS)}; accepted: {ACTIVATIONS}")
        if cfg.diff_attention_backend not in BACKENDS:
            raise ValueError(
                f"diff_attention_backend={cfg.diff_attention_backend!r} is not supported"
                f"{did_you_mean(cfg.diff_attention_backend, BACKENDS)}; accepted: {BACKENDS}")

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output layer.

        Zero modulation makes every gate 0, so each block is the identity and the output is 0 at init.
        """
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv as the linear it is
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if hasattr(block.attn, "init_weights"):
                block.attn.init_weights()  # re-draw λ after the model-wide init
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DiffDiTTransformer2DModel":
        """Build a DiT size by name, e.g. ``from_preset("DiT-S/2", attention_type="diff", sample_size=32,
        in_channels=3, num_classes=10)``; ``kwargs`` set or override any config value."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown preset {name!r}{did_you_mean(name, DIT_PRESETS)}; accepted: {list(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained`` (safetensors first, ``.bin`` with ``weights_only=True``), made strict.

        diffusers only warns when checkpoint keys are missing or left over, and with its default
        ``low_cpu_mem_usage=True`` missing parameters stay *uninitialised memory*. A checkpoint of another
        architecture (e.g. ``attention_type="standard"`` weights under a ``"diff"`` config, whose q/k/v
        shapes agree) would then load into a silently wrong model: this raises ``ValueError`` naming the
        keys instead. (Keys of another shape already raise in diffusers, unless
        ``ignore_mismatched_sizes=True`` asks for them to be re-initialised.) A truncated, corrupt or code-carrying weights file raises an error naming the file.
        """
        want_info = kwargs.pop("output_loading_info", False)
        with checkpoint_errors(*_local_weight_files(pretrained_model_name_or_path, kwargs.get("subfolder"))):
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [f"  missing from the checkpoint: {sorted(info['missing_keys'])}"] if info["missing_keys"] else []
        if info["unexpected_keys"]:
            problems.append(f"  in the checkpoint but not in the model: {sorted(info['unexpected_keys'])}")
        if problems:
            cfg = model.config
            raise ValueError(
                f"the weights at {pretrained_model_name_or_path} do not fit DiffDiTTransformer2DModel("
                f"attention_type={cfg.attention_type!r}, num_layers={cfg.num_layers}, "
                f"hidden size {model.inner_dim}, qk_norm={cfg.qk_norm}) built from its config (a checkpoint of "
                f"another architecture or attention_type?):\n" + "\n".join(problems))
        return (model, info) if want_info else model

    @classmethod
    def from_dit(cls, dit: nn.Module, **overrides) -> "DiffDiTTransformer2DModel":
        """An ``attention_type="standard"`` copy of a diffusers ``DiTTransformer2DModel``; see
        :func:`convert_dit_to_diff_dit`."""
        return convert_dit_to_diff_dit(dit, **overrides)

    def to_dit(self):
        """A diffusers ``DiTTransformer2DModel`` with this model's weights; see :func:`convert_diff_dit_to_dit`."""
        return convert_diff_dit_to_dit(self)

    # ---- introspection / runtime settings ---------------------------------------------------

    @property
    def learn_sigma(self) -> bool:
        """True when the output holds DiT's variance channels after the noise prediction."""
        return self.out_channels == 2 * self.config.in_channels

    @property
    def has_null_class(self) -> bool:
        """True when the null class (index ``num_classes``) exists, i.e. guidance is possible."""
        return self.config.class_dropout_prob > 0

    @property
    def attention_heads(self) -> dict[str, int]:
        """The head layout actually built, e.g. ``{"signal_heads": 3, "noise_heads": 3, "head_dim": 64,
        "value_head_dim": 128}`` for DIFF DiT-S."""
        attn = self.transformer_blocks[0].attn if len(self.transformer_blocks) else None
        if isinstance(attn, GroupedDifferentialAttention):
            return {"signal_heads": attn.signal_heads, "noise_heads": attn.noise_heads,
                    "head_dim": attn.head_dim, "value_head_dim": attn.value_head_dim}
        heads = self.config.num_attention_heads
        return {"num_heads": heads, "head_dim": self.inner_dim // heads}

    def set_differential_attention_backend(self, backend: str) -> None:
        """Switch the differential kernel backend ("auto", "math", "sdpa", "triton") of every block.

        (diffusers' own ``set_attention_backend`` targets diffusers ``Attention`` modules, not these.)
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported{did_you_mean(backend, BACKENDS)}; "
                             f"accepted: {BACKENDS}")
        for module in self.modules():
            if isinstance(module, GroupedDifferentialAttention):
                module.backend = backend
        self.register_to_config(diff_attention_backend=backend)

    # ---- forward -----------------------------------------------------------------------------

    def _check_inputs(self, hidden_states: Tensor, class_labels: Optional[Tensor]) -> None:
        cfg = self.config
        if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 4:
            got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be a (batch, channels, height, width) tensor, got {got}")
        B, C, Hh, Ww = hidden_states.shape
        expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if (C, Hh, Ww) != expected:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}, expected (batch, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) = (batch, in_channels, sample_size, sample_size) of this model")
        if not hidden_states.is_floating_point():
            raise ValueError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
        if class_labels is None:
            raise ValueError(
                f"class_labels is required (a (batch,) integer tensor in [0, {cfg.num_classes}); "
                f"{cfg.num_classes} is the null class" + ("" if self.has_null_class else ", absent here") + ")")
        if (not isinstance(class_labels, Tensor) or class_labels.is_floating_point() or class_labels.is_complex()
                or class_labels.dtype == torch.bool):  # a bool mask would silently become classes 0 / 1
            raise ValueError(f"class_labels must be an integer tensor, got "
                             f"{class_labels.dtype if isinstance(class_labels, Tensor) else type(class_labels).__name__}")
        if class_labels.shape != (B,):
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}, expected ({B},) = (batch,)")
        # The range check reads two numbers back from the device: skipped for CUDA tensors while training,
        # where it would sync every step (training labels are range-checked when the data is loaded).
        if not torch.compiler.is_compiling() and not (self.training and class_labels.is_cuda):
            high = cfg.num_classes + (1 if self.has_null_class else 0)
            lo, hi = torch.stack([class_labels.min(), class_labels.max()]).tolist()
            if lo < 0 or hi >= high:
                null = (f"; {cfg.num_classes} is the null class" if self.has_null_class
                        else " (no null class: class_dropout_prob=0)")
                raise ValueError(f"class_labels must lie in [0, {high - 1}]{null}, got values in [{lo}, {hi}]")

    @staticmethod
    def _timestep_batch(timestep, batch: int, device: torch.device) -> Tensor:
        """Timesteps as a (batch,) tensor; accepts a number, a 0-d, (1,) or (batch,) tensor (int or float)."""
        if timestep is None:
            raise ValueError("timestep is required: a number or a tensor of shape (), (1,) or (batch,)")
        if not isinstance(timestep, Tensor):
            try:
                timestep = torch.tensor(timestep, device=device)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"timestep must be a number or a tensor of shape (), (1,) or (batch,), "
                                 f"got {timestep!r}") from err
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise ValueError(f"timestep must hold real numbers (int or float), got dtype {timestep.dtype}")
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}, expected (), (1,) or ({batch},)")
        return timestep.to(device).reshape(-1).expand(batch)

    def conditioning(self, timestep: Tensor, class_labels: Tensor, dtype: torch.dtype) -> Tensor:
        """c = t_emb + y_emb; label dropout (to the null class) applies in training mode."""
        t_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        return t_emb + self.class_embedder(class_labels).to(dtype)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p·p·C) tokens -> (B, C, H, W) image."""
        p, c = self.patch_size, self.out_channels
        h = w = self.config.sample_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Optional[Tensor] = None,
        class_labels: Optional[Tensor] = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """
        Args:
            hidden_states: ``(B, in_channels, sample_size, sample_size)`` noisy input.
            timestep: diffusion step(s), a number or a tensor of shape ``()``, ``(1,)`` or ``(B,)``; may
                be fractional (e.g. Euler's sigma-derived timesteps).
            class_labels: ``(B,)`` integer labels in ``[0, num_classes)``, or ``num_classes`` for the null class.
            return_dict: return a ``Transformer2DModelOutput`` (else a 1-tuple).

        Returns:
            ``sample`` of shape ``(B, out_channels, sample_size, sample_size)``.
        """
        self._check_inputs(hidden_states, class_labels)
        t = self._timestep_batch(timestep, hidden_states.shape[0], hidden_states.device)
        x = self.pos_embed(hidden_states)
        c = self.conditioning(t, class_labels, x.dtype)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)
            else:
                x = block(x, c)
        shift, scale = self.proj_out_1(nn.functional.silu(c)).chunk(2, dim=1)
        x = self.proj_out_2(_modulate(self.norm_out(x), shift, scale))
        output = self.unpatchify(x)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def _local_weight_files(path, subfolder: Optional[str] = None) -> list[str]:
    """The weight files of a local ``save_pretrained`` folder (none for a hub id)."""
    folder = os.path.join(str(path), subfolder) if subfolder else str(path)
    if not os.path.isdir(folder):
        return []
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))


# --------------------------------------------------------------------------------------------
# Conversion to / from diffusers' DiTTransformer2DModel
# --------------------------------------------------------------------------------------------
# diffusers' DiT keeps one CombinedTimestepLabelEmbeddings per block (norm1.emb) and uses block 0's
# for the final layer; DiT (and this model) share one. Checkpoints converted from the official DiT
# hold identical copies, so the conversion takes block 0's copy and refuses blocks that differ.
# diffusers also splits qkv into to_q / to_k / to_v; this model keeps the fused qkv of timm / DiT.

_EMB_PREFIX = "transformer_blocks.{i}.norm1.emb."
_SHARED_EMB = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
               "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
               "class_embedder.embedding_table.weight")
_BLOCK_RENAMES = {  # diffusers name -> ours, within transformer_blocks.{i}.
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "attn1.to_out.0.weight": "attn.proj.weight",
    "attn1.to_out.0.bias": "attn.proj.bias",
    "ff.net.0.proj.weight": "ff.net.0.proj.weight",
    "ff.net.0.proj.bias": "ff.net.0.proj.bias",
    "ff.net.2.weight": "ff.net.2.weight",
    "ff.net.2.bias": "ff.net.2.bias",
}
_TOP_LEVEL = ("pos_embed.proj.weight", "pos_embed.proj.bias", "proj_out_1.weight", "proj_out_1.bias",
              "proj_out_2.weight", "proj_out_2.bias")


def dit_state_dict_to_diff_dit(state_dict: dict[str, Tensor], num_layers: int,
                               attention_bias: bool = True) -> dict[str, Tensor]:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to this model's (standard attention).

    Raises ``ValueError`` if the per-block conditioning embeddings differ (see module comment).
    """
    sd = dict(state_dict)
    out: dict[str, Tensor] = {k: sd.pop(k) for k in _TOP_LEVEL}
    for name in _SHARED_EMB:
        first = sd.pop(_EMB_PREFIX.format(i=0) + name)
        for i in range(1, num_layers):
            other = sd.pop(_EMB_PREFIX.format(i=i) + name)
            if not torch.equal(first, other):
                raise ValueError(
                    f"transformer_blocks.{i}.norm1.emb.{name} differs from block 0's: this DiT has per-block "
                    f"conditioning embeddings, which DiT (and DiffDiTTransformer2DModel) share; only block 0's "
                    f"copy drives diffusers' final layer, so no exact conversion exists")
        out[name] = first
    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        for src, dst in _BLOCK_RENAMES.items():
            out[pre + dst] = sd.pop(pre + src)
        out[pre + "attn.qkv.weight"] = torch.cat(
            [sd.pop(pre + f"attn1.to_{n}.weight") for n in "qkv"], dim=0)
        if attention_bias:
            out[pre + "attn.qkv.bias"] = torch.cat([sd.pop(pre + f"attn1.to_{n}.bias") for n in "qkv"], dim=0)
    if sd:
        raise ValueError(f"unexpected keys in the DiT state dict (not convertible): {sorted(sd)[:8]}")
    return out


def diff_dit_state_dict_to_dit(state_dict: dict[str, Tensor], num_layers: int,
                               attention_bias: bool = True) -> dict[str, Tensor]:
    """Inverse of :func:`dit_state_dict_to_diff_dit` (standard attention only): copies the shared
    conditioning embedding into every diffusers block and splits qkv."""
    sd = dict(state_dict)
    out: dict[str, Tensor] = {k: sd.pop(k) for k in _TOP_LEVEL}
    shared = {name: sd.pop(name) for name in _SHARED_EMB}
    for i in range(num_layers):
        pre = f"transformer_blocks.{i}."
        for name, value in shared.items():
            out[_EMB_PREFIX.format(i=i) + name] = value.clone()
        for src, dst in _BLOCK_RENAMES.items():
            out[pre + src] = sd.pop(pre + dst)
        for n, w in zip("qkv", sd.pop(pre + "attn.qkv.weight").chunk(3, dim=0)):
            out[pre + f"attn1.to_{n}.weight"] = w.clone()
        if attention_bias:
            for n, b in zip("qkv", sd.pop(pre + "attn.qkv.bias").chunk(3, dim=0)):
                out[pre + f"attn1.to_{n}.bias"] = b.clone()
    if sd:
        raise ValueError(f"keys with no DiTTransformer2DModel counterpart: {sorted(sd)[:8]} "
                         f"(only attention_type='standard' without qk_norm converts)")
    return out


def _match_dtype_device(model: nn.Module, like: nn.Module) -> nn.Module:
    # Only cast when needed: ModelMixin.to(dtype) logs a warning on every dtype cast.
    model = model.to(like.device)
    return model if model.dtype == like.dtype else model.to(like.dtype)


def convert_dit_to_diff_dit(dit: nn.Module, **overrides) -> DiffDiTTransformer2DModel:
    """A ``DiffDiTTransformer2DModel(attention_type="standard")`` that computes what ``dit`` (a diffusers
    ``DiTTransformer2DModel``) computes in eval mode. ``overrides`` set runtime-only config values
    (e.g. ``class_dropout_prob`` is fixed at 0.1 in diffusers' DiT)."""
    cfg = dit.config
    if cfg.norm_type != "ada_norm_zero" or cfg.norm_elementwise_affine:
        raise ValueError(f"only DiT blocks with norm_type='ada_norm_zero' and norm_elementwise_affine=False "
                         f"convert, got norm_type={cfg.norm_type!r}, "
                         f"norm_elementwise_affine={cfg.norm_elementwise_affine}")
    if cfg.activation_fn not in ACTIVATIONS:
        raise ValueError(f"activation_fn={cfg.activation_fn!r} has no counterpart; accepted: {ACTIVATIONS}")
    config = dict(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
        dropout=cfg.dropout, attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, activation_fn=cfg.activation_fn, num_classes=cfg.num_embeds_ada_norm,
        class_dropout_prob=dit.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob,
        norm_eps=cfg.norm_eps, timestep_freq_shift=dit.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift,
        attention_type="standard")
    config.update(overrides)
    model = DiffDiTTransformer2DModel(**config)
    sd = dit_state_dict_to_diff_dit(dit.state_dict(), cfg.num_layers, cfg.attention_bias)
    model.load_state_dict(sd, strict=True)
    return _match_dtype_device(model, dit)


def convert_diff_dit_to_dit(model: DiffDiTTransformer2DModel):
    """A diffusers ``DiTTransformer2DModel`` with ``model``'s weights (``attention_type="standard"`` only)."""
    from diffusers import DiTTransformer2DModel

    cfg = model.config
    problems = []
    if cfg.attention_type != "standard":
        problems.append(f"attention_type={cfg.attention_type!r} (diffusers' DiT has standard attention only)")
    if cfg.qk_norm:
        problems.append("qk_norm=True")
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={cfg.mlp_ratio} (diffusers' DiT uses 4)")
    if cfg.timestep_freq_shift != 1:
        problems.append(f"timestep_freq_shift={cfg.timestep_freq_shift} (diffusers' DiT uses 1)")
    if cfg.class_dropout_prob <= 0:
        problems.append("class_dropout_prob=0 (diffusers' DiT always has the null-class row)")
    if problems:
        raise ValueError("no DiTTransformer2DModel counterpart for " + ", ".join(problems))
    dit = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
        dropout=cfg.dropout, attention_bias=cfg.attention_bias, sample_size=cfg.sample_size,
        patch_size=cfg.patch_size, activation_fn=cfg.activation_fn, num_embeds_ada_norm=cfg.num_classes,
        norm_eps=cfg.norm_eps)
    for block in dit.transformer_blocks:  # diffusers hard-codes 0.1; it only matters in training mode
        block.norm1.emb.class_embedder.dropout_prob = cfg.class_dropout_prob
    dit.load_state_dict(diff_dit_state_dict_to_dit(model.state_dict(), cfg.num_layers, cfg.attention_bias),
                        strict=True)
    return _match_dtype_device(dit, model)
