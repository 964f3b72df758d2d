"""Measure each sampler's accuracy against the closed-form Gaussian case (tests/gaussian_data.py).

Prints two Markdown tables (the ones in docs/samplers.md):
1. the error of the deterministic solvers at sigma_min after n evenly spaced log-sigma steps from sigma_max,
   and the measured order (slope of log error against log n);
2. the spread of 20000 samples after 30 steps of every sampler on its automatic schedule, against the data's.

    PYTHONPATH=src python benchmarks/sampler_orders.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gaussian_data import MU, ORDERS, STD, flow_error, ideal_denoiser, marginal_std, whitened_normal  # noqa: E402
from torchsd.config import ScheduleConfig  # noqa: E402
from torchsd.diffusion.samplers import SAMPLERS, build_sigmas, resolve_sampler  # noqa: E402
from torchsd.diffusion.schedules import exponential_sigmas, training_sigmas  # noqa: E402

STEPS = (8, 16, 32, 64, 128)


def order_table(schedule: ScheduleConfig) -> None:
    sigma_min, sigma_max = (float(s) for s in training_sigmas(schedule)[[0, -1]])
    print("| sampler | nominal order | " + " | ".join(f"error, {n} steps" for n in STEPS)
          + " | measured order (32 -> 128) |")
    print("|---|---|" + "---|" * len(STEPS) + "---|")
    for name, options, nominal, _ in ORDERS:
        errors = [flow_error(name, exponential_sigmas(sigma_min, sigma_max, n + 1), **options)
                  for n in STEPS]
        slope = math.log(errors[2] / errors[4]) / math.log(STEPS[4] / STEPS[2])
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        print(f"| {label} | {nominal} | " + " | ".join(f"{e:.1e}" for e in errors) + f" | {slope:.2f} |")


def spread_table(schedule: ScheduleConfig, steps: int = 30, samples: int = 20000) -> None:
    print(f"\n| sampler | schedule | std / data std - 1, for data std {', '.join(f'{s:g}' for s in STD.tolist())}"
          " | max mean error |")
    print("|---|---|---|---|")
    xi = whitened_normal(samples)
    for name, spec in SAMPLERS.items():
        _, scheduler = resolve_sampler(name)
        sigmas = build_sigmas(schedule, steps, spec, scheduler)
        x = MU + marginal_std(float(sigmas[0])) * xi
        out = spec.function(ideal_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), **spec.options)
        relative = (out.std(0) / marginal_std(float(sigmas[-1])) - 1).tolist()
        mean_error = float((out.mean(0) - MU).abs().max())
        print(f"| {spec.label} | {scheduler.label} | " + ", ".join(f"{r:+.3f}" for r in relative)
              + f" | {mean_error:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    schedule = ScheduleConfig()
    order_table(schedule)
    spread_table(schedule)
