# The two commands of the README: `make demo` (main job) and `make test` (the whole suite).
# Both bootstrap .venv/ (pinned CPU vLLM stack + this package) on first use.
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast
setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m hivis_testbed demo

# Lint (ruff), then every test: kernels (Triton; interpreter without a GPU), unit, V2 fakes,
# vLLM end to end, slow statistical ones; GPU tests skip without a GPU. scripts/test.sh.
test: setup
	bash scripts/test.sh all

# Lint, kernels, unit and V2 tests only (no vLLM engine; about a minute).
test-fast: setup
	bash scripts/test.sh fast
