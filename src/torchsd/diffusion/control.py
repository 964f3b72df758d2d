"""ControlNet residuals inside the denoiser: ``ControlledDenoiser`` wraps a ``ModelDenoiser`` so that every
U-Net call first runs each active ControlNet on the same scaled latents, timestep and context (and SDXL's added
vector y), and hands the summed, scaled residuals to the U-Net. T2I-Adapters ride along: their features (per
down level, computed once from the hint) are handed over at the steps where they act. Because the residuals
are computed per call, every sampler (Heun's second evaluation, DPM2's midpoints, a hires pass's own sigmas)
sees control at the level it evaluates.

Which units act at a call is decided from sigma: the call belongs to step i of the loop when
sigmas[i] >= sigma > sigmas[i+1], and a unit acts on step i of n unless i/n < start or (i+1)/n > end
(diffusers' ``controlnet_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoisers import ModelDenoiser, sigma_per_image, unpack

SOFT_FACTOR = 0.825  # lllyasviel's guess-mode decay per level: 0.825**12 < 0.01 < 0.826**12


@dataclass
class ControlInput:
    """One ControlNet and its hint, for one sampler loop.

    ``scales``: one factor per residual (the skips', then the middle block's): the unit's weight, or its
    weight times ``soft_scales`` ("My prompt is more important" / guess mode). ``cond_only``: no control on
    the rows of the unconditional context ("ControlNet is more important", the original guess mode)."""

    net: torch.nn.Module
    hint: torch.Tensor  # (1 or B, 3, H, W) in [0, 1]
    scales: list[float]
    start: float = 0.0
    end: float = 1.0
    cond_only: bool = False

    def acts_on(self, step: int, steps: int) -> bool:
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    @property
    def is_adapter(self) -> bool:
        """A T2I-Adapter: features per down level from the hint alone, the same at every step (kept)."""
        return not hasattr(self.net, "controlnet_down_blocks")

    def adapter_features(self) -> list[torch.Tensor]:
        if getattr(self, "_features", None) is None:
            self._features = [f * s for f, s in zip(self.net(self.hint), self.scales, strict=True)]
        return self._features


def soft_scales(weight: float, count: int) -> list[float]:
    """weight * 0.825**(n-1-i): the deepest residual (the middle block's) at full weight, the first at ~1%."""
    return [weight * SOFT_FACTOR ** float(count - 1 - i) for i in range(count)]


class ControlledDenoiser:
    """A ``ModelDenoiser`` whose U-Net calls get the residuals of ``units`` (see the module docstring).

    Classifier-free guidance tells it which context rows are unconditional (``uncond_rows``: the first
    rows); a caller that does not (composable ``AND`` guidance) gets control on every row."""

    takes_unconditional_rows = True

    def __init__(self, model: ModelDenoiser, units: list[ControlInput], sigmas: torch.Tensor):
        self.model = model
        self.units = units
        self.levels = [float(s) for s in sigmas]
        self.prediction_type = model.prediction_type

    @property
    def accepts_several_contexts(self) -> bool:
        return self.model.accepts_several_contexts

    def step_of(self, sigma: float) -> int:
        """The sampler step a call at ``sigma`` belongs to (its interval (sigmas[i+1], sigmas[i]])."""
        steps = len(self.levels) - 1
        at_or_above = sum(1 for level in self.levels[:-1] if level >= sigma * (1 - 1e-5))
        return min(max(at_or_above - 1, 0), steps - 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 concat: torch.Tensor | None = None, *, uncond_rows: int = 0, **unet_inputs) -> torch.Tensor:
        """``unet_inputs``: what an outer wrapper hands the U-Net (an IP-Adapter's keys and values)."""
        if getattr(self.model, "takes_unconditional_rows", False):
            unet_inputs["uncond_rows"] = uncond_rows
        sigma = sigma_per_image(sigma, x)
        steps = max(len(self.levels) - 1, 1)
        step = self.step_of(float(sigma.max()))
        active = [u for u in self.units if u.acts_on(step, steps)]
        if not active:
            return self.model(x, sigma, context, concat, **unet_inputs)
        text, y = unpack(context)  # SDXL: a Condition whose added vector y the ControlNet reads too
        c_in = (1.0 / (sigma ** 2 + 1).sqrt())[:, None, None, None]
        z = (x * c_in).to(text.dtype)
        t = self.model.timestep(sigma) if any(not u.is_adapter for u in active) else None
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        levels: list[torch.Tensor] | None = None
        for unit in active:
            if unit.is_adapter:
                features = unit.adapter_features()
                if unit.cond_only and uncond_rows:
                    features = [_zero_rows(f, context.shape[0], uncond_rows) for f in features]
                levels = features if levels is None else [_add(a, b) for a, b in zip(levels, features)]
                continue
            net_input = z
            if concat is not None and unit.net.config.unet.in_channels > z.shape[1]:  # an inpainting ControlNet
                net_input = torch.cat([z, concat.to(z.dtype)], dim=1)
            unit_down, unit_mid = unit.net(net_input, t, text, unit.hint, **({} if y is None else {"y": y}))
            residuals = [r * s for r, s in zip([*unit_down, unit_mid], unit.scales, strict=True)]
            if unit.cond_only and uncond_rows:
                residuals = [_zero_rows(r, context.shape[0], uncond_rows) for r in residuals]
            down = residuals[:-1] if down is None else [_add(a, b) for a, b in zip(down, residuals[:-1])]
            mid = residuals[-1] if mid is None else _add(mid, residuals[-1])
        inputs = dict(unet_inputs) if down is None else {**unet_inputs, "down_residuals": down, "mid_residual": mid}
        if levels is not None:
            inputs["level_residuals"] = levels
        return self.model(x, sigma, context, concat, **inputs)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows = max(a.shape[0], b.shape[0])
    return _rows(a, rows) + _rows(b, rows)


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *(1,) * (t.ndim - 1))


def _zero_rows(r: torch.Tensor, rows: int, uncond_rows: int) -> torch.Tensor:
    """``r`` with a row per context row and the first ``uncond_rows`` of them zero."""
    r = _rows(r, rows).clone()
    r[:uncond_rows] = 0
    return r
