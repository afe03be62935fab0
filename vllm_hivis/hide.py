"""The drop rule: which target rows the drafter sees, and at which drafter positions.

Vocabulary (one request; positions p = 0..L-1 are the target's, prompt then generated):
- EAGLE row p pairs the target's last-layer hidden state h_p with the *next* token x_{p+1};
  the drafter predicts x_{p+2} from it.
- image span: prompt positions [offset, offset + length) holding one image's placeholders.
- dropped row (the "input-token rule"): row p with p + 1 inside an image span, i.e. a row whose
  input token would be an image placeholder. J = the union of [offset - 1, offset + length - 1).
- kept row: every other row. The drafter reads exactly the text tokens as inputs; the row at an
  image's last position is kept, paired with the first text token after the image, and carries
  the target's summary of the image (the target attended to it).
- drafter position c(p) = p - |J ∩ [0, p)|: kept rows form the contiguous sequence 0, 1, 2, ...
  RoPE uses c, and the drafter's KV lives at c in the request's own blocks ("compressed in place";
  c <= p, so it always lands in blocks the request owns).

Spans come from the request's multimodal placeholders, never from token ids: a generated token
that happens to equal the image token id is text.

Everything here is numpy on the CPU; `plan_step` is what the proposer runs every step (stateless:
preemption and recompute need no bookkeeping), and `kept_rows` is what training uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EMPTY_SPANS = np.zeros((0, 2), dtype=np.int64)


def as_spans(ranges) -> np.ndarray:
    """[S, 2] int64 (offset, length) from (offset, length) pairs, sorted by offset."""
    arr = np.asarray(list(ranges), dtype=np.int64).reshape(-1, 2)
    assert (arr[:, 1] >= 0).all(), "span lengths must be >= 0"
    return arr[np.argsort(arr[:, 0], kind="stable")]


def is_dropped(spans: np.ndarray, p: np.ndarray) -> np.ndarray:
    # spans: [S, 2] (offset, length); p: [N] target rows -> [N] bool
    nxt = p[:, None] + 1
    return ((nxt >= spans[None, :, 0]) & (nxt < spans[None, :, 0] + spans[None, :, 1])).any(axis=1)


def dropped_before(spans: np.ndarray, p: np.ndarray) -> np.ndarray:
    # spans: [S, 2]; p: [N] -> [N] |J ∩ [0, p)|, the number of dropped rows before each p
    lo = np.maximum(spans[:, 0] - 1, 0)  # an image at offset 0 has no row before it
    n = spans[:, 0] + spans[:, 1] - 1 - lo
    return np.clip(p[:, None] - lo[None, :], 0, n[None, :]).sum(axis=1)


def kept_rows(spans: np.ndarray, length: int) -> np.ndarray:
    """[N] target rows in [0, length) the drafter sees, in order (row i has drafter position i)."""
    p = np.arange(length, dtype=np.int64)
    return p[~is_dropped(spans, p)]


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
