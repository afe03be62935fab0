"""Fixes of vLLM bugs that every user of the plugin meets, hivis or not.

Each one says whom it affects. They are on by default (they fix wrong behaviour, never change a
correct one); ``VLLM_HIVIS_DISABLE_FIXES=all`` (or a comma list of patch names) keeps stock vLLM's
behaviour byte for byte.
"""

from __future__ import annotations

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

