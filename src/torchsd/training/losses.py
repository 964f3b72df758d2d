"""Training objectives: the denoising loss (Ho et al. 2020) with min-SNR-gamma weighting
(Hang et al. 2023), the KL autoencoder loss, and CLIP's symmetric InfoNCE (Radford et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import PredictionType


def per_sample_generators(seed: int, step: int, indices: list[int]) -> list[torch.Generator]:
    """Randomness of sample ``index`` at ``step``: independent of batch layout, ranks and resumption."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 2_147_483_647 + index) for index in indices]


def draw(generators: list[torch.Generator], shape: tuple[int, ...], kind: str = "randn") -> torch.Tensor:
    fn = torch.randn if kind == "randn" else torch.rand
    return torch.stack([fn(shape, generator=g) for g in generators])


def denoising_loss(unet, z0: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generators: list[torch.Generator], prediction_type: PredictionType,
                   min_snr_gamma: float, y: torch.Tensor | None = None) -> torch.Tensor:
    """E_t,eps || target - unet(sqrt(ab) z0 + sqrt(1-ab) eps, t) ||^2, target eps or v. ``y``: SDXL's added
    vector (pooled text and micro-conditioning)."""
    device = z0.device
    n_steps = len(alphas_cumprod)
    t = torch.stack([torch.randint(0, n_steps, (), generator=g) for g in generators]).to(device)
    eps = draw(generators, tuple(z0.shape[1:])).to(device)
    alpha_bar = alphas_cumprod.to(device)[t].float()[:, None, None, None]
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps  # q_sample
    if prediction_type is PredictionType.EPSILON:
        target = eps
    else:
        target = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z0
    prediction = (unet(z_t, t, context) if y is None else unet(z_t, t, context, y)).float()
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        clipped = snr.clamp(max=min_snr_gamma)
        weight = clipped / snr if prediction_type is PredictionType.EPSILON else clipped / (snr + 1)
        per_sample = per_sample * weight
    return per_sample.mean()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the image-text similarity matrix; matching pairs on the diagonal."""
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(4.0 / mse.clamp_min(1e-12)))
