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


MEDIA_WAIT_S = 5.0
_media_lock = __import__("threading").Lock()


def defer_media_miss(engine, request, err, fail, wait_s: float = MEDIA_WAIT_S) -> None:
    """Park `request` (its media missing from the engine's cache); `fail(request, err)` runs after
    `wait_s` unless retry_media_waits has taken it by then."""
    import threading

    entry = [request, err]
    with _media_lock:
        engine.__dict__.setdefault("_hivis_waiting", []).append(entry)

    def expire():
        with _media_lock:
            waiting = engine.__dict__.get("_hivis_waiting", [])
            if not any(e is entry for e in waiting):
                return  # retried successfully meanwhile
            waiting[:] = [e for e in waiting if e is not entry]
        fail(request, err)

    timer = threading.Timer(wait_s, expire)
    timer.daemon = True
    timer.start()


def retry_media_waits(engine, preprocess, miss_error, add_type) -> None:
    """Retry every parked request with `preprocess`; the ones that now succeed go to the engine's
    input queue (as its input thread would put them), the ones still missing media stay parked."""
    waiting = engine.__dict__.get("_hivis_waiting")
    if not waiting:
        return
    with _media_lock:
        retry, waiting[:] = list(waiting), []
    for entry in retry:
        try:
            engine.input_queue.put_nowait((add_type, preprocess(entry[0])))
        except miss_error:
            with _media_lock:
                waiting.append(entry)  # still missing: wait on (its timer runs)
        except Exception:
            engine._handle_request_preproc_error(entry[0])


@patch("vllm.v1.engine.core", reason="upstream", targets={
    "EngineCore.preprocess_add_request": "self, request",
    "EngineCoreProc._handle_mm_cache_miss": "self, request, err"})
def media_cache_misses_wait_for_their_data() -> None:
    """WHAT: a request whose images the engine's multimodal processor cache (P1) lacks waits, up to
    MEDIA_WAIT_S, for the request that carries their data instead of failing at once; the engine's
    input thread retries it right after each later request it preprocesses.
    WHY: the frontend's cache (P0) sends an image's data with the first request that renders it
    and only its hash with later ones; with concurrent requests for the same new image a later
    request can reach the engine before the first one (rendering runs in a thread pool), and the
    engine then fails it with HTTP 500 ("Multi-modal cache miss ... P0/P1 cache drift") although
    the data is one message away. Seen once in 4845 requests of this repo's soak (64 concurrent
    clients, 16 distinct images). A request whose data never comes fails after the wait, as before.
    AFFECTS: every vLLM server user of multimodal models with concurrent requests for the same
    new media (processor cache on, the default).
    UPSTREAM: not reported yet."""
    from vllm.multimodal.cache import MultiModalCacheMissError
    from vllm.v1.engine import EngineCoreRequestType
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    def make_handle(orig):
        def _handle_mm_cache_miss(self, request, err):
            defer_media_miss(self, request, err, lambda r, e: orig(self, r, e))

        return _handle_mm_cache_miss

    def make_preprocess(orig):
        def preprocess_add_request(self, request):
            result = orig(self, request)  # a miss raises here and reaches _handle_mm_cache_miss
            # this request may have carried the media that parked requests wait for
            retry_media_waits(self, lambda r: orig(self, r), MultiModalCacheMissError, EngineCoreRequestType.ADD)
            return result

        return preprocess_add_request

    name = "media_cache_misses_wait_for_their_data"
    wrap(EngineCoreProc, "_handle_mm_cache_miss", make_handle, patch=name)
    wrap(EngineCore, "preprocess_add_request", make_preprocess, patch=name)
