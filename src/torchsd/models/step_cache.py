"""DeepCache (Ma et al. 2024): reuse the U-Net's deep features across steps, recomputing only a shallow branch.

Adjacent sampling steps change the deep, low-resolution features of the U-Net little. Every ``interval``-th
step runs the whole network and keeps the input of one up-path layer (the end of the deep branch); the steps in
between run only the shallow layers above it: conv_in, the down path up to the matching layer, then the up path
from the kept input on, with fresh skip connections. The price is an approximate image (docs/performance.md).

Branch numbering is DeepCache's: branch ``k`` is level ``k // L``, layer ``k % L`` with L = num_res_blocks + 1
layers per up level (the last up level's last ResBlock is branch 0, the cheapest and DeepCache's default).

``DeepCacheUNet`` wraps a ``UNet`` for one run (the pipeline's ``deep_cache`` feature swaps it into the
denoiser and back); it is rebuilt per run, so no cache outlives one. A step is a distinct timestep: calls at
the same timestep (Heun's second evaluation lands on the next one) share a step, and a timestep above the last
one starts a new pass (a hires pass), which runs in full.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import repeat_rows, silu
from .unet import Level, UNet


class DeepCacheUNet(nn.Module):
    accepts_several_contexts = True  # as UNet: the shallow branch keeps its one-latent-several-contexts trick

    def __init__(self, unet: UNet, interval: int, branch: int = 0):
        super().__init__()
        if not isinstance(unet, UNet):
            raise ValueError(f"DeepCache needs torchsd's UNet (SD 1.x/2.x, SDXL); got {type(unet).__name__} — "
                             "leave deep_cache_interval at 1 for this model")
        layers = unet.config.num_res_blocks + 1
        levels = len(unet.up_blocks)
        if interval < 1:
            raise ValueError(f"deep_cache_interval must be at least 1 (1 = every step in full); got {interval}")
        if not 0 <= branch < levels * layers:
            raise ValueError(f"deep_cache_branch must be between 0 and {levels * layers - 1} for this U-Net "
                             f"({levels} levels of {layers} layers); got {branch}")
        self.unet, self.interval = unet, interval
        self.level, self.layer = divmod(branch, layers)  # counted from the top (full-resolution) level
        self._step = -1
        self._last_timestep: float | None = None
        self._cached: torch.Tensor | None = None
        self._cached_for: tuple | None = None  # (x shape, context shape, dtype, device) the cache was made with

    def _next_step(self, timesteps: torch.Tensor) -> int:
        t = float(timesteps.reshape(-1)[0])
        if self._last_timestep is None or t > self._last_timestep:
            self._step = 0
        elif t < self._last_timestep:
            self._step += 1
        self._last_timestep = t
        return self._step

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """As UNet.forward; ``y``: SDXL's added vector."""
        unet = self.unet
        if context.shape[0] % x.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows for {x.shape[0]} latents; "
                             "it needs the same number or a whole multiple of it")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        step = self._next_step(timesteps)
        # as UNet.forward, op for op, so that a full step gives the same bits as the plain U-Net
        x, emb = unet.embed(x, timesteps, y)
        key = (x.shape, context.shape, x.dtype, x.device)
        full = step % self.interval == 0 or self._cached_for != key
        h = unet.conv_in(x)
        skips = [h]
        deep_up = len(unet.up_blocks) - 1 - self.level  # the up level holding the end of the deep branch
        start = len(unet.up_blocks[deep_up].resnets) - 1 - self.layer  # its first ResBlock of the shallow branch
        if full:
            for block in unet.down_blocks:
                h, outputs = block(h, emb, context, unet._run)
                skips.extend(outputs)
            h = unet.mid_block(h, emb, context, unet._run)
            for i, block in enumerate(unet.up_blocks):
                if i == deep_up:
                    h = self._up(block, h, emb, context, skips, 0, keep=start)
                else:
                    h, _ = block(h, emb, context, unet._run, skips=skips)
            self._cached_for = key
        else:
            for block in unet.down_blocks[:self.level]:
                h, outputs = block(h, emb, context, unet._run)
                skips.extend(outputs)
            skips.extend(self._down(unet.down_blocks[self.level], h, emb, context, self.layer))
            h = self._up(unet.up_blocks[deep_up], self._cached, emb, context, skips, start)
            for block in unet.up_blocks[deep_up + 1:]:
                h, _ = block(h, emb, context, unet._run, skips=skips)
        return unet.conv_out(silu(unet.conv_norm_out(h)))

    def _down(self, level: Level, h, emb, context, stop: int) -> list[torch.Tensor]:
        """The first ``stop`` ResBlocks (and transformers) of a down level: the skips the shallow branch reads."""
        outputs = []
        for i in range(stop):
            h = self.unet._run(level.resnets[i], h, emb)
            if level.attentions is not None:
                h = self.unet._run(level.attentions[i], h, context)
            outputs.append(h)
        return outputs

    def _up(self, level: Level, h, emb, context, skips: list[torch.Tensor], start: int,
            keep: int | None = None) -> torch.Tensor:
        """An up level from ResBlock ``start`` on (as Level.forward); ``keep``: the ResBlock whose input is kept."""
        for i in range(start, len(level.resnets)):
            if i == keep:
                self._cached = h
            h = torch.cat([h, repeat_rows(skips.pop(), h.shape[0])], dim=1)
            h = self.unet._run(level.resnets[i], h, emb)
            if level.attentions is not None:
                h = self.unet._run(level.attentions[i], h, context)
        resample = getattr(level, level.resample_name)
        return resample[0](h) if resample is not None else h
