"""``steindiff train``: train a small U-Net denoiser on the 8x8 digits, photo patches or your own images.

Data: ``digits`` (scikit-learn's 8x8 digits, 297 images held out), ``patches`` (32x32 RGB patches of the
color photographs shipped in scikit-image and scikit-learn, held out by photo region; options
``patches:size=48,flip,photos=astronaut+coffee``), a ``.npy``/``.npz`` array
``N x C x H x W`` (floats in [-1, 1], or 8-bit integers in [0, 255]) or a folder of 8-bit PNGs.
The checkpoint folder ``--out`` gets ``model.safetensors`` (EMA weights), ``config.json`` and
``train_state.pt`` (the raw weights and the optimizer's two moment estimates, three times the
weights' size: what an exact resume needs besides the EMA weights); ``--resume`` continues it (on
either device).  Load it with ``--model OUT`` in
other commands.  On a GPU (``--device cuda``) the images live on the device, the losses are read
back every ``--log-every`` iterations (no synchronisation per iteration) and ``--precision bf16``
runs the network under bf16 autocast; checkpoints are written from CPU copies.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from . import UsageError, emit, usage_errors
from .common import DEVICE_HELP, add_common, add_device, device_from_args


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a U-Net denoiser on images", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits",
                   help="'digits', 'patches[:size=N,flip,photos=A+B]', a .npy/.npz file or a folder of .png images")
    p.add_argument("--out", required=True, help="checkpoint folder to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue training the checkpoint in --out up to --iters")
    p.add_argument("--objective", "--loss", dest="loss", default="edm", choices=["edm", "vp-eps", "flow"],
                   help="EDM (Karras et al. 2022), VP epsilon prediction, or flow: rectified flow's velocity "
                        "(x_t = (1 - t) x0 + t eps, as Stable Diffusion 3; loads as a flow model)")
    p.add_argument("--logit-mean", type=float, default=0.0,
                   help="flow: times t = sigmoid(n) with n ~ N(mean, std^2), SD3's logit-normal sampling (default 0)")
    p.add_argument("--logit-std", type=float, default=1.0, help="flow: std of the logit-normal times (default 1)")
    p.add_argument("--iters", type=int, default=6000, help="total training iterations")
    p.add_argument("--batch-size", type=int, default=128, help="images per iteration")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up iterations")
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the weights' moving average (the saved model)")
    p.add_argument("--holdout", type=int, default=None,
                   help="images held out for evaluation (default: 297 for digits, else 0; patches hold out "
                        "photo regions of their own)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, batches and noise")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write a checkpoint every this many iterations")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (with a checkpoint) after this many seconds (default: no limit)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast of the "
                   "network's forward pass (weights, optimizer and loss stay float32)")
    p.add_argument("--weights-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the saved EMA weights (model.safetensors; float16 halves the file, training "
                        "stays float32)")
    p.add_argument("--log-every", type=int, default=50,
                   help="read the losses back from the device (progress bar, NaN check) every this many iterations")
    arch = p.add_argument_group("architecture")
    arch.add_argument("--channels", type=int, default=32, help="base channel count")
    arch.add_argument("--channel-mult", type=_ints, default=[1, 2, 2], help="channel multiplier per level, e.g. 1,2,2")
    arch.add_argument("--num-blocks", type=int, default=1, help="residual blocks per level")
    arch.add_argument("--attn-levels", type=_ints, default=[2], help="levels with self-attention, e.g. 2 (empty: none)")
    arch.add_argument("--dropout", type=float, default=0.1, help="dropout rate in the residual blocks")
    arch.add_argument("--num-classes", type=int, default=0,
                      help="class-conditional with this many classes (needs labels; 0: unconditional)")
    add_device(p, help=DEVICE_HELP)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import DataError, load_dataset
    from ..models.checkpoint import CheckpointError, is_checkpoint_dir
    from ..models.unet import UNetConfig
    from ..train import TrainConfig, train

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.time_limit is not None and args.time_limit <= 0:
        raise UsageError(f"--time-limit must be > 0, got {args.time_limit}")
    device = device_from_args(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"cannot create {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if args.resume and not (out / "train_state.pt").is_file():
        raise UsageError(f"--resume: {out / 'train_state.pt'} not found (nothing to resume)")
    _check_writable_parent(out)
    if not args.resume and out.exists():
        if is_checkpoint_dir(out):
            raise UsageError(f"{out}: a checkpoint already exists; pass --resume to continue "
                             "it or choose another --out")
        if not out.is_dir() or any(out.iterdir()):
            raise UsageError(f"{out}: exists and is not an empty folder")
    with usage_errors(ValueError):  # DataError is a ValueError
        cfg = TrainConfig(data=args.data, iters=args.iters, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                          ema_decay=args.ema_decay, loss=args.loss, holdout=args.holdout, split_seed=args.split_seed,
                          seed=args.seed, ckpt_every=args.ckpt_every, time_limit_s=args.time_limit,
                          precision=args.precision, log_every=args.log_every, weights_dtype=args.weights_dtype,
                          logit_mean=args.logit_mean, logit_std=args.logit_std)
        ds = load_dataset(args.data)
        unet = UNetConfig(in_channels=ds.shape[0], model_channels=args.channels, channel_mult=args.channel_mult,
                          num_blocks=args.num_blocks, attn_levels=args.attn_levels, dropout=args.dropout,
                          embedding="fourier" if args.loss == "edm" else "positional", num_classes=args.num_classes)
    start = _checkpoint_step(out) if args.resume else 0
    if start is not None and start >= args.iters:
        return _nothing_to_do(args, out, start)
    try:
        with usage_errors(DataError, CheckpointError, FileExistsError):
            res = train(cfg, out, unet, resume=args.resume, progress=not args.no_progress, dataset=ds, device=device)
    except KeyboardInterrupt:  # train() saved a checkpoint if it got past its first iteration
        step = _checkpoint_step(out) if is_checkpoint_dir(out) else None
        raise KeyboardInterrupt(f"checkpoint saved at step {step}; resume with --resume" if step
                                else "no checkpoint written (stopped before the first iteration)") from None
    t = res.config["training"]
    summary = {
        "out": str(res.out), "step": res.step, "iters": args.iters, "stopped_early": res.stopped_early,
        "wall_s": res.wall_s, "loss": res.loss, "loss_iters": res.loss_iters, "n_params": res.n_params,
        "data": {k: res.config["data"][k] for k in ("source", "shape", "n_train", "n_total")},
        "holdout": res.config["data"]["holdout"]["n"], "loss_type": args.loss, "lr": t["lr"],
        "batch_size": t["batch_size"], "device": str(device), "precision": args.precision,
        "start_step": start, "trained": res.step - (start or 0),
    }
    resumed = f" (resumed at {start})" if args.resume else ""
    lines = [
        f"trained {res.step}/{args.iters} iterations{resumed} in {res.wall_s:.1f} s on {device}"
        + (" (stopped early)" if res.stopped_early else ""),
        f"  data      {summary['data']['source']} {tuple(summary['data']['shape'])}, {summary['data']['n_train']} "
        f"train, {summary['holdout']} held out",
        f"  model     U-Net, {res.n_params} parameters, {args.loss} objective",
        f"  loss      {res.loss:.4g} (mean of the last {res.loss_iters} iterations)",
        f"  wrote     {res.out}",
    ]
    emit(args, summary, "\n".join(lines))
    return 0


def _check_writable_parent(out: Path) -> None:
    """Checkpoints are written into a temporary sibling of ``out`` and renamed: create (and remove) one
    now, so an unwritable folder is refused before any training (exit code 2)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write checkpoint {str(out)!r}: directory {str(parent)!r} is "
                         f"not writable ({e.strerror})") from None


def _checkpoint_step(out: Path) -> int | None:
    """The step recorded in a checkpoint's config.json (None if unreadable)."""
    from ..models.checkpoint import read_config

    try:
        return int(read_config(out)["training"]["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _nothing_to_do(args: argparse.Namespace, out: Path, step: int) -> int:
    """``--resume`` of a checkpoint already at or past ``--iters``: say so, change nothing."""
    summary = {"out": str(out), "step": step, "iters": args.iters, "start_step": step, "trained": 0,
               "nothing_done": True}
    emit(args, summary, f"nothing done: the checkpoint in {out} is already at step {step} (--iters {args.iters}); "
                        f"raise --iters above {step} to train further")
    return 0
