"""Class-conditional sampling with a DiffDiTTransformer2DModel, in pixel space or an AutoencoderKL's latents.

Like diffusers' ``DiTPipeline``, plus what it leaves out: the null class is the model's own
``num_classes``, the VAE is optional, any scheduler works (``init_noise_sigma``, ``scale_model_input``,
float timesteps, the seeded ``generator`` reaches stochastic ``step``\\ s) and learned variance reaches
schedulers that use it.

Imports are absolute so this file also loads through diffusers' ``custom_pipeline=`` mechanism.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor

from diffvision.diffusion.transformer_diff_dit import DiffDiTTransformer2DModel

__all__ = ["DiffDiTPipeline"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Schedulers whose step() consumes the variance channels of a learned-sigma model. Others get the
# noise prediction only (DPMSolver's learned-variance path slices 3 channels, wrong for latents).
_LEARNED_VARIANCE_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel

        >>> transformer = DiffDiTTransformer2DModel.from_preset(
        ...     "DiT-S/2", attn_kind="diff", sample_size=32, in_channels=3, num_classes=10)
        >>> pipe = DiffDiTPipeline(transformer=transformer, scheduler=DDIMScheduler())
        >>> images = pipe(class_labels=[0, 1], num_inference_steps=25,
        ...               generator=torch.manual_seed(0)).images
        ```
"""


class DiffDiTPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with a (differential-attention) DiT.

    Parameters:
        transformer ([`DiffDiTTransformer2DModel`]): The class-conditional denoiser (predicts noise,
            optionally followed by DiT's learned-variance channels).
        scheduler ([`SchedulerMixin`]): Any diffusers noise scheduler (DDPM, DDIM, DPM-Solver, Euler, ...).
        vae ([`AutoencoderKL`], *optional*): Decodes latents to images. Without it the transformer works in
            pixel space, with samples in ``[-1, 1]``.
        id2label (`dict[int, str]`, *optional*): Class names, comma-separated synonyms per id (as
            ImageNet's); stored in ``model_index.json``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: DiffDiTTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[dict] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = {int(k): v for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = key
        self.labels = dict(sorted(self.labels.items()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; without ``accelerate`` installed, ``low_cpu_mem_usage`` defaults to
        False (what diffusers falls back to anyway) instead of a warning about it at every load."""
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list[int]:
        """Map label names (see ``self.labels``) to class ids."""
        labels = [label] if isinstance(label, str) else list(label)
        missing = [name for name in labels if name not in self.labels]
        if missing:
            known = list(self.labels)[:20]
            raise ValueError(f"unknown label(s) {missing}; the pipeline knows {len(self.labels)} labels "
                             f"(pipe.labels), e.g. {known}" if self.labels else
                             f"unknown label(s) {missing}: this pipeline has no id2label")
        return [self.labels[name] for name in labels]

    # ---- input handling ------------------------------------------------------------------------

    def _class_label_tensor(self, class_labels) -> torch.Tensor:
        num_classes = self.transformer.config.num_classes
        has_null = self.transformer.has_null_class
        if isinstance(class_labels, (int, np.integer, str)):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dim() > 1:
                raise ValueError(f"class_labels tensor must be 1-D integer, got dtype {class_labels.dtype}, "
                                 f"shape {tuple(class_labels.shape)}")
            class_labels = class_labels.reshape(-1).tolist()
        class_labels = list(class_labels)
        if not class_labels:
            raise ValueError("class_labels is empty; pass at least one class id")
        if all(isinstance(c, str) for c in class_labels):
            class_labels = self.get_label_ids(class_labels)
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in class_labels):
            raise ValueError(f"class_labels must be ints (or label names), got {class_labels!r}")
        high = num_classes + (1 if has_null else 0)
        bad = [int(c) for c in class_labels if not 0 <= c < high]
        if bad:
            allowed = (f"[0, {num_classes - 1}] (or {num_classes}, the null class, for unconditional samples)"
                       if has_null else f"[0, {num_classes - 1}]")
            raise ValueError(f"class_labels {bad} out of range; this model has num_classes={num_classes}, "
                             f"accepted: {allowed}")
        return torch.tensor([int(c) for c in class_labels], dtype=torch.long, device=self._execution_device)

    def _check_call(self, guidance_scale: float, num_inference_steps: int, output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; accepted: {OUTPUT_TYPES}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if guidance_scale > 1 and not self.transformer.has_null_class:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs the null class, but this transformer was built with "
                f"class_dropout_prob=0 (no null-class embedding); use guidance_scale <= 1")
        if self.vae is not None and self.vae.config.latent_channels != self.transformer.config.in_channels:
            raise ValueError(
                f"vae.config.latent_channels={self.vae.config.latent_channels} differs from "
                f"transformer.config.in_channels={self.transformer.config.in_channels}")
        tconf = self.transformer.config
        if self.transformer.out_channels not in (tconf.in_channels, 2 * tconf.in_channels):
            raise ValueError(
                f"transformer out_channels={self.transformer.out_channels} must be in_channels={tconf.in_channels} "
                f"(noise prediction) or 2*in_channels (noise + learned variance) for sampling")
        if self._scheduler_uses_variance() and not self.transformer.learn_sigma:
            raise ValueError(
                f"scheduler variance_type={self.scheduler.config.variance_type!r} needs a learned-sigma "
                f"transformer (out_channels = 2*in_channels), got out_channels={self.transformer.out_channels}")

    def _scheduler_uses_variance(self) -> bool:
        return (type(self.scheduler).__name__ in _LEARNED_VARIANCE_SCHEDULERS
                and getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range"))

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = eta
        config = self.scheduler.config
        if "use_clipped_model_output" in accepted and (config.get("clip_sample") or config.get("thresholding")):
            # DDIM with a clipped x̂_0 also re-derives ε from it, as DDIM / ADM's ddim_sample do; diffusers'
            # default keeps the model's ε, so x̂_0 and ε disagree and the clip's error enters every step
            kwargs["use_clipped_model_output"] = True
        return kwargs

    # ---- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, str, Sequence[int], Sequence[str], torch.Tensor],
        guidance_scale: float = 4.0,
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Generate one image per class label.

        Args:
            class_labels: class ids in ``[0, num_classes)`` (or label names if ``id2label`` was given);
                ``num_classes`` itself, the null class, gives unconditional samples.
            guidance_scale: classifier-free guidance weight ``w`` in ``eps_u + w (eps_c - eps_u)``; on when > 1.
            num_inference_steps: denoising steps.
            generator: ``torch.Generator`` (or one per image) for the initial noise and stochastic steps.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, C)`` in [0, 1]), ``"pt"`` (``(B, C, H, W)`` in
                [0, 1]) or ``"latent"`` (the final latents/pixels in model space, undecoded).
            return_dict: return an ``ImagePipelineOutput`` (else a 1-tuple).
            latents: optional initial noise ``(B, in_channels, sample_size, sample_size)``, unscaled.
            eta: DDIM's eta, passed to schedulers whose ``step`` takes it.

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)``.
        """
        self._check_call(guidance_scale, num_inference_steps, output_type)
        labels = self._class_label_tensor(class_labels)
        device = self._execution_device
        batch = labels.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} class labels; pass one or {batch}")
        tconf = self.transformer.config
        channels, size = tconf.in_channels, tconf.sample_size
        shape = (batch, channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=self.transformer.dtype)

        do_cfg = guidance_scale > 1
        if do_cfg:  # conditional half first, null-class half second
            null = torch.full_like(labels, tconf.num_classes)
            labels = torch.cat([labels, null])
        pass_variance = self._scheduler_uses_variance()
        step_kwargs = self._step_kwargs(generator, eta)

        # The scheduler's timesteps stay on the host, as in diffusers' DiTPipeline: step() and
        # scale_model_input() index their tables with t and compare it (DDIM's prev_timestep >= 0, Euler's
        # step-index lookup), a device synchronisation per step were t on the GPU. The model gets them from
        # one copy to the device made before the loop (float for Euler, int otherwise), not one per step.
        self.scheduler.set_timesteps(num_inference_steps)
        model_timesteps = self.scheduler.timesteps.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = model_timesteps[i].expand(model_input.shape[0])  # (batch,), embedded directly
            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
            eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
            if do_cfg:
                cond_eps, uncond_eps = eps.chunk(2)
                eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                rest = rest.chunk(2)[0]  # the variance of the conditional half, as DiT does
            model_output = torch.cat([eps, rest], dim=1) if pass_variance else eps
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                vconf = self.vae.config
                latents = latents / vconf.scaling_factor
                if getattr(vconf, "shift_factor", None) is not None:
                    latents = latents + vconf.shift_factor
                samples = self.vae.decode(latents.to(self.vae.dtype)).sample
            else:
                samples = latents
            images = (samples / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


DiffDiTPipeline.__call__.__doc__ += EXAMPLE_DOC_STRING
