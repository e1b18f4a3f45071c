"""End to end sampling check with a model whose answer is known: the exact ε-predictor of a tiny dataset.

For data made of a few fixed images, E[x0 | x_t, y] is a softmax-weighted mean of that class's images
(Gaussian likelihood of x_t = √ᾱ x0 + √(1−ᾱ) ε under the training schedule), so the ideal denoiser
needs no training. A correct sampler (training schedule → scheduler → pipeline → [0, 1] images) then
lands on the training images of the requested class. This catches what unit tests of each piece
miss: a timestep or ᾱ misalignment between training and sampling, a wrong guidance sign, a wrong
output scaling, or clipping that distorts good predictions.
"""
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffvision import DiffDiTPipeline, DiffDiTTransformer2DModel
from diffvision.diffusion import balanced_class_labels, build_sampler
from diffvision.lightning import DiffusionModule

SIZE, CHANNELS, PER_CLASS, CLASSES = 8, 3, 3, 2


class IdealDenoiser(DiffDiTTransformer2DModel):
    """E[ε | x_t, y] for data = ``images`` with ``labels``; the null class means all images."""

    def set_data(self, images: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        self.images, self.labels, self.alphas_cumprod = images.double(), labels, alphas_cumprod.double()

    def forward(self, hidden_states, timestep, class_labels, return_dict=True, **kwargs):
        x = hidden_states.double()
        a = self.alphas_cumprod[timestep.long()].view(-1, 1)  # integer timesteps (DDPM / DDIM / DPM)
        flat = x.flatten(1)
        data = self.images.flatten(1)
        # log N(x_t; √ᾱ x0_i, (1 − ᾱ) I) for every image i, masked to the requested class
        logp = -((flat[:, None] - a.sqrt()[:, :, None] * data[None]) ** 2).sum(-1) / (2 * (1 - a))
        allowed = (self.labels[None] == class_labels[:, None]) | (class_labels[:, None] == self.config.num_classes)
        weights = torch.softmax(logp.masked_fill(~allowed, float("-inf")), dim=1)
        x0 = weights @ data
        eps = (flat - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps.view_as(x).to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def dataset():
    g = torch.Generator().manual_seed(0)
    # smooth-ish images in [-0.9, 0.9], well apart in L2
    images = torch.tanh(2 * torch.randn(CLASSES * PER_CLASS, CHANNELS, SIZE, SIZE, generator=g)) * 0.9
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return images, labels


def ideal_pipeline(sampler: str) -> tuple[DiffDiTPipeline, torch.Tensor, torch.Tensor]:
    module = DiffusionModule(preset="DiT-S/2", attn_kind="standard", learn_sigma=False,
                             transformer_kwargs=dict(num_layers=1, num_attention_heads=2, attention_head_dim=8),
                             num_classes=CLASSES, img_size=SIZE, in_chans=CHANNELS, sampler=sampler,
                             fid_num_samples=0, num_sample_images=0)
    images, labels = dataset()
    model = IdealDenoiser(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=CHANNELS,
                          sample_size=SIZE, patch_size=2, num_classes=CLASSES, attn_kind="standard")
    model.set_data(images, labels, module.noise_scheduler.alphas_cumprod)
    pipe = DiffDiTPipeline(transformer=model, scheduler=module.sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, images, labels


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("ddpm", 200), ("dpmsolver", 20)])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_ideal_denoiser_samples_training_images_of_the_requested_class(sampler, steps, guidance):
    pipe, images, labels = ideal_pipeline(sampler)
    requested = [0, 1, 0, 1, 0, 1, 0, 1]
    samples = pipe(class_labels=requested, guidance_scale=guidance, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images.double()
    targets = (images / 2 + 0.5)  # the pipeline's [0, 1] output space
    dist = (samples[:, None] - targets[None]).abs().amax(dim=(2, 3, 4))  # (samples, images), max pixel error
    nearest = dist.argmin(dim=1)
    assert (labels[nearest] == torch.tensor(requested)).all(), "a sample landed in the wrong class"
    assert dist.min(dim=1).values.max() < 0.02, f"samples are not the training images: {dist.min(dim=1).values}"
    assert len(set(nearest.tolist())) > CLASSES, "all samples collapsed onto one image per class"


def test_the_ideal_denoiser_needs_the_training_schedule():
    """The same check fails when the sampler's schedule differs from the one the ε was computed for,
    i.e. the test above really depends on the schedule alignment."""
    pipe, images, labels = ideal_pipeline("ddim")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, beta_schedule="squaredcos_cap_v2")
    samples = pipe(class_labels=[0, 1, 0, 1], guidance_scale=1.0, num_inference_steps=50,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images.double()
    dist = (samples[:, None] - (images / 2 + 0.5)[None]).abs().amax(dim=(2, 3, 4))
    assert dist.min(dim=1).values.max() > 0.02


@pytest.mark.parametrize("sampler,steps", [("ddim", 25), ("ddpm", 50), ("dpmsolver", 10)])
def test_clip_denoised_keeps_samples_in_the_data_range(sampler, steps):
    """With x̂_0 pushed outside [-1, 1] (data at ±1.5), clip_denoised samples stay in range (each step's
    x̂_0 is clipped; the last step returns it), and without the clip they follow the data out of range."""
    pipe, images, labels = ideal_pipeline(sampler)
    pipe.transformer.set_data(images.sign() * 1.5, labels, pipe.transformer.alphas_cumprod)
    ends = {}
    for clip in (True, False):
        pipe.scheduler = build_sampler(sampler, pipe.scheduler.config, clip_denoised=clip)
        ends[clip] = pipe(class_labels=[0, 1], guidance_scale=1.0, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert ends[True].abs().max() <= 1.0 + 1e-5
    assert ends[False].abs().max() > 1.4


def test_build_sampler_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown sampler 'dim'.*did you mean 'ddim'.*accepted"):
        build_sampler("dim", DDPMScheduler().config)


def test_balanced_class_labels_stay_balanced_across_pieces():
    assert balanced_class_labels(3, 0, 7) == [0, 1, 2, 0, 1, 2, 0]
    pieces = [balanced_class_labels(10, start, min(25, start + 4)) for start in range(0, 25, 4)]  # batches
    assert sum(pieces, []) == balanced_class_labels(10, 0, 25)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        balanced_class_labels(0, 0, 4)


def test_clipped_ddim_is_adm_ddim():
    """DDIM with clip_denoised through the pipeline = DDIM as DDIM / ADM write it (η = 0): clip x̂_0, then
    re-derive ε from the clipped x̂_0, x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) ε; written out in float64.
    The model is an untrained DiT with random weights, whose x̂_0 leaves [-1, 1] at every step."""
    pipe, _, _ = ideal_pipeline("ddim")
    model = DiffDiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=CHANNELS,
                                      sample_size=SIZE, patch_size=2, num_classes=CLASSES, attn_kind="standard")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pipe = DiffDiTPipeline(transformer=model.eval(), scheduler=pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    got = pipe(class_labels=[0, 1], guidance_scale=1.0, num_inference_steps=10, latents=noise.clone(),
               output_type="latent").images
    ab = pipe.scheduler.alphas_cumprod.double()
    steps = pipe.scheduler.timesteps.tolist()
    x, y = noise.double(), torch.tensor([0, 1])
    clipped_somewhere = False
    with torch.no_grad():
        for i, t in enumerate(steps):
            a, a_prev = ab[t], (ab[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64))
            eps = model(x.float(), torch.tensor([t, t]), y).sample.double()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            clipped_somewhere |= bool(x0.abs().max() > 1.1)
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert clipped_somewhere
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)
