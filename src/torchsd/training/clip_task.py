"""Contrastive training of CLIP's text and image towers (symmetric InfoNCE, learned temperature)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.clip import save_clip
from ..images import tensor_to_pil
from ..models.clip import CLIP
from ..text.tokenizer import CLIPTokenizer
from . import presets
from .config import TrainConfig
from .data import build_dataset
from .distributed import Distributed, all_gather_with_grad
from .loop import Indexed, save_grid
from .losses import clip_loss

HELD_OUT_SEED = 10_000


class Contrastive(nn.Module):
    """Both towers in one forward, so that DDP sees (and synchronises) every parameter's gradient."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, token_ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(pixels), self.clip.encode_text(token_ids)


def initial_clip(source: str) -> CLIP:
    """A CLIP to fine-tune: a file ``torchsd train clip`` wrote, or ``bundled`` (the one that ships)."""
    from ..checkpoints.clip import load_clip

    if source == "bundled":  # its text tower is the bundled model's text encoder
        from ..pipeline import StableDiffusion

        sd = StableDiffusion.from_checkpoint(None, dtype=torch.float32)
        clip = sd.clip
        clip.text = sd.text_encoder
    else:
        clip = load_clip(source)
    return clip.float().train().requires_grad_(True)


class CLIPTask:
    use_ema = False

    def __init__(self, config: TrainConfig, dist: Distributed):
        self.config, self.dist = config, dist
        text_config, vision_config = presets.clip_configs(config.preset)
        if vision_config.image_size != config.resolution:
            import dataclasses

            vision_config = dataclasses.replace(vision_config, image_size=config.resolution)
        self.model = Contrastive(initial_clip(config.clip) if config.clip else CLIP(text_config, vision_config))
        size = self.model.clip.vision.config.image_size
        if size != config.resolution:
            raise ValueError(f"--clip {config.clip}: its image tower reads {size} px images; "
                             f"train at --resolution {size}")
        self.tokenizer = CLIPTokenizer()
        held_out = build_dataset(config.data, config.resolution, seed=HELD_OUT_SEED, length=100)
        items = [held_out[i] for i in range(min(100, len(held_out)))]
        self.held_out_images = torch.stack([image for image, _ in items])
        self.held_out_captions = [caption for _, caption in items]

    def dataset(self):
        config = self.config
        return Indexed(build_dataset(config.data, config.resolution, config.seed, config.dataset_size),
                       config.dataset_size)

    def loss(self, model, batch, step):
        _, images, captions = batch
        clip = self.model.clip
        ids = self.tokenizer(captions).to(self.dist.device)
        image_features, text_features = model(ids, clip.preprocess(images.to(self.dist.device)))
        # the contrastive loss needs every rank's pairs; the gradient reaches each rank's own features
        image_features = all_gather_with_grad(image_features)
        text_features = all_gather_with_grad(text_features)
        loss = clip_loss(image_features.float(), text_features.float(), clip.logit_scale)
        return loss, {"logit_scale": clip.logit_scale.exp().item()}

    def after_step(self, step):
        with torch.no_grad():  # CLIP's clamp: logit scale at most 100
            self.model.clip.logit_scale.clamp_(0, math.log(100))

    @torch.no_grad()
    def retrieval(self, model) -> tuple[float, float]:
        model = model.clip.eval()
        ids = self.tokenizer(self.held_out_captions).to(self.dist.device)
        image = torch.nn.functional.normalize(
            model.encode_image(model.preprocess(self.held_out_images.to(self.dist.device))).float(), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(ids).float(), dim=-1)
        similarity = image @ text.T
        # a caption can appear twice in the held-out set: count a retrieval right if the caption matches
        captions = self.held_out_captions
        i2t = sum(captions[int(j)] == captions[i] for i, j in enumerate(similarity.argmax(dim=1)))
        t2i = sum(captions[int(j)] == captions[i] for i, j in enumerate(similarity.argmax(dim=0)))
        return i2t / len(captions), t2i / len(captions)

    def sample(self, model, path: Path) -> None:
        """The held-out images, then for each caption the held-out image CLIP ranks first for it."""
        model = model.clip.eval()
        with torch.no_grad():
            ids = self.tokenizer(self.held_out_captions[:16]).to(self.dist.device)
            images = self.held_out_images[:16]
            image = torch.nn.functional.normalize(
                model.encode_image(model.preprocess(images.to(self.dist.device))), dim=-1)
            text = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
            best = (text @ image.T).argmax(dim=1).cpu()
        save_grid(tensor_to_pil(torch.cat([images, images[best]])), path, columns=16)

    def evaluate(self, model) -> dict[str, float]:
        i2t, t2i = self.retrieval(model)
        return {"image_to_text_top1": i2t, "text_to_image_top1": t2i}

    def export(self, model, output: Path) -> list[Path]:
        path = output / "clip.safetensors"
        save_clip(model.clip, path)
        return [path]

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
