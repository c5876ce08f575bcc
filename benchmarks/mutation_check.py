"""Mutation check: do the tests catch small bugs in the package?

Each mutation below changes one line of the package.  The ``core`` group is the project's own list (a
solver coefficient, a Stein or energy coefficient, a metric, a schedule, a training loss).  The other
groups (``audit``) are an independent audit, written without reading the tests: plausible one-line bugs
that a user would see, in the calibrated sampler's choice logic (``choice``), the calibration cache and
record (``cache``), the image metrics, checkpoint loading, distributed statistics, the solvers, schedules,
noise processes and mixture metrics.

For each mutation, the tracked files of the repository are copied to a temporary folder, the mutation is
applied there (the real files are never touched), and the tests that cover that code run with pytest
(``-x``: stop at the first failure); ``--suite`` runs the whole suite instead.  A mutation is *caught*
when a test fails, *survived* when they all pass, *error* when pytest could not run (e.g. collection
failed).  A baseline run of every selected test on the unmutated copy comes first: a failing baseline
makes the whole check meaningless.

    python benchmarks/mutation_check.py                  # the core group, print the table
    python benchmarks/mutation_check.py --json out.json  # and write the results as JSON
    python benchmarks/mutation_check.py --only sw2-sqrt,energy-sigma2
    python benchmarks/mutation_check.py --group audit    # the audit's groups (or e.g. --group cache,choice; all)
    python benchmarks/mutation_check.py --suite-traced --survivors-of out.json  # the survivors against the suite
    python benchmarks/mutation_check.py --check          # only check that every mutation applies
    python benchmarks/mutation_check.py --list --group checkpoint

Exit status: 0 when the baseline passes and every mutation is caught, 1 otherwise, 2 on a usage
error or a selected mutation that no longer applies (its target text must occur exactly once and the
change must stay on one line: when the code changes, update the list).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    group: str = "core"  # "core": the project's own list; other groups: the independent audit (AUDIT_GROUPS)


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
      "(k == \"plain\" or all(passes_guard(v, plain, g) for g in guards))",
      "(k == \"plain\" or any(passes_guard(v, plain, g) for g in guards))",
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

# ---- the independent audit: plausible one-line bugs a user would see, written without reading the tests.
# Each runs the tests that mirror the mutated module (the package layout), or the folder of its package
# where no test file mirrors it; ``--suite`` runs the whole suite instead.  Groups (``--group``):
T_TRAJ = ("tests/test_trajectory.py", "tests/test_calibration.py")
T_CAL = ("tests/test_calibration.py",)
T_ID = ("tests/test_identity.py", "tests/test_calibration.py")
T_GUARD = ("tests/test_guards.py", "tests/test_trajectory.py", "tests/test_calibration.py")
T_IMG = ("tests/metrics/test_image.py",)
T_PATCH = ("tests/metrics/test_patches.py",)
T_CKPT = ("tests/models", "tests/test_train.py")
T_DIST = ("tests/test_distributed.py", "tests/cli/test_dist_cli.py")
T_BASE = ("tests/stabilizers/test_base.py", "tests/test_distributed.py")
T_SOLV = ("tests/solvers",)
T_SCHED = ("tests/test_schedules.py",)
T_NOISE = ("tests/test_noise.py",)
T_MIX = ("tests/metrics/test_mixture.py",)

AUDIT: list[Mutation] = [
    # ---- choice: the calibrated sampler's validation choice, refinement budget and bounds (trajectory.py)
    M("rank-z-args", "steindiff/trajectory.py",
      "v[\"val_rank_z\"] = _rank_z(per_sample[\"plain\"], per_sample[k]) if paired else None",
      "v[\"val_rank_z\"] = _rank_z(per_sample[k], per_sample[\"plain\"]) if paired else None",
      T_TRAJ, "significance test's sign flipped (gains of plain over the candidate): a candidate closer for most "
      "samples is rejected, one farther for most samples replaces the plain solver", "choice"),
    M("significance-abs", "steindiff/trajectory.py",
      "and v[\"val_rank_z\"] > significance)", "and abs(v[\"val_rank_z\"]) > significance)",
      T_TRAJ, "significance check two-sided: a candidate significantly worse than plain passes it", "choice"),
    M("significance-default", "steindiff/trajectory.py",
      "max_seconds: float = 60.0, residual_tolerance: float = 1.05, significance: float = 2.0,",
      "max_seconds: float = 60.0, residual_tolerance: float = 1.05, significance: float = 1.0,",
      T_TRAJ, "fit_trajectory's default significance threshold 2 -> 1: gains within the validation noise replace "
      "the plain solver", "choice"),
    M("wilcoxon-variance", "steindiff/trajectory.py",
      "var = n * (n + 1) * (2 * n + 1) / 24 - float((ties ** 3 - ties).sum()) / 48",
      "var = n * (n + 1) * (2 * n + 1) / 6 - float((ties ** 3 - ties).sum()) / 48",
      T_TRAJ, "Wilcoxon variance n(n+1)(2n+1)/24 -> /6 (the sum of squared ranks): z halved, real gains rejected",
      "choice"),
    M("wilcoxon-ties", "steindiff/trajectory.py",
      "ranks = rankdata(np.abs(g))", "ranks = rankdata(np.abs(g), method=\"ordinal\")",
      T_TRAJ, "tied gains ranked in order of appearance, not at their mid-rank: z depends on the sample order "
      "when gains tie (e.g. a model with quantised outputs)", "choice"),
    M("wilcoxon-mean", "steindiff/trajectory.py",
      "return (w - n * (n + 1) / 4) / math.sqrt(var) if var > 0 else 0.0",
      "return (w - n * (n + 1) / 2) / math.sqrt(var) if var > 0 else 0.0",
      T_TRAJ, "Wilcoxon null mean n(n+1)/4 -> n(n+1)/2: z never positive, no calibration ever beats plain", "choice"),
    M("residual-band-min", "steindiff/guards.py",
      "return abs(candidate) <= max(abs(plain) * (1.0 + m), tol)",
      "return abs(candidate) <= min(abs(plain) * (1.0 + m), tol)",
      T_GUARD, "residual tolerance band: min instead of max (a candidate as far from the reference's residual "
      "noise as plain is rejected)", "choice"),
    M("residual-one-sided", "steindiff/guards.py",
      "return abs(candidate) <= max(abs(plain) * (1.0 + m), tol)",
      "return candidate <= max(abs(plain) * (1.0 + m), tol)",
      T_GUARD, "residual check one-sided: over-smoothed samples (less residual noise than the reference) always "
      "pass", "choice"),
    M("distribution-sign", "steindiff/trajectory.py",
      "and v[\"val_sw2\"] <= scores[\"plain\"][\"val_sw2\"])", "and v[\"val_sw2\"] >= scores[\"plain\"][\"val_sw2\"])",
      T_TRAJ, "distribution check inverted: only candidates farther from the reference's samples as a set pass",
      "choice"),
    M("validation-split", "steindiff/trajectory.py",
      "n_fit = int(round(n * (1 - validation)))", "n_fit = int(round(n * validation))",
      T_TRAJ, "validation fraction applied to the fit part (the same at 0.5; validation=0.25 fits on a quarter)",
      "choice"),
    M("refine-start", "steindiff/trajectory.py",
      "start = g_cf if _rms(_solve(model, x_fit, cf_plan, part(fit_sl)), ref.final[fit_sl]) < \\",
      "start = g_cf if _rms(_solve(model, x_fit, cf_plan, part(fit_sl)), ref.final[fit_sl]) > \\",
      T_TRAJ, "the refinement starts from the worse of the closed form and plain", "choice"),
    M("solve-budget-split", "steindiff/trajectory.py",
      "reg_gamma=reg_gamma, reg_steps=reg_steps, reg_residual=w, max_solves=max(max_solves // 2, 1),",
      "reg_gamma=reg_gamma, reg_steps=reg_steps, reg_residual=w, max_solves=max_solves,",
      T_TRAJ, "each of the two refinements gets the whole solve budget: up to 2 x max_solves solves", "choice"),
    M("time-budget-split", "steindiff/trajectory.py",
      "max_seconds=max_seconds / 2, extra_args=part(fit_sl),",
      "max_seconds=max_seconds, extra_args=part(fit_sl),",
      T_TRAJ, "each of the two refinements gets the whole time budget: a calibration runs up to 2 x max_seconds",
      "choice"),
    M("solve-budget-off-by-one", "steindiff/trajectory.py",
      "if info[\"solves\"] >= max_solves or time.perf_counter() - t0 > max_seconds:",
      "if info[\"solves\"] > max_solves or time.perf_counter() - t0 > max_seconds:",
      T_TRAJ, "refine makes max_solves + 1 solves", "choice"),
    M("closed-form-upper-bound", "steindiff/trajectory.py",
      "g = min(max(g, self.bounds[0]), self.bounds[1]) if math.isfinite(g) else 1.0",
      "g = max(g, self.bounds[0]) if math.isfinite(g) else 1.0",
      T_TRAJ, "closed-form gammas not clipped at gamma_bounds[1]", "choice"),
    M("refine-upper-bound", "steindiff/trajectory.py",
      "hi += [gamma_bounds[1]] * self.ng", "hi += [1.0 / gamma_bounds[0]] * self.ng",
      T_TRAJ, "refinement's upper gamma bound 1/gamma_min (2.0) instead of gamma_bounds[1] (1.5)", "choice"),
    M("last-level-floor", "steindiff/trajectory.py",
      "self.floor = 0.9 * min(sigma_floor, sig[-2])", "self.floor = min(sigma_floor, sig[-2])",
      T_TRAJ, "fitted last noise level floored at sigma_min instead of 0.9 sigma_min", "choice"),
    M("slack-cap", "steindiff/trajectory.py",
      "hi += list(self.z0[:-1] + 1.0) + [max(self.z0[-1] + 1.0, -0.5)]",
      "hi += list(self.z0[:-1] + 1.0) + [self.z0[-1] + 1.0]",
      T_TRAJ, "the slack below the last fitted level capped like the other gaps: the last level cannot rise as "
      "documented", "choice"),
    M("choice-tie", "steindiff/trajectory.py",
      "return min(ok, key=lambda k: (ok[k][\"val_rms\"], k != \"plain\"))",
      "return min(ok, key=lambda k: (ok[k][\"val_rms\"], k == \"plain\"))",
      T_TRAJ, "on a tie in validation distance a candidate wins over plain (a calibration that changes nothing "
      "reports beats_plain)", "choice"),
    M("reference-interp", "steindiff/trajectory.py",
      "w = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))", "w = (hi - sigma) / (hi - lo)",
      T_TRAJ, "reference state between stored levels interpolated in sigma, not log sigma: closed-form targets "
      "off the trajectory", "choice"),
    M("closed-form-vp", "steindiff/trajectory.py",
      "g = float(dot(u, x_c - a_next * target).sum()) / uu if uu > 0 else 1.0",
      "g = float(dot(u, x_c - target).sum()) / uu if uu > 0 else 1.0",
      T_TRAJ, "closed form in VP coordinates: the reference target not scaled by alpha_{k+1}", "choice"),
    M("residual-term-weight", "steindiff/trajectory.py",
      "r = np.append(r, math.sqrt(reg_residual) * math.log(max(moved(x), 1e-300) / r_target))",
      "r = np.append(r, reg_residual * math.log(max(moved(x), 1e-300) / r_target))",
      T_TRAJ, "residual-noise term of the refinement weighted reg_residual^2 instead of reg_residual", "choice"),
    # ---- cache: the calibration cache, the calibration record and the model fingerprint (calibration.py,
    # fingerprint.py)
    M("key-without-fit", "steindiff/calibration.py",
      "\"conditioning\": conditioning, \"options\": calibration_options(spec, **(options or {}))}",
      "\"conditioning\": conditioning, \"options\": {k: v for k, v in calibration_options(spec, **(options or {}))"
      ".items() if k != \"fit\"}}",
      T_CAL, "cache key without the fit mode: a gamma-only calibration is reused for fit='both'", "cache"),
    M("key-without-solver-options", "steindiff/calibration.py",
      "\"solver_options\": dict(sorted(base.solver_options.items())), \"schedule\": base.schedule, \"nfe\": base.nfe,",
      "\"solver_options\": {}, \"schedule\": base.schedule, \"nfe\": base.nfe,",
      T_CAL, "cache key without the solver options: a calibration is reused for another solver order", "cache"),
    M("key-without-coords", "steindiff/calibration.py",
      "\"base_sigmas\": [round(float(s), 12) for s in base.sigmas], \"coords\": base.coords,",
      "\"base_sigmas\": [round(float(s), 12) for s in base.sigmas],",
      T_CAL, "cache key without the coordinates: a VE calibration's gammas are reused for a VP-coordinates plan",
      "cache"),
    M("key-without-fingerprint", "steindiff/calibration.py",
      "return {\"fingerprint\": model_fingerprint(spec), \"model\": spec.name, \"solver\": base.solver,",
      "return {\"model\": spec.name, \"solver\": base.solver,",
      T_CAL, "cache key without the weights' fingerprint: a retrained model of the same name reuses the old "
      "calibration", "cache"),
    M("stale-key-accepted", "steindiff/calibration.py",
      "if sched.meta.get(\"key\") != key:", "if sched.meta.get(\"key\") is None:",
      T_CAL, "a cached file made for another configuration is used (any recorded key accepted)", "cache"),
    M("digest-shape-only", "steindiff/calibration.py",
      "h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b\"\")", "h.update(b\"\")",
      T_CAL, "conditioning digest hashes a tensor's dtype and shape only: other class labels share a calibration",
      "cache"),
    M("digest-type-only", "steindiff/calibration.py",
      "h.update(repr(v).encode())", "h.update(type(v).__name__.encode())",
      T_CAL, "conditioning digest hashes a non-tensor value by its type: guidance 3 and 7.5 share a calibration",
      "cache"),
    M("fingerprint-shapes", "steindiff/fingerprint.py",
      "digest = hashlib.sha256(d.reshape(-1).view(torch.uint8).numpy().tobytes() if d.numel() else b\"\").digest()",
      "digest = hashlib.sha256(str(tuple(d.shape)).encode()).digest()",
      T_ID, "model fingerprint of tensor shapes, not values: two trained models of one architecture share "
      "calibrations", "cache"),
    M("fingerprint-gmm-weights", "steindiff/fingerprint.py",
      "            if name in skip:", "            if name in skip or name == \"weights\":",
      T_ID, "mixture fingerprint without the weights: mixtures that differ only in weights share a calibration",
      "cache"),
    M("fingerprint-process", "steindiff/calibration.py",
      "h.update(fingerprint(spec.process).encode())", "h.update(b\"\")",
      T_ID, "fingerprint without the noise process: the same weights under another process share a fingerprint",
      "cache"),
    M("seed-used", "steindiff/calibration.py",
      "noise = prior_noise((n, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=seed, dtype=dtype,",
      "noise = prior_noise((n, *spec.sample_shape), float(base.sigmas[0]), spec.process, seed=CALIBRATION_SEED, "
      "dtype=dtype,",
      T_CAL, "calibration noise drawn from the default seed whatever seed= says (the record names the requested one)",
      "cache"),
    M("seed-recorded", "steindiff/calibration.py",
      "\"fingerprint\": fingerprint_, \"calibration\": {\"n\": n, \"seed\": seed, \"dtype\": o[\"dtype\"],",
      "\"fingerprint\": fingerprint_, \"calibration\": {\"n\": n, \"seed\": CALIBRATION_SEED, \"dtype\": o[\"dtype\"],",
      T_CAL, "the calibration records the default seed, not the one it used", "cache"),
    M("cached-sigmas-ignored", "steindiff/calibration.py",
      "sigmas = sched.meta.get(\"sigmas\", base.sigmas)", "sigmas = base.sigmas",
      T_CAL, "a calibration file's fitted noise levels ignored: its gammas run on the base schedule (a cached "
      "calibration samples differently from the fresh one)", "cache"),
    M("default-guards-inverted", "steindiff/calibration.py",
      "return (\"residual\", *DEFAULT_GUARDS)", "return DEFAULT_GUARDS",
      T_CAL, "the residual guard left out of the default guards (it is on for every model; the list no longer "
      "depends on the model, so the original inversion for mixtures cannot exist)", "cache"),
    M("gradient-guards-dropped", "steindiff/calibration.py",
      "        return GRADIENT_GUARDS", "        return (\"residual\", *DEFAULT_GUARDS)",
      T_CAL, "the gradient fit judged under the derivative-free fit's guards (its default lets more trades through)",
      "cache"),
    M("gradient-sets-first-only", "steindiff/gradient_fit.py",
      "    for ps in sets:", "    for ps in sets[:1]:",
      ("tests/test_gradient_fit.py",), "several parameter sets asked for, only the first fitted and offered to the "
      "validation", "cache"),
    M("gradient-start-ignored", "steindiff/gradient_fit.py",
      "        fits = [gradient_fit(model, fit_base, noise[train]",
      "        fits = [gradient_fit(model, base, noise[train]",
      ("tests/test_gradient_fit.py",), "GITS's levels searched and offered, but every fit started from the plain "
      "levels", "cache"),
    M("gits-start-sees-validation", "steindiff/gradient_fit.py",
      "g = gits_plan(model, base, batch.ref, n=batch.n_fit,", "g = gits_plan(model, base, batch.ref, n=None,",
      ("tests/test_gradient_fit.py",), "GITS's search reads every trajectory the teacher kept (the validation "
      "half too, when it keeps them)", "cache"),
    M("cache-file-digest", "steindiff/calibration.py",
      "digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]",
      "digest = hashlib.sha256(json.dumps(key[\"fingerprint\"]).encode()).hexdigest()[:16]",
      T_CAL, "cache file named by the model alone: configurations that differ in fit or conditioning overwrite "
      "each other's file and refit on every other call", "cache"),
    # ---- image metrics (metrics/image.py, metrics/patches.py)
    M("kid-biased", "steindiff/metrics/image.py",
      "vals.append(float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()))",
      "vals.append(float((kxx.sum() + kyy.sum()) / (m * m) - 2 * kxy.mean()))",
      T_IMG, "KID: the biased (V-statistic) MMD^2, diagonal included: positive for two sets of one distribution",
      "image-metrics"),
    M("kid-denominator", "steindiff/metrics/image.py",
      "vals.append(float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean()))",
      "vals.append(float((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * m) - 2 * kxy.mean()))",
      T_IMG, "KID: off-diagonal sums divided by m^2 instead of m(m-1)", "image-metrics"),
    M("kid-kernel-scale", "steindiff/metrics/image.py",
      "kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3",
      "kxx, kyy, kxy = (x @ x.T + 1) ** 3, (y @ y.T + 1) ** 3, (x @ y.T + 1) ** 3",
      T_IMG, "KID kernel without 1/d: (x.y + 1)^3", "image-metrics"),
    M("knn-counts-self", "steindiff/metrics/image.py",
      "return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0",
      "return d.kthvalue(k, dim=1).values  # k+1: the point itself is at distance 0",
      T_IMG, "k-NN radius counts the point itself (the (k-1)-th neighbour): precision and recall too low",
      "image-metrics"),
    M("recall-radii", "steindiff/metrics/image.py",
      "recall = (d <= rf[:, None]).any(0).double().mean()", "recall = (d <= rr[None, :]).any(0).double().mean()",
      T_IMG, "recall with the real points' radii instead of the samples'", "image-metrics"),
    M("precision-axis", "steindiff/metrics/image.py",
      "precision = (d <= rr[None, :]).any(1).double().mean()", "precision = (d <= rr[None, :]).any(0).double().mean()",
      T_IMG, "precision counts real points with a sample in their ball, not samples inside some real ball",
      "image-metrics"),
    M("image-metrics-k", "steindiff/metrics/image.py",
      "def image_metrics(samples: torch.Tensor, spec: Any, *, k: int = 3, seed: int = 0, floor_draws: int = 5,",
      "def image_metrics(samples: torch.Tensor, spec: Any, *, k: int = 5, seed: int = 0, floor_draws: int = 5,",
      T_IMG, "image_metrics' precision/recall with k = 5 instead of the documented k = 3", "image-metrics"),
    M("psd-sqrt", "steindiff/metrics/image.py",
      "return (v * np.sqrt(np.clip(w, 0, None))) @ v.T", "return (v * np.clip(w, 0, None)) @ v.T",
      T_IMG, "Fréchet distance: the matrix square root returns the matrix", "image-metrics"),
    M("fid-commuting-cross", "steindiff/metrics/image.py",
      "cross = _psd_sqrt(r1 @ s2 @ r1)", "cross = r1 @ _psd_sqrt(s2)",
      T_IMG, "Fréchet distance cross term tr(S1^1/2 S2^1/2): right only for commuting covariances",
      "image-metrics"),
    M("memorization-distance", "steindiff/metrics/image.py",
      "return torch.cat(out) / a.shape[1] ** 0.5", "return torch.cat(out) / a.shape[1]",
      T_IMG, "nearest-image distance per pixel instead of RMS per pixel: memorisation overstated", "image-metrics"),
    M("spectrum-band-edges", "steindiff/metrics/patches.py",
      "band = torch.ceil(radius * 2 * bands).long() - 1  # (0, 1/2] -> 0 .. bands-1; the mean -> -1",
      "band = torch.floor(radius * 2 * bands).long()  # (0, 1/2] -> 0 .. bands-1; the mean -> -1",
      T_PATCH, "spectrum bands [a, b) instead of (a, b]: the mean (DC) in the lowest band, the Nyquist ring dropped",
      "image-metrics"),
    M("spectrum-rms", "steindiff/metrics/patches.py",
      "\"spectrum\": float(err.square().mean().sqrt()), \"spectrum_high\": float(err[-1]),",
      "\"spectrum\": float(err.abs().mean()), \"spectrum_high\": float(err[-1]),",
      T_PATCH, "spectrum distance as the mean |log ratio| instead of its RMS", "image-metrics"),
    M("spectrum-high-band", "steindiff/metrics/patches.py",
      "\"spectrum\": float(err.square().mean().sqrt()), \"spectrum_high\": float(err[-1]),",
      "\"spectrum\": float(err.square().mean().sqrt()), \"spectrum_high\": float(err[0]),",
      T_PATCH, "spectrum_high reads the lowest band", "image-metrics"),
    M("spectrum-log-base", "steindiff/metrics/patches.py",
      "return (radial_spectrum(x, bands) / radial_spectrum(ref, bands)).log10()",
      "return (radial_spectrum(x, bands) / radial_spectrum(ref, bands)).log()",
      T_PATCH, "spectrum_error in natural log instead of log10", "image-metrics"),
    M("spectrum-sum", "steindiff/metrics/patches.py",
      "power = torch.fft.fft2(x).abs().square().mean(tuple(range(x.ndim - 2))) / (h * w)",
      "power = torch.fft.fft2(x).abs().square().sum(tuple(range(x.ndim - 2))) / (h * w)",
      T_PATCH, "power spectrum summed over images and channels, not averaged: it grows with the sample count",
      "image-metrics"),
    M("patch-cache-seed", "steindiff/metrics/patches.py",
      "key = f\"_patch_metrics/{n}/{seed}/{floor_draws}\"", "key = f\"_patch_metrics/{n}/{floor_draws}\"",
      T_PATCH, "patch metrics' cached held-out side ignores the seed: seed=1 reuses seed=0's subset and floors",
      "image-metrics"),
    # ---- checkpoint loading (models/checkpoint.py, models/trained.py)
    M("ckpt-sigma-data", "steindiff/models/checkpoint.py",
      "return EDMPrecond(net, sigma_data=pre[\"sigma_data\"], dtype=torch.float32), process",
      "return EDMPrecond(net, dtype=torch.float32), process",
      T_CKPT, "the checkpoint's sigma_data ignored (EDM's default 0.5 used)", "checkpoint"),
    M("ckpt-vp-timestep", "steindiff/models/checkpoint.py",
      "return VPDenoiser(net, process, prediction=pre[\"prediction\"], timestep=\"interp\",",
      "return VPDenoiser(net, process, prediction=pre[\"prediction\"], timestep=\"round\",",
      T_CKPT, "VP checkpoints see rounded timesteps instead of fractional ones", "checkpoint"),
    M("ckpt-prediction", "steindiff/models/checkpoint.py",
      "return VPDenoiser(net, process, prediction=pre[\"prediction\"], timestep=\"interp\",",
      "return VPDenoiser(net, process, prediction=\"epsilon\", timestep=\"interp\",",
      T_CKPT, "the checkpoint's prediction type ignored: a v- or x0-prediction checkpoint is read as epsilon",
      "checkpoint"),
    M("ckpt-partly-nonfinite", "steindiff/models/checkpoint.py",
      "bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]",
      "bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).any()]",
      T_CKPT, "only all-NaN/Inf tensors refused: partly non-finite weights load and give NaN samples later",
      "checkpoint"),
    M("ckpt-ve-sigma-max", "steindiff/models/checkpoint.py",
      "return VEProcess(cfg[\"sigma_min\"], cfg[\"sigma_max\"])", "return VEProcess(cfg[\"sigma_min\"])",
      T_CKPT, "a VE checkpoint's sigma_max ignored (80 used)", "checkpoint"),
    M("ckpt-config-keys", "steindiff/models/checkpoint.py",
      "for key in (\"architecture\", \"precond\", \"process\", \"data\"):",
      "for key in (\"architecture\", \"precond\", \"data\"):",
      T_CKPT, "a config without 'process' passes validation: a KeyError later instead of an error naming the file",
      "checkpoint"),
    M("trained-labels-swapped", "steindiff/models/trained.py",
      "info[\"heldout_labels\"], info[\"train_labels\"] = ds.labels[held], ds.labels[mask]",
      "info[\"heldout_labels\"], info[\"train_labels\"] = ds.labels[mask], ds.labels[held]",
      T_CKPT, "held-out and training labels swapped: class_tv compares with the training labels", "checkpoint"),
    M("trained-heldout-in-train", "steindiff/models/trained.py",
      "mask[held] = False", "mask[held] = True",
      T_CKPT, "the training images include the held-out ones: floors and memorisation against the reference itself",
      "checkpoint"),
    # ---- distributed statistics (distributed.py, stabilizers/base.py)
    M("dist-normaliser", "steindiff/stabilizers/base.py",
      "n_tot = vals[n_stats]", "n_tot = x.shape[0]",
      T_BASE, "batch means divided by this rank's count, not the all-reduced one: with R ranks the traces' means "
      "are R x too large and stein-energy's gamma changes", "distributed"),
    M("dist-mean-before-reduce", "steindiff/stabilizers/base.py",
      "sums = [per[k].sum() for k in names]", "sums = [per[k].mean() for k in names]",
      T_BASE, "per-rank means all-reduced and divided by the global count again: every mean 1/B too small",
      "distributed"),
    M("probe-seed-step", "steindiff/distributed.py",
      "s = int(np.random.SeedSequence([seed, call, j]).generate_state(1, np.uint64)[0] >> np.uint64(1))",
      "s = int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0] >> np.uint64(1))",
      T_DIST, "per-sample probes the same at every step", "distributed"),
    M("probe-local-index", "steindiff/distributed.py",
      "for j in range(start, stop):", "for j in range(stop - start):",
      T_DIST, "per-sample probes seeded by the local index: results depend on the world size", "distributed"),
    M("global-probes-slice", "steindiff/distributed.py",
      "return to_device(full[:, start:stop].contiguous(), x.device)",
      "return to_device(full[:, : stop - start].contiguous(), x.device)",
      T_DIST, "every rank takes the first shard's probes: global probe mode no longer equals one process",
      "distributed"),
    M("shard-remainder", "steindiff/distributed.py",
      "return rank * n // world_size, (rank + 1) * n // world_size",
      "return rank * (n // world_size), (rank + 1) * (n // world_size)",
      T_DIST, "shards drop the remainder when n is not a multiple of the world size", "distributed"),
    M("dist-noise-seed", "steindiff/distributed.py",
      "noise = prior_noise((n, *spec.sample_shape), float(sigmas[0]), spec.process, seed=seed, dtype=dtype)",
      "noise = prior_noise((n, *spec.sample_shape), float(sigmas[0]), spec.process, seed=seed + rank, dtype=dtype)",
      T_DIST, "each rank draws the global noise from seed + rank: samples depend on the world size", "distributed"),
    # ---- solvers
    M("dpmpp-lower-order-final", "steindiff/solvers/dpmpp.py",
      "elif self.lower_order_final and n < 15 and i == n - 2:",
      "elif self.lower_order_final and n < 10 and i == n - 2:",
      T_SOLV, "DPM-Solver++(3M): lower_order_final below 10 steps instead of 15 (10-14 steps differ from diffusers)",
      "solvers"),
    M("dpmpp3m-extrapolation", "steindiff/solvers/dpmpp.py",
      "d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)", "d1 = d1_0 + (r1 / (r0 + r1)) * (d1_0 - d1_1)",
      T_SOLV, "DPM-Solver++(3M): extrapolation weight r0/(r0+r1) -> r1/(r0+r1) (shows on non-uniform steps)",
      "solvers"),
    M("unipc-ratio-sign", "steindiff/solvers/unipc.py",
      "rks = [(hist_l[-k] - lam) / h for k in range(1, p)]", "rks = [(lam - hist_l[-k]) / h for k in range(1, p)]",
      T_SOLV, "UniPC: past ratios r_k with the wrong sign", "solvers"),
    M("heun-nfe", "steindiff/solvers/euler.py",
      "return 2 * n - (1 if float(sigmas[-1]) == 0 else 0)", "return 2 * n",
      T_SOLV, "Heun's NFE count ignores the one-pass final step: one step fewer for a budget, NFE reported one high",
      "solvers"),
    M("ipndm-v-nodes", "steindiff/solvers/ipndm.py",
      "u = [(nd - a) / (b - a) for nd in nodes]", "u = [(nd - b) / (b - a) for nd in nodes]",
      T_SOLV, "variable-step iPNDM: Lagrange nodes shifted by one step (weights of the wrong interval)", "solvers"),
    M("ipndm-history", "steindiff/solvers/ipndm.py",
      "keep = self.order - 1", "keep = self.order - 2",
      T_SOLV, "iPNDM keeps one past slope too few: order 4 runs as order 3", "solvers"),
    # ---- schedules
    M("karras-ramp", "steindiff/schedules.py",
      "ramp = torch.linspace(0, 1, n, dtype=torch.float64)",
      "ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)[:-1]",
      T_SCHED, "Karras ramp stops one step short of sigma_min", "schedules"),
    M("sigma-max-override", "steindiff/schedules.py",
      "smax = process.sigma_max if sigma_max is None else sigma_max", "smax = process.sigma_max",
      T_SCHED, "get_sigmas ignores a user's sigma_max", "schedules"),
    M("repeated-sigmas", "steindiff/schedules.py",
      "if (s[1:] >= s[:-1]).any():", "if (s[1:] > s[:-1]).any():",
      T_SCHED, "repeated noise levels accepted (a zero-length step divides by h = 0)", "schedules"),
    # ---- noise processes
    M("vp-prior-scale", "steindiff/noise.py",
      "return math.sqrt(1.0 + float(sigma_max) ** 2)", "return float(sigma_max)",
      T_NOISE, "VP prior noise at the VE scale sigma_max instead of sqrt(1 + sigma_max^2)", "noise"),
    M("vp-sigma-to-t-linear", "steindiff/noise.py",
      "w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)",
      "w = ((sigma.clamp(min=1e-10) - lo.exp()) / (hi.exp() - lo.exp())).clamp(0, 1)",
      T_NOISE, "fractional timestep interpolated in sigma instead of log sigma (VP models see another time)", "noise"),
    M("vp-linear-log-alpha", "steindiff/noise.py",
      "return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min",
      "return -0.5 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min",
      T_NOISE, "continuous linear VP: log alpha's t^2 coefficient 1/4 -> 1/2", "noise"),
    M("zero-snr-first-alpha", "steindiff/noise.py",
      "s = (s - sT) * s0 / (s0 - sT)", "s = (s - sT) / (s0 - sT)",
      T_NOISE, "zero-terminal-SNR rescale does not keep the first alpha (sigma_min becomes 0)", "noise"),
    # ---- mixture metrics
    M("mmd-median-zeros", "steindiff/metrics/mixture.py",
      "bw2 = d2[d2 > 0].median()", "bw2 = d2.median()",
      T_MIX, "MMD bandwidth: the median includes the zero self-distances", "mixture-metrics"),
    M("mmd-y-count", "steindiff/metrics/mixture.py",
      "m = y.shape[0]", "m = n",
      T_MIX, "MMD's y term normalised by x's count: wrong when the sets differ in size", "mixture-metrics"),
    M("sw2-directions", "steindiff/metrics/mixture.py",
      "return (v / v.norm(dim=0, keepdim=True)).to(device)", "return (v / v.norm(dim=1, keepdim=True)).to(device)",
      T_MIX, "sliced-W2 directions not unit vectors: the distance scales with the dimension", "mixture-metrics"),
    M("traj-err-per-sample", "steindiff/metrics/mixture.py",
      "return float(((x - _flat(ref).to(x.device)) ** 2).mean().sqrt())",
      "return float(((x - _flat(ref).to(x.device)) ** 2).sum(1).mean().sqrt())",
      T_MIX, "traj_err: RMS per sample instead of per dimension", "mixture-metrics"),
]
AUDIT_GROUPS = tuple(dict.fromkeys(m.group for m in AUDIT))
MUTATIONS += AUDIT


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
        if "\n" in m.find.strip("\n") or "\n" in m.replace.strip("\n"):
            problems.append(f"{m.id}: not a one-line mutation")
        try:
            compile(apply(f.read_text(), m), str(f), "exec")
        except ValueError as e:
            problems.append(str(e))
        except SyntaxError as e:
            problems.append(f"{m.id}: the mutated {m.path} does not compile: {e}")
        for t in m.tests:
            if not (root / t.split("::")[0]).exists():
                problems.append(f"{m.id}: no test file or folder {t.split('::')[0]}")
    return problems


def _tracked(root: Path) -> list[str] | None:
    """The repository's tracked files (``git ls-files``), or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in out.decode().split("\0") if f]


