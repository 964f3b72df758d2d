"""Adapters from a U-Net to the one interface every sampler uses: ``denoise(x, sigma) -> x0``.

``x`` is in the sampler's parametrisation x = x0 + sigma * eps (see ``schedules``). The U-Net was
trained on z_t = sqrt(alpha_bar) * x, so its input is scaled by c_in = 1/sqrt(sigma^2 + 1), the
timestep is recovered from sigma, and its output (eps or v) is turned into a prediction of x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..config import PredictionType, ScheduleConfig
from .schedules import timestep_of_sigma, training_sigmas

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UNetLike(Protocol):
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Condition:
    """What a prompt conditions the U-Net on beyond the latent: the text ``context`` (B, T, W) that
    cross-attention reads and, for SDXL, the added vector ``y`` (B, added_embed_dim): pooled text and
    micro-conditioning, summed into the time embedding. Rows are images, like a context's; CFG stacks the
    negative and the positive rows of both together. SD 1/2 pass a bare context tensor, which means y=None."""

    context: torch.Tensor
    y: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:  # the context's: code that sizes batches and lengths reads it
        return self.context.shape

    def to(self, *args, **kwargs) -> "Condition":
        return Condition(self.context.to(*args, **kwargs), None if self.y is None else self.y.to(*args, **kwargs))


ConditionLike = torch.Tensor | Condition


def unpack(cond: ConditionLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (cond.context, cond.y) if isinstance(cond, Condition) else (cond, None)


def cat_conditions(conds: list[ConditionLike]) -> ConditionLike:
    """Rows of several conditionings stacked (all bare tensors, or all with y)."""
    if not any(isinstance(c, Condition) for c in conds):
        return torch.cat(conds)
    parts = [unpack(c) for c in conds]
    if any(y is None for _, y in parts):
        raise ValueError("cat_conditions: some conditionings have an added vector y and some do not")
    return Condition(torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts]))


def with_context(cond: ConditionLike, context: torch.Tensor) -> ConditionLike:
    return context if not isinstance(cond, Condition) else Condition(context, cond.y)


def sigma_per_image(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Any scalar or (B,) sigma -> (B,) float32 on x's device. A Python number, as the samplers pass, is
    filled in on the device: copying it from the host would make the host wait for the device every step."""
    if isinstance(sigma, (int, float)):
        return torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma


