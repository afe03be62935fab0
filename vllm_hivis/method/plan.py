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

from .hide import EMPTY_SPANS, as_spans


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
    positions: np.ndarray  # [M] int64: drafter position of each kept row (target sequence index - offset)
    req_of_row: np.ndarray  # [M] int64: request index of each kept row
    query_start_loc: np.ndarray  # [B + 1] int32: compacted row ranges per request
    seq_shift: np.ndarray  # [B] int64: target seq_len - drafter seq_len at the end of the window
    dummy: np.ndarray  # [B] bool: window held no kept row; one placeholder row keeps the batch shape
    drafter_prompt_rows: np.ndarray  # [B] int64: kept (non-dummy) rows that are prompt rows (p < prompt_len)
    target_prompt_rows: np.ndarray  # [B] int64: target rows that are prompt rows
    identity: bool  # nothing dropped and no offsets: the batch passes through unchanged
    # [B, S] int64 each: request i drops target rows [lo, hi) of each span (dropped_ranges), for
    # the drafter's attention (serving/draft_attention.py DropRanges.publish)
    drop_lo: np.ndarray | None = None
    drop_hi: np.ndarray | None = None
    keeps_all: bool = False  # every row kept, in order (keep_idx == 0..M-1): only positions and lengths change


def plan_step(num_computed: np.ndarray, query_start_loc: np.ndarray, spans: list[np.ndarray],
              prompt_lens: np.ndarray | None = None,
              ranges: tuple[np.ndarray, np.ndarray] | None = None) -> StepPlan:
    """Plan one drafter pass over a batch.

    num_computed:    [B] tokens of each request computed before this step (window start s)
    query_start_loc: [B + 1] rows of each request in the batch (window = s .. s + q - 1)
    spans:           B arrays [S_i, 2] of image spans (offset, length) in target positions
    prompt_lens:     [B] prompt lengths (only for the prefill counters)
    ranges:          dropped_ranges(spans) if the caller has it (`stack_ranges` of cached rows)

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
        positions       = [0, 1, 2, 3, 4, 5, 6]               a: [0..3], b: [4..6] (text-only sequences)
        req_of_row      = [0, 0, 0, 0, 1, 1, 1]
        query_start_loc = [0, 4, 7]
        seq_shift       = [3, 3]              target seq_len - drafter seq_len: 7 -> 4, 10 -> 7
    """
    B = len(num_computed)
    assert query_start_loc.shape == (B + 1,) and len(spans) == B
    s0 = np.asarray(num_computed, dtype=np.int64)
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    q = np.diff(qsl)
    lo, hi = dropped_ranges(spans) if ranges is None else ranges  # [B, S]: request i drops rows [lo, hi)
    # every row of the batch: its request and its target position
    row_req = np.repeat(np.arange(B), q)
    p = s0[row_req] + np.arange(qsl[-1], dtype=np.int64) - qsl[row_req]
    end = s0 + q
    if not ((lo < end[:, None]) & (hi > s0[:, None])).any():
        return _plan_clear_windows(s0, q, qsl, row_req, p, lo, hi, prompt_lens)
    L, H = lo[row_req], hi[row_req]
    kept = ~((p[:, None] >= L) & (p[:, None] < H)).any(axis=1)
    before = np.clip(p[:, None] - L, 0, H - L).sum(axis=1)  # rows dropped before p: p - c(p)
    n_kept = np.bincount(row_req[kept], minlength=B)
    dummy = (q > 0) & (n_kept == 0)
    c_end = end - np.clip(end[:, None] - lo, 0, hi - lo).sum(axis=1)  # kept rows before the window's end
    keep_mask = kept.copy()
    keep_mask[qsl[1:][dummy] - 1] = True  # a dummy request keeps its last row...
    offset = before.copy()
    offset[qsl[1:][dummy] - 1] = (end - 1 - c_end)[dummy]  # ...at the next free drafter position
    keep_idx = np.flatnonzero(keep_mask)
    new_qsl = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(n_kept + dummy, out=new_qsl[1:])
    seq_shift = np.where(q > 0, end - c_end - dummy, 0).astype(np.int64)
    if prompt_lens is None:
        d_rows = t_rows = np.zeros(B, dtype=np.int64)
    else:
        prompt = p < np.asarray(prompt_lens, dtype=np.int64)[row_req]
        t_rows = np.bincount(row_req[prompt], minlength=B)
        d_rows = np.bincount(row_req[prompt & kept], minlength=B)
    off = offset[keep_idx]
    return StepPlan(keep_idx=keep_idx, offset=off, positions=p[keep_idx] - off, req_of_row=row_req[keep_idx],
                    query_start_loc=new_qsl, seq_shift=seq_shift, dummy=dummy, drafter_prompt_rows=d_rows,
                    target_prompt_rows=t_rows,
                    identity=bool(len(keep_idx) == len(p) and not off.any()), keeps_all=len(keep_idx) == len(p),
                    drop_lo=lo, drop_hi=hi)


