"""``DiffusionModule``: class-conditional DIFF-DiT training in pixel space, DiT's recipe.

Training follows DiT (Peebles & Xie, 2023) / improved DDPM (Nichol & Dhariwal, 2021): a diffusers
``DDPMScheduler`` (1000 linear-β steps) noises the images, the transformer predicts the noise ε
(MSE loss) and, with learned sigma, the variance interpolation ``v`` trained by the variational
bound term ``L_vlb`` on a *frozen* ε (so it only shapes the variance), ``loss = L_mse + L_vlb``.
Labels are dropped to the null class with the model's ``class_dropout_prob`` (classifier-free
guidance). An EMA copy of the weights (``torch.optim.swa_utils.AveragedModel``) is kept in the
checkpoint, samples and FID use it, and :meth:`DiffusionModule.export_pipeline` saves it as a
``DiffDiTPipeline``.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..attention import get_attn_kind
from ..choices import check_choice
from .loading import WeightsOnlyLoading
from .optim import build_lr_scheduler, default_adamw, param_groups, run_seed, shows_progress_bar, step_rng, step_seed

__all__ = ["DiffusionModule", "GaussianDiffusionTerms", "SAMPLERS", "build_sampler", "default_dit_adamw"]

log = logging.getLogger(__name__)

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


def sampler_class(name: str):
    """``SAMPLERS[name]``, or a ValueError that names the accepted samplers."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)]


def build_sampler(name: str, train_config, clip_denoised: bool = True):
    """The sampler ``name`` (``SAMPLERS``) on a training ``DDPMScheduler``'s config.

    ``clip_denoised`` clips each step's predicted x̂_0 to the data range [-1, 1], as DDPM / ADM sample in
    pixel space: an ε-model's x̂_0 = (x_t − √(1−ᾱ)ε)/√ᾱ amplifies its errors by 1/√ᾱ at high noise, and
    without the clip a short-trained model's samples drift out of range and come out saturated. DDPM and
    DDIM have ``clip_sample``; DPM-Solver gets the same clip as thresholding with ``sample_max_value=1``
    (its dynamic threshold is then always 1).
    """
    cls = sampler_class(name)
    if cls is DPMSolverMultistepScheduler:
        return cls.from_config(train_config, thresholding=clip_denoised, sample_max_value=1.0)
    return cls.from_config(train_config, clip_sample=clip_denoised, clip_sample_range=1.0)


