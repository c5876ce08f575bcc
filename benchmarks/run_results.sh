#!/usr/bin/env bash
# Regenerates docs/results/: the benchmark protocol's grid on the exact-score mixtures, the
# side-by-side cost ratios and small grids on the digits and patches U-Nets.
# Usage: benchmarks/run_results.sh [image64|toy2d|exact|cost|variants|digits|calibrated|calibrated-image64|
#        calibrated-toy2d|calibrated-digits|calibrated-digits-eval|digits-fine|calibrated-cost|calibrated-image64-flow|
#        calibrated-image64-gradient|calibrated-image64-gradient-dfguards|calibrated-image64-gradient-sets|
#        calibrated-image64-gradient-gits|calibrated-digits-gradient|
#        flow-t1|digits-flow|digits-flow-eval|diagnose|engine|all], or patches
# (not part of all: a GPU job, after benchmarks/train_patches.sh), or patches-cpu (not part of all: the gradient-fit
# study on the patches U-Net at CPU scale, about 100 minutes on one CPU thread, estimated).  Default all: about 50 minutes on one
# CPU thread, plus about 12 for digits.
# Every output is written atomically.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread: the machines are shared, timings steadier
out=docs/results
mkdir -p "$out/plots"
what="${1:-all}"
SOLVERS=euler,heun,dpmpp_2m,dpmpp_3m,unipc,ipndm
# sharded NAME ARGS...: one `steindiff bench ARGS --solvers S` per solver of $SOLVERS, side by side (on a GPU
# the small U-Nets leave it mostly idle), merged into $out/NAME.{json,md} and $out/plots/NAME
sharded() {
  local name=$1; shift
  local tmp=$out/.shards-$name; local files=()
  rm -rf "$tmp"; mkdir -p "$tmp"
  for s in ${SOLVERS//,/ }; do
    steindiff bench "$@" --solvers "$s" --no-progress --json-out "$tmp/$s.json" > "$tmp/$s.log" 2>&1 &
    files+=("$tmp/$s.json")
  done
  wait
  local IFS=,
  steindiff bench --from "${files[*]}" --json-out $out/$name.json --markdown $out/$name.md --plots $out/plots/$name \
    --title "$TITLE"
  rm -rf "$tmp"
}


if [[ $what == image64 || $what == all ]]; then
  steindiff bench --model gmm:image64 --solvers $SOLVERS --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve,vp --stabilizers none,stein,stein-sc,stein-oracle --seeds 0,1,2 --n 1000 --probes 5 \
    --json-out $out/image64.json --markdown $out/image64.md --plots $out/plots/image64 \
    --title "gmm:image64: Stein stabilizers against vanilla solvers"
fi
if [[ $what == toy2d || $what == all ]]; then
  steindiff bench --model gmm:toy2d --solvers $SOLVERS --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve,vp --stabilizers none,stein,stein-sc,stein-oracle --seeds 0,1,2 --n 1000 --probes 5 \
    --json-out $out/toy2d.json --markdown $out/toy2d.md --plots $out/plots/toy2d \
    --title "gmm:toy2d: Stein stabilizers against vanilla solvers"
fi
if [[ $what == exact || $what == all ]]; then
  # stein-exact costs d = 64 Jacobian passes per step: a few cells only
  steindiff bench --model gmm:image64 --solvers euler,dpmpp_2m --nfe 4,6 --schedules karras \
    --coords ve,vp --stabilizers none,stein,stein-exact --seeds 0,1,2 --n 1000 --probes 5 \
    --json-out $out/image64-exact.json --markdown $out/image64-exact.md --plots $out/plots/image64-exact \
    --title "gmm:image64: Hutchinson (5 probes) against exact divergence"
fi
if [[ $what == cost || $what == all ]]; then
  steindiff bench --cost --model gmm:image64 --solvers euler,dpmpp_2m --nfe 5,10 --schedules karras --coords ve \
    --stabilizers none,stein,stein-energy,stein-sc,stein-oracle --cost-probes 1,5 --repeats 5 --n 1000 \
    --json-out $out/cost-image64.json --markdown $out/cost-image64.md --title "Cost on gmm:image64 (d = 64)"
  steindiff bench --cost --model gmm:hd1024 --solvers dpmpp_2m --nfe 5 --schedules karras --coords ve \
    --stabilizers none,stein --cost-probes 1,5 --repeats 3 --n 500 \
    --json-out $out/cost-hd1024.json --markdown $out/cost-hd1024.md --title "Cost on gmm:hd1024 (d = 1024)"
fi
if [[ $what == variants || $what == all ]]; then
  # the project's own variants (issue: Stein stabilization that helps); ve coordinates
  steindiff bench --model gmm:image64 --solvers $SOLVERS --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve --stabilizers none,stein-tr,stein-energy,cal:stein-energy --seeds 0,1,2 --n 1000 --probes 5 \
    --json-out $out/variants-image64.json --markdown $out/variants-image64.md --plots $out/plots/variants-image64 \
    --title "gmm:image64: the project's stabilizer variants against vanilla solvers"
fi
if [[ $what == digits || $what == all ]]; then
  # the shipped 8x8 digits U-Net: float32, image metrics against the held-out images (primary: digits_fid),
  # trajectory reference of 100 steps; stein-oracle/stein-exact need a mixture
  steindiff bench --model digits --solvers euler,dpmpp_2m,heun --nfe 4,6,10 --schedules karras --coords ve \
    --stabilizers none,stein,stein-tr,stein-energy,cal:stein-energy --seeds 0,1 --n 400 \
    --json-out $out/digits.json --markdown $out/digits.md --plots $out/plots/digits \
    --title "digits U-Net: Stein stabilizers against vanilla solvers"
fi
if [[ $what == calibrated || $what == calibrated-image64 || $what == all ]]; then
  TITLE="gmm:image64: the calibrated sampler against vanilla solvers" sharded calibrated-image64 \
    --model gmm:image64 --nfe 3,4,5,6,8,10 --schedules karras,logsnr --coords ve --stabilizers none,cal:trajectory \
    --seeds 0,1,2 --n 1000 --mmd --device "${DEVICE:-auto}"
fi
if [[ $what == calibrated-image64-gradient || $what == all ]]; then
  # the same grid with the gradient fit of the calibrated sampler (steps and model levels) started from the plain
  # levels, for the evidence rule of --stabilizer auto (benchmarks/select_auto.py) beside the derivative-free fit's
  # grid above; calibrated-image64-gradient-gits is the same from GITS's levels (the gradient fit's default start)
  TITLE="gmm:image64: the calibrated sampler fitted by gradients against vanilla solvers" \
    sharded calibrated-image64-gradient --model gmm:image64 --nfe 3,4,5,6,8,10 --schedules karras,logsnr --coords ve \
    --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --fit-method gradient --fit-params steps,model_sigmas \
    --fit-start plain --device "${DEVICE:-auto}"
fi
if [[ $what == calibrated-image64-gradient-sets ]]; then
  # the same grid with three parameter sets fitted per cell, the validation keeping the best that passes the guards
  TITLE="gmm:image64: the gradient fit of three parameter sets, the validation choosing" \
    sharded calibrated-image64-gradient-sets --model gmm:image64 --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --fit-method gradient \
    --fit-params steps,gamma/steps,model_sigmas/steps,history --fit-start plain --device "${DEVICE:-auto}"
fi
if [[ $what == calibrated-image64-gradient-gits ]]; then
  # the same grid with every fit starting from the levels GITS finds on the teacher's trajectories (also a candidate):
  # the gradient fit's default
  TITLE="gmm:image64: the gradient fit started from GITS's levels" \
    sharded calibrated-image64-gradient-gits --model gmm:image64 --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --fit-method gradient \
    --fit-params steps,model_sigmas --fit-start gits --device "${DEVICE:-auto}"
fi
if [[ $what == calibrated-image64-gradient-dfguards ]]; then
  # the same gradient fits judged under the derivative-free fit's guards, beside the grid above: what the gradient
  # fit's own guards (docs/guards.md) give up and remove
  TITLE="gmm:image64: the gradient fit under the derivative-free fit's guards" \
    sharded calibrated-image64-gradient-dfguards --model gmm:image64 --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --fit-method gradient \
    --fit-params steps,model_sigmas --fit-start plain --calibration-guards residual,distribution,significance \
    --device "${DEVICE:-auto}"
fi
if [[ $what == calibrated || $what == calibrated-image64-flow || $what == all ]]; then
  # the same mixture as a flow-matching model (gmm:image64-flow: its exact velocity behind FlowDenoiser, from
  # t = 1 - 1e-6), with the flow's own schedule beside karras and logsnr; heun_flow is FlowMatchHeun's Heun (EDM's
  # diverges from t ~ 1). Then diffusers' flow schedulers on the same model and noise (benchmarks/flow_peers.py).
  # About 100 + 60 + 50 minutes on 2 CPU cores shared with other jobs (load ~14).
  SOLVERS=euler,heun_flow,dpmpp_2m,unipc TITLE="gmm:image64-flow: the calibrated sampler on a flow-matching model" \
    sharded calibrated-image64-flow --model gmm:image64-flow --nfe 3,4,5,6,8,10 --schedules karras,logsnr,flow \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --device "${DEVICE:-auto}" \
    --calibration-seconds 600
  # the same model with UniPC's flow-sigma grid as its flow schedule (diffusers' best flow configuration's levels)
  SOLVERS=unipc,dpmpp_2m TITLE="gmm:image64-flow on UniPC's flow grid: the calibrated sampler" \
    sharded calibrated-image64-flow-unipc --model gmm:image64-flow-unipc --nfe 3,4,5,6,8,10 --schedules flow \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --device "${DEVICE:-auto}" \
    --calibration-seconds 600
  python benchmarks/flow_peers.py --bench $out/calibrated-image64-flow.json,$out/calibrated-image64-flow-unipc.json \
    --json-out $out/peers-image64-flow.json --markdown $out/peers-image64-flow.md --no-progress
fi
if [[ $what == flow-t1 || $what == all ]]; then
  # how t = 1 of a flow model is stood in for (t_max = 1 - delta): distance to diffusers' own flow schedulers on a
  # tiny SD3 transformer, and float32 exactness of every solver from sigma ~ 1/delta (about 2 minutes on 1 CPU thread)
  python benchmarks/flow_t1.py --json-out $out/flow-t1.json --markdown $out/flow-t1.md
fi
if [[ $what == calibrated || $what == calibrated-cost || $what == all ]]; then
  # the calibrated sampler's cost at sampling time, side by side with the plain solver (fitted before the timing)
  steindiff bench --model gmm:image64 --cost --solvers euler,dpmpp_2m --nfe 5,10 --stabilizers none,cal:trajectory \
    --repeats 7 --n 1000 --device cpu --no-progress --json-out $out/cost-calibrated-image64.json \
    --markdown $out/cost-calibrated-image64.md --title "Cost of the calibrated sampler on gmm:image64"
  # the same for the gradient fit, whose plans may also move the model's noise levels and add history terms
  steindiff bench --model gmm:image64 --cost --solvers euler,dpmpp_2m --nfe 5,10 --stabilizers none,cal:trajectory \
    --fit-method gradient --fit-params steps,model_sigmas,history --repeats 7 --n 1000 --device cpu --no-progress \
    --json-out $out/cost-calibrated-gradient-image64.json --markdown $out/cost-calibrated-gradient-image64.md \
    --title "Cost of the calibrated sampler fitted by gradients (steps, model levels, history) on gmm:image64"
fi
if [[ $what == calibrated || $what == calibrated-toy2d || $what == all ]]; then
  steindiff bench --model gmm:toy2d --solvers $SOLVERS --nfe 3,4,5,6,8,10 --schedules karras,logsnr \
    --coords ve --stabilizers none,cal:trajectory --seeds 0,1,2 --n 1000 --mmd --no-progress \
    --json-out $out/calibrated-toy2d.json --markdown $out/calibrated-toy2d.md --plots $out/plots/calibrated-toy2d \
    --title "gmm:toy2d: the calibrated sampler against vanilla solvers"
fi
if [[ $what == calibrated || $what == calibrated-digits || $what == calibrated-digits-eval || $what == all ]]; then
  # digits: the fitted calibrations are written where the shipped model's loader finds them
  # (steindiff/weights/digits/calibrations), so `--stabilizer auto` and the demo reuse them at no cost.
  # calibrated-digits fits them anew (about 3 minutes on one GPU, 69 minutes on 2 CPU cores);
  # calibrated-digits-eval evaluates the shipped ones (about 50 minutes on 2 shared CPU cores).
  # --calibration-seconds 600: the refinement ends on its solve budget (120 per cell), not on the clock, so a slow or
  # shared machine fits what a GPU fits. Seeds 3,4,5: the guards' rule was chosen looking at seeds 0 and 1.
  if [[ $what != calibrated-digits-eval ]]; then
    find steindiff/weights/digits/calibrations -name "*-nfe*.json" -delete  # fitted anew (defaults.json: their options)
  fi
  TITLE="digits U-Net: the calibrated sampler against vanilla solvers" sharded calibrated-digits \
    --model digits --nfe 3,4,5,6,8,10 --schedules karras,logsnr --coords ve --stabilizers none,cal:trajectory \
    --seeds 3,4,5 --n 400 --device "${DEVICE:-auto}" --calibration-dir steindiff/weights/digits/calibrations \
    --calibration-seconds 600
fi
if [[ $what == calibrated-digits-gradient ]]; then
  # the digits grid of calibrated-digits with the gradient fit's defaults (steps and model levels, from GITS's
  # levels), fitted into a temporary folder (the shipped calibrations are the derivative-free fit's): the evidence
  # rule of --stabilizer auto on digits (benchmarks/select_auto.py). About 60 minutes on 2 CPU cores.
  TITLE="digits U-Net: the calibrated sampler fitted by gradients against vanilla solvers" \
    sharded calibrated-digits-gradient --model digits --nfe 3,4,5,6,8,10 --schedules karras,logsnr --coords ve \
    --stabilizers none,cal:trajectory --seeds 3,4,5 --n 400 --fit-method gradient --device "${DEVICE:-auto}"
fi
if [[ $what == digits-flow || $what == digits-flow-eval || $what == all ]]; then
  # the shipped rectified-flow digits model (steindiff train --objective flow: the digits U-Net, its data and its 1947
  # iterations) beside the EDM one: plain euler and dpmpp_2m on the EDM grid's karras and logsnr levels and on the flow
  # model's own flow schedule, NFE 3-6; the calibrated sampler on the flow schedule (a calibration costs about 10
  # CPU-minutes per cell here), shipped in steindiff/weights/digits_flow/calibrations (fitted with the options of its
  # defaults.json); the fine solve; the comparison with the EDM model's grid (calibrated-digits, digits-fine).
  # digits-flow-eval: evaluates the shipped calibrations instead of refitting them
  [[ $what == digits-flow-eval ]] || find steindiff/weights/digits_flow/calibrations -name "*-nfe*.json" -delete
  tmp=$out/.shards-calibrated-digits-flow; rm -rf "$tmp"; mkdir -p "$tmp"
  common=(--model digits-flow --nfe 3,4,5,6 --coords ve --seeds 3,4,5 --n 400 --device "${DEVICE:-auto}" --no-progress)
  files=()
  for s in euler dpmpp_2m; do
    steindiff bench "${common[@]}" --solvers $s --schedules karras,logsnr --stabilizers none \
      --json-out "$tmp/$s-karras.json" > "$tmp/$s-karras.log" 2>&1 &
    steindiff bench "${common[@]}" --solvers $s --schedules flow --stabilizers none,cal:trajectory \
      --calibration-dir steindiff/weights/digits_flow/calibrations --calibration-seconds 600 \
      --json-out "$tmp/$s-flow.json" > "$tmp/$s-flow.log" 2>&1 &
    files+=("$tmp/$s-karras.json" "$tmp/$s-flow.json")
  done
  wait
  (IFS=,; steindiff bench --from "${files[*]}" --json-out $out/calibrated-digits-flow.json \
    --markdown $out/calibrated-digits-flow.md --plots $out/plots/calibrated-digits-flow \
    --title "digits-flow U-Net (rectified flow): plain and calibrated solvers")
  rm -rf "$tmp"
  steindiff bench --model digits-flow --solvers dpmpp_3m --nfe 100 --schedules karras --coords ve --stabilizers none \
    --seeds 3,4,5 --n 400 --no-progress --json-out $out/digits-flow-fine.json --markdown $out/digits-flow-fine.md \
    --title "digits-flow U-Net: the fine solve (100 dpmpp_3m steps) against the real-vs-real floor"
  python benchmarks/digits_flow_compare.py --edm $out/calibrated-digits.json --edm-fine $out/digits-fine.json \
    --flow $out/calibrated-digits-flow.json --flow-fine $out/digits-flow-fine.json \
    --json-out $out/digits-flow-vs-edm.json --markdown $out/digits-flow-vs-edm.md
fi
if [[ $what == digits-fine || $what == all ]]; then
  # the fine solve of the digits U-Net on the calibrated grid's evaluation seeds: the model's own
  # distribution, against which the grid's secondary metrics (precision, recall) can be read (4 min on 1 CPU thread)
  steindiff bench --model digits --solvers dpmpp_3m --nfe 100 --schedules karras --coords ve --stabilizers none \
    --seeds 3,4,5 --n 400 --no-progress --json-out $out/digits-fine.json --markdown $out/digits-fine.md \
    --title "digits U-Net: the fine solve (100 dpmpp_3m steps) against the real-vs-real floor"
fi
if [[ $what == patches ]]; then
  # the shipped 32x32 photo-patch U-Net (issue 13; weights from benchmarks/train_patches.sh): patch metrics against
  # held-out photo regions (primary: patch_fd); the calibrated sampler is fitted once per cell and shipped with the
  # model (steindiff/weights/patches/calibrations, where the demo finds them). About 8 minutes on one H200 (estimated),
  # 5 to 9 hours on 2 shared CPU cores (estimated from 4 cells).
  find steindiff/weights/patches/calibrations -name "*-nfe*.json" -delete
  SOLVERS=euler,dpmpp_2m,unipc,heun,ipndm \
    TITLE="patches U-Net (32x32 photo patches): the calibrated sampler against vanilla solvers" \
    sharded patches --model patches --nfe 3,4,5,6,8,10 --schedules karras,logsnr --coords ve \
    --stabilizers none,cal:trajectory --seeds 0,1 --n 500 --device "${DEVICE:-auto}" \
    --calibration-dir steindiff/weights/patches/calibrations
  # the fine solve: how close the model itself comes to the real-vs-real floor
  steindiff bench --model patches --solvers dpmpp_2m --nfe 50 --schedules karras --coords ve --stabilizers none \
    --seeds 0,1 --n 500 --device "${DEVICE:-auto}" --no-progress --json-out $out/patches-fine.json \
    --markdown $out/patches-fine.md \
    --title "patches U-Net: the fine solve (50 dpmpp_2m steps) against the real-vs-real floor"
fi
if [[ $what == patches-cpu ]]; then
  # the gradient-fit study on the patches U-Net, reduced to what one CPU thread affords (docs/calibrated-sampler-
  # gradient.md): dpmpp_2m/Karras at NFE 4, 5, 6, calibration on 128 samples, short fits, 2 seeds of 100 samples;
  # one run per NFE, then the gradient fits and LD3 at three times the budget, sharing the teacher and the fine
  # solves through the cache, then merged
  tmp=$out/.shards-patches-cpu; rm -rf "$tmp"; mkdir -p "$tmp"
  C=plain,derivative-free@n=128@solves=24,grad:steps+gamma@n=128@iters=20@batch=12
  C=$C,grad:steps+model_sigmas@n=128@iters=20@batch=12,grad:steps+history@n=128@iters=20@batch=12
  C=$C,peer:ld3@n=128@iters=50,peer:gits@n=128
  for k in 4 5 6; do
    python benchmarks/gradient_fit_study.py --models patches --solvers dpmpp_2m --schedules karras --nfe $k \
      --configs $C --seeds 3,4 --n 100 --threads 1 --log --no-progress --teacher-cache "$tmp/teachers" \
      --json-out "$tmp/nfe$k.json" --markdown "" > "$tmp/nfe$k.log" 2>&1
  done
  L=plain,grad:steps+gamma@n=128@iters=60@batch=12,grad:steps+history@n=128@iters=60@batch=12,peer:ld3@n=128@iters=150
  python benchmarks/gradient_fit_study.py --models patches --solvers dpmpp_2m --schedules karras --nfe 4,5,6 \
    --configs $L --seeds 3,4 --n 100 --threads 1 --log --no-progress --teacher-cache "$tmp/teachers" \
    --json-out "$tmp/long.json" --markdown "" > "$tmp/long.log" 2>&1
  G=plain,peer:gits@n=128,grad:steps+model_sigmas@n=128@iters=60@batch=12@start=gits
  G=$G,grad:steps+gamma@n=128@iters=60@batch=12@start=gits  # the gradient fit's default start, GITS's levels
  python benchmarks/gradient_fit_study.py --models patches --solvers dpmpp_2m --schedules karras --nfe 4,5,6 \
    --configs $G --seeds 3,4 --n 100 --threads 1 --log --no-progress --teacher-cache "$tmp/teachers" \
    --json-out "$tmp/gits.json" --markdown "" > "$tmp/gits.log" 2>&1
  python benchmarks/gradient_fit_study.py --merge "$tmp/nfe4.json" "$tmp/nfe5.json" "$tmp/nfe6.json" "$tmp/long.json" \
    "$tmp/gits.json" \
    --json-out $out/gradient-fit-study-patches.json --markdown $out/gradient-fit-study-patches.md > /dev/null
  rm -rf "$tmp"
fi
if [[ $what == diagnose || $what == all ]]; then
  steindiff diagnose --model gmm:image64 --solver dpmpp_2m --nfe 6 --n 256 --no-progress \
    --png $out/plots/diagnose-image64-dpmpp_2m-6.png --out $out/diagnose-image64-dpmpp_2m-6.json \
    > $out/diagnose-image64-dpmpp_2m-6.txt
fi
if [[ $what == engine || $what == all ]]; then
  python benchmarks/engine_overhead.py > $out/engine-overhead.txt
fi
