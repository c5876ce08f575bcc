import math

import numpy as np
import pytest
import torch
from PIL import Image

from steindiff.data import load_digits_dataset, split_indices
from steindiff.metrics import image as M


@pytest.fixture(scope="module")
def ref():
    ds = load_digits_dataset()
    tr, ho = split_indices(1797, 297, 0)
    return {"heldout": ds.x[ho], "heldout_labels": ds.labels[ho], "train": ds.x[tr], "train_labels": ds.labels[tr]}


@pytest.fixture(scope="module")
def feats(ref):
    return M.digits_features(ref["train"])


def test_classifier_is_accurate_on_the_held_out_digits(ref):
    _, pred = M.digits_features(ref["heldout"])
    assert (pred == ref["heldout_labels"]).double().mean() > 0.95
    f, _ = M.digits_features(ref["heldout"][:5])
    assert f.shape == (5, 64)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        M.digits_features(torch.zeros(3, 1, 16, 16))


def test_fid_of_a_set_with_itself_is_zero(feats):
    f, _ = feats
    assert abs(M.frechet_distance(f, f)) < 1e-6


def test_fid_and_kid_grow_with_corruption(ref):
    x = ref["train"][:600]
    g = torch.Generator().manual_seed(0)
    f0, _ = M.digits_features(ref["train"][600:1200])
    fids, kids = [], []
    for s in (0.0, 0.3, 0.6, 1.0):
        xc = (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        fc, _ = M.digits_features(xc)
        fids.append(M.frechet_distance(fc, f0))
        kids.append(M.kid(fc, f0))
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0]
    assert kids == sorted(kids) and abs(kids[0]) < 0.05 < kids[-1]


def test_fid_matches_the_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 3, generator=g, dtype=torch.float64) + 1
    # |mu|^2 = 3, tr(I + 4I - 2*2I) = 3
    assert abs(M.frechet_distance(a, b) - 6.0) < 0.2
    with pytest.raises(ValueError):
        M.frechet_distance(a[:, :2], b)


def test_precision_recall_edge_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    assert M.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(200, 4, generator=g) + 100
    assert M.precision_recall(real, far) == (0.0, 0.0)
    # mode collapse: every fake sample near one real point -> high precision, low recall
    collapsed = real[:1] + 1e-3 * torch.randn(200, 4, generator=g)
    p, r = M.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1
    with pytest.raises(ValueError, match="more than 3"):
        M.precision_recall(real[:3], real)


def test_memorization_detects_copies(ref):
    train = ref["train"]
    g = torch.Generator().manual_seed(0)
    copies = train[:100] + 0.02 * torch.randn(100, 1, 8, 8, generator=g)
    assert M.memorization_rate(copies, train) == 1.0
    assert M.memorization_rate(ref["heldout"], train) == 0.0
    half = torch.cat([train[:50], ref["heldout"][:50]])
    assert M.memorization_rate(half, train) == 0.5
    assert M.memorization_rate(ref["heldout"], train, threshold=10.0) == 1.0
    # images are judged in [-1, 1]: a copy whose background is pushed below -1 is still a copy
    dark = train[:20].clone()
    assert (dark.amin((1, 2, 3)) == -1.0).all()
    dark[dark == -1.0] = -3.0
    assert M.memorization_rate(dark, train) == 1.0


def test_class_tv():
    assert M.class_tv(torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])) == 0.0
    assert M.class_tv(torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)) == 1.0


def test_image_metrics_real_vs_noise(ref):
    real = ref["train"][torch.randperm(1500, generator=torch.Generator().manual_seed(1))[:300]]
    m_real = M.image_metrics(real, ref, floor_draws=2)
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m_noise = M.image_metrics(noise, ref, floor_draws=2)
    for key in ("digits_fid", "digits_kid", "class_tv", "precision", "recall", "memorization"):
        assert f"{key}_floor" in m_real
    assert m_real["digits_fid"] < 3 * m_real["digits_fid_floor"] + 0.5
    assert m_noise["digits_fid"] > 10 * m_real["digits_fid"]
    assert m_noise["recall"] < 0.3 < m_real["recall"]
    assert m_real["memorization"] == 1.0 and m_real["memorization_floor"] == 0.0  # training images are copies
    assert m_noise["memorization"] == 0.0
    assert m_real["n"] == m_real["n_floor"] == 300 and m_real["n_heldout"] == 297


