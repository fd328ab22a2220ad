#!/usr/bin/env bash
# Run here, on the CPU machine, when a session is lent a GPU and before its first device call
# (about two minutes, no device time): the pure-Python wheels the device image lacks (its python3
# has torch, lightning, torchmetrics, scipy, but not these) into .whl/, and ACDC packed for the
# trip (experiments/pack_acdc.py: preprocessed once, 8-bit, 128 px at 1.75 mm, the plateau check's
# grid; PACK_SIZE, PACK_SPACING for another) into .acdc_pack/ (about 26 MiB: the tree, the wheels and
# the pack must stay under the device's 64 MiB).
# Both are ignored (.git/info/exclude) and never committed; a device call carries them:
#   run(command="bash experiments/gpu_checks.sh", carry=[".whl", ".acdc_pack"])
#   experiments/gpu_prepare.sh /path/to/ACDC/training
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: experiments/gpu_prepare.sh /path/to/ACDC/training}
PY=${PY:-.venv/bin/python}
mkdir -p .git/info
for p in /.whl/ /.acdc_pack/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
for name in monai nibabel jsonargparse docstring_parser typeshed_client pytorch-metric-learning; do
  pkgs+=("$name==$(version "$name")")  # the versions this checkout is tested with
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
[ -d .acdc_pack ] || "$PY" experiments/pack_acdc.py --root "$ROOT" --out .acdc_pack \
  --size "${PACK_SIZE:-128}" --spacing "${PACK_SPACING:-1.75}"
du -sh .whl .acdc_pack
echo "the working tree that travels must stay under 64 MiB: tracked files $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes"
