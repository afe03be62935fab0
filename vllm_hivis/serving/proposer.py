"""HiViSProposer: vLLM's EAGLE proposer with the image hidden from the drafter (V1 model runner).

Used by the CPU build, and on GPUs with VLLM_USE_V2_MODEL_RUNNER=0. The V1 runner of a hivis
config builds it where it would build ``EagleProposer`` (patches/hivis.py, build_hivis_proposer);
runs without hivis never see it.

Per step, after vLLM has built the usual EAGLE inputs (ids shifted by one, positions, target
hidden states) for every scheduled target row, `set_inputs_first_pass` compacts them to the rows
the drafter may see (hide.py): dropped rows vanish, kept rows move to their drafter positions,
and a new attention metadata gives each request its compacted query range and drafter sequence
length; each request's dropped target ranges go to the drafter's attention backend
(serving/draft_attention.py), which keeps every drafter KV row at its target slot. The rest of
vLLM's propose() (forward, sampling, the K-1 step loop, rejected-row handling) then runs
unchanged in drafter space. The index arithmetic is method/plan.py's, shared with the V2
speculator.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from vllm.v1.spec_decode.eagle import EagleProposer

from ..method.plan import (
    SteadyBatch,
    StepPlan,
    compacted_sample_rows,
    drafter_seq_lens,
    dropped_ranges,
    plan_decode,
    plan_step,
    record_prefill,
    request_spans,
    stack_ranges,
    steady_batch,
    write_limits,
)
from .config import is_hivis
from .draft_attention import DropRanges, max_spans
from .metrics import PrefillCounters
from .trace import ProposalTracer

logger = logging.getLogger("vllm_hivis.proposer")


class HiViSProposer(EagleProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config, device, runner)
        assert is_hivis(vllm_config), "built for hivis configs only (patches/hivis.py)"
        # Rejected at startup (serving/config.py); invariants from here on. The drafter is 1-D
        # (checkpoint.py drops M-RoPE from its config); an M-RoPE target is fine (see _compact).
        assert not self.uses_mrope and not self.needs_extra_input_slots
        self.runner = runner
        self.prefill_counters = PrefillCounters.for_engine(vllm_config)
        self.tracer = ProposalTracer()
        self.failures = 0  # proposals that raised and fell back (see _fallback_drafts)
        self.last_plan: StepPlan | None = None  # this step's plan (faults tests, debugging)
        self._span_cache: dict[str, tuple] = {}  # req_id -> (request state, image spans, their dropped ranges)
        self._steady: SteadyBatch | None = None  # the last full plan's batch (plan.py plan_decode)
        self._shift_tensors: dict = {}  # (device, dtype) -> (SteadyBatch.shift, it as a tensor)
        self._no_spans = (request_spans(None), dropped_ranges([request_spans(None)]))  # padded batch rows
        self.drops = DropRanges(vllm_config.scheduler_config.max_num_seqs, max_spans(vllm_config), device)

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.model.share_target_norm(target_model)
        if self.tracer.enabled:
            self.model.register_forward_hook(lambda _m, _i, out: self.tracer.output(out[0]))

    def propose(self, *args, **kwargs) -> torch.Tensor:
        assert not args, "vLLM's runner passes the proposer's inputs by keyword"
        self.model.begin_proposal()
        try:
            if self.model.combines_layers:  # [N, n*H] auxiliary target layers -> [N, H] (drafter.py)
                kwargs["target_hidden_states"] = self.model.combine_hidden_states(kwargs["target_hidden_states"])
            draft_token_ids = super().propose(**kwargs)
        except Exception:  # a drafter fault must cost acceptance, never an answer or the engine
            return self._fallback_drafts(kwargs)
        self.tracer.end(draft_token_ids)
        return draft_token_ids

    def _fallback_drafts(self, kwargs) -> torch.Tensor:
        """Drafts for a step whose drafting failed: token 0 everywhere ([B, K] int64). The target
        verifies every draft, so the step is still exact (no-spec speed: nothing is accepted unless
        the target agrees); the next step drafts normally (the drafter's state is rebuilt from the
        spans and the verified rows every step)."""
        self.failures += 1
        if self.failures <= 3 or self.failures % 1000 == 0:
            logger.exception("hivis: drafting failed (failure %d); this step falls back to no speculation",
                             self.failures)
        B = kwargs["common_attn_metadata"].batch_size()
        return torch.zeros(B, kwargs["num_speculative_tokens"], dtype=torch.int64, device=self.input_ids.device)

    # -- the image hiding -------------------------------------------------------------------
    def _plan(self, cad) -> StepPlan:
        """Plan this step from the runner's CPU state: window starts, row counts, image spans."""
        batch, requests = self.runner.input_batch, self.runner.requests
        B = cad.num_reqs
        req_ids = tuple(batch.req_ids[:B])  # fewer than B only for padded (empty) rows
        n = len(req_ids)
        qsl = cad.query_start_loc_cpu[: B + 1].numpy()
        # steady decoding (the same requests in the same rows, all past their prompts and images):
        # plan_decode's few ops, and only the write limits change for the drafter's attention
        states = tuple(map(requests.get, req_ids))  # request identity (a client may reuse an id)
        steady = self._steady
        if steady is not None and n == B and steady.key == states:
            plan = plan_decode(batch.num_computed_tokens_cpu[:B], qsl, steady)
            if plan is not None:
                self.drops.publish_limits(write_limits(batch.num_computed_tokens_cpu[:B], qsl,
                                                       self.num_speculative_tokens))
                self.last_plan = plan
                return plan
        self._steady = None  # (until this plan is published)
        num_computed = np.zeros(B, dtype=np.int64)
        num_computed[:n] = batch.num_computed_tokens_cpu[:n]
        prompt_lens = np.zeros(B, dtype=np.int64)
        prompt_lens[:n] = batch.num_prompt_tokens[:n]
        cached = [self._spans(r, requests) for r in req_ids] + [self._no_spans] * (B - n)
        qsl = qsl.astype(np.int64)
        ranges = stack_ranges([c[1] for c in cached])
        plan = plan_step(num_computed, qsl, [c[0] for c in cached], prompt_lens, ranges=ranges)
        record_prefill(self.prefill_counters, list(req_ids), plan, num_computed, qsl, prompt_lens)
        # for the drafter's attention: each request's dropped rows, and how far it may write (its
        # window end plus the draft steps' lookahead slots)
        self.drops.publish(plan.drop_lo, plan.drop_hi, write_limits(num_computed, qsl, self.num_speculative_tokens),
                           req_ids if n == B else None)
        self._steady = steady_batch(states, ranges, prompt_lens) if n == B else None
        self.last_plan = plan
        return plan

    def _spans(self, req_id: str, requests) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """A request's image spans and their dropped ranges (plan.py ``dropped_ranges``), computed
        once per request (they are a property of its prompt; a reused request id is a new request
        state, hence new spans)."""
        state = requests[req_id]
        c = self._span_cache.get(req_id)
        if c is None or c[0] is not state:
            if len(self._span_cache) > 2 * len(requests) + 64:  # forget finished requests
                self._span_cache = {r: v for r, v in self._span_cache.items() if r in requests}
            sp = request_spans(state.mm_features)
            c = self._span_cache[req_id] = (state, sp, dropped_ranges([sp]))
        return c[1:]

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, cad, num_rejected_tokens_gpu):
        num_tokens, tis, cad = super().set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample, cad=cad,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
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
        """Target rows -> drafter rows, in place in the persistent input buffers; returns
        (number of drafter rows, their sample rows, the drafter's attention metadata).

        E.g., plan_step's example (method/plan.py): buffers rows [a0..a6, b0, b1, b2] become
        [a0, a4, a5, a6, b0, b1, b2] at positions [0, 1, 2, 3, 4, 5, 6]; query_start_loc
        [0, 7, 10] -> [0, 4, 7]; seq_lens [7, 10] -> [4, 7]; sample rows [6, 9] -> [3, 6]. The KV
        slots stay the rows' target slots (the drafter's attention translates positions itself,
        serving/draft_attention.py).
        """
        dev = self.input_ids.device
        M = len(plan.keep_idx)
        # Positions come from the plan (1-D sequence indices), never from the target's: an M-RoPE
        # target's (Qwen2.5-VL) are three rows that jump over images by their grid size, not their length.
        self.positions[:M].copy_(torch.from_numpy(plan.positions), non_blocking=True)
        ub = cad.seq_lens_cpu_upper_bound
        new_ub = None if ub is None else self._drafter_seq_lens(ub[: len(plan.seq_shift)], plan.seq_shift)
        changed = dict(seq_lens=self._drafter_seq_lens(cad.seq_lens, plan.seq_shift), seq_lens_cpu_upper_bound=new_ub,
                       max_seq_len=int(new_ub.max()) if new_ub is not None else cad.max_seq_len, positions=None,
                       num_actual_tokens=M, _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        if plan.keeps_all:  # no row dropped (decode): rows, query ranges and sample rows stay as they are
            return M, tis, dataclasses.replace(cad, **changed)
        keep = torch.from_numpy(plan.keep_idx).to(dev, non_blocking=True)
        # Gather into the persistent buffers (right-hand sides are materialised first).
        self.input_ids[:M] = self.input_ids[keep]
        self.hidden_states[:M] = self.hidden_states[keep]
        qsl_cpu = torch.from_numpy(plan.query_start_loc)
        qsl = qsl_cpu.to(dev, non_blocking=True)
        new_cad = dataclasses.replace(
            cad, query_start_loc=qsl, query_start_loc_cpu=qsl_cpu,
            max_query_len=int(np.diff(plan.query_start_loc).max()), slot_mapping=cad.slot_mapping[keep], **changed)
        return M, compacted_sample_rows(tis, cad.query_start_loc, qsl), new_cad

    def _drafter_seq_lens(self, seq_lens: torch.Tensor, shift: np.ndarray) -> torch.Tensor:
        """plan.py drafter_seq_lens (seq_lens: [B_pad], shift: [B]), in one op while the batch is
        steady: its shift (the same array every step) is kept as a tensor on seq_lens's device."""
        if len(shift) != seq_lens.shape[0] or self._steady is None or shift is not self._steady.shift:
            return drafter_seq_lens(seq_lens, shift)
        key = (seq_lens.device, seq_lens.dtype)
        t = self._shift_tensors.get(key)
        if t is None or t[0] is not shift:
            t = self._shift_tensors[key] = (shift, torch.from_numpy(shift).to(device=seq_lens.device,
                                                                              dtype=seq_lens.dtype))
        return seq_lens - t[1]
