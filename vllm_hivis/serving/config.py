"""The hivis part of ``--speculative-config``: accept, validate, explain.

Users write ``{"method": "hivis", "model": "<drafter dir>", "num_speculative_tokens": 5}``.
vLLM's ``SpeculativeConfig.method`` is a closed Literal, so the plugin maps ``hivis`` onto vLLM's
EAGLE machinery (drafter KV cache, lookahead slots, metrics, rejection sampling all keep working)
and recognises a hivis run everywhere by the drafter's architecture, which travels with the
config into every engine and worker process. Every rejected config names what was wrong and
what is expected, at startup, before any engine process starts.
"""

from __future__ import annotations

import logging
import os

from ..method.checkpoint import ARCHITECTURE, DrafterFormatError, DrafterSpec, read_spec, tokenizer_fingerprint

logger = logging.getLogger("vllm_hivis.serving.config")

METHOD = "hivis"
MAX_SPEC_TOKENS = 32
# SpeculativeConfig fields a user may set together with method "hivis".
ALLOWED_KEYS = frozenset({
    "method", "model", "num_speculative_tokens", "enforce_eager", "max_model_len", "revision",
    "code_revision", "quantization", "kv_cache_dtype", "disable_padded_drafter_batch",
    "draft_tensor_parallel_size", "tensor_parallel_size", "rejection_sample_method", "draft_sample_method",
    "disable_eagle_block_drop", "draft_load_config", "num_speculative_tokens_per_batch_size",
})
UNSUPPORTED = {
    "parallel_drafting": "hivis drafts autoregressively; parallel drafting is not supported",
    "use_heterogeneous_vocab": "a hivis drafter shares the target's vocabulary (embedding and LM head)",
    "attention_backend": "the hivis drafter always runs its own attention backend (serving/draft_attention.py: "
                         "it keeps drafter KV at the target's slots); the target's backend is chosen as usual",
}
# KV cache dtypes the drafter's attention reads and writes (no fp8 scales: it stores the model dtype).
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")


class HiViSConfigError(ValueError):
    """An invalid hivis speculative config (the message says what is expected)."""


def is_hivis(vllm_config) -> bool:
    """True in any process when the speculative config runs a hivis drafter."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method != "eagle" or spec.draft_model_config is None:
        return False
    archs = getattr(spec.draft_model_config, "architectures", None) or []
    return any(ARCHITECTURE in a for a in archs)


def feature_layers(vllm_config) -> list[int] | None:
    """A hivis drafter's multi-layer target features (method/checkpoint.py), None: last layer only.
    vLLM's runners collect them as auxiliary hidden states (its EAGLE-3 machinery), told which by
    the drafter config's ``eagle_aux_hidden_state_layer_ids``, equal to this list."""
    if not is_hivis(vllm_config):
        return None
    hf = vllm_config.speculative_config.draft_model_config.hf_config
    return (getattr(hf, "hivis", None) or {}).get("feature_layers") or None


