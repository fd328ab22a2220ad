#!/usr/bin/env bash
# One-shot GPU checks for a lent device machine. Prepare here first (experiments/gpu_prepare.sh:
# .whl/ and .acdc_pack/), then one device call: bash experiments/gpu_checks.sh, carry .whl and
# .acdc_pack, a timeout that leaves room for a second call. Outputs go to $OUT.
#
# CHECKS selects, in order (default: plateau):
#   plateau   the plateau table's N=1 rows at 128 px on the GPU: acdc-plateau's protocol (5 clients,
#             one ACDC group each, 1 labelled and 14 unlabelled patients, 5 held out, the poly rate,
#             1,500 fine-tuning steps, held-out Dice every 250), fine-tuning seed 0: random init,
#             random init + BCP (configs/semi/bcp.yaml), then FCL + BCP (one pre-training). Cells
#             resume, so a second call on the warm machine goes on where the first stopped
#             (runs/gpu/ stays there); whatever finished is reported. The paper profile itself
#             (10 clients, 5-fold CV, 192 px, N=1-8) takes hours of GPU time; a session is lent 15
#             minutes, so this is the plateau protocol at the resolution a GPU makes cheap.
#   bench     the pre-training throughput benchmark's levers at the ACDC config's scale
#   disjoint  the acdc-disjoint FCL-vs-random table (128 px at 2 mm)
# PLATEAU_EXTRA: more run_tables arguments (e.g. a tiny budget to try the script on a CPU, with
# ACCEL=cpu PY=.venv/bin/python).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
ACCEL=${ACCEL:-gpu}
mkdir -p $OUT; (nvidia-smi --query-gpu=name,memory.total --format=csv || echo no-gpu) | tee $OUT/gpu.txt
$PY -c "import torch, lightning, monai; print(torch.__version__, lightning.__version__, monai.__version__)" | tee -a $OUT/gpu.txt
for check in ${CHECKS:-plateau}; do
  case $check in
  plateau)
    # 128 px at 1.75 mm: the CPU profile's field of view (64 px at 3.5 mm) at twice the resolution
    T="$PY experiments/run_tables.py --profile acdc-plateau --root .acdc_pack --out runs/gpu/plateau128 --ns 1 --seeds 0"
    A=""
    for a in --data.img_size=128 --data.spacing=1.75 --trainer.accelerator=$ACCEL; do
      A="$A --pretrain-arg=$a --finetune-arg=$a"
    done
    for methods in 'random,random+bcp' 'fcl+bcp'; do  # the recipe's gain first, pre-training's after
      timeout ${PLATEAU_TIMEOUT:-400} $T --methods "$methods" $A ${PLATEAU_EXTRA:-} 2>&1 \
        | grep -vE "Warning|warn" | tee -a $OUT/plateau128.log | grep -E "^\[cell|^round|wall time|error"
    done
    $T --methods 'random,random+bcp,fcl+bcp' $A ${PLATEAU_EXTRA:-} --report-only > $OUT/plateau128_report.log 2>&1
    # a publishable folder (publish_results.py $OUT/plateau128 docs/results/...): 5 files, 8 come back
    mkdir -p $OUT/plateau128
    cp runs/gpu/plateau128/{results.md,results.csv,provenance.json,curves_local.png,dice_vs_n_local.png} $OUT/plateau128/ 2>/dev/null
    tail -25 $OUT/plateau128/results.md 2>/dev/null || tail -5 $OUT/plateau128_report.log
    ;;
  bench)
    # issue 13's levers one by one at the ACDC config's scale (10 clients x 20 volumes, 128 px): the
    # default (reused Trainers, module resident on the GPU), without reuse, the paper setting with
    # on-device volumes and augmentation (its rounds per minute), and bf16-mixed on top of that
    BENCH="$PY experiments/bench_pretrain.py --profile acdc --rounds ${BENCH_ROUNDS:-2} --device cuda"
    for v in "default:" "no-reuse:--no-reuse-trainers" "augmented:--augment-on device --volumes-on device" \
             "bf16:--augment-on device --volumes-on device --precision bf16-mixed"; do
      name=${v%%:*}; timeout ${BENCH_TIMEOUT:-150} $BENCH ${v#*:} --json $OUT/bench_$name.json 2>&1 \
        | grep -v Warning | tee $OUT/bench_$name.log | grep -E "ratio|overhead  |rounds per minute|slices/s |paper run"
    done
    ;;
  disjoint)
    timeout ${EXP_TIMEOUT:-330} $PY experiments/run_tables.py --profile acdc-disjoint --root .acdc_pack \
        --out $OUT/acdc --pretrain-arg=--trainer.accelerator=$ACCEL --finetune-arg=--trainer.accelerator=$ACCEL \
        2>&1 | grep -vE "Warning|warn" | tee $OUT/acdc.log | tail -30
    cp $OUT/acdc/results.md $OUT/acdc/results.csv $OUT/ 2>/dev/null
    cp $OUT/acdc/pretrain/fcl/logs/version_0/metrics.csv $OUT/pretrain_metrics.csv 2>/dev/null
    rm -rf $OUT/acdc
    ;;
  *) echo "unknown check: $check (plateau, bench, disjoint)"; exit 2 ;;
  esac
done