def _plan_clear_windows(s0, q, qsl, row_req, p, lo, hi, prompt_lens) -> StepPlan:
    """plan_step where no window meets a dropped range (every decode step once the prompt is
    past its images, and text-only batches): every row is kept, shifted by the rows its request
    dropped before its window. The same plan as the general path, in a few numpy ops (it runs
    every step)."""
    B = len(s0)
    shift = np.where(q > 0, np.where(hi <= s0[:, None], hi - lo, 0).sum(axis=1), 0).astype(np.int64)  # [B]
    off = shift[row_req]
    if prompt_lens is None:
        t_rows = np.zeros(B, dtype=np.int64)
    else:
        t_rows = np.bincount(row_req[p < np.asarray(prompt_lens, dtype=np.int64)[row_req]], minlength=B)
    return StepPlan(keep_idx=np.arange(len(p), dtype=np.int64), offset=off, positions=p - off, req_of_row=row_req,
                    query_start_loc=qsl.astype(np.int32), seq_shift=shift, dummy=np.zeros(B, dtype=bool),
                    drafter_prompt_rows=t_rows, target_prompt_rows=t_rows, identity=not bool(off.any()), keeps_all=True,
                    drop_lo=lo, drop_hi=hi)


@dataclasses.dataclass
class SteadyBatch:
    """What stays fixed while the same requests keep decoding in the same rows, each past its
    prompt and its images: then every window is clear (plan_step's `_plan_clear_windows`), holds
    no prompt row, and each request's shift is the sum of its dropped ranges. Built once per
    batch composition (`steady_batch`), it lets `plan_decode` plan such a step in a dozen numpy
    ops instead of plan_step's fifty (it runs every step). Its arrays are shared by the plans it
    makes: read-only."""

    key: tuple  # the batch's requests, row by row (the caller's identity of them)
    clear_from: np.ndarray  # [B] int64: windows starting here or later are clear and past the prompt
    shift: np.ndarray  # [B] int64: rows request i drops in all (its seq_shift in every clear window)
    drop_lo: np.ndarray  # [B, S] int64: the ranges plan_step would carry (dropped_ranges)
    drop_hi: np.ndarray  # [B, S] int64
    reqs: np.ndarray  # [B] int64 0..B-1
    zeros: np.ndarray  # [B] int64 (no prompt rows)
    no_dummy: np.ndarray  # [B] bool


def steady_batch(key: tuple, ranges: tuple[np.ndarray, np.ndarray], prompt_lens: np.ndarray) -> SteadyBatch:
    """The SteadyBatch of a batch with dropped ranges ([B, S] lo, hi) and prompt lengths [B]."""
    lo, hi = ranges
    B = len(lo)
    clear_from = np.maximum(hi.max(axis=1, initial=0), np.asarray(prompt_lens, dtype=np.int64))
    return SteadyBatch(key=key, clear_from=clear_from, shift=(hi - lo).sum(axis=1).astype(np.int64),
                       drop_lo=lo, drop_hi=hi, reqs=np.arange(B, dtype=np.int64),
                       zeros=np.zeros(B, dtype=np.int64), no_dummy=np.zeros(B, dtype=bool))


