"""Training the U-Net on frozen VAE latents and frozen CLIP text features.

Latents are cached to disk once (the posterior's mean and std, so every step still samples fresh
latents); captions are dropped to "" with probability ``caption_dropout`` so that the same network
learns the unconditional prediction that classifier-free guidance needs. With ``text_encoder_lr`` the
text encoder learns from the same denoising loss (``UNetAndTextEncoder``), as DreamBooth's and kohya's
scripts train it, with its own learning rate.

SDXL (a base model given with ``--model``): each caption through both text encoders as diffusers' SDXL
training scripts encode it (one 77-token window, penultimate states side by side, bigG's projected pooled
output), and the micro-conditioning from the data: each image's size before scaling and where it was cropped
(``data.crop_geometry``, cached beside the latents), the training resolution as the target size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints.io import load_state_dict, save_safetensors
from ..config import ModelConfig, PredictionType, ScheduleConfig
from ..diffusion.schedules import alphas_cumprod
from ..models.layers import ResnetBlock
from ..models.unet import SpatialTransformer, UNet, added_vector
from ..models.vae import DiagonalGaussian
from ..pipeline import StableDiffusion
from . import presets
from .config import TrainConfig
from .data import build_dataset
from .distributed import Distributed
from .loop import Indexed, save_grid
from .losses import denoising_loss, draw, per_sample_generators

MAX_CACHED_TEXT_BYTES = 4 << 30  # the in-memory text features start over beyond this (SDXL: 630 kB a caption)
SAMPLE_PROMPTS = [
    "a red circle at the top left on a blue background", "a yellow square in the center on a black background",
    "a green triangle at the bottom right on a white background",
    "a blue circle at the center left on an orange background",
    "a white square at the top right on a purple background",
    "a purple triangle at the bottom left on a yellow background",
    "a black circle at the bottom center on a green background",
    "an orange square at the top center on a red background",
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
    unet_config = presets.unet_config(config.preset, clip.text.config.width, vae.config.latent_channels)
    model_config = ModelConfig(unet=unet_config,
                               vae=vae.config, text=clip.text.config, schedule=schedule, family="sd1",
                               sample_size=config.resolution)
    from ..text.tokenizer import CLIPTokenizer

    unet = UNet(model_config.unet)
    tokenizer = CLIPTokenizer(pad_token_id=clip.text.config.pad_token_id)
    return StableDiffusion(model_config, unet, vae, clip.text, tokenizer, name=Path(config.output).name)


class UNetAndTextEncoder(nn.Module):
    """The U-Net with the text encoder in front, as one trainable module: ``forward`` takes token ids where the
    U-Net takes their features, so the denoising loss reaches the text encoder (and DDP reduces both)."""

    def __init__(self, unet: UNet, text_encoder: nn.Module, tokens: torch.Tensor):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder.train().requires_grad_(True)
        # weights the context does not depend on (the pooled output's projection, where the encoder has one) get
        # no gradient from it: they stay frozen, out of the optimizer and of DDP's reduction
        self.text_encoder(tokens).sum().backward()
        for p in self.text_encoder.parameters():
            p.requires_grad_(p.grad is not None)
            p.grad = None

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, self.text_encoder(token_ids))


class LatentDataset(Dataset):
    def __init__(self, moments: torch.Tensor, captions: list[str], geometry: torch.Tensor | None = None):
        self.moments, self.captions, self._geometry = moments, captions, geometry

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return index, self.moments[index], self.captions[index]

    def geometry(self, index: int):
        if self._geometry is None:
            raise ValueError("this latents cache was written without the images' sizes and crops that SDXL "
                             "training needs: delete latents.safetensors in the output folder to write it again")
        return tuple(self._geometry[index].tolist())


def geometries(data: Dataset, indices: list[int], size: int) -> torch.Tensor:
    """(len(indices), 4): original (height, width), crop (top, left) per item; (size, size, 0, 0) where the
    item was made at its size."""
    return torch.tensor([data.geometry(i) or (size, size, 0, 0) for i in indices], dtype=torch.float32)


@torch.no_grad()
def encode_captions_sdxl(text_encoders, tokenizer, captions: list[str], device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' SDXL training scripts' ``encode_prompt``: each caption in one window of ``max_length`` tokens
    (truncated; no prompt syntax), padded as each encoder's config says; both encoders' penultimate states side
    by side (B, T, 2048) and the last encoder's projected pooled output (B, 1280)."""
    bodies = [tokenizer.encode(c)[: tokenizer.max_length - 2] for c in captions]
    states, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        pad = encoder.config.pad_token_id
        ids = torch.tensor([[tokenizer.bos_token_id, *b, tokenizer.eos_token_id] + [pad] * (tokenizer.max_length - 2
                           - len(b)) for b in bodies], device=device)
        hidden, last = encoder.penultimate(ids, pooled=i == len(text_encoders) - 1)
        states.append(hidden)
        pooled = last if last is not None else pooled
    return torch.cat(states, dim=-1), pooled


