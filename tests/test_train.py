import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import steindiff.data as DS
import steindiff.models.checkpoint as C
import steindiff.train as T
from steindiff.models import EDMPrecond, FlowDenoiser, VPDenoiser
from steindiff.models.registry import load_model
from steindiff.models.unet import UNetConfig
from steindiff.noise import DiscreteVPProcess, FlowProcess, VEProcess

TINY = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))


def tiny_cfg(**kw):
    base = dict(iters=4, batch_size=8, ckpt_every=2, warmup=2)
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    return DS.load_digits_dataset()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("ck") / "run"
    res = T.train(tiny_cfg(), out, TINY, progress=False, dataset=digits)
    return out, res


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------- training and checkpoints


def test_tiny_run_writes_a_loadable_checkpoint(ckpt):
    out, res = ckpt
    assert res.step == 4 and np.isfinite(res.loss)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_state.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["schema"] == C.CHECKPOINT_SCHEMA
    assert config["data"]["shape"] == [1, 8, 8]
    assert config["data"]["holdout"]["n"] == 297 and len(config["data"]["holdout"]["indices"]) == 297
    assert config["data"]["n_train"] == 1500
    assert config["precond"] == {"type": "edm", "sigma_data": 0.5}
    assert config["process"] == {"type": "ve", "sigma_min": 0.002, "sigma_max": 80.0}  # EDM's range
    assert config["training"]["step"] == 4 and config["training"]["P_mean"] == -1.2
    net, cfg = C.load_checkpoint(out)
    assert not net.training
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_holdout_split_is_fixed_and_disjoint():
    tr, ho = DS.split_indices(1797, 297, 0)
    tr2, ho2 = DS.split_indices(1797, 297, 0)
    assert np.array_equal(ho, ho2) and len(set(tr) & set(ho)) == 0 and len(tr) + len(ho) == 1797
    with pytest.raises(DS.DataError, match="hold out"):
        DS.split_indices(10, 10, 0)


def test_load_model_on_checkpoint_folder(ckpt):
    out, _ = ckpt
    spec = load_model(str(out))
    assert isinstance(spec.denoiser, EDMPrecond) and isinstance(spec.process, VEProcess)
    assert spec.sample_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in spec.denoiser.parameters())
    assert spec.info["heldout"].shape == (297, 1, 8, 8) and spec.info["train"].shape == (1500, 1, 8, 8)
    # the held-out images are exactly the recorded split and never among the training images
    ho = torch.as_tensor(spec.info["config"]["data"]["holdout"]["indices"])
    assert torch.equal(spec.info["heldout"], DS.load_digits_dataset().x[ho])
    x = spec.denoiser(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 10.0]))
    assert x.shape == (2, 1, 8, 8)


def test_resume_matches_an_uninterrupted_run(tmp_path, digits, ckpt):
    out_full, _ = ckpt
    out = tmp_path / "resumed"
    T.train(tiny_cfg(iters=2), out, TINY, progress=False, dataset=digits)
    with pytest.raises(FileExistsError, match="already exists"):
        T.train(tiny_cfg(iters=4), out, TINY, progress=False, dataset=digits)
    res = T.train(tiny_cfg(iters=4), out, TINY, progress=False, dataset=digits, resume=True)
    assert res.step == 4
    a, _ = C.load_checkpoint(out_full)
    b, _ = C.load_checkpoint(out)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k  # the EMA, read back from model.safetensors, resumes exactly
    sa, sb = (torch.load(d / "train_state.pt", map_location="cpu", weights_only=True) for d in (out_full, out))
    for k in ("model", "opt"):
        assert all(torch.equal(x, y) for x, y in zip(_state_tensors(sa[k]), _state_tensors(sb[k]))), k


