"""torchmetrics' ``FrechetInceptionDistance`` with the Fréchet distance computed through symmetric
eigendecompositions, the held-out side's done once.

The distance needs ``tr √(Σ_r Σ_f)``. torchmetrics takes the eigenvalues of the non-symmetric 2048×2048
product ``Σ_r Σ_f`` (``torch.linalg.eigvals``, float64), whatever the number of images: on a CPU that
dominated an FID of a few samples. ``Σ_r Σ_f`` is similar to the symmetric PSD ``Σ_r^½ Σ_f Σ_r^½``, which
has the same eigenvalues and takes ``eigvalsh``; ``Σ_r^½`` (one ``eigh``) is kept while the held-out
statistics are (``reset_real_features=False``), so each later FID costs one ``eigvalsh``. Same value up to
rounding (tests/test_fid.py compares it with scipy's ``sqrtm``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance as _TorchmetricsFID

__all__ = ["FrechetInceptionDistance", "frechet_distance", "psd_sqrt"]


def psd_sqrt(sigma: Tensor) -> Tensor:
    """The symmetric square root of a covariance (eigenvalues below 0, rounding errors, clamped to 0)."""
    values, vectors = torch.linalg.eigh(sigma)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.mT


def frechet_distance(mu_r: Tensor, sigma_r: Tensor, mu_f: Tensor, sigma_f: Tensor,
                     sqrt_sigma_r: Optional[Tensor] = None) -> Tensor:
    """``‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2 tr √(Σ_r^½ Σ_f Σ_r^½)``; ``sqrt_sigma_r``: ``psd_sqrt(sigma_r)``."""
    root = psd_sqrt(sigma_r) if sqrt_sigma_r is None else sqrt_sigma_r
    trace_sqrt = torch.linalg.eigvalsh(root @ sigma_f @ root).clamp(min=0).sqrt().sum()
    return (mu_r - mu_f).square().sum() + sigma_r.trace() + sigma_f.trace() - 2 * trace_sqrt


class FrechetInceptionDistance(_TorchmetricsFID):
    """torchmetrics' FID (same features, states and syncing) whose ``compute`` is :func:`frechet_distance`,
    with ``Σ_r^½`` kept until the held-out statistics change."""

    _sqrt_sigma_real: Optional[Tensor] = None

    def update(self, imgs: Tensor, real: bool) -> None:
        if real:
            self._sqrt_sigma_real = None
        super().update(imgs, real)

    def reset(self) -> None:
        if self.reset_real_features:
            self._sqrt_sigma_real = None
        super().reset()

    def compute(self) -> Tensor:
        n_r, n_f = self.real_features_num_samples, self.fake_features_num_samples
        if n_r < 2 or n_f < 2:
            raise RuntimeError("More than one sample is required for both the real and fake distributed to compute FID")
        mu_r, mu_f = self.real_features_sum / n_r, self.fake_features_sum / n_f
        sigma_r = (self.real_features_cov_sum - n_r * torch.outer(mu_r, mu_r)) / (n_r - 1)
        sigma_f = (self.fake_features_cov_sum - n_f * torch.outer(mu_f, mu_f)) / (n_f - 1)
        if self._sqrt_sigma_real is None or self._sqrt_sigma_real.device != sigma_r.device:
            self._sqrt_sigma_real = psd_sqrt(sigma_r)
        return frechet_distance(mu_r, sigma_r, mu_f, sigma_f, self._sqrt_sigma_real).to(self.orig_dtype)
