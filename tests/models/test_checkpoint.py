"""Checkpoint folders (steindiff.models.checkpoint, .trained): every config field survives the round trip and
changes what the loaded denoiser computes, checked against the papers' formulas written out here; bad weights
and configs are refused, naming what is wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steindiff.models.checkpoint as C
from steindiff.data import ImageDataset
from steindiff.models import EDMPrecond, VPDenoiser
from steindiff.models.registry import load_model
from steindiff.models.unet import UNet, UNetConfig
from steindiff.noise import DiscreteVPProcess, VEProcess
from steindiff.plan import make_plan

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))
TINY_VP = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(), embedding="positional")


def random_state(cfg: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A U-Net's weights, every one perturbed (a fresh U-Net's output layer is zero, which would hide the
    network's inputs)."""
    net = UNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net.state_dict()


def write(path, cfg: UNetConfig, precond: dict, process: dict, state=None, data=None, **kw):
    config = {"schema": C.CHECKPOINT_SCHEMA, "architecture": {"type": "unet", **cfg.to_dict()}, "precond": precond,
              "process": process, "data": data or {"source": str(path) + "-no-data.npy", "shape": [1, 8, 8]}}
    return C.save_checkpoint(path, config, state if state is not None else random_state(cfg), **kw)


class Inputs:
    """Records what a U-Net is called with."""

    def __init__(self, net):
        self.calls = []
        net.register_forward_pre_hook(lambda mod, args: self.calls.append([a.detach().clone() for a in args[:2]]))


def x_and_sigma(n=4, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.tensor([0.03, 0.7, 2.5, 30.0], dtype=dtype)[:n]


@pytest.mark.parametrize("sigma_data", [0.3, 0.5, 1.2])
def test_edm_checkpoint_uses_its_sigma_data(tmp_path, sigma_data):
    """Karras et al. 2022, Table 1: D = c_skip x + c_out F(c_in x, ln(sigma) / 4) with the checkpoint's
    sigma_data; another sigma_data gives another output."""
    state = random_state(TINY)
    path = write(tmp_path / "edm", TINY, {"type": "edm", "sigma_data": sigma_data},
                 {"type": "ve", "sigma_min": 0.01, "sigma_max": 40.0}, state)
    spec = load_model(str(path))
    assert isinstance(spec.denoiser, EDMPrecond) and spec.denoiser.sigma_data == sigma_data
    assert isinstance(spec.process, VEProcess) and (spec.process.sigma_min, spec.process.sigma_max) == (0.01, 40.0)
    assert spec.sample_shape == (1, 8, 8)
    plan = make_plan(spec.process, "euler", 4, "logsnr")
    assert float(plan.sigmas[0]) == pytest.approx(40.0) and float(plan.sigmas[-2]) == pytest.approx(0.01)

    net = UNet(TINY).eval()
    net.load_state_dict(state)
    x, sigma = x_and_sigma()

    def edm(sd):
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        with torch.no_grad():
            return c_skip * x + c_out * net((c_in * x).float(), (sigma.log() / 4).float()).double()

    with torch.no_grad():
        out = spec.denoiser(x, sigma)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, edm(sigma_data), rtol=1e-5, atol=1e-5)
    other = 0.5 if sigma_data != 0.5 else 0.8
    assert (out - edm(other)).abs().max() > 1e-2


def _ddpm_sigmas(schedule: str, n: int, b0: float, b1: float) -> np.ndarray:
    """VE noise levels of DDPM's discrete process (Ho et al. 2020), written out: linear betas, or the square
    of linear sqrt(betas) (Stable Diffusion's scaled_linear)."""
    betas = np.linspace(b0, b1, n) if schedule == "linear" else np.linspace(b0**0.5, b1**0.5, n) ** 2
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


VP_PROCESSES = [
    {"type": "vp-discrete", "beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001,
     "beta_end": 0.02},
    {"type": "vp-discrete", "beta_schedule": "scaled_linear", "num_train_timesteps": 500, "beta_start": 0.0003,
     "beta_end": 0.015},
]


