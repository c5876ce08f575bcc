"""How steindiff stands in for ``t = 1`` on a flow-matching model, measured.

    python benchmarks/flow_t1.py --json-out docs/results/flow-t1.json --markdown docs/results/flow-t1.md

``t = 1`` (pure noise, where ``FlowMatchEulerDiscreteScheduler`` starts) has no VE noise level (``sigma = t /
(1 - t) = inf``), so a :class:`steindiff.noise.FlowProcess` starts at ``t_max = 1 - delta``: the state there is
``x_ve = eps / delta``.  Two questions, for ``delta`` from 1e-3 to 1e-8:

1. How far is a solve from ``1 - delta`` from diffusers' own from ``t = 1``?  A tiny random-weight
   ``SD3Transformer2DModel`` (built from a config), 8 steps of each flow scheduler (shift 3) and of the steindiff
   solver that runs the same method over the same levels, from the same latents; relative distance of the final
   samples, in float64 and float32.
2. Does every solver stay exact in float32 with a state of size ``1 / delta``?  Each solver on the exact flow
   mixture ``gmm:image64-flow`` (the flow schedule, 6 steps, and with a rescaled first step ``gamma = 0.9`` as a
   calibration may take), float32 against float64 from the same noise.  For contrast, the first Euler step written
   as ``x + (sigma' - sigma) (x - D) / sigma`` (which cancels the large state against its slope) against steindiff's
   ``D + (sigma' / sigma) (x - D)``, in float32 against float64.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from steindiff import sample
from steindiff.io import save_json, save_text
from steindiff.models import FlowDenoiser
from steindiff.models.registry import load_model
from steindiff.noise import FlowProcess
from steindiff.sampling import prior_noise
from steindiff.schedules import get_sigmas
from steindiff.stabilizers.schedule import GammaSchedule

DELTAS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
SOLVERS = ("euler", "heun_flow", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm_v")
STEPS, BATCH = 8, 3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def against_diffusers(deltas=DELTAS) -> list[dict]:
    import diffusers

    from steindiff.integrations.diffusers import denoiser_from_diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8).eval()
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(BATCH, 5, 16, generator=g),
            "pooled_projections": torch.randn(BATCH, 8, generator=g)}
    lat = torch.randn(BATCH, 4, 8, 8, generator=g)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    cases = (("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "euler", "continuous"),
             ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, "heun_flow", "continuous"),
             ("UniPCMultistepScheduler", flow, "unipc", "floor"),
             ("DPMSolverMultistepScheduler", flow, "dpmpp_2m", "floor"))
    rows = []
    for dtype in (torch.float64, torch.float32):
        tr.to(dtype)
        c = {k: v.to(dtype) for k, v in cond.items()}
        for cls, cfg, solver, timestep in cases:
            sch = getattr(diffusers, cls)(**cfg)
            sch.set_timesteps(STEPS)
            x = lat.to(dtype)
            with torch.no_grad():
                for t in sch.timesteps:
                    x = sch.step(tr(hidden_states=x, timestep=t.expand(BATCH), **c).sample, t, x).prev_sample
            first = float(sch.sigmas[0])
            for delta in deltas:
                den = denoiser_from_diffusers(tr, sch, t_max=1 - delta, timestep=timestep)
                sig = get_sigmas("flow", STEPS, den.process)
                with torch.no_grad():
                    ours = sample(den, lat.to(dtype) * den.process.prior_scale(float(sig[0])), sig, solver,
                                  extra_args=c).x
                rows.append({"scheduler": cls, "solver": solver, "dtype": str(dtype).removeprefix("torch."),
                             "delta": delta, "diffusers_first_t": first, "rel_diff": _rel(ours, x)})
    return rows


def float32_exactness(deltas=DELTAS) -> list[dict]:
    spec = load_model("gmm:image64-flow")
    net = spec.gmm.velocity_net(1000.0)
    rows = []
    for delta in deltas:
        p = FlowProcess(spec.process.t_min, 1 - delta)
        den = FlowDenoiser(net, p, time_scale=1000.0)
        sig = get_sigmas("flow", 6, p)
        x64 = prior_noise((500, 64), float(sig[0]), p, seed=0, dtype=torch.float64)
        for solver in SOLVERS:
            for gamma in (1.0, 0.9):
                stab = None if gamma == 1.0 else GammaSchedule([gamma] + [1.0] * (len(sig) - 2))
                ref = sample(den, x64, sig, solver, stabilizer=stab).x
                out = sample(den, x64.float(), sig, solver, stabilizer=stab).x
                rows.append({"solver": solver, "first_gamma": gamma, "delta": delta,
                             "rel_diff_f32_f64": _rel(out, ref)})
        # one Euler step from t_max, in the cancelling form and in steindiff's
        s, s1 = float(sig[0]), float(sig[1])
        d64 = den(x64, torch.full((500,), s, dtype=torch.float64))
        exact = d64 + (s1 / s) * (x64 - d64)
        x32, d32 = x64.float(), d64.float()
        naive = x32 + (s1 - s) * (x32 - d32) / s
        stable = d32 + (s1 / s) * (x32 - d32)
        rows.append({"solver": "one euler step, x + (s'-s)(x-D)/s", "first_gamma": 1.0, "delta": delta,
                     "rel_diff_f32_f64": _rel(naive, exact)})
        rows.append({"solver": "one euler step, D + (s'/s)(x-D)", "first_gamma": 1.0, "delta": delta,
                     "rel_diff_f32_f64": _rel(stable, exact)})
    return rows


def markdown(result: dict) -> str:
    deltas = result["deltas"]
    head = "| " + " | ".join(f"delta {d:g}" for d in deltas) + " |"
    lines = ["# Standing in for t = 1 on a flow-matching model", "",
             f"Regenerate: `{result['command']}` ({result['wall_s']:.0f} s on the CPU).", "",
             "A `FlowProcess` starts at `t_max = 1 - delta` (VE sigma ~ 1/delta); steindiff's default is delta = "
             "1e-6 (`steindiff.noise.FLOW_T_DELTA`), the stand-in diffusers' UniPC scheduler uses for t = 1 itself.",
             "", "## 1. Distance to diffusers' own solve (tiny random-weight SD3 transformer, 8 steps, shift 3)", "",
             "Relative distance of the final samples. FlowMatchEuler and FlowMatchHeun start at t = 1 exactly (the "
             "distance falls with delta until float rounding); UniPC starts at its own 1 - 1e-6 and DPM-Solver at "
             "shift(1 - 1/1000) < t_max, so delta does not enter.", "",
             "| diffusers scheduler | steindiff solver | dtype " + head, "|---|---|---|" + "---|" * len(deltas)]
    groups: dict[tuple, dict] = {}
    for r in result["against_diffusers"]:
        groups.setdefault((r["scheduler"], r["solver"], r["dtype"]), {})[r["delta"]] = r["rel_diff"]
    for (cls, solver, dt), v in groups.items():
        lines.append(f"| {cls} | {solver} | {dt} | " + " | ".join(f"{v[d]:.1e}" for d in deltas) + " |")
    lines += ["", "## 2. float32 against float64 from t_max = 1 - delta (gmm:image64-flow, flow schedule, 6 steps)",
              "", "Relative distance of the float32 solve's samples to the float64 one's from the same noise; with "
              "`gamma 0.9`: the first step rescaled, `x + (1 - gamma) (x - T(x))`, as a calibration may do. The last "
              "two rows are one Euler step from t_max: written so that it cancels the large state against its slope, "
              "and as steindiff writes it.", "", "| solver | first gamma " + head, "|---|---|" + "---|" * len(deltas)]
    groups = {}
    for r in result["float32"]:
        groups.setdefault((r["solver"], r["first_gamma"]), {})[r["delta"]] = r["rel_diff_f32_f64"]
    for (solver, gamma), v in groups.items():
        lines.append(f"| {solver} | {gamma:g} | " + " | ".join(f"{v[d]:.1e}" for d in deltas) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-out", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {"deltas": list(DELTAS), "against_diffusers": against_diffusers(), "float32": float32_exactness()}
    result["wall_s"] = time.perf_counter() - t0
    result["command"] = "python benchmarks/flow_t1.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json_out:
        save_json(args.json_out, result)
    md = markdown(result)
    save_text(args.markdown, md) if args.markdown else print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