def make_copy(dest: Path) -> None:
    """The package and its tests in ``dest``: every tracked file where git knows them (the whole suite reads
    ``benchmarks/``, ``docs/`` and ``README.md`` too), else ``steindiff/``, ``tests/`` and ``pyproject.toml``."""
    files = _tracked(REPO)
    if files is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
        for name in ("steindiff", "tests"):
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
        shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
        return
    for f in files:
        src = REPO / f
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


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


# The whole suite (``--suite``) leaves out the test of this script's own mechanics: it checks that every mutation
# applies to the source, which a mutated copy never satisfies.
SUITE = ("tests", "--ignore=tests/test_mutation_check.py")


#: Tests left out of every run (``--deselect``): tests that fail without any mutation, for reasons the report names.
DESELECTED: list[str] = []


def _pytest_args(tests: list[str]) -> list[str]:
    return ["-x", "-rfE", "-p", "no:cacheprovider", "-p", "no:warnings",
            *(a for t in DESELECTED for a in ("--deselect", t)), *tests]


def _run_forked(copy: Path, tests: list[str], timeout: float, plugins: list | None = None) -> tuple[int | None, str]:
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

                rc = int(pytest.main(_pytest_args(tests), plugins=plugins or []))
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


def outcome_of(rc: int | None, out: str) -> dict:
    """What a pytest run says about a mutation: ``caught`` when a test fails or errors in its setup (a fixture that
    calls the mutated code), ``survived`` when all pass, ``error`` when the suite could not run (a collection error:
    exit status 2), ``timeout`` when it was stopped; the first failing test and the counts."""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?)\b", out)}
    if rc == 0:
        outcome = "survived"
    elif rc == 1 and failed:
        outcome = "caught"
    else:
        outcome = "timeout" if rc is None else "error"
    return {"outcome": outcome, "rc": rc, "caught_by": failed[0] if failed else None,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "tail": None if outcome in ("caught", "survived") else out[-2000:]}