def test_image_metrics_errors(ref):
    with pytest.raises(ValueError, match="no reference images"):
        M.image_metrics(ref["train"][:10], {"heldout": None})
    with pytest.raises(ValueError, match="NaN"):
        M.image_metrics(torch.full((10, 1, 8, 8), float("nan")), ref)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        M.image_metrics(torch.zeros(10, 3, 8, 8), ref)


def test_inception_fid_needs_local_weights(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="local FID Inception weights"):
        M.inception_fid(x, x, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        M.inception_fid(x, x, tmp_path / "missing.pth")
    w = tmp_path / "w.pth"
    w.write_bytes(b"0")
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchmetrics"):
            M.inception_fid(x, x, w)


def test_corrupt_classifier_weights_give_a_clear_error(tmp_path):
    import shutil

    d = tmp_path / "clf"
    shutil.copytree(M.CLASSIFIER_DIR, d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: missing or corrupt"):
        M.load_digits_classifier(d)


# ---------------------------------------------------------------- the shipped model


def test_shipped_digits_model_beats_noise():
    from steindiff.generate import generate
    from steindiff.models.registry import load_model

    spec = load_model("digits")
    assert spec.sample_shape == (1, 8, 8)
    assert not any(p.requires_grad for p in spec.denoiser.parameters())
    assert not spec.denoiser.training
    assert spec.info["heldout"].shape == (297, 1, 8, 8)
    gen = generate(spec, solver="dpmpp_2m", nfe=20, n=200, seed=0)
    m = M.image_metrics(gen.x, spec, floor_draws=1)
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m_noise = M.image_metrics(noise, spec, floor_draws=1)
    assert m["digits_fid"] < 0.2 * m_noise["digits_fid"]
    assert m["recall"] > 0.5 and m["precision"] > 0.5


# ---------------------------------------------------------------- image grids


def test_save_image_grid(tmp_path):
    from steindiff.plotting import image_grid, save_image_grid

    x = torch.linspace(-1, 1, 5 * 64).reshape(5, 1, 8, 8)
    save_image_grid(x, tmp_path / "g.png", nrow=3, scale=2)
    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1) and im.dtype == np.uint8
    rgb = image_grid(torch.zeros(4, 3, 4, 4), 2, padding=0)
    assert rgb.shape == (8, 8, 3) and (rgb == 128).all()
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
    with pytest.raises(ValueError, match="shape"):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError):
        save_image_grid(x, tmp_path / "no" / "g.png")


