"""Training a ControlNet (Zhang, Rao & Agrawala 2023) for a frozen model, on (image, control image, caption).

The ControlNet starts as a copy of the U-Net's encoder and middle block with its zero convolutions at zero
(``ControlNet.from_unet``), so step 0 predicts exactly what the U-Net alone does; the U-Net, VAE and text
encoder stay frozen and only the copy, its hint encoder and the zero convolutions learn. The loss is the
U-Net's denoising loss with the ControlNet's residuals added to its skips and middle block.

SDXL (a base model given with ``--model``): the captions are encoded as the U-Net task encodes them (both text
encoders, bigG's pooled output) and the added vector y (pooled text + micro-conditioning from the data) goes to
the ControlNet and to the U-Net alike, as diffusers' ``train_controlnet_sdxl.py`` passes ``added_cond_kwargs``
to both: the ControlNet copies the U-Net's added embedding, and reads y at inference too.

Captions are dropped with ``caption_dropout`` (the paper drops half of them, so the network learns to read the
control image without a prompt), and with ``position_noise`` a shapes caption names a random grid cell, so
that where the control image and the words disagree the control image wins.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..checkpoints.controlnet import save_controlnet
from ..models.controlnet import ControlNet
from ..pipeline import StableDiffusion
from .config import TrainConfig
from .data import build_control_dataset, reposition_caption
from .distributed import Distributed
from .loop import collate, save_grid
from .losses import denoising_loss, draw, per_sample_generators
from .unet_task import UNetTask

HINT_WIDTHS = (16, 32, 96, 256)  # the hint encoder's widths for an f = 8 autoencoder; fewer for smaller f
SAMPLES = 8


class PairedDataset(Dataset):
    """(index, latent moments or image, control image, caption): the U-Net task's items and their controls."""

    def __init__(self, data: Dataset, controls: Dataset):
        if len(controls) < len(data):
            raise ValueError(f"{len(controls)} control images for {len(data)} images")
        self.data, self.controls = data, controls

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        index, data, caption = self.data[index]
        return index, data, self.controls[index], caption

    def geometry(self, index: int):
        """SDXL's micro-conditioning of the item: the image data's (``UNetTask.added_vector`` reads it)."""
        return self.data.geometry(index)


def hint_widths(sd: StableDiffusion) -> tuple[int, ...]:
    """Enough stride-2 convs to bring the control image (the generated image's size) to the latents' grid."""
    downscale = 2 ** (len(sd.config.vae.channel_mult) - 1)
    return HINT_WIDTHS[:int(math.log2(downscale)) + 1]


class ControlNetTask(UNetTask):
    def __init__(self, config: TrainConfig, dist: Distributed):
        super().__init__(config, dist)  # refuses SDXL's refiner, as U-Net training does
        self.unet = self.sd.unet.float().to(dist.device).eval().requires_grad_(False)
        self.model = ControlNet.from_unet(self.unet, hint_widths=hint_widths(self.sd)).float().train()
        self._controls = build_control_dataset(config.data, config.resolution, config.resolution, config.seed,
                                               config.dataset_size)

    def dataset(self):
        return PairedDataset(super().dataset(), self._controls)

    def loss(self, model, batch, step):
        indices, data, control, captions = batch
        generators = per_sample_generators(self.config.seed, step, indices)
        z0 = self.latents(data, generators)
        drop = draw(generators, (), kind="rand") < self.config.caption_dropout
        if self.config.position_noise > 0:
            moved = draw(generators, (), kind="rand") < self.config.position_noise
            captions = [reposition_caption(c, random.Random(self.config.seed * 7919 + step * 104_729 + i))
                        if m else c for c, m, i in zip(captions, moved.tolist(), indices)]
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        hint = control.to(self.dist.device)

        def controlled_unet(z_t, t, context, y=None):
            down, mid = model(z_t, t, context, hint, y=y)
            return self.unet(z_t, t, context, y, down_residuals=down, mid_residual=mid)

        context, pooled = self.context(captions)  # pooled: SDXL's (SD 1.x/2.x U-Nets take none)
        y = None if pooled is None else self.added_vector(pooled, list(indices))
        loss = denoising_loss(controlled_unet, z0, context, self.alphas_cumprod, generators,
                              self.prediction_type, self.config.min_snr_gamma, y=y)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean denoising loss on the last 64 items at fixed noise and timesteps (comparable across runs)."""
        model.eval()
        data = self.dataset()
        batch = collate([data[i] for i in range(max(0, len(data) - 64), len(data))])
        loss, _ = self.loss(model, batch, step=10 ** 9)
        return {"fixed_noise_loss": float(loss)}

    def sample(self, model, path: Path) -> None:
        """The control images of the last items, and what the model draws from them and their captions."""
        from PIL import Image

        from ..pipeline.features.control import ControlUnit

        sd = self.pipeline(self.unet)
        indices = range(len(self._controls) - SAMPLES, len(self._controls))
        data = self.dataset()
        controls = [Image.fromarray((self._controls[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
                    for i in indices]
        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "controlnet.safetensors"
            save_controlnet(model, file)
            images = [sd.generate(data[i][-1], seed=i, steps=20, guidance_scale=5.0,
                                  control=[ControlUnit(image=c, model=file)]).images[0]
                      for i, c in zip(indices, controls)]
        save_grid([c.resize(images[0].size) for c in controls] + images, path, columns=SAMPLES)

    def export(self, model, output: Path) -> list[Path]:
        path = output / "controlnet.safetensors"
        save_controlnet(model, path, metadata={"base_model": self.config.model, "steps": str(self.config.steps)})
        return [path]
