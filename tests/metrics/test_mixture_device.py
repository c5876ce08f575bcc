"""Mixture metrics on any device: computed where the mixture lives, the same numbers as on the CPU."""

import pytest
import torch

from steindiff.metrics import mixture_metrics, sliced_w2, traj_err
from steindiff.models import get_gmm


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="no CUDA device"))])
def test_metrics_follow_the_mixture_device(device):
    ref = get_gmm("gmm:image64")
    x = ref.sample(300, sigma=0.05, seed=1).to(torch.float32)
    base = mixture_metrics(x, ref, seed=2, ref=x * 1.01, mmd=True)
    g = get_gmm("gmm:image64").to(device)
    for xs in (x, x.to(device)):  # samples on the CPU or on the device
        got = mixture_metrics(xs, g, seed=2, ref=x * 1.01, mmd=True)
        assert got == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert sliced_w2(x.to(device), x) == pytest.approx(0.0, abs=1e-12)
    assert traj_err(x.to(device), x) == pytest.approx(0.0, abs=1e-12)