def test_checkpoint_keeps_the_ema_weights_once(ckpt):
    """train_state.pt holds the raw weights and AdamW's two moments (3x the weights), not the EMA copy that
    model.safetensors already holds in float32."""
    out, res = ckpt
    st = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert st["ema"] is None
    weights = sum(t.numel() * t.element_size() for t in _state_tensors(st["model"]))
    # raw weights, exp_avg and exp_avg_sq, plus per-tensor records, random states and held-out indices: under 4x
    # the weights, where a second copy of the EMA made it more than 4x
    assert (out / "train_state.pt").stat().st_size < 4 * weights
    assert (out / "model.safetensors").stat().st_size < 1.1 * weights


def test_float16_weights_keep_the_ema_in_the_state_and_resume_exactly(tmp_path, digits):
    from safetensors.torch import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    T.train(tiny_cfg(iters=4, weights_dtype="float16"), full, TINY, progress=False, dataset=digits)
    T.train(tiny_cfg(iters=2, weights_dtype="float16"), part, TINY, progress=False, dataset=digits)
    st = torch.load(part / "train_state.pt", map_location="cpu", weights_only=True)
    assert st["ema"] is not None and all(t.dtype == torch.float32 for t in _state_tensors(st["ema"]))
    T.train(tiny_cfg(iters=4, weights_dtype="float16"), part, TINY, progress=False, dataset=digits, resume=True)
    a, b = (load_file(str(d / "model.safetensors")) for d in (full, part))  # (its metadata's order varies)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reported_loss_counts_the_iterations_it_averages(tmp_path, digits):
    res = T.train(tiny_cfg(iters=3), tmp_path / "r", TINY, progress=False, dataset=digits)
    assert res.loss_iters == 3
    res = T.train(tiny_cfg(iters=5), tmp_path / "r", TINY, progress=False, dataset=digits, resume=True)
    assert res.loss_iters == 5  # the losses of the resumed run's first part count too


def test_resume_rejects_another_architecture(tmp_path, digits):
    out = tmp_path / "r"
    T.train(tiny_cfg(iters=2), out, TINY, progress=False, dataset=digits)
    other = UNetConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))
    with pytest.raises(C.CheckpointError, match="architecture differs"):
        T.train(tiny_cfg(iters=4), out, other, progress=False, dataset=digits, resume=True)
    with pytest.raises(C.CheckpointError, match="nothing to resume"):
        T.train(tiny_cfg(iters=4), tmp_path / "none", TINY, progress=False, dataset=digits, resume=True)


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    out = tmp_path / "run"
    T.train(tiny_cfg(iters=2), out, TINY, progress=False, dataset=digits)
    before = _files(out)

    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the training state is being written

    monkeypatch.setattr(T.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        T.train(tiny_cfg(iters=4), out, TINY, progress=False, dataset=digits, resume=True)
    monkeypatch.undo()
    assert _files(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    net, cfg = C.load_checkpoint(out)
    assert cfg["training"]["step"] == 2


def test_crash_between_the_swap_renames_is_recovered(tmp_path, ckpt):
    src, _ = ckpt
    old = tmp_path / ".run.old-123-456"
    os.makedirs(old)
    for name, data in _files(src).items():
        (old / name).write_bytes(data)
    net, cfg = C.load_checkpoint(tmp_path / "run")  # "run" is missing: its previous copy is restored
    assert (tmp_path / "run" / "model.safetensors").is_file() and not old.exists()


def test_ctrl_c_during_training_saves_a_resumable_checkpoint(tmp_path, digits):
    out = tmp_path / "run"

    def stop(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(tiny_cfg(iters=10, ckpt_every=100), out, TINY, progress=False, dataset=digits, callback=stop)
    _, cfg = C.load_checkpoint(out)
    assert cfg["training"]["step"] == 3 and cfg["training"]["stopped_early"]
    res = T.train(tiny_cfg(iters=5, ckpt_every=100), out, TINY, progress=False, dataset=digits, resume=True)
    assert res.step == 5


def test_time_limit_stops_early(tmp_path, digits):
    res = T.train(tiny_cfg(iters=10_000, time_limit_s=1e-9), tmp_path / "run", TINY, progress=False, dataset=digits)
    assert res.stopped_early and res.step == 1


def test_vp_epsilon_training(tmp_path, digits):
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(), embedding="positional")
    T.train(tiny_cfg(iters=2, loss="vp-eps"), tmp_path / "vp", unet, progress=False, dataset=digits)
    spec = load_model(str(tmp_path / "vp"))
    assert isinstance(spec.denoiser, VPDenoiser) and isinstance(spec.process, DiscreteVPProcess)
    assert torch.isfinite(spec.denoiser(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 50.0]))).all()


