"""Training the U-Net on frozen VAE latents and frozen CLIP text features.

Latents are cached to disk once (the posterior's mean and std, so every step still samples fresh
latents); captions are dropped to "" with probability ``caption_dropout`` so that the same network
learns the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..checkpoints.io import load_state_dict, save_safetensors
from ..config import ModelConfig, PredictionType, ScheduleConfig
from ..diffusion.schedules import alphas_cumprod
from ..models.unet import UNet
from ..models.vae import DiagonalGaussian
from ..pipeline import StableDiffusion
from . import presets
from .config import TrainConfig
from .data import build_dataset
from .distributed import Distributed
from .loop import Indexed, save_grid
from .losses import denoising_loss, draw, per_sample_generators

SAMPLE_PROMPTS = [
    "a red circle at the top left on a blue background", "a yellow square in the center on a black background",
    "a green triangle at the bottom right on a white background", "a blue circle at the center left on an orange background",
    "a white square at the top right on a purple background", "a purple triangle at the bottom left on a yellow background",
    "a black circle at the bottom center on a green background", "an orange square at the top center on a red background",
]


def frozen_parts(config: TrainConfig) -> StableDiffusion:
    """The pipeline whose VAE and text encoder stay frozen (and whose U-Net is replaced or fine-tuned)."""
    from ..checkpoints.components import load_clip, load_vae

    if config.model == "bundled":  # the model that ships with torchsd, in float32 for training
        return StableDiffusion.from_checkpoint(None, dtype=torch.float32)
    if config.model:
        return StableDiffusion.from_checkpoint(config.model)
    vae, clip = load_vae(config.vae), load_clip(config.clip)
    schedule = ScheduleConfig(prediction_type=config.prediction_type)
    model_config = ModelConfig(unet=presets.unet_config(config.preset, clip.text.config.width, vae.config.latent_channels),
                               vae=vae.config, text=clip.text.config, schedule=schedule, family="sd1",
                               sample_size=config.resolution)
    from ..text.tokenizer import CLIPTokenizer

    unet = UNet(model_config.unet)
    return StableDiffusion(model_config, unet, vae, clip.text, CLIPTokenizer(pad_token_id=clip.text.config.pad_token_id),
                           name=Path(config.output).name)


class LatentDataset(Dataset):
    def __init__(self, moments: torch.Tensor, captions: list[str]):
        self.moments, self.captions = moments, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return index, self.moments[index], self.captions[index]


@torch.no_grad()
def cache_latents(sd: StableDiffusion, config: TrainConfig, dist: Distributed) -> LatentDataset:
    """Encode the dataset once into ``latents.safetensors`` (rank 0 writes, the others wait and read)."""
    path = config.output_dir / "latents.safetensors"
    if dist.is_main and not path.exists():
        data = Indexed(build_dataset(config.data, config.resolution, config.seed, config.dataset_size), config.dataset_size)
        moments, captions = [], []
        for start in range(0, len(data), 64):
            items = [data[i] for i in range(start, min(start + 64, len(data)))]
            images = torch.stack([image for _, image, _ in items]).to(sd.device, sd.dtype)
            posterior = sd.vae.encode(images)
            moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu())
            captions += [caption for _, _, caption in items]
        save_safetensors({"moments": torch.cat(moments)}, path, metadata={"captions": json.dumps(captions)})
    dist.barrier()
    from ..checkpoints.io import safetensors_metadata

    return LatentDataset(load_state_dict(path)["moments"], json.loads(safetensors_metadata(path)["captions"]))


class UNetTask:
    use_ema = True

    def __init__(self, config: TrainConfig, dist: Distributed):
        self.config, self.dist = config, dist
        self.sd = frozen_parts(config)
        if config.prediction_type != self.sd.config.schedule.prediction_type.value and config.model:
            raise ValueError(f"--prediction-type {config.prediction_type} differs from the base model's "
                             f"{self.sd.config.schedule.prediction_type.value}")
        self.sd.vae.to(dist.device)
        self.sd.text_encoder.to(dist.device)
        self.model = self.sd.unet.train().requires_grad_(True)
        self.model.enable_gradient_checkpointing(config.gradient_checkpointing)
        self.alphas_cumprod = alphas_cumprod(self.sd.config.schedule).float()
        self.prediction_type = PredictionType(config.prediction_type)
        self._contexts: dict[str, torch.Tensor] = {}
        self._dataset = None

    def dataset(self):
        """Built once: caching latents synchronises the ranks, which evaluation (rank 0 alone) must not do."""
        if self._dataset is None:
            self._dataset = cache_latents(self.sd, self.config, self.dist) if self.config.cache_latents else \
                Indexed(build_dataset(self.config.data, self.config.resolution, self.config.seed,
                                      self.config.dataset_size), self.config.dataset_size)
        return self._dataset

    @torch.no_grad()
    def context(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._contexts]
        if missing:
            encoded = self.sd.text_encoder(self.sd.tokenizer(missing).to(self.dist.device))
            self._contexts.update(zip(missing, encoded))
            if len(self._contexts) > 50_000:
                self._contexts.clear()
        return torch.stack([self._contexts[c] for c in captions])

    @torch.no_grad()
    def latents(self, data: torch.Tensor, generators) -> torch.Tensor:
        data = data.to(self.dist.device)
        if not self.config.cache_latents:  # images: encode now
            data = self.sd.vae.encode(data.to(self.sd.dtype))
            data = torch.cat([data.mean, data.logvar], dim=1)
        posterior = DiagonalGaussian(data.float())
        z = posterior.mean + posterior.std * draw(generators, tuple(posterior.mean.shape[1:])).to(data.device)
        return z * self.sd.config.vae.scaling_factor

    def loss(self, model, batch, step):
        indices, data, captions = batch
        generators = per_sample_generators(self.config.seed, step, indices)
        z0 = self.latents(data, generators)
        drop = draw(generators, (), kind="rand") < self.config.caption_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        loss = denoising_loss(model, z0, self.context(captions), self.alphas_cumprod, generators,
                              self.prediction_type, self.config.min_snr_gamma)
        return loss, {}

    def after_step(self, step):
        pass

    def pipeline(self, unet) -> StableDiffusion:
        """An inference pipeline around a copy of ``unet`` (the pipeline freezes what it holds)."""
        import copy

        return StableDiffusion(self.sd.config, copy.deepcopy(unet), self.sd.vae, self.sd.text_encoder, self.sd.tokenizer,
                               name=self.sd.name)

    def sample(self, model, path: Path) -> None:
        sd = self.pipeline(model)
        result = sd.generate(SAMPLE_PROMPTS[0], seed=0, steps=20, guidance_scale=5.0)  # warm path, then all
        images = result.images
        for i, prompt in enumerate(SAMPLE_PROMPTS[1:], start=1):
            images += sd.generate(prompt, seed=i, steps=20, guidance_scale=5.0).images
        save_grid(images, path, columns=len(images))

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean denoising loss on the last 64 items at fixed noise and timesteps (comparable across runs)."""
        model.eval()
        data = self.dataset()
        indices = list(range(max(0, len(data) - 64), len(data)))
        items = [data[i] for i in indices]
        batch = (indices, torch.stack([d for _, d, _ in items]), [c for _, _, c in items])
        loss, _ = self.loss(model, batch, step=10 ** 9)
        return {"fixed_noise_loss": float(loss)}

    def export(self, model, output: Path) -> list[Path]:
        path = output / "model"
        self.pipeline(model).save(path, format="diffusers")
        return [path]

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
