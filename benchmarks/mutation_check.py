"""Mutation check: do the tests catch small bugs in the core numerics?

Each mutation below changes one line of the package (a solver coefficient, a Stein or energy
coefficient, a metric, a schedule, a training loss).  For each, the package and its tests are
copied to a temporary folder, the mutation is applied there (the real files are never touched),
and the tests that cover that code run with pytest (``-x``: stop at the first failure).  A mutation
is *caught* when a test fails, *survived* when they all pass, *error* when pytest could not run
(e.g. collection failed).  A baseline run of every selected test on the unmutated copy comes
first: a failing baseline makes the whole check meaningless.

    python benchmarks/mutation_check.py                  # run all, print the table
    python benchmarks/mutation_check.py --json out.json  # and write the results as JSON
    python benchmarks/mutation_check.py --only sw2-sqrt,energy-sigma2
    python benchmarks/mutation_check.py --check          # only check that every mutation applies

Exit status: 0 when the baseline passes and every mutation is caught, 1 otherwise, 2 on a usage
error or a mutation that no longer applies (its target text must occur exactly once: when the
code changes, update the list).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "steindiff.mutation-check/1"


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest arguments: the most targeted tests first (-x stops at the first failure)
    what: str = ""


M = Mutation
MUTATIONS: list[Mutation] = [
    # ---- solvers
    M("dpmpp2m-coef", "steindiff/solvers/dpmpp.py",
      "x_next = (s_next / s) * x - e * (m0 + 0.5 * d1_0)", "x_next = (s_next / s) * x - e * (m0 + 0.4 * d1_0)",
      ("tests/solvers/test_diffusers_agreement.py::test_dpmsolver_multistep_matches_dpmpp",
       "tests/solvers/test_convergence.py"),
      "DPM-Solver++(2M): midpoint weight 1/2 -> 0.4"),
    M("dpmpp3m-phi3", "steindiff/solvers/dpmpp.py",
      "phi3 = (e + h) / h**2 - 0.5", "phi3 = (e + h) / h**2 - 0.45",
      ("tests/solvers/test_diffusers_agreement.py::test_dpmsolver_multistep_matches_dpmpp",
       "tests/solvers/test_convergence.py"),
      "DPM-Solver++(3M): phi_3 constant"),
    M("euler-ratio", "steindiff/solvers/euler.py",
      "return Step(d + (s_next / s) * (x - d), d, state)", "return Step(d + (s_next / s) ** 1.1 * (x - d), d, state)",
      ("tests/solvers/test_diffusers_agreement.py::test_ddim_eta0_matches_euler", "tests/solvers/test_convergence.py"),
      "Euler/DDIM: sigma ratio"),
    M("heun-trapezoid", "steindiff/solvers/euler.py",
      "w = (s - s_next) / (2 * s_next)",
      "w = (s - s_next) / (2.2 * s_next)",
      ("tests/solvers/test_diffusers_agreement.py::test_heun_discrete_matches_heun_and_nfe",
       "tests/solvers/test_convergence.py"),
      "Heun: trapezoidal weight"),
    M("ipndm-ab4", "steindiff/solvers/ipndm.py",
      "4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]", "4: [55 / 24, -59 / 24, 37 / 24, -8 / 24]",
      ("tests/solvers/test_diffusers_agreement.py::test_ipndm_matches_ipndm_scheduler",
       "tests/solvers/test_convergence.py"),
      "iPNDM: 4th-order Adams-Bashforth weight"),
    M("unipc-unip2", "steindiff/solvers/unipc.py",
      "pred = [0.5]", "pred = [0.45]",
      ("tests/solvers/test_diffusers_agreement.py::test_unipc_bh2_matches_unipc", "tests/solvers/test_convergence.py"),
      "UniPC: UniP-2 weight a = 1/2"),
    M("unipc-unic1", "steindiff/solvers/unipc.py",
      "corr = [0.5] if order == 1 else scalar_solve(R, g)",
      "corr = [0.4] if order == 1 else scalar_solve(R, g)",
      ("tests/solvers/test_diffusers_agreement.py::test_unipc_order_1_matches_unipc",
       "tests/solvers/test_convergence.py"),
      "UniPC: UniC-1 weight c = 1/2 (order 1 only)"),
    M("unipc-bh1", "steindiff/solvers/unipc.py",
      "B_h = hh if variant == \"bh1\" else h_phi_1", "B_h = 1.1 * hh if variant == \"bh1\" else h_phi_1",
      ("tests/solvers/test_diffusers_agreement.py::test_unipc_bh1_matches_unipc",
       "tests/solvers/test_diffusers_agreement.py::test_unipc_bh1_karras_matches_unipc_up_to_diffusers_final_step"),
      "UniPC: B(h) = -h of bh1"),
    # ---- Stein stabilizer (stein.py) and the shared update (base.py)
    M("stein-vp-div", "steindiff/stabilizers/stein.py",
      "out[\"div\"] = s.dim - (s.alpha_next / s.alpha) * s.div", "out[\"div\"] = s.dim - s.div",
      ("tests/stabilizers/test_stein.py::test_stein_coefficient_closed_form", "tests/stabilizers/test_stein.py"),
      "Stein: VP factor alpha_{k-1}/alpha_k of div T dropped"),
    M("stein-sigma2", "steindiff/stabilizers/stein.py",
      "return ((1 - 1 / a) * m[\"xu\"] + (s.sigma_c**2 / a) * m[\"div\"]) / m[\"uu\"]",
      "return ((1 - 1 / a) * m[\"xu\"] + (s.sigma_c / a) * m[\"div\"]) / m[\"uu\"]",
      ("tests/stabilizers/test_stein.py::test_stein_coefficient_closed_form", "tests/stabilizers/test_stein.py"),
      "Stein: sigma_k^2 -> sigma_k (a coordinate factor dropped; shows in VE too)"),
    M("stein-drift", "steindiff/stabilizers/stein.py",
      "return ((1 - 1 / a) * m[\"xu\"] + (s.sigma_c**2 / a) * m[\"div\"]) / m[\"uu\"]",
      "return ((1 - a) * m[\"xu\"] + (s.sigma_c**2 / a) * m[\"div\"]) / m[\"uu\"]",
      ("tests/stabilizers/test_stein.py::test_stein_coefficient_closed_form", "tests/stabilizers/test_stein.py"),
      "Stein: drift term (1 - 1/alpha) -> (1 - alpha)"),
    M("stein-sc-level", "steindiff/stabilizers/stein.py",
      "target = s.op.denoise(s.step.x_next, s.op.sigma_next, s.op.i)",
      "target = s.op.denoise(s.step.x_next, s.op.sigma, s.op.i)",
      ("tests/stabilizers/test_stein.py::test_lookahead_coefficient_closed_form", "tests/stabilizers/test_stein.py"),
      "stein-sc: look-ahead denoised at the wrong noise level"),
    M("vp-sigma-coord", "steindiff/noise.py",
      "return a, a_next, a * sigma", "return a, a_next, sigma",
      ("tests/stabilizers/test_stein.py::test_stein_coefficient_closed_form", "tests/stabilizers/test_stein.py"),
      "VP coordinates: sigma_vp = alpha sigma -> sigma"),
    M("clip-max", "steindiff/stabilizers/base.py",
      "gamma = min(gamma, self.gamma_max)", "gamma = gamma",
      ("tests/stabilizers/test_marginal.py::test_default_clip_and_its_bounds", "tests/stabilizers/test_marginal.py"),
      "upper clip of gamma ignored (batch)"),
    M("clip-per-sample", "steindiff/stabilizers/base.py",
      "g = g_raw.clamp(min=self.gamma_min, max=self.gamma_max)", "g = g_raw",
      ("tests/stabilizers/test_stein.py::test_per_sample_gamma_is_the_batch_formula_on_each_sample_alone",),
      "clip ignored (per sample)"),
    # ---- energy matching (marginal.py)
    M("energy-sigma2", "steindiff/stabilizers/marginal.py",
      "e0 = dot(s.step.denoised, s.step.denoised) + s.op.sigma**2 * s.div",
      "e0 = dot(s.step.denoised, s.step.denoised) + s.op.sigma * s.div",
      ("tests/stabilizers/test_marginal.py",),
      "energy: Tweedie term sigma^2 div D -> sigma div D (survived the whole suite before issue 14)"),
    M("energy-vp-target", "steindiff/stabilizers/marginal.py",
      "sig_next_c = s.alpha_next * s.op.sigma_next if self.coords == \"vp\" else s.op.sigma_next",
      "sig_next_c = s.op.sigma_next",
      ("tests/stabilizers/test_marginal.py",),
      "energy: VP factor of the next noise level dropped"),
    M("energy-disc", "steindiff/stabilizers/marginal.py",
      "disc = xu**2 - uu * (xx - target)\n", "disc = xu**2 + uu * (xx - target)\n",
      ("tests/stabilizers/test_marginal.py",),
      "energy: discriminant sign (batch)"),
    M("energy-root", "steindiff/stabilizers/marginal.py",
      "g = min(roots, key=lambda r: abs(r - 1))", "g = max(roots, key=lambda r: abs(r - 1))",
      ("tests/stabilizers/test_marginal.py",),
      "energy: root farthest from 1 instead of nearest"),
    M("energy-root-per-sample", "steindiff/stabilizers/marginal.py",
      "g = torch.where((r1 - 1).abs() < (r2 - 1).abs(), r1, r2)",
      "g = torch.where((r1 - 1).abs() < (r2 - 1).abs(), r2, r1)",
      ("tests/stabilizers/test_marginal.py",),
      "energy: root choice (per sample)"),
    M("energy-fallback", "steindiff/stabilizers/marginal.py",
      "if abs(2 * (g * uu - xu)) / target < self.min_sensitivity:", "if abs(2 * (g * uu - xu)) / target < 0.0:",
      ("tests/stabilizers/test_marginal.py",),
      "energy: ill-conditioned fallback to gamma = 1 disabled"),
    # ---- metrics
    M("sw2-sqrt", "steindiff/metrics/mixture.py",
      "return float(((px - py) ** 2).mean().sqrt())", "return float(((px - py) ** 2).mean())",
      ("tests/metrics/test_mixture.py",),
      "sliced-W2 returns W2 squared (survived the whole suite before issue 14)"),
    M("mmd-cross", "steindiff/metrics/mixture.py",
      "(m * (m - 1)) - 2 * kxy.mean())", "(m * (m - 1)) - kxy.mean())",
      ("tests/metrics/test_mixture.py",),
      "MMD: cross term weight 2 -> 1"),
    M("mmd-bandwidth", "steindiff/metrics/mixture.py",
      "k = torch.exp(-d2 / bw2)", "k = torch.exp(-d2 / (2 * bw2))",
      ("tests/metrics/test_mixture.py",),
      "MMD: kernel bandwidth doubled"),
    M("mode-tv-half", "steindiff/metrics/mixture.py",
      "return float(0.5 * (hist - gmm.weights).abs().sum())", "return float((hist - gmm.weights).abs().sum())",
      ("tests/metrics/test_mixture.py",),
      "mode TV: factor 1/2 dropped"),
    M("nll-per-dim", "steindiff/metrics/mixture.py",
      "return float(-gmm.log_prob(_on(x, gmm), 0.0).mean() / gmm.dim)",
      "return float(-gmm.log_prob(_on(x, gmm), 0.0).mean())",
      ("tests/metrics/test_mixture.py",),
      "NLL: not divided by the dimension"),
    M("sw2-floor", "steindiff/metrics/mixture.py",
      "\"sw2_floor\": sliced_w2(true_b, true_a),", "\"sw2_floor\": sliced_w2(true_a, true_a),",
      ("tests/metrics/test_mixture.py",),
      "floor computed from one set against itself (0)"),
    M("frechet-cross", "steindiff/metrics/image.py",
      "np.trace(s2) - 2 * np.trace(cross)", "np.trace(s2) - np.trace(cross)",
      ("tests/metrics/test_patches.py::test_frechet_distance_matches_a_direct_scipy_computation",),
      "Fréchet distance (digits-FID, patch-FD): cross term weight 2 -> 1"),
    M("spectrum-norm", "steindiff/metrics/patches.py",
      "power = torch.fft.fft2(x).abs().square().mean(tuple(range(x.ndim - 2))) / (h * w)",
      "power = torch.fft.fft2(x).abs().square().mean(tuple(range(x.ndim - 2))) / h",
      ("tests/metrics/test_patches.py::test_white_noise_has_a_flat_spectrum_at_its_variance",),
      "radial power spectrum: |FFT|^2 divided by one side instead of the pixel count"),
    # ---- schedules
    M("karras-rho", "steindiff/schedules.py",
      "return _append_zero((hi + ramp * (lo - hi)) ** rho, final_zero)",
      "return _append_zero((hi + ramp * (lo - hi)) ** (rho + 0.5), final_zero)",
      ("tests/test_schedules.py",),
      "Karras: exponent rho"),
    M("logsnr-spacing", "steindiff/schedules.py",
      "torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))",
      "torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)",
      ("tests/test_schedules.py",),
      "log-SNR schedule uniform in sigma instead of log sigma"),
    M("time-trailing", "steindiff/schedules.py",
      "t = torch.arange(T, 0, -T / n, dtype=torch.float64)[:n].round() - 1",
      "t = torch.arange(T, 0, -T / n, dtype=torch.float64)[:n].round() - 2",
      ("tests/test_schedules.py",),
      "time schedule: trailing spacing off by one timestep"),
    # ---- calibrated sampler: the validation choice and the plain tail
    M("guard-any", "steindiff/trajectory.py",
      "(k == \"plain\" or all(v[f\"passed_{g}_check\"] for g in guards))",
      "(k == \"plain\" or any(v[f\"passed_{g}_check\"] for g in guards))",
      ("tests/test_trajectory.py::test_choose_candidate_applies_exactly_the_named_guards",),
      "calibration choice: a candidate must pass every named guard, not one of them"),
    M("plain-tail", "steindiff/trajectory.py",
      "self.ng = max(self.n - max(plain_tail, 1), 0)", "self.ng = max(self.n - 1, 0)",
      ("tests/test_trajectory.py::test_plain_tail_keeps_the_last_steps_plain_in_every_candidate",),
      "trajectory fit: the last plain_tail steps keep gamma 1"),
    # ---- training losses and preconditioning
    M("edm-weight", "steindiff/train.py",
      "weight = (s**2 + sd**2) / (s * sd) ** 2", "weight = (s**2 + sd**2) / (s * sd)",
      ("tests/test_train.py::test_first_loss_equals_a_direct_computation",),
      "EDM loss weight lambda(sigma)"),
    M("vp-eps-noising", "steindiff/train.py",
      "x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise", "x_t = abar * x0 + (1 - abar).sqrt() * noise",
      ("tests/test_train.py::test_first_loss_equals_a_direct_computation",),
      "VP-eps training: signal scale sqrt(alpha_bar) -> alpha_bar"),
    M("edm-c-noise", "steindiff/models/denoisers.py",
      "c_noise = sigma.log() / 4", "c_noise = sigma.log() / 2",
      ("tests/models/test_unet.py", "tests/test_train.py::test_first_loss_equals_a_direct_computation"),
      "EDM preconditioning (sampling and training): c_noise = ln(sigma)/4"),
]


# --------------------------------------------------------------------------------------------


def apply(text: str, m: Mutation) -> str:
    """``text`` with the mutation applied; ``ValueError`` unless the target occurs exactly once."""
    n = text.count(m.find)
    if n != 1:
        raise ValueError(f"{m.id}: target text found {n} times in {m.path} (expected exactly once): {m.find!r}")
    return text.replace(m.find, m.replace)


def check_mutations(root: Path = REPO, mutations: list[Mutation] = MUTATIONS) -> list[str]:
    """Problems with the mutation list against the source under ``root`` (empty: all apply):
    each target found exactly once, a real change, the mutated file still compiles, ids unique,
    and every named test file exists."""
    problems = []
    ids = [m.id for m in mutations]
    problems += [f"duplicate id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for m in mutations:
        f = root / m.path
        if not f.is_file():
            problems.append(f"{m.id}: no file {m.path}")
            continue
        if m.find == m.replace:
            problems.append(f"{m.id}: the replacement equals the target")
        try:
            compile(apply(f.read_text(), m), str(f), "exec")
        except ValueError as e:
            problems.append(str(e))
        except SyntaxError as e:
            problems.append(f"{m.id}: the mutated {m.path} does not compile: {e}")
        for t in m.tests:
            if not (root / t.split("::")[0]).is_file():
                problems.append(f"{m.id}: no test file {t.split('::')[0]}")
    return problems


def make_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("steindiff", "tests"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# Third-party modules the tests import: loaded once in this process, before any fork, so each
# pytest run (a forked child) starts in well under a second instead of re-importing them.  The
# package itself is never imported here: each child imports the (mutated) copy afresh.
PRELOAD = ("numpy", "torch", "scipy.stats", "scipy.optimize", "scipy.special", "pytest", "safetensors.torch",
           "tqdm.auto",
           "sklearn.datasets", "PIL.Image", "diffusers")
DIFFUSERS_CLASSES = ("DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "UniPCMultistepScheduler", "IPNDMScheduler")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            mod = importlib.import_module(name)
        except Exception:  # an optional dependency; the tests skip or fail on their own
            continue
        if name == "diffusers":
            for cls in DIFFUSERS_CLASSES:  # diffusers imports its schedulers lazily
                getattr(mod, cls, None)


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-x", "-rf", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]


def _run_forked(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    """pytest.main in a forked child (cwd and sys.path on the copy), its output to a file."""
    out_file = copy.parent / "pytest-output.txt"
    with open(out_file, "wb") as fh:
        pid = os.fork()
        if pid == 0:  # child
            rc = 3
            try:
                os.dup2(fh.fileno(), 1)
                os.dup2(fh.fileno(), 2)
                os.chdir(copy)
                sys.path.insert(0, str(copy))
                os.environ.update(_env(copy))
                import pytest

                rc = int(pytest.main(_pytest_args(tests)))
                mod = sys.modules.get("steindiff")
                if mod is not None and not str(mod.__file__).startswith(str(copy)):
                    print(f"mutation_check: imported {mod.__file__}, not the copy", flush=True)
                    rc = 3
            except BaseException as e:  # noqa: BLE001 - report anything, never return into the parent's code
                print(f"mutation_check: child failed: {type(e).__name__}: {e}", flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            rc = None
            break
        time.sleep(0.05)
    return rc, out_file.read_text(errors="replace")


def _run_subprocess(copy: Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "pytest", *_pytest_args(tests)]
    try:
        p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out


def run_pytest(copy: Path, tests: list[str], timeout: float, fork: bool = True) -> dict:
    t0 = time.perf_counter()
    rc, out = (_run_forked if fork else _run_subprocess)(copy, tests, timeout)
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?)\b", out)}
    if rc == 0:
        outcome = "survived"
    elif rc == 1 and failed:
        outcome = "caught"
    else:
        outcome = "timeout" if rc is None else "error"
    return {"outcome": outcome, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "caught_by": failed[0] if failed else None,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "tail": None if outcome in ("caught", "survived") else out[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--only", metavar="IDS", help="comma-separated mutation ids to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--check", action="store_true", help="only check that every mutation applies to the current source")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline run (not for reports)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per pytest run (default 300)")
    p.add_argument("--subprocess", action="store_true",
                   help="a fresh interpreter per pytest run instead of a fork of a preloaded "
                        "one (slower; no fork needed)")
    args = p.parse_args(argv)

    problems = check_mutations()
    if args.check or problems:
        for msg in problems:
            print(f"mutation_check: {msg}", file=sys.stderr)
        if not problems:
            print(f"{len(MUTATIONS)} mutations apply cleanly")
        return 2 if problems else 0
    muts = MUTATIONS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {m.id for m in MUTATIONS}]
        if unknown:
            p.error(f"unknown mutation id(s): {', '.join(unknown)}")
        muts = [m for m in MUTATIONS if m.id in wanted]
    if args.list:
        for m in muts:
            print(f"{m.id:24} {m.path:36} {m.what}")
        return 0

    t_start = time.perf_counter()
    fork = hasattr(os, "fork") and not args.subprocess
    if fork:
        preload()
    tmp = Path(tempfile.mkdtemp(prefix="steindiff-mutation-"))
    try:
        copy = tmp / "repo"
        make_copy(copy)
        probe = subprocess.run([sys.executable, "-c", "import steindiff; print(steindiff.__file__)"], cwd=copy,
                               env=_env(copy), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            print("mutation_check: the copy's package is not the one imported "
                  f"({probe.stdout.strip() or probe.stderr.strip()})",
                  file=sys.stderr)
            return 2
        baseline = None
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in muts for t in m.tests))
            print(f"baseline: {len(union)} test selections on the unmutated copy ...", file=sys.stderr, flush=True)
            baseline = run_pytest(copy, union, args.timeout * 3, fork)
            baseline["tests"] = union
            renamed = {"survived": "passed", "caught": "failed"}
            baseline["outcome"] = renamed.get(baseline["outcome"], baseline["outcome"])
            if baseline["outcome"] != "passed":
                print(f"mutation_check: the baseline fails ({baseline['outcome']}); fix the tests "
                      f"first\n{baseline.get('tail') or baseline['caught_by']}",
                      file=sys.stderr)
        results = []
        for i, m in enumerate(muts, 1):
            target = copy / m.path
            original = target.read_text()
            target.write_text(apply(original, m))
            try:
                r = run_pytest(copy, list(m.tests), args.timeout, fork)
            finally:
                target.write_text(original)
            results.append({"id": m.id, "path": m.path, "what": m.what, "find": m.find, "replace": m.replace,
                            "tests": list(m.tests), **r})
            print(f"[{i}/{len(muts)}] {m.id}: {r['outcome']} ({r['seconds']} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = round(time.perf_counter() - t_start, 1)

    caught = sum(r["outcome"] == "caught" for r in results)
    lines = [
        f"Mutation check: {caught} of {len(results)} mutations caught"
        + (f"; baseline ({len(baseline['tests'])} test selections, {baseline['passed']} tests) "
           f"{'passes' if baseline['outcome'] == 'passed' else 'FAILS'}"
           if baseline else "; no baseline run"),
        f"Total {total} s ({os.cpu_count()} CPUs, shared; Python {platform.python_version()}).",
        "Regenerate: python benchmarks/mutation_check.py --json docs/results/mutation-check.json > "
        "docs/results/mutation-check.txt",
        "Each mutation changes one line in a temporary copy; the listed tests run with pytest -x"
        + (" (each run a fork of one process with the third-party modules preloaded)." if fork
           else " (one interpreter per run)."),
        "",
        "| mutation | file | change | outcome | caught by (first failing test) | passed before it | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['id']} | {r['path'].removeprefix('steindiff/')} | {r['what']} | {r['outcome']} | "
                     f"{r['caught_by'] or '-'} | {r['passed']} | {r['seconds']} |")
    survivors = [r for r in results if r["outcome"] != "caught"]
    if survivors:
        lines += ["",
                  "Not caught:"] + [f"- {r['id']} ({r['outcome']}): {r['find']!r} -> {r['replace']!r}"
                                    for r in survivors]
        lines += [f"  {r['tail']}" for r in survivors if r.get("tail")]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "schema": SCHEMA, "total_s": total, "python": platform.python_version(), "cpus": os.cpu_count(),
            "baseline": baseline, "mutations": results, "caught": caught, "n": len(results)}, indent=1) + "\n")
    ok = (baseline is None or baseline["outcome"] == "passed") and caught == len(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