# ---------------------------------------------------------------- KID and k-NN precision/recall against the papers


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018, the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3: the within-set sums over
    distinct pairs, the cross sum over all pairs; a direct double loop."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def test_kid_is_the_unbiased_polynomial_kernel_mmd():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(9, 5)), 0.8 * g.normal(size=(9, 5)) + 0.3
    ref = _poly_mmd2_unbiased(a, b)
    assert abs(ref) > 0.05
    assert M.kid(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-12)
    assert M.kid(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(ref, rel=1e-12)
    # subsets of 6 out of 9 and 11: the mean over subsets tends to the full-set U-statistic (unequal sizes)
    c = 0.8 * g.normal(size=(11, 5)) + 0.3
    full = _poly_mmd2_unbiased(a, c)
    subsets = [M.kid(torch.from_numpy(a), torch.from_numpy(c), n_subsets=1, subset_size=6, seed=s) for s in range(40)]
    spread = float(np.std(subsets))
    assert M.kid(torch.from_numpy(a), torch.from_numpy(c), n_subsets=1500, subset_size=6) == \
        pytest.approx(full, abs=5 * spread / math.sqrt(1500))
    assert M.kid(torch.from_numpy(a), torch.from_numpy(c), n_subsets=1500, subset_size=9) == \
        pytest.approx(full, abs=5 * spread / math.sqrt(1500))
    # smaller subsets are noisier: subset_size is the size of each subset
    spread3, spread9 = (float(np.std([M.kid(torch.from_numpy(a), torch.from_numpy(c), n_subsets=1, subset_size=m,
                                            seed=s) for s in range(40)])) for m in (3, 9))
    assert spread3 > 2 * spread9
    with pytest.raises(ValueError, match="same d"):
        M.kid(torch.zeros(4, 3), torch.zeros(4, 2))


def test_kid_has_no_bias_between_sets_of_one_distribution():
    """Over 400 pairs of sets of 8 from one distribution, KID averages 0 within its standard error, while the
    biased (V-statistic) estimate, with the diagonal terms, is positive by far more."""
    g = np.random.default_rng(1)
    vals, biased = [], []
    for _ in range(400):
        a, b = g.normal(size=(8, 3)), g.normal(size=(8, 3))
        vals.append(M.kid(torch.from_numpy(a), torch.from_numpy(b)))
        kxx, kyy, kxy = ((u @ v.T / 3 + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(vals) / math.sqrt(len(vals))
    assert abs(np.mean(vals)) < 3 * se < np.mean(biased) / 10


def _knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 by brute force: the radius of a point is the distance to its k-th nearest
    other point of its own set; precision is the fraction of fake points in some real point's closed ball,
    recall the fraction of real points in some fake point's closed ball (the authors compare distance <= radius)."""
    def radii(s):
        return [sorted(float(np.linalg.norm(s[i] - s[j])) for j in range(len(s)) if j != i)[k - 1]
                for i in range(len(s))]

    def covered(points, centres, r):
        return float(np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points]))

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_against_brute_force_for_several_k():
    """Sets built so that k (2, 3 or 4), and which set's radii each side uses, change the answers."""
    g = np.random.default_rng(11)
    real = g.normal(size=(24, 3))
    fake = 1.3 * g.normal(size=(17, 3)) + np.array([0.8, 0.0, 0.0])
    answers = {k: _knn_precision_recall(real, fake, k) for k in (1, 2, 3, 4, 5)}
    for k, (p, r) in answers.items():
        assert M.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k) == (p, r)
    assert M.precision_recall(torch.from_numpy(real), torch.from_numpy(fake)) == answers[3]

    def own_radius(points, other):  # points with some point of `other` within their own 3-NN radius
        return float(np.mean([any(np.linalg.norm(y - x) <= sorted(np.linalg.norm(points - x, axis=1))[3]
                                  for y in other) for x in points]))

    p2, p3, p4 = (answers[k][0] for k in (2, 3, 4))
    r2, r3, r4 = (answers[k][1] for k in (2, 3, 4))
    assert p2 != p3 != p4 and r2 != r3 != r4  # an off-by-one in k shows
    assert own_radius(fake, real) != p3 and own_radius(real, fake) != r3  # so do the other set's radii


def test_precision_recall_balls_are_closed():
    """On a lattice, distances are exact: real points 0..4 on a line (k = 3: radius 3 at the ends, 2 inside);
    a fake point at distance exactly 3 from real point 0 and farther from the others is inside its ball."""
    real = torch.tensor([[float(i), 0.0] for i in range(5)], dtype=torch.float64)
    fake = torch.tensor([[-3.0, 0.0], [0.0, 3.0], [2.0, 2.0], [2.0, 2.5], [9.0, 9.0]], dtype=torch.float64)
    p, r = M.precision_recall(real, fake, k=3)
    assert (p, r) == _knn_precision_recall(real.numpy(), fake.numpy(), 3)
    assert p == pytest.approx(3 / 5)  # (-3, 0) and (0, 3) on radius 3 of point 0, (2, 2) on radius 2 of point 2
    assert M.precision_recall(fake, real, k=3)[1] == p  # recall's balls, the roles swapped: closed too


def test_image_metrics_compare_the_samples_with_the_held_out_images(ref):
    """image_metrics = the public metrics of the classifier features: held-out images as the real set of
    precision/recall (with the k asked for), the samples as the generated set."""
    g = torch.Generator().manual_seed(2)
    x = (ref["train"][:60] + 0.3 * torch.randn(60, 1, 8, 8, generator=g)).clamp(-1, 1)
    m = M.image_metrics(x, ref, k=5, floor_draws=1)
    f, y = M.digits_features(x)
    f_h, _ = M.digits_features(ref["heldout"])
    p, r = M.precision_recall(f_h, f, 5)
    assert p != r and (m["precision"], m["recall"]) == (p, r)
    assert m["digits_kid"] == M.kid(f, f_h) and m["digits_fid"] == M.frechet_distance(f, f_h)
    assert m["class_tv"] == M.class_tv(y, ref["heldout_labels"])
    p3, r3 = M.precision_recall(f_h, f, 3)
    assert (p, r) != (p3, r3)
    m3 = M.image_metrics(x, ref, floor_draws=1)  # k = 3 by default (Kynkaanniemi et al.)
    assert (m3["precision"], m3["recall"]) == (p3, r3)


