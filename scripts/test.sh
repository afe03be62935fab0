#!/usr/bin/env bash
# The README's test command (`make test`; `make test-fast` passes "fast"): lint, then the test rooms.
#   tests/kernels   Triton kernels against their torch references, in a process of their own: on a
#                   machine without a CUDA GPU under the Triton interpreter (TRITON_INTERPRET=1, set
#                   for this run only), compiled on a GPU
#   everything else unit, V2 fakes, contract (vLLM internals, read from the sources of every supported
#                   release: the installed 0.32.0 and the 0.33.0 GPU wheel's, fetched into .cache/),
#                   vLLM end to end (e2e), slow statistical ones, GPU (skip without one)
# "fast" leaves out the e2e and slow tests. pytest's "no tests collected" (exit 5) fails like any error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mode=${1:-all}
echo "[test] ruff"
$PY -m ruff check .
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  interpret=0
else
  interpret=1
fi
echo "[test] kernels (TRITON_INTERPRET=$interpret)"
TRITON_INTERPRET=$interpret $PY -m pytest tests/kernels -q
echo "[test] vLLM 0.33.0 sources (contract tests)"
if src=$(bash scripts/vllm_sources.sh 0.33.0); then
  export HIVIS_VLLM_SOURCES="0.33.0=$PWD/$src"
elif [ "${CI:-}" = true ]; then
  echo "[test] could not fetch vLLM 0.33.0's wheel: CI needs it for the contract tests" >&2
  exit 1
else
  echo "[test] no vLLM 0.33.0 sources (offline?): its contract tests will skip"
fi
select=()
[ "$mode" = fast ] && select=(-m "not e2e and not slow")
echo "[test] unit, v2, contract, e2e, gpu ($mode)"
$PY -m pytest --ignore=tests/kernels "${select[@]}" --durations=15
