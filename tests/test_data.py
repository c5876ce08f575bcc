"""The patches data set: photographs read from the installed packages, the split by photo region, bad input."""

import numpy as np
import pytest
import torch

import steindiff.data as DS
import steindiff.train as T
from steindiff.models.unet import UNetConfig


@pytest.fixture(scope="module")
def chelsea():
    return DS.load_dataset("patches:photos=chelsea")


def test_patches_are_rgb_in_range_with_scene_labels(chelsea):
    assert chelsea.shape == (3, 32, 32) and chelsea.x.dtype == torch.float32
    assert -1 <= float(chelsea.x.min()) < float(chelsea.x.max()) <= 1
    assert set(chelsea.labels.tolist()) == {DS.SCENES.index("chelsea")}
    assert chelsea.source == "patches:photos=chelsea" and chelsea.name == "patches"
    # chelsea is 451 x 300: 27 x 17 positions every 16 pixels, less the patches straddling both sets
    assert 0 < len(chelsea.holdout) < chelsea.x.shape[0] < 27 * 17


def _quarters(x: torch.Tensor) -> set[bytes]:
    """The 16x16 quarters of 32x32 patches cut every 16 pixels: the photo's pixels, tile by tile."""
    q = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 16, 16)
    return {t.numpy().tobytes() for t in q}


def test_held_out_patches_come_from_regions_never_seen_in_training(chelsea):
    held = np.zeros(chelsea.x.shape[0], bool)
    held[chelsea.holdout] = True
    train_tiles, held_tiles = _quarters(chelsea.x[~held]), _quarters(chelsea.x[held])
    assert not train_tiles & held_tiles
    assert 0.1 < len(held_tiles) / (len(train_tiles) + len(held_tiles)) < 0.3  # about a fifth of the blocks


def test_patches_are_deterministic_and_flips_mirror_them(chelsea):
    again = DS.load_dataset("patches:photos=chelsea")
    assert again.fingerprint() == chelsea.fingerprint() and np.array_equal(again.holdout, chelsea.holdout)
    flipped = DS.load_dataset("patches:flip,photos=chelsea")
    n = chelsea.x.shape[0]
    assert flipped.x.shape[0] == 2 * n and torch.equal(flipped.x[n:], chelsea.x.flip(-1))
    assert np.array_equal(flipped.holdout, np.concatenate([chelsea.holdout, chelsea.holdout + n]))
    assert flipped.source == "patches:flip,photos=chelsea"
    assert DS.load_dataset("patches:size=16,photos=chelsea").shape == (3, 16, 16)


def test_a_grayscale_photo_joins_as_rgb():
    ds = DS.load_dataset("patches:size=64,photos=chelsea+camera")
    gray = ds.x[ds.labels == DS.SCENES.index("camera")]
    assert gray.shape[0] > 0 and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


@pytest.mark.parametrize("spec,match", [
    ("patches:photos=camera+moon", "grayscale only.*needs at least one color photograph"),
    ("patches:size=320,photos=chelsea", "photo chelsea is 451x300 pixels, smaller than the patch size 320"),
    ("patches:size=31", "bad option .size=31."),
    ("patches:size=8", "an even number >= 16"),
    ("patches:photos=lena", "unknown photo.*lena"),
    ("patches:sharpen", "bad option 'sharpen'"),
])
def test_bad_patch_options_are_refused(spec, match):
    with pytest.raises(DS.DataError, match=match):
        DS.load_dataset(spec)


def test_patch_size_must_fit_the_unet_before_any_training(tmp_path, monkeypatch):
    ds = DS.load_dataset("patches:size=40,photos=chelsea")
    monkeypatch.setattr(T._Run, "run", lambda *a: pytest.fail("training started"))
    unet = UNetConfig(in_channels=3, model_channels=8, channel_mult=(1, 2, 2, 2, 2), attn_levels=())
    with pytest.raises(DS.DataError, match="size 40x40 is not divisible by 16, the U-Net's downsampling"):
        T.train(T.TrainConfig(data=ds.source), tmp_path / "o", unet, progress=False, dataset=ds)
    with pytest.raises(DS.DataError, match="holds out its own patches"):
        T.train(T.TrainConfig(data=ds.source, holdout=10), tmp_path / "o", progress=False, dataset=ds)
