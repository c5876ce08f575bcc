"""steindiff.distances: the Laplacian pyramid's features reconstruct the image, weights scale their bands, the
feature map keys a gradient-fit calibration by its weights, bad input is refused."""

import pytest
import torch
import torch.nn.functional as F

from steindiff.calibration import gradient_fit_options
from steindiff.distances import LaplacianPyramid


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
