"""``ImageClassifier``: any ``timm.create_model`` name, trained with Lightning."""
from __future__ import annotations

import difflib
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from ..attention import LAMBDA_OPTIONS, PAPER_OPTIONS
from .loading import WeightsOnlyLoading
from .mixup import build_mixup, mix_batch, soft_target_cross_entropy
from .optim import build_lr_scheduler, default_adamw, param_groups, run_seed, shows_progress_bar, step_rng, step_seed
from .optim import check_lr_milestones

__all__ = ["ImageClassifier", "LR_BASE_SCALES", "check_labels", "check_model_name", "check_patch_grid",
           "create_classifier"]

LR_BASE_SCALES = ("linear", "sqrt")

# ImageClassifier.on_before_batch_transfer (the label check) is meant to run beside any data module
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` "
                                          "but have passed in a `LightningDataModule`")


# Experiment-only timm models (ESPFormer's ViT, issue 17): registered on the first use of their prefix, never
# together with diffvision's own models
EXPERIMENT_MODELS = {"espformer_": "diffvision.experiments.espformer"}


def _register_diffvision_models(model_name: str = "") -> None:
    """Our timm models register on import of ``diffvision.models``; an experiment's when its name is asked for."""
    if importlib.util.find_spec("diffvision.models") is not None:
        importlib.import_module("diffvision.models")
    for prefix, module in EXPERIMENT_MODELS.items():
        if model_name.startswith(prefix):
            importlib.import_module(module)


def check_model_name(model_name: str) -> str:
    """``model_name`` if timm knows it (``name`` or ``name.pretrained_tag``); else a ``ValueError``
    suggesting the closest registered names. Hub / local names (``hf-hub:``, ``local-dir:``) pass
    through: timm resolves those itself."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a timm model name (str), got {model_name!r}")
    _register_diffvision_models(model_name)
    if ":" in model_name:
        return model_name
    arch, _, tag = model_name.partition(".")
    if timm.is_model(arch):
        if not tag:
            return model_name
        tagged = timm.list_pretrained(f"{arch}.*")
        if model_name in tagged:
            return model_name
        close = difflib.get_close_matches(model_name, tagged, n=5, cutoff=0.0)
        raise ValueError(f"unknown pretrained tag {tag!r} of {arch!r}; the closest of its tags: "
                         f"{', '.join(close) if close else 'it has none (no pretrained weights)'}")
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no registered name is close"
    raise ValueError(f"unknown model_name {model_name!r}: {hint} (timm.list_models() has {len(names)} names; "
                     f"diffvision's are timm.list_models('diff_*') and timm.list_models('gda_*'))")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Class indices must lie in ``[0, num_classes)``: out of range, cross-entropy gives a CUDA
    device assert (which kills the process's CUDA context) or, for -100, silently ignores the sample."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        return  # soft (probability) targets: nothing to check here
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        raise ValueError(f"class label(s) {values[:10]} out of range for num_classes={num_classes}: labels "
                         f"must be integers in [0, {num_classes - 1}] (check the dataset's labels and "
                         f"the model's num_classes)")


def create_classifier(model_name: str, num_classes: int, in_chans: int, img_size: Optional[int] = None,
                      pretrained: bool = False, **model_kwargs) -> torch.nn.Module:
    """``timm.create_model`` with the data's classes, channels and (for models that take it) size.

    Convolutional timm models have no ``img_size`` argument (any size works): for them it is left out.
    An unknown ``model_name`` raises a ``ValueError`` naming the closest registered models.
    """
    check_model_name(model_name)
    kwargs = dict(model_kwargs, num_classes=num_classes, in_chans=in_chans)
    if img_size is not None and "img_size" not in kwargs:
        try:
            model = timm.create_model(model_name, pretrained=pretrained, img_size=img_size, **kwargs)
            check_patch_grid(model, model_name)
            return model
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    check_patch_grid(model, model_name)
    return model


def check_patch_grid(model: torch.nn.Module, model_name: str) -> None:
    """A patch model's image size must be a multiple of its patch size: timm's patch embedding (a strided
    conv) would otherwise drop the last rows and columns of every image without a word. timm's
    ``dynamic_img_pad`` (with ``dynamic_img_size``, which resamples the position embedding to the padded
    grid; in ``model_kwargs``) zero-pads them instead, and is accepted."""
    embed = getattr(model, "patch_embed", None)
    patch, size = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)
    if patch is None or size is None:
        return
    pad = "model_kwargs {dynamic_img_size: true, dynamic_img_pad: true}"
    if getattr(embed, "dynamic_img_pad", False):
        if not getattr(model, "dynamic_img_size", True):
            raise ValueError(f"{model_name}: dynamic_img_pad needs dynamic_img_size too (the padded grid needs a "
                             f"resampled position embedding): {pad}")
        return
    for s, p in zip(size, patch):
        if s % p:
            raise ValueError(
                f"img_size {s} is not a multiple of {model_name}'s patch size {p}: the patch grid would drop the "
                f"last {s % p} px of every image; use an img_size divisible by {p} ({s - s % p} or "
                f"{s - s % p + p}), or {pad} to zero-pad the images")


def _linked_in_model_kwargs(model_kwargs: dict, **linked) -> dict:
    """``model_kwargs`` without ``num_classes`` / ``in_chans`` / ``img_size``, which are arguments of their
    own (linked from the data by the CLI): the same value is dropped, another one is an error."""
    kwargs = dict(model_kwargs)
    for name, value in linked.items():
        if name in kwargs:
            given = kwargs.pop(name)
            if value is not None and given != value:
                raise ValueError(f"model_kwargs {name}={given!r} disagrees with {name}={value!r} (the data's, "
                                 f"when the CLI links it): drop {name} from model_kwargs")
    return kwargs


def _schedule_spelled_out(model_kwargs: dict) -> dict:
    """``model_kwargs`` with ``lambda_init=None``, the old spelling of ``"schedule"``, spelled out: timm.create_model
    drops None keywords, which would mean the model's default."""
    if "lambda_init" in model_kwargs and model_kwargs["lambda_init"] is None:
        return {**model_kwargs, "lambda_init": "schedule"}
    return model_kwargs


class ImageClassifier(WeightsOnlyLoading, pl.LightningModule):
    """Image classifier around a timm model, with label-smoothed cross-entropy (or timm's Mixup / CutMix
    with soft-target cross-entropy) and top-1/top-5 accuracy.

    Args:
        model_name: any ``timm.create_model`` name: ``diff_vit_tiny_patch4_32``,
            ``gda_vit_tiny_patch4_32``, ``vit_tiny_patch4_32``, ``resnet18``, ...
        model_kwargs: more ``create_model`` keywords (``depth``, ``drop_path_rate``, ``patch_size``, ...).
        num_classes, img_size, in_chans: linked from the data module by the CLI.
        pretrained: load timm's pretrained weights (needs them cached or online).
        drop_path_rate: stochastic depth rate (timm ``train.py``'s ``--drop-path``); replaces
            ``model_kwargs``' ``drop_path_rate``, so an overlay or a flag sets it without restating
            ``model_kwargs`` (a config's dict is replaced whole, not merged); None: ``model_kwargs``'.
        label_smoothing: label smoothing of the training targets (with Mixup / CutMix, timm's ``Mixup``
            applies it to the mixed targets).
        mixup_alpha, cutmix_alpha, cutmix_minmax, mixup_prob, mixup_switch_prob, mixup_mode: timm's
            ``Mixup`` (``train.py``'s ``--mixup``, ``--cutmix``, ``--cutmix-minmax``, ``--mixup-prob``,
            ``--mixup-switch-prob``, ``--mixup-mode``); on when ``mixup_alpha`` or ``cutmix_alpha`` > 0 (or
            ``cutmix_minmax`` is set), the loss then timm's ``SoftTargetCrossEntropy``.
        optimizer: optimizer factory, ``class_path: torch.optim.AdamW`` + ``init_args`` in YAML;
            default AdamW(lr=1e-3, weight_decay=0.05). Parameter groups are timm's
            (:func:`~diffvision.lightning.optim.param_groups`): weight decay skips biases, norms, λ vectors
            and the model's ``no_weight_decay()`` names.
        layer_decay: timm's layer-wise LR decay for fine-tuning (each block's LR ``layer_decay`` times the
            next one's, the head's the optimizer's LR); None: one LR.
        lr_base, lr_base_size, lr_base_scale: timm's LR rule: when ``lr_base`` is set the LR is ``lr_base ×
            global batch / lr_base_size`` (``linear``) or its square root (``sqrt``), replacing the
            optimizer's ``lr``; the global batch is the data's ``batch_size`` × processes × gradient
            accumulation (DeiT: 5e-4 per 512 images).
        lr_schedule: ``cosine`` (default), ``linear`` or ``constant`` after warmup, stepped per
            optimizer step down to ``min_lr_ratio`` × the base LR at the end of training.
        lr_milestones, lr_gamma: the LR is multiplied by ``lr_gamma`` (default 0.1) from each epoch in
            ``lr_milestones`` on, over ``lr_schedule`` (``constant`` + ``[250]``: ``MultiStepLR`` at epoch 250).
        warmup_epochs, warmup_steps: linear warmup length (they add up).
        ema, ema_decay: keep an EMA of the weights, with this decay per optimizer step (timm ``train.py``'s
            ``--model-ema`` / ``--model-ema-decay``). It is the project's
            :class:`~diffvision.diffusion.ema.ModelEMA` (torch's ``AveragedModel``), ``DiffusionModule``'s
            too, rather than timm's ``ModelEmaV3`` or Lightning's ``EMAWeightAveraging`` callback: one EMA
            class and one set of names in the project, and a callback could not come from a recipe overlay
            (its ``trainer.callbacks`` list would replace the config's, not add to it).
        ema_warmup: the EMA's decay warm-up ``min(ema_decay, (1 + n) / (10 + n))`` (so a short run's EMA is
            not its initialisation).
        ema_eval: with an EMA, validation, test, prediction, export (and ``LambdaMonitor``) use the EMA
            weights; False: the trained weights (the EMA is still kept in checkpoints).
        compile: ``torch.compile`` the timm model in place (state-dict keys unchanged);
            ``compile_kwargs`` go to ``torch.compile``.
        class_names, mean, std: the data's class names and normalisation (linked from the data module
            by the CLI), written into exports as timm ``label_names`` and pretrained_cfg mean / std.
    """

    ARCHITECTURE_HPARAMS = ("model_name", "model_kwargs", "num_classes", "img_size", "in_chans")

    def __init__(
        self,
        model_name: str = "diff_vit_tiny_patch4_32",
        model_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 10,
        img_size: Optional[int] = None,
        in_chans: int = 3,
        pretrained: bool = False,
        drop_path_rate: Optional[float] = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Optional[tuple[float, float]] = None,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        optimizer: OptimizerCallable = default_adamw,
        layer_decay: Optional[float] = None,
        lr_base: Optional[float] = None,
        lr_base_size: int = 256,
        lr_base_scale: str = "linear",
        lr_schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        ema: bool = False,
        ema_decay: float = 0.9998,
        ema_warmup: bool = True,
        ema_eval: bool = True,
        compile: bool = False,
        compile_kwargs: Optional[dict[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        lr_milestones: Optional[list[int]] = None,
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if lr_base_scale not in LR_BASE_SCALES:
            raise ValueError(f"unknown lr_base_scale {lr_base_scale!r}; accepted: {list(LR_BASE_SCALES)}")
        if lr_base is not None and (lr_base <= 0 or lr_base_size < 1):
            raise ValueError(f"lr_base must be > 0 and lr_base_size >= 1, got {lr_base} and {lr_base_size}")
        # checked here, not at the first training step: a bad value is an error before anything runs
        self.mixup = build_mixup(num_classes, label_smoothing, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                 cutmix_minmax=cutmix_minmax, prob=mixup_prob, switch_prob=mixup_switch_prob,
                                 mode=mixup_mode)
        self.save_hyperparameters()
        self.model_kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            if not 0.0 <= drop_path_rate < 1.0:
                raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
            if self.model_kwargs.get("drop_path_rate", drop_path_rate) != drop_path_rate:
                rank_zero_info(f"drop_path_rate={drop_path_rate} replaces model_kwargs' "
                               f"{self.model_kwargs['drop_path_rate']}")
            self.model_kwargs["drop_path_rate"] = drop_path_rate
        self._given_model_kwargs = dict(self.model_kwargs)  # before the model's own choices are filled in
        # a size given only in model_kwargs is the model's size (the hparams keep img_size as given, so an
        # older checkpoint's hparams still compare equal); every (re)build uses this one
        self._img_size = img_size if img_size is not None else self.model_kwargs.get("img_size")
        self._build_model(self.model_kwargs, pretrained)
        check_lr_milestones(lr_milestones, lr_gamma)  # a bad milestone is an error before anything runs
        self.optimizer_factory = optimizer
        self.class_names = list(class_names) if class_names is not None else None
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self._checkpoint_steps = 0  # optimizer steps of the checkpoint these weights came from
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = num_classes >= 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def _build_model(self, model_kwargs: dict, pretrained: bool = False) -> None:
        hp = self.hparams
        model_kwargs = _schedule_spelled_out(model_kwargs)
        # num_classes / in_chans / img_size in model_kwargs: the same value is dropped, another is an error (a
        # rebuild by adopt_trained_options goes through the same checks); model_kwargs keeps them as given
        kwargs = _linked_in_model_kwargs(model_kwargs, num_classes=hp.num_classes, in_chans=hp.in_chans,
                                         img_size=self._img_size)
        self.model = create_classifier(hp.model_name, hp.num_classes, hp.in_chans, self._img_size, pretrained,
                                       **kwargs)
        # the λ / head-norm choices of a DIFF / GDA model go into the hparams explicitly, so the checkpoint
        # keeps them whatever the defaults become (on_load_checkpoint reads their absence as "old")
        options = getattr(self.model, "attn_options", None) or {}
        self.model_kwargs = {**model_kwargs, **options}
        self.hparams["model_kwargs"] = dict(self.model_kwargs)
        # the EMA copies the model before it is compiled (the copy is evaluated, never trained)
        self.ema = self._build_ema() if hp.get("ema") else None
        if hp.compile:
            self.model.compile(**(hp.compile_kwargs or {}))

    def _build_ema(self) -> torch.nn.Module:
        from ..diffusion.ema import ModelEMA  # imported when used: diffvision.diffusion loads diffusers

        return ModelEMA(self.model, self.hparams.ema_decay, self.hparams.ema_warmup)

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The weights validation, test, prediction and export use: the EMA's with ``ema_eval``, else the
        trained ones."""
        return self.ema.module if self.ema is not None and self.hparams.ema_eval else self.model

    def _with_ema_weights(self, checkpoint: dict) -> dict:
        """``checkpoint`` with EMA weights when this module keeps an EMA and the checkpoint has none (it was
        trained without one, or before classifiers had one): the EMA starts from its trained weights."""
        state = checkpoint.get("state_dict")
        if self.ema is None or not isinstance(state, dict) or any(k.startswith("ema.") for k in state):
            return checkpoint
        rank_zero_info("the checkpoint has no EMA of its weights: the EMA starts from its weights")
        ema = {f"ema.module.{k[len('model.'):]}": v for k, v in state.items() if k.startswith("model.")}
        ema["ema.n_averaged"] = self.ema.n_averaged.new_tensor(1)  # as after a first update (a copy)
        return {**checkpoint, "state_dict": {**state, **ema}}

    def trained_options(self, checkpoint: dict) -> Optional[dict]:
        """The λ / head-norm choices this DIFF / GDA classifier's ``checkpoint`` was trained with, when its hparams
        do not record all of them: it was saved when the paper's were the models' defaults (before issue 16),
        so the missing ones are ``PAPER_OPTIONS``. None when the checkpoint records them all, has no model
        keywords, or the model has no such choices (a standard model's checkpoint records none because there
        are none, not because it is old)."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("model_kwargs")
        if not getattr(self.model, "attn_options", None) or not isinstance(saved, dict) \
                or all(k in saved for k in LAMBDA_OPTIONS):
            return None
        return _schedule_spelled_out({k: saved.get(k, PAPER_OPTIONS[k]) for k in LAMBDA_OPTIONS})

    def adopt_trained_options(self, checkpoint: dict) -> None:
        """Rebuild the model with an older ``checkpoint``'s λ / head-norm choices (``trained_options``) before its
        weights load, so it computes what was trained; choices this module was given explicitly are kept (a
        conflict is then ``checkpoint_mismatch``'s to report)."""
        trained = self.trained_options(checkpoint)
        if trained is None or trained == self.model.attn_options:
            return
        given = _schedule_spelled_out({k: v for k, v in self._given_model_kwargs.items() if k in LAMBDA_OPTIONS})
        if any(given[k] != trained[k] for k in given):
            return
        rank_zero_info(f"the checkpoint predates the vision defaults (it records no λ / head-norm choice): the "
                       f"model is rebuilt with the paper's, which it was trained with ({trained})")
        device = next(self.model.parameters()).device
        self._build_model({**self.model_kwargs, **trained})
        self.model.to(device)

    def checkpoint_mismatch(self, checkpoint: dict) -> list[str]:
        """``WeightsOnlyLoading.checkpoint_mismatch``, after adopting an older checkpoint's λ / head-norm
        choices as loading it would, and reading its hparams with those choices filled in."""
        self.adopt_trained_options(checkpoint)
        trained = self.trained_options(checkpoint)
        if trained is not None:
            hparams = dict(checkpoint["hyper_parameters"])
            hparams["model_kwargs"] = {**hparams["model_kwargs"], **trained}
            checkpoint = {**checkpoint, "hyper_parameters": hparams}
        state = checkpoint.get("state_dict") or {}
        if self.ema is None and any(k.startswith("ema.") for k in state):
            # trained with an EMA (e.g. the deit recipe): say so, not "N weights not in the model"
            others = {k: v for k, v in state.items() if not k.startswith("ema.")}
            return ["the checkpoint keeps an EMA of its weights, this config does not: set model.init_args.ema "
                    "true (or stack the recipe it was trained with, e.g. configs/recipes/deit.yaml)",
                    *super().checkpoint_mismatch({**checkpoint, "state_dict": others})]
        return super().checkpoint_mismatch(self._with_ema_weights(checkpoint))

    def setup(self, stage: str) -> None:
        # the training normalisation travels with the model (hparams -> checkpoint -> export)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for name in ("mean", "std"):
            value = getattr(datamodule, name, None)
            if getattr(self, name) is None and value is not None:
                setattr(self, name, tuple(float(v) for v in value))
                self.hparams[name] = list(getattr(self, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the evaluated weights (``evaluated_model``); training steps call the trained model."""
        return self.evaluated_model(x)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.adopt_trained_options(checkpoint)  # an older checkpoint's λ / head-norm choices, before its weights load
        if self.ema is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"] = self._with_ema_weights(checkpoint)["state_dict"]  # loaded after this hook
        self._checkpoint_steps = int(checkpoint.get("global_step") or 0)

    @property
    def trained_steps(self) -> int:
        """Optimizer steps these weights were trained for here (this run, or the checkpoint they came from)."""
        return max(self.global_step, self._checkpoint_steps)

    def _description(self) -> str:
        """The export's ``pretrained_cfg`` description: the model's own, saying truthfully whether (and how
        long) these weights were trained; the registered ones say "untrained"."""
        own = (getattr(self.model, "pretrained_cfg", None) or {}).get("description") or self.hparams.model_name
        own = own.removesuffix("; untrained")
        if self.trained_steps:
            return f"{own}; trained for {self.trained_steps} steps with diffvision"
        return own if self.hparams.pretrained else f"{own}; untrained"

    # ---- steps ---------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # labels are checked while still on the CPU (free); on the GPU a bad label is a device assert
        if (isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)
                and batch[1].device.type == "cpu"):
            check_labels(batch[1], self.hparams.num_classes)
        return batch

    def _labels(self, y: torch.Tensor) -> torch.Tensor:
        if y.device.type == "cpu":  # a CPU run, or a step called outside a Trainer
            check_labels(y, self.hparams.num_classes)
        return y

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        y = self._labels(y)
        # Mixup / CutMix, dropout and drop-path draw from (seed, epoch, batch, rank) only: a resumed run repeats them
        with step_rng(step_seed(run_seed(), self.current_epoch, batch_idx, self.global_rank), self.device):
            if self.mixup is None:
                logits = self.model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
            else:
                x, y, soft = mix_batch(self.mixup, x, y)
                logits = self.model(x)
                loss = soft_target_cross_entropy(logits, soft)
        # update, not forward: only the epoch value is logged (on_train_epoch_end), so no per-batch value
        # (under Mixup / CutMix: agreement with each mixed image's first label)
        self.train_acc1.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=shows_progress_bar(self._trainer), on_step=True, on_epoch=True,
                 batch_size=len(y))
        return loss

    def on_train_start(self) -> None:
        if self.ema is not None:
            self.ema.start_at_step(self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_after_step(self.model, self.global_step)

    def on_train_epoch_end(self) -> None:
        # logged once per epoch, not from every training_step: each self.log of a Metric costs host time
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        y = self._labels(y)
        logits = self(x)
        loss = F.cross_entropy(logits, y)  # the plain cross-entropy (no smoothing) on held-out data
        acc1 = getattr(self, f"{stage}_acc1")
        acc1(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc1", acc1, prog_bar=stage == "val", batch_size=len(y))
        if self.top5:
            acc5 = getattr(self, f"{stage}_acc5")
            acc5(logits, y)
            self.log(f"{stage}/acc5", acc5, batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).softmax(dim=-1)
        out = {"probs": probs, "preds": probs.argmax(dim=-1)}
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            out["labels"] = batch[1]
        return out

    # ---- optimisation ------------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        no_wd = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        optimizer = self.optimizer_factory(param_groups(self.model, no_wd, hp.get("layer_decay")))
        lr = self._lr_from_batch() if hp.get("lr_base") is not None else None
        for group in optimizer.param_groups:  # before the scheduler records each group's starting LR
            group["lr"] = (lr if lr is not None else group["lr"]) * group.get("lr_scale", 1.0)
        scheduler = build_lr_scheduler(optimizer, self.trainer, hp.warmup_epochs, hp.warmup_steps,
                                       hp.lr_schedule, hp.min_lr_ratio, hp.lr_milestones, hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _lr_from_batch(self) -> float:
        """timm's ``lr_base`` rule: ``lr_base × (global batch / lr_base_size)``, linear or square root."""
        hp, trainer = self.hparams, self.trainer
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if batch_size is None:
            raise ValueError("lr_base scales the LR by the batch size, which comes from a data module with a "
                             "batch_size (ImageDataModule); set the optimizer's lr instead")
        global_batch = batch_size * trainer.world_size * trainer.accumulate_grad_batches
        ratio = global_batch / hp.lr_base_size
        lr = hp.lr_base * (math.sqrt(ratio) if hp.lr_base_scale == "sqrt" else ratio)
        rank_zero_info(f"lr = lr_base {hp.lr_base} x {hp.lr_base_scale}({global_batch} / {hp.lr_base_size}) = {lr:.4g}")
        return lr

    # ---- export ------------------------------------------------------------------------------------------

    def export(self, save_directory: Union[str, Path], mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, class_names: Optional[Sequence[str]] = None,
               safe_serialization: bool = True, use_ema: Optional[bool] = None) -> Path:
        """Save the timm model (``use_ema``: its EMA weights; default: those evaluated, ``evaluated_model``)
        with ``timm.models.save_for_hf``: reload it with
        ``timm.create_model("local-dir:<save_directory>", pretrained=True)``. ``mean``/``std`` (the
        training normalisation, default: the linked data's) go into its pretrained_cfg, so
        ``timm.data.resolve_data_config`` gives the right preprocessing; ``class_names`` become its
        ``label_names``."""
        from timm.models import save_for_hf

        save_directory = Path(save_directory)
        names = list(class_names) if class_names is not None else self.class_names
        model_config = {"label_names": names} if names else {}
        model_config["pretrained_cfg"] = {"description": self._description()}
        data_config = {"crop_pct": 1.0}
        mean = mean if mean is not None else self.mean
        std = std if std is not None else self.std
        if mean is not None:
            data_config["mean"] = tuple(float(m) for m in mean)
        if std is not None:
            data_config["std"] = tuple(float(s) for s in std)
        # model_args: the λ / head-norm choices, so a ``local-dir:`` reload builds what was trained
        if use_ema and self.ema is None:
            raise ValueError("use_ema=True, but this classifier keeps no EMA of its weights (ema is off)")
        model = self.evaluated_model if use_ema is None else (self.ema.module if use_ema else self.model)
        save_for_hf(model, save_directory, model_config=model_config, data_config=data_config,
                    model_args=getattr(self.model, "attn_options", None) or None,
                    safe_serialization=safe_serialization)
        return save_directory
