""" DIFF-ViT and GDA-ViT: Vision Transformers with differential attention, registered in timm.

timm's ``VisionTransformer`` and ``Block`` with the attention swapped for diffvision's:

* DIFF (Ye et al., "Differential Transformer", ICLR 2025, arXiv:2410.05258): every head is the
  difference of two softmax maps, ``(softmax(Q1K1ᵀ) − λ·softmax(Q2K2ᵀ))·V``.
* GDA (grouped differential attention): ``Hs`` signal maps share ``Hn < Hs`` noise maps (like GQA).

Every model has a standard-attention twin of the same width, depth and parameter count (±0.1%):
timm's own ``vit_{tiny,small,base}_patch16_224``, and ``vit_{tiny,small}_patch4_32`` defined here
for 32x32 inputs. Head layouts (``H`` = the twin's heads of 64):

* DIFF: ``h = H/2`` differential heads (q/k: ``2h`` sub-heads of 64, v: ``h`` heads of 128); for
  ViT-Ti (``H = 3``, odd) ``h = 3`` with q/k sub-heads of 32 and v heads of 64.
* GDA: signal:noise = 2:1 with ``Hs + Hn = H`` (q/k sub-heads of 64, v heads of ``dim/Hs = 96``).

Because the q/k/v/proj projections have a standard MHA's shapes (and the sub-heads are laid out so
that standard heads map onto them in order), a standard ViT checkpoint of the same width and depth
loads weight for weight; see ``checkpoint_filter_fn`` and ``load_standard_vit_weights``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import LayerNorm, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..attention import ATTENTION_LAYERS, BACKENDS, create_attention
from ._helpers import checkpoint_errors, did_you_mean

__all__ = [
    'DiffBlock',
    'DiffVisionTransformer',
    'checkpoint_filter_fn',
    'load_standard_vit_weights',
    'StandardViTMapping',
]

_logger = logging.getLogger(__name__)

# Parameters that exist only in differential attention; a standard checkpoint cannot supply them.
_DIFF_ONLY_KEY = re.compile(r'^blocks\.\d+\.attn\.(lambda_(q1|k1|q2|k2)|sub_norm\.weight)$')


def _attn_head_kwargs(attn_kind: str, num_heads: int, noise_heads: Optional[int]) -> Dict[str, int]:
    """Map the model's head arguments onto the attention module's constructor."""
    if attn_kind == 'gda':
        if noise_heads is None:
            raise ValueError("attn_kind='gda' needs noise_heads (num_heads is the number of signal heads)")
        return dict(signal_heads=num_heads, noise_heads=noise_heads)
    if noise_heads is not None:
        raise ValueError(
            f"noise_heads={noise_heads} only applies to attn_kind='gda', got attn_kind={attn_kind!r}")
    return dict(num_heads=num_heads)


class DiffBlock(Block):
    """timm's pre-norm ``Block`` with a diffvision attention layer (DIFF, GDA or standard).

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
            lambda_init: Optional[float] = None,
            attn_backend: str = 'auto',
            device=None,
            dtype=None,
    ) -> None:
        if attn_layer is not None:
            raise ValueError(
                f"DiffBlock builds its attention from attn_kind (one of {sorted(ATTENTION_LAYERS)}); "
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
            attn_kind, dim, **_attn_head_kwargs(attn_kind, num_heads, noise_heads),
            qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, depth=depth,
            lambda_init=lambda_init, backend=attn_backend, device=device, dtype=dtype,
        )


class DiffVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks use differential attention.

    Takes every ``VisionTransformer`` argument, plus:

    Args:
        attn_kind: ``'diff'`` (paper's DIFF), ``'gda'`` (grouped) or ``'standard'`` (softmax MHA).
        num_heads: heads of the attention module: differential heads ``h`` for ``'diff'``
            (q/k get ``2h`` sub-heads), signal heads ``Hs`` for ``'gda'``, heads for ``'standard'``.
        noise_heads: noise heads ``Hn`` for ``'gda'`` (``num_heads % noise_heads == 0``).
        lambda_init: constant λinit; ``None`` uses the paper's depth schedule 0.8 − 0.6·exp(−0.3·depth).
        attn_backend: kernel backend, one of ``diffvision.attention.BACKENDS``; see ``set_attn_backend``.
    """

    def __init__(
            self,
            attn_kind: str = 'diff',
            num_heads: int = 6,
            noise_heads: Optional[int] = None,
            lambda_init: Optional[float] = None,
            attn_backend: str = 'auto',
            **kwargs: Any,
    ) -> None:
        for arg in ('block_fn', 'attn_layer'):
            if arg in kwargs:
                raise ValueError(
                    f"DiffVisionTransformer builds its own blocks; choose the attention with "
                    f"attn_kind={sorted(ATTENTION_LAYERS)}, not {arg}={kwargs[arg]!r}")
        if attn_kind not in ATTENTION_LAYERS:
            raise ValueError(f"unknown attn_kind {attn_kind!r}{did_you_mean(attn_kind, ATTENTION_LAYERS)}; "
                             f"accepted: {sorted(ATTENTION_LAYERS)}")
        _check_backend(attn_backend)
        _attn_head_kwargs(attn_kind, num_heads, noise_heads)  # validate before building anything
        block_fn = partial(
            DiffBlock, attn_kind=attn_kind, noise_heads=noise_heads, lambda_init=lambda_init,
            attn_backend=attn_backend)
        # timm's init_weights() runs inside; it calls each attention's init_weights(), which
        # re-draws λ ~ N(0, 0.1) and resets the RMSNorm scale to 1 after the Linear inits
        super().__init__(num_heads=num_heads, block_fn=block_fn, attn_layer=None, **kwargs)
        self.attn_kind = attn_kind

    @property
    def attn_layout(self) -> Dict[str, Any]:
        """The attention's head layout, e.g. ``{'attn_kind': 'gda', 'signal_heads': 4, ...}``."""
        attn = self.blocks[0].attn if len(self.blocks) else None
        if attn is None or self.attn_kind == 'standard':
            return dict(attn_kind=self.attn_kind, num_heads=getattr(attn, 'num_heads', None),
                        head_dim=getattr(attn, 'head_dim', None))
        return dict(
            attn_kind=self.attn_kind, signal_heads=attn.signal_heads, noise_heads=attn.noise_heads,
            head_dim=attn.head_dim, value_head_dim=attn.value_head_dim, backend=attn.backend)

    def set_attn_backend(self, backend: str) -> None:
        """Switch the differential attention kernel (``'auto'``, ``'math'``, ``'sdpa'``, ``'triton'``)."""
        _check_backend(backend)
        for block in self.blocks:
            if hasattr(block.attn, 'backend'):
                block.attn.backend = backend

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

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_image(x)
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        self._check_image(x)
        return super().forward_intermediates(x, *args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's ViT set plus every λ vector and per-head RMSNorm scale.

        λ is a learned scalar per layer (re-parameterised by four vectors) and the RMSNorm scale is a
        normalisation gain: like timm's norms, biases and position embeddings they are not decayed.
        (timm's optimizer factory already skips 1-D parameters; naming them here also covers trainers
        that rely on this list alone.)
        """
        names = set(super().no_weight_decay())
        names.update(n for n, _ in self.named_parameters() if _DIFF_ONLY_KEY.match(n))
        return names


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attn_backend {backend!r}{did_you_mean(backend, BACKENDS)}; "
                         f"accepted: {list(BACKENDS)}")


# ------------------------------------------------------------------------------------------------
# Loading standard ViT checkpoints
# ------------------------------------------------------------------------------------------------

@dataclass
class StandardViTMapping:
    """What ``load_standard_vit_weights`` (or ``checkpoint_filter_fn``) did with a checkpoint."""
    copied: List[str] = field(default_factory=list)      # model keys copied verbatim
    resampled: List[str] = field(default_factory=list)   # model keys resized by timm (pos/patch embed)
    kept_init: List[str] = field(default_factory=list)   # model keys the checkpoint cannot supply
    dropped: List[str] = field(default_factory=list)     # checkpoint keys not loaded (e.g. another head)

    @property
    def mapped(self) -> List[str]:
        return self.copied + self.resampled

    def __str__(self) -> str:
        return (f"{len(self.copied)} tensors copied, {len(self.resampled)} resampled "
                f"({', '.join(self.resampled) or '-'}), {len(self.kept_init)} kept their init "
                f"({_summarise(self.kept_init)}), {len(self.dropped)} checkpoint tensors dropped "
                f"({', '.join(self.dropped) or '-'})")


def _summarise(keys: List[str]) -> str:
    """Collapse ``blocks.<i>.`` so the 60 λ keys of a 12-block model read as 5 names."""
    names = sorted({re.sub(r'^blocks\.\d+\.', 'blocks.*.', k) for k in keys})
    return ', '.join(names) or '-'


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def _num_blocks(state_dict: Mapping[str, Any]) -> int:
    return len({m.group(1) for k in state_dict for m in [re.match(r'^blocks\.(\d+)\.', k)] if m})


def _map_state_dict(state_dict: Mapping[str, Any], model: VisionTransformer):
    """Fit a timm ViT state dict (standard or diffvision) to ``model``; returns (state_dict, report).

    Keys load by name: a standard ViT's q/k/v/proj tensors have exactly the differential layout's
    shapes and order (see the module docstring and README). timm's own ViT filter converts foreign
    layouts and resamples position / patch embeddings first. Parameters only differential attention
    has (λ vectors, per-head RMSNorm) and a classifier of another size keep the model's init.
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
    for k in out:
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
    has another width, depth or block layout.
    """
    out, report = _map_state_dict(state_dict, model)
    _logger.info(f"checkpoint mapped onto {type(model).__name__}: {report}")
    return out


def load_standard_vit_weights(
        model: VisionTransformer,
        checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor], nn.Module],
) -> StandardViTMapping:
    """Initialise a DIFF/GDA-ViT from a standard timm ViT of the same width and depth.

    Args:
        model: a model from this module (e.g. ``timm.create_model('diff_vit_small_patch16_224')``).
        checkpoint: a state dict, a timm ViT module, or a file timm can read (``.pth``, ``.bin``,
            ``.safetensors``; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped).
            For original JAX ``.npz`` files, create the timm ViT from them first and pass it here.

    Patch/position embeddings (resampled by timm if the patch or image size differs), norms, MLPs
    and the q/k/v/proj tensors are copied; λ vectors and per-head RMSNorm scales keep their init;
    a classifier of another size is dropped. Returns the report of which keys did what.
    """
    if isinstance(checkpoint, nn.Module):
        state_dict = checkpoint.state_dict()
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
    out, report = _map_state_dict(state_dict, model)
    model.load_state_dict(out, strict=True)
    return report


# ------------------------------------------------------------------------------------------------
# Configs and entrypoints
# ------------------------------------------------------------------------------------------------

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cfg(description: str, **kwargs) -> Dict[str, Any]:
    """No released weights (``pretrained=True`` raises timm's "No pretrained weights" error).
    Preprocessing of the 224 models matches their timm twins, so mapped timm weights see theirs."""
    return {
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


def _diff(dim: int, h: int) -> str:
    d = dim // (2 * h)
    return (f"DIFF attention, {h} differential heads (q/k: {2 * h} sub-heads of {d}, "
            f"v: {h} heads of {2 * d}); untrained")


def _gda(dim: int, hs: int, hn: int) -> str:
    return (f"grouped differential attention {hs}:{hn} (q/k: {hs + hn} sub-heads of {dim // (hs + hn)}, "
            f"v: {hs} heads of {dim // hs}); untrained")


default_cfgs = generate_default_cfgs({
    'diff_vit_tiny_patch16_224': _cfg(_diff(192, 3), **_DIFF_PAPER),
    'diff_vit_small_patch16_224': _cfg(_diff(384, 3), **_DIFF_PAPER),
    'diff_vit_base_patch16_224': _cfg(_diff(768, 6), **_DIFF_PAPER),
    'diff_vit_tiny_patch4_32': _cfg_32(_diff(192, 3), **_DIFF_PAPER),
    'diff_vit_small_patch4_32': _cfg_32(_diff(384, 3), **_DIFF_PAPER),
    'gda_vit_tiny_patch16_224': _cfg(_gda(192, 2, 1)),
    'gda_vit_small_patch16_224': _cfg(_gda(384, 4, 2)),
    'gda_vit_base_patch16_224': _cfg(_gda(768, 8, 4)),
    'gda_vit_tiny_patch4_32': _cfg_32(_gda(192, 2, 1)),
    'gda_vit_small_patch4_32': _cfg_32(_gda(384, 4, 2)),
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


def _create_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm's own VisionTransformer (timm Attention): the standard twins of the 32x32 models."""
    return _build(VisionTransformer, vit_checkpoint_filter_fn, variant, pretrained, **kwargs)


@register_model
def diff_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-Ti/16: ViT-Ti/16 with 3 differential heads (q/k sub-heads of 32, v heads of 64). """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, attn_kind='diff', num_heads=3)
    return _create_diff_vit('diff_vit_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def diff_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-S/16: ViT-S/16 with 3 differential heads (q/k sub-heads of 64, v heads of 128). """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, attn_kind='diff', num_heads=3)
    return _create_diff_vit('diff_vit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def diff_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-B/16: ViT-B/16 with 6 differential heads (q/k sub-heads of 64, v heads of 128). """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, attn_kind='diff', num_heads=6)
    return _create_diff_vit('diff_vit_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def diff_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-Ti/4 for 32x32 inputs (64 patches + class token), 3 differential heads. """
    model_args = dict(patch_size=4, embed_dim=192, depth=12, attn_kind='diff', num_heads=3)
    return _create_diff_vit('diff_vit_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def diff_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ DIFF-ViT-S/4 for 32x32 inputs (64 patches + class token), 3 differential heads. """
    model_args = dict(patch_size=4, embed_dim=384, depth=12, attn_kind='diff', num_heads=3)
    return _create_diff_vit('diff_vit_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gda_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-Ti/16: ViT-Ti/16 with grouped differential attention, 2 signal : 1 noise head. """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, attn_kind='gda', num_heads=2, noise_heads=1)
    return _create_diff_vit('gda_vit_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gda_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-S/16: ViT-S/16 with grouped differential attention, 4 signal : 2 noise heads. """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, attn_kind='gda', num_heads=4, noise_heads=2)
    return _create_diff_vit('gda_vit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gda_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-B/16: ViT-B/16 with grouped differential attention, 8 signal : 4 noise heads. """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, attn_kind='gda', num_heads=8, noise_heads=4)
    return _create_diff_vit('gda_vit_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gda_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-Ti/4 for 32x32 inputs, 2 signal : 1 noise head. """
    model_args = dict(patch_size=4, embed_dim=192, depth=12, attn_kind='gda', num_heads=2, noise_heads=1)
    return _create_diff_vit('gda_vit_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def gda_vit_small_patch4_32(pretrained: bool = False, **kwargs) -> DiffVisionTransformer:
    """ GDA-ViT-S/4 for 32x32 inputs, 4 signal : 2 noise heads. """
    model_args = dict(patch_size=4, embed_dim=384, depth=12, attn_kind='gda', num_heads=4, noise_heads=2)
    return _create_diff_vit('gda_vit_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ ViT-Ti/4 for 32x32 inputs: the standard-attention twin of diff/gda_vit_tiny_patch4_32. """
    model_args = dict(patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create_vit('vit_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ ViT-S/4 for 32x32 inputs: the standard-attention twin of diff/gda_vit_small_patch4_32. """
    model_args = dict(patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create_vit('vit_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))
