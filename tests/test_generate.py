"""generate(): where it samples (the model's device, or the one given) and the refusal of a model elsewhere."""

import pytest
import torch

from steindiff.device import DeviceError
from steindiff.generate import generate
from steindiff.models.registry import ModelSpec, load_model
from steindiff.noise import VEProcess

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_same_samples_on_any_device(device):
    """The noise is drawn on the CPU and moved: one seed, the same samples (up to rounding)."""
    cpu = generate(load_model("gmm:toy2d"), nfe=4, n=20, seed=5, dtype=torch.float64, device="cpu")
    spec = load_model("gmm:toy2d").to(device)
    got = generate(spec, nfe=4, n=20, seed=5, dtype=torch.float64)  # follows the model
    assert got.x.device.type == device and got.noise.device.type == device
    torch.testing.assert_close(got.x.cpu(), cpu.x, rtol=1e-10, atol=1e-12)
    given = generate(spec, nfe=4, n=20, dtype=torch.float64, noise=cpu.noise)  # CPU noise given: moved
    torch.testing.assert_close(given.x.cpu(), cpu.x, rtol=1e-10, atol=1e-12)


def test_model_on_another_device_is_refused_before_any_work():
    class Elsewhere:
        device = torch.device("cuda:1")

        def __call__(self, x, sigma):
            raise AssertionError("must not run")

    spec = ModelSpec("elsewhere", Elsewhere(), VEProcess(), (2,))
    with pytest.raises(DeviceError, match="model is on cuda:1 but the state x is on cpu"):
        generate(spec, nfe=3, n=4, device="cpu")
