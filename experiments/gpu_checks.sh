#!/usr/bin/env bash
# One-shot GPU checks for a lent device machine (see README "Measured"): installs the few
# pure-Python wheels it lacks from .whl/, then (1) the pre-training throughput benchmark at the
# ACDC config's scale, (2) the ACDC FCL-vs-random experiment on a packed ACDC copy (.acdc_pack,
# made by experiments/pack_acdc.py; never committed). Outputs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/out}
mkdir -p $OUT; (nvidia-smi --query-gpu=name,memory.total --format=csv || echo no-gpu) | tee $OUT/gpu.txt
python3 -c "import torch, lightning, monai; print(torch.__version__, lightning.__version__, monai.__version__)" | tee -a $OUT/gpu.txt
# issue 13's levers one by one at the ACDC config's scale (10 clients x 20 volumes, 128 px): the
# default (reused Trainers, module resident on the GPU), without reuse, the paper setting with
# on-device volumes and augmentation (its rounds per minute), and bf16-mixed on top of that
BENCH="python3 experiments/bench_pretrain.py --profile acdc --rounds ${BENCH_ROUNDS:-2} --device cuda"
for v in "default:" "no-reuse:--no-reuse-trainers" "augmented:--augment-on device --volumes-on device" \
         "bf16:--augment-on device --volumes-on device --precision bf16-mixed"; do
  name=${v%%:*}; timeout ${BENCH_TIMEOUT:-150} $BENCH ${v#*:} --json $OUT/bench_$name.json 2>&1 \
    | grep -v Warning | tee $OUT/bench_$name.log | grep -E "ratio|overhead  |rounds per minute|slices/s |paper run"
done
timeout ${EXP_TIMEOUT:-330} python3 experiments/run_tables.py --profile acdc-disjoint --root .acdc_pack \
    --out $OUT/acdc --pretrain-arg=--trainer.accelerator=${ACCEL:-gpu} --finetune-arg=--trainer.accelerator=${ACCEL:-gpu} \
    2>&1 | grep -vE "Warning|warn" | tee $OUT/acdc.log | tail -30
cp $OUT/acdc/results.md $OUT/acdc/results.csv $OUT/ 2>/dev/null
cp $OUT/acdc/pretrain/fcl/logs/version_0/metrics.csv $OUT/pretrain_metrics.csv 2>/dev/null
rm -rf $OUT/acdc
