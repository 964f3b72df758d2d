"""Running the autoencoder as a pipeline needs it: tiled for large images, safe in half precision.

A half-precision decode can overflow (fp16 tops out at 65504; some VAEs' activations go past it) and
give NaN or Inf. Saving that would write a black or garbled image as if it were a success, so a
non-finite half-precision decode is done again in float32, and a float32 result that is still not
finite is an error.
"""

from __future__ import annotations

import warnings

import torch

from ..models.tiling import VAETiling, tiled_decode, tiled_encode_moments
from ..models.vae import AutoencoderKL, DiagonalGaussian


def _dtype(vae: AutoencoderKL) -> torch.dtype:
    return next(vae.parameters()).dtype


def _decode(vae: AutoencoderKL, latents: torch.Tensor, tiling: VAETiling | None) -> torch.Tensor:
    f = vae.config.downscale_factor
    latents = latents.to(_dtype(vae))
    if tiling is not None and tiling.needed(latents.shape[-2] * f, latents.shape[-1] * f):
        return tiled_decode(vae, latents, tiling)
    return vae.decode(latents).float()


def float32_copy(vae: AutoencoderKL, device: torch.device) -> AutoencoderKL:
    """A float32 twin of ``vae`` on ``device``; the original (maybe shared with other requests) is untouched."""
    with torch.device("meta"):
        twin = AutoencoderKL(vae.config)
    twin.load_state_dict({k: v.to(device, torch.float32) for k, v in vae.state_dict().items()}, assign=True)
    return twin.eval().requires_grad_(False)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, *, tiling: VAETiling | None = None) -> torch.Tensor:
    """Unscaled latents -> images in [-1, 1], float32, guaranteed finite.

    ``tiling``: decode tile by tile when the image is larger than one tile (None: never tile)."""
    images = _decode(vae, latents, tiling)
    if torch.isfinite(images).all():
        return images
    dtype = _dtype(vae)
    if dtype != torch.float32:
        warnings.warn(f"the VAE decode in {str(dtype).removeprefix('torch.')} gave NaN or Inf; "
                      f"decoding again in float32", RuntimeWarning, stacklevel=2)
        images = _decode(float32_copy(vae, latents.device), latents.float(), tiling)
        if torch.isfinite(images).all():
            return images
    hint = "the latents themselves hold NaN or Inf" if not torch.isfinite(latents).all() else \
        "the VAE weights may be broken"
    raise FloatingPointError(f"the decoded image holds NaN or Inf values even in float32 ({hint}); "
                             f"nothing was saved. Try another model or VAE, or --dtype fp32")


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, *, tiling: VAETiling | None = None) -> DiagonalGaussian:
    """Images in [-1, 1] -> the posterior q(z|x), tile by tile when the image is larger than one tile."""
    images = images.to(_dtype(vae))
    if tiling is not None and tiling.needed(images.shape[-2], images.shape[-1]):
        return DiagonalGaussian(tiled_encode_moments(vae, images, tiling))
    return vae.encode(images)