def run_pytest(copy: Path, tests: list[str], timeout: float, fork: bool = True, plugins: list | None = None) -> dict:
    t0 = time.perf_counter()
    rc, out = _run_forked(copy, tests, timeout, plugins) if fork else _run_subprocess(copy, tests, timeout)
    return {"seconds": round(time.perf_counter() - t0, 1), **outcome_of(rc, out)}


def select(mutations: list[Mutation], *, groups: str | None = None, only: str | None = None,
           survivors_of: str | None = None) -> list[Mutation]:
    """The mutations named by ``--group`` (group names; ``audit``: every group but ``core``; ``all``), ``--only``
    (ids) and ``--survivors-of`` (the ids not caught in an earlier ``--json`` file), all that apply; ``ValueError``
    for an unknown name."""
    out = list(mutations)
    if groups:
        names = [g.strip() for g in groups.split(",") if g.strip()]
        known = {m.group for m in mutations} | {"audit", "all"}
        unknown = [g for g in names if g not in known]
        if unknown:
            raise ValueError(f"unknown group(s): {', '.join(unknown)} (groups: {', '.join(sorted(known))})")
        out = [m for m in out if m.group in names or "all" in names or ("audit" in names and m.group != "core")]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in {m.id for m in mutations}]
        if unknown:
            raise ValueError(f"unknown mutation id(s): {', '.join(unknown)}")
        out = [m for m in out if m.id in wanted]
    if survivors_of:
        try:
            prev = json.loads(Path(survivors_of).read_text())
            ids = {r["id"] for r in prev["mutations"] if r["outcome"] != "caught"}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{survivors_of}: not a results file of this check ({e})") from None
        out = [m for m in out if m.id in ids]
    return out


