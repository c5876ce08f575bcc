"""Image datasets for training and evaluation: loading, validation and the held-out split.

All end up as float32 ``N x C x H x W`` in ``[-1, 1]``:

``digits``
    scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to [-1, 1], with labels).
    A fixed, seeded split of :data:`DIGITS_HOLDOUT` images is held out from training for evaluation.
``*.npy`` / ``*.npz``
    an array ``N x C x H x W``.  Floating-point arrays must already be in ``[-1, 1]``; integer arrays
    must be in ``[0, 255]`` (8-bit images) and are scaled to ``[-1, 1]``.  In a ``.npz``, images are
    the array named ``x``, ``images``, ``data`` or ``samples`` (or its only array); labels (optional)
    are ``y`` or ``labels``.
a folder of ``*.png``
    8-bit images of one size, read in sorted name order, grayscale if all are grayscale else RGB
    (alpha dropped), scaled from ``[0, 255]`` to ``[-1, 1]``.
``patches`` (options: ``patches:size=48,flip,photos=astronaut+coffee``)
    RGB patches (default 32x32) of the color photographs that ship inside scikit-image
    (``skimage/data``) and scikit-learn (the files of ``load_sample_images``: china, flower), one per
    scene (:data:`PHOTOS`), read at run time, never downloaded; each photo's longer side is first
    reduced to at most :data:`PATCH_MAX_SIDE` pixels (Lanczos).  Patches are cut every ``size / 2``
    pixels; ``flip`` adds their mirror images.  Labels: the scene of each patch (:data:`SCENES`).
    The held-out split is by photo region: each photo is tiled into blocks of ``max(64, 2 size)``
    pixels, a seeded fifth of the blocks is held out, and a patch is held out if it lies inside
    held-out blocks, used for training if it lies inside training blocks, and dropped if it straddles
    both; so no held-out pixel is ever seen in training.  ``motorcycle_right``, the other view of
    ``motorcycle_left``'s stereo pair, is left out of the default set (it shows the left view's held-out
    regions) and can be selected, as can the grayscale photos (:data:`GRAY_PHOTOS`, as R = G = B), not
    alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ImageDataset", "DataError", "load_dataset", "load_digits_dataset", "load_patches_dataset", "split_indices",
           "DIGITS_HOLDOUT", "PHOTOS", "GRAY_PHOTOS", "ALL_PHOTOS", "SCENES", "PATCH_SIZE", "PATCH_MAX_SIDE",
           "PATCH_HOLDOUT"]

DIGITS_HOLDOUT = 297
#: The color photographs of ``patches``, one per scene: scikit-image's, then scikit-learn's two sample images.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "ihc", "retina", "china",
          "flower")
#: Selectable with ``photos=``: the other view of the motorcycle, and scikit-image's grayscale photographs
#: (next to a color one).
GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel")
ALL_PHOTOS = PHOTOS + ("motorcycle_right",) + GRAY_PHOTOS
#: Patch labels: the scene of each photo, color scenes first (the index of a label).
SCENES = tuple(dict.fromkeys(p.split("_")[0] for p in ALL_PHOTOS))
PATCH_SIZE, PATCH_MAX_SIDE, PATCH_HOLDOUT, PATCH_SPLIT_SEED = 32, 640, 0.2, 0


class DataError(ValueError):
    """A dataset that cannot be used (the message names the file and what is wrong)."""


@dataclass
class ImageDataset:
    """Images ``x`` (float32, ``N x C x H x W`` in ``[-1, 1]``), optional integer ``labels``."""

    x: torch.Tensor
    labels: torch.Tensor | None
    source: str
    name: str
    holdout: np.ndarray | None = None  # the data set's own held-out indices (patches: by photo region)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the float32 image bytes."""
        return hashlib.sha256(self.x.contiguous().numpy().tobytes()).hexdigest()[:16]


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's 8x8 digits, ``N x 1 x 8 x 8`` scaled from 0..16 to [-1, 1], with labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 8.0 - 1.0)[:, None]
    return ImageDataset(x=x.contiguous(), labels=torch.from_numpy(np.asarray(d.target, dtype=np.int64)),
                        source="digits", name="digits")


