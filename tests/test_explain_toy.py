"""`torchsd explain --toy`: our DDPM code learns a 2-D joint distribution whose truth is known.

Tolerances (samples of a model trained 1000 steps, 4000 samples, 100 DDPM steps); measured over seeds
0-3 at this budget the worst cases were 0.037 std for a mean, 0.95 for a std ratio, 3.8 cm for a binned
conditional mean. We assert:
  - each marginal mean within 0.08 standard deviations of the truth,
  - each marginal standard deviation within 8% of the truth,
  - mean height per age bin (bins with >= 100 samples) within 5 cm of the truth, 2.5 cm on average.
A bivariate Gaussian with the data's mean and covariance meets the first two (by construction) and
misses the third by ~14 cm: the conditional check is what tells a learned joint from a correlated blob.
"""

import pytest
import torch

from torchsd.explain.toy import AgeHeight, conditional_means, train_toy

AGE_BINS = torch.tensor([1.0, 2, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 18])
MEAN_TOL, STD_TOL, BIN_TOL_CM, AVG_BIN_TOL_CM, MIN_BIN = 0.08, 0.08, 5.0, 2.5, 100


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a 128-wide MLP gains little from threads and loses a lot to spin-waiting when cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binned_errors(points: torch.Tensor, truth: AgeHeight) -> torch.Tensor:
    _, means, counts = conditional_means(points, AGE_BINS)
    return (means - truth.mean_height_in(AGE_BINS)).abs()[counts >= MIN_BIN]


def test_the_truth_agrees_with_its_own_sampler():
    """Integrals (moments, densities) and the sampler are separate code: they must agree."""
    d = AgeHeight()
    points = d.sample(400_000, torch.Generator().manual_seed(7))
    moments = d.moments()
    for i, name in enumerate(("age", "height")):
        assert points[:, i].mean() == pytest.approx(moments[f"{name}_mean"], rel=2e-3)
        assert points[:, i].std() == pytest.approx(moments[f"{name}_std"], rel=5e-3)
    heights = torch.linspace(0, 260, 2601, dtype=torch.float64)
    assert torch.trapezoid(d.height_density(heights), heights) == pytest.approx(1.0, abs=1e-4)
    assert torch.trapezoid(d.age_density(d.age_grid), d.age_grid) == pytest.approx(1.0, abs=1e-4)
    assert torch.trapezoid(d.conditional_density(heights, 9.0), heights) == pytest.approx(1.0, abs=1e-6)
    assert binned_errors(points, d).max() < 0.3  # cm: Monte Carlo error of ~10^4 points per bin


def test_toy_model_learns_marginals_and_the_conditional_mean():
    d = AgeHeight()
    model = train_toy(d, train_steps=1000, batch_size=512, seed=0)
    assert sum(model.losses[-100:]) / 100 < sum(model.losses[:100]) / 100
    samples = model.sample(4000, steps=100, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (4000, 2) and torch.isfinite(samples).all()
    truth = d.moments()
    for i, name in enumerate(("age", "height")):
        mean, std = truth[f"{name}_mean"], truth[f"{name}_std"]
        assert abs(float(samples[:, i].mean()) - mean) < MEAN_TOL * std, name
        assert abs(float(samples[:, i].std()) / std - 1) < STD_TOL, name

    errors = binned_errors(samples, d)
    assert len(errors) >= 10
    assert errors.max() < BIN_TOL_CM and errors.mean() < AVG_BIN_TOL_CM

    data = model.data
    gaussian = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
    baseline = binned_errors(gaussian.sample((4000,)), d)
    assert baseline.max() > 2 * BIN_TOL_CM  # the check can fail: a correlated Gaussian does


def test_train_toy_rejects_empty_budgets():
    with pytest.raises(ValueError, match="train_steps, batch_size must be >= 1"):
        train_toy(train_steps=0)
