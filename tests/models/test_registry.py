"""ModelSpec: every built-in model moves with .to() and reports its device."""

import pytest
import torch

from steindiff.models.registry import load_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gmm:toy2d", "digits", "patches"])
def test_built_in_models_move(name, device):
    spec = load_model(name)
    assert spec.device == torch.device("cpu")
    assert spec.to(device) is spec and spec.device.type == device
    x = torch.zeros(2, *spec.sample_shape, device=device)
    out = spec.denoiser(x, torch.full((2,), 1.0, device=device))
    assert out.device.type == device
    if spec.gmm is not None:
        assert spec.gmm.device.type == device and spec.denoiser is spec.gmm


def test_plain_function_model_has_no_device():
    from steindiff.models.registry import ModelSpec
    from steindiff.noise import VEProcess

    spec = ModelSpec("f", lambda x, s: x, VEProcess(), (2,))
    assert spec.device is None and spec.to("cpu") is spec


def test_shipped_patches_model_carries_its_split_metrics_and_calibrations():
    spec = load_model("patches")
    cfg = spec.info["config"]
    assert spec.name == "patches" and spec.sample_shape == (3, 32, 32) and spec.info["metrics"] == "patches"
    assert cfg["data"]["source"] == "patches:flip" and cfg["data"]["holdout"]["by"] == "photo region"
    assert spec.info["heldout"].shape[0] == cfg["data"]["holdout"]["n"] > 1000
    assert spec.info["train"].shape[0] == cfg["data"]["n_train"]
    assert cfg["weights"]["dtype"] == "float16" and spec.info["calibrations"].endswith("calibrations")