def default_dit_adamw(params) -> torch.optim.Optimizer:
    """DiT's optimizer: AdamW(lr=1e-4, weight_decay=0)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


# A module built in Python keeps its optimizer factory in hparams, so the default factories are pickled
# (by name) into every checkpoint; allowlisting these two plain functions lets such checkpoints load and
# resume with weights_only=True. Nothing else is allowlisted.
torch.serialization.add_safe_globals([default_adamw, default_dit_adamw])


# ---------------------------------------------------------------------------------------------
# DiT's variational-bound term for learned sigma (gaussian_diffusion.py of DiT / improved DDPM)
# ---------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data in [-1, 1] (bins of width 2/255) under N(means, e^(2·log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusionTerms(nn.Module):
    """The posterior q(x_{t-1} | x_t, x_0) of a DDPM β schedule and DiT's ``L_vlb`` in bits/dim.

    Tables are computed in float64 and kept in float32 (as DiT extracts them), as non-persistent
    buffers so they follow the module's device.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        super().__init__()
        b = betas.double()
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "log_betas": torch.log(b),
            "sqrt_recip_ac": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_ac": torch.sqrt(1.0 / ac - 1.0),
            "post_log_var_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "post_coef1": b * torch.sqrt(ac_prev) / (1.0 - ac),
            "post_coef2": (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return getattr(self, name)[t].view(-1, *([1] * (ndim - 1)))

    def q_posterior(self, x_start, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("post_coef1", t, x_t.ndim) * x_start + self._at("post_coef2", t, x_t.ndim) * x_t
        return mean, self._at("post_log_var_clipped", t, x_t.ndim)

    def p_mean_logvar(self, x_t, t, eps, var_values):
        """Model mean (from ε via x̂_0, not clipped) and learned-range log-variance
        ``frac·log β_t + (1 − frac)·log σ̃²_t`` with ``frac = (v + 1) / 2``."""
        frac = (var_values + 1.0) / 2.0
        min_log = self._at("post_log_var_clipped", t, x_t.ndim)
        log_var = frac * self._at("log_betas", t, x_t.ndim) + (1.0 - frac) * min_log
        x0_pred = self._at("sqrt_recip_ac", t, x_t.ndim) * x_t - self._at("sqrt_recipm1_ac", t, x_t.ndim) * eps
        mean, _ = self.q_posterior(x0_pred, x_t, t)
        return mean, log_var

    def vb_terms_bpd(self, x_start, x_t, t, eps, var_values):
        """Per-sample ``L_vlb`` in bits/dim: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var = self.p_mean_logvar(x_t, t, eps, var_values)
        dims = list(range(1, x_t.ndim))
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var).mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------

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
        ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` at the n-th update, as diffusers'
            ``EMAModel`` does by default, so that a short run's EMA is not dominated by the zero-output
            initialisation and the first, poor weights (with 0.9999, 5% of the EMA is still the
            initialisation after 30k steps). ``False``: ``ema_decay`` from the second update on.
        sampler: ``"ddim"``, ``"ddpm"`` (uses the learned variance) or ``"dpmsolver"``, built from the
            training scheduler's config; ``sample_steps`` steps.
        clip_denoised: clip each sampling step's predicted x̂_0 to [-1, 1] (``build_sampler``; DDPM / ADM's
            pixel-space default). Also set in exported pipelines' scheduler configs.
        num_sample_images: images in the grid logged every ``sample_every_n_epochs`` validation
            epochs (0: no grid), sampled from fixed noise with ``guidance_scale``.
        fid_num_samples: generated (and real held-out) images for FID at validation, every
            ``fid_every_n_epochs`` epochs (0: no FID); ``fid_guidance_scale`` for those samples.
        fid_weights_path: Inception weights for ``diffvision.metrics.build_fid`` (default: found offline).
        compile: ``torch.compile`` the transformer in place (``compile_kwargs`` to ``torch.compile``).
        attention_type: the old name of ``attn_kind``, read from configs and checkpoints made before the rename.
    """

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
        from diffvision.diffusion import DiffDiTTransformer2DModel

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
        for name in ("sample_steps", "sample_every_n_epochs", "fid_every_n_epochs", "fid_batch_size"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_sample_images", "fid_num_samples"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 disables it), got {value!r}")
        if class_dropout_prob == 0 and max(guidance_scale, fid_guidance_scale) > 1:
            raise ValueError(
                f"guidance_scale={guidance_scale} / fid_guidance_scale={fid_guidance_scale} need the null "
                f"class, which class_dropout_prob=0 does not train; set class_dropout_prob > 0 or both <= 1")
        self.save_hyperparameters(ignore=["attention_type"])
        self.hparams["attn_kind"] = attn_kind  # the resolved kind, under today's name only
        config = dict(attn_kind=attn_kind, sample_size=img_size, in_channels=in_chans,
                      out_channels=2 * in_chans if learn_sigma else in_chans, num_classes=num_classes,
                      class_dropout_prob=class_dropout_prob)
        config.update(transformer_kwargs or {})
        self.transformer = DiffDiTTransformer2DModel.from_preset(preset, **config)
        self.learn_sigma = self.transformer.learn_sigma
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon",
            variance_type="learned_range" if self.learn_sigma else "fixed_small", clip_sample=False)
        self.diffusion = GaussianDiffusionTerms(self.noise_scheduler.betas)
        self.ema = AveragedModel(self.transformer, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        if compile:
            self.transformer.compile(**(compile_kwargs or {}))
        self.optimizer_factory = optimizer
        self.class_names = list(class_names) if class_names is not None else None
        self._ema_step = -1
        self._ema_count: Optional[int] = None  # host copy of ema.n_averaged (read once per fit)
        self._fid = None
        self._fid_error: Optional[str] = None
        self._fid_real_seen = 0
        self._fid_real_stage: Optional[str] = None  # the split whose real statistics the FID metric holds

    def setup(self, stage: str) -> None:
        transform = getattr(getattr(self.trainer, "datamodule", None), "train_transform", None)
        if transform is not None and not getattr(transform, "minus_one_one", True):
            raise ValueError(
                f"DiffusionModule trains on images in [-1, 1], but the data module's augment preset is "
                f"{transform.preset!r} (mean/std normalisation); set data.augment: diffusion")

    # ---- training -------------------------------------------------------------------------------

    def diffusion_loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                       t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mse`` (ε), ``vb`` (learned sigma, frozen ε; 0 otherwise) and ``loss = mse + vb``, batch means."""
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        out = model(x_t, t, class_labels=labels).sample
        c = x0.shape[1]
        eps = out[:, :c]
        mse = (eps.float() - noise.float()).pow(2).mean(dim=list(range(1, x0.ndim)))
        if self.learn_sigma:
            vb = self.diffusion.vb_terms_bpd(x0.float(), x_t.float(), t, eps.detach().float(), out[:, c:].float())
        else:
            vb = torch.zeros_like(mse)
        return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}

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
        self._ema_step = self.global_step
        self._ema_count = None  # a checkpoint may have been restored: read n_averaged again

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step > self._ema_step:  # once per optimizer step (gradient accumulation aware)
            self.update_ema()
            self._ema_step = self.global_step

    def ema_decay_at(self, n: int) -> float:
        """The decay of the update after ``n`` earlier ones (``ema_warmup``: diffusers' ``EMAModel`` rule)."""
        decay = float(self.hparams.ema_decay)
        return min(decay, (1 + n) / (10 + n)) if self.hparams.get("ema_warmup", True) else decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """``self.ema.update_parameters(self.transformer)`` with the same arithmetic (the first update
        copies the weights, later ones apply ``get_ema_multi_avg_fn(decay)`` per device and dtype group, the
        decay from ``ema_decay_at``), minus its two device synchronisations per call: ``AveragedModel``
        tests its on-device counter ``n_averaged`` on the host; here a host copy of it is kept (read once
        per fit)."""
        if self._ema_count is None:
            self._ema_count = int(self.ema.n_averaged)
        ema = [t.detach() for t in itertools.chain(self.ema.module.parameters(), self.ema.module.buffers())]
        model = [t.detach() for t in itertools.chain(self.transformer.parameters(), self.transformer.buffers())]
        if self._ema_count == 0:
            for e, m in zip(ema, model):
                e.copy_(m)
        else:
            average = get_ema_multi_avg_fn(self.ema_decay_at(self._ema_count))
            for (_, _), ([ema_group, model_group], _) in _group_tensors_by_device_and_dtype([ema, model]).items():
                average(ema_group, model_group, self.ema.n_averaged)
        self.ema.n_averaged += 1
        self._ema_count += 1

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.transformer))
        hp = self.hparams
        scheduler = build_lr_scheduler(optimizer, self.trainer, hp.warmup_epochs, hp.warmup_steps,
                                       hp.lr_schedule, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @property
    def ema_transformer(self) -> nn.Module:
        """The EMA weights as a ``DiffDiTTransformer2DModel`` (what samples, FID and exports use)."""
        return self.ema.module

    # ---- validation: held-out loss, FID reals; samples + FID at epoch end -------------------------

    def _fid_due(self, stage: str) -> bool:
        hp = self.hparams
        if hp.fid_num_samples == 0 or self._fid_error is not None or self.trainer.sanity_checking:
            return False
        return stage == "test" or self.trainer.state.fn != "fit" or (
            (self.current_epoch + 1) % hp.fid_every_n_epochs == 0)

    def _samples_due(self, stage: str) -> bool:
        hp = self.hparams
        if hp.num_sample_images == 0 or self.trainer.sanity_checking:
            return False
        return stage == "test" or self.trainer.state.fn != "fit" or (
            (self.current_epoch + 1) % hp.sample_every_n_epochs == 0)

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        """Held-out loss of the online and EMA weights on fixed noise; real images for FID."""
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
        if self._fid_due(stage) and self._fid_real_stage != stage:
            self._fid_update_real(x0)

    def _eval_epoch_start(self, stage: str) -> None:
        if self._fid_real_stage != stage:  # real statistics are gathered once per held-out split
            self._fid_real_seen = 0
            if self._fid is not None:
                self._fid.reset_real_features = True
                self._fid.reset()
                self._fid.reset_real_features = False

    def _eval_epoch_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        if self._samples_due(stage):
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 draws
            self._guarded("sample grid", lambda: self._log_sample_grid(log_dir))
        if self._fid_due(stage):
            if self._fid_real_seen > 0:
                self._fid_real_stage = stage
            self._guarded("FID", lambda: self._compute_fid(stage))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

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

    def _guarded(self, what: str, fn) -> None:
        """Samples and FID are extras: a failure is logged and training goes on with its state intact."""
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any failure here must not end the run
            log.exception("%s failed at epoch %d, step %d; training continues", what, self.current_epoch,
                          self.global_step)
            if what == "FID":
                self._fid_error = f"{type(err).__name__}: {err}"
                log.error("FID disabled for the rest of this run: %s", self._fid_error)

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

    def pipeline(self, use_ema: bool = True):
        """A ``DiffDiTPipeline`` on the EMA (or online) weights and the configured sampler."""
        from diffvision.diffusion import DiffDiTPipeline

        transformer = self.ema.module if use_ema else self.transformer
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
        labels = [i % k for i in range(n)]
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

    # ---- FID -----------------------------------------------------------------------------------------

    def _fid_metric(self):
        if self._fid is None:
            from diffvision.metrics import build_fid

            # kept out of the module tree (object.__setattr__): no Inception weights in checkpoints
            object.__setattr__(self, "_fid", build_fid(weights_path=self.hparams.fid_weights_path,
                                                       reset_real_features=False))
        return self._fid.to(self.device)

    def _fid_per_rank(self) -> int:
        return math.ceil(self.hparams.fid_num_samples / self.trainer.world_size)

    @staticmethod
    def _to_fid_images(images01: torch.Tensor) -> torch.Tensor:
        images01 = images01.float().clamp(0, 1)
        return images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01

    def _fid_update_real(self, x0: torch.Tensor) -> None:
        need = self._fid_per_rank() - self._fid_real_seen
        if need <= 0:
            return
        try:
            real = self._to_fid_images((x0[:need] + 1.0) / 2.0)
            self._fid_metric().update(real, real=True)
            self._fid_real_seen += real.shape[0]
        except Exception as err:  # noqa: BLE001
            log.exception("FID (real images) failed; FID disabled for this run, training continues")
            self._fid_error = f"{type(err).__name__}: {err}"

    def _compute_fid(self, stage: str = "val") -> None:
        hp = self.hparams
        per_rank = self._fid_per_rank()
        first = self.global_rank * per_rank
        labels = [(first + i) % hp.num_classes for i in range(per_rank)]
        fid = self._fid_metric()
        images = self.generate(labels, hp.fid_guidance_scale, seed=step_seed(run_seed(), 0, 2000 + self.global_rank),
                               batch_size=hp.fid_batch_size)
        for start in range(0, images.shape[0], hp.fid_batch_size):
            fid.update(self._to_fid_images(images[start:start + hp.fid_batch_size]), real=False)
        value = fid.compute()
        fid.reset()  # fakes only: reset_real_features=False keeps the held-out statistics
        self.log(f"{stage}/fid", value.float(), prog_bar=True, sync_dist=False)

    # ---- export --------------------------------------------------------------------------------------

    def export_pipeline(self, save_directory: Union[str, Path], use_ema: bool = True,
                        safe_serialization: bool = True) -> Path:
        """Save a ``DiffDiTPipeline`` (EMA weights by default) with ``save_pretrained``; reload it with
        ``DiffDiTPipeline.from_pretrained(save_directory)``."""
        from diffvision.diffusion import DiffDiTPipeline

        source = self.ema.module if use_ema else self.transformer
        transformer = copy.deepcopy(source).to("cpu").eval()
        id2label = {i: name for i, name in enumerate(self.class_names)} if self.class_names else None
        pipe = DiffDiTPipeline(transformer=transformer, scheduler=self.sampling_scheduler(), id2label=id2label)
        pipe.save_pretrained(str(save_directory), safe_serialization=safe_serialization)
        return Path(save_directory)
