"""DIFF-DiT: a class-conditional DiT (Peebles & Xie, 2023) whose attention is chosen by one config value.

The architecture is DiT's: patchify + fixed 2-D sin-cos positions, a timestep embedding plus a class
embedding (with a null class for classifier-free guidance) summed into one conditioning vector,
adaLN-Zero blocks, an adaLN final layer and unpatchify, with optional learned sigma
(``out_channels = 2 * in_channels``). Attention is built by :func:`diffvision.attention.create_attention`
from the config's ``attn_kind`` (``"standard"``, ``"diff"``, ``"gda"``, ``"diffv2"``, or the linear kinds
``"linear"`` (LiT) and ``"dydila"`` (a reconstruction of DyDiLA)); this file holds no attention math of its own.

With ``attn_kind="standard"`` the model is diffusers' ``DiTTransformer2DModel`` with the
conditioning embedding stored once instead of once per block; :mod:`diffvision.diffusion.convert_dit`
copies weights across both ways, with the same outputs. DiT's sizes by name (``DIT_PRESETS``) and the
config checks live in :mod:`diffvision.diffusion.config`.

Heads: ``H = num_attention_heads`` is the head count of the standard model and ``D = H *
attention_head_dim`` the hidden size; every other kind takes its heads from the registry's parameter-twin
rule (:func:`diffvision.attention.twin_heads`): ``"diff"`` ``H / 2`` differential heads, ``"gda"`` 2:1
signal:noise with ``signal + noise = H`` (or explicit ``signal_heads`` / ``noise_heads``), ``"diffv2"``
``H`` output heads on ``H / 2`` key/value heads (or an explicit ``num_kv_heads``), ``"linear"`` / ``"dydila"``
``min(H, 2)`` heads of ``D / heads`` (or an explicit ``linear_heads``).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import LabelEmbedding, PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import is_accelerate_available
from torch import Tensor

from diffvision.attention import create_attention, layer_heads, set_attention_backend, twin_heads
from diffvision.attention.registry import LEGACY_KEYWORDS, rename_legacy_keywords
from diffvision.checkpoints import checkpoint_errors
from diffvision.choices import check_choice
from diffvision.diffusion.config import DIT_PRESETS, validate_config

__all__ = ["DIT_PRESETS", "DiffDiTBlock", "DiffDiTTransformer2DModel"]


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
        attn_kind: str,
        head_kwargs: dict[str, int],
        depth: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_bias: bool = True,
        qk_norm: bool = False,
        activation_fn: str = "gelu-approximate",
        norm_eps: float = 1e-5,
        **attn_options: Any,
    ) -> None:
        super().__init__()
        # eps 1e-6 before attention, norm_eps before the MLP: diffusers' DiT block (DiT used 1e-6 for both).
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # attn_options: lambda_init, lambda_mode, head_norm, backend, linear_options (create_attention refuses a real setting
        # the kind does not take)
        self.attn = create_attention(
            attn_kind, dim, qkv_bias=attention_bias, qk_norm=qk_norm, proj_bias=True, proj_drop=dropout,
            depth=depth, **head_kwargs, **attn_options)
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
    r"""Class-conditional DiT with standard, differential (DIFF, GDA) or DIFF V2 attention.

    Parameters:
        num_attention_heads (`int`, defaults to 16): Head count ``H`` of the *standard* model; the other kinds
            take their heads from the parameter-twin rule (DIFF ``H/2`` differential heads, GDA ``2H/3 : H/3``,
            DIFF V2 ``H`` output heads on ``H/2`` key/value heads).
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
        attn_kind (`str`, defaults to "diff"): "standard", "diff", "gda", "diffv2", "linear" or "dydila"
            (``diffvision.attention.ATTN_KINDS``). Old name: ``attention_type``.
        signal_heads, noise_heads (`int`, *optional*): Explicit GDA head counts (only with "gda").
        num_kv_heads (`int`, *optional*): Explicit DIFF V2 key/value heads (a divisor of ``H``; only with "diffv2").
        linear_heads (`int`, *optional*): Heads of "linear" / "dydila" (default ``min(H, 2)``, LiT's few heads).
        linear_options (`dict`, *optional*): Options of "linear" / "dydila" (``diffvision.attention.LINEAR_OPTIONS``
            / ``DYDILA_OPTIONS``, e.g. ``{"projectors": 0}``); None: their defaults. Their 5×5 conv runs on the
            token grid (``sample_size / patch_size`` square, no prefix tokens).
        qk_norm (`bool`, defaults to False): LayerNorm on per-head queries and keys.
        lambda_init (`float` or "schedule", defaults to "schedule"): λinit of DIFF / GDA; "schedule" (or None)
            is the paper's depth rule ``0.8 - 0.6·exp(-0.3·depth)``.
        lambda_mode (`str`, defaults to "reparam"): DIFF / GDA λ: "reparam" (the paper's), "fixed" (λ = λinit,
            no parameter) or "scalar" (one learnable λ per head).
        head_norm (`bool`, defaults to True): DIFF / GDA per-head RMSNorm × (1 − λinit) after the difference.
        attn_backend (`str`, defaults to "auto"): Attention kernel backend ("auto", "math", "sdpa", "triton";
            DIFF V2 has no "triton"); see :meth:`set_attention_backend`. Old name: ``diff_attention_backend``.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _no_split_modules = ["DiffDiTBlock"]
    _repeated_blocks = ["DiffDiTBlock"]
    # the keywords' names before the vocabulary was unified: accepted, never written into a config
    ignore_for_config = list(LEGACY_KEYWORDS)

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
        attn_kind: str = "diff",
        signal_heads: Optional[int] = None,
        noise_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        linear_heads: Optional[int] = None,
        linear_options: Optional[dict] = None,
        qk_norm: bool = False,
        lambda_init: Union[float, str, None] = "schedule",
        lambda_mode: str = "reparam",
        head_norm: bool = True,
        attn_backend: str = "auto",
        attention_type: Optional[str] = None,
        diff_attention_backend: Optional[str] = None,
    ):
        super().__init__()
        attn_kind, attn_backend = self._legacy_keywords(attn_kind, attn_backend, attention_type, diff_attention_backend)
        dim = num_attention_heads * attention_head_dim
        validate_config(self.config, dim)
        head_kwargs = layer_heads(attn_kind, **twin_heads(
            attn_kind, dim, num_attention_heads, signal_heads=signal_heads, noise_heads=noise_heads,
            num_kv_heads=num_kv_heads, linear_heads=linear_heads))

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
                dim, attn_kind, head_kwargs, depth=i, mlp_ratio=mlp_ratio, dropout=dropout,
                attention_bias=attention_bias, qk_norm=qk_norm, activation_fn=activation_fn,
                norm_eps=norm_eps, lambda_init=lambda_init, lambda_mode=lambda_mode, head_norm=head_norm,
                backend=attn_backend, linear_options=linear_options)
            for i in range(num_layers)
        ])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)  # final adaLN: shift, scale
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    # ---- old keyword names ------------------------------------------------------------------------

    def _legacy_keywords(self, attn_kind, attn_backend, attention_type, diff_attention_backend) -> tuple[str, str]:
        """``attention_type`` / ``diff_attention_backend`` (the names before the vocabulary was unified) set
        ``attn_kind`` / ``attn_backend``, and the config records the new names only."""
        if attention_type is None and diff_attention_backend is None:
            return attn_kind, attn_backend
        defaults_used = set(self.config.get("_use_default_values", []))
        given = {k: v for k, v in (("attn_kind", attn_kind), ("attn_backend", attn_backend)) if k not in defaults_used}
        given.update(attention_type=attention_type, diff_attention_backend=diff_attention_backend)
        resolved = {"attn_kind": attn_kind, "attn_backend": attn_backend,
                    **rename_legacy_keywords(given, type(self).__name__)}
        self.register_to_config(attn_kind=resolved["attn_kind"], attn_backend=resolved["attn_backend"],
                                _use_default_values=sorted(defaults_used - {"attn_kind", "attn_backend"}))
        return resolved["attn_kind"], resolved["attn_backend"]

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config reading, with a saved config's old keyword names renamed to today's."""
        return super().extract_init_dict(rename_legacy_keywords(config_dict, "the saved config"),
                                         **rename_legacy_keywords(kwargs, "the keywords"))

    # ---- construction helpers -------------------------------------------------------------

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
        """Build a DiT size by name, e.g. ``from_preset("DiT-S/2", attn_kind="diff", sample_size=32,
        in_channels=3, num_classes=10)``; ``kwargs`` set or override any config value."""
        check_choice("preset", name, DIT_PRESETS)
        return cls(**{**DIT_PRESETS[name], **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained`` (safetensors first, ``.bin`` with ``weights_only=True``), made strict.

        diffusers only warns when checkpoint keys are missing or left over, and with its default
        ``low_cpu_mem_usage=True`` missing parameters stay *uninitialised memory*. A checkpoint of another
        architecture (e.g. ``attn_kind="standard"`` weights under a ``"diff"`` config, whose q/k/v
        shapes agree) would then load into a silently wrong model: this raises ``ValueError`` naming the
        keys instead. (Keys of another shape already raise in diffusers, unless
        ``ignore_mismatched_sizes=True`` asks for them to be re-initialised.) A truncated, corrupt or
        code-carrying weights file raises an error naming the file. A local folder that holds something else
        (a pipeline, diffusers' ``DiTTransformer2DModel``) raises ``ValueError`` saying how to load it.
        """
        _check_model_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # diffusers' fallback, without its warning
        with checkpoint_errors(*_local_weight_files(pretrained_model_name_or_path, kwargs.get("subfolder"))):
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = [f"  missing from the checkpoint: {sorted(info['missing_keys'])}"] if info["missing_keys"] else []
        if info["unexpected_keys"]:
            problems.append(f"  in the checkpoint but not in the model: {sorted(info['unexpected_keys'])}")
        if problems:
            cfg = model.config
            raise ValueError(
                f"the weights at {pretrained_model_name_or_path} do not fit DiffDiTTransformer2DModel("
                f"attn_kind={cfg.attn_kind!r}, num_layers={cfg.num_layers}, "
                f"hidden size {model.inner_dim}, qk_norm={cfg.qk_norm}) built from its config (a checkpoint of "
                f"another architecture or attn_kind?):\n" + "\n".join(problems))
        return (model, info) if want_info else model

    @classmethod
    def from_dit(cls, dit: nn.Module, attn_kind: Optional[str] = None, **overrides) -> "DiffDiTTransformer2DModel":
        """This model with the config and weights of a standard DiT (diffusers' ``DiTTransformer2DModel`` or
        the original DiT): an exact copy for ``attn_kind="standard"``, the DIFF / GDA / DIFF V2 twin initialised
        from it otherwise; see :func:`~diffvision.diffusion.convert_dit.convert_dit_to_diff_dit`."""
        from diffvision.diffusion.convert_dit import convert_dit_to_diff_dit  # it imports this module

        return convert_dit_to_diff_dit(dit, attn_kind=attn_kind, **overrides)

    def to_dit(self):
        """A diffusers ``DiTTransformer2DModel`` with this model's weights; see
        :func:`~diffvision.diffusion.convert_dit.convert_diff_dit_to_dit`."""
        from diffvision.diffusion.convert_dit import convert_diff_dit_to_dit

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
    def attn_layout(self) -> dict[str, Any]:
        """The attention layout actually built, e.g. ``{"attn_kind": "diff", "signal_heads": 3, "noise_heads": 3,
        "head_dim": 64, "value_head_dim": 128, ...}`` for DIFF DiT-S."""
        if not len(self.transformer_blocks):
            return {"attn_kind": self.config.attn_kind}
        return self.transformer_blocks[0].attn.layout

    @property
    def attention_heads(self) -> dict[str, Any]:
        """Deprecated name of :attr:`attn_layout`."""
        warnings.warn("attention_heads is deprecated; use attn_layout", FutureWarning, stacklevel=2)
        return self.attn_layout

    def set_attention_backend(self, backend: str) -> None:
        """Switch the attention kernel backend ("auto", "math", "sdpa", "triton") of every block and record it
        in the config (``attn_backend``): :func:`diffvision.attention.set_attention_backend`.

        (This replaces diffusers' own ``set_attention_backend``, which targets diffusers ``Attention`` modules
        and would find none here.)
        """
        set_attention_backend(self, backend)

    def set_differential_attention_backend(self, backend: str) -> None:
        """Deprecated name of :meth:`set_attention_backend`."""
        warnings.warn("set_differential_attention_backend is deprecated; use set_attention_backend",
                      FutureWarning, stacklevel=2)
        set_attention_backend(self, backend)

    # ---- deployment ------------------------------------------------------------------------

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: refuse with the reason and what works instead."""
        raise RuntimeError(
            "torch.jit.script cannot compile DiffDiTTransformer2DModel: diffusers' PatchEmbed, Timesteps, "
            "TimestepEmbedding and FeedForward are not TorchScript (nor is diffusers' own DiTTransformer2DModel); "
            "use torch.jit.trace(model, (x, t, y), strict=False), torch.export.export or torch.onnx.export "
            "(both exporters)")

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
        # The range check reads two numbers back from the labels' device: free for CPU tensors, a host sync
        # per forward (per denoising step) on a GPU, so it runs on CPU tensors only. Labels on a GPU were
        # checked on the host before they got there (the pipeline checks its labels, the data module its
        # training labels), and an index past the embedding table still fails there (a device-side assert).
        if class_labels.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_label_range(class_labels)

    def _check_label_range(self, class_labels: Tensor) -> None:
        cfg = self.config
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
        # PatchEmbed returns the conv's output transposed ((B, N, C) with the channels outermost in memory);
        # the residual adds `x + gate * f(x)` keep their first operand's layout, so without this one copy
        # every block would add, normalise and feed the MLP through that transposed layout (diffusers'
        # block writes `f(x) + x` and so gets a row-major stream without asking).
        x = self.pos_embed(hidden_states).contiguous()
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


def _check_model_folder(path, subfolder: Optional[str] = None) -> None:
    """Say what a local folder holds when it is not a DiffDiTTransformer2DModel (diffusers' own errors list
    every key of a foreign checkpoint, or only name the missing config.json)."""
    folder = os.path.join(str(path), subfolder) if subfolder else str(path)
    if not os.path.isdir(folder):
        return  # a hub id: diffusers resolves it
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ValueError(f"{folder} is a pipeline folder (model_index.json): load its model with "
                             f"DiffDiTTransformer2DModel.from_pretrained({str(path)!r}, subfolder='transformer') or "
                             f"the pipeline with DiffDiTPipeline.from_pretrained({str(path)!r})")
        return
    try:
        with open(os.path.join(folder, "config.json")) as f:
            name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: diffusers' error says so
    if name == "DiTTransformer2DModel":
        raise ValueError(f"{folder} holds diffusers' DiTTransformer2DModel: convert it with "
                         f"diffvision.diffusion.convert_dit_to_diff_dit(DiTTransformer2DModel.from_pretrained("
                         f"{folder!r}), attn_kind=...)")


def _local_weight_files(path, subfolder: Optional[str] = None) -> list[str]:
    """The weight files of a local ``save_pretrained`` folder (none for a hub id)."""
    folder = os.path.join(str(path), subfolder) if subfolder else str(path)
    if not os.path.isdir(folder):
        return []
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))