class ModelDenoiser:
    """Wraps an eps- or v-predicting U-Net: ``(x, sigma, context, concat) -> x0``.

    ``concat`` holds extra input channels (mask and masked-image latents of inpainting models)."""

    def __init__(self, unet: UNetLike, schedule: ScheduleConfig):
        self.unet = unet
        self.prediction_type = schedule.prediction_type
        self.log_sigmas = training_sigmas(schedule).log()  # float64, on the CPU: tiny
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())
        self._log_sigmas_on: dict[torch.device, torch.Tensor] = {}

    @property
    def accepts_several_contexts(self) -> bool:
        """Whether the U-Net takes one latent for several contexts (UNet.forward); a plain UNetLike may not.
        Asked each time: the runtime may swap the U-Net for a compiled one."""
        return getattr(self.unet, "accepts_several_contexts", False)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional training timestep of each sigma, computed where sigma lives: a copy to the
        CPU here would make the host wait for the accelerator at every step."""
        return timestep_of_sigma(self._log_sigmas_for(sigma.device), sigma.detach()).to(torch.float32)

    def _log_sigmas_for(self, device: torch.device) -> torch.Tensor:
        # copied to each device once; float64 where the device has it (MPS does not)
        if device not in self._log_sigmas_on:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._log_sigmas_on[device] = self.log_sigmas.to(device, dtype)
        return self._log_sigmas_on[device]

    def model_output(self, x: torch.Tensor, sigma: torch.Tensor, context: ConditionLike,
                     concat: torch.Tensor | None = None, **unet_inputs: torch.Tensor) -> torch.Tensor:
        """``context``: a text context, or a ``Condition`` whose added vector y goes to the U-Net too.
        ``unet_inputs``: extra keyword inputs of the U-Net (a ControlNet's residuals)."""
        context, y = unpack(context)
        sigma = sigma_per_image(sigma, x)
        c_in = (1.0 / (sigma ** 2 + 1).sqrt())[:, None, None, None]
        z = (x * c_in).to(context.dtype)
        if concat is not None:
            z = torch.cat([z, concat.to(z.dtype)], dim=1)
        added = {} if y is None else {"y": y}  # a U-Net without an added embedding takes no y
        return self.unet(z, self.timestep(sigma), context, **added, **unet_inputs).to(x.dtype)

    def x0_from_output(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_image(sigma, x)[:, None, None, None]
        if self.prediction_type is PredictionType.EPSILON:
            return x - sigma * output
        # v = alpha * eps - sigma_vp * x0 with alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma*alpha
        return x / (sigma ** 2 + 1) - output * sigma / (sigma ** 2 + 1).sqrt()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: ConditionLike,
                 concat: torch.Tensor | None = None, **unet_inputs: torch.Tensor) -> torch.Tensor:
        """x0 for each row of ``context``: k*B rows if it holds k contexts per latent (see UNet.forward)."""
        output = self.model_output(x, sigma, context, concat, **unet_inputs)
        if output.shape[0] != x.shape[0]:
            k = output.shape[0] // x.shape[0]
            x, sigma = x.repeat(k, 1, 1, 1), sigma_per_image(sigma, x).repeat(k)
        return self.x0_from_output(x, sigma, output)


def classifier_free_guidance(model: ModelDenoiser, cond: ConditionLike, uncond: ConditionLike | None,
                             guidance_scale: float, concat: torch.Tensor | None = None,
                             observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
                             ) -> Denoise:
    """x0 = x0_uncond + s * (x0_cond - x0_uncond) (Ho & Salimans 2022), both halves in one U-Net call.

    Guidance is linear in the model output, so guiding x0 equals guiding eps or v. ``observer``, if
    given, sees (sigma, x0_cond, x0_uncond) at every call."""
    if uncond is None or guidance_scale == 1.0:
        def denoise_conditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return model(x, sigma, cond, concat)
        return denoise_conditional

    concat2 = None if concat is None else torch.cat([concat, concat])
    uncond_context, cond_context = repeat_to_common_length(unpack(uncond)[0], unpack(cond)[0])
    uncond, cond = with_context(uncond, uncond_context), with_context(cond, cond_context)
    context = cat_conditions([uncond, cond]) if uncond.shape[1] == cond.shape[1] else None

    # a model that treats the unconditional rows apart (ControlNet's "ControlNet is more important") is told
    # how many of the context's first rows are unconditional
    rows = (lambda n: {"uncond_rows": n}) if getattr(model, "takes_unconditional_rows", False) else \
        (lambda n: {})

    def both_halves(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if context is None:  # lengths without a small common multiple: two calls, as AUTOMATIC1111 makes
            return model(x, sigma, uncond, concat, **rows(uncond.shape[0])), model(x, sigma, cond, concat)
        if getattr(model, "accepts_several_contexts", False):  # the latent once, for both contexts
            return model(x, sigma, context, concat, **rows(uncond.shape[0])).chunk(2)
        return model(torch.cat([x, x]), torch.cat([sigma, sigma]), context, concat2,
                     **rows(uncond.shape[0])).chunk(2)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_image(sigma, x)
        x0_uncond, x0_cond = both_halves(x, sigma)
        if observer is not None:
            observer(sigma, x0_cond, x0_uncond)
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond)

    return denoise


def repeat_to_common_length(uncond: torch.Tensor, cond: torch.Tensor, max_factor: int = 4
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts of different lengths (long prompts are 77·k tokens) made equal by repeating each whole.

    Attention over a context repeated n times equals attention over it once (every key and value appears
    n times, so the softmax weights are divided by n and the sum is unchanged), so this is exactly what
    encoding each half separately gives, and both halves still run in one batched U-Net call. Where the
    common length would be more than ``max_factor`` times the longer one, they are returned as they are."""
    a, b = uncond.shape[1], cond.shape[1]
    if a == b:
        return uncond, cond
    common = math.lcm(a, b)
    if common > max_factor * max(a, b):
        return uncond, cond
    return uncond.repeat(1, common // a, 1), cond.repeat(1, common // b, 1)


COMPOSABLE_MAX_ROWS = 8  # latents per U-Net call in composable guidance, unless one plain CFG batch holds more


def composable_guidance(model: ModelDenoiser, conds: list[torch.Tensor], weights: list[list[float]],
                        uncond: torch.Tensor, guidance_scale: float, concat: torch.Tensor | None = None,
                        max_rows: int = COMPOSABLE_MAX_ROWS,
                        observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
                        ) -> Denoise:
    """Composable diffusion (Liu et al. 2022), as AUTOMATIC1111 combines it for ``a cat :1.2 AND a dog``:

        x0 = x0_uncond + sum_i w_i * s * (x0_cond_i - x0_uncond)

    ``conds`` are every sub-prompt's context (1, T_i, W), image by image; ``weights[b]`` are image b's
    sub-prompt weights, one per context; ``uncond`` is (B, T, W). All rows and the uncond go through the
    U-Net together, in calls of at most ``max_rows`` latents (at least one plain CFG batch) and one context
    length each: contexts of different lengths (long prompts) are repeated to a common length where it is
    small, as ``repeat_to_common_length`` does (exact: attention over a repeated context is the same).
    ``observer`` sees (sigma, x0_cond, x0_uncond) with x0_cond the sub-prompts' combination at scale 1, so that
    x0 = x0_uncond + s * (x0_cond - x0_uncond) as in plain guidance."""
    batch = uncond.shape[0]
    owner = [b for b, image_weights in enumerate(weights) for _ in image_weights]  # the image of each cond row
    if len(owner) != len(conds) or len(weights) != batch:
        raise ValueError(f"composable_guidance: {len(conds)} cond rows for {len(owner)} weights over "
                         f"{len(weights)} images; uncond has {batch}")
    contexts = [c[0] for c in conds] + list(uncond.unbind(0))  # each (T, W)
    latent_of_row = owner + list(range(batch))
    longest = max(c.shape[0] for c in contexts)
    common = math.lcm(*{c.shape[0] for c in contexts})
    if common <= 4 * longest:
        contexts = [c.repeat(common // c.shape[0], 1) for c in contexts]
    groups: dict[int, list[int]] = {}
    for row, context in enumerate(contexts):
        groups.setdefault(context.shape[0], []).append(row)
    max_rows = max(max_rows, 2 * batch)
    calls = [(rows[i:i + max_rows], torch.stack([contexts[r] for r in rows[i:i + max_rows]]))
             for rows in groups.values() for i in range(0, len(rows), max_rows)]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_image(sigma, x)
        x0_rows: list[torch.Tensor | None] = [None] * len(contexts)
        for rows, context in calls:
            index = torch.tensor([latent_of_row[r] for r in rows], device=x.device)
            out = model(x[index], sigma[index], context, None if concat is None else concat[index])
            for r, x0 in zip(rows, out):
                x0_rows[r] = x0
        x0_uncond = torch.stack(x0_rows[len(owner):])
        denoised = x0_uncond.clone()
        row = 0
        for b, image_weights in enumerate(weights):
            for weight in image_weights:
                denoised[b] += (x0_rows[row] - x0_uncond[b]) * (weight * guidance_scale)
                row += 1
        if observer is not None:
            combined = x0_uncond.clone()
            row = 0
            for b, image_weights in enumerate(weights):
                for weight in image_weights:
                    combined[b] += (x0_rows[row] - x0_uncond[b]) * weight
                    row += 1
            observer(sigma, combined, x0_uncond)
        return denoised

    return denoise
