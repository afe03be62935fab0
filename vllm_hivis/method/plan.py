"""Drafter-space arithmetic: how one serving step's target rows become the drafter's rows.

Shared by the V1 proposer (serving/proposer.py) and the V2 speculator (serving/speculator_v2.py);
vLLM-free (numpy on the host, torch for the few device-side index computations). The drop rule
itself is hide.py. Vocabulary:

- window: the rows of one request scheduled in this step, target positions s .. s + q - 1
  (s = tokens computed before the step); a prefill chunk, or a decode step verifying drafts.
- drafter space: the request's kept rows only, at drafter positions 0, 1, 2, ... Its KV cache
  entries live at those positions inside the request's own blocks ("compressed in place").
- seq_shift: target seq_len - drafter seq_len at the end of the window (the rows dropped so far).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .hide import EMPTY_SPANS, as_spans, dropped_before, is_dropped


def request_spans(mm_features) -> np.ndarray:
    """[S, 2] image spans of one request from vLLM's multimodal features (objects with
    ``.mm_position.offset/.length``; V1 ``CachedRequestState.mm_features``, V2
    ``encoder_cache.mm_features[req_id]``). Every placeholder span is hidden, never token ids."""
    if not mm_features:
        return EMPTY_SPANS
    return as_spans((f.mm_position.offset, f.mm_position.length) for f in mm_features)


@dataclasses.dataclass
class StepPlan:
    """How one scheduler step's target rows map onto the drafter's compressed sequence."""

    keep_idx: np.ndarray  # [M] int64: batch rows the drafter runs on (dummy rows included)
    offset: np.ndarray  # [M] int64: target position - drafter position of each kept row
    req_of_row: np.ndarray  # [M] int64: request index of each kept row
    query_start_loc: np.ndarray  # [B + 1] int32: compacted row ranges per request
    seq_shift: np.ndarray  # [B] int64: target seq_len - drafter seq_len at the end of the window
    dummy: np.ndarray  # [B] bool: window held no kept row; one placeholder row keeps the batch shape
    drafter_prompt_rows: np.ndarray  # [B] int64: kept (non-dummy) rows that are prompt rows (p < prompt_len)
    target_prompt_rows: np.ndarray  # [B] int64: target rows that are prompt rows
    identity: bool  # nothing dropped and no offsets: the batch passes through unchanged


def plan_step(num_computed: np.ndarray, query_start_loc: np.ndarray, spans: list[np.ndarray],
              prompt_lens: np.ndarray | None = None) -> StepPlan:
    """Plan one drafter pass over a batch.

    num_computed:    [B] tokens of each request computed before this step (window start s)
    query_start_loc: [B + 1] rows of each request in the batch (window = s .. s + q - 1)
    spans:           B arrays [S_i, 2] of image spans (offset, length) in target positions
    prompt_lens:     [B] prompt lengths (only for the prefill counters)

    A window with no kept row (a prefill chunk wholly inside an image) keeps its last row as a
    dummy at the next free drafter position; the draft of a partial prefill is discarded and the
    dummy's KV is overwritten by the next real row, so it never changes what the drafter reads.

    E.g., request a: prompt [BOS t1 i i i t2 t3] (image span (2, 3)), prefilled in one window;
    request b: a decode step after the same kind of prompt, verifying 2 drafts at positions 7..9.
    Row p is dropped iff token p+1 is an image placeholder: a drops rows 1, 2, 3.
        num_computed    = [0, 7]              query_start_loc = [0, 7, 10]
        batch rows        a0 a1 a2 a3 a4 a5 a6 | b0 b1 b2     (a_i: target position i; b_j: 7 + j)
        keep_idx        = [0, 4, 5, 6, 7, 8, 9]               (batch rows; a1..a3 vanish)
        offset          = [0, 3, 3, 3, 3, 3, 3]               drafter position = target - offset:
                          a: [0, 1, 2, 3], b: [4, 5, 6]       (contiguous text-only sequences)
        req_of_row      = [0, 0, 0, 0, 1, 1, 1]
        query_start_loc = [0, 4, 7]
        seq_shift       = [3, 3]              target seq_len - drafter seq_len: 7 -> 4, 10 -> 7
    """
    B = len(num_computed)
    assert query_start_loc.shape == (B + 1,) and len(spans) == B
    keep, offs, reqs = [], [], []
    qsl = np.zeros(B + 1, dtype=np.int32)
    shift = np.zeros(B, dtype=np.int64)
    dummy = np.zeros(B, dtype=bool)
    d_rows = np.zeros(B, dtype=np.int64)
    t_rows = np.zeros(B, dtype=np.int64)
    identity = True
    for i in range(B):
        s, lo, hi = int(num_computed[i]), int(query_start_loc[i]), int(query_start_loc[i + 1])
        q = hi - lo
        sp = spans[i]
        p = s + np.arange(q, dtype=np.int64)
        plen = None if prompt_lens is None else int(prompt_lens[i])
        if plen is not None:
            t_rows[i] = int((p < plen).sum())
        if q == 0:
            qsl[i + 1] = qsl[i]
            continue
        if len(sp) == 0 or s >= int((sp[:, 0] + sp[:, 1]).max()):
            # Fast path: the window lies after every image (or there is none): keep all rows,
            # shifted by the constant number of rows dropped before them.
            d_total = int(dropped_before(sp, np.array([s]))[0]) if len(sp) else 0
            rows = np.arange(lo, hi, dtype=np.int64)
            off = np.full(q, d_total, dtype=np.int64)
            kept_p = p
        else:
            drop = is_dropped(sp, p)
            kept_p = p[~drop]
            rows = lo + np.nonzero(~drop)[0].astype(np.int64)
            off = dropped_before(sp, kept_p)
            if len(rows) == 0:
                end = np.array([s + q], dtype=np.int64)
                c_dummy = int(end[0] - dropped_before(sp, end)[0])
                rows = np.array([hi - 1], dtype=np.int64)
                off = np.array([int(p[-1]) - c_dummy], dtype=np.int64)
                dummy[i] = True
        if plen is not None and not dummy[i]:
            d_rows[i] = int((kept_p < plen).sum())
        identity &= len(rows) == q and not off.any()
        keep.append(rows)
        offs.append(off)
        reqs.append(np.full(len(rows), i, dtype=np.int64))
        qsl[i + 1] = qsl[i] + len(rows)
        c_last = s + int(rows[-1] - lo) - int(off[-1])  # drafter position of the last kept row
        shift[i] = (s + q) - (c_last + 1)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    return StepPlan(keep_idx=cat(keep), offset=cat(offs), req_of_row=cat(reqs), query_start_loc=qsl,
                    seq_shift=shift, dummy=dummy, drafter_prompt_rows=d_rows, target_prompt_rows=t_rows,
                    identity=bool(identity))


def record_prefill(counters, req_ids: list[str], plan: StepPlan, num_computed: np.ndarray,
                   query_start_loc: np.ndarray, prompt_lens: np.ndarray) -> None:
    """Add this step's drafter / target prompt rows to `counters` (a serving.metrics.PrefillCounters)."""
    B = len(req_ids)
    ends = np.asarray(num_computed[:B], dtype=np.int64) + np.diff(np.asarray(query_start_loc[: B + 1]))
    for i in np.flatnonzero(plan.target_prompt_rows[:B]):
        counters.add(req_ids[i], int(plan.drafter_prompt_rows[i]), int(plan.target_prompt_rows[i]),
                     prompt_done=bool(ends[i] >= prompt_lens[i]))


