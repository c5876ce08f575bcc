"""Patch metrics: the power spectrum against closed forms and known corruptions, the Fréchet distance against
a direct scipy computation, the shipped classifier on held-out regions, and the floors."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from steindiff.data import load_patches_dataset
from steindiff.metrics import image_model_metrics
from steindiff.metrics import patches as P
from steindiff.metrics.image import frechet_distance


@pytest.fixture(scope="module")
def ref():
    ds = load_patches_dataset("patches:photos=chelsea+coffee+rocket")
    held = torch.from_numpy(ds.holdout)
    train = torch.ones(ds.x.shape[0], dtype=torch.bool)
    train[held] = False
    return {"heldout": ds.x[held], "heldout_labels": ds.labels[held], "train": ds.x[train],
            "train_labels": ds.labels[train], "metrics": "patches"}


def _blur(x):
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=3)


def test_white_noise_has_a_flat_spectrum_at_its_variance():
    x = 0.3 * torch.randn(2000, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = P.radial_spectrum(x)
    assert s.shape == (8,) and torch.allclose(s, torch.full((8,), 0.09, dtype=torch.float64), rtol=0.03)
    with pytest.raises(ValueError, match="too small for 8 frequency bands"):
        P.radial_spectrum(x[:, :, :8, :8])


def test_spectrum_error_is_zero_for_itself_up_for_noise_down_for_blur(ref):
    x = ref["train"][:300]
    assert torch.equal(P.spectrum_error(x, x), torch.zeros(8, dtype=torch.float64))
    noisy = P.spectrum_error(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), x)
    blurred = P.spectrum_error(_blur(x), x)
    assert noisy[-1] > 0.2 and noisy[-1] == noisy.max() and abs(noisy[0]) < 0.05
    assert blurred[-1] < -0.2 and blurred[0] > -0.05


def test_frechet_distance_matches_a_direct_scipy_computation():
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 6)) @ g.normal(size=(6, 6))
    b = g.normal(size=(200, 6)) @ g.normal(size=(6, 6)) + 0.5
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-8)


def test_shipped_classifier_tells_the_photographs_apart_on_held_out_regions():
    clf = P.load_patch_classifier()
    acc = clf.config["training"]["heldout_accuracy"]
    assert acc > 0.8 and clf.config["training"]["data"] == "patches"
    ds = load_patches_dataset("patches")  # the recorded accuracy is reproduced on the held-out regions
    f, pred = P.patch_features(ds.x[ds.holdout])
    assert f.shape == (len(ds.holdout), 64) and f.dtype == torch.float64
    assert float((pred == ds.labels[ds.holdout]).double().mean()) == pytest.approx(acc, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        P.patch_features(torch.zeros(2, 1, 32, 32))


def test_real_patches_score_near_their_floor_and_corruptions_far_above(ref):
    real = ref["train"][torch.randperm(ref["train"].shape[0], generator=torch.Generator().manual_seed(1))[:200]]
    m = image_model_metrics(real, ref)
    assert set(m) >= {f"{k}{s}" for k in P.PATCH_METRICS for s in ("", "_floor")}
    assert m["n"] == m["n_floor"] == 200 and m["n_heldout"] == ref["heldout"].shape[0] and len(m["spectrum_bands"]) == 8
    for k in ("patch_fd", "spectrum", "pixel_sw2"):
        assert 0 < m[f"{k}_floor"] and m[k] < 2 * m[f"{k}_floor"] + 0.05
    noisy = P.patch_metrics(real + 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0)), ref)
    blurred = P.patch_metrics(_blur(_blur(real)), ref)
    assert noisy["patch_fd"] > 3 * m["patch_fd_floor"] and noisy["spectrum_high"] > 0.3 > m["spectrum_high"]
    assert blurred["spectrum_high"] < -0.3 and blurred["spectrum"] > 3 * m["spectrum_floor"]
    assert {k: noisy[k] for k in noisy if k.endswith("_floor")} == {k: m[k] for k in m if k.endswith("_floor")}


def test_patch_metrics_errors(ref):
    with pytest.raises(ValueError, match="no reference images"):
        P.patch_metrics(ref["train"][:10], {"heldout": None})
    with pytest.raises(ValueError, match="NaN"):
        P.patch_metrics(torch.full((10, 3, 32, 32), float("nan")), ref)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        P.patch_metrics(torch.zeros(10, 1, 8, 8), ref)


def _band_of(fy: float, fx: float, bands: int):
    """The ring of a frequency (cycles per pixel) by the definition: ``bands`` rings of equal width over the
    radial frequencies (0, 1/2], each closed at its outer edge; None for the mean and the corners beyond 1/2."""
    r = (fy**2 + fx**2) ** 0.5
    if r == 0 or r > 0.5:
        return None
    for b in range(bands):
        if r <= (b + 1) / (2 * bands):
            return b


@pytest.mark.parametrize("h,w", [(16, 16), (16, 24)])
def test_spectrum_puts_each_frequencys_power_in_its_ring(h, w):
    """One cosine per frequency bin (images of 2 x 3 channels with unequal amplitudes): its power (Parseval:
    the mean over images and channels of sum x^2) lands in the ring of its radius, divided by the ring's
    number of bins; nothing elsewhere.  Ring edges fall on bins here (radius 1/16 = 1/(2 * 8) at (1, 0))."""
    bands = 8
    fy_all = [i / h if i < h / 2 else i / h - 1 for i in range(h)]  # fftfreq, written out
    fx_all = [j / w if j < w / 2 else j / w - 1 for j in range(w)]
    ring = {(i, j): _band_of(fy_all[i], fx_all[j], bands) for i in range(h) for j in range(w)}
    counts = [sum(1 for b in ring.values() if b == k) for k in range(bands)]
    assert all(c > 0 for c in counts)
    m, n = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    amp = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.2, 0.7]], dtype=torch.float64)[:, :, None, None]
    on_edge = 0
    for (i, j), b in ring.items():
        x = amp * torch.cos(2 * math.pi * (i * m / h + j * n / w) + 0.3)
        s = P.radial_spectrum(x, bands)
        expected = torch.zeros(bands, dtype=torch.float64)
        if b is not None:
            expected[b] = x.pow(2).sum((-2, -1)).mean() / counts[b]
            on_edge += any(abs((fy_all[i] ** 2 + fx_all[j] ** 2) ** 0.5 - (k + 1) / (2 * bands)) < 1e-12
                           for k in range(bands))
        torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-9 * float(x.pow(2).sum()), msg=f"bin {(i, j)}")
    assert on_edge >= 4


def test_patch_metrics_spectrum_is_the_rms_of_the_band_errors(ref):
    """spectrum: RMS over the 8 bands of log10(power of the samples / power of the held-out patches);
    spectrum_high: the highest band's; halving the samples lowers every band by log10(4)."""
    real = ref["train"][torch.randperm(ref["train"].shape[0], generator=torch.Generator().manual_seed(1))[:200]]
    g = torch.Generator().manual_seed(3)
    x = (0.8 * real + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    m = P.patch_metrics(x, ref)
    bands = (P.radial_spectrum(x) / P.radial_spectrum(ref["heldout"])).log10()
    assert m["spectrum_bands"] == pytest.approx(bands.tolist(), rel=1e-9)
    assert m["spectrum"] == pytest.approx(float(bands.pow(2).mean().sqrt()), rel=1e-9)
    assert m["spectrum_high"] == pytest.approx(float(bands[-1]), rel=1e-9)
    assert len(set(np.round(bands.tolist(), 6))) == 8  # the bands differ: which one is "high" matters
    half = P.patch_metrics(0.5 * x, ref)
    assert half["spectrum_bands"] == pytest.approx((bands - math.log10(4)).tolist(), rel=1e-9)
    # samples are judged as images in [-1, 1]: values beyond are clamped first, for every metric
    assert P.patch_metrics(3 * x, ref) == P.patch_metrics((3 * x).clamp(-1, 1), ref)


def test_spectrum_error_is_the_log10_power_ratio_per_band():
    """Scaling images by a scales every band's power by a^2: the error is 2 log10(a) in every band."""
    x = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for a in (2.0, 10.0, 0.5):
        e = P.spectrum_error(a * x, x, bands=4)
        assert e.shape == (4,)
        torch.testing.assert_close(e, torch.full((4,), 2 * math.log10(a), dtype=torch.float64), rtol=0, atol=1e-12)


def test_patch_metrics_cache_is_per_seed_and_sample_count(ref):
    """The held-out side and the floors are cached in ``info`` per sample count, seed and number of floor draws: a
    call with another seed gives what it gives on a fresh ``info``, never the first seed's subset and floors."""
    small = {k: (v[:40] if k == "heldout" else v[:60] if k == "train" else v) for k, v in ref.items()}
    x = small["train"][:10] * 0.9
    kw = {"floor_draws": 2}
    fresh = {s: P.patch_metrics(x, dict(small), seed=s, **kw) for s in (0, 1)}
    shared = dict(small)
    got = {s: P.patch_metrics(x, shared, seed=s, **kw) for s in (0, 1)}
    assert got == fresh
    from steindiff.metrics.mixture import sliced_w2

    for s in (0, 1):  # pixel_sw2: against as many held-out patches as samples, drawn with the seed
        sub = small["heldout"][torch.randperm(40, generator=torch.Generator().manual_seed(s))[:10]]
        assert fresh[s]["pixel_sw2"] == pytest.approx(sliced_w2(x, sub, seed=s), rel=1e-12)
    assert fresh[0]["pixel_sw2_floor"] != fresh[1]["pixel_sw2_floor"]  # the seed draws other floors
    assert P.patch_metrics(x[:6], shared, seed=0, **kw) == P.patch_metrics(x[:6], dict(small), seed=0, **kw)
    assert P.patch_metrics(x, shared, seed=0, floor_draws=1) == P.patch_metrics(x, dict(small), seed=0, floor_draws=1)