def _check_images(arr: np.ndarray, where: str) -> np.ndarray:
    """Validate and scale an ``N x C x H x W`` array to float32 in [-1, 1]."""
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{where}: images must be a float or integer array, got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = " (add a channel axis: x[:, None])" if arr.ndim == 3 else ""
        raise DataError(f"{where}: images must have rank 4 (N x C x H x W), got shape {arr.shape}{hint}")
    n, c, h, w = arr.shape
    if n == 0:
        raise DataError(f"{where}: the array holds no images (shape {arr.shape})")
    if c > 4 and w <= 4:
        raise DataError(f"{where}: shape {arr.shape} looks channels-last; transpose to N x C x H x W")
    if c > 4:
        raise DataError(f"{where}: {c} channels; expected 1 to 4 (N x C x H x W)")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must be 8-bit values in [0, 255], got range [{lo}, {hi}]")
        return (arr.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(n, -1).any(1).sum())
        raise DataError(f"{where}: {bad} image(s) contain NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1 - 1e-4 or hi > 1 + 1e-4:
        raise DataError(f"{where}: float images must be in [-1, 1], got range [{lo:.4g}, {hi:.4g}] (scale them: "
                        "x / 127.5 - 1 for 0..255 data, 2 x - 1 for 0..1 data)")
    if lo >= 0 and hi <= 1 and hi - lo > 0:
        warnings.warn(f"{where}: float images lie in [0, 1]; the model expects [-1, 1] data (use 2 x - 1 "
                      "if these are 0..1 images)", stacklevel=3)
    return np.clip(arr, -1, 1)


def _check_labels(y: Any, n: int, where: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers of shape ({n},), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _load_array(path: Path) -> ImageDataset:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read as a NumPy array file: {e}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            img_key = next((k for k in ("x", "images", "data", "samples") if k in keys), None)
            if img_key is None:
                others = [k for k in keys if k not in ("y", "labels")]
                if len(others) != 1:
                    raise DataError(f"{path}: cannot tell which array holds the images among "
                                    f"{keys}; name it 'x' or 'images'")
                img_key = others[0]
            arr = loaded[img_key]
            lab_key = next((k for k in ("y", "labels") if k in keys), None)
            raw_labels = loaded[lab_key] if lab_key else None
        where = f"{path}[{img_key!r}]"
    else:
        arr, raw_labels, where = loaded, None, str(path)
    x = _check_images(arr, where)
    if raw_labels is not None:
        labels = _check_labels(raw_labels, x.shape[0], f"{path}[labels]")
    return ImageDataset(x=torch.from_numpy(x).contiguous(), labels=labels, source=str(path.resolve()), name=path.stem)


def _load_png_folder(path: Path) -> ImageDataset:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise DataError(f"{path}: folder contains no .png images")
    imgs, modes, size = [], set(), None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    raise DataError(f"{f}: {im.mode} images are not supported; save 8-bit PNGs")
                gray = im.mode in ("1", "L", "LA")
                imgs.append(im.convert("L" if gray else "RGB"))
                modes.add("L" if gray else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{f}: not a readable PNG image ({e})") from None
        if size is None:
            size = imgs[-1].size
        elif imgs[-1].size != size:
            raise DataError(f"{f}: size {imgs[-1].size[0]}x{imgs[-1].size[1]} differs from "
                            f"{size[0]}x{size[1]} of {files[0].name}")
    mode = "RGB" if "RGB" in modes else "L"
    arrs = [np.asarray(im.convert(mode), dtype=np.uint8) for im in imgs]
    arr = np.stack(arrs)
    arr = arr[:, None] if mode == "L" else arr.transpose(0, 3, 1, 2)
    x = _check_images(np.ascontiguousarray(arr), str(path))
    return ImageDataset(x=torch.from_numpy(x).contiguous(), labels=None, source=str(path.resolve()), name=path.name)


def _patch_options(spec: str) -> tuple[int, bool, tuple[str, ...]]:
    """``(size, flip, photos)`` of a ``patches[:size=N,flip,photos=a+b]`` spec."""
    size, flip, photos = PATCH_SIZE, False, PHOTOS
    opts = spec.partition(":")[2]
    for opt in filter(None, opts.split(",")):
        key, _, val = opt.partition("=")
        if key == "size" and val.isdigit() and int(val) >= 16 and int(val) % 2 == 0:
            size = int(val)
        elif key == "flip" and not val:
            flip = True
        elif key == "photos" and val:
            photos = tuple(val.split("+"))
            unknown = [p for p in photos if p not in ALL_PHOTOS]
            if unknown:
                raise DataError(f"{spec}: unknown photo(s) {', '.join(unknown)}; choose from {', '.join(ALL_PHOTOS)}")
        else:
            raise DataError(f"{spec}: bad option {opt!r}; use size=N (an even number >= 16), flip, photos=NAME+NAME")
    if set(photos) <= set(GRAY_PHOTOS):
        raise DataError(f"{spec}: {', '.join(photos)} are grayscale only; an RGB patch model needs at least one "
                        f"color photograph ({', '.join(PHOTOS)})")
    return size, flip, photos


def _read_photo(name: str) -> np.ndarray:
    """A photograph as uint8 ``H x W x 3`` (grayscale repeated), longer side at most :data:`PATCH_MAX_SIDE`."""
    from PIL import Image

    package, folder = "scikit-image", "skimage/data"
    if name in ("china", "flower"):
        package, folder = "scikit-learn", "sklearn/datasets/images"
    found = importlib.util.find_spec(folder.split("/")[0])  # the files, without importing the package
    if found is None or found.origin is None:
        raise DataError(f"photo {name!r} ships with {package}, which is not installed (pip install {package})")
    path = next(Path(found.origin).parent.parent.joinpath(folder).glob(f"{name}.*"), None)
    if path is None:
        raise DataError(f"photo {name!r} is missing from this {package} installation")
    with Image.open(path) as f:
        im = f.convert("RGB")
    scale = PATCH_MAX_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def load_patches_dataset(spec: str = "patches") -> ImageDataset:
    """RGB patches of photographs, with their held-out split by photo region (see the module doc).  The last
    one is cached (a model's reference data reloads it): treat its arrays as read-only."""
    size, flip, photos = _patch_options(spec)
    stride, block = size // 2, max(64, 2 * size)
    xs, ys, held = [], [], []
    for name in photos:
        img = _read_photo(name)
        h, w, _ = img.shape
        if min(h, w) < size:
            raise DataError(f"{spec}: photo {name} is {w}x{h} pixels, smaller than the patch size {size}")
        rows, cols = -(-h // block), -(-w // block)
        rng = np.random.default_rng([PATCH_SPLIT_SEED, ALL_PHOTOS.index(name)])
        blocks = np.zeros(rows * cols, bool)
        blocks[rng.permutation(rows * cols)[: round(PATCH_HOLDOUT * rows * cols)]] = True
        mask = blocks.reshape(rows, cols).repeat(block, 0).repeat(block, 1)[:h, :w]
        win = (size, size)
        frac = np.lib.stride_tricks.sliding_window_view(mask, win)[::stride, ::stride].mean((2, 3))
        patches = np.lib.stride_tricks.sliding_window_view(img, win, axis=(0, 1))[::stride, ::stride]
        keep = (frac == 0) | (frac == 1)
        xs.append(patches[keep])
        held.append(frac[keep] == 1)
        ys.append(np.full(int(keep.sum()), SCENES.index(name.split("_")[0])))
    x, y, is_held = np.concatenate(xs), np.concatenate(ys), np.concatenate(held)
    if flip:
        x, y, is_held = np.concatenate([x, x[..., ::-1]]), np.tile(y, 2), np.tile(is_held, 2)
    if is_held.all() or not is_held.any():
        raise DataError(f"{spec}: patches of {size} pixels leave no {'training' if is_held.all() else 'held-out'} "
                        "patch; choose a smaller size or more photos")
    opts = ([f"size={size}"] * (size != PATCH_SIZE) + ["flip"] * flip
            + [f"photos={'+'.join(photos)}"] * (photos != PHOTOS))
    source = "patches" + (":" + ",".join(opts) if opts else "")  # canonical: reloads the same patches
    return ImageDataset(x=torch.from_numpy(_check_images(np.ascontiguousarray(x), spec)), labels=torch.from_numpy(y),
                        source=source, name="patches", holdout=np.flatnonzero(is_held))


def load_dataset(spec: str | os.PathLike) -> ImageDataset:
    """``"digits"``, ``"patches[:options]"``, a ``.npy``/``.npz`` file or a folder of PNG images (module doc)."""
    if str(spec) == "digits":
        return load_digits_dataset()
    if str(spec) == "patches" or str(spec).startswith("patches:"):
        return load_patches_dataset(str(spec))
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (use 'digits', a .npy/.npz file or a folder of .png images)")
    if path.is_dir():
        return _load_png_folder(path)
    if path.suffix.lower() in (".npy", ".npz"):
        return _load_array(path)
    raise DataError(f"{path}: unsupported dataset file; use a .npy/.npz array or a folder of .png images")


def split_indices(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, held-out) index arrays."""
    if not 0 <= holdout < n:
        raise DataError(f"cannot hold out {holdout} of {n} images: need 0 <= holdout < {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])

