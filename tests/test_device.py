"""steindiff.device: --device names, where a model lives, and the refusal of mismatched devices."""

import pytest
import torch

from steindiff import VEProcess, get_sigmas, prior_noise, sample
from steindiff.device import DeviceError, check_model_device, model_device, resolve_device, same_device
from steindiff.generate import generate
from steindiff.models import EDMPrecond, UNet, UNetConfig, get_gmm
from steindiff.models.registry import ModelSpec

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def tiny_unet() -> EDMPrecond:
    net = UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), attn_levels=(1,)))
    return EDMPrecond(net).eval().requires_grad_(False)


class Placed:
    """A model that says it lives on ``device`` (no tensors needed to test the message)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __call__(self, x, sigma):
        raise AssertionError("must be refused before any work")


def test_resolve_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda",
                                                   torch.cuda.current_device()) if CUDA else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("tpu", "gpu0", "", "cuda:x"):
        with pytest.raises(DeviceError, match="device"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="unsupported device 'meta'"):
        resolve_device("meta")


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_refused(name):
    with pytest.raises(DeviceError, match=f"'{name}' requested but CUDA is not available"):
        resolve_device(name)


@needs_cuda
def test_cuda_names():
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="only .* CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert same_device("cuda", torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.parametrize("device", DEVICES)
def test_model_device(device):
    assert model_device(tiny_unet().to(device)) == resolve_device(device)
    gmm = get_gmm("gmm:toy2d").to(device)
    assert model_device(gmm) == resolve_device(device)
    assert model_device(gmm.denoise) == resolve_device(device)  # a bound method: its object
    assert model_device(lambda x, s: x) is None
    assert model_device(torch.nn.Identity()) is None  # no tensors: cannot tell


@pytest.mark.parametrize("device", DEVICES)
def test_state_on_another_device_names_both(device):
    other = "cuda:1" if device == "cpu" else "cpu"
    x = torch.zeros(2, 3, device=device)
    with pytest.raises(DeviceError) as e:
        check_model_device(Placed(other), x)
    assert other in str(e.value) and str(x.device) in str(e.value)
    sig = get_sigmas("karras", 3, VEProcess())
    with pytest.raises(DeviceError, match=f"model is on {other}"):  # sample refuses before calling the model
        sample(Placed(other), x, sig, "euler")


def test_meta_model_and_meta_state_are_refused():
    with torch.device("meta"):
        net = tiny_unet()
    x = prior_noise((2, 1, 8, 8), 80.0, seed=0)
    with pytest.raises(DeviceError, match="meta device .*load its weights"):
        sample(net, x, get_sigmas("karras", 3, VEProcess()), "euler")
    with pytest.raises(DeviceError, match="the state x is on the meta device"):
        check_model_device(tiny_unet(), torch.empty(2, 1, 8, 8, device="meta"))
    spec = ModelSpec("meta", net, VEProcess(), (1, 8, 8))  # the noise would follow the model: the model is named
    with pytest.raises(DeviceError, match="model's parameters are on the meta device"):
        generate(spec, nfe=3, n=2)


def test_matching_devices_pass():
    check_model_device(tiny_unet(), torch.zeros(1, 1, 8, 8))
    check_model_device(lambda x, s: x, torch.zeros(1))  # unknown device: not checked


def test_exact_float32_turns_tf32_off_and_restores_it_even_on_error():
    from steindiff.device import exact_float32

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        with pytest.raises(RuntimeError, match="inside"):
            with exact_float32():
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
                raise RuntimeError("inside")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def test_tf32_sets_both_flags_either_way_and_restores_them():
    from steindiff.device import tf32

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for before, inside in ((False, True), (True, False)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
            with tf32(inside):
                assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (inside, inside)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before, before)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