def plan_decode(num_computed: np.ndarray, query_start_loc: np.ndarray, steady: SteadyBatch) -> StepPlan | None:
    """plan_step(num_computed, query_start_loc, <the batch's spans>, prompt_lens) when the step
    is steady (every window starts at or after its request's ``clear_from`` and holds a row),
    else None. num_computed: [B] window starts; query_start_loc: [B + 1] int32 target rows."""
    q = np.diff(query_start_loc)
    if not ((num_computed >= steady.clear_from).all() and q.all()):
        return None
    row_req = np.repeat(steady.reqs, q)
    rows = np.arange(int(query_start_loc[-1]))
    # target position s0 + (row - qsl), minus the rows dropped before it
    positions = (num_computed - query_start_loc[:-1] - steady.shift)[row_req] + rows
    return StepPlan(keep_idx=rows, offset=steady.shift[row_req], positions=positions, req_of_row=row_req,
                    query_start_loc=query_start_loc.astype(np.int32, copy=False), seq_shift=steady.shift,
                    dummy=steady.no_dummy, drafter_prompt_rows=steady.zeros, target_prompt_rows=steady.zeros,
                    identity=not steady.shift.any(), keeps_all=True, drop_lo=steady.drop_lo,
                    drop_hi=steady.drop_hi)


def dropped_ranges(spans: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """([B, S], [B, S]) int64: request i drops the target rows [lo, hi) of each of its image spans
    (the rows whose next token is a placeholder: [offset - 1, offset + length - 1), clipped at 0);
    padding entries are the empty range [0, 0)."""
    S = max((len(sp) for sp in spans), default=0)
    lo = np.zeros((len(spans), max(S, 1)), dtype=np.int64)
    hi = np.zeros_like(lo)
    for i, sp in enumerate(spans):
        if len(sp):
            lo[i, : len(sp)] = np.maximum(sp[:, 0] - 1, 0)
            hi[i, : len(sp)] = sp[:, 0] + sp[:, 1] - 1
    return lo, hi


def stack_ranges(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """dropped_ranges of a batch from each request's own, computed once per request
    (``dropped_ranges([spans])``: ([1, S_i], [1, S_i]) each): ([B, S], [B, S]), zero-padded."""
    if len(rows) == 1:
        return rows[0]
    S = max(lo.shape[1] for lo, _ in rows)
    lo, hi = np.zeros((len(rows), S), dtype=np.int64), np.zeros((len(rows), S), dtype=np.int64)
    for i, (a, b) in enumerate(rows):
        lo[i, : a.shape[1]], hi[i, : b.shape[1]] = a[0], b[0]
    return lo, hi


def write_limits(num_computed: np.ndarray, query_start_loc: np.ndarray, num_speculative_tokens: int) -> np.ndarray:
    """[B] the last target position each request's drafter may write this step: its window end plus
    the draft passes' lookahead rows (serving/draft_attention.py writes nothing beyond it).
    num_computed: [B] window starts; query_start_loc: [>= B + 1] target rows of the step."""
    B = len(num_computed)
    return np.asarray(num_computed, dtype=np.int64) + np.diff(np.asarray(query_start_loc[: B + 1], dtype=np.int64)) \
        + num_speculative_tokens


def record_prefill(counters, req_ids: list[str], plan: StepPlan, num_computed: np.ndarray,
                   query_start_loc: np.ndarray, prompt_lens: np.ndarray) -> None:
    """Add this step's drafter / target prompt rows to `counters` (a serving.metrics.PrefillCounters)."""
    B = len(req_ids)
    ends = np.asarray(num_computed[:B], dtype=np.int64) + np.diff(np.asarray(query_start_loc[: B + 1]))
    for i in np.flatnonzero(plan.target_prompt_rows[:B]):
        counters.add(req_ids[i], int(plan.drafter_prompt_rows[i]), int(plan.target_prompt_rows[i]),
                     prompt_done=bool(ends[i] >= prompt_lens[i]))


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


def target_positions(
    positions: torch.Tensor,  # [...] compressed (drafter) positions
    drop_ranges: torch.Tensor,  # [..., S, 2] sorted dropped target ranges [lo, hi) of each position's request
) -> torch.Tensor:  # [...] int64 target positions
    """c -> p, the inverse of c(p) = p - |J ∩ [0, p)| on kept rows: walk the dropped ranges in
    order; each one at or before the position shifts it past. Padding ranges [0, 0) change nothing.

    E.g., ranges [(1, 4), (6, 8)] (rows 1-3 and 6-7 dropped): c [0, 1, 2, 3] -> p [0, 4, 5, 8].
    """
    p = positions.long()
    for s in range(drop_ranges.shape[-2]):
        lo, hi = drop_ranges[..., s, 0].long(), drop_ranges[..., s, 1].long()
        p = torch.where(p >= lo, p + (hi - lo), p)
    return p
