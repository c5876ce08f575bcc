"""``steindiff calibrate-pipeline``: calibrate a solver once for a diffusers pipeline in a local folder (Stable
Diffusion and its relatives, Stable Diffusion 3, FLUX), over your prompts, guidance scale and image size, and
write the calibration for ``SteinDiffScheduler``:

    steindiff calibrate-pipeline ./my-pipeline --prompts prompts.txt --guidance-scale 5 --height 512 --width 512 \\
        --solver dpmpp_2m --nfe 8 --out cal.json

then in Python ``pipe.scheduler = SteinDiffScheduler.from_pipeline(pipe, calibration="cal.json",
guidance_scale=5)`` and ``pipe(prompt, num_inference_steps=8, guidance_scale=5, height=512, width=512)``.

The pipeline is loaded offline (``DiffusionPipeline.from_pretrained(PATH)``, nothing downloaded) and encodes the
prompts itself (one per line of the file).  The fit is cached (``--calibration-dir``, default
``$XDG_CACHE_HOME/steindiff/calibrations``) by the model's weights, latent size, noise process, solver, noise
levels (step count, schedule, resolution shift) and conditioning (guidance scale and a hash of the prompt
embeddings): running it again with the same arguments reads the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..calibration import CALIBRATION_SEED
from ..trajectory import FIT_MODES
from . import UsageError, common, emit, usage_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-pipeline", help="calibrate a solver once for a local diffusers pipeline",
                       description=__doc__)
    p.add_argument("pipeline", metavar="PATH", help="a pipeline folder (model_index.json), as save_pretrained writes")
    p.add_argument("--prompts", required=True, metavar="FILE", help="a text file of prompts, one per line")
    p.add_argument("--negative-prompt", default="", help="the negative prompt of classifier-free guidance")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="the pipeline's guidance_scale (classifier-free guidance; FLUX: its embedded guidance)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--solver", default="dpmpp_2m", help="the solver SteinDiffScheduler will run")
    p.add_argument("--nfe", type=int, default=8,
                   help="model passes per image; the pipeline's num_inference_steps is the steps this buys (Heun: "
                        "(nfe + 1) / 2)")
    p.add_argument("--schedule", default=None,
                   help="karras, logsnr or time; flow pipelines also flow (diffusers' shifted flow schedule, their "
                        "default); default: karras for VP pipelines")
    p.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent (> 0)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens of SD3/FLUX prompt encoding (default: the pipeline's own default)")
    p.add_argument("--fit", default="both", choices=FIT_MODES,
                   help="fit the per-step gammas, the noise levels, or both")
    p.add_argument("--n", type=int, default=None, help="calibration batch (default 512, half of it validates)")
    p.add_argument("--ref-steps", type=int, default=200, help="steps of the fine reference solve")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time budget of the refinement")
    p.add_argument("--max-solves", type=int, default=200, help="refinement budget in solves of the fit batch")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed of the calibration noise")
    p.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES),
                   help="dtype of the calibration's solves")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the calibration here (for SteinDiffScheduler(calibration=...) and steindiff export)")
    p.add_argument("--calibration-dir", default=None, help="cache of calibrations (default: "
                   "$XDG_CACHE_HOME/steindiff/calibrations)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="only read the cache: a usage error when nothing is cached for these arguments")
    common.add_device(p, help=common.DEVICE_HELP)
    common.add_common(p)
    p.set_defaults(func=run)


def _read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --prompts {path!r}: {e}") from None
    prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path!r} holds no prompt (one per line)")
    return prompts


def _check(args: argparse.Namespace) -> None:
    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        what = "does not exist" if not folder.exists() else "has no model_index.json (not a diffusers pipeline folder)"
        raise UsageError(f"pipeline {args.pipeline!r} {what}")
    if args.nfe < 1:
        raise UsageError(f"--nfe must be >= 1, got {args.nfe}")
    for flag, v in (("--height", args.height), ("--width", args.width), ("--n", args.n),
                    ("--max-sequence-length", args.max_sequence_length)):
        if v is not None and v < (4 if flag == "--n" else 1):
            raise UsageError(f"{flag} must be >= {4 if flag == '--n' else 1}, got {v}")
    if not args.guidance_scale >= 0:
        raise UsageError(f"--guidance-scale must be >= 0 (at most 1: no classifier-free guidance), got "
                         f"{args.guidance_scale}")
    if args.ref_steps < 4 or not args.max_seconds > 0 or args.max_solves < 1 or not args.rho > 0:
        raise UsageError("--ref-steps must be >= 4, --max-seconds > 0, --max-solves >= 1 and --rho > 0")


def _quiet_loading(progress: bool) -> None:
    """Errors only from diffusers' and transformers' loggers while loading; their progress bars as asked."""
    import diffusers

    libs = [diffusers.utils.logging]
    try:
        import transformers

        libs.append(transformers.utils.logging)
    except ImportError:
        pass
    for lib in libs:
        lib.set_verbosity_error()
        (lib.enable_progress_bar if progress else lib.disable_progress_bar)()


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..solvers import SOLVERS

    if args.solver not in SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    steps = common.steps_for(args.solver, args.nfe)
    prompts = _read_prompts(args.prompts)
    common.check_outputs(args.out)
    device = common.device_from_args(args)
    try:
        from diffusers import DiffusionPipeline

        from ..integrations.diffusers_scheduler import SteinDiffScheduler, calibrate_scheduler
    except ImportError as e:
        raise UsageError(f"calibrate-pipeline needs diffusers (pip install 'steindiff[diffusers]'): {e}") from None
    _quiet_loading(not args.no_progress)
    try:
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the pipeline {args.pipeline!r} offline: {e}") from None
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    with usage_errors(ValueError):
        SteinDiffScheduler.from_config(pipe.scheduler.config, solver=args.solver, schedule=args.schedule,
                                       rho=args.rho)  # the solver, schedule and scheduler config, before any work
    embeddings = None
    if args.max_sequence_length is not None and getattr(pipe, "transformer", None) is not None:
        from ..integrations.diffusers_flow import encode_prompts

        embeddings = encode_prompts(pipe, prompts, negative_prompt=args.negative_prompt,
                                    guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length)
    options = dict(n=args.n, ref_steps=args.ref_steps, max_seconds=args.max_seconds, max_solves=args.max_solves,
                   seed=args.seed, fit=args.fit)
    with usage_errors(ValueError):
        sched = calibrate_scheduler(
            pipe, prompts, embeddings=embeddings, num_inference_steps=steps, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt, height=args.height, width=args.width, solver=args.solver,
            schedule=args.schedule, rho=args.rho, cache_dir=args.calibration_dir,
            calibrate_missing=not args.no_calibrate, dtype=common.DTYPES[args.dtype], progress=not args.no_progress,
            notice=lambda m: print(m, file=sys.stderr), **{k: v for k, v in options.items() if v is not None})
    rec = sched.calibration
    if rec is None:
        raise UsageError("nothing is cached for these arguments (--no-calibrate): run without it to calibrate")
    if args.out is not None:
        sched.save_calibration(args.out)
    made = rec["pipeline"]
    g = rec.get("guidance_scale") or 1.0
    size = f", height={made['height']}, width={made['width']}"
    out = args.out or "FILE.json"
    usage = [f"pipe.scheduler = SteinDiffScheduler.from_pipeline(pipe, calibration={out!r}, guidance_scale={g:g})",
             f"pipe(prompt, num_inference_steps={steps}, guidance_scale={args.guidance_scale:g}{size})"]
    gam = rec.get("gammas") or []
    lines = [(f"wrote {args.out}: " if args.out else "cached: ")
             + f"{rec['solver']} calibration of {made['class']} at {steps} steps ({args.nfe} NFE), "
               f"{made['height']}x{made['width']} pixels, guidance {g:g}",
             "  gammas " + " ".join(f"{v:.3f}" for v in gam),
             "  noise levels (VE) " + " ".join(f"{s:.4g}" for s in rec["sigmas"])]
    if not args.out:
        lines.append("  (no --out: only the cache holds it; pass --out FILE to use it from SteinDiffScheduler)")
    lines += ["use it:", *("  " + u for u in usage)]
    summary = {**rec, "made_for": rec["pipeline"], "out": args.out, "pipeline": args.pipeline,
               "num_inference_steps": steps, "nfe": args.nfe, "usage": usage,
               "calibration_meta": sched.calibration_meta}
    emit(args, summary, "\n".join(lines))
    return 0
