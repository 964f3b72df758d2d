"""Training the KL autoencoder: L1 reconstruction + KL to N(0, I), optionally a patch discriminator."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.components import save_component
from ..images import tensor_to_pil
from ..models.vae import AutoencoderKL
from . import presets
from .config import TrainConfig
from .data import build_dataset
from .distributed import Distributed
from .loop import Indexed, save_grid
from .losses import per_sample_generators, psnr

HELD_OUT_SEED = 10_000  # held-out images come from another seed of the same dataset


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per image patch."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VAETask:
    use_ema = False

    def __init__(self, config: TrainConfig, dist: Distributed):
        self.config, self.dist = config, dist
        if config.vae:
            from ..checkpoints.components import load_vae

            self.model = load_vae(config.vae)
        else:
            self.model = AutoencoderKL(presets.vae_config(config.preset))
        if config.decoder_only:
            # as SD's ft-MSE decoders: the encoder, hence every latent a U-Net was trained on, is untouched
            self.model.encoder.requires_grad_(False)
            self.model.quant_conv.requires_grad_(False)
        self.discriminator = PatchDiscriminator().to(dist.device) if config.disc_start > 0 else None
        self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=config.lr, betas=(0.5, 0.9)) \
            if self.discriminator is not None else None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        held_out = build_dataset(config.data, config.resolution, seed=HELD_OUT_SEED, length=100)
        self.held_out = torch.stack([held_out[i][0] for i in range(len(held_out))])

    def dataset(self):
        config = self.config
        return Indexed(build_dataset(config.data, config.resolution, config.seed, config.dataset_size),
                       config.dataset_size)

    def loss(self, model, batch, step):
        indices, images, _ = batch
        images = images.to(self.dist.device)
        generators = per_sample_generators(self.config.seed, step, indices)
        recon, posterior = model(images, generators)
        rec = (recon.float() - images).abs().mean()
        kl = posterior.kl().mean()
        loss = rec + self.config.kl_weight * kl
        logs = {"rec": rec.item(), "kl": kl.item()}
        if self.discriminator is not None:
            logs["g_loss"] = 0.0  # a fixed set of columns in metrics.csv
        if self.discriminator is not None and step >= self.config.disc_start:
            # generator side: fool the discriminator (hinge GAN loss)
            g_loss = -self.discriminator(recon.float()).mean()
            loss = loss + self.config.disc_weight * g_loss
            self._pending = (images, recon.detach().float())  # the discriminator learns after this step
            logs["g_loss"] = g_loss.item()
        return loss, logs

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        with torch.autocast(real.device.type, enabled=False):
            d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake)).mean()
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_optimizer.step()

    def after_step(self, step):
        if self._pending is not None:
            self._disc_step(*self._pending)
            self._pending = None

    @torch.no_grad()
    def reconstruct(self, model, images: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model.decode(model.encode(images.to(self.dist.device)).mean).float().cpu()

    def sample(self, model, path: Path) -> None:
        originals = self.held_out[:16]
        recon = self.reconstruct(model, originals)
        save_grid(tensor_to_pil(torch.cat([originals, recon])), path, columns=16)

    def evaluate(self, model) -> dict[str, float]:
        return {"psnr": psnr(self.reconstruct(model, self.held_out), self.held_out)}

    @torch.no_grad()
    def scaling_factor(self, model) -> float:
        """1 / std of the latents, so that the U-Net sees roughly unit-variance inputs (as SD's 0.18215)."""
        latents = model.encode(self.held_out.to(self.dist.device)).mean
        return float(1.0 / latents.float().std())

    def export(self, model, output: Path) -> list[Path]:
        import dataclasses

        scaling = model.config.scaling_factor if self.config.decoder_only else round(self.scaling_factor(model), 5)
        config = dataclasses.replace(model.config, scaling_factor=scaling)
        model.config = config
        path = output / "vae.safetensors"
        save_component(path, "vae", model, config)
        return [path]

    def extra_state(self) -> dict:
        if self.discriminator is None:
            return {}
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.discriminator is not None and state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