def drafter_slots(
    block_table: torch.Tensor,  # [R, max_blocks] the KV group's block table
    req_of_row: torch.Tensor,  # [M] request index of each drafter row
    positions: torch.Tensor,  # [M] drafter positions
    block_size: int,
) -> torch.Tensor:  # [M] int64 KV slots
    """KV slot of drafter position c of request r: ``block_table[r, c // B] * B + c % B``. The
    drafter position never exceeds the target position (c <= p), so the block is always one the
    request owns. What V2's ``BlockTables.compute_slot_mappings`` computes for one KV group
    without context parallelism.

    E.g., block_size 4, request 0 owns blocks [7, 2], positions [0, 3, 4, 5] -> slots [28, 31, 8, 9].
    """
    positions = positions.long()
    blocks = block_table[req_of_row, positions // block_size].long()
    return blocks * block_size + positions % block_size


def compacted_sample_rows(
    token_indices_to_sample: torch.Tensor,  # [B] batch row each request samples its draft from
    query_start_loc: torch.Tensor,  # [B + 1] target rows per request
    drafter_query_start_loc: torch.Tensor,  # [B + 1] drafter rows per request (StepPlan.query_start_loc)
) -> torch.Tensor:  # [B]
    """The sample row of each request after compaction: it moves back by the rows dropped up to
    and including its request (decode rows, where rejections happen, are never dropped, so the
    row's distance to the end of its window is unchanged).

    E.g., the plan_step example: samples at rows [6, 9], query_start_loc [0, 7, 10] -> drafter
    [0, 4, 7]: [6 - (7 - 4), 9 - (10 - 7)] = [3, 6].
    """
    dropped = (query_start_loc[1:] - drafter_query_start_loc[1:]).to(token_indices_to_sample.dtype)
    return token_indices_to_sample - dropped


def last_token_indices(
    drafter_query_start_loc: torch.Tensor,  # [B + 1] drafter rows per request
    num_rejected: torch.Tensor,  # [B] rejected drafts of each request
) -> torch.Tensor:  # [B] int64
    """V2's convention (target_dependent_ar/speculator.py:703-722): the last accepted row of each
    request, in drafter rows. E.g., drafter query_start_loc [0, 4, 7], num_rejected [0, 1] -> [3, 5]."""
    return drafter_query_start_loc[1:].long() - 1 - num_rejected.long()


def drafter_seq_lens(
    seq_lens: torch.Tensor,  # [B_pad] target seq lens (device, or the host upper bound)
    seq_shift: np.ndarray,  # [B] StepPlan.seq_shift
) -> torch.Tensor:  # [B_pad], padded entries unchanged
    """Drafter seq lens: target seq lens minus the rows dropped so far. Exact under async
    scheduling too: for decode rows the shift is a constant (every image lies behind them)."""
    out = seq_lens.clone()
    B = len(seq_shift)
    out[:B] -= torch.from_numpy(np.asarray(seq_shift)).to(device=out.device, dtype=out.dtype)
    return out
