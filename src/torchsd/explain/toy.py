"""The seed's first section made concrete: a diffusion model of a 2-D joint distribution (age, height).

The data: age from a two-bump mixture (young children and teenagers), height given age from a growth
curve whose spread widens with age. That is correlated, curved and skewed: nothing like one Gaussian,
so "toss a coin for each variable" fails on it, as the seed says. Every truth (the joint density,
both marginals, p(height | age)) is known in closed form or by a 1-D integral, so what the model
learned can be checked against it.

The model is a small MLP that predicts the added noise eps from (z_t, t), the DDPM objective of Ho et
al. 2020. It is trained on the schedule of ``diffusion.schedules`` and sampled by
``diffusion.samplers.sample_ddpm`` through ``diffusion.denoisers.ModelDenoiser``: the code paths the
U-Net of Stable Diffusion goes through. Points travel as (B, 2, 1, 1) "images" of one pixel with two
channels, so those adapters apply unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BetaSchedule, ScheduleConfig, TimestepSpacing
from ..diffusion.denoisers import ModelDenoiser
from ..diffusion.samplers import Callback, Step, build_sigmas, get_sampler, initial_noise_scale, sample_ddpm
from ..diffusion.schedules import alphas_cumprod, q_sample, training_sigmas
from ..models.layers import timestep_embedding
from ..noise import Generators, randn

# Ho et al. 2020's schedule: 1000 steps, betas linear from 1e-4 to 0.02; visited evenly when sampling.
TOY_SCHEDULE = ScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule=BetaSchedule.LINEAR,
                              timestep_spacing=TimestepSpacing.LINSPACE, steps_offset=0)
NO_CONTEXT = torch.zeros(0)  # the toy model is unconditional; the denoiser still passes a context along


def _normal_pdf(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@dataclass(frozen=True)
class AgeHeight:
    """p(age): a mixture of log-normals (years); p(height | age) = N(growth(age), spread(age)^2) (cm)."""

    weights: tuple[float, ...] = (0.6, 0.4)
    log_medians: tuple[float, ...] = (math.log(4.0), math.log(13.0))
    log_stds: tuple[float, ...] = (0.35, 0.15)
    birth_height: float = 50.0
    height_gain: float = 115.0  # adult height = birth_height + height_gain
    growth_years: float = 6.0  # growth(age) = birth + gain * (1 - exp(-age / growth_years))
    spread_at_birth: float = 3.0
    spread_per_year: float = 0.45

    @property
    def age_grid(self) -> torch.Tensor:
        """Where the integrals over age are evaluated: far past the last bump, finely enough for 1e-6."""
        return torch.linspace(0.01, 40.0, 8000, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 2) float64 points (age, height): pick a bump, draw the age, then the height given the age."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        bump = torch.bucketize(u, torch.tensor(self.weights, dtype=torch.float64).cumsum(0)[:-1])
        medians, stds = torch.tensor(self.log_medians)[bump], torch.tensor(self.log_stds)[bump]
        age = torch.exp(medians + stds * torch.randn(n, generator=generator, dtype=torch.float64))
        height = self.mean_height(age) + self.height_std(age) * torch.randn(n, generator=generator,
                                                                             dtype=torch.float64)
        return torch.stack([age, height], dim=1)

    def age_density(self, age: torch.Tensor) -> torch.Tensor:
        """f_Age(a): each bump is log-normal, density N(log a) / a."""
        age = torch.as_tensor(age, dtype=torch.float64).clamp_min(1e-9)
        return sum(w * _normal_pdf(age.log(), m, s) / age
                   for w, m, s in zip(self.weights, self.log_medians, self.log_stds))

    def mean_height(self, age: torch.Tensor) -> torch.Tensor:
        """E[height | age], the growth curve."""
        return self.birth_height + self.height_gain * (1 - torch.exp(-torch.as_tensor(age) / self.growth_years))

    def height_std(self, age: torch.Tensor) -> torch.Tensor:
        return self.spread_at_birth + self.spread_per_year * torch.as_tensor(age)

    def conditional_density(self, height: torch.Tensor, age: float) -> torch.Tensor:
        """f_Height|Age(h | a) = f_Age,Height(a, h) / f_Age(a)."""
        age_t = torch.tensor(float(age), dtype=torch.float64)
        return _normal_pdf(torch.as_tensor(height, dtype=torch.float64), self.mean_height(age_t),
                           self.height_std(age_t))

    def joint_density(self, age: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
        """f_Age,Height(a, h) = f_Age(a) f_Height|Age(h | a), broadcasting age against height."""
        age, height = torch.as_tensor(age, dtype=torch.float64), torch.as_tensor(height, dtype=torch.float64)
        return self.age_density(age) * _normal_pdf(height, self.mean_height(age), self.height_std(age))

    def height_density(self, height: torch.Tensor) -> torch.Tensor:
        """f_Height(h) = integral of f_Age,Height(a, h) da (trapezoid rule over ``age_grid``)."""
        height = torch.as_tensor(height, dtype=torch.float64)
        joint = self.joint_density(self.age_grid[None, :], height.reshape(-1, 1))  # (H, A)
        return torch.trapezoid(joint, self.age_grid, dim=1).reshape(height.shape)

    def mean_height_in(self, age_bins: torch.Tensor) -> torch.Tensor:
        """E[height | age in bin i] for the bins between consecutive ``age_bins``: the growth curve
        averaged over f_Age inside the bin (what a binned mean of samples estimates)."""
        a = self.age_grid
        weight, weighted = self.age_density(a), self.age_density(a) * self.mean_height(a)
        means = []
        for low, high in zip(age_bins[:-1].tolist(), age_bins[1:].tolist()):
            inside = (a >= low) & (a <= high)
            means.append(torch.trapezoid(weighted[inside], a[inside]) / torch.trapezoid(weight[inside], a[inside]))
        return torch.stack(means)

    def moments(self) -> dict[str, float]:
        """Mean and standard deviation of each marginal, by integration over age."""
        a, p = self.age_grid, self.age_density(self.age_grid)
        integrate = lambda f: float(torch.trapezoid(f * p, a))  # noqa: E731
        age_mean = integrate(a)
        height_mean = integrate(self.mean_height(a))
        # law of total variance: Var h = E[Var(h | a)] + Var(E[h | a])
        height_var = integrate(self.height_std(a) ** 2 + (self.mean_height(a) - height_mean) ** 2)
        return {"age_mean": age_mean, "age_std": integrate((a - age_mean) ** 2) ** 0.5,
                "height_mean": height_mean, "height_std": height_var ** 0.5}


class ToyNet(nn.Module):
    """eps-prediction MLP with the U-Net's call signature: (z_t (B, 2, 1, 1), t (B,), context) -> eps."""

    def __init__(self, width: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.time_proj = nn.Linear(time_dim, width)
        self.layers = nn.ModuleList([nn.Linear(2, width)] + [nn.Linear(width, width) for _ in range(depth - 1)])
        self.out = nn.Linear(width, 2)

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        t_emb = self.time_proj(timestep_embedding(timesteps, self.time_dim))  # (B, width)
        h = z.flatten(1)
        for i, layer in enumerate(self.layers):
            h = F.silu(layer(h) + (t_emb if i == 0 else 0))
        return self.out(h).view_as(z)


@dataclass
class ToyModel:
    """A trained toy denoiser, and how to go between data units and the unit-scale space it works in."""

    net: ToyNet
    schedule: ScheduleConfig
    data: torch.Tensor  # (N, 2) the training set, in data units
    mean: torch.Tensor  # (2,) standardisation: the model sees (x - mean) / std
    std: torch.Tensor
    losses: list[float]

    @property
    def denoiser(self) -> ModelDenoiser:
        return ModelDenoiser(self.net, self.schedule)

    def standardise(self, points: torch.Tensor) -> torch.Tensor:
        return (points - self.mean) / self.std

    def to_data_units(self, points: torch.Tensor) -> torch.Tensor:
        return points * self.std + self.mean

    @torch.no_grad()
    def sample(self, n: int, *, steps: int = 250, generator: Generators = None,
               callback: Callback | None = None) -> torch.Tensor:
        """(n, 2) points in data units, by DDPM ancestral sampling from pure noise."""
        denoiser = self.denoiser

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return denoiser(x, sigma, NO_CONTEXT)

        sigmas = build_sigmas(self.schedule, steps, get_sampler("ddpm")).float()
        x = randn((n, 2, 1, 1), generator) * initial_noise_scale(sigmas, get_sampler("ddpm"))
        x = sample_ddpm(denoise, x, sigmas, generator=generator, callback=callback)
        return self.to_data_units(x.flatten(1).double())


def train_toy(distribution: AgeHeight | None = None, *, train_steps: int = 3000, batch_size: int = 1024,
              num_points: int = 20_000, learning_rate: float = 3e-3, seed: int = 0,
              schedule: ScheduleConfig = TOY_SCHEDULE) -> ToyModel:
    """Fit ``ToyNet`` to ``num_points`` draws of ``distribution`` with the DDPM loss ||eps - eps_theta(z_t, t)||^2."""
    if train_steps < 1 or batch_size < 1 or num_points < 2:
        raise ValueError(f"train_steps, batch_size must be >= 1 and num_points >= 2; "
                         f"got {train_steps}, {batch_size}, {num_points}")
    distribution = distribution or AgeHeight()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the network's initial weights
    data = distribution.sample(num_points, generator)
    mean, std = data.mean(0), data.std(0)
    x0_all = ((data - mean) / std).float()
    net = ToyNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=train_steps)
    n_t = schedule.num_train_timesteps
    losses = []
    for _ in range(train_steps):
        x0 = x0_all[torch.randint(num_points, (batch_size,), generator=generator)][:, :, None, None]
        t = torch.randint(n_t, (batch_size,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        loss = F.mse_loss(net(q_sample(schedule, x0, t, eps), t), eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        losses.append(loss.item())
    net.eval().requires_grad_(False)
    return ToyModel(net, schedule, data, mean, std, losses)


def conditional_means(points: torch.Tensor, age_bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean height of the points in each age bin: (bin centres, means, counts)."""
    age, height = points[:, 0].contiguous(), points[:, 1]
    which = torch.bucketize(age, age_bins) - 1
    centres, means, counts = [], [], []
    for i in range(len(age_bins) - 1):
        inside = which == i
        centres.append(float(age_bins[i:i + 2].mean()))
        counts.append(int(inside.sum()))
        means.append(float(height[inside].mean()) if counts[-1] else float("nan"))
    return torch.tensor(centres), torch.tensor(means), torch.tensor(counts)


SHOWN_TIMESTEPS = (0, 50, 150, 300, 500, 999)


@dataclass
class Snapshot:
    timestep: int
    alpha_bar: float
    points: torch.Tensor  # (n, 2) standardised: the space the model works in, N(0, I) at the end of the schedule


@dataclass
class ToyRun:
    """A trained toy model, samples from it, and the forward and reverse processes at a few timesteps."""

    distribution: AgeHeight
    model: ToyModel
    samples: torch.Tensor  # (n, 2) in data units
    forward: list[Snapshot]  # the training data dissolving: q_sample at SHOWN_TIMESTEPS
    reverse: list[Snapshot]  # the sampler's points at the step whose noise level is nearest each of those


def run_toy(*, train_steps: int = 2000, num_samples: int = 5000, sample_steps: int = 200, seed: int = 0,
            distribution: AgeHeight | None = None) -> ToyRun:
    distribution = distribution or AgeHeight()
    model = train_toy(distribution, train_steps=train_steps, seed=seed)
    schedule = model.schedule
    alpha_bar = alphas_cumprod(schedule)
    generator = torch.Generator().manual_seed(seed + 1)

    shown = torch.tensor(SHOWN_TIMESTEPS)
    x0 = model.standardise(model.data[:2000]).float()
    noise = torch.randn(x0.shape, generator=generator)
    forward = [Snapshot(int(t), float(alpha_bar[t]), q_sample(schedule, x0, t.expand(len(x0)), noise)) for t in shown]

    # keep every step's points on the z scale: z = x / sqrt(1 + sigma^2) at the level the step reached
    trajectory: list[tuple[float, torch.Tensor]] = []

    def on_step(step: Step) -> None:
        trajectory.append((step.sigma, step.x.flatten(1)))

    samples = model.sample(num_samples, steps=sample_steps, generator=generator, callback=on_step)
    levels = [sigma for sigma, _ in trajectory[1:]] + [0.0]  # where each step ended
    sigma_t = training_sigmas(schedule)
    reverse = []
    for t in SHOWN_TIMESTEPS:
        target = float(sigma_t[t]) if t > 0 else 0.0
        i = min(range(len(levels)), key=lambda k: abs(math.log1p(levels[k]) - math.log1p(target)))
        reached = levels[i]
        reverse.append(Snapshot(t, 1 / (1 + reached ** 2), trajectory[i][1] / (1 + reached ** 2) ** 0.5))
    return ToyRun(distribution, model, samples, forward, reverse)