# --------------------------------------------------------------------------------------------
# --suite-traced: the whole suite once, traced, then each mutation against the test files that run its line
# --------------------------------------------------------------------------------------------
def watched_lines(root: Path, m: Mutation) -> tuple[list[int], bool]:
    """The lines whose execution runs the mutated statement (all of a simple statement, the header of a compound
    one) and whether it runs at import (a ``def``/``class`` line: default values; or module level)."""
    import ast

    text = (root / m.path).read_text()
    line = text[: text.index(m.find)].count("\n") + 1
    tree = ast.parse(text)
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    stmts = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and n.lineno <= line <= n.end_lineno]
    node = max(stmts, key=lambda n: n.lineno)
    import_time = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or isinstance(
        parents.get(node), ast.Module)
    bodies = [b for f in ("body", "orelse", "finalbody", "handlers") for b in getattr(node, f, []) or []]
    end = min([b.lineno for b in bodies], default=node.end_lineno + 1) - 1 if bodies else node.end_lineno
    return list(range(node.lineno, max(end, line) + 1)), import_time


def make_tracer(watch: dict[str, set[int]], out_file: Path):
    """A pytest plugin that records which test files execute the ``watch``ed lines (``{abs file: lines}``): in a
    test's setup, call or teardown, in the collection of a test file, or in a session-scoped fixture (then every
    file whose tests use it).  Test files that start a process are recorded too (their children are not traced).
    Written to ``out_file`` at the end of the session."""
    import multiprocessing.process
    import threading

    import pytest

    class Tracer:
        def __init__(self) -> None:
            self.where: str | None = None
            self.hits: dict[str, set] = {}
            self.spawners: set = set()
            self.users: dict[str, set] = {}

        def _global(self, frame, event, arg):
            return self._local if frame.f_code.co_filename in watch else None

        def _local(self, frame, event, arg):
            if event == "line" and frame.f_lineno in watch[frame.f_code.co_filename]:
                self.hits.setdefault(f"{frame.f_code.co_filename}:{frame.f_lineno}", set()).add(self.where)
            return self._local

        def _note_spawn(self, orig):
            def wrapped(*a, **k):
                self.spawners.add(self.where)
                return orig(*a, **k)
            return wrapped

        def pytest_configure(self, config) -> None:
            subprocess.Popen.__init__ = self._note_spawn(subprocess.Popen.__init__)
            multiprocessing.process.BaseProcess.start = self._note_spawn(multiprocessing.process.BaseProcess.start)
            threading.settrace(self._global)
            sys.settrace(self._global)

        @pytest.hookimpl(hookwrapper=True)
        def pytest_make_collect_report(self, collector):
            prev, self.where = self.where, (collector.nodeid.split("::")[0] if collector.nodeid else self.where)
            yield
            self.where = prev

        def pytest_collection_modifyitems(self, items) -> None:
            for it in items:
                for f in getattr(it, "fixturenames", ()):
                    self.users.setdefault(f, set()).add(it.nodeid.split("::")[0])

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            self.where = item.nodeid.split("::")[0]
            yield
            self.where = None

        @pytest.hookimpl(hookwrapper=True)
        def pytest_fixture_setup(self, fixturedef, request):
            prev = self.where
            if fixturedef.scope in ("session", "package"):
                self.where = f"fixture:{fixturedef.argname}"
            yield
            self.where = prev

        def pytest_sessionfinish(self, session) -> None:
            sys.settrace(None)
            threading.settrace(None)

            def files(ws: set) -> list:
                out: set = set()
                for w in ws:
                    out |= self.users.get(w[len("fixture:"):], set()) if w and w.startswith("fixture:") else {w}
                return sorted(out, key=str)

            out_file.write_text(json.dumps({"hits": {k: files(v) for k, v in self.hits.items()},
                                            "spawners": files(self.spawners)}))

    return Tracer()


