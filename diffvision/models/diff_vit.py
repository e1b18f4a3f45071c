""" DIFF-ViT, GDA-ViT and DIFF V2-ViT: Vision Transformers with differential attention, registered in timm.

timm's ``VisionTransformer`` and ``Block`` with the attention swapped for diffvision's, chosen by
``attn_kind`` (the registry in :mod:`diffvision.attention.registry`):

* DIFF (Ye et al., "Differential Transformer", ICLR 2025, arXiv:2410.05258): every head is the
  difference of two softmax maps, ``(softmax(Q1K1ᵀ) − λ·softmax(Q2K2ᵀ))·V``.
* GDA (grouped differential attention): ``Hs`` signal maps share ``Hn < Hs`` noise maps (like GQA).
* DIFF V2 (the authors' 2026 successor): ``2h`` query heads on GQA key/value heads, one attention call,
  λ = σ(W_λ x) per token and head, no per-head norm.
* linear (LiT) and dydila (a reconstruction of DyDiLA): O(N·d²) linear attention with a depthwise conv on the
  patch grid (the class token gets none); see :mod:`diffvision.attention.linear`. At 32×32 (64 tokens) they
  are not faster than softmax attention: linear attention pays at thousands of tokens.

Every model has a standard-attention twin of the same width, depth and parameter count (±1%):
timm's own ``vit_{tiny,small,base}_patch16_224``, and ``vit_{tiny,small}_patch4_32`` defined here
for 32x32 inputs. Head layouts follow the registry's parameter-twin rule (``twin_heads``) from the twin's
``H`` heads of 64:

* DIFF: ``h = H/2`` differential heads (q/k: ``2h`` sub-heads of 64, v: ``h`` heads of 128); for
  ViT-Ti (``H = 3``, odd) ``h = 3`` with q/k sub-heads of 32 and v heads of 64.
* GDA: signal:noise = 2:1 with ``Hs + Hn = H`` (q/k sub-heads of 64, v heads of ``dim/Hs = 96``).
* DIFF V2: ``h = H`` output heads of 64, ``2H`` query heads, ``H/2`` key/value heads; for ViT-Ti
  ``h = 4`` heads of 48 on 2 key/value heads (an even ``h`` is needed; 4·dim² weights either way).

Because the DIFF/GDA q/k/v/proj projections have a standard MHA's shapes (and the sub-heads are laid out
so that standard heads map onto them in order), a standard ViT checkpoint of the same width and depth
loads weight for weight; DIFF V2 takes one through a GQA-style mapping. See ``checkpoint_filter_fn`` and
``load_standard_vit_weights``.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Type, Union

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import LayerNorm, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..attention import (
    ATTN_KINDS,
    LAMBDA_OPTIONS,
    VISION_OPTIONS,
    check_attn_backend,
    create_attention,
    get_attn_kind,
    layer_heads,
    set_attention_backend,
    twin_heads,
)
from ..checkpoints import WeightMapping, checkpoint_errors

__all__ = [
    'DiffBlock',
    'DiffVisionTransformer',
    'checkpoint_filter_fn',
    'load_standard_vit_weights',
    'StandardViTMapping',
    'twin_model',
]

_logger = logging.getLogger(__name__)

# Parameters only differential attention has (a standard checkpoint cannot supply them), and of those the
# ones not decayed: λ (re-parameterised or per head) and the per-head norm's gain.
_NO_DECAY_PARAMS = r'lambda_(q1|k1|q2|k2|scalar)|sub_norm\.weight|gammas|lambda_bank|out_norm\.weight'
# linear / dydila: the conv on V, the projector banks and the routers
_LINEAR_ONLY_PARAMS = r'dwc\.(weight|bias)|[qk]_bank|[qk]_router\.weight|(kernel|lambda)_routers\.\d+\.weight'
_DIFF_ONLY_KEY = re.compile(rf'^blocks\.\d+\.attn\.({_NO_DECAY_PARAMS}|lambda_proj\.weight|{_LINEAR_ONLY_PARAMS})$')
# DIFF V2's W_λ is decayed like the q/k/v projections: it is a projection of the tokens, and decay pulls
# it towards λ = σ(0) = 0.5 for every token, a mild prior rather than a collapse.
_NO_DECAY_KEY = re.compile(rf'^blocks\.\d+\.attn\.({_NO_DECAY_PARAMS})$')


class DiffBlock(Block):
    """timm's pre-norm ``Block`` with a diffvision attention layer of any registered kind.

    timm's ``Block`` hands the block index (``depth``) only to timm's own ``DiffAttention``, but λinit
    depends on it, so this block builds the attention itself and keeps everything else timm's.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            attn_layer: None = None,
            depth: int = 0,
            attn_kind: str = 'diff',
            noise_heads: Optional[int] = None,
            num_kv_heads: Optional[int] = None,
            lambda_init: Union[float, str, None] = VISION_OPTIONS['lambda_init'],
            lambda_mode: str = VISION_OPTIONS['lambda_mode'],
            head_norm: bool = VISION_OPTIONS['head_norm'],
            attn_backend: str = 'auto',
            linear_options: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        if attn_layer is not None:
            raise ValueError(
                f"DiffBlock builds its attention from attn_kind (one of {list(ATTN_KINDS)}); "
                f"attn_layer={attn_layer!r} is not accepted")
        # nn.Identity swallows timm's attention constructor arguments: a placeholder replaced below
        super().__init__(
            dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
            scale_attn_norm=scale_attn_norm, scale_mlp_norm=scale_mlp_norm, proj_bias=proj_bias,
            proj_drop=proj_drop, attn_drop=attn_drop, init_values=init_values, drop_path=drop_path,
            act_layer=act_layer, norm_layer=norm_layer, mlp_layer=mlp_layer, attn_layer=nn.Identity,
            depth=depth, device=device, dtype=dtype,
        )
        self.attn = create_attention(
            attn_kind, dim, **layer_heads(attn_kind, num_heads, noise_heads=noise_heads, num_kv_heads=num_kv_heads),
            qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, depth=depth,
            lambda_init=lambda_init, lambda_mode=lambda_mode, head_norm=head_norm, backend=attn_backend,
            linear_options=linear_options, device=device, dtype=dtype,
        )


class DiffVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks use diffvision attention.

    Takes every ``VisionTransformer`` argument, plus:

    Args:
        attn_kind: ``'diff'`` (the paper's DIFF), ``'gda'`` (grouped), ``'diffv2'`` (DIFF V2) or
            ``'standard'`` (softmax MHA); see ``diffvision.attention.ATTN_KINDS``.
        num_heads: heads of the attention module: differential heads ``h`` for ``'diff'``
            (q/k get ``2h`` sub-heads), signal heads ``Hs`` for ``'gda'``, output heads ``h`` for
            ``'diffv2'`` (``2h`` query heads), heads for ``'standard'``.
        noise_heads: noise heads ``Hn`` for ``'gda'`` (``num_heads % noise_heads == 0``).
        num_kv_heads: key/value heads for ``'diffv2'`` (a divisor of ``num_heads``; default
            ``num_heads / 2``, the parameter-matched layout).
        lambda_init: λinit for ``'diff'`` / ``'gda'``: a number, or ``'schedule'`` for the paper's depth rule
            0.8 − 0.6·exp(−0.3·depth).
        lambda_mode: ``'reparam'`` (the paper's), ``'fixed'`` (λ = λinit) or ``'scalar'`` (a learnable λ per
            head), for ``'diff'`` / ``'gda'``.
        head_norm: per-head RMSNorm × (1 − λinit) after the difference (``'diff'`` / ``'gda'``).

        The defaults of these three are ``VISION_OPTIONS``, chosen by the variant study
        (docs/variant_study.md); the paper's text recipe is ``PAPER_OPTIONS`` (``lambda_init='schedule'``,
        ``lambda_mode='reparam'``, ``head_norm=True``). ``attn_options`` records the values the model was
        built with.
        attn_backend: kernel backend (``'auto'``, ``'math'``, ``'sdpa'``, ``'triton'``; DIFF V2 has no
            ``'triton'``); see ``set_attention_backend``.
        linear_options: the options of ``'linear'`` / ``'dydila'`` as a dict (``LINEAR_OPTIONS`` /
            ``DYDILA_OPTIONS`` of ``diffvision.attention``); None: their defaults. Their conv runs over the patch
            grid after the prefix (class / register) tokens, which the model tells each layer.
    """

    def __init__(
            self,
            attn_kind: str = 'diff',
            num_heads: int = 6,
            noise_heads: Optional[int] = None,
            num_kv_heads: Optional[int] = None,
            lambda_init: Union[float, str, None] = VISION_OPTIONS['lambda_init'],
            lambda_mode: str = VISION_OPTIONS['lambda_mode'],
            head_norm: bool = VISION_OPTIONS['head_norm'],
            attn_backend: str = 'auto',
            linear_options: Optional[Dict[str, Any]] = None,
            **kwargs: Any,
    ) -> None:
        for arg in ('block_fn', 'attn_layer'):
            if arg in kwargs:
                raise ValueError(
                    f"DiffVisionTransformer builds its own blocks; choose the attention with "
                    f"attn_kind={list(ATTN_KINDS)}, not {arg}={kwargs[arg]!r}")
        # validate before building anything: the kind, its backend and its heads
        check_attn_backend(attn_backend, attn_kind)
        layer_heads(attn_kind, num_heads, noise_heads=noise_heads, num_kv_heads=num_kv_heads)
        block_fn = partial(
            DiffBlock, attn_kind=attn_kind, noise_heads=noise_heads, num_kv_heads=num_kv_heads,
            lambda_init=lambda_init, lambda_mode=lambda_mode, head_norm=head_norm, attn_backend=attn_backend,
            linear_options=linear_options)
        # timm's init_weights() runs inside; it calls each attention's init_weights(), which
        # re-draws λ after the Linear inits and resets the RMSNorm scale to 1
        super().__init__(num_heads=num_heads, block_fn=block_fn, attn_layer=None, **kwargs)
        self.attn_kind = attn_kind
        self._tell_linear_layers_the_grid()
        # the λ / head-norm choices as given (kinds without them: none), so checkpoints can record them
        self.attn_options = (dict(lambda_init=lambda_init, lambda_mode=lambda_mode, head_norm=head_norm)
                             if set(LAMBDA_OPTIONS) <= set(get_attn_kind(attn_kind).options) else {})

    def _tell_linear_layers_the_grid(self) -> None:
        """Linear attention convolves V over the patch grid: each such layer learns how many prefix tokens come
        first and, for a fixed image size, the grid (with ``dynamic_img_size`` it takes the square grid)."""
        dynamic = getattr(self.patch_embed, 'dynamic_img_size', False)
        for block in self.blocks:
            if hasattr(block.attn, 'num_prefix_tokens'):
                block.attn.num_prefix_tokens = self.num_prefix_tokens
                block.attn.grid_size = None if dynamic else tuple(self.patch_embed.grid_size)

    @property
    def attn_layout(self) -> Dict[str, Any]:
        """The attention layout actually built, e.g. ``{'attn_kind': 'gda', 'signal_heads': 4, ...}``."""
        if not len(self.blocks):
            return dict(attn_kind=self.attn_kind)
        return self.blocks[0].attn.layout

    def set_attention_backend(self, backend: str) -> None:
        """Switch the attention kernel (``'auto'``, ``'math'``, ``'sdpa'``, ``'triton'``): see
        ``diffvision.attention.set_attention_backend``."""
        set_attention_backend(self, backend)

    def set_attn_backend(self, backend: str) -> None:
        """Deprecated name of :meth:`set_attention_backend`."""
        warnings.warn("set_attn_backend is deprecated; use set_attention_backend", FutureWarning, stacklevel=2)
        set_attention_backend(self, backend)

    def _check_image(self, x: torch.Tensor) -> None:
        """Name what is wrong with an input before the patch conv does it cryptically.

        (The size check stays timm's: with a fixed ``img_size`` its message names both sizes.)
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a (batch, channels, height, width) image tensor, "
                             f"got {got}")
        in_chans = self.patch_embed.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channels (shape {tuple(x.shape)}), the model takes in_chans={in_chans}; "
                f"convert the images or create the model with in_chans={x.shape[1]}")
        if not x.is_floating_point():
            raise ValueError(f"input must be a floating-point (normalised) image tensor, got dtype {x.dtype}")

    def __prepare_scriptable__(self) -> VisionTransformer:
        """What ``torch.jit.script`` compiles: this model as timm's ``VisionTransformer`` (a shallow copy,
        sharing every submodule and parameter), because TorchScript compiles neither ``super()`` calls nor
        the ``*args`` of the input-checking ``forward_features`` below; the attention layers script as they are."""
        twin = copy.copy(self)
        twin.__class__ = VisionTransformer
        return twin

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_image(x)
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        self._check_image(x)
        return super().forward_intermediates(x, *args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's ViT set plus every λ parameter and per-head RMSNorm scale.

        DIFF/GDA's λ is a learned scalar per layer (re-parameterised by four vectors) or per head, and the
        RMSNorm scale is a normalisation gain: like timm's norms, biases and position embeddings they are not
        decayed. (timm's optimizer factory already skips 1-D parameters; naming them here also covers
        trainers that rely on this list alone.) DIFF V2's ``lambda_proj`` (W_λ) is a token projection and is
        decayed like q/k/v.
        """
        names = set(super().no_weight_decay())
        names.update(n for n, _ in self.named_parameters() if _NO_DECAY_KEY.match(n))
        return names


# ------------------------------------------------------------------------------------------------
# Loading standard ViT checkpoints
# ------------------------------------------------------------------------------------------------

class StandardViTMapping(WeightMapping):
    """What ``load_standard_vit_weights`` (or ``checkpoint_filter_fn``) did with a checkpoint."""


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def _num_blocks(state_dict: Mapping[str, Any]) -> int:
    return len({m.group(1) for k in state_dict for m in [re.match(r'^blocks\.(\d+)\.', k)] if m})


# timm's ViTs (Ti / S / B / L) all have heads of 64; a plain state dict does not record its head count.
_STANDARD_HEAD_DIM = 64


def _standard_to_diffv2(state: Dict[str, Any], model: VisionTransformer, source_num_heads: Optional[int],
                        report: StandardViTMapping) -> None:
    """Map standard attention ``qkv`` tensors onto DIFF V2's layout in place, GQA-style
    (``DifferentialAttentionV2.qkv_from_standard``); ``proj`` (``h·d -> dim``) and everything else load by
    name; ``W_λ`` keeps its init."""
    attn = model.blocks[0].attn
    h, hkv, d, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim, model.embed_dim
    heads = source_num_heads if source_num_heads is not None else dim // _STANDARD_HEAD_DIM
    if heads != h or h * d != dim:
        assumed = "" if source_num_heads is not None else f" (assumed: timm ViTs have heads of {_STANDARD_HEAD_DIM}; " \
                                                          f"pass source_num_heads if not)"
        raise ValueError(
            f"no sound mapping from a standard ViT with {heads} heads of {dim // max(heads, 1)}{assumed} onto this "
            f"DIFF V2 model's {h} output heads of {d}: the GQA mapping needs one output head per standard head of "
            f"the same width (the diffv2 ViT-S/B layouts; ViT-Ti's 3 heads of 64 become 4 heads of 48, which "
            f"has none)")
    for i, block in enumerate(model.blocks):
        for kind in ('weight', 'bias'):
            key = f'blocks.{i}.attn.qkv.{kind}'
            if key in state:
                state[key] = block.attn.qkv_from_standard(state[key])
                report.converted.append(key)
    report.rules.append(f"query heads 2i <- standard heads i, noise query heads 2i+1 kept their init, "
                        f"key/value heads <- mean of {h // hkv} standard heads each")


def _map_state_dict(state_dict: Mapping[str, Any], model: VisionTransformer,
                    source_num_heads: Optional[int] = None):
    """Fit a timm ViT state dict (standard or diffvision) to ``model``; returns (state_dict, report).

    Keys load by name: a standard ViT's q/k/v/proj tensors have exactly the DIFF/GDA layout's shapes and
    order (see the module docstring and README); onto DIFF V2 a standard checkpoint's ``qkv`` goes through
    ``_standard_to_diffv2``. timm's own ViT filter converts foreign layouts and resamples position / patch
    embeddings first. Parameters only differential attention has (λ, per-head RMSNorm, W_λ) and a
    classifier of another size keep the model's init.
    """
    model_sd = model.state_dict()
    source = dict(state_dict)
    source = source.get('model', source)
    source = source.get('state_dict', source)
    if 'patch_embed.proj.weight' in source and 'patch_embed.proj.weight' in model_sd:
        got, want = source['patch_embed.proj.weight'], model_sd['patch_embed.proj.weight']
        if got.shape[0] != want.shape[0]:
            raise ValueError(
                f"checkpoint width {got.shape[0]} (patch_embed.proj.weight {_shape(got)}) does not match "
                f"the model's embed_dim {want.shape[0]} (patch_embed.proj.weight {_shape(want)}); load a "
                f"standard ViT with the same width and depth (e.g. vit_tiny: 192, vit_small: 384, "
                f"vit_base: 768)")
    src_depth, model_depth = _num_blocks(source), _num_blocks(model_sd)
    if src_depth and src_depth != model_depth:
        raise ValueError(
            f"checkpoint has {src_depth} blocks, the model has {model_depth}; load a standard ViT with "
            f"the same width and depth")

    before = {k: tuple(v.shape) for k, v in source.items() if isinstance(v, torch.Tensor)}
    out = vit_checkpoint_filter_fn(source, model)

    report = StandardViTMapping()
    is_diffv2 = getattr(model, 'attn_kind', None) == 'diffv2'
    source_is_standard = not any(_DIFF_ONLY_KEY.match(k) for k in out)
    if is_diffv2 and source_is_standard and any(k.endswith('.attn.qkv.weight') for k in out):
        _standard_to_diffv2(out, model, source_num_heads, report)
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    classifier_keys = {f'{classifier}.weight', f'{classifier}.bias'}
    for k in sorted(classifier_keys & set(out)):
        if k not in model_sd or out[k].shape != model_sd[k].shape:  # another class count, or none
            _logger.warning(f"classifier {k} not loaded: checkpoint {_shape(out[k])}, model "
                            f"{_shape(model_sd[k]) if k in model_sd else 'has no classifier'}")
            report.dropped.append(k)
            del out[k]
    unexpected = [k for k in out if k not in model_sd]
    mismatched = [k for k in out if k in model_sd and out[k].shape != model_sd[k].shape]
    if unexpected or mismatched:
        lines = [f"  {k}: checkpoint {_shape(out[k])}, model {_shape(model_sd[k])}" for k in mismatched]
        lines += [f"  {k}: not in the model" for k in unexpected]
        raise ValueError(
            "checkpoint does not fit the model (a standard ViT of the same width, depth, mlp_ratio, "
            "class token and pooling is needed):\n" + '\n'.join(lines))
    converted = set(report.converted)
    for k in out:
        if k in converted:
            continue
        (report.resampled if before.get(k) not in (None, tuple(out[k].shape)) else report.copied).append(k)
    for k, v in model_sd.items():
        if k not in out and (_DIFF_ONLY_KEY.match(k) or k in classifier_keys):
            out[k] = v  # keep the model's own init so a strict load still catches anything else
            report.kept_init.append(k)
    return out, report


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionTransformer) -> Dict[str, Any]:
    """timm pretrained filter: loads diffvision checkpoints and standard timm ViT checkpoints.

    Used by ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
    and by ``local-dir:`` / hub loading. Raises ``ValueError`` naming the shapes when the checkpoint
    has another width, depth or block layout. (Onto DIFF V2, a standard checkpoint is assumed to have
    timm's heads of 64; ``load_standard_vit_weights`` takes another count.)
    """
    out, report = _map_state_dict(state_dict, model)
    _logger.info(f"checkpoint mapped onto {type(model).__name__}: {report}")
    return out


def load_standard_vit_weights(
        model: VisionTransformer,
        checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor], nn.Module],
        source_num_heads: Optional[int] = None,
) -> StandardViTMapping:
    """Initialise a DIFF/GDA/DIFF V2-ViT from a standard timm ViT of the same width and depth.

    Args:
        model: a model from this module (e.g. ``timm.create_model('diff_vit_small_patch16_224')``).
        checkpoint: a state dict, a timm ViT module, or a file timm can read (``.pth``, ``.bin``,
            ``.safetensors``; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped).
            For original JAX ``.npz`` files, create the timm ViT from them first and pass it here.
        source_num_heads: the checkpoint's head count, which only the DIFF V2 mapping needs; read from a
            module, else assumed to be ``width / 64`` (timm's ViTs).

    Patch/position embeddings (resampled by timm if the patch or image size differs), norms, MLPs
    and the q/k/v/proj tensors are copied (onto DIFF V2, q/k/v are converted GQA-style); λ, per-head
    RMSNorm scales and W_λ keep their init; a classifier of another size is dropped. Returns the report of
    which keys did what.
    """
    if isinstance(checkpoint, nn.Module):
        state_dict = checkpoint.state_dict()
        if source_num_heads is None and len(getattr(checkpoint, 'blocks', ())):
            source_num_heads = getattr(checkpoint.blocks[0].attn, 'num_heads', None)
    elif isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        with checkpoint_errors(checkpoint):  # truncated / corrupt / unsafe: say so, naming the file
            state_dict = timm_load_state_dict(str(checkpoint))  # safetensors or weights_only=True
    elif isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
    else:
        raise TypeError(
            f"checkpoint must be a path, a state dict or an nn.Module, got {type(checkpoint).__name__}")
    out, report = _map_state_dict(state_dict, model, source_num_heads)
    model.load_state_dict(out, strict=True)
    return report


# ------------------------------------------------------------------------------------------------
# Configs and entrypoints
# ------------------------------------------------------------------------------------------------

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# timm has no hook that imports a model's package from a saved config.json, so ``save_for_hf`` exports carry
# this note (in ``pretrained_cfg``) to say what a process must import before it can reload them.
_LOAD_NOTE = ("registered by the diffvision package: run `import diffvision` before "
              "timm.create_model('local-dir:<dir>') or 'hf-hub:<repo>', else timm reports 'Unknown model'")


def _cfg(description: str, **kwargs) -> Dict[str, Any]:
    """No released weights (``pretrained=True`` raises timm's "No pretrained weights" error).
    Preprocessing of the 224 models matches their timm twins, so mapped timm weights see theirs."""
    return {
        'notes': (_LOAD_NOTE,),
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'description': description,
        **kwargs,
    }


def _cfg_32(description: str, **kwargs) -> Dict[str, Any]:
    """32x32 (CIFAR scale): 10 classes and CIFAR-10 normalisation by default."""
    return _cfg(description, num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                mean=_CIFAR10_MEAN, std=_CIFAR10_STD, **kwargs)


_DIFF_PAPER = dict(paper_name='Differential Transformer', paper_ids='arXiv:2410.05258')
_LIT_PAPER = dict(paper_name='LiT: Delving into a Simplified Linear Diffusion Transformer for Image Generation',
                  paper_ids='arXiv:2501.12976')
_DYDILA_PAPER = dict(paper_name='Dynamic Differential Linear Attention (reconstruction; no official code)',
                     paper_ids='arXiv:2601.13683')
_DIFF_V2_CODE = dict(paper_name='Differential Transformer V2',
                     origin_url='https://github.com/microsoft/unilm/tree/master/Diff-Transformer/Diff-Transformer-V2')


def _describe(attn_kind: str, dim: int, heads: Dict[str, int]) -> str:
    h = heads['num_heads']
    if attn_kind == 'diff':
        d = dim // (2 * h)
        return f"DIFF attention, {h} differential heads (q/k: {2 * h} sub-heads of {d}, v: {h} heads of {2 * d}); untrained"
    if attn_kind == 'gda':
        hn = heads['noise_heads']
        return (f"grouped differential attention {h}:{hn} (q/k: {h + hn} sub-heads of {dim // (h + hn)}, "
                f"v: {h} heads of {dim // h}); untrained")
    if attn_kind == 'linear':
        return f"LiT linear attention, {h} heads of {dim // h}, 5x5 depthwise conv on V; untrained"
    if attn_kind == 'dydila':
        return (f"DyDiLA linear attention (a reconstruction of arXiv 2601.13683), {h} heads of {dim // h}; "
                f"untrained")
    return (f"DIFF V2 attention, {h} output heads of {dim // h} ({2 * h} query heads, "
            f"{heads['num_kv_heads']} key/value heads); untrained")


# (width, standard heads) of each size; every differential model's heads come from the registry's twin rule
_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
_VARIANTS = [(f'{kind}_vit_{size}_{patch}', kind, size, patch)
             for kind in ('diff', 'gda', 'diffv2', 'linear', 'dydila')
             for size, patch in (('tiny', 'patch16_224'), ('small', 'patch16_224'), ('base', 'patch16_224'),
                                 ('tiny', 'patch4_32'), ('small', 'patch4_32'))]


def _model_args(attn_kind: str, size: str, patch: str) -> Dict[str, Any]:
    dim, heads = _SIZES[size]
    return dict(patch_size=16 if patch == 'patch16_224' else 4, embed_dim=dim, depth=12, attn_kind=attn_kind,
                **twin_heads(attn_kind, dim, heads))


def _variant_cfg(attn_kind: str, size: str, patch: str) -> Dict[str, Any]:
    dim, heads = _SIZES[size]
    paper = {'diff': _DIFF_PAPER, 'gda': {}, 'diffv2': _DIFF_V2_CODE, 'linear': _LIT_PAPER,
             'dydila': _DYDILA_PAPER}[attn_kind]
    cfg = _cfg if patch == 'patch16_224' else _cfg_32
    return cfg(_describe(attn_kind, dim, twin_heads(attn_kind, dim, heads)), **paper)


default_cfgs = generate_default_cfgs({
    **{name: _variant_cfg(kind, size, patch) for name, kind, size, patch in _VARIANTS},
    'vit_tiny_patch4_32': _cfg_32('standard ViT-Ti/4 for 32x32 inputs (3 heads of 64); untrained'),
    'vit_small_patch4_32': _cfg_32('standard ViT-S/4 for 32x32 inputs (6 heads of 64); untrained'),
})


def _pretrained_files(pretrained: bool, kwargs: Dict[str, Any]) -> List[str]:
    """Local weight files a pretrained load may read: ``pretrained_cfg_overlay=dict(file=...)`` or the
    files of a ``local-dir:`` folder (named in load errors)."""
    if not pretrained:
        return []
    files = []
    for cfg in (kwargs.get('pretrained_cfg_overlay'), kwargs.get('pretrained_cfg')):
        location = cfg.get('file') if isinstance(cfg, Mapping) else getattr(cfg, 'file', None)
        if not location:
            continue
        if os.path.isdir(location):
            files += sorted(str(p) for ext in ('safetensors', 'bin', 'pth')
                            for p in Path(location).glob(f'*.{ext}'))
        else:
            files.append(str(location))
    return files


def _build(model_cls, filter_fn, variant: str, pretrained: bool, **kwargs):
    out_indices = kwargs.pop('out_indices', 3)
    with checkpoint_errors(*_pretrained_files(pretrained, kwargs)):  # a bad weights file is named
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )


def _create_diff_vit(variant: str, pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    return _build(DiffVisionTransformer, checkpoint_filter_fn, variant, pretrained, **kwargs)


_KIND_PREFIX = re.compile(r'(?:(diff|gda|diffv2|linear|dydila)_)?(vit_.+)')
_HEAD_ARGS = ('num_heads', 'noise_heads', 'num_kv_heads')


def twin_model(model_name: str, attn_kind: str, model_kwargs: Optional[Dict[str, Any]] = None
               ) -> Tuple[str, Dict[str, Any]]:
    """The timm name and keywords of the ``attn_kind`` twin of ``model_name``: the same ViT with another
    attention kind at equal parameters (``vit_tiny_patch4_32`` + ``'diff'`` -> ``diff_vit_tiny_patch4_32``).

    Head counts in ``model_kwargs`` are read as the standard model's (``num_heads`` heads of
    ``embed_dim / num_heads``) and become the kind's by the parameter-twin rule (``twin_heads``); that is
    only defined from a standard model, so a non-standard ``model_name`` with head counts is an error.
    A model that already is of ``attn_kind`` comes back unchanged.
    """
    kind = get_attn_kind(attn_kind).name
    kwargs = dict(model_kwargs or {})
    match = _KIND_PREFIX.fullmatch(model_name)
    if match is None:
        raise ValueError(f"model_name {model_name!r} is not a ViT of diffvision or timm (vit_*, diff_vit_*, "
                         f"gda_vit_*, diffv2_vit_*, linear_vit_*, dydila_vit_*): no {kind!r} twin")
    current, base = match.group(1) or 'standard', match.group(2)
    if current == kind:
        return model_name, kwargs
    name = base if kind == 'standard' else f'{kind}_{base}'
    if not timm.is_model(name):
        twins = sorted(n for n in timm.list_models(f'{kind}_vit_*' if kind != 'standard' else 'vit_*_patch4_32'))
        raise ValueError(f"no timm model {name!r} (the {kind!r} twin of {model_name!r}); registered "
                         f"{kind!r} ViTs: {twins}")
    heads = {k: kwargs.pop(k) for k in _HEAD_ARGS if k in kwargs}
    if heads:
        if current != 'standard':
            raise ValueError(f"model_kwargs {heads} of {model_name!r} are {current!r} head counts; the "
                             f"{kind!r} twin is defined from a standard model: start from {base!r} with "
                             f"its num_heads")
        size = next((s for s in _SIZES if f'_{s}_' in f'_{base}_'), None)
        dim = kwargs.get('embed_dim', _SIZES[size][0] if size else None)
        if dim is None:
            raise ValueError(f"model_kwargs of {model_name!r} set num_heads but not embed_dim; add embed_dim")
        kwargs.update(twin_heads(kind, dim, heads['num_heads']))
    return name, kwargs


def _create_variant(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> DiffVisionTransformer:
    _, kind, size, patch = next(v for v in _VARIANTS if v[0] == variant)
    return _create_diff_vit(variant, pretrained=pretrained, **dict(_model_args(kind, size, patch), **kwargs))


def _create_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm's own VisionTransformer (timm Attention): the standard twins of the 32x32 models."""
    return _build(VisionTransformer, vit_checkpoint_filter_fn, variant, pretrained, **kwargs)


@register_model
def diff_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-Ti/16: ViT-Ti/16 with 3 differential heads (q/k sub-heads of 32, v heads of 64). """
    return _create_variant('diff_vit_tiny_patch16_224', pretrained, kwargs)


@register_model
def diff_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-S/16: ViT-S/16 with 3 differential heads (q/k sub-heads of 64, v heads of 128). """
    return _create_variant('diff_vit_small_patch16_224', pretrained, kwargs)


@register_model
def diff_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-B/16: ViT-B/16 with 6 differential heads (q/k sub-heads of 64, v heads of 128). """
    return _create_variant('diff_vit_base_patch16_224', pretrained, kwargs)


@register_model
def diff_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-Ti/4 for 32x32 inputs (64 patches + class token), 3 differential heads. """
    return _create_variant('diff_vit_tiny_patch4_32', pretrained, kwargs)


@register_model
def diff_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-S/4 for 32x32 inputs (64 patches + class token), 3 differential heads. """
    return _create_variant('diff_vit_small_patch4_32', pretrained, kwargs)


@register_model
def gda_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-Ti/16: ViT-Ti/16 with grouped differential attention, 2 signal : 1 noise head. """
    return _create_variant('gda_vit_tiny_patch16_224', pretrained, kwargs)


@register_model
def gda_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-S/16: ViT-S/16 with grouped differential attention, 4 signal : 2 noise heads. """
    return _create_variant('gda_vit_small_patch16_224', pretrained, kwargs)


@register_model
def gda_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-B/16: ViT-B/16 with grouped differential attention, 8 signal : 4 noise heads. """
    return _create_variant('gda_vit_base_patch16_224', pretrained, kwargs)


@register_model
def gda_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-Ti/4 for 32x32 inputs, 2 signal : 1 noise head. """
    return _create_variant('gda_vit_tiny_patch4_32', pretrained, kwargs)


@register_model
def gda_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-S/4 for 32x32 inputs, 4 signal : 2 noise heads. """
    return _create_variant('gda_vit_small_patch4_32', pretrained, kwargs)


@register_model
def diffv2_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF V2-ViT-Ti/16: 4 output heads of 48 (8 query heads, 2 key/value heads): ViT-Ti's 3 heads are odd. """
    return _create_variant('diffv2_vit_tiny_patch16_224', pretrained, kwargs)


@register_model
def diffv2_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF V2-ViT-S/16: 6 output heads of 64 (12 query heads, 3 key/value heads). """
    return _create_variant('diffv2_vit_small_patch16_224', pretrained, kwargs)


@register_model
def diffv2_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF V2-ViT-B/16: 12 output heads of 64 (24 query heads, 6 key/value heads). """
    return _create_variant('diffv2_vit_base_patch16_224', pretrained, kwargs)


@register_model
def diffv2_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF V2-ViT-Ti/4 for 32x32 inputs: 4 output heads of 48 (8 query heads, 2 key/value heads). """
    return _create_variant('diffv2_vit_tiny_patch4_32', pretrained, kwargs)


@register_model
def diffv2_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF V2-ViT-S/4 for 32x32 inputs: 6 output heads of 64 (12 query heads, 3 key/value heads). """
    return _create_variant('diffv2_vit_small_patch4_32', pretrained, kwargs)


@register_model
def linear_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-Ti/16 with LiT linear attention, 2 heads. """
    return _create_variant('linear_vit_tiny_patch16_224', pretrained, kwargs)


@register_model
def linear_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-S/16 with LiT linear attention, 2 heads. """
    return _create_variant('linear_vit_small_patch16_224', pretrained, kwargs)


@register_model
def linear_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-B/16 with LiT linear attention, 2 heads. """
    return _create_variant('linear_vit_base_patch16_224', pretrained, kwargs)


@register_model
def linear_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-Ti/4 for 32x32 inputs with LiT linear attention, 2 heads. """
    return _create_variant('linear_vit_tiny_patch4_32', pretrained, kwargs)


@register_model
def linear_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-S/4 for 32x32 inputs with LiT linear attention, 2 heads. """
    return _create_variant('linear_vit_small_patch4_32', pretrained, kwargs)


@register_model
def dydila_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-Ti/16 with DyDiLA linear attention (a reconstruction), 2 heads. """
    return _create_variant('dydila_vit_tiny_patch16_224', pretrained, kwargs)


@register_model
def dydila_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-S/16 with DyDiLA linear attention (a reconstruction), 2 heads. """
    return _create_variant('dydila_vit_small_patch16_224', pretrained, kwargs)


@register_model
def dydila_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-B/16 with DyDiLA linear attention (a reconstruction), 2 heads. """
    return _create_variant('dydila_vit_base_patch16_224', pretrained, kwargs)


@register_model
def dydila_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-Ti/4 for 32x32 inputs with DyDiLA linear attention (a reconstruction), 2 heads. """
    return _create_variant('dydila_vit_tiny_patch4_32', pretrained, kwargs)


@register_model
def dydila_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ ViT-S/4 for 32x32 inputs with DyDiLA linear attention (a reconstruction), 2 heads. """
    return _create_variant('dydila_vit_small_patch4_32', pretrained, kwargs)


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ ViT-Ti/4 for 32x32 inputs: the standard-attention twin of the diff/gda/diffv2 tiny patch4_32 models. """
    model_args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_vit('vit_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ ViT-S/4 for 32x32 inputs: the standard-attention twin of the diff/gda/diffv2 small patch4_32 models. """
    model_args = dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create_vit('vit_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))
