"""DiT's variational-bound term for learned sigma: the DDPM math of the training objective.

As ``diffusion/gaussian_diffusion.py`` of DiT / improved DDPM (Nichol & Dhariwal, 2021), apart from the
training code: :class:`GaussianDiffusionTerms` holds the posterior q(x_{t-1} | x_t, x_0) of a β schedule
and gives ``L_vlb`` in bits/dim (:meth:`~GaussianDiffusionTerms.vb_terms_bpd`), built from
:func:`normal_kl` and :func:`discretized_gaussian_log_likelihood`. The noising itself and the samplers are
diffusers' schedulers (:mod:`diffvision.diffusion.sampling`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["GaussianDiffusionTerms", "discretized_gaussian_log_likelihood", "normal_kl"]


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

    def training_losses(self, model_output, x_start, x_t, noise, t, learn_sigma: bool) -> dict[str, torch.Tensor]:
        """DiT's loss of one noised batch, as batch means: ``mse`` of the predicted ε (the first
        ``x_start.shape[1]`` output channels), ``vb`` (``L_vlb`` of the variance channels on a *frozen* ε,
        so it only shapes the variance; 0 without ``learn_sigma``) and ``loss = mse + vb``."""
        c = x_start.shape[1]
        eps = model_output[:, :c]
        mse = (eps.float() - noise.float()).pow(2).mean(dim=list(range(1, x_start.ndim)))
        if learn_sigma:
            vb = self.vb_terms_bpd(x_start.float(), x_t.float(), t, eps.detach().float(), model_output[:, c:].float())
        else:
            vb = torch.zeros_like(mse)
        return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}
