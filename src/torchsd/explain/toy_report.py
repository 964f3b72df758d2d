"""Figures of the toy age/height diffusion model (see ``toy``): the seed's first section, drawn."""

from __future__ import annotations

import torch

from .report import Section, _new_figure
from .toy import ToyRun, conditional_means

AGE_RANGE = (0.0, 22.0)
HEIGHT_RANGE = (40.0, 190.0)
SLICE_AGES = (3.0, 8.0, 14.0)
SLICE_HALF_WIDTH = 0.5  # samples within ±0.5 years of the slice age stand for p(height | age)


def _truth_grid(run: ToyRun, n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ages = torch.linspace(0.2, AGE_RANGE[1], n, dtype=torch.float64)
    heights = torch.linspace(*HEIGHT_RANGE, n, dtype=torch.float64)
    return ages, heights, run.distribution.joint_density(ages[None, :], heights[:, None])  # (heights, ages)


def _scatter(ax, points: torch.Tensor, title: str, colour: str) -> None:
    ax.scatter(points[:3000, 0].numpy(), points[:3000, 1].numpy(), s=2, alpha=0.35, color=colour, linewidths=0)
    ax.set_xlim(*AGE_RANGE), ax.set_ylim(*HEIGHT_RANGE)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("age (years)")


def joint_section(run: ToyRun) -> Section:
    ages, heights, density = _truth_grid(run)
    figure = _new_figure(1, 3.4)
    axes = figure.subplots(1, 4, sharey=True)
    independent = torch.stack([run.model.data[:, 0], run.model.data[torch.randperm(len(run.model.data),
                               generator=torch.Generator().manual_seed(0)), 1]], dim=1)
    _scatter(axes[0], independent, "age and height drawn independently", "tab:gray")
    _scatter(axes[1], run.model.data, "the data (training set)", "tab:blue")
    _scatter(axes[2], run.samples, "samples from the diffusion model", "tab:orange")
    hist = torch.histogramdd(run.samples.float(), bins=[60, 60], range=[*AGE_RANGE, *HEIGHT_RANGE], density=True)
    axes[3].imshow(hist.hist.T.numpy(), origin="lower", aspect="auto", cmap="Oranges",
                   extent=[*AGE_RANGE, *HEIGHT_RANGE])
    axes[3].set_title("learned joint density (sample histogram)", fontsize=9)
    axes[3].set_xlabel("age (years)")
    levels = float(density.max()) * torch.tensor([0.01, 0.04, 0.15, 0.4, 0.8])  # log-spaced: both bumps show
    for ax in axes:
        ax.contour(ages.numpy(), heights.numpy(), density.numpy(), levels=levels.numpy(), colors="k", linewidths=0.6)
    axes[0].set_ylabel("height (cm)")
    caption = ("Black lines: contours of the true joint density f(age, height). Drawing each variable "
               "independently from its own distribution (left, the seed's coin tosses) gives 3-year-olds of "
               "150 cm; the data and the samples a diffusion model learned from it follow the joint density.")
    return Section("toy-joint", "A joint distribution: age and height", caption, figure)


def marginal_section(run: ToyRun) -> Section:
    d, samples = run.distribution, run.samples
    figure = _new_figure(2, 2.9)
    axes = figure.subplots(2, 3)
    ages = torch.linspace(*AGE_RANGE, 400, dtype=torch.float64)
    heights = torch.linspace(*HEIGHT_RANGE, 400, dtype=torch.float64)

    def histogram(ax, values: torch.Tensor, grid: torch.Tensor, truth: torch.Tensor, title: str, xlabel: str) -> None:
        ax.hist(values.numpy(), bins=50, range=(float(grid[0]), float(grid[-1])), density=True,
                color="tab:orange", alpha=0.6, label="model samples")
        ax.plot(grid.numpy(), truth.numpy(), "k", lw=1.2, label="truth")
        ax.set_title(title, fontsize=9), ax.set_xlabel(xlabel), ax.legend(fontsize=7)

    histogram(axes[0, 0], samples[:, 0], ages, d.age_density(ages), "marginal f_Age(a)", "age (years)")
    histogram(axes[0, 1], samples[:, 1], heights, d.height_density(heights), "marginal f_Height(h)", "height (cm)")
    bins = torch.arange(0.0, 21.0, 1.0)
    centres, means, counts = conditional_means(samples, bins)
    keep = counts >= 20
    axes[0, 2].plot(ages.numpy(), d.mean_height(ages).numpy(), "k", lw=1, label="truth E[h | a]")
    axes[0, 2].plot(centres[keep].numpy(), d.mean_height_in(bins)[keep].numpy(), "kx", ms=6,
                    label="truth: mean height per 1-year bin")
    axes[0, 2].plot(centres[keep].numpy(), means[keep].numpy(), "o", color="tab:orange", ms=4,
                    label="model: mean height per 1-year bin")
    axes[0, 2].set_title("conditional mean of height given age", fontsize=9)
    axes[0, 2].set_xlabel("age (years)"), axes[0, 2].legend(fontsize=7)
    for ax, age in zip(axes[1], SLICE_AGES):
        near = samples[(samples[:, 0] - age).abs() < SLICE_HALF_WIDTH, 1]
        histogram(ax, near, heights, d.conditional_density(heights, age),
                  f"conditional f(h | a = {age:g}): {len(near)} samples within ±{SLICE_HALF_WIDTH:g} y", "height (cm)")
    caption = ("Top: both marginals (integrating the other variable out) and the conditional mean; bottom: "
               "slices f(height | age = a) = f(a, h) / f_Age(a). Orange: the model's samples; black: the truth "
               "(the joint density integrated numerically).")
    return Section("toy-marginals", "Marginals and conditionals, learned vs true", caption, figure)


def process_section(run: ToyRun) -> Section:
    n = len(run.forward)
    figure = _new_figure(2, 2.5)
    axes = figure.subplots(2, n, sharex=True, sharey=True)
    for row, (snapshots, colour, name) in enumerate([(run.forward, "tab:blue", "forward: data → noise"),
                                                      (run.reverse, "tab:orange", "reverse: noise → samples")]):
        for j, snap in enumerate(snapshots):
            ax = axes[row, j]
            ax.scatter(snap.points[:2000, 0].numpy(), snap.points[:2000, 1].numpy(), s=1.5, alpha=0.4,
                       color=colour, linewidths=0)
            ax.set_xlim(-3.5, 3.5), ax.set_ylim(-3.5, 3.5), ax.set_aspect("equal")
            ax.set_title(f"t ≈ {snap.timestep}   √ᾱ = {snap.alpha_bar ** 0.5:.2f}", fontsize=9)
        axes[row, 0].set_ylabel(f"{name}\nheight (standardised)", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("age (standardised)")
    caption = ("Top: the DDPM forward process z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε turns the data into a standard normal "
               "cloud. Bottom: ancestral DDPM sampling (diffusion.samplers.sample_ddpm with the trained MLP) runs "
               "it backwards, from that cloud to the curved, two-bump distribution.")
    return Section("toy-process", "Forward and reverse diffusion in two dimensions", caption, figure)


def toy_sections(run: ToyRun) -> list[Section]:
    return [joint_section(run), marginal_section(run), process_section(run)]