def test_float16_weights_are_saved_as_float16_and_load_as_float32(tmp_path, digits):
    from safetensors.torch import load_file

    out = tmp_path / "h"
    T.train(tiny_cfg(iters=1, weights_dtype="float16"), out, TINY, progress=False, dataset=digits)
    saved = load_file(str(out / C.WEIGHTS_FILE))
    assert {v.dtype for v in saved.values()} == {torch.float16}
    net, config = C.load_checkpoint(out)
    assert config["weights"]["dtype"] == "float16"
    assert all(v.dtype == torch.float32 and torch.equal(v, saved[k].float()) for k, v in net.state_dict().items())


def test_flow_training_records_the_objective_loads_as_flow_and_resumes(tmp_path, digits):
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(), embedding="positional")
    cfg = tiny_cfg(iters=2, loss="flow", logit_mean=0.5, logit_std=0.8)
    T.train(cfg, tmp_path / "fl", unet, progress=False, dataset=digits)
    config = json.loads((tmp_path / "fl" / "config.json").read_text())
    assert config["objective"] == "flow" and config["training"]["logit_std"] == 0.8
    assert config["precond"] == {"type": "flow", "prediction": "velocity", "time_scale": 1000.0}
    spec = load_model(str(tmp_path / "fl"))
    assert isinstance(spec.denoiser, FlowDenoiser) and isinstance(spec.process, FlowProcess)
    # the flow process spans the EDM models' VE range, so both kinds share the Karras and log-SNR schedules
    assert spec.process.sigma_min == pytest.approx(0.002) and spec.process.sigma_max == pytest.approx(80.0)
    assert torch.isfinite(spec.denoiser(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 50.0]))).all()
    res = T.train(tiny_cfg(iters=4, loss="flow", logit_mean=0.5, logit_std=0.8), tmp_path / "fl", unet,
                  progress=False, dataset=digits, resume=True)
    assert res.step == 4
    straight = T.train(tiny_cfg(iters=4, loss="flow", logit_mean=0.5, logit_std=0.8), tmp_path / "fl4", unet,
                       progress=False, dataset=digits)
    a, _ = C.load_checkpoint(tmp_path / "fl")
    b, _ = C.load_checkpoint(straight.out)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(C.CheckpointError, match="another loss"):  # an EDM run does not resume a flow checkpoint
        T.train(tiny_cfg(iters=6), tmp_path / "fl", unet, progress=False, dataset=digits, resume=True)
    with pytest.raises(ValueError, match="logit_std"):
        T.TrainConfig(loss="flow", logit_std=0.0)


def test_class_conditional_training(tmp_path, digits):
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(), num_classes=10)
    T.train(tiny_cfg(iters=2), tmp_path / "c", unet, progress=False, dataset=digits)
    spec = load_model(str(tmp_path / "c"))
    out = spec.denoiser(torch.randn(2, 1, 8, 8), torch.ones(2), class_labels=torch.tensor([3, 7]))
    assert out.shape == (2, 1, 8, 8)
    x = np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    with pytest.raises(DS.DataError, match="needs labels"):
        T.train(tiny_cfg(iters=2), tmp_path / "c2", unet, progress=False,
                dataset=DS.ImageDataset(torch.from_numpy(x), None, "x", "x"))


