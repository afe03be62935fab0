"""HiViSProposer: vLLM's EAGLE proposer with the image hidden from the drafter (V1 model runner).

Used by the CPU build, and on GPUs with VLLM_USE_V2_MODEL_RUNNER=0. It replaces vLLM's
``EagleProposer`` class in the V1 runner (patches.py); for any drafter that is not a hivis drafter
it behaves exactly like ``EagleProposer`` (plus the upstream chunked-prefill fix below).

Per step, after vLLM has built the usual EAGLE inputs (ids shifted by one, positions, target
hidden states) for every scheduled target row, `set_inputs_first_pass` compacts them to the rows
the drafter may see (hide.py): dropped rows vanish, kept rows move to their drafter positions,
and a new attention metadata gives each request its compacted query range, its drafter sequence
length and KV slots at drafter positions in its own blocks. The rest of vLLM's propose() (forward,
sampling, the K-1 step loop, rejected-row handling) then runs unchanged in drafter space.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from vllm.v1.spec_decode.eagle import EagleProposer

from .config import is_hivis
from .hide import EMPTY_SPANS, StepPlan, as_spans, plan_step
from .metrics import PrefillCounters
from .trace import ProposalTracer


class HiViSProposer(EagleProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config, device, runner)
        self.runner = runner
        self.hivis = is_hivis(vllm_config)
        self.prefill_counters = PrefillCounters() if self.hivis else None
        self.tracer = ProposalTracer()
        if self.hivis:
            assert not self.uses_mrope, "hivis drafters use 1-D RoPE (LLaVA-style targets)"
            assert not self.needs_extra_input_slots, "parallel drafting is not supported with hivis"

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        if self.hivis and self.tracer.enabled:
            self.model.register_forward_hook(lambda _m, _i, out: self.tracer.output(out[0]))

    def propose(self, *args, **kwargs) -> torch.Tensor:
        if not self.hivis:
            return super().propose(*args, **kwargs)
        self.model.begin_proposal()
        draft_token_ids = super().propose(*args, **kwargs)
        self.tracer.end(draft_token_ids)
        return draft_token_ids

    # -- the image hiding -------------------------------------------------------------------
    def _plan(self, cad) -> StepPlan:
        """Plan this step from the runner's CPU state: window starts, row counts, image spans."""
        batch, requests = self.runner.input_batch, self.runner.requests
        B = cad.num_reqs
        req_ids = list(batch.req_ids[:B])  # fewer than B only for padded (empty) rows
        n = len(req_ids)
        num_computed = np.zeros(B, dtype=np.int64)
        num_computed[:n] = batch.num_computed_tokens_cpu[:n]
        prompt_lens = np.zeros(B, dtype=np.int64)
        spans = [EMPTY_SPANS] * B
        for i, r in enumerate(req_ids):
            st = requests[r]
            prompt_lens[i] = st.num_prompt_tokens
            if st.mm_features:  # every multimodal placeholder span is hidden (never token ids)
                spans[i] = as_spans((f.mm_position.offset, f.mm_position.length) for f in st.mm_features)
        qsl = cad.query_start_loc_cpu[: B + 1].numpy().astype(np.int64)
        plan = plan_step(num_computed, qsl, spans, prompt_lens)
        ends = num_computed + np.diff(qsl)
        for i, r in enumerate(req_ids):
            if plan.target_prompt_rows[i]:
                self.prefill_counters.add(r, int(plan.drafter_prompt_rows[i]), int(plan.target_prompt_rows[i]),
                                          prompt_done=bool(ends[i] >= prompt_lens[i]))
        return plan

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, cad, num_rejected_tokens_gpu):
        num_tokens, tis, cad = super().set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        if not self.hivis:
            return num_tokens, tis, cad
        plan = self._plan(cad)
        if not plan.identity:
            num_tokens, tis, cad = self._compact(plan, tis, cad)
        if self.tracer.enabled:
            M = num_tokens
            self.tracer.begin(list(self.runner.input_batch.req_ids[: cad.num_reqs]), plan.req_of_row,
                              self.positions[:M].cpu().numpy() + plan.offset, self.positions[:M],
                              self.input_ids[:M], self.hidden_states[:M], plan.dummy[plan.req_of_row])
        return num_tokens, tis, cad

    def _compact(self, plan: StepPlan, tis: torch.Tensor, cad):
        dev = self.input_ids.device
        M = len(plan.keep_idx)
        keep = torch.from_numpy(plan.keep_idx).to(dev, non_blocking=True)
        offset = torch.from_numpy(plan.offset).to(dev, non_blocking=True)
        # Gather into the persistent buffers (right-hand sides are materialised first).
        self.input_ids[:M] = self.input_ids[keep]
        self.hidden_states[:M] = self.hidden_states[keep]
        self.positions[:M] = self.positions[keep] - offset.to(self.positions.dtype)
        positions = self.positions[:M].long()
        # KV slots at drafter positions, in the request's own blocks (c <= p: always owned).
        req = torch.from_numpy(plan.req_of_row).to(dev, non_blocking=True)
        B = self.block_size
        blocks = cad.block_table_tensor[req, positions // B].long()
        slots = (blocks * B + positions % B).to(cad.slot_mapping.dtype)
        qsl_cpu = torch.from_numpy(plan.query_start_loc)
        qsl = qsl_cpu.to(dev, non_blocking=True)
        shift_cpu = torch.from_numpy(plan.seq_shift)
        shift = shift_cpu.to(dev, non_blocking=True)
        # The sample row of each request moves back by the rows dropped up to and including it.
        new_tis = tis - (cad.query_start_loc[1:] - qsl[1:]).to(tis.dtype)
        ub = cad.seq_lens_cpu_upper_bound
        new_ub = None if ub is None else (ub[: len(shift_cpu)] - shift_cpu.to(ub.dtype))
        new_cad = dataclasses.replace(
            cad,
            query_start_loc=qsl,
            query_start_loc_cpu=qsl_cpu,
            seq_lens=cad.seq_lens - shift.to(cad.seq_lens.dtype),
            seq_lens_cpu_upper_bound=new_ub,
            num_actual_tokens=M,
            max_query_len=int(np.diff(plan.query_start_loc).max()),
            max_seq_len=int(new_ub.max()) if new_ub is not None else cad.max_seq_len,
            slot_mapping=slots,
            positions=None,
            _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None,
        )
        return M, new_tis, new_cad

    # -- upstream fix ----------------------------------------------------------------------
    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask):
        """vLLM 0.32's version with one fix (copied from llm_base_proposer.py,
        `SpecDecodeBaseProposer.prepare_next_token_ids_padded`).

        For a discarded request (a partial prefill), the drafter's next token must be the token
        right after the chunk, at ``num_computed + num_scheduled``; upstream takes the *last prompt
        token* (``num_tokens_no_spec - 1``) and so writes one wrong drafter KV row at every chunk
        boundary (acceptance loss, never wrong output). The CPU variant
        ``prepare_next_token_ids_cpu`` already does it right. Not yet reported upstream.
        """
        from vllm.v1.spec_decode import llm_base_proposer as lbp

        num_reqs = gpu_input_batch.num_reqs
        seq_lens = self.runner.optimistic_seq_lens_cpu[:num_reqs].numpy()
        for i in range(num_reqs):
            req = requests[gpu_input_batch.req_ids[i]]
            n_no_spec = int(gpu_input_batch.num_tokens_no_spec[i])
            idx = int(seq_lens[i]) if int(seq_lens[i]) < n_no_spec else n_no_spec - 1
            self.backup_next_token_ids.np[i] = req.get_token_id(idx)
        self.backup_next_token_ids.copy_to_gpu(num_reqs)
        backup_tokens_gpu = self.backup_next_token_ids.gpu

        batch_size, num_tokens = sampled_token_ids.shape
        assert discard_request_mask.dtype == torch.bool
        assert backup_tokens_gpu.dtype == torch.int32
        next_token_ids = torch.empty(batch_size, dtype=torch.int32, device=sampled_token_ids.device)
        valid_sampled_tokens_count = next_token_ids.new_empty(batch_size)
        lbp._eagle_prepare_next_token_padded(
            sampled_token_ids, discard_request_mask, backup_tokens_gpu, next_token_ids,
            valid_sampled_tokens_count, gpu_input_batch.vocab_size, num_tokens, batch_size,
            sampled_token_ids.stride(0), BLOCK_SIZE_TOKENS=lbp.next_power_of_2(num_tokens))
        return next_token_ids, valid_sampled_tokens_count
