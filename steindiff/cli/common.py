"""Arguments and checks shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..io import check_writable
from ..schedules import SCHEDULES
from ..solvers import SOLVERS
from . import UsageError, usage_errors

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


#: The model and sampling configuration when neither the command line, a calibration file nor the model
#: (``info["sampling_defaults"]``: a ``sampling_defaults.json`` beside its weights) says otherwise.
DEFAULT_MODEL = "gmm:image64"
SAMPLING_DEFAULTS = {"solver": "dpmpp_2m", "schedule": "karras", "nfe": 10}
_FLAGS = {"solver": "--solver", "schedule": "--schedule", "nfe": "--nfe"}


def add_sampling(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--solver``, ``--nfe``, ``--schedule`` (left out: the model's own sampling defaults, resolved
    by :func:`resolve_sampling` once the model is loaded), ``--rho``, ``--seed`` and ``--dtype``."""
    p.add_argument("--model", default=None,
                   help=f"gmm:<preset> (toy2d, image64, hd1024, ...), digits, patches, or a checkpoint path "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--solver", default=None, help=f"one of: {', '.join(SOLVERS)} (default: the model's, see "
                   f"`steindiff calibrations`; else {SAMPLING_DEFAULTS['solver']})")
    p.add_argument("--nfe", type=int, default=None,
                   help=f"model passes per sample, the budget (default: the model's, else {SAMPLING_DEFAULTS['nfe']})")
    p.add_argument("--schedule", default=None, help=f"one of: {', '.join(SCHEDULES)} (default: the model's, else "
                   f"{SAMPLING_DEFAULTS['schedule']})")
    p.add_argument("--rho", type=float, default=7.0, help="Karras schedule exponent (> 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of the probes")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the sampler state")


def _effective_nfe(solver: str, nfe: int) -> int:
    """The model passes a solve of ``solver`` within the budget ``nfe`` makes (heun's are odd)."""
    from ..solvers import get_solver

    n = steps_for(solver, nfe)
    return get_solver(solver).nfe([float(n - i) for i in range(n)] + [0.0])


def resolve_model(args: argparse.Namespace, fixed: str | None = None) -> str:
    """``--model``, else the model a calibration file was made for (``fixed``), else :data:`DEFAULT_MODEL`;
    stored back in ``args.model``.  (The caller refuses a ``--model`` that contradicts ``fixed`` once the model
    is loaded, by its name.)"""
    args.model = args.model or fixed or DEFAULT_MODEL
    return args.model


def resolve_sampling(args: argparse.Namespace, spec, fixed: dict | None = None, source: str | None = None) -> None:
    """Fill ``--solver``, ``--schedule`` and ``--nfe`` left out: from ``fixed`` (what a calibration file
    ``source`` was made for), else the model's ``info["sampling_defaults"]``, else :data:`SAMPLING_DEFAULTS`; then
    check them.  A flag given that contradicts ``fixed`` is refused (``UsageError``), naming both values."""
    declared = (spec.info or {}).get("sampling_defaults") or {}
    for k in ("solver", "schedule", "nfe"):
        given = getattr(args, k)
        if fixed is not None and fixed.get(k) is not None:
            if given is not None and given != fixed[k] and not (
                    k == "nfe" and _effective_nfe(fixed.get("solver", args.solver), given) == fixed[k]):
                raise UsageError(f"{_FLAGS[k]} {given} contradicts {source}, which was made for {k} {fixed[k]}; leave "
                                 f"{_FLAGS[k]} out to take it from the file")
            setattr(args, k, fixed[k])
        elif given is None:
            setattr(args, k, declared.get(k, SAMPLING_DEFAULTS[k]))
    check_sampling(args)


def add_calibration(p: argparse.ArgumentParser) -> None:
    """``--calibrate``, ``--no-calibrate``, ``--quick-fit-seconds`` and ``--calibration-dir``: where ``--stabilizer
    auto`` finds its calibration, and when it fits a missing one."""
    from ..calibration import CALIBRATE_WHEN, QUICK_FIT_SECONDS

    p.add_argument("--calibrate", default=None, choices=CALIBRATE_WHEN,
                   help="with --stabilizer auto, when no calibration is shipped or cached: fit one always; if-quick "
                        "(the default): only if it is estimated, on this machine, to take at most --quick-fit-seconds, "
                        "else sample with the plain solver and print the `steindiff calibrate` command that fits it; "
                        "never: the plain solver")
    p.add_argument("--no-calibrate", action="store_true", help="the same as --calibrate never")
    p.add_argument("--quick-fit-seconds", type=float, default=QUICK_FIT_SECONDS, metavar="S",
                   help="the longest fit --calibrate if-quick starts")
    p.add_argument("--calibration-dir", default=None,
                   help="cache of calibrations for --stabilizer auto (default: $XDG_CACHE_HOME/steindiff/calibrations)")


def calibrate_mode(args: argparse.Namespace) -> str:
    """``--calibrate`` with ``--no-calibrate`` folded in (a contradiction is a ``UsageError``)."""
    if args.no_calibrate and args.calibrate not in (None, "never"):
        raise UsageError(f"--no-calibrate contradicts --calibrate {args.calibrate}")
    if not args.quick_fit_seconds > 0:
        raise UsageError(f"--quick-fit-seconds must be > 0, got {args.quick_fit_seconds}")
    return "never" if args.no_calibrate else (args.calibrate or "if-quick")


def calibrate_command(args: argparse.Namespace) -> str:
    """The ``steindiff calibrate`` command that fits what ``--stabilizer auto`` looks up for this run: the same
    model, solver, schedule, NFE (and ``--rho``, ``--calibration-dir``, ``--device`` where given)."""
    import shlex

    parts = ["steindiff", "calibrate", "--model", args.model, "--solver", args.solver, "--schedule", args.schedule,
             "--nfe", str(args.nfe)]
    if args.schedule == "karras" and args.rho != 7.0:
        parts += ["--rho", f"{args.rho:g}"]
    if getattr(args, "calibration_dir", None) is not None:
        parts += ["--calibration-dir", args.calibration_dir]
    if getattr(args, "device", "auto") != "auto":
        parts += ["--device", args.device]
    return " ".join(shlex.quote(p) for p in parts)


def auto_plan(args: argparse.Namespace, spec, base, *, calibrate_missing: str | None = None):
    """``--stabilizer auto`` as the calibrated sampler: :func:`~steindiff.calibration.calibrated_plan` of ``base``
    with the options of :func:`add_calibration` (``calibrate_missing``: overrides ``--calibrate``); its notices
    go to standard error, one line each."""
    import sys

    from ..calibration import calibrated_plan

    return calibrated_plan(spec, base, cache_dir=args.calibration_dir,
                           calibrate_missing=calibrate_missing or calibrate_mode(args),
                           quick_fit_seconds=args.quick_fit_seconds, progress=not args.no_progress,
                           notice=lambda m: print(m, file=sys.stderr, flush=True), fit_command=calibrate_command(args))


def add_stabilizer(p: argparse.ArgumentParser, *, per_sample: bool = True,
                   coords_help: str = "state coordinates of the Stein statistics") -> None:
    from ..stabilizers import STABILIZERS
    from ..stabilizers.registry import AUTO, CALIBRATED

    auto = ("the calibrated sampler: fitted once per model, solver, schedule and NFE (shipped or cached), no extra "
            "pass" if AUTO == CALIBRATED else AUTO)
    p.add_argument("--stabilizer", default="none", help=f"one of: {', '.join(STABILIZERS)}; auto is {auto}")
    p.add_argument("--coords", default="ve", choices=["ve", "vp"], help=coords_help)
    p.add_argument("--probes", type=int, default=5, help="Hutchinson probes per step")
    p.add_argument("--divergence", default="vjp", choices=["vjp", "jvp"], help="Jacobian products: vjp (reverse "
                   "mode, the default and the cheaper one) or jvp (forward mode: costs more time and memory here)")
    add_jacobian_batch(p)
    p.add_argument("--gamma-min", type=float, default=None, help="lower clip of gamma (default: the stabilizer's "
                   "own: 0 for stein, 0.8 stein-tr, 0.5 stein-energy)")
    p.add_argument("--gamma-max", type=float, default=None, help="upper clip of gamma (default: the stabilizer's "
                   "own: none for stein, 1.25 stein-tr, 1.5 stein-energy)")
    if per_sample:
        p.add_argument("--per-sample", action="store_true",
                       help="one gamma per sample from its own statistics, instead of the batch's (works with --n 1)")


def stabilizer_options(args: argparse.Namespace) -> dict:
    """The stabilizer options given on the command line (``None``: the stabilizer's default)."""
    return {"coords": args.coords, "probes": args.probes, "divergence": args.divergence,
            "gamma_min": args.gamma_min, "gamma_max": args.gamma_max, "seed": args.seed,
            "per_sample": True if getattr(args, "per_sample", False) else None,
            "jacobian_batch": getattr(args, "jacobian_batch", None),
            "jacobian_precision": getattr(args, "jacobian_precision", None)}


#: A run's gammas outside this range rescale the solver's steps far from its own (gamma 1): see gamma_warning.
SANE_GAMMAS = (0.1, 10.0)


def gamma_warning(gammas) -> str | None:
    """One line for stderr when a run's per-step gammas leave :data:`SANE_GAMMAS` (or are not finite), saying
    what that means; ``None`` when they stay inside."""
    lo, hi = SANE_GAMMAS
    bad = [(k, float(g)) for k, g in enumerate(gammas) if g is not None and not lo <= float(g) <= hi]
    if not bad:
        return None
    shown = ", ".join(f"{g:.3g} at step {k + 1}" for k, g in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (f"warning: gamma left [{lo:g}, {hi:g}] at {len(bad)} of {len(gammas)} steps ({shown}): the stabilizer "
            "rescaled the solver's steps far from the plain solver's 1, which collapses samples towards the "
            "posterior mean or leaves noise (the paper's literal estimate does this with an accurate denoiser); "
            "--stabilizer auto (the calibrated sampler) or none does not")


def check_batch_statistics(stabilizer, n: int, batch_size: int | None = None) -> None:
    """A batch-statistics stabilizer needs every batch of at least 2 samples: refuse, with the way out."""
    if stabilizer is None or getattr(stabilizer, "per_sample", True):
        return
    bs = n if batch_size is None else batch_size
    smallest = min(bs, n % bs or bs)
    if smallest < 2:
        where = f"--n {n}" + (f" with --batch-size {batch_size} (a batch of {smallest})" if batch_size else "")
        raise UsageError(f"the stabilizer's batch statistics need at least 2 samples per batch, got {where}; pass "
                         "--per-sample (one gamma per sample), or --gamma-schedule FILE from `steindiff calibrate`")


def check_outputs(*paths: str | None, distinct: str | None = None) -> None:
    """Every output file given can be created (checked before any work), or a UsageError naming it;
    with ``distinct`` (the options, e.g. ``"--png and --out"``), no two of them name the same file."""
    given = [p for p in paths if p is not None]
    if distinct is not None and len(set(given)) < len(given):
        raise UsageError(f"{distinct} must name different files")
    for path in given:
        with usage_errors(OSError):
            check_writable(path)


def check_output_dir(path: str | None, flag: str) -> None:
    """An output folder that exists and is writable, or can be created (checked before any work), or a
    UsageError naming it."""
    if path is None:
        return
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise UsageError(f"{flag} {path!r} exists and is not a directory")
    with usage_errors(OSError):
        check_writable(d / "probe" if d.is_dir() else d)  # a new folder: its parent exists and is writable


def check_extension(path: str | None, flag: str, *suffixes: str) -> None:
    """Refuse an output file name whose extension does not match what is written to it."""
    if path is not None and not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} {path!r}: expected a {' or '.join(suffixes)} file name")


def stabilizer_from_args(args: argparse.Namespace, spec):
    """Build the stabilizer named by ``--stabilizer`` (``None`` for ``none``), or raise UsageError."""
    from ..stabilizers import make_stabilizer

    with usage_errors(ValueError, TypeError):
        return make_stabilizer(args.stabilizer, spec, **stabilizer_options(args))


def check_sampling(args: argparse.Namespace) -> None:
    """Reject bad names and values before any work (exit code 2); ``--solver``, ``--schedule`` and ``--nfe`` when
    given (:func:`resolve_sampling` checks them again once resolved)."""
    if args.solver is not None and args.solver not in SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    if args.schedule is not None and args.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {args.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if args.nfe is not None and args.nfe < 1:
        raise UsageError(f"--nfe must be >= 1, got {args.nfe}")
    if not args.rho > 0:
        raise UsageError(f"--rho must be > 0, got {args.rho}")
    if getattr(args, "n", None) is not None and args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.solver is not None and args.nfe is not None:
        steps_for(args.solver, args.nfe)


def steps_for(solver: str, nfe: int) -> int:
    """Steps that fit the NFE budget, or a UsageError when the budget is too small for the solver."""
    from ..solvers import get_solver, steps_for_nfe

    obj = get_solver(solver)
    try:
        steps = steps_for_nfe(obj, nfe)
    except ValueError:
        raise UsageError(f"--nfe {nfe} is too small for {solver}: use --nfe {_least(obj, nfe)} or more") from None
    if steps == 1 and obj.nfe([2.0, 1.0, 0.0]) > 2:  # heun: its one step to sigma 0 is a plain Euler step
        raise UsageError(f"--nfe {nfe} buys {solver} a single step to sigma 0, which is a plain Euler step; "
                         f"use --nfe {_least(obj, nfe)} or more, or --solver euler")
    return steps


def _least(solver, nfe: int) -> int | None:
    """The smallest budget above ``nfe`` that buys the solver two steps."""
    from ..solvers import steps_for_nfe

    for k in range(nfe + 1, nfe + 20):
        try:
            if steps_for_nfe(solver, k) >= 2:
                return k
        except ValueError:
            pass
    return None


def load_model_or_usage(name: str):
    from ..models.registry import load_model

    with usage_errors(ValueError, FileNotFoundError):
        return load_model(name)


#: The meaning of ``--device auto`` and its values, as every command's help says it.
DEVICE_HELP = "auto (CUDA when available, else the CPU; the default), cpu, cuda or cuda:N"


def add_device(p: argparse.ArgumentParser, help: str = DEVICE_HELP + "; the initial noise is drawn on the CPU and "
               "moved, so a seed gives the same samples on any device (up to rounding)") -> None:
    """``--device``: where the model runs (checked before any work by :func:`device_from_args`)."""
    p.add_argument("--device", default="auto", help=help)


#: What ``--jacobian-precision bf16`` did on an H100, from docs/results/gpu-check-nvidia-h100-80gb-hbm3.json
#: (``python benchmarks/gpu_check.py``; tests/cli/test_common.py checks these figures against that file).
BF16_ON_H100 = ("34M-parameter U-Net, batch 64, stein with one probe: 2.9x the plain solver's time and 4.8x its "
                "memory in bf16, against 2.1x and 5.2x in fp32")


def add_jacobian_batch(p: argparse.ArgumentParser) -> None:
    """``--jacobian-batch`` and ``--jacobian-precision``: the size and precision of a stabilizer's Jacobian passes."""
    p.add_argument("--jacobian-batch", type=int, default=None, metavar="N",
                   help="at most N sample-probe pairs per Jacobian pass of a stabilizer (samples in chunks through the "
                        "differentiable step, probes in groups through the backward): bounds its memory, changes no "
                        "result; default: the whole batch at once")
    p.add_argument("--jacobian-precision", default="fp32", choices=["fp32", "bf16"],
                   help="precision of a stabilizer's Jacobian pass (--divergence vjp): fp32 (the solver's "
                        "forward pass with a graph serves the VJP too) or bf16 (the solver's step runs as plain, the "
                        "VJP's own forward pass runs under bf16 autocast, one more forward pass per step). Measured on "
                        f"an H100 ({BF16_ON_H100}): bf16 is slower and saves little memory there, and much slower on "
                        "CPUs, so fp32 is recommended; only the divergence estimate changes (on CPU by at most 2-5%% "
                        "of its spread over probe draws; see GammaStabilizer)")


def device_from_args(args: argparse.Namespace):
    """The ``--device`` of a command as a ``torch.device`` (``UsageError``, exit 2, when unavailable),
    after checking ``--jacobian-batch`` where the command has it."""
    from ..device import DeviceError, resolve_device

    jb = getattr(args, "jacobian_batch", None)
    if jb is not None and jb < 1:
        raise UsageError(f"--jacobian-batch must be >= 1, got {jb}")
    try:
        return resolve_device(args.device)
    except DeviceError as e:
        raise UsageError(f"--device: {e}") from None


def model_on_device(name: str, device):
    """Load a model by name (``UsageError`` when unknown) and move it to ``device``."""
    return load_model_or_usage(name).to(device)