@pytest.mark.parametrize("process", VP_PROCESSES, ids=["ddpm", "other"])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_vp_checkpoint_uses_its_prediction_process_and_fractional_timesteps(tmp_path, process, prediction):
    """The network sees x_vp = alpha x (alpha = 1/sqrt(1 + sigma^2)) in float32 and the fractional timestep of
    sigma (linear in log sigma between the process's table entries, the k-diffusion convention the
    checkpoint's VP denoiser uses); its output F gives D = x - sigma F (epsilon), alpha^2 x - alpha sigma F
    (v, Salimans & Ho 2022) or F (x0)."""
    state = random_state(TINY_VP, seed=2)
    path = write(tmp_path / "vp", TINY_VP, {"type": "vp", "prediction": prediction}, process, state)
    spec = load_model(str(path))
    assert isinstance(spec.denoiser, VPDenoiser) and isinstance(spec.process, DiscreteVPProcess)
    table = _ddpm_sigmas(process["beta_schedule"], process["num_train_timesteps"], process["beta_start"],
                         process["beta_end"])
    np.testing.assert_allclose(spec.process.sigmas_table.numpy(), table, rtol=1e-10)
    x, _ = x_and_sigma(3)
    i = np.array([5, len(table) // 5, len(table) // 2])
    sigma = torch.from_numpy(np.sqrt(table[i] * table[i + 1]))  # half way between entries in log sigma
    t = np.interp(np.log(sigma.numpy()), np.log(table), np.arange(len(table)))
    assert np.all(np.abs(t - np.round(t)) > 0.2)

    seen = Inputs(spec.denoiser.net)
    with torch.no_grad():
        out = spec.denoiser(x, sigma)
    (x_in, t_in), = seen.calls
    assert x_in.dtype == t_in.dtype == torch.float32 and out.dtype == torch.float64
    s = sigma.reshape(-1, 1, 1, 1)
    alpha = 1 / (1 + s**2).sqrt()
    torch.testing.assert_close(x_in.double(), alpha * x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t_in.double().numpy(), t, rtol=1e-6)

    net = UNet(TINY_VP).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        F = net((alpha * x).float(), torch.from_numpy(t).float()).double()
    expected = {"epsilon": x - s * F, "v": alpha**2 * x - alpha * s * F, "x0": F}
    torch.testing.assert_close(out, expected[prediction], rtol=1e-5, atol=1e-5)
    assert all((out - v).abs().max() > 1e-2 for k, v in expected.items() if k != prediction)


def test_the_ddpm_process_of_vp_training_is_ho_et_al():
    proc = C.make_process(C.VP_PROCESS)
    np.testing.assert_allclose(proc.sigmas_table.numpy(), _ddpm_sigmas("linear", 1000, 1e-4, 0.02), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown process type 'vp-cosine'"):
        C.make_process({"type": "vp-cosine"})
    with pytest.raises(ValueError, match="unknown preconditioning 'rectified'"):
        C.build_denoiser(UNet(TINY), {"precond": {"type": "rectified"}, "process": {"type": "ve", "sigma_min": 0.1,
                                                                                     "sigma_max": 1.0}})


def test_architecture_and_weights_round_trip(tmp_path):
    """The U-Net of the config with the saved values (float16 weights come back as float32, rounded once)."""
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=2, attn_levels=(0,), num_classes=3,
                     embedding="positional")
    state = random_state(cfg, seed=3)
    path = write(tmp_path / "a", cfg, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, state)
    net, config = C.load_checkpoint(path)
    assert net.config.to_dict() == cfg.to_dict() and not net.training
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    rgb = UNetConfig(in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=())
    spec = load_model(str(write(tmp_path / "rgb", rgb, {"type": "edm", "sigma_data": 0.5},
                                {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
                                data={"source": "none.npy", "shape": [3, 16, 24]})))
    assert spec.sample_shape == (3, 16, 24) and spec.denoiser.net.config.in_channels == 3
    half = write(tmp_path / "h", cfg, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, state, weights_dtype=torch.float16)
    net16, _ = C.load_checkpoint(half)
    for k, v in state.items():
        w = net16.state_dict()[k]
        assert w.dtype == v.dtype and torch.equal(w, v.half().to(v.dtype)), k


def test_reference_images_come_from_the_recorded_split(tmp_path):
    """A checkpoint of a user's .npy images: info holds the recorded held-out images and the rest as training
    images, and nothing when the file changed since training."""
    x = np.random.default_rng(0).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", x)
    ds = ImageDataset(torch.from_numpy(x), None, str(tmp_path / "imgs.npy"), "imgs")
    data = {"source": str(tmp_path / "imgs.npy"), "shape": [1, 8, 8], "fingerprint": ds.fingerprint(),
            "holdout": {"n": 3, "seed": 0, "indices": [1, 5, 7]}}
    path = write(tmp_path / "ck", TINY, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, data=data)
    info = load_model(str(path)).info
    assert torch.equal(info["heldout"], torch.from_numpy(x[[1, 5, 7]]))
    assert torch.equal(info["train"], torch.from_numpy(np.delete(x, [1, 5, 7], axis=0)))
    assert info["metrics"] == "digits" and "data_note" not in info
    np.save(tmp_path / "imgs.npy", x[::-1].copy())
    info = load_model(str(path)).info
    assert "heldout" not in info and "changed since training" in info["data_note"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_partly_non_finite_weights_are_refused(tmp_path, value):
    """One bad number in one tensor is enough; the error names the tensor."""
    state = random_state(TINY)
    name = sorted(state)[len(state) // 2]
    state[name] = state[name].clone()
    state[name].view(-1)[1] = value
    assert torch.isfinite(state[name]).float().mean() > 0.5
    path = write(tmp_path / "bad", TINY, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, state)
    with pytest.raises(C.CheckpointError, match=rf"model\.safetensors: tensor {name} contains NaN or Inf"):
        C.load_checkpoint(path)
    with pytest.raises(C.CheckpointError, match="contains NaN or Inf"):
        load_model(str(path))


@pytest.mark.parametrize("key", ["architecture", "precond", "process", "data"])
def test_a_config_without_an_entry_is_refused_by_name(tmp_path, key):
    import json

    path = write(tmp_path / "c", TINY, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0})
    config = json.loads((path / C.CONFIG_FILE).read_text())
    del config[key]
    (path / C.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(C.CheckpointError, match=rf"config\.json: missing the '{key}' entry"):
        C.load_checkpoint(path)
    config[key] = {}
    config["architecture"] = {"type": "resnet", **TINY.to_dict()}
    (path / C.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(C.CheckpointError, match="unsupported architecture type"):
        C.load_checkpoint(path)


def test_edm_denoiser_at_sigma_data_scale_is_not_the_half_default(tmp_path):
    """sigma_data matters most where sigma ~ sigma_data: the skip weight at sigma = sigma_data is 1/2."""
    path = write(tmp_path / "e", TINY, {"type": "edm", "sigma_data": 2.0},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, {k: torch.zeros_like(v) for k, v in
                                                                          random_state(TINY).items()})
    spec = load_model(str(path))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # a zero network: D = c_skip x
        out = spec.denoiser(x, torch.full((2,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-6, atol=1e-7)
    assert math.isclose(spec.denoiser.sigma_data, 2.0)


@pytest.mark.parametrize("prediction,time_scale", [("velocity", 1000.0), ("x0", 1.0), ("epsilon", 250.0)])
def test_flow_checkpoint_uses_its_prediction_time_scale_noise_range_and_shift(tmp_path, prediction, time_scale):
    """Flow matching (x_t = (1 - t) x0 + t eps, t = sigma / (1 + sigma)): the network sees x_t = x / (1 + sigma) and
    t * time_scale; its output F gives D = x_t - t F (velocity), F (x0) or (x_t - t F) / (1 - t) (epsilon).  The
    process spans the checkpoint's VE range, and its ``flow`` schedule has the recorded shift."""
    from steindiff.models import FlowDenoiser
    from steindiff.noise import FlowProcess

    state = random_state(TINY_VP, seed=4)
    path = write(tmp_path / "flow", TINY_VP, {"type": "flow", "prediction": prediction, "time_scale": time_scale},
                 {"type": "flow", "sigma_min": 0.01, "sigma_max": 60.0, "shift": 3.0}, state)
    spec = load_model(str(path))
    assert isinstance(spec.denoiser, FlowDenoiser) and isinstance(spec.process, FlowProcess)
    assert spec.denoiser.prediction == prediction and spec.denoiser.time_scale == time_scale
    assert spec.process.sigma_min == pytest.approx(0.01, rel=1e-12)
    assert float(spec.process.t_to_sigma(spec.process.t_max)) == pytest.approx(60.0, rel=1e-9)
    assert spec.process.schedule.shift == 3.0
    x, sigma = x_and_sigma(4)
    seen = Inputs(spec.denoiser.net)
    with torch.no_grad():
        out = spec.denoiser(x, sigma)
    (x_in, t_in), = seen.calls
    s = sigma.reshape(-1, 1, 1, 1)
    t = s / (1 + s)
    torch.testing.assert_close(x_in.double(), x / (1 + s), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t_in.double(), (sigma / (1 + sigma)) * time_scale, rtol=1e-6, atol=1e-6)
    net = UNet(TINY_VP).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        F = net((x / (1 + s)).float(), ((sigma / (1 + sigma)) * time_scale).float()).double()
    x_t = x / (1 + s)
    expected = {"velocity": x_t - t * F, "x0": F, "epsilon": (x_t - t * F) / (1 - t)}
    torch.testing.assert_close(out, expected[prediction], rtol=1e-4, atol=1e-4)
    assert all((out - v).abs().max() > 1e-2 for k, v in expected.items() if k != prediction)
    default = write(tmp_path / "flow1", TINY_VP, {"type": "flow", "prediction": prediction, "time_scale": time_scale},
                    {"type": "flow", "sigma_min": 0.01, "sigma_max": 60.0}, state)
    assert load_model(str(default)).process.schedule.shift == 1.0


def test_the_split_keeps_each_images_label(tmp_path):
    """Labels of a .npz dataset follow their images into the held-out and training parts (class_tv compares the
    samples with the held-out labels)."""
    x = np.random.default_rng(1).uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32)
    y = np.arange(10) % 4
    np.savez(tmp_path / "imgs.npz", x=x, y=y)
    from steindiff.data import load_dataset

    ds = load_dataset(str(tmp_path / "imgs.npz"))
    held = [0, 3, 4]
    data = {"source": str(tmp_path / "imgs.npz"), "shape": [1, 8, 8], "fingerprint": ds.fingerprint(),
            "holdout": {"n": 3, "seed": 0, "indices": held}}
    info = load_model(str(write(tmp_path / "ck", TINY, {"type": "edm", "sigma_data": 0.5},
                                {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, data=data))).info
    rest = [i for i in range(10) if i not in held]
    assert info["heldout_labels"].tolist() == y[held].tolist() and info["train_labels"].tolist() == y[rest].tolist()
    assert torch.equal(info["heldout"], torch.from_numpy(x[held])) and len(info["train"]) == 7


def test_every_architecture_field_survives_the_round_trip(tmp_path):
    """A U-Net config with every field away from its default comes back field by field, with its weights."""
    import dataclasses

    cfg = UNetConfig(in_channels=3, model_channels=12, channel_mult=(1, 3), num_blocks=2, attn_levels=(0, 1),
                     dropout=0.1, embedding="positional", fourier_scale=4.0, num_classes=3, groups=4)
    default = UNetConfig()
    assert all(getattr(cfg, f.name) != getattr(default, f.name) for f in dataclasses.fields(UNetConfig))
    state = random_state(cfg, seed=5)
    path = write(tmp_path / "all", cfg, {"type": "edm", "sigma_data": 0.5},
                 {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, state,
                 data={"source": "none.npy", "shape": [3, 8, 8]})
    net, config = C.load_checkpoint(path)
    for f in dataclasses.fields(UNetConfig):
        assert getattr(net.config, f.name) == getattr(cfg, f.name), f.name
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items()) and not net.training
    assert config["precond"] == {"type": "edm", "sigma_data": 0.5} and config["data"]["shape"] == [3, 8, 8]


def test_weights_that_do_not_fit_the_architecture_are_refused_by_name(tmp_path):
    """A tensor of another shape, a missing one, an extra one: each a CheckpointError naming the tensor."""
    state = random_state(TINY)
    name = sorted(k for k in state if state[k].ndim == 4)[0]
    cases = {"shape mismatch": {**state, name: torch.zeros(1, *state[name].shape[1:])},
             "missing": {k: v for k, v in state.items() if k != name},
             "unexpected": {**state, "extra.weight": torch.zeros(2)}}
    for what, bad in cases.items():
        path = write(tmp_path / what.replace(" ", "-"), TINY, {"type": "edm", "sigma_data": 0.5},
                     {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}, bad)
        with pytest.raises(C.CheckpointError, match=rf"do not match the architecture in config\.json: .*{what}"):
            C.load_checkpoint(path)
