"""The KL-regularised autoencoder (Rombach et al. 2022): images <-> latents, downsampled by 8 in SD."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import VAEConfig
from .layers import Downsample, ResnetBlock, Upsample, attention, silu

_EPS = 1e-6  # GroupNorm epsilon of the original autoencoder


class SelfAttention2d(nn.Module):
    """Single-head self-attention over all pixels of a feature map (the autoencoder's middle block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.attention_chunk: int | None = None  # see layers.set_attention_chunk
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.to_out(attention(self.to_q(h), self.to_k(h), self.to_v(h), num_heads=1,
                                     chunk=self.attention_chunk))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def _run(module: nn.Module, x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    """``module(x)``; with ``checkpoint``, its activations are recomputed in the backward pass, not stored."""
    return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False) if checkpoint else module(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_channels=None, groups=groups, eps=_EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention2d(channels, groups)])

    def forward(self, x: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        for layer in (self.resnets[0], self.attentions[0], self.resnets[1]):
            x = _run(layer, x, checkpoint)
        return x


class ResampleLevel(nn.Module):
    """ResBlocks at one resolution, then a down- or upsampler (stored under diffusers' names)."""

    def __init__(self, cin: int, cout: int, num_res: int, groups: int, resample: nn.Module | None, name: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, temb_channels=None, groups=groups, eps=_EPS)
            for i in range(num_res))
        self.resample_name = name
        setattr(self, name, nn.ModuleList([resample]) if resample is not None else None)

    def forward(self, x: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        for resnet in self.resnets:
            x = _run(resnet, x, checkpoint)
        resample = getattr(self, self.resample_name)
        return _run(resample[0], x, checkpoint) if resample is not None else x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        cin = widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            down = None if last else Downsample(width, asymmetric_pad=True)
            self.down_blocks.append(ResampleLevel(cin, width, c.num_res_blocks, c.norm_groups, down, "downsamplers"))
            cin = width
        self.mid_block = MidBlock(cin, c.norm_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, cin, eps=_EPS)
        self.conv_out = nn.Conv2d(cin, 2 * c.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, cin, 3, padding=1)
        self.mid_block = MidBlock(cin, c.norm_groups)
        self.up_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            up = Upsample(width) if level > 0 else None
            self.up_blocks.append(ResampleLevel(cin, width, c.num_res_blocks + 1, c.norm_groups, up, "upsamplers"))
            cin = width
        self.conv_norm_out = nn.GroupNorm(c.norm_groups, cin, eps=_EPS)
        self.conv_out = nn.Conv2d(cin, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """``checkpoint``: keep only each layer's input for the backward pass and recompute the rest
        (gradient checkpointing), which bounds the memory of back-propagating through the decoder
        (CLIP guidance) to about one ResBlock's activations at full resolution."""
        h = self.mid_block(self.conv_in(z), checkpoint)
        for block in self.up_blocks:
            h = block(h, checkpoint)
        return _run(self._output, h, checkpoint)

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, std^2), per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        from ..noise import randn_like

        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """``encode`` takes images in [-1, 1] and returns the posterior; ``decode`` takes *unscaled*
    latents. Multiply a sample by ``config.scaling_factor`` to get what the U-Net sees."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z2 = 2 * config.latent_channels
        # SD 3 and FLUX.1 autoencoders have no 1x1 convs around the latent (use_quant_conv=False)
        self.quant_conv = nn.Conv2d(z2, z2, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1) \
            if config.use_quant_conv else None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(images)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents, checkpoint=checkpoint)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior
