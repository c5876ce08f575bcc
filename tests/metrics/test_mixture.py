"""Mixture metrics against independent references: optimal assignments and closed forms for
sliced-W2, a direct double sum for the MMD, hand-built histograms for mode TV, scipy densities
for the NLL, and the floors' behaviour.  Every helps/hurts verdict is computed from these."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from steindiff.metrics import mixture_metrics, mmd_rbf, mode_tv, nll_per_dim, sliced_w2, traj_err
from steindiff.metrics.mixture import _directions
from steindiff.models import GaussianMixture


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- sliced W2


def test_sliced_w2_of_a_shift_in_one_dimension_is_the_shift():
    """In 1-D both directions are +-1, and W2 between a set and its copy shifted by c is |c|."""
    x = _randn(50, 1, seed=0) ** 3  # not Gaussian, on purpose
    for c in (0.25, 3.0):
        assert sliced_w2(x + c, x) == pytest.approx(c, rel=1e-12)
        assert sliced_w2(x, x - c, n_dirs=7, seed=4) == pytest.approx(c, rel=1e-12)


def test_sliced_w2_equals_optimal_assignment_per_direction():
    """Reference: per direction, the exact W2 between two equal-size empirical sets is the optimal
    assignment of the squared cost (scipy's Hungarian solver, no sorting); sliced W2 is the root of
    the mean over directions.  The directions are the metric's fixed, seeded, unit ones."""
    x = _randn(12, 3, seed=1)
    y = _randn(12, 3, seed=2) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 0.3
    n_dirs = 16
    v = _directions(3, n_dirs, 5)
    assert v.shape == (3, n_dirs)
    torch.testing.assert_close(v.norm(dim=0), torch.ones(n_dirs, dtype=torch.float64))
    px, py = (x @ v).numpy(), (y @ v).numpy()
    w2sq = []
    for j in range(n_dirs):
        cost = (px[:, j, None] - py[None, :, j]) ** 2
        r, c = linear_sum_assignment(cost)
        w2sq.append(cost[r, c].mean())
    ref = math.sqrt(float(np.mean(w2sq)))
    assert sliced_w2(x, y, n_dirs=n_dirs, seed=5) == pytest.approx(ref, rel=1e-12)
    assert sliced_w2(y, x, n_dirs=n_dirs, seed=5) == pytest.approx(ref, rel=1e-12)  # symmetric


def test_sliced_w2_between_gaussians_matches_the_closed_form():
    """N(0, I) against N(0, 9 I): every projection is N(0, 1) against N(0, 9), whose W2 is
    |1 - 3| = 2 whatever the direction; samples of 2000 approach it (empirical W2 is biased up by
    a few hundredths at this size)."""
    n, d = 2000, 3
    x = _randn(n, d, seed=3)
    assert sliced_w2(x, 3.0 * _randn(n, d, seed=4)) == pytest.approx(2.0, abs=0.12)
    assert sliced_w2(x, _randn(n, d, seed=5)) < 0.12


def test_sliced_w2_rejects_unequal_sizes():
    with pytest.raises(ValueError, match="equal-size"):
        sliced_w2(torch.zeros(3, 2), torch.zeros(4, 2))


# ---------------------------------------------------------------------------- MMD


def _mmd_double_sum(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD, RBF kernel exp(-d^2 / b) with b the median squared distance over the
    distinct pairs of the pooled set (an odd number of pairs here, so the median is unambiguous)."""
    z = np.concatenate([x, y])
    N = len(z)
    pairs = [((z[i] - z[j]) ** 2).sum() for i in range(N) for j in range(i + 1, N)]
    assert len(pairs) % 2 == 1
    b = float(np.median(pairs))

    def k(a, c):
        return math.exp(-((a - c) ** 2).sum() / b)

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


@pytest.mark.parametrize("n,m", [(5, 6), (4, 3)])
def test_mmd_rbf_matches_a_direct_double_sum(n, m):
    x = _randn(n, 3, seed=6)
    y = _randn(m, 3, seed=7) * 1.5 + 0.4
    ref = _mmd_double_sum(x.numpy(), y.numpy())
    assert abs(ref) > 1e-3
    assert mmd_rbf(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_mmd_rbf_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    x, y = _randn(400, 2, seed=8), _randn(400, 2, seed=9)
    same = mmd_rbf(x, y)
    assert abs(same) < 5e-3
    assert mmd_rbf(x, y + 0.5) > 0.02 > 4 * abs(same)
    assert mmd_rbf(x, y + 2.0) > mmd_rbf(x, y + 0.5)


# ---------------------------------------------------------------------------- mode TV


@pytest.fixture(scope="module")
def three_modes():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), s2=0.1)


def test_mode_tv_on_hand_built_assignments(three_modes):
    g = three_modes
    jitter = 0.1 * _randn(10, 2, seed=10)

    def points(counts):
        return torch.cat([g.means[k].expand(c, 2) for k, c in enumerate(counts)]) + jitter[: sum(counts)]

    # histogram (0.2, 0.5, 0.3) against weights (0.5, 0.3, 0.2): TV = (0.3 + 0.2 + 0.1) / 2
    assert mode_tv(points([2, 5, 3]), g) == pytest.approx(0.3, abs=1e-12)
    assert mode_tv(points([5, 3, 2]), g) == pytest.approx(0.0, abs=1e-12)
    # every sample in the lightest mode: (0.5 + 0.3 + 0.8) / 2
    assert mode_tv(points([0, 0, 10]), g) == pytest.approx(0.8, abs=1e-12)


# ---------------------------------------------------------------------------- NLL


def _two_component_mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(11)
    d = 3
    a = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) * 0.3 + 0.2 * torch.eye(d, dtype=torch.float64)
    means = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 0.5, 1.0]], dtype=torch.float64)
    return GaussianMixture.from_covariances(means, covs, torch.tensor([0.3, 0.7], dtype=torch.float64)), covs


def test_nll_per_dim_matches_scipy_densities():
    gmm, covs = _two_component_mixture()
    x = gmm.sample(40, seed=12) + 0.3 * _randn(40, 3, seed=13)  # off the mixture too
    xs = x.numpy()
    logp = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(xs)
                     for w, m, c in zip(gmm.weights.numpy(), gmm.means.numpy(), covs.numpy())])
    ref = -float(np.mean(logsumexp(logp, axis=0))) / 3
    assert nll_per_dim(x, gmm) == pytest.approx(ref, rel=1e-10)


# ---------------------------------------------------------------------------- floors


@pytest.fixture(scope="module")
def line_mixture():
    """1-D, two well separated modes: its differential entropy is log 2 + log(2 pi e s^2)/2 up to
    the overlap (negligible at 8 standard deviations)."""
    return GaussianMixture(torch.tensor([[-2.0], [2.0]], dtype=torch.float64), s2=0.25)


@pytest.fixture(scope="module")
def gaussian2d():
    return GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), s2=1.0)


def test_true_samples_sit_at_the_floors(gaussian2d, line_mixture):
    """A third true set is, on average over seeds, as far from the reference set as the floor's
    true set is (both are the sampling noise of two true sets); its NLL is the entropy per dimension,
    its mode histogram the weights, its MMD ~0."""
    ms = [mixture_metrics(gaussian2d.sample(1000, seed=40 + s), gaussian2d, seed=s, mmd=s == 0) for s in range(4)]
    ratio = np.mean([m["sw2"] for m in ms]) / np.mean([m["sw2_floor"] for m in ms])
    assert 0.7 < ratio < 1.4
    assert all(0 < m["sw2_floor"] < 0.2 for m in ms)
    assert abs(ms[0]["mmd"]) < 2e-3 and abs(ms[0]["mmd_floor"]) < 2e-3
    assert np.mean([m["nll"] for m in ms]) == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=0.03)
    m = mixture_metrics(line_mixture.sample(1000, seed=41), line_mixture, seed=0)
    assert m["mode_tv"] < 0.05
    assert m["nll"] == pytest.approx(math.log(2) + 0.5 * math.log(2 * math.pi * math.e * 0.25), abs=0.05)


def test_the_floor_shrinks_with_the_sample_size(gaussian2d):
    def mean_floor(n):
        return np.mean([mixture_metrics(gaussian2d.sample(n, seed=s), gaussian2d,
                                        seed=s)["sw2_floor"] for s in range(4)])

    assert mean_floor(250) > 2 * mean_floor(2000)  # ~ 1/sqrt(n): 2.8x expected


def test_shifted_samples_exceed_the_floor_by_the_shift(line_mixture):
    """In 1-D, W2(x + c, a)^2 = W2(x, a)^2 + 2 c (mean x - mean a) + c^2 exactly; with n = 2000
    the cross term is within +-0.4 c (3 standard deviations), so sliced-W2 of the shifted set is
    sqrt(sw2^2 + c^2) up to that.  The NLL rises by the Gaussian amount c^2 / (2 s^2) for a shift
    small against the separation, and a large shift moves samples across the modes' boundary."""
    g = line_mixture
    x = g.sample(2000, seed=32)
    base = mixture_metrics(x, g, seed=1)
    for c in (0.3, 3.0):
        sh = mixture_metrics(x + c, g, seed=1)
        assert sh["sw2_floor"] == base["sw2_floor"]
        assert sh["sw2"] ** 2 == pytest.approx(base["sw2"] ** 2 + c**2, abs=0.4 * c)
    assert sh["sw2"] > 10 * sh["sw2_floor"]
    small = mixture_metrics(x + 0.3, g, seed=1)
    assert small["nll"] - base["nll"] == pytest.approx(0.3**2 / (2 * 0.25), rel=0.1)
    # shifted by 3, a left-mode sample -2 + 0.5 z lands above the boundary 0 when z > -2
    p_cross = float(norm.sf(-2.0))
    assert sh["mode_tv"] == pytest.approx(0.5 * p_cross, abs=0.03)


# ---------------------------------------------------------------------------- traj_err, options, the metrics record


def test_traj_err_is_the_rms_distance_per_dimension():
    ref = _randn(6, 1, 2, 2, seed=50)
    assert traj_err(ref + 0.25, ref) == pytest.approx(0.25, rel=1e-12)
    x = ref.clone()
    x[0, 0, 0, 0] += 2.0  # one coordinate of 24 off by 2: sqrt(4 / 24)
    assert traj_err(x, ref) == pytest.approx(math.sqrt(4 / 24), rel=1e-12)


def test_mmd_uses_the_first_max_n_samples_of_each_set():
    x, y = _randn(9, 3, seed=51), _randn(8, 3, seed=52) + 0.5
    assert mmd_rbf(x, y, max_n=5) == pytest.approx(_mmd_double_sum(x[:5].numpy(), y[:5].numpy()), rel=1e-10)
    assert mmd_rbf(x, y, max_n=5) != pytest.approx(mmd_rbf(x, y), rel=1e-3)


def test_sliced_w2_uses_256_fixed_directions_by_default():
    """The protocol's sliced W2: 256 fixed random directions (seed 0)."""
    x, y = _randn(30, 4, seed=53), 1.3 * _randn(30, 4, seed=54)
    assert sliced_w2(x, y) == sliced_w2(x, y, n_dirs=256, seed=0)
    assert sliced_w2(x, y) != sliced_w2(x, y, n_dirs=64, seed=0)
    assert sliced_w2(x, y) != sliced_w2(x, y, n_dirs=256, seed=1)


def test_mixture_metrics_record(three_modes):
    """The metrics of mixture_metrics are the functions of this module applied to the samples; the floors do
    not depend on the samples, the true sets do depend on the seed (and the two true sets of a seed differ)."""
    g = three_modes
    x = g.sample(200, seed=60) + 0.2
    ref = g.sample(200, seed=61)
    m = mixture_metrics(x, g, seed=2, ref=ref, mmd=True)
    assert set(m) == {"sw2", "sw2_floor", "mode_tv", "nll", "mmd", "mmd_floor", "traj_err"}
    assert m["traj_err"] == traj_err(x, ref) and m["nll"] == nll_per_dim(x, g) and m["mode_tv"] == mode_tv(x, g)
    other = mixture_metrics(g.sample(200, seed=62), g, seed=2, mmd=True)
    assert set(other) == {"sw2", "sw2_floor", "mode_tv", "nll", "mmd", "mmd_floor"}
    assert other["sw2_floor"] == m["sw2_floor"] and other["mmd_floor"] == m["mmd_floor"]
    seed3 = mixture_metrics(x, g, seed=3, mmd=True)
    assert seed3["sw2"] != m["sw2"] and seed3["sw2_floor"] != m["sw2_floor"] and seed3["mmd"] != m["mmd"]
    assert seed3["mmd_floor"] != m["mmd_floor"]
    assert mixture_metrics(x, g, seed=2)["sw2"] == m["sw2"]  # reproducible
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mixture_metrics(bad, g)
