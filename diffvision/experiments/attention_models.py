"""The ViTs whose attention maps are compared, from ``diffvision fit`` checkpoints or timm names + weights.

A model is given as a Lightning checkpoint (``.ckpt``: rebuilt from its hyper-parameters, with its data
settings), or as a timm model name plus a state dict (``.pth``/``.pt``/``.safetensors``, or a ``.ckpt``)
and ``create_model`` keywords. Every file is read with ``diffvision.checkpoints.load_checkpoint_file``
(safetensors or ``torch.load(weights_only=True)``: never code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.nn as nn

from diffvision.checkpoints import load_checkpoint_file, model_state_dict

__all__ = ["LoadedModel", "check_model", "load_model", "read_checkpoint"]


@dataclass
class LoadedModel:
    label: str  # "standard" or "diff"
    model: nn.Module
    source: str
    model_name: str
    hparams: dict = field(default_factory=dict)
    data_hparams: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The attention kind (``standard``, ``diff``, ``gda``, ``diffv2``), from the attention modules
        themselves (timm's own ``Attention`` is ``standard``)."""
        return getattr(self.model.blocks[0].attn, "attn_kind", "standard")

    @property
    def num_prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def query(self) -> str:
        """The row measured: the class token's (``cls``), or the mean over patch queries without one."""
        return "cls" if self.has_class_token else "mean"

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.patch_embed.grid_size)


def read_checkpoint(spec: str) -> Optional[dict]:
    """A Lightning checkpoint's contents when ``spec`` is a ``.ckpt`` file, else None (a model name)."""
    path = Path(spec)
    if path.suffix != ".ckpt":
        return None
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint of an ImageClassifier (no hyper_parameters / "
                         f"state_dict); pass a timm model name with --*-weights for plain state dicts")
    if "model_name" not in checkpoint["hyper_parameters"]:
        raise ValueError(f"{path}: hyper_parameters have no model_name; is it an ImageClassifier checkpoint?")
    return checkpoint


def load_model(label: str, spec: str, data_info: dict, weights: Optional[str] = None,
               model_kwargs: Optional[dict] = None, checkpoint: Optional[dict] = None) -> LoadedModel:
    """Build and load one model, in eval mode. ``data_info``: num_classes, in_chans, img_size of the data."""
    from diffvision.lightning.classifier import create_classifier

    if checkpoint is not None:
        if weights is not None or model_kwargs:
            raise ValueError(f"{label}: {spec} is a checkpoint; --{label}-weights / --{label}-kwargs apply to model names")
        hp = checkpoint["hyper_parameters"]
        model = create_classifier(hp["model_name"], hp.get("num_classes", data_info["num_classes"]),
                                  hp.get("in_chans", data_info["in_chans"]), hp.get("img_size", data_info["img_size"]),
                                  **dict(hp.get("model_kwargs") or {}))
        model.load_state_dict(model_state_dict(checkpoint, source=spec))
        return LoadedModel(label, model.eval(), spec, hp["model_name"], dict(hp),
                           dict(checkpoint.get("datamodule_hyper_parameters") or {}))
    if weights is None:
        raise ValueError(f"{label}: {spec!r} is not a .ckpt file, so it is read as a timm model name and needs "
                         f"--{label}-weights PATH (a state dict) with the trained weights")
    kwargs = dict(model_kwargs or {})
    num_classes = kwargs.pop("num_classes", data_info["num_classes"])
    in_chans = kwargs.pop("in_chans", data_info["in_chans"])
    img_size = kwargs.pop("img_size", data_info["img_size"])
    try:
        model = create_classifier(spec, num_classes, in_chans, img_size, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"{label}: {spec!r} is neither a .ckpt file nor a timm model name") from err
        raise
    model.load_state_dict(model_state_dict(load_checkpoint_file(weights), source=weights))
    return LoadedModel(label, model.eval(), f"{spec} + {weights}", spec, {"model_kwargs": kwargs})


def check_model(m: LoadedModel, img_size: int, in_chans: int) -> None:
    """A ViT (blocks, patch_embed) that takes the data's images, or a ValueError saying what differs."""
    if not hasattr(m.model, "blocks") or not hasattr(m.model, "patch_embed"):
        raise ValueError(f"{m.label}: {m.model_name} is not a ViT (no blocks / patch_embed)")
    size = tuple(m.model.patch_embed.img_size)
    if size != (img_size, img_size) or m.model.patch_embed.proj.in_channels != in_chans:
        raise ValueError(f"{m.label}: {m.model_name} takes {m.model.patch_embed.proj.in_channels}x{size} images, "
                         f"the data has {in_chans}x{(img_size, img_size)}")
