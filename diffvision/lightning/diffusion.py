"""``DiffusionModule``: class-conditional DIFF-DiT training in pixel space, DiT's recipe.

Training follows DiT (Peebles & Xie, 2023) / improved DDPM (Nichol & Dhariwal, 2021): a diffusers
``DDPMScheduler`` (1000 linear-β steps) noises the images, the transformer predicts the noise ε
(MSE loss) and, with learned sigma, the variance interpolation ``v`` trained by the variational
bound term ``L_vlb`` on a *frozen* ε (so it only shapes the variance), ``loss = L_mse + L_vlb``.
Labels are dropped to the null class with the model's ``class_dropout_prob`` (classifier-free
guidance). An EMA copy of the weights (:class:`~diffvision.diffusion.ModelEMA`) is kept in the
checkpoint, samples and FID use it, and :meth:`DiffusionModule.export_pipeline` saves it as a
``DiffDiTPipeline``.

The diffusion math (``L_vlb``, samplers, EMA) lives in :mod:`diffvision.diffusion`; FID during validation
is the callback :class:`~diffvision.lightning.fid.FIDDuringValidation`, which the module hands to the Trainer.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only

from ..attention import get_attn_kind
from ..diffusion import DiffDiTPipeline, DiffDiTTransformer2DModel, ModelEMA
from ..diffusion.gaussian_diffusion import GaussianDiffusionTerms
from ..diffusion.sampling import SAMPLERS, balanced_class_labels, build_sampler, sampler_class
from .fid import FIDDuringValidation, due_at_eval_epoch_end
from .loading import WeightsOnlyLoading
from .optim import build_lr_scheduler, default_adamw, param_groups, run_seed, shows_progress_bar, step_rng, step_seed

# GaussianDiffusionTerms, SAMPLERS, build_sampler: defined in diffvision.diffusion, re-exported from their old home
__all__ = ["DiffusionModule", "GaussianDiffusionTerms", "SAMPLERS", "build_sampler", "default_dit_adamw"]

log = logging.getLogger(__name__)


def default_dit_adamw(params) -> torch.optim.Optimizer:
    """DiT's optimizer: AdamW(lr=1e-4, weight_decay=0)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


# A module built in Python keeps its optimizer factory in hparams, so the default factories are pickled
# (by name) into every checkpoint; allowlisting these two plain functions lets such checkpoints load and
# resume with weights_only=True (default_adamw is allowlisted in .optim too). Nothing else is allowlisted.
torch.serialization.add_safe_globals([default_adamw, default_dit_adamw])


