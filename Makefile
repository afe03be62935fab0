# The two commands of the README: `make demo` (main job) and `make test` (the whole suite).
# Both bootstrap .venv/ (pinned CPU vLLM stack + this package) on first use.
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast
setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m vllm_hivis.cli demo

# Every test: unit, kernel (Triton interpreter), vLLM end-to-end, slow statistical ones; GPU tests
# skip without a GPU. pytest's "no tests collected" (exit 5) fails like any other error.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -m "e2e or gpu or slow or not (e2e or gpu or slow)" --durations=15

# Unit + kernel tests only (seconds).
test-fast: setup
	TRITON_INTERPRET=1 $(PY) -m pytest
