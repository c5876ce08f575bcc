"""steindiff.distances: the Laplacian pyramid's features reconstruct the image, weights scale their bands, the
feature map keys a gradient-fit calibration by its weights, bad input is refused; the denoiser's features are
its layers' channel-normalised activations (against a hand computation), hooked only while they are taken."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steindiff.calibration import gradient_fit_options
from steindiff.distances import DenoiserFeatures, LaplacianPyramid, parse_distance


def split(f: torch.Tensor, shape: tuple[int, ...], weights: list[float]) -> list[torch.Tensor]:
    """The bands and the coarsest level of LaplacianPyramid(weights)(x), unscaled, as images."""
    n, c, h, w = shape
    out, k0 = [], 0
    for k in range(len(weights)):
        hk, wk = h >> min(k, len(weights) - 1), w >> min(k, len(weights) - 1)
        size = c * hk * wk
        scale = weights[k] * ((h * w) / (hk * wk)) ** 0.5
        out.append(f[:, k0:k0 + size].reshape(n, c, hk, wk) / scale)
        k0 += size
    assert k0 == f.shape[1]
    return out


def test_the_bands_reconstruct_the_image_and_weights_scale_them():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = [2.0, 0.5, 3.0]
    parts = split(LaplacianPyramid(w)(x), tuple(x.shape), w)
    rec = parts[-1]
    for band in reversed(parts[:-1]):
        rec = band + F.interpolate(rec, size=band.shape[-2:], mode="nearest")
    torch.testing.assert_close(rec, x)
    # the coarsest level is the 4x4 block mean; a band of a block-constant image is zero
    torch.testing.assert_close(parts[-1], F.avg_pool2d(x, 4))
    blocky = F.interpolate(torch.randn(1, 1, 4, 4, dtype=torch.float64), size=(8, 8), mode="nearest")
    assert split(LaplacianPyramid(w)(blocky), (1, 1, 8, 8), w)[0].abs().max() < 1e-12


def test_equal_weights_weigh_every_scale_by_its_pixels():
    """With unit weights a band's squared norm counts as its upsampled image's: a block-constant image's features
    have the squared norm of the image."""
    img = F.interpolate(torch.randn(2, 1, 2, 2, dtype=torch.float64), size=(8, 8), mode="nearest")
    f = LaplacianPyramid([1.0, 1.0, 1.0])(img)
    torch.testing.assert_close(f.pow(2).sum(1), img.pow(2).flatten(1).sum(1))


def test_the_weights_key_a_gradient_fit():
    a = gradient_fit_options({"fit_method": "gradient", "loss": "features", "features": LaplacianPyramid([2, 1, 1])})
    b = gradient_fit_options({"fit_method": "gradient", "loss": "features", "features": LaplacianPyramid([1, 1, 2])})
    again = gradient_fit_options({"fit_method": "gradient", "loss": "features",
                                  "features": LaplacianPyramid([2, 1, 1])})
    assert a["features"].startswith("LaplacianPyramid:") and a == again and a["features"] != b["features"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least two non-negative numbers"):
        LaplacianPyramid([1.0])
    with pytest.raises(ValueError, match="non-negative"):
        LaplacianPyramid([1.0, -1.0])
    with pytest.raises(ValueError, match="images \\(n, c, h, w\\)"):
        LaplacianPyramid()(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="2 pyramid levels need images of at least 4 pixels a side"):
        LaplacianPyramid()(torch.zeros(1, 1, 2, 8))


class TwoConvs(nn.Module):
    """D(x, sigma) = conv_b(relu(conv_a(x / (1 + sigma)))); conv_b is registered first, conv_a runs first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_b = nn.Conv2d(3, 2, 3, padding=1).double()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1).double()

    def forward(self, x, sigma):
        return self.conv_b(torch.relu(self.conv_a(x / (1 + sigma.reshape(-1, 1, 1, 1)))))


def normalised(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=1, keepdim=True)