class _RandomUNet(T.UNet):
    """A U-Net with every parameter perturbed (fresh ones have zero output layers, which would hide
    the network's inputs from the loss); deterministic given the global seed train() sets."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("loss,sd,p_mean,p_std", [("edm", 0.5, -1.2, 1.2), ("edm", 0.3, -0.4, 0.7),
                                                   ("vp-eps", None, None, None), ("flow", None, None, None)])
def test_first_loss_equals_a_direct_computation(tmp_path, monkeypatch, loss, sd, p_mean, p_std):
    """The loss of the first iteration (initial weights) on the batch drawn from the documented
    generator stream, recomputed here from the papers' formulas: EDM (Karras et al. 2022, Table 1
    preconditioning, ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2)/(sigma sd)^2), at the defaults
    and at other values of sigma_data, P_mean and P_std, DDPM epsilon prediction on linear betas
    1e-4..0.02 over 1000 steps (Ho et al. 2020) and rectified flow (Esser et al. 2024: x_t = (1 - t) x0 +
    t eps, velocity eps - x0, t = sigmoid(n), n ~ N(m, s^2)).  The checkpoint records the preconditioning
    trained."""
    monkeypatch.setattr(T, "UNet", _RandomUNet)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (10, 1, 8, 8)).astype(np.float32))
    ds = DS.ImageDataset(x, None, "x", "x")
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(),
                      embedding="fourier" if loss == "edm" else "positional")
    opts = {"sigma_data": sd, "P_mean": p_mean, "P_std": p_std} if loss == "edm" else \
        {"logit_mean": 0.3, "logit_std": 1.4} if loss == "flow" else {}
    cfg = tiny_cfg(iters=1, batch_size=6, loss=loss, seed=5, **opts)
    seen = []
    res = T.train(cfg, tmp_path / "run", unet, progress=False, dataset=ds,
                  callback=lambda info: seen.append(info["loss"]))
    assert res.config["precond"] == ({"type": "edm", "sigma_data": sd} if loss == "edm" else
                                     {"type": "flow", "prediction": "velocity", "time_scale": 1000.0}
                                     if loss == "flow" else {"type": "vp", "prediction": "epsilon"})

    torch.manual_seed(cfg.seed)
    net = _RandomUNet(unet)
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, 10, (6,), generator=gen)  # holdout 0: the training set is the whole set
    x0 = x[idx]
    noise = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        if loss == "edm":
            sigma = (torch.randn(6, generator=gen) * p_std + p_mean).exp().reshape(-1, 1, 1, 1)
            c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
            c_in = 1 / (sigma**2 + sd**2).sqrt()
            D = c_skip * (x0 + sigma * noise) + c_out * net(c_in * (x0 + sigma * noise), sigma.log().reshape(-1) / 4)
            expected = ((sigma**2 + sd**2) / (sigma * sd) ** 2 * (D - x0) ** 2).mean()
        elif loss == "flow":
            t = torch.sigmoid(torch.randn(6, generator=gen) * 1.4 + 0.3).reshape(-1, 1, 1, 1)
            expected = ((net((1 - t) * x0 + t * noise, 1000 * t.reshape(-1)) - (noise - x0)) ** 2).mean()
        else:
            t = torch.randint(0, 1000, (6,), generator=gen)
            abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                                 0)[t].float().reshape(-1, 1, 1, 1)
            expected = ((net(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t.float()) - noise) ** 2).mean()
        zero_net = ((c_skip * (x0 + sigma * noise) - x0) ** 2 * (sigma**2 + sd**2) / (sigma * sd) ** 2).mean() \
            if loss == "edm" else ((noise - x0) ** 2).mean() if loss == "flow" else (noise**2).mean()
    assert len(seen) == 1
    assert seen[0] == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(zero_net) / float(expected) - 1) > 0.05  # the network's output is part of the check


# ---------------------------------------------------------------- checkpoint errors


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name, data in _files(src).items():
        (dst / name).write_bytes(data)
    return dst


def test_config_that_does_not_match_the_weights(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architecture"]["model_channels"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors.*do not match.*config\.json.*shape mismatch"):
        load_model(str(d))


def test_missing_and_corrupt_weights(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "bad")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: corrupt"):
        C.load_checkpoint(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: missing"):
        load_model(str(d))


def test_missing_or_invalid_config(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "bad")
    (d / "config.json").write_text("{not json")
    with pytest.raises(C.CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(str(d))  # matched by its model.safetensors
    (d / "config.json").unlink()
    with pytest.raises(C.CheckpointError, match=r"config\.json: missing"):
        C.load_checkpoint(d)
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "nowhere")


def test_save_checkpoint_never_replaces_an_unrelated_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a steindiff checkpoint"):
        C.save_checkpoint(d, {"schema": C.CHECKPOINT_SCHEMA}, {"w": torch.zeros(1)})
    assert (d / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- datasets


def test_digits_dataset(digits):
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == torch.float32
    assert float(digits.x.min()) == -1.0 and float(digits.x.max()) == 1.0
    assert digits.labels.shape == (1797,)


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    ds = DS.load_dataset(tmp_path / "a.npy")
    assert ds.shape == (3, 4, 4) and torch.allclose(ds.x, torch.from_numpy(x))
    np.savez(tmp_path / "b.npz", images=x, labels=np.arange(5))
    ds = DS.load_dataset(tmp_path / "b.npz")
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]
    u8 = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    np.save(tmp_path / "u.npy", u8)
    ds = DS.load_dataset(tmp_path / "u.npy")
    assert ds.x.min() == -1 and ds.x.max() == 1


@pytest.mark.parametrize("arr,match", [
    (np.zeros((5, 8, 8), np.float32), "rank 4.*x\\[:, None\\]"),
    (np.zeros((0, 1, 8, 8), np.float32), "no images"),
    (np.full((2, 1, 8, 8), 2.0, np.float32), r"in \[-1, 1\], got range"),
    (np.full((2, 1, 8, 8), 300, np.int16), r"\[0, 255\]"),
    (np.zeros((2, 8, 8, 3), np.float32), "channels-last"),
    (np.array([[[[np.nan]]]], np.float32), "NaN"),
    (np.zeros((2, 1, 8, 8), bool), "dtype bool"),
])
def test_bad_arrays(tmp_path, arr, match):
    f = tmp_path / "bad.npy"
    np.save(f, arr)
    with pytest.raises(DS.DataError, match=match) as e:
        DS.load_dataset(f)
    assert str(f) in str(e.value)


def test_zero_one_floats_warn(tmp_path):
    np.save(tmp_path / "z.npy", np.random.default_rng(0).uniform(0, 1, (3, 1, 4, 4)).astype(np.float32))
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        DS.load_dataset(tmp_path / "z.npy")


def test_bad_files(tmp_path):
    with pytest.raises(DS.DataError, match="no such file"):
        DS.load_dataset(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DS.DataError, match="unsupported"):
        DS.load_dataset(tmp_path / "x.txt")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(DS.DataError, match=r"broken\.npy: cannot read"):
        DS.load_dataset(tmp_path / "broken.npy")
    np.savez(tmp_path / "many.npz", a=np.zeros((1, 1, 2, 2)), b=np.zeros((1, 1, 2, 2)))
    with pytest.raises(DS.DataError, match="which array"):
        DS.load_dataset(tmp_path / "many.npz")


def test_png_folder(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    with pytest.raises(DS.DataError, match="no .png images"):
        DS.load_dataset(d)
    for i in range(3):
        Image.fromarray(np.full((6, 4), 50 * i, np.uint8), mode="L").save(d / f"{i}.png")
    ds = DS.load_dataset(d)
    assert ds.shape == (1, 6, 4)
    assert torch.allclose(ds.x[1], torch.full((1, 6, 4), 50 / 127.5 - 1))
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(d / "rgb.png")
    assert DS.load_dataset(d).shape == (3, 6, 4)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(d / "z_small.png")
    with pytest.raises(DS.DataError, match=r"z_small\.png: size 5x5 differs"):
        DS.load_dataset(d)
    (d / "z_small.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DS.DataError, match=r"z_small\.png: not a readable PNG"):
        DS.load_dataset(d)


def test_image_size_must_fit_the_unet(tmp_path):
    x = np.zeros((4, 1, 6, 6), np.float32)
    ds = DS.ImageDataset(torch.from_numpy(x), None, "x", "x")
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2, 2), attn_levels=())
    with pytest.raises(DS.DataError, match="not divisible by 4"):
        T.train(tiny_cfg(), tmp_path / "o", unet, progress=False, dataset=ds)


# ---------------------------------------------------------------- devices and precision

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def test_explicit_cpu_device_bf16_and_no_scalar_of_a_graph(tmp_path, digits):
    """device="cpu" given explicitly, bf16 autocast, and the callback's loss read without converting
    a tensor that requires grad (which torch warns about)."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = T.train(tiny_cfg(iters=3, precision="bf16", log_every=2), tmp_path / "run", TINY, progress=False,
                      dataset=digits, device="cpu", callback=lambda info: seen.append(info["loss"]))
    assert res.step == 3 and len(seen) == 3 and all(isinstance(v, float) for v in seen)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["training"]["precision"] == "bf16" and cfg["device"] == "cpu"
    assert np.isfinite(res.loss)
    with pytest.raises(ValueError, match="precision"):
        T.TrainConfig(precision="fp16")


