"""Train the patch classifier of the patch metrics (``steindiff/metrics/patches.py``) and write it to
``steindiff/weights/patch_classifier``: it learns which scene (photograph) a patch comes from on the
training regions of the ``patches`` data set (with random horizontal flips), and is scored on the
held-out regions, never seen in training.  About 5 minutes on one CPU thread.

    python benchmarks/train_patch_classifier.py [--epochs 20] [--out steindiff/weights/patch_classifier]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from steindiff.data import PHOTOS, load_patches_dataset
from steindiff.metrics.patches import PATCH_CLASSIFIER_DIR, PATCH_CLASSIFIER_SCHEMA, PatchClassifier


@torch.no_grad()
def _predict(model: PatchClassifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, x.shape[0], 512)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="patches", help="the patches data set (steindiff train --data)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(PATCH_CLASSIFIER_DIR))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_patches_dataset(args.data)
    held = torch.from_numpy(ds.holdout)
    train = torch.ones(ds.x.shape[0], dtype=torch.bool)
    train[held] = False
    x, y, xh, yh = ds.x[train], ds.labels[train], ds.x[held], ds.labels[held]
    n_classes = len(PHOTOS)  # one per color scene; they come first in SCENES
    if int(ds.labels.max()) >= n_classes:
        raise SystemExit(f"{args.data}: the classifier is trained on color photographs only")
    model = PatchClassifier(n_classes=n_classes)
    steps = args.epochs * -(-x.shape[0] // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], args.batch_size):
            idx = perm[i : i + args.batch_size]
            flip = (torch.rand(idx.shape[0], generator=g) < 0.5)[:, None, None, None]
            loss = F.cross_entropy(model(torch.where(flip, x[idx].flip(-1), x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy "
              f"{(_predict(model, xh) == yh).double().mean().item():.3f}", flush=True)
    with torch.no_grad():
        scale = float(torch.cat([model.features(x[i : i + 512]) for i in range(0, x.shape[0], 512)]).square()
                      .mean().sqrt())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {
        "schema": PATCH_CLASSIFIER_SCHEMA,
        "architecture": {"width": 24, "n_features": 64, "n_classes": n_classes, "feature_scale": scale},
        "input": "(N, 3, 32, 32) patches in [-1, 1]; classes: the color scenes of steindiff.data.SCENES",
        "training": {"data": ds.source, "fingerprint": ds.fingerprint(), "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "n_train": int(x.shape[0]),
                     "n_heldout": int(xh.shape[0]),
                     "train_accuracy": float((_predict(model, x) == y).double().mean()),
                     "heldout_accuracy": float((_predict(model, xh) == yh).double().mean()),
                     "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                     "threads": torch.get_num_threads()},
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(json.dumps(config["training"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