def check_user_dict(sc: dict) -> DrafterSpec:
    """Validate a user's hivis speculative-config dict on its own (no target needed)."""
    unknown = sorted(set(sc) - ALLOWED_KEYS - set(UNSUPPORTED))
    if unknown:
        raise HiViSConfigError(f"unknown key(s) {unknown} in the hivis speculative config; allowed keys: "
                               f"{sorted(ALLOWED_KEYS)}")
    for key, why in UNSUPPORTED.items():
        if sc.get(key):
            raise HiViSConfigError(f"speculative config key {key!r} cannot be used with method 'hivis': {why}")
    kv = sc.get("kv_cache_dtype")
    if kv is not None and kv not in KV_CACHE_DTYPES:
        raise HiViSConfigError(f"kv_cache_dtype {kv!r} is not supported for a hivis drafter; expected one of "
                               f"{list(KV_CACHE_DTYPES)} (its attention stores KV in the model dtype, no fp8 scales)")
    drafter = sc.get("model")
    if not drafter:
        raise HiViSConfigError("method 'hivis' needs 'model': the path of a hivis drafter directory "
                               "(e.g. `hivis-testbed assets` prints the shipped tiny drafter)")
    k = sc.get("num_speculative_tokens")
    if k is None:
        raise HiViSConfigError("method 'hivis' needs 'num_speculative_tokens' (draft length per step, 1.."
                               f"{MAX_SPEC_TOKENS}; 3-5 is typical)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPEC_TOKENS:
        raise HiViSConfigError(f"num_speculative_tokens must be an integer in 1..{MAX_SPEC_TOKENS}, got {k!r}")
    try:
        return read_spec(drafter)
    except DrafterFormatError as e:
        raise HiViSConfigError(str(e)) from None


def check_against_target(spec: DrafterSpec, sc: dict, target_model_config, target_parallel_config=None,
                         engine_kv_cache_dtype: str | None = None) -> None:
    """The drafter must fit the target and the engine layout: a multimodal model (M-RoPE targets on
    the V1 runner only: the V2 speculator takes 1-D positions), the same hidden size and vocab, no
    data / context parallelism (what hivis's plan does not cover), and a KV cache dtype its
    attention can hold (the engine's ``--kv-cache-dtype`` applies to the drafter's cache too unless
    the speculative config sets its own)."""
    drafter, name = sc["model"], target_model_config.model
    kv = engine_kv_cache_dtype if sc.get("kv_cache_dtype") is None else None  # its own: check_user_dict
    if kv is not None and kv not in KV_CACHE_DTYPES:
        raise HiViSConfigError(f"--kv-cache-dtype {kv} would give the hivis drafter an fp8 KV cache, which its "
                               "attention does not support; keep the target's fp8 cache and set the drafter's "
                               f"own: --speculative-config '{{..., \"kv_cache_dtype\": \"auto\"}}' (one of "
                               f"{list(KV_CACHE_DTYPES)})")
    if not target_model_config.is_multimodal_model:
        raise HiViSConfigError(f"target {name!r} is not a multimodal model; hivis hides image tokens from the "
                               "drafter of a vision-language model (use method 'eagle' for text-only models)")
    if getattr(target_model_config, "uses_mrope", False) and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") != "0":
        raise HiViSConfigError(f"target {name!r} uses M-RoPE (multimodal rotary positions, e.g. Qwen2.5-VL); hivis "
                               "serves M-RoPE targets on vLLM's V1 runner only: unset VLLM_USE_V2_MODEL_RUNNER")
    H = target_model_config.get_hidden_size()
    V = target_model_config.get_vocab_size()
    if spec.hidden_size != H:
        raise HiViSConfigError(f"drafter {drafter!r} has hidden size {spec.hidden_size} but target {name!r} has "
                               f"{H}; a hivis drafter fuses the target's hidden states and must match it")
    if spec.vocab_size != V:
        raise HiViSConfigError(f"drafter {drafter!r} has vocab size {spec.vocab_size} but target {name!r} has {V}; "
                               "the drafter shares the target's embedding and LM head")
    if spec.feature_layers:
        n = target_model_config.get_total_num_hidden_layers()
        if spec.num_target_layers != n:
            raise HiViSConfigError(f"drafter {drafter!r} fuses target layers {spec.feature_layers} of a "
                                   f"{spec.num_target_layers}-layer target, but target {name!r} has {n} decoder "
                                   "layers; train a drafter for this target")
        cls = target_class(target_model_config)
        if cls is not None and not _supports_aux_layers(cls):
            raise HiViSConfigError(f"drafter {drafter!r} fuses target layers {spec.feature_layers}, but vLLM's "
                                   f"{cls.__name__} cannot return a target's intermediate layers (it does not "
                                   "implement SupportsEagle3); serve this target with a last-layer hivis drafter "
                                   "(`vllm-hivis train` without --feature-layers)")
    tok_dir = getattr(target_model_config, "tokenizer", None) or name
    if spec.tokenizer is not None and tok_dir and os.path.isdir(tok_dir):  # a hub name: not checked (no download)
        got = tokenizer_fingerprint(tok_dir)
        if got is not None and got != spec.tokenizer:
            raise HiViSConfigError(f"drafter {drafter!r} was trained for a target whose tokenizer differs from "
                                   f"{tok_dir!r}'s (fingerprint {spec.tokenizer} vs {got}); token ids would not "
                                   "mean the same words: train a drafter for this target")
    if target_parallel_config is not None:
        for field, what in (("data_parallel_size", "data parallelism"),
                            ("decode_context_parallel_size", "decode context parallelism"),
                            ("prefill_context_parallel_size", "prefill context parallelism")):
            n = getattr(target_parallel_config, field, 1) or 1
            if n > 1:
                raise HiViSConfigError(f"hivis does not support {what} yet ({field}={n}); use {field}=1 "
                                       "(tensor and pipeline parallelism are fine)")


def target_class(target_model_config):
    """The vLLM model class that will serve the target (None if it cannot be resolved here)."""
    try:
        from vllm.model_executor.models import ModelRegistry

        return ModelRegistry.resolve_model_cls(target_model_config.architectures, target_model_config)[0]
    except Exception:  # noqa: BLE001 - a check that cannot run leaves the decision to vLLM's own load
        return None


def _supports_aux_layers(cls) -> bool:
    from vllm.model_executor.models.interfaces import supports_eagle3

    return supports_eagle3(cls)


def requests_hivis(args) -> bool:
    """Do these EngineArgs ask for hivis (``--speculative-config`` or ``--spec-method``)?"""
    sc = args.speculative_config
    method = getattr(args, "spec_method", None) or (sc.get("method") if isinstance(sc, dict) else None)
    return method == METHOD


def rewrite_engine_args(args) -> DrafterSpec | None:
    """Map a hivis request onto vLLM's EAGLE path, in place; returns the drafter spec (None: not hivis).

    Runs in the process that builds the engine config (before any engine process starts).
    """
    if not requests_hivis(args):
        return None
    from ..patches import hivis_unavailable_reason

    reason = hivis_unavailable_reason()
    if reason:
        raise HiViSConfigError(reason)
    sc = args.speculative_config
    if sc is not None and not isinstance(sc, dict):
        raise HiViSConfigError(f"--speculative-config must be a JSON object, got {type(sc).__name__}")
    sc = dict(sc or {})
    sc = {k.replace("-", "_"): v for k, v in sc.items()}
    for flag, key in (("spec_method", "method"), ("spec_model", "model"), ("spec_tokens", "num_speculative_tokens")):
        if getattr(args, flag, None) is not None:
            sc[key] = getattr(args, flag)
            setattr(args, flag, None)
    spec = check_user_dict(sc)
    sc["method"] = "eagle"  # the drafter architecture tells every process it is hivis
    args.speculative_config = sc
    # Prefix caching stays vLLM's default (on): the drafter's KV lives at its rows' target slots,
    # a function of the shared prefix only (serving/draft_attention.py), so shared blocks are safe.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") == "0":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the validated path (CPU build, and GPUs)
    else:
        logger.warning("hivis: VLLM_USE_V2_MODEL_RUNNER=%s selects the experimental V2 speculator, which has "
                       "not been run on a GPU yet (vllm_hivis/serving/speculator_v2.py); unset it for the V1 runner",
                       os.environ["VLLM_USE_V2_MODEL_RUNNER"])
    logger.info("hivis: drafter %s, %d speculative tokens (served through vLLM's EAGLE path)",
                sc["model"], sc["num_speculative_tokens"])
    return spec
