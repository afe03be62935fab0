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

Everything here is numpy on the CPU. `kept_rows` is what training uses; plan.py turns the rule
into each serving step's index arithmetic (stateless: preemption and recompute need no bookkeeping).
"""

from __future__ import annotations

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
