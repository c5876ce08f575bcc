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