@torch.no_grad()
def cache_latents(sd: StableDiffusion, config: TrainConfig, dist: Distributed) -> LatentDataset:
    """Encode the dataset once into ``latents.safetensors`` (rank 0 writes, the others wait and read)."""
    path = config.output_dir / "latents.safetensors"
    if dist.is_main and not path.exists():
        data = Indexed(build_dataset(config.data, config.resolution, config.seed, config.dataset_size),
                       config.dataset_size)
        moments, captions = [], []
        for start in range(0, len(data), 64):
            items = [data[i] for i in range(start, min(start + 64, len(data)))]
            images = torch.stack([image for _, image, _ in items]).to(sd.device, sd.dtype)
            posterior = sd.vae.encode(images)
            moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu())
            captions += [caption for _, _, caption in items]
        geometry = geometries(data, list(range(len(data))), config.resolution).to(torch.int32)
        save_safetensors({"moments": torch.cat(moments), "geometry": geometry}, path,
                         metadata={"captions": json.dumps(captions)})
    dist.barrier()
    from ..checkpoints.io import safetensors_metadata

    state = load_state_dict(path)
    return LatentDataset(state["moments"], json.loads(safetensors_metadata(path)["captions"]), state.get("geometry"))


class UNetTask:
    use_ema = True

    def __init__(self, config: TrainConfig, dist: Distributed):
        self.config, self.dist = config, dist
        self.sd = frozen_parts(config)
        if config.prediction_type != self.sd.config.schedule.prediction_type.value and config.model:
            raise ValueError(f"--prediction-type {config.prediction_type} differs from the base model's "
                             f"{self.sd.config.schedule.prediction_type.value}")
        if self.sd.config.family == "sdxl_refiner":
            raise ValueError("training SDXL's refiner is not supported (its aesthetic-score conditioning has no "
                             "source in the data); train an SDXL base model")
        self.sd.vae.to(dist.device)
        for encoder in self.sd.text_encoders:
            encoder.to(dist.device)
        self.model = self.sd.unet.train().requires_grad_(True)
        self.model.enable_gradient_checkpointing(config.gradient_checkpointing)
        self.train_text = config.text_encoder_lr > 0
        if self.train_text:
            if self.sd.config.is_sdxl:
                raise ValueError("--text-encoder-lr: fine-tuning SDXL's two text encoders is not supported; "
                                 "train its U-Net with them frozen (drop the flag)")
            self.model = UNetAndTextEncoder(self.model, self.sd.text_encoder, self.sd.tokenizer([""]).to(dist.device))
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
    def context(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text features of each caption (cached in memory): the context, and SDXL's pooled output."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._contexts]
        if missing:
            if self.sd.config.is_sdxl:
                context, pooled = encode_captions_sdxl(self.sd.text_encoders, self.sd.tokenizer, missing,
                                                       self.dist.device)
            else:
                context = self.sd.text_encoder(self.sd.tokenizer(missing).to(self.dist.device))
                pooled = [None] * len(missing)
            if len(self._contexts) + len(missing) > MAX_CACHED_TEXT_BYTES // context[0].nbytes:
                self._contexts.clear()
            self._contexts.update(zip(missing, zip(context, pooled)))
        contexts, pooled = zip(*(self._contexts[c] for c in captions))
        return torch.stack(contexts), None if pooled[0] is None else torch.stack(pooled)

    def added_vector(self, pooled: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """SDXL's y: the pooled text beside original size, crop top-left (the item's) and target size."""
        size = self.config.resolution
        numbers = torch.cat([geometries(self.dataset(), indices, size), torch.tensor([[size, size]] * len(indices))],
                            dim=1)
        return added_vector(pooled.float(), numbers.to(pooled.device), self.sd.config.unet.micro_condition_dim)

    def shard_units(self, model) -> list[torch.nn.Module]:
        """What ``--fsdp`` shards one by one (then the rest with the root): every ResBlock and transformer."""
        return [m for m in model.modules() if isinstance(m, (ResnetBlock, SpatialTransformer))]

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
        if self.train_text:  # token ids: the model encodes them (with gradients)
            context, pooled = self.sd.tokenizer(captions).to(self.dist.device), None
        else:
            context, pooled = self.context(captions)
        y = None if pooled is None else self.added_vector(pooled, list(indices))
        loss = denoising_loss(model, z0, context, self.alphas_cumprod, generators, self.prediction_type,
                              self.config.min_snr_gamma, y=y)
        return loss, {}

    def param_groups(self, model) -> list[dict] | None:
        """With the text encoder in training: the U-Net at ``lr``, the text encoder at ``text_encoder_lr``
        (None: the loop's one group)."""
        if not self.train_text:
            return None
        return [{"params": [p for p in model.unet.parameters() if p.requires_grad]},
                {"params": [p for p in model.text_encoder.parameters() if p.requires_grad],
                 "lr": self.config.text_encoder_lr}]

    def after_step(self, step):
        pass

    def pipeline(self, model) -> StableDiffusion:
        """An inference pipeline around a copy of the trained U-Net (and text encoder, where it trains; the
        pipeline freezes what it holds)."""
        import copy

        unet, text_encoder = (model.unet, copy.deepcopy(model.text_encoder)) if self.train_text else \
            (model, self.sd.text_encoder)
        return StableDiffusion(self.sd.config, copy.deepcopy(unet), self.sd.vae, text_encoder,
                               self.sd.tokenizer, name=self.sd.name, text_encoder_2=self.sd.text_encoder_2)

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
