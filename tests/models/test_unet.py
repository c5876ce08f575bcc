import pytest
import torch
from torch.func import jvp, vjp

from steindiff.models import EDMPrecond, UNet, UNetConfig, VPDenoiser
from steindiff.noise import DiscreteVPProcess

TINY = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,))


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh U-Nets have zero output layers; give every parameter a small random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("shape,cfg", [
    ((1, 8, 8), {}),
    ((3, 16, 16), dict(in_channels=3, channel_mult=(1, 2, 2), attn_levels=(1, 2))),
    ((2, 8, 12), dict(in_channels=2, attn_levels=())),
])
def test_output_shape(shape, cfg):
    net = UNet(**{**TINY, **cfg})
    x = torch.randn(3, *shape)
    out = net(x, torch.randn(3))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_default_config_size():
    net = UNet()
    assert net.num_parameters() * 4 <= 5e6  # <= 5 MB of float32 weights


def test_fresh_net_has_zero_output_so_edm_denoiser_is_c_skip_x():
    net = UNet(**TINY)
    d = EDMPrecond(net, sigma_data=0.5)
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 2.0)
    assert torch.allclose(d(x, sigma), 0.25 / (4 + 0.25) * x, atol=1e-6)


def test_class_conditioning():
    net = _randomize(UNet(**TINY, num_classes=10))
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    out_a = net(x, c, class_labels=torch.tensor([0, 1, 2, 3]))
    out_b = net(x, c, class_labels=torch.tensor([4, 5, 6, 7]))
    assert not torch.allclose(out_a, out_b)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    assert torch.allclose(net(x, c, class_labels=onehot), out_a, atol=1e-5)
    # None means the null class
    assert torch.allclose(net(x, c), net(x, c, class_labels=torch.full((4,), 10)), atol=1e-6)
    # pass-through from EDMPrecond: the labels reach the network and change the denoiser's output
    d = EDMPrecond(net, sigma_data=0.5)
    sig = torch.full((4,), 1.5)
    d_a = d(x, sig, class_labels=torch.tensor([0, 1, 2, 3]))
    assert (d_a - d(x, sig, class_labels=torch.tensor([4, 5, 6, 7]))).abs().max() > 1e-3
    c_skip, c_out, c_in = 0.25 / (1.5**2 + 0.25), 1.5 * 0.5 / (1.5**2 + 0.25) ** 0.5, 1 / (1.5**2 + 0.25) ** 0.5
    direct = c_skip * x + c_out * net(c_in * x, sig.log() / 4, class_labels=torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(d_a, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class labels must be in"):
        net(x, c, class_labels=torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="shape"):
        net(x, c, class_labels=torch.zeros(4, 3))


def test_unconditional_rejects_labels():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), class_labels=torch.tensor([1, 2]))


def test_bad_inputs():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 7, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="one entry per sample"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))


def test_config_validation_and_roundtrip():
    cfg = UNetConfig(**TINY, dropout=0.1)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig(channel_mult=(1, 2), attn_levels=(2,))
    with pytest.raises(ValueError, match="embedding"):
        UNetConfig(embedding="learned")
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "width": 3})


def test_differentiable_vjp_jvp_consistent_with_finite_differences():
    torch.manual_seed(0)
    net = _randomize(UNet(**TINY)).double().eval()
    d = EDMPrecond(net, sigma_data=0.5)
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    u, v = torch.randn_like(x), torch.randn_like(x)

    f = lambda x_: d(x_, sigma)  # noqa: E731
    out, jv = jvp(f, (x,), (u,))
    out2, pull = vjp(f, x)
    (vj,) = pull(v)
    assert torch.allclose(out, out2)
    # <v, J u> == <J^T v, u>
    assert torch.allclose((v * jv).sum(), (vj * u).sum(), rtol=1e-8, atol=1e-10)
    eps = 1e-6
    fd = (f(x + eps * u) - f(x - eps * u)) / (2 * eps)
    assert torch.allclose(jv, fd, rtol=1e-5, atol=1e-7)
    # the input is untouched (no in-place ops on the input path)
    x_copy = x.clone()
    f(x)
    assert torch.equal(x, x_copy)


def test_float64_state_with_float32_net():
    net = _randomize(UNet(**TINY))
    d = EDMPrecond(net, dtype=torch.float32)
    out = d(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_vp_epsilon_through_vpdenoiser():
    net = _randomize(UNet(**TINY, embedding="positional"))
    proc = DiscreteVPProcess()
    d = VPDenoiser(net, proc, prediction="epsilon")
    x = torch.randn(3, 1, 8, 8) * 5
    out = d(x, torch.tensor([0.1, 1.0, 5.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
