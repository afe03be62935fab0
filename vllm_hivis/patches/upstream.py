"""Fixes of vLLM bugs that every user of the plugin meets, hivis or not.

Each one says whom it affects. They are on by default (they fix wrong behaviour, never change a
correct one); ``VLLM_HIVIS_DISABLE_FIXES=all`` (or a comma list of patch names) keeps stock vLLM's
behaviour byte for byte.
"""

from __future__ import annotations

import contextvars

from .helper import wrap
from .registry import patch


@patch("vllm.v1.spec_decode.llm_base_proposer", reason="upstream", targets={
    "SpecDecodeBaseProposer.__init__": "self, vllm_config, device, pass_hidden_states_to_model, runner=None",
    "SpecDecodeBaseProposer.prepare_next_token_ids_padded":
        "self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask"})
def eagle_backup_token_after_partial_prefill() -> None:
    """WHAT: ``SpecDecodeBaseProposer.prepare_next_token_ids_padded`` (llm_base_proposer.py:1049)
    gives a discarded request (a partial prefill) the token right after its chunk, at
    ``num_computed + num_scheduled``, as its drafter input; the proposer keeps its runner for that.
    WHY: upstream takes ``get_token_id(num_tokens_no_spec - 1)``, the *last prompt token*, so the
    drafter writes one wrong KV row at every chunk boundary that is never overwritten: acceptance
    loss (outputs stay exact). The unpadded variant ``prepare_next_token_ids_cpu`` (:1042) already
    does it right.
    AFFECTS: every V1-runner user of EAGLE, EAGLE3, MTP and draft-model speculative decoding with
    chunked prefill and the padded drafter batch (the default), e.g. CPU builds and GPUs with
    VLLM_USE_V2_MODEL_RUNNER=0; hivis included.
    UPSTREAM: not reported yet (SGLang fixed the same bug class in sgl-project/sglang#26800)."""
    import torch
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    def make_init(orig):
        def __init__(self, vllm_config, device, pass_hidden_states_to_model, runner=None):
            orig(self, vllm_config, device, pass_hidden_states_to_model, runner)
            self._hivis_runner = runner

        return __init__

    def make(orig):
        def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask):
            runner = getattr(self, "_hivis_runner", None)
            if runner is None or not hasattr(runner, "optimistic_seq_lens_cpu"):
                return orig(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask)
            next_token_ids, valid = orig(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask)
            # Upstream gave the discarded rows the wrong backup token: recompute those backups and
            # overwrite just those rows (host-side mask and lengths: no device sync).
            n = gpu_input_batch.num_reqs
            seq_lens = runner.optimistic_seq_lens_cpu[:n].numpy()
            discarded = runner.discard_request_mask.np[:n]
            if not discarded.any():
                return next_token_ids, valid
            for i in discarded.nonzero()[0]:
                req = requests[gpu_input_batch.req_ids[i]]
                self.backup_next_token_ids.np[i] = req.get_token_id(int(seq_lens[i]))
            self.backup_next_token_ids.copy_to_gpu(n)
            mask = discard_request_mask[:n]
            next_token_ids[:n] = torch.where(mask, self.backup_next_token_ids.gpu[:n], next_token_ids[:n])
            return next_token_ids, valid

        return prepare_next_token_ids_padded

    name = "eagle_backup_token_after_partial_prefill"
    wrap(SpecDecodeBaseProposer, "__init__", make_init, patch=name)
    wrap(SpecDecodeBaseProposer, "prepare_next_token_ids_padded", make, patch=name)


@patch("vllm.multimodal.media.connector", reason="upstream",
       targets={"MediaConnector._load_file_url": "self, url_spec, media_io"})
def local_file_urls_are_client_errors() -> None:
    """WHAT: a ``file://`` media URL on a server started without ``--allowed-local-media-path`` is
    refused as a client error (HTTP 400), not an internal one.
    WHY: ``MediaConnector._load_file_url`` (multimodal/media/connector.py:334) raises
    ``RuntimeError``, which the OpenAI server maps to HTTP 500 "InternalServerError" although the
    message is about the request ("Cannot load local files without `--allowed-local-media-path`").
    AFFECTS: every vLLM server user sending file:// media URLs (the refusal itself is unchanged).
    UPSTREAM: not reported yet."""
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.media.connector import MediaConnector

    def make(orig):
        def _load_file_url(self, url_spec, media_io):
            if self.allowed_local_media_path is None:
                raise VLLMValidationError("Cannot load local files: this server was started without "
                                          "`--allowed-local-media-path`, so file:// media URLs are refused; send "
                                          "the media as a data: URL (base64) or an http(s) URL", parameter="url")
            return orig(self, url_spec, media_io)

        return _load_file_url

    wrap(MediaConnector, "_load_file_url", make, patch="local_file_urls_are_client_errors")


