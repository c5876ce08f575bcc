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


@pytest.mark.parametrize("name", ["digits", "digits-flow", "patches"])
def test_shipped_models_sample_by_default_with_a_shipped_calibration(name):
    """Each shipped model declares the solver, schedule and NFE it samples with unless told
    (``sampling_defaults.json``), and a calibration ships for exactly that, with the options it declares: so
    ``steindiff sample --model NAME --stabilizer auto`` never fits."""
    from steindiff.calibration import calibrated_plan
    from steindiff.plan import make_plan

    spec = load_model(name)
    d = spec.info["sampling_defaults"]
    assert d["n"] == 64  # `steindiff sample` draws 64 samples unless told: seconds, not minutes
    base = make_plan(spec.process, d["solver"], d["nfe"], d["schedule"])
    plan = calibrated_plan(spec, base, calibrate_missing="never", notice=pytest.fail)
    assert plan is not base and plan.gammas is not None


def test_a_malformed_sampling_defaults_file_is_refused_naming_it(tmp_path):
    import shutil

    from steindiff.models.trained import DIGITS_DIR, SAMPLING_DEFAULTS_FILE

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(DIGITS_DIR / f, ckpt / f)
    (ckpt / SAMPLING_DEFAULTS_FILE).write_text('{"solver": "eulr", "nfe": 4}')
    with pytest.raises(ValueError, match=f"{SAMPLING_DEFAULTS_FILE}: sampling defaults must be.*'eulr'"):
        load_model(str(ckpt))
    (ckpt / SAMPLING_DEFAULTS_FILE).write_text('{"solver": "heun", "nfe": 5}')
    assert load_model(str(ckpt)).info["sampling_defaults"] == {"solver": "heun", "nfe": 5}
