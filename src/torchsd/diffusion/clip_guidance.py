"""CLIP guidance: steer every denoising step toward images that CLIP's image encoder finds close to the
prompt (CLIP-guided diffusion, Crowson 2021; diffusers' community ``clip_guided_stable_diffusion``).

It wraps any ``denoise(x, sigma) -> x0`` (with or without classifier-free guidance), so every sampler
gets it without knowing. At each call::

    x0    = denoise(x, sigma)                     with gradients w.r.t. x (through the U-Net)
    image = decode(x0)                            the VAE decoder (checkpointed), or a fitted linear map
    loss  = spherical distance between CLIP(cut-outs of image) and CLIP(prompt), averaged over cut-outs
    x0'   = x0 - scale * sigma^2 * d loss / dx

The last line is classifier guidance (Dhariwal & Nichol 2021) with log p(prompt | x) = -scale * loss: the
denoiser is D(x) = x + sigma^2 * score(x), so adding a log-likelihood's gradient to the score adds sigma^2
times it to x0. In noise terms it is eps' = eps + sigma * scale * d loss / dx, which is what diffusers'
pipeline does (``noise_pred - sqrt(beta_prod_t) * grads`` with its gradient taken w.r.t. z = x / sqrt(1 + sigma^2)).
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..models.clip import CLIP, preprocess_images
from .denoisers import Denoise, sigma_per_image

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL

LatentDecoder = Callable[[torch.Tensor], torch.Tensor]  # scaled latents (B, C, h, w) -> images in [-1, 1]
DECODERS = ("vae", "linear")
MAX_CUTOUTS = 64


def check_options(scale: float, cutouts: int, decoder: str) -> None:
    """CLIP guidance's options, checked before any work is queued."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"clip_guidance_scale must be a finite number >= 0 (0 turns CLIP guidance off); got {scale}")
    if not 0 <= cutouts <= MAX_CUTOUTS:
        raise ValueError(f"clip_cutouts must be between 0 (the whole image, centre-cropped) and {MAX_CUTOUTS}; "
                         f"got {cutouts}")
    if decoder not in DECODERS:
        raise ValueError(f"clip_decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between the directions of a and b (times 2): 0 when they agree, up to pi^2/2."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def make_cutouts(image: torch.Tensor, size: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` random square crops of one image (3, H, W), each resized to ``size`` and flipped with
    probability 1/2: (count, 3, size, size). Crops span from ``min(H, W, size)`` pixels to the short side.

    Many random views, fresh at every step, make the gradient favour what CLIP sees at any position and
    scale rather than a pattern that fools one fixed view. All randomness comes from ``generator``, so a
    seed gives the same cut-outs on every device."""
    H, W = image.shape[-2:]
    max_side, min_side = min(H, W), min(H, W, size)
    uniform = torch.rand(count, 4, generator=generator)  # side, top, left, flip
    views = []
    for side_u, top_u, left_u, flip_u in uniform.tolist():
        side = int(min_side + side_u * (max_side - min_side + 1))
        top, left = int(top_u * (H - side + 1)), int(left_u * (W - side + 1))
        view = image[None, :, top:top + side, left:left + side]
        view = F.interpolate(view, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
        views.append(view.flip(-1) if flip_u < 0.5 else view)
    return torch.cat(views)


def clip_loss(clip: CLIP, images: torch.Tensor, text_embedding: torch.Tensor, cutouts: int,
              generators: list[torch.Generator] | None) -> torch.Tensor:
    """Mean spherical distance between CLIP views of each image (B, 3, H, W) in [-1, 1] and the text
    embedding (1 or B, D): (B,). ``cutouts`` 0 takes CLIP's own view (resize, centre crop) of the whole image."""
    B, size = images.shape[0], clip.vision.config.image_size
    images = images.clamp(-1, 1)  # what the final image will show
    if cutouts == 0:
        views = clip.preprocess(images)[:, None]
    else:
        gens = generators or [None] * B
        views = torch.stack([preprocess_images(make_cutouts(image, size, cutouts, g), size)
                             for image, g in zip(images, gens)])  # (B, cutouts, 3, size, size)
    dtype = clip.visual_projection.weight.dtype
    embeddings = clip.encode_image(views.flatten(0, 1).to(dtype)).float().view(B, views.shape[1], -1)
    return spherical_distance(embeddings, text_embedding.float()[:, None]).mean(dim=1)


def clip_guidance(denoise: Denoise, clip: CLIP, text_embedding: torch.Tensor, decode: LatentDecoder, scale: float,
                  cutouts: int = 4, generators: list[torch.Generator] | None = None) -> Denoise:
    """Wrap ``denoise`` so that each x0 it returns is moved down the gradient of ``clip_loss`` (see the module
    docstring). ``generators``: one per image, for the cut-outs. Samplers run under ``torch.no_grad``; the
    wrapper turns gradients on for its own computation only."""
    if scale == 0:
        return denoise
    width = clip.visual_projection.out_features
    if text_embedding.ndim != 2 or text_embedding.shape[-1] != width:
        raise ValueError(f"the text embedding has shape {tuple(text_embedding.shape)}, but this CLIP embeds images "
                         f"in {width} dimensions: encode the prompt with the same CLIP (clip.encode_text), "
                         f"not with the diffusion model's text encoder")

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_image(sigma, x)
        if not (sigma > 0).any():
            return denoise(x, sigma)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0 = denoise(x_in, sigma)
            loss = clip_loss(clip, decode(x0), text_embedding, cutouts, generators)
            # the sum keeps each image's gradient its own: image k of a batch is image k generated alone;
            # scaling before the backward pass keeps half-precision gradients clear of underflow
            (grad,) = torch.autograd.grad(loss.sum() * scale, x_in)
        return x0.detach() - sigma[:, None, None, None] ** 2 * grad.to(x0.dtype)

    return guided


# --- from latents to pixels --------------------------------------------------------------------------

def vae_decoder(vae: "AutoencoderKL", scaling_factor: float, checkpoint: bool = True) -> LatentDecoder:
    """The full VAE decoder. With ``checkpoint`` its backward pass recomputes each layer's activations
    instead of storing them: about 2.5x less memory for about 1.3x the time (``benchmarks/clip_guidance.py``)."""
    def decode(latents: torch.Tensor) -> torch.Tensor:
        dtype = vae.post_quant_conv.weight.dtype
        return vae.decode((latents / scaling_factor).to(dtype), checkpoint=checkpoint).float()
    return decode


class LinearLatentDecoder:
    """A cheap stand-in for the VAE decoder: each latent pixel -> one RGB colour by an affine map, then
    bilinear upsampling by the VAE's factor. It sees colours and layout, not texture; its gradient costs
    nothing next to the decoder's. ``fit`` finds the map by least squares against the decoder itself."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, factor: int):
        self.weight, self.bias, self.factor = weight, bias, factor  # (3, C), (3,)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("oc,bchw->bohw", self.weight.to(latents), latents) + self.bias.to(latents)[:, None, None]
        return F.interpolate(rgb, scale_factor=self.factor, mode="bilinear", align_corners=False)

    @classmethod
    @torch.no_grad()
    def fit(cls, vae: "AutoencoderKL", scaling_factor: float, *, samples: int = 8, size: int = 16,
            seed: int = 0) -> tuple["LinearLatentDecoder", float]:
        """Fit to the decoder on smooth random latents of unit variance (latents of real images are
        spatially smooth; white noise would fit the decoder's response to texture). Returns the decoder and
        the fraction of the target's variance it explains (R^2) on the fitting set."""
        C, factor = vae.config.latent_channels, vae.config.downscale_factor
        param = vae.post_quant_conv.weight
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.randn(samples, C, size // 4, size // 4, generator=gen)
        latents = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        latents = latents / latents.std(dim=(0, 2, 3), keepdim=True)
        images = vae.decode((latents / scaling_factor).to(param.device, param.dtype)).float().cpu().clamp(-1, 1)
        target = F.avg_pool2d(images, factor).permute(0, 2, 3, 1).reshape(-1, 3)  # the colour of each patch
        inputs = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(target.shape[0], 1)], dim=1)
        solution = torch.linalg.lstsq(inputs.double(), target.double()).solution.float()  # (C + 1, 3)
        residual = target - inputs @ solution
        r2 = 1 - float(residual.pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-12))
        return cls(solution[:C].T.contiguous().to(param.device), solution[C].to(param.device), factor), r2


# fitted once per VAE (the fit decodes a few latents); weak keys let a dropped model free its entry
_LINEAR_DECODERS: "weakref.WeakKeyDictionary[AutoencoderKL, LinearLatentDecoder]" = weakref.WeakKeyDictionary()


def linear_decoder(vae: "AutoencoderKL", scaling_factor: float) -> LinearLatentDecoder:
    if vae not in _LINEAR_DECODERS:
        _LINEAR_DECODERS[vae] = LinearLatentDecoder.fit(vae, scaling_factor)[0]
    return _LINEAR_DECODERS[vae]