_RENDERED: contextvars.ContextVar[list | None] = contextvars.ContextVar("hivis_rendered_inputs", default=None)


def _forget_media(cache, engine_inputs) -> None:
    """Drop every multimodal item of these inputs from the frontend's (P0) processor cache."""
    if cache is None:
        return
    for ei in engine_inputs or ():
        hashes = ei.get("mm_hashes") if isinstance(ei, dict) else None
        for item_hashes in (hashes or {}).values():
            for h in item_hashes or ():
                if h:
                    cache.invalidate(h)


@patch("vllm.entrypoints.openai.chat_completion.serving", reason="upstream", targets={
    "OpenAIServingChat.render_chat_request": "self, request",
    "OpenAIServingChat._create_chat_completion": "self, request, raw_request=None"})
def rejected_requests_leave_no_stale_media_cache() -> None:
    """WHAT: a chat request that fails after its images were processed (e.g. ``top_p: 2.0``: the
    sampling parameters are validated after rendering) drops those images from the frontend's
    multimodal processor cache, so the next request with the same image sends it again.
    WHY: rendering records each image in the frontend (P0) cache as "sent to the engine" and the
    next request with it sends only its hash; when the first request is rejected before reaching
    the engine core, the engine (P1) never got the data, so the next *valid* request with the same
    image fails with HTTP 500 ("Multi-modal cache miss ... P0/P1 cache drift"; only a retry heals).
    With or without speculative decoding.
    AFFECTS: every vLLM server user of multimodal models with the processor cache on (the default).
    UPSTREAM: not reported yet."""
    from vllm.entrypoints.openai.chat_completion.serving import ErrorResponse, OpenAIServingChat

    def make_render(orig):
        async def render_chat_request(self, request):
            result = await orig(self, request)
            rendered = _RENDERED.get()
            if rendered is not None and isinstance(result, tuple):
                rendered.extend(result[1])
            return result

        return render_chat_request

    def make_create(orig):
        async def _create_chat_completion(self, request, raw_request=None):
            token = _RENDERED.set([])
            ok = False
            try:
                result = await orig(self, request, raw_request)
                ok = not isinstance(result, ErrorResponse)
                return result
            finally:
                rendered = _RENDERED.get()
                _RENDERED.reset(token)
                if not ok and rendered:  # forgetting an item the engine did get only costs a resend
                    _forget_media(getattr(self.renderer, "mm_processor_cache", None), rendered)

        return _create_chat_completion

    name = "rejected_requests_leave_no_stale_media_cache"
    wrap(OpenAIServingChat, "render_chat_request", make_render, patch=name)
    wrap(OpenAIServingChat, "_create_chat_completion", make_create, patch=name)


ADD_REQUEST = ("self, request_id, prompt, params, arrival_time=None, lora_request=None, tokenization_kwargs=None, "
               "trace_headers=None, priority=0, data_parallel_rank=None, session_id=None, prompt_text=None, "
               "reasoning_ended=None, reasoning_parser_kwargs=None, kv_hints=None")


@patch("vllm.v1.engine.async_llm", reason="upstream", targets={"AsyncLLM.add_request": ADD_REQUEST})
def engine_rejections_leave_no_stale_media_cache() -> None:
    """WHAT: a request that ``AsyncLLM.add_request`` rejects (e.g. a prompt longer than
    ``max_model_len``, found while streaming) drops its rendered images from the frontend's
    multimodal processor cache, as rejected_requests_leave_no_stale_media_cache does for requests
    rejected before they reach it.
    WHY: the same P0/P1 drift: the rejected request never reached the engine core.
    AFFECTS: every vLLM server user of multimodal models with the processor cache on.
    UPSTREAM: not reported yet."""
    from vllm.v1.engine.async_llm import AsyncLLM

    def make(orig):
        async def add_request(self, request_id, prompt, params, *args, **kwargs):
            try:
                return await orig(self, request_id, prompt, params, *args, **kwargs)
            except Exception:
                _forget_media(getattr(self.renderer, "mm_processor_cache", None), [prompt])
                raise

        return add_request

    wrap(AsyncLLM, "add_request", make, patch="engine_rejections_leave_no_stale_media_cache")