class DiffusionModule(WeightsOnlyLoading, pl.LightningModule):
    """Class-conditional diffusion training of a ``DiffDiTTransformer2DModel`` in pixel space.

    Args:
        preset: DiT size/patch, ``"DiT-S/2"``, ``"DiT-B/4"``, ... (``DIT_PRESETS``).
        attn_kind: ``"diff"``, ``"gda"``, ``"diffv2"`` or ``"standard"`` (``diffvision.attention.ATTN_KINDS``).
        transformer_kwargs: more / overriding transformer config (``num_layers``, ``num_attention_heads``,
            ``attention_head_dim``, ``patch_size``, ``qk_norm``, ``signal_heads``, ``lambda_init``,
            ``lambda_mode``, ``head_norm``, ``attn_backend``, ...).
        learn_sigma: DiT's learned variance (``out_channels = 2·in_channels``) trained by ``L_vlb``.
        class_dropout_prob: label dropout for classifier-free guidance (0: an unguidable model).
        num_classes, img_size, in_chans, class_names: linked from the data module by the CLI
            (``img_size`` is the transformer's ``sample_size``; images come in [-1, 1]).
        num_train_timesteps, beta_schedule: the training ``DDPMScheduler`` (ε prediction).
        optimizer: optimizer factory; default DiT's AdamW(lr=1e-4, weight_decay=0).
        lr_schedule, warmup_epochs, warmup_steps, min_lr_ratio: as in ``ImageClassifier``
            (default: constant LR, as DiT).
        ema_decay: EMA decay of the weights used for samples, FID and export (DiT: 0.9999).
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` at the n-th update (``ModelEMA``, diffusers'
            ``EMAModel`` rule): with 0.9999 alone, 5% of the EMA is still the zero-output initialisation
            after 30k steps. ``False``: ``ema_decay`` from the second update on.
        sampler: ``"ddim"``, ``"ddpm"`` (uses the learned variance) or ``"dpmsolver"``, built from the
            training scheduler's config; ``sample_steps`` steps.
        clip_denoised: clip each sampling step's predicted x̂_0 to [-1, 1] (``build_sampler``; DDPM / ADM's
            pixel-space default). Also set in exported pipelines' scheduler configs.
        num_sample_images: images in the grid logged every ``sample_every_n_epochs`` validation
            epochs (0: no grid), sampled from fixed noise with ``guidance_scale``.
        fid_num_samples: generated (and real held-out) images for FID at validation, every
            ``fid_every_n_epochs`` epochs (0: no FID); ``fid_guidance_scale`` for those samples, generated
            ``fid_batch_size`` at a time. The module hands these to the Trainer as a
            :class:`~diffvision.lightning.fid.FIDDuringValidation` (:meth:`configure_callbacks`; it replaces
            one given to the Trainer: set ``fid_num_samples: 0`` to use your own).
        fid_weights_path: Inception weights for ``diffvision.metrics.build_fid`` (default: found offline).
        compile: ``torch.compile`` the transformer in place (``compile_kwargs`` to ``torch.compile``).
        attention_type: the old name of ``attn_kind``, read from configs and checkpoints made before the rename.
    """

    ARCHITECTURE_HPARAMS = ("preset", "attn_kind", "transformer_kwargs", "learn_sigma", "num_classes", "img_size",
                            "in_chans")

    def __init__(
        self,
        preset: str = "DiT-S/2",
        attn_kind: str = "diff",
        transformer_kwargs: Optional[dict[str, Any]] = None,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        num_classes: int = 10,
        img_size: int = 32,
        in_chans: int = 3,
        class_names: Optional[Sequence[str]] = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        optimizer: OptimizerCallable = default_dit_adamw,
        lr_schedule: str = "constant",
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        sampler: str = "ddim",
        clip_denoised: bool = True,
        sample_steps: int = 50,
        guidance_scale: float = 4.0,
        num_sample_images: int = 16,
        sample_every_n_epochs: int = 1,
        fid_num_samples: int = 500,
        fid_every_n_epochs: int = 1,
        fid_guidance_scale: float = 1.5,
        fid_batch_size: int = 100,
        fid_weights_path: Optional[str] = None,
        compile: bool = False,
        compile_kwargs: Optional[dict[str, Any]] = None,
        attention_type: Optional[str] = None,
    ) -> None:
        super().__init__()
        if attention_type is not None:  # a config or checkpoint from before the rename
            if attn_kind not in ("diff", attention_type):
                raise ValueError(f"attn_kind={attn_kind!r} and its old name attention_type={attention_type!r} "
                                 f"disagree; keep attn_kind only")
            warnings.warn(f"attention_type is the old name of attn_kind; using attn_kind={attention_type!r}",
                          FutureWarning, stacklevel=2)
            attn_kind = attention_type
        get_attn_kind(attn_kind)
        sampler_class(sampler)  # an unknown name fails here, not at the first validation
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        counts = dict(sample_steps=1, sample_every_n_epochs=1, fid_every_n_epochs=1, fid_batch_size=1,
                      num_sample_images=0, fid_num_samples=0)  # name: smallest value (0 disables it)
        for name, smallest in counts.items():
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                accepted = "a positive int" if smallest else "an int >= 0 (0 disables it)"
                raise ValueError(f"{name} must be {accepted}, got {value!r}")
        if class_dropout_prob == 0 and max(guidance_scale, fid_guidance_scale) > 1:
            raise ValueError(
                f"guidance_scale={guidance_scale} / fid_guidance_scale={fid_guidance_scale} need the null "
                f"class, which class_dropout_prob=0 does not train; set class_dropout_prob > 0 or both <= 1")
        self.save_hyperparameters(ignore=["attention_type"])
        self.hparams["attn_kind"] = attn_kind  # the resolved kind, under today's name only
        config = dict(attn_kind=attn_kind, sample_size=img_size, in_channels=in_chans,
                      out_channels=2 * in_chans if learn_sigma else in_chans, num_classes=num_classes,
                      class_dropout_prob=class_dropout_prob)
        for key, name, value in (("sample_size", "img_size", img_size), ("in_channels", "in_chans", in_chans),
                                 ("num_classes", "num_classes", num_classes)):
            given = (transformer_kwargs or {}).get(key, value)
            if given != value:  # it would silently replace the (data-linked) argument
                raise ValueError(f"transformer_kwargs {key}={given!r} disagrees with {name}={value!r} (the data's, "
                                 f"when the CLI links it): drop {key} from transformer_kwargs")
        config.update(transformer_kwargs or {})
        self.transformer = DiffDiTTransformer2DModel.from_preset(preset, **config)
        self.learn_sigma = self.transformer.learn_sigma
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon",
            variance_type="learned_range" if self.learn_sigma else "fixed_small", clip_sample=False)
        self.diffusion = GaussianDiffusionTerms(self.noise_scheduler.betas)
        self.ema = ModelEMA(self.transformer, ema_decay, ema_warmup)
        if compile:
            self.transformer.compile(**(compile_kwargs or {}))
        self.optimizer_factory = optimizer
        self.class_names = list(class_names) if class_names is not None else None
        # one per module: its Inception network, held-out statistics and failure last from fit to test
        self.fid_callback = None if not fid_num_samples else FIDDuringValidation(
            fid_num_samples, every_n_epochs=fid_every_n_epochs, guidance_scale=fid_guidance_scale,
            batch_size=fid_batch_size, weights_path=fid_weights_path, num_classes=num_classes)

    def setup(self, stage: str) -> None:
        transform = getattr(getattr(self.trainer, "datamodule", None), "train_transform", None)
        if transform is not None and not getattr(transform, "minus_one_one", True):
            raise ValueError(
                f"DiffusionModule trains on images in [-1, 1], but the data module's augment preset is "
                f"{transform.preset!r} (mean/std normalisation); set data.augment: diffusion")

    # ---- training -------------------------------------------------------------------------------

    def diffusion_loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                       t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mse`` (ε), ``vb`` (learned sigma, frozen ε; 0 otherwise) and ``loss = mse + vb``, batch means
        (:meth:`GaussianDiffusionTerms.training_losses`) of ``model`` on ``x0`` noised to step ``t``."""
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        out = model(x_t, t, class_labels=labels).sample
        return self.diffusion.training_losses(out, x0, x_t, noise, t, self.learn_sigma)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        # noise, timesteps, label dropout and dropout draw from (seed, epoch, batch, rank): exact resumes
        with step_rng(step_seed(run_seed(), self.current_epoch, batch_idx, self.global_rank), self.device):
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            terms = self.diffusion_loss(self.transformer, x0, labels, noise, t)
        bs = x0.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=shows_progress_bar(self._trainer), on_step=True, on_epoch=True,
                 batch_size=bs)
        self.log("train/mse", terms["mse"], on_step=False, on_epoch=True, batch_size=bs)
        if self.learn_sigma:
            self.log("train/vb", terms["vb"], on_step=False, on_epoch=True, batch_size=bs)
        return terms["loss"]

    def on_train_start(self) -> None:
        self.ema.start_at_step(self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_after_step(self.transformer, self.global_step)

    def ema_decay_at(self, n: int) -> float:
        """The decay of the update after ``n`` earlier ones (``ema_warmup``: diffusers' ``EMAModel`` rule)."""
        return self.ema.decay_at(n)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.transformer))
        hp = self.hparams
        scheduler = build_lr_scheduler(optimizer, self.trainer, hp.warmup_epochs, hp.warmup_steps,
                                       hp.lr_schedule, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_callbacks(self) -> list[pl.Callback]:
        """FID during validation and test (``fid_*``), for the Trainer (unless it holds it from an earlier run)."""
        held = getattr(self._trainer, "callbacks", ())
        return [self.fid_callback] if self.fid_callback is not None and self.fid_callback not in held else []

    @property
    def ema_transformer(self) -> nn.Module:
        """The EMA weights as a ``DiffDiTTransformer2DModel`` (what samples, FID and exports use)."""
        return self.ema.module

    # ---- validation: held-out loss; samples at epoch end (FID: the FIDDuringValidation callback) -----

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        """Held-out loss of the online and EMA weights on fixed noise."""
        x0, labels = batch
        g = torch.Generator(device=x0.device).manual_seed(step_seed(run_seed(), batch_idx, 1000 + self.global_rank))
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g,
                          device=x0.device)
        bs = x0.shape[0]
        self.log(f"{stage}/loss", self.diffusion_loss(self.transformer, x0, labels, noise, t)["loss"],
                 sync_dist=True, prog_bar=stage == "val", batch_size=bs)
        self.log(f"{stage}/loss_ema", self.diffusion_loss(self.ema.module, x0, labels, noise, t)["loss"],
                 sync_dist=True, batch_size=bs)

    def _eval_epoch_end(self, stage: str) -> None:
        hp = self.hparams
        if hp.num_sample_images == 0 or not due_at_eval_epoch_end(self.trainer, stage, hp.sample_every_n_epochs):
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 draws
        try:
            self._log_sample_grid(log_dir)
        except Exception:  # noqa: BLE001 - samples are an extra: training goes on with its state intact
            log.exception("sample grid failed at epoch %d, step %d; training continues", self.current_epoch,
                          self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """One EMA sample per label of the batch (``diffvision predict``: a class-matched sample set),
        with ``fid_guidance_scale``; images in [0, 1]."""
        labels = batch[1] if isinstance(batch, (list, tuple)) else batch
        seed = step_seed(run_seed(), batch_idx, 3000 + self.global_rank)
        images = self.generate(labels.tolist(), self.hparams.fid_guidance_scale, seed=seed)
        return {"images": images, "labels": labels}

    # ---- sampling ----------------------------------------------------------------------------------

    @property
    def clip_denoised(self) -> bool:
        """``hparams.clip_denoised`` (checkpoints from before that setting sample with the clip)."""
        return bool(self.hparams.get("clip_denoised", True))

    def sampling_scheduler(self, name: Optional[str] = None, clip_denoised: Optional[bool] = None):
        """The sampler ``name`` (default ``hparams.sampler``) with the training noise schedule, clipping x̂_0
        as ``clip_denoised`` says (default ``self.clip_denoised``)."""
        return build_sampler(name or self.hparams.sampler, self.noise_scheduler.config,
                             self.clip_denoised if clip_denoised is None else clip_denoised)

    def pipeline(self, use_ema: bool = True, transformer: Optional[nn.Module] = None):
        """A ``DiffDiTPipeline`` on the EMA (or online) weights, or on ``transformer``, and the configured sampler."""
        transformer = transformer or (self.ema.module if use_ema else self.transformer)
        id2label = {i: name for i, name in enumerate(self.class_names)} if self.class_names else None
        pipe = DiffDiTPipeline(transformer=transformer, scheduler=self.sampling_scheduler(), id2label=id2label)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(self, class_labels: Sequence[int], guidance_scale: float, seed: int,
                 batch_size: Optional[int] = None, use_ema: bool = True) -> torch.Tensor:
        """Images in [0, 1], ``(N, C, H, W)``, for ``class_labels``, from noise seeded by ``seed``."""
        pipe = self.pipeline(use_ema)
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        g = torch.Generator(device=self.device).manual_seed(seed)
        batch_size = batch_size or len(class_labels)
        out = []
        try:
            for start in range(0, len(class_labels), batch_size):
                labels = list(class_labels[start:start + batch_size])
                out.append(pipe(class_labels=labels, guidance_scale=guidance_scale,
                                num_inference_steps=self.hparams.sample_steps, generator=g, output_type="pt").images)
        finally:
            pipe.transformer.train(was_training)
        return torch.cat(out)

    @rank_zero_only
    def _log_sample_grid(self, log_dir: Optional[str]) -> None:
        from torchvision.utils import make_grid, save_image

        n, k = self.hparams.num_sample_images, self.hparams.num_classes
        labels = balanced_class_labels(k, 0, n)
        images = self.generate(labels, self.hparams.guidance_scale, seed=run_seed())
        grid = make_grid(images.float().cpu(), nrow=min(k, n, 10), padding=2, pad_value=1.0)
        if log_dir:
            path = Path(log_dir) / "samples" / f"epoch={self.current_epoch:04d}-step={self.global_step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples", grid, self.global_step)

    # ---- export --------------------------------------------------------------------------------------

    def export_pipeline(self, save_directory: Union[str, Path], use_ema: bool = True,
                        safe_serialization: bool = True) -> Path:
        """Save a ``DiffDiTPipeline`` (EMA weights by default) with ``save_pretrained``; reload it with
        ``DiffDiTPipeline.from_pretrained(save_directory)``."""
        source = self.ema.module if use_ema else self.transformer
        pipe = self.pipeline(transformer=copy.deepcopy(source).to("cpu").eval())
        pipe.save_pretrained(str(save_directory), safe_serialization=safe_serialization)
        return Path(save_directory)