def traced_selection(copy: Path, trace: dict, m: Mutation) -> tuple[str, ...]:
    """The test files that can see mutation ``m``: those that ran its statement in the traced baseline and those
    that start processes; the whole suite where the statement runs at import or outside any test file."""
    lines, import_time = watched_lines(copy, m)
    if import_time:
        return SUITE
    where: set = set(trace["spawners"])
    for ln in lines:
        where |= set(trace["hits"].get(f"{copy / m.path}:{ln}", []))
    if any(w is None or not w.endswith(".py") for w in where):  # outside a test file, e.g. a conftest at import
        return SUITE
    return tuple(sorted(w for w in where if w != "tests/test_mutation_check.py"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--only", metavar="IDS", help="comma-separated mutation ids to run (default: all)")
    p.add_argument("--group", metavar="NAMES",
                   help="comma-separated groups to run: core (the project's list; the default unless --only, "
                        "--survivors-of or --check names others), audit (every other group), all, or one of "
                        f"{', '.join(AUDIT_GROUPS)}")
    p.add_argument("--survivors-of", metavar="FILE",
                   help="only the mutations not caught in an earlier --json FILE (e.g. to rerun them with --suite)")
    p.add_argument("--suite", action="store_true",
                   help="run the whole test suite (tests/, without this script's own test) for each mutation "
                        "instead of its targeted tests")
    p.add_argument("--suite-traced", action="store_true",
                   help="as --suite, faster: the whole suite runs once on the unmutated copy with a line tracer (the "
                        "baseline), then each mutation runs the test files that executed its line there, plus those "
                        "that start processes (the whole suite for a line run at import); a mutation no test "
                        "executes survives without a run")
    p.add_argument("--list", action="store_true", help="list the selected mutations and exit")
    p.add_argument("--check", action="store_true",
                   help="only check that every selected mutation applies to the current source")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline run (not for reports)")
    p.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                   help="leave this test out of every run, the baseline's too (repeatable): for a test that fails "
                        "without any mutation; the recorded command names it")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per pytest run (default 300; 1200 with --suite)")
    p.add_argument("--subprocess", action="store_true",
                   help="a fresh interpreter per pytest run instead of a fork of a preloaded "
                        "one (slower; no fork needed)")
    args = p.parse_args(argv)
    DESELECTED[:] = args.deselect
    whole = args.suite or args.suite_traced
    timeout = args.timeout if args.timeout is not None else (1200.0 if whole else 300.0)
    if args.suite and args.suite_traced:
        p.error("--suite and --suite-traced exclude each other")
    if args.suite_traced and (args.subprocess or not hasattr(os, "fork")):
        p.error("--suite-traced needs the forked runs (no --subprocess)")

    try:
        groups = args.group or (None if (args.only or args.survivors_of or args.check) else "core")
        muts = select(MUTATIONS, groups=groups, only=args.only, survivors_of=args.survivors_of)
    except ValueError as e:
        p.error(str(e))
    problems = check_mutations(mutations=muts)
    if args.check or problems:
        for msg in problems:
            print(f"mutation_check: {msg}", file=sys.stderr)
        if not problems:
            print(f"{len(muts)} mutations apply cleanly")
        return 2 if problems else 0
    if args.list:
        for m in muts:
            print(f"{m.id:28} {m.group:16} {m.path:34} {m.what}")
        return 0
    if not muts:
        print("mutation_check: no mutation selected", file=sys.stderr)
        return 2
    if args.suite:
        muts = [dataclasses.replace(m, tests=SUITE) for m in muts]

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
        trace = None
        if args.suite_traced:
            watch: dict[str, set[int]] = {}
            for m in muts:
                watch.setdefault(str(copy / m.path), set()).update(watched_lines(copy, m)[0])
            trace_file = tmp / "trace.json"
            print("baseline: the whole suite on the unmutated copy, traced ...", file=sys.stderr, flush=True)
            baseline = run_pytest(copy, list(SUITE), timeout * 3, fork, plugins=[make_tracer(watch, trace_file)])
            baseline["tests"] = list(SUITE)
            trace = json.loads(trace_file.read_text()) if trace_file.is_file() else None
            if trace is None or baseline["outcome"] != "survived":
                print(f"mutation_check: the traced baseline fails ({baseline['outcome']})\n"
                      f"{baseline.get('tail') or baseline['caught_by']}", file=sys.stderr)
                return 1
            baseline["outcome"] = "passed"
            baseline["spawners"] = trace["spawners"]
            muts = [dataclasses.replace(m, tests=traced_selection(copy, trace, m)) for m in muts]
        elif not args.no_baseline:
            union = list(dict.fromkeys(t for m in muts for t in m.tests))
            print(f"baseline: {len(union)} test selections on the unmutated copy ...", file=sys.stderr, flush=True)
            baseline = run_pytest(copy, union, timeout * 3, fork)
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
            if not m.tests:  # --suite-traced: no test runs the mutated line
                r = {"outcome": "survived", "rc": None, "seconds": 0.0, "caught_by": None, "passed": 0, "failed": 0,
                     "tail": None, "note": "no test executes this line"}
                results.append({"id": m.id, "group": m.group, "path": m.path, "what": m.what, "find": m.find,
                                "replace": m.replace, "tests": [], **r})
                print(f"[{i}/{len(muts)}] {m.id}: survived (no test executes it)", file=sys.stderr, flush=True)
                continue
            target.write_text(apply(original, m))
            try:
                r = run_pytest(copy, list(m.tests), timeout, fork)
            finally:
                target.write_text(original)
            results.append({"id": m.id, "group": m.group, "path": m.path, "what": m.what, "find": m.find,
                            "replace": m.replace, "tests": list(m.tests), **r})
            print(f"[{i}/{len(muts)}] {m.id}: {r['outcome']} ({r['seconds']} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = round(time.perf_counter() - t_start, 1)

    caught = sum(r["outcome"] == "caught" for r in results)
    by_group = {g: [r for r in results if r["group"] == g] for g in dict.fromkeys(r["group"] for r in results)}
    command = " ".join(["python benchmarks/mutation_check.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        f"Mutation check: {caught} of {len(results)} mutations caught"
        + (f"; baseline ({len(baseline['tests'])} test selections, {baseline['passed']} tests) "
           f"{'passes' if baseline['outcome'] == 'passed' else 'FAILS'}"
           if baseline else "; no baseline run"),
        "By group: " + ", ".join(f"{g} {sum(r['outcome'] == 'caught' for r in rs)}/{len(rs)}"
                                 for g, rs in by_group.items()),
        f"Total {total} s ({os.cpu_count()} CPUs, shared; Python {platform.python_version()}).",
        f"Command: {command}",
        "Each mutation changes one line in a temporary copy; "
        + ("the whole suite (tests/, without tests/test_mutation_check.py)" if args.suite else
           "the test files that executed the mutated line in a traced run of the whole suite (plus those that start "
           "processes)" if args.suite_traced else "the listed tests")
        + " run with pytest -x"
        + (" (each run a fork of one process with the third-party modules preloaded)." if fork
           else " (one interpreter per run)."),
        "",
        "| mutation | group | file | change | outcome | caught by (first failing test) | passed before it | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r["id"], r["group"], r["path"].removeprefix("steindiff/"), r["what"], r["outcome"],
                 r["caught_by"] or "-", r["passed"], r["seconds"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
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
            "command": command, "suite": args.suite, "baseline": baseline, "mutations": results,
            "caught": caught, "n": len(results),
            "groups": {g: {"caught": sum(r["outcome"] == "caught" for r in rs), "n": len(rs)}
                       for g, rs in by_group.items()}}, indent=1) + "\n")
    ok = (baseline is None or baseline["outcome"] == "passed") and caught == len(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