def test_denoiser_features_are_the_normalised_activations_of_the_hooked_layers():
    net = TwoConvs()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = DenoiserFeatures(net, sigmas=(0.5, 2.0), pixel_weight=3.0)
    fx, fy = f(x), f(y)
    assert f._default_layers(x) == ["conv_a"]  # the first half of the convolutions in the order they run
    # the distance by hand: per noise level, the mean over pixels of the normalised activations' squared
    # difference, plus the weighted mean squared pixel difference
    want = torch.zeros(4, dtype=torch.float64)
    for s in (0.5, 2.0):
        a, b = normalised(net.conv_a(x / (1 + s))), normalised(net.conv_a(y / (1 + s)))
        want += (a - b).pow(2).sum(1).mean((1, 2))
    want += 3.0 * (x - y).pow(2).mean((1, 2, 3))
    torch.testing.assert_close((fx - fy).pow(2).sum(1), want)
    assert not net.conv_a._forward_hooks and not net.conv_b._forward_hooks  # hooks only while f runs


def test_denoiser_features_carry_gradients_and_named_layers():
    net = TwoConvs()
    f = DenoiserFeatures(lambda x, s: net(x, s), network=net, layers=["conv_a", "conv_b"])
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    (f(x) - f(target)).pow(2).sum().backward()
    assert f(x).shape == (2, (3 + 2) * 16 + 2 * 16)  # both layers' activations, then the pixels
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_denoiser_features_key_a_gradient_fit_by_their_noise_levels():
    net = TwoConvs()
    a, b, again = (gradient_fit_options({"fit_method": "gradient", "loss": "features",
                                         "features": DenoiserFeatures(net, s)}) for s in ((0.5,), (1.0,), (0.5,)))
    assert a["features"].startswith("DenoiserFeatures:") and a == again and a["features"] != b["features"]
    f = DenoiserFeatures(net, (0.5,))
    f(torch.randn(2, 2, 4, 4, dtype=torch.float64))  # running it changes nothing that keys the calibration
    assert gradient_fit_options({"fit_method": "gradient", "loss": "features", "features": f}) == a


def test_denoiser_features_refuse_bad_input():
    net = TwoConvs()
    with pytest.raises(ValueError, match="not one, so pass its network as network="):
        DenoiserFeatures(lambda x, s: net(x, s))
    with pytest.raises(ValueError, match="not submodules"):
        DenoiserFeatures(net, layers=["conv_c"])
    with pytest.raises(ValueError, match="positive noise levels"):
        DenoiserFeatures(net, sigmas=(0.0,))
    with pytest.raises(ValueError, match="pixel_weight must be >= 0"):
        DenoiserFeatures(net, pixel_weight=-1.0)
    with pytest.raises(ValueError, match="images \\(n, c, h, w\\)"):
        DenoiserFeatures(net)(torch.zeros(2, 8, dtype=torch.float64))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 4)).double()
    with pytest.raises(ValueError, match="runs no 2-D convolution"):
        DenoiserFeatures(lambda x, s: flat(x).reshape(x.shape), network=flat)(torch.zeros(1, 1, 2, 2,
                                                                                         dtype=torch.float64))


def test_a_distance_is_parsed_from_its_name():
    net = TwoConvs()
    assert parse_distance("l2") is None
    lap = parse_distance("pyramid:3/1/1")
    assert isinstance(lap, LaplacianPyramid) and lap.weights.tolist() == [3.0, 1.0, 1.0]
    d = parse_distance("denoiser", net)
    assert isinstance(d, DenoiserFeatures) and d.sigmas == [0.5] and d.pixel_weight == 10.0
    d = parse_distance("denoiser:0.1/2:0", net)
    assert d.sigmas == [0.1, 2.0] and d.pixel_weight == 0.0
    for bad, match in (("lpips", "unknown distance 'lpips'"), ("pyramid", "unknown distance"),
                       ("pyramid:3/x", "could not convert"), ("denoiser:-1", "positive noise levels"),
                       ("l2:1", "unknown distance")):
        with pytest.raises(ValueError, match=match):
            parse_distance(bad, net)
    with pytest.raises(ValueError, match="needs the model"):
        parse_distance("denoiser")
