"""HiViSSpeculator: hivis drafting on vLLM 0.32's V2 model runner (the default GPU runner).

NOT YET EXECUTED ON A GPU. The pure functions below are tested on the CPU (tests/v2/
test_speculator_v2.py); the glue class has only run against CPU fakes of vLLM's V2 pieces,
because the V2 runner needs Triton and CUDA.

Design (same drop rule and drafter KV layout as the V1 proposer, see hide.py and proposer.py).
V2's ``TargetDependentARSpeculator.propose`` (v1/worker/gpu/spec_decode/target_dependent_ar/
speculator.py:165-364) runs: ``prepare_prefill_inputs`` (Triton, L226: ids shifted by one in
*target* rows, ``last_token_indices = qs + q - num_rejected - 1``, draft seq_lens copied from
``input_batch.seq_lens``), copy of the target hidden states (L246), the draft prefill ``_prefill``
(L285, eager) or a FULL-graph replay of it (L280), then ``prepare_decode_inputs`` with
``input_batch.seq_lens`` (L307) and the draft decode loop on ``self.input_buffers``.
HiViSSpeculator keeps that method and changes three things around it:
1. ``propose`` plans the step on the CPU (method/plan.py plan_step: no GPU sync) and hands ``super()`` a copy
   of the InputBatch whose ``seq_lens`` / ``seq_lens_cpu_upper_bound`` are the drafter's
   (target - seq_shift). Draft prefill and decode seq lens are then in drafter space.
2. ``_prefill`` (called after the shift and the hidden-state copy) compacts the buffers to the kept
   rows, moves them to drafter positions, writes the compacted query_start_loc and
   ``last_token_indices = new_qsl[r+1] - 1 - num_rejected[r]``, recomputes slots through V2's
   ``BlockTables.compute_slot_mappings`` (the drafter's attention ignores them: it writes and
   reads at target slots itself, from the dropped ranges ``propose`` publishes; see
   serving/draft_attention.py) and rebuilds the
   attention metadata with ``_build_attn_metadata``, then runs the parent's ``_prefill`` eagerly.
   Compacting *after* the shift is what makes a kept row p read x_{p+1} even when row p+1 is dropped.
3. ``init_cudagraph_manager`` gives the draft prefill a NONE-mode graph manager, so no FULL prefill
   graph (captured on the target's metadata) is ever captured or replayed. The decode loop and its
   FULL graphs are unchanged: they read ``self.input_buffers``, which now hold drafter values, and
   the drafter keeps its draft step on the device (serving/drafter.py), so a replayed graph drafts
   with the right step-bias residual.
Dummy/profile runs go straight to ``super()``. Positions are taken from the target batch, not the
draft buffer: V2 leaves the draft positions of rejected rows stale (speculator.py:726-730).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import numpy as np
import torch

from ..method.plan import (
    StepPlan,
    drafter_seq_lens,
    last_token_indices,
    plan_step,
    record_prefill,
    request_spans,
    write_limits,
)
from .config import is_hivis
from .draft_attention import DropRanges, max_spans
from .metrics import PrefillCounters
from .trace import ProposalTracer

logger = logging.getLogger("vllm_hivis.speculator_v2")

# -- the V2 contract on top of method/plan.py (numpy, no vLLM) -----------------------------------


def plan_v2_prefill(num_computed: np.ndarray, query_start_loc: np.ndarray, spans: list[np.ndarray],
                    prompt_lens: np.ndarray | None = None, num_draft_tokens: np.ndarray | None = None) -> StepPlan:
    """method/plan.py plan_step over a V2 batch, plus the contract V2's last-token convention needs.

    num_computed:     [B] ``input_batch.num_computed_tokens_np`` (window starts; an upper bound for
                      async decode rows, which lie after every image, where the plan does not
                      depend on it)
    query_start_loc:  [>= B + 1] ``input_batch.query_start_loc_np`` (may carry padded requests)
    num_draft_tokens: [B] or None, ``input_batch.num_draft_tokens_per_req``: num_rejected <= drafts.
    Returned plan, in drafter space: keep_idx [M] target rows kept, offset [M] (position shift),
    query_start_loc [B + 1], seq_shift [B] (target seq_len - drafter seq_len), dummy [B].
    """
    B = len(num_computed)
    qsl = np.asarray(query_start_loc[: B + 1], dtype=np.int64)
    assert qsl.shape == (B + 1,) and len(spans) == B and (np.diff(qsl) >= 0).all()
    plan = plan_step(np.asarray(num_computed, dtype=np.int64), qsl, spans, prompt_lens)
    if num_draft_tokens is not None:
        for r in np.nonzero(np.asarray(num_draft_tokens))[0]:
            # new_qsl[r+1] - 1 - n must be target row qsl[r+1] - 1 - n for every n <= drafts:
            # the window's last drafts + 1 rows must all be kept (true after the last image).
            n, lo, hi = int(num_draft_tokens[r]) + 1, plan.query_start_loc[r], plan.query_start_loc[r + 1]
            tail = plan.keep_idx[max(hi - n, lo):hi]
            assert not plan.dummy[r] and np.array_equal(tail, np.arange(qsl[r + 1] - n, qsl[r + 1])), (
                f"request {r} verifies drafts over a window with dropped rows")
    return plan


# -- glue (needs vLLM's V2 runner: GPU + Triton) -----------------------------------------------


@dataclasses.dataclass
class _Step:
    """What ``_prefill`` needs from ``propose`` (one proposal)."""

    plan: StepPlan
    req_ids: list[str]
    num_tokens: int  # target rows N (unpadded)
    keep: torch.Tensor  # [M] int64, device: kept target rows
    offset: torch.Tensor  # [M] int64, device: target position - drafter position
    query_start_loc: torch.Tensor  # [B + 1] int32, device: compacted
    seq_lens_ub: torch.Tensor  # [B_pad] int32, CPU: drafter seq lens upper bound
    num_rejected: torch.Tensor  # [B] int32, device
    target_positions: torch.Tensor  # [N_pad] int64, device: input_batch.positions


class HiViSSpeculatorMixin:
    """The hivis overrides; ``speculator_class()`` puts them in front of vLLM's EagleSpeculator."""

    def __init__(self, vllm_config, device: torch.device, req_states=None):
        super().__init__(vllm_config, device)
        self.req_states = req_states  # V2 RequestState (prompt lengths for the counters)
        self.prefill_counters = PrefillCounters.for_engine(vllm_config)
        self.drops = DropRanges(vllm_config.scheduler_config.max_num_seqs, max_spans(vllm_config), device)
        self.tracer = ProposalTracer()
        self._hivis_step: _Step | None = None
        self.failures = 0  # proposals that raised and fell back (see _fallback_drafts)
        # Rejected at startup (serving/config.py: unknown key / M-RoPE / parallel layout); invariants here.
        assert not self.speculative_config.enable_adaptive_verification
        assert not vllm_config.model_config.uses_mrope

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.model.share_target_norm(target_model)
        assert not self.supports_mm_inputs  # HiViSDrafterForCausalLM declares no multimodal embeddings
        if self.tracer.enabled:
            self.model.register_forward_hook(lambda _m, _i, out: self.tracer.output(out[0]))

    def init_cudagraph_manager(self, cudagraph_mode) -> None:
        from vllm.config.compilation import CUDAGraphMode
        from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.cudagraph_utils import SpeculatorCudaGraphManager

        super().init_cudagraph_manager(cudagraph_mode)
        # No FULL prefill graph: it would replay the target's metadata (speculator.py:277-280).
        self.prefill_cudagraph_manager = SpeculatorCudaGraphManager(
            self.vllm_config, self.device, CUDAGraphMode.NONE, self.num_speculative_steps + 1)

    @torch.inference_mode()
    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states,
                num_sampled, num_rejected, last_sampled, next_prefill_tokens, temperature, seeds,
                dp_sync_state=None, dummy_run=False, skip_attn_for_dummy_run=False, mm_inputs=None,
                is_profile=False, num_speculative_tokens=None) -> torch.Tensor:
        # last_hidden_states: [N_pad, H]; num_sampled, num_rejected: [B]; last_sampled,
        # temperature, seeds: [max_num_reqs]; next_prefill_tokens: [lookahead, max_num_reqs];
        # aux_hidden_states: n x [N_pad, H] for a multi-layer drafter (else None)
        self.model.begin_proposal()
        args = dict(attn_metadata=attn_metadata, slot_mappings=slot_mappings, last_hidden_states=last_hidden_states,
                    aux_hidden_states=aux_hidden_states, num_sampled=num_sampled, num_rejected=num_rejected,
                    last_sampled=last_sampled, next_prefill_tokens=next_prefill_tokens, temperature=temperature,
                    seeds=seeds, dp_sync_state=dp_sync_state, dummy_run=dummy_run,
                    skip_attn_for_dummy_run=skip_attn_for_dummy_run, mm_inputs=mm_inputs, is_profile=is_profile,
                    num_speculative_tokens=num_speculative_tokens)
        B = input_batch.num_reqs
        if dummy_run or is_profile or B == 0:
            return super().propose(input_batch=input_batch, **self._combined(args))
        assert self.pcp_manager is None and mm_inputs is None  # startup rejects context parallelism
        # Everything from here on - the feature combine, the plan, the drafting - is protected: a
        # fault costs one step's acceptance, never an answer or the engine (as on V1).
        try:
            args = self._combined(args)
            batch = self._begin_step(input_batch, B, num_rejected)
            draft_token_ids = super().propose(input_batch=batch, **args)
        except Exception:
            return self._fallback_drafts(B)
        finally:
            self._hivis_step = None
        self.tracer.end(draft_token_ids)
        return draft_token_ids

    def _combined(self, args: dict) -> dict:
        """The parent's arguments with a multi-layer drafter's auxiliary target layers (n x [N, H])
        combined into its feature ([N, H]); vLLM's EagleSpeculator does that for "eagle3" only."""
        if args["aux_hidden_states"]:
            args = dict(args, last_hidden_states=self.model.combine_hidden_states(
                torch.cat(args["aux_hidden_states"], dim=-1)), aux_hidden_states=None)
        return args

    def _begin_step(self, input_batch, B: int, num_rejected: torch.Tensor):
        """Plan this step's drafter rows, publish the drop ranges, and return the batch the parent
        drafts from (drafter sequence lengths); `_prefill` reads the step from `_hivis_step`."""
        req_ids = list(input_batch.req_ids[:B])
        mm = self.model_state.encoder_cache.mm_features  # a hivis target is multimodal: never silently absent
        prompt_lens = (self.req_states.prompt_len.np[input_batch.idx_mapping_np[:B]] if self.req_states is not None
                       else input_batch.prefill_len_np[:B])
        num_computed, qsl = input_batch.num_computed_tokens_np[:B], input_batch.query_start_loc_np
        spans = [request_spans(mm.get(r)) for r in req_ids]
        plan = plan_v2_prefill(num_computed, qsl, spans, prompt_lens, input_batch.num_draft_tokens_per_req)
        record_prefill(self.prefill_counters, req_ids, plan, num_computed, qsl, prompt_lens)
        limit = write_limits(num_computed, qsl, self.num_speculative_steps)
        self.drops.publish(plan.drop_lo, plan.drop_hi, limit)  # for the drafter's attention
        to_dev = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        self._hivis_step = _Step(
            plan=plan, req_ids=req_ids, num_tokens=input_batch.num_tokens, keep=to_dev(plan.keep_idx),
            offset=to_dev(plan.offset), query_start_loc=to_dev(plan.query_start_loc),
            seq_lens_ub=drafter_seq_lens(input_batch.seq_lens_cpu_upper_bound, plan.seq_shift),
            num_rejected=num_rejected[:B], target_positions=input_batch.positions)
        assert (self._hivis_step.seq_lens_ub[:B] >= 1).all(), "every request keeps >= 1 drafter row"
        return dataclasses.replace(input_batch, seq_lens=drafter_seq_lens(input_batch.seq_lens, plan.seq_shift),
                                   seq_lens_cpu_upper_bound=self._hivis_step.seq_lens_ub)

    def _fallback_drafts(self, num_reqs: int) -> torch.Tensor:
        """Drafts for a step whose drafting failed: token 0 in the parent's own persistent draft
        buffer ([num_reqs, K]; what its propose returns). The target verifies them, so the step
        stays exact at no-spec speed; the next step drafts from the spans and verified rows again."""
        self.failures += 1
        if self.failures <= 3 or self.failures % 1000 == 0:
            logger.exception("hivis (V2): drafting failed (failure %d); this step falls back to no speculation",
                             self.failures)
        self.draft_tokens[:num_reqs].fill_(0)
        return self.draft_tokens[:num_reqs]

    def _prefill(self, num_reqs: int, num_tokens: int, attn_metadata, slot_mappings, *args, **kwargs) -> None:
        if self._hivis_step is None:  # dummy / profile runs and graph capture
            return super()._prefill(num_reqs, num_tokens, attn_metadata, slot_mappings, *args, **kwargs)
        from vllm.config.compilation import CUDAGraphMode

        # 0.32: (..., num_tokens_across_dp, cudagraph_runtime_mode, mm_inputs); 0.33 adds skip_sample
        # (True on steps whose drafts nobody uses: the drafter KV is still written).
        call = inspect.signature(super()._prefill).bind(num_reqs, num_tokens, attn_metadata, slot_mappings,
                                                        *args, **kwargs).arguments
        mode = call.get("cudagraph_runtime_mode", CUDAGraphMode.NONE)
        assert mode == CUDAGraphMode.NONE, f"hivis draft prefill must run eagerly, got {mode}"
        M, attn, slots_by_layer = self._compact_prefill(num_reqs)
        extra = {"skip_sample": call["skip_sample"]} if "skip_sample" in call else {}
        return super()._prefill(num_reqs, M, attn, slots_by_layer, num_tokens_across_dp=None,
                                cudagraph_runtime_mode=CUDAGraphMode.NONE, mm_inputs=None, **extra)

    def _compact_prefill(self, num_reqs: int):
        """Target rows -> drafter rows in the draft buffers; returns (M, attn metadata, slots by layer)."""
        from vllm.config.compilation import CUDAGraphMode
        from vllm.v1.worker.gpu.attn_utils import build_slot_mappings_by_layer
        from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

        st, B, ib = self._hivis_step, num_reqs, self.input_buffers
        M = len(st.plan.keep_idx)
        assert len(st.plan.query_start_loc) == B + 1 and 0 < M <= st.num_tokens
        if M != st.num_tokens:  # rows dropped: gather kept rows to the front (RHS materialised first)
            ib.input_ids[:M] = ib.input_ids[st.keep]
            self.hidden_states[:M] = self.hidden_states[st.keep]
        ib.positions[:M] = st.target_positions[st.keep] - st.offset
        ib.query_start_loc[: B + 1] = st.query_start_loc
        ib.query_start_loc[B + 1:] = M  # padding, as prepare_prefill_inputs pads (speculator.py:740-743)
        self.last_token_indices[:B] = last_token_indices(st.query_start_loc, st.num_rejected)
        slots = self.block_tables.compute_slot_mappings(self.idx_mapping[:B], ib.query_start_loc[: B + 1],
                                                        ib.positions, M)  # [num_kv_groups, M]
        attn = self._build_attn_metadata(
            num_reqs=B, batch_desc=BatchExecutionDescriptor(cg_mode=CUDAGraphMode.NONE, num_tokens=M, num_reqs=None),
            query_start_loc_np=st.plan.query_start_loc, seq_lens_cpu_upper_bound=st.seq_lens_ub, step=0,
            slot_mappings=slots)
        if self.tracer.enabled:
            pos, p = ib.positions[:M], st.plan
            self.tracer.begin(st.req_ids, p.req_of_row, pos.cpu().numpy() + p.offset, pos, ib.input_ids[:M],
                              self.hidden_states[:M], p.dummy[p.req_of_row])
        return M, attn, build_slot_mappings_by_layer(slots, self.kv_cache_config)


@functools.cache
def speculator_class() -> type:
    """HiViSSpeculator(HiViSSpeculatorMixin, EagleSpeculator), built on first use (imports V2)."""
    from vllm.v1.worker.gpu.spec_decode.eagle.speculator import EagleSpeculator

    doc = "vLLM's V2 EagleSpeculator with the image hidden from the drafter (see the module docstring)."
    return type("HiViSSpeculator", (HiViSSpeculatorMixin, EagleSpeculator), {"__module__": __name__, "__doc__": doc})


def __getattr__(name: str):
    if name == "HiViSSpeculator":  # `from vllm_hivis.serving.speculator_v2 import HiViSSpeculator` imports V2 only then
        return speculator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_init_speculator(orig):
    """Wrap ``vllm.v1.worker.gpu.spec_decode.init_speculator``: hivis configs get HiViSSpeculator."""

    @functools.wraps(orig)
    def init_speculator(vllm_config, device, req_states):
        if is_hivis(vllm_config):
            return speculator_class()(vllm_config, device, req_states)
        return orig(vllm_config, device, req_states)

    return init_speculator