def test_image_metrics_floors_are_real_training_images_against_the_held_out_ones(ref):
    """Each *_floor is the same metric of as many training images as samples (drawn with ``seed``, averaged over
    ``floor_draws`` draws), against the same held-out images; all training images once when there are no more
    than samples; memorization_floor is the held-out images' own rate."""
    small = {"heldout": ref["heldout"][:40], "heldout_labels": ref["heldout_labels"][:40],
             "train": ref["train"][:50], "train_labels": ref["train_labels"][:50]}
    g = torch.Generator().manual_seed(4)
    x = (ref["train"][100:120] + 0.3 * torch.randn(20, 1, 8, 8, generator=g)).clamp(-1, 1)
    f_h, _ = M.digits_features(small["heldout"])
    f_tr, y_tr = M.digits_features(small["train"])

    def scores(f, y, seed):
        p, r = M.precision_recall(f_h, f, 3)
        return {"digits_fid": M.frechet_distance(f, f_h), "digits_kid": M.kid(f, f_h, seed=seed),
                "class_tv": M.class_tv(y, small["heldout_labels"]), "precision": p, "recall": r}

    for seed, draws in ((0, 3), (5, 2)):
        m = M.image_metrics(x, small, seed=seed, floor_draws=draws)
        gen = torch.Generator().manual_seed(seed)
        picks = [torch.randperm(50, generator=gen)[:20] for _ in range(draws)]
        expected = [scores(f_tr[i], y_tr[i], seed) for i in picks]
        for key in expected[0]:
            assert m[f"{key}_floor"] == pytest.approx(float(np.mean([e[key] for e in expected])), rel=1e-12), key
        assert (m["n"], m["n_floor"], m["n_heldout"]) == (20, 20, 40)
        assert m["memorization_floor"] == M.memorization_rate(small["heldout"], small["train"])
    many = (ref["train"][100:170] + 0.3 * torch.randn(70, 1, 8, 8, generator=g)).clamp(-1, 1)
    m = M.image_metrics(many, small, floor_draws=4)  # more samples than training images: all of them, once
    assert m["n_floor"] == 50 and m["digits_fid_floor"] == pytest.approx(M.frechet_distance(f_tr, f_h), rel=1e-6)


def test_class_tv_and_nearest_distance_against_direct_formulas():
    """class_tv: half the L1 distance of the two label histograms, each normalised by its own count; the nearest
    training image's distance: RMS per pixel, and memorisation counts distances strictly below the threshold."""
    assert M.class_tv(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1, 1, 1, 1, 1])) == pytest.approx(0.375)
    assert M.class_tv(torch.tensor([9, 9]), torch.tensor([0, 9, 9, 9])) == pytest.approx(0.25)
    train = torch.zeros(3, 1, 8, 8)
    train[1] += 0.5
    train[2] -= 0.4
    x = torch.stack([torch.full((1, 8, 8), 0.3), torch.full((1, 8, 8), -0.05)])
    d = M.nearest_distance(x, train)
    assert d.tolist() == pytest.approx([0.2, 0.05], abs=1e-7)  # to 0.5, and to 0
    assert M.memorization_rate(x, train, threshold=0.2 + 1e-6) == 1.0
    assert M.memorization_rate(x, train, threshold=0.1) == 0.5
    assert M.memorization_rate(x, train, threshold=0.05 - 1e-6) == 0.0


def test_features_see_images_clamped_to_the_data_range(ref):
    """Samples beyond [-1, 1] are judged as the images they display: the same features and labels as clamped."""
    x = 3 * ref["heldout"][:16]
    f, y = M.digits_features(x)
    fc, yc = M.digits_features(x.clamp(-1, 1))
    assert torch.equal(f, fc) and torch.equal(y, yc)
    with torch.no_grad():  # the clamp matters: the network itself sees the difference
        assert not torch.allclose(M.load_digits_classifier().features(x).double(), f)