def test_losses_are_read_back_every_log_every_and_checked(tmp_path, digits, monkeypatch):
    """A non-finite loss is caught at the next read-back (naming its step) and no checkpoint is
    written from the broken weights."""
    calls = []
    real_stack = torch.stack

    def spy(ts, *a, **k):
        if sys._getframe(1).f_code.co_name == "flush":  # the training loop's read-back of the losses
            calls.append(len(ts))
        return real_stack(ts, *a, **k)

    monkeypatch.setattr(T.torch, "stack", spy)
    T.train(tiny_cfg(iters=7, log_every=3, ckpt_every=100), tmp_path / "ok", TINY, progress=False, dataset=digits)
    assert calls == [3, 3, 1]  # one read-back per 3 iterations, the rest before the final checkpoint
    monkeypatch.undo()
    real_forward, n_calls = T.UNet.forward, [0]

    def poisoned(self, *a, **k):  # the 4th iteration (index 3) returns NaN
        n_calls[0] += 1
        out = real_forward(self, *a, **k)
        return out * float("nan") if n_calls[0] == 4 else out

    monkeypatch.setattr(T.UNet, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="loss became nan at step 3"):
        T.train(tiny_cfg(iters=8, log_every=4, ckpt_every=2), out, TINY, progress=False, dataset=digits)
    net, cfg = C.load_checkpoint(out)  # the checkpoint before the NaN, never one after it
    assert cfg["training"]["step"] == 2 and all(torch.isfinite(p).all() for p in net.parameters())


def test_checkpoints_hold_cpu_tensors_only(ckpt):
    out, _ = ckpt
    st = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in _state_tensors(st))


@needs_cuda
def test_train_on_cuda_and_resume_on_cpu(tmp_path, digits):
    out = tmp_path / "gpu"
    res = T.train(tiny_cfg(iters=2), out, TINY, progress=False, dataset=digits, device="cuda")
    assert res.step == 2 and json.loads((out / "config.json").read_text())["device"].startswith("cuda")
    st = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in _state_tensors(st))
    res = T.train(tiny_cfg(iters=4), out, TINY, progress=False, dataset=digits, resume=True, device="cpu")
    assert res.step == 4 and np.isfinite(res.loss)
    res = T.train(tiny_cfg(iters=5, precision="bf16"), out, TINY, progress=False, dataset=digits, resume=True,
                  device="cuda")
    assert res.step == 5 and np.isfinite(res.loss)
